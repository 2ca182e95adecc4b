"""The Cython backend (kernels/_cy_xent.pyx) against the numba one, its thread-count
invariance, and the package without numba or without the extension.

What may differ between the two backends, and by how much
---------------------------------------------------------
Both run the same steps with the same operations in the same precisions, in the same
layouts (LANES rows across the SIMD lanes for C <= SMALL_C, else one row at a time), called
through the same interface (the ``Params`` record), and the exponential is bitwise the same
wherever both compile it with FMA (LLVM for the host CPU; gcc in the x86-64-v3/v4 clones;
the baseline SSE2 clone has no FMA and may differ by 1 ulp). The differences are the ORDER
of the float64 row sums of step (2) in the row layout (numba lets LLVM reassociate them,
the Cython kernel keeps 16 explicit lanes; in the lanes layout both sum each row's classes
in order) and which multiply-adds the two compilers fuse in the float64 arithmetic of step
(3). A reordered sum of C non-negative terms differs by at most ``C * eps64`` relative, so:

- the row max and the exponentials: bitwise (or 1 ulp without FMA);
- the loss (float64): within ``(C + 8) * eps64`` times the sum of the magnitudes of its
  terms (``loss_atol`` below), plus ``4 * eps`` of the dtype when the exp may differ;
- the gradient, ``e * a - b`` with ``a`` rounded to the dtype from a float64 sum: within
  ``4 * eps + C * eps64`` (eps of the dtype) times ``grad_scale`` times the size of its
  terms (``grad_atol``). In float32 the reordered float64 sum almost never changes ``a``,
  and the gradients come out bitwise equal; in float64 they differ in the last bits.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastxent as fx
from fastxent import _dispatch
from fastxent._spec import LossSpec

#: the two backends' kernel modules, called alike: the same functions, the same ``Params``
cy = _dispatch.KERNELS.get("cython")
nb = _dispatch.KERNELS.get("numba")

needs_cython = pytest.mark.skipif(cy is None, reason=f"Cython backend not built: {_dispatch.UNAVAILABLE.get('cython')}")
needs_both = pytest.mark.skipif(
    cy is None or nb is None,
    reason=f"needs the cython and numba backends: {_dispatch.UNAVAILABLE}",
)


def _params(kind, n_classes, weight, weight_total, ignore_index, eps, grad_scale, class_start=0):
    """The kernels' record (unvalidated: the kernels do not validate either)."""
    spec = LossSpec(kind, "sum", eps, ignore_index)
    return spec.params(
        n_classes=n_classes,
        weight_total=weight_total,
        grad_scale=grad_scale,
        weighted=weight.shape[0] != 0,
        class_start=class_start,
    )


def _xent_index(module, x, y, weight, weight_total, ignore_index, eps, grad_scale, loss, grad=None):
    """``module.xent_index`` with the record built from these options; labels as int64 and
    inputs read-only, as the API passes them (``grad`` may be ``x`` itself: then x is not
    made read-only)."""
    params = _params("index", x.shape[1], weight, weight_total, ignore_index, eps, grad_scale)
    y = _read_only(np.ascontiguousarray(y, np.int64))
    x_in = x if grad is x else _read_only(x)
    module.xent_index(x_in, y, _read_only(weight), params, loss, grad)


def _xent_probability(module, x, t, weight, eps, grad_scale, loss, grad=None):
    weight_total = float(np.sum(weight, dtype=np.float64)) if weight.shape[0] else float(x.shape[1])
    params = _params("probability", x.shape[1], weight, weight_total, -100, eps, grad_scale)
    x_in = x if grad is x else _read_only(x)
    module.xent_probability(x_in, _read_only(t), _read_only(weight), params, loss, grad)


EPS64 = np.finfo(np.float64).eps
DTYPES = (np.float32, np.float64)
LABEL_DTYPES = (np.int32, np.int64)
#: row lengths that cover: a single class, the masked tail only, exactly one lane block,
#: a block plus a tail, the plain-loop row max (< 64) and the lane row max (>= 64)
CLASS_COUNTS = (1, 5, 16, 17, 63, 64, 100, 1000)


def _exp_has_fma() -> bool:
    """Whether the Cython clone in use fuses like LLVM does on this host (then exp is bitwise)."""
    return cy is not None and cy.simd_level() in ("x86-64-v4", "x86-64-v3")


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _logits(rng, n, n_classes, dtype, special=False):
    x = (rng.standard_normal((n, n_classes)) * 4).astype(dtype)
    if special and n_classes > 2:
        x[0, 1] = -np.inf  # a masked class
        x[1, :] = -np.inf  # an all -inf row: NaN
        x[1 % n, 0] = -np.inf
        x[2, 0] = np.nan  # a NaN row
        x[3, 0], x[3, 1] = 1e4, -1e4  # huge finite logits
    return x


