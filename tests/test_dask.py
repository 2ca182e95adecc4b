"""fastxent.dask on a distributed.LocalCluster of 2 worker processes: the loss of logits
chunked by rows, by classes (merged in a tree) or both equals the single-machine result to
1e-12 relative in float64, for every option and reduction; score equals `fastxent score`;
`fastxent score --scheduler` runs on the cluster with each worker reading its rows."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import fastxent as fx

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
fxd = pytest.importorskip("fastxent.dask")
from fastxent import _score  # noqa: E402

N, C = 240, 130
OPTIONS = {
    "plain": {},
    "all": {"weight": "random", "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0, "logit_scale": 1.2},
}


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((N, C)) * 3
    y = rng.integers(0, C, N)
    y[::7] = -100
    return x, y, rng.random(C) + 0.5


@pytest.mark.parametrize("chunks", [(60, -1), (-1, 30), (50, 40)], ids=["rows", "classes", "both"])
@pytest.mark.parametrize("option_set", list(OPTIONS))
def test_equals_the_single_machine_loss(client, problem, chunks, option_set):
    x, y, w = problem
    options = dict(OPTIONS[option_set])
    if options.get("weight") == "random":
        options["weight"] = w
    logits = da.from_array(x, chunks=chunks)
    for reduction in ("mean", "sum", "none"):
        lazy = fxd.cross_entropy(logits, y, reduction=reduction, split_every=2, **options)
        assert isinstance(lazy, da.Array)  # lazy until computed
        got = lazy.compute()
        expected = fx.cross_entropy(x, y, reduction=reduction, **options)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0, err_msg=f"{chunks} {reduction}")


def test_the_merged_statistics_are_the_whole_rows(client, problem):
    x, y, _ = problem
    # (with smoothing: without it the smoothing sums are not computed, and only the merge's
    # rebase terms A_k (m - m_k) add up in that column, which nothing then reads)
    stats = fxd.row_statistics(da.from_array(x, chunks=(80, 26)), y, split_every=3, label_smoothing=0.1).compute()
    whole = fx.row_stats(x, y, label_smoothing=0.1).data
    np.testing.assert_allclose(fx.RowStats.from_array(stats, C).lse, fx.logsumexp(x), rtol=1e-14)
    np.testing.assert_allclose(stats[:, 2:], whole[:, 2:], rtol=1e-13)


def test_score_equals_the_streamed_score(client, problem):
    x, y, _ = problem
    got = fxd.score(da.from_array(x, chunks=(50, 40)), y)
    expected = _score.score(x, y, progress=False)
    assert got["rows"] == expected["rows"]
    for key in ("cross_entropy", "perplexity", "accuracy", "top5_accuracy", "ece"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key


def test_bad_target_is_a_clear_error(problem):
    x, y, _ = problem
    with pytest.raises(ValueError, match=r"target must have shape \(240,\)"):
        fxd.cross_entropy(da.from_array(x, chunks=(60, -1)), y[:10])


def test_the_command_on_a_cluster(client, problem, tmp_path):
    x, y, _ = problem
    np.save(tmp_path / "logits.npy", x.astype(np.float32))
    np.save(tmp_path / "labels.npy", y)
    out = tmp_path / "m.json"
    address = client.scheduler.address
    result = subprocess.run(
        [sys.executable, "-m", "fastxent", "score", str(tmp_path / "logits.npy"), str(tmp_path / "labels.npy"),
         "--chunk-rows", "64", "--scheduler", address, "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads(out.read_text())
    expected = _score.score(x.astype(np.float32), y, progress=False)
    assert record["rows"] == expected["rows"]
    for key in ("cross_entropy", "accuracy", "top5_accuracy", "ece"):
        assert record[key] == pytest.approx(expected[key], rel=1e-12), key


def _threads_in_a_task(_block):
    """What a block's kernel would run on, seen from inside a Dask task."""
    with fxd._one_thread_per_task():
        inside = fx.get_num_threads()
    return np.array([inside, fx.get_num_threads()])


def test_a_task_runs_its_kernel_on_one_thread(client):
    """Dask runs blocks side by side: inside a task (a worker process's thread, or the threaded
    scheduler's pool thread) the kernel uses one thread, and the count is restored after; on
    the main thread (the synchronous scheduler) nothing changes."""
    blocks = da.zeros((4, 1), chunks=(1, 1))
    on_workers = blocks.map_blocks(lambda b: _threads_in_a_task(b)[None, :], chunks=(1, 2)).compute()
    assert (on_workers[:, 0] == 1).all()
    assert (on_workers[:, 1] == on_workers[:, 1].max()).all()  # restored: the worker's own count
    threaded = blocks.map_blocks(lambda b: _threads_in_a_task(b)[None, :], chunks=(1, 2)).compute(scheduler="threads")
    assert (threaded[:, 0] == 1).all()
    before = fx.get_num_threads()
    inside, after = _threads_in_a_task(None)
    assert inside == before and after == before  # main thread, main process: untouched
