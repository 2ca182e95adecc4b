"""Knowledge distillation (fx.distillation_loss): every backend against the float64 reference,
the reference against independent oracles (torch's kl_div, Liger-Kernel's JSD written out in
torch, finite differences), masking, reductions, dtypes, -inf logits, errors, the torch adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BACKENDS, assert_close

import fastxent as fx
from fastxent import _dispatch, _reference, _spec

BETAS = (0.0, 1.0, 0.3)


def _pair(rng, shape, dtype=np.float64, spread=2.0):
    """A student and a teacher that differ, the teacher sharper (as a trained one)."""
    student = rng.standard_normal(shape)
    teacher = spread * rng.standard_normal(shape) + 0.5 * student
    return student.astype(dtype), teacher.astype(dtype)


def _reference_nd(student, teacher, **options):
    """The float64 reference on (..., C) input: (loss, grad) shaped like the input."""
    n_classes = student.shape[-1]
    target = options.pop("target", None)
    loss, grad = _reference.distillation(
        np.asarray(student, np.float64).reshape(-1, n_classes),
        np.asarray(teacher, np.float64).reshape(-1, n_classes),
        target=None if target is None else np.asarray(target).reshape(-1),
        **options,
    )
    if options.get("reduction", "batchmean") == "none":
        loss = np.asarray(loss).reshape(student.shape[:-1])
    return loss, grad.reshape(student.shape)


# --- every backend against the reference ---------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_backend_matches_reference(backend, dtype, rng):
    # C = 37: a tail after two blocks of 16 lanes; C = 1000: the long-row max, many blocks
    for shape in ((2, 3, 37), (9, 1000)):
        student, teacher = _pair(rng, shape, dtype)
        target = rng.integers(0, shape[-1], shape[:-1])
        target.reshape(-1)[1] = -100
        for beta in BETAS:
            for temperature in (1.0, 2.5):
                for reduction in ("batchmean", "sum", "none"):
                    options = dict(beta=beta, temperature=temperature, reduction=reduction, target=target)
                    loss, grad = fx.distillation_loss_with_grad(student, teacher, backend=backend, **options)
                    expected_loss, expected_grad = _reference_nd(student, teacher, **options)
                    what = f"{shape} beta={beta} T={temperature} {reduction}"
                    assert grad.dtype == dtype and grad.shape == shape
                    assert np.asarray(loss).dtype == dtype
                    # a sum over rows: its rounding grows with the row count
                    assert_close(loss, expected_loss, dtype, scale=4.0, err_msg=what)
                    assert_close(grad, expected_grad, dtype, err_msg=what)


def test_loss_only_out_and_in_place_give_the_same_bits(backend, rng):
    for dtype in (np.float32, np.float64):
        student, teacher = _pair(rng, (33, 70), dtype)
        for beta in BETAS:
            options = dict(beta=beta, temperature=1.5, reduction="none", backend=backend)
            loss, grad = fx.distillation_loss_with_grad(student, teacher, **options)
            assert np.array_equal(fx.distillation_loss(student, teacher, **options), loss)
            out = np.full_like(student, np.nan)
            loss_out, grad_out = fx.distillation_loss_with_grad(student, teacher, out=out, **options)
            assert grad_out is out and np.array_equal(out, grad) and np.array_equal(loss_out, loss)
            in_place = student.copy()
            loss_in, grad_in = fx.distillation_loss_with_grad(in_place, teacher, out=in_place, **options)
            assert grad_in is in_place
            assert np.array_equal(in_place, grad) and np.array_equal(loss_in, loss)


def test_inputs_are_not_modified_and_layouts_are_accepted(backend, rng):
    student, teacher = _pair(rng, (40, 12), np.float32)
    before = (student.copy(), teacher.copy())
    s_f, t_f = np.asfortranarray(student), np.asfortranarray(teacher)
    strided = np.repeat(student, 2, axis=1)[:, ::2]
    loss, grad = fx.distillation_loss_with_grad(student, teacher, beta=0.5, backend=backend)
    assert np.array_equal(student, before[0]) and np.array_equal(teacher, before[1])
    for s, t in ((s_f, t_f), (strided, teacher)):
        loss2, grad2 = fx.distillation_loss_with_grad(s, t, beta=0.5, backend=backend)
        assert loss2 == loss and np.array_equal(grad2, grad)


def test_a_float64_teacher_is_not_rounded_to_a_float32_student(backend, rng):
    student, teacher = _pair(rng, (6, 30))
    student32 = student.astype(np.float32)
    loss, grad = fx.distillation_loss_with_grad(student32, teacher, backend=backend)
    expected_loss, expected_grad = _reference_nd(student32, teacher)
    assert grad.dtype == np.float32 and np.asarray(loss).dtype == np.float32
    assert_close(loss, expected_loss, np.float64, scale=1e5)  # float64 arithmetic, rounded to float32 at the end
    assert_close(grad, expected_grad, np.float32)


def test_the_two_compiled_backends_agree(rng):
    if not {"numba", "cython"} <= set(BACKENDS):
        pytest.skip("needs both compiled backends")
    student, teacher = _pair(rng, (64, 3000), np.float32)
    for beta in BETAS:
        a = fx.distillation_loss_with_grad(student, teacher, beta=beta, temperature=3.0, backend="numba")
        b = fx.distillation_loss_with_grad(student, teacher, beta=beta, temperature=3.0, backend="cython")
        assert_close(a[0], b[0], np.float32)
        assert_close(a[1], b[1], np.float32)


# --- the reference against independent oracles --------------------------------------


def _torch_oracle(student, teacher, beta, temperature):
    """Per-row loss from torch's own ops: kl_div at beta = 0 and 1, and Liger-Kernel's JSD
    written out as in src/liger_kernel/chunked_loss/jsd_loss.py
    (``LigerFusedLinearJSDFunction.distillation_loss_fn``, linkedin/Liger-Kernel at
    ead96b618e5c): ``log M = logsumexp([log Q + log(1-beta), log P + log(beta)])``,
    ``beta kl_div(log M, log P) + (1-beta) kl_div(log M, log Q)``; times T**2 (the issue's
    scaling; Liger's JSD itself has none)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(teacher, dtype=torch.float64)
    lq = F.log_softmax(s / temperature, dim=-1)
    lp = F.log_softmax(t / temperature, dim=-1)
    if beta == 0:
        rows = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        rows = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
        rows = beta * F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1) + (1 - beta) * F.kl_div(
            lm, lq, reduction="none", log_target=True
        ).sum(-1)
    rows = rows * temperature**2
    (grad,) = torch.autograd.grad(rows.sum(), s)
    return rows.detach().numpy(), grad.numpy()


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_reference_matches_torch_and_liger(beta, temperature, rng):
    student, teacher = _pair(rng, (7, 23))
    loss, grad = _reference.distillation_rows(student, teacher, beta, temperature)
    expected_loss, expected_grad = _torch_oracle(student, teacher, beta, temperature)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)


