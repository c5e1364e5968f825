"""``selfbudget-reproduce``'s stage banners: which stage runs, the time spent, and an ETA for the rest scaled
from reference stage times by how this machine ran the stages already done."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from selfbudget_pl.callbacks.progress import format_duration


def pipeline_eta(
    done: Mapping[str, float], remaining: Sequence[str], reference: Mapping[str, float]
) -> Optional[float]:
    """Seconds left for the ``remaining`` stages: their reference durations, scaled by how this run's
    finished stages compared with theirs (a slower machine runs every stage slower). None when a
    remaining stage has no reference."""
    if any(name not in reference for name in remaining):
        return None
    timed = [name for name in done if name in reference and reference[name] > 0]
    scale = sum(done[name] for name in timed) / sum(reference[name] for name in timed) if timed else 1.0
    return scale * sum(reference[name] for name in remaining)


def stage_banner(index: int, total: int, name: str, elapsed: float, eta: Optional[float]) -> str:
    """``==== [stage 2/5] evaluate the SFT model | elapsed 3:47 | ETA 2:51``."""
    return f"==== [stage {index}/{total}] {name} | elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}"
