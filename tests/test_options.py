"""The extensions PyTorch lacks (issue 10): z-loss, logit scale, tanh soft cap, row statistics.

Each backend against the float64 reference (``_reference.cross_entropy``), every option with
every existing one (weight, ignore_index, label smoothing, probability targets, the three
reductions, N-D input, out= and in place); the reference against the peers' own formulas
written in torch (Liger-Kernel's z-loss, flash-attention's logit scale, Gemma 2's soft cap,
torch.logsumexp / argmax / Categorical.entropy); the gradients by finite differences.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from conftest import TOLERANCE

import fastxent as fx
from fastxent import _reference

OPTIONS = {
    "z": {"z_loss": 1e-2},
    "scale": {"logit_scale": 0.7},
    "cap": {"softcap": 2.5},
    "all": {"z_loss": 0.1, "logit_scale": 1.6, "softcap": 3.0},
}
EXTRAS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 3},
    "smooth+weight+ignore": {"label_smoothing": 0.2, "weight": True, "ignore_index": 3},
}


def _problem(rng, shape, n_classes, kind, dtype, extras):
    x = (rng.normal(size=(*shape, n_classes)) * 3).astype(dtype)
    if kind == "index":
        target = rng.integers(0, n_classes, size=shape)
        if "ignore_index" in extras:
            target.reshape(-1)[::5] = extras["ignore_index"]
    else:
        target = rng.dirichlet(np.ones(n_classes), size=shape).astype(dtype)
    options = dict(extras)
    if options.pop("weight", False):
        options["weight"] = rng.uniform(0.2, 2.0, n_classes)
    if kind == "probability":
        options.pop("ignore_index", None)
    return x, target, options


def _reference_nd(x, target, **options):
    n_classes = x.shape[-1]
    x2 = x.astype(np.float64).reshape(-1, n_classes)
    t2 = target.astype(np.float64).reshape(-1, n_classes) if target.dtype.kind == "f" else target.reshape(-1)
    loss, grad, stats = _reference.cross_entropy(x2, t2, return_stats=True, **options)
    return loss, grad.reshape(x.shape), stats


def _close(actual, expected, dtype, *, what, scale=1.0):
    """Within the dtype's tolerance, the absolute part relative to the largest |expected|."""
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    expected = np.asarray(expected, np.float64)
    finite = expected[np.isfinite(expected)]
    size = float(np.max(np.abs(finite))) if finite.size else 1.0
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        expected,
        rtol=rtol * scale,
        atol=atol * scale * max(size, 1.0),
        equal_nan=True,
        err_msg=what,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_options_match_the_reference(backend, rng, option, extra, reduction, kind, dtype):
    shape = (3, 37) if extra == "plain" else (111,)  # N-D once; rows across block edges
    x, target, options = _problem(rng, shape, 11, kind, dtype, EXTRAS[extra])
    options.update(OPTIONS[option], reduction=reduction)
    loss, grad, stats = fx.cross_entropy_with_grad(x, target, backend=backend, return_stats=True, **options)
    ref_loss, ref_grad, ref_stats = _reference_nd(x, target, **options)
    scale = 4.0 if "softcap" in options else 1.0  # float32 tanh: two roundings more per logit
    _close(loss, np.reshape(ref_loss, np.shape(loss)), dtype, what="loss", scale=scale)
    _close(grad, ref_grad, dtype, what="grad", scale=scale)
    batch = x.shape[:-1]
    _close(stats.lse, ref_stats["lse"].reshape(batch), dtype, what="lse", scale=scale)
    _close(stats.entropy, ref_stats["entropy"].reshape(batch), dtype, what="entropy", scale=scale)
    _close(stats.z_loss, np.reshape(ref_stats["z_loss"], np.shape(stats.z_loss)), dtype, what="z_loss", scale=scale)
    assert stats.lse.dtype == np.float64 and stats.lse.shape == batch
    if kind == "index":
        assert stats.accuracy == pytest.approx(ref_stats["accuracy"], abs=1e-12)
    else:
        assert stats.accuracy is None
    # the loss alone, and the gradient alone, are the same numbers as from the fused call
    alone, alone_stats = fx.cross_entropy(x, target, backend=backend, return_stats=True, **options)
    np.testing.assert_array_equal(alone, loss)
    np.testing.assert_array_equal(alone_stats.entropy, stats.entropy)
    grad_only = fx.cross_entropy_grad(x, target, backend=backend, **options)
    np.testing.assert_array_equal(grad_only, grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [5, 300])
