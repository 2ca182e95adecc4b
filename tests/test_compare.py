"""`fastxent bench --compare MODULE:FUNCTION`: a user's loss+grad timed beside fastxent when it
is right, reported as wrong (never timed) when it is not, a usage error when it does not load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastxent import __main__ as cli
from fastxent import _bench, _compare

USER_MODULE = textwrap.dedent(
    """
    import numpy as np

    def good(logits, labels):
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(len(labels))
        grad = e / s
        grad[rows, labels] -= 1
        return np.mean(np.log(s[:, 0]) - z[rows, labels]), grad / len(labels)

    def wrong_gradient(logits, labels):
        loss, grad = good(logits, labels)
        return loss, grad * 2

    def raises(logits, labels):
        raise RuntimeError("not implemented")

    class Kernels:
        @staticmethod
        def xent(logits, labels):
            return good(logits, labels)

    not_callable = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_xent.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_xent", None)
    yield tmp_path
    sys.modules.pop("my_xent", None)


def _data(n=40, c=30, dtype=np.float32):
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, c)).astype(dtype), rng.integers(0, c, n)


def test_a_right_function_is_timed_and_wrong_ones_are_reported(user_module):
    x, y = _data()
    users = [_compare.load(f"my_xent:{name}") for name in ("good", "wrong_gradient", "raises", "Kernels.xent")]
    notes: list[str] = []
    found = _bench._contenders(x, y, 1, notes, False, torch_compile=False, compare=users)
    names = {c.name for c in found}
    assert {"compare my_xent:good", "compare my_xent:Kernels.xent"} <= names
    assert not names & {"compare my_xent:wrong_gradient", "compare my_xent:raises"}
    assert any("my_xent:wrong_gradient" in n and "WRONG" in n and "gradient max error" in n for n in notes)
    assert any("my_xent:raises" in n and "RuntimeError: not implemented" in n for n in notes)
    timed = next(c for c in found if c.name == "compare my_xent:good")
    assert timed.kind == "fwd+bwd"
    loss, grad = timed.run()  # on the whole of x, not the checked rows
    import fastxent as fx

    ref_loss, ref_grad = fx.cross_entropy_with_grad(x, y)
    assert grad.shape == x.shape
    np.testing.assert_allclose(grad, ref_grad, atol=1e-7)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)


def test_float64_tolerance_catches_a_float32_result(user_module):
    """A function that rounds to float32 is wrong at float64's tolerance."""
    x, y = _data(dtype=np.float64)
    (tmp := user_module / "rounded.py").write_text(
        "import my_xent\n"
        "def f(logits, labels):\n"
        "    loss, grad = my_xent.good(logits.astype('float32'), labels)\n"
        "    return loss, grad\n"
    )
    assert tmp.exists()
    assert _compare.check(_compare.load("rounded:f"), x, y) is not None
    assert _compare.check(_compare.load("my_xent:good"), x, y) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("my_xent", "expected MODULE:FUNCTION"),
        ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
        ("my_xent:missing", "has no missing"),
        ("my_xent:not_callable", "not callable"),
    ],
)
def test_a_spec_that_does_not_load_is_a_usage_error(user_module, capsys, monkeypatch, spec, message):
    monkeypatch.setattr(_bench, "run", pytest.fail)  # must not be reached
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", "--compare", spec])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert message in err.splitlines()[-1] and "Traceback" not in err


def test_the_command_times_the_users_function(user_module, tmp_path):
    record = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(
        [sys.executable, "-m", "fastxent", "bench", "--shapes", "64x100", "--repeat", "1", "--no-compile",
         "--compare", "my_xent:good", "--compare", "my_xent:wrong_gradient", "--json", str(record)],
        capture_output=True, text=True, timeout=600, env=env, cwd=user_module,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "compare my_xent:good" in done.stdout
    assert "my_xent:wrong_gradient not timed on 64x100: WRONG" in done.stdout  # the table's notes
    assert "my_xent:wrong_gradient" in done.stderr  # and at once on stderr
    rows = json.loads(record.read_text())["rows"]
    good = next(r for r in rows if r["name"] == "compare my_xent:good")
    assert good["median_ms"] > 0 and good["x_floor"] is not None
