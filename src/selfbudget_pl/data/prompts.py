"""Prompts: the same text for training, evaluation and generation."""

from __future__ import annotations

from typing import Any, Optional, Sequence

PROBLEM_FIELD = "{problem}"


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer formats conversations itself."""
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat_template(tokenizer: Any, chat_template: Optional[bool] = None) -> bool:
    """Whether prompts are rendered as a conversation in the tokenizer's chat template: ``chat_template``
    None uses it where the tokenizer has one (as TRL and verl render ``messages``), True requires it, False
    writes plain text (a base model whose tokenizer ships a template it was not trained on)."""
    if chat_template and not has_chat_template(tokenizer):
        raise ValueError(
            f"chat_template=true, but the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')!r} has "
            "no chat template: set chat_template to null (use one where present) or false (plain text)"
        )
    return has_chat_template(tokenizer) if chat_template is None else bool(chat_template)


def build_prompt(
    problem: str,
    tokenizer: Any,
    template: str = PROBLEM_FIELD,
    system_prompt: Optional[str] = None,
    chat_template: Optional[bool] = None,
) -> str:
    """The prompt text for a problem: ``template`` with ``{problem}`` filled in as the user turn of the
    tokenizer's chat template (with the assistant turn opened, so a pre-filled budget follows it) where
    :func:`use_chat_template` says so, else the filled template alone (after ``system_prompt`` and a blank
    line, if given).

    ``{problem}`` is substituted literally rather than with ``str.format``, so templates may contain
    LaTeX braces such as ``\\boxed{}``.
    """
    if PROBLEM_FIELD not in template:
        raise ValueError(f"prompt template {template!r} has no {PROBLEM_FIELD} field")
    content = template.replace(PROBLEM_FIELD, problem)
    if use_chat_template(tokenizer, chat_template):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": content})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system_prompt}\n\n{content}" if system_prompt else content


def encode_prompt(prompt: str, tokenizer: Any, chat_template: Optional[bool] = None) -> list[int]:
    """Token ids of a prompt built by :func:`build_prompt` (with the same ``chat_template``).

    A chat template already writes any BOS token into the text, so special tokens are added only
    when there is no template (TRL's convention; avoids a doubled BOS).
    """
    return tokenizer(prompt, add_special_tokens=not use_chat_template(tokenizer, chat_template))["input_ids"]


def encode_prompts(
    problems: Sequence[str],
    tokenizer: Any,
    template: str = "{problem}",
    system_prompt: Optional[str] = None,
    chat_template: Optional[bool] = None,
) -> list[list[int]]:
    """Token ids of each problem's prompt, built and encoded exactly as for training."""
    return [
        encode_prompt(build_prompt(problem, tokenizer, template, system_prompt, chat_template), tokenizer, chat_template)
        for problem in problems
    ]