def test_in_place_and_out_match_with_options(backend, rng, dtype, n_classes):
    x, y, options = _problem(rng, (150,), n_classes, "index", dtype, {"ignore_index": 3, "weight": True})
    options.update(z_loss=0.05, softcap=2.0, logit_scale=1.3)
    loss, grad = fx.cross_entropy_with_grad(x, y, backend=backend, **options)
    out = np.full_like(x, np.nan)
    loss_out, grad_out = fx.cross_entropy_with_grad(x, y, backend=backend, out=out, **options)
    assert grad_out is out
    in_place = x.copy()
    loss_in, grad_in = fx.cross_entropy_with_grad(in_place, y, backend=backend, out=in_place, **options)
    assert grad_in is in_place
    np.testing.assert_array_equal(grad_out, grad)
    np.testing.assert_array_equal(grad_in, grad)
    assert loss_out == loss and loss_in == loss


def test_options_off_change_nothing(backend, rng):
    """The defaults are the plain loss, bit for bit (the lanes layout still runs at C <= 32)."""
    for n_classes in (10, 1000):
        x = rng.normal(size=(200, n_classes)).astype(np.float32)
        y = rng.integers(0, n_classes, 200)
        plain = fx.cross_entropy_with_grad(x, y, backend=backend)
        explicit = fx.cross_entropy_with_grad(x, y, backend=backend, z_loss=0.0, logit_scale=1.0, softcap=None)
        np.testing.assert_array_equal(plain[0], explicit[0])
        np.testing.assert_array_equal(plain[1], explicit[1])


