"""Write budget-labelled cold-start data (JSONL, the ``labelled`` schema) from reference solutions,
or (``--samples K``, the paper's way) from the model's own correct answers among K samples per problem.

Each labelled row gets ``response = <budget>N</budget><solution>{solution}</solution>``, where N counts
the solution's tokens under the model's tokenizer, and ``budget = b_max = N``.

With ``--samples K`` the prompts are rendered with the training template of ``--data`` (a data config),
sampled through the ``--rollout`` backend config (``hf``, or ``vllm`` on GPUs) and judged by the
``--grader`` config; one correct finished sample per problem is kept (``--choose``). Every problem is
written: one without a correct sample gets ``b_max: null`` (no cap) and no target (``response`` and
``budget`` null), so it stays in the RL data and out of SFT. The run prints its counts: problems,
solved, labelled, without a cap, and the rest by cause; a run whose file holds no solved problem ends with an
error (exit status 1) after writing it.

Without ``--samples``, rows whose answer cannot be extracted, or whose rendered reference would not parse
back to the gold answer, are dropped and counted.

  python scripts/label_budgets.py --jsonl ../shared/data/gsm8k/train.jsonl --schema gsm8k \\
      --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --output data/gsm8k_train_labelled.jsonl
  python scripts/label_budgets.py --source-config my_source.yaml --output labelled.jsonl   # tiny model
  python scripts/label_budgets.py --jsonl ../shared/data/gsm8k/train.jsonl --schema gsm8k --samples 4 \
      --data gsm8k --rollout vllm --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --device cuda \
      --dtype bfloat16 --output data/gsm8k_self.jsonl

The DataModule reads the output with ``JsonlSource(path, schema="labelled")``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from selfbudget_pl.data.budget_labels import label_records, write_jsonl
from selfbudget_pl.data.records import DroppedRows
from selfbudget_pl.data.rows import SCHEMAS
from selfbudget_pl.data.sources import JsonlSource
from selfbudget_pl.format import OutputFormat
from selfbudget_pl.models import ModelLoader

log = logging.getLogger("label_budgets")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--jsonl", help="a JSONL file of problems")
    where.add_argument("--source-config", help="a YAML file holding one source config (with _target_)")
    parser.add_argument("--schema", default="auto", choices=SCHEMAS, help="schema of --jsonl rows")
    parser.add_argument("--limit", type=int, default=None, help="label only the first LIMIT rows")
    parser.add_argument("--data-root", default=None, help="directory relative source paths are resolved against")
    parser.add_argument("--model", default=None, help="hub id, folder, or model config name (configs/model, e.g. "
                        "smollm2_135m) whose tokenizer counts tokens and, with --samples, samples (default: tiny)")
    parser.add_argument("--round-to", type=int, default=1, help="round budgets up to a multiple of this")
    parser.add_argument("--on-bad-row", default="drop", choices=("drop", "error"),
                        help="a bad input row: drop it (counted, listed at the end) or stop with its file:line")
    parser.add_argument("--output", required=True, help="where to write the labelled JSONL")
    sampled = parser.add_argument_group("labelling from the model's own samples (--samples K)")
    sampled.add_argument("--samples", type=int, default=0, help="K answers per problem (0: reference solutions)")
    sampled.add_argument("--choose", default="shortest", choices=("shortest", "random"), help="which correct one")
    sampled.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (the paper's 0.6)")
    sampled.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (the paper's 0.95)")
    sampled.add_argument("--max-new-tokens", type=int, default=grpo_max_new_tokens(),
                         help="sample length ceiling (default: GRPO's, configs/module/grpo.yaml "
                              "sampling.max_new_tokens: a longer correct answer is lost and its problem uncapped)")
    sampled.add_argument("--restart", action="store_true", help="relabel every problem instead of resuming "
                         "(by default rows already in --output are kept and only the others are labelled)")
    sampled.add_argument("--batch-size", type=int, default=16, help="problems per generate call")
    sampled.add_argument("--data", default="math", help="data config (name in configs/data or a YAML file) "
                         "whose prompt_template and system_prompt render the prompts, as in training")
    sampled.add_argument("--rollout", default="hf", help="rollout config (configs/rollout: hf | vllm, or a YAML file)")
    sampled.add_argument("--grader", default="math_verify", help="grader config (configs/grader, or a YAML file)")
    sampled.add_argument("--dtype", default="float32", help="model weights dtype (bfloat16 on GPUs)")
    sampled.add_argument("--device", default="cpu")
    sampled.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.jsonl:
        source = JsonlSource(args.jsonl, schema=args.schema, limit=args.limit)
    else:
        if args.limit is not None:
            sys.exit("--limit applies to --jsonl; set `limit:` in the source config instead")
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        source = instantiate(OmegaConf.load(args.source_config))
    loader = ModelLoader(name_or_path=model_name_or_path(args.model), dtype=args.dtype)
    tokenizer = loader.load_tokenizer()
    dropped = DroppedRows()
    records = source.load(on_bad_row=args.on_bad_row, dropped=dropped, root=args.data_root)
    if args.samples:
        labelled, result = label_with_samples(args, loader, tokenizer, records, dropped)
        rows = len(labelled)
    else:
        labelled = label_records(records, tokenizer, OutputFormat(), args.round_to, dropped)
        rows = write_jsonl(labelled, args.output)
    dropped.log_summary(log)
    if args.samples:
        print(f"label_budgets: {result.summary(dropped)}", file=sys.stderr)
        print(accuracy_table(labelled), file=sys.stderr)
    budgets = [record["budget"] for record in labelled if record.get("budget") is not None]
    log.info(
        "wrote %d rows to %s; budget mean %.1f, median %.0f, max %d",
        rows, args.output,
        statistics.fmean(budgets) if budgets else 0.0,
        statistics.median(budgets) if budgets else 0, max(budgets, default=0),
    )
    if args.samples:
        from selfbudget_pl.labelling import require_solved

        try:
            # A pipeline that reads the exit status must not go on to train on a file of uncapped rows.
            require_solved(labelled, args.output, result.summary(dropped))
        except ValueError as error:
            sys.exit(f"label_budgets: {error}")
    return 0


def accuracy_table(records: Sequence[Any]) -> str:
    """The base model's sample accuracy per difficulty, one line each, then over all."""
    from selfbudget_pl.labelling import accuracy_by_difficulty

    table = accuracy_by_difficulty(records)
    lines = [
        f"label_budgets: difficulty {'unknown' if difficulty is None else f'{difficulty:g}'}: "
        f"{right} of {total} samples correct ({right / max(total, 1):.1%})"
        for difficulty, (right, total) in sorted(table.items(), key=lambda item: (item[0] is None, item[0] or 0.0))
    ]
    right, total = (sum(counts[i] for counts in table.values()) for i in (0, 1))
    return "\n".join([*lines, f"label_budgets: all: {right} of {total} samples correct ({right / max(total, 1):.1%})"])


