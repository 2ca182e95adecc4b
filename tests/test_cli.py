"""The command line behaves: every argument checked before any work (usage error, exit 2,
one line on stderr, no traceback), `--version`, help text for each command, results on
stdout and progress on stderr, and `fastxent.torch` without torch named clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastxent
from fastxent import __main__ as cli

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastxent", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"fastxent {fastxent.__version__}"


def test_the_installed_console_script_runs():
    """The `fastxent` entry point that pip installs beside this interpreter (not only
    `python -m fastxent`): --version, and a usage error's exit status."""
    script = Path(sys.executable).with_name("fastxent")
    if not script.is_file():
        pytest.skip("no fastxent console script beside this interpreter (not pip-installed here)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"fastxent {fastxent.__version__}"
    result = subprocess.run([str(script), "bench", "--repeat", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["bench", "demo", "precompile", "info", "score"])
def test_every_command_has_help(command):
    top = run_cli("--help")
    assert top.returncode == 0 and command in top.stdout
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: fastxent {command}")
    assert len(result.stdout.split("\n\n")[1].strip()) > 40  # a description, not only the usage line


def usage_error(capsys, *argv: str) -> str:
    """Run main() in-process (no benchmark may start: it would fail the test by time) and
    return stderr, which must be argparse's usage error."""
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", *argv])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fastxent bench") and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_threads_above_the_core_count_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setattr("fastxent._bench.run", pytest.fail)  # must not be reached
    assert f"--threads {CORES + 1}" in usage_error(capsys, "--threads", str(CORES + 1))
    assert "--threads 0" in usage_error(capsys, "--threads", "0")


@pytest.mark.parametrize("repeat", ["0", "-3"])
def test_repeat_below_one_is_a_usage_error(capsys, monkeypatch, repeat):
    monkeypatch.setattr("fastxent._bench.run", pytest.fail)
    assert "at least 1" in usage_error(capsys, "--repeat", repeat)


@pytest.mark.parametrize("option", ["--plot", "--json"])
def test_unwritable_output_paths_are_usage_errors(capsys, monkeypatch, tmp_path, option):
    pytest.importorskip("matplotlib")  # (so that --plot gets as far as its path)
    monkeypatch.setattr("fastxent._bench.run", pytest.fail)
    assert "no such directory" in usage_error(capsys, option, str(tmp_path / "missing" / "out"))
    assert "is a directory" in usage_error(capsys, option, str(tmp_path))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in usage_error(capsys, option, str(locked / "out"))


def test_plot_without_matplotlib_is_a_usage_error(capsys, monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    monkeypatch.setattr("fastxent._bench.run", pytest.fail)
    assert "matplotlib" in usage_error(capsys, "--plot", str(tmp_path / "p.png"))


def test_bad_arguments_fail_fast_in_a_fresh_process(tmp_path):
    """As a user sees it: exit 2 at once, one usage message, no traceback."""
    result = run_cli("bench", "--threads", str(CORES + 7), "--json", str(tmp_path / "r.json"), timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--threads" in result.stderr
    assert result.stdout == "" and not (tmp_path / "r.json").exists()


def test_the_table_is_printed_before_a_failing_plot(capsys, monkeypatch, tmp_path):
    """A plot that fails late (the disk, matplotlib) still leaves the table on stdout, and the
    exit status says the plot is missing."""
    from fastxent import _bench

    row = _bench.Row((8, 10), "memory floor (copy)", "floor", 1.0, 0.0, 1.0, None, None, 1.0, [1.0], None)
    monkeypatch.setattr(_bench, "run", lambda *a, **k: ({"dtype": "float32", "threads": 1}, [row], []))
    monkeypatch.setattr(_bench, "format_table", lambda header, rows, notes: "THE TABLE")

    def broken_plot(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_bench, "plot", broken_plot)
    status = cli.main(["bench", "--repeat", "1", "--plot", str(tmp_path / "p.png")])
    out, err = capsys.readouterr()
    assert status == 1
    assert out.strip() == "THE TABLE"
    assert "disk full" in err and "no plot" in err


def test_precompile_reports_progress_on_stderr_and_the_count_on_stdout():
    """Piped (not a terminal), precompile logs one line per kernel on stderr, and prints how
    many kernels it compiled on stdout. (A warm cache: the kernels load in seconds.)"""
    result = run_cli("precompile", timeout=600)
    assert result.returncode == 0, result.stderr
    assert "kernel specialisations compiled or loaded" in result.stdout
    steps = [line for line in result.stderr.splitlines() if line.startswith("[")]
    if "numba" in fastxent.available_backends():
        total = int(steps[0].split("/")[1].split("]")[0])
        assert len(steps) == total and steps[-1].startswith(f"[{total}/{total}]")


def test_importing_the_torch_adapter_without_torch_names_the_install(tmp_path):
    """With torch hidden, `import fastxent.torch` says what to install (the pinned CPU wheel)."""
    hide = tmp_path / "torch"
    hide.mkdir()
    (hide / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", "import fastxent.torch"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastxent.torch needs PyTorch") and "torch==2.13.0" in last


@pytest.mark.parametrize(
    ("module", "dependency", "install"),
    [("fastxent.jax", "jax", "fastxent[jax]"), ("fastxent.dask", "dask", "fastxent[dask]")],
)
def test_importing_an_adapter_without_its_dependency_names_the_install(tmp_path, module, dependency, install):
    """With the dependency hidden, the adapter's import error says what to pip install."""
    hide = tmp_path / dependency
    hide.mkdir()
    (hide / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{dependency}'\", name='{dependency}')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: {module} needs") and install in last


def test_info_names_the_blas_backends_and_threads():
    """`fastxent info`: the versions, backends, threads and NumPy's BLAS (the library and
    the kernel it runs); `--json` the same as a record."""
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    assert f"fastxent:            {fastxent.__version__}" in result.stdout
    assert "backends:" in result.stdout and "numpy" in result.stdout.split("backends:")[1].splitlines()[0]
    record = json.loads(run_cli("info", "--json").stdout)
    assert record["fastxent"] == fastxent.__version__
    assert record["backends"] == list(fastxent.available_backends())
    assert record["threads"] >= 1 and record["cpu"]["cores"] >= 1
    if record["optional"]["threadpoolctl"] is not None:
        assert record["numpy"]["blas"], "threadpoolctl is installed: NumPy's BLAS must be named"
        assert all(entry["internal_api"] for entry in record["numpy"]["blas"])
        assert "blas:" in result.stdout
    if record["optional"]["torch"] is not None:
        assert record["torch"]["version"] == record["optional"]["torch"]
    if "numba" in record["backends"]:
        assert record["numba"]["threading_layer"] in ("omp", "tbb", "workqueue")
