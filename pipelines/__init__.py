"""Polars lazy jobs: synthetic data, training-set builder, id mappings."""
