"""Prompts: the same text for training, evaluation and generation."""

from __future__ import annotations

from typing import Any, Optional, Sequence

PROBLEM_FIELD = "{problem}"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer formats conversations itself."""
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    problem: str, tokenizer: Any, template: str = PROBLEM_FIELD, system_prompt: Optional[str] = None
) -> str:
    """The prompt text for a problem: ``template`` with ``{problem}`` filled in, inside the tokenizer's
    chat template (with the generation prompt) when it has one, else the filled template alone (after
    ``system_prompt`` and a blank line, if given).

    ``{problem}`` is substituted literally rather than with ``str.format``, so templates may contain
    LaTeX braces such as ``\\boxed{}``.
    """
    if PROBLEM_FIELD not in template:
        raise ValueError(f"prompt template {template!r} has no {PROBLEM_FIELD} field")
    content = template.replace(PROBLEM_FIELD, problem)
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n\n{content}" if system_prompt else content


def encode_prompt(prompt: str, tokenizer: Any) -> list[int]:
    """Token ids of a prompt built by :func:`build_prompt`.

    A chat template already writes any BOS token into the text, so special tokens are added only
    when there is no template (TRL's convention; avoids a doubled BOS).
    """
    return tokenizer(prompt, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def encode_prompts(
    problems: Sequence[str], tokenizer: Any, template: str = "{problem}", system_prompt: Optional[str] = None
) -> list[list[int]]:
    """Token ids of each problem's prompt, built and encoded exactly as for training."""
    return [encode_prompt(build_prompt(problem, tokenizer, template, system_prompt), tokenizer) for problem in problems]