# --- the reference against the peers' own formulas -------------------------------------

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_liger_loss(x, y, weight, ignore_index, z_loss, logit_scale, softcap, reduction):
    """Liger-Kernel's cross-entropy with z-loss (``lse_square_scale``) and soft cap,
    flash-attention's logit scale, as written in their forward: the loss on
    ``x' = c tanh(a x / c)``, plus ``s lse**2`` per kept row; "mean" divides the cross-entropy
    by the kept weight sum and the z-loss by the kept row count."""
    xt = logit_scale * x
    if softcap is not None:
        xt = softcap * torch.tanh(xt / softcap)
    kept = y != ignore_index
    ce = F.cross_entropy(xt, y, weight=weight, ignore_index=ignore_index, reduction="none")
    lse = torch.logsumexp(xt, dim=-1)
    z = torch.where(kept, z_loss * lse**2, torch.zeros_like(lse))
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return ce.sum() + z.sum()
    w_y = weight[torch.where(kept, y, 0)] if weight is not None else torch.ones_like(lse)
    return ce.sum() / (w_y * kept).sum() + z.sum() / kept.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_reference_matches_liger_and_flash_attention(rng, reduction, weighted):
    x = rng.normal(size=(64, 17)) * 4
    y = rng.integers(0, 17, 64)
    y[::6] = -100
    weight = rng.uniform(0.2, 2.0, 17) if weighted else None
    options = {"z_loss": 3e-2, "logit_scale": 1.7, "softcap": 5.0}
    xt = torch.tensor(x, requires_grad=True)
    peer = _torch_liger_loss(
        xt, torch.tensor(y), None if weight is None else torch.tensor(weight), -100, reduction=reduction, **options
    )
    peer.sum().backward()
    loss, grad = _reference.cross_entropy(x, y, weight=weight, reduction=reduction, **options)
    np.testing.assert_allclose(loss, peer.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_reference_statistics_match_torch(rng):
    x = rng.normal(size=(200, 9)) * 2
    x[7, [2, 5]] = 10.0  # a tie: the first index wins
    x[8, 3] = np.nan  # a NaN is the max
    y = rng.integers(0, 9, 200)
    y[7], y[8] = 2, 3
    y[::9] = -100
    xt = 1.2 * x
    _, _, stats = _reference.cross_entropy(x, y, logit_scale=1.2, return_stats=True)
    t = torch.tensor(xt)
    np.testing.assert_allclose(stats["lse"], torch.logsumexp(t, -1).numpy(), rtol=1e-13)
    fine = ~np.isnan(x).any(axis=1)
    entropy = torch.distributions.Categorical(logits=t[fine]).entropy().numpy()
    np.testing.assert_allclose(stats["entropy"][fine], entropy, rtol=1e-12, atol=1e-14)
    kept = y != -100
    correct = (torch.argmax(t, -1).numpy() == y) & kept
    assert stats["accuracy"] == correct.sum() / kept.sum()
    assert correct[7] and correct[8]


# --- gradients by finite differences ---------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_by_finite_differences(backend, rng, kind, reduction):
    x, target, options = _problem(rng, (6,), 7, kind, np.float64, {"weight": True, "label_smoothing": 0.1})
    if kind == "index":
        target[2] = options["ignore_index"] = 4
    options.update(z_loss=0.2, logit_scale=1.4, softcap=2.0, reduction=reduction)

    def loss_at(z):
        return float(fx.cross_entropy(z, target, backend=backend, **options))

    _, grad = fx.cross_entropy_with_grad(x, target, backend=backend, **options)
    h = 1e-6
    numeric = np.zeros_like(x)
    for index in itertools.product(range(x.shape[0]), range(x.shape[1])):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        numeric[index] = (loss_at(up) - loss_at(down)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# --- edges -------------------------------------------------------------------------------


def test_softcap_saturates_and_keeps_infinities_finite(backend):
    x = np.array([[np.inf, 0.0, -np.inf], [1e30, -1e30, 0.0], [np.nan, 0.0, 1.0]])
    y = np.array([0, 1, 2])
    loss, grad, stats = fx.cross_entropy_with_grad(
        x, y, softcap=3.0, reduction="none", backend=backend, return_stats=True
    )
    ref_loss, ref_grad, ref_stats = _reference.cross_entropy(x, y, softcap=3.0, reduction="none", return_stats=True)
    # x' = +-3: finite losses for the infinite logits, whose gradient is 0 (tanh' = 0)
    assert np.isfinite(loss[:2]).all() and np.isnan(loss[2])
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13, equal_nan=True)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15, equal_nan=True)
    assert abs(grad[0, 0]) < 1e-15 and abs(grad[0, 2]) < 1e-15  # (1 - th**2, th = x'/c rounded)
    np.testing.assert_allclose(stats.lse, ref_stats["lse"], rtol=1e-13, equal_nan=True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_classes", [3, 40, 300])
def test_logit_scale_keeps_masked_classes_at_zero_gradient(backend, dtype, n_classes):
    """A logit scale without a cap: ``x' = a x`` keeps -inf, whose softmax term and gradient
    are 0 (torch: ``F.cross_entropy(a * x, y)``), not ``0 * (a - a (x'/c)**2)`` = NaN."""
    x = np.tile(np.linspace(-1.0, 1.0, n_classes), (4, 1)).astype(dtype)
    x[:, 0] = -np.inf
    x[1, 1:] = -np.inf
    x[1, -1] = 0.5  # only the last class left
    y = np.array([n_classes - 1, n_classes - 1, 1, 2 % n_classes])
    for mode in ("out", "in place"):
        logits = x.copy()
        out = logits if mode == "in place" else np.full_like(x, np.nan)
        loss, grad = fx.cross_entropy_with_grad(logits, y, logit_scale=0.5, out=out, backend=backend)
        ref_loss, ref_grad = _reference.cross_entropy(x.astype(np.float64), y, logit_scale=0.5)
        assert np.isfinite(grad).all(), f"{mode}: non-finite gradient at {np.argwhere(~np.isfinite(grad))[:4]}"
        assert (grad[:, 0] == 0).all() and (grad[1, 1:-1] == 0).all()
        rtol, atol = TOLERANCE[np.dtype(dtype)]
        np.testing.assert_allclose(grad, ref_grad, rtol=rtol, atol=atol)
        np.testing.assert_allclose(loss, ref_loss, rtol=rtol)


def test_statistics_of_ignored_rows_and_all_ignored(backend, rng):
    x = rng.normal(size=(10, 4))
    y = np.full(10, -100)
    loss, grad, stats = fx.cross_entropy_with_grad(x, y, z_loss=0.1, backend=backend, return_stats=True)
    assert math.isnan(loss) and math.isnan(stats.accuracy) and math.isnan(stats.z_loss)
    assert not grad.any()
    np.testing.assert_allclose(stats.lse, _reference.logsumexp(x), rtol=1e-13)  # ignored rows too
    assert np.isfinite(stats.entropy).all()
    total, sum_stats = fx.cross_entropy(x, y, z_loss=0.1, reduction="sum", backend=backend, return_stats=True)
    assert total == 0 and sum_stats.z_loss == 0


@pytest.mark.parametrize("n_classes", [3, 40])
def test_non_finite_rows_with_z_loss(backend, rng, n_classes):
    """A kept row holding NaN or +inf has a NaN lse: its z-loss part ``s lse**2`` is NaN
    even for ``s = 0`` (the statistic is the formula, as the loss), while an IGNORED such
    row still gets loss 0 and gradient 0 (the z-loss gradient ``2 s lse p`` included):
    numba's row layout once reported 0 for the first, the reference NaN for the second."""
    x = rng.normal(size=(6, n_classes))
    x[1, 2] = np.nan
    x[4, 1] = np.inf
    y = np.array([0, 1, 2, 0, -100, 1])
    for z_loss in (0.0, 0.01):
        total, stats = fx.cross_entropy(x, y, z_loss=z_loss, backend=backend, return_stats=True, reduction="sum")
        assert math.isnan(total) and math.isnan(stats.z_loss), z_loss
        loss, grad = fx.cross_entropy_with_grad(x, y, z_loss=z_loss, backend=backend, reduction="none")
        assert loss[4] == 0 and not grad[4].any(), z_loss
        assert np.isnan(loss[1]) and np.isnan(grad[1]).all(), z_loss
        assert np.isfinite(loss[[0, 2, 3, 5]]).all() and np.isfinite(grad[[0, 2, 3, 5]]).all(), z_loss


def test_z_loss_mean_divides_by_kept_rows_not_weights(backend, rng):
    """Liger-Kernel's and flash-attention's convention: with class weights, the z-loss is
    still averaged over the rows, the cross-entropy over the weights."""
    x = rng.normal(size=(8, 3))
    y = np.array([0, 1, 2, 0, 1, 2, -100, -100])
    weight = np.array([1.0, 2.0, 4.0])
    base = fx.cross_entropy(x, y, weight=weight, backend=backend)
    with_z, stats = fx.cross_entropy(x, y, weight=weight, z_loss=0.5, backend=backend, return_stats=True)
    lse = _reference.logsumexp(x)[:6]
    assert stats.z_loss == pytest.approx(0.5 * np.mean(lse**2), rel=1e-12)
    assert with_z == pytest.approx(base + 0.5 * np.mean(lse**2), rel=1e-12)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("z_loss", -0.1, "z_loss must be >= 0"),
        ("z_loss", math.nan, "z_loss must be finite"),
        ("z_loss", "0.1", "z_loss must be a real number"),
        ("softcap", 0.0, "softcap must be None or > 0"),
        ("softcap", -2.0, "softcap must be None or > 0"),
        ("softcap", math.inf, "softcap must be finite"),
        ("logit_scale", math.inf, "logit_scale must be finite"),
        ("logit_scale", None, "logit_scale must be a real number"),
    ],
)
def test_invalid_options_are_rejected(option, value, message):
    with pytest.raises(ValueError, match=message):
        fx.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), **{option: value})


