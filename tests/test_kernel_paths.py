"""Every lane, block edge and layout path of the kernels, through the public API only.

The kernels split their work in ways the caller cannot see: SIMD lanes across classes
(groups of 16 with a tail, and a different row-max loop for long rows), or, for few
classes, blocks of rows (lanes across rows, blocks of 16 rows, and larger groups of rows
per thread). A slip in one lane or at one block edge only shows on inputs whose outcome
depends on that lane or that row: random logits rarely do (the row max of random logits
sits in a random lane, and a moderate error in the max cancels out of ``lse``). So the
inputs here are built so that every position matters:

- a **far-ahead maximum in every class position**: row ``r`` has one column ``j`` that
  leads all others by a margin that overflows ``exp`` if the max is wrong (+100 for
  float32, +1000 for float64), with target ``j`` (loss ~0) or another class (loss ~margin),
  and, in other rows, a moderate lead (+3) so that every other term of the sum counts;
- **+inf, -inf and NaN in every class position** (masked classes are normal input), whose
  NaN/inf patterns must equal the reference's, in the loss, gradient and softmax family;
- for few classes, **every row position** of the first and last blocks, in batches of
  N rows around block edges (16, 32, 64, 128, 256 and 4096/C rows), with ignored and
  out-of-pattern rows at the edges, with weights, label smoothing, every reduction and
  class-index and probability targets.

Every call runs in each mode (loss only, gradient into a fresh array, ``out=`` into a
NaN-filled array, gradient only with ``out=``, in place ``out=logits``), is compared with
the float64 reference ``fastxent._reference`` within the tolerance table of conftest.py,
and must leave its input unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS, TOLERANCE

import fastxent as fx
from fastxent import _reference

DTYPES = (np.float32, np.float64)
REDUCTIONS = ("none", "sum", "mean")

#: a lead that makes exp overflow (float32: e^88.7; float64: e^709.8) if the max is wrong
BIG_LEAD = {np.dtype(np.float32): 100.0, np.dtype(np.float64): 1000.0}
#: a lead that keeps the unique max but lets every other class count in the sum
SMALL_LEAD = 3.0

#: class counts: every C up to 40 (the small-C layouts and their edges), then the edges
#: of the 16-lane groups (tail / no tail), of the long-row max (64) and of wider groups
CLASS_COUNTS = (*range(1, 41), 47, 48, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 1025)
#: class counts whose rows are handled in blocks of rows, for the row-position sweep
SMALL_CLASS_COUNTS = (2, 3, 10, 16, 17, 31, 32, 33)
#: the block sizes (in rows) whose edges are swept for few classes; plus 4096 // C
BLOCK_ROWS = (16, 32, 64, 128, 256)

#: (backend, C) for the class-count sweeps. The "numpy" backend is the reference itself
#: applied to the whole array (no lanes, no blocks): it is run up to C = 64 only, where it
#: costs little, to check the plumbing of every mode.
BACKEND_CLASS_COUNTS = [(b, c) for b in BACKENDS for c in CLASS_COUNTS if b != "numpy" or c <= 64]
#: the backends with lanes and blocks, for the row-position sweep
KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "numpy")


# --- checking ------------------------------------------------------------------------


def check(actual, expected, dtype, what):
    """``actual`` within the dtype's tolerance of ``expected`` elementwise; NaN must meet
    NaN and an infinity the same infinity. The message names the first bad indices."""
    a = np.atleast_1d(np.asarray(actual, np.float64))
    e = np.atleast_1d(np.asarray(expected, np.float64))
    assert a.shape == e.shape, f"{what}: shape {a.shape}, expected {e.shape}"
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    with np.errstate(invalid="ignore", over="ignore"):
        ok = np.abs(a - e) <= atol + rtol * np.abs(e)  # False where either is NaN
    special = ~np.isfinite(e)  # there only the same infinity or a NaN for a NaN will do
    if special.any():
        ok[special] = (a[special] == e[special]) | (np.isnan(a[special]) & np.isnan(e[special]))
    if not ok.all():
        bad = np.argwhere(~ok)
        detail = "; ".join(f"{tuple(int(k) for k in i)}: {a[tuple(i)]!r} vs {e[tuple(i)]!r}" for i in bad[:6])
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} differ from the reference: {detail}")


def poison_free_memory(x):
    """Allocate and free NaN-filled buffers the size of the per-row losses and of the
    gradient. The functions allocate their outputs with ``np.empty``, which usually reuses
    memory just freed: without this, a row a kernel forgot to write could hold the right
    value left there by the previous call on the same input, and pass."""
    np.full(x.shape[0], np.nan)
    np.full(x.shape, np.nan, x.dtype)


def check_all_modes(x, target, backend, what, *, every_reduction=True, **options):
    """Every mode of the cross-entropy against the reference, for every reduction; with
    ``every_reduction=False``, every mode for "none" (the per-row losses) and loss+grad and
    in place for "mean" (the gradient scale) only."""
    dtype = x.dtype
    x_before = x.copy()
    for reduction in REDUCTIONS if every_reduction else ("none", "mean"):
        every_mode = every_reduction or reduction == "none"
        expected_loss, expected_grad = _reference.cross_entropy(x, target, reduction=reduction, **options)
        kwargs = {"reduction": reduction, "backend": backend, **options}
        at = f"{what}, {reduction}"

        if every_mode:
            poison_free_memory(x)
            check(fx.cross_entropy(x, target, **kwargs), expected_loss, dtype, f"{at}, loss only")

        poison_free_memory(x)
        loss, grad = fx.cross_entropy_with_grad(x, target, **kwargs)
        check(loss, expected_loss, dtype, f"{at}, with_grad loss")
        check(grad, expected_grad, dtype, f"{at}, with_grad gradient")

        if every_mode:
            out = np.full_like(x, np.nan)
            poison_free_memory(x)
            loss, grad = fx.cross_entropy_with_grad(x, target, out=out, **kwargs)
            assert grad is out
            check(loss, expected_loss, dtype, f"{at}, out= loss")
            check(out, expected_grad, dtype, f"{at}, out= gradient")

            out = np.full_like(x, np.nan)
            assert fx.cross_entropy_grad(x, target, out=out, **kwargs) is out
            check(out, expected_grad, dtype, f"{at}, cross_entropy_grad out= gradient")

        in_place = x.copy()
        poison_free_memory(x)
        loss, grad = fx.cross_entropy_with_grad(in_place, target, out=in_place, **kwargs)
        assert grad is in_place
        check(loss, expected_loss, dtype, f"{at}, in place loss")
        check(in_place, expected_grad, dtype, f"{at}, in place gradient")
    np.testing.assert_array_equal(x, x_before, err_msg=f"{what}: logits modified")


def check_softmax_family(x, backend, what):
    """logsumexp, log_softmax and softmax (fresh, out=, in place) against the reference."""
    dtype = x.dtype
    expected_lse = _reference.logsumexp(x)
    expected_log_p = _reference.log_softmax(x)
    expected_p = np.exp(expected_log_p)
    check(fx.logsumexp(x, backend=backend), expected_lse, dtype, f"{what}, logsumexp")
    for name, function, expected in (
        ("log_softmax", fx.log_softmax, expected_log_p),
        ("softmax", fx.softmax, expected_p),
    ):
        check(function(x, backend=backend), expected, dtype, f"{what}, {name}")
        out = np.full_like(x, np.nan)
        assert function(x, out=out, backend=backend) is out
        check(out, expected, dtype, f"{what}, {name} out=")
        in_place = x.copy()
        assert function(in_place, out=in_place, backend=backend) is in_place
        check(in_place, expected, dtype, f"{what}, {name} in place")


# --- inputs --------------------------------------------------------------------------


def lead_positions(n_classes):
    """The class positions that get a special value: all of them for up to 160 classes;
    else the first and last 64 (two groups of 32 lanes at each end: the first lane
    groups, the tail and the groups before it) and 16 in the middle."""
    if n_classes <= 160:
        return np.arange(n_classes)
    middle = n_classes // 2
    return np.concatenate([np.arange(64), np.arange(middle - 8, middle + 8), np.arange(n_classes - 64, n_classes)])


def other_class(j, r, n_classes):
    """A class other than ``j`` (``j`` itself when there is only one), varied with ``r``."""
    if n_classes == 1:
        return np.zeros_like(j)
    return (j + 1 + r % (n_classes - 1)) % n_classes


def lead_rows(lead_col, big, hit, n_classes, dtype, rng):
    """Rows of uniform(-2, 2) logits whose column ``lead_col[r]`` leads the rest by the big
    or the small margin; targets ``lead_col`` where ``hit`` else another class."""
    n = lead_col.shape[0]
    r = np.arange(n)
    x = rng.uniform(-2.0, 2.0, (n, n_classes))
    margin = np.where(big, BIG_LEAD[np.dtype(dtype)], SMALL_LEAD)
    x[r, lead_col] = x.max(axis=1) + margin
    y = np.where(hit, lead_col, other_class(lead_col, r, n_classes)).astype(np.int64)
    return x.astype(dtype), y


def probability_targets(y, n_classes, dtype, rng):
    """Mostly on class ``y``, the rest spread at random over all classes (rows sum to 1)."""
    n = y.shape[0]
    soft = rng.random((n, n_classes))
    soft /= soft.sum(axis=1, keepdims=True)
    t = 0.4 * soft
    t[np.arange(n), y] += 0.6
    return t.astype(dtype)


def option_sets(n_classes, dtype, rng):
    """(name, options): none, and class weights with label smoothing."""
    weight = rng.uniform(0.25, 2.0, n_classes).astype(dtype)
    return (("plain", {}), ("weight+smoothing", {"weight": weight, "label_smoothing": 0.1}))


def check_lead_losses(x, y, backend, big, hit, what):
    """The per-row losses without options: never negative; ~0 where the target leads by the
    big margin, at least the margin where it trails by it. (The comparison with the
    reference implies this; these name the failure plainly.)"""
    poison_free_memory(x)
    loss = np.asarray(fx.cross_entropy(x, y, reduction="none", backend=backend), np.float64)
    bad = np.flatnonzero(~(loss >= 0))
    assert bad.size == 0, f"{what}: negative or NaN losses {loss[bad[:4]]} in rows {bad[:8]}"
    bad = np.flatnonzero(big & hit & ~(loss <= 1e-6))
    assert bad.size == 0, f"{what}: rows with a far-ahead target lose {loss[bad[:4]]} in rows {bad[:8]}"
    if x.shape[1] > 1:
        bad = np.flatnonzero(big & ~hit & ~(loss >= BIG_LEAD[x.dtype]))
        assert bad.size == 0, f"{what}: far-behind targets lose only {loss[bad[:4]]} in rows {bad[:8]}"


# --- a far-ahead max in every class position --------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "n_classes"), BACKEND_CLASS_COUNTS)
def test_far_ahead_max_in_every_position(backend, n_classes, dtype):
    """Four rows per class position j: column j leads by the big or the small margin, the
    target is j or another class. Row r has its max at ``positions[r % len(positions)]``."""
    rng = np.random.default_rng(1000 + n_classes)
    positions = lead_positions(n_classes)
    kinds = np.repeat(np.arange(4), positions.size)  # 0 big hit, 1 big miss, 2 small hit, 3 small miss
    lead_col = np.tile(positions, 4)
    big, hit = kinds < 2, kinds % 2 == 0
    x, y = lead_rows(lead_col, big, hit, n_classes, dtype, rng)
    what = f"C={n_classes} {np.dtype(dtype)} {backend}"

    check_lead_losses(x, y, backend, big, hit, what)
    for name, options in option_sets(n_classes, dtype, rng):
        check_all_modes(x, y, backend, f"{what}, index, {name}", every_reduction=False, **options)
        t = probability_targets(y, n_classes, dtype, rng)
        check_all_modes(x, t, backend, f"{what}, probability, {name}", every_reduction=False, **options)
    check_softmax_family(x, backend, what)


# --- +inf, -inf and NaN in every class position --------------------------------------


#: the special rows, one of each per class position j (see special_rows): kind -> target
SPECIAL_KINDS = {
    "-inf hit": "j",
    "-inf miss": "other",
    "+inf": "j",
    "nan": "other",
    "only j finite": "j",
    "+inf miss": "other",
    "j and next": "next",
    "-inf by lead": "next",
}
#: for wide rows (C > 160), the first five only, to keep the run time low
WIDE_SPECIAL_KINDS = tuple(SPECIAL_KINDS)[:5]


def special_rows(n_classes, dtype, rng):
    """Per class position j and kind, a row of uniform(-2, 2) logits with: -inf at j and
    target j (loss inf) or another class (finite); +inf at j (NaN; logsumexp inf); NaN at j;
    only j finite (target j: loss 0); +inf at j and another target; only j and the next
    class finite (target the next); -inf at j with a far-ahead max next to it. Then an all
    -inf row and an ignored +inf row. Returns logits and index targets."""
    positions = lead_positions(n_classes)
    kinds = tuple(SPECIAL_KINDS) if n_classes <= 160 else WIDE_SPECIAL_KINDS
    x = rng.uniform(-2.0, 2.0, (len(kinds), positions.size, n_classes))
    y = np.empty((len(kinds), positions.size), np.int64)
    p = np.arange(positions.size)
    j = positions
    nxt = (j + 1) % n_classes
    targets = {"j": j, "other": other_class(j, j, n_classes), "next": nxt}
    for k, kind in enumerate(kinds):
        rows = x[k]
        if kind in ("-inf hit", "-inf miss", "-inf by lead"):
            rows[p, j] = -np.inf
        elif kind in ("+inf", "+inf miss"):
            rows[p, j] = np.inf
        elif kind == "nan":
            rows[p, j] = np.nan
        else:  # only j (and the next class) finite
            rows[:] = -np.inf
            rows[p, j] = 0.5
            if kind == "j and next":
                rows[p, nxt] = -1.0
        if kind == "-inf by lead":
            rows[p, nxt] = BIG_LEAD[np.dtype(dtype)]
        y[k] = targets[SPECIAL_KINDS[kind]]
    extra = np.full((2, n_classes), -np.inf)
    extra[1, positions[-1]] = np.inf
    x = np.concatenate([x.reshape(-1, n_classes), extra]).astype(dtype)
    return x, np.concatenate([y.reshape(-1), [0, -100]]).astype(np.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("backend", "n_classes"), BACKEND_CLASS_COUNTS)
def test_infinities_in_every_position(backend, n_classes, dtype):
    rng = np.random.default_rng(2000 + n_classes)
    x, y = special_rows(n_classes, dtype, rng)
    what = f"C={n_classes} {np.dtype(dtype)} {backend}, specials"
    # the patterns themselves, per torch: -inf is a masked class, +inf makes the row NaN
    loss = fx.cross_entropy(x, y, reduction="none", backend=backend)
    pos_inf_row = np.isposinf(x).any(axis=1)
    nan_row = np.isnan(x).any(axis=1) | np.isneginf(x).all(axis=1) | pos_inf_row
    kept = y != -100
    assert np.isnan(loss[nan_row & kept]).all(), f"{what}: rows with +inf or NaN must give NaN"
    assert not np.isnan(loss[~nan_row]).any(), f"{what}: NaN loss in a row without +inf or NaN"
    lse = fx.logsumexp(x, backend=backend)
    assert np.isposinf(lse[pos_inf_row]).all(), f"{what}: logsumexp of a row holding +inf must be +inf"

    for name, options in option_sets(n_classes, dtype, rng):
        check_all_modes(x, y, backend, f"{what}, index, {name}", every_reduction=False, **options)
        t = probability_targets(np.where(kept, y, 0), n_classes, dtype, rng)
        t[1::2, :][np.arange(t[1::2].shape[0]), y[1::2] % n_classes] = 0  # zero mass on some -inf classes: NaN
        check_all_modes(x, t, backend, f"{what}, probability, {name}", every_reduction=False, **options)
    check_softmax_family(x, backend, what)


# --- every row position, around block edges (few classes) ------------------------------


def row_counts(n_classes):
    """N around the block edges of 16..256 rows, of 4096 // C rows, and 4097."""
    per_block = 4096 // n_classes
    counts = {1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 4097}
    counts |= {per_block - 1, per_block, per_block + 1, 2 * per_block + 1}
    return sorted(counts)


