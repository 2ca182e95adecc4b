"""fastxent.jax: cross_entropy under jax.jit, jax.grad and jax.vmap equals optax's
softmax_cross_entropy_with_integer_labels(...).mean() and its gradient; "none" through
jax.vjp with any cotangent; options reach the kernel."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy
fxj = pytest.importorskip("fastxent.jax")

import fastxent as fx  # noqa: E402


def optax_mean(x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


@pytest.fixture
def data(rng):
    x = jnp.asarray(rng.standard_normal((48, 70)).astype(np.float32) * 2)
    y = jnp.asarray(rng.integers(0, 70, 48))
    return x, y


def test_jit_and_grad_equal_optax(data):
    x, y = data
    np.testing.assert_allclose(jax.jit(fxj.cross_entropy)(x, y), optax_mean(x, y), rtol=1e-6)
    for grad in (jax.grad(fxj.cross_entropy), jax.jit(jax.grad(fxj.cross_entropy))):
        np.testing.assert_allclose(grad(x, y), jax.grad(optax_mean)(x, y), rtol=1e-5, atol=1e-8)


def test_vmap_over_a_batch_of_problems(data):
    x, y = data
    xs, ys = jnp.stack([x, 0.5 * x, -x]), jnp.stack([y, y, y[::-1]])
    np.testing.assert_allclose(jax.vmap(fxj.cross_entropy)(xs, ys), jax.vmap(optax_mean)(xs, ys), rtol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(fxj.cross_entropy))(xs, ys), jax.vmap(jax.grad(optax_mean))(xs, ys), rtol=1e-5, atol=1e-8
    )


def test_none_reduction_vjp_with_a_cotangent(data):
    x, y = data
    cotangent = jnp.linspace(0.0, 2.0, x.shape[0], dtype=jnp.float32)
    loss, vjp = jax.vjp(lambda v: fxj.cross_entropy(v, y, reduction="none"), x)
    ref_loss, ref_vjp = jax.vjp(lambda v: optax.softmax_cross_entropy_with_integer_labels(v, y), x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0], rtol=1e-5, atol=1e-8)


def test_options_reach_the_kernel(data, rng):
    x, y = data
    weight = rng.random(70) + 0.5
    options = {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
    got = jax.jit(lambda a, b: fxj.cross_entropy(a, b, **options))(x, y)
    expected, expected_grad = fx.cross_entropy_with_grad(np.asarray(x), np.asarray(y), **options)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    grad = jax.grad(lambda a: fxj.cross_entropy(a, y, **options))(x)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_the_kernels_run_on_xlas_buffers_through_the_ffi(data):
    """float32 logits go through the XLA FFI custom call (no pure_callback copies), and its
    loss and gradient are the NumPy API's, bit for bit (the same kernel, on XLA's memory)."""
    x, y = data
    hlo = jax.jit(jax.value_and_grad(fxj.cross_entropy)).lower(x, y).as_text()
    assert "fastxent_cross_entropy" in hlo and "pure_callback" not in hlo
    loss, grad = jax.jit(jax.value_and_grad(fxj.cross_entropy))(x, y)
    expected, expected_grad = fx.cross_entropy_with_grad(np.asarray(x), np.asarray(y))
    assert np.asarray(loss) == np.float32(expected)
    np.testing.assert_array_equal(np.asarray(grad), expected_grad)


def test_ffi_float64_n_d_none_and_int64_labels(rng):
    try:
        enable_x64 = jax.enable_x64  # (a context manager in newer JAX)
    except AttributeError:
        from jax.experimental import enable_x64
    with enable_x64(True):
        x = jnp.asarray(rng.standard_normal((3, 5, 40)))
        y = jnp.asarray(rng.integers(0, 40, (3, 5)), dtype=jnp.int64)
        loss, vjp = jax.vjp(lambda v: fxj.cross_entropy(v, y, reduction="none"), x)
        assert loss.dtype == jnp.float64 and loss.shape == (3, 5)
        expected, expected_grad = fx.cross_entropy_with_grad(np.asarray(x), np.asarray(y), reduction="none")
        np.testing.assert_array_equal(np.asarray(loss), expected)
        np.testing.assert_allclose(vjp(jnp.ones((3, 5)))[0], expected_grad, rtol=1e-12)


def test_ffi_reports_a_bad_label_by_row_and_value(data):
    """An error in the handler reaches the caller as JAX's error with fastxent's message
    (never a silent success with an unwritten result)."""
    x, y = data
    bad = y.at[3].set(99)
    with pytest.raises(Exception, match=r"target\[3\] = 99"):
        jax.block_until_ready(jax.jit(fxj.cross_entropy)(x, bad))
    with pytest.raises(Exception, match=r"target\[3\] = 99"):
        jax.block_until_ready(jax.jit(jax.grad(fxj.cross_entropy))(x, bad))


def test_other_dtypes_and_empty_batches_still_work(rng):
    """float16 logits take the pure_callback path; an empty batch gives NaN as the NumPy API."""
    x = jnp.asarray(rng.standard_normal((6, 9)).astype(np.float16))
    y = jnp.asarray(rng.integers(0, 9, 6))
    expected = fx.cross_entropy(np.asarray(x), np.asarray(y))
    np.testing.assert_allclose(float(jax.jit(fxj.cross_entropy)(x, y)), float(expected), rtol=1e-3)
    empty = jnp.zeros((0, 9), jnp.float32)
    assert np.isnan(float(jax.jit(fxj.cross_entropy)(empty, jnp.zeros((0,), jnp.int32))))


def test_the_gradient_written_over_the_logits_buffer_leaves_the_callers_logits(data):
    """The gradient's output aliases the logits operand (the kernel runs in place on it, so
    XLA allocates no second N x C buffer where the logits die, e.g. a matmul's output); XLA
    copies where the caller's logits live on, and they stay as they were."""
    x, y = data
    before = np.asarray(x).copy()
    for value_and_grad in (jax.value_and_grad(fxj.cross_entropy), jax.jit(jax.value_and_grad(fxj.cross_entropy))):
        loss, grad = value_and_grad(x, y)
        jax.block_until_ready(grad)
        np.testing.assert_array_equal(np.asarray(x), before)
        assert not np.array_equal(np.asarray(grad), before)
    weights = jnp.asarray(np.eye(70, dtype=np.float32))
    through_a_matmul = jax.jit(jax.grad(lambda w: fxj.cross_entropy(x @ w, y)))(weights)
    np.testing.assert_allclose(
        through_a_matmul, np.asarray(x).T @ np.asarray(jax.grad(fxj.cross_entropy)(x, y)), rtol=1e-5, atol=1e-6
    )