def _assert_close(actual, expected, atol, rtol=0.0, what=""):
    """Non-finite values identical (NaN where NaN, inf of the same sign); finite values
    within ``atol + rtol * |expected|`` (atol may be an array broadcasting to them)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=f"{what}: NaN pattern")
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(actual[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)])
    with np.errstate(invalid="ignore"):  # inf - inf where the values are not finite
        bound = np.broadcast_to(np.asarray(atol, np.float64), expected.shape) + rtol * np.abs(expected)
        excess = np.where(finite, np.abs(actual - expected) - bound, 0.0)
    assert not np.any(np.isnan(excess)), f"{what}: NaN bound where the values are finite"
    worst = np.unravel_index(np.argmax(excess), excess.shape) if excess.size else None
    assert excess.size == 0 or excess[worst] <= 0, (
        f"{what}: |{actual[worst]!r} - {expected[worst]!r}| exceeds the bound {bound[worst]!r} at {worst}"
    )


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place (0 for equal values, equal NaNs and equal infs)."""
    int_type = np.int32 if a.dtype == np.float32 else np.int64
    ia, ib = a.view(int_type).astype(np.int64), b.view(int_type).astype(np.int64)
    ia = np.where(ia < 0, np.iinfo(int_type).min - ia, ia)  # a monotone integer order
    ib = np.where(ib < 0, np.iinfo(int_type).min - ib, ib)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    return np.where(same, 0, np.abs(ia - ib))


def _exp_eps(dtype) -> float:
    """What the exponentials may differ by: 0 when both fuse the same way, else 1 ulp."""
    return 0.0 if _exp_has_fma() else 4 * float(np.finfo(dtype).eps)


@needs_both
def test_same_interface_numbers_and_record():
    """The modes, the row-data columns and the layout switch are numba's numbers (so _shards
    runs on either backend; the rows per lane group may differ: gcc is faster with 32), and
    the C struct has the fields of ``_spec.Params``."""
    from fastxent._spec import Params

    assert tuple(cy.extension.PARAMS_FIELDS) == Params._fields
    for name in ("LOSS", "GRAD", "IN_PLACE", "STATS", "SHARD_GRAD", "N_STATS", "SMALL_C", "BLOCK_ELEMENTS"):
        assert getattr(cy, name) == getattr(nb, name), name
    for name in ("STAT_M", "STAT_S", "STAT_TARGET", "STAT_A", "STAT_B", "COEF_M", "COEF_A", "COEF_Y"):
        assert getattr(cy, name) == getattr(nb, name), name
    for function in ("xent_index", "xent_probability", "row_stats", "finish", "shard_grad", "label_stats"):
        assert callable(getattr(cy, function)), function


# --- index targets --------------------------------------------------------------------


def _index_bounds(x, y, weight, eps, grad_scale, ignore_index, dtype):
    """Per-row loss tolerance and per-row gradient tolerance (see the module docstring)."""
    n, n_classes = x.shape
    x64 = x.astype(np.float64)
    w = weight.astype(np.float64) if weight.size else np.ones(n_classes)
    kept = y != ignore_index
    w_y = np.where(kept, w[np.where(kept, y, 0)], 0.0)
    with np.errstate(invalid="ignore"):
        m = np.max(x64, axis=1)
        x_y = np.take_along_axis(x64, np.where(kept, y, 0)[:, None].astype(np.int64), 1)[:, 0]
        keep, spread, total = 1 - eps, eps / n_classes, w.sum()
        lse_scale = np.abs(m) + np.abs(x_y) + np.log(n_classes) + 1
        smooth = spread * np.sum(w * np.abs(m[:, None] - x64), axis=1)
        terms = (keep * w_y + spread * total) * lse_scale + smooth
    loss_atol = ((n_classes + 8) * EPS64 + _exp_eps(dtype)) * np.where(np.isfinite(terms), terms, 0)
    eps_dtype = float(np.finfo(dtype).eps)
    grad_term = grad_scale * (keep * w_y + spread * total + spread * w.max())
    grad_atol = (4 * eps_dtype + n_classes * EPS64) * grad_term
    return loss_atol, grad_atol[:, None]