def test_batchmean_at_beta_0_is_torch_kl_div_batchmean(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    student, teacher = _pair(rng, (12, 50))
    T = 2.0
    s, t = torch.tensor(student), torch.tensor(teacher)
    expected = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
    loss, _ = _reference.distillation(student, teacher, 0.0, T)
    assert loss == pytest.approx(float(expected) * T**2, rel=1e-13)


def test_reference_is_a_kl_divergence_by_scipy(rng):
    """The KL ends against scipy's rel_entr on the probabilities."""
    special = pytest.importorskip("scipy.special")
    student, teacher = _pair(rng, (5, 17))
    p = special.softmax(teacher / 1.5, axis=-1)
    q = special.softmax(student / 1.5, axis=-1)
    forward, _ = _reference.distillation_rows(student, teacher, 0.0, 1.5)
    reverse, _ = _reference.distillation_rows(student, teacher, 1.0, 1.5)
    np.testing.assert_allclose(forward, 1.5**2 * special.rel_entr(p, q).sum(-1), rtol=1e-12)
    np.testing.assert_allclose(reverse, 1.5**2 * special.rel_entr(q, p).sum(-1), rtol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.25, 0.7])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_gradient_by_finite_differences(backend, beta, temperature, rng):
    student, teacher = _pair(rng, (3, 9))
    target = np.array([2, -100, 5])
    options = dict(beta=beta, temperature=temperature, target=target, reduction="batchmean")

    def f(z):
        return _reference.distillation(z, teacher, **options)[0]

    h = 1e-6
    numeric = np.zeros_like(student)
    for index in np.ndindex(student.shape):
        up, down = student.copy(), student.copy()
        up[index] += h
        down[index] -= h
        numeric[index] = (f(up) - f(down)) / (2 * h)
    _, grad = fx.distillation_loss_with_grad(student, teacher, backend=backend, **options)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert np.all(grad[1] == 0)


