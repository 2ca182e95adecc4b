"""openmp_enabled() and precompile()."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import fastxent as fx
from fastxent import _dispatch
from fastxent._info import format_info, info
from fastxent._score import _row_numbers


def test_openmp_enabled_follows_the_extension():
    extension = _dispatch.KERNELS.get("cython")
    assert fx.openmp_enabled() == bool(extension is not None and extension.openmp_enabled())


def test_info_reports_the_extensions_clone_and_transposes():
    """``fastxent info`` says which target_clones clone of the extension runs and how its
    small-C layout transposes (in registers only where the extension says it does)."""
    found = info()["cython"]
    extension = _dispatch.KERNELS.get("cython")
    if extension is None:
        assert found == {}
        return
    assert found["clone"] == extension.simd_level() and found["clone"] in ("x86-64-v4", "x86-64-v3", "baseline")
    assert found["transposes"] == ("registers" if extension.VECTOR_TRANSPOSES else "scalar loops")
    assert "  transposes:" in format_info(info())


def test_precompile_leaves_every_numba_kernel_compiled(backend):
    count = fx.precompile(backend=backend)
    if backend != "numba":
        assert count == 0
        return
    from numba import types

    from fastxent import _numba_kernels as nb

    plan = _dispatch.precompile_plan("numba")
    assert {function for function, _ in plan} == set(nb.COMPILED) == set(_dispatch.FUNCTIONS)
    for kernels in nb.COMPILED.values():
        for kernel in kernels:
            assert kernel.signatures, f"{kernel.py_func.__name__} was not compiled"
    assert count == nb.compiled_count() >= 2 * len(nb.COMPILED)
    # one specialisation per dtype and target kind: the fused kernel sees read-only
    # C-contiguous logits, and each calls its block function (a cfunc) by address; the
    # parallel loop itself takes only integers and the packed arguments: one for all
    assert len(nb._blocks_by_address.signatures) == 1
    signatures = {sig[5:7] for sig in nb._pack_block_arguments.signatures}  # (the logits, the target)
    for dtype in (types.float32, types.float64):
        logits = types.Array(dtype, 2, "C", readonly=True)
        assert (logits, types.Array(types.int64, 1, "C", readonly=True)) in signatures
        assert (logits, types.Array(dtype, 2, "C", readonly=True)) in signatures
        for kind in ("index", "probability"):
            assert (kind, np.dtype(str(dtype))) in nb._COMPILED_BLOCKS


def test_the_api_compiles_nothing_that_precompile_did_not(rng):
    """Every call of the API (int32 and int64 labels, few and many classes, loss only,
    out=, in place, probabilities, the softmax family) runs one of the specialisations
    that precompile() compiled: none is added after it."""
    import numpy as np

    if "numba" not in fx.available_backends():
        return
    from fastxent import _numba_kernels as nb

    fx.precompile(backend="numba")
    before = nb.compiled_count()
    for dtype in (np.float32, np.float64, np.float16):
        for n_classes in (3, 40):
            x = rng.standard_normal((5, n_classes)).astype(dtype)
            for labels in (rng.integers(0, n_classes, 5).astype(np.int32), rng.integers(0, n_classes, 5)):
                fx.cross_entropy(x, labels, backend="numba")
                fx.cross_entropy_with_grad(x, labels, weight=np.ones(n_classes), label_smoothing=0.1, backend="numba")
                fx.cross_entropy_grad(x, labels, out=np.empty_like(x), backend="numba")
                in_place = x.copy()
                fx.cross_entropy_with_grad(in_place, labels, out=in_place, backend="numba")
            probabilities = np.full(x.shape, 1 / n_classes, dtype)
            fx.cross_entropy_with_grad(x, probabilities, backend="numba")
            fx.logsumexp(x, backend="numba")
            fx.softmax(x, backend="numba")
            fx.log_softmax(x.copy(), out=None, backend="numba")
            # fastxent score's pass, with writable and read-only arrays as its sources give them
            for writable in (True, False):
                logits, labels = np.ascontiguousarray(x, np.float32), rng.integers(0, n_classes, 5)
                logits.flags.writeable = labels.flags.writeable = writable
                _row_numbers(logits, labels)
    assert nb.compiled_count() == before


def test_precompile_command_runs():
    done = subprocess.run([sys.executable, "-m", "fastxent", "precompile"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "numba" in done.stdout
    assert "kernel specialisations" in done.stdout
    assert "[1/" in done.stderr  # progress on stderr


def test_info_lists_every_environment_variable_the_package_reads():
    """``fastxent info`` shows each FASTXENT_* variable the package or its build reads, so a
    user comparing two machines sees every switch that changes what runs."""
    import re
    from pathlib import Path

    from fastxent._info import ENVIRONMENT

    root = Path(fx.__file__).parent
    sources = [path.read_text() for path in root.glob("*.py")]
    if (root.parent / "setup.py").is_file():  # a checkout (not an installed package): the build's too
        sources.append((root.parent / "setup.py").read_text())
    read = {name for text in sources for name in re.findall(r'"(FASTXENT_[A-Z_]+)"', text)}
    read -= {"FASTXENT_MULTIVERSION"}  # a C macro that setup.py defines, not a variable
    assert read, "the pattern found no variable: the test would pass vacuously"
    assert read <= set(ENVIRONMENT), sorted(read - set(ENVIRONMENT))


def test_precompile_from_a_script_without_a_main_guard(tmp_path):
    """precompile's workers are fresh interpreters, not multiprocessing's "spawn" children:
    those re-ran the calling script's top level, so a script calling precompile() there
    without an ``if __name__ == "__main__"`` guard died with BrokenProcessPool (and any other
    top-level work would have run once per worker)."""
    script = tmp_path / "warm.py"
    script.write_text('import fastxent as fx\nprint("top level")\nprint(fx.precompile(backend="numba"))\n')
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines.count("top level") == 1
    if "numba" in fx.available_backends():
        assert int(lines[-1]) > 0  # the specialisations it holds


def test_precompile_without_loading_counts_the_workers_kernels():
    """``load=False`` (what ``fastxent precompile`` asks for, since its process ends next)
    leaves the workers' kernels in the cache: that process holds fewer, and the count it
    returns is still every specialisation, joined over it and the worker: what a fresh
    process that loads them all holds. (Fresh processes both: this one holds whatever the
    tests before compiled.)"""
    if "numba" not in fx.available_backends():
        pytest.skip("the numba backend is not available")

    def counts(load: bool) -> list[int]:
        script = (
            "import fastxent as fx\nfrom fastxent import _numba_kernels as nb\n"
            f"print(fx.precompile(backend='numba', jobs=2, load={load}), nb.compiled_count())\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return [int(word) for word in done.stdout.split()]

    every, held = counts(load=True)
    assert every == held > 0
    counted, held_here = counts(load=False)
    assert counted == every
    assert 0 < held_here < every


@pytest.mark.parametrize("where", ["worker", "here"])
def test_precompile_reports_a_failing_compile(monkeypatch, where):
    """A worker that dies, or this process's own compile that fails (here: an item that
    warm_up rejects), stops precompile with an error naming the item and quoting the
    compiler's own message, instead of hanging or passing."""
    if "numba" not in fx.available_backends():
        return
    from fastxent import _info

    plan = [("logsumexp_rows", np.dtype(np.float32)), ("no_such_function", np.dtype(np.float32))]
    monkeypatch.setattr(_dispatch, "precompile_plan", lambda name: plan if name == "numba" else [])
    # which compiler takes the bad item: the workers take what this process does not compile
    monkeypatch.setattr(_info, "_compiles_here", lambda item: (item[1] == "no_such_function") == (where == "here"))
    with pytest.raises(RuntimeError, match="no_such_function") as failure:
        fx.precompile(backend="numba", jobs=2)
    assert "unknown function" in str(failure.value)  # the worker's traceback, or the error here


