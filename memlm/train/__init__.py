"""Training: trainer, optimizer groups and schedules, checkpoints, distributed."""
