"""One SFT optimizer step (forward, loss, backward, AdamW) on the toy setting of ``experiment=sft_toy``, with
the loss on packed tokens (``module.packed_forward=true``) and through the model's own padded loss, in
alternating rounds on the same batches; prints the median seconds per step of each and their ratio.

    python benchmarks/bench_sft_step.py --rounds 3 --steps 20 [--threads 2] [override ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def steps_seconds(module, batches: list[dict], packed: bool) -> list[float]:
    """Seconds of each optimizer step over ``batches`` with the packed or the padded loss."""
    module.packed_forward = packed
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        module.lm_loss(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (sft_toy runs 2)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on experiment=sft_toy")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("train", overrides=["experiment=sft_toy", *args.overrides])
    module = instantiate(
        cfg.module, model_loader=instantiate(cfg.model, _convert_="object"),
        output_format=instantiate(cfg.output_format), _convert_="object",
    )  # fmt: skip
    module.configure_model()
    data = instantiate(cfg.data, output_format=instantiate(cfg.output_format), _convert_="object")
    data.connect(module.tokenizer)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.steps)]
    real = sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)
    print(f"{args.steps} batches of {cfg.data.batch_size}; real tokens {real:.1%} of the padded batch")
    medians: dict[bool, list[float]] = {True: [], False: []}
    for round_ in range(args.rounds):
        for packed in (True, False):
            seconds = steps_seconds(module, batches, packed)[1:]  # the first step warms up
            medians[packed].append(statistics.median(seconds))
            print(f"round {round_}: {'packed' if packed else 'padded'} {medians[packed][-1]:.3f} s/step")
    ratios = [p / u for p, u in zip(medians[True], medians[False])]
    print(f"packed / padded: {statistics.median(ratios):.2f} (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