@needs_both
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_dtype", LABEL_DTYPES)
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_index_matches_numba(dtype, label_dtype, n_classes, weighted, eps):
    rng = np.random.default_rng(n_classes * 7 + int(eps * 10) + weighted)
    n, ignore_index = 203, -100
    x = _logits(rng, n, n_classes, dtype, special=True)
    y = rng.integers(0, n_classes, n).astype(label_dtype)
    y[::5] = ignore_index
    weight = rng.uniform(0.1, 3.0, n_classes).astype(dtype) if weighted else np.empty(0, dtype)
    weight_total = float(np.sum(weight, dtype=np.float64)) if weighted else float(n_classes)
    first_bad, denominator = cy.label_stats(_read_only(y), n_classes, ignore_index, _read_only(weight))
    assert (first_bad, denominator) == nb.label_stats(y, n_classes, ignore_index, weight)  # bitwise: row order
    grad_scale = 1.0 / denominator
    results = {}
    for name, module in (("numba", nb), ("cython", cy)):
        loss, grad = np.empty(n), np.empty_like(x)
        _xent_index(module, x, y, weight, weight_total, ignore_index, eps, grad_scale, loss, grad)
        results[name] = loss, grad
    loss_atol, grad_atol = _index_bounds(x, y, weight, eps, grad_scale, ignore_index, dtype)
    _assert_close(results["cython"][0], results["numba"][0], loss_atol, what="loss")
    _assert_close(results["cython"][1], results["numba"][1], grad_atol, what="grad")
    ignored = y == ignore_index
    assert np.all(results["cython"][0][ignored] == 0) and np.all(results["cython"][1][ignored] == 0)

    # loss only: the losses of the loss+grad pass, bit for bit (one copy of steps (1)-(3)
    # serves every mode of a layout)
    loss_only = np.empty(n)
    _xent_index(cy, x, y, weight, weight_total, ignore_index, eps, grad_scale, loss_only)
    _assert_close(loss_only, results["cython"][0], loss_atol, what="loss only")
    np.testing.assert_array_equal(loss_only, results["cython"][0])
    # ... and the extension's dummy gradient is never written
    dummy = np.full((1, n_classes), 7, dtype)
    params = _params("index", n_classes, weight, weight_total, ignore_index, eps, grad_scale)
    lanes = n_classes <= cy.SMALL_C
    rowdata = np.empty((1, cy.N_STATS))
    y64 = np.ascontiguousarray(y, np.int64)
    cy.extension.xent_index(_read_only(x), y64, weight, params, cy.LOSS, lanes, loss_only, dummy, rowdata)
    assert np.all(dummy == 7)

    # in place (grad is x): bit for bit the out-of-place result
    x_in_place, loss_in_place = x.copy(), np.empty(n)
    _xent_index(cy, x_in_place, y, weight, weight_total, ignore_index, eps, grad_scale, loss_in_place, x_in_place)
    np.testing.assert_array_equal(loss_in_place, results["cython"][0])
    np.testing.assert_array_equal(x_in_place, results["cython"][1])


@needs_both
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_float32_gradient_bitwise_with_fma(n_classes):
    """Where both exponentials fuse alike, float32 gradients (and row maxima, and hence
    everything but the float64 rounding of the sums) agree bit for bit with numba on
    ordinary inputs: the reordered float64 sum does not change ``a`` once rounded."""
    if not _exp_has_fma():
        pytest.skip(f"the {cy.simd_level()} clone has no FMA; exp may differ by 1 ulp")
    rng = np.random.default_rng(n_classes)
    n = 512
    x = _logits(rng, n, n_classes, np.float32)
    y = rng.integers(0, n_classes, n).astype(np.int64)
    weight = np.empty(0, np.float32)
    grads = []
    for module in (nb, cy):
        loss, grad = np.empty(n), np.empty_like(x)
        _xent_index(module, x, y, weight, float(n_classes), -100, 0.0, 1.0 / n, loss, grad)
        grads.append(grad)
    assert np.max(_ulps(grads[0], grads[1])) <= 1  # in practice 0; 1 if a float32 `a` rounds apart
    assert np.mean(grads[0] == grads[1]) > 0.999


# --- probability targets ------------------------------------------------------------


def _probability_bounds(x, t, weight, eps, grad_scale, dtype):
    """Per-row loss tolerance and per-row gradient tolerance (see the module docstring)."""
    n_classes = x.shape[1]
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    w = weight.astype(np.float64) if weight.size else np.ones(n_classes)
    wt = w * ((1 - eps) * t64 + eps / n_classes)
    with np.errstate(invalid="ignore"):
        m = x64.max(axis=1, keepdims=True)
        loss_terms = np.sum(np.abs(wt * (m - x64)), axis=1) + wt.sum(axis=1) * (np.log(n_classes) + 2)
    loss_atol = ((n_classes + 8) * EPS64 + _exp_eps(dtype)) * np.where(np.isfinite(loss_terms), loss_terms, 0)
    eps_dtype = float(np.finfo(dtype).eps)
    grad_terms = grad_scale * (wt.sum(axis=1, keepdims=True) + wt.max(axis=1, keepdims=True))
    grad_atol = (4 * eps_dtype + n_classes * EPS64) * grad_terms
    return loss_atol, grad_atol


