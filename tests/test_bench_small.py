"""`fastxent bench --small`: the latency table of small calls against PyTorch and NumPy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastxent import __main__ as cli
from fastxent import _bench_small


def test_numpy_row_computes_the_loss_and_gradient():
    """The NumPy contender is a real loss+grad (else its row would time something else)."""
    import fastxent as fx

    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 7), dtype=np.float32)
    y = rng.integers(0, 7, 16)
    loss, grad = _bench_small.numpy_loss_and_grad(x, y)
    ref_loss, ref_grad = fx.cross_entropy_with_grad(x.astype(np.float64), y)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)


def test_bench_small_prints_the_table_and_writes_json(tmp_path):
    record = tmp_path / "small.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", "--small", "--shapes", "8x10,64x100", "--repeat", "1",
         "--threads", "1", "--json", str(record)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = done.stdout
    assert out.startswith("fastxent bench --small:")
    for name in ("fastxent loss+grad", "fastxent loss+grad out=", "numpy loss+grad"):
        assert name in out
    data = json.loads(record.read_text())
    shapes = {tuple(row["shape"]) for row in data["rows"]}
    assert shapes == {(8, 10), (64, 100)}
    assert all(row["median_us"] > 0 for row in data["rows"])
    names = {row["name"] for row in data["rows"]}
    if "torch" in data["header"]["versions"]:
        assert {"torch fwd+bwd", "fastxent.torch fwd+bwd"} <= names
        ratios = [row["vs_torch"] for row in data["rows"] if row["name"] == "fastxent loss+grad"]
        assert all(r is not None and r > 0 for r in ratios)


def test_plot_with_small_is_a_usage_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(_bench_small, "run", pytest.fail)  # must not be reached
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", "--small", "--plot", str(tmp_path / "p.png")])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "--small" in err.splitlines()[-1] and "Traceback" not in err