def test_the_handler_on_a_call_frame_built_here(rng):
    """fastxent.jax's FFI handler on a C call frame built with its own ctypes structs: the
    metadata query, a stage other than execute, separate logits and gradient buffers (XLA
    aliases them; the handler copies if it ever does not), and an error made through the
    frame's API table with fastxent's message."""
    import ctypes

    from fastxent import jax as fj

    def buffer(array, dtype_code):
        dims = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
        made = fj._Buffer(ctypes.sizeof(fj._Buffer), None, dtype_code, array.ctypes.data, array.ndim, dims)
        return made, dims

    x = rng.standard_normal((4, 6)).astype(np.float32)
    labels = np.array([0, 5, 2, 3], np.int32)
    loss, grad = np.zeros((), np.float32), np.zeros_like(x)
    kept = [buffer(x, 11), buffer(labels, 4), buffer(loss, 11), buffer(grad, 11)]
    pointers = [ctypes.cast(ctypes.pointer(b), ctypes.c_void_p) for b, _ in kept]
    args = (ctypes.c_void_p * 2)(pointers[0].value, pointers[1].value)
    rets = (ctypes.c_void_p * 2)(pointers[2].value, pointers[3].value)
    messages = []

    @fj._ERROR_CREATE
    def error_create(create_args):
        messages.append((create_args.contents.message.decode(), create_args.contents.errc))
        return 12345  # stands for an XLA_FFI_Error*

    api = fj._ApiHead(
        ctypes.sizeof(fj._ApiHead), None, fj._ApiVersion(), None, ctypes.cast(error_create, ctypes.c_void_p)
    )
    operands = [fj._Operands(ctypes.sizeof(fj._Operands), None, 2, None, items) for items in (args, rets)]
    frame = fj._CallFrame(ctypes.sizeof(fj._CallFrame), None, ctypes.addressof(api), None, fj._STAGE_EXECUTE)
    frame.args, frame.rets = operands
    options = fj._Static((("ignore_index", -100), ("reduction", "mean")))
    handler = fj._make_handler(options, True)

    assert handler(ctypes.byref(frame)) is None
    expected, expected_grad = fx.cross_entropy_with_grad(x, labels)
    assert loss == np.float32(expected)
    np.testing.assert_array_equal(grad, expected_grad)

    frame.stage = 0  # instantiate: nothing is read or written
    grad[...] = 7.0
    assert handler(ctypes.byref(frame)) is None and (grad == 7.0).all()

    metadata = fj._Metadata(ctypes.sizeof(fj._Metadata))
    extension = fj._MetadataExtension(
        fj._ExtensionBase(ctypes.sizeof(fj._MetadataExtension), 1, None), ctypes.pointer(metadata)
    )
    frame.extension_start = ctypes.cast(ctypes.pointer(extension), ctypes.POINTER(fj._ExtensionBase))
    assert handler(ctypes.byref(frame)) is None
    assert (metadata.api_version.major_version, metadata.api_version.minor_version) == fj._FFI_API_VERSION

    frame.extension_start, frame.stage = None, fj._STAGE_EXECUTE
    labels[1] = 6  # out of range
    assert handler(ctypes.byref(frame)) == 12345
    assert messages and "target[1] = 6" in messages[-1][0] and messages[-1][1] == fj._ERROR_INVALID_ARGUMENT
