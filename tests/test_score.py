"""`fastxent score LOGITS LABELS`: streamed metrics of saved logits. Checked against a plain
NumPy/SciPy computation on the whole array, independent of the chunking (bit for bit), on
N-D and 16-bit logits; bad input is one line on stderr and a non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.special import log_softmax, softmax

from fastxent import _score


def expected_metrics(x, y, ignore_index=-100):
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    y = y.reshape(-1)
    keep = y != ignore_index
    x, y = x[keep], y[keep]
    rows = np.arange(len(y))
    ce = -log_softmax(x, axis=1)[rows, y].mean()
    order = np.argsort(-x, axis=1, kind="stable")  # ties: the first index first (torch.topk, argmax)
    rank = np.argmax(order == y[:, None], axis=1)
    confidence = softmax(x, axis=1).max(axis=1)
    correct = rank == 0
    bins = np.minimum((confidence * 15).astype(int), 14)
    ece = sum(
        abs(correct[bins == b].mean() - confidence[bins == b].mean()) * np.mean(bins == b)
        for b in range(15)
        if np.any(bins == b)
    )
    return {
        "cross_entropy": ce,
        "perplexity": np.exp(ce),
        "accuracy": correct.mean(),
        "top5_accuracy": (rank < 5).mean(),
        "ece": ece,
        "rows": len(y),
    }


def problem(rng, shape=(700,), n_classes=40, dtype=np.float32):
    # integer-valued logits: many ties, which the ranks must break by the first index
    x = rng.integers(-4, 5, (*shape, n_classes)).astype(dtype)
    x.reshape(-1, n_classes)[::3] += rng.standard_normal((len(x.reshape(-1, n_classes)[::3]), n_classes)).astype(dtype)
    y = rng.integers(0, n_classes, shape)
    y.reshape(-1)[::9] = -100
    return x, y


def check(metrics, expected, rtol=1e-12):
    assert set(metrics) == set(_score.KEYS)
    assert metrics["rows"] == expected["rows"]
    for key in ("cross_entropy", "perplexity", "accuracy", "top5_accuracy", "ece"):
        np.testing.assert_allclose(metrics[key], expected[key], rtol=rtol, err_msg=key)


@pytest.mark.parametrize("shape", [(700,), (7, 100)], ids=["2-D", "N-D"])
def test_metrics_equal_a_whole_array_computation(rng, shape):
    x, y = problem(rng, shape)
    check(_score.score(x, y, progress=False), expected_metrics(x, y), rtol=1e-6)  # float32 logits' lse
    x64 = x.astype(np.float64)
    check(_score.score(x64, y, progress=False), expected_metrics(x64, y))


def test_the_result_does_not_depend_on_the_chunking(rng, monkeypatch):
    monkeypatch.setattr(_score, "BLOCK_ROWS", 64)  # blocks that chunks cut in every way
    x, y = problem(rng, (1000,))
    results = [_score.score(x, y, chunk_rows=chunk, progress=False) for chunk in (1, 7, 64, 100, 333, 5000)]
    for other in results[1:]:
        assert other == results[0]  # bit for bit: the same sums in the same order


def test_16bit_logits(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for dtype in (np.float16, ml_dtypes.bfloat16):
        x, y = problem(rng, dtype=np.float32)
        x16 = x.astype(dtype)
        check(_score.score(x16, y, progress=False), expected_metrics(x16.astype(np.float64), y), rtol=1e-5)


def test_all_rows_ignored(rng):
    x, y = problem(rng, (20,))
    y[:] = -100
    metrics = _score.score(x, y, progress=False)
    assert metrics["rows"] == 0 and np.isnan(metrics["cross_entropy"])


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "fastxent", "score", *args], capture_output=True, text=True, timeout=timeout
    )


def test_the_command_streams_a_memory_map_and_writes_json(rng, tmp_path):
    x, y = problem(rng, (3000,))
    np.save(tmp_path / "logits.npy", x)
    np.save(tmp_path / "labels.npy", y)
    out = tmp_path / "metrics.json"
    result = run_cli(
        str(tmp_path / "logits.npy"), str(tmp_path / "labels.npy"), "--chunk-rows", "256", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    assert list(record) == list(_score.KEYS)
    check(record, expected_metrics(x, y), rtol=1e-6)
    printed = dict(line.split() for line in result.stdout.strip().splitlines())
    assert list(printed) == list(_score.KEYS)
    assert float(printed["cross_entropy"]) == pytest.approx(record["cross_entropy"], rel=1e-9)


@pytest.fixture
def files(rng, tmp_path):
    x, y = problem(rng, (50,), n_classes=10)
    paths = {}
    for name, array in {
        "logits": x,
        "labels": y,
        "short_labels": y[:40],
        "bad_label": np.where(np.arange(50) == 17, 12, y),
        "int_logits": x.astype(np.int32),
        "float_labels": y.astype(np.float32),
    }.items():
        paths[name] = str(tmp_path / f"{name}.npy")
        np.save(paths[name], array)
    paths["text"] = str(tmp_path / "notes.npy")
    with open(paths["text"], "w") as f:
        f.write("not an array")
    return paths


@pytest.mark.parametrize(
    ("logits", "labels", "message"),
    [
        ("missing", "labels", "logits file not found"),
        ("logits", "short_labels", "labels have shape (40,) but the logits (50, 10) need (50,)"),
        ("logits", "bad_label", "label out of range at row 17: 12"),
        ("int_logits", "labels", "logits must be floating"),
        ("logits", "float_labels", "labels must be integer"),
        ("text", "labels", "is not a .npy array file"),
    ],
)
def test_bad_input_is_one_clear_line(files, tmp_path, logits, labels, message):
    path = files.get(logits, str(tmp_path / "missing.npy"))
    result = run_cli(path, files[labels], timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
    assert result.stdout == ""


def test_bad_arguments_are_usage_errors(files, tmp_path):
    for extra in (["--chunk-rows", "0"], ["--json", str(tmp_path / "missing" / "m.json")]):
        result = run_cli(files["logits"], files["labels"], *extra, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, extra
        assert result.stderr.startswith("usage: fastxent score")
    assert not os.path.exists(tmp_path / "missing")


def test_zarr_arrays(rng, tmp_path):
    """LOGITS and LABELS as Zarr arrays (directories), read chunk by chunk."""
    zarr = pytest.importorskip("zarr")
    x, y = problem(rng, (500,))
    logits = zarr.open(str(tmp_path / "logits.zarr"), mode="w", shape=x.shape, chunks=(128, x.shape[1]), dtype="f4")
    logits[:] = x
    labels = zarr.open(str(tmp_path / "labels.zarr"), mode="w", shape=y.shape, chunks=(128,), dtype="i8")
    labels[:] = y
    out = tmp_path / "m.json"
    result = run_cli(
        str(tmp_path / "logits.zarr"), str(tmp_path / "labels.zarr"), "--chunk-rows", "100", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == _score.score(x, y, chunk_rows=100, progress=False)


def test_without_numba_numpy_computes_the_same(rng, monkeypatch):
    """The per-row numbers (lse, target logit, rank with first-index ties, max) from the
    numba kernel and from the NumPy fallback agree."""
    from fastxent import _dispatch

    if "numba" not in _dispatch.KERNELS:
        pytest.skip("needs numba for the comparison")
    x, y = problem(rng, (300,))
    keep = y != -100
    with_numba = _score._row_numbers(x[keep], y[keep])
    monkeypatch.setattr(_dispatch, "KERNELS", {k: v for k, v in _dispatch.KERNELS.items() if k != "numba"})
    without = _score._row_numbers(x[keep], y[keep])
    np.testing.assert_array_equal(with_numba[:, 1:], without[:, 1:])
    np.testing.assert_allclose(with_numba[:, 0], without[:, 0], rtol=1e-6)
