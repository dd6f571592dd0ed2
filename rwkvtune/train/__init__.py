"""Training: the recipe (``train``), optimizer/schedule/loss, checkpoints and metrics."""
