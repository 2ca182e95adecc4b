"""Hostile input: a hypothesis fuzz over the whole public API.

Every call either returns the NumPy reference backend's result (to the dtype's tolerance;
the same shape and dtype) or raises one of the documented exceptions (TypeError,
ValueError, IndexError; RuntimeError only for an unavailable backend) with a message.
Never another exception, a crash, a hang, a modified input, or a result that the
reference does not give. The default run tries a few thousand inputs; ``-m fuzz`` runs
many more.

Each example is a small "spec" of hypothesis-drawn choices plus a seed; ``_build`` turns
it into fresh Python objects, so the reference call and the call under test each get
their own copies (``out=logits`` overwrites them).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
from conftest import BACKENDS, TOLERANCE
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastxent as fx

DOCUMENTED = (TypeError, ValueError, IndexError, RuntimeError)

FLOAT_DTYPES = ["<f2", "<f4", "<f8", ">f2", ">f4", ">f8", "g"]
INT_DTYPES = ["i1", "u1", "i2", "u2", "<i4", "u4", "<i8", "u8", ">i8", ">i4"]
OTHER_DTYPES = ["?", "c8", "c16", "O", "M8[ns]", "m8[s]", "U3", "S3", "V4", "f4,i4"]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES + OTHER_DTYPES
LAYOUTS = ["c", "c", "f", "step", "neg", "swap", "readonly", "list", "scalar"]
BACKEND_CHOICES = [*BACKENDS, None, None, "torch", "", 1]

# --- building inputs from a spec ---------------------------------------------------------


def _values(rng, dtype, shape, n_classes, special):
    dtype = np.dtype(dtype)
    kind = dtype.kind
    if kind == "f":
        a = np.asarray(rng.standard_normal(shape) * rng.choice([1.0, 10.0, 1e3, 1e4]))
        if special and a.size:
            mask = rng.random(shape) < 0.15
            a[mask] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e4, -1e4], size=int(mask.sum()))
        return a.astype(dtype)
    if kind in "iu":
        info = np.iinfo(dtype)
        if special:
            hi = min(info.max, 2 * n_classes + 2)
            lo = max(info.min, -101 if info.min < 0 else 0)
            a = np.asarray(rng.integers(lo, hi, shape, endpoint=True))
            if a.size and info.min < 0 and info.min <= -100:
                a.flat[0] = -100
        else:
            a = rng.integers(0, max(n_classes, 1), shape)
        return a.astype(dtype)
    if kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    if kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if kind == "O":
        a = np.empty(shape, object)
        choices = [1.5, -2.0, None, "a", 3, float("nan")]
        for index in np.ndindex(shape):
            a[index] = choices[int(rng.integers(len(choices)))]
        return a
    if kind in "Mm":
        return np.arange(int(np.prod(shape)), dtype="i8").reshape(shape).view(dtype)
    return np.zeros(shape, dtype)  # strings, bytes, void, structured


def _layout(a, layout, rng):
    if layout == "c":
        return a
    if layout == "f":
        return np.asfortranarray(a)
    if layout == "step":  # every other row of a bigger array
        if a.ndim == 0:
            return a
        big = np.empty((2 * a.shape[0], *a.shape[1:]), a.dtype)
        big[::2] = a
        return big[::2]
    if layout == "neg":  # a negative stride on the last axis (same values)
        if a.ndim == 0:
            return a
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    if layout == "swap":  # byte-swapped (same values)
        if a.dtype.kind in "OUSV" or a.dtype.names:
            return a
        return a.byteswap().view(a.dtype.newbyteorder())
    if layout == "readonly":
        a = a.copy()
        a.flags.writeable = False
        return a
    if layout == "list":
        return a.tolist()
    if layout == "scalar":
        if not a.size:
            return None
        first = a.flat[0]
        return first.item() if isinstance(first, np.generic) else first
    raise AssertionError(layout)


def _array(spec, key, shape, n_classes):
    kind = spec[key]
    if not isinstance(kind, tuple):
        return kind
    dtype, layout, special, seed = kind
    rng = np.random.default_rng(seed)
    return _layout(np.asarray(_values(rng, dtype, shape, n_classes, special)), layout, rng)


def _build(spec):
    """(function, args, kwargs) from a spec: fresh objects on every call."""
    shape = tuple(spec["shape"])
    n_classes = shape[-1] if shape else 1
    logits = _array(spec, "logits", shape, n_classes)
    args = [logits]
    kwargs = {}
    name = spec["function"]
    if name.startswith("cross_entropy"):
        target_shape = shape if spec["probabilities"] else shape[:-1]
        if spec["target_shape_wrong"]:
            target_shape = (*target_shape, 2)
        args.append(_array(spec, "target", target_shape, n_classes))
        for key in ("weight", "ignore_index", "reduction", "label_smoothing"):
            if key in spec:
                value = spec[key]
                if key == "weight" and isinstance(value, tuple):
                    value = _array(spec, "weight", (max(0, n_classes + spec["weight_extra"]),), n_classes)
                kwargs[key] = value
    if spec["out"] is not None and name not in ("cross_entropy", "logsumexp"):
        kwargs["out"] = _out(spec["out"], logits, shape, args)
    if spec["backend"] != "absent":
        kwargs["backend"] = spec["backend"]
    return getattr(fx, name), args, kwargs


def _out(kind, logits, shape, args):
    dtype = logits.dtype if isinstance(logits, np.ndarray) else np.dtype(np.float64)
    if kind == "x":
        return logits
    if kind == "target":
        return args[-1] if len(args) > 1 else logits
    if kind == "fresh":
        return np.full(shape, 7, dtype) if dtype.kind not in "OUSVMm" else np.empty(shape, dtype)
    if kind == "fortran":
        return np.asfortranarray(np.empty(shape, dtype))
    if kind == "step":
        if not shape:
            return np.empty(shape, dtype)
        return np.empty((2 * shape[0], *shape[1:]), dtype)[::2]
    if kind == "wrong_dtype":
        return np.empty(shape, np.float32 if dtype != np.float32 else np.float64)
    if kind == "wrong_shape":
        return np.empty((*shape, 1), dtype)
    if kind == "readonly":
        a = np.empty(shape, dtype)
        a.flags.writeable = False
        return a
    if kind == "overlap" and isinstance(logits, np.ndarray) and logits.ndim and logits.shape[0] > 1:
        base = np.empty((shape[0] + 1, *shape[1:]), dtype)
        return base[1:]  # overlaps nothing of logits, but is a view: still valid
    if kind == "list":
        return np.zeros(shape).tolist()
    return kind  # a scalar, a string, ...


# --- strategies --------------------------------------------------------------------------

_shapes = st.one_of(
    st.builds(lambda batch, c: [*batch, c], st.lists(st.integers(0, 5), max_size=2), st.integers(1, 6)),
    st.builds(lambda batch, c: [*batch, c], st.lists(st.integers(0, 5), max_size=2), st.integers(1, 6)),
    st.lists(st.integers(0, 5), max_size=3),
    st.sampled_from([[3, 70], [2, 2, 65], [1, 1], [4, 0], [0, 0]]),
)


def _array_kind(dtypes):
    return st.tuples(st.sampled_from(dtypes), st.sampled_from(LAYOUTS), st.booleans(), st.integers(0, 2**32 - 1))


# mostly valid input (so that the results get compared), hostile the rest of the time
_VALID_LAYOUTS = ["c", "c", "c", "f", "step", "neg", "swap", "readonly", "list"]


def _valid_kind(dtypes):
    return st.tuples(st.sampled_from(dtypes), st.sampled_from(_VALID_LAYOUTS), st.booleans(), st.integers(0, 2**32 - 1))


_logits = st.one_of(
    _valid_kind(FLOAT_DTYPES),
    _valid_kind(FLOAT_DTYPES),
    _valid_kind(FLOAT_DTYPES),
    _array_kind(ALL_DTYPES),
    st.sampled_from([None, "abc", 1.5, 3, [], [[]], [1.0, "a"]]),
)
_index_targets = st.one_of(
    _valid_kind(INT_DTYPES),
    _valid_kind(INT_DTYPES),
    _array_kind(ALL_DTYPES),
    st.sampled_from([None, "abc", 1.5, 3, -100]),
)
_probability_targets = st.one_of(
    _valid_kind(FLOAT_DTYPES), _valid_kind(FLOAT_DTYPES), _array_kind(ALL_DTYPES), st.sampled_from([None, 1.5, [[0.5]]])
)
_weights = st.one_of(
    st.none(),
    _valid_kind(FLOAT_DTYPES + INT_DTYPES),
    _array_kind(ALL_DTYPES),
    st.sampled_from(["abc", 1.5, 2, [1.0]]),
)
_ignore_index = st.one_of(
    st.sampled_from([-100, 0, 1, -1, 2]),
    st.sampled_from([2**63 - 1, -(2**63), 2**63, 2**70, -(2**70), True, 1.0, 1.5, None, "0"]),
    st.integers(-(2**65), 2**65),
    st.sampled_from([np.int8(-100), np.uint64(2**64 - 1), np.float32(1.0), np.array(1), np.array([1, 2])]),
)
_reduction = st.one_of(
    st.sampled_from(["mean", "sum", "none"]),
    st.sampled_from(["MEAN", "", "avg", None, 1, b"mean", np.str_("sum"), ("mean",), np.array(["mean", "sum"])]),
    st.text(max_size=5),
)
_label_smoothing = st.one_of(
    st.floats(0, 1),
    st.sampled_from([0.0, 0.1, 1.0]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [0, 1, True, None, "0.1", b"0.1", 1j, [0.1], np.float16(0.5), np.array(0.2), np.array([0.1, 0.2]), object()]
    ),
)
_outs = st.one_of(
    st.sampled_from([None, "x", "fresh", "fortran", "step"]),
    st.sampled_from([None, "x", "fresh", "fortran", "step"]),
    st.sampled_from(["target", "wrong_dtype", "wrong_shape", "readonly", "overlap", "list", 1.0, "out"]),
)


@st.composite
def _specs(draw, functions):
    spec = {
        "function": draw(st.sampled_from(functions)),
        "shape": draw(_shapes),
        "logits": draw(_logits),
        "out": draw(_outs),
        "backend": draw(st.sampled_from([*BACKENDS, "absent"] * 3 + BACKEND_CHOICES)),
    }
    if spec["function"].startswith("cross_entropy"):
        spec["probabilities"] = draw(st.booleans())
        spec["target"] = draw(_probability_targets if spec["probabilities"] else _index_targets)
        spec["target_shape_wrong"] = draw(st.integers(0, 19)) == 0
        for key, strategy in (
            ("weight", _weights),
            ("ignore_index", _ignore_index),
            ("reduction", _reduction),
            ("label_smoothing", _label_smoothing),
        ):
            if draw(st.integers(0, 2)) == 0:  # present a third of the time
                spec[key] = draw(strategy)
        spec["weight_extra"] = draw(st.sampled_from([0, 0, 0, 0, 0, 0, 1, -1]))
    return spec


# --- the check ---------------------------------------------------------------------------


def _call(spec, backend_override=None):
    function, args, kwargs = _build(spec)
    if backend_override is not None:
        kwargs["backend"] = backend_override
    snapshot = [a.copy() if isinstance(a, np.ndarray) else None for a in args]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NaN/inf input makes NumPy warn in the reference
        try:
            result = function(*args, **kwargs)
        except DOCUMENTED as error:
            assert str(error), f"{type(error).__name__} without a message"
            if isinstance(error, RuntimeError):
                assert "not available" in str(error), error
            return None, error, args, kwargs
    out = kwargs.get("out")
    for before, after in zip(snapshot, args, strict=True):  # inputs are never modified...
        if before is not None and after is not out:  # ...except out=logits
            assert before.tobytes() == after.tobytes(), "an input was modified"
    if out is not None:
        assert (result[1] if isinstance(result, tuple) else result) is out, "out= given but not returned"
    return result, None, args, kwargs


def _finite_max(value) -> float:
    """max(1, the largest finite magnitude in ``value``) (1 for non-arrays and empty ones)."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return 1.0
    return max(1.0, float(np.max(np.abs(a), initial=0.0, where=np.isfinite(a))))


