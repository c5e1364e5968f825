"""The SelfBudgeter effect end to end on CPU: (label the base model's own answers -> evaluate the base
model ->) SFT -> evaluate -> budget-guided GRPO -> evaluate -> pre-filled budget sweep (-> comparison GRPO
runs, e.g. another reward form) -> ``report.md``.

``selfbudget-reproduce`` (or ``python -m selfbudget_pl.reproduce``) runs it on the tiny model and the
synthetic task; every stage is an ordinary ``train.yaml`` composition (``configs/reproduce.yaml`` lists
the overrides per stage), so anything in a stage can be changed from the shell, e.g.
``selfbudget-reproduce "sft=['experiment=sft_toy','trainer.max_steps=500']"``.

``grpo_seeds=[0,1,2]`` runs stage 2 once per seed (``seed=N module.rollout_seed=N``) from the same SFT
model and reports each target per seed, with mean, standard deviation and the worst seed;
``sft_model=<an SFT export>`` skips stage 1 and starts every GRPO run from that export.
``preset=smollm2_sums`` (``configs/preset/``) is the paper's whole pipeline on a real chat model, with the
label stage (``label``), the base model's evaluation (``base``) and targets measured against it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
from hydra.core.global_hydra import GlobalHydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from selfbudget_pl.config.overrides import open_trainer_overrides
from selfbudget_pl.data.budget_labels import read_jsonl
from selfbudget_pl.data.records import DroppedRows
from selfbudget_pl.data.sources import JsonlSource
from selfbudget_pl.evaluate import evaluate_model
from selfbudget_pl.labelling import accuracy_by_difficulty, label_to_file, require_solved
from selfbudget_pl.pipeline_progress import pipeline_eta, stage_banner
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


def load_stage_module(stage_cfg: DictConfig) -> Any:
    """A stage's module with its model loaded, untrained (for an export made earlier)."""
    if stage_cfg.get("num_threads"):
        torch.set_num_threads(int(stage_cfg.num_threads))
    module = instantiate(
        stage_cfg.module, model_loader=instantiate(stage_cfg.model, _convert_="object"),
        output_format=instantiate(stage_cfg.output_format), grader=instantiate(stage_cfg.grader),
        rollout=instantiate(stage_cfg.rollout), _convert_="object",
    )  # fmt: skip
    module.configure_model()
    return module.eval()


def stage_references(plan: list[str], stage_seconds: dict[str, float]) -> dict[str, float]:
    """The reference run's time for each planned stage: every GRPO seed's stages take the times of the
    reference's one GRPO run (``grpo_seed1`` -> ``grpo``, ``sweep_grpo_seed1`` -> ``sweep``)."""
    kinds = {name: re.sub(r"_seed\d+$", "", name).replace("sweep_grpo", "sweep") for name in plan}
    return {name: stage_seconds[kind] for name, kind in kinds.items() if kind in stage_seconds}


def stage_prompts(stage_cfg: DictConfig) -> dict[str, Any]:
    """How the stage's data renders a problem as a prompt, so evaluation asks as training did."""
    data = stage_cfg.data
    return {"prompt_template": data.prompt_template, "system_prompt": data.get("system_prompt"),
            "chat_template": data.get("chat_template")}  # fmt: skip


def train_on_labels(stage_cfg: DictConfig, labels: Path) -> None:
    """Make the label stage's file the stage's training data: stage 1's targets, stage 2's problems and caps."""
    with open_dict(stage_cfg):
        for split in ("val", "test"):  # they may copy the replaced source's settings by interpolation
            stage_cfg.data[split] = OmegaConf.to_container(stage_cfg.data[split], resolve=True)
        stage_cfg.data.train = [{"_target_": f"{JsonlSource.__module__}.JsonlSource", "path": str(labels), "schema": "labelled"}]


