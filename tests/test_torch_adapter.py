"""``fastxent.torch``: the autograd adapter against ``torch.nn.functional.cross_entropy``.

Loss and gradient against PyTorch over the option matrix (reduction x target kind x weight x
ignore_index x label_smoothing x dtype x shape), ``gradcheck`` per option combination in
float64, a training run against ``torch.nn.CrossEntropyLoss``, the zero-copy and in-place
claims (by data pointer), the in-place guards, the loss-only path, the fallbacks to PyTorch
(other devices, soft targets that require grad, double backward) and the deprecated arguments.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastxent  # noqa: E402
import fastxent.torch as fxt  # noqa: E402

REDUCTIONS = ("mean", "sum", "none")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_IDS = ("f32", "f64", "f16", "bf16")
#: (rtol, atol) against PyTorch in float64 on the same values; half precisions are computed in
#: float32 and rounded once, so their error is a few units of the last place of the result
TOLERANCE = {
    torch.float64: (1e-12, 1e-14),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}
#: (N, C, d1, d2), (N, C), (C,): the class dim is dim 1 (dim 0 unbatched)
SHAPES = {"kdim": (2, 5, 3, 2), "2d": (7, 5), "unbatched": (5,)}
#: every combination of the options that interact; ignore_index only applies to class indices
OPTIONS = [
    (reduction, kind, weighted, ignore_index, eps)
    for reduction in REDUCTIONS
    for kind in ("index", "probability")
    for weighted in (False, True)
    for ignore_index in ((-100, 2) if kind == "index" else (-100,))
    for eps in (0.0, 0.1)
]


@pytest.fixture(autouse=True, scope="module")
def one_kernel_thread():
    """The inputs here are tiny: on a busy machine a 2-thread launch waits for a free core far
    longer than the work takes. One kernel thread keeps the file fast; the results are
    identical for any thread count (fixed-order reductions)."""
    before = fastxent.get_num_threads()
    fastxent.set_num_threads(1)
    yield
    fastxent.set_num_threads(before)


def option_id(option):
    reduction, kind, weighted, ignore_index, eps = option
    return f"{reduction}-{kind}-{'w' if weighted else 'now'}-ign{ignore_index}-eps{eps}"


def make_case(shape, kind, weighted, ignore_index, dtype, seed=0):
    """Logits (class dim 1), a target and a weight, exactly representable in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    n_classes = shape[0] if len(shape) == 1 else shape[1]
    x = (2.0 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    batch_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    if kind == "index":
        target = torch.randint(0, n_classes, batch_shape, generator=g)
        if ignore_index == 2 and target.numel() > 1:
            target.view(-1)[::3] = 2  # some rows ignored, the others kept
            target.view(-1)[1::3] = 0
    else:
        target = torch.rand(shape, generator=g, dtype=torch.float64).softmax(0 if len(shape) == 1 else 1).to(dtype)
    weight = torch.rand(n_classes, generator=g, dtype=torch.float64).add(0.25).to(dtype) if weighted else None
    return x, target, weight


def grad_seed(loss, seed=1):
    """A ``grad_output`` that is not all ones (scalar for "mean"/"sum", per row for "none")."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=g, dtype=torch.float64).add(0.5).to(loss.dtype)


def loss_and_grad(fn, x, target, weight, seed_from=None, **options):
    xr = x.detach().clone().requires_grad_()
    loss = fn(xr, target, weight, **options)
    seed = grad_seed(loss) if seed_from is None else seed_from.to(loss.dtype)
    loss.backward(seed)
    return loss.detach(), xr.grad, seed


def assert_close(actual, expected, dtype, what):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True, msg=what)


# --- loss and gradient against PyTorch -----------------------------------------------


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_matches_torch(option, dtype, shape_name):
    reduction, kind, weighted, ignore_index, eps = option
    x, target, weight = make_case(SHAPES[shape_name], kind, weighted, ignore_index, dtype)
    opts = {"ignore_index": ignore_index, "reduction": reduction, "label_smoothing": eps}
    loss, grad, seed = loss_and_grad(fxt.cross_entropy, x, target, weight, **opts)
    # the oracle: PyTorch in float64 on the very same values, the same grad_output
    t64 = target.double() if kind == "probability" else target
    w64 = None if weight is None else weight.double()
    exp_loss, exp_grad, _ = loss_and_grad(F.cross_entropy, x.double(), t64, w64, seed_from=seed.double(), **opts)

    assert loss.dtype == dtype and grad.dtype == dtype
    assert loss.shape == exp_loss.shape and grad.shape == x.shape
    assert_close(loss, exp_loss, dtype, "loss")
    assert_close(grad, exp_grad, dtype, "grad")
    if dtype in (torch.float16, torch.bfloat16):  # and PyTorch in that dtype, whose own error is larger
        own_loss, own_grad, _ = loss_and_grad(F.cross_entropy, x, target, weight, seed_from=seed, **opts)
        rtol, atol = TOLERANCE[dtype]
        torch.testing.assert_close(loss, own_loss, rtol=4 * rtol, atol=4 * atol, equal_nan=True)
        torch.testing.assert_close(grad, own_grad, rtol=4 * rtol, atol=4 * atol, equal_nan=True)
    # the loss-only path (no gradient wanted) gives the same loss
    with torch.no_grad():
        assert_close(fxt.cross_entropy(x, target, weight, **opts), loss, dtype, "loss only")


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("option", OPTIONS, ids=option_id)
def test_gradcheck(option, shape_name):
    reduction, kind, weighted, ignore_index, eps = option
    shape = {"kdim": (2, 3, 2, 2), "2d": (4, 3), "unbatched": (3,)}[shape_name]
    x, target, weight = make_case(shape, kind, weighted, ignore_index, torch.float64, seed=3)
    if kind == "index" and ignore_index == 2 and target.numel() == 1:
        target.fill_(1)  # a single ignored row makes "mean" NaN: nothing to check
    x.requires_grad_()

    def fn(logits):
        return fxt.cross_entropy(
            logits, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps
        )

    assert torch.autograd.gradcheck(fn, (x,))


def test_layouts_and_strides():
    """Non-contiguous, transposed and channels-last inputs give PyTorch's numbers."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 10, 4, generator=g)
    y2 = torch.randint(0, 5, (6,), generator=g)
    yk = torch.randint(0, 5, (2, 3, 4), generator=g)
    cases = [
        (base[:, ::2, 0], y2),  # (6, 5) strided
        (base[:, :5, 0].t().contiguous().t(), y2),  # (6, 5) column-major
        (torch.randn(2, 5, 3, 4, generator=g).to(memory_format=torch.channels_last), yk),
        (torch.randn(2, 3, 4, 5, generator=g).permute(0, 3, 1, 2), yk),  # class-last memory, no copy
    ]
    for x, y in cases:
        loss, grad, seed = loss_and_grad(fxt.cross_entropy, x, y, None, label_smoothing=0.05)
        exp_loss, exp_grad, _ = loss_and_grad(F.cross_entropy, x, y, None, seed_from=seed, label_smoothing=0.05)
        torch.testing.assert_close(loss, exp_loss)
        torch.testing.assert_close(grad, exp_grad)


def test_module_matches_torch_module_and_legacy_arguments():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (8,), generator=g)
    w = torch.rand(4, generator=g) + 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # size_average/reduce are deprecated
        variants = [
            {"weight": w, "ignore_index": 1, "label_smoothing": 0.2},
            {"reduction": "none"},
            {"size_average": False},  # -> "sum"
            {"reduce": False},  # -> "none"
            {"size_average": True, "reduce": True},  # -> "mean"
        ]
        for kwargs in variants:
            ours, theirs = fxt.CrossEntropyLoss(**kwargs), torch.nn.CrossEntropyLoss(**kwargs)
            assert isinstance(ours, torch.nn.CrossEntropyLoss)
            assert ours.reduction == theirs.reduction
            a, b = ours(x, y), theirs(x, y)
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0])
        # the functional form takes the same deprecated arguments, positionally too
        torch.testing.assert_close(fxt.cross_entropy(x, y, w, False, 1), F.cross_entropy(x, y, w, False, 1))
    module = fxt.CrossEntropyLoss(weight=w, inplace_backward=True)
    assert torch.equal(module.state_dict()["weight"], w)
    assert "inplace_backward=True" in repr(module)


