"""The dispatch table: which backends loaded, which one a call uses, in which dtype.

``KERNELS`` maps a backend name to the module that holds its kernels; every such module
has the same functions (``xent_index``, ``xent_probability``, ``logsumexp_rows``,
``log_softmax_rows``, ``softmax_rows``, ``label_stats``, and the distillation's ``distill``),
each specialised on dtype by the backend itself, taking the options as one ``_spec.Params``
record (``_spec.DistillParams`` for ``distill``). The numba and
cython modules also have the class-shard phases (``row_stats``, ``finish``, ``shard_grad``).
``COMPUTE_DTYPE`` says in which dtype each input dtype is computed.
All decisions are made here, in Python, before any kernel runs.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from types import ModuleType

import numpy as np

from . import _numpy_backend
from ._spec import STORAGE_BF16, STORAGE_F16, STORAGE_NATIVE

#: backends in order of preference for ``backend=None``
PREFERENCE = ("numba", "cython", "numpy")
#: the cross-entropy's preference up to CYTHON_MAX_C classes: there gcc's code runs faster
#: than LLVM's from numba. In the rows-across-lanes layout (C <= 32) 1.1-1.7x as fast
#: (float32, 2.6M logits, 2 threads, AMD EPYC, numba over cython in place: C = 3 1.09x,
#: 10 1.16x, 16 1.41x, 32 1.68x; both transpose by register tiles since 2026-12-04);
#: above it, where both run rows one at a time, the per-row work (the max's chain, a log,
#: a divide, the finish) still costs numba more. Measured on the AMD EPYC of
#: 2026-12-04 (float32, 8M logits, 2 threads, median of 9 interleaved; numba over cython,
#: loss+grad out= / in place / loss only): C = 48 2.45 / 2.66 / 2.53, 64 1.99 / 2.09 / 2.19,
#: 128 1.57 / 1.68 / 1.83, 256 1.14 / 1.30 / 1.52, 512 0.95 / 1.00 / 1.30, 1000 0.95 / 0.89 /
#: 1.14 (the Intel Xeon run of docs' earlier table: at 128 1.16 / 1.45, at 1000 0.99 / 1.03).
#: Since numba's row code counts no references (the evening of 2026-12-04; 2.6M logits,
#: median of 15 interleaved, same order): C = 64 1.65 / 1.58 / 2.02, 128 1.31 / 1.25 / 1.70,
#: 256 1.09 / 0.98 / 1.42, 512 0.87 / 0.80 / 1.34: the crossing is still near 256.
SMALL_C_PREFERENCE = ("cython", "numba", "numpy")
CYTHON_MAX_C = 256

#: floating input dtype -> dtype the kernels compute in (and write the gradient in)
COMPUTE_DTYPE: dict[np.dtype, np.dtype] = {
    np.dtype(np.float16): np.dtype(np.float32),  # no float16 arithmetic: compute in float32
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
    np.dtype(np.longdouble): np.dtype(np.float64),  # no long double kernels: float64
}


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16 (the "bfloat16" extra). ml_dtypes is not
    imported here: an array of that dtype exists only once its owner imported it, and the
    import takes ~1.2 s on this machine (it was a third of every ``import fastxent``)."""
    if dtype.kind != "V" or dtype.name != "bfloat16":
        return False
    ml_dtypes = sys.modules.get("ml_dtypes")
    return ml_dtypes is not None and dtype == np.dtype(ml_dtypes.bfloat16)


#: 16-bit storage dtypes that a kernel module with ``STORAGE_16BIT`` reads and writes as
#: 16-bit words (``Params.storage``), computing in float32: no float32 copy of the logits
#: (bfloat16 too: see is_bfloat16)
STORAGE: dict[np.dtype, int] = {np.dtype(np.float16): STORAGE_F16}


