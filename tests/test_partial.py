"""The public partial API (fastxent.partial, also fx.row_stats etc.): class shards' row
statistics merge exactly, and the loss and each shard's gradient from the merged statistics
equal the fused kernel's on the whole logits, to float64 rounding, for any split of the
classes and of the rows, with every option (weight, ignore_index, label smoothing,
probability targets, z_loss, logit_scale, softcap) and every reduction."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st

import fastxent as fx
from fastxent import _shards

pytestmark = pytest.mark.skipif(
    not any(name in BACKENDS for name in _shards.SHARD_BACKENDS), reason="the shard phases run on numba or cython"
)

OPTIONS = {
    "plain": {},
    "weight+smoothing": {"weight": "random", "label_smoothing": 0.2},
    "z+scale": {"z_loss": 1e-2, "logit_scale": 1.7},
    "cap+z+weight+smoothing": {"softcap": 5.0, "z_loss": 3e-3, "weight": "random", "label_smoothing": 0.1},
}
STATS_KEYS = ("weight", "label_smoothing", "logit_scale", "softcap", "ignore_index")
LOSS_KEYS = ("weight", "label_smoothing", "z_loss", "ignore_index")


def _options(name, n_classes, rng):
    options = dict(OPTIONS[name])
    if options.get("weight") == "random":
        options["weight"] = rng.random(n_classes) + 0.5
    return options


def _pick(options, keys):
    return {k: v for k, v in options.items() if k in keys}


def _problem(rng, shape, n_classes, kind):
    x = 4 * rng.standard_normal((*shape, n_classes))
    if kind == "index":
        target = rng.integers(0, n_classes, shape)
        target.reshape(-1)[::5] = -100
    else:
        target = rng.random((*shape, n_classes))
        target /= target.sum(-1, keepdims=True)
    return x, target


def _by_shards(x, target, cuts, order, reduction, options, denominators=None):
    """Loss and gradient through class shards [cuts[k], cuts[k+1]), merged in ``order``."""
    n_classes = x.shape[-1]
    bounds = list(zip(cuts[:-1], cuts[1:], strict=True))

    def shard_target(a, b):
        return target[..., a:b] if target.dtype.kind == "f" else target

    parts = [
        fx.row_stats(
            x[..., a:b], shard_target(a, b), class_start=a, num_classes=n_classes, **_pick(options, STATS_KEYS)
        )
        for a, b in (bounds[k] for k in order)
    ]
    stats = fx.merge_row_stats(*parts)
    assert stats.data.shape == (int(np.prod(x.shape[:-1])), 5)  # a few float64 per row cross over
    loss = fx.loss_from_stats(
        stats, target, reduction=reduction, denominators=denominators, **_pick(options, LOSS_KEYS)
    )
    grads = [
        fx.shard_grad(
            x[..., a:b],
            shard_target(a, b),
            stats,
            class_start=a,
            reduction=reduction,
            denominators=denominators,
            **options,
        )
        for a, b in bounds
    ]
    return loss, np.concatenate(grads, axis=-1)


def _cuts(rng, n_classes):
    k = int(rng.integers(1, min(n_classes, 5) + 1))
    return [0, *sorted(rng.choice(np.arange(1, n_classes), k - 1, replace=False).tolist()), n_classes], rng.permutation(
        k
    )


@pytest.mark.parametrize("n_classes", [2, 9, 300])
@pytest.mark.parametrize("option_set", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_any_class_split_gives_the_fused_answer(n_classes, option_set, reduction, kind):
    rng = np.random.default_rng(n_classes)
    x, target = _problem(rng, (48,), n_classes, kind)
    options = _options(option_set, n_classes, rng)
    expected_loss, expected_grad = fx.cross_entropy_with_grad(x, target, reduction=reduction, **options)
    for _trial in range(3):
        cuts, order = _cuts(rng, n_classes)
        loss, grad = _by_shards(x, target, cuts, order, reduction, options)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-13, atol=1e-15, err_msg=f"cuts {cuts}")
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15, err_msg=f"cuts {cuts}")


@pytest.mark.parametrize("option_set", list(OPTIONS))
def test_row_chunks_and_class_shards_with_the_global_denominators(option_set):
    """Rows split too: each chunk's "mean" with the totals of denominators(), summed over the
    chunks, is the whole batch's mean; the gradients stack to the whole gradient."""
    rng = np.random.default_rng(5)
    n_classes = 120
    x, y = _problem(rng, (50,), n_classes, "index")
    y[:13] = -100  # a chunk of ignored rows only
    options = _options(option_set, n_classes, rng)
    expected_loss, expected_grad = fx.cross_entropy_with_grad(x, y, **options)
    d, k = fx.denominators(y, weight=options.get("weight"))
    assert (d, k) == pytest.approx(
        tuple(
            np.add(
                fx.denominators(y[:20], weight=options.get("weight")),
                fx.denominators(y[20:], weight=options.get("weight")),
            )
        )
    )
    loss, grads = 0.0, []
    for r0, r1 in ((0, 13), (13, 31), (31, 50)):
        cuts, order = _cuts(rng, n_classes)
        chunk_loss, chunk_grad = _by_shards(x[r0:r1], y[r0:r1], cuts, order, "mean", options, denominators=(d, k))
        loss += chunk_loss
        grads.append(chunk_grad)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-13)
    np.testing.assert_allclose(np.concatenate(grads), expected_grad, rtol=1e-12, atol=1e-15)


