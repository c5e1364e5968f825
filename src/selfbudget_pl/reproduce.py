"""The SelfBudgeter effect end to end on CPU: SFT -> evaluate -> budget-guided GRPO -> evaluate ->
pre-filled budget sweep (-> optional correctness-only control run) -> ``report.md``.

``selfbudget-reproduce`` (or ``python -m selfbudget_pl.reproduce``) runs it on the tiny model and the
synthetic task; every stage is an ordinary ``train.yaml`` composition (``configs/reproduce.yaml`` lists
the overrides per stage), so anything in a stage can be changed from the shell, e.g.
``selfbudget-reproduce "sft=['experiment=sft_toy','trainer.max_steps=500']"``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from selfbudget_pl.callbacks.progress import pipeline_eta, stage_banner
from selfbudget_pl.config.overrides import open_trainer_overrides
from selfbudget_pl.evaluate import evaluate_model
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.train import CONFIG_DIR, train

log = logging.getLogger(__name__)


def compose_stage(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """Compose ``train.yaml`` with a stage's overrides, writing into ``output_dir``."""
    overrides = open_trainer_overrides(overrides)  # Lightning's Trainer flags as typed, as in train.py
    if GlobalHydra.instance().is_initialized():
        cfg = hydra.compose("train", overrides=list(overrides))
    else:
        with hydra.initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = hydra.compose("train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def heldout_records(stage_cfg: DictConfig, size: int, difficulty: Optional[float] = None) -> list[dict[str, Any]]:
    """Held-out problems drawn like the stage's own test split (optionally one difficulty only)."""
    source_cfg = OmegaConf.to_container(stage_cfg.data.test[0], resolve=True)
    # Filtering by difficulty keeps about 1/5 of the problems: draw enough to fill ``size``.
    source_cfg["size"] = size if difficulty is None else size * 8
    records = instantiate(source_cfg).load()
    if difficulty is not None:
        records = [r for r in records if r["difficulty"] == difficulty]
    return records[:size]


def reproduce(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage; return the figures that ``report.md`` states (also written as ``figures.json``)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=int(cfg.evaluation.max_new_tokens))
    eval_kwargs = {"sampling": sampling, "batch_size": int(cfg.evaluation.batch_size), "progress": True}

    runs = {"grpo": cfg.grpo, **({"control": cfg.control} if cfg.get("control") else {})}
    plan = ["sft", "eval_sft", *[k for run in runs for k in (run, f"eval_{run}", *(["sweep"] if run == "grpo" else []))]]

    def stage(name: str) -> float:
        # One line per stage with where the pipeline is and how long the rest should take (from a
        # reference run's stage times, scaled by how fast this machine ran the stages so far).
        eta = pipeline_eta(timings, plan[len(timings):], cfg.get("stage_seconds") or {})
        print(stage_banner(len(timings) + 1, len(plan), name, sum(timings.values()), eta), flush=True)
        return time.perf_counter()

    started = stage("stage 1: cold-start SFT")
    sft_cfg = compose_stage([*cfg.sft, f"module.export_dir={out / 'sft' / 'export'}"], out / "sft")
    _, sft = train(sft_cfg)
    timings["sft"] = time.perf_counter() - started
    records = heldout_records(sft_cfg, int(cfg.evaluation.size))

    started = stage("evaluate the SFT model")
    sft_eval = evaluate_model(sft["module"], {"synthetic": records}, out_dir=out / "eval_sft", **eval_kwargs)
    timings["eval_sft"] = time.perf_counter() - started

    results = {"sft": sft_eval["rows"][0]}
    for run, overrides in runs.items():
        started = stage(f"stage 2: GRPO ({run})")
        grpo_cfg = compose_stage(
            [*overrides, f"model.name_or_path={out / 'sft' / 'export'}", f"module.export_dir={out / run / 'export'}"],
            out / run,
        )
        _, grpo = train(grpo_cfg)
        timings[run] = time.perf_counter() - started
        started = stage(f"evaluate the GRPO model ({run})")
        summary = evaluate_model(
            grpo["module"], {"synthetic": records}, out_dir=out / f"eval_{run}", baseline=sft_eval, **eval_kwargs
        )
        results[run] = summary["rows"][0]
        timings[f"eval_{run}"] = time.perf_counter() - started
        if run == "grpo":
            started = stage("pre-filled budget sweep")
            sweep_records = heldout_records(sft_cfg, int(cfg.sweep.size), difficulty=cfg.sweep.difficulty)
            sweep = evaluate_model(
                grpo["module"], {f"synthetic_k{cfg.sweep.difficulty}": sweep_records}, out_dir=out / "sweep",
                budgets=list(cfg.sweep.budgets), **eval_kwargs,
            )  # fmt: skip
            results["sweep"] = sweep["rows"]
            timings["sweep"] = time.perf_counter() - started

    figures = {"results": results, "timings_s": timings, "checks": check_targets(results, cfg.targets)}
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (out / "report.md").write_text(report_markdown(figures, out))
    log.info("report: %s", out / "report.md")
    return figures


def check_targets(results: dict[str, Any], targets: DictConfig) -> list[dict[str, Any]]:
    """Each target of the reproduction with the measured value and whether it is met (None: not measurable)."""
    sft, grpo = results["sft"], results["grpo"]
    length_ratio = grpo["mean_tokens"] / sft["mean_tokens"] if sft["mean_tokens"] else None
    accuracy_change = 100 * (grpo["accuracy"] - sft["accuracy"])
    sweep_within = min((row["within_10"] or 0.0) for row in results["sweep"])
    rows = [
        ("SFT accuracy", sft["accuracy"], ">=", targets.sft_accuracy),
        ("SFT Spearman(budget, difficulty)", sft["spearman_budget_difficulty"], ">=", targets.sft_spearman),
        ("GRPO mean length / SFT mean length", length_ratio, "<=", targets.grpo_length_ratio),
        ("GRPO accuracy change (points)", accuracy_change, ">=", -targets.grpo_max_accuracy_drop),
        ("pre-filled budgets: worst fraction within ±10%", sweep_within, ">=", targets.prefill_within_10),
    ]
    checks = []
    for target, measured, relation, goal in rows:
        known = measured is not None and measured == measured  # NaN: e.g. no budgets were stated
        met = known and (measured >= goal if relation == ">=" else measured <= goal)
        value = round(float(measured), 4) if known else None
        checks.append({"target": target, "measured": value, "goal": f"{relation} {goal}", "met": bool(met)})
    return checks


def report_markdown(figures: dict[str, Any], out: Path) -> str:
    """The reproduction report: targets, the main table, the sweep, the plots."""
    command = " ".join(["selfbudget-reproduce", *sys.argv[1:]]) if sys.argv[0].endswith("reproduce") else None
    lines = ["# SelfBudgeter on the tiny model (CPU reproduction)", ""]
    lines += [f"Command: `{command}`", ""] if command else []
    lines += ["## Targets", "",
              "| target | measured | goal | met |", "|---|---|---|---|"]  # fmt: skip
    for check in figures["checks"]:
        measured = "n/a" if check["measured"] is None else f"{check['measured']:.3f}"
        lines.append(f"| {check['target']} | {measured} | {check['goal']} | "
                     f"{'yes' if check['met'] else '**no**'} |")  # fmt: skip
    lines += ["", "## Held-out synthetic problems (greedy)", ""]
    for run in ("sft", "grpo", "control"):
        path = out / f"eval_{run}" / "summary.md"
        if path.exists():
            lines += [f"### {run}", "", path.read_text().strip(), "",
                      f"![budget vs length](eval_{run}/budget_vs_length_synthetic.png)", ""]  # fmt: skip
    lines += ["## Pre-filled budgets", "", (out / "sweep" / "summary.md").read_text().strip(), ""]
    lines += ["## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in figures["timings_s"].items()]
    lines += [f"| total | {sum(figures['timings_s'].values()):.0f} |", ""]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="reproduce")
def main(cfg: DictConfig) -> None:
    reproduce(cfg)


if __name__ == "__main__":
    main()