# --- masking and reductions ----------------------------------------------------------


def test_ignored_rows_count_for_nothing(backend, rng):
    student, teacher = _pair(rng, (10, 15))
    target = rng.integers(0, 15, 10)
    target[[0, 4, 5]] = 7777
    for beta in BETAS:
        options = dict(beta=beta, temperature=2.0, backend=backend)
        loss, grad = fx.distillation_loss_with_grad(student, teacher, target=target, ignore_index=7777, **options)
        kept = target != 7777
        kept_loss, kept_grad = fx.distillation_loss_with_grad(student[kept], teacher[kept], **options)
        assert_close(loss, kept_loss, np.float64)
        assert np.all(grad[~kept] == 0)
        assert_close(grad[kept], kept_grad, np.float64)
        rows = fx.distillation_loss(student, teacher, target=target, ignore_index=7777, reduction="none", **options)
        assert np.all(rows[~kept] == 0) and np.all(rows[kept] > 0)


def test_all_rows_ignored_or_none(backend, rng):
    student, teacher = _pair(rng, (4, 6))
    target = np.full(4, -100)
    loss, grad = fx.distillation_loss_with_grad(student, teacher, target=target, backend=backend)
    assert math.isnan(loss) and np.all(grad == 0)
    assert fx.distillation_loss(student, teacher, target=target, reduction="sum", backend=backend) == 0.0
    empty = np.zeros((0, 6))
    loss, grad = fx.distillation_loss_with_grad(empty, empty, backend=backend)
    assert math.isnan(loss) and grad.shape == (0, 6)
    assert fx.distillation_loss(empty, empty, reduction="none", backend=backend).shape == (0,)


def test_reductions_agree(backend, rng):
    student, teacher = _pair(rng, (2, 5, 8))
    options = dict(beta=0.5, temperature=2.0, backend=backend)
    rows, grad_none = fx.distillation_loss_with_grad(student, teacher, reduction="none", **options)
    total, grad_sum = fx.distillation_loss_with_grad(student, teacher, reduction="sum", **options)
    mean, grad_mean = fx.distillation_loss_with_grad(student, teacher, **options)
    assert rows.shape == (2, 5)
    assert_close(total, rows.sum(), np.float64)
    assert_close(mean, rows.sum() / 10, np.float64)
    assert np.array_equal(grad_none, grad_sum)
    assert_close(grad_mean, grad_sum / 10, np.float64)


def test_one_dimensional_logits_are_one_row(backend, rng):
    student, teacher = _pair(rng, (9,))
    loss, grad = fx.distillation_loss_with_grad(student, teacher, beta=0.2, reduction="none", backend=backend)
    expected_loss, expected_grad = _reference_nd(student, teacher, beta=0.2, reduction="none")
    assert loss.shape == () and grad.shape == (9,)
    assert_close(loss, expected_loss, np.float64)
    assert_close(grad, expected_grad, np.float64)


# --- invariants and edge values ----------------------------------------------------


def test_invariants(backend, rng):
    student, teacher = _pair(rng, (6, 40))
    for beta in BETAS:
        options = dict(beta=beta, temperature=1.7, reduction="none", backend=backend)
        rows, grad = fx.distillation_loss_with_grad(student, teacher, **options)
        assert np.all(rows > 0)
        np.testing.assert_allclose(grad.sum(-1), 0, atol=1e-15)  # softmax: the rows' gradients sum to 0
        shifted = fx.distillation_loss(student + rng.standard_normal((6, 1)) * 30, teacher - 7.0, **options)
        assert_close(shifted, rows, np.float64, scale=100)
        same, grad_same = fx.distillation_loss_with_grad(teacher, teacher, **options)
        assert np.all(np.abs(same) < 1e-14) and np.all(np.abs(grad_same) < 1e-15)


