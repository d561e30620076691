"""Training: loop, optimizer and schedule, stage/freeze policy, checkpointing, metrics and logging."""
