"""`fastxent bench`: the README's main job must run, and its arithmetic must be right.

No timing is asserted (this machine is shared); the tests check what the table and the
JSON say about the timings they were given.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest

from fastxent import _bench, _bench_small


def test_logits_are_standard_normal_rows_of_the_requested_dtype():
    rng = np.random.default_rng(0)
    for n, n_classes, dtype in [(3, 5, "float32"), (64, 70_000, "float64"), (4097, 1025, "float32")]:
        x = _bench._logits(rng, n, n_classes, dtype)
        assert x.shape == (n, n_classes) and x.dtype == np.dtype(dtype) and x.flags.c_contiguous
        assert np.isfinite(x).all()
        if x.size > 100_000:
            assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
    big = _bench._logits(np.random.default_rng(1), 64, 70_000, "float32")
    assert not np.array_equal(big[0], big[1]), "rows must be different windows of the pool"


def test_summary_ratios_follow_the_medians():
    contenders = [
        _bench.Contender("fastxent[x] loss+grad", "fwd+bwd", lambda: None, [0.001, 0.002, 0.003]),
        _bench.Contender("fastxent[x] loss only", "fwd", lambda: None, [0.001, 0.001, 0.001]),
        _bench.Contender("torch fwd+bwd", "torch fwd+bwd", lambda: None, [0.02, 0.02, 0.02]),
        _bench.Contender("torch fwd", "torch fwd", lambda: None, [0.004, 0.004, 0.004]),
        _bench.Contender("memory floor (copy)", "floor", lambda: None, [0.0005] * 3),
    ]
    rows = {r.name: r for r in _bench._summarise((1000, 500), 4, contenders)}
    fused = rows["fastxent[x] loss+grad"]
    assert fused.median_ms == pytest.approx(2.0)
    assert fused.vs_torch == pytest.approx(10.0)  # 20 ms / 2 ms
    assert fused.x_floor == pytest.approx(4.0)  # 2 ms / 0.5 ms
    assert fused.gbps == pytest.approx(2 * 1000 * 500 * 4 / 0.002 / 1e9)
    assert rows["fastxent[x] loss only"].vs_torch == pytest.approx(4.0)  # against torch fwd, not fwd+bwd
    assert rows["memory floor (copy)"].x_floor == pytest.approx(1.0)
    assert all(row.vs_compile is None for row in rows.values()), "no torch.compile rows: no 'vs compile'"


def test_vs_compile_is_compiled_time_over_the_row_of_the_same_kind():
    contenders = [
        _bench.Contender("fastxent[x] loss+grad", "fwd+bwd", lambda: None, [0.002] * 3),
        _bench.Contender("fastxent[x] loss only", "fwd", lambda: None, [0.001] * 3),
        _bench.Contender("jax jit(value_and_grad)", "fwd+bwd", lambda: None, [0.004] * 3),
        _bench.Contender("torch fwd+bwd", "torch fwd+bwd", lambda: None, [0.02] * 3),
        _bench.Contender("torch fwd", "torch fwd", lambda: None, [0.006] * 3),
        _bench.Contender("torch.compile fwd+bwd", "compile fwd+bwd", lambda: None, [0.010, 0.012, 0.011]),
        _bench.Contender("torch.compile fwd", "compile fwd", lambda: None, [0.003] * 3),
        _bench.Contender("memory floor (copy)", "floor", lambda: None, [0.0005] * 3),
    ]
    rows = {r.name: r for r in _bench._summarise((1000, 500), 4, contenders)}
    fused, loss_only, jax = (
        rows["fastxent[x] loss+grad"],
        rows["fastxent[x] loss only"],
        rows["jax jit(value_and_grad)"],
    )
    assert fused.vs_compile == pytest.approx(5.5)  # 11 ms (median) / 2 ms
    assert loss_only.vs_compile == pytest.approx(3.0)  # against compile fwd (3 ms), not fwd+bwd
    assert (fused.vs_torch, loss_only.vs_torch) == (pytest.approx(10.0), pytest.approx(6.0))
    # the JAX row gets the same three columns
    assert (jax.vs_torch, jax.vs_compile, jax.x_floor) == (pytest.approx(5.0), pytest.approx(2.75), pytest.approx(8.0))
    # the two PyTorch peers against each other, never against themselves
    eager, compiled = rows["torch fwd+bwd"], rows["torch.compile fwd+bwd"]
    assert eager.vs_torch is None and eager.vs_compile == pytest.approx(0.55)
    assert compiled.vs_compile is None and compiled.vs_torch == pytest.approx(20 / 11)
    assert rows["torch.compile fwd"].vs_torch == pytest.approx(2.0)  # eager fwd 6 ms / compiled fwd 3 ms
    assert compiled.x_floor == pytest.approx(22.0)
    floor = rows["memory floor (copy)"]
    assert floor.vs_torch is None and floor.vs_compile is None
    # the table shows the column, and the JSON rows carry the key
    table = _bench.format_table(
        {
            "cpu": "cpu",
            "cores": 2,
            "threads": 2,
            "dtype": "float32",
            "repeat": 3,
            "versions": {},
            "numba_threading_layer": "omp",
            "torch_allocator": "",
            "omp_wait_policy": "",
        },
        list(rows.values()),
        [],
    )
    assert "vs compile" in table
    fused_line = next(line for line in table.splitlines() if "fastxent[x] loss+grad" in line)
    assert fused_line.split()[-3:] == ["10.0x", "5.5x", "4.00x"]  # vs torch, vs compile, x floor
    assert set(asdict(fused)) >= {"vs_torch", "vs_compile", "x_floor", "warmup_s"}


@pytest.fixture
def torch_threads():
    """torch, its thread count restored afterwards (the bench sets it to the kernels')."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    yield torch
    torch.set_num_threads(threads)


def _run_tiny(**options):
    """The bench, in this process, on one tiny shape with one timed round."""
    return _bench.run(shapes=((16, 10),), repeat=1, progress=False, **options)


def test_a_torch_compile_that_raises_is_skipped_with_a_note(monkeypatch, capsys, torch_threads):
    torch = torch_threads

    def no_compile(*args, **kwargs):
        raise RuntimeError("Dynamo is not supported here\nsecond line of the message")

    monkeypatch.setattr(torch, "compile", no_compile)
    header, rows, notes = _run_tiny()
    names = {row.name for row in rows}
    assert not any(name.startswith("torch.compile") for name in names)
    assert {"torch fwd+bwd", "torch fwd", "memory floor (copy)"} <= names, "the other rows still run"
    assert all(row.vs_compile is None for row in rows)
    err = capsys.readouterr().err
    assert "torch.compile skipped on 16x10 (RuntimeError: Dynamo is not supported here)" in err
    assert "second line" not in err, "one line, not the whole message"
    assert any("torch.compile skipped on 16x10" in note for note in notes)
    assert header["torch_compile"] is True


def test_a_compiled_function_whose_first_call_raises_is_skipped_with_a_note(monkeypatch, capsys, torch_threads):
    """The usual failure: torch.compile returns, and the first call (Inductor, the C++
    compiler) raises. Each compiled row is left out on its own; the bench goes on."""
    torch = torch_threads
    compiled = []

    def failing_compile(fn, **options):
        compiled.append(options)

        def call(*args):
            raise OSError("no C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", failing_compile)
    header, rows, notes = _run_tiny()
    assert compiled and all(o.get("dynamic") is False and o.get("fullgraph") is True for o in compiled)
    assert not any(row.name.startswith("torch.compile") for row in rows)
    assert "torch fwd+bwd" in {row.name for row in rows}
    err = capsys.readouterr().err.splitlines()
    for name in ("torch.compile fwd+bwd", "torch.compile fwd"):
        assert f"note: {name} skipped on 16x10 (OSError: no C++ compiler found)" in err
    assert not any("compile (first call" in note for note in notes), "no compile time for rows that failed"


def test_no_compile_leaves_torch_compile_out(monkeypatch, torch_threads):
    torch = torch_threads

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("torch.compile called despite torch_compile=False")

    monkeypatch.setattr(torch, "compile", must_not_be_called)
    header, rows, notes = _run_tiny(torch_compile=False)
    assert header["torch_compile"] is False
    assert not any(row.name.startswith("torch.compile") for row in rows)
    assert "torch.compile not timed (--no-compile)" in notes


def test_parse_shapes_accepts_the_documented_form_and_rejects_others():
    assert _bench._parse_shapes("4096x32000,65536X128") == ((4096, 32000), (65536, 128))
    for bad in ("4096", "4096x", "0x10", "4096x32000x2", "ax3"):
        with pytest.raises(Exception, match="shapes look like"):
            _bench._parse_shapes(bad)


def test_the_command_prints_the_table_and_writes_json_and_plot(tmp_path):
    """The README's main job, end to end in a fresh process, on small shapes."""
    record_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--shapes", "512x10,64x1000", "--repeat", "2", "--json", str(record_path), "--plot", str(plot_path)]
    args.append("--no-compile")  # torch.compile's compile has its own test below
    result = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "memory floor (copy)" in result.stdout and "loss+grad" in result.stdout
    record = json.loads(record_path.read_text())
    assert record["header"]["repeat"] == 2 and record["header"]["torch_compile"] is False
    shapes = {tuple(row["shape"]) for row in record["rows"]}
    assert shapes == {(512, 10), (64, 1000)}
    for row in record["rows"]:
        assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"])
        assert row["median_ms"] == pytest.approx(float(np.median(row["times_ms"])))
    names = {row["name"] for row in record["rows"]}
    assert any(name.startswith("fastxent[") for name in names)
    assert not any(name.startswith("torch.compile") for name in names)
    pytest.importorskip("matplotlib")  # (without it --plot is a usage error: tests/test_cli.py)
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # torch.jit's, from inside Inductor
def test_torch_compile_rows_compute_what_eager_torch_does(torch_threads):
    """The compiled contenders, compiled (as the bench does) and called: the loss and the
    gradient match eager PyTorch's, and their compile time is kept."""
    torch = torch_threads
    rng = np.random.default_rng(3)
    x = _bench._logits(rng, 64, 10, "float32")
    y = rng.integers(0, 10, 64)
    notes: list[str] = []
    contenders = _bench._contenders(x, y, 1, notes, with_reference=False)
    labels = []
    _bench._warm_up_compiled(contenders, x.shape, notes, labels.append)
    by_name = {c.name: c for c in contenders}
    assert labels == ["torch.compile fwd+bwd", "torch.compile fwd"], notes  # the progress labels
    for name in labels:
        assert by_name[name].compiles and by_name[name].warmup_s > 0
    assert torch.get_num_threads() == 1, "torch runs at the bench's thread count"
    for kind in ("fwd+bwd", "fwd"):
        compiled, eager = by_name[f"torch.compile {kind}"].run(), by_name[f"torch {kind}"].run()
        np.testing.assert_allclose(compiled.numpy(), eager.numpy(), rtol=1e-5, atol=1e-7)
    assert any(note.startswith("torch.compile's compile (first call, untimed) on 64x10: fwd+bwd ") for note in notes)


@pytest.mark.slow
def test_the_command_times_torch_compile_on_a_tiny_shape(tmp_path):
    """End to end in a fresh process with torch.compile on (the default): its two rows,
    and a 'vs compile' for every fastxent row."""
    pytest.importorskip("torch")
    record_path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", "--shapes", "64x10", "--repeat", "1", "--json", str(record_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "vs compile" in result.stdout and "torch.compile fwd+bwd" in result.stdout
    record = json.loads(record_path.read_text())
    assert record["header"]["torch_compile"] is True
    rows = {row["name"]: row for row in record["rows"]}
    for kind in ("fwd+bwd", "fwd"):
        compiled = rows[f"torch.compile {kind}"]
        assert compiled["kind"] == f"compile {kind}" and compiled["warmup_s"] > 0 and compiled["vs_compile"] is None
        assert compiled["vs_torch"] == pytest.approx(rows[f"torch {kind}"]["median_ms"] / compiled["median_ms"])
    fastxent_rows = [row for name, row in rows.items() if name.startswith("fastxent[")]
    assert fastxent_rows
    for row in fastxent_rows:
        compiled = rows["torch.compile fwd" if row["kind"] == "fwd" else "torch.compile fwd+bwd"]
        assert row["vs_compile"] == pytest.approx(compiled["median_ms"] / row["median_ms"])
        assert row["vs_torch"] is not None and row["x_floor"] is not None
    assert any(note.startswith("torch.compile's compile (first call, untimed) on 64x10") for note in record["notes"])


@pytest.mark.slow
def test_bench_linear_on_a_tiny_shape(tmp_path):
    """`fastxent bench --linear`: every contender in its fresh process, a row each with time
    and extra peak memory, the BLAS named, the JSON record."""
    pytest.importorskip("torch")
    record_path = tmp_path / "linear.json"
    result = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", "--linear", "--linear-shape", "64x16x512", "--repeat", "1",
         "--threads", "1", "--linear-chunk-rows", "24", "--json", str(record_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "N=64 H=16 V=512" in result.stdout and "BLAS:" in result.stdout and "torch: " in result.stdout
    assert "fastxent's chunks: 24 rows" in result.stdout
    record = json.loads(record_path.read_text())
    assert record["chunk_rows"] == 24
    assert set(record["results"]) == {
        "fastxent (NumPy)", "fastxent.torch", "torch unchunked", "torch chunked", "three GEMMs alone",
        "three GEMMs (torch)",
    }  # fmt: skip
    for numbers in record["results"].values():
        assert len(numbers["times"]) == 1 and numbers["times"][0] > 0 and numbers["extra_bytes"] >= 0


def test_bench_small_prints_every_shape_and_contender(tmp_path):
    record_path = tmp_path / "small.json"
    result = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", "--small", "--repeat", "1", "--json", str(record_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(record_path.read_text())["rows"]
    shapes = {tuple(row["shape"]) for row in rows}
    assert shapes == set(_bench_small.SHAPES)
    names = {row["name"] for row in rows}
    assert {"fastxent loss+grad out=", "fastxent loss+grad", "numpy loss+grad"} <= names
    assert all(row["median_us"] > 0 for row in rows)
    assert "1024x1000" in result.stdout.replace(" ", "")
