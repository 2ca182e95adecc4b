"""The JAX rows of `fastxent bench`: jax.jit of optax's loss and fastxent.jax, both timing a
real value_and_grad that agrees with fastxent's."""

from __future__ import annotations

import numpy as np
import pytest

from fastxent import _bench

pytest.importorskip("jax")
pytest.importorskip("optax")


def test_jax_rows_are_optax_and_fastxent_jax_and_compute_the_loss_and_gradient():
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
