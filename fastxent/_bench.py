"""``fastxent bench``: fastxent against its peers and the memory floor, side by side.

Every contender runs on the same logits at the same thread count; after one warm-up
call each, the repeats are interleaved (one call of every contender per round, the
order rotated each round) so that a noisy neighbour slows all of them alike, and the
table shows medians.

The memory floor is a copy of the logits into a preallocated array with the same threads:
it reads N*C once and writes N*C once, the least traffic any loss+gradient can have.
"x floor" is a contender's time over it.

The peers are eager PyTorch, ``torch.compile`` of the same calls (Inductor, compiled once
per shape before the warm-up round, outside the timing; ``--no-compile`` leaves it out)
and JAX when it is installed. "vs torch" and "vs compile" are that peer's time over a
contender's, of the same kind: loss+grad against fwd+bwd, loss only against fwd.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import _api, _compare, _dispatch
from ._info import cpu_name
from ._progress import Progress
from ._threads import get_num_threads, set_num_threads

DEFAULT_SHAPES = ((262144, 10), (65536, 128), (16384, 1000), (4096, 32000), (2048, 128256), (8192, 50257))
#: the extensions timed together (Gemma 2's cap, PaLM's z-loss coefficient) with return_stats
EXTENSIONS: dict[str, Any] = {"z_loss": 1e-4, "softcap": 30.0}
EXTENSIONS_ROW = "fastxent z-loss+softcap+stats"
BFLOAT16_ROW = "fastxent bfloat16 loss+grad out="
#: the NumPy reference makes several float64 N x C temporaries: only below this size
REFERENCE_MAX_ELEMENTS = 1 << 23


@dataclass
class Contender:
    name: str
    # "fwd+bwd", "fwd" or "floor", or a peer's own kind: "torch fwd+bwd", "torch fwd" (eager),
    # "compile fwd+bwd", "compile fwd" (torch.compile); the ratios compare rows of one base kind
    kind: str
    run: Callable[[], object]
    times: list[float] = field(default_factory=list)
    #: True for torch.compile rows: their first call compiles (seconds), run apart from the
    #: rounds, and if it raises the contender is left out instead of stopping the bench
    compiles: bool = False
    #: seconds of the first (untimed) call: JIT compile or cache load, Inductor's compile
    warmup_s: float | None = None


@dataclass
class Row:
    shape: tuple[int, int]
    name: str
    kind: str
    median_ms: float
    spread_pct: float
    gbps: float
    vs_torch: float | None
    vs_compile: float | None
    x_floor: float | None
    times_ms: list[float]
    warmup_s: float | None


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("numpy", "numba", "torch", "jax", "fastxent"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - any failure means "not available"
            pass
    return found


def _contenders(
    x: np.ndarray,
    y: np.ndarray,
    threads: int,
    notes: list[str],
    with_reference: bool,
    torch_compile: bool = True,
    compare: Sequence[Any] = (),
):
    """The one registry of what ``fastxent bench`` (and bench/'s pytest-benchmark suite)
    times on logits ``x`` and labels ``y``; ``torch_compile``: also torch.compile's
    (compiled by their first call, see :func:`_warm_up_compiled`); ``compare``: the user's
    functions (:mod:`fastxent._compare`), each checked against the reference first."""
    grad_out = np.empty_like(x)
    in_place = x.copy()
    floor_out = np.empty_like(x)
    found = []
    for backend in _dispatch.available_backends():
        if backend == "numpy":
            continue
        found += [
            Contender(
                f"fastxent[{backend}] loss+grad",
                "fwd+bwd",
                functools.partial(_api.cross_entropy_with_grad, x, y, backend=backend),
            ),
            Contender(
                f"fastxent[{backend}] loss+grad out=",
                "fwd+bwd",
                functools.partial(_api.cross_entropy_with_grad, x, y, backend=backend, out=grad_out),
            ),
            Contender(
                f"fastxent[{backend}] in place",
                "fwd+bwd",
                functools.partial(_api.cross_entropy_with_grad, in_place, y, backend=backend, out=in_place),
            ),
            Contender(
                f"fastxent[{backend}] loss only", "fwd", functools.partial(_api.cross_entropy, x, y, backend=backend)
            ),
        ]
    # the extensions PyTorch lacks, all at once, on the default backend (issue 10's target:
    # within 1.15x of that backend's plain loss+grad)
    found.append(
        Contender(
            EXTENSIONS_ROW,
            "fwd+bwd",
            functools.partial(_api.cross_entropy_with_grad, x, y, return_stats=True, **EXTENSIONS),
        )
    )
    if x.dtype == np.float32:  # the same logits as bfloat16 words (issue 10's target: <= 0.6x float32)
        try:
            import ml_dtypes
        except ImportError:
            notes.append("ml_dtypes not installed: no bfloat16 row (pip install 'fastxent[bfloat16]')")
        else:
            x_brain = x.astype(ml_dtypes.bfloat16)
            brain_out = np.empty_like(x_brain)
            found.append(
                Contender(
                    BFLOAT16_ROW,
                    "fwd+bwd",
                    functools.partial(_api.cross_entropy_with_grad, x_brain, y, out=brain_out),
                )
            )
    if with_reference:
        found.append(
            Contender(
                "numpy reference loss+grad", "fwd+bwd", lambda: _api.cross_entropy_with_grad(x, y, backend="numpy")
            )
        )
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        notes.append("torch not installed: no PyTorch rows (pip install torch==2.13.0)")
    else:
        torch.set_num_threads(threads)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

        def torch_fwd_bwd():
            leaf = xt.detach().requires_grad_(True)
            F.cross_entropy(leaf, yt).backward()
            return leaf.grad

        def torch_fwd():
            with torch.no_grad():
                return F.cross_entropy(xt, yt)

        import fastxent.torch as fxt

        def adapter_fwd_bwd():
            leaf = xt.detach().requires_grad_(True)
            fxt.cross_entropy(leaf, yt).backward()
            return leaf.grad

        found += [
            Contender("fastxent.torch fwd+bwd (adapter)", "fwd+bwd", adapter_fwd_bwd),
            Contender("torch fwd+bwd", "torch fwd+bwd", torch_fwd_bwd),
            Contender("torch fwd", "torch fwd", torch_fwd),
        ]
        if torch_compile:
            found += _compiled_torch(torch, F, xt, yt, x.shape, notes)
        else:
            notes.append("torch.compile not timed (--no-compile)")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        notes.append("jax not installed: no JAX row")
    else:
        try:
            import optax  # type: ignore[import-untyped]
        except ImportError:  # the same loss by hand

            def jax_loss(z, labels):
                lse = jax.nn.logsumexp(z, axis=-1)
                return jnp.mean(lse - jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0])

            jax_name = "jax jit(value_and_grad)"
        else:

            def jax_loss(z, labels):
                return optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()

            jax_name = "jax jit(value_and_grad) optax"
        value_and_grad = jax.jit(jax.value_and_grad(jax_loss))
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        found.append(Contender(jax_name, "fwd+bwd", lambda: jax.block_until_ready(value_and_grad(xj, yj))))
        import fastxent.jax as fxj

        fxj_value_and_grad = jax.jit(jax.value_and_grad(fxj.cross_entropy))
        found.append(
            Contender(
                "fastxent.jax jit(value_and_grad)",
                "fwd+bwd",
                lambda: jax.block_until_ready(fxj_value_and_grad(xj, yj)),
            )
        )
    for user in compare:
        wrong = _compare.check(user, x, y)
        if wrong is not None:
            _note(f"{user.name} not timed on {x.shape[0]}x{x.shape[1]}: {wrong}", notes)
            continue
        found.append(Contender(user.name, "fwd+bwd", functools.partial(user.function, x, y)))
    copy = _parallel_copy()
    found.append(Contender("memory floor (copy)", "floor", lambda: copy(x, floor_out)))
    return found


def _compiled_torch(torch, F, xt, yt, shape, notes: list[str]) -> list[Contender]:
    """torch.compile (Inductor, static shapes, one whole graph) of the eager rows' calls.

    Nothing is compiled here: the first call of each compiles (:func:`_warm_up_compiled`).
    Inductor's kernels run on torch's OpenMP pool, sized by the ``torch.set_num_threads``
    the eager rows already made. If ``torch.compile`` itself raises, both are left out.
    """
    try:
        import torch._dynamo

        # forget the previous shape's graphs: each shape compiles afresh, and the code
        # objects below never reach dynamo's recompile limit, past which it runs them eagerly
        torch._dynamo.reset()

        # two functions, two code objects: the no-grad graph is not a recompile of the other
        def loss_for_backward(logits, target):
            return F.cross_entropy(logits, target)

        def loss_no_grad(logits, target):
            return F.cross_entropy(logits, target)

        compiled_loss = torch.compile(loss_for_backward, dynamic=False, fullgraph=True)
        compiled_loss_no_grad = torch.compile(loss_no_grad, dynamic=False, fullgraph=True)
    except Exception as error:  # noqa: BLE001 - any failure only means "no torch.compile rows"
        _skip_note("torch.compile", shape, error, notes)
        return []

    def compile_fwd_bwd():
        leaf = xt.detach().requires_grad_(True)
        compiled_loss(leaf, yt).backward()
        return leaf.grad

    def compile_fwd():
        with torch.no_grad():
            return compiled_loss_no_grad(xt, yt)

    return [
        Contender("torch.compile fwd+bwd", "compile fwd+bwd", compile_fwd_bwd, compiles=True),
        Contender("torch.compile fwd", "compile fwd", compile_fwd, compiles=True),
    ]


def _skip_note(name: str, shape, error: BaseException, notes: list[str]) -> None:
    """One line on stderr (and in the table's notes): ``name`` left out on ``shape``, and why."""
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    if len(reason) > 160:
        reason = reason[:157] + "..."
    _note(f"{name} skipped on {shape[0]}x{shape[1]} ({reason})", notes)


def _note(message: str, notes: list[str]) -> None:
    """``message`` on stderr now (above a progress bar, not over it) and in the table's notes."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(f"note: {message}", file=sys.stderr, flush=True)
    else:
        tqdm.write(f"note: {message}", file=sys.stderr)  # above the progress bar, not over it
    notes.append(message)


def _warm_up_compiled(contenders: list[Contender], shape, notes: list[str], progress: Callable[[str], None]) -> None:
    """Call each torch.compile contender once, which compiles it, outside the timed rounds;
    keep the seconds as its ``warmup_s`` and leave out (from ``contenders``) any that raise."""
    compiled = []
    for contender in [c for c in contenders if c.compiles]:
        progress(contender.name)
        start = time.perf_counter()
        try:
            contender.run()
        except Exception as error:  # noqa: BLE001 - no compiler, an Inductor error: skip, never crash
            contenders.remove(contender)
            _skip_note(contender.name, shape, error, notes)
        else:
            contender.warmup_s = time.perf_counter() - start
            compiled.append(f"{contender.name.removeprefix('torch.compile ')} {contender.warmup_s:.1f} s")
    if compiled:
        notes.append(f"torch.compile's compile (first call, untimed) on {shape[0]}x{shape[1]}: {', '.join(compiled)}")


def _parallel_copy():
    """``dst[...] = src`` with numba's threads (np.copyto uses one thread, which on this
    kind of machine does not reach the memory bandwidth that two do: a floor that the
    kernels would beat)."""
    try:
        import numba
    except ImportError:
        return lambda src, dst: np.copyto(dst, src)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def copy_rows(src, dst):
        for i in numba.prange(src.shape[0]):
            dst[i, :] = src[i, :]

    return copy_rows


def _logits(rng: np.random.Generator, n: int, n_classes: int, dtype) -> np.ndarray:
    """Standard-normal logits, fast: each row is a window, at a random offset, of one pool
    of 2**22 normal samples (drawing 400M samples one by one took 5 s of the 2-minute grid;
    a window copy runs at memory speed). The kernels' time does not depend on the values."""
    pool_size = 1 << 22
    pool = rng.standard_normal(pool_size + n_classes, dtype=np.float32)
    if n * n_classes <= pool_size:
        return pool[: n * n_classes].reshape(n, n_classes).astype(dtype)
    starts = rng.integers(0, pool_size, n)
    x = np.empty((n, n_classes), dtype)
    for i, start in enumerate(starts):
        x[i] = pool[start : start + n_classes]
    return x


def _run_shape(n, n_classes, dtype, threads, repeat, rng, notes, rows, torch_compile, bar, compare=()) -> None:
    """The rounds of one shape: every contender, interleaved; appends its rows."""
    x = _logits(rng, n, n_classes, dtype)
    y = rng.integers(0, n_classes, n).astype(np.int64)
    contenders = _contenders(x, y, threads, notes, n * n_classes <= REFERENCE_MAX_ELEMENTS, torch_compile, compare)

    def compiling(name: str) -> None:
        if bar is not None:
            bar.set_label(f"{n}x{n_classes} compiling {name}")

    _warm_up_compiled(contenders, (n, n_classes), notes, compiling)
    for round_index in range(repeat + 1):  # round 0 is the warm-up (and JIT compile)
        # each round starts one contender later, so none is always the one that runs
        # right after PyTorch has returned its big buffers to the OS
        first = round_index % len(contenders)
        for contender in contenders[first:] + contenders[:first]:
            start = time.perf_counter()
            contender.run()
            elapsed = time.perf_counter() - start
            if round_index:
                contender.times.append(elapsed)
            elif contender.warmup_s is None:
                contender.warmup_s = elapsed
        if bar is not None:
            bar.step(f"{n}x{n_classes}")
    rows += _summarise((n, n_classes), np.dtype(dtype).itemsize, contenders)
    _note_extensions(rows[-len(contenders) :], n_classes, notes)


def run(
    shapes=DEFAULT_SHAPES,
    dtype="float32",
    threads=None,
    repeat=5,
    seed=0,
    progress=True,
    torch_compile=True,
    compare=(),
):
    """Time every contender on every shape; returns ``(header, rows, notes)``.

    ``torch_compile``: also time torch.compile's rows (when torch is installed); each
    shape compiles them first, untimed (seconds to tens of seconds a shape)."""
    if threads is None:
        threads = get_num_threads()
    set_num_threads(threads)
    notes: list[str] = []
    rows: list[Row] = []
    rng = np.random.default_rng(seed)
    bar = Progress(len(shapes) * (repeat + 1), f"bench {dtype}, {threads} threads", unit="round") if progress else None
    with bar or contextlib.nullcontext():
        for n, n_classes in shapes:
            _run_shape(n, n_classes, dtype, threads, repeat, rng, notes, rows, torch_compile, bar, compare)
    n, n_classes = shapes[-1] if shapes else (0, 0)
    if n * n_classes > REFERENCE_MAX_ELEMENTS:
        notes.append(f"numpy reference timed only where N*C <= {REFERENCE_MAX_ELEMENTS} (it makes float64 temporaries)")
    header = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": threads,
        "dtype": str(np.dtype(dtype)),
        "repeat": repeat,
        "versions": _versions(),
        "backends": list(_dispatch.available_backends()),
        "numba_threading_layer": _threading_layer(),
        "torch_allocator": "THP_MEM_ALLOC_ENABLE=" + os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "torch_compile": torch_compile,  # asked for; a failed compile is in the notes, its rows absent
    }
    return header, rows, list(dict.fromkeys(notes))  # once each, in the order they came


