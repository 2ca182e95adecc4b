"""Every bad input raises the documented exception with a message that says what is wrong,
for every backend, and nothing is written before the inputs are checked."""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastxent as fx
from fastxent import _dispatch

XENT_FUNCTIONS = {
    "cross_entropy": fx.cross_entropy,
    "cross_entropy_grad": fx.cross_entropy_grad,
    "cross_entropy_with_grad": fx.cross_entropy_with_grad,
}
GRAD_FUNCTIONS = {
    "cross_entropy_grad": fx.cross_entropy_grad,
    "cross_entropy_with_grad": fx.cross_entropy_with_grad,
}
ROW_FUNCTIONS = {"log_softmax": fx.log_softmax, "softmax": fx.softmax, "logsumexp": fx.logsumexp}


@pytest.fixture(params=sorted(XENT_FUNCTIONS))
def xent(request):
    """Each of the three cross-entropy entry points."""
    return XENT_FUNCTIONS[request.param]


@pytest.fixture(params=sorted(GRAD_FUNCTIONS))
def xent_grad(request):
    """The entry points that take ``out=``."""
    return GRAD_FUNCTIONS[request.param]


def _logits(shape=(4, 5), dtype=np.float64, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --- out-of-range class indices ------------------------------------------------------


@pytest.mark.parametrize(
    "target, ignore_index, row, value",
    [
        ([0, 1, 5, 7], -100, 2, 5),  # >= C: the FIRST offending row is named
        ([0, 4, 9, 1], -100, 1, 4),  # == C
        ([0, -1, 2, -5], -100, 1, -1),  # negative and not ignore_index
        ([0, -1, 2, -5], -1, 3, -5),  # -1 is ignored here, -5 is not
        ([-100, -100, -3, 0], -100, 2, -3),
        ([2, 2, 2, -100], 2, 3, -100),  # -100 is only the default ignore_index
    ],
)
def test_out_of_range_index(backend, xent, target, ignore_index, row, value):
    x = _logits((4, 4))
    y = np.array(target)
    with pytest.raises(fx.TargetOutOfRangeError, match=rf"target\[{row}\] = {value}\b") as info:
        xent(x, y, ignore_index=ignore_index, backend=backend)
    assert isinstance(info.value, IndexError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert "out of range" in message and "4" in message  # says why, and what C is
    assert str(ignore_index) in message


def test_target_out_of_range_error_is_index_and_value_error():
    assert issubclass(fx.TargetOutOfRangeError, IndexError)
    assert issubclass(fx.TargetOutOfRangeError, ValueError)


@pytest.mark.parametrize("index_dtype", ["int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"])
def test_out_of_range_index_any_integer_dtype(backend, index_dtype):
    x = _logits((3, 4))
    y = np.array([1, 0, 100], dtype=index_dtype)
    with pytest.raises(IndexError, match=r"target\[2\] = 100\b"):
        fx.cross_entropy_with_grad(x, y, backend=backend)


@pytest.mark.parametrize(
    "batch, bad_at",
    [((2, 3), (1, 2)), ((2, 3), (0, 0)), ((3, 1, 2), (2, 0, 1)), ((1, 5), (0, 4))],
)
def test_out_of_range_index_nd_names_the_index_tuple(backend, xent, batch, bad_at):
    x = _logits((*batch, 4))
    y = np.zeros(batch, dtype=np.int64)
    y[bad_at] = 9
    later = tuple(s - 1 for s in batch)
    if later != bad_at:
        y[later] = 11  # a later bad value is not the one reported
    position = ", ".join(str(j) for j in bad_at)
    with pytest.raises(IndexError, match=rf"target\[{re.escape(position)}\] = 9\b"):
        xent(x, y, backend=backend)


def test_out_of_range_index_0d_target(backend, xent):
    """1-D logits (C,) with a 0-d target: the value is named."""
    with pytest.raises(IndexError, match=r"= 7\b"):
        xent(_logits((4,)), np.array(7), backend=backend)
    with pytest.raises(IndexError, match=r"= -2\b"):
        xent(_logits((4,)), -2, backend=backend)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_out_of_range_uint64_huge(backend, xent, ignore_index):
    """2**64 - 1 must not wrap to -1 (which could even equal ignore_index)."""
    x = _logits((3, 4))
    y = np.array([0, 2**64 - 1, 1], dtype=np.uint64)
    with pytest.raises(IndexError, match=r"target\[1\] = 18446744073709551615\b"):
        xent(x, y, ignore_index=ignore_index, backend=backend)
    y = np.array([0, 1, 2**63], dtype=np.uint64)
    with pytest.raises(IndexError, match=r"target\[2\] = 9223372036854775808\b"):
        xent(x, y, ignore_index=ignore_index, backend=backend)


def test_out_of_range_checked_before_writing_out(backend, xent_grad):
    x = _logits((6, 5))
    y = np.array([0, 1, 2, 3, 4, 5])  # the last row is bad: rows before it must not be written
    out = np.full_like(x, 123.0)
    with pytest.raises(IndexError, match=r"target\[5\] = 5\b"):
        xent_grad(x, y, out=out, backend=backend)
    assert np.all(out == 123.0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_out_of_range_checked_before_writing_in_place(backend, xent_grad, dtype):
    x = _logits((6, 5), dtype)
    before = x.copy()
    y = np.array([0, 1, 2, 3, 4, -7])
    with pytest.raises(IndexError, match=r"target\[5\] = -7\b"):
        xent_grad(x, y, out=x, backend=backend)
    assert x.tobytes() == before.tobytes()


# --- dtypes of logits and target -------------------------------------------------------


@pytest.mark.parametrize(
    "logits",
    [
        np.zeros((2, 3), np.int64),
        np.zeros((2, 3), np.int32),
        np.zeros((2, 3), np.uint8),
        np.zeros((2, 3), np.bool_),
        np.zeros((2, 3), np.complex128),
        np.zeros((2, 3), np.complex64),
        np.zeros((2, 3), object),
        [[1, 2, 3], [4, 5, 6]],  # a list of ints is an integer array
        np.array([["a", "b", "c"]] * 2),
    ],
    ids=["int64", "int32", "uint8", "bool", "complex128", "complex64", "object", "int-list", "str"],
)
def test_non_floating_logits(backend, logits, xent):
    with pytest.raises(TypeError, match="float"):
        xent(logits, np.zeros(2, np.int64), backend=backend)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_, np.complex128, object])
@pytest.mark.parametrize("name", sorted(ROW_FUNCTIONS))
def test_non_floating_logits_row_functions(backend, name, dtype):
    with pytest.raises(TypeError, match="float"):
        ROW_FUNCTIONS[name](np.zeros((2, 3), dtype), backend=backend)


@pytest.mark.parametrize("index_dtype", [np.int64, np.int32, np.uint8, np.int8])
def test_integer_probability_target(backend, xent, index_dtype):
    """A target of the logits' shape is a probability target: it must be floating."""
    x = _logits((3, 4))
    t = np.zeros((3, 4), index_dtype)
    t[:, 0] = 1
    with pytest.raises(TypeError, match=re.escape(str(np.dtype(index_dtype)))):
        xent(x, t, backend=backend)


def test_integer_probability_target_1d(backend, xent):
    with pytest.raises(TypeError):
        xent(_logits((4,)), np.array([0, 1, 0, 0]), backend=backend)


@pytest.mark.parametrize("shape", [(3,), (3, 4)], ids=["index-shaped", "probability-shaped"])
def test_bool_target(backend, xent, shape):
    with pytest.raises(TypeError, match="bool"):
        xent(_logits((3, 4)), np.zeros(shape, np.bool_), backend=backend)


@pytest.mark.parametrize(
    "target",
    [np.zeros(3, np.complex128), np.zeros(3, object), np.array(["a", "b", "c"])],
    ids=["complex", "object", "str"],
)
def test_target_neither_integer_nor_floating(backend, xent, target):
    with pytest.raises(TypeError, match="target"):
        xent(_logits((3, 4)), target, backend=backend)


# --- shapes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logits_shape, target",
    [
        ((4, 5), np.zeros(3, np.int64)),
        ((4, 5), np.zeros(5, np.int64)),
        ((4, 5), np.zeros((4, 1), np.int64)),
        ((4, 5), np.zeros((1, 4), np.int64)),
        ((4, 5), np.array(0)),
        ((2, 3, 5), np.zeros(6, np.int64)),  # right size, wrong shape
        ((2, 3, 5), np.zeros((3, 2), np.int64)),
        ((5,), np.zeros(1, np.int64)),
        ((4, 5), np.zeros((4, 6))),
        ((4, 5), np.zeros((5, 4))),
        ((4, 5), np.zeros(20)),
        ((4, 5), np.zeros(4)),  # floating and index-shaped
        ((2, 3, 5), np.zeros((6, 5))),
    ],
)
def test_target_shape_mismatch(backend, xent, logits_shape, target):
    with pytest.raises(ValueError, match="shape") as info:
        xent(_logits(logits_shape), target, backend=backend)
    assert not isinstance(info.value, IndexError)  # not mistaken for an out-of-range index
    assert str(logits_shape[:-1]) in str(info.value) or str(logits_shape) in str(info.value)


