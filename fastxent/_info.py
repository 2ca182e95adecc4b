"""Small helpers about the installed backends: OpenMP, and compiling every kernel ahead of time."""

from __future__ import annotations

import itertools

import numpy as np

from . import _api, _dispatch


def openmp_enabled() -> bool:
    """Whether the Cython backend loaded and was built with OpenMP (else it runs serially).

    The numba backend's threading layer is a separate matter: ``numba.threading_layer()``.
    """
    extension = _dispatch.KERNELS.get("cython")
    return bool(extension is not None and extension.openmp_enabled())


def precompile(backend: str | None = None) -> None:
    """Compile (or load from numba's cache) every kernel specialisation the API uses.

    The numba kernels compile lazily, on the first call with a given dtype combination,
    and are cached on disk; a process that must not pay a compile on its first real call
    (a server's warm-up, a container build) calls this once. The specialisations are
    float32/float64 logits x int32/int64 labels x {loss only, loss+grad, in place} (numba:
    for few classes and for many), the
    probability-target kernels, and log_softmax/softmax/logsumexp.
    """
    # 3 and 64 classes: numba's small-C block kernels (C <= 16) and its row kernels
    for dtype, label_dtype, n_classes in itertools.product((np.float32, np.float64), (np.int32, np.int64), (3, 64)):
        x = np.zeros((2, n_classes), dtype)
        y = np.zeros(2, label_dtype)
        _api.cross_entropy(x, y, backend=backend)
        _api.cross_entropy_with_grad(x, y, backend=backend)
        _api.cross_entropy_with_grad(x.copy(), y, out=None, backend=backend)
        in_place = x.copy()
        _api.cross_entropy_with_grad(in_place, y, out=in_place, backend=backend)
    for dtype in (np.float32, np.float64):
        x = np.zeros((2, 3), dtype)
        t = np.full((2, 3), 1 / 3, dtype)
        _api.cross_entropy(x, t, backend=backend)
        _api.cross_entropy_with_grad(x, t, backend=backend)
        in_place = x.copy()
        _api.cross_entropy_with_grad(in_place, t, out=in_place, backend=backend)
        _api.logsumexp(x, backend=backend)
        for transform in (_api.log_softmax, _api.softmax):
            transform(x, backend=backend)
            in_place = x.copy()
            transform(in_place, out=in_place, backend=backend)