@needs_both
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_probability_matches_numba(dtype, n_classes, weighted, eps):
    rng = np.random.default_rng(n_classes * 11 + int(eps * 10) + weighted)
    n = 131
    x = _logits(rng, n, n_classes, dtype)
    t = rng.random((n, n_classes)).astype(dtype)
    t[::3] /= t[::3].sum(axis=1, keepdims=True)  # some rows normalised, others not
    weight = rng.uniform(0.1, 3.0, n_classes).astype(dtype) if weighted else np.empty(0, dtype)
    grad_scale = 1.0 / n
    results = {}
    for name, module in (("numba", nb), ("cython", cy)):
        loss, grad = np.empty(n), np.empty_like(x)
        _xent_probability(module, x, t, weight, eps, grad_scale, loss, grad)
        results[name] = loss, grad

    loss_atol, grad_atol = _probability_bounds(x, t, weight, eps, grad_scale, dtype)
    _assert_close(results["cython"][0], results["numba"][0], loss_atol, what="loss")
    _assert_close(results["cython"][1], results["numba"][1], grad_atol, what="grad")

    loss_only = np.empty(n)
    _xent_probability(cy, x, t, weight, eps, grad_scale, loss_only)
    _assert_close(loss_only, results["cython"][0], loss_atol, what="loss only")  # see test_index_matches_numba
    np.testing.assert_array_equal(loss_only, results["cython"][0])
    x_in_place, loss_in_place = x.copy(), np.empty(n)
    _xent_probability(cy, x_in_place, t, weight, eps, grad_scale, loss_in_place, x_in_place)
    np.testing.assert_array_equal(loss_in_place, results["cython"][0])
    np.testing.assert_array_equal(x_in_place, results["cython"][1])


# --- few classes: the lanes layout, at every lane-group and block edge -----------------

#: the class counts around the layouts' switch: C <= SMALL_C runs LANES rows across the lanes;
#: 7 / 8 around the float32 register transposes' way out (whole windows from 8 classes), 17
#: and 31 with a second 16-class part of one and of 15 classes
SMALL_CLASS_COUNTS = (1, 2, 3, 7, 8, 10, 16, 17, 31, 32, 33)
#: option sets: (weighted, label smoothing, some rows ignored)
SMALL_OPTIONS = {"plain": (False, 0.0, False), "smoothing+ignore": (False, 0.1, True), "all": (True, 0.25, True)}


def _rows_per_block(n_classes: int) -> int:
    """The kernels' block of rows (the same formula in both backends)."""
    rows = max(1, cy.BLOCK_ELEMENTS // n_classes)
    return rows - rows % cy.LANES if rows >= cy.LANES else rows


def _edge_logits(rng, n, n_classes, dtype, block_rows):
    """Logits with awkward rows where lane groups and blocks meet: a NaN, a row of -inf
    (NaN results), a huge logit far ahead of a -inf one."""
    x = _logits(rng, n, n_classes, dtype)
    for row in {cy.LANES - 1, cy.LANES, block_rows - 1, block_rows, n - 1} & set(range(n)):
        x[row, row % n_classes] = np.nan if row % 2 else 1e4
        if n_classes > 1:
            x[row, (row + 1) % n_classes] = -np.inf
    x[min(n - 1, block_rows + 1), :] = -np.inf
    return x


@needs_both
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", SMALL_CLASS_COUNTS)
@pytest.mark.parametrize("options", list(SMALL_OPTIONS))
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_small_classes_lanes_match_numba(dtype, n_classes, options, kind):
    """Loss only, loss+grad and in place, for row counts that end inside a lane group and
    at and past a block edge: within the stated bounds of numba's (which runs the same
    layout), loss only = loss+grad and in place = out of place bit for bit, ignored rows 0."""
    weighted, eps, ignore = SMALL_OPTIONS[options]
    block_rows = _rows_per_block(n_classes)
    rng = np.random.default_rng(n_classes * 31 + len(options) + (kind == "index"))
    weight = rng.uniform(0.1, 3.0, n_classes).astype(dtype) if weighted else np.empty(0, dtype)
    for n in (1, cy.LANES - 1, cy.LANES + 37, block_rows, 2 * block_rows + 37):
        x = _edge_logits(rng, n, n_classes, dtype, block_rows)
        if kind == "index":
            y = rng.integers(0, n_classes, n)
            if ignore:
                y[::5] = -100
            weight_total = float(np.sum(weight, dtype=np.float64)) if weighted else float(n_classes)
            grad_scale = 1.0 / max(1, n)
            run = lambda module, x_in, loss, grad=None, y=y, wt=weight_total, g=grad_scale: _xent_index(  # noqa: E731
                module, x_in, y, weight, wt, -100, eps, g, loss, grad
            )
            loss_atol, grad_atol = _index_bounds(x, y, weight, eps, grad_scale, -100, dtype)
        else:
            t = rng.random((n, n_classes)).astype(dtype)
            grad_scale = 1.0 / n
            run = lambda module, x_in, loss, grad=None, t=t, g=grad_scale: _xent_probability(  # noqa: E731
                module, x_in, t, weight, eps, g, loss, grad
            )
            loss_atol, grad_atol = _probability_bounds(x, t, weight, eps, grad_scale, dtype)
        results = {}
        for name, module in (("numba", nb), ("cython", cy)):
            loss, grad, loss_only = np.empty(n), np.empty_like(x), np.empty(n)
            run(module, x, loss, grad)
            run(module, x, loss_only)
            x_in_place, loss_in_place = x.copy(), np.empty(n)
            run(module, x_in_place, loss_in_place, x_in_place)
            results[name] = loss, grad, loss_only, loss_in_place, x_in_place
        what = f"{kind} C={n_classes} n={n}"
        loss, grad, loss_only, loss_in_place, x_in_place = results["cython"]
        for mode, numba_mode in ((0, 0), (2, 2), (3, 3)):  # loss+grad, loss only, in place
            _assert_close(results["cython"][mode], results["numba"][numba_mode], loss_atol, what=f"{what} loss {mode}")
        for mode in (1, 4):  # the gradient out of place and in place
            _assert_close(results["cython"][mode], results["numba"][mode], grad_atol, what=f"{what} grad {mode}")
        np.testing.assert_array_equal(loss_only, loss, err_msg=what)
        np.testing.assert_array_equal(loss_in_place, loss, err_msg=what)
        np.testing.assert_array_equal(x_in_place, grad, err_msg=what)
        if kind == "index" and ignore:
            assert np.all(loss[y == -100] == 0) and np.all(grad[y == -100] == 0)


@needs_cython
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [1, 10, 32, 33, 130])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("mode", ["loss only", "grad", "in place"])
def test_every_output_element_is_written(dtype, n_classes, kind, mode):
    """Every loss and gradient element is written, whatever the block and lane-group edges:
    the outputs start as NaN and finite logits must leave none (np.empty outputs can hold the
    right answer from a previous call, which a comparison would not notice)."""
    rng = np.random.default_rng(n_classes)
    n = 2 * _rows_per_block(n_classes) + cy.LANES + 3  # a partial block and a partial lane group
    x = rng.standard_normal((n, n_classes)).astype(dtype)
    loss = np.full(n, np.nan)
    grad = None if mode == "loss only" else np.full((n, n_classes), np.nan, dtype)
    if mode == "in place":
        grad[...] = x
        x = grad
    if kind == "index":
        y = rng.integers(0, n_classes, n)
        y[::7] = -100  # ignored rows are written too (loss 0, gradient 0)
        _xent_index(cy, x, y, np.empty(0, dtype), float(n_classes), -100, 0.0, 1.0, loss, grad)
    else:
        t = rng.dirichlet(np.ones(n_classes), n).astype(dtype)
        _xent_probability(cy, x, t, np.empty(0, dtype), 0.0, 1.0, loss, grad)
    assert not np.isnan(loss).any(), f"rows {np.flatnonzero(np.isnan(loss))[:8]} of {n}: loss never written"
    if grad is not None:
        unwritten = np.isnan(grad).any(axis=1)
        assert not unwritten.any(), f"rows {np.flatnonzero(unwritten)[:8]} of {n}: gradient never written"


