"""Small helpers about the installed backends: OpenMP, and compiling every kernel ahead of time."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from . import _dispatch


def openmp_enabled() -> bool:
    """Whether the Cython backend loaded and was built with OpenMP (else it runs serially).

    The numba backend's threading layer is a separate matter: ``numba.threading_layer()``.
    """
    extension = _dispatch.KERNELS.get("cython")
    return bool(extension is not None and extension.openmp_enabled())


#: the start of a worker's answer line (anything else it prints is not an answer)
_DONE = "fastxent-precompile-done"


def _worker() -> None:
    """A worker process of ``precompile`` (``python -c``, see _start_worker): reads one
    ``backend function dtype`` line at a time from stdin, compiles it into numba's on-disk
    cache and answers ``_DONE seconds kernels`` on stdout (``kernels``: a JSON list of the
    kernel specialisations it now holds, ``compiled_kernels``); ends at the end of its input."""
    import numpy as np

    for line in sys.stdin:
        name, function, dtype = line.split()
        start = time.perf_counter()
        module = _dispatch.KERNELS[name]
        module.warm_up(function, np.dtype(dtype))
        seconds = time.perf_counter() - start
        held = sorted(module.compiled_kernels()) if hasattr(module, "compiled_kernels") else []
        print(_DONE, f"{seconds:.6f}", json.dumps(held), flush=True)
    # Its work is in the cache's files, written and closed as each kernel compiled: skip the
    # interpreter's finalisation (~0.4 s with numba's LLVM state loaded), which the caller
    # would otherwise wait for at the end of the last kernel.
    sys.stderr.flush()
    os._exit(0)


def _start_worker() -> tuple[subprocess.Popen, IO[bytes]]:
    """A fresh Python process running _worker (this interpreter, in
    ``_jit.child_process_environment``), and the temporary file that takes its stderr (a
    pipe nobody reads could fill and block it). Not multiprocessing:
    its "spawn" start re-runs the caller's main module in every worker, so a script calling
    ``precompile()`` at its top level without a ``__main__`` guard failed (BrokenProcessPool),
    and one with other work at its top level would have done that work in every worker."""
    import tempfile

    from ._jit import child_process_environment

    package = __name__.rpartition(".")[0]
    stderr = tempfile.TemporaryFile()
    worker = subprocess.Popen(
        [sys.executable, "-c", f"from {package}._info import _worker; _worker()"],
        env=child_process_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    return worker, stderr


def _compiles_here(item: tuple) -> bool:
    """Whether this process compiles ``item`` itself (else numba would compile it in a child
    process anyway: ``THROUGH_THE_CACHE``)."""
    name, function, _ = item
    return function not in getattr(_dispatch.KERNELS[name], "THROUGH_THE_CACHE", ())


class _WorkList:
    """The plan's items, handed out to the compilers: this process (index 0), which takes
    only what it compiles itself (``_compiles_here``), and the worker processes, which take
    the rest first.

    Then each compiler takes the items of its own dtype, in the plan's order (the longest
    first), then the other dtype's: the kernels of one dtype share helpers (the exponential,
    the row max, the chunk steps) that numba compiles once per process and dtype."""

    def __init__(self, plan: list) -> None:
        self._items = list(plan)
        self._lock = threading.Lock()
        self._dtypes = list(dict.fromkeys(dtype for _, _, dtype in plan))
        self.stopped = False

    def take(self, index: int) -> tuple | None:
        """The next item for compiler ``index``, or None when none is left for it."""
        with self._lock:
            if self.stopped:
                return None
            own = self._dtypes[index % len(self._dtypes)]
            here = [_compiles_here(item) for item in self._items]
            if index == 0:
                order = [p for p in range(len(self._items)) if here[p]]
            else:
                order = [p for p in range(len(self._items)) if not here[p]] or list(range(len(self._items)))
            for position in order:
                if self._items[position][2] == own:
                    return self._items.pop(position)
            return self._items.pop(order[0]) if order else None


def _compile_here(todo: _WorkList, done: queue.SimpleQueue) -> None:
    """This process as one of precompile's compilers (a thread): compiles the items that it
    compiles itself (its kernels are then the ones its own later calls run, as after a lazy
    first call), putting ``(item, seconds, "here")`` on ``done`` after each, or ``(item,
    why, "here")`` (``why`` a str) if one failed."""
    while (item := todo.take(0)) is not None:
        name, function, dtype = item
        start = time.perf_counter()
        try:
            _dispatch.KERNELS[name].warm_up(function, dtype)
        except Exception as error:  # reported by precompile, in the calling thread
            done.put((item, f"{type(error).__name__}: {error}", "here"))
            return
        done.put((item, time.perf_counter() - start, "here"))


def _feed(
    worker: subprocess.Popen,
    stderr: IO[bytes],
    todo: _WorkList,
    index: int,
    done: queue.SimpleQueue,
    held: set[str],
) -> None:
    """One worker's thread: hands it ``todo``'s next item for worker ``index`` until none is
    left, putting ``(item, seconds, "worker")`` on ``done`` after each, or ``(item, why,
    "worker")`` (``why`` a str) if it failed; adds the kernels the worker holds to ``held``."""
    assert worker.stdin is not None and worker.stdout is not None
    while True:
        item = todo.take(index)
        if item is None:
            break
        name, function, dtype = item
        answer = ""
        try:
            worker.stdin.write(f"{name} {function} {dtype.str}\n")
            worker.stdin.flush()
            while not answer.startswith(_DONE):
                answer = worker.stdout.readline()
                if not answer:  # end of its output: it died
                    break
        except OSError:  # its pipe broke: it died
            answer = ""
        if not answer:
            done.put((item, _why(worker, stderr), "worker"))
            return
        _, seconds, kernels = answer.split(maxsplit=2)
        held.update(json.loads(kernels))
        done.put((item, float(seconds), "worker"))
    try:
        worker.stdin.close()
    except OSError:
        pass
    worker.wait()


def _why(worker: subprocess.Popen, stderr: IO[bytes]) -> str:
    """What a worker that died said on stderr (the end of it), else its exit status."""
    worker.kill()
    status = worker.wait()
    stderr.seek(0)
    said = stderr.read()[-3000:].decode(errors="replace").strip()
    return said or f"exit status {status}"


def precompile(
    backend: str | None = None,
    *,
    progress: Callable[[int, int, str, float], None] | None = None,
    jobs: int | None = None,
    load: bool = True,
) -> int:
    """Compile (or load from numba's cache) every kernel specialisation the API uses.

    The numba kernels compile lazily, on the first call with a given dtype, and are cached
    on disk; a process that must not pay a compile on its first real call (a server's
    warm-up, a container build) calls this once. What it compiles comes from the dispatch
    table (``_dispatch.precompile_plan``): every backend function for float32 and float64.

    ``jobs`` compilers (default: one per core, at most 2) work side by side: this process
    (in a thread) and ``jobs - 1`` worker processes, which compile into numba's on-disk
    cache; this process loads their kernels from it at the end. Kernels that numba compiles
    in a child process anyway (``THROUGH_THE_CACHE``) go to the workers. With ``jobs=1``
    everything compiles here, in turn.
    ``progress(done, total, what, seconds)`` is called after each; ``fastxent precompile``
    prints it. Returns how many kernel specialisations the numba backend now holds.

    ``load=False`` leaves the workers' kernels in the cache, unloaded (~0.5 s saved), for a
    process that ends next (``fastxent precompile``); the count then is of the kernels this
    process and the workers hold together.
    """
    names = [backend] if backend is not None else list(_dispatch.available_backends())
    if backend is not None:
        _dispatch.kernels_for(backend)  # a clear error for an unknown or missing backend
    plan = [(name, function, dtype) for name in names for function, dtype in _dispatch.precompile_plan(name)]
    if jobs is None:
        jobs = min(2, os.cpu_count() or 1)
    in_workers: set[str] = set()  # the kernels the workers hold (filled by _feed)
    if jobs > 1 and len(plan) > 1 and _cache_is_on():
        todo = _WorkList(plan)  # the plan's order: the class-index kernels, the largest, first
        done: queue.SimpleQueue = queue.SimpleQueue()
        workers = [_start_worker() for _ in range(jobs - 1)]
        feeders = [
            threading.Thread(target=_feed, args=(*worker, todo, index, done, in_workers), daemon=True)
            for index, worker in enumerate(workers, 1)
        ]
        # (not joined after a failure or an interrupt: its compile cannot be stopped, and ends
        # on its own, or with this process)
        compiler = threading.Thread(target=_compile_here, args=(todo, done), daemon=True)
        for thread in (*feeders, compiler):
            thread.start()
        from_the_cache = []
        try:
            for count in range(1, len(plan) + 1):
                item, seconds, where = done.get()
                name, function, dtype = item
                if isinstance(seconds, str):
                    raise RuntimeError(f"precompile: compiling {name} {function} {dtype} failed:\n{seconds}")
                if where == "worker":
                    from_the_cache.append(item)
                if progress is not None:
                    progress(count, len(plan), f"{name} {function} {dtype} ({where})", seconds)
            # Loading a worker's kernels takes numba's compiler lock, which this process's own
            # compile holds: loaded at the end (~0.5 s for all), the progress is not held up.
            for name, function, dtype in from_the_cache if load else ():
                _dispatch.KERNELS[name].warm_up(function, dtype)
        except BaseException:  # a failure or an interrupt: no more compiles
            todo.stopped = True
            for worker, _ in workers:
                worker.kill()
            raise
        finally:
            for feeder in feeders:
                feeder.join()
            for _, stderr in workers:
                stderr.close()
    else:
        for count, (name, function, dtype) in enumerate(plan, 1):  # compiled here, or from the cache
            start = time.perf_counter()
            _dispatch.KERNELS[name].warm_up(function, dtype)
            if progress is not None:
                progress(count, len(plan), f"{name} {function} {dtype}", time.perf_counter() - start)
    numba_module = _dispatch.KERNELS.get("numba")
    if numba_module is None or "numba" not in names:
        return 0
    if not load:  # (the feeders were joined above: the workers' set is complete)
        return len(numba_module.compiled_kernels() | in_workers)
    return numba_module.compiled_count()


def _cache_is_on() -> bool:
    """Whether numba compiles at all and caches to disk (else workers would be wasted)."""
    import numba

    return not numba.config.DISABLE_JIT


# --- what this installation runs on: ``fastxent info`` ---------------------------------

#: optional packages whose presence changes what fastxent can do (the extras)
OPTIONAL_PACKAGES = (
    "torch", "jax", "optax", "dask", "distributed", "zarr", "ml_dtypes", "threadpoolctl", "scipy", "tqdm", "rich",
    "matplotlib", "Cython",
)  # fmt: skip
#: environment variables that change threads, BLAS kernels or fastxent's behaviour
ENVIRONMENT = (
    "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_CACHE_DIR", "NUMBA_DISABLE_JIT", "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "MKL_NUM_THREADS",
    "FASTXENT_BACKEND", "FASTXENT_GRADIENT_CACHE", "FASTXENT_COMPILE_IN_PROCESS", "FASTXENT_BUILD_EXT",
    "FASTXENT_DISABLE_CYTHON",
)  # fmt: skip


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _simd_flags() -> list[str]:
    """The vector extensions the kernels can use, from /proc/cpuinfo's flags (Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16")
                    return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def numpy_blas() -> list[dict[str, object]]:
    """NumPy's BLAS as threadpoolctl sees it (library, version, the kernel it runs
    ("architecture"), threads), or from ``numpy.show_config`` without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        import numpy as np

        try:
            config = np.show_config(mode="dicts")
            blas = config["Build Dependencies"]["blas"]
            return [{"internal_api": blas.get("name"), "version": blas.get("version"), "source": "numpy.show_config"}]
        except Exception:  # noqa: BLE001 - older NumPy: no dict mode
            return []
    keys = ("internal_api", "version", "architecture", "num_threads", "threading_layer", "filepath")
    return [{k: entry.get(k) for k in keys} for entry in threadpool_info() if entry.get("user_api") == "blas"]


def torch_blas() -> dict[str, object] | None:
    """torch's BLAS and threads (from ``torch.__config__.show()``), when torch is installed."""
    if _version("torch") is None:
        return None
    try:
        import torch

        shown = torch.__config__.show()
        blas = next(
            (part.split("=", 1)[1] for part in shown.replace(",", "\n").split() if part.startswith("BLAS_INFO=")), None
        )
        return {"version": torch.__version__, "blas": blas, "mkl": torch.backends.mkl.is_available(),
                "threads": torch.get_num_threads()}  # fmt: skip
    except Exception as error:  # noqa: BLE001 - a broken torch install is reported, not raised
        return {"error": f"{type(error).__name__}: {error}"}


def _numba_info() -> dict[str, object] | None:
    if "numba" not in _dispatch.KERNELS:
        return None
    import numba
    import numpy as np

    from . import _numba_kernels
    from ._api import logsumexp

    try:  # the threading layer is chosen at the first parallel call (loaded from the cache)
        logsumexp(np.zeros((2, 3), np.float32), backend="numba")
        layer = numba.threading_layer()
    except Exception as error:  # noqa: BLE001
        layer = f"unknown ({type(error).__name__})"
    cache = getattr(getattr(_numba_kernels._logsumexp_kernel, "_cache", None), "_cache_path", None)
    return {
        "version": numba.__version__,
        "threading_layer": layer,
        "max_threads": int(numba.config.NUMBA_NUM_THREADS),
        "cache_dir": cache,
        "kernels_loaded": _numba_kernels.compiled_count(),
    }


def _cython_info() -> dict[str, object]:
    """The extension's build as it runs here: the ``target_clones`` clone the loader picked
    and whether the small-C layout transposes float32 in registers (AVX-512F with GCC)."""
    extension = _dispatch.KERNELS.get("cython")
    if extension is None:
        return {}
    transposes = "registers" if extension.VECTOR_TRANSPOSES else "scalar loops"
    return {"clone": extension.simd_level(), "transposes": transposes}


def info() -> dict[str, object]:
    """What this installation of fastxent runs on, as ``fastxent info`` prints it: versions,
    the CPU and its vector extensions, the backends (the Cython extension's clone and
    whether it transposes in registers), threads, NumPy's BLAS (and which
    kernel it runs: threadpoolctl's "architecture"), torch's BLAS, the optional packages
    and the environment variables that change any of these."""
    import platform

    import numpy as np

    from . import __version__
    from ._threads import get_num_threads

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "fastxent": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {"name": cpu_name(), "cores": cores, "simd": _simd_flags()},
        "backends": list(_dispatch.available_backends()),
        "openmp": openmp_enabled(),
        "cython": _cython_info(),
        "threads": get_num_threads(),
        "numba": _numba_info(),
        "numpy": {"version": np.__version__, "blas": numpy_blas()},
        "torch": torch_blas(),
        "optional": {name: _version(name) for name in OPTIONAL_PACKAGES},
        "environment": {name: os.environ[name] for name in ENVIRONMENT if name in os.environ},
    }


def format_info(found: dict[str, object]) -> str:
    """``info()`` as aligned ``key: value`` lines, a section per nested dict."""
    lines: list[str] = []

    def show(value: object) -> str:
        if isinstance(value, list):
            return ", ".join(show(v) for v in value) if value else "(none)"
        if isinstance(value, dict):
            return "  ".join(f"{k}={show(v)}" for k, v in value.items() if v is not None)
        return "(not installed)" if value is None else str(value)

    for key, value in found.items():
        if isinstance(value, dict) and key != "cpu":
            lines.append(f"{key}:")
            if not value:
                lines.append("  (none)")
            for sub, item in value.items():
                if isinstance(item, list) and item and isinstance(item[0], dict):
                    for entry in item:
                        lines.append(f"  {sub + ':':18} {show(entry)}")
                else:
                    lines.append(f"  {sub + ':':18} {show(item)}")
        else:
            lines.append(f"{key + ':':20} {show(value)}")
    return "\n".join(lines)
