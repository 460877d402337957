"""Training: the loop (``train``), the train module around the model (losses, their
weighting, head initialisation), loaders of the mapped splits, TorchRec sharding, checkpoints,
metric loggers and sweeps. Imports the model, evaluation and tracking; nothing imports it but
the CLI."""
