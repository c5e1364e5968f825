"""A DataLoader that Lightning can checkpoint mid-epoch, so a resumed run sees the batches an uninterrupted one would.

Lightning saves and restores loaders that implement ``state_dict``/``load_state_dict``. The state is
the shuffle generator's state at the start of the epoch plus how many batches the training loop has
consumed; on restore the epoch's order is replayed and the consumed batches are skipped.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import DataLoader


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with mid-epoch ``state_dict``/``load_state_dict`` (same constructor)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_start_state = None
        self._yielded = 0
        self._restore: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        restore, self._restore = self._restore, None
        skip = 0
        if restore is not None:
            skip = restore["batches"]
            if restore["generator"] is not None and self.generator is not None:
                self.generator.set_state(restore["generator"])
        self._epoch_start_state = self.generator.get_state() if self.generator is not None else None
        self._yielded = 0
        return self._batches(super().__iter__(), skip)

    def _batches(self, iterator: Iterator[Any], skip: int) -> Iterator[Any]:
        for index, batch in enumerate(iterator):
            if index < skip:
                continue  # replayed so the sampler and generator advance exactly as before
            self._yielded = index + 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self._epoch_start_state, "batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore = dict(state)