def label_stage(label_cfg: DictConfig, module: Any, stage_cfg: DictConfig, path: Path) -> dict[str, Any]:
    """Label ``label_cfg.source``'s problems with the base model's own correct answers (K samples each),
    prompted as the SFT stage trains; resumable. Returns the counts and the accuracy per difficulty."""
    dropped = DroppedRows()
    sampling = SamplingSettings(
        temperature=float(label_cfg.temperature), top_p=float(label_cfg.top_p),
        max_new_tokens=int(label_cfg.max_new_tokens), seed=int(label_cfg.seed),
    )  # fmt: skip
    records = instantiate(label_cfg.source).load()
    labelled, result = label_to_file(
        records, path, backend=module.rollout_backend, tokenizer=module.tokenizer, grader=module.grader,
        samples=int(label_cfg.samples), sampling=sampling, batch_size=int(label_cfg.batch_size),
        round_to=int(stage_cfg.data.budget_round_to), seed=int(label_cfg.seed), dropped=dropped,
        **stage_prompts(stage_cfg),
    )  # fmt: skip
    require_solved(labelled, path, result.summary(dropped))
    accuracy = {f"{difficulty:g}" if difficulty is not None else "unknown": right / max(total, 1)
                for difficulty, (right, total) in sorted(accuracy_by_difficulty(labelled).items(), key=str)}  # fmt: skip
    budgets = [row["budget"] for row in labelled if row.get("budget") is not None]
    return {"problems": len(labelled), "labelled": len(budgets), "solved": sum(row.get("b_max") is not None for row in labelled),
            "sample_accuracy_by_difficulty": accuracy, "mean_budget": statistics.fmean(budgets) if budgets else None}  # fmt: skip


