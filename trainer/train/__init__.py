"""Training: the runner, its callbacks, data, models and one workflow per stage."""