@pytest.mark.parametrize("weight", [np.ones(4), np.ones(6), np.ones((5, 1)), np.ones((1, 5)), np.float64(1.0), []])
def test_weight_shape_mismatch(backend, xent, weight):
    with pytest.raises(ValueError, match=r"weight.*\(5,\)"):
        xent(_logits((3, 5)), np.array([0, 1, 2]), weight=weight, backend=backend)


def test_weight_shape_mismatch_probability(backend, xent):
    with pytest.raises(ValueError, match="weight"):
        xent(_logits((3, 5)), np.full((3, 5), 0.2), weight=np.ones(3), backend=backend)


@pytest.mark.parametrize("logits", [np.float64(1.0), np.array(2.0), 3.0], ids=["numpy-scalar", "0d-array", "float"])
def test_zero_dim_logits(backend, xent, logits):
    with pytest.raises(ValueError, match="dimension"):
        xent(logits, np.array(0), backend=backend)


@pytest.mark.parametrize("name", sorted(ROW_FUNCTIONS))
def test_zero_dim_logits_row_functions(backend, name):
    with pytest.raises(ValueError, match="dimension"):
        ROW_FUNCTIONS[name](np.array(1.0), backend=backend)


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 2, 0), (0, 0)])
def test_no_classes(backend, xent, shape):
    x = np.zeros(shape)
    with pytest.raises(ValueError, match="class"):
        xent(x, np.zeros(shape[:-1], np.int64), backend=backend)
    with pytest.raises(ValueError, match="class"):
        xent(x, np.zeros(shape), backend=backend)