# --- the vectorised tanh ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_tanh_accuracy(dtype):
    kernels = pytest.importorskip("fastxent._numba_kernels")
    u = np.concatenate(
        [
            np.linspace(-12, 12, 200_001),
            np.geomspace(1e-30, 30, 20_001),
            -np.geomspace(1e-30, 30, 20_001),
            [0.625, -0.625, np.nextafter(0.625, 0), 0.0, -0.0, np.inf, -np.inf, 3e38],
        ]
    ).astype(dtype)
    out = np.empty_like(u)
    kernels.tanh_array(u, out)
    mp = pytest.importorskip("mpmath")
    exact = np.tanh(u.astype(np.float64))
    if dtype == np.float64:  # libm's tanh is itself within an ulp: spot-check it with mpmath
        for j in range(0, u.size, 997):
            exact[j] = float(mp.tanh(mp.mpf(float(u[j]))))
    ulps = np.abs(out.astype(np.float64) - exact) / np.spacing(np.abs(exact).astype(dtype)).astype(np.float64)
    assert ulps.max() <= 2.5, f"max error {ulps.max():.2f} ulp at u = {u[np.argmax(ulps)]!r}"
    assert np.isnan(kernels_nan(kernels, dtype))
    assert out[np.isposinf(u)][0] == 1 and out[np.isneginf(u)][0] == -1


