"""Batch scoring and the MLflow pyfunc that wraps a trained model. Only the CLI imports this."""