def grpo_max_new_tokens() -> int:
    """GRPO's sampling ceiling, from configs/module/grpo.yaml: labels made with a shorter one drop the long
    correct answers GRPO itself would sample."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(CONFIG_DIR / "module" / "grpo.yaml").sampling.max_new_tokens)


def model_name_or_path(model: Optional[str], config_dir: Path = CONFIG_DIR) -> Optional[str]:
    """``--model`` as ModelLoader takes it: the ``name_or_path`` of a model config (``smollm2_135m``: the
    folder converted from its package, converted on first use), as training's ``model=NAME`` resolves it;
    else the hub id or folder itself. A folder of that name wins over the config."""
    path = config_dir / "model" / f"{model}.yaml"
    if model is None or Path(model).exists() or not path.is_file():
        return model
    from omegaconf import OmegaConf

    import selfbudget_pl.config  # noqa: F401  (registers the ${packaged_checkpoint:...} resolver)

    return OmegaConf.load(path).name_or_path


def config_file(group: str, name: str) -> Any:
    """A config of ``group`` by name (``configs/<group>/<name>.yaml``) or path."""
    from omegaconf import OmegaConf

    path = Path(name) if name.endswith((".yaml", ".yml")) else CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        sys.exit(f"--{group} {name}: no such config ({path}); choices: {', '.join(choices)}, or a YAML file")
    return OmegaConf.load(path)


def label_with_samples(args: argparse.Namespace, loader: ModelLoader, tokenizer, records, dropped):
    from hydra.utils import instantiate

    from selfbudget_pl.labelling import label_to_file, labelling_limits
    from selfbudget_pl.rollout.base import SamplingSettings

    data = config_file("data", args.data)
    prompts = dict(
        prompt_template=data.get("prompt_template") or "{problem}", system_prompt=data.get("system_prompt"),
        chat_template=data.get("chat_template"),
    )
    rollout_config = config_file("rollout", args.rollout)
    rollout = instantiate(rollout_config)  # a partial: finished with the model
    if str(rollout_config.get("_target_", "")).endswith("VLLMRolloutBackend"):
        # The engine loads the checkpoint itself and nothing trains: no HF copy of the weights on the device.
        model = loader.load_skeleton()
    else:
        model = loader.load_model().to(args.device)
    sampling = SamplingSettings(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    limits = labelling_limits(records, tokenizer, sampling, args.samples, args.batch_size, **prompts)
    with instantiate(config_file("grader", args.grader)) as grader:
        # Resumable: a rerun labels only the problems not yet in --output (--restart: all of them again).
        return label_to_file(
            records, args.output, restart=args.restart,
            backend=rollout(model=model, tokenizer=tokenizer, limits=limits), tokenizer=tokenizer, grader=grader,
            samples=args.samples, choose=args.choose, sampling=sampling, round_to=args.round_to,
            batch_size=args.batch_size, seed=args.seed, dropped=dropped, **prompts,
        )  # fmt: skip


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