def _note_extensions(rows: list[Row], n_classes: int, notes: list[str]) -> None:
    """The extensions' time over the plain loss+grad of the backend they ran on."""
    times = {row.name: row.median_ms for row in rows}
    backend = _dispatch.default_backend(n_classes)
    plain = times.get(f"fastxent[{backend}] loss+grad")
    if plain and EXTENSIONS_ROW in times:
        notes.append(
            f"{rows[0].shape[0]}x{n_classes}: {EXTENSIONS_ROW} ({backend}) takes "
            f"{times[EXTENSIONS_ROW] / plain:.2f}x the plain loss+grad"
        )
    plain_out = times.get(f"fastxent[{backend}] loss+grad out=")
    if plain_out and BFLOAT16_ROW in times:
        notes.append(
            f"{rows[0].shape[0]}x{n_classes}: {BFLOAT16_ROW} ({backend}) takes "
            f"{times[BFLOAT16_ROW] / plain_out:.2f}x the float32 loss+grad out="
        )


def _threading_layer() -> str:
    try:
        import numba

        return numba.threading_layer()
    except Exception:  # noqa: BLE001 - no parallel call yet, or no numba
        return "n/a"


def _peer_time(by_kind: dict[str, float], peer: str, kind: str) -> float | None:
    """The median of ``peer``'s row ("torch" or "compile") of the same base kind as
    ``kind`` ("fwd+bwd" or "fwd"), or None: no such row, or ``kind`` is that row."""
    base = kind.removeprefix("torch ").removeprefix("compile ")
    if base == "floor" or kind == f"{peer} {base}":
        return None
    return by_kind.get(f"{peer} {base}")