@needs_cython
@pytest.mark.parametrize("n_classes", [1, 10, 32])
def test_small_classes_lanes_and_rows_agree(n_classes):
    """The lanes layout against the row layout of the same extension (forced through its
    ``lanes`` argument): they differ only in the order of the float64 sums."""
    rng = np.random.default_rng(n_classes)
    n = 1000
    x = _logits(rng, n, n_classes, np.float64)
    y = rng.integers(0, n_classes, n)
    y[::7] = -100
    params = _params("index", n_classes, np.empty(0), float(n_classes), -100, 0.1, 1.0 / n)
    weight = np.ones(n_classes)
    losses, grads = [], []
    for lanes in (True, False):
        loss, grad = np.empty(n), np.empty_like(x)
        cy.extension.xent_index(x, y, weight, params, cy.GRAD, lanes, loss, grad, np.empty((1, cy.N_STATS)))
        losses.append(loss)
        grads.append(grad)
    loss_atol, grad_atol = _index_bounds(x, y, np.empty(0), 0.1, 1.0 / n, -100, np.float64)
    _assert_close(losses[0], losses[1], loss_atol, what="loss")
    _assert_close(grads[0], grads[1], grad_atol, what="grad")


# --- the class-shard phases -----------------------------------------------------------


@needs_both
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [3, 40, 300])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_shard_phases_match_numba(dtype, n_classes, kind):
    """STATS, finish and SHARD_GRAD through _shards on backend="cython" against numba: the
    max and the target logit exactly, the sums, losses and gradients within the bounds."""
    from fastxent import _shards

    rng = np.random.default_rng(n_classes + (kind == "index"))
    n = 257
    x = _logits(rng, n, n_classes, dtype, special=True)
    weight = rng.uniform(0.5, 2.0, n_classes)
    eps = 0.1
    cut = n_classes // 3
    if kind == "index":
        target = rng.integers(0, n_classes, n)
        target[::5] = -100
        part_target = lambda a, b: target  # noqa: E731
    else:
        target = rng.random((n, n_classes)).astype(dtype)
        part_target = lambda a, b: target[:, a:b]  # noqa: E731
    options = {"num_classes": n_classes, "weight": weight, "label_smoothing": eps}
    results = {}
    for backend in ("numba", "cython"):
        parts = [
            _shards.row_stats(x[:, a:b], part_target(a, b), class_start=a, backend=backend, **options)
            for a, b in ((0, cut), (cut, n_classes))
        ]
        stats = _shards.merge_row_stats(*parts)
        loss, coef, grad_scale = _shards.finish(stats, target, reduction="none", backend=backend, **options)
        grad = np.concatenate(
            [
                _shards.shard_grad(
                    x[:, a:b], part_target(a, b), coef, grad_scale, class_start=a, backend=backend, **options
                )
                for a, b in ((0, cut), (cut, n_classes))
            ],
            axis=1,
        )
        results[backend] = parts, loss, coef, grad
    (parts_nb, loss_nb, coef_nb, grad_nb), (parts_cy, loss_cy, coef_cy, grad_cy) = results.values()
    for part_nb, part_cy in zip(parts_nb, parts_cy, strict=True):
        np.testing.assert_array_equal(part_cy[:, 0], part_nb[:, 0])  # the max
        np.testing.assert_array_equal(part_cy[:, 2], part_nb[:, 2])  # the target logit
        s_rtol = (n_classes + 8) * EPS64 + _exp_eps(dtype)
        _assert_close(part_cy[:, 1], part_nb[:, 1], 0.0, rtol=s_rtol, what="s")
        _assert_close(part_cy[:, 3], part_nb[:, 3], 0.0, rtol=(n_classes + 8) * EPS64, what="A")
    if kind == "index":
        loss_atol, grad_atol = _index_bounds(x, target, weight.astype(dtype), eps, 1.0, -100, dtype)
    else:
        loss_atol, grad_atol = _probability_bounds(x, target, weight.astype(dtype), eps, 1.0, dtype)
    # the statistics are float64 whatever the dtype, so finish sees sums of float64 terms
    _assert_close(loss_cy, loss_nb, 2 * loss_atol, what="loss")
    _assert_close(grad_cy, grad_nb, grad_atol, what="grad")
    _assert_close(coef_cy, coef_nb, 0.0, rtol=(n_classes + 8) * EPS64 + _exp_eps(dtype), what="coef")


