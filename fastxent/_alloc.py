"""Fresh gradient buffers that do not pay page faults on every call.

A large NumPy array is a fresh ``mmap``: glibc returns it to the OS on ``free``, and the
next call's gradient faults in every page again, and zeroes it. That first touch, not the
kernel, was most of the time of a default ``cross_entropy_with_grad(x, y)`` (and of the
buffer ``fastxent.torch`` hands to autograd): right after PyTorch had freed its own
buffers, 4096 x 32000 float32 took 6-8x the time of the same call with ``out=``. On this
kind of virtual machine, memory just returned to the host costs even more to touch again.

So large gradients come from a small cache of blocks that stay mapped: when the last
array (or view, or torch tensor made by ``torch.from_numpy``) using a block dies, the
block returns to the cache instead of to the OS, and the next fresh gradient of a similar
size reuses its pages, already faulted in. This is what PyTorch's CUDA caching allocator
does for device memory. The cost is memory held after the user drops the gradient: at
most :data:`MAX_FREE_BLOCKS` free blocks holding at most :data:`MAX_FREE_BYTES` (a quarter of
physical memory), none larger than needed by more than 2x, and
:func:`release_memory` (``fastxent.release_memory()``) or ``FASTXENT_GRADIENT_CACHE=0``
(read at import) gives it back / turns the cache off. Measurements in docs/DESIGN.md
("Fresh gradients").
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

#: below this many bytes a plain np.empty: glibc keeps such blocks on its heap (its mmap
#: threshold adapts up to 32 MiB), so they are reused without faults already
MIN_BYTES = 8 << 20
#: free blocks kept for reuse (two: a training step's gradient and the next one's, when
#: the previous one is still referenced while the next is made)
MAX_FREE_BLOCKS = 2
#: a free block serves requests of at least this fraction of its size
MIN_FILL = 0.5


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 << 30


#: free blocks kept hold at most this many bytes together (a quarter of physical memory):
#: a block that would pass it goes back to the OS when its gradient dies
MAX_FREE_BYTES = _physical_memory() // 4

ENABLED = os.environ.get("FASTXENT_GRADIENT_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")

_free: list[np.ndarray] = []  # free blocks (uint8 arrays that own their memory), newest last
_lock = threading.RLock()


class _Lease:
    """The base of every cached gradient: exports its block through the array interface
    and, when the last array using it dies, gives the block back to the cache."""

    def __init__(self, block: np.ndarray, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.block = block
        self.__array_interface__: dict[str, Any] = {
            "shape": shape,
            "typestr": dtype.str,
            "data": (block.ctypes.data, False),
            "version": 3,
        }

    def __del__(self) -> None:
        try:
            with _lock:  # reentrant: a collection inside _take in this thread may run this
                _free.append(self.block)
                while len(_free) > MAX_FREE_BLOCKS or sum(b.nbytes for b in _free) > MAX_FREE_BYTES:
                    _free.pop(0)  # the oldest goes back to the OS
        except Exception:  # noqa: BLE001 - interpreter shutdown: the module is gone
            pass


def _take(nbytes: int) -> np.ndarray | None:
    """A free block of ``nbytes`` to ``nbytes / MIN_FILL`` bytes (the newest fitting), or None."""
    # by index, never list.remove: that compares arrays with ==, elementwise (a 500 MB
    # temporary, and a ValueError once two blocks are free)
    with _lock:
        for index in range(len(_free) - 1, -1, -1):
            block = _free[index]
            if nbytes <= block.nbytes and nbytes >= MIN_FILL * block.nbytes:
                del _free[index]
                return block
    return None


def empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """``np.empty(shape, dtype)`` (C order) for a fresh result; large ones come from the
    cache of blocks whose pages are already mapped (see the module's docstring)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not ENABLED or nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    block = _take(nbytes)
    if block is None:
        block = np.empty(nbytes, np.uint8)  # NumPy madvises large blocks MADV_HUGEPAGE
    return np.asarray(_Lease(block, tuple(shape), dtype))


def cached_bytes() -> int:
    """Bytes held by free cached blocks (mapped, reusable, not in any array)."""
    return sum(block.nbytes for block in list(_free))


def release_memory() -> int:
    """Give every free cached gradient block back to the operating system; returns the
    bytes released. Gradients still in use are not affected (their blocks go back to
    the OS when they die, if the cache is full)."""
    with _lock:
        released = sum(block.nbytes for block in _free)
        _free.clear()
    return released