def reproduce(cfg: DictConfig) -> dict[str, Any]:
    """Run every stage; return the figures that ``report.md`` states (also written as ``figures.json``)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    sampling = SamplingSettings(temperature=0.0, max_new_tokens=int(cfg.evaluation.max_new_tokens))
    eval_kwargs = {"sampling": sampling, "batch_size": int(cfg.evaluation.batch_size), "progress": True}
    seeds = [int(seed) for seed in cfg.get("grpo_seeds") or [0]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"grpo_seeds={seeds} repeats a seed")
    comparisons = dict(cfg.get("comparisons") or {})
    clashes = sorted(set(comparisons) & {"base", "sft", *(f"grpo_seed{seed}" for seed in seeds)})
    if clashes:
        raise ValueError(f"comparisons: {clashes} name a stage of the pipeline itself; rename them")
    if cfg.get("base") is None and (cfg.targets.reference == "base" or cfg.targets.sft_max_accuracy_drop is not None):
        raise ValueError("targets.reference=base and targets.sft_max_accuracy_drop need the base model's evaluation: "
                         "set `base` (its overrides on the SFT stage's, e.g. [output_format=free_form])")

    runs = [(f"grpo_seed{seed}", [*cfg.grpo, f"seed={seed}", f"module.rollout_seed={seed}"]) for seed in seeds]
    runs += [(name, [*overrides, f"seed={seeds[0]}", f"module.rollout_seed={seeds[0]}"]) for name, overrides in comparisons.items()]
    plan = [*(["label"] if cfg.get("label") else []), *(["eval_base"] if cfg.get("base") is not None else [])]
    plan += [*([] if cfg.get("sft_model") else ["sft"]), "eval_sft"]
    plan += [name for run, _ in runs for name in (run, f"eval_{run}", *([f"sweep_{run}"] if run.startswith("grpo_seed") else []))]
    reference = stage_references(plan, cfg.get("stage_seconds") or {})

    def stage(name: str) -> float:
        # One line per stage with where the pipeline is and how long the rest should take (from a
        # reference run's stage times, scaled by how fast this machine ran the stages so far).
        eta = pipeline_eta(timings, plan[len(timings):], reference)
        print(stage_banner(len(timings) + 1, len(plan), name, sum(timings.values()), eta), flush=True)
        return time.perf_counter()

    labels = out / "labels.jsonl" if cfg.get("label") else None
    sft_export = Path(cfg.sft_model) if cfg.get("sft_model") else out / "sft" / "export"
    sft_cfg = compose_stage([*cfg.sft, f"module.export_dir={sft_export}"], out / "sft")
    if labels is not None:
        train_on_labels(sft_cfg, labels)
    records = heldout_records(sft_cfg, int(cfg.evaluation.size))
    results: dict[str, Any] = {"grpo": {}, "sweep": {}, "comparisons": {}}

    base_eval = None
    if cfg.get("label") or cfg.get("base") is not None:
        # The base model, before any training: it labels stage 1's data and is what compression is measured against.
        base_cfg = compose_stage([*cfg.sft, *(cfg.get("base") or [])], out / "base")
        base_module = load_stage_module(base_cfg)
        if labels is not None:
            started = stage("label the base model's own answers")
            results["labels"] = label_stage(cfg.label, base_module, sft_cfg, labels)
            timings["label"] = time.perf_counter() - started
        if cfg.get("base") is not None:
            started = stage("evaluate the base model")
            base_eval = evaluate_model(
                base_module, {"synthetic": records}, out_dir=out / "eval_base", **stage_prompts(base_cfg), **eval_kwargs
            )
            results["base"] = base_eval["rows"][0]
            timings["eval_base"] = time.perf_counter() - started
        del base_module

    if cfg.get("sft_model"):
        if not (sft_export / "config.json").exists():
            raise FileNotFoundError(f"sft_model={sft_export}: no export there (config.json missing)")
        with open_dict(sft_cfg):
            sft_cfg.model.name_or_path = str(sft_export)
        sft_module = load_stage_module(sft_cfg)
    else:
        started = stage("stage 1: cold-start SFT")
        _, sft = train(sft_cfg)
        sft_module = sft["module"]
        timings["sft"] = time.perf_counter() - started
    prompts = stage_prompts(sft_cfg)

    started = stage("evaluate the SFT model")
    sft_eval = evaluate_model(
        sft_module, {"synthetic": records}, out_dir=out / "eval_sft", baseline=base_eval, **prompts, **eval_kwargs
    )
    timings["eval_sft"] = time.perf_counter() - started
    del sft_module
    results["sft"] = sft_eval["rows"][0]
    baseline = base_eval if cfg.targets.reference == "base" else sft_eval

    sweep_records = heldout_records(sft_cfg, int(cfg.sweep.size), difficulty=cfg.sweep.difficulty)
    sweep_name = "synthetic" if cfg.sweep.difficulty is None else f"synthetic_k{cfg.sweep.difficulty}"
    for run, overrides in runs:
        started = stage(f"stage 2: GRPO ({run})")
        grpo_cfg = compose_stage(
            [*overrides, f"model.name_or_path={sft_export}", f"module.export_dir={out / run / 'export'}"], out / run
        )
        if labels is not None:
            train_on_labels(grpo_cfg, labels)
        _, grpo = train(grpo_cfg)
        timings[run] = time.perf_counter() - started
        started = stage(f"evaluate the GRPO model ({run})")
        summary = evaluate_model(
            grpo["module"], {"synthetic": records}, out_dir=out / f"eval_{run}", baseline=baseline, **prompts, **eval_kwargs
        )
        timings[f"eval_{run}"] = time.perf_counter() - started
        if not run.startswith("grpo_seed"):
            results["comparisons"][run] = summary["rows"][0]
            continue
        seed = run.removeprefix("grpo_seed")
        results["grpo"][seed] = summary["rows"][0]
        started = stage(f"pre-filled budget sweep ({run})")
        sweep = evaluate_model(
            grpo["module"], {sweep_name: sweep_records}, out_dir=out / f"sweep_{run}",
            budgets=list(cfg.sweep.budgets), **prompts, **eval_kwargs,
        )  # fmt: skip
        results["sweep"][seed] = sweep["rows"]
        timings[f"sweep_{run}"] = time.perf_counter() - started

    checks = {seed: check_targets(results, seed, cfg.targets) for seed in results["grpo"]}
    figures = {"results": results, "timings_s": timings, "checks": checks, "over_seeds": over_seeds(checks)}
    (out / "figures.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (out / "report.md").write_text(report_markdown(figures, out, cfg, {str(r["id"]): r["problem"] for r in records}))
    log.info("report: %s", out / "report.md")
    return figures


def check_targets(results: dict[str, Any], seed: str, targets: DictConfig) -> list[dict[str, Any]]:
    """Each target of the reproduction for one GRPO seed, with the measured value and whether it is met
    (not met when not measurable, e.g. no budget was stated). A target set to null is not checked; lengths
    and accuracy compare with ``targets.reference`` (the SFT model, or the base model); "within" is
    ``targets.tolerance`` (±10% or ±20%) of the length, or of the pre-filled N."""
    reference = targets.reference
    if reference not in ("sft", "base"):
        raise ValueError(f"targets.reference={reference!r}: sft or base")
    tolerance = round(100 * float(targets.tolerance))
    if tolerance not in (10, 20):
        raise ValueError(f"targets.tolerance={targets.tolerance}: 0.1 or 0.2 (the evaluation measures ±10% and ±20%)")
    within = f"within_{tolerance}"
    sft, grpo, sweep, ref = results["sft"], results["grpo"][seed], results["sweep"][seed], results[reference]
    name = {"sft": "SFT", "base": "base"}[reference]

    def points(model: dict[str, Any], against: dict[str, Any]) -> float:
        return 100 * (model["accuracy"] - against["accuracy"])

    rows = [
        ("SFT accuracy", lambda: sft["accuracy"], ">=", targets.sft_accuracy),
        ("SFT accuracy change vs base (points)", lambda: points(sft, results["base"]), ">=",
         None if targets.sft_max_accuracy_drop is None else -targets.sft_max_accuracy_drop),
        ("SFT well-formed answers", lambda: 1.0 - sft["format_error_rate"], ">=", targets.sft_well_formed),
        ("SFT Spearman(budget, difficulty)", lambda: sft["spearman_budget_difficulty"], ">=", targets.sft_spearman),
        (f"GRPO mean length / {name} mean length", lambda: grpo["mean_tokens"] / ref["mean_tokens"] if ref["mean_tokens"] else None,
         "<=", targets.grpo_length_ratio),
        (f"GRPO accuracy change vs {name} (points)", lambda: points(grpo, ref), ">=",
         None if targets.grpo_max_accuracy_drop is None else -targets.grpo_max_accuracy_drop),
        (f"GRPO own budget within ±{tolerance}% of length", lambda: grpo[within], ">=", targets.grpo_within),
        ("GRPO Spearman(budget, difficulty)", lambda: grpo["spearman_budget_difficulty"], ">=", targets.grpo_spearman),
        (f"pre-filled budgets: worst fraction within ±{tolerance}%", lambda: min((row[within] or 0.0) for row in sweep),
         ">=", targets.prefill_within),
    ]  # fmt: skip
    checks = []
    for target, measure, relation, goal in rows:
        if goal is None:
            continue
        measured = measure()
        known = measured is not None and measured == measured  # NaN: e.g. no budgets were stated
        met = known and (measured >= goal if relation == ">=" else measured <= goal)
        value = round(float(measured), 4) if known else None
        checks.append({"target": target, "measured": value, "goal": f"{relation} {goal}", "met": bool(met)})
    return checks


def over_seeds(checks: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per target: mean and sample sd over seeds, the worst seed and its value, and whether every seed met it."""
    seeds = list(checks)
    summary = []
    for index, first in enumerate(checks[seeds[0]]):
        values = {seed: checks[seed][index]["measured"] for seed in seeds}
        known = [value for value in values.values() if value is not None]
        higher_is_better = first["goal"].startswith(">=")
        ranked = sorted(seeds, key=lambda seed: -math.inf if values[seed] is None else values[seed] * (1 if higher_is_better else -1))
        summary.append({
            "target": first["target"], "goal": first["goal"],
            "mean": statistics.fmean(known) if known else None,
            "sd": statistics.stdev(known) if len(known) > 1 else None,
            "worst_seed": ranked[0], "worst": values[ranked[0]],
            "met_on_every_seed": all(checks[seed][index]["met"] for seed in seeds),
        })  # fmt: skip
    return summary