def test_the_ends_are_the_kls_not_the_limits(backend, rng):
    """As in Liger-Kernel: JSD_beta tends to 0 as beta -> 0 or 1 (M tends to Q or P), but beta = 0
    and beta = 1 are the forward and reverse KL."""
    student, teacher = _pair(rng, (3, 10))
    near_0 = fx.distillation_loss(student, teacher, beta=1e-9, backend=backend)
    near_1 = fx.distillation_loss(student, teacher, beta=1 - 1e-9, backend=backend)
    assert near_0 < 1e-6 and near_1 < 1e-6
    assert fx.distillation_loss(student, teacher, beta=0.0, backend=backend) > 0.1
    assert fx.distillation_loss(student, teacher, beta=1.0, backend=backend) > 0.1
    tiny = fx.distillation_loss(student, teacher, beta=1e-300, reduction="none", backend=backend)
    assert np.all(np.isfinite(tiny)) and np.all(tiny >= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_masked_classes(backend, dtype, rng):
    """-inf logits: a class of probability 0 adds nothing (0 log 0 = 0). Masked in both rows it
    is as if it were not there, and its gradient is 0 (torch's kl_div would give NaN there)."""
    student, teacher = _pair(rng, (5, 12), dtype)
    masked = np.zeros(12, bool)
    masked[[2, 7]] = True
    s, t = student.copy(), teacher.copy()
    s[:, masked] = -np.inf
    t[:, masked] = -np.inf
    for beta in BETAS:
        options = dict(beta=beta, temperature=1.3, reduction="none", backend=backend)
        rows, grad = fx.distillation_loss_with_grad(s, t, **options)
        rows_kept, grad_kept = fx.distillation_loss_with_grad(student[:, ~masked], teacher[:, ~masked], **options)
        assert_close(rows, rows_kept, dtype)
        assert np.all(grad[:, masked] == 0)
        assert_close(grad[:, ~masked], grad_kept, dtype)


def test_masked_in_one_row_only(backend, rng):
    student, teacher = _pair(rng, (3, 8))
    t = teacher.copy()
    t[:, 3] = -np.inf  # P = 0 there, Q > 0
    s = student.copy()
    s[:, 3] = -np.inf  # Q = 0 there, P > 0
    for beta in BETAS:
        for z, w in ((student, t), (s, teacher)):
            rows, grad = fx.distillation_loss_with_grad(z, w, beta=beta, reduction="none", backend=backend)
            expected_rows, expected_grad = _reference.distillation(z, w, beta, reduction="none")
            assert_close(rows, expected_rows, np.float64)
            assert_close(grad, expected_grad, np.float64)
    # forward KL with Q = 0 where P > 0 is infinite, its gradient T (Q - P) finite
    rows, grad = fx.distillation_loss_with_grad(s, teacher, beta=0.0, reduction="none", backend=backend)
    assert np.all(rows == np.inf) and np.all(np.isfinite(grad))
    # reverse KL with P = 0 where Q > 0 likewise; 0 < beta < 1 stays finite (M > 0 wherever P or Q is)
    assert np.all(fx.distillation_loss(student, t, beta=1.0, reduction="none", backend=backend) == np.inf)
    for z, w in ((student, t), (s, teacher)):
        rows, grad = fx.distillation_loss_with_grad(z, w, beta=0.5, reduction="none", backend=backend)
        assert np.all(np.isfinite(rows)) and np.all(np.isfinite(grad))


def test_nan_and_all_masked_rows_are_nan(backend, rng):
    student, teacher = _pair(rng, (3, 6))
    student[0, 1] = np.nan
    student[1] = -np.inf
    rows = fx.distillation_loss(student, teacher, beta=0.5, reduction="none", backend=backend)
    assert np.isnan(rows[0]) and np.isnan(rows[1]) and np.isfinite(rows[2])


def test_one_class_and_extreme_temperatures(backend, rng):
    student, teacher = _pair(rng, (4, 1))
    loss, grad = fx.distillation_loss_with_grad(student, teacher, beta=0.5, backend=backend)
    assert loss == 0 and np.all(grad == 0)
    student, teacher = _pair(rng, (4, 30))
    for temperature in (1e-3, 1e3):
        for beta in BETAS:
            options = dict(beta=beta, temperature=temperature, reduction="none")
            rows, grad = fx.distillation_loss_with_grad(student, teacher, backend=backend, **options)
            expected_rows, expected_grad = _reference_nd(student, teacher, **options)
            assert_close(rows, expected_rows, np.float64, scale=1e3)
            assert_close(grad, expected_grad, np.float64, scale=1e3)


# --- errors ----------------------------------------------------------------------------


def test_errors(backend):
    z = np.zeros((3, 4))
    cases = [
        (dict(teacher_logits=np.zeros((3, 5))), ValueError, "shape"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(beta=math.nan), ValueError, "beta"),
        (dict(beta="0.5"), ValueError, "beta"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=math.inf), ValueError, "temperature"),
        (dict(temperature=math.nan), ValueError, "temperature"),
        (dict(reduction="mean"), ValueError, "batchmean"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(teacher_logits=np.zeros((3, 4), int)), TypeError, "teacher"),
        (dict(student_logits=np.zeros((3, 4), int)), TypeError, "floating"),
        (dict(student_logits=np.float64(1.0), teacher_logits=np.float64(1.0)), ValueError, "dimension"),
        (dict(student_logits=np.zeros((3, 0)), teacher_logits=np.zeros((3, 0))), ValueError, "class"),
        (dict(target=np.zeros(3)), TypeError, "integer"),
        (dict(target=np.zeros(4, int)), ValueError, "shape"),
        (dict(target=np.array([0, -1, 0])), fx.TargetOutOfRangeError, r"target\[1\] = -1"),
        (dict(target=np.array([0, 4, 0])), IndexError, "out of range"),
        (dict(ignore_index=1.5, target=np.zeros(3, int)), TypeError, "ignore_index"),
        (dict(out=np.zeros((3, 4), np.float32)), ValueError, "dtype"),
    ]
    for options, error, match in cases:
        arguments = dict(student_logits=z, teacher_logits=np.ones((3, 4)), backend=backend)
        arguments.update(options)
        with pytest.raises(error, match=match):
            fx.distillation_loss_with_grad(**arguments)
    teacher = np.ones((3, 4))
    with pytest.raises(ValueError, match="teacher"):
        fx.distillation_loss_with_grad(teacher, teacher, out=teacher, backend=backend)
    target = np.zeros((3, 4), np.float64)
    with pytest.raises(TypeError, match="integer"):  # probability targets have no meaning here
        fx.distillation_loss(z, teacher, target=target, backend=backend)


