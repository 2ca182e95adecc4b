"""Long rows: steps (1)-(2) a chunk at a time, merged as class shards (numba's chunked_steps).

From ``LONG_ROW`` classes the numba kernels take each chunk's max ``m_k`` and sum ``s_k``,
merge them with the factors ``f_k = exp(m_k - m)`` and scale each chunk's gradient by its
own ``a f_k``. A wrong factor, a chunk edge off by one or a masked chunk handled wrongly
shows only where the row's max lies in another chunk than the terms that count, so the
rows here put the max, the target, whole chunks of -inf and the specials at chunk edges,
and are checked against the float64 reference in every mode, with the options. The
other backends run the same inputs (they have no chunks: the same answers).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS
from test_kernel_paths import BIG_LEAD, SMALL_LEAD, check, check_all_modes

import fastxent as fx
from fastxent import _reference

kernels = pytest.importorskip("fastxent._numba_kernels") if "numba" in BACKENDS else None
KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "numpy")

#: just long; a partial last chunk; several chunks; more than MAX_CHUNKS * CHUNK classes
#: (wider chunks)
CLASS_COUNTS = (4096, 4113, 5000, 80_000)


def chunk_width(n_classes):
    """The numba kernels' chunk width (chunk_width), or CHUNK's default without numba."""
    if kernels is None:
        return 512
    width = max(kernels.CHUNK, -(-n_classes // kernels.MAX_CHUNKS))
    return (width + 15) // 16 * 16


def edge_positions(n_classes):
    """Class positions at chunk edges: the first and last of the first two chunks, the
    middle, the first of the last chunk and the last class."""
    w = chunk_width(n_classes)
    last_chunk = (n_classes - 1) // w * w
    return np.unique([0, w - 1, w, 2 * w - 1, n_classes // 2, last_chunk, n_classes - 1])


def long_rows(n_classes, dtype, rng):
    """Rows of uniform(-2, 2) logits with: a big or small lead at each edge position, hit
    or missed by the target; the first, the last or all but the last chunk at -inf; the
    target inside a -inf chunk (loss inf); NaN in the middle; +inf at the end; an all -inf
    row and an ignored row."""
    positions = edge_positions(n_classes)
    w = chunk_width(n_classes)
    rows, targets = [], []
    for j in positions:
        for margin in (BIG_LEAD[np.dtype(dtype)], SMALL_LEAD):
            for hit in (True, False):
                row = rng.uniform(-2.0, 2.0, n_classes)
                row[j] = row.max() + margin
                rows.append(row)
                targets.append(j if hit else (j + w + 1) % n_classes)
    last_chunk = (n_classes - 1) // w * w
    specials = [
        (slice(0, w), n_classes - 1),  # the first chunk masked, target in the last
        (slice(last_chunk, n_classes), 0),  # the last chunk masked
        (slice(0, last_chunk), n_classes - 1),  # only the last chunk left
        (slice(w, 2 * w), w + 3),  # the target masked: loss inf
    ]
    for masked, target in specials:
        row = rng.uniform(-2.0, 2.0, n_classes)
        row[masked] = -np.inf
        rows.append(row)
        targets.append(target)
    for value, at in ((np.nan, n_classes // 2), (np.inf, n_classes - 1)):
        row = rng.uniform(-2.0, 2.0, n_classes)
        row[at] = value
        rows.append(row)
        targets.append(0)
    rows += [np.full(n_classes, -np.inf), rng.uniform(-2.0, 2.0, n_classes)]
    targets += [1, -100]
    return np.array(rows).astype(dtype), np.array(targets, np.int64)


def option_sets(n_classes, dtype, rng):
    weight = rng.uniform(0.25, 2.0, n_classes).astype(dtype)
    return (
        ("plain", {}),
        ("weight+smoothing", {"weight": weight, "label_smoothing": 0.1}),
        ("z-loss+scale", {"z_loss": 1e-3, "logit_scale": 0.75}),
        ("softcap+weight", {"softcap": 30.0, "weight": weight}),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", CLASS_COUNTS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_long_rows_in_every_mode(backend, n_classes, dtype):
    rng = np.random.default_rng(3000 + n_classes)
    x, y = long_rows(n_classes, dtype, rng)
    what = f"C={n_classes} {np.dtype(dtype)} {backend}"
    for name, options in option_sets(n_classes, dtype, rng):
        check_all_modes(x, y, backend, f"{what}, {name}", every_reduction=False, **options)


@pytest.mark.parametrize("n_classes", CLASS_COUNTS[:3])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_long_rows_modes_agree_bit_for_bit(backend, n_classes):
    """Loss only, with the gradient, out= and in place: one chunking, so the same bits."""
    rng = np.random.default_rng(4000 + n_classes)
    x, y = long_rows(n_classes, np.float32, rng)
    options = {"reduction": "none", "backend": backend, "label_smoothing": 0.05, "z_loss": 1e-4}
    loss, grad = fx.cross_entropy_with_grad(x, y, **options)
    np.testing.assert_array_equal(fx.cross_entropy(x, y, **options), loss)
    out = np.full_like(x, np.nan)
    np.testing.assert_array_equal(fx.cross_entropy_with_grad(x, y, out=out, **options)[0], loss)
    np.testing.assert_array_equal(out, grad)
    in_place = x.copy()
    np.testing.assert_array_equal(fx.cross_entropy_with_grad(in_place, y, out=in_place, **options)[0], loss)
    np.testing.assert_array_equal(in_place, grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_long_row_statistics(backend, dtype):
    """lse, entropy (merged with its own chunk formula) and accuracy against the reference."""
    n_classes = 5000
    rng = np.random.default_rng(5000)
    x, y = long_rows(n_classes, dtype, rng)
    finite = np.isfinite(x).all(axis=1)
    x, y = x[finite], y[finite]  # (the specials' statistics are NaN/inf on both sides)
    options = {"z_loss": 1e-3, "softcap": 20.0, "label_smoothing": 0.1}
    loss, grad, stats = fx.cross_entropy_with_grad(x, y, backend=backend, return_stats=True, **options)
    ref_loss, ref_grad, ref = _reference.cross_entropy(x.astype(np.float64), y, return_stats=True, **options)
    check(loss, ref_loss, dtype, "loss")
    check(grad, ref_grad, dtype, "gradient")
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(stats.lse, ref["lse"], rtol=rtol)
    np.testing.assert_allclose(stats.entropy, ref["entropy"], rtol=rtol, atol=rtol)
    assert stats.accuracy == pytest.approx(ref["accuracy"])
    np.testing.assert_allclose(stats.z_loss, ref["z_loss"], rtol=rtol)


@pytest.mark.skipif(kernels is None, reason="numba's kernels did not load")
@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_long_rows_16bit_words_are_the_float32_gradient_rounded(storage):
    """16-bit logits read natively on long rows: the float32 kernel's gradient, rounded."""
    dtype = np.dtype(np.float16) if storage == "float16" else np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    rng = np.random.default_rng(6000)
    x, y = long_rows(4113, np.float32, rng)
    x = x.astype(dtype)
    for options in ({}, {"label_smoothing": 0.1}):
        loss, grad = fx.cross_entropy_with_grad(x, y, reduction="none", backend="numba", **options)
        wide = x.astype(np.float32)
        loss32, grad32 = fx.cross_entropy_with_grad(wide, y, reduction="none", backend="numba", **options)
        expected = grad32.astype(dtype)
        nan = np.isnan(grad32)  # (a NaN is written as torch's 0x7FC0, whatever its sign)
        np.testing.assert_array_equal(np.isnan(grad.astype(np.float32)), nan)
        np.testing.assert_array_equal(grad.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
        np.testing.assert_array_equal(loss.astype(np.float32), loss32.astype(dtype).astype(np.float32))
