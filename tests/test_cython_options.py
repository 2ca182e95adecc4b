"""The Cython kernel's options of the loss (issue 10) through the public API, ``backend="cython"``:
z-loss, logit scale, tanh soft cap and ``return_stats``, alone and together, with weights,
ignore_index, label smoothing, both target kinds, every reduction, N-D input, ``out=`` and in
place, float32 and float64, against the float64 reference ``fastxent._reference.cross_entropy``.

Tolerances are relative to the largest magnitude of the expected array (``RTOL`` by dtype):
float32 computes x', the exponentials and the gradient in float32 (the soft cap's tanh is
1.5 ulp), so an element near 0 carries the absolute error of the largest one. The soft cap's
tanh itself is checked against a correctly rounded tanh over a dense grid, through the
extension's ``tanh_array`` (as tests/test_exp.py does for the exponential).

What the kernel must also guarantee, and is checked here bit for bit: loss only, loss and
gradient, ``out=`` and in place give the same numbers; asking for the statistics does not
change the loss or the gradient; 1 and 2 threads give the same numbers; every output element
is written (outputs NaN-filled beforehand) across the edges of the blocks of rows.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from fastxent import _dispatch, _reference
from fastxent._spec import N_OUTS, OUT_CORRECT, OUT_ENTROPY, OUT_LSE, OUT_Z, LossSpec

cy = _dispatch.KERNELS.get("cython")
pytestmark = pytest.mark.skipif(cy is None, reason=f"Cython backend not built: {_dispatch.UNAVAILABLE.get('cython')}")

DTYPES = (np.float32, np.float64)
REDUCTIONS = ("none", "sum", "mean")
#: the bound on |actual - expected|, relative to max |expected| over the compared array
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}

#: the options under test (``return_stats`` is asked for separately in every test)
OPTIONS = {
    "z_loss": {"z_loss": 0.05},
    "scale": {"logit_scale": 0.75},
    "softcap": {"softcap": 4.0},  # logits ~ N(0, 3): u = x / 4 lies on both sides of 0.625
    "scale+softcap": {"logit_scale": 1.7, "softcap": 2.5},
    "all": {"z_loss": 0.02, "logit_scale": 0.6, "softcap": 3.0},
    "stats only": {},
}
#: the other options of the loss, combined with each of the above
EXTRAS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "ignore+weight+smoothing": {"ignore": True, "weight": True, "label_smoothing": 0.2},
}


def _run(function, x, target, options, **kwargs):
    return function(x, target, backend="cython", **options, **kwargs)


def _inputs(rng, shape, kind, dtype, extras, lead=True):
    """Logits of ``shape`` (..., C) ~ N(0, 3), the target of ``kind`` (half the rows' targets
    lead by 5, so the accuracy is not 0) and the API's options from ``extras``."""
    n_classes = shape[-1]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    options = {}
    if "label_smoothing" in extras:
        options["label_smoothing"] = extras["label_smoothing"]
    if extras.get("weight"):
        options["weight"] = rng.uniform(0.2, 3.0, n_classes).astype(dtype)
    if kind == "index":
        target = rng.integers(0, n_classes, shape[:-1])
        if lead:
            rows = x.reshape(-1, n_classes)
            flat = target.reshape(-1)
            rows[::2][np.arange(rows[::2].shape[0]), flat[::2]] += 5
        if extras.get("ignore"):
            target.reshape(-1)[::5] = -100
    else:
        target = rng.dirichlet(np.ones(n_classes), shape[:-1]).astype(dtype)
    return x, target, options


def _reference_nd(x, target, options, reduction):
    """The float64 reference on (..., C) input, with the inputs as the API casts them (the
    weight and the probabilities in the logits' dtype): (loss, grad, stats) shaped like the
    API's results."""
    n_classes = x.shape[-1]
    batch = x.shape[:-1]
    x2 = x.astype(np.float64).reshape(-1, n_classes)
    if target.dtype.kind == "f":
        t2 = target.astype(x.dtype).astype(np.float64).reshape(-1, n_classes)
    else:
        t2 = target.astype(np.int64).reshape(-1)
    ref_options = {k: v for k, v in options.items() if k not in ("reduction", "return_stats")}
    if ref_options.get("weight") is not None:
        ref_options["weight"] = np.asarray(ref_options["weight"]).astype(x.dtype).astype(np.float64)
    loss, grad, stats = _reference.cross_entropy(x2, t2, reduction=reduction, return_stats=True, **ref_options)
    if reduction == "none":
        loss = loss.reshape(batch)
        stats["z_loss"] = np.asarray(stats["z_loss"]).reshape(batch)
    stats["lse"] = stats["lse"].reshape(batch)
    stats["entropy"] = stats["entropy"].reshape(batch)
    return loss, grad.reshape(x.shape), stats


