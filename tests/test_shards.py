"""The row phases called apart (fastxent._shards): statistics of class shards merge
exactly, and finish + the gradient of each shard give the unsplit answer.

Any split of the classes (shards of any width, in any merge order, the target inside or
outside a shard, shards whose logits are all -inf) must give the loss and gradient of
the fused kernel on the whole row, to float64 rounding for float64 input. Each test runs
on every backend that has the phases (numba, cython), against that backend's fused kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BACKENDS, assert_close

import fastxent as fx
from fastxent import _reference, _shards

SHARD_BACKENDS = [name for name in _shards.SHARD_BACKENDS if name in BACKENDS]
pytestmark = pytest.mark.skipif(not SHARD_BACKENDS, reason="the shard phases run on numba or cython")


@pytest.fixture(params=SHARD_BACKENDS)
def shard_backend(request) -> str:
    """Runs a test once per backend that has the class-shard phases."""
    return request.param


OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "weight+smoothing": {"label_smoothing": 0.25, "weight": "random"},
}


def _options(name, n_classes, rng):
    options = dict(OPTIONS[name])
    if options.get("weight") == "random":
        options["weight"] = rng.random(n_classes) + 0.5
    return options


def _split(x, target, cuts, order, reduction, backend, **options):
    """Loss and gradient through shards ``[cuts[k], cuts[k+1])``, merged in ``order``."""
    n_classes = x.shape[1]
    shard_target = lambda a, b: target[:, a:b] if target.dtype.kind == "f" else target  # noqa: E731
    bounds = list(zip(cuts[:-1], cuts[1:], strict=True))
    stats = None
    for k in order:
        a, b = bounds[k]
        part = _shards.row_stats(
            x[:, a:b], shard_target(a, b), class_start=a, num_classes=n_classes, backend=backend, **options
        )
        stats = part if stats is None else _shards.merge_row_stats(stats, part)
    loss, coef, grad_scale = _shards.finish(
        stats, target, num_classes=n_classes, reduction=reduction, backend=backend, **options
    )
    smoothing = {k: v for k, v in options.items() if k != "ignore_index"}
    grads = [
        _shards.shard_grad(
            x[:, a:b],
            shard_target(a, b),
            coef,
            grad_scale,
            class_start=a,
            num_classes=n_classes,
            backend=backend,
            **smoothing,
        )
        for a, b in bounds
    ]
    return loss, np.concatenate(grads, axis=1)


@pytest.mark.parametrize("n_classes", [2, 7, 40, 300])
@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probability"])
def test_any_split_gives_the_unsplit_answer(n_classes, options, reduction, kind, shard_backend):
    rng = np.random.default_rng(n_classes)
    n = 64
    x = 4 * rng.standard_normal((n, n_classes))
    if kind == "index":
        target = rng.integers(0, n_classes, n)
        target[::5] = -100
    else:
        target = rng.random((n, n_classes))
    opts = _options(options, n_classes, rng)
    expected_loss, expected_grad = fx.cross_entropy_with_grad(
        x, target, reduction=reduction, backend=shard_backend, **opts
    )
    for _trial in range(4):
        k = int(rng.integers(1, min(n_classes, 5) + 1))
        cuts = [0, *sorted(rng.choice(np.arange(1, n_classes), k - 1, replace=False).tolist()), n_classes]
        order = rng.permutation(k)
        loss, grad = _split(x, target, cuts, order, reduction, shard_backend, **opts)
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-13, atol=1e-15, err_msg=f"cuts {cuts}")
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-13, atol=1e-15, err_msg=f"cuts {cuts}")


def test_split_matches_the_reference_float32(shard_backend):
    rng = np.random.default_rng(3)
    x = (3 * rng.standard_normal((50, 33))).astype(np.float32)
    y = rng.integers(0, 33, 50)
    loss, grad = _split(x, y, [0, 16, 33], [1, 0], "mean", shard_backend, label_smoothing=0.1)
    ref_loss, ref_grad = _reference.cross_entropy(x, y, label_smoothing=0.1)
    assert_close(loss, ref_loss, np.float32)
    assert_close(grad, ref_grad, np.float32)


def test_masked_shard_and_target_outside_every_other_shard(shard_backend):
    """A shard whose logits are all -inf (masked vocabulary) adds nothing: not a NaN."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 12))
    x[:, 8:] = -np.inf
    y = np.array([0, 3, 7, 5, -100, 1])
    expected_loss, expected_grad = fx.cross_entropy_with_grad(x, y, reduction="none", backend=shard_backend)
    loss, grad = _split(x, y, [0, 4, 8, 12], [2, 0, 1], "none", shard_backend)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-13)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-13, atol=1e-16)
    assert np.all(grad[:, 8:] == 0)


def test_target_logit_minus_inf_in_its_shard_gives_inf(shard_backend):
    x = np.array([[0.0, 1.0, -np.inf, 2.0]])
    y = np.array([2])
    loss, _ = _split(x, y, [0, 2, 4], [0, 1], "sum", shard_backend)
    assert loss == np.inf == fx.cross_entropy(x, y, reduction="sum")


