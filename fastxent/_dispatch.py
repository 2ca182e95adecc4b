"""The dispatch table: which backends loaded, which one a call uses, in which dtype.

``KERNELS`` maps a backend name to the module that holds its kernels; every such module
has the same functions (``xent_index``, ``xent_probability``, ``logsumexp_rows``,
``log_softmax_rows``, ``softmax_rows``, ``label_stats``), each specialised on dtype by
the backend itself. ``COMPUTE_DTYPE`` says in which dtype each input dtype is computed.
All decisions are made here, in Python, before any kernel runs.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import numpy as np

from . import _numpy_backend

#: backends in order of preference for ``backend=None``
PREFERENCE = ("numba", "cython", "numpy")

#: floating input dtype -> dtype the kernels compute in (and write the gradient in)
COMPUTE_DTYPE: dict[np.dtype, np.dtype] = {
    np.dtype(np.float16): np.dtype(np.float32),  # no float16 arithmetic: compute in float32
    np.dtype(np.float32): np.dtype(np.float32),
    np.dtype(np.float64): np.dtype(np.float64),
    np.dtype(np.longdouble): np.dtype(np.float64),  # no long double kernels: float64
}

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
        from . import _cy_xent
    except ImportError as error:  # not built (FASTXENT_BUILD_EXT=0, no compiler) or broken
        why = str(error)
        if importlib.util.find_spec(f"{__package__}._cy_xent") is None:  # Python's message says "circular import"
            why = "it is not built: installing needs Cython and a C compiler, see setup.py"
        UNAVAILABLE["cython"] = f"the compiled extension fastxent._cy_xent could not be imported ({why})"
    else:
        KERNELS["cython"] = _cy_xent


def available_backends() -> tuple[str, ...]:
    """Names of the backends that loaded, fastest first."""
    return tuple(name for name in PREFERENCE if name in KERNELS)


def kernels_for(backend: str | None) -> ModuleType:
    """The kernel module of ``backend``; ``None`` means ``$FASTXENT_BACKEND`` or the fastest."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
        if backend is None:
            return KERNELS[available_backends()[0]]
        source = f"{BACKEND_ENV}={backend!r}"
    else:
        source = f"backend={backend!r}"
    if backend not in PREFERENCE:
        raise ValueError(f"unknown backend in {source}: expected one of {', '.join(PREFERENCE)}")
    if backend not in KERNELS:
        raise RuntimeError(f"{source} is not available: {UNAVAILABLE[backend]}")
    return KERNELS[backend]


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a floating input is computed in; TypeError for any other dtype."""
    native = np.dtype(dtype.type) if dtype.kind == "f" else dtype
    try:
        return COMPUTE_DTYPE[native]
    except KeyError:
        raise TypeError(f"logits must be a floating array (float16, float32 or float64), got dtype {dtype}") from None
