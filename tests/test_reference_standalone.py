"""candlewick.reference stands alone: it imports, loads a checkpoint and computes logits where candlewick._native
cannot be imported (not built, or another platform), and it imports none of the engine's modules.

Each check runs in a fresh interpreter whose import system refuses candlewick._native (a sys.meta_path finder,
the first one asked), so an import of the extension anywhere on the way fails the test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"

BLOCK_NATIVE = textwrap.dedent("""
    import sys

    class RefuseNative:
        def find_spec(self, name, path=None, target=None):
            if name == "candlewick._native":
                raise ModuleNotFoundError(f"{name} is blocked by the test", name=name)
            return None

    sys.meta_path.insert(0, RefuseNative())
""")

# The engine side: the extension, and the modules that wrap it or serve it.
ENGINE_MODULES = ["candlewick._native", "candlewick.model", "candlewick.tokenizer", "candlewick.ops",
                  "candlewick.cli", "candlewick.server", "candlewick.hub"]


def run_blocked(code: str) -> dict:
    """Run `code` (which prints one JSON line last) with candlewick._native unimportable; returns that JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BLOCK_NATIVE + textwrap.dedent(code)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_reference_runs_without_the_native_extension():
    out = run_blocked(f"""
        import json
        import numpy as np

        import candlewick.reference as ref
        from candlewick.reference import functional as F

        model = ref.load({str(DATA / "llama-tiny")!r})
        z = np.load({str(DATA / "llama-tiny" / "reference.npz")!r})
        ids = [int(t) for t in z["prompt0_ids"]]
        assert model.tokenizer.encode(model.tokenizer.decode(ids)) == ids
        logits = model.logits(ids)
        case = json.load(open({str(DATA / "llama-tiny" / "chat_reference.json")!r}, encoding="utf-8"))[0]
        chat = model.tokenizer.apply_chat_template(case["messages"], case["add_generation_prompt"])
        try:
            import candlewick._native  # noqa: F401
            blocked = False
        except ImportError:
            blocked = True
        print(json.dumps({{
            "blocked": blocked,
            "shape": list(logits.shape),
            "want_shape": [len(ids), model.config.vocab_size],
            "error": float(np.abs(logits - z["prompt0_logits"]).max()),
            "softmax_sums_to_one": bool(np.allclose(F.softmax(logits).sum(-1), 1.0)),
            "chat_as_transformers": chat == case["rendered"],
            "loaded": sorted(m for m in sys.modules if m == "candlewick" or m.startswith("candlewick.")),
        }}))
    """)
    assert out["blocked"]
    assert out["shape"] == out["want_shape"]
    assert out["error"] < 1e-6  # the reference's own bound against the float64 fixtures
    assert out["softmax_sums_to_one"]
    assert out["chat_as_transformers"]
    loaded = set(out["loaded"])
    assert "candlewick.reference" in loaded
    assert not loaded & set(ENGINE_MODULES), sorted(loaded & set(ENGINE_MODULES))


def test_package_imports_lazily_and_keeps_its_error_classes():
    """`import candlewick` alone does not load the extension; the error classes are there without it; an engine
    name fails with the ImportError of the missing extension, not an AttributeError."""
    out = run_blocked("""
        import json

        import candlewick
        import candlewick.errors

        same = candlewick.CandlewickError is candlewick.errors.CandlewickError
        subclass = issubclass(candlewick.TokenizerError, ValueError)
        try:
            candlewick.load
            failure = None
        except ImportError as e:
            failure = type(e).__name__ + ": " + str(e)
        print(json.dumps({"same": same, "subclass": subclass, "failure": failure,
                          "native_loaded": "candlewick._native" in sys.modules}))
    """)
    assert out["same"] and out["subclass"] and not out["native_loaded"]
    assert out["failure"] is not None and "_native" in out["failure"]