def _term_scale(args, kwargs) -> float:
    """The size of the terms a cross-entropy result is a sum of, so the scale of its rounding
    error: per row ``sum_c |w_c t'_c| (|x_c - m| + log s)``, and for the gradient
    ``|p_c A| + |w_c t'_c|``, bounded by ``C max|w| max|t| (2 max|x| + log C + 1)``. The
    fuzz draws unnormalised targets and weights of either sign up to 1e4, whose terms cancel:
    the result can be far smaller than the terms, and both the kernels and the reference
    then keep only the terms' absolute accuracy."""
    logits, target = args[0], args[1]
    n_classes = max(1, np.shape(logits)[-1] if np.ndim(logits) else 1)
    is_probability = np.asarray(target).dtype.kind == "f"
    target_max = _finite_max(target) if is_probability else 1.0
    weight_max = _finite_max(kwargs.get("weight")) if kwargs.get("weight") is not None else 1.0
    return n_classes * weight_max * target_max * (2 * _finite_max(logits) + np.log(n_classes) + 1)


def _compare(actual, expected, lenient_nonfinite, term_scale=1.0):
    """Same shapes and dtypes, values within the tolerance, NaN and inf where the reference
    has them. ``lenient_nonfinite``: probability targets or class weights with inf/NaN
    entries, where the kernels' ``B + A log s`` or ``sw + W log s`` may give NaN (inf * 0)
    where the reference gives +-inf; then any non-finite value matches any other."""
    pairs = zip(
        actual if isinstance(actual, tuple) else (actual,),
        expected if isinstance(expected, tuple) else (expected,),
        strict=True,
    )
    for a, e in pairs:
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, a.dtype, e.shape, e.dtype)
        rtol, atol = TOLERANCE.get(np.dtype(a.dtype.type), (1e-12, 1e-14))
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        if lenient_nonfinite:
            both = ~np.isfinite(a64) & ~np.isfinite(e64)
            a64, e64 = np.where(both, 0.0, a64), np.where(both, 0.0, e64)
        magnitude = max(term_scale, float(np.max(np.abs(e64), initial=0.0, where=np.isfinite(e64))))
        np.testing.assert_allclose(a64, e64, rtol=4 * rtol, atol=4 * atol * magnitude, equal_nan=True)


