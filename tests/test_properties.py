"""Property tests (hypothesis): invariants of softmax cross-entropy, and every backend
against the float64 NumPy reference for random shapes, dtypes and options.

Independent oracles where possible: ``scipy.special`` for logsumexp, softmax, entropy and
KL divergence, so that the checks are not circular with ``fastxent._reference``.
"""

from __future__ import annotations

import numpy as np
import scipy.special
from conftest import TOLERANCE, assert_close
from conftest import reference_nd as _reference_2d
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastxent as fx

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
INDEX_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
REDUCTIONS = ("mean", "sum", "none")

# The `backend` fixture is parametrized and stateless, so reusing it across examples is safe.
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- strategies ------------------------------------------------------------------------


def _finite(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def logits(draw, dtypes=FLOAT_DTYPES, max_rows=12, max_classes=10, bound=30.0, batch_ndim=(1,)):
    """A floating array of shape (*batch, C); returns (x, dtype)."""
    dtype = draw(st.sampled_from(dtypes))
    ndim = draw(st.sampled_from(batch_ndim))
    batch = draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=0, max_side=max_rows))
    if ndim == 0:
        batch = ()
    n_classes = draw(st.integers(1, max_classes))
    x = draw(hnp.arrays(np.float64, (*batch, n_classes), elements=_finite(-bound, bound)))
    return x.astype(dtype), dtype


def _normalise(a: np.ndarray) -> np.ndarray:
    """Rows of a non-negative array scaled to sum to 1 (all-zero rows become uniform)."""
    a = np.asarray(a, np.float64)
    total = a.sum(axis=-1, keepdims=True)
    uniform = np.full_like(a, 1.0 / a.shape[-1]) if a.size else a
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, a / np.where(total > 0, total, 1.0), uniform)


@st.composite
def distributions(draw, shape):
    """Probability rows (sum to 1) of the given shape: soft, one-hot or with zeros."""
    one_hot = draw(st.booleans())
    if one_hot and shape[-1] > 0:
        n = int(np.prod(shape[:-1]))
        hot = draw(hnp.arrays(np.int64, (n,), elements=st.integers(0, shape[-1] - 1)))
        t = np.zeros((n, shape[-1]))
        t[np.arange(n), hot] = 1.0
        return t.reshape(shape)
    raw = draw(hnp.arrays(np.float64, shape, elements=st.one_of(st.just(0.0), _finite(0.0, 1.0))))
    return _normalise(raw)


def weights(n_classes):
    """Class weights in [0.25, 4], some exactly 0 (so D can be 0), or None."""
    element = st.one_of(st.just(0.0), _finite(0.25, 4.0))
    return st.one_of(st.none(), hnp.arrays(np.float64, (n_classes,), elements=element))


def _shift_exact(x: np.ndarray, dtype: np.dtype, data) -> tuple[np.ndarray, np.ndarray]:
    """x rounded to a grid, and integer per-row shifts, such that x + shift is exact."""
    if dtype == np.float16:  # 11-bit significand: quarters within |x + k| < 512
        grid, max_shift, bound = 4.0, 50, 8.0
    else:  # 1/64 within |x + k| < 2**18 (exact in float32 and float64)
        grid, max_shift, bound = 64.0, 1000, 30.0
    base = np.clip(np.round(x.astype(np.float64) * grid) / grid, -bound, bound)
    shifts = data.draw(
        hnp.arrays(np.int64, x.shape[:-1] + (1,), elements=st.integers(-max_shift, max_shift)), label="shifts"
    )
    shifted = base + shifts
    assert np.array_equal(shifted.astype(dtype).astype(np.float64), shifted)  # the shift is exact
    return base.astype(dtype), shifted.astype(dtype)


# --- invariants ------------------------------------------------------------------------


@fixture_ok
@given(case=logits(), data=st.data(), reduction=st.sampled_from(REDUCTIONS), eps=_finite(0.0, 1.0))
def test_shift_invariance_index(backend, case, data, reduction, eps):
    """Adding a constant to each row leaves the loss and the gradient unchanged."""
    x, dtype = case
    n_classes = x.shape[-1]
    base, shifted = _shift_exact(x, dtype, data)
    y = data.draw(hnp.arrays(np.int64, x.shape[:-1], elements=st.integers(0, n_classes - 1)), label="y")
    w = data.draw(weights(n_classes), label="weight")
    opts = dict(weight=w, reduction=reduction, label_smoothing=eps, backend=backend)
    loss0, grad0 = fx.cross_entropy_with_grad(base, y, **opts)
    loss1, grad1 = fx.cross_entropy_with_grad(shifted, y, **opts)
    assert_close(loss1, loss0, dtype, err_msg="loss changed under a per-row shift")
    assert_close(grad1, grad0, dtype, err_msg="gradient changed under a per-row shift")


