"""Time and peak memory of loading a JSONL file with one 50 MB line through the DataModule (GRPO prompts,
the tiny model's tokenizer), as a training run does before its first step.

    PYTHONPATH=src python benchmarks/long_line.py [--mb 50]

Prints the wall time of ``setup("fit")``, the process's peak RSS, and what became of the long row.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=50, help="size of the long line in MB")
    args = parser.parse_args()

    from selfbudget_pl.data.datamodule import BudgetMathDataModule
    from selfbudget_pl.data.sources import JsonlSource
    from selfbudget_pl.models import ModelLoader

    tokenizer = ModelLoader().load_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "long.jsonl"
        with path.open("w") as handle:
            handle.write(json.dumps({"problem": "1+2", "answer": "3"}) + "\n")
            handle.write('{"problem": "')
            for _ in range(int(args.mb)):  # 1 MB at a time: the peak RSS below is the loader's, not ours
                handle.write("3+4 " * 250_000)
            handle.write('", "answer": "7"}\n')
            handle.write(json.dumps({"problem": "5+6", "answer": "11"}) + "\n")
        size = path.stat().st_size
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        datamodule = BudgetMathDataModule(train=[JsonlSource(str(path), name="long")], mode="grpo", batch_size=1)
        datamodule.connect(tokenizer)
        started = time.perf_counter()
        datamodule.setup("fit")
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"file {size / 1e6:.1f} MB; setup {seconds:.2f} s; peak RSS {peak:.0f} MiB (before setup {base_rss:.0f} MiB); "
          f"rows kept {len(datamodule.datasets['train'])}; dropped {dict(datamodule.dropped.counts)}")


if __name__ == "__main__":
    main()
