"""The NumPy reference against oracles that share none of its code.

``fastxent._reference`` is what every backend is tested against, so it must not be checked
against itself. Here it (and the public API with ``backend="numpy"``, which wraps it) meets:

- ``scipy.special`` (``logsumexp``, ``log_softmax``, ``softmax``, ``entr``, ``rel_entr``);
- the per-row formulas of docs/SEMANTICS.md written out again below in plain Python loops over
  Python floats (``math.exp``/``math.log``), for loss, gradient and every reduction;
- central finite differences of the loss, in float64, over the full option matrix, for
  the gradient;
- small hand-made cases with closed-form answers, chosen so that each plausible wrong
  formula (denominator, smoothing weights, normalised targets, ...) gives another number.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

special = pytest.importorskip("scipy.special")

from conftest import assert_close  # noqa: E402

import fastxent as fx  # noqa: E402
from fastxent import _reference as ref  # noqa: E402

F64 = np.float64
REDUCTIONS = ("mean", "sum", "none")
LOG2 = math.log(2.0)

#: Central finite differences cannot reach float64's table tolerance (rtol 1e-12, atol
#: 1e-14): the 5-point stencil with h = 2**-10 has truncation error ~h**4/30 * |f^(5)|
#: ~ 1e-13 and rounding error ~1.5 * 2.2e-16 * |L| / h ~ 3.4e-13 * |L|, with |L| up to ~30
#: for "sum" here, i.e. up to ~1e-11 absolute. So the finite-difference comparison widens
#: the float64 tolerances by this factor (rtol 1e-9, atol 1e-11); every other comparison in
#: this file uses the table as it is.
FD_SCALE = 1e3
FD_STEP = 2.0**-10  # a power of two, and logits on a 2**-20 grid: x +- k h is exact


# --- the independent oracles: docs/SEMANTICS.md in plain Python --------------------------


def hand_lse(row):
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row))


def hand_reduce(losses, grads, reduction, denominator):
    if reduction == "none":
        return losses, grads
    total = sum(losses)
    if reduction == "sum":
        return total, grads
    if denominator == 0:
        return math.nan, [[0.0] * len(g) for g in grads]
    return total / denominator, [[v / denominator for v in g] for g in grads]


def hand_index(x, y, weight, ignore_index, eps, reduction):
    """docs/SEMANTICS.md, class-index targets, loop by loop. ``(loss, grad)``, grad of the loss."""
    rows = np.asarray(x, F64).tolist()
    labels = [int(v) for v in np.asarray(y).reshape(-1)]
    n_classes = len(rows[0]) if rows else 0
    w = [1.0] * n_classes if weight is None else [float(v) for v in weight]
    big_w = sum(w)
    losses, grads, denominator = [], [], 0.0
    for row, yi in zip(rows, labels, strict=True):
        if yi == ignore_index:
            losses.append(0.0)
            grads.append([0.0] * n_classes)
            continue
        lse = hand_lse(row)
        p = [math.exp(v - lse) for v in row]
        loss = (1 - eps) * w[yi] * (lse - row[yi])
        loss += eps / n_classes * sum(w[c] * (lse - row[c]) for c in range(n_classes))
        grad = [
            (1 - eps) * w[yi] * (p[c] - (1.0 if c == yi else 0.0)) + eps / n_classes * (big_w * p[c] - w[c])
            for c in range(n_classes)
        ]
        losses.append(loss)
        grads.append(grad)
        denominator += w[yi]
    return hand_reduce(losses, grads, reduction, denominator)


def hand_probability(x, t, weight, eps, reduction):
    """docs/SEMANTICS.md, probability targets, loop by loop. ``(loss, grad)``, grad of the loss."""
    rows = np.asarray(x, F64).tolist()
    targets = np.asarray(t, F64).tolist()
    n_classes = len(rows[0]) if rows else 0
    w = [1.0] * n_classes if weight is None else [float(v) for v in weight]
    losses, grads = [], []
    for row, ti in zip(rows, targets, strict=True):
        lse = hand_lse(row)
        p = [math.exp(v - lse) for v in row]
        ts = [(1 - eps) * v + eps / n_classes for v in ti]
        losses.append(-sum(w[c] * ts[c] * (row[c] - lse) for c in range(n_classes)))
        a = sum(w[k] * ts[k] for k in range(n_classes))
        grads.append([p[c] * a - w[c] * ts[c] for c in range(n_classes)])
    return hand_reduce(losses, grads, reduction, float(len(rows)))


def fd_gradient(f, x, h=FD_STEP):
    """5-point central differences of the scalar ``f`` at ``x`` (float64)."""
    x = np.array(x, dtype=F64)
    grad = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        values = []
        for k in (2, 1, -1, -2):
            xx = x.copy()
            xx[idx] += k * h
            values.append(f(xx))
        grad[idx] = (-values[0] + 8 * values[1] - 8 * values[2] + values[3]) / (12 * h)
    return grad


# --- the option matrix ---------------------------------------------------------------


def make_case(rng, kind, ignore_case, weighted, n=6, n_classes=4):
    """Logits on a 2**-20 grid, a target of ``kind``, ignore_index, weight."""
    x = np.round(rng.standard_normal((n, n_classes)) * 2.0 * 2**20) / 2**20
    ignore_index = 2 if ignore_case == "class_2" else -100
    if kind == "index":
        y = rng.integers(0, n_classes, size=n)
        if ignore_case == "default_some":
            y[[1, 4]] = -100
        elif ignore_case == "class_2":
            y[[0, 3]] = 2
            y[[1, 2, 4, 5]] = [0, 1, 3, 1]
        target = y
    else:
        target = rng.uniform(0.0, 1.0, size=(n, n_classes))  # not normalised on purpose
        target[0] = [0.0, 1.0, 0.0, 0.0]
    weight = rng.uniform(0.25, 2.0, size=n_classes) if weighted else None
    return x, target, ignore_index, weight


def _option_cases():
    for reduction in REDUCTIONS:
        for weighted in (False, True):
            for eps in (0.0, 0.1, 1.0):
                for ignore_case in ("default_some", "class_2", "none"):
                    yield pytest.param(reduction, "index", weighted, ignore_case, eps)
                # ignore_index does not apply to probabilities (one >= 0 is an error, as in torch)
                yield pytest.param(reduction, "probability", weighted, "none", eps)


OPTION_CASES = list(_option_cases())
OPTION_NAMES = "reduction, kind, weighted, ignore_case, eps"


def hand(x, target, weight, ignore_index, eps, reduction):
    if np.asarray(target).dtype.kind == "f":
        return hand_probability(x, target, weight, eps, reduction)
    return hand_index(x, target, weight, ignore_index, eps, reduction)


def public_numpy(x, target, with_grad=True, **options):
    """The public API, numpy backend, on the same rows reshaped N-D: (2, n/2, C)."""
    n, n_classes = x.shape
    xn = x.reshape(2, n // 2, n_classes)
    tn = target.reshape((2, n // 2) + target.shape[1:])
    if not with_grad:
        return fx.cross_entropy(xn, tn, backend="numpy", **options)
    loss, grad = fx.cross_entropy_with_grad(xn, tn, backend="numpy", **options)
    loss = loss.reshape(n) if options.get("reduction") == "none" else loss
    return loss, grad.reshape(n, n_classes)


@pytest.mark.parametrize(OPTION_NAMES, OPTION_CASES)
def test_matches_hand_formula(rng, reduction, kind, weighted, ignore_case, eps):
    x, target, ignore_index, weight = make_case(rng, kind, ignore_case, weighted)
    options = {"weight": weight, "ignore_index": ignore_index, "reduction": reduction, "label_smoothing": eps}
    exp_loss, exp_grad = hand(x, target, weight, ignore_index, eps, reduction)
    loss, grad = ref.cross_entropy(x, target, **options)
    assert_close(loss, exp_loss, F64, err_msg="reference loss")
    assert_close(grad, exp_grad, F64, err_msg="reference grad")
    loss, grad = public_numpy(x, target, **options)
    assert_close(loss, exp_loss, F64, err_msg="public numpy loss")
    assert_close(grad, exp_grad, F64, err_msg="public numpy grad")


@pytest.mark.parametrize(OPTION_NAMES, OPTION_CASES)
def test_gradient_matches_finite_differences(rng, reduction, kind, weighted, ignore_case, eps):
    x, target, ignore_index, weight = make_case(rng, kind, ignore_case, weighted)
    options = {"weight": weight, "ignore_index": ignore_index, "reduction": reduction, "label_smoothing": eps}

    def ref_loss(xx):  # "none": the gradient is that of the sum of the rows
        return float(np.sum(ref.cross_entropy(xx, target, **options)[0]))

    def public_loss(xx):
        return float(np.sum(public_numpy(xx, target, with_grad=False, **options)))

    _, grad = ref.cross_entropy(x, target, **options)
    assert_close(grad, fd_gradient(ref_loss, x), F64, scale=FD_SCALE, err_msg="reference")
    _, grad = public_numpy(x, target, **options)
    assert_close(grad, fd_gradient(public_loss, x), F64, scale=FD_SCALE, err_msg="public numpy")


# --- logsumexp and the softmax family against scipy ------------------------------------


@pytest.mark.parametrize("shape", [(7,), (5, 4), (2, 3, 6), (4, 1), (0, 3), (3, 200)], ids=str)
@pytest.mark.parametrize("spread", [1.0, 30.0, 1e4])
def test_logsumexp_and_softmax_match_scipy(rng, shape, spread):
    x = rng.standard_normal(shape) * spread
    if x.size and shape[-1] > 2:
        x[..., 1] = -np.inf  # a masked class: exp(-inf) = 0 in the sum
    exp_lse = special.logsumexp(x, axis=-1)
    assert_close(ref.logsumexp(x), exp_lse, F64, err_msg="reference logsumexp")
    assert_close(fx.logsumexp(x, backend="numpy"), exp_lse, F64, err_msg="public logsumexp")
    exp_lsm = special.log_softmax(x, axis=-1)
    assert_close(ref.log_softmax(x), exp_lsm, F64, err_msg="reference log_softmax")
    assert_close(fx.log_softmax(x, backend="numpy"), exp_lsm, F64, err_msg="public log_softmax")
    assert_close(fx.softmax(x, backend="numpy"), special.softmax(x, axis=-1), F64, err_msg="public softmax")


def test_logsumexp_huge_values_are_exact():
    x = np.array([[1e4, -1e4], [1e300, 1e300], [-1e300, -1e300], [709.0, 709.0]])
    expected = special.logsumexp(x, axis=-1)
    assert np.all(np.isfinite(expected))
    assert_close(ref.logsumexp(x), expected, F64)
    assert ref.logsumexp(x)[0] == 1e4


@pytest.mark.parametrize("which", ["reference", "public"])
def test_logsumexp_all_neg_inf_row_matches_scipy(which):
    x = np.array([[-np.inf, -np.inf], [0.0, 1.0]])
    expected = special.logsumexp(x, axis=-1)
    assert expected[0] == -np.inf
    got = ref.logsumexp(x) if which == "reference" else fx.logsumexp(x, backend="numpy")
    assert_close(got, expected, F64)


# --- cases chosen to catch a wrong formula ------------------------------------------------


def both(x, target, **options):
    """(loss, grad) from the reference and from the public numpy API, as a list."""
    return [ref.cross_entropy(x, target, **options), fx.cross_entropy_with_grad(x, target, backend="numpy", **options)]


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_weighted_mean_divides_by_kept_target_weights(ignore_index):
    """Index targets, "mean": D = sum_i k_i w[y_i], the kept rows' target weights.

    Uniform logits make each row's loss w[y_i] log 2, so the sum is 9 log 2 and only D = 9
    gives log 2: dividing by N (4), by the kept count (3) or by W (5) gives 9/4, 3 or 9/5
    times log 2. ignore_index = -1 also catches reading w[y_i] for ignored rows (w[-1] = 4
    would make D = 13)."""
    x = np.zeros((4, 2))
    y = np.array([0, 1, 1, ignore_index])
    w = np.array([1.0, 4.0])
    for loss, grad in both(x, y, weight=w, ignore_index=ignore_index):
        assert_close(loss, LOG2, F64)
        # row i: w[y_i] (p - onehot) / D with p = (1/2, 1/2)
        assert_close(grad, np.array([[-1, 1], [4, -4], [4, -4], [0, 0]]) / 18, F64)


def test_probability_mean_divides_by_n_even_with_weights():
    """Probability targets, "mean": divide by N = 2, not by sum_i sum_c w_c t_ic = 5."""
    x = np.zeros((2, 2))
    t = np.array([[1.0, 0.0], [0.0, 1.0]])
    w = np.array([1.0, 4.0])
    for loss, grad in both(x, t, weight=w):
        assert_close(loss, 2.5 * LOG2, F64)  # (log 2 + 4 log 2) / 2; by 5 it would be log 2
        # p * sum_k w_k t_k - w t, over N: row 0 (1/2 - 1, 1/2) / 2, row 1 (2, 2 - 4) / 2
        assert_close(grad, np.array([[-0.25, 0.25], [1.0, -1.0]]), F64)


def test_smoothing_weights_each_class_by_its_own_weight():
    """eps/C * sum_c w_c (lse - x_c): each class weighted by w_c (not w[y], not unweighted),
    and under "mean" the smoothing term is divided by the same D as the rest."""
    x = np.log(np.array([[1.0, 2.0, 5.0], [1.0, 2.0, 5.0]]))  # lse = log 8, p = (1, 2, 5) / 8
    y = np.array([0, 2])
    w = np.array([1.0, 2.0, 3.0])
    eps = 0.3
    gap = [math.log(8.0), math.log(4.0), math.log(8.0 / 5.0)]  # lse - x_c
    smooth = eps / 3 * sum(wc * g for wc, g in zip(w, gap, strict=True))
    rows = [(1 - eps) * 1.0 * gap[0] + smooth, (1 - eps) * 3.0 * gap[2] + smooth]
    wrong_rows = [  # smoothing weighted by w[y_i] instead of w_c: another number
        (1 - eps) * 1.0 * gap[0] + eps / 3 * 1.0 * sum(gap),
        (1 - eps) * 3.0 * gap[2] + eps / 3 * 3.0 * sum(gap),
    ]
    p = np.array([1.0, 2.0, 5.0]) / 8
    grad0 = (1 - eps) * 1.0 * (p - [1, 0, 0]) + eps / 3 * (w.sum() * p - w)
    grad1 = (1 - eps) * 3.0 * (p - [0, 0, 1]) + eps / 3 * (w.sum() * p - w)
    for reduction, expected, denominator in (
        ("none", rows, 1.0),
        ("sum", sum(rows), 1.0),
        ("mean", sum(rows) / 4, 4.0),
    ):
        for loss, grad in both(x, y, weight=w, label_smoothing=eps, reduction=reduction):
            assert_close(loss, expected, F64, err_msg=reduction)
            assert not np.allclose(np.sum(loss), np.sum(wrong_rows) / denominator, rtol=1e-6)
            assert_close(grad, np.array([grad0, grad1]) / denominator, F64, err_msg=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets_are_not_normalised(rng, reduction, weighted):
    """Doubling t doubles loss and gradient (eps = 0): no hidden t / sum(t)."""
    x = rng.standard_normal((5, 4))
    t = rng.dirichlet(np.ones(4), size=5)
    w = rng.uniform(0.5, 2.0, 4) if weighted else None
    for (loss1, grad1), (loss2, grad2) in zip(
        both(x, t, weight=w, reduction=reduction), both(x, 2 * t, weight=w, reduction=reduction), strict=True
    ):
        assert_close(loss2, 2 * np.asarray(loss1), F64)
        assert_close(grad2, 2 * grad1, F64)
        assert np.all(np.abs(np.asarray(loss2) - np.asarray(loss1)) > 0.1 * np.abs(loss1))


def test_ignored_class_still_in_the_softmax_denominator():
    """ignore_index = 2 drops rows labelled 2, not class 2 from the other rows' softmax."""
    x = np.log(np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]]))  # p = (1/4, 1/4, 1/2)
    y = np.array([0, 2])
    for loss, grad in both(x, y, ignore_index=2, reduction="none"):
        assert_close(loss, [math.log(4.0), 0.0], F64)  # log 2 if class 2 were left out
        assert_close(grad, [[-0.75, 0.25, 0.5], [0.0, 0.0, 0.0]], F64)