# --- zero copy, in place, and its guards ---------------------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records the logits array, ``out`` and the gradient of every fused-kernel call."""
    calls = []
    original = fastxent.cross_entropy_with_grad

    def spy(logits, target, **kwargs):
        loss, grad = original(logits, target, **kwargs)
        calls.append({"logits": logits, "out": kwargs.get("out"), "grad": grad})
        return loss, grad

    monkeypatch.setattr(fastxent, "cross_entropy_with_grad", spy)
    return calls


def address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def test_2d_contiguous_input_is_not_copied(kernel_calls):
    x = torch.randn(64, 10, requires_grad=True)
    loss = fxt.cross_entropy(x, torch.randint(0, 10, (64,)))
    (call,) = kernel_calls
    assert address(call["logits"]) == x.data_ptr()  # the kernel read the input's own storage
    assert call["out"] is None
    loss.backward()
    assert x.grad.data_ptr() == address(call["grad"])  # and its gradient buffer became x.grad


def test_kdim_input_is_copied_once_and_gradient_written_over_the_copy(kernel_calls):
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    logits = x * 1.0  # a non-leaf, so the gradient reaches a hook unchanged
    seen = []
    logits.register_hook(seen.append)
    fxt.cross_entropy(logits, torch.randint(0, 5, (2, 3, 4))).backward()
    (call,) = kernel_calls
    assert call["out"] is call["logits"]  # in place in our class-last copy
    assert seen[0].data_ptr() == address(call["logits"])
    assert seen[0].movedim(1, -1).is_contiguous()  # handed on as a view, not copied back