def kernels_nan(kernels, dtype):
    out = np.empty(1, dtype)
    kernels.tanh_array(np.array([np.nan], dtype), out)
    return out[0]


# --- fastxent.torch -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(40, 9), (4, 9, 5)])
def test_torch_adapter_extensions_match_the_formula(rng, dtype, reduction, shape):
    import fastxent.torch as fxt

    x = torch.tensor(rng.normal(size=shape) * 3, dtype=dtype)
    target_shape = (shape[0],) + shape[2:]
    y = torch.tensor(rng.integers(0, 9, target_shape))
    y.view(-1)[::4] = -100
    weight = torch.tensor(rng.uniform(0.5, 2.0, 9), dtype=dtype)
    options = {"z_loss": 0.05, "logit_scale": 1.3, "softcap": 4.0}
    ours_x = x.clone().requires_grad_()
    ours = fxt.cross_entropy(ours_x, y, weight, reduction=reduction, label_smoothing=0.1, **options)
    peer_x = x.clone().requires_grad_()
    peer = fxt._torch_cross_entropy(peer_x, y, weight, -100, reduction, 0.1, (0.05, 1.3, 4.0))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, peer, rtol=rtol, atol=rtol)
    upstream = torch.linspace(0.5, 1.5, ours.numel(), dtype=dtype).reshape(ours.shape)
    ours.backward(upstream)
    peer.backward(upstream)
    torch.testing.assert_close(ours_x.grad, peer_x.grad, rtol=rtol * 10, atol=rtol * 1e-2)
    module = fxt.CrossEntropyLoss(weight, reduction=reduction, label_smoothing=0.1, **options)
    torch.testing.assert_close(module(x, y), ours.detach(), rtol=0, atol=0)
    assert "z_loss=0.05" in repr(module)


def test_torch_adapter_extensions_in_fallback_and_double_backward(rng):
    import fastxent.torch as fxt

    x = torch.tensor(rng.normal(size=(6, 5)), requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, -100])
    options = {"z_loss": 0.1, "logit_scale": 0.8, "softcap": 2.0}
    # soft targets that require grad send the call to PyTorch's ops: the same formula
    soft = torch.softmax(torch.tensor(rng.normal(size=(6, 5))), -1)
    fused = fxt.cross_entropy(x, soft, **options)
    fallback = fxt.cross_entropy(x, soft.clone().requires_grad_(), **options)
    torch.testing.assert_close(fused, fallback, rtol=1e-12, atol=0)
    assert torch.autograd.gradgradcheck(lambda z: fxt.cross_entropy(z, y, **options), (x,))
    with pytest.raises(ValueError, match="softcap must be None or > 0"):
        fxt.cross_entropy(x, y, softcap=0.0)
