"""The dtype / memory-layout matrix against the float64 reference, input immutability,
``out=`` (also in place), thread-count invariance, accuracy on a large input, and the
types of what is returned."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close
from conftest import reference_nd as reference

import fastxent as fx
from fastxent import _reference

DTYPES = (np.float16, np.float32, np.float64)
REDUCTIONS = ("mean", "sum", "none")


# --- helpers -------------------------------------------------------------------------


def make_inputs(shape, dtype, kind, seed=0):
    """Logits of ``shape`` (values ~N(0, 3)) and a target: class indices (int64, some rows
    ignored) or probabilities (rows of a Dirichlet, in the logits' dtype)."""
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal(shape)).astype(dtype)
    n_classes = shape[-1]
    if kind == "index":
        y = rng.integers(0, n_classes, shape[:-1])
        y = np.where(rng.random(shape[:-1]) < 0.2, -100, y)
        return x, y
    t = rng.dirichlet(np.ones(n_classes), size=shape[:-1]).astype(dtype)
    return x, t


OPTION_SETS = {
    "plain": {},
    "options": {"weight": np.array([0.5, 2.0, 1.0, 0.0, 3.0, 1.5, 0.25]), "label_smoothing": 0.1},
}


def _options(name, n_classes):
    opts = dict(OPTION_SETS[name])
    if "weight" in opts:
        opts["weight"] = opts["weight"][:n_classes]
    return opts


def _store(a, layout, tmp_path, name="array"):
    """The values of ``a`` (n, C) in the given memory layout (same dtype, same values)."""
    if layout == "C":
        return np.array(a, order="C", copy=True)
    if layout == "F":
        out = np.array(a, order="F", copy=True)
        assert out.flags.f_contiguous and (a.ndim < 2 or min(a.shape) < 2 or not out.flags.c_contiguous)
        return out
    if layout == "strided":  # every other row, every third column of a bigger array
        big = np.full((2 * a.shape[0] + 1, 3 * a.shape[1] + 2), np.nan, a.dtype)
        view = big[1::2, 2::3][: a.shape[0], : a.shape[1]]
        view[...] = a
        assert not view.flags.c_contiguous and not view.flags.f_contiguous
        return view
    if layout == "negative":
        view = a[::-1, ::-1].copy()[::-1, ::-1]
        assert view.strides[0] < 0 and view.strides[1] < 0
        return view
    if layout == "readonly":
        out = a.copy()
        out.flags.writeable = False
        return out
    if layout == "memmap":
        path = tmp_path / f"{name}.bin"
        mm = np.memmap(path, a.dtype, "w+", shape=a.shape)
        mm[...] = a
        mm.flush()
        del mm
        return np.memmap(path, a.dtype, "r", shape=a.shape)  # read-only memmap
    if layout == "byteswapped":
        out = a.astype(a.dtype.newbyteorder())
        assert not out.dtype.isnative
        return out
    raise AssertionError(layout)


LAYOUTS = ("C", "F", "strided", "negative", "readonly", "memmap", "byteswapped")


def _check_type(loss, grad, x_dtype, batch_shape, reduction, logits_shape):
    value_type = np.dtype(x_dtype).type
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.shape == batch_shape and loss.dtype.type is value_type
    else:
        assert isinstance(loss, np.generic) and loss.dtype.type is value_type
    if grad is not None:
        assert isinstance(grad, np.ndarray) and grad.shape == logits_shape and grad.dtype.type is value_type


# --- the dtype x layout matrix -----------------------------------------------------------


