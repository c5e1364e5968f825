"""Completion logits without padding, and with each group's shared prompt computed once.

A GRPO micro-batch is G completions per prompt, left-padded prompts before right-padded completions.
Run as one padded batch, the model computes every prompt G times and every padding slot once. Here
the real tokens are packed into one row instead: each run of identical consecutive prompts once,
then every completion. All per-token work (projections, MLP, norms) runs on those tokens only; the
attention alone gathers them into a padded ``[rows, width]`` layout (each row its prompt then its
completion, so plain causal attention is exact), runs SDPA, and scatters the result back. Gradients
from every completion flow into its shared prompt through that gather, so logits and gradients equal
the padded forward's (up to float rounding).

It runs inside the model's own ``forward``, so FSDP hooks, LoRA layers and activation checkpointing
work as usual. The model's attention becomes :func:`packed_attention`, registered with transformers:
plain SDPA (with SDPA's masks) for every call, and the packed layout for calls that pass ``packing=``.
It stays selected after the call, because checkpointed layers re-run their forward during backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from selfbudget_pl import internals
from selfbudget_pl.tensors import repeats_row_above

ATTENTION_NAME = "sdpa_or_packed"
SUPPORTED_MODEL_TYPES = ("qwen2", "llama", "qwen3")


@dataclass
class PackedBatch:
    """Index maps between packed tokens (``U`` of them) and the padded attention layout."""

    input_ids: torch.Tensor  # [1, U]
    position_ids: torch.Tensor  # [1, U], as generation numbers them (left padding does not count)
    slot_token: torch.Tensor  # [rows * width]: the packed token at each padded slot (pad slots: token 0)
    token_slot: torch.Tensor  # [U]: one padded slot that computes each packed token
    predictor: torch.Tensor  # [C]: the packed token whose logits predict each completion token
    rows: int
    width: int


def pack(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> PackedBatch:
    """Pack ``[n, P]`` left-padded prompts and ``[n, T]`` right-padded completions (masks mark real
    tokens). Consecutive rows with the same prompt share one copy of it. Completion tokens are
    predicted in the order of ``completion_mask.bool()`` (row by row), as :func:`unpack` expects."""
    device = prompt_ids.device
    prompt_lengths = prompt_mask.sum(1)
    completion_lengths = completion_mask.sum(1)
    if bool((prompt_lengths == 0).any()):
        raise ValueError("every row needs at least one prompt token to predict its first completion token from")
    # A completion's last token predicts nothing and no later token attends to it: it is only a target.
    completion_inputs = (completion_lengths - 1).clamp(min=0)
    rows = prompt_ids.shape[0]
    repeats = repeats_row_above(prompt_ids, prompt_mask)
    # Tokens each row adds to the pack: its prompt unless the row above had the same one, then its completion.
    own_prompt = torch.where(repeats, 0, prompt_lengths)
    added = own_prompt + completion_inputs
    starts = torch.cumsum(added, 0) - added
    first_row = torch.cummax(torch.where(repeats, -1, torch.arange(rows, device=device)), 0).values
    prompt_start = starts[first_row]
    completion_start = starts + own_prompt

    lengths = prompt_lengths + completion_inputs
    width = int(lengths.max())
    column = torch.arange(width, device=device)[None, :]
    in_prompt = column < prompt_lengths[:, None]
    valid = column < lengths[:, None]
    slot_token = torch.where(
        in_prompt, prompt_start[:, None] + column, completion_start[:, None] + column - prompt_lengths[:, None]
    ).masked_fill(~valid, 0)
    # Each packed token is computed by one slot: its first row's (prompts) or its own row's (completions).
    owns = valid & (~in_prompt | ~repeats[:, None])
    total = int(added.sum())
    token_slot = torch.empty(total, dtype=torch.long, device=device)
    token_slot[slot_token[owns]] = torch.arange(rows * width, device=device).view(rows, width)[owns]

    # Row text as the model reads it: real prompt tokens, then the completion.
    prompt_width = prompt_ids.shape[1]
    prompt_column = (prompt_width - prompt_lengths[:, None] + column).clamp(max=prompt_width - 1)
    completion_column = (column - prompt_lengths[:, None]).clamp(min=0, max=completion_ids.shape[1] - 1)
    row_text = torch.where(
        in_prompt, prompt_ids.gather(1, prompt_column), completion_ids.gather(1, completion_column)
    )
    input_ids = torch.empty(total, dtype=prompt_ids.dtype, device=device)
    input_ids[slot_token[owns]] = row_text[owns]
    position_ids = torch.empty(total, dtype=torch.long, device=device)
    position_ids[slot_token[owns]] = column.expand(rows, width)[owns]

    # Completion token j of a row is predicted from column prompt_length - 1 + j.
    predicts = (column >= prompt_lengths[:, None] - 1) & (column < (prompt_lengths + completion_lengths - 1)[:, None])
    predictor = slot_token[predicts]
    return PackedBatch(
        input_ids=input_ids[None], position_ids=position_ids[None], slot_token=slot_token.reshape(-1),
        token_slot=token_slot, predictor=predictor, rows=rows, width=width,
    )  # fmt: skip


def unpack(values: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """``[C]`` per-completion-token values -> ``[n, T]`` with zeros at padding (differentiable)."""
    out = values.new_zeros(completion_mask.shape)
    return out.masked_scatter(completion_mask.bool(), values)


def unsupported_reason(model: torch.nn.Module) -> Optional[str]:
    """Why :func:`packed_forward` cannot run ``model`` (None when it can)."""
    config = getattr(_pretrained(model), "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "use_sliding_window", False) or any(
        kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])
    ):
        return "sliding-window attention layers"
    implementation = internals.attention_implementation(config)
    if implementation not in ("sdpa", ATTENTION_NAME):
        return f"attn_implementation {implementation!r} (packing replaces 'sdpa')"
    return None


def packed_forward(model: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The model's output ``logits`` at the packed tokens that predict completion tokens: ``[1, C, V]``
    logits (``[1, C, ...]`` whatever its head returns); :func:`completion_rows` drops the batch axis."""
    _use_packed_attention(model)
    input_ids = batch.input_ids
    return model(
        # All ones: transformers then builds no mask (causal SDPA needs none); None would make it
        # build a [U, U] mask for what it takes to be packed sequences.
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), position_ids=batch.position_ids,
        logits_to_keep=batch.predictor, use_cache=False, packing=batch,
    ).logits  # fmt: skip


