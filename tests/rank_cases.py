"""Shared tail of the two-process runners: run named cases, write each rank's report as it goes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch.distributed as dist


def run_cases(output_dir: str, cases: dict[str, Callable[[], dict]]) -> None:
    """Run every case on this rank; ``rank<N>.json`` holds the reports so far even if one raises
    (the test then shows which case failed and why). Ends the process group."""
    report: dict[str, dict] = {}
    for name, case in cases.items():
        try:
            report[name] = case()
        except Exception as error:
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            raise
        finally:
            Path(output_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()
    dist.destroy_process_group()
