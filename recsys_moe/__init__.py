"""recsys-moe: multi-task ranking with a multi-gate mixture of experts over TorchRec."""
