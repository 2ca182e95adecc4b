"""16-bit logits (bfloat16, float16) read and written as 16-bit words by the compiled kernels.

The numba kernels widen each word to float32 in registers, compute exactly as the float32
kernel does on the widened logits, and round the gradient to the nearest even word. So the
gradient's words must equal the float32 kernel's gradient of ``x.astype(float32)`` rounded
to the 16-bit dtype, bit for bit where both run rows one at a time (within one word with
a scale or cap, whose products LLVM may fuse differently). The Cython kernels widen a block
of rows into float32 scratch and run the float32 block function on it: bit for bit in every
layout. Neither allocates an N x C float32 array.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import fastxent as fx
from fastxent import _reference

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [BF16, np.dtype(np.float16)]
numba_only = pytest.mark.skipif("numba" not in fx.available_backends(), reason="needs the numba backend")
OPTIONS = [
    {},
    {"weight": True, "ignore_index": 2, "label_smoothing": 0.1},
    {"z_loss": 1e-2, "softcap": 4.0, "logit_scale": 1.3},
]


def _problem(rng, shape, n_classes, dtype, options):
    x = (rng.normal(size=(*shape, n_classes)) * 3).astype(dtype)
    y = rng.integers(0, n_classes, size=shape)
    options = dict(options)
    if "ignore_index" in options:
        y.reshape(-1)[::5] = options["ignore_index"]
    if options.pop("weight", False):
        options["weight"] = rng.uniform(0.5, 2.0, n_classes)
    return x, y, options


@numba_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "weight+ignore+smooth", "z+cap+scale"])
@pytest.mark.parametrize("n_classes", [7, 32, 200, 5000], ids=["lanes", "lanes-32", "rows", "chunked-rows"])
def test_words_are_the_float32_gradient_rounded(rng, dtype, reduction, options, n_classes):
    # C <= SMALL_C: without a scale or cap both run the lanes layout (the 16-bit rows widened
    # into float32 rows first), with them both run rows; C = 200 > SMALL_C: both run rows one
    # at a time (the same sums); C = 5000 >= LONG_ROW: both go by chunks (plain 16-bit rows
    # keep one chunk of x')
    x, y, options = _problem(rng, (3, 70), n_classes, dtype, options)
    loss, grad = fx.cross_entropy_with_grad(x, y, reduction=reduction, backend="numba", **options)
    loss32, grad32 = fx.cross_entropy_with_grad(
        x.astype(np.float32), y, reduction=reduction, backend="numba", **options
    )
    assert grad.dtype == dtype and np.asarray(loss).dtype == dtype
    if "softcap" in options:  # the chain rule's products may contract into FMAs differently
        words, expected = grad.view(np.int16).astype(np.int32), grad32.astype(dtype).view(np.int16).astype(np.int32)
        assert np.abs(words - expected).max() <= 1  # (same signs here: one word apart = one ulp)
    else:
        np.testing.assert_array_equal(grad.view(np.uint16), grad32.astype(dtype).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(loss).view(np.uint16), np.asarray(loss32).astype(dtype).view(np.uint16))
    # out= and in place: the same words; loss only: the same loss
    out = np.empty_like(x)
    _, grad_out = fx.cross_entropy_with_grad(x, y, reduction=reduction, backend="numba", out=out, **options)
    in_place = x.copy()
    fx.cross_entropy_with_grad(in_place, y, reduction=reduction, backend="numba", out=in_place, **options)
    assert grad_out is out
    np.testing.assert_array_equal(out.view(np.uint16), grad.view(np.uint16))
    np.testing.assert_array_equal(in_place.view(np.uint16), grad.view(np.uint16))
    alone = fx.cross_entropy(x, y, reduction=reduction, backend="numba", **options)
    np.testing.assert_array_equal(np.asarray(alone).view(np.uint16), np.asarray(loss).view(np.uint16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_classes", [7, 1000])
def test_16bit_against_the_reference(backend, rng, dtype, n_classes):
    """Every backend (numba natively, the others through a float32 copy) within the 16-bit
    rounding of the float64 reference, stats included."""
    x, y, options = _problem(rng, (150,), n_classes, dtype, {"weight": True, "ignore_index": 2})
    options.update(z_loss=1e-3, softcap=5.0)
    loss, grad, stats = fx.cross_entropy_with_grad(x, y, backend=backend, return_stats=True, **options)
    ref_loss, ref_grad, ref_stats = _reference.cross_entropy(x.astype(np.float64), y, return_stats=True, **options)
    eps = float(np.finfo(dtype).eps) if dtype != BF16 else 2.0**-7
    np.testing.assert_allclose(float(loss), ref_loss, rtol=eps)
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=eps, atol=eps * np.abs(ref_grad).max())
    np.testing.assert_allclose(stats.lse, ref_stats["lse"], rtol=1e-5)  # float64, from float32 sums
    np.testing.assert_allclose(stats.entropy, ref_stats["entropy"], rtol=1e-4, atol=1e-5)


cython_only = pytest.mark.skipif("cython" not in fx.available_backends(), reason="needs the cython backend")
COMPILED = [pytest.param("numba", marks=numba_only), pytest.param("cython", marks=cython_only)]


@cython_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_classes", [7, 200, 40000], ids=["lanes", "rows", "one-row-blocks"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "weight+ignore+smooth", "z+cap+scale"])
def test_cython_words_are_its_float32_gradient_rounded_bit_for_bit(rng, dtype, n_classes, options):
    """The Cython kernels widen a block of words into float32 rows and run the float32 block
    function there: loss and gradient words equal its float32 results on the widened
    logits, rounded, bit for bit, in the lanes layout, the row layout and one-row blocks
    (C > BLOCK_ELEMENTS), with every option; out=, in place and loss only agree."""
    n = 70 if n_classes < 1000 else 5
    x, y, options = _problem(rng, (n,), n_classes, dtype, options)
    x[1, 3] = np.inf if "softcap" in options else x[1, 3]  # a capped inf: a finite x'
    for reduction in ("mean", "none"):
        loss, grad = fx.cross_entropy_with_grad(x, y, reduction=reduction, backend="cython", **options)
        loss32, grad32 = fx.cross_entropy_with_grad(
            x.astype(np.float32), y, reduction=reduction, backend="cython", **options
        )
        assert grad.dtype == dtype
        np.testing.assert_array_equal(grad.view(np.uint16), grad32.astype(dtype).view(np.uint16))
        np.testing.assert_array_equal(
            np.asarray(loss).view(np.uint16), np.asarray(loss32).astype(dtype).view(np.uint16)
        )
        out = np.empty_like(x)
        fx.cross_entropy_with_grad(x, y, reduction=reduction, backend="cython", out=out, **options)
        in_place = x.copy()
        fx.cross_entropy_with_grad(in_place, y, reduction=reduction, backend="cython", out=in_place, **options)
        np.testing.assert_array_equal(out.view(np.uint16), grad.view(np.uint16))
        np.testing.assert_array_equal(in_place.view(np.uint16), grad.view(np.uint16))
        alone = fx.cross_entropy(x, y, reduction=reduction, backend="cython", **options)
        np.testing.assert_array_equal(np.asarray(alone).view(np.uint16), np.asarray(loss).view(np.uint16))


@cython_only
def test_cython_word_conversions_match_numpy_and_ml_dtypes():
    """The extension's widening and rounding of 16-bit words: every word widens exactly;
    float32 values (ties, overflow, subnormals, inf) round to nearest even as NumPy's
    float16 and ml_dtypes' bfloat16; a NaN stays a NaN (bfloat16: 0x7FC0, as torch)."""
    from fastxent import _cy_backend
    from fastxent._spec import STORAGE_BF16, STORAGE_F16

    cy = _cy_backend.extension
    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(7)
    values = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 1e-8, 3.4e38], np.float32)
    for storage, dtype in ((STORAGE_BF16, BF16), (STORAGE_F16, np.dtype(np.float16))):
        widened = np.empty(words.size, np.float32)
        cy.widen_words_array(words, storage, widened)
        exact = words.view(dtype).astype(np.float32)
        same = (widened.view(np.uint32) == exact.view(np.uint32)) | (np.isnan(widened) & np.isnan(exact))
        assert same.all()
        between = (exact.view(np.uint32) + np.uint32(1 << (15 if storage == STORAGE_BF16 else 12))).view(np.float32)
        sample = np.concatenate([values, specials, between[np.isfinite(between)]])
        narrowed = np.empty(sample.size, np.uint16)
        cy.narrow_words_array(sample, storage, narrowed)
        with np.errstate(over="ignore"):
            expected = sample.astype(dtype)
        finite = ~np.isnan(sample)
        np.testing.assert_array_equal(narrowed[finite], expected[finite].view(np.uint16))
        assert np.isnan(narrowed[~finite].view(dtype).astype(np.float32)).all()
    nan_word = np.empty(1, np.uint16)
    cy.narrow_words_array(np.array([np.nan], np.float32), STORAGE_BF16, nan_word)
    assert nan_word[0] == 0x7FC0


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_float32_copy_of_the_logits(rng, dtype, compiled):
    """In place, a call allocates far less than the N x C float32 copy (N*C*4 bytes) the
    16-bit logits used to cost; NumPy's allocations are traced by tracemalloc."""
    n, n_classes = 2048, 2000
    x = rng.normal(size=(n, n_classes)).astype(dtype)
    y = rng.integers(0, n_classes, n)
    fx.cross_entropy_with_grad(x[:64].copy(), y[:64], backend=compiled, out=None)  # compile, scratch
    tracemalloc.start()
    try:
        fx.cross_entropy_with_grad(x, y, backend=compiled, out=x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * n_classes * 2 // 4, f"peak {peak} bytes for {n * n_classes} logits"


@numba_only
def test_word_conversions_match_numpy_and_ml_dtypes():
    """widen16/narrow16: every 16-bit word widens exactly; float32 values (ties, overflow,
    subnormals, inf, NaN) round to nearest even as NumPy's float16 and ml_dtypes' bfloat16."""
    import numba

    from fastxent._numba_kernels import narrow16, widen16
    from fastxent._spec import STORAGE_BF16, STORAGE_F16

    @numba.njit
    def widen_all(words, storage, out):
        for j in range(words.shape[0]):
            out[j] = widen16(words[j], storage)

    @numba.njit
    def narrow_all(values, storage, out):
        for j in range(values.shape[0]):
            out[j] = narrow16(values[j], storage)

    words = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = np.empty(words.size, np.float32)
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([bits.view(np.float32), widened[:0]])
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e-8, 3.4e38], np.float32)
    for storage, dtype in ((STORAGE_BF16, BF16), (STORAGE_F16, np.dtype(np.float16))):
        widen_all(words, storage, widened)
        np.testing.assert_array_equal(widened, words.view(dtype).astype(np.float32))
        ties = words.view(dtype).astype(np.float32)
        tie_bits = ties.view(np.uint32)
        between = (tie_bits + np.uint32(1 << (15 if storage == STORAGE_BF16 else 12))).view(np.float32)
        sample = np.concatenate([values, specials, between[np.isfinite(between)]])
        narrowed = np.empty(sample.size, np.uint16)
        narrow_all(sample, storage, narrowed)
        with np.errstate(over="ignore"):
            expected = sample.astype(dtype)
        finite = ~np.isnan(sample)
        np.testing.assert_array_equal(narrowed[finite], expected[finite].view(np.uint16))
        assert np.isnan(narrowed[~finite].view(dtype).astype(np.float32)).all()


