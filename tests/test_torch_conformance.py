"""fastxent against ``torch.nn.functional.cross_entropy`` + autograd (the semantics' source).

The oracle is PyTorch in float64, fed the very values fastxent sees (float16/float32 inputs
are widened exactly), with the class axis moved to where torch wants it
(``x.reshape(-1, C)``, or ``movedim`` in one test). fastxent's result is compared within
the tolerance of the dtype it returns (``conftest.TOLERANCE``). The gradient is that of the
returned loss; for ``reduction="none"`` of the sum of the rows, as ``loss.sum().backward()``.

The matrix is sampled, not multiplied out: the options that interact (reduction x target
kind x weight x ignore_index x label_smoothing) are a full cross-product in float64; dtype,
label dtype, memory layout and shape each vary separately around it. Where docs/SEMANTICS.md
deliberately differs from PyTorch, the test asserts the spec and says so.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from conftest import assert_close  # noqa: E402

import fastxent as fx  # noqa: E402

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (np.float16, np.float32, np.float64)
LABEL_DTYPES = (np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64)
LAYOUTS = ("C", "F", "strided", "readonly", "memmap")
IGNORE_CASES = ("default_some_ignored", "class_2_ignored", "none_ignored")
TARGET_KINDS = ("index", "probability", "unnormalised", "onehot")


# --- the oracle ----------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def torch_one_thread():
    """The oracle's inputs are tiny: torch's intra-op pool only spins against numba's threads
    (measured 17 ms a call with 2 threads vs 0.5 ms with 1). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_ORACLE_CACHE: dict = {}


def _key(a):
    if a is None:
        return None
    a = np.asarray(a)
    return (a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes())