def _summarise(shape, itemsize, contenders) -> list[Row]:
    medians = {c.name: float(np.median(c.times)) for c in contenders}
    by_kind = {c.kind: medians[c.name] for c in contenders}
    floor = by_kind.get("floor")
    bytes_moved = 2 * shape[0] * shape[1] * itemsize  # read N*C once, write N*C once
    rows = []
    for c in contenders:
        t = medians[c.name]
        q25, q75 = np.percentile(c.times, [25, 75])
        torch_time = _peer_time(by_kind, "torch", c.kind)
        compile_time = _peer_time(by_kind, "compile", c.kind)
        rows.append(
            Row(
                shape=shape,
                name=c.name,
                kind=c.kind,
                median_ms=1e3 * t,
                spread_pct=100 * (q75 - q25) / t,
                gbps=bytes_moved / t / 1e9,
                vs_torch=torch_time / t if torch_time else None,
                vs_compile=compile_time / t if compile_time else None,
                x_floor=t / floor if floor else None,
                times_ms=[1e3 * v for v in c.times],
                warmup_s=c.warmup_s,
            )
        )
    return rows


def format_table(header, rows, notes) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in header["versions"].items())
    lines = [
        f"fastxent bench: {header['cpu']}, {header['cores']} cores, {header['threads']} threads, {header['dtype']}, "
        f"median of {header['repeat']} interleaved rounds",
        f"{versions}; numba threading layer {header['numba_threading_layer']}; torch {header['torch_allocator']}; "
        f"OMP_WAIT_POLICY={header['omp_wait_policy']}",
        "GB/s counts the floor's traffic (read N*C + write N*C); 'vs torch' and 'vs compile' are eager torch's "
        "and torch.compile's time over the row's: loss+grad rows against fwd+bwd, loss-only rows against fwd.",
        "",
        f"{'shape':>14}  {'contender':<36} {'median ms':>10} {'spread':>7} {'GB/s':>7} {'vs torch':>9} "
        f"{'vs compile':>10} {'x floor':>8}",
    ]
    last_shape = None
    for row in rows:
        shape = f"{row.shape[0]}x{row.shape[1]}" if row.shape != last_shape else ""
        if row.shape != last_shape and last_shape is not None:
            lines.append("")
        last_shape = row.shape
        vs = f"{row.vs_torch:8.1f}x" if row.vs_torch else f"{'':>9}"
        vc = f"{row.vs_compile:9.1f}x" if row.vs_compile else f"{'':>10}"
        fl = f"{row.x_floor:7.2f}x" if row.x_floor else f"{'':>8}"
        lines.append(
            f"{shape:>14}  {row.name:<36} {row.median_ms:10.2f} {row.spread_pct:6.1f}% {row.gbps:7.1f} {vs} {vc} {fl}"
        )
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines)


