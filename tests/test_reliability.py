"""Reliability: concurrent threads, fork, huge arrays, long runs, NUMBA_DISABLE_JIT.

Whatever can kill or hang the process (numba's workqueue layer under concurrency, GNU
OpenMP after fork, memory growth) runs in a subprocess with a timeout, so a crash or a
hang fails one test instead of the suite. No test asserts a timing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from conftest import BACKENDS, assert_close

import fastxent as fx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORK_BACKENDS = [b for b in ("numba", "cython") if b in BACKENDS]


def run_python(code: str, *, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the checkout on sys.path); fail on a crash or a hang."""
    # compiled kernels unless asked otherwise (the coverage run sets NUMBA_DISABLE_JIT=1)
    full_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": REPO, "NUMBA_DISABLE_JIT": "0", **(env or {})}
    try:
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=full_env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"subprocess hung (no exit after {timeout} s):\n{error.stdout}\n{error.stderr}")
    assert result.returncode == 0, (
        f"subprocess exited with {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


# --- 1. threads ------------------------------------------------------------------------


def _thread_cases(seed: int = 7):
    """(function name, args, kwargs) calls of every public function, mixed shapes and dtypes."""
    rng = np.random.default_rng(seed)
    cases = []
    for shape in [(1, 3), (7, 5), (33, 64), (2, 9, 130), (300, 17), (0, 4)]:
        for dtype in (np.float16, np.float32, np.float64):
            x = rng.standard_normal(shape).astype(dtype)
            y = rng.integers(0, shape[-1], shape[:-1])
            p = rng.random(shape).astype(dtype)
            cases.append(("cross_entropy", (x, y), {}))
            cases.append(("cross_entropy_with_grad", (x, y), {"label_smoothing": 0.1, "reduction": "sum"}))
            cases.append(("cross_entropy_grad", (x, p), {"weight": rng.random(shape[-1])}))
            cases.append(("cross_entropy", (x, p), {"reduction": "none"}))
            cases.append(("log_softmax", (x,), {}))
            cases.append(("softmax", (x,), {}))
            cases.append(("logsumexp", (x,), {}))
    return cases


def _flatten(result):
    return [np.asarray(r) for r in (result if isinstance(result, tuple) else (result,))]


def _assert_bitwise(actual, expected, what):
    for a, e in zip(_flatten(actual), _flatten(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape, what
        assert a.tobytes() == e.tobytes(), f"{what}: concurrent result differs from the serial one"


def _hammer(backends, n_threads=8, calls_per_thread=200):
    cases = _thread_cases()
    jobs = [(name, args, {**kwargs, "backend": b}) for b in backends for name, args, kwargs in cases]
    expected = [getattr(fx, name)(*args, **kwargs) for name, args, kwargs in jobs]
    barrier = threading.Barrier(n_threads)

    def worker(k):
        barrier.wait()
        for j in range(calls_per_thread):
            index = (k * 37 + j * 11) % len(jobs)
            name, args, kwargs = jobs[index]
            _assert_bitwise(getattr(fx, name)(*args, **kwargs), expected[index], f"{name} {kwargs}")

    _run_in_threads(worker, range(n_threads))


def _run_in_threads(worker, arguments):
    """``worker(a)`` for each ``a`` in a thread of its own, all at once; re-raises the first
    error any of them raised (an assertion in a thread would otherwise only be printed)."""
    errors = []

    def guarded(argument):
        try:
            worker(argument)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(a,)) for a in arguments]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("backends", [(b,) for b in BACKENDS] + [BACKENDS], ids=[*BACKENDS, "all"])
def test_threads_match_serial_bitwise(backends):
    _hammer(backends)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["index+smoothing", "probability"])