def torch_xent(x, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """``_torch_xent``, remembered: each test runs once per backend on the same inputs."""
    key = (_key(x), _key(target), _key(weight), int(ignore_index), reduction, float(label_smoothing))
    if key not in _ORACLE_CACHE:
        _ORACLE_CACHE[key] = _torch_xent(x, target, weight, ignore_index, reduction, label_smoothing)
    loss, grad = _ORACLE_CACHE[key]
    return loss.copy(), grad.copy()


def _torch_xent(x, target, weight, ignore_index, reduction, label_smoothing):
    """PyTorch's loss and gradient in float64 for class-last logits ``x`` (any shape (..., C)).

    Returns ``(loss, grad)`` as float64 NumPy: loss a 0-d array ("mean"/"sum") or of shape
    ``x.shape[:-1]`` ("none"); grad of ``x.shape``."""
    x64 = np.array(x, dtype=np.float64)
    n_classes = x64.shape[-1]
    xt = torch.tensor(x64.reshape(-1, n_classes), dtype=torch.float64, requires_grad=True)
    t = np.asarray(target)
    if t.dtype.kind == "f":
        tt = torch.tensor(np.array(t, dtype=np.float64).reshape(-1, n_classes))
        # torch raises "ignore_index is not supported for floating point target" for any
        # ignore_index >= 0, and so does fastxent (a ValueError): only negative ones come here
        assert ignore_index < 0
    else:  # torch takes only int64 (or uint8) class indices: widen, values unchanged
        tt = torch.tensor(np.array(t, dtype=np.int64).reshape(-1))
    wt = None if weight is None else torch.tensor(np.array(weight, dtype=np.float64))
    loss = F.cross_entropy(
        xt, tt, weight=wt, ignore_index=int(ignore_index), reduction=reduction, label_smoothing=label_smoothing
    )
    (loss.sum() if reduction == "none" else loss).backward()
    loss_np = loss.detach().numpy()
    if reduction == "none":
        loss_np = loss_np.reshape(x64.shape[:-1])
    grad = xt.grad.numpy().reshape(x64.shape) if xt.grad is not None else np.zeros(x64.shape)
    return loss_np, grad


def snapshot(*arrays):
    return [None if a is None else np.array(a, copy=True) for a in arrays]


def assert_unchanged(before, after):
    for b, a in zip(before, after, strict=True):
        if b is not None:
            np.testing.assert_array_equal(np.asarray(a), b, err_msg="an input was modified")


def check_vs_torch(x, target, backend, *, expect=None, err_msg="", **options):
    """Every public cross-entropy entry point against the torch oracle (or ``expect``).

    Checks dtype and shape of loss and gradient, that the three entry points agree with the
    oracle, and that no input was modified. Returns fastxent's ``(loss, grad)``."""
    x = x if isinstance(x, np.ndarray) else np.asarray(x)
    dtype = x.dtype
    before = snapshot(x, target, options.get("weight"))
    loss, grad = fx.cross_entropy_with_grad(x, target, backend=backend, **options)
    loss_only = fx.cross_entropy(x, target, backend=backend, **options)
    grad_only = fx.cross_entropy_grad(x, target, backend=backend, **options)
    assert_unchanged(before, [x, target, options.get("weight")])

    exp_loss, exp_grad = torch_xent(x, target, **options) if expect is None else expect
    batch_shape = x.shape[:-1]
    reduction = options.get("reduction", "mean")
    assert np.shape(loss) == (batch_shape if reduction == "none" else ()), err_msg
    assert np.shape(loss_only) == np.shape(loss)
    assert np.asarray(loss).dtype == dtype and np.asarray(loss_only).dtype == dtype, err_msg
    assert grad.shape == x.shape and grad_only.shape == x.shape, err_msg
    assert grad.dtype == dtype and grad_only.dtype == dtype, err_msg
    assert_close(loss, exp_loss, dtype, err_msg=f"loss (with_grad) {err_msg}")
    assert_close(loss_only, exp_loss, dtype, err_msg=f"loss (cross_entropy) {err_msg}")
    assert_close(grad, exp_grad, dtype, err_msg=f"grad (with_grad) {err_msg}")
    assert_close(grad_only, exp_grad, dtype, err_msg=f"grad (cross_entropy_grad) {err_msg}")
    return loss, grad


# --- input makers --------------------------------------------------------------------


def make_logits(rng, shape, dtype=np.float64, spread=2.0):
    return (spread * rng.standard_normal(shape)).astype(dtype)


def make_index_target(rng, batch_shape, n_classes, ignore_case, dtype=np.int64):
    """Class indices for an ``ignore_case``; returns ``(target, ignore_index)``.

    Keeps at least one row that is not ignored (when there are rows), so "mean" is finite."""
    n = int(np.prod(batch_shape, dtype=np.int64))
    y = rng.integers(0, n_classes, size=n)
    ignore_index = -100
    if ignore_case == "default_some_ignored" and n > 1:
        y[rng.permutation(n)[: max(1, n // 3)]] = -100
    elif ignore_case == "class_2_ignored":
        ignore_index = 2
        if n > 1 and n_classes > 3:
            y[: n // 3] = 2  # some rows ignored ...
            y[n // 3 :] = np.where(y[n // 3 :] == 2, 3, y[n // 3 :])  # ... and the rest kept
            y[-1] = 0
    elif ignore_case == "none_ignored":
        pass
    return y.reshape(batch_shape).astype(dtype), ignore_index


def make_probability_target(rng, shape, kind, dtype=np.float64):
    n_classes = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    if kind == "probability":
        t = rng.dirichlet(np.ones(n_classes), size=rows) if rows else np.zeros((0, n_classes))
    elif kind == "unnormalised":  # torch does not normalise soft targets, nor does fastxent
        t = rng.uniform(0.0, 1.5, size=(rows, n_classes))
    elif kind == "onehot":
        t = np.eye(n_classes)[rng.integers(0, n_classes, size=rows)]
    else:
        raise AssertionError(kind)
    return t.reshape(shape).astype(dtype)


def make_target(rng, shape, kind, ignore_case="none_ignored", float_dtype=np.float64):
    """``(target, ignore_index)`` of ``kind`` for logits of ``shape``."""
    if kind == "index":
        return make_index_target(rng, shape[:-1], shape[-1], ignore_case)
    # ignore_index does not apply to probabilities and, as in torch, one >= 0 is an error
    # with them (test_ignore_index_with_probabilities_is_an_error)
    return make_probability_target(rng, shape, kind, float_dtype), -100


def make_weight(rng, n_classes):
    return rng.uniform(0.25, 2.0, size=n_classes)


def with_layout(a, layout, tmp_path=None, name="a"):
    """The values of ``a`` in the memory ``layout``: C, F, strided, readonly or memmap."""
    a = np.asarray(a)
    if layout == "C" or a.ndim == 0:
        out = np.array(a, copy=True, order="C")
        if layout == "readonly":
            out.setflags(write=False)
        return out
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":
        # every axis stepped by 2, the last one backwards; the gaps hold poison values
        big = np.empty(tuple(2 * s for s in a.shape), a.dtype)
        big.fill(np.nan if a.dtype.kind == "f" else 99)
        index = tuple(slice(None, None, 2) for _ in a.shape[:-1]) + (slice(None, None, -2),)
        out = big[index]
        out[...] = a
        assert a.size <= 1 or not out.flags.c_contiguous
        return out
    if layout == "readonly":
        out = np.array(a, copy=True)
        out.setflags(write=False)
        return out
    if layout == "memmap":
        assert a.size > 0, "np.memmap cannot map an empty file"
        path = tmp_path / f"{name}.dat"
        mm = np.memmap(path, dtype=a.dtype, mode="w+", shape=a.shape)
        mm[...] = a
        mm.flush()
        del mm
        return np.memmap(path, dtype=a.dtype, mode="r+", shape=a.shape)  # writable: must stay unchanged
    raise AssertionError(layout)


# --- the core option matrix (float64, full cross-product) ----------------------------


def _kind_ignore_cases():
    for kind in TARGET_KINDS:
        # ignore_index does not apply to probabilities (one >= 0 is an error, as in torch)
        for ignore_case in IGNORE_CASES if kind == "index" else ("none_ignored",):
            yield pytest.param(kind, ignore_case, id=f"{kind}-{ignore_case}")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("kind, ignore_case", list(_kind_ignore_cases()))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n_classes", [5, 37], ids=["C5", "C37"])
def test_option_matrix(backend, rng, reduction, kind, weighted, ignore_case, label_smoothing, n_classes):
    # C = 5 and C = 37: numba's small-C block kernels (C <= 16) and its row kernels
    shape = (13, n_classes)
    x = make_logits(rng, shape)
    target, ignore_index = make_target(rng, shape, kind, ignore_case)
    weight = make_weight(rng, shape[-1]) if weighted else None
    check_vs_torch(
        x,
        target,
        backend,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("ignore_index", [2, 0, 1000])
def test_ignore_index_with_probabilities_is_an_error(backend, ignore_index):
    """torch raises for an ignore_index >= 0 with probability targets (a negative one names
    no class and is accepted); fastxent raises a ValueError (its error for a bad option)
    in the same cases."""
    x = np.zeros((3, 4))
    t = np.full((3, 4), 0.25)
    with pytest.raises(RuntimeError, match="ignore_index is not supported for floating point target"):
        F.cross_entropy(torch.tensor(x), torch.tensor(t), ignore_index=ignore_index)
    with pytest.raises(ValueError, match="ignore_index=.* is not supported for probability"):
        fx.cross_entropy(x, t, ignore_index=ignore_index, backend=backend)
    for negative in (-100, -1):  # the default, and any other negative value, are fine
        expected = F.cross_entropy(torch.tensor(x), torch.tensor(t), ignore_index=negative)
        assert fx.cross_entropy(x, t, ignore_index=negative, backend=backend) == pytest.approx(float(expected))


# --- dtype, label dtype, layout, shape: each varied around the core ------------------

FULL_OPTIONS = {"weighted": True, "ignore_case": "class_2_ignored", "label_smoothing": 0.1}
PLAIN_OPTIONS = {"weighted": False, "ignore_case": "none_ignored", "label_smoothing": 0.0}


def run_case(rng, backend, shape, kind, reduction, options, dtype=np.float64, layout="C", tmp_path=None):
    x = make_logits(rng, shape, dtype)
    target, ignore_index = make_target(rng, shape, kind, options["ignore_case"], float_dtype=dtype)
    weight = make_weight(rng, shape[-1]) if options["weighted"] else None
    x = with_layout(x, layout, tmp_path, f"logits-{reduction}")
    target = with_layout(target, layout, tmp_path, f"target-{reduction}")
    if weight is not None:
        weight = with_layout(weight, layout, tmp_path, f"weight-{reduction}")
    return check_vs_torch(
        x,
        target,
        backend,
        weight=weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=options["label_smoothing"],
        err_msg=f"shape={shape} kind={kind} dtype={np.dtype(dtype)} layout={layout} {options}",
    )


@pytest.mark.parametrize("options", [PLAIN_OPTIONS, FULL_OPTIONS], ids=["plain", "full"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dtypes(backend, rng, dtype, kind, reduction, options):
    run_case(rng, backend, (4, 6, 7), kind, reduction, options, dtype)


def _label_cases():
    for dt in LABEL_DTYPES:
        info = np.iinfo(dt)
        cases = ["class_2", "none_ignored", "dtype_max"]
        if info.min < 0:
            cases.append("default_-100")
        for case in cases:
            yield pytest.param(dt, case, id=f"{np.dtype(dt).name}-{case}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("label_dtype, case", list(_label_cases()))
def test_label_dtypes(backend, rng, label_dtype, case, reduction):
    """Any integer dtype holds class indices; ignore_index is compared by value."""
    n, n_classes = 12, 5
    x = make_logits(rng, (n, n_classes), np.float32)
    y = rng.integers(0, n_classes, size=n)
    if case == "class_2":
        ignore_index = 2
        y[:3] = 2
    elif case == "none_ignored":
        ignore_index = -100
    elif case == "dtype_max":  # a value no class has, e.g. 255 for uint8, used as the ignore mark
        ignore_index = min(int(np.iinfo(label_dtype).max), int(np.iinfo(np.int64).max))
    else:
        ignore_index = -100
    y = y.astype(label_dtype)
    if case in ("dtype_max", "default_-100"):
        y[[1, 4, 9]] = ignore_index
    check_vs_torch(x, y, backend, weight=make_weight(rng, n_classes), ignore_index=ignore_index, reduction=reduction)


def _layout_shapes():
    for layout in LAYOUTS:
        for shape in [(7,), (9, 6), (2, 3, 5, 4)]:
            yield pytest.param(layout, shape, id=f"{layout}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout, shape", list(_layout_shapes()))
def test_layouts(backend, rng, tmp_path, layout, shape, dtype, kind):
    """Logits, target and weight in the same layout; fastxent must neither misread nor modify."""
    for reduction in ("none", "mean"):
        run_case(rng, backend, shape, kind, reduction, FULL_OPTIONS, dtype, layout, tmp_path)


SHAPES = [
    (5,),  # 1-D logits, 0-d target
    (1,),  # 1-D, C = 1
    (8, 5),
    (2, 3, 5, 4),  # N-D, class axis last
    (0, 5),  # N = 0
    (3, 0, 5),  # N = 0 inside an N-D batch
    (6, 1),  # C = 1
    (2, 3, 1),
    (9, 67),  # C >= 64: the blocked row max, with a remainder
    (3, 130),
    (1000, 10),  # numba's small-C kernels: 409 rows a block, the last one partial
    (5, 16),  # the largest C of the small-C kernels, and the smallest C of the row kernels
    (5, 17),
]


@pytest.mark.parametrize("options", [PLAIN_OPTIONS, FULL_OPTIONS], ids=["plain", "full"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(backend, rng, shape, kind, reduction, options):
    run_case(rng, backend, shape, kind, reduction, options)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_one_dim_logits_match_torch_unbatched(backend, rng, kind, reduction):
    """(C,) logits with a 0-d class index (or (C,) probabilities) is torch's unbatched input."""
    n_classes = 6
    x = make_logits(rng, (n_classes,))
    target = np.int64(3) if kind == "index" else make_probability_target(rng, (n_classes,), "probability")
    xt = torch.tensor(x, requires_grad=True)
    w = make_weight(rng, n_classes)
    loss_t = F.cross_entropy(xt, torch.tensor(target), weight=torch.tensor(w), reduction=reduction, label_smoothing=0.1)
    loss_t.sum().backward()
    check_vs_torch(
        x,
        np.asarray(target),
        backend,
        weight=w,
        reduction=reduction,
        label_smoothing=0.1,
        expect=(loss_t.detach().numpy(), xt.grad.numpy()),
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_nd_logits_match_torch_class_dim_1(backend, rng, kind, reduction):
    """(N, d1, d2, C) class-last equals torch's (N, C, d1, d2) after movedim, row for row."""
    shape = (2, 3, 4, 5)
    x = make_logits(rng, shape)
    target, ignore_index = make_target(rng, shape, kind, "default_some_ignored")
    w = make_weight(rng, shape[-1])
    xt = torch.tensor(x).movedim(-1, 1).detach().requires_grad_(True)
    tt = torch.tensor(target) if kind == "index" else torch.tensor(target).movedim(-1, 1)
    loss_t = F.cross_entropy(xt, tt, weight=torch.tensor(w), ignore_index=ignore_index, reduction=reduction)
    loss_t.sum().backward()
    check_vs_torch(
        x,
        target,
        backend,
        weight=w,
        ignore_index=ignore_index,
        reduction=reduction,
        expect=(loss_t.detach().numpy(), xt.grad.movedim(1, -1).numpy()),
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("n_classes", [64, 67, 131])
def test_wide_rows_with_large_spread(backend, rng, n_classes, kind, dtype):
    """C >= 64 takes the blocked max; a spread of ~+-300 makes a wrong max overflow exp.

    The maximum is planted in the first lane, a middle lane and the remainder lanes."""
    x = make_logits(rng, (6, n_classes), np.float64, spread=100.0)
    for i, c in enumerate([0, 17, n_classes - 1, n_classes - 2, 31, n_classes // 2]):
        x[i, c] = 350.0
    x = x.astype(dtype)
    target, _ = make_target(rng, x.shape, kind, float_dtype=dtype)
    for reduction in REDUCTIONS:
        check_vs_torch(x, target, backend, weight=make_weight(rng, n_classes), reduction=reduction, label_smoothing=0.1)


# --- degenerate cases of docs/SEMANTICS.md -------------------------------------------


@pytest.mark.parametrize("n_classes", [2, 37], ids=["C2", "C37"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_denormal_smoothing_with_minus_inf_logit(backend, n_classes, dtype):
    """eps = 5e-324: eps/C underflows to 0, and 0 * (the smoothing sum, +inf because of a
    -inf logit) is NaN, as in PyTorch. Found by the fuzz: the per-row loss, compiled with
    the kernel's fastmath flags (numba hands a callee its caller's), was inf."""
    x = np.zeros((3, n_classes), dtype)
    x[:, 1] = -np.inf
    check_vs_torch(x, np.array([0, 1, 2 % n_classes]), backend, label_smoothing=5e-324)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_all_rows_ignored(backend, rng, dtype, weighted, label_smoothing):
    """mean NaN, sum 0.0, none zeros; gradient all zeros (not NaN). PyTorch agrees."""
    x = make_logits(rng, (2, 3, 5), dtype)
    y = np.full((2, 3), 2, np.int64)
    weight = make_weight(rng, 5) if weighted else None
    options = {"weight": weight, "ignore_index": 2, "label_smoothing": label_smoothing}
    for reduction in REDUCTIONS:
        loss, grad = check_vs_torch(x, y, backend, reduction=reduction, **options)
        if reduction == "mean":
            assert np.isnan(loss)
        else:
            assert np.all(loss == 0)
        assert np.all(grad == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("shape", [(0, 4), (2, 0, 4), (0, 1)], ids=lambda s: "x".join(map(str, s)))
def test_no_rows(backend, shape, kind, reduction):
    """N = 0: mean NaN, sum 0.0, none an empty array, an empty gradient. PyTorch agrees."""
    x = np.zeros(shape, np.float32)
    target = np.zeros(shape[:-1], np.int64) if kind == "index" else np.zeros(shape, np.float32)
    loss, grad = check_vs_torch(x, target, backend, weight=np.ones(shape[-1]), reduction=reduction)
    if reduction == "mean":
        assert np.isnan(loss)
    elif reduction == "sum":
        assert loss == 0
    else:
        assert loss.shape == shape[:-1]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_weight_denominator(backend, rng, dtype, label_smoothing):
    """D = 0 because every kept row's class has weight 0.

    DELIBERATE DIFFERENCE FROM PYTORCH: torch returns a NaN gradient for "mean" here (0/0);
    docs/SEMANTICS.md says the gradient is all zeros. The loss (NaN) agrees with torch."""
    x = make_logits(rng, (5, 4), dtype)
    y = np.array([0, 1, 0, -100, 1])
    weight = np.array([0.0, 0.0, 1.0, 2.0])
    options = {"weight": weight, "label_smoothing": label_smoothing}

    loss_t, grad_t = torch_xent(x, y, reduction="mean", **options)
    assert np.isnan(loss_t) and np.all(np.isnan(grad_t[y != -100])), "torch changed: revisit this comment"
    loss, grad = fx.cross_entropy_with_grad(x, y, backend=backend, reduction="mean", **options)
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, np.zeros_like(x))  # the spec, not torch
    np.testing.assert_array_equal(fx.cross_entropy_grad(x, y, backend=backend, **options), np.zeros_like(x))
    # sum and none are ordinary (the smoothing term still counts) and match torch
    for reduction in ("sum", "none"):
        check_vs_torch(x, y, backend, reduction=reduction, **options)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_neg_inf_non_target_logit(backend, dtype):
    """A -inf class that is not the target: finite loss, gradient exactly 0 there."""
    x = np.array([[0.5, -np.inf, 1.0, -0.25], [-np.inf, 2.0, -np.inf, 0.0]], dtype)
    y = np.array([2, 3])
    for reduction in REDUCTIONS:
        loss, grad = check_vs_torch(x, y, backend, reduction=reduction, weight=np.array([1.0, 2.0, 0.5, 1.5]))
        assert np.all(np.isfinite(loss))
        assert np.all(grad[np.isneginf(x)] == 0)
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_neg_inf_target_logit(backend, dtype):
    """A -inf target logit gives +inf; the gradient stays finite (p - onehot), as torch."""
    x = np.array([[0.0, -np.inf, 1.0], [0.0, 1.0, 2.0]], dtype)
    y = np.array([1, 0])
    loss, grad = check_vs_torch(x, y, backend, reduction="none")
    assert loss[0] == np.inf and np.isfinite(loss[1])
    assert np.all(np.isfinite(grad))
    for reduction in ("mean", "sum"):
        loss, _ = check_vs_torch(x, y, backend, reduction=reduction)
        assert loss == np.inf


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_smoothing_with_any_neg_inf_logit(backend, dtype, kind):
    """eps > 0 puts mass eps/C on every class, so any -inf logit in the row gives +inf."""
    x = np.array([[0.0, -np.inf, 1.0], [0.0, 1.0, 2.0]], dtype)
    target = np.array([0, 2]) if kind == "index" else np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype)
    loss, grad = check_vs_torch(x, target, backend, reduction="none", label_smoothing=0.2)
    assert loss[0] == np.inf and np.isfinite(loss[1])
    assert np.all(np.isfinite(grad))
    loss, _ = check_vs_torch(x, target, backend, reduction="mean", label_smoothing=0.2)
    assert loss == np.inf


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_probability_zero_at_neg_inf(backend, dtype):
    """A probability target of 0 at a -inf logit is NaN (0 * -inf), as PyTorch."""
    x = np.array([[0.0, -np.inf, 1.0], [0.0, 1.0, 2.0]], dtype)
    t = np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]], dtype)
    loss, _ = check_vs_torch(x, t, backend, reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
    loss, _ = check_vs_torch(x, t, backend, reduction="sum")
    assert np.isnan(loss)


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_row_all_neg_inf(backend, dtype, kind):
    """A row of all -inf is NaN (loss and, as torch, its gradient row); other rows are fine."""
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]], dtype)
    target = np.array([1, 0]) if kind == "index" else np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype)
    loss, grad = check_vs_torch(x, target, backend, reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
    assert np.all(np.isfinite(grad[1]))


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nan_logit(backend, dtype, kind):
    """A NaN logit makes its row's loss NaN (anywhere in the row), and no other row's."""
    x = np.array([[np.nan, 0.0, 1.0], [0.0, np.nan, 1.0], [0.0, 1.0, np.nan], [0.0, 1.0, 2.0]], dtype)
    target = np.array([1, 0, 2, 2]) if kind == "index" else np.full((4, 3), 1.0 / 3.0, dtype)
    loss, grad = check_vs_torch(x, target, backend, reduction="none")
    assert np.all(np.isnan(loss[:3])) and np.isfinite(loss[3])
    assert np.all(np.isfinite(grad[3]))
    for reduction in ("mean", "sum"):
        loss, _ = check_vs_torch(x, target, backend, reduction=reduction)
        assert np.isnan(loss)


@pytest.mark.parametrize("kind", ["index", "probability"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pos_inf_logit(backend, dtype, kind):
    """+inf is not in docs/SEMANTICS.md; torch gives a NaN row (inf - inf), loss and gradient."""
    x = np.array([[np.inf, 0.0, 1.0], [0.0, 1.0, 2.0]], dtype)
    target = np.array([0, 1]) if kind == "index" else np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype)
    loss, grad = check_vs_torch(x, target, backend, reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1])
    assert np.all(np.isnan(grad[0])) and np.all(np.isfinite(grad[1]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_huge_logits_are_exact(backend, dtype):
    """x = [1e4, -1e4], y = 1 gives exactly 20000.0 (and gradient exactly [1, -1])."""
    x = np.array([[1e4, -1e4]], dtype)
    onehot = np.array([[0.0, 1.0]], dtype)
    for target in (np.array([1]), onehot, np.int64(1)):
        xx = x[0] if np.ndim(target) == 0 else x
        for reduction in REDUCTIONS:
            loss, grad = check_vs_torch(xx, target, backend, reduction=reduction)
            assert np.all(loss == 20000.0), (target, reduction, loss)
            np.testing.assert_array_equal(grad.reshape(-1), [1.0, -1.0])


@pytest.mark.parametrize("kind", ["index", "probability"])
def test_mixed_degenerate_rows_in_one_batch(backend, kind):
    """Degenerate rows leave their neighbours alone; row for row as torch."""
    ninf = -np.inf
    x = np.array(
        [[0.0, ninf, 1.0], [ninf, ninf, ninf], [1e4, -1e4, 0.0], [np.nan, 0.0, 0.0], [0.3, 0.2, 0.1]], np.float64
    )
    if kind == "index":
        target = np.array([2, 0, 1, 1, -100])
    else:
        target = np.array([[0.5, 0.0, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0.2, 0.2, 0.6]], np.float64)
    loss, _ = check_vs_torch(x, target, backend, reduction="none", weight=np.array([1.0, 2.0, 3.0]))
    # row 0: finite for an index target; 0 * -inf = NaN for the probability target
    assert np.isfinite(loss[0]) == (kind == "index")
    assert np.isnan(loss[1]) and np.isnan(loss[3]) and np.isfinite(loss[4])
    assert loss[2] == 40000.0  # w_1 * 20000, exactly


@pytest.mark.parametrize("bad", [5, -1, -101])
def test_out_of_range_target_raises_like_torch(backend, bad):
    """torch raises IndexError for an out-of-range class; fastxent names row and value."""
    x = np.zeros((4, 5))
    y = np.array([0, 1, bad, 2])
    with pytest.raises(IndexError):
        torch_xent(x, y)
    with pytest.raises(IndexError, match=rf"target\[2\] = {bad}"):
        fx.cross_entropy(x, y, backend=backend)
    with pytest.raises(IndexError, match=rf"target\[2\] = {bad}"):
        fx.cross_entropy_with_grad(x, y, backend=backend)


# --- the softmax family ----------------------------------------------------------------


def torch_row_functions(x):
    xt = torch.tensor(np.array(x, dtype=np.float64))
    return {
        "log_softmax": torch.log_softmax(xt, dim=-1).numpy(),
        "softmax": torch.softmax(xt, dim=-1).numpy(),
        "logsumexp": torch.logsumexp(xt, dim=-1).numpy(),
    }


def check_row_functions(x, backend, err_msg=""):
    before = snapshot(x)
    expected = torch_row_functions(x)
    got = {
        "log_softmax": fx.log_softmax(x, backend=backend),
        "softmax": fx.softmax(x, backend=backend),
        "logsumexp": fx.logsumexp(x, backend=backend),
    }
    assert_unchanged(before, [x])
    for name, value in got.items():
        value = np.asarray(value)
        assert value.dtype == x.dtype, name
        assert value.shape == expected[name].shape, name
        assert_close(value, expected[name], x.dtype, err_msg=f"{name} {err_msg}")
    return got


def _row_function_cases():
    for layout in LAYOUTS:
        for shape in [(7,), (1,), (9, 6), (2, 3, 5, 4), (0, 5), (6, 1), (5, 67)]:
            if layout == "memmap" and 0 in shape:
                continue
            yield pytest.param(layout, shape, id=f"{layout}-{'x'.join(map(str, shape))}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout, shape", list(_row_function_cases()))
def test_softmax_family(backend, rng, tmp_path, layout, shape, dtype):
    x = with_layout(make_logits(rng, shape, dtype, spread=3.0), layout, tmp_path, "x")
    check_row_functions(x, backend, err_msg=f"{layout} {shape} {np.dtype(dtype)}")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_softmax_family_special_values(backend, dtype):
    """-inf entries, huge values and NaN, row for row as torch."""
    x = np.array(
        [[0.0, -np.inf, 1.0], [1e4, -1e4, 0.0], [np.nan, 0.0, 1.0], [-5.0, -5.0, -5.0], [-np.inf, 0.0, -np.inf]],
        dtype,
    )
    got = check_row_functions(x, backend)
    assert got["softmax"][0, 1] == 0 and got["log_softmax"][0, 1] == -np.inf
    assert got["logsumexp"][1] == 1e4
    assert np.all(np.isnan(got["softmax"][2]))


def test_softmax_family_empty_class_axis(backend):
    """C = 0: log_softmax/softmax are empty; logsumexp is -inf (log of an empty sum), as torch."""
    check_row_functions(np.zeros((3, 0)), backend)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logsumexp_all_neg_inf_row(backend, dtype):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, 1.0, 2.0]], dtype)
    expected = torch_row_functions(x)["logsumexp"]
    assert expected[0] == -np.inf
    assert_close(fx.logsumexp(x, backend=backend), expected, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_logsumexp_pos_inf_entry(backend, dtype):
    x = np.array([[np.inf, 0.0, 1.0], [0.0, 1.0, 2.0]], dtype)
    expected = torch_row_functions(x)["logsumexp"]
    assert expected[0] == np.inf
    assert_close(fx.logsumexp(x, backend=backend), expected, dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_weight_of_an_unused_class_stays_out(backend, reduction, dtype):
    """Without smoothing, PyTorch reads only the target classes' weights: an inf or NaN
    weight of a class no row uses must not reach the loss or the gradient (0 * W = NaN was
    a bug: the kernels multiplied eps/C by the weight total even at eps = 0)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 9)).astype(dtype)
    y = np.array([0, 1, 2, 0, 1, 2])
    weight = np.array([0.5, 2.0, 1.5, np.inf, np.nan, -np.inf, 3.0, 1.0, 1.0], dtype)
    loss, grad = fx.cross_entropy_with_grad(x, y, weight=weight, reduction=reduction, backend=backend)
    ref_loss, ref_grad = torch_xent(x, y, weight=weight, reduction=reduction)
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(loss))
    assert_close(loss, ref_loss, dtype)
    assert_close(grad, ref_grad, dtype)