def edge_rows(n, n_classes):
    """(ignored, out_of_pattern) row indices: the last row of each block of 16..256 and
    4096 // C rows and the last row of the batch are ignored; the first row of the next
    block, the first row and the next-to-last row are out of pattern."""
    sizes = (*BLOCK_ROWS, 4096 // n_classes)
    ends = {b * k - 1 for b in sizes for k in range(1, n // b + 1)} | {n - 1}
    starts = ({b * k for b in sizes for k in range(1, n // b + 1)} | {0, n - 2}) - ends
    return np.array(sorted(r for r in ends if 0 <= r < n), np.intp), np.array(
        sorted(r for r in starts if 0 <= r < n), np.intp
    )


def blocked_lead_rows(n, n_classes, dtype, rng):
    """Far-ahead rows in which, over every 16-row block position p and every class j, all
    four kinds (big/small lead, target hit/miss) occur once N >= 64 C: row r = 16 q + p
    leads at column (p + q) % C; the kinds flip every C blocks."""
    r = np.arange(n)
    q, p = np.divmod(r, 16)
    lead_col = (p + q) % n_classes
    big = (r + q // n_classes) % 2 == 0
    hit = (r // 2 + q // (2 * n_classes)) % 2 == 0
    x, y = lead_rows(lead_col, big, hit, n_classes, dtype, rng)
    return x, y, big, hit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", SMALL_CLASS_COUNTS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_every_row_position_across_blocks(backend, n_classes, dtype):
    rng = np.random.default_rng(3000 + n_classes)
    weight = rng.uniform(0.25, 2.0, n_classes).astype(dtype)
    for n in row_counts(n_classes):
        what = f"C={n_classes} N={n} {np.dtype(dtype)} {backend}"
        x, y, big, hit = blocked_lead_rows(n, n_classes, dtype, rng)
        t = probability_targets(y, n_classes, dtype, rng)
        # the pure pattern: a far-ahead row at every row position
        check_lead_losses(x, y, backend, big, hit, what)
        check_all_modes(x, y, backend, f"{what}, index, plain")
        check_all_modes(x, t, backend, f"{what}, probability, plain")
        check_softmax_family(x, backend, what)

        # ignored rows (zero probability rows) and out-of-pattern rows at the block edges
        ignored, odd = edge_rows(n, n_classes)
        x[odd[::2]] = (3 * rng.standard_normal((odd[::2].size, n_classes))).astype(dtype)  # no clear max
        x[odd[1::2]] = dtype(0.25)  # all classes tie
        y[ignored] = -100
        t[ignored] = 0
        options = {"weight": weight, "label_smoothing": 0.1}
        check_all_modes(x, y, backend, f"{what}, index, edges, weight+smoothing", **options)
        check_all_modes(x, t, backend, f"{what}, probability, edges, weight+smoothing", **options)
        check_all_modes(x, y, backend, f"{what}, index, edges, plain")


# --- the extensions (z-loss, logit scale, soft cap, statistics) in every lane ------------

#: the extension sets: each turns on a different part of the kernels' option code
EXTENSION_SETS = {
    "z-loss": {"z_loss": 1e-3},
    "scale+stats": {"logit_scale": 0.7, "return_stats": True},
    "cap+z-loss+stats+smoothing+weight": {"softcap": 5.0, "z_loss": 1e-2, "return_stats": True, "label_smoothing": 0.1},
}


def check_extensions(x, y, backend, what, **options):
    """Each mode's loss, gradient and statistics (loss only, loss+grad, ``out=`` into a
    NaN-filled array, in place) against the reference."""
    dtype = x.dtype
    for reduction in ("none", "mean"):
        expected = _reference.cross_entropy(x, y, reduction=reduction, **options)
        kwargs = {"reduction": reduction, "backend": backend, **options}
        at = f"{what}, {reduction}"
        poison_free_memory(x)
        results = {"loss only": fx.cross_entropy(x, y, **kwargs)}
        results["loss+grad"] = fx.cross_entropy_with_grad(x, y, **kwargs)
        out = np.full_like(x, np.nan)
        results["out="] = fx.cross_entropy_with_grad(x, y, out=out, **kwargs)
        in_place = x.copy()
        results["in place"] = fx.cross_entropy_with_grad(in_place, y, out=in_place, **kwargs)
        check(results["loss+grad"][1], expected[1], dtype, f"{at}, gradient")
        check(out, expected[1], dtype, f"{at}, out= gradient")
        check(in_place, expected[1], dtype, f"{at}, in place gradient")
        for mode, result in results.items():
            loss = result[0] if options.get("return_stats") else (result if mode == "loss only" else result[0])
            check(loss, expected[0], dtype, f"{at}, {mode} loss")
            if options.get("return_stats"):
                stats = result[-1]
                for name in ("lse", "z_loss", "entropy"):
                    check(getattr(stats, name), expected[2][name], dtype, f"{at}, {mode} {name}")
                assert stats.accuracy == pytest.approx(expected[2]["accuracy"], abs=1e-12), f"{at}, {mode} accuracy"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_classes", SMALL_CLASS_COUNTS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_extensions_in_every_lane_and_row_position(backend, n_classes, dtype):
    """The extensions on rows whose far-ahead max, tie, +-inf or NaN sits in every class
    position, with ignored rows, across two lane groups and a partial one (numba runs 64
    rows across the lanes, Cython 32, both with the extensions since v2): the argmax test
    (first index of the max or of a NaN), the entropy, lse, the z-loss and the soft cap's
    chain rule all read every lane."""
    rng = np.random.default_rng(4000 + n_classes)
    n = 2 * 64 + 37
    x, y, _, _ = blocked_lead_rows(n, n_classes, dtype, rng)
    ignored, odd = edge_rows(n, n_classes)
    x[odd[1::2]] = dtype(0.25)  # all classes tie: the first is the argmax
    y[ignored] = -100
    specials, special_targets = special_rows(n_classes, dtype, rng)
    x = np.concatenate([x, specials])
    y = np.concatenate([y, special_targets])
    weight = rng.uniform(0.25, 2.0, n_classes).astype(dtype)
    for name, options in EXTENSION_SETS.items():
        if "label_smoothing" in options:  # (with class weights too)
            options = {**options, "weight": weight}
        check_extensions(x, y, backend, f"C={n_classes} {np.dtype(dtype)} {backend}, {name}", **options)
