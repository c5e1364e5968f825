"""Streaming generation and the `selfbudget generate` command: budget event, ceiling, prefill, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from transformers import GenerationConfig
from transformers.modeling_outputs import CausalLMOutputWithPast

from selfbudget_pl.data.prompts import build_prompt, encode_prompt
from selfbudget_pl.generate import BudgetEvent, DoneEvent, TokenEvent, stream_generation
from selfbudget_pl.rollout.base import SamplingSettings
from selfbudget_pl.rollout.hf import HFRolloutBackend

from .conftest import sharpen

PROBLEM = "the sum of 3+4"


@pytest.fixture(scope="module")
def model(model_loader):
    """The tiny model with sharper random weights, so greedy output depends on its context."""
    return sharpen(model_loader.load_model())


class ScriptedModel(torch.nn.Module):
    """A causal LM that emits a fixed token script, one token per forward call (KV cache ignored).

    ``interrupt_at`` raises KeyboardInterrupt in that call, as Ctrl-C does while the model runs.
    """

    def __init__(self, script: list[int], vocab_size: int, eos_id: int, interrupt_at: int | None = None) -> None:
        super().__init__()
        self.script, self.vocab_size, self.interrupt_at = script, vocab_size, interrupt_at
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        self.generation_config = GenerationConfig(eos_token_id=eos_id)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, use_cache: bool = True, **cache) -> CausalLMOutputWithPast:
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        logits = torch.zeros(1, input_ids.shape[1], self.vocab_size)
        logits[0, -1, self.script[self.calls]] = 1.0
        self.calls += 1
        return CausalLMOutputWithPast(logits=logits)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> str:
    return build_prompt(PROBLEM, tokenizer)


def _scripted(tokenizer, text: str, **kwargs) -> ScriptedModel:
    script = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ScriptedModel(script, len(tokenizer), tokenizer.eos_token_id, **kwargs)


def test_greedy_stream_matches_hf_generate(model, tokenizer, prompt):
    events = list(stream_generation(model, tokenizer, prompt, max_tokens=30))
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.reason == "ceiling" and done.n_tokens == 30
    assert "".join(e.text for e in events if isinstance(e, TokenEvent)) == done.text
    backend = HFRolloutBackend(model, tokenizer)
    reference = backend.generate(
        [encode_prompt(prompt, tokenizer)], 1, SamplingSettings(temperature=0.0, max_new_tokens=30)
    )
    assert done.text == reference.completions[0]


def test_callers_code_between_events_keeps_its_grad_mode(model, tokenizer, prompt):
    # The loop must not hold torch.no_grad() across a yield (grad mode is global to the thread).
    assert all(torch.is_grad_enabled() for _ in stream_generation(model, tokenizer, prompt, max_tokens=3))


def test_prefilled_budget_is_announced_first_and_appears_verbatim(model, tokenizer, prompt):
    events = list(stream_generation(model, tokenizer, prompt, max_tokens=6, budget=37))
    assert events[0] == BudgetEvent(37, "prefill")
    assert events[-1].text.startswith("<budget>37</budget><solution>")
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    # Every generated token is solution: the budget was known before the first one.
    assert all(e.solution_tokens == e.n_tokens for e in tokens)
    assert all(e.eta_s is not None and e.eta_s >= 0 for e in tokens)


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_ceiling_is_never_exceeded(model, tokenizer, prompt, max_tokens):
    sampled = list(stream_generation(model, tokenizer, prompt, max_tokens=max_tokens, temperature=1.5, seed=3))
    assert max(e.n_tokens for e in sampled if isinstance(e, (TokenEvent, DoneEvent))) <= max_tokens
    assert sampled[-1].reason == "ceiling" and sampled[-1].n_tokens == max_tokens
    # Greedy: exactly the text of the first max_tokens tokens HF generate produces.
    done = list(stream_generation(model, tokenizer, prompt, max_tokens=max_tokens))[-1]
    reference = HFRolloutBackend(model, tokenizer).generate(
        [encode_prompt(prompt, tokenizer)], 1, SamplingSettings(temperature=0.0, max_new_tokens=64)
    )
    assert done.text == tokenizer.decode(reference.completion_ids[0][:max_tokens], skip_special_tokens=False)


def test_model_budget_fires_when_its_tag_closes(tokenizer, prompt):
    response = "<budget>12</budget><solution>so 3+4=7 \\boxed{7}</solution>"
    model = _scripted(tokenizer, response)
    events = list(stream_generation(model, tokenizer, prompt, max_tokens=100))
    budget_at = next(i for i, e in enumerate(events) if isinstance(e, BudgetEvent))
    assert events[budget_at] == BudgetEvent(12, "model")
    text_before = "".join(e.text for e in events[:budget_at] if isinstance(e, TokenEvent))
    # Announced as soon as "</budget>" is out, before any solution text.
    assert text_before + events[budget_at + 1].text == "<budget>12</budget>"
    after = [e for e in events[budget_at + 1 :] if isinstance(e, TokenEvent)]
    assert after[0].solution_tokens == 0 and after[-1].solution_tokens == after[-1].n_tokens - after[0].n_tokens
    assert all(e.eta_s is not None for e in after)
    assert events[-1] == DoneEvent(response, len(model.script) - 1, "eos")


def test_malformed_budget_gives_no_budget_event(tokenizer, prompt):
    model = _scripted(tokenizer, "<budget>lots</budget><solution>\\boxed{7}</solution>")
    events = list(stream_generation(model, tokenizer, prompt, max_tokens=100))
    assert not any(isinstance(e, BudgetEvent) for e in events)
    assert all(e.solution_tokens is None and e.eta_s is None for e in events if isinstance(e, TokenEvent))


def test_ctrl_c_inside_the_model_ends_with_the_partial_text(tokenizer, prompt):
    model = _scripted(tokenizer, "<budget>12</budget><solution>so 3+4=7", interrupt_at=5)
    events = list(stream_generation(model, tokenizer, prompt, max_tokens=100))
    done = events[-1]
    assert done.reason == "interrupted" and done.n_tokens == 5
    assert done.text == tokenizer.decode(model.script[:5], skip_special_tokens=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"budget": 0}, "budget=0"), ({"max_tokens": 0}, "max_tokens=0"), ({"temperature": -1}, "temperature")],
)
def test_bad_arguments_name_the_field(tokenizer, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(stream_generation(_scripted(tokenizer, "x"), tokenizer, prompt, **kwargs))


# -- the command -------------------------------------------------------------------------------


def _command(model_dir, *args: str) -> list[str]:
    return [sys.executable, "-m", "selfbudget_pl.cli", "generate", "what is 3+4?", "--model", str(model_dir), *args]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_cli_prefilled_budget_and_ceiling(tiny_model_dir):
    result = subprocess.run(
        _command(tiny_model_dir, "--budget", "25", "--max-tokens", "8"),
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<budget>25</budget><solution>")
    assert "budget: 25 tokens (pre-filled)" in result.stderr
    assert "stopped at the --max-tokens ceiling: 8 tokens" in result.stderr


def test_cli_sigint_prints_partial_text_and_exits_130(tiny_model_dir, tokenizer, model_loader):
    process = subprocess.Popen(
        _command(tiny_model_dir, "--max-tokens", "1000"),  # within the tiny model's 1024 positions (more is refused at start-up)
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
        # As from an interactive shell. Started from a background job (`cmd &` in a script), pytest has
        # SIGINT ignored; a child inherits that, and Python then never raises KeyboardInterrupt.
        preexec_fn=_default_sigint,
    )
    try:
        first = os.read(process.stdout.fileno(), 64)  # blocks until generation has started printing
        assert first, process.stderr.read().decode()
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    stdout = (first + rest).decode()
    assert process.returncode == 130, stderr.decode()
    assert "interrupted" in stderr.decode()
    # What was printed is the start of the model's own greedy answer, cut where Ctrl-C landed.
    partial = stdout.rstrip("\n")
    assert partial
    prompt = build_prompt("what is 3+4?", tokenizer)
    events = stream_generation(model_loader.load_model(), tokenizer, prompt, max_tokens=len(partial.encode()) + 16)
    reference = [e for e in events if isinstance(e, DoneEvent)][0].text
    assert reference.startswith(partial)