def combine_figures(
    figures: Sequence[dict[str, Any]], names: Sequence[str], labels: Optional[Sequence[str]] = None
) -> dict[str, Any]:
    """Several runs' ``figures.json`` as one: their GRPO seeds side by side and the targets over all of them.
    Without ``labels`` a seed that two runs share is an error (they would be the same run); with one label
    per run (e.g. runs from different SFT models) each seed is named ``<label>/<seed>``."""
    if labels is not None and len(labels) != len(figures):
        raise ValueError(f"{len(labels)} labels for {len(figures)} runs: give one label per run")
    checks: dict[str, list[dict[str, Any]]] = {}
    for index, (run, name) in enumerate(zip(figures, names)):
        for seed, rows in run["checks"].items():
            seed = seed if labels is None else f"{labels[index]}/{seed}"
            if seed in checks:
                raise ValueError(f"{name}: GRPO seed {seed} appears in two runs")
            checks[seed] = rows
    return {"checks": checks, "over_seeds": over_seeds(checks)}


def targets_markdown(figures: dict[str, Any]) -> str:
    """The targets table: each seed's figure (✗ where missed), mean ± sd, the worst seed, met on every seed."""
    checks, seeds = figures["checks"], list(figures["checks"])
    lines = ["| target | goal | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean ± sd | worst (seed) | met on every seed |",
             "|---|---|" + "---|" * len(seeds) + "---|---|---|"]  # fmt: skip
    for index, row in enumerate(figures["over_seeds"]):
        cells = [_figure(checks[seed][index]["measured"]) + ("" if checks[seed][index]["met"] else " **✗**") for seed in seeds]
        spread = "" if row["sd"] is None else f" ± {row['sd']:.3f}"
        lines.append(f"| {row['target']} | {row['goal']} | {' | '.join(cells)} | {_figure(row['mean'])}{spread} | "
                     f"{_figure(row['worst'])} ({row['worst_seed']}) | {'yes' if row['met_on_every_seed'] else '**no**'} |")  # fmt: skip
    return "\n".join(lines)


