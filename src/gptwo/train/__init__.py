"""Training: the loop, optimizer and schedule, checkpoints, DDP/FSDP, and the quickstart."""