# --- options -------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "Sum", "", None, "elementwise_mean", 0])
def test_unknown_reduction(backend, xent, reduction):
    with pytest.raises(ValueError, match="reduction") as info:
        xent(_logits((3, 4)), np.array([0, 1, 2]), reduction=reduction, backend=backend)
    assert repr(reduction) in str(info.value)


@pytest.mark.parametrize("eps", [-0.1, -1e-300, 1.0 + 1e-12, 2.0, float("nan"), float("inf"), -float("inf"), "x"])
def test_label_smoothing_out_of_range(backend, xent, eps):
    with pytest.raises(ValueError, match="label_smoothing"):
        xent(_logits((3, 4)), np.array([0, 1, 2]), label_smoothing=eps, backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        xent(_logits((3, 4)), np.full((3, 4), 0.25), label_smoothing=eps, backend=backend)


@pytest.mark.parametrize("eps", [0.0, 1.0, np.float32(0.5), 0])
def test_label_smoothing_bounds_accepted(backend, eps):
    """The bounds themselves are valid (a control for the test above)."""
    loss = fx.cross_entropy(_logits((3, 4)), np.array([0, 1, 2]), label_smoothing=eps, backend=backend)
    assert np.isfinite(loss)


@pytest.mark.parametrize("ignore_index", [1.5, "0", None])
def test_ignore_index_not_an_integer(backend, xent, ignore_index):
    with pytest.raises((TypeError, ValueError), match="ignore_index"):
        xent(_logits((3, 4)), np.array([0, 1, 2]), ignore_index=ignore_index, backend=backend)


# --- out= ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_out, what",
    [
        (lambda x: np.zeros((4, 6), x.dtype), "shape"),
        (lambda x: np.zeros((5, 4), x.dtype), "shape"),
        (lambda x: np.zeros(20, x.dtype), "shape"),
        (lambda x: np.zeros((1, 4, 5), x.dtype), "shape"),
        (lambda x: np.zeros(x.shape, np.float32), "dtype"),
        (lambda x: np.zeros(x.shape, np.float16), "dtype"),
        (lambda x: np.zeros(x.shape, np.int64), "dtype"),
        (lambda x: np.zeros(x.shape, x.dtype.newbyteorder()), "dtype"),
        (lambda x: x.tolist(), "array"),
    ],
    ids=["cols", "transposed", "flat", "extra-dim", "float32", "float16", "int64", "byteswapped", "list"],
)
def test_out_wrong_shape_or_dtype(backend, xent_grad, make_out, what):
    x = _logits((4, 5))
    before = x.copy()
    out = make_out(x)
    with pytest.raises(ValueError, match=rf"out.*({what}|{what.upper()})|{what}.*out"):
        xent_grad(x, np.array([0, 1, 2, 3]), out=out, backend=backend)
    assert x.tobytes() == before.tobytes()