# --- the softmax family -------------------------------------------------------------


@needs_both
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
def test_row_functions_match_numba(dtype, n_classes):
    """Each result is one float64 quantity (log s or 1/s) rounded to the dtype and applied
    to exact (or, without FMA, 1-ulp) terms: within (C + 8) eps64 relative of the float64
    quantity, i.e. at most 1 ulp apart in float32 (almost always 0); log_softmax also
    allows for numba's reassociation (below)."""
    rng = np.random.default_rng(n_classes + 99)
    n = 157
    x = _logits(rng, n, n_classes, dtype, special=True)
    eps_dtype = float(np.finfo(dtype).eps)
    slack = (n_classes + 8) * EPS64 + _exp_eps(dtype) + (eps_dtype if dtype == np.float32 else 0.0)
    with np.errstate(invalid="ignore"):
        m = np.abs(np.max(x.astype(np.float64), axis=1))

    outs = {}
    for name, module in (("numba", nb), ("cython", cy)):
        lse, log_sm, sm = np.empty(n, dtype), np.empty_like(x), np.empty_like(x)
        module.logsumexp_rows(_read_only(x), lse)
        module.log_softmax_rows(_read_only(x), log_sm)
        module.softmax_rows(_read_only(x), sm)
        outs[name] = lse, log_sm, sm
    (lse_nb, log_sm_nb, sm_nb), (lse_cy, log_sm_cy, sm_cy) = outs["numba"], outs["cython"]
    _assert_close(lse_cy, lse_nb, slack * (np.nan_to_num(m, posinf=0) + np.log(n_classes) + 1), what="logsumexp")
    # numba's fastmath lets LLVM hoist (x - m) - log s into x - (m + log s): one more
    # rounding, of m + log s in the dtype (up to 1/2 ulp of |m| + log s), than Cython's
    shift = 2 * eps_dtype * (np.nan_to_num(m, posinf=0) + np.log(n_classes) + 1)[:, None]
    _assert_close(log_sm_cy, log_sm_nb, shift + slack * (np.log(n_classes) + 1), rtol=2 * eps_dtype, what="log_softmax")
    _assert_close(sm_cy, sm_nb, 0.0, rtol=2 * slack + 2 * eps_dtype, what="softmax")

    # in place (out is x) gives the same bits as out of place
    for kernel, expected in (("log_softmax_rows", log_sm_cy), ("softmax_rows", sm_cy)):
        x_in_place = x.copy()
        getattr(cy, kernel)(x_in_place, x_in_place)
        np.testing.assert_array_equal(x_in_place, expected, err_msg=kernel)


