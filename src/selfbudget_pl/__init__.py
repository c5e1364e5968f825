"""selfbudget-pl: train LLM reasoning models to predict their own token budget (SelfBudgeter) with Lightning."""

__version__ = "0.1.0"
