"""Lightning callbacks: rollout hooks that fill rewards and log budget metrics."""

from selfbudget_pl.callbacks.budget_metrics import BudgetMetricsCallback
from selfbudget_pl.callbacks.reward import RewardCallback, RolloutHook

__all__ = ["BudgetMetricsCallback", "RewardCallback", "RolloutHook"]