def test_result_does_not_depend_on_where_the_no_weight_array_lies(backend, target):
    """Regression: the numba kernels once read ``weight[c]`` (in a branch not taken) from a
    length-0 "no weight" array in the loop that writes the gradient row; LLVM's runtime
    overlap check then depended on that array's address, and when it failed the row ran
    the scalar loop, which sums exp in another order. The gradient changed in its last bits
    with malloc's choice (concurrent calls differed from serial ones). Here the stand-in is
    a zero-stride length-0 view placed at many addresses around the gradient: every call
    must give bitwise the same numbers."""
    from fastxent._dispatch import KERNELS

    kernels = KERNELS[backend]
    rng = np.random.default_rng(7)
    n, n_classes = 33, 64
    x = rng.standard_normal((n, n_classes))
    x.flags.writeable = False
    labels = rng.integers(0, n_classes, n)
    labels.flags.writeable = False
    probabilities = rng.random((n, n_classes))
    probabilities.flags.writeable = False
    arena = np.zeros(4 * n * n_classes)

    from fastxent._spec import LossSpec

    spec = LossSpec.create(target, label_smoothing=0.1)
    params = spec.params(n_classes=n_classes, weight_total=float(n_classes), grad_scale=1.0, weighted=False)

    def run(weight_offset, grad_offset):
        grad = arena[grad_offset : grad_offset + n * n_classes].reshape(n, n_classes)
        no_weight = np.lib.stride_tricks.as_strided(arena[weight_offset:], (0,), (0,), writeable=False)
        loss = np.empty(n)
        if target == "probability":
            kernels.xent_probability(x, probabilities, no_weight, params, loss, grad)
        else:
            kernels.xent_index(x, labels, no_weight, params, loss, grad)
        return loss.tobytes(), grad.tobytes()

    base = 2 * n * n_classes
    expected = run(0, base)
    for weight_offset in (base - 34, base - 1, base + 1, base + 70, base + n * n_classes + 2, 1):
        where = f"no-weight array at element {weight_offset - base} of the gradient"
        assert run(weight_offset, base) == expected, where


def test_threads_on_numba_workqueue_layer():
    """numba's workqueue layer aborts the process on concurrent use: fastxent serialises
    its numba calls there. 8 threads at once must finish with the serial results."""
    if "numba" not in BACKENDS:
        pytest.skip("numba is not available")
    result = run_python(
        """
        import numba, test_reliability as t
        t._hammer(("numba",))
        print(numba.threading_layer())
        """,
        env={"NUMBA_THREADING_LAYER": "workqueue", "PYTHONPATH": os.path.join(REPO, "tests") + os.pathsep + REPO},
    )
    assert result.stdout.split()[-1] == "workqueue"