def test_out_read_only(backend, xent_grad):
    x = _logits((4, 5))
    out = np.zeros_like(x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        xent_grad(x, np.array([0, 1, 2, 3]), out=out, backend=backend)
    assert np.all(out == 0)


def test_out_read_only_logits_in_place(backend, xent_grad):
    """out=logits where the logits are read-only: refused, logits untouched."""
    x = _logits((4, 5))
    x.flags.writeable = False
    before = x.copy()
    with pytest.raises(ValueError, match="read-only"):
        xent_grad(x, np.array([0, 1, 2, 3]), out=x, backend=backend)
    assert x.tobytes() == before.tobytes()


@pytest.mark.parametrize(
    "views",
    [
        lambda buf: (buf[:4], buf[1:5]),  # shifted by a row
        lambda buf: (buf[:4, :5], buf[:4, 1:6]),  # shifted by a column
        lambda buf: (buf[:4, :5], buf[:4, :5][::-1]),  # same memory, rows reversed
        lambda buf: (buf[:4, :5], buf[:4, :5][:, ::-1]),  # same memory, classes reversed
        lambda buf: (buf[:5, :5], buf[:5, :5].T),  # same memory, transposed
        lambda buf: (buf[:4, :6][:, ::2], buf[:4, :6][:, 1::2]),  # interleaved: shares the buffer
    ],
    ids=["row-shift", "col-shift", "rows-reversed", "classes-reversed", "transposed", "interleaved"],
)
def test_out_partially_overlapping_logits(backend, xent_grad, views):
    buf = _logits((6, 6))
    x, out = views(buf)
    assert x.shape == out.shape
    before = buf.copy()
    y = np.zeros(x.shape[0], np.int64)
    with pytest.raises(ValueError, match="overlap"):
        xent_grad(x, y, out=out, backend=backend)
    assert buf.tobytes() == before.tobytes()


def test_out_sharing_memory_with_target_or_weight(backend, xent_grad):
    x = _logits((3, 4))
    t = np.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="target"):
        xent_grad(x, t, out=t, backend=backend)
    np.testing.assert_array_equal(t, 0.25)
    buf = np.ones((3, 4))
    with pytest.raises(ValueError, match="weight"):
        xent_grad(x, np.array([0, 1, 2]), weight=buf[2], out=buf, backend=backend)  # weight is out's last row
    np.testing.assert_array_equal(buf, 1.0)


