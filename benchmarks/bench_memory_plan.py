"""The memory plan against what a CPU run measures: peak resident memory of short training runs (tiny model,
and the random-weight Qwen2.5-0.5B shape), each in a fresh process.

    python benchmarks/bench_memory_plan.py                 # every case, one after the other
    python benchmarks/bench_memory_plan.py --case shape_sft

On CPU a device's memory is the process's: the measured figure is the resident high-water mark
(``ru_maxrss``) minus the resident size just before ``train(cfg)`` (libraries, config, Python), set against
the plan's per-device peak (resident terms + the larger of a step and a rollout). Prints one JSON line per
case and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from selfbudget_pl.memory.fit import plan_from_config
from selfbudget_pl.memory.plan import GIB
from selfbudget_pl.train import CONFIG_DIR, train

MIB = 1024**2
# 256 synthetic problems: the 0.5B shape's tokenizer (151,936 entries, most of them added tokens) encodes slowly.
COMMON = ["trainer=cpu", "rollout=hf", "trainer.max_steps=2", "trainer.val_check_interval=null", "data.train.0.size=256",
          "trainer.limit_val_batches=0", "data.num_workers=0", "module.export_dir=null"]
# Completions of a random-weight model run to max_new_tokens; prompts of the synthetic task stay below 64 tokens.
# The toy experiments set the tiny model's widths and GRPO's starting export: the shape's widths are given again.
SHAPE = ["model=qwen2.5_0.5b_shape", "model.name_or_path=null", "model.tiny.hidden_size=896",
         "model.tiny.intermediate_size=4864", "trainer.precision=bf16-mixed"]
TINY_GRPO = ["model.name_or_path=null", "module.micro_batch_size=4"]
CASES = {
    "tiny_sft": ["experiment=sft_toy", "data.batch_size=32", "data.max_length=160"],
    "tiny_grpo": ["experiment=grpo_toy", *TINY_GRPO, "data.batch_size=8", "data.max_prompt_length=64",
                  "module.sampling.max_new_tokens=128"],
    "shape_sft": ["experiment=sft_toy", *SHAPE, "data.batch_size=4", "data.max_length=160"],
    "shape_grpo": ["experiment=grpo_toy", *SHAPE, "data.batch_size=1", "module.num_generations=4",
                   "module.micro_batch_size=4", "data.max_prompt_length=64", "module.sampling.max_new_tokens=32"],
}


def resident_bytes() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def run_case(name: str) -> dict:
    """Plan and run one case in this process; the measured and planned peaks in MiB."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*CASES[name], *COMMON])
    with open_dict(cfg):
        cfg.paths.output_dir = tempfile.mkdtemp(prefix=f"bench_memory_plan_{name}_")
        cfg.num_threads = 1
        cfg.trainer.enable_progress_bar = False
        cfg.memory_plan.on_overflow = "warn"
    settings = instantiate(cfg.memory_plan)
    plan, _ = plan_from_config(cfg, settings, probe=False)
    instantiate(cfg.model).path  # a tiny model is built (and written) before the baseline, not inside it
    before = resident_bytes()
    train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "case": name,
        "overrides": CASES[name],
        "measured_mib": round((peak - before) / MIB),
        "planned_mib": round(plan.device_peak / MIB),
        "ratio": round((peak - before) / plan.device_peak, 3),
        "baseline_mib": round(before / MIB),
        "terms_mib": {term.name: round(term.bytes / MIB, 1) for term in plan.device},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    rows = []
    for name in CASES:
        done = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("| case | planned MiB | measured MiB (peak - before) | measured / planned |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['planned_mib']} | {row['measured_mib']} | {row['ratio']} |")


if __name__ == "__main__":
    main()
