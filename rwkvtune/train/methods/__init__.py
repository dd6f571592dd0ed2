"""Training methods beyond next-token SFT: preference optimisation (DPO family) and GRPO."""