def test_inplace_backward_shares_storage(kernel_calls):
    g = torch.Generator().manual_seed(7)
    h = torch.randn(16, 8, generator=g, requires_grad=True)
    lin = torch.nn.Linear(8, 12)
    y = torch.randint(0, 12, (16,), generator=g)
    h_ref, lin_ref = h.detach().clone().requires_grad_(), copy.deepcopy(lin)
    F.cross_entropy(lin_ref(h_ref), y, label_smoothing=0.1).mul(3.0).backward()

    logits = lin(h)
    seen = []
    logits.register_hook(seen.append)
    loss = fxt.CrossEntropyLoss(label_smoothing=0.1, inplace_backward=True)(logits, y)
    (call,) = kernel_calls
    assert address(call["out"]) == address(call["logits"]) == logits.data_ptr()
    assert address(call["grad"]) == logits.data_ptr()  # no new N x C buffer for the gradient
    loss.mul(3.0).backward()
    assert seen[0].data_ptr() == logits.data_ptr()  # the gradient autograd passes on IS the logits' storage
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(lin.weight.grad, lin_ref.weight.grad)
    torch.testing.assert_close(lin.bias.grad, lin_ref.bias.grad)


def test_inplace_backward_kdim_channels_last_and_none_reduction():
    x = torch.randn(2, 5, 3, 4).to(memory_format=torch.channels_last).requires_grad_()
    y = torch.randint(0, 5, (2, 3, 4))
    logits = x * 2.0  # preserves channels_last: class-last contiguous
    loss = fxt.cross_entropy(logits, y, reduction="none", inplace_backward=True)
    seed = torch.rand(loss.shape)
    loss.backward(seed)
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref * 2.0, y, reduction="none").backward(seed)
    torch.testing.assert_close(x.grad, x_ref.grad)


def nonleaf_logits(shape=(6, 5), dtype=torch.float32):
    w = torch.randn(shape, dtype=dtype, requires_grad=True)
    return w, w * 1.0


