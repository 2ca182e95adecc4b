"""fastxent: fused softmax cross-entropy loss and gradient on the CPU, with PyTorch's semantics.

>>> import numpy as np, fastxent as fx
>>> logits = np.array([[2.0, 0.5, -1.0]], dtype=np.float32)
>>> loss, grad = fx.cross_entropy_with_grad(logits, np.array([0]))

The class axis is the last axis. See ``help(fx.cross_entropy)`` for the formulas.
"""

from __future__ import annotations

from ._alloc import release_memory
from ._api import (
    CrossEntropyStats,
    TargetOutOfRangeError,
    cross_entropy,
    cross_entropy_grad,
    cross_entropy_with_grad,
    log_softmax,
    logsumexp,
    softmax,
)
from ._dispatch import available_backends
from ._distill import distillation_loss, distillation_loss_with_grad
from ._info import openmp_enabled, precompile
from ._linear import linear_cross_entropy, linear_cross_entropy_with_grad
from ._threads import get_num_threads, set_num_threads
from .partial import RowStats, denominators, loss_from_stats, merge_row_stats, row_stats, shard_grad

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyStats",
    "RowStats",
    "TargetOutOfRangeError",
    "available_backends",
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_with_grad",
    "denominators",
    "distillation_loss",
    "distillation_loss_with_grad",
    "get_num_threads",
    "linear_cross_entropy",
    "linear_cross_entropy_with_grad",
    "log_softmax",
    "logsumexp",
    "loss_from_stats",
    "merge_row_stats",
    "openmp_enabled",
    "precompile",
    "release_memory",
    "row_stats",
    "set_num_threads",
    "shard_grad",
    "softmax",
    "__version__",
]