# --- dispatch and compilation ----------------------------------------------------------


def test_every_backend_has_distill():
    for name in BACKENDS:
        assert callable(_dispatch.KERNELS[name].distill)
    assert "distill" in _dispatch.FUNCTIONS


def test_cython_record_matches_the_spec():
    if "cython" not in BACKENDS:
        pytest.skip("the extension is not built")
    extension = _dispatch.KERNELS["cython"].extension
    assert extension.DISTILL_PARAMS_FIELDS == _spec.DistillParams._fields
    assert extension.DISTILL_KINDS == (_spec.FORWARD_KL, _spec.REVERSE_KL, _spec.JSD)


def test_the_api_compiles_nothing_that_precompile_did_not(rng):
    if "numba" not in BACKENDS:
        pytest.skip("numba is not available")
    from fastxent import _numba_kernels as nb

    fx.precompile(backend="numba")
    assert nb._distill_kernel.signatures
    before = nb.compiled_count()
    for dtype in (np.float16, np.float32, np.float64):
        student, teacher = _pair(rng, (4, 5), dtype)
        for beta in BETAS:
            fx.distillation_loss(student, teacher, beta=beta, backend="numba")
            fx.distillation_loss_with_grad(
                student, teacher, beta=beta, target=np.int32([0, 1, -100, 2]), backend="numba"
            )
            in_place = student.copy()
            fx.distillation_loss_with_grad(in_place, teacher, beta=beta, out=in_place, backend="numba")
            fx.distillation_loss_with_grad(
                student, teacher.astype(np.float32), out=np.empty_like(student), backend="numba"
            )
    assert nb.compiled_count() == before


