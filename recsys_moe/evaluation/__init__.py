"""Evaluation: predictions of a model on rows or tensors, per-task metrics, gate statistics and
expert-usage heatmaps, and the offline evaluation job of a training run."""