@fixture_ok
@given(case=logits(), data=st.data(), reduction=st.sampled_from(REDUCTIONS), eps=_finite(0.0, 1.0))
def test_shift_invariance_probability(backend, case, data, reduction, eps):
    x, dtype = case
    base, shifted = _shift_exact(x, dtype, data)
    t = data.draw(distributions(x.shape), label="t").astype(dtype)
    w = data.draw(weights(x.shape[-1]), label="weight")
    opts = dict(weight=w, reduction=reduction, label_smoothing=eps, backend=backend)
    loss0, grad0 = fx.cross_entropy_with_grad(base, t, **opts)
    loss1, grad1 = fx.cross_entropy_with_grad(shifted, t, **opts)
    assert_close(loss1, loss0, dtype, err_msg="loss changed under a per-row shift")
    assert_close(grad1, grad0, dtype, err_msg="gradient changed under a per-row shift")


@fixture_ok
@given(case=logits(batch_ndim=(0, 1, 2)), data=st.data(), reduction=st.sampled_from(REDUCTIONS))
def test_gradient_rows_sum_to_zero_index(backend, case, data, reduction):
    """Without weights or smoothing each kept row's gradient is p - onehot: it sums to 0."""
    x, dtype = case
    n_classes = x.shape[-1]
    y = data.draw(hnp.arrays(np.int64, x.shape[:-1], elements=st.integers(-100, n_classes - 1)), label="y")
    y = np.where((y < 0) & (y != -100), 0, y)  # some rows ignored (-100), the rest in range
    grad = fx.cross_entropy_grad(x, y, reduction=reduction, backend=backend)
    assert grad.shape == x.shape and grad.dtype == dtype
    assert_close(grad.astype(np.float64).sum(axis=-1), np.zeros(x.shape[:-1]), dtype)
    assert np.all(grad[y == -100] == 0)  # ignored rows: exactly zero


@fixture_ok
@given(case=logits(batch_ndim=(0, 1, 2)), data=st.data(), reduction=st.sampled_from(REDUCTIONS))
def test_gradient_rows_sum_to_zero_probability(backend, case, data, reduction):
    x, dtype = case
    t = data.draw(distributions(x.shape), label="t")
    grad = fx.cross_entropy_grad(x, t.astype(dtype), reduction=reduction, backend=backend)
    assert grad.shape == x.shape and grad.dtype == dtype
    assert_close(grad.astype(np.float64).sum(axis=-1), np.zeros(x.shape[:-1]), dtype)


@fixture_ok
@given(case=logits(), data=st.data(), reduction=st.sampled_from(REDUCTIONS), eps=_finite(0.0, 1.0))
def test_loss_is_non_negative(backend, case, data, reduction, eps):
    """-sum_c w_c t_c log p_c >= 0 for distributions t and non-negative weights."""
    x, dtype = case
    t = data.draw(distributions(x.shape), label="t").astype(dtype)
    w = data.draw(weights(x.shape[-1]), label="weight")
    loss = fx.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=eps, backend=backend)
    loss = np.asarray(loss, np.float64)
    if reduction == "mean" and x.shape[0] == 0:
        assert np.isnan(loss)  # N = 0
    else:
        assert np.all(loss >= 0), loss


@fixture_ok
@given(
    case=logits(dtypes=(np.dtype(np.float32), np.dtype(np.float64)), bound=20.0, batch_ndim=(1, 2)),
    data=st.data(),
)
def test_cross_entropy_is_entropy_plus_kl(backend, case, data):
    """CE(t, softmax(x)) = H(t) + KL(t || softmax(x)), with H and KL from scipy."""
    x, dtype = case
    t = data.draw(distributions(x.shape), label="t").astype(dtype)
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    entropy = scipy.special.entr(t64).sum(axis=-1)
    kl = scipy.special.rel_entr(t64, scipy.special.softmax(x64, axis=-1)).sum(axis=-1)
    loss = fx.cross_entropy(x, t, reduction="none", backend=backend)
    assert loss.shape == x.shape[:-1]
    assert_close(loss, entropy + kl, dtype)


