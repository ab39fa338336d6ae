"""local-opt: Local SGD with communication-efficient adaptive batch sizes (arXiv 2406.13936)."""

from local_opt.backends.hooks import StatsCapture
from local_opt.checkpoint import load_checkpoint, save_checkpoint
from local_opt.lr import SampleLR, warmup_cosine
from local_opt.optimizer import LocalOptimizer
from local_opt.schedules import (
    ConstantBatchSize,
    DoublingBatchSize,
    LinearRampBatchSize,
    LRCoupling,
    StagewiseBatchSize,
)
from local_opt.variance import VarianceTest

__all__ = [
    "LocalOptimizer",
    "VarianceTest",
    "StatsCapture",
    "ConstantBatchSize",
    "StagewiseBatchSize",
    "LinearRampBatchSize",
    "DoublingBatchSize",
    "LRCoupling",
    "SampleLR",
    "warmup_cosine",
    "save_checkpoint",
    "load_checkpoint",
]
