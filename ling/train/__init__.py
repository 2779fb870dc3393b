"""Training: one trainer core (pretraining, full fine-tuning, LoRA, task heads), optimizer,
schedules, checkpoints with exact resume, distributed data parallel."""
