"""Training loop, inference, metrics and evaluation."""
