"""Training: state, optimizer, per-stage steps, the loop, checkpointing, metrics."""
