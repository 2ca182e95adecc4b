"""openmp_enabled() and precompile()."""

from __future__ import annotations

import subprocess
import sys

import fastxent as fx
from fastxent import _dispatch


def test_openmp_enabled_follows_the_extension():
    extension = _dispatch.KERNELS.get("cython")
    assert fx.openmp_enabled() == bool(extension is not None and extension.openmp_enabled())


def test_precompile_leaves_every_numba_kernel_compiled(backend):
    fx.precompile(backend=backend)
    if backend != "numba":
        return
    from fastxent import _numba_kernels as nb

    kernels = [
        nb._xent_index_loss_kernel,
        nb._xent_index_grad_kernel,
        nb._xent_index_in_place_kernel,
        nb._xent_index_small_loss_kernel,
        nb._xent_index_small_grad_kernel,
        nb._xent_index_small_in_place_kernel,
        nb._xent_probability_loss_kernel,
        nb._xent_probability_grad_kernel,
        nb._xent_probability_in_place_kernel,
        nb._logsumexp_kernel,
        nb._log_softmax_kernel,
        nb._log_softmax_in_place_kernel,
        nb._softmax_kernel,
        nb._softmax_in_place_kernel,
    ]
    for kernel in kernels:
        assert kernel.signatures, f"{kernel.py_func.__name__} was not compiled"
    # float32/float64 logits x int32/int64 labels: the specialisations the API calls (inputs
    # read-only, except the logits of the in-place kernel, which it overwrites)
    from numba import types

    for dtype, label in [(f, i) for f in (types.float32, types.float64) for i in (types.int32, types.int64)]:
        labels = types.Array(label, 1, "C", readonly=True)
        assert (types.Array(dtype, 2, "C", readonly=True), labels) in {
            sig[:2] for sig in nb._xent_index_grad_kernel.signatures
        }
        for in_place in (nb._xent_index_in_place_kernel, nb._xent_index_small_in_place_kernel):
            assert (types.Array(dtype, 2, "C"), labels) in {sig[:2] for sig in in_place.signatures}
        assert (types.Array(dtype, 2, "C", readonly=True), labels) in {
            sig[:2] for sig in nb._xent_index_small_grad_kernel.signatures
        }


def test_precompile_command_runs():
    done = subprocess.run([sys.executable, "-m", "fastxent", "precompile"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "numba" in done.stdout