def test_inplace_guard_modified_between_forward_and_backward():
    _, logits = nonleaf_logits()
    loss = fxt.cross_entropy(logits, torch.randint(0, 5, (6,)), inplace_backward=True)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(fxt.InplaceBackwardError, match="modified in place"):
        loss.backward()
    # under saved-tensor hooks autograd does not check versions on unpack: the adapter still does
    _, logits = nonleaf_logits()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss = fxt.cross_entropy(logits, torch.randint(0, 5, (6,)), inplace_backward=True)
    with torch.no_grad():
        logits.add_(1.0)
    with pytest.raises(fxt.InplaceBackwardError, match="version 2, expected 1"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inplace_backward_16bit_words(dtype, reduction):
    """float16/bfloat16 logits with class indices: the gradient is written over the logits'
    own 16-bit storage, scaled in place by grad_output, and equals the out-of-place one."""
    pytest.importorskip("ml_dtypes")
    g = torch.Generator().manual_seed(3)
    h = torch.randn(12, 8, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(40, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 40, (12,), generator=g)
    grad_output = torch.tensor(3.0, dtype=dtype) if reduction == "mean" else torch.rand(12, generator=g).to(dtype)

    expected = None
    for inplace in (False, True):
        logits = h @ w.T
        seen: list[torch.Tensor] = []
        logits.register_hook(seen.append)
        loss = fxt.cross_entropy(logits, y, reduction=reduction, label_smoothing=0.1, inplace_backward=inplace)
        if inplace:
            assert not torch.equal(logits.detach(), (h @ w.T).detach())  # overwritten by the gradient
        loss.backward(grad_output)
        if inplace:
            assert seen[0].data_ptr() == logits.data_ptr() and seen[0].dtype == dtype
            assert torch.equal(seen[0].view(torch.int16), expected.view(torch.int16))
        else:
            expected = seen[0].detach().clone()
    reference = h.detach().float() @ w.float().T
    reference.requires_grad_()
    F.cross_entropy(reference, y, reduction=reduction, label_smoothing=0.1).backward(grad_output.float())
    torch.testing.assert_close(expected.float(), reference.grad, rtol=2e-2, atol=2e-3)


def test_inplace_guard_refuses_unsafe_inputs_at_forward():
    y = torch.randint(0, 5, (6,))
    w, logits = nonleaf_logits()
    with pytest.raises(fxt.InplaceBackwardError, match="leaf"):
        fxt.cross_entropy(w, y, inplace_backward=True)  # a leaf: user-visible storage
    with pytest.raises(fxt.InplaceBackwardError, match="leaf"):
        fxt.cross_entropy(w.view(6, 5), y, inplace_backward=True)  # a view of a leaf
    with pytest.raises(fxt.InplaceBackwardError, match="contiguous"):
        fxt.cross_entropy(logits.t().contiguous().t(), y, inplace_backward=True)
    with pytest.raises(fxt.InplaceBackwardError, match="contiguous"):  # (N, C, d) channels-first
        fxt.cross_entropy(torch.randn(2, 5, 3, requires_grad=True) * 1.0, y[:6].view(2, 3), inplace_backward=True)
    with pytest.raises(fxt.InplaceBackwardError, match="probability targets"):  # a float32 copy
        fxt.cross_entropy(logits.half(), torch.full((6, 5), 0.2, dtype=torch.half), inplace_backward=True)
    before = logits.detach().clone()
    with torch.no_grad():  # nothing to differentiate: the flag is ignored, the logits untouched
        fxt.cross_entropy(logits, y, inplace_backward=True)
    assert torch.equal(logits, before) and logits._version == 0


def test_inplace_guard_other_users_of_the_logits():
    y = torch.randint(0, 5, (6,))
    z = torch.randn(6, 5, requires_grad=True)
    logits = torch.tanh(z)  # tanh's backward needs its output: the logits
    loss = fxt.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    _, logits = nonleaf_logits()
    other = (logits * logits).sum()  # saved the logits before they were overwritten
    loss = fxt.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_retain_graph_and_double_backward():
    y = torch.randint(0, 5, (6,))
    w, logits = nonleaf_logits(dtype=torch.float64)
    expected = torch.autograd.grad(F.cross_entropy(w * 1.0, y), w)[0]
    loss = fxt.cross_entropy(logits, y, inplace_backward=True)
    loss.backward(torch.tensor(2.0, dtype=torch.float64), retain_graph=True)
    loss.backward(torch.tensor(2.0, dtype=torch.float64), retain_graph=True)  # the same scale: fine
    torch.testing.assert_close(w.grad, 4 * expected)
    with pytest.raises(fxt.InplaceBackwardError, match="different grad_output"):
        loss.backward(torch.tensor(3.0, dtype=torch.float64))
    w, logits = nonleaf_logits(dtype=torch.float64)
    expected = torch.autograd.grad(F.cross_entropy(w * 1.0, y), w)[0]
    loss = fxt.cross_entropy(logits, y, inplace_backward=True)
    loss.backward(retain_graph=True)  # scale 1: the buffer is handed out as is ...
    with pytest.raises(fxt.InplaceBackwardError, match="different grad_output"):
        loss.backward(torch.tensor(2.0, dtype=torch.float64))  # ... so it must not be rescaled
    torch.testing.assert_close(w.grad, expected)
    w, logits = nonleaf_logits(dtype=torch.float64)
    loss = fxt.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(fxt.InplaceBackwardError, match="double backward"):
        torch.autograd.grad(loss, w, create_graph=True)


# --- loss only, training, fallbacks --------------------------------------------------


def test_no_grad_computes_no_gradient(monkeypatch):
    calls = []
    monkeypatch.setattr(fastxent, "cross_entropy_with_grad", lambda *a, **k: calls.append(1))
    x = torch.randn(6, 5, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    expected = F.cross_entropy(x, y).detach()
    with torch.no_grad():
        a = fxt.cross_entropy(x, y)
    with torch.inference_mode():
        b = fxt.cross_entropy(x, y)
    c = fxt.cross_entropy(x.detach(), y)  # grad enabled, but nothing requires it
    assert not calls
    for loss in (a, b, c):
        assert not loss.requires_grad
        torch.testing.assert_close(loss, expected)


def test_training_tracks_torch():
    """A small MLP, 50 SGD steps: fastxent's module (plain and in place) follows torch's run."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(256, 20, generator=g)
    y = torch.randint(0, 5, (256,), generator=g)
    y[::17] = -1  # some ignored rows
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0])
    options = {"weight": weight, "ignore_index": -1, "label_smoothing": 0.1}
    runs = {
        "torch": torch.nn.CrossEntropyLoss(**options),
        "fastxent": fxt.CrossEntropyLoss(**options),
        "inplace": fxt.CrossEntropyLoss(**options, inplace_backward=True),
    }
    models = {name: copy.deepcopy(model) for name in runs}
    losses = {name: [] for name in runs}
    for name, criterion in runs.items():
        net = models[name]
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(50):
            opt.zero_grad()
            loss = criterion(net(X), y)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["torch"][-1] < 0.8 * losses["torch"][0]  # it did learn something
    for name in ("fastxent", "inplace"):
        np.testing.assert_allclose(losses[name], losses["torch"], rtol=1e-5, atol=1e-6)
        for p, q in zip(models[name].parameters(), models["torch"].parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.fixture
def torch_calls(monkeypatch):
    """Counts calls of PyTorch's own ``cross_entropy`` (the fallback)."""
    calls = []
    original = F.cross_entropy

    def spy(*args, **kwargs):
        calls.append(args[0].device.type)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)
    return calls


def test_fallback_other_devices(torch_calls):
    x = torch.randn(4, 3, device="meta", requires_grad=True)
    loss = fxt.cross_entropy(x, torch.zeros(4, dtype=torch.long, device="meta"))
    assert loss.device.type == "meta" and torch_calls == ["meta"]
    if torch.cuda.is_available():
        xc = torch.randn(4, 3, device="cuda", requires_grad=True)
        yc = torch.tensor([0, 1, 2, 1], device="cuda")
        torch.testing.assert_close(fxt.cross_entropy(xc, yc), F.cross_entropy(xc, yc))


def test_fallback_soft_target_requiring_grad_and_negative_smoothing(torch_calls):
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = fxt.cross_entropy(x, t, label_smoothing=0.1)
    expected = F.cross_entropy(x, t, label_smoothing=0.1)
    torch.testing.assert_close(torch.autograd.grad(loss, t)[0], torch.autograd.grad(expected, t)[0])
    y = torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(fxt.cross_entropy(x, y, label_smoothing=-0.5), F.cross_entropy(x, y))
    assert len(torch_calls) == 4


def test_fallback_under_torch_compile(monkeypatch):
    """Traced by ``torch.compile`` (the "eager" backend: dynamo without a C++ compile), the
    adapter sees ``_is_compiling()`` and hands the op to PyTorch; the numbers are PyTorch's."""
    seen = []
    is_compiling = fxt._is_compiling
    monkeypatch.setattr(fxt, "_is_compiling", lambda: seen.append(is_compiling()) or seen[-1])
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    compiled = torch.compile(lambda a: fxt.cross_entropy(a, y, label_smoothing=0.1), backend="eager")
    loss = compiled(x)
    expected = F.cross_entropy(x, y, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], torch.autograd.grad(expected, x)[0])
    assert seen and all(seen)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "reduction, kind, weighted, eps",
    [("mean", "index", True, 0.1), ("none", "index", False, 0.0), ("sum", "probability", True, 0.2)],
)
def test_double_backward_falls_back_to_torch(reduction, kind, weighted, eps):
    x, target, weight = make_case((3, 4), kind, weighted, -100, torch.float64, seed=9)
    x.requires_grad_()

    def fn(logits):
        return fxt.cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=eps)

    assert torch.autograd.gradgradcheck(fn, (x,))
    # a Hessian-vector product equals PyTorch's
    v = torch.randn(3, 4, dtype=torch.float64)
    hvp = []
    for f in (fn, lambda a: F.cross_entropy(a, target, weight, reduction=reduction, label_smoothing=eps)):
        (gx,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        hvp.append(torch.autograd.grad((gx * v).sum(), x)[0])
    torch.testing.assert_close(hvp[0], hvp[1])


def test_double_backward_after_released_graph_raises():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = fxt.cross_entropy(x, torch.tensor([0, 1, 2]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_errors_like_torch():
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(IndexError):
        fxt.cross_entropy(x, torch.tensor([0, 4, 1]))
    with pytest.raises(ValueError):
        fxt.cross_entropy(x, torch.tensor([0, 1, 1]), reduction="avg")
    with pytest.raises(RuntimeError):  # torch's own message, label_smoothing > 1
        fxt.cross_entropy(x, torch.tensor([0, 1, 1]), label_smoothing=1.5)


@pytest.mark.parametrize("ignore_index", [0, 1, 3])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_ignore_index_with_probability_targets_raises_as_torch(ignore_index, requires_grad):
    x = torch.randn(3, 4, requires_grad=requires_grad)
    target = torch.softmax(torch.randn(3, 4), 1)
    message = "ignore_index is not supported for floating point target"
    with pytest.raises(RuntimeError, match=message):  # torch's own check, the reference
        F.cross_entropy(x, target, ignore_index=ignore_index)
    with pytest.raises(RuntimeError, match=message):
        fxt.cross_entropy(x, target, ignore_index=ignore_index)
    with pytest.raises(RuntimeError, match=message):
        fxt.CrossEntropyLoss(ignore_index=ignore_index)(x, target)


def test_negative_ignore_index_with_probability_targets_is_accepted_as_torch():
    x = torch.randn(3, 4, dtype=torch.float64)
    target = torch.softmax(torch.randn(3, 4, dtype=torch.float64), 1)
    expected = F.cross_entropy(x, target, ignore_index=-5)
    torch.testing.assert_close(fxt.cross_entropy(x, target, ignore_index=-5), expected)
    torch.testing.assert_close(fxt.CrossEntropyLoss(ignore_index=-1)(x, target), expected)


def test_import_fastxent_does_not_import_torch():
    code = "import sys, fastxent; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(fastxent.__file__).parents[1])
