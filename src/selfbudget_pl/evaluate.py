"""Evaluation: accuracy, length, budget adherence and budget control, in the shape of the paper's tables.

:func:`evaluate_model` is the core, callable from Python (the CPU-reproduction pipeline calls it after
SFT and after GRPO): it generates for every (dataset, budget) condition, grades, and writes

- ``completions.jsonl``: one row per completion (problem id, stated and requested budget, length,
  correctness, difficulty, text; with a pre-filled budget N also ``budget_ratio`` = actual/N);
- ``summary.json`` / ``summary.md``: one row per condition: accuracy (avg@k with its standard error when
  k samples are drawn per problem), mean tokens, budget MAE, within ±10/20 %, budget-difficulty
  correlation and, against a baseline run, length compression (``1 - mean_tokens / baseline_mean_tokens``)
  and accuracy change in points; the paper-shaped table (one row per model, accuracy / tokens /
  compression per dataset); plus a controllability table (mean actual/N, fraction within ±10 % of N)
  when budgets were pre-filled;
- ``budget_vs_length_<dataset>.png`` and ``by_difficulty_<dataset>.png``, and the same to TensorBoard.

:func:`evaluate` builds everything from a Hydra config (``configs/eval.yaml``); :func:`main` is the
``selfbudget-eval`` / ``selfbudget eval`` entry point.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from selfbudget_pl.config.checks import ConfigError, check_eval_config, check_eval_prompts, longest_eval_prompt
from selfbudget_pl.data.collate import COLUMNS
from selfbudget_pl.data.prompts import encode_prompts
from selfbudget_pl.data.records import DroppedRows
from selfbudget_pl.eval_report import Budget, budget_label, mean, summary_markdown, write_figures
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.metrics import BudgetAdherence, update_from_rollouts
from selfbudget_pl.rewards.annotate import Annotations, generate_and_annotate
from selfbudget_pl.rewards.grader import MathGrader
from selfbudget_pl.rollout.base import EngineLimits, RolloutBackend, Rollouts, SamplingSettings, engine_limits
from selfbudget_pl.rollout.hf import HFRolloutBackend
from selfbudget_pl.train import CONFIG_DIR

log = logging.getLogger(__name__)



def evaluate_model(
    model: torch.nn.Module,
    datasets: Union[Mapping[str, Sequence[Mapping[str, Any]]], Sequence[Mapping[str, Any]]],
    tokenizer: Any = None,
    *,
    out_dir: Union[str, Path, None] = None,
    output_format: Optional[OutputFormat] = None,
    grader: Any = None,
    backend: Optional[RolloutBackend] = None,
    sampling: Optional[SamplingSettings] = None,
    budgets: Sequence[Budget] = (None,),
    samples_per_problem: Union[int, Mapping[str, int]] = 1,
    batch_size: int = 16,
    prompt_template: str = "{problem}",
    system_prompt: Optional[str] = None,
    chat_template: Optional[bool] = None,
    baseline: Union[str, Path, Mapping[str, Any], None] = None,
    tensorboard: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a model on named datasets, with its own budgets and/or pre-filled ones; return the summary.

    Args:
        model: a transformers causal LM, or a :class:`~selfbudget_pl.modules.base.PolicyModule` (its
            model, tokenizer, output format and grader are used unless given here).
        datasets: ``{name: records}``, or one list of records (named ``eval``). Records carry ``id``,
            ``problem``, ``answer`` and optionally ``difficulty`` (see :mod:`selfbudget_pl.data.sources`).
        tokenizer: the model's tokenizer (taken from a PolicyModule when omitted).
        out_dir: where the files listed in the module docstring go; None writes nothing.
        output_format / grader: the answer format and the answer checker (defaults: ``OutputFormat()``,
            ``MathGrader()``).
        backend: a rollout backend on ``model``; default: a PolicyModule's own, else
            ``HFRolloutBackend(model, tokenizer)``.
        sampling: default greedy, 1024 new tokens.
        budgets: conditions to run: None (the model's own budget) and/or positive ints to pre-fill.
        samples_per_problem: k completions per problem (one int, or ``{dataset: k}``, missing names 1):
            accuracy is then avg@k, the mean over all k x n completions, with ``accuracy_se`` the
            standard error over the k runs (std of the k per-run accuracies / sqrt(k)). k > 1 needs
            sampling (temperature > 0).
        batch_size: prompts per ``backend.generate`` call (one progress-bar step).
        prompt_template / system_prompt / chat_template: how a problem becomes the prompt (as in training).
        baseline: a previous run's ``summary.json`` (or its directory, or the dict this function
            returned) to compute compression and accuracy change against; its rows with the model's
            own budget (or no budget, for a base model) are matched by dataset.
        tensorboard: also write scalars, figures and the table as TensorBoard events under ``out_dir``.
        progress: show tqdm progress bars.

    Returns:
        ``{"rows": [one dict per (dataset, budget) with the MAIN_TABLE/CONTROL_TABLE keys and every
        BudgetAdherence value], "markdown": the summary table, "out_dir": str or None}``.
    """
    model, tokenizer, output_format, grader, backend = _unwrap(model, tokenizer, output_format, grader, backend)
    if not isinstance(datasets, Mapping):
        datasets = {"eval": datasets}
    budgets = check_budgets(budgets)
    sampling = sampling or SamplingSettings(temperature=0.0, max_new_tokens=1024)
    samples = check_samples_per_problem(samples_per_problem, list(datasets), sampling)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    baseline_rows = _baseline_rows(baseline)  # before generating, so a wrong path fails in seconds
    if backend is None:
        backend = HFRolloutBackend(model, tokenizer)
    out_path = Path(out_dir) if out_dir is not None else None
    if out_path is not None:
        out_path.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    completions: dict[str, dict[Budget, list[dict[str, Any]]]] = {}
    with _JsonlWriter(out_path / "completions.jsonl" if out_path else None) as writer:
        for name, records in datasets.items():
            records = list(records)
            prompt_ids = encode_prompts(
                [r["problem"] for r in records], tokenizer, prompt_template, system_prompt, chat_template
            )
            for budget in budgets:
                results = _run_condition(
                    name, records, prompt_ids, budget, backend, sampling, output_format, grader, tokenizer,
                    batch_size, progress, samples[name],
                )
                writer.write_all(results["completions"])
                completions.setdefault(name, {})[budget] = results["completions"]
                rows.append(results["row"])

    if baseline is not None:
        _compare(rows, baseline_rows)
    markdown = summary_markdown(rows, baseline_rows if baseline is not None else None)
    summary = {"rows": rows, "markdown": markdown, "out_dir": str(out_path) if out_path else None}
    if out_path is not None:
        settings = {
            "budgets": list(budgets),
            "samples_per_problem": samples,
            "sampling": asdict(sampling),
            "batch_size": batch_size,
            "prompt_template": prompt_template,
            "system_prompt": system_prompt,
            "chat_template": chat_template,
            "baseline": str(baseline) if isinstance(baseline, (str, Path)) else None,
        }
        (out_path / "summary.json").write_text(json.dumps({"rows": rows, "settings": settings}, indent=2) + "\n")
        (out_path / "summary.md").write_text(markdown)
        write_figures(completions, out_path, rows, markdown, tensorboard)
    log.info("evaluation summary:\n%s", markdown)
    return summary