def _figure(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_markdown(figures: dict[str, Any], out: Path, cfg: DictConfig, problems: dict[str, str]) -> str:
    """The reproduction report: targets per seed and over seeds, the main tables, the sweeps, a few answers
    of the base model beside the GRPO model's, the stage times."""
    command = " ".join(["selfbudget-reproduce", *sys.argv[1:]]) if sys.argv[0].endswith("reproduce") else None
    seeds = list(figures["checks"])
    lines = [f"# {cfg.title}", ""]
    lines += [f"Command: `{command}`", ""] if command else []
    lines += ["## Targets", "", f"GRPO seeds: {', '.join(seeds)} (one SFT model).", "", targets_markdown(figures)]
    labels = figures["results"].get("labels")
    if labels:
        accuracy = ", ".join(f"{difficulty}: {value:.1%}" for difficulty, value in labels["sample_accuracy_by_difficulty"].items())
        lines += ["", "## Labels (the base model's own answers)", "",
                  f"{labels['problems']} problems, {labels['solved']} solved, {labels['labelled']} cold-start targets, "
                  f"mean budget {_figure(labels['mean_budget'])}; sample accuracy by difficulty: {accuracy}."]  # fmt: skip
    lines += ["", "## Held-out problems (greedy)", ""]
    runs = ["base", "sft", *(f"grpo_seed{seed}" for seed in seeds), *figures["results"]["comparisons"]]
    for run in runs:
        path = out / f"eval_{run}" / "summary.md"
        if path.exists():
            lines += [f"### {run}", "", path.read_text().strip(), "",
                      f"![budget vs length](eval_{run}/budget_vs_length_synthetic.png)", ""]  # fmt: skip
    lines += ["## Pre-filled budgets", ""]
    for seed in seeds:
        lines += [f"### grpo_seed{seed}", "", (out / f"sweep_grpo_seed{seed}" / "summary.md").read_text().strip(), ""]
    if seeds and (out / "eval_base").exists():
        lines += side_by_side(out / "eval_base", out / f"eval_grpo_seed{seeds[0]}", problems, int(cfg.evaluation.examples))
    lines += ["## Time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in figures["timings_s"].items()]
    lines += [f"| total | {sum(figures['timings_s'].values()):.0f} |", ""]
    return "\n".join(lines)


def side_by_side(base_dir: Path, grpo_dir: Path, problems: dict[str, str], count: int) -> list[str]:
    """The first ``count`` distinct held-out problems that both models answered right (then the others): the
    base model's answer beside the GRPO model's, so a reader sees what was cut."""
    base, grpo = ({str(row["id"]): row for row in read_jsonl(path / "completions.jsonl")} for path in (base_dir, grpo_dir))
    shared, seen = [], set()
    for key in base:  # a small problem space repeats problems under other ids: show each once
        if key in grpo and problems[key] not in seen:
            seen.add(problems[key])
            shared.append(key)
    both = [key for key in shared if base[key]["correct"] and grpo[key]["correct"]]
    chosen = (both + [key for key in shared if key not in both])[:count]
    lines = [f"## What GRPO cut: the base model's answer beside {grpo_dir.name.removeprefix('eval_')}'s", ""]
    for key in chosen:
        lines += [f"**{problems[key]}** (gold {base[key]['answer']})", "",
                  "| base | GRPO |", "|---|---|",
                  f"| {_cell(base[key])} | {_cell(grpo[key])} |", ""]  # fmt: skip
    return lines


def _cell(row: dict[str, Any]) -> str:
    verdict = "right" if row["correct"] else "wrong"
    text = row["text"].replace("|", "\\|").replace("\n", "<br>")
    return f"{row['response_tokens']} tokens, {verdict}: {text}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="reproduce")
def main(cfg: DictConfig) -> None:
    reproduce(cfg)


if __name__ == "__main__":
    main()