def test_precompile_hands_out_the_plan_by_dtype_and_where_it_compiles():
    """precompile's work list: this process (compiler 0) never gets a kernel that numba
    compiles through the cache in a child (THROUGH_THE_CACHE: it would start one more
    interpreter), the workers take those first, and each compiler keeps to its own dtype
    while it has one left; every item is handed out exactly once."""
    if "numba" not in fx.available_backends():
        return
    from fastxent import _info

    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    through_the_cache = _dispatch.KERNELS["numba"].THROUGH_THE_CACHE
    assert through_the_cache == {"distill", "score_rows"}
    plan = [("numba", function, dtype) for function in _dispatch.FUNCTIONS for dtype in (f32, f64)]
    work = _info._WorkList(plan)
    # a worker: the child-compiled kernels first, its own dtype (float64) first among them
    first = [work.take(1) for _ in range(4)]
    assert first == [("numba", "distill", f64), ("numba", "score_rows", f64), ("numba", "distill", f32),
                     ("numba", "score_rows", f32)]  # fmt: skip
    assert work.take(0) == ("numba", "xent_index", f32)  # this process: its own dtype, the longest first
    assert work.take(0) == ("numba", "xent_probability", f32)
    assert work.take(1) == ("numba", "xent_index", f64)  # then the worker's own dtype among the rest
    rest = []
    while (item := work.take(0)) is not None:
        assert item[1] not in through_the_cache
        rest.append(item)
    assert work.take(1) is None
    handed_out = [*first, ("numba", "xent_index", f32), ("numba", "xent_probability", f32)]
    handed_out += [("numba", "xent_index", f64), *rest]
    assert sorted(map(str, handed_out)) == sorted(map(str, plan))  # each exactly once
