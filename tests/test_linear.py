"""The fused linear cross-entropy (fx.linear_cross_entropy[_with_grad], fastxent.torch.
linear_cross_entropy): the loss and all three gradients equal F.cross_entropy(h @ W.T + b, y)
and autograd in float64, with every option, any chunk size (not dividing N, ignored rows
across chunk edges, the weighted mean's denominator over all chunks), N-D leading dims, and
float32 / bfloat16 within their rounding."""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx

torch = pytest.importorskip("torch")
F = torch.nn.functional

OPTIONS = {
    "plain": {},
    "weight+smoothing+ignore": {"class_weight": "random", "label_smoothing": 0.1, "ignore_index": 2},
    "z+cap+scale": {"z_loss": 1e-2, "softcap": 3.0, "logit_scale": 1.3},
}


def problem(rng, lead=(29,), hidden=12, classes=40, dtype=np.float64):
    h = rng.standard_normal((*lead, hidden)).astype(dtype)
    w = (rng.standard_normal((classes, hidden)) * 0.7).astype(dtype)
    b = rng.standard_normal(classes).astype(dtype)
    y = rng.integers(0, classes, lead)
    y.reshape(-1)[3:11] = 2  # a run of one class: ignored rows across chunk edges
    return h, w, b, y


def options_for(name, rng, classes):
    options = dict(OPTIONS[name])
    if options.get("class_weight") == "random":
        options["class_weight"] = rng.random(classes) + 0.5
    return options


def torch_reference(h, w, b, y, reduction, options):
    """Loss and gradients by torch autograd in float64 (the z-loss, cap and scale by the
    formulas of docs/SEMANTICS.md)."""
    ht, wt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (h, w, b))
    logits = ht @ wt.T + bt
    scale, cap = options.get("logit_scale", 1.0), options.get("softcap")
    logits = cap * torch.tanh(scale * logits / cap) if cap else scale * logits
    cw = options.get("class_weight")
    ignore = options.get("ignore_index", -100)
    yt = torch.tensor(y)
    flat, flat_y = logits.reshape(-1, logits.shape[-1]), yt.reshape(-1)
    loss = F.cross_entropy(
        flat, flat_y, weight=None if cw is None else torch.tensor(cw), ignore_index=ignore,
        label_smoothing=options.get("label_smoothing", 0.0), reduction="none" if reduction == "none" else reduction,
    )  # fmt: skip
    z = options.get("z_loss", 0.0)
    if z:
        kept = flat_y != ignore
        z_rows = torch.where(kept, z * torch.logsumexp(flat, dim=1) ** 2, 0.0)
        loss = loss + (z_rows if reduction == "none" else z_rows.sum() / (kept.sum() if reduction == "mean" else 1))
    if reduction == "none":
        loss = loss.reshape(y.shape)
    loss.sum().backward()
    return loss.detach().numpy(), ht.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("option_set", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 29, 1000])
def test_equals_torch_autograd_in_float64(rng, option_set, reduction, chunk_rows):
    h, w, b, y = problem(rng)
    options = options_for(option_set, rng, w.shape[0])
    loss, dh, dw, db = fx.linear_cross_entropy_with_grad(
        h, w, y, bias=b, reduction=reduction, chunk_rows=chunk_rows, **options
    )
    ref_loss, ref_dh, ref_dw, ref_db = torch_reference(h, w, b, y, reduction, options)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12, atol=1e-14)
    for got, expected in ((dh, ref_dh), (dw, ref_dw), (db, ref_db)):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-14)
    alone = fx.linear_cross_entropy(h, w, y, bias=b, reduction=reduction, chunk_rows=chunk_rows, **options)
    np.testing.assert_allclose(alone, ref_loss, rtol=1e-12, atol=1e-14)


def test_without_bias_nd_and_all_ignored(rng):
    h, w, b, y = problem(rng, lead=(3, 5))
    loss, dh, dw = fx.linear_cross_entropy_with_grad(h, w, y, chunk_rows=4)
    ref_loss, ref_dh, ref_dw, _ = torch_reference(h, w, np.zeros_like(b), y, "mean", {})
    assert dh.shape == h.shape
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(dh, ref_dh, rtol=1e-11, atol=1e-14)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-11, atol=1e-14)
    y[...] = -100
    loss, dh, dw = fx.linear_cross_entropy_with_grad(h, w, y, chunk_rows=4)
    assert np.isnan(loss) and not dh.any() and not dw.any()


def test_float32_and_bfloat16(rng):
    h, w, b, y = problem(rng, classes=300)
    ref = torch_reference(h, w, b, y, "mean", {})
    got = fx.linear_cross_entropy_with_grad(
        h.astype(np.float32), w.astype(np.float32), y, bias=b.astype(np.float32), chunk_rows=5
    )
    assert all(g.dtype == np.float32 for g in got[1:])
    for a, e in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    hb, wb, bb = (a.astype(bf16) for a in (h, w, b))
    ref16 = torch_reference(*(a.astype(np.float64) for a in (hb, wb, bb)), y, "mean", {})
    got16 = fx.linear_cross_entropy_with_grad(hb, wb, y, bias=bb, chunk_rows=5)
    assert all(g.dtype == bf16 for g in got16[1:])
    for a, e in zip(got16, ref16, strict=True):  # float32 compute, one bfloat16 rounding at the end
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=2e-2, atol=2e-3)


