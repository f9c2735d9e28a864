"""candlewick.reference.train: AdamW against a hand computation and against torch.optim.AdamW (tests/data/grads/
adamw.npz, scripts/make_grad_golden.py), the learning-rate schedule, clipping, batches, and a whole seeded run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from candlewick import reference
from candlewick.reference import train as T

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parent.parent


def test_one_adamw_step_by_hand():
    """Step 1, θ = 1.0 and -2.0 (a matrix, decayed) and b = 0.5 (a vector, not decayed), g = 0.5, -1.0 and 2.0,
    lr 0.1, λ 0.1, β = (0.9, 0.999), ε = 1e-8:
    m = 0.1 g, v = 0.001 g², so m̂ = g and v̂ = g²: the step is lr · g / (|g| + ε), lr times the sign of g;
    θ ← θ (1 - lr λ) - lr g / (|g| + ε): 1.0 · 0.99 - 0.1 · 0.5 / 0.50000001 = 0.89000000200 ...
    Step 2 with g = 0.25 for the first weight: m = 0.9 · 0.05 + 0.1 · 0.25 = 0.07, v = 0.999 · 0.00025 + 0.001 ·
    0.0625 = 0.00031225; m̂ = 0.07 / 0.19, v̂ = 0.00031225 / 0.001999."""
    w, b = np.array([[1.0, -2.0]]), np.array([0.5])
    opt = T.AdamW({"w": w, "b": b}, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    opt.step({"w": np.array([[0.5, -1.0]]), "b": np.array([2.0])}, lr=0.1)
    assert w[0, 0] == pytest.approx(1.0 * 0.99 - 0.1 * 0.5 / (0.5 + 1e-8), abs=1e-15)
    assert w[0, 1] == pytest.approx(-2.0 * 0.99 + 0.1 * 1.0 / (1.0 + 1e-8), abs=1e-15)
    assert b[0] == pytest.approx(0.5 - 0.1 * 2.0 / (2.0 + 1e-8), abs=1e-15)     # no decay on a vector
    before = w[0, 0]
    opt.step({"w": np.array([[0.25, 0.0]]), "b": np.array([0.0])}, lr=0.05)
    m_hat, v_hat = 0.07 / (1 - 0.9**2), 0.00031225 / (1 - 0.999**2)
    assert w[0, 0] == pytest.approx(before * (1 - 0.05 * 0.1) - 0.05 * m_hat / (math.sqrt(v_hat) + 1e-8), abs=1e-15)


def test_adamw_and_clipping_equal_torch():
    """Three steps with warm-up learning rates and clipping to norm 1, against torch.optim.AdamW and
    torch.nn.utils.clip_grad_norm_ in float64."""
    z = np.load(DATA / "grads" / "adamw.npz")
    w, b = z["w0"].copy(), z["b0"].copy()
    opt = T.AdamW({"w": w, "b": b}, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(3):
        grads = {"w": z["gw"][step].copy(), "b": z["gb"][step].copy()}
        assert T.clip_grad_norm(grads, 1.0) == pytest.approx(z["norms"][step], rel=1e-14)
        assert T.lr_at(step, lr=0.01, min_lr=0.001, warmup=3, steps=10) == pytest.approx(z["lr"][step], rel=1e-15)
        opt.step(grads, z["lr"][step])
    np.testing.assert_allclose(w, z["w"], rtol=0, atol=1e-15)
    np.testing.assert_allclose(b, z["b"], rtol=0, atol=1e-15)


def test_learning_rate_schedule():
    lr = [T.lr_at(s, lr=1.0, min_lr=0.1, warmup=4, steps=14) for s in range(14)]
    assert lr[:4] == [0.25, 0.5, 0.75, 1.0]                  # linear warm-up
    assert lr[4] == 1.0 and lr[13] == pytest.approx(0.1)     # the cosine from the peak to min_lr at the last step
    assert lr[8] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 4 / 9)), rel=1e-15)  # p = 4/9 of the way
    assert all(a >= b for a, b in zip(lr[4:], lr[5:]))


def test_clip_grad_norm():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    assert T.clip_grad_norm(grads, 10.0) == 5.0 and grads["a"][0] == 3.0      # under the limit: unchanged
    assert T.clip_grad_norm(grads, 1.0) == 5.0
    assert math.hypot(grads["a"][0], grads["b"][0, 0]) == pytest.approx(1.0, abs=1e-6)


def test_batches_are_seeded_windows():
    ids = np.arange(100)
    a = T.sample_batch(ids, 4, 8, np.random.default_rng(3))
    b = T.sample_batch(ids, 4, 8, np.random.default_rng(3))
    assert a.shape == (4, 9) and np.array_equal(a, b)
    assert np.all(np.diff(a, axis=1) == 1)                   # consecutive tokens
    w = T.eval_windows(ids, 8)
    assert w.shape == (12, 9) and np.array_equal(w[:, 0], np.arange(0, 96, 8))   # every token but one predicted once
    train, val = T.split_train_val(ids, 0.1)
    assert list(val) == list(range(90, 100)) and len(train) == 90


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A Llama of 36k parameters trained from scratch for 200 seeded steps on 40 kB of Genesis, by the
    command line (tokenizer, config, weights, metrics, plot)."""
    from candlewick.cli import main

    text = tmp_path_factory.mktemp("text") / "small.txt"
    text.write_text((ROOT / "demo" / "genesis.txt").read_text(encoding="utf-8")[:40000], encoding="utf-8")
    out = tmp_path_factory.mktemp("run") / "tiny"
    args = ["train", str(out), "--data", str(text), "--arch", "llama", "--steps", "200", "--seed", "0",
            "--vocab-size", "384", "--dim", "32", "--layers", "2", "--heads", "2", "--context", "32"]
    assert main(args) == 0
    return out, text, args