def test_thread_count_is_per_thread_and_does_not_change_results():
    """set_num_threads in one thread while others compute: results stay bitwise equal."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((513, 200)).astype(np.float32)
    y = rng.integers(0, 200, 513)
    expected = fx.cross_entropy_with_grad(x, y)

    def worker(n):
        for _ in range(20):
            fx.set_num_threads(n)
            _assert_bitwise(fx.cross_entropy_with_grad(x, y), expected, f"{n} threads")

    _run_in_threads(worker, [1 + k % fx.get_num_threads() for k in range(4)])


# --- 2. fork ---------------------------------------------------------------------------

_FORK_PRELUDE = """
    import os, sys, warnings
    import numpy as np
    import fastxent as fx
    backend = {backend!r}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 257)).astype(np.float32)
    y = rng.integers(0, 257, 4000)
    loss, grad = fx.cross_entropy_with_grad(x, y, backend=backend)  # the parent starts its pools
    reference = fx.cross_entropy_with_grad(x, y, backend="numpy")

    def child_work():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the documented fallback warning
            l2, g2 = fx.cross_entropy_with_grad(x, y, backend=backend)
            l3, g3 = fx.cross_entropy_with_grad(x, y)  # the default backend too
            s = fx.softmax(x[:50], backend=backend)
        assert abs(float(l2) - float(reference[0])) <= 1e-5 * abs(float(reference[0])), (l2, reference[0])
        assert abs(float(l3) - float(reference[0])) <= 1e-5 * abs(float(reference[0])), (l3, reference[0])
        np.testing.assert_allclose(g2, reference[1], rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(s, fx.softmax(x[:50], backend="numpy"), rtol=2e-5, atol=2e-6)
        return True
"""


@pytest.mark.parametrize("backend", FORK_BACKENDS)
def test_os_fork_after_parallel_call(backend):
    run_python(
        _FORK_PRELUDE.format(backend=backend)
        + """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if child_work() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    # and the parent still works
    assert fx.cross_entropy(x, y, backend=backend) == loss
    """,
        timeout=120,
    )


@pytest.mark.parametrize("backend", FORK_BACKENDS)
def test_multiprocessing_fork_after_parallel_call(backend):
    run_python(
        _FORK_PRELUDE.format(backend=backend)
        + """
    import multiprocessing as mp

    def task(_):
        return child_work()

    if __name__ == "__main__":
        context = mp.get_context("fork")
        with context.Pool(2) as pool:
            assert all(pool.map(task, range(4)))
        process = context.Process(target=child_work)
        process.start()
        process.join(60)
        assert process.exitcode == 0, process.exitcode
    """,
        timeout=120,
    )


def test_fork_child_warns_and_uses_the_reference():
    """In a child forked after OpenMP kernels ran, numba (omp) and cython calls go to the
    NumPy backend, with one RuntimeWarning; the parent is unaffected."""
    if not FORK_BACKENDS:
        pytest.skip("no OpenMP backend")
    run_python(
        _FORK_PRELUDE.format(backend=FORK_BACKENDS[0])
        + """
    import fastxent._dispatch as d
    if not d._openmp_started():
        sys.exit(0)  # e.g. numba on tbb: nothing to fall back from
    pid = os.fork()
    if pid == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = d.kernels_for(backend)
            d.kernels_for(backend)
        ok = module is d.KERNELS["numpy"] and len(caught) == 1 and "fork" in str(caught[0].message)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert d.kernels_for(backend) is d.KERNELS[backend]
    """,
        timeout=120,
    )


def test_fork_on_workqueue_layer_keeps_numba():
    """numba's workqueue layer is fork-safe: a forked child keeps the numba kernels."""
    if "numba" not in BACKENDS:
        pytest.skip("numba is not available")
    run_python(
        _FORK_PRELUDE.format(backend="numba")
        + """
    import fastxent._dispatch as d
    pid = os.fork()
    if pid == 0:
        ok = d.kernels_for("numba") is d.KERNELS["numba"] and child_work()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    """,
        env={"NUMBA_THREADING_LAYER": "workqueue", "FASTXENT_DISABLE_CYTHON": "1"},
        timeout=120,
    )


# --- 3. a read-only install -------------------------------------------------------------


def _make_read_only(path) -> bool:
    """Make ``path`` (recursively) unwritable, even for root (chattr +i on ext4); False if
    this machine cannot."""
    if os.geteuid() != 0:
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o555)
        os.chmod(path, 0o555)
        return True
    done = subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True)
    return done.returncode == 0


