"""Shared mechanics of the five experiments: data, models, training, run directories, plots."""