@numba_only
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_torch_16bit_without_a_float32_copy(rng, dtype_name):
    """fastxent.torch with 16-bit logits and class indices: the same loss and gradient as the
    NumPy API on the same words (so as the float32 kernel, rounded), and torch's own within
    the 16-bit rounding."""
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    dtype = getattr(torch, dtype_name)
    x = torch.tensor(rng.normal(size=(64, 300)) * 2, dtype=torch.float32).to(dtype)
    y = torch.tensor(rng.integers(0, 300, 64))
    leaf = x.clone().requires_grad_()
    loss = fxt.cross_entropy(leaf, y, z_loss=1e-3)
    loss.backward()
    words = x.view(torch.int16).numpy().view(np.uint16).view(BF16 if dtype_name == "bfloat16" else np.float16)
    np_loss, np_grad = fx.cross_entropy_with_grad(words, y.numpy(), z_loss=1e-3, backend="numba")
    assert leaf.grad.dtype == dtype and loss.dtype == dtype
    np.testing.assert_array_equal(leaf.grad.view(torch.int16).numpy(), np_grad.view(np.int16))
    assert loss.view(torch.int16).item() == np.asarray(np_loss).view(np.int16)
    with torch.no_grad():
        alone = fxt.cross_entropy(x, y, z_loss=1e-3)
    assert alone.view(torch.int16).item() == loss.view(torch.int16).item()
    reference = torch.nn.functional.cross_entropy(x.float(), y)
    torch.testing.assert_close(fxt.cross_entropy(x, y).float(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("options", [{}, {"logit_scale": 0.5}, {"softcap": 10.0}], ids=["plain", "scale", "cap"])
@pytest.mark.parametrize("dtype", [*DTYPES, np.dtype(np.float32)], ids=str)
def test_an_infinite_class_weight_reaches_only_its_own_rows(backend, rng, dtype, options):
    """Without smoothing a class weight enters only the rows whose target it is (torch never
    reads the others): an inf weight of class 0 leaves every other row's gradient finite."""
    x, y, _ = _problem(rng, (40,), 300, dtype, {})
    y[y == 0] = 1
    weight = np.ones(300, np.float32)
    weight[0] = np.inf
    loss, grad = fx.cross_entropy_with_grad(x, y, weight=weight, reduction="sum", backend=backend, **options)
    ref_loss, ref_grad = _reference.cross_entropy(x.astype(np.float64), y, weight=weight, reduction="sum", **options)
    assert np.isfinite(grad.astype(np.float32)).all()
    eps = float(np.finfo(dtype).eps) if dtype != BF16 else 2.0**-7
    eps = max(eps, 1e-6)
    np.testing.assert_allclose(grad.astype(np.float64), ref_grad, rtol=eps, atol=eps * np.abs(ref_grad).max())