def check_budgets(value: Union[None, int, Sequence[Budget]]) -> list[Budget]:
    """``budget`` as given in config (null, an int, or a list of them) -> the list of conditions."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        raise ValueError("budget=[] lists no condition; use null for the model's own budget")
    for item in values:
        if item is not None and (isinstance(item, bool) or not isinstance(item, int) or item < 1):
            raise ValueError(f"budget must be null, a positive int or a list of them; got {item!r}")
    if len(set(values)) < len(values):
        raise ValueError(f"budget={values} repeats a condition")
    return values


def check_samples_per_problem(
    value: Union[None, int, Mapping[str, int]], names: Sequence[str], sampling: SamplingSettings
) -> dict[str, int]:
    """``samples_per_problem`` as given in config (an int, or ``{dataset: k}``) -> k for every dataset run."""
    if value is None:
        value = 1
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(names))
        if unknown:
            log.info("samples_per_problem names datasets not being run: %s", unknown)
        samples = {name: value.get(name, 1) for name in names}
    else:
        samples = {name: value for name in names}
    for name, k in samples.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"samples_per_problem[{name}]={k!r} must be a positive int")
        if k > 1 and sampling.temperature <= 0:
            raise ValueError(
                f"samples_per_problem[{name}]={k} with greedy decoding (sampling.temperature=0) repeats one "
                "completion k times; set sampling.temperature > 0 for avg@k, or samples_per_problem=1"
            )
    return samples


def _unwrap(
    model: Any, tokenizer: Any, output_format: Optional[OutputFormat], grader: Any, backend: Optional[RolloutBackend]
) -> tuple:
    """Take tokenizer, format, grader and rollout backend (e.g. its vLLM engine, already holding the
    trained weights) from a PolicyModule when the caller did not give them."""
    if hasattr(model, "model_loader") and hasattr(model, "output_format"):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        output_format = output_format or model.output_format
        grader = grader if grader is not None else model.grader
        backend = backend or model.rollout_backend
        model = model.model
    if tokenizer is None:
        raise ValueError("evaluate_model needs `tokenizer` when `model` is not a PolicyModule")
    if grader is None:
        grader = MathGrader()
    return model, tokenizer, output_format or OutputFormat(), grader, backend


def _run_condition(
    name: str,
    records: list[Mapping[str, Any]],
    prompt_ids: list[list[int]],
    budget: Budget,
    backend: RolloutBackend,
    sampling: SamplingSettings,
    output_format: OutputFormat,
    grader: Any,
    tokenizer: Any,
    batch_size: int,
    progress: bool,
    num_samples: int = 1,
) -> dict[str, Any]:
    """Generate and score one dataset under one budget condition (``num_samples`` completions per
    problem); its completion rows and summary row."""
    metric = BudgetAdherence()
    prefill = output_format.budget_prefix(budget) if budget is not None else None
    prefill_tokens = len(tokenizer.encode(prefill, add_special_tokens=False)) if prefill else 0
    label = budget_label(budget)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(records), desc=f"{name} [budget {label}]", unit="problem", disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start : start + batch_size]
            columns = {key: [record.get(key) for record in batch] for key in COLUMNS}
            rollouts, annotations = generate_and_annotate(
                backend, prompt_ids[start : start + batch_size], sampling, output_format, grader, tokenizer,
                num_samples=num_samples, prefill=prefill, columns=columns,
            )
            update_from_rollouts(metric, rollouts, annotations)
            rows.extend(_completion_rows(name, budget, rollouts, annotations, prefill_tokens, num_samples))
            bar.update(len(batch))
    row: dict[str, Any] = {"dataset": name, "budget": budget, "n": len(records), "k": num_samples}
    row.update({key: _number(value) for key, value in metric.compute().items()})
    row["accuracy_se"] = accuracy_standard_error(rows, num_samples)
    row["mean_tokens"] = mean([r["response_tokens"] for r in rows])
    row["mean_budget_ratio"] = mean([r["budget_ratio"] for r in rows if r["budget_ratio"] is not None])
    return {"row": row, "completions": rows}


def accuracy_standard_error(rows: Sequence[Mapping[str, Any]], num_samples: int) -> Optional[float]:
    """Standard error of avg@k over the k runs (run j = every problem's j-th sample): the sample std of
    the k per-run accuracies divided by sqrt(k); None for k = 1."""
    if num_samples < 2:
        return None
    runs = [[row["correct"] for row in rows if row["sample"] == j] for j in range(num_samples)]
    accuracies = [sum(run) / len(run) for run in runs if run]
    mean = sum(accuracies) / len(accuracies)
    variance = sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)
    return math.sqrt(variance / len(accuracies))


def _completion_rows(
    name: str, budget: Budget, rollouts: Rollouts, annotations: Annotations, prefill_tokens: int, num_samples: int = 1
) -> list[dict[str, Any]]:
    rows = []
    for index, parsed in enumerate(annotations.parsed):
        length = annotations.solution_lengths[index]
        stated = parsed.budget
        rows.append(
            {
                "dataset": name,
                "id": rollouts.columns["id"][index],
                "sample": index % num_samples,  # completions come prompt by prompt, k per prompt
                "requested_budget": budget,
                "budget": stated,
                "length": length,
                # The whole response as the reader sees it, pre-filled tags included: what compression compares.
                "response_tokens": len(rollouts.completion_ids[index]) + prefill_tokens,
                "budget_ratio": length / stated if stated else None,
                "correct": bool(annotations.correct[index]),
                "difficulty": _known(rollouts.columns["difficulty"][index]),
                "answer": rollouts.columns["answer"][index],
                "prediction": parsed.answer,
                "format_error": parsed.error.value,
                "truncated": bool(rollouts.truncated[index]),
                "finish_reason": rollouts.finish_reasons[index],
                "text": rollouts.completions[index],
            }
        )
    return rows


def _baseline_rows(baseline: Union[str, Path, Mapping[str, Any], None]) -> dict[str, dict[str, Any]]:
    """The baseline's self-budget rows by dataset (a base model's rows are self-budget: nothing pre-filled)."""
    if baseline is None:
        return {}
    if isinstance(baseline, Mapping):
        rows = baseline["rows"]
    else:
        path = Path(baseline)
        if path.is_dir():
            path = path / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"baseline={str(baseline)!r}: no summary.json there (give a previous eval run)")
        rows = json.loads(path.read_text())["rows"]
    return {row["dataset"]: row for row in rows if row.get("budget") is None}


def _compare(rows: list[dict[str, Any]], baseline_rows: Mapping[str, Mapping[str, Any]]) -> None:
    for row in rows:
        base = baseline_rows.get(row["dataset"])
        if base is None:
            log.warning("baseline has no self-budget row for dataset %r; no compression for it", row["dataset"])
            continue
        if base.get("mean_tokens"):
            row["compression"] = 1.0 - row["mean_tokens"] / base["mean_tokens"]
        if row.get("accuracy") is not None and base.get("accuracy") is not None:
            row["accuracy_change"] = 100.0 * (row["accuracy"] - base["accuracy"])


class _JsonlWriter:
    """Appends rows to a JSONL file as conditions finish (so a long run leaves partial results)."""

    def __init__(self, path: Optional[Path]) -> None:
        self.handle = path.open("w") if path is not None else None

    def __enter__(self) -> "_JsonlWriter":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.handle is not None:
            self.handle.close()

    def write_all(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.handle is not None:
            for row in rows:
                self.handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            self.handle.flush()


def _known(difficulty: Any) -> Any:
    """Sources mark an unknown difficulty as NaN; JSON and the plots want None."""
    return None if isinstance(difficulty, float) and math.isnan(difficulty) else difficulty


def _number(value: Any) -> Optional[float]:
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return None if math.isnan(value) else value


# -- Hydra -------------------------------------------------------------------------------------------


def load_datasets(
    sources: Mapping[str, Any], names: Sequence[str], limit: Optional[int] = None, data_root: Optional[str] = None
) -> dict[str, list[dict[str, Any]]]:
    """Instantiate the named sources from the ``datasets`` config and load their records (first ``limit``).

    Relative file paths resolve against ``data_root``; rows whose gold answer cannot be read are dropped
    (and counted in the log), as in training.
    """
    if not names:
        raise ValueError(f"eval_datasets is empty; choose from {sorted(sources)}")
    known = sorted(name for name, source in sources.items() if source is not None)  # null entries are switched off
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"eval_datasets: unknown dataset(s) {unknown}; known: {known}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be a positive int or null")
    loaded, dropped = {}, DroppedRows()
    for name in names:
        records = instantiate(sources[name], _convert_="all").load(root=data_root, dropped=dropped)
        loaded[name] = records[:limit] if limit else records
    dropped.log_summary(log)
    return loaded


def evaluation_limits(
    cfg: DictConfig, datasets: Mapping[str, Any], tokenizer: Any, sampling: SamplingSettings
) -> EngineLimits:
    """What evaluation sends its sampler at most: the longest prompt (pre-filled budget included) and one
    call's completions, ``batch_size`` prompts x the most ``samples_per_problem``."""
    longest, key = longest_eval_prompt(cfg, datasets, tokenizer)
    samples = _plain(cfg.get("samples_per_problem", 1))
    most = max(samples.values(), default=1) if isinstance(samples, Mapping) else int(samples)
    return engine_limits(longest, key, [(int(cfg.batch_size) * most, sampling.max_new_tokens)])


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate as ``cfg`` (``configs/eval.yaml``) says; return the summary of :func:`evaluate_model`."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    # Evaluation loads an exported checkpoint: adapters are already merged and nothing is trained.
    loader_overrides: dict[str, Any] = {"lora": {"enabled": False}, "gradient_checkpointing": False}
    if cfg.get("model_path"):
        loader_overrides["name_or_path"] = str(cfg.model_path)
    check_eval_config(cfg, loader_overrides)  # every bad value named by its key, before anything loads
    loader = instantiate(cfg.model, _convert_="all", **loader_overrides)
    tokenizer = loader.load_tokenizer()
    datasets = load_datasets(cfg.datasets, list(cfg.eval_datasets), cfg.get("limit"), cfg.get("data_root"))
    sampling = SamplingSettings(**OmegaConf.to_container(cfg.sampling, resolve=True))
    check_eval_prompts(cfg, loader_overrides, datasets, tokenizer)  # the data's prompts, still before the weights
    model = loader.load_model(frozen=True).to(cfg.get("device", "cpu"))  # model.frozen_dtype: bf16 for real models
    backend = instantiate(cfg.rollout, _convert_="all")(
        model=model, tokenizer=tokenizer, limits=evaluation_limits(cfg, datasets, tokenizer, sampling)
    )
    grader = instantiate(cfg.grader)
    try:
        return evaluate_model(
            model,
            datasets,
            tokenizer,
            out_dir=cfg.paths.output_dir,
            output_format=instantiate(cfg.output_format),
            grader=grader,
            backend=backend,
            sampling=sampling,
            budgets=check_budgets(cfg.get("budget")),
            samples_per_problem=_plain(cfg.get("samples_per_problem", 1)),
            batch_size=int(cfg.batch_size),
            prompt_template=cfg.prompt_template,
            system_prompt=cfg.get("system_prompt"),
            chat_template=cfg.get("chat_template"),
            baseline=cfg.get("baseline"),
            tensorboard=bool(cfg.get("tensorboard", True)),
            progress=bool(cfg.get("progress", True)),
        )
    finally:
        if hasattr(grader, "close"):
            grader.close()


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        summary = evaluate(cfg)
    except ConfigError as error:  # a sentence for the user, not a traceback
        sys.exit(f"error: {error}")
    print(summary["markdown"])


if __name__ == "__main__":
    main()