@needs_both
@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_matches_numba(dtype):
    """The exponential alone: bitwise when the clone in use has FMA (as LLVM on this host),
    else within 1 ulp; 0 below the smallest normal, exp(-inf) = 0, NaN propagates."""
    rng = np.random.default_rng(5)
    lo = -87.0 if dtype == np.float32 else -708.0
    t = np.concatenate(
        [
            -rng.random(200_000) * (-lo + 3),
            -rng.random(10_000) * 1e-3,
            [0.0, -0.0, lo, np.nextafter(lo, 0), np.nextafter(lo, -np.inf), -1e30, -np.inf, np.nan],
        ]
    ).astype(dtype)
    e_nb, e_cy = np.empty_like(t), np.empty_like(t)
    nb.exp_array(t, e_nb)
    cy.exp_array(t, e_cy)
    assert np.max(_ulps(e_nb, e_cy)) <= (0 if _exp_has_fma() else 1)
    assert np.all(e_cy[t < lo] == 0) and np.isnan(e_cy[-1]) and e_cy[-2] == 0
    ok = t >= lo
    assert np.max(_ulps(e_cy[ok], np.exp(t[ok].astype(np.float64)).astype(dtype))) <= 1


# --- threads --------------------------------------------------------------------------


@needs_cython
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [3, 100, 40_000])
def test_thread_count_invariance(dtype, n_classes):
    """1 and 2 OpenMP threads give the same bits: each row is computed by one thread."""
    if not cy.openmp_enabled():
        pytest.skip("built without OpenMP")
    rng = np.random.default_rng(n_classes)
    n = max(4, 300_000 // n_classes)  # several blocks of rows (BLOCK_ELEMENTS = 32768)
    x = _logits(rng, n, n_classes, dtype)
    y = rng.integers(0, n_classes, n)
    y[::7] = -100
    t = rng.random((n, n_classes)).astype(dtype)
    weight = rng.uniform(0.5, 2, n_classes).astype(dtype)
    before = cy.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            cy.set_num_threads(threads)
            assert cy.get_num_threads() == threads
            loss_i, grad_i = np.empty(n), np.empty_like(x)
            _xent_index(cy, x, y, weight, float(weight.sum(dtype=np.float64)), -100, 0.1, 1 / n, loss_i, grad_i)
            loss_p, grad_p = np.empty(n), np.empty_like(x)
            _xent_probability(cy, x, t, weight, 0.1, 1 / n, loss_p, grad_p)
            lse, sm, log_sm = np.empty(n, dtype), np.empty_like(x), np.empty_like(x)
            cy.logsumexp_rows(x, lse)
            cy.softmax_rows(x, sm)
            cy.log_softmax_rows(x, log_sm)
            results.append((loss_i, grad_i, loss_p, grad_p, lse, sm, log_sm))
    finally:
        cy.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


@needs_cython
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [3, 10, 32, 300])
def test_thread_count_invariance_of_every_mode(dtype, n_classes):
    """1 and 2 threads give the same bits in every mode and layout: the lanes layout (C <=
    32) in loss only, loss+grad and in place, and the class-shard phases (STATS, finish,
    SHARD_GRAD)."""
    if not cy.openmp_enabled():
        pytest.skip("built without OpenMP")
    from fastxent import _shards

    rng = np.random.default_rng(n_classes + 1)
    n = 3 * _rows_per_block(n_classes) + 45  # several blocks, the last one ends mid lane group
    x = _logits(rng, n, n_classes, dtype)
    y = rng.integers(0, n_classes, n)
    y[::7] = -100
    t = rng.random((n, n_classes)).astype(dtype)
    weight = rng.uniform(0.5, 2, n_classes).astype(dtype)
    weight_total = float(weight.sum(dtype=np.float64))
    cut = max(1, n_classes // 2)
    before = cy.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            cy.set_num_threads(threads)
            outputs = []
            for grad in ("loss only", "out", "in place"):
                x_in = x.copy() if grad == "in place" else x
                g = {"loss only": None, "out": np.empty_like(x), "in place": x_in}[grad]
                loss_i = np.empty(n)
                _xent_index(cy, x_in, y, weight, weight_total, -100, 0.1, 1 / n, loss_i, g)
                outputs += [loss_i] + ([] if g is None else [g.copy()])
                x_in = x.copy() if grad == "in place" else x
                g = {"loss only": None, "out": np.empty_like(x), "in place": x_in}[grad]
                loss_p = np.empty(n)
                _xent_probability(cy, x_in, t, weight, 0.1, 1 / n, loss_p, g)
                outputs += [loss_p] + ([] if g is None else [g.copy()])
            stats = _shards.row_stats(
                x[:, cut:], y, class_start=cut, num_classes=n_classes, weight=weight, backend="cython"
            )
            _, coef, scale = _shards.finish(stats, y, num_classes=n_classes, weight=weight, backend="cython")
            shard = _shards.shard_grad(
                x[:, cut:], y, coef, scale, class_start=cut, num_classes=n_classes, weight=weight, backend="cython"
            )
            results.append([*outputs, stats, coef, shard])
    finally:
        cy.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


@needs_cython
def test_package_threads_govern_openmp():
    before = fx.get_num_threads()
    try:
        fx.set_num_threads(1)
        assert cy.get_num_threads() == 1 or not cy.openmp_enabled()
    finally:
        fx.set_num_threads(before)
    assert isinstance(cy.openmp_enabled(), bool)
    assert cy.simd_level() in ("x86-64-v4", "x86-64-v3", "baseline")


@needs_cython
def test_public_api_on_cython_matches_reference():
    """End to end through the public API (validation, dtype casts, reductions)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6, 11)).astype(np.float16)
    y = rng.integers(0, 11, (4, 6))
    y[0, 0] = -100
    loss, grad = fx.cross_entropy_with_grad(x, y, label_smoothing=0.2, backend="cython")
    ref_loss, ref_grad = fx.cross_entropy_with_grad(x, y, label_smoothing=0.2, backend="numpy")
    assert grad.dtype == np.float16 and loss.dtype == np.float16
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-3)
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad.astype(np.float64), rtol=2e-3, atol=2e-4)


# --- the package without numba, or without the extension ----------------------------


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FASTXENT_")}
    environment.update(env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fx.__file__)))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=600
    )


def test_imports_and_computes_without_numba():
    """With numba hidden from import, the package loads and computes on Cython (or NumPy
    when the extension is not built), and the thread functions still work."""
    code = """
        import sys
        sys.modules["numba"] = None  # any `import numba` now raises ImportError
        import numpy as np
        import fastxent as fx
        from fastxent import _dispatch, _reference

        assert "numba" not in fx.available_backends(), fx.available_backends()
        assert "numba" in _dispatch.UNAVAILABLE
        rng = np.random.default_rng(1)
        x = rng.standard_normal((300, 37)).astype(np.float32)
        y = rng.integers(0, 37, 300)
        y[::4] = -100
        w = rng.uniform(0.5, 2, 37)
        loss, grad = fx.cross_entropy_with_grad(x, y, weight=w, label_smoothing=0.1)
        row_loss, row_grad = _reference.index_rows(x.astype(np.float64), y, w, -100, 0.1)
        kept = y != -100
        denominator = w[y[kept]].sum()
        np.testing.assert_allclose(float(loss), row_loss.sum() / denominator, rtol=1e-5)
        np.testing.assert_allclose(grad, row_grad / denominator, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(fx.softmax(x).sum(axis=1), 1, rtol=1e-5)

        # the class-shard phases run on the default backend too (cython when built)
        from fastxent import _shards
        if "cython" in fx.available_backends():
            x64 = x.astype(np.float64)
            parts = [
                _shards.row_stats(x64[:, a:b], y, class_start=a, num_classes=37, weight=w, label_smoothing=0.1)
                for a, b in [(0, 20), (20, 37)]
            ]
            stats = _shards.merge_row_stats(*parts)
            shard_loss, coef, scale = _shards.finish(stats, y, num_classes=37, weight=w, label_smoothing=0.1)
            shard_grad = np.concatenate([
                _shards.shard_grad(x64[:, a:b], y, coef, scale, class_start=a, num_classes=37, weight=w,
                                   label_smoothing=0.1)
                for a, b in [(0, 20), (20, 37)]
            ], axis=1)
            np.testing.assert_allclose(shard_loss, row_loss.sum() / denominator, rtol=1e-12)
            np.testing.assert_allclose(shard_grad, row_grad / denominator, rtol=1e-11, atol=1e-16)
        else:
            try:
                _shards.row_stats(x, y)
            except RuntimeError as error:
                assert "need the numba or the cython backend" in str(error)
            else:
                raise SystemExit("no RuntimeError from the shard phases without numba and cython")
        fx.set_num_threads(1)
        assert fx.get_num_threads() == 1
        assert "numba" not in sys.modules or sys.modules["numba"] is None
        print(fx.available_backends()[0])
    """
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    built = importlib.util.find_spec("fastxent._cy_xent") is not None  # whatever this process disabled
    assert result.stdout.strip() == ("cython" if built else "numpy")


def test_cython_backend_missing_is_a_clear_error():
    code = """
        import numpy as np
        import fastxent as fx
        assert "cython" not in fx.available_backends()
        for call in (
            lambda: fx.cross_entropy(np.zeros((2, 3)), np.zeros(2, int)),
            lambda: fx.softmax(np.zeros((2, 3)), backend="cython"),
        ):
            try:
                call()
            except RuntimeError as error:
                print(error)
            else:
                raise SystemExit("no RuntimeError")
    """
    result = _run_python(code, FASTXENT_BACKEND="cython", FASTXENT_DISABLE_CYTHON="1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    assert "FASTXENT_BACKEND='cython' is not available" in lines[0] and "FASTXENT_DISABLE_CYTHON" in lines[0]
    assert "backend='cython' is not available" in lines[1]