def storage_of(dtype: np.dtype, kernels: ModuleType) -> int:
    """``Params.storage`` for logits of ``dtype`` on ``kernels``: the 16-bit code where that
    module reads the words natively, else STORAGE_NATIVE (the API then casts to float32)."""
    if not getattr(kernels, "STORAGE_16BIT", False):
        return STORAGE_NATIVE
    if is_bfloat16(dtype):
        return STORAGE_BF16
    return STORAGE.get(dtype, STORAGE_NATIVE)


def is_floating(dtype: np.dtype) -> bool:
    """NumPy floating dtypes, and bfloat16 (ml_dtypes' dtypes are of kind "V")."""
    return dtype.kind == "f" or is_bfloat16(dtype)


#: the dtypes with native kernels (every other floating dtype computes in one of them)
NATIVE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: the backend functions the API calls, each compiled once per native dtype: the list
#: precompile() walks (a backend that compiles lazily has ``warm_up(function, dtype)``),
#: the longest compile first (numba, float32: ~15, 4.4, 3.0, 1.5, 1.4, 1.1, 0.9 s of CPU)
FUNCTIONS = (
    "xent_index",
    "xent_probability",
    "distill",
    "log_softmax_rows",
    "softmax_rows",
    "score_rows",  # fastxent score's per-row pass (numba only; without it NumPy does the same)
    "logsumexp_rows",
)

#: the environment variable that sets the default backend
BACKEND_ENV = "FASTXENT_BACKEND"

KERNELS: dict[str, ModuleType] = {"numpy": _numpy_backend}
#: why a backend did not load (for the error when it is asked for)
UNAVAILABLE: dict[str, str] = {}

try:
    from . import _numba_kernels
except ImportError as error:  # numba missing or broken: the package still works
    UNAVAILABLE["numba"] = f"numba could not be imported ({error})"
else:
    KERNELS["numba"] = _numba_kernels

#: the environment variable that keeps the compiled extension from loading (``1``)
DISABLE_CYTHON_ENV = "FASTXENT_DISABLE_CYTHON"

if os.environ.get(DISABLE_CYTHON_ENV, "").strip() not in ("", "0"):
    UNAVAILABLE["cython"] = f"disabled by {DISABLE_CYTHON_ENV}={os.environ[DISABLE_CYTHON_ENV]}"
else:
    try:
        from . import _cy_backend
    except ImportError as error:  # not built (FASTXENT_BUILD_EXT=0, no compiler) or broken
        why = str(error)
        if importlib.util.find_spec(f"{__package__}._cy_xent") is None:  # Python's message says "circular import"
            why = "it is not built: installing needs Cython and a C compiler, see setup.py"
        UNAVAILABLE["cython"] = f"the compiled extension fastxent._cy_xent could not be imported ({why})"
    else:
        KERNELS["cython"] = _cy_backend


# --- fork safety -----------------------------------------------------------------------
# GNU OpenMP (libgomp: numba's "omp" threading layer, and the Cython extension, share the
# one libgomp) is not fork-safe: a child forked after the parent ran an OpenMP parallel
# region inherits a thread pool whose threads do not exist in the child. numba's omp layer
# then terminates the child ("fork() called from a process already using GNU OpenMP"), and
# the Cython kernels hang in it. So a child forked after the parent used an OpenMP pool
# runs the "numpy" backend instead of those two (with one RuntimeWarning per process):
# correct to the usual tolerance, slower, and nothing in the child touches libgomp. numba
# on the "tbb" or "workqueue" layer is fork-safe and keeps running in the child. The
# "spawn" and "forkserver" start methods of multiprocessing keep every backend.

#: True in a process forked (at any depth) from one that had used a GNU OpenMP pool
_FORKED_AFTER_OPENMP = False
#: set when the Cython backend (built with OpenMP) is handed out in this process
_cython_openmp_used = False
_fork_warned = False


def _numba_layer() -> str | None:
    module = KERNELS.get("numba")
    return module.threading_layer() if module is not None else None


