"""reference.load(path).loss_and_grads(ids): the mean next-token cross-entropy and the gradient of every parameter,
keyed by the checkpoint's tensor names, against torch autograd through transformers in float64
(tests/data/grads/, written by scripts/make_grad_golden.py), and against finite differences of the loss itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from candlewick import reference

DATA = Path(__file__).resolve().parent / "data"
FIXTURES = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "qwen3-tiny", "mistral-sw-tiny", "smollm3-tiny",
            "llama3-rope-tiny"]


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    return request.param, reference.load(DATA / request.param), dict(np.load(DATA / "grads" / f"{request.param}.npz"))


def test_gradients_equal_torch_autograd(fixture):
    """Every parameter's gradient within 1e-12 of torch's, relative to that gradient's largest entry (measured:
    3e-14 at most), and the loss within 1e-12; the same names as the checkpoint's tensors."""
    name, model, golden = fixture
    loss, grads = model.loss_and_grads(golden["ids"])
    assert loss == pytest.approx(float(golden["loss"]), abs=1e-12)
    want = {k.removeprefix("grad:") for k in golden if k.startswith("grad:")}
    assert set(grads) == want == set(model.tensors), name
    for k, g in grads.items():
        assert g.shape == model.tensors[k].shape, k
        got = g.reshape(-1)[golden[f"index:{k}"]] if f"index:{k}" in golden else g
        ref = golden[f"grad:{k}"]
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300)
        assert err < 1e-12, f"{name} {k}: relative error {err:.2e}"


def test_loss_is_the_mean_token_nll(fixture):
    name, model, golden = fixture
    ids = golden["ids"]
    loss, _ = model.loss_and_grads(ids)
    assert loss == pytest.approx(float(model.token_nll(ids).mean()), abs=1e-12)


def test_gradients_match_finite_differences(fixture):
    """Along a random direction u of each tensor, (L(θ + hu) - L(θ - hu)) / 2h against Σ ∂L/∂θ · u (five-point
    stencil, h = 1e-4): relative error at most 1e-6."""
    name, model, golden = fixture
    ids = golden["ids"][:8]
    _, grads = model.loss_and_grads(ids)
    rng, h = np.random.default_rng(0), 1e-4
    for k in sorted(model.tensors)[::3]:
        w, u = model.tensors[k], rng.normal(size=model.tensors[k].shape)
        at = {}
        for step in (-2, -1, 1, 2):
            w += step * h * u
            at[step] = model.loss_and_grads(ids)[0]
            w -= step * h * u
        numeric = (8 * (at[1] - at[-1]) - (at[2] - at[-2])) / (12 * h)
        analytic = float((grads[k] * u).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), 1e-3), (name, k, numeric, analytic)


def test_a_batch_is_the_mean_over_its_rows():
    model = reference.load(DATA / "llama-tiny")
    rows = np.array([[0, 5, 9, 11, 3], [0, 7, 7, 2, 8]])
    loss, grads = model.loss_and_grads(rows)
    (l0, g0), (l1, g1) = model.loss_and_grads(rows[0]), model.loss_and_grads(rows[1])
    assert loss == pytest.approx((l0 + l1) / 2, abs=1e-12)
    np.testing.assert_allclose(grads["lm_head.weight"], (g0["lm_head.weight"] + g1["lm_head.weight"]) / 2,
                               rtol=0, atol=1e-14)


def test_tensors_and_params_are_the_same_arrays():
    """An optimizer changes model.tensors in place; the forward pass must see it."""
    model = reference.load(DATA / "qwen2-tiny")
    ids = model.tokenizer.encode("The candle burns")
    before = model.logits(ids)
    model.tensors["model.norm.weight"] *= 2.0
    assert not np.allclose(model.logits(ids), before)


def test_refusals():
    model = reference.load(DATA / "llama-tiny")
    with pytest.raises(ValueError, match="two tokens"):
        model.loss_and_grads([5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.loss_and_grads([5, 99999])
    with pytest.raises(NotImplementedError, match="no backward pass"):
        reference.load(DATA / "phi3-tiny").loss_and_grads([1, 2, 3])