def _make_writable(path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
    else:
        for root, _dirs, _files in os.walk(path):
            os.chmod(root, 0o755)


@pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not available")
def test_numba_cache_works_from_a_read_only_install(tmp_path):
    """numba caches next to the sources (__pycache__) and falls back to the user's cache
    dir when it cannot write there. A second process must load the kernel it needs from
    that cache instead of compiling it again."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(os.path.dirname(fx.__file__), site / "fastxent", ignore=shutil.ignore_patterns("__pycache__"))
    if not _make_read_only(site):
        pytest.skip("cannot make a directory read-only here (chattr +i failed)")
    try:
        # python -S: no site hooks, so an editable install of the checkout cannot take over
        # "import fastxent" (nor can the working directory); numpy and numba come from
        # site-packages on PYTHONPATH
        import site as site_module

        env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
        path = os.pathsep.join([str(site), *site_module.getsitepackages()])
        env.update(PYTHONPATH=path, XDG_CACHE_HOME=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
        env["NUMBA_DISABLE_JIT"] = "0"  # compiled kernels even in the coverage run
        code = """
            import numpy as np, fastxent as fx
            from fastxent import _numba_kernels as nk
            assert fx.__file__.startswith(SITE), fx.__file__
            fx.cross_entropy_with_grad(np.zeros((4, 3), np.float32), np.arange(4) % 3, backend="numba")
            stats = nk._blocks_by_address.stats
            blocks = nk.block_function("index", np.dtype(np.float32))  # (a cfunc: hits only)
            print(blocks.cache_hits, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
        """.replace("SITE", repr(str(site)))
        results = []
        for _ in range(2):
            command = [sys.executable, "-S", "-c", textwrap.dedent(code)]
            done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            results.append(tuple(int(v) for v in done.stdout.split()[-3:]))
        assert not list((site / "fastxent").glob("__pycache__/*.nbi")), "wrote into the read-only install"
        cached = list((tmp_path / "cache").rglob("*.nbi"))
        assert cached, "no numba cache index in the user's cache dir"
        # (the block function's hits, then the kernel's hits and misses: the first process
        # compiles both, the second loads both)
        assert results[0] == (0, 0, 1), f"first process: (cache hits, misses) {results[0]}"
        assert results[1] == (1, 1, 0), f"second process: (cache hits, misses) {results[1]}: it compiled again"
    finally:
        _make_writable(site)


# --- 5. long runs ----------------------------------------------------------------------


def test_ten_thousand_calls_do_not_grow_memory():
    """10,000 calls (every backend, every function) leave RSS within 10 MB of the warm start."""
    result = run_python(
        """
        import gc, os
        import numpy as np
        import fastxent as fx

        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

        rng = np.random.default_rng(1)
        x = rng.standard_normal((64, 100)).astype(np.float32)
        x16 = x.astype(np.float16)
        y = rng.integers(0, 100, 64)
        p = rng.random((64, 100)).astype(np.float32)
        w = rng.random(100)
        out = np.empty_like(x)
        backends = fx.available_backends()

        def call(j):
            b = backends[j % len(backends)]
            k = j % 8
            if k == 0:
                fx.cross_entropy(x, y, backend=b)
            elif k == 1:
                fx.cross_entropy_with_grad(x16, y, weight=w, label_smoothing=0.1, backend=b)
            elif k == 2:
                fx.cross_entropy_grad(x, p, out=out, backend=b)
            elif k == 3:
                fx.softmax(x, backend=b)
            elif k == 4:
                fx.log_softmax(x, out=out, backend=b)
            elif k == 5:
                fx.logsumexp(x, backend=b)
            elif k == 6:
                try:
                    fx.cross_entropy(x, y + 1000, backend=b)
                except IndexError:
                    pass
            else:
                fx.cross_entropy(x, y, reduction="none", ignore_index=3, backend=b)

        for j in range(1000):  # warm-up: compile, load caches, start the pools
            call(j)
        gc.collect()
        start = rss_mb()
        for j in range(10_000):
            call(j)
        gc.collect()
        end = rss_mb()
        print(f"{start:.1f} {end:.1f}")
        assert end - start < 10, f"RSS grew from {start:.1f} MB to {end:.1f} MB over 10,000 calls"
        """,
        timeout=300,
    )
    print(result.stdout)


# --- 4. huge arrays --------------------------------------------------------------------


def _mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


HUGE_ROWS, HUGE_CLASSES = 2**17 + 1, 2**14  # 2**31 + 2**14 float32 elements, 8.6 GB


@pytest.mark.huge
@pytest.mark.parametrize("backend", [b for b in ("numba", "cython") if b in BACKENDS])
def test_more_than_2_to_the_31_elements_in_place(backend):
    need = HUGE_ROWS * HUGE_CLASSES * 4 + 2**30  # the logits and 1 GB of slack
    if _mem_available_bytes() < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of available memory")
    rng = np.random.default_rng(5)
    x = np.empty((HUGE_ROWS, HUGE_CLASSES), np.float32)
    block = rng.standard_normal((1024, HUGE_CLASSES)).astype(np.float32) * 3
    for start in range(0, HUGE_ROWS, 1024):  # cheap to fill, and no two adjacent blocks alike
        stop = min(start + 1024, HUGE_ROWS)
        x[start:stop] = block[: stop - start] + np.float32(start % 7)
    y = rng.integers(0, HUGE_CLASSES, HUGE_ROWS)
    y[-1] = HUGE_CLASSES - 1
    y[3] = -100
    rows = np.array([0, 1, 3, 2**17 - 1, 2**17])  # the last row starts past 2**31 elements
    assert rows[-1] * HUGE_CLASSES >= 2**31
    saved = x[rows].copy()
    loss_sum = fx.cross_entropy(x, y, reduction="sum", backend=backend)
    row_loss, grad = fx.cross_entropy_with_grad(x, y, reduction="none", out=x, backend=backend)
    assert grad is x
    ref_loss, ref_grad = fx.cross_entropy_with_grad(saved, y[rows], reduction="none", backend="numpy")
    assert_close(row_loss[rows], ref_loss, np.float32)
    assert_close(grad[rows], ref_grad, np.float32)
    assert_close(np.sum(row_loss, dtype=np.float64), loss_sum, np.float32)
    assert np.all(np.isfinite(row_loss))
    del x, grad


# --- 6. NUMBA_DISABLE_JIT --------------------------------------------------------------


def _check_pure_python_kernels():
    """The numba kernels and the exponential's two halves run as plain Python."""
    import math

    from numba import types

    from fastxent import _numba_kernels as nk

    for numba_type, dtype, tol in ((types.float32, np.float32, 2e-7), (types.float64, np.float64, 4e-16)):
        exp = nk._fast_exp_overload(numba_type)
        for t in (0.0, -1e-3, -0.5, -1.0, -10.5, -80.0, -700.0, -1e4, -np.inf):
            value = exp(dtype(t))
            expected = math.exp(t) if t > -87 or dtype is np.float64 and t > -708 else 0.0
            assert abs(value - expected) <= tol * expected, (dtype, t, value)
        assert math.isnan(exp(dtype(np.nan)))
        assert nk._fast_exp_overload(types.int64) is None
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((6, 70)).astype(dtype)
        x[0, 3] = -np.inf
        y = rng.integers(0, 70, 6)
        y[1] = -100
        p = rng.random((6, 70)).astype(dtype)
        w = rng.random(70)
        for target, kwargs in (
            (y, {}),
            (y, {"weight": w, "label_smoothing": 0.2}),
            (p, {"weight": w, "label_smoothing": 0.1}),
        ):
            got = fx.cross_entropy_with_grad(x, target, backend="numba", **kwargs)
            ref = fx.cross_entropy_with_grad(x, target, backend="numpy", **kwargs)
            assert_close(got[0], ref[0], dtype)
            assert_close(got[1], ref[1], dtype)
        x[2] = -np.inf  # a row of -inf: lse = -inf; a +inf logit: lse = +inf
        x[4, 5] = np.inf
        assert_close(fx.logsumexp(x, backend="numba"), fx.logsumexp(x, backend="numpy"), dtype)
        t = np.linspace(-100, 0, 50).astype(dtype)
        out = np.empty_like(t)
        nk.exp_array(t, out)
        assert_close(out, np.exp(t.astype(np.float64)), dtype)


def test_numba_kernels_run_without_jit():
    """NUMBA_DISABLE_JIT=1 (the coverage run): the kernels run as Python and agree with
    the reference; in a normal run this is checked in a subprocess."""
    import numba

    if numba.config.DISABLE_JIT:
        _check_pure_python_kernels()
        return
    if "numba" not in BACKENDS:
        pytest.skip("numba is not available")
    run_python(
        "import test_reliability as t; t._check_pure_python_kernels()",
        env={"NUMBA_DISABLE_JIT": "1", "PYTHONPATH": os.path.join(REPO, "tests") + os.pathsep + REPO},
    )