@pytest.mark.parametrize("options", sorted(OPTION_SETS))
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_matches_reference(backend, dtype, layout, kind, options, tmp_path):
    x0, target = make_inputs((13, 7), dtype, kind)
    x = _store(x0, layout, tmp_path, "logits")
    if kind == "probability":  # the target in the same layout
        target = _store(target, layout, tmp_path, "target")
    opts = _options(options, 7)
    x_before, t_before = np.array(x).tobytes(), np.array(target).tobytes()
    for reduction in REDUCTIONS:
        expected_loss, expected_grad = reference(x0, target, reduction=reduction, **opts)
        loss, grad = fx.cross_entropy_with_grad(x, target, reduction=reduction, backend=backend, **opts)
        _check_type(loss, grad, dtype, (13,), reduction, (13, 7))
        assert_close(loss, expected_loss, dtype, err_msg=f"loss, {reduction}")
        assert_close(grad, expected_grad, dtype, err_msg=f"grad, {reduction}")
        assert_close(fx.cross_entropy(x, target, reduction=reduction, backend=backend, **opts), expected_loss, dtype)
        assert_close(
            fx.cross_entropy_grad(x, target, reduction=reduction, backend=backend, **opts), expected_grad, dtype
        )
    log_p = fx.log_softmax(x, backend=backend)
    p = fx.softmax(x, backend=backend)
    lse = fx.logsumexp(x, backend=backend)
    assert log_p.dtype.type is p.dtype.type is lse.dtype.type is np.dtype(dtype).type
    assert_close(log_p, _reference.log_softmax(x0), dtype)
    assert_close(p, np.exp(_reference.log_softmax(x0)), dtype)
    assert_close(lse, _reference.logsumexp(x0), dtype)
    assert np.array(x).tobytes() == x_before, "logits modified"
    assert np.array(target).tobytes() == t_before, "target modified"


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_python_lists(backend, kind):
    x0, target = make_inputs((5, 4), np.float64, kind)
    w = [1.0, 2.0, 0.5, 1.0]
    for reduction in REDUCTIONS:
        loss, grad = fx.cross_entropy_with_grad(
            x0.tolist(), target.tolist(), weight=w, reduction=reduction, backend=backend
        )
        _check_type(loss, grad, np.float64, (5,), reduction, (5, 4))
        expected_loss, expected_grad = reference(x0, target, weight=np.array(w), reduction=reduction)
        assert_close(loss, expected_loss, np.float64)
        assert_close(grad, expected_grad, np.float64)
    assert_close(fx.softmax(x0.tolist(), backend=backend), np.exp(_reference.log_softmax(x0)), np.float64)
    assert_close(fx.logsumexp(x0.tolist(), backend=backend), _reference.logsumexp(x0), np.float64)


@pytest.mark.parametrize(
    "make_target",
    [
        lambda y: y.astype(np.int32),
        lambda y: y.astype(np.int16),
        lambda y: y.astype(">i8"),  # byte-swapped
        lambda y: np.repeat(y, 3)[::3],  # strided
        lambda y: y[::-1].copy()[::-1],  # negative stride
        lambda y: np.asarray(y).tolist(),
        lambda y: np.require(y, requirements="C").view(),
    ],
    ids=["int32", "int16", "byteswapped", "strided", "negative", "list", "view"],
)
def test_index_target_layouts(backend, make_target):
    x, y = make_inputs((9, 6), np.float32, "index", seed=3)
    y = np.where(y < 0, 5, y)  # no ignored rows: -100 does not fit every dtype above
    target = make_target(y)
    expected_loss, expected_grad = reference(x, y, reduction="sum")
    loss, grad = fx.cross_entropy_with_grad(x, target, reduction="sum", backend=backend)
    assert_close(loss, expected_loss, np.float32)
    assert_close(grad, expected_grad, np.float32)


@pytest.mark.parametrize("layout", ["strided", "negative", "byteswapped", "readonly", "list", "float32", "int"])
def test_weight_layouts(backend, layout):
    x, y = make_inputs((9, 6), np.float64, "index", seed=4)
    w0 = np.array([1.0, 2.0, 3.0, 0.0, 0.5, 4.0])
    if layout == "list":
        w = w0.tolist()
    elif layout == "float32":
        w = w0.astype(np.float32)
    elif layout == "int":
        w0 = np.array([1, 2, 3, 0, 5, 4])
        w = w0
    elif layout == "strided":
        w = np.repeat(w0, 2)[::2]
    elif layout == "negative":
        w = w0[::-1].copy()[::-1]
    elif layout == "byteswapped":
        w = w0.astype(">f8")
    else:
        w = w0.copy()
        w.flags.writeable = False
    expected_loss, expected_grad = reference(x, y, weight=w0, label_smoothing=0.2)
    loss, grad = fx.cross_entropy_with_grad(x, y, weight=w, label_smoothing=0.2, backend=backend)
    assert_close(loss, expected_loss, np.float64)
    assert_close(grad, expected_grad, np.float64)


