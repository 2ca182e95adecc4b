"""fastxent.jax: cross_entropy under jax.jit, jax.grad and jax.vmap equals optax's
softmax_cross_entropy_with_integer_labels(...).mean() and its gradient; "none" through
jax.vjp with any cotangent; options reach the kernel."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy
fxj = pytest.importorskip("fastxent.jax")

import fastxent as fx  # noqa: E402


def optax_mean(x, y):
    return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


@pytest.fixture
def data(rng):
    x = jnp.asarray(rng.standard_normal((48, 70)).astype(np.float32) * 2)
    y = jnp.asarray(rng.integers(0, 70, 48))
    return x, y


def test_jit_and_grad_equal_optax(data):
    x, y = data
    np.testing.assert_allclose(jax.jit(fxj.cross_entropy)(x, y), optax_mean(x, y), rtol=1e-6)
    for grad in (jax.grad(fxj.cross_entropy), jax.jit(jax.grad(fxj.cross_entropy))):
        np.testing.assert_allclose(grad(x, y), jax.grad(optax_mean)(x, y), rtol=1e-5, atol=1e-8)


def test_vmap_over_a_batch_of_problems(data):
    x, y = data
    xs, ys = jnp.stack([x, 0.5 * x, -x]), jnp.stack([y, y, y[::-1]])
    np.testing.assert_allclose(jax.vmap(fxj.cross_entropy)(xs, ys), jax.vmap(optax_mean)(xs, ys), rtol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(fxj.cross_entropy))(xs, ys), jax.vmap(jax.grad(optax_mean))(xs, ys), rtol=1e-5, atol=1e-8
    )


def test_none_reduction_vjp_with_a_cotangent(data):
    x, y = data
    cotangent = jnp.linspace(0.0, 2.0, x.shape[0], dtype=jnp.float32)
    loss, vjp = jax.vjp(lambda v: fxj.cross_entropy(v, y, reduction="none"), x)
    ref_loss, ref_vjp = jax.vjp(lambda v: optax.softmax_cross_entropy_with_integer_labels(v, y), x)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(vjp(cotangent)[0], ref_vjp(cotangent)[0], rtol=1e-5, atol=1e-8)


def test_options_reach_the_kernel(data, rng):
    x, y = data
    weight = rng.random(70) + 0.5
    options = {"weight": weight, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
    got = jax.jit(lambda a, b: fxj.cross_entropy(a, b, **options))(x, y)
    expected, expected_grad = fx.cross_entropy_with_grad(np.asarray(x), np.asarray(y), **options)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    grad = jax.grad(lambda a: fxj.cross_entropy(a, y, **options))(x)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-9)
