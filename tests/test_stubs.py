"""python/candlewick/_native.pyi describes the built extension: mypy's stubtest imports candlewick._native and
compares every name, signature and default with the stub. No allowlist: a binding added, removed or changed in
rust/src/py/ must be written into the stub too."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy.stubtest", reason="mypy is a test dependency (pip install -e .[test])")


def test_native_stub_matches_the_extension(tmp_path):
    import candlewick._native  # noqa: F401  (a missing build fails here, clearly, rather than inside stubtest)

    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "candlewick._native"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "mypy-cache")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