@pytest.mark.parametrize("name", ["log_softmax", "softmax"])
def test_row_function_out_errors(backend, name):
    f = ROW_FUNCTIONS[name]
    x = _logits((4, 5))
    with pytest.raises(ValueError, match="shape"):
        f(x, out=np.zeros((4, 6)), backend=backend)
    with pytest.raises(ValueError, match="dtype"):
        f(x, out=np.zeros((4, 5), np.float32), backend=backend)
    ro = np.zeros((4, 5))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        f(x, out=ro, backend=backend)
    assert np.all(ro == 0)
    buf = _logits((5, 5))
    before = buf.copy()
    with pytest.raises(ValueError, match="overlap"):
        f(buf[:4], out=buf[1:], backend=backend)
    assert buf.tobytes() == before.tobytes()


# --- backends ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torch", "NUMBA", "Numpy", "", "c", "numba "])
def test_unknown_backend(xent, name):
    with pytest.raises(ValueError, match="backend") as info:
        xent(_logits((3, 4)), np.array([0, 1, 2]), backend=name)
    assert repr(name) in str(info.value)
    for known in _dispatch.PREFERENCE:  # the message lists the valid names
        assert known in str(info.value)


@pytest.mark.parametrize("name", sorted(ROW_FUNCTIONS))
def test_unknown_backend_row_functions(name):
    with pytest.raises(ValueError, match="backend"):
        ROW_FUNCTIONS[name](_logits((3, 4)), backend="bogus")


@pytest.fixture(params=[name for name in _dispatch.PREFERENCE if name != "numpy"])
def unavailable(request, monkeypatch):
    """A known backend made unavailable (as if its import had failed): its name."""
    name = request.param
    monkeypatch.delitem(_dispatch.KERNELS, name, raising=False)
    monkeypatch.setitem(_dispatch.UNAVAILABLE, name, f"{name} test stub: could not be imported")
    assert name not in fx.available_backends()
    return name


def test_unavailable_backend(xent, unavailable):
    """A known backend that did not load: RuntimeError naming it and why, never a silent fallback."""
    with pytest.raises(RuntimeError, match=rf"{unavailable}.*not available.*test stub"):
        xent(_logits((3, 4)), np.array([0, 1, 2]), backend=unavailable)
    with pytest.raises(RuntimeError, match="not available"):
        fx.softmax(_logits((3, 4)), backend=unavailable)
    with pytest.raises(RuntimeError, match="not available"):
        fx.logsumexp(_logits((3, 4)), backend=unavailable)
    # and the default skips it
    assert np.isfinite(fx.cross_entropy(_logits((3, 4)), np.array([0, 1, 2])))


def test_cython_is_known_backend():
    """'cython' is a known name: either available or a RuntimeError, never a ValueError."""
    try:
        fx.cross_entropy(_logits((3, 4)), np.array([0, 1, 2]), backend="cython")
    except RuntimeError as error:
        assert "cython" not in fx.available_backends()
        assert "cython" in str(error)
    else:
        assert "cython" in fx.available_backends()


@pytest.fixture
def spy(monkeypatch):
    """Records which backend module's kernels are called."""
    calls = []
    for name in fx.available_backends():
        module = _dispatch.KERNELS[name]
        for kernel in ("xent_index", "softmax_rows"):
            original = getattr(module, kernel)

            def wrapper(*args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, kernel, wrapper)
    return calls


