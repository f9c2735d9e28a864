"""One name, one meaning: every function of candlewick.ops (the engine, float32) is also a function of
candlewick.reference.functional (the oracle, float64) with the same parameters, and the two agree on random
input. docs/ops.md lists them; a new name in candlewick.ops needs a case below and a row there.

tests/test_ops.py is the thorough comparison (Hypothesis, 1e-5); this one is about the names: each shared name is
called in both modules, with the same arguments, and compared within 1e-4."""
from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from candlewick import ops
from candlewick.reference import functional as F

TOL = 1e-4
DOC = Path(__file__).resolve().parent.parent / "docs" / "ops.md"


def f32(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# name -> cases: each case takes (module, rng) and returns what the module's function gives on the case's input.
# The rng is seeded the same for both modules, so both see the same input.
CASES: dict[str, list[Callable]] = {
    "softmax": [
        lambda m, rng: m.softmax(f32(rng, 3, 4, 7, scale=5)),
        lambda m, rng: m.softmax(f32(rng, 3, 4, 7, scale=5), axis=1),
        lambda m, rng: m.softmax(f32(rng, 5, 6), 0),
    ],
    "log_softmax": [
        lambda m, rng: m.log_softmax(f32(rng, 3, 4, 7, scale=5)),
        lambda m, rng: m.log_softmax(f32(rng, 3, 4, 7, scale=5), axis=-3),
    ],
    "causal_mask": [
        lambda m, rng: m.causal_mask(5, 5),
        lambda m, rng: m.causal_mask(2, 7),   # decoding with a cache: the last 2 of 7 positions
        lambda m, rng: m.causal_mask(1, 4),
        lambda m, rng: m.causal_mask(0, 3),
    ],
    "attention": [
        lambda m, rng: m.attention(f32(rng, 2, 4, 5, 8), f32(rng, 2, 2, 5, 8), f32(rng, 2, 2, 5, 8)),
        lambda m, rng: m.attention(f32(rng, 1, 2, 3, 8), f32(rng, 1, 2, 6, 8), f32(rng, 1, 2, 6, 8), causal=True,
                                   scale=0.3),
        lambda m, rng: m.attention(f32(rng, 2, 2, 4, 8), f32(rng, 2, 1, 6, 8), f32(rng, 2, 1, 6, 8), causal=False,
                                   mask=np.arange(6)[None, None, None, :] < np.array([6, 3])[:, None, None, None]),
        lambda m, rng: m.attention(f32(rng, 1, 2, 4, 8), f32(rng, 1, 2, 4, 8), f32(rng, 1, 2, 4, 8),
                                   mask=f32(rng, 1, 1, 4, 4)),
    ],
    "cross_entropy": [
        lambda m, rng: m.cross_entropy(f32(rng, 6, 11, scale=3), rng.integers(0, 11, 6)),
        lambda m, rng: m.cross_entropy(f32(rng, 2, 3, 11, scale=3), np.array([[1, -100, 4], [0, 10, -100]]),
                                       reduction="none"),
        lambda m, rng: m.cross_entropy(f32(rng, 4, 11), np.array([3, 7, 7, 1]), ignore_index=7, reduction="sum"),
    ],
    "layer_norm": [
        lambda m, rng: m.layer_norm(f32(rng, 3, 5, 16, scale=4), f32(rng, 16), f32(rng, 16)),
        lambda m, rng: m.layer_norm(f32(rng, 4, 16), None, None, eps=1e-3),
    ],
    "rms_norm": [
        lambda m, rng: m.rms_norm(f32(rng, 3, 5, 16, scale=4), f32(rng, 16)),
        lambda m, rng: m.rms_norm(f32(rng, 4, 16), None, eps=1e-5),
    ],
    "gelu": [
        lambda m, rng: m.gelu(f32(rng, 4, 33, scale=3)),
        lambda m, rng: m.gelu(f32(rng, 4, 33, scale=3), approximate="tanh"),
        lambda m, rng: m.gelu(f32(rng, 4, 33, scale=3), "none"),
    ],
    "silu": [
        lambda m, rng: m.silu(f32(rng, 5, 19, scale=4)),
    ],
    "rope": [
        lambda m, rng: m.rope(f32(rng, 2, 3, 6, 8), np.arange(6)),
        lambda m, rng: m.rope(f32(rng, 2, 3, 4, 16), np.array([[0, 1, 2, 3], [5, 6, 7, 8]]), theta=500.0),
        lambda m, rng: m.rope(f32(rng, 1, 2, 5, 16), np.arange(10, 15), theta=5e5,
                              scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        lambda m, rng: m.rope(f32(rng, 3, 4, 8), np.arange(4), scaling={"rope_type": "linear", "factor": 2.0}),
    ],
}


def test_every_engine_op_has_a_reference_twin_and_a_case():
    missing = [n for n in ops.__all__ if not callable(getattr(F, n, None))]
    assert not missing, f"candlewick.ops names with no function of that name in reference.functional: {missing}"
    assert sorted(CASES) == sorted(ops.__all__), "every name of candlewick.ops needs its cases here"


@pytest.mark.parametrize("name", ops.__all__)
def test_same_parameters(name):
    """Same parameter names, kinds and defaults, so that one call reads the same against either module."""
    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(getattr(ops, name)) == params(getattr(F, name))


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_values(name):
    for i, case in enumerate(CASES[name]):
        got = case(ops, np.random.default_rng(i))
        want = case(F, np.random.default_rng(i))
        if isinstance(want, float):  # a reduced loss
            assert isinstance(got, float)
            assert got == pytest.approx(want, rel=TOL, abs=TOL), (name, i)
            continue
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape, (name, i)
        if want.dtype == np.bool_:
            assert got.dtype == np.bool_ and np.array_equal(got, want), (name, i)
        else:
            assert got.dtype == np.float32, (name, i)
            np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL, err_msg=f"{name} case {i}")


def test_docs_table_lists_every_shared_name():
    rows = re.findall(r"^\| `([a-z_]+)` \|", DOC.read_text(encoding="utf-8"), re.M)
    assert set(ops.__all__) <= set(rows), sorted(set(ops.__all__) - set(rows))
