"""The sdist carries everything an install from it needs: every module of the package, the
extension's sources and headers (kernels/), py.typed, the semantics spec and the tests.
(.ci/run also installs the sdist built by `python -m build` into a fresh venv, builds the
extension from it, and runs the suite from outside the checkout.)"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "setup.py").exists() or not (ROOT / "fastxent").is_dir(),
    reason="run from a checkout (the tests of an installed package have no setup.py beside them)",
)


def test_sdist_contains_the_package_the_kernels_and_py_typed(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, FASTXENT_BUILD_EXT="0"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (sdist,) = tmp_path.glob("fastxent-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    expected = {f"fastxent/{p.name}" for p in (ROOT / "fastxent").glob("*.py")}
    expected |= {f"kernels/{p.name}" for p in (ROOT / "kernels").glob("*.pyx")}
    expected |= {f"kernels/{p.name}" for p in (ROOT / "kernels").glob("*.h")}
    expected |= {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")}
    expected |= {"fastxent/py.typed", "docs/SEMANTICS.md", "pyproject.toml", "setup.py", "README.md"}
    assert not expected - names, f"missing from the sdist: {sorted(expected - names)}"
    assert not any(name.endswith(".so") for name in names)  # no build products
