"""SFT with ``rollout=vllm`` for a few steps then validation, in a process of its own (an engine initialises
torch.distributed in the process that builds it, so a second engine in the pytest process would take the
external-launcher path). Writes ``<out>/report.json``: the engine's weight syncs, and whether its greedy
completions equal the trained HF policy's.

    python -m tests.sft_vllm_validation_run <out>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend
from selfbudget_pl.train import train
from tests.test_train import compose_small


def main(out: str) -> None:
    # Hidden 128 over 4 heads: vLLM's CPU attention refuses sft_toy's head size 16.
    cfg = compose_small(
        "sft_toy", Path(out), "rollout=vllm", "rollout.dtype=float32", "+rollout.enforce_eager=true",
        "rollout.max_model_len=512", "rollout.cpu_kv_cache_gb=0.125", "model.name_or_path=null",
        "model.tiny.hidden_size=128", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "callbacks.model_checkpoint=null",
    )  # fmt: skip
    _, objects = train(cfg)
    module = objects["module"]
    backend = module.rollout_backend
    prompts = [module.tokenizer.encode(text, add_special_tokens=False) for text in ("2+3 =", "what is 7+8")]
    greedy = SamplingSettings(temperature=0.0, max_new_tokens=12)
    trained = HFRolloutBackend(module.model, module.tokenizer).generate(prompts, 1, greedy).completion_ids
    report = {"backend": type(backend).__name__, "num_syncs": backend.num_syncs,
              "engine_equals_trained": backend.generate(prompts, 1, greedy).completion_ids == trained}
    Path(out, "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
