"""The process that compiles numba's kernels computes the same bits as every later process,
which loads them from numba's on-disk cache.

Before the outlined helpers were link-only (``_jit.LINK_ONLY``: no machine code of their
own) and the distillation's and ``fastxent score``'s parallel kernels were compiled in a
child process (``compiled_through_the_cache``), the compiling process ran the helpers' own
libraries and later processes their callers' re-optimised copies of them: float32 soft-cap
gradients differed by 1 ulp in ~30% of the elements, a row of -inf logits had gradient 0 in
the first process and -1.7e-13 in every later one, float64 beta = 1 distillation gradients
differed in the last bits, and a float32 row's score lse by 1 ulp (docs/DESIGN.md). Each
subprocess here starts from the same empty cache directory (the first compiles into it, the
second loads), so the test takes one compile of the float32 class-index kernel, the float64
distillation kernel and the float32 score kernel (~25 s).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numba
import pytest

pytestmark = pytest.mark.skipif(numba.config.DISABLE_JIT, reason="nothing is compiled under NUMBA_DISABLE_JIT")

# a soft-capped, scaled, z-loss float32 loss+grad with an all -inf row: the case that differed
PROGRAM = """
import hashlib, numpy as np, fastxent as fx
rng = np.random.default_rng(64)
x = (rng.standard_normal((3000, 64)) * 3).astype(np.float32)
x[2, :] = -np.inf
y = rng.integers(0, 64, 3000)
loss, grad = fx.cross_entropy_with_grad(x, y, backend="numba", softcap=20.0, z_loss=1e-3, logit_scale=0.7)
# and a float64 distillation at beta = 1 (its parallel kernel calls the outlined _distill_rows)
z = rng.standard_normal((200, 333)) * 3
t = rng.standard_normal((200, 333)) * 3
kl, kl_grad = fx.distillation_loss_with_grad(z, t, beta=1.0, temperature=2.0, backend="numba")
# and fastxent score's row pass on 5000 classes (its float32 lse differed by 1 ulp)
from fastxent._score import _row_numbers
rng = np.random.default_rng(5000)
scores = _row_numbers((rng.standard_normal((300, 5000)) * 3).astype(np.float32), rng.integers(0, 5000, 300))
print(hashlib.sha256(grad.tobytes() + np.float64(loss).tobytes()).hexdigest(), float(grad[2, 0]))
print(hashlib.sha256(kl_grad.tobytes() + np.float64(kl).tobytes()).hexdigest())
print(hashlib.sha256(scores.tobytes()).hexdigest())
"""


def _run_with_cache(cache_dir) -> str:
    environment = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    environment["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
    environment.pop("FASTXENT_COMPILE_IN_PROCESS", None)
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=environment, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_the_compiling_process_computes_the_cached_bits(tmp_path):
    compiling = _run_with_cache(tmp_path)  # the cache is empty: this one compiles
    assert any(tmp_path.rglob("*.nbc")), "the first process wrote nothing to numba's cache"
    loading = _run_with_cache(tmp_path)
    assert compiling == loading
    digest, row_of_minus_inf, distillation_digest, score_digest = loading.split()
    assert abs(float(row_of_minus_inf)) < 1e-12  # the -inf row's gradient: 0 up to float32 rounding


def test_a_link_only_helper_is_linked_into_its_caller_and_has_no_code_of_its_own():
    """``_jit.LINK_ONLY``: a helper called from a kernel is lowered, optimised and linked into
    it, and nothing more: its library never reaches the JIT engine (no machine code), and
    the dispatcher's entry point is a stub that Python cannot call into the helper."""
    import math

    import numpy as np

    from fastxent import _jit

    @_jit.exp_helper
    def twice_the_log(s):
        return 2.0 * math.log(s)

    @numba.njit
    def caller(s):
        return twice_the_log(s) + 1.0

    assert caller(math.e) == 3.0  # the linked copy runs
    (compiled,) = twice_the_log.overloads.values()
    assert isinstance(compiled.library, _jit._LinkOnlyLibrary)
    engine = compiled.library.codegen._engine
    assert not engine.is_symbol_defined(compiled.fndesc.mangled_name)
    assert engine.is_symbol_defined(caller.overloads[(numba.float64,)].fndesc.mangled_name)
    with pytest.raises(TypeError):
        twice_the_log(np.float64(2.0))


def test_packed_arrays_come_back_as_the_same_arrays():
    """``_jit.pack_array`` / ``unpack_array``, how the block functions get their arrays: each
    array comes back with its own address, shape and C strides, for every ndim and dtype the
    blocks take, and the slots advance by 1 + ndim."""
    import numpy as np

    from fastxent import _jit

    @numba.njit
    def round_trip(packed, a, b, c):
        k = _jit.pack_array(packed, 1, a)
        k = _jit.pack_array(packed, k, b)
        end = _jit.pack_array(packed, k, c)
        a2, k = _jit.unpack_array(packed, 1, np.float32, 1)
        b2, k = _jit.unpack_array(packed, k, np.uint16, 2)
        c2, k = _jit.unpack_array(packed, k, np.float64, 3)
        c2[1, 2, 3] = -1.0  # writes the original
        return end, k, a2, b2, c2

    a = np.arange(5, dtype=np.float32)
    a.flags.writeable = False  # read-only in, a mutable view of it out
    b = np.arange(12, dtype=np.uint16).reshape(3, 4)
    c = np.zeros((2, 3, 5))
    packed = np.zeros(1 + 2 + 3 + 4, np.int64)
    end, k, a2, b2, c2 = round_trip(packed, a, b, c)
    assert end == k == packed.shape[0]
    for original, unpacked in ((a, a2), (b, b2), (c, c2)):
        assert unpacked.ctypes.data == original.ctypes.data
        assert unpacked.shape == original.shape and unpacked.strides == original.strides
        assert unpacked.dtype == original.dtype
        np.testing.assert_array_equal(unpacked, original)
    assert c[1, 2, 3] == -1.0
