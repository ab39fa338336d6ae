"""Batch samplers for adaptive-batch distributed training (independent of ``local_opt``)."""

from samplers.adaptive import AdaptiveBatchSampler
from samplers.micro import micro_batches

__all__ = ["AdaptiveBatchSampler", "micro_batches"]