def test_errors(rng):
    h, w, b, y = problem(rng)
    with pytest.raises(ValueError, match="H = weight.shape"):
        fx.linear_cross_entropy(h[:, :5], w, y)
    with pytest.raises(ValueError, match="bias must have shape"):
        fx.linear_cross_entropy(h, w, y, bias=b[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        fx.linear_cross_entropy(h, w, y, chunk_rows=0)
    y[4] = 99
    with pytest.raises(fx.TargetOutOfRangeError, match=r"target\[4\] = 99"):
        fx.linear_cross_entropy(h, w, y)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_adapter_autograd(rng, reduction):
    import fastxent.torch as fxt

    h, w, b, y = problem(rng)
    cw = rng.random(w.shape[0]) + 0.5
    inputs = [torch.tensor(a, requires_grad=True) for a in (h, w, b)]
    loss = fxt.linear_cross_entropy(
        inputs[0], inputs[1], torch.tensor(y), linear_bias=inputs[2], weight=torch.tensor(cw),
        reduction=reduction, label_smoothing=0.1, chunk_rows=6,
    )  # fmt: skip
    grad_output = torch.rand(loss.shape, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(2.5)
    loss.backward(grad_output)
    reference = [torch.tensor(a, requires_grad=True) for a in (h, w, b)]
    expected = F.cross_entropy(
        reference[0] @ reference[1].T + reference[2], torch.tensor(y), weight=torch.tensor(cw),
        reduction=reduction, label_smoothing=0.1,
    )  # fmt: skip
    expected.backward(grad_output)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    for got, want in zip(inputs, reference, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-11, atol=1e-14)
    module = fxt.LinearCrossEntropyLoss(reduction=reduction)
    assert module(inputs[0], inputs[1], torch.tensor(y)).shape == loss.shape


def test_torch_adapter_multiplies_with_torch(rng, monkeypatch):
    """fastxent.torch's chunks multiply with torch.mm / addmm_ (torch's BLAS and threads),
    not NumPy's: with NumPy's matmul made to fail, the adapter still runs and is exact."""
    import fastxent.torch as fxt

    def no_numpy_gemm(*args, **kwargs):
        raise AssertionError("the adapter must not use NumPy's GEMMs")

    from fastxent import _linear

    monkeypatch.setattr(_linear.NumpyGemms, "logits", no_numpy_gemm)
    monkeypatch.setattr(_linear.NumpyGemms, "accumulate", no_numpy_gemm)
    h, w, b, y = problem(rng)
    inputs = [torch.tensor(a, requires_grad=True) for a in (h, w, b)]
    loss = fxt.linear_cross_entropy(inputs[0], inputs[1], torch.tensor(y), linear_bias=inputs[2], chunk_rows=7)
    loss.backward()
    want_loss, *want_grads = torch_reference(h, w, b, y, "mean", {})
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=1e-12)
    for got, want in zip(inputs, want_grads, strict=True):
        np.testing.assert_allclose(got.grad.numpy(), want, rtol=1e-11, atol=1e-14)
    with pytest.raises(AssertionError, match="must not use NumPy"):
        fx.linear_cross_entropy(h, w, y)  # (the patch is live for the NumPy API)


def test_without_scipy_d_weight_accumulates_through_a_buffer(rng, monkeypatch):
    """The fallback without SciPy's in-place gemm (one V x H scratch) gives the same gradients."""
    from fastxent import _linear

    h, w, b, y = problem(rng)
    expected = fx.linear_cross_entropy_with_grad(h, w, y, bias=b, chunk_rows=7)
    original_init = _linear.NumpyGemms.__init__

    def without_scipy(self):
        original_init(self)
        self._blas = None

    monkeypatch.setattr(_linear.NumpyGemms, "__init__", without_scipy)
    got = fx.linear_cross_entropy_with_grad(h, w, y, bias=b, chunk_rows=7)
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-14)


def test_default_chunk_is_the_larger_of_64_mb_and_a_quarter_of_d_weight():
    """The default chunk of logits takes max(64 MB, V*H*4/4) bytes: a narrow head gets 64 MB
    of rows, a wide one a quarter of d_weight (long enough chunks for full-speed GEMMs), never
    more rows than there are, and an explicit chunk_rows wins."""
    from fastxent import _linear

    assert _linear._chunk_rows(None, 2048, 65536, 512) == (64 << 20) // (4 * 65536)  # 256
    assert _linear._chunk_rows(None, 8192, 128256, 2048) == (128256 * 2048) // (4 * 128256)  # 512
    assert _linear._chunk_rows(None, 29, 40, 12) == 29
    assert _linear._chunk_rows(7, 8192, 128256, 2048) == 7
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        _linear._chunk_rows(0, 10, 10, 10)


def test_numpy_blas_runs_on_fastxents_thread_count():
    """The NumPy path holds the BLAS libraries to fx.get_num_threads() for the chunk loop
    (threadpoolctl), and gives them back their count after."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fastxent import _linear

    def blas_threads():
        return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"}

    before_blas, before = blas_threads(), fx.get_num_threads()
    if not before_blas:
        pytest.skip("no BLAS library that threadpoolctl sees")
    fx.set_num_threads(1)
    try:
        with _linear.NumpyGemms.threads():
            assert set(blas_threads().values()) == {1}
    finally:
        fx.set_num_threads(before)
    assert blas_threads() == before_blas