def test_200_seeded_steps_lower_the_validation_loss(tiny_run):
    """From ln 384 ≈ 5.95 (a uniform guess) the held-out loss must fall by at least 1.5 nats (measured: 5.96 ->
    4.06); the training loss falls too."""
    from candlewick.train_cli import read_metrics

    out, _, _ = tiny_run
    rows = read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(201))
    val = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    assert val[0] == pytest.approx(math.log(384), abs=0.05)
    assert val[0] - val[-1] >= 1.5, val
    train = [r["train_loss"] for r in rows[1:]]
    assert np.mean(train[-20:]) < np.mean(train[:20]) - 1.0
    summary = json.loads((out / "training.json").read_text())
    assert summary["val_loss_after"] == pytest.approx(val[-1], abs=1e-6) and summary["parameters"] == 36000
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_seed_gives_the_same_run(tiny_run, tmp_path):
    from candlewick.cli import main

    _, _, args = tiny_run
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run = list(args)
        run[1], run[run.index("--steps") + 1], run[run.index("--seed") + 1] = str(tmp_path / name), "20", seed
        assert main(run) == 0
        runs[name] = [(tmp_path / name / f).read_bytes() for f in ("metrics.csv", "model.safetensors")]
    assert runs["a"] == runs["b"] and runs["a"][0] != runs["c"][0]


def test_the_checkpoint_loads_in_the_engine_and_the_reference(tiny_run):
    """The folder is a Hugging Face checkpoint: the float32 engine's logits equal the float64 reference's within
    1e-4, and the tokenizers agree."""
    import candlewick as cw

    out, text, _ = tiny_run
    engine, ref = cw.load(out), reference.load(out)
    sample = text.read_text(encoding="utf-8")[1000:1200]
    ids = engine.tokenizer.encode(sample)
    assert ids == ref.tokenizer.encode(sample) and engine.tokenizer.decode(ids) == sample
    assert len(ids) <= 32 or (ids := ids[:32])
    assert np.abs(engine.logits(ids) - ref.logits(ids)).max() < 1e-4
    assert engine.generate("And God", max_new_tokens=8, temperature=0).choices[0].token_ids == \
        ref.generate(engine.tokenizer.encode("And God"), max_new_tokens=8, temperature=0)


def test_fine_tuning_starts_from_the_checkpoint(tiny_run, tmp_path):
    """--from continues from the trained weights: its validation loss starts where the first run ended (same
    held-out tail), and a few steps on the text lower it further."""
    from candlewick.cli import main
    from candlewick.train_cli import read_metrics

    out, text, _ = tiny_run
    tuned = tmp_path / "tuned"
    assert main(["train", str(tuned), "--from", str(out), "--data", str(text), "--steps", "30", "--seed", "1",
                 "--eval-every", "30", "--lr", "1e-3"]) == 0
    first, again = read_metrics(out / "metrics.csv"), read_metrics(tuned / "metrics.csv")
    assert again[0]["val_loss"] == pytest.approx(first[-1]["val_loss"], abs=1e-5)
    assert again[-1]["val_loss"] < again[0]["val_loss"]
    assert json.loads((tuned / "config.json").read_text()) == json.loads((out / "config.json").read_text())
    assert (tuned / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_fine_tuning_a_fixture(tmp_path):
    """An existing Hugging Face checkpoint (llama-tiny, weights of std 0.3, untied head) fine-tunes too."""
    from candlewick.cli import main
    from candlewick.train_cli import read_metrics

    text = tmp_path / "t.txt"
    text.write_text((ROOT / "demo" / "genesis.txt").read_text(encoding="utf-8")[:6000], encoding="utf-8")
    assert main(["train", str(tmp_path / "ft"), "--from", str(DATA / "llama-tiny"), "--data", str(text),
                 "--steps", "10", "--block-size", "32", "--batch-size", "4", "--eval-every", "10",
                 "--lr", "3e-3"]) == 0
    rows = read_metrics(tmp_path / "ft" / "metrics.csv")
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.3          # measured: 9.71 -> 9.26
    assert set(reference.load(tmp_path / "ft").tensors) == set(reference.load(DATA / "llama-tiny").tensors)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_new_models_have_the_shapes_the_loaders_expect(arch, tmp_path):
    config = T.new_config(arch, 300, n_layer=2, n_embd=32, n_head=4, n_kv_head=2 if arch == "llama" else None,
                          context=16)
    model = reference.load(T.new_checkpoint(tmp_path, config, DATA / "llama-tiny" / "tokenizer.json", seed=0))
    loss, grads = model.loss_and_grads([1, 2, 3, 4, 5])
    assert loss == pytest.approx(math.log(300), abs=0.1)      # small weights: close to a uniform guess
    assert set(grads) == set(T.init_weights(config, np.random.default_rng(0)))


def test_refusals():
    with pytest.raises(ValueError, match="arch"):
        T.new_config("bert", 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        T.sample_batch(np.arange(5), 2, 8, np.random.default_rng(0))