def check(spec):
    result, error, args, kwargs = _call(spec)
    event(f"{spec['function']}: {type(error).__name__ if error else 'result'} {str(error)[:40] if error else ''}")
    backend = kwargs.get("backend", "absent")
    valid_backend = backend == "absent" or backend is None or backend in BACKENDS
    if spec["backend"] in (None, "absent", "numpy") or not valid_backend:
        return  # nothing to compare with, or the backend name alone decides
    expected, ref_error, _, _ = _call(spec, backend_override="numpy")
    if error is not None:
        assert ref_error is not None, f"backend {backend!r} raised {error!r} but the reference succeeded"
        assert (
            type(error) is type(ref_error) or isinstance(error, type(ref_error)) or isinstance(ref_error, type(error))
        ), (error, ref_error)
        return
    assert ref_error is None, f"backend {backend!r} succeeded but the reference raised {ref_error!r}"
    target = spec.get("target")
    lenient = bool(spec.get("probabilities")) and isinstance(target, tuple) and target[2]
    # infinite class weights: the kernels sum w_c (lse - x_c) as sum_c w_c (m - x_c) + W log s,
    # where an infinite w_c at the max class gives inf * 0 = NaN instead of the reference's
    # +-inf (README: with non-finite weights a non-finite loss may be NaN or +-inf)
    weight = kwargs.get("weight")
    if isinstance(weight, np.ndarray) and weight.dtype.kind == "f" and not np.all(np.isfinite(weight)):
        lenient = True
    term_scale = _term_scale(args, kwargs) if spec["function"].startswith("cross_entropy") else 1.0
    _compare(result, expected, lenient, term_scale)


