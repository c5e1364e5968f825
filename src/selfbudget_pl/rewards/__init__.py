"""Answer grading and reward functions with TRL's signature ``f(completions, **columns) -> list[float]``.

Kept free of imports on purpose: grading workers import :mod:`selfbudget_pl.rewards.grader` and
should not pay for torch. Import from the submodules (``annotate``, ``grader``, ``budget``,
``length_control``, ``simple``, ``combine``).
"""
