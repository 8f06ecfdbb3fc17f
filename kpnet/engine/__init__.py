"""Training, inference and checkpoints."""