def test_env_var_selects_default_backend(monkeypatch, spy, backend):
    monkeypatch.setenv("FASTXENT_BACKEND", backend)
    x, y = _logits((3, 4)), np.array([0, 1, 2])
    loss = fx.cross_entropy(x, y)
    assert spy == [backend]
    assert loss == fx.cross_entropy(x, y, backend=backend)
    fx.softmax(x)
    assert spy == [backend, backend, backend]  # the explicit call above, then softmax
    other = [name for name in fx.available_backends() if name != backend]
    if other:  # an explicit backend= wins over the environment
        spy.clear()
        fx.cross_entropy(x, y, backend=other[0])
        assert spy == [other[0]]


def test_env_var_empty_means_default(monkeypatch, spy):
    monkeypatch.setenv("FASTXENT_BACKEND", "")
    fx.cross_entropy(_logits((3, 4)), np.array([0, 1, 2]))
    assert spy == [_dispatch.default_backend(4)]


def test_env_var_unset_means_fastest(monkeypatch, spy):
    """The fastest for the class count: cython (when built) up to its SMALL_C, numba above."""
    monkeypatch.delenv("FASTXENT_BACKEND", raising=False)
    fx.cross_entropy(_logits((3, 4)), np.array([0, 1, 2]))
    assert spy == [_dispatch.default_backend(4)]


@pytest.mark.parametrize("value", ["bogus", "NUMBA", "torch"])
def test_env_var_bad_value(monkeypatch, value):
    monkeypatch.setenv("FASTXENT_BACKEND", value)
    x, y = _logits((3, 4)), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=rf"FASTXENT_BACKEND.*{value}"):
        fx.cross_entropy(x, y)
    with pytest.raises(ValueError, match="FASTXENT_BACKEND"):
        fx.log_softmax(x)
    # an explicit backend does not consult the environment
    assert np.isfinite(fx.cross_entropy(x, y, backend=fx.available_backends()[-1]))


def test_env_var_unavailable_backend(monkeypatch, unavailable):
    monkeypatch.setenv("FASTXENT_BACKEND", unavailable)
    with pytest.raises(RuntimeError, match=rf"FASTXENT_BACKEND.*{unavailable}.*not available"):
        fx.cross_entropy(_logits((3, 4)), np.array([0, 1, 2]))


# --- threads ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -1, 10**6])
def test_set_num_threads_out_of_range(n):
    before = fx.get_num_threads()
    with pytest.raises(ValueError, match="thread") as info:
        fx.set_num_threads(n)
    assert str(n) in str(info.value)
    assert fx.get_num_threads() == before


@pytest.mark.parametrize("n", [1.5, "2", None])
def test_set_num_threads_not_an_integer(n):
    before = fx.get_num_threads()
    with pytest.raises(TypeError):
        fx.set_num_threads(n)
    assert fx.get_num_threads() == before


def test_set_num_threads_valid_round_trip():
    before = fx.get_num_threads()
    try:
        fx.set_num_threads(1)
        assert fx.get_num_threads() == 1
    finally:
        fx.set_num_threads(before)
    assert fx.get_num_threads() == before


def test_default_backend_depends_on_the_class_count(monkeypatch, spy):
    monkeypatch.delenv("FASTXENT_BACKEND", raising=False)
    loaded = fx.available_backends()
    small = _dispatch.CYTHON_MAX_C  # where gcc's code is the faster (measured, see _dispatch)
    large = small + 1
    expected_small = next(b for b in ("cython", "numba", "numpy") if b in loaded)
    expected_large = loaded[0]
    for n_classes, expected in ((small, expected_small), (large, expected_large)):
        spy.clear()
        fx.cross_entropy(_logits((3, n_classes)), np.array([0, 1, 2]))
        assert spy == [expected], n_classes
    spy.clear()
    fx.softmax(_logits((3, small)))  # the softmax family keeps the one preference
    assert spy == [loaded[0]]