def test_merge_is_symmetric_and_associative_to_rounding(shard_backend):
    rng = np.random.default_rng(5)
    x = 10 * rng.standard_normal((20, 30))
    y = rng.integers(0, 30, 20)
    parts = [
        _shards.row_stats(x[:, a:b], y, class_start=a, num_classes=30, label_smoothing=0.1, backend=shard_backend)
        for a, b in [(0, 7), (7, 19), (19, 30)]
    ]
    left = _shards.merge_row_stats(_shards.merge_row_stats(parts[0], parts[1]), parts[2])
    right = _shards.merge_row_stats(parts[2], _shards.merge_row_stats(parts[1], parts[0]))
    whole = _shards.row_stats(x, y, num_classes=30, label_smoothing=0.1, backend=shard_backend)
    np.testing.assert_array_equal(left[:, 0], whole[:, 0])  # the max is exact
    np.testing.assert_allclose(left, right, rtol=1e-14)
    np.testing.assert_allclose(left, whole, rtol=1e-13)


def test_row_chunks_with_a_global_mean_denominator(shard_backend):
    """A row chunk of a "mean" loss: the chunk's gradient scaled by the GLOBAL 1/D (the
    fused linear loss and streamed scoring run chunks this way)."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((90, 13))
    y = rng.integers(0, 13, 90)
    y[::4] = -100
    loss, grad = fx.cross_entropy_with_grad(x, y, backend=shard_backend)
    chunks = [(0, 31), (31, 32), (32, 90)]
    total = sum(float(fx.cross_entropy(x[a:b], y[a:b], reduction="sum", backend=shard_backend)) for a, b in chunks)
    denominator = np.count_nonzero(y != -100)
    assert total / denominator == pytest.approx(float(loss), rel=1e-14)
    stats = _shards.row_stats(x, y, num_classes=13, backend=shard_backend)
    _, coef, grad_scale = _shards.finish(stats, y, num_classes=13, backend=shard_backend)
    assert grad_scale == 1.0 / denominator
    for a, b in chunks:
        chunk_grad = _shards.shard_grad(x[a:b], y[a:b], coef[a:b], grad_scale, num_classes=13, backend=shard_backend)
        np.testing.assert_allclose(chunk_grad, grad[a:b], rtol=1e-14, atol=1e-17)


def test_backends_agree_on_every_phase():
    """numba and cython give the same statistics (the max exactly), losses, coefficients and
    shard gradients, to float64 rounding of their differently ordered row sums."""
    if len(SHARD_BACKENDS) < 2:
        pytest.skip(f"needs both shard backends, have {SHARD_BACKENDS}")
    rng = np.random.default_rng(7)
    x = 4 * rng.standard_normal((300, 70))
    y = rng.integers(0, 70, 300)
    y[::6] = -100
    weight = rng.random(70) + 0.5
    options = {"weight": weight, "label_smoothing": 0.2}
    results = {}
    for backend in SHARD_BACKENDS:
        stats = _shards.row_stats(x[:, 20:55], y, class_start=20, num_classes=70, backend=backend, **options)
        loss, coef, grad_scale = _shards.finish(stats, y, num_classes=70, backend=backend, **options)
        grad = _shards.shard_grad(
            x[:, 20:55], y, coef, grad_scale, class_start=20, num_classes=70, backend=backend, **options
        )
        results[backend] = stats, loss, coef, grad
    (stats_a, loss_a, coef_a, grad_a), (stats_b, loss_b, coef_b, grad_b) = results.values()
    np.testing.assert_array_equal(stats_a[:, 0], stats_b[:, 0])
    np.testing.assert_allclose(stats_a, stats_b, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-13)
    np.testing.assert_allclose(coef_a, coef_b, rtol=1e-13)
    np.testing.assert_allclose(grad_a, grad_b, rtol=1e-13, atol=1e-17)


def test_backend_without_phases_is_a_clear_error():
    x, y = np.zeros((2, 3)), np.zeros(2, int)
    with pytest.raises(ValueError, match="no class-shard phases"):
        _shards.row_stats(x, y, backend="numpy")
    with pytest.raises(ValueError, match="unknown backend"):
        _shards.row_stats(x, y, backend="jax")


def test_neither_backend_is_a_clear_error():
    """With numba hidden and the extension disabled, the phases say why they cannot run."""
    code = """
        import sys
        sys.modules["numba"] = None
        import numpy as np
        from fastxent import _shards
        try:
            _shards.row_stats(np.zeros((2, 3)), np.zeros(2, int))
        except RuntimeError as error:
            print(error)
    """
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FASTXENT_")}
    environment["FASTXENT_DISABLE_CYTHON"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(fx.__file__)))
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, environment.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr
    message = result.stdout.strip()
    assert "need the numba or the cython backend" in message
    assert "numba could not be imported" in message and "FASTXENT_DISABLE_CYTHON" in message