API = ["cross_entropy", "cross_entropy_grad", "cross_entropy_with_grad", "log_softmax", "softmax", "logsumexp"]
# derandomized: CI must be repeatable (a fixed walk through the input space, the same on every
# run); `pytest --hypothesis-seed=N -p no:randomly` or a profile without it explores further.
_FAST = settings(max_examples=6000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
# the long run's count: FASTXENT_FUZZ_EXAMPLES (CI runs 30,000 to stay in its time budget)
_LONG_EXAMPLES = int(os.environ.get("FASTXENT_FUZZ_EXAMPLES", "100000"))
_LONG = settings(max_examples=_LONG_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@_FAST
@given(_specs(API))
def test_fuzz_api(spec):
    check(spec)


@_FAST
@given(
    st.one_of(
        st.integers(-3, 5),
        st.sampled_from(
            [2**40, -(2**70), 1.0, 1.5, "2", None, True, np.int64(1), np.uint8(1), np.array(1), np.array([1])]
        ),
    )
)
def test_fuzz_set_num_threads(n):
    before = fx.get_num_threads()
    try:
        fx.set_num_threads(n)
    except (TypeError, ValueError) as error:
        assert str(error)
        assert fx.get_num_threads() == before
    else:
        assert fx.get_num_threads() == int(n)
    finally:
        fx.set_num_threads(before)


@pytest.mark.fuzz
@_LONG
@given(_specs(API))
def test_fuzz_api_long(spec):
    check(spec)