def test_nd_logits_and_float32():
    rng = np.random.default_rng(2)
    x, y = _problem(rng, (3, 5), 40, "index")
    x = x.astype(np.float32)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    expected_loss, expected_grad = fx.cross_entropy_with_grad(x, y, reduction="none", **options)
    loss, grad = _by_shards(x, y, [0, 17, 40], [1, 0], "none", options)
    assert loss.shape == (3, 5) and grad.shape == x.shape and grad.dtype == np.float32
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    n_classes=st.integers(2, 60),
    data=st.data(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    option_set=st.sampled_from(list(OPTIONS)),
)
def test_hypothesis_splits(n_classes, data, reduction, option_set):
    rng = np.random.default_rng(n_classes)
    x, y = _problem(rng, (16,), n_classes, "index")
    options = _options(option_set, n_classes, rng)
    inner = data.draw(st.lists(st.integers(1, n_classes - 1), unique=True, max_size=4)) if n_classes > 1 else []
    cuts = [0, *sorted(inner), n_classes]
    order = data.draw(st.permutations(range(len(cuts) - 1)))
    expected_loss, expected_grad = fx.cross_entropy_with_grad(x, y, reduction=reduction, **options)
    loss, grad = _by_shards(x, y, cuts, order, reduction, options)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-15)


def test_a_masked_shard_and_the_stats_properties():
    rng = np.random.default_rng(4)
    x, y = _problem(rng, (10,), 30, "index")
    y[:] = rng.integers(0, 20, 10)
    x[:, 20:] = -np.inf  # the second shard is masked: it adds nothing
    left = fx.row_stats(x[:, :20], y, num_classes=30)
    right = fx.row_stats(x[:, 20:], y, class_start=20, num_classes=30)
    assert np.all(right.sum_exp == 0) and np.all(np.isneginf(right.max))
    merged = left.merge(right)
    np.testing.assert_allclose(merged.lse, fx.logsumexp(x), rtol=1e-15)
    np.testing.assert_allclose(fx.loss_from_stats(merged, y), fx.cross_entropy(x, y), rtol=1e-15)
    rebuilt = fx.RowStats.from_array(merged.data.tolist(), 30)
    np.testing.assert_array_equal(rebuilt.data, merged.data)
    assert not merged.data.flags.writeable


def test_errors_name_what_is_wrong():
    x = np.zeros((4, 10))
    y = np.array([1, 2, 31, 0])
    with pytest.raises(fx.TargetOutOfRangeError, match=r"target\[2\] = 31 is out of range"):
        fx.row_stats(x, y, num_classes=30)
    with pytest.raises(ValueError, match="exceed num_classes=12"):
        fx.row_stats(x, y % 10, class_start=5, num_classes=12)
    with pytest.raises(ValueError, match="weight must have shape"):
        fx.row_stats(x, y % 10, weight=np.ones(5))
    a = fx.row_stats(x, y % 10)
    b = fx.row_stats(x[:3], y[:3] % 10)
    with pytest.raises(ValueError, match="different computations"):
        fx.merge_row_stats(a, b)
    with pytest.raises(TypeError, match="RowStats"):
        fx.loss_from_stats(a.data, y % 10)
    with pytest.raises(ValueError, match="rows"):
        fx.RowStats.from_array(np.zeros((3, 4)), 10)
    with pytest.raises(ValueError, match="do not match"):
        fx.shard_grad(x[:2], y[:2] % 10, a)


def test_all_rows_ignored_mean_is_nan_with_a_zero_gradient():
    x = np.random.default_rng(0).standard_normal((3, 6))
    y = np.full(3, -100)
    stats = fx.row_stats(x, y)
    assert np.isnan(fx.loss_from_stats(stats, y))
    assert not fx.shard_grad(x, y, stats).any()
    assert np.isnan(fx.cross_entropy(x, y))  # as the fused call
