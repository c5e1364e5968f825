"""LightningModules: the policy both stages share (base), SFT and GRPO, and the pieces of their losses."""
