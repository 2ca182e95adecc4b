"""``fastxent bench --compare MODULE:FUNCTION``: time your own cross-entropy beside fastxent,
the peers and the memory floor.

The function's signature::

    def my_xent(logits, labels):
        '''logits: (N, C) C-contiguous NumPy array (float32, or float64 with --dtype float64);
        labels: (N,) int64 class indices in [0, C).
        Returns (loss, grad): loss, the mean over rows of -log softmax(logits)[label]
        (a scalar: Python float, NumPy scalar or 0-d array); grad, its gradient
        d loss / d logits, an (N, C) array.'''

``MODULE`` is imported as Python imports it (the current directory first, as for
``python -m``); ``FUNCTION`` may be dotted (``module:Class.method``). A spec that does not
import or is not callable is a usage error before any timing. On each shape, before its
rounds, the function's loss and gradient on the first rows of that shape's logits are
checked against the float64 NumPy reference; a wrong or failing one is reported as wrong
(a note, and no row), never timed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: rows of the shape's logits checked against the reference before timing
CHECK_ROWS = 64
#: (loss relative, gradient absolute) tolerance by the logits' dtype
TOLERANCE = {np.dtype(np.float32): (1e-4, 1e-5), np.dtype(np.float64): (1e-10, 1e-12)}


@dataclass(frozen=True)
class UserContender:
    spec: str
    function: Callable[[np.ndarray, np.ndarray], Any]

    @property
    def name(self) -> str:
        return f"compare {self.spec}"


def load(spec: str) -> UserContender:
    """``MODULE:FUNCTION`` -> the callable; an ``argparse.ArgumentTypeError`` (a usage
    error) when it does not import or is not callable."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected MODULE:FUNCTION, e.g. mykernels:xent")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script does not put it there; python -m does
    try:
        found: Any = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's to fix
        raise argparse.ArgumentTypeError(f"{spec!r}: cannot import {module_name}: {error}") from None
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise argparse.ArgumentTypeError(f"{spec!r}: {module_name} has no {attribute}") from None
    if not callable(found):
        raise argparse.ArgumentTypeError(f"{spec!r}: {attribute} is not callable")
    return UserContender(spec, found)


def check(contender: UserContender, x: np.ndarray, y: np.ndarray) -> str | None:
    """None if the function's loss and gradient on the first rows of ``x`` match the float64
    reference, else why not (one line)."""
    from . import _reference

    k = min(CHECK_ROWS, x.shape[0])
    xs, ys = np.ascontiguousarray(x[:k]), np.ascontiguousarray(y[:k])
    try:
        result = contender.function(xs, ys)
        loss, grad = result
        loss = float(np.asarray(loss))
        grad = np.asarray(grad)
    except Exception as error:  # noqa: BLE001 - the user's code: report, never crash the bench
        return f"raised {type(error).__name__}: {error}".splitlines()[0][:200]
    if grad.shape != xs.shape:
        return f"gradient shape {grad.shape}, expected {xs.shape}"
    ref_loss, ref_grad = _reference.cross_entropy(xs.astype(np.float64), ys)
    loss_tol, grad_tol = TOLERANCE.get(x.dtype, TOLERANCE[np.dtype(np.float32)])
    loss_error = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
    grad_error = float(np.max(np.abs(grad.astype(np.float64) - ref_grad))) if grad.size else 0.0
    if not (loss_error <= loss_tol and grad_error <= grad_tol):  # NaN fails too
        return (
            f"WRONG against the float64 reference on {k}x{x.shape[1]}: loss relative error {loss_error:.1e} "
            f"(tolerance {loss_tol:.0e}), gradient max error {grad_error:.1e} (tolerance {grad_tol:.0e})"
        )
    return None