# --- the torch adapter -------------------------------------------------------------------


def _torch_formula(student, teacher, beta, temperature, target=None, ignore_index=-100, reduction="batchmean"):
    """The loss in plain torch autograd, from the oracle above (not fastxent's own fallback)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    lq = F.log_softmax(student / temperature, dim=-1)
    lp = F.log_softmax(teacher.detach() / temperature, dim=-1)
    if beta == 0:
        rows = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    elif beta == 1:
        rows = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    else:
        lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
        rows = beta * F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1) + (1 - beta) * F.kl_div(
            lm, lq, reduction="none", log_target=True
        ).sum(-1)
    rows = rows * temperature**2
    kept = torch.ones_like(rows, dtype=torch.bool) if target is None else target != ignore_index
    rows = torch.where(kept, rows, 0.0)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.sum() / kept.sum()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_torch_adapter_matches_autograd_of_the_formula(beta, reduction):
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    generator = torch.Generator().manual_seed(7)
    student = torch.randn(2, 3, 11, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 11, dtype=torch.float64, generator=generator) * 2
    target = torch.tensor([[1, -100, 3], [0, 0, 10]])
    options = dict(beta=beta, temperature=1.5, target=target, reduction=reduction)
    loss = fxt.distillation_loss(student, teacher, **options)
    expected = _torch_formula(student, teacher, **options)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    weights = torch.rand(loss.shape, dtype=torch.float64, generator=generator) + 0.5  # a grad_output != 1
    (grad,) = torch.autograd.grad(loss, student, weights)
    (expected_grad,) = torch.autograd.grad(expected, student, weights)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert torch.autograd.gradcheck(lambda s: fxt.distillation_loss(s, teacher, **options), (student,))


def test_torch_adapter_details():
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    generator = torch.Generator().manual_seed(3)
    student = torch.randn(5, 7, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 7, generator=generator, requires_grad=True)
    loss = fxt.distillation_loss(student, teacher, beta=0.5, temperature=2.0)
    loss.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher is a constant
    # float16 / bfloat16 computed in float32, returned in the input dtype
    for dtype in (torch.float16, torch.bfloat16):
        half = student.detach().to(dtype).requires_grad_()
        value = fxt.distillation_loss(half, teacher.detach(), beta=0.5, temperature=2.0)
        value.backward()
        assert value.dtype == dtype and half.grad.dtype == dtype
        torch.testing.assert_close(value.float(), loss.detach(), rtol=2e-2, atol=2e-3)
    # no grad: loss only, the same number
    with torch.no_grad():
        assert fxt.distillation_loss(student, teacher, beta=0.5, temperature=2.0) == loss.detach()
    # double backward through the torch-ops recomputation
    s = student.detach().double().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: fxt.distillation_loss(x, teacher.detach().double(), beta=0.3), (s,))
    with pytest.raises(ValueError, match="batchmean"):
        fxt.distillation_loss(student, teacher, reduction="mean")
    with pytest.raises(ValueError, match="beta"):
        fxt.distillation_loss(student, teacher, beta=2.0)


def test_torch_fallback_is_the_same_formula():
    """What runs on other devices and under torch.compile: fastxent's own torch-ops version."""
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    generator = torch.Generator().manual_seed(5)
    student = torch.randn(4, 9, dtype=torch.float64, generator=generator)
    teacher = torch.randn(4, 9, dtype=torch.float64, generator=generator)
    student[:, 2] = teacher[:, 2] = -torch.inf
    target = torch.tensor([0, -100, 1, 2])
    for beta in BETAS:
        fallback = fxt._torch_distillation(student, teacher, beta, 2.0, target, -100, "none")
        fused = fxt.distillation_loss(student, teacher, beta=beta, temperature=2.0, target=target, reduction="none")
        torch.testing.assert_close(fallback, fused, rtol=1e-12, atol=1e-14)