def test_ignored_rows_never_read_their_label():
    """A label equal to ignore_index that is no class (1000) is never used as an index."""
    x = np.array([[0.0, 1.0, 2.0], [3.0, 1.0, 0.5]])
    w = np.array([1.0, 2.0, 3.0])
    for (loss, grad), (loss1, grad1) in zip(
        both(x, np.array([1, 1000]), weight=w, ignore_index=1000), both(x[:1], np.array([1]), weight=w), strict=True
    ):
        assert_close(loss, loss1, F64)
        assert_close(grad[0], grad1[0], F64)
        np.testing.assert_array_equal(grad[1], 0.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_full_smoothing_ignores_the_label_except_in_d(rng, weighted):
    """eps = 1: each row's loss is 1/C sum_c w_c (lse - x_c), whatever y_i; with weights
    "mean" still divides by D = sum_i w[y_i], which does depend on y (as PyTorch)."""
    x = rng.standard_normal((4, 3))
    w = np.array([0.5, 1.0, 3.0]) if weighted else None
    wv = np.ones(3) if w is None else w
    y1, y2 = np.array([0, 0, 1, 0]), np.array([2, 1, 2, 2])
    rows = [sum(wc * (hand_lse(r) - v) for wc, v in zip(wv.tolist(), r, strict=True)) / 3 for r in x.tolist()]
    for y in (y1, y2):
        for loss, _ in both(x, y, weight=w, label_smoothing=1.0, reduction="none"):
            assert_close(loss, rows, F64)
        for loss, _ in both(x, y, weight=w, label_smoothing=1.0):
            assert_close(loss, sum(rows) / float(np.sum(wv[y])), F64)


@pytest.mark.parametrize("eps", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_index_equals_onehot_probability_per_row(rng, weighted, eps):
    """Per row, class index y and one-hot e_y agree for any eps and weights; "mean" differs
    only in the denominator (D for indices, N for probabilities)."""
    x = rng.standard_normal((6, 5))
    y = rng.integers(0, 5, 6)
    onehot = np.eye(5)[y]
    w = rng.uniform(0.5, 2.0, 5) if weighted else None
    options = {"weight": w, "label_smoothing": eps}
    for (li, gi), (lp, gp) in zip(
        both(x, y, reduction="none", **options), both(x, onehot, reduction="none", **options), strict=True
    ):
        assert_close(li, lp, F64)
        assert_close(gi, gp, F64)
    d = 6.0 if w is None else float(np.sum(w[y]))
    for (li, gi), (lp, gp) in zip(both(x, y, **options), both(x, onehot, **options), strict=True):
        assert_close(li * d, lp * 6.0, F64)
        assert_close(gi * d, gp * 6.0, F64)


def test_onehot_gradient_is_softmax_minus_y(rng):
    """The seed's dJ/dZ = Y_hat - Y: one-hot targets, no weights, "sum"."""
    x = rng.standard_normal((7, 5)) * 3
    y_onehot = np.eye(5)[rng.integers(0, 5, 7)]
    for _, grad in both(x, y_onehot, reduction="sum"):
        assert_close(grad, special.softmax(x, axis=-1) - y_onehot, F64)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_degenerate_denominators(weighted, eps):
    """All rows ignored, N = 0, or D = 0 (zero weights): mean NaN, sum 0, none zeros, and a
    zero (not NaN) gradient."""
    x = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    w = np.array([1.0, 2.0, 3.0]) if weighted else None
    cases = [(x, np.array([-100, -100]), w), (np.zeros((0, 3)), np.zeros(0, np.int64), w)]
    cases.append((np.zeros((0, 3)), np.zeros((0, 3)), w))
    if eps == 0.0:  # with eps > 0 "sum" and "none" get the smoothing term, checked below
        cases.append((x, np.array([0, 1]), np.array([0.0, 0.0, 1.0])))
    for xx, target, ww in cases:
        for reduction in REDUCTIONS:
            for loss, grad in both(xx, target, weight=ww, reduction=reduction, label_smoothing=eps):
                if reduction == "mean":
                    assert np.isnan(loss)
                else:
                    np.testing.assert_array_equal(loss, 0.0)
                    assert np.shape(loss) == (() if reduction == "sum" else xx.shape[:-1])
                np.testing.assert_array_equal(grad, np.zeros_like(xx))
    # D = 0 with smoothing: mean is NaN with a zero gradient, sum keeps the smoothing term
    zero_w = np.array([0.0, 0.0, 1.0])
    y = np.array([0, 1])
    for loss, grad in both(x, y, weight=zero_w, label_smoothing=0.1):
        assert np.isnan(loss)
        np.testing.assert_array_equal(grad, 0.0)
    exp_loss, exp_grad = hand_index(x, y, zero_w, -100, 0.1, "sum")
    for loss, grad in both(x, y, weight=zero_w, label_smoothing=0.1, reduction="sum"):
        assert loss > 0
        assert_close(loss, exp_loss, F64)
        assert_close(grad, exp_grad, F64)


def test_huge_logits_exact():
    x = np.array([[1e4, -1e4]])
    for target in (np.array([1]), np.array([[0.0, 1.0]])):
        for loss, grad in both(x, target):
            assert loss == 20000.0
            np.testing.assert_array_equal(grad, [[1.0, -1.0]])


# --- invariants (hypothesis) ------------------------------------------------------------

grid_logits = hnp.arrays(
    F64,
    st.tuples(st.integers(1, 5), st.integers(1, 6)),
    elements=st.integers(-5 * 2**10, 5 * 2**10).map(lambda k: k / 2**10),  # exact when shifted
)


@given(x=grid_logits, data=st.data())
def test_shift_invariance_per_row(x, data):
    n, n_classes = x.shape
    shift = np.array(data.draw(st.lists(st.integers(-8, 8), min_size=n, max_size=n)), F64)[:, None]
    y = np.array(data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    w = np.linspace(0.5, 2.0, n_classes)
    for (l1, g1), (l2, g2) in zip(
        both(x, y, weight=w, label_smoothing=0.1, reduction="none"),
        both(x + shift, y, weight=w, label_smoothing=0.1, reduction="none"),
        strict=True,
    ):
        assert_close(l2, l1, F64)
        assert_close(g2, g1, F64)


@given(x=grid_logits, data=st.data())
def test_cross_entropy_is_entropy_plus_kl(x, data):
    """Normalised t: CE(t, softmax x) = H(t) + KL(t || p), each from scipy."""
    t = data.draw(hnp.arrays(F64, x.shape, elements=st.floats(0.0, 1.0))) + 1e-3
    t /= t.sum(axis=-1, keepdims=True)
    p = special.softmax(x, axis=-1)
    expected = np.sum(special.entr(t), axis=-1) + np.sum(special.rel_entr(t, p), axis=-1)
    for loss, _ in both(x, t, reduction="none"):
        assert_close(loss, expected, F64)
        assert np.all(np.asarray(loss) >= 0)


@given(x=grid_logits, data=st.data())
def test_gradient_rows_sum_to_zero(x, data):
    """sum_c dl_i/dx_ic = 0 for every option (index: (1-eps) w_y (1-1) + eps/C (W-W); probability:
    A - A); ignored rows are exactly 0; losses are >= 0 with non-negative w and t."""
    n, n_classes = x.shape
    y = np.array(data.draw(st.lists(st.integers(-1, n_classes - 1), min_size=n, max_size=n)))
    t = data.draw(hnp.arrays(F64, x.shape, elements=st.floats(0.0, 2.0)))
    w = np.array(data.draw(st.lists(st.floats(0.0, 2.0), min_size=n_classes, max_size=n_classes)))
    eps = data.draw(st.sampled_from([0.0, 0.1, 1.0]))
    for target in (y, t):
        for loss, grad in both(x, target, weight=w, ignore_index=-1, label_smoothing=eps, reduction="none"):
            assert_close(grad.sum(axis=-1), np.zeros(n), F64)
            assert np.all(np.asarray(loss) >= 0)
            if target is y:
                np.testing.assert_array_equal(grad[y == -1], 0.0)
                np.testing.assert_array_equal(np.asarray(loss)[y == -1], 0.0)
