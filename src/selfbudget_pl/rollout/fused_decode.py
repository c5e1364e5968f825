"""A lean sampling loop for Llama-style decoders (Qwen2, Llama, Qwen3), used by the HF backend on CPU.

``model.generate`` spends most of a small model's decode step in Python: mask construction, cache
bookkeeping, logits processors, stopping criteria. This loop does the same arithmetic with a few fused
tensor ops per layer: q/k/v in one matmul, gate/up in one matmul, ``F.rms_norm``, rotary tables built
once per call, a preallocated KV cache written in place, and sampling as ``generate`` does it
(temperature, then top-k, then top-p, then one draw per row and step), and rows that have finished
leave the batch instead of being computed to the end. It reads the model's weights
at the start of every call (LoRA deltas added, adapters honoured when disabled), so it always samples
from the current policy. Architectures it does not know, and sharded (FSDP) models, go to ``generate``.

Why a re-implemented decoder is kept (benchmarks/RESULTS.md, "Rollout backends on CPU" and "GRPO step"):
on the tiny Qwen2 it samples at 0.9-4.1x ``generate``'s tokens/s (1.9x and 4.1x with 512-token completions,
GRPO's regime; ``python benchmarks/bench_rollout_backends.py --threads 1``), 0.93x on the Qwen2.5-0.5B shape
at batch 8 x 128 tokens, and 1.7-2.0x in the GRPO step benchmark, where it took our step from 0.86x to 0.70x
of TRL's time (``benchmarks/bench_grpo_vs_trl.py``). vLLM's CPU engine was 12-30x slower on the tiny model.

Its cost: it must follow transformers' Qwen2/Llama/Qwen3 forward. ``tests/test_fused_decode.py`` guards it:
greedy tokens equal ``generate``'s, and prefill and decode-step logits equal the model's forward, on each
of Qwen2, Llama and Qwen3. It runs only on the transformers versions in
:data:`selfbudget_pl.internals.KNOWN_VERSIONS`: on any other, :func:`unsupported_reason` says so (the HF
backend's ``decoder=auto`` then samples with ``generate``) and ``tests/test_internals.py`` fails until the
version has been checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from selfbudget_pl import internals
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.tensors import repeats_row_above
from selfbudget_pl.weights import is_sharded, merged_lora_linear

SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why :func:`sample` cannot run ``model`` (None when it can)."""
    if not internals.is_known_version("transformers"):
        return internals.unknown_version_message("transformers", str(internals.installed_version("transformers")))
    base = _base_model(model)
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only silu)"
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        return "sliding-window attention layers"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    if is_sharded(base) or any(isinstance(parameter, DTensor) for parameter in base.parameters()):
        return "sharded (FSDP) parameters"
    for layer in base.model.layers:
        if not all(_linear_weights(getattr(layer.self_attn, name)) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention projections are not (LoRA-wrapped) linear layers"
        if not all(_linear_weights(getattr(layer.mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")):
            return "MLP projections are not (LoRA-wrapped) linear layers"
    if not _linear_weights(base.lm_head):
        return "lm_head is not a linear layer"
    return None


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingSettings,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    stopped: Optional[Callable[[list[int]], bool]] = None,
    stop_check_every: int = 8,
) -> tuple[list[list[int]], Optional[list[list[float]]]]:
    """Generate up to ``sampling.max_new_tokens`` tokens after each left-padded prompt row.

    Returns one list per row, as ``generate(...)[:, prompt_width:]`` would: after a row's EOS, the rest
    of it is ``pad_token_id``; the loop ends when every row has finished or the ceiling is reached.
    ``stopped(tokens)`` (e.g. "contains a stop string") is asked every ``stop_check_every`` steps about
    each unfinished row; a row it stops is padded from then on, like one that emitted EOS. With
    ``sampling.logprobs``, also each drawn token's log-prob under the distribution it was drawn from (same
    shape, 0 where padded), else None.
    """
    weights = _Weights.read(model)
    batch, prompt_width = input_ids.shape
    total = prompt_width + sampling.max_new_tokens
    device = input_ids.device
    mask = attention_mask.bool()

    # Positions as generate counts them: left padding does not advance the position.
    prompt_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    last = prompt_positions[:, -1:]
    new_positions = last + torch.arange(1, sampling.max_new_tokens + 1, device=device)
    positions = torch.cat([prompt_positions, new_positions], dim=1)
    probe = torch.empty(0, device=device, dtype=weights.dtype)
    cos, sin = weights.rotary(probe, positions)  # [B, total, head_dim]
    cos, sin = cos.unsqueeze(1).to(weights.dtype), sin.unsqueeze(1).to(weights.dtype)

    key_valid = torch.ones(batch, total, dtype=torch.bool, device=device)
    key_valid[:, :prompt_width] = mask
    # Rows sampling the same prompt (GRPO's G samples) share one prefill: run it on the first of each
    # run of identical rows, then copy that row's cache to the others.
    repeats = repeats_row_above(input_ids, mask)
    firsts = (~repeats).nonzero().squeeze(1)
    source = torch.cumsum(~repeats, 0) - 1  # each row's index among the first rows
    causal = torch.ones(prompt_width, prompt_width, dtype=torch.bool, device=device).tril()
    # A padding query may see nothing but itself; without the diagonal its softmax row is empty (NaN).
    prefill_mask = (causal & key_valid[firsts, None, None, :prompt_width]) | torch.eye(
        prompt_width, dtype=torch.bool, device=device
    )
    cache = _KVCache(weights, len(firsts), total, device)
    logits = weights.forward(input_ids[firsts], 0, cos[firsts], sin[firsts], cache, prefill_mask)
    if len(firsts) < batch:
        logits = logits[source]
        cache.select(source)
    eos = torch.tensor(list(eos_token_ids), device=device)
    out = torch.full((batch, sampling.max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(batch, sampling.max_new_tokens, device=device) if sampling.logprobs else None
    rows = torch.arange(batch, device=device)  # the output row of each row still in the batch
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(sampling.max_new_tokens):
        drawn, logprob = _next_token(logits, sampling)
        token = torch.where(done, pad_token_id, drawn)
        out[rows, step] = token
        if out_logprobs is not None:
            out_logprobs[rows, step] = logprob.masked_fill(done, 0.0)
        steps = step + 1
        done |= torch.isin(token, eos)
        if stopped is not None and steps % stop_check_every == 0:
            done |= _stopped_rows(out[rows, :steps], done, stopped)
        finished = int(done.sum())
        if steps == sampling.max_new_tokens or finished == len(rows):
            break
        if finished * 4 >= len(rows):
            # Finished rows leave the batch (generate keeps computing them): once a quarter of the
            # batch is done, the cache copy costs less than the arithmetic it saves.
            live = ~done
            rows, token, done = rows[live], token[live], done[live]
            cos, sin, key_valid = cos[live], sin[live], key_valid[live]
            cache.select(live)
        position = prompt_width + step
        logits = weights.forward(
            token[:, None], position, cos, sin, cache, key_valid[:, None, None, : position + 1]
        )
    return out[:, :steps].tolist(), None if out_logprobs is None else out_logprobs[:, :steps].tolist()


def _stopped_rows(tokens: torch.Tensor, done: torch.Tensor, stopped: Callable[[list[int]], bool]) -> torch.Tensor:
    flags = [not finished and stopped(row) for row, finished in zip(tokens.tolist(), done.tolist())]
    return torch.tensor(flags, dtype=torch.bool, device=done.device)


def _next_token(logits: torch.Tensor, sampling: SamplingSettings) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One token per row, warped in generate's order: temperature, top-k, top-p; with ``sampling.logprobs``
    also its log-prob under the warped distribution (greedy: under the unwarped one, as the trainer scores it)."""
    logits = logits.float()
    if sampling.temperature <= 0:
        token = logits.argmax(-1)
        return token, _logprob_of(logits, token) if sampling.logprobs else None
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=False)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # Inverse-CDF draw: one uniform number per row (torch.multinomial draws one per vocabulary entry,
    # which costs more than a small model's whole decode step).
    cdf = logits.softmax(-1).cumsum(-1)
    uniform = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, uniform, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)
    return token, _logprob_of(logits, token) if sampling.logprobs else None


def _logprob_of(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``[B]`` log-softmax of ``logits`` at each row's ``token``."""
    return logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)


@dataclass
class _Layer:
    input_norm: tuple[torch.Tensor, float]
    post_norm: tuple[torch.Tensor, float]
    q_norm: Optional[tuple[torch.Tensor, float]]
    k_norm: Optional[tuple[torch.Tensor, float]]
    qkv: tuple[torch.Tensor, Optional[torch.Tensor]]
    out: tuple[torch.Tensor, Optional[torch.Tensor]]
    gate_up: tuple[torch.Tensor, Optional[torch.Tensor]]
    down: tuple[torch.Tensor, Optional[torch.Tensor]]


class _Weights:
    """The decoder's weights as plain tensors, fused where one matmul can replace several."""

    def __init__(self, base: torch.nn.Module) -> None:
        config = base.config
        inner = base.model
        self.dtype = inner.embed_tokens.weight.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = _norm(inner.norm)
        self.lm_head = _linear_weights(base.lm_head)
        self.layers = []
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    input_norm=_norm(layer.input_layernorm),
                    post_norm=_norm(layer.post_attention_layernorm),
                    q_norm=_norm(attention.q_norm) if hasattr(attention, "q_norm") else None,
                    k_norm=_norm(attention.k_norm) if hasattr(attention, "k_norm") else None,
                    qkv=_concat([_linear_weights(getattr(attention, name)) for name in ("q_proj", "k_proj", "v_proj")]),
                    out=_linear_weights(attention.o_proj),
                    gate_up=_concat([_linear_weights(mlp.gate_proj), _linear_weights(mlp.up_proj)]),
                    down=_linear_weights(mlp.down_proj),
                )
            )

    @classmethod
    def read(cls, model: torch.nn.Module) -> "_Weights":
        return cls(_base_model(model))

    def forward(
        self,
        ids: torch.Tensor,
        start: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: "_KVCache",
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits for the last position of ``ids`` (placed at cache slots ``start:start+n``)."""
        batch, length = ids.shape
        stop = start + length
        cos, sin = cos[:, :, start:stop], sin[:, :, start:stop]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        hidden = F.embedding(ids, self.embed)
        for index, layer in enumerate(self.layers):
            normed = _rms_norm(hidden, layer.input_norm)
            q, k, v = F.linear(normed, *layer.qkv).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(batch, length, self.heads, self.head_dim)
            k = k.view(batch, length, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, layer.q_norm), _rms_norm(k, layer.k_norm)
            q, k = _rotate(q.transpose(1, 2), cos, sin), _rotate(k.transpose(1, 2), cos, sin)
            v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = cache.write(index, start, k, v)
            attended = F.scaled_dot_product_attention(
                q, keys[:, :, :stop], values[:, :, :stop], attn_mask=mask, scale=self.scale,
                enable_gqa=self.kv_heads != self.heads,
            )  # fmt: skip
            hidden = hidden + F.linear(attended.transpose(1, 2).reshape(batch, length, q_size), *layer.out)
            gate, up = F.linear(_rms_norm(hidden, layer.post_norm), *layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, *layer.down)
        return F.linear(_rms_norm(hidden[:, -1], self.norm), *self.lm_head)


class _KVCache:
    """Keys and values for every slot of every row, allocated once per call."""

    def __init__(self, weights: _Weights, batch: int, length: int, device: torch.device) -> None:
        shape = (batch, weights.kv_heads, length, weights.head_dim)
        self.keys = [torch.empty(shape, dtype=weights.dtype, device=device) for _ in weights.layers]
        self.values = [torch.empty(shape, dtype=weights.dtype, device=device) for _ in weights.layers]

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        stop = start + keys.shape[2]
        self.keys[layer][:, :, start:stop] = keys
        self.values[layer][:, :, start:stop] = values
        return self.keys[layer], self.values[layer]

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (a boolean mask, or indices, which may repeat a row)."""
        self.keys = [keys[rows] for keys in self.keys]
        self.values = [values[rows] for values in self.values]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    weight, eps = norm
    # As the HF RMSNorm: normalised in float32, cast back, then scaled.
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _norm(module: torch.nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    return module.weight, float(eps)


def _linear_weights(module: torch.nn.Module) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """(weight, bias) of a linear layer as it computes now: a peft LoRA layer's active, unmerged adapters
    merged in (dropout is inactive in sampling); None if ``module`` is neither, or a LoRA kind that
    cannot be merged (DoRA, ...)."""
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias
    if type(getattr(module, "base_layer", None)) is not torch.nn.Linear:
        return None
    try:
        return merged_lora_linear(module)
    except NotImplementedError:
        return None


def _concat(parts: list) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    weight = torch.cat([part[0] for part in parts], dim=0)
    if all(part[1] is None for part in parts):
        return weight, None
    biases = [part[1] if part[1] is not None else part[0].new_zeros(part[0].shape[0]) for part in parts]
    return weight, torch.cat(biases)


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (its LoRA layers still in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
