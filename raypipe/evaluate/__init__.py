"""Evaluation: benchmarks, predictions, keyword scoring and accuracy reports."""