# --- float16 -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float16_is_computed_in_float32(backend, kind, reduction):
    """float16 logits give the float32 computation on the same values, rounded to float16."""
    x16, target = make_inputs((50, 11), np.float16, kind, seed=5)
    weight = np.linspace(0.5, 2.0, 11)
    opts = dict(weight=weight, reduction=reduction, label_smoothing=0.05, backend=backend)
    loss16, grad16 = fx.cross_entropy_with_grad(x16, target, **opts)
    loss32, grad32 = fx.cross_entropy_with_grad(x16.astype(np.float32), target, **opts)
    _check_type(loss16, grad16, np.float16, (50,), reduction, (50, 11))
    np.testing.assert_array_equal(grad16, grad32.astype(np.float16))  # the same float32 numbers, rounded
    # the loss is rounded once from float64 (float16) or via float32: within one float16 ulp
    np.testing.assert_array_less(
        np.abs(np.float64(loss16) - np.float64(loss32)), np.spacing(np.abs(np.float16(loss32))) + 1e-30
    )
    expected_loss, expected_grad = reference(x16, target, **{k: v for k, v in opts.items() if k != "backend"})
    assert_close(loss16, expected_loss, np.float16)
    assert_close(grad16, expected_grad, np.float16)


def test_float16_softmax_family(backend):
    x16, _ = make_inputs((20, 9), np.float16, "index", seed=6)
    x32 = x16.astype(np.float32)
    for name in ("log_softmax", "softmax"):
        r16 = getattr(fx, name)(x16, backend=backend)
        r32 = getattr(fx, name)(x32, backend=backend)
        assert r16.dtype == np.float16
        np.testing.assert_array_equal(r16, r32.astype(np.float16))
    lse = fx.logsumexp(x16, backend=backend)
    assert lse.dtype == np.float16
    np.testing.assert_array_equal(lse, fx.logsumexp(x32, backend=backend).astype(np.float16))


# --- shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", [np.array(2), np.int64(2), 2, np.uint8(2), np.array(-100)])
def test_1d_logits_0d_target(backend, dtype, target):
    x = np.array([0.5, -1.0, 2.0, 0.0], dtype)
    for reduction in REDUCTIONS:
        loss, grad = fx.cross_entropy_with_grad(x, target, reduction=reduction, backend=backend)
        expected_loss, expected_grad = reference(x[None], np.reshape(target, 1), reduction=reduction)
        _check_type(loss, grad, dtype, (), reduction, (4,))
        assert_close(loss, np.reshape(expected_loss, ()) if reduction == "none" else expected_loss, dtype)
        assert_close(grad, expected_grad[0], dtype)