def completion_rows(states: torch.Tensor) -> torch.Tensor:
    """``[C, ...]`` rows of :func:`packed_forward`'s output (or of the hidden states its head projects),
    one per completion token in ``completion_mask.bool()`` order."""
    return states[0]


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    packing: Optional[PackedBatch] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA, or with ``packing``, ``[1, heads, U, head_dim]`` packed
    q/k/v -> ``[1, U, heads, head_dim]``, attending causally within each row of its padded layout."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packing is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    def to_rows(states: torch.Tensor) -> torch.Tensor:
        heads, head_dim = states.shape[1], states.shape[3]
        padded = states[0].transpose(0, 1).index_select(0, packing.slot_token)
        return padded.view(packing.rows, packing.width, heads, head_dim).transpose(1, 2)

    # Each row's real tokens come first, so causal attention never lets a real query see padding.
    attended = F.scaled_dot_product_attention(
        to_rows(query), to_rows(key), to_rows(value), is_causal=True, scale=scaling,
        dropout_p=dropout if module.training else 0.0, enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    heads, head_dim = attended.shape[1], attended.shape[3]
    flat = attended.transpose(1, 2).reshape(packing.rows * packing.width, heads, head_dim)
    return flat.index_select(0, packing.token_slot)[None], None


def _use_packed_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` from SDPA to :func:`packed_attention` (idempotent; unpacked calls are unchanged)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if ATTENTION_NAME not in AttentionInterface():
        AttentionInterface.register(ATTENTION_NAME, packed_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    reason = unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"packed forward cannot run this model: {reason}")
    config = _pretrained(model).config
    if internals.attention_implementation(config) != ATTENTION_NAME:
        internals.set_attention_implementation(config, ATTENTION_NAME)


def _pretrained(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The outermost transformers model inside any wrappers (peft, FSDP, checkpointing)."""
    from transformers import PreTrainedModel

    return next((module for module in model.modules() if isinstance(module, PreTrainedModel)), None)
