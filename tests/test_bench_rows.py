"""The JAX rows of `fastxent bench`: jax.jit of optax's loss and fastxent.jax, both timing a
real value_and_grad that agrees with fastxent's."""

from __future__ import annotations

import numpy as np
import pytest

from fastxent import _bench


def test_every_fastxent_row_of_the_plot_has_its_own_style():
    """Blues for all of fastxent's rows, told apart by shade/marker (backend) and line style (call)."""
    names = [
        f"fastxent[{backend}] {call}"
        for backend in ("numba", "cython")
        for call in ("loss+grad", "loss+grad out=", "in place", "loss only")
    ] + [
        _bench.EXTENSIONS_ROW,
        _bench.BFLOAT16_ROW,
        "fastxent.torch fwd+bwd (adapter)",
        "fastxent.jax jit(value_and_grad)",
    ]
    styles = {(*_bench._fastxent_style(name), _bench._call_linestyle(name)) for name in names}
    assert len(styles) == len(names)
    assert {_bench._family(name) for name in names} == {"Blues"}
    assert _bench._family("torch fwd+bwd") != "Blues" and _bench._family("torch.compile fwd") != "Blues"


def test_jax_rows_are_optax_and_fastxent_jax_and_compute_the_loss_and_gradient():
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import fastxent as fx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 50), dtype=np.float32)
    y = rng.integers(0, 50, 32)
    contenders = {c.name: c for c in _bench._contenders(x, y, 1, [], False, torch_compile=False)}
    assert {"jax jit(value_and_grad) optax", "fastxent.jax jit(value_and_grad)"} <= set(contenders)
    loss, grad = fx.cross_entropy_with_grad(x, y)
    for name in ("jax jit(value_and_grad) optax", "fastxent.jax jit(value_and_grad)"):
        value, gradient = contenders[name].run()
        np.testing.assert_allclose(float(value), float(loss), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(gradient), grad, atol=1e-7)
    assert _bench._family("fastxent.jax jit(value_and_grad)") == "Blues"
    assert _bench._family("jax jit(value_and_grad) optax") == "Greens"


def test_the_pytest_benchmark_suite_times_the_registry():
    """bench/bench_cross_entropy.py parametrizes over the registry's contenders, not a list of its own."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_cross_entropy.py"
    if not path.exists():
        pytest.skip("bench/ is in the checkout only")
    spec = importlib.util.spec_from_file_location("bench_cross_entropy", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x, y = np.zeros((4, 10), np.float32), np.zeros(4, np.int64)
    registry = [c.name for c in _bench._contenders(x, y, 1, [], False, torch_compile=False)]
    assert module.NAMES == registry
    assert "memory floor (copy)" in module.NAMES and "fastxent.torch fwd+bwd (adapter)" in module.NAMES


def test_the_bfloat16_row_times_the_words_and_is_noted_against_float32():
    """The bfloat16 row runs the default backend on bfloat16 words (not a float32 copy) with
    ``out=``, and its ratio to the float32 ``out=`` row of that backend is in the notes."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import fastxent as fx

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 300), dtype=np.float32)
    y = rng.integers(0, 300, 16)
    contenders = {c.name: c for c in _bench._contenders(x, y, 1, [], False, torch_compile=False)}
    loss, grad = contenders[_bench.BFLOAT16_ROW].run()
    assert grad.dtype == ml_dtypes.bfloat16
    expected_loss, expected_grad = fx.cross_entropy_with_grad(x.astype(ml_dtypes.bfloat16), y)
    np.testing.assert_array_equal(grad.view(np.uint16), expected_grad.view(np.uint16))
    assert float(loss) == float(expected_loss)
    backend = fx._dispatch.default_backend(300)
    rows = [
        _bench.Row((16, 300), name, "fwd+bwd", ms, 0.0, 0.0, None, None, None, [], None)
        for name, ms in ((f"fastxent[{backend}] loss+grad out=", 2.0), (_bench.BFLOAT16_ROW, 1.5))
    ]
    notes: list[str] = []
    _bench._note_extensions(rows, 300, notes)
    assert notes == [f"16x300: {_bench.BFLOAT16_ROW} ({backend}) takes 0.75x the float32 loss+grad out="]
    float64 = {c.name for c in _bench._contenders(x.astype(np.float64), y, 1, [], False, torch_compile=False)}
    assert _bench.BFLOAT16_ROW not in float64
