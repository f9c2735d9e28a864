"""Every input the fuzzer (scripts/fuzz.py) ever flagged, in tests/data/fuzz/TARGET/, now fails cleanly: a
CandlewickError that is not an internal one, or it loads. Each target's files run in a fresh interpreter, so
that an abort would fail this test rather than the suite."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "tests" / "data" / "fuzz"

RUN = """
import json, sys
sys.path.insert(0, sys.argv[1])
import fuzz
work = fuzz.workdir()
bad = []
for path in sys.argv[3:]:
    try:
        fuzz.run_one(sys.argv[2], open(path, "rb").read(), work)
    except Exception as e:
        bad.append([path, f"{type(e).__name__}: {e}"])
print(json.dumps(bad))
"""

TARGETS = sorted(p.name for p in CORPUS.iterdir() if p.is_dir() and any(p.iterdir())) if CORPUS.is_dir() else []


def test_the_corpus_has_findings():
    """The fuzzer found these (tests/data/fuzz/README.md says what each was); the test below keeps them fixed."""
    assert TARGETS, "tests/data/fuzz/ is empty"


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_findings_fail_cleanly(target):
    files = sorted(str(f) for f in (CORPUS / target).iterdir() if f.is_file() and f.name != "README.md")
    p = subprocess.run([sys.executable, "-c", RUN, str(ROOT / "scripts"), target, *files], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1]) == []