#: colour families of the plot: fastxent's rows in blues, each peer's in its own family
_FAMILIES = (
    (("fastxent",), "Blues"),
    (("torch.compile",), "Reds"),
    (("torch",), "Oranges"),
    (("jax",), "Greens"),  # fastxent.jax is fastxent's (blues): "fastxent" matches first
    (("numpy",), "Greys"),
)


def _family(name: str) -> str:
    return next((cmap for prefixes, cmap in _FAMILIES if name.startswith(prefixes)), "Purples")


def _fastxent_style(name: str) -> tuple[float, str]:
    """Shade (in the blues) and marker of a fastxent row: by backend or adapter."""
    for key, shade, marker in (
        ("[numba]", 0.95, "o"),
        ("[cython]", 0.65, "^"),
        ("fastxent.torch", 0.5, "s"),
        ("fastxent.jax", 0.45, "D"),
        ("bfloat16", 0.8, "P"),
    ):
        if key in name:
            return shade, marker
    return 0.8, "*"  # the extensions row


def _call_linestyle(name: str) -> str:
    """Line style of a fastxent row by the kind of call."""
    if "loss only" in name:
        return "-."
    if "in place" in name:
        return ":"
    if "out=" in name:
        return "--"
    return "-"


def plot(rows, path: str, header: dict[str, Any] | None = None) -> None:
    """Time per element against C: fastxent's rows as one colour family (blues: the backend
    by shade and marker, the call by line style: fresh solid, ``out=`` dashed, in place
    dotted, loss only dash-dotted), the peers as others (dotted, squares), the memory floor
    as a black reference line; dtype, threads and N in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    names = list(dict.fromkeys(r.name for r in rows))
    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(_family(name), []).append(name)
    for name in names:
        mine = sorted((r for r in rows if r.name == name), key=lambda r: r.shape[1])
        family = _family(name)
        siblings = members[family]
        # shades from dark to light within a family, never the near-white end of the map
        shade = 0.9 - 0.5 * siblings.index(name) / max(len(siblings) - 1, 1)
        style: dict[str, Any]
        if mine[0].kind == "floor":
            style = {"color": "black", "linestyle": "--", "linewidth": 2.2}
        elif name.startswith("fastxent"):  # blues: the backend by shade and marker, the call by line style
            shade, marker = _fastxent_style(name)
            style = {
                "color": plt.get_cmap(family)(shade),
                "marker": marker,
                "linestyle": _call_linestyle(name),
                "linewidth": 2,
            }
        else:
            style = {"color": plt.get_cmap(family)(shade), "marker": "s", "linestyle": ":", "linewidth": 1.3}
        ax.plot(
            [r.shape[1] for r in mine],
            [1e6 * r.median_ms / (r.shape[0] * r.shape[1]) for r in mine],
            label=name,
            **style,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("classes C (N per point in the title)")
    ax.set_ylabel("ns per logit (median of rounds)")
    shapes = sorted({r.shape for r in rows}, key=lambda shape: shape[1])
    title = "softmax cross-entropy, loss + gradient: time per logit"
    if header is not None:
        title += f"\n{header.get('dtype')}, {header.get('threads')} threads, {header.get('cpu')}"
    title += "\n" + ", ".join(f"N={n} at C={c}" for n, c in shapes)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


_PEAK_SCRIPT = """
import sys
import numpy as np
n, c, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
x = np.random.default_rng(0).standard_normal((n, c), dtype=np.float32)
y = np.random.default_rng(1).integers(0, c, n)
out = None
if which.startswith("torch"):
    import torch, torch.nn.functional as F
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    def call():
        leaf = xt.detach().requires_grad_(True)
        F.cross_entropy(leaf, yt).backward()
        return leaf.grad
    small = torch.zeros(4, 3, requires_grad=True)
    F.cross_entropy(small, torch.tensor([0, 1, 2, 0])).backward()