@fixture_ok
@given(
    case=logits(batch_ndim=(0, 1, 2)),
    data=st.data(),
    reduction=st.sampled_from(REDUCTIONS),
    eps=st.one_of(st.just(0.0), st.just(1.0), _finite(0.0, 1.0)),
    probability=st.booleans(),
)
def test_backend_matches_reference(backend, case, data, reduction, eps, probability):
    """Every backend equals the float64 reference for random options and dtypes."""
    x, dtype = case
    n_classes = x.shape[-1]
    w = data.draw(weights(n_classes), label="weight")
    if probability:
        target = data.draw(hnp.arrays(np.float64, x.shape, elements=_finite(0.0, 2.0)), label="t")  # not normalised
        target = target.astype(dtype)
        ignore_index = -100
    else:
        index_dtype = np.dtype(data.draw(st.sampled_from(INDEX_DTYPES), label="index dtype"))
        ignore_index = data.draw(st.sampled_from([-100, -1, *range(n_classes)]), label="ignore_index")
        low = -1 if index_dtype.kind == "i" and ignore_index < 0 else 0  # -1 stands for "ignored"
        target = data.draw(hnp.arrays(np.int64, x.shape[:-1], elements=st.integers(low, n_classes - 1)), label="y")
        if ignore_index < 0:
            target = np.where(target < 0, ignore_index, target)
        target = target.astype(index_dtype)
    opts = dict(weight=w, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    loss, grad = fx.cross_entropy_with_grad(x, target, backend=backend, **opts)
    ref_loss, ref_grad = _reference_2d(x, target, **opts)
    assert grad.shape == x.shape and grad.dtype == dtype
    if reduction == "none":
        assert isinstance(loss, np.ndarray) and loss.shape == x.shape[:-1] and loss.dtype == dtype
    else:
        assert isinstance(loss, np.generic) and loss.dtype == dtype
    assert_close(loss, ref_loss, dtype, err_msg="loss")
    assert_close(grad, ref_grad, dtype, err_msg="gradient")
    # loss-only and gradient-only calls agree with the fused call
    assert_close(fx.cross_entropy(x, target, backend=backend, **opts), loss, dtype)
    assert_close(fx.cross_entropy_grad(x, target, backend=backend, **opts), grad, dtype)


# --- the softmax family ------------------------------------------------------------------


@fixture_ok
@given(case=logits(batch_ndim=(0, 1, 2)))
def test_softmax_rows_sum_to_one(backend, case):
    x, dtype = case
    p = fx.softmax(x, backend=backend)
    assert p.shape == x.shape and p.dtype == dtype
    assert np.all(p >= 0) and np.all(p <= 1)
    assert_close(p.astype(np.float64).sum(axis=-1), np.ones(x.shape[:-1]), dtype)
    assert_close(p, scipy.special.softmax(x.astype(np.float64), axis=-1), dtype)


@fixture_ok
@given(case=logits(batch_ndim=(0, 1, 2)))
def test_log_softmax_is_log_of_softmax(backend, case):
    x, dtype = case
    log_p = fx.log_softmax(x, backend=backend)
    p = fx.softmax(x, backend=backend)
    assert log_p.shape == x.shape and log_p.dtype == dtype
    assert np.all(log_p <= 0)
    # where p is a normal number of the dtype, log(p) carries only p's rounding
    normal = p >= np.finfo(dtype).tiny
    with np.errstate(divide="ignore"):
        log_of_p = np.log(p.astype(np.float64))
    assert_close(log_p[normal], log_of_p[normal], dtype)
    assert_close(log_p, scipy.special.log_softmax(x.astype(np.float64), axis=-1), dtype)


@fixture_ok
@given(case=logits(batch_ndim=(0, 1, 2), bound=1e4))
def test_logsumexp_matches_scipy(backend, case):
    x, dtype = case
    lse = fx.logsumexp(x, backend=backend)
    assert lse.shape == x.shape[:-1] and lse.dtype == dtype
    assert_close(lse, scipy.special.logsumexp(x.astype(np.float64), axis=-1), dtype)


@fixture_ok
@given(case=logits(dtypes=(np.dtype(np.float32), np.dtype(np.float64)), batch_ndim=(1,)), data=st.data())
def test_masked_classes_match_reference(backend, case, data):
    """-inf logits (masked classes) that are not the target: finite loss, zero gradient."""
    x, dtype = case
    n_classes = x.shape[-1]
    y = data.draw(hnp.arrays(np.int64, x.shape[:-1], elements=st.integers(0, n_classes - 1)), label="y")
    mask = data.draw(hnp.arrays(np.bool_, x.shape), label="mask")
    mask[np.arange(x.shape[0]), y] = False  # the target class stays finite
    x = np.where(mask, -np.inf, x).astype(dtype)
    loss, grad = fx.cross_entropy_with_grad(x, y, reduction="none", backend=backend)
    ref_loss, ref_grad = _reference_2d(x, y, reduction="none")
    assert np.all(np.isfinite(loss))
    assert np.all(grad[mask] == 0)
    assert_close(loss, ref_loss, dtype)
    assert_close(grad, ref_grad, dtype)


def test_tolerance_table_covers_every_dtype():
    """The property tests above rely on one entry per dtype they draw."""
    assert set(FLOAT_DTYPES) <= set(TOLERANCE)


def test_strategies_produce_valid_distributions():
    """Guard for the helpers: normalised rows sum to 1, zero rows become uniform."""
    t = _normalise(np.array([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]]))
    np.testing.assert_allclose(t.sum(axis=-1), 1.0)
    np.testing.assert_array_equal(t[0], np.full(3, 1 / 3))
