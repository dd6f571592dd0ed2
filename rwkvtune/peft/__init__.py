"""Parameter-efficient training: LoRA adapters and initial-state tuning."""