else:
    import fastxent as fx
    out = np.empty_like(x) if which == "out" else None
    call = {
        "fresh": lambda: fx.cross_entropy_with_grad(x, y),
        "out": lambda: fx.cross_entropy_with_grad(x, y, out=out),
        "in place": lambda: fx.cross_entropy_with_grad(x, y, out=x),
        "loss only": lambda: fx.cross_entropy(x, y),
    }[which]
    # load and compile, with the measured C (backend=None picks the backend by the class count)
    fx.cross_entropy_with_grad(np.zeros((4, c), np.float32), np.arange(4) % c)
    fx.cross_entropy(np.zeros((4, c), np.float32), np.arange(4) % c)
if out is not None:
    out.fill(0)  # touch the preallocated buffer before measuring
def status_kib(field):  # VmHWM is this address space's own high-water mark; ru_maxrss is
    # not: across exec it keeps the maximum of the parent that spawned this process
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = status_kib("VmRSS")
result = call()
print(max(0, status_kib("VmHWM") - before))
"""

#: what ``--memory`` measures, each in a fresh process: (label, script argument)
PEAK_CASES = (
    ("fastxent loss+grad", "fresh"),
    ("fastxent loss+grad out=", "out"),
    ("fastxent in place", "in place"),
    ("fastxent loss only", "loss only"),
    ("torch fwd+bwd", "torch"),
)


def peak_memory(shape: tuple[int, int]) -> list[tuple[str, float]]:
    """Extra peak resident memory of one call, in units of the logits' size (N*C*4 bytes),
    each case in a fresh process: the high-water mark after the call minus the resident
    size before it (inputs, outputs given with ``out=``, and code already loaded)."""
    import subprocess

    n, n_classes = shape
    found = []
    for label, which in PEAK_CASES:
        if which == "torch" and importlib.util.find_spec("torch") is None:
            continue
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(n), str(n_classes), which],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            found.append((label, float("nan")))
            continue
        found.append((label, int(done.stdout.strip().splitlines()[-1]) / (n * n_classes * 4)))
    return found


_STARTUP_SCRIPT = """
import time
start = time.perf_counter()
import numpy as np
import fastxent as fx
imported = time.perf_counter()
fx.cross_entropy_with_grad(np.zeros((64, 1000), np.float32), np.zeros(64, np.int64))
print(imported - start, time.perf_counter() - start)
"""


def startup_times() -> dict[str, float]:
    """Seconds for a fresh process to ``import fastxent`` and make one loss+grad call:
    with numba's cache empty (a new NUMBA_CACHE_DIR: every kernel the call needs is
    compiled) and then warm (the same dir, loaded from the cache)."""
    import subprocess
    import tempfile

    found = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cache empty", "cache warm"):
            done = subprocess.run(
                [sys.executable, "-c", _STARTUP_SCRIPT], capture_output=True, text=True, env=env, check=True
            )
            import_s, total_s = (float(v) for v in done.stdout.split())
            found[f"import ({label})"] = import_s
            found[f"import + first call ({label})"] = total_s
    return found


def _parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        parsed = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes look like 4096x32000,65536x128; got {text!r}") from None
    if any(len(s) != 2 or min(s) < 1 for s in parsed):
        raise argparse.ArgumentTypeError(f"shapes look like 4096x32000,65536x128; got {text!r}")
    return tuple((s[0], s[1]) for s in parsed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes", type=_parse_shapes, default=DEFAULT_SHAPES, help="comma-separated NxC list (default: %(default)s)"
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="threads for every contender (default: all)")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds after the warm-up (default: 5)")
    parser.add_argument("--json", metavar="PATH", help="write the raw numbers as JSON")
    parser.add_argument("--plot", metavar="PATH.png", help="draw time per element against C (needs matplotlib)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure each contender's extra peak memory on the largest shape (fresh processes)",
    )
    parser.add_argument(
        "--startup", action="store_true", help="also time a fresh process's import and first call (cache empty/warm)"
    )
    parser.add_argument(
        "--linear",
        action="store_true",
        help="instead: the fused linear cross-entropy against torch's linear_cross_entropy (unchunked, chunked) "
        "and the three GEMMs alone; time and extra peak memory, fresh processes",
    )
    parser.add_argument(
        "--compare",
        action="append",
        type=_compare.load,
        metavar="MODULE:FUNCTION",
        help="also time your function f(logits, labels) -> (mean loss, gradient), checked against the reference "
        "first (repeatable; see `fastxent._compare` for the signature)",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="instead: the latency of small calls (8x10 to 1024x1000, or --shapes) against PyTorch and NumPy",
    )
    parser.add_argument(
        "--linear-shape",
        type=_parse_linear_shape,
        default=None,
        metavar="NxHxV",
        help="the --linear shape (default: 2048x512x65536)",
    )
    parser.add_argument(
        "--linear-chunk-rows",
        type=_positive_int,
        default=None,
        metavar="ROWS",
        help="fastxent's chunk_rows in --linear (default: 64 MB of logits or a quarter of d_weight, the larger; "
        "larger chunks: faster GEMMs, more memory)",
    )
    parser.add_argument(
        "--no-compile",
        dest="torch_compile",
        action="store_false",
        help="leave out the torch.compile rows (each shape otherwise compiles them first: seconds to tens of seconds)",
    )


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text!r}")
    return int(text)


def _parse_linear_shape(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"the linear shape looks like 2048x512x65536 (NxHxV), got {text!r}")
    n, h, v = (int(p) for p in parts)
    return n, h, v


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print the table (arguments checked by the caller)."""
    if args.linear:
        from . import _bench_linear

        return _bench_linear.main(args)
    if args.small:
        from . import _bench_small

        return _bench_small.main(args)
    header, rows, notes = run(
        args.shapes, args.dtype, args.threads, args.repeat, torch_compile=args.torch_compile, compare=args.compare or ()
    )
    print(format_table(header, rows, notes), flush=True)  # the table first, whatever happens to the plot
    status = 0
    if args.plot:
        try:
            plot(rows, args.plot, header)
        except (ImportError, OSError) as error:
            print(f"fastxent bench: no plot written to {args.plot}: {error}", file=sys.stderr)
            status = 1
    memory = []
    if args.memory:
        shape = max(args.shapes, key=lambda s: s[0] * s[1])
        memory = peak_memory(shape)
        print(f"\nextra peak memory of one float32 call on {shape[0]}x{shape[1]}, in logits' sizes (N*C*4 bytes):")
        for label, size in memory:
            print(f"  {label:<28} {size:6.2f}")
    startup = {}
    if args.startup:
        startup = startup_times()
        print("\nfresh process, seconds:")
        for label, seconds in startup.items():
            print(f"  {label:<36} {seconds:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            record = {"header": header, "rows": [asdict(r) for r in rows], "notes": notes, "peak_memory": memory}
            record["startup_s"] = startup
            json.dump(record, f, indent=1)
    return status