def assert_matches(actual, expected, dtype, what):
    """Same shape; NaN where NaN and infinities equal; finite values within RTOL of the dtype
    times the largest finite |expected|."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_array_equal(np.isnan(a), np.isnan(e), err_msg=f"{what}: NaN pattern")
    infinite = np.isinf(e)
    np.testing.assert_array_equal(a[infinite], e[infinite], err_msg=f"{what}: infinities")
    finite = np.isfinite(e)
    if not finite.any():
        return
    scale = max(float(np.max(np.abs(e[finite]))), np.finfo(np.float64).tiny)
    error = np.abs(a[finite] - e[finite])
    worst = int(np.argmax(error))
    bound = RTOL[np.dtype(dtype)] * scale
    assert error[worst] <= bound, (
        f"{what}: |{a[finite][worst]!r} - {e[finite][worst]!r}| = {error[worst]:.3g} > {bound:.3g} "
        f"(RTOL x max |expected| = {scale:.3g})"
    )


def assert_stats_match(stats, expected, dtype, what):
    assert_matches(stats.lse, expected["lse"], dtype, f"{what}: lse")
    assert_matches(stats.entropy, expected["entropy"], dtype, f"{what}: entropy")
    assert_matches(stats.z_loss, expected["z_loss"], dtype, f"{what}: z_loss")
    if expected["accuracy"] is None:
        assert stats.accuracy is None, what
    else:  # a fraction of counts: exact (the inputs keep their argmax in float32)
        np.testing.assert_equal(stats.accuracy, expected["accuracy"], err_msg=f"{what}: accuracy")


def assert_same_bits(actual, expected, what):
    np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected), err_msg=what)


# --- every option, with every other, against the reference -------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("n_classes", [7, 40, 1000])
def test_options_match_reference(dtype, kind, reduction, option, extra, n_classes):
    """Loss, gradient and statistics against the float64 reference, on N-D input; loss only,
    loss and gradient, ``out=`` (NaN-filled) and in place give the same bits, the logits stay
    unchanged, and asking for the statistics changes neither the loss nor the gradient."""
    if kind == "probability" and EXTRAS[extra].get("ignore"):
        pytest.skip("ignore_index is for class indices")
    rng = np.random.default_rng(n_classes * 31 + len(option) + 7 * len(extra))
    x, target, options = _inputs(rng, (3, 9, n_classes), kind, dtype, EXTRAS[extra])
    options.update(OPTIONS[option], reduction=reduction)
    x_before = x.copy()
    what = f"{option}, {extra}, {kind}, {reduction}"

    loss, grad, stats = _run(fx.cross_entropy_with_grad, x, target, options, return_stats=True)
    expected_loss, expected_grad, expected_stats = _reference_nd(x, target, options, reduction)
    assert_matches(loss, expected_loss, dtype, f"{what}: loss")
    assert_matches(grad, expected_grad, dtype, f"{what}: grad")
    assert_stats_match(stats, expected_stats, dtype, what)
    assert grad.dtype == dtype and np.asarray(loss).dtype == dtype

    loss_only, stats_only = _run(fx.cross_entropy, x, target, options, return_stats=True)
    assert_same_bits(loss_only, loss, f"{what}: loss only vs loss and gradient")
    for field in ("lse", "entropy", "z_loss", "accuracy"):
        assert_same_bits(getattr(stats_only, field), getattr(stats, field), f"{what}: loss only, {field}")

    # the calls without return_stats: with z_loss or x' they run the same row code, and must
    # give the same bits; "stats only" without stats is the plain loss (for C <= 32 the lanes
    # layout, whose sums run in another order): within the tolerance of the reference
    def same(actual, reference, expected, name):
        if OPTIONS[option]:
            assert_same_bits(actual, reference, f"{what}: {name}")
        else:
            assert_matches(actual, expected, dtype, f"{what}: {name}")

    out = np.full_like(x, np.nan)
    loss_out, grad_out = _run(fx.cross_entropy_with_grad, x, target, options, out=out)
    assert grad_out is out
    same(loss_out, loss, expected_loss, "loss, out=")
    same(out, grad, expected_grad, "out=")
    same(_run(fx.cross_entropy_grad, x, target, options), grad, expected_grad, "gradient only")
    same(_run(fx.cross_entropy, x, target, options), loss, expected_loss, "loss only")
    np.testing.assert_array_equal(x, x_before, err_msg=f"{what}: the logits changed")

    x_in_place = x.copy()
    loss_in_place, grad_in_place = _run(fx.cross_entropy_with_grad, x_in_place, target, options, out=x_in_place)
    assert grad_in_place is x_in_place
    same(loss_in_place, loss, expected_loss, "in place loss")
    same(x_in_place, grad, expected_grad, "in place")
    x_in_place = x.copy()  # in place with the statistics: the row code of the stats itself
    result = _run(fx.cross_entropy_with_grad, x_in_place, target, options, out=x_in_place, return_stats=True)
    assert_same_bits(result[0], loss, f"{what}: in place with stats, loss")
    assert_same_bits(x_in_place, grad, f"{what}: in place with stats")
    for field in ("lse", "entropy", "z_loss", "accuracy"):
        assert_same_bits(getattr(result[2], field), getattr(stats, field), f"{what}: in place, {field}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [1, 2, 33])
def test_z_loss_and_stats_when_every_row_is_ignored(dtype, n_classes):
    """ "mean" over no kept row: NaN loss, zero gradient, the statistics still computed (the
    API runs the kernel without a gradient there); "sum": the z-loss of no row is 0."""
    rng = np.random.default_rng(n_classes)
    x = (rng.standard_normal((6, n_classes)) * 2).astype(dtype)
    y = np.full(6, -100)
    options = {"z_loss": 0.1, "softcap": 5.0}
    for reduction in ("mean", "sum", "none"):
        loss, grad, stats = _run(fx.cross_entropy_with_grad, x, y, options, reduction=reduction, return_stats=True)
        expected_loss, expected_grad, expected_stats = _reference_nd(x, y, options, reduction)
        assert_matches(loss, expected_loss, dtype, f"{reduction}: loss")
        assert_matches(grad, expected_grad, dtype, f"{reduction}: grad")
        assert np.all(grad == 0)
        assert_stats_match(stats, expected_stats, dtype, reduction)
        assert np.isfinite(stats.lse).all() and np.isfinite(stats.entropy).all()


# --- special logits ---------------------------------------------------------------------


def _special_logits(dtype, n_classes, cap_scale):
    """Rows with -inf, +inf and NaN logits, an all -inf row, huge logits that saturate the
    cap, and a dense sweep of u = x a / c across 0.625 (the tanh's two formulas)."""
    rng = np.random.default_rng(n_classes)
    rows = []
    row = rng.standard_normal(n_classes) * 3
    row[::3] = -np.inf  # masked classes
    rows.append(row)
    row = rng.standard_normal(n_classes) * 3
    row[n_classes // 2] = np.inf
    rows.append(row)
    row = rng.standard_normal(n_classes) * 3
    row[n_classes - 1] = np.nan
    rows.append(row)
    rows.append(np.full(n_classes, -np.inf))
    row = rng.choice([-1e4, 1e4, -1e30, 1e30], n_classes)  # saturated: x' = +-c exactly, ties
    rows.append(row)
    sweep = np.linspace(-1.3, 1.3, 12 * n_classes) / cap_scale  # u in [-1.3, 1.3]
    rows.extend(sweep.reshape(12, n_classes))
    rows.extend(np.linspace(0.6, 0.65, 4 * n_classes).reshape(4, n_classes) / cap_scale)
    return np.array(rows).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("n_classes", [3, 17, 64, 100])
@pytest.mark.parametrize(
    "options",
    [{"softcap": 2.0}, {"softcap": 30.0, "logit_scale": 0.5}, {"logit_scale": 3.0}, {"softcap": 1.0, "z_loss": 0.1}],
    ids=["cap 2", "cap 30, scale 0.5", "scale 3", "cap 1 + z"],
)
def test_special_logits_match_reference(dtype, kind, n_classes, options):
    """Per row ("none"), NaN and inf exactly where the reference has them, the rest within
    the tolerance: with a cap, -inf logits become -c and +inf ones c (finite rows)."""
    cap_scale = options.get("logit_scale", 1.0) / options.get("softcap", 1.0)
    x = _special_logits(dtype, n_classes, cap_scale)
    rng = np.random.default_rng(n_classes + 1)
    if kind == "index":
        target = rng.integers(0, n_classes, x.shape[0])
        target[x.shape[0] - 1] = -100
    else:
        target = rng.dirichlet(np.ones(n_classes), x.shape[0]).astype(dtype)
    for reduction in REDUCTIONS:
        loss, grad, stats = _run(fx.cross_entropy_with_grad, x, target, options, reduction=reduction, return_stats=True)
        expected_loss, expected_grad, expected_stats = _reference_nd(x, target, options, reduction)
        what = f"{options} {kind} {reduction}"
        assert_matches(loss, expected_loss, dtype, f"{what}: loss")
        assert_matches(grad, expected_grad, dtype, f"{what}: grad")
        assert_stats_match(stats, expected_stats, dtype, what)
        if "softcap" in options:  # the infinities are capped: only the NaN row is NaN
            assert np.isnan(stats.lse).sum() == 1 and np.isnan(stats.lse[2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [5, 40, 1000])
def test_accuracy_takes_the_first_argmax_and_nan_as_the_max(dtype, n_classes):
    """One row per call (accuracy 0 or 1): ties go to the first index, a NaN is the max and
    the first NaN decides (torch.argmax); with a cap, +inf and huge logits tie at c."""
    rng = np.random.default_rng(n_classes)
    base = (rng.standard_normal(n_classes) - 10).astype(dtype)  # all below the planted maxima
    last, mid = n_classes - 1, n_classes // 2
    cases = []  # (row, target, expected accuracy, options)
    for position in sorted({0, 1, mid, last - 1, last}):
        row = base.copy()
        row[position] = 3
        cases.append((row, position, 1.0, {}))
        cases.append((row, (position + 1) % n_classes, 0.0, {}))
    row = base.copy()
    row[[1, mid, last]] = 3  # a tie: the first index wins
    cases += [(row, 1, 1.0, {}), (row, mid, 0.0, {}), (row, last, 0.0, {})]
    row = base.copy()
    row[[mid, last]] = np.nan  # the first NaN is the max
    row[0] = 3
    cases += [(row, mid, 1.0, {}), (row, 0, 0.0, {}), (row, last, 0.0, {})]
    row = base.copy()
    row[[1, last]] = np.inf  # a tie of +inf (the loss is NaN)
    cases += [(row, 1, 1.0, {}), (row, last, 0.0, {})]
    cases += [(row, 1, 1.0, {"softcap": 5.0}), (row, last, 0.0, {"softcap": 5.0})]
    row = base.copy()
    row[mid] = 1e30  # 1e30 and 1e4 both cap to exactly c: a tie
    row[last] = 1e4
    cases += [(row, mid, 1.0, {"softcap": 5.0}), (row, last, 0.0, {"softcap": 5.0}), (row, mid, 1.0, {})]
    cases.append((np.full(n_classes, -np.inf, dtype), 0, 1.0, {}))  # all equal: index 0
    cases.append((np.full(n_classes, -np.inf, dtype), last, 1.0 if last == 0 else 0.0, {}))
    for row, target, expected, options in cases:
        _, stats = _run(fx.cross_entropy, row.astype(dtype), np.int64(target), options, return_stats=True)
        reference = _reference.cross_entropy(
            row.astype(np.float64)[None], np.array([target]), return_stats=True, **options
        )[2]["accuracy"]
        assert reference == expected, (row, target, options)  # the case is what it says
        assert stats.accuracy == expected, f"row {row}, target {target}, {options}: {stats.accuracy}"


# --- the soft cap's tanh alone ------------------------------------------------------------


def _tanh_grid(dtype):
    """A dense grid of u: both formulas, their switch at 0.625, saturation, tiny values."""
    return np.concatenate(
        [
            np.linspace(-12, 12, 1_000_001),
            np.linspace(0.6, 0.65, 100_001),
            -np.linspace(0.6, 0.65, 100_001),
            np.geomspace(1e-30, 1.0, 20_001),
            -np.geomspace(1e-30, 1.0, 20_001),
            np.linspace(12, 400, 10_001),
        ]
    ).astype(dtype)


def _exact_tanh(u):
    """tanh(u) far beyond u's precision: float64 for float32, long double (x87) for float64."""
    if u.dtype == np.float32:
        return np.tanh(u.astype(np.float64))
    return np.tanh(u.astype(np.longdouble))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_accuracy(dtype):
    """|fast_tanh(u) - tanh(u)| in ulps of the result: <= 1 on |u| < 0.625 (the polynomial;
    measured 0.69 float32, 0.76 float64) and <= 2 beyond ((1 - E) / (1 + E): measured 1.5);
    a mean under 0.6 ulp. A polynomial coefficient off by 1e-4 relative (float32) or 2e-11
    (float64) fails."""
    if dtype == np.float64 and np.finfo(np.longdouble).nmant < 63:
        pytest.skip("needs an extended long double for the float64 reference")
    u = _tanh_grid(dtype)
    out = np.full_like(u, np.nan)
    cy.tanh_array(u, out)
    exact = _exact_tanh(u)
    spacing = np.spacing(np.abs(exact).astype(dtype)).astype(exact.dtype)
    ulps = (np.abs(out.astype(exact.dtype) - exact) / spacing).astype(np.float64)
    small = np.abs(u) < 0.625
    worst_small, worst_big = float(np.max(ulps[small])), float(np.max(ulps[~small]))
    assert worst_small <= 1.0, f"{worst_small:.3f} ulp at u = {u[small][np.argmax(ulps[small])]!r}"
    assert worst_big <= 2.0, f"{worst_big:.3f} ulp at u = {u[~small][np.argmax(ulps[~small])]!r}"
    assert float(np.mean(ulps)) < 0.6


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_special_values_and_symmetry(dtype):
    """tanh(+-inf) = +-1 exactly (a -inf logit becomes -c), NaN stays NaN, 0 gives 0, the
    saturated range gives +-1 exactly, and tanh is odd bit for bit."""
    u = np.array([np.inf, -np.inf, np.nan, 0.0, 30.0, -30.0, 1e30, -1e30], dtype)
    out = np.full_like(u, 7.0)
    cy.tanh_array(u, out)
    np.testing.assert_array_equal(out, np.array([1, -1, np.nan, 0, 1, -1, 1, -1], dtype))
    grid = _tanh_grid(dtype)
    positive, negative = np.empty_like(grid), np.empty_like(grid)
    cy.tanh_array(np.abs(grid), positive)
    cy.tanh_array(-np.abs(grid), negative)
    np.testing.assert_array_equal(negative, -positive)
    assert np.all(np.abs(positive) <= 1)


# --- every element written, across block edges, and thread counts ------------------------


def _rows_per_block(n_classes: int) -> int:
    rows = max(1, cy.BLOCK_ELEMENTS // n_classes)
    return rows - rows % cy.LANES if rows >= cy.LANES else rows


WRITTEN_OPTIONS = [
    {"z_loss": 0.01},
    {"softcap": 3.0},
    {"logit_scale": 0.5, "return_stats": True},
    {"return_stats": True},
    {"z_loss": 0.01, "softcap": 3.0, "return_stats": True},
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("n_classes", [1, 10, 33, 130])
@pytest.mark.parametrize("options", WRITTEN_OPTIONS, ids=lambda o: "+".join(o))
def test_every_output_element_is_written(dtype, kind, n_classes, options):
    """Finite logits over two blocks of rows, a partial block and a partial lane group: no
    NaN left in the loss, ``out=`` (NaN-filled), in place (the logits overwritten), or the
    statistics (which the API fills with NaN before the kernel runs); the per-row losses
    against the reference."""
    rng = np.random.default_rng(n_classes)
    n = 2 * _rows_per_block(n_classes) + cy.LANES + 3
    x = rng.standard_normal((n, n_classes)).astype(dtype)
    if kind == "index":
        target = rng.integers(0, n_classes, n)
        target[::7] = -100
    else:
        target = rng.dirichlet(np.ones(n_classes), n).astype(dtype)
    options = dict(options, reduction="none")
    stats_wanted = options.get("return_stats", False)
    out = np.full_like(x, np.nan)
    result = _run(fx.cross_entropy_with_grad, x, target, options, out=out)
    loss = result[0]
    assert not np.isnan(loss).any(), f"rows {np.flatnonzero(np.isnan(loss))[:8]} of {n}: loss never written"
    unwritten = np.isnan(out).any(axis=1)
    assert not unwritten.any(), f"rows {np.flatnonzero(unwritten)[:8]} of {n}: gradient never written"
    if stats_wanted:
        stats = result[2]
        for name in ("lse", "entropy", "z_loss"):
            bad = np.isnan(np.asarray(getattr(stats, name)))
            assert not bad.any(), f"rows {np.flatnonzero(bad)[:8]} of {n}: {name} never written"
    in_place = x.copy()
    _run(fx.cross_entropy_with_grad, in_place, target, options, out=in_place)
    assert not np.isnan(in_place).any()
    expected_loss = _reference_nd(x, target, {k: v for k, v in options.items() if k != "return_stats"}, "none")[0]
    assert_matches(loss, expected_loss, dtype, "loss")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("n_classes", [10, 1000])
def test_thread_count_invariance_with_options(dtype, kind, n_classes):
    """1 and 2 OpenMP threads give the same bits with every option on."""
    if not cy.openmp_enabled():
        pytest.skip("built without OpenMP")
    rng = np.random.default_rng(n_classes)
    n = max(8, 300_000 // n_classes)
    x, target, options = _inputs(
        rng, (n, n_classes), kind, dtype, EXTRAS["ignore+weight+smoothing"] if kind == "index" else EXTRAS["weight"]
    )
    options.update(z_loss=0.03, logit_scale=0.9, softcap=4.0, reduction="none", return_stats=True)
    before = cy.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            cy.set_num_threads(threads)
            loss, grad, stats = _run(fx.cross_entropy_with_grad, x, target, options)
            results.append((loss, grad, stats.lse, stats.entropy, stats.z_loss, stats.accuracy))
    finally:
        cy.set_num_threads(before)
    for one, two in zip(*results, strict=True):
        np.testing.assert_array_equal(one, two)


# --- the backend interface: the row outputs' columns ----------------------------------------


def _backend_call(kind, x, target, spec_options, row_out, grad=None, n_kept=None):
    n, n_classes = x.shape
    spec = LossSpec.create(kind, reduction="sum", **spec_options)
    params = spec.params(n_classes=n_classes, weight_total=float(n_classes), grad_scale=1.0, weighted=False)
    loss = np.full(n, np.nan)
    weight = np.empty(0, x.dtype)
    function = cy.xent_index if kind == "index" else cy.xent_probability
    function(x, target, weight, params, loss, grad, row_out)
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", [3, 50])
@pytest.mark.parametrize("stats", [False, True])
def test_row_output_columns(dtype, n_classes, stats):
    """``row_out`` column by column: OUT_LSE and OUT_Z on every row (0 on ignored rows
    without stats); OUT_ENTROPY and OUT_CORRECT only with stats (else left as the caller's
    NaN); with stats, ignored rows carry their lse and entropy, and 0 for OUT_Z and
    OUT_CORRECT, loss and gradient."""
    rng = np.random.default_rng(n_classes)
    n = 100
    x = (rng.standard_normal((n, n_classes)) * 3).astype(dtype)
    y = rng.integers(0, n_classes, n)
    y[::4] = np.argmax(x[::4], axis=1)  # some rows right
    y[::3] = -100
    kept = y != -100
    row_out = np.full((n, N_OUTS), np.nan)
    grad = np.full_like(x, np.nan)
    options = {"z_loss": 0.5, "softcap": 6.0, "return_stats": stats}
    loss = _backend_call("index", x, y, options, row_out, grad)
    _, _, ref = _reference.cross_entropy(
        x.astype(np.float64), y, reduction="none", z_loss=0.5, softcap=6.0, return_stats=True
    )
    expected_lse = ref["lse"] if stats else np.where(kept, ref["lse"], 0.0)
    assert_matches(row_out[:, OUT_LSE], expected_lse, dtype, "OUT_LSE")
    assert_matches(row_out[:, OUT_Z], np.where(kept, 0.5 * ref["lse"] ** 2, 0.0), dtype, "OUT_Z")
    if stats:
        assert_matches(row_out[:, OUT_ENTROPY], ref["entropy"], dtype, "OUT_ENTROPY")
        x_capped = _reference.transform(x, 1.0, 6.0)[0]
        expected_correct = (kept & (np.argmax(x_capped, axis=1) == y)).astype(np.float64)
        np.testing.assert_array_equal(row_out[:, OUT_CORRECT], expected_correct)
        assert expected_correct.sum() >= 10
    else:
        assert np.isnan(row_out[:, OUT_ENTROPY]).all() and np.isnan(row_out[:, OUT_CORRECT]).all()
    assert np.all(loss[~kept] == 0) and np.all(grad[~kept] == 0)
    assert not np.isnan(loss).any() and not np.isnan(grad).any()


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_probability_rows_are_all_kept(kind):
    """Probability targets: every row's z term, OUT_CORRECT 0 (no class to be right about)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 9)).astype(np.float32)
    row_out = np.full((40, N_OUTS), np.nan)
    if kind == "index":
        target = np.argmax(x, axis=1)
    else:
        target = np.eye(9, dtype=np.float32)[np.argmax(x, axis=1)]
    _backend_call(kind, x, target, {"z_loss": 1.0, "return_stats": True}, row_out)
    assert np.all(row_out[:, OUT_Z] > 0)
    np.testing.assert_array_equal(row_out[:, OUT_CORRECT], 1.0 if kind == "index" else 0.0)


def test_row_output_columns_and_record_are_the_spec_s():
    """The extension's OUT_* columns and its Params struct are those of ``_spec``."""
    from fastxent._spec import Params

    assert (cy.OUT_LSE, cy.OUT_Z, cy.OUT_ENTROPY, cy.OUT_CORRECT) == (OUT_LSE, OUT_Z, OUT_ENTROPY, OUT_CORRECT)
    assert len(cy.extension.OUT_COLUMNS) == N_OUTS
    assert tuple(cy.extension.PARAMS_FIELDS) == Params._fields


def test_row_outputs_need_row_out_and_the_row_layout():
    """The backend refuses row outputs without an (n, N_OUTS) array to write them to, and the
    extension refuses the options in the probability targets' lanes layout and the
    class-shard modes (which have no code for them); the class-index lanes layout has them."""
    x = np.zeros((4, 3), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="row_out"):
        _backend_call("index", x, y, {"z_loss": 0.1}, None)
    with pytest.raises(ValueError, match="row_out"):
        _backend_call("index", x, y, {"z_loss": 0.1}, np.empty((3, N_OUTS)))
    params = LossSpec.create("probability", softcap=2.0).params(
        n_classes=3, weight_total=3.0, grad_scale=1.0, weighted=False
    )
    with pytest.raises(ValueError, match="lanes layout"):
        cy.extension.xent_probability(
            x, np.full((4, 3), 1 / 3, np.float32), np.ones(3, np.float32), params, cy.LOSS, True, np.empty(4),
            np.empty((1, 1), np.float32), np.empty((1, 5)),
        )  # fmt: skip
    params = LossSpec.create("index", softcap=2.0).params(n_classes=3, weight_total=3.0, grad_scale=1.0, weighted=False)
    with pytest.raises(ValueError, match="LOSS, GRAD and IN_PLACE only"):  # nor in the class-shard modes
        cy.extension.xent_index(
            x, y, np.ones(3, np.float32), params, cy.STATS, False, np.empty(4), np.empty((1, 1), np.float32),
            np.empty((4, 5)),
        )  # fmt: skip


@pytest.mark.parametrize("n_classes", [1, 3, 10, 17, 32])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "options",
    [
        {"softcap": 3.0, "z_loss": 1e-3, "return_stats": True},
        {"logit_scale": 0.7, "label_smoothing": 0.1, "return_stats": True},
        {"softcap": 2.0, "logit_scale": 1.5, "weighted": True},
        {"z_loss": 0.5, "return_stats": True, "weighted": True, "label_smoothing": 0.2},
    ],
)
def test_lanes_and_rows_agree_with_options(n_classes, dtype, options):
    """The class-index lanes layout with the options of the loss against the row layout of the
    same extension (forced through its ``lanes`` argument), every mode: the same losses,
    gradients and row outputs up to the order of the float64 sums; awkward rows (a NaN, a
    +inf, ties for the max, a row of -inf, ignored rows) at lane-group edges."""
    rng = np.random.default_rng(n_classes)
    n = 3 * 32 + 5  # three whole lane groups and a partial one
    x = (3 * rng.standard_normal((n, n_classes))).astype(dtype)
    y = rng.integers(0, n_classes, n)
    y[rng.random(n) < 0.2] = -100
    x[31, 0] = np.nan
    x[32, -1] = np.inf
    x[33, :] = -np.inf
    x[63, :] = 1.0  # every class ties: the first index is the argmax
    y[63] = 0
    x[64, :] = 2.0
    y[64] = n_classes - 1  # ... and not the last (unless C = 1)
    weighted = options.get("weighted", False)
    weight = (rng.random(n_classes) + 0.5).astype(dtype) if weighted else np.empty(0, dtype)
    spec_options = {k: v for k, v in options.items() if k not in ("weighted", "return_stats")}
    spec = LossSpec.create("index", return_stats=options.get("return_stats", False), **spec_options)
    weight_total = float(weight.sum()) if weighted else float(n_classes)
    params = spec.params(n_classes=n_classes, weight_total=weight_total, grad_scale=1.0 / n, weighted=weighted)
    results = {}
    for lanes in (True, False):
        for mode in (cy.LOSS, cy.GRAD, cy.IN_PLACE):
            loss, rowdata = np.empty(n), np.full((n, N_OUTS), 7.0)
            grad = x.copy() if mode == cy.IN_PLACE else np.empty_like(x)
            source = grad if mode == cy.IN_PLACE else x
            cy.extension.xent_index(source, y, weight, params, mode, lanes, loss, grad, rowdata)
            results[lanes, mode] = loss, (grad if mode != cy.LOSS else None), rowdata
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for mode in (cy.LOSS, cy.GRAD, cy.IN_PLACE):
        lanes_loss, lanes_grad, lanes_rows = results[True, mode]
        rows_loss, rows_grad, rows_rows = results[False, mode]
        np.testing.assert_allclose(lanes_loss, rows_loss, rtol=tolerance, atol=tolerance)
        if params.row_outputs:
            columns = [OUT_LSE, OUT_Z] + ([OUT_ENTROPY] if params.stats else [])
            np.testing.assert_allclose(lanes_rows[:, columns], rows_rows[:, columns], rtol=tolerance, atol=tolerance)
            if params.stats:  # exactly: the same first argmax
                np.testing.assert_array_equal(lanes_rows[:, OUT_CORRECT], rows_rows[:, OUT_CORRECT])
        if lanes_grad is not None:
            np.testing.assert_allclose(lanes_grad, rows_grad, rtol=tolerance, atol=tolerance)
            assert np.all(lanes_grad[y == -100] == 0) and not np.signbit(lanes_grad[y == -100]).any()
    # loss only, loss+grad and in place: the same bits within the lanes layout
    for mode in (cy.GRAD, cy.IN_PLACE):
        np.testing.assert_array_equal(results[True, mode][0], results[True, cy.LOSS][0])
        np.testing.assert_array_equal(results[True, mode][2], results[True, cy.LOSS][2])
    np.testing.assert_array_equal(results[True, cy.IN_PLACE][1], results[True, cy.GRAD][1])
