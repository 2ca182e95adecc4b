"""numba's kernels for class-index targets come in two kinds: blocks of rows for few
classes (C <= SMALL_C, one flat exp loop per block) and one row at a time otherwise, each
in three modes (loss only, loss+grad, in place). The two kinds must give the same numbers
across block boundaries, with ignored rows, weights and smoothing, and the three modes the
same bits. (All are also checked against PyTorch in test_torch_conformance.py; these tests
catch a slip that stays inside its tolerance.)
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS

import fastxent as fx

pytestmark = pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not available")


def _all_modes(x, y, **options):
    options = {"backend": "numba", "reduction": "none", **options}
    loss_only = fx.cross_entropy(x, y, **options)
    loss, grad = fx.cross_entropy_with_grad(x, y, **options)
    in_place = x.copy()
    loss_in_place, _ = fx.cross_entropy_with_grad(in_place, y, out=in_place, **options)
    return loss_only, loss, grad, loss_in_place, in_place


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [1, 3, 10, 16])
@pytest.mark.parametrize("options", ["plain", "weight+smoothing+ignored"])
def test_block_kernels_match_row_kernels(monkeypatch, dtype, n_classes, options):
    from fastxent import _numba_kernels

    assert n_classes <= _numba_kernels.SMALL_C
    rng = np.random.default_rng(n_classes)
    n = 3 * _numba_kernels.rows_per_block(n_classes) + 5  # three full blocks and a partial one
    x = (3 * rng.standard_normal((n, n_classes))).astype(dtype)
    y = rng.integers(0, n_classes, n)
    kwargs = {}
    if options != "plain":
        y[rng.random(n) < 0.2] = -100  # ignored rows in every block
        kwargs = {"weight": rng.random(n_classes).astype(dtype) + 0.5, "label_smoothing": 0.1}

    blocked = _all_modes(x, y, **kwargs)
    monkeypatch.setattr(_numba_kernels, "SMALL_C", 0)  # every C takes the row kernels
    rows = _all_modes(x, y, **kwargs)

    rtol = 4 * np.finfo(dtype).eps
    names = ["loss only", "loss", "gradient", "loss in place", "gradient in place"]
    for name, a, b in zip(names, blocked, rows, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol, err_msg=name)
    ignored = y == -100
    assert (blocked[1][ignored] == 0).all() and (blocked[2][ignored] == 0).all()
    assert (blocked[4][ignored] == 0).all()
    # the three modes of the block kernels agree with each other exactly
    np.testing.assert_array_equal(blocked[0], blocked[1])
    np.testing.assert_array_equal(blocked[1], blocked[3])
    np.testing.assert_array_equal(blocked[2], blocked[4])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [37, 300])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("options", ["plain", "smoothing", "weight+smoothing"])
def test_row_kernels_modes_agree_bitwise(dtype, n_classes, kind, options):
    """Loss only, loss+grad and in place are three compiled loops around the same row
    steps, and the per-row loss is computed by one strictly rounded function
    (_index_row_loss). float32: the three give the same bits. float64: LLVM may vectorise
    the float64 sums s and sw of the three loops in different orders (and a freshly
    compiled kernel differently from numba's cached copy of it), so they agree to a few
    ulp (measured: 1-2)."""
    rng = np.random.default_rng(n_classes)
    x = (3 * rng.standard_normal((200, n_classes))).astype(dtype)
    if kind == "index":
        target = rng.integers(0, n_classes, 200)
        target[::5] = -100
    else:
        target = rng.random((200, n_classes)).astype(dtype)
    kwargs = {}
    if "smoothing" in options:
        kwargs["label_smoothing"] = 0.1
    if "weight" in options:
        kwargs["weight"] = rng.random(n_classes).astype(dtype) + 0.5
    loss_only, loss, grad, loss_in_place, grad_in_place = _all_modes(x, target, **kwargs)
    if dtype == np.float32:
        np.testing.assert_array_equal(loss_only, loss)
        np.testing.assert_array_equal(loss, loss_in_place)
        np.testing.assert_array_equal(grad, grad_in_place)
    else:
        rtol = 4 * np.finfo(dtype).eps
        np.testing.assert_allclose(loss_only, loss, rtol=rtol, atol=0)
        np.testing.assert_allclose(loss, loss_in_place, rtol=rtol, atol=0)
        np.testing.assert_allclose(grad, grad_in_place, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [1, 10, 33, 130])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("mode", ["loss only", "grad", "in place"])
def test_every_output_element_is_written(dtype, n_classes, kind, mode):
    """The kernel writes every loss and every gradient element, whatever the block edges:
    the outputs start as NaN, and finite logits must leave none. (The public API allocates
    its outputs with np.empty, whose stale contents can equal the right answer: a kernel
    that skipped the last row of each block passed the reference comparisons.)"""
    from fastxent import _numba_kernels
    from fastxent._spec import LossSpec

    rng = np.random.default_rng(n_classes)
    n = 2 * _numba_kernels.rows_per_block(n_classes) + _numba_kernels.LANES + 3  # partial block and group
    x = rng.standard_normal((n, n_classes)).astype(dtype)
    weight = np.empty(0, dtype)
    if kind == "index":
        target = rng.integers(0, n_classes, n)
        target[::7] = -100  # ignored rows are written too (loss 0, gradient 0)
        run = _numba_kernels.xent_index
    else:
        target = rng.dirichlet(np.ones(n_classes), n).astype(dtype)
        run = _numba_kernels.xent_probability
    params = LossSpec.create(kind).params(n_classes=n_classes, weight_total=n_classes, grad_scale=1.0, weighted=False)
    loss = np.full(n, np.nan)
    grad = None if mode == "loss only" else np.full((n, n_classes), np.nan, dtype)
    for array in (x, target, weight):  # as the API passes its inputs (one compiled signature)
        array.flags.writeable = False
    if mode == "in place":
        grad[...] = x
        x = grad
    run(x, target, weight, params, loss, grad)
    assert not np.isnan(loss).any(), f"rows {np.flatnonzero(np.isnan(loss))[:8]} of {n}: loss never written"
    if grad is not None:
        unwritten = np.isnan(grad).any(axis=1)
        assert not unwritten.any(), f"rows {np.flatnonzero(unwritten)[:8]} of {n}: gradient never written"