def _openmp_started() -> bool:
    """Whether this process may have started a GNU OpenMP thread pool (conservatively)."""
    return _cython_openmp_used or _numba_layer() == "omp"


def _after_fork_in_child() -> None:
    global _FORKED_AFTER_OPENMP, _fork_warned
    if _openmp_started():
        _FORKED_AFTER_OPENMP = True
    _fork_warned = False


os.register_at_fork(after_in_child=_after_fork_in_child)


def _unsafe_after_fork(name: str) -> bool:
    """Whether backend ``name`` would use a stale OpenMP pool in this forked child."""
    if not _FORKED_AFTER_OPENMP:
        return False
    if name == "cython":
        return True
    if name == "numba":  # fine on tbb/workqueue; omp or not launched yet: assume omp
        return _numba_layer() not in ("tbb", "workqueue")
    return False


def _fork_fallback(name: str) -> ModuleType:
    global _fork_warned
    if not _fork_warned:
        _fork_warned = True
        warnings.warn(
            f"fastxent: this process was forked after its parent used GNU OpenMP threads, which do not "
            f"survive fork(); running the {name!r} backend's calls on the 'numpy' backend in this process "
            "(use the 'spawn' or 'forkserver' multiprocessing start method to keep the fast kernels)",
            RuntimeWarning,
            stacklevel=4,
        )
    return KERNELS["numpy"]


def _hand_out(name: str) -> ModuleType:
    global _cython_openmp_used
    if _unsafe_after_fork(name):
        return _fork_fallback(name)
    if name == "cython" and not _cython_openmp_used:
        _cython_openmp_used = bool(KERNELS["cython"].openmp_enabled())
    return KERNELS[name]


def available_backends() -> tuple[str, ...]:
    """Names of the backends that loaded, fastest first."""
    return tuple(name for name in PREFERENCE if name in KERNELS)


def default_backend(n_classes: int | None = None) -> str:
    """The backend ``backend=None`` runs when ``$FASTXENT_BACKEND`` is unset: the fastest that
    loaded, for a cross-entropy of ``n_classes`` classes (None: any other function)."""
    small = n_classes is not None and "cython" in KERNELS and n_classes <= CYTHON_MAX_C
    return next(name for name in (SMALL_C_PREFERENCE if small else PREFERENCE) if name in KERNELS)


def kernels_for(backend: str | None, n_classes: int | None = None) -> ModuleType:
    """The kernel module of ``backend``; ``None`` means ``$FASTXENT_BACKEND`` or the fastest
    (for a cross-entropy of ``n_classes`` classes, see ``default_backend``)."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
        if backend is None:
            return _hand_out(default_backend(n_classes))
        source = f"{BACKEND_ENV}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if not isinstance(backend, str) or backend not in PREFERENCE:  # an array would compare elementwise
        raise ValueError(f"unknown backend in {source}: expected one of {', '.join(PREFERENCE)}")
    if backend not in KERNELS:
        raise RuntimeError(f"{source} is not available: {UNAVAILABLE[backend]}")
    return _hand_out(backend)


def precompile_plan(backend: str) -> list[tuple[str, np.dtype]]:
    """What ``precompile`` compiles for ``backend``: (function, dtype) pairs from the table
    above; empty for a backend that is compiled ahead of time (cython) or not at all."""
    module = KERNELS.get(backend)
    if module is None or not hasattr(module, "warm_up"):
        return []
    return [(function, dtype) for function in FUNCTIONS for dtype in NATIVE_DTYPES]


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a floating input is computed in; TypeError for any other dtype."""
    if is_bfloat16(dtype):
        return np.dtype(np.float32)
    native = np.dtype(dtype.type) if dtype.kind in "fV" else dtype
    try:
        return COMPUTE_DTYPE[native]
    except KeyError:
        raise TypeError(
            f"logits must be a floating array (float16, bfloat16, float32 or float64), got dtype {dtype}"
        ) from None
