"""`fastxent bench`: the README's main job must run, and its arithmetic must be right.

No timing is asserted (this machine is shared); the tests check what the table and the
JSON say about the timings they were given.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fastxent import _bench


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


def test_parse_shapes_accepts_the_documented_form_and_rejects_others():
    assert _bench._parse_shapes("4096x32000,65536X128") == ((4096, 32000), (65536, 128))
    for bad in ("4096", "4096x", "0x10", "4096x32000x2", "ax3"):
        with pytest.raises(Exception, match="shapes look like"):
            _bench._parse_shapes(bad)


def test_the_command_prints_the_table_and_writes_json_and_plot(tmp_path):
    """The README's main job, end to end in a fresh process, on small shapes."""
    record_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["--shapes", "512x10,64x1000", "--repeat", "2", "--json", str(record_path), "--plot", str(plot_path)]
    result = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert "memory floor (copy)" in result.stdout and "loss+grad" in result.stdout
    record = json.loads(record_path.read_text())
    assert record["header"]["repeat"] == 2
    shapes = {tuple(row["shape"]) for row in record["rows"]}
    assert shapes == {(512, 10), (64, 1000)}
    for row in record["rows"]:
        assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"])
        assert row["median_ms"] == pytest.approx(float(np.median(row["times_ms"])))
    names = {row["name"] for row in record["rows"]}
    assert any(name.startswith("fastxent[") for name in names)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib not installed" in result.stdout
    else:
        assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