def test_1d_logits_probability_target(backend):
    x = np.array([0.5, -1.0, 2.0, 0.0])
    t = np.array([0.1, 0.2, 0.3, 0.4])
    loss, grad = fx.cross_entropy_with_grad(x, t, reduction="none", backend=backend)
    expected_loss, expected_grad = reference(x[None], t[None], reduction="none")
    assert loss.shape == () and grad.shape == (4,)
    assert_close(loss, expected_loss[0], np.float64)
    assert_close(grad, expected_grad[0], np.float64)
    assert fx.logsumexp(x, backend=backend).shape == ()


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 1, 3, 4), (1, 1, 1, 6), (3, 5)])
def test_nd_logits(backend, kind, shape):
    x, target = make_inputs(shape, np.float64, kind, seed=7)
    opts = dict(weight=np.linspace(0.5, 1.5, shape[-1]), label_smoothing=0.3)
    for reduction in REDUCTIONS:
        loss, grad = fx.cross_entropy_with_grad(x, target, reduction=reduction, backend=backend, **opts)
        _check_type(loss, grad, np.float64, shape[:-1], reduction, shape)
        expected_loss, expected_grad = reference(x, target, reduction=reduction, **opts)
        assert_close(loss, expected_loss, np.float64)
        assert_close(grad, expected_grad, np.float64)
        # the same as the flattened (N, C) problem
        flat_loss, flat_grad = fx.cross_entropy_with_grad(
            x.reshape(-1, shape[-1]),
            target.reshape(-1, shape[-1]) if kind == "probability" else target.reshape(-1),
            reduction=reduction,
            backend=backend,
            **opts,
        )
        np.testing.assert_array_equal(np.reshape(loss, -1), np.reshape(flat_loss, -1))
        np.testing.assert_array_equal(grad.reshape(-1, shape[-1]), flat_grad)
    assert fx.logsumexp(x, backend=backend).shape == shape[:-1]
    assert fx.softmax(x, backend=backend).shape == shape


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0, 5), (0, 2, 1)])
def test_no_rows(backend, dtype, kind, shape):
    x = np.zeros(shape, dtype)
    target = np.zeros(shape[:-1], np.int64) if kind == "index" else np.zeros(shape, dtype)
    for reduction in REDUCTIONS:
        loss, grad = fx.cross_entropy_with_grad(x, target, reduction=reduction, backend=backend)
        _check_type(loss, grad, dtype, shape[:-1], reduction, shape)
        if reduction == "mean":
            assert np.isnan(loss)
        elif reduction == "sum":
            assert loss == 0
        else:
            assert loss.size == 0
        assert grad.size == 0
        assert fx.cross_entropy_grad(x, target, reduction=reduction, out=np.empty_like(x), backend=backend).size == 0
    assert fx.softmax(x, backend=backend).shape == shape
    assert fx.log_softmax(x, backend=backend).shape == shape
    assert fx.logsumexp(x, backend=backend).shape == shape[:-1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_class(backend, dtype):
    """C = 1: the softmax is 1, every loss and gradient is 0 (whatever the options)."""
    x = np.array([[3.0], [-2.0], [0.0], [50.0]], dtype)
    y = np.array([0, 0, -100, 0])
    t = np.array([[1.0], [0.5], [2.0], [0.0]], dtype)
    for target in (y, t):
        for reduction in REDUCTIONS:
            for eps in (0.0, 0.5):
                loss, grad = fx.cross_entropy_with_grad(
                    x, target, weight=[2.0], reduction=reduction, label_smoothing=eps, backend=backend
                )
                expected_loss, expected_grad = reference(
                    x, target, weight=[2.0], reduction=reduction, label_smoothing=eps
                )
                assert_close(loss, expected_loss, dtype)
                assert np.all(np.asarray(loss) == 0)  # lse = m + log(exp(0)) = x exactly
                assert_close(grad, expected_grad, dtype)
                assert_close(grad, np.zeros_like(x), dtype)
    np.testing.assert_array_equal(fx.softmax(x, backend=backend), np.ones_like(x))
    np.testing.assert_array_equal(fx.log_softmax(x, backend=backend), np.zeros_like(x))
    np.testing.assert_array_equal(fx.logsumexp(x, backend=backend), x[:, 0])


# --- inputs are never modified ------------------------------------------------------------


FUNCTIONS = ("cross_entropy", "cross_entropy_grad", "cross_entropy_with_grad", "log_softmax", "softmax", "logsumexp")


@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative"])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("function", FUNCTIONS)
def test_inputs_unchanged(backend, function, dtype, kind, layout, tmp_path):
    x0, target0 = make_inputs((12, 7), dtype, kind, seed=8)
    x0[0, 3] = -np.inf  # masked class
    x0[5, :] = np.nan  # a NaN row
    x = _store(x0, layout, tmp_path, "logits")
    target = _store(target0, layout, tmp_path, "target") if kind == "probability" else target0[::-1].copy()[::-1]
    weight = np.linspace(0.1, 2.0, 7)
    copies = [np.array(a, copy=True) for a in (x, target, weight)]
    f = getattr(fx, function)
    if function.startswith("cross_entropy"):
        for reduction in REDUCTIONS:
            f(x, target, weight=weight, reduction=reduction, label_smoothing=0.1, backend=backend)
            f(x, target, reduction=reduction, backend=backend)
    else:
        f(x, backend=backend)
    for name, a, copy in zip(("logits", "target", "weight"), (x, target, weight), copies, strict=True):
        assert a.dtype == copy.dtype and a.shape == copy.shape
        assert np.array(a).tobytes() == copy.tobytes(), f"{name} was modified by {function}"


# --- out= ----------------------------------------------------------------------------------


@pytest.mark.parametrize("out_layout", ["C", "F", "strided", "memmap"])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_matches_fresh_allocation(backend, dtype, kind, out_layout, tmp_path):
    x, target = make_inputs((10, 6), dtype, kind, seed=9)
    for reduction in REDUCTIONS:
        opts = dict(reduction=reduction, weight=np.arange(1.0, 7.0), label_smoothing=0.2, backend=backend)
        fresh_loss, fresh_grad = fx.cross_entropy_with_grad(x, target, **opts)
        if out_layout == "memmap":
            out = np.memmap(tmp_path / f"out-{reduction}.bin", dtype, "w+", shape=x.shape)
        else:
            out = _store(np.full(x.shape, 7.0, dtype), out_layout, tmp_path)
        loss, grad = fx.cross_entropy_with_grad(x, target, out=out, **opts)
        assert grad is out
        np.testing.assert_array_equal(out, fresh_grad)
        np.testing.assert_array_equal(loss, fresh_loss)
        out[...] = 7
        assert fx.cross_entropy_grad(x, target, out=out, **opts) is out
        np.testing.assert_array_equal(out, fresh_grad)


@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative", "memmap-w+"])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_out_is_logits_in_place(backend, dtype, kind, layout, tmp_path):
    x0, target = make_inputs((10, 6), dtype, kind, seed=10)
    for function in ("cross_entropy_grad", "cross_entropy_with_grad"):
        for reduction in REDUCTIONS:
            opts = dict(reduction=reduction, weight=np.arange(1.0, 7.0), label_smoothing=0.2, backend=backend)
            fresh_loss, fresh_grad = fx.cross_entropy_with_grad(x0, target, **opts)
            if layout == "memmap-w+":
                x = np.memmap(tmp_path / f"x-{function}-{reduction}.bin", dtype, "w+", shape=x0.shape)
                x[...] = x0
                base = x
            elif layout == "strided":  # check that the rest of the bigger array is untouched
                base = np.full((2 * x0.shape[0], 3 * x0.shape[1]), 5.0, dtype)
                x = base[::2, 1::3]
                x[...] = x0
            else:
                x = _store(x0, layout, tmp_path)
                base = x
            outside = np.ones(base.shape, bool)
            if layout == "strided":
                outside[::2, 1::3] = False
            result = getattr(fx, function)(x, target, out=x, **opts)
            grad = result[1] if function == "cross_entropy_with_grad" else result
            assert grad is x
            assert_close(x, fresh_grad, dtype, err_msg=f"{function} {reduction}")
            assert_close(x, reference(x0, target, **{k: v for k, v in opts.items() if k != "backend"})[1], dtype)
            if layout == "strided":
                assert np.all(base[outside] == 5.0), "in place wrote outside the logits' view"
            if function == "cross_entropy_with_grad":
                assert_close(result[0], fresh_loss, dtype)


def test_out_same_view_is_in_place(backend):
    """A different ndarray object viewing the same memory the same way counts as in place."""
    x0, y = make_inputs((8, 5), np.float32, "index", seed=11)
    fresh = fx.cross_entropy_grad(x0, y, backend=backend)
    x = x0.copy()
    out = x[...]
    assert out is not x
    assert fx.cross_entropy_grad(x, y, out=out, backend=backend) is out
    assert_close(x, fresh, np.float32)


@pytest.mark.parametrize("layout", ["C", "F", "strided", "negative"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_row_functions_out(backend, name, dtype, layout, tmp_path):
    f = getattr(fx, name)
    x0, _ = make_inputs((10, 6), dtype, "index", seed=12)
    fresh = f(x0, backend=backend)
    expected = _reference.log_softmax(x0)
    expected = np.exp(expected) if name == "softmax" else expected
    assert_close(fresh, expected, dtype)
    out = _store(np.zeros_like(x0), layout, tmp_path, "out")
    assert f(x0, out=out, backend=backend) is out
    np.testing.assert_array_equal(out, fresh)
    x = _store(x0, layout, tmp_path, "logits")  # in place
    assert f(x, out=x, backend=backend) is x
    assert_close(x, fresh, dtype)


# --- loss-only calls -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_only_equals_with_grad(backend, dtype, kind):
    x, target = make_inputs((300, 70), dtype, kind, seed=13)
    for reduction in REDUCTIONS:
        for opts in ({}, {"weight": np.linspace(0, 2, 70), "label_smoothing": 0.3}):
            loss_only = fx.cross_entropy(x, target, reduction=reduction, backend=backend, **opts)
            loss, _ = fx.cross_entropy_with_grad(x, target, reduction=reduction, backend=backend, **opts)
            assert_close(loss_only, loss, dtype, err_msg=f"{reduction} {sorted(opts)}")
            assert np.asarray(loss_only).dtype == np.asarray(loss).dtype


# --- thread-count invariance ------------------------------------------------------------


@pytest.fixture
def restore_threads():
    before = fx.get_num_threads()
    yield before
    fx.set_num_threads(before)


def _thread_counts() -> list[int]:
    """1, 2 and the largest count the pool accepts (skips when it has a single thread)."""
    counts = [1]
    for n in (2, 3, 4, 8, 16, 32, 64):
        try:
            fx.set_num_threads(n)
        except ValueError:
            break
        counts.append(n)
    if len(counts) < 2:
        pytest.skip("needs a pool of at least 2 threads")
    return sorted({1, 2, counts[-1]})


# float16 "sum" of 20,000 rows overflows float16 to inf (and numpy warns on the cast)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_thread_count_invariance(backend, dtype, kind, restore_threads):
    counts = _thread_counts()
    x, target = make_inputs((20_000, 33), dtype, kind, seed=14)
    opts_list = [{}, {"weight": np.linspace(0.5, 2.0, 33), "label_smoothing": 0.1}]
    results = {}
    for threads in counts:
        fx.set_num_threads(threads)
        assert fx.get_num_threads() == threads
        results[threads] = [
            (
                fx.cross_entropy_with_grad(x, target, reduction=reduction, backend=backend, **opts),
                fx.cross_entropy(x, target, reduction=reduction, backend=backend, **opts),
            )
            for reduction in REDUCTIONS
            for opts in opts_list
        ] + [(fx.softmax(x, backend=backend), fx.logsumexp(x, backend=backend))]
    one = results[1]
    for threads, many in results.items():
        for ((loss_a, grad_a), only_a), ((loss_b, grad_b), only_b) in zip(one[:-1], many[:-1], strict=True):
            assert np.array_equal(loss_a, loss_b, equal_nan=True), threads
            assert np.array_equal(grad_a, grad_b), threads
            assert np.array_equal(only_a, only_b, equal_nan=True), threads
        assert np.array_equal(one[-1][0], many[-1][0]) and np.array_equal(one[-1][1], many[-1][1])


# --- accuracy on a large input -----------------------------------------------------------


@pytest.fixture(scope="module")
def million_by_four():
    rng = np.random.default_rng(15)
    x = (4 * rng.standard_normal((1_000_000, 4))).astype(np.float32)
    y = rng.integers(0, 4, 1_000_000)
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accuracy_million_rows_float32(backend, million_by_four, reduction):
    x, y = million_by_four
    expected, _ = _reference.cross_entropy(x.astype(np.float64), y, reduction=reduction)
    loss = fx.cross_entropy(x, y, reduction=reduction, backend=backend)
    loss_fused, _ = fx.cross_entropy_with_grad(x, y, reduction=reduction, backend=backend)
    assert loss.dtype == np.float32
    np.testing.assert_allclose(np.float64(loss), expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.float64(loss_fused), expected, rtol=1e-6, atol=0)
    t = np.eye(4, dtype=np.float32)[y]
    np.testing.assert_allclose(
        np.float64(fx.cross_entropy(x, t, reduction=reduction, backend=backend)), expected, rtol=1e-6, atol=0
    )


# --- returned types ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("shape", [(6, 4), (2, 3, 4), (4,)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_returned_types(backend, dtype, shape, kind):
    x, target = make_inputs(shape, dtype, kind, seed=16)
    for reduction in ("mean", "sum"):
        loss = fx.cross_entropy(x, target, reduction=reduction, backend=backend)
        assert isinstance(loss, np.generic) and not isinstance(loss, np.ndarray)
        assert type(loss) is np.dtype(dtype).type and loss.dtype == dtype
        loss, grad = fx.cross_entropy_with_grad(x, target, reduction=reduction, backend=backend)
        assert type(loss) is np.dtype(dtype).type
        assert type(grad) is np.ndarray and grad.dtype == dtype and grad.shape == shape
    loss = fx.cross_entropy(x, target, reduction="none", backend=backend)
    assert type(loss) is np.ndarray and loss.shape == shape[:-1] and loss.dtype == dtype
    grad = fx.cross_entropy_grad(x, target, reduction="none", backend=backend)
    assert type(grad) is np.ndarray and grad.shape == shape and grad.dtype == dtype
    for name in ("log_softmax", "softmax"):
        r = getattr(fx, name)(x, backend=backend)
        assert type(r) is np.ndarray and r.shape == shape and r.dtype == dtype
    lse = fx.logsumexp(x, backend=backend)
    assert lse.shape == shape[:-1] and lse.dtype == dtype
