"""Never silently wrong: every math-changing config field that an architecture does not implement is refused by
name (python/candlewick/architectures.json, shared by the engine and the reference), and the ones it implements
change the numbers as transformers does (checked against exact figures in test_architectures.py and below)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import candlewick as cw
from conftest import DATA, copy_checkpoint

DECL = json.loads((DATA.parent.parent / "python" / "candlewick" / "architectures.json").read_text())
FIXTURE_OF = {"gpt2": "gpt2-tiny", "llama": "llama-tiny", "mistral": "mistral-sw-tiny", "qwen2": "qwen2-tiny",
              "qwen3": "qwen3-tiny", "gemma3_text": "gemma3-tiny", "phi3": "phi3-tiny", "smollm3": "smollm3-tiny",
              "gpt_neox": "gptneox-tiny"}


def non_neutral(field: str, cfg: dict):
    """A value of `field` that is not neutral, of the right shape for this config."""
    n = cfg.get("num_hidden_layers", cfg.get("n_layer", 2))
    special = {"layer_types": ["sliding_attention"] * n, "no_rope_layers": [0] * n,
               "position_embedding_type": "relative_key", "scale_attn_weights": False,
               "use_sliding_window": True, "query_pre_attn_scalar": 7.0}
    if field in special:
        return special[field]
    neutral = DECL["neutral"][field]
    if False in neutral:
        return True
    return 3 if "window" in field or "interval" in field or "pattern" in field else 0.5


DELETE = object()


def with_config(tmp_path, name, **changes):
    """A copy of fixture `name` with config.json fields changed (DELETE removes one)."""
    def edit(cfg):
        cfg.update(changes)
        for k in [k for k, v in cfg.items() if v is DELETE]:
            del cfg[k]

    return copy_checkpoint(DATA / name, tmp_path / name, edit)


CASES = [(mt, f) for mt, fix in FIXTURE_OF.items() for f in DECL["neutral"]
         if f not in DECL["architectures"][mt]["implements"]]


@pytest.mark.parametrize("model_type,field", CASES)
def test_unimplemented_field_is_refused_by_name(tmp_path, model_type, field):
    name = FIXTURE_OF[model_type]
    cfg = json.loads((DATA / name / "config.json").read_text())
    path = with_config(tmp_path, name, **{field: non_neutral(field, cfg)})
    with pytest.raises(cw.ModelLoadError, match=f"{model_type} does not implement {field}"):
        cw.load(path)


def test_neutral_values_load(tmp_path):
    """Neutral values (what hub configs carry: sliding_window null, use_sliding_window false, ...) are accepted."""
    path = with_config(tmp_path, "llama-tiny", sliding_window=None, use_sliding_window=False,
                       attn_logit_softcapping=None, layer_types=["full_attention", "full_attention"])
    z = np.load(DATA / "llama-tiny" / "reference.npz")
    np.testing.assert_allclose(cw.load(path).logits(z["prompt0_ids"]), z["prompt0_logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("rope,match", [
    ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "rope type \"dynamic\" is not implemented"),
    ({"rope_type": "longrope", "rope_theta": 10000.0}, "rope type \"longrope\" is not implemented"),
    ({"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2]}, "rope parameter \"mrope_section\""),
])
def test_rope_types_and_keys_are_refused_by_name(tmp_path, rope, match):
    with pytest.raises(cw.ModelLoadError, match=match):
        cw.load(with_config(tmp_path, "llama-tiny", rope_parameters=rope))


@pytest.mark.parametrize("name,field", [("llama-tiny", "hidden_act"), ("gpt2-tiny", "activation_function"),
                                        ("gemma3-tiny", "hidden_activation")])
def test_unknown_activation_is_refused_by_name(tmp_path, name, field):
    with pytest.raises(cw.ModelLoadError, match="activation \"relu2\" is not implemented"):
        cw.load(with_config(tmp_path, name, **{field: "relu2"}))


def test_qwen2_sliding_window_applies_with_use_sliding_window(tmp_path):
    """Qwen2 (a config without layer_types, as older hub files are): the window counts only when
    use_sliding_window is true, from layer max_window_layers on."""
    z = np.load(DATA / "qwen2-tiny" / "reference.npz")
    ids = [int(t) for t in z["prompt3_ids"]]
    plain = cw.load(DATA / "qwen2-tiny").logits(ids)
    unused = cw.load(with_config(tmp_path / "a", "qwen2-tiny", sliding_window=3, use_sliding_window=False,
                                 layer_types=DELETE)).logits(ids)
    np.testing.assert_array_equal(unused, plain)
    top = cw.load(with_config(tmp_path / "b", "qwen2-tiny", sliding_window=3, use_sliding_window=True,
                              max_window_layers=1, layer_types=DELETE)).logits(ids)
    both = cw.load(with_config(tmp_path / "c", "qwen2-tiny", sliding_window=3, use_sliding_window=True,
                               max_window_layers=0, layer_types=DELETE)).logits(ids)
    # the first 3 positions see no further back than the window anyway; later ones differ, more with two layers
    np.testing.assert_allclose(top[:3], plain[:3], rtol=0, atol=1e-5)
    assert np.abs(top[3:] - plain[3:]).max() > 1e-2 and np.abs(both - top).max() > 1e-2


def test_gpt2_inverse_layer_idx_scaling_matches_reference(tmp_path):
    """scale_attn_by_inverse_layer_idx divides layer i's scores by i + 1 as well: the engine against the exact
    reference on the same config."""
    from candlewick import reference

    path = with_config(tmp_path, "gpt2-tiny", scale_attn_by_inverse_layer_idx=True)
    z = np.load(DATA / "gpt2-tiny" / "reference.npz")
    ids = [int(t) for t in z["prompt2_ids"]]
    got = cw.load(path).logits(ids)
    want = reference.load(path).logits(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.abs(got[:, z["logit_columns"]] - z["prompt2_logits_at_columns"]).max() > 1e-2


def test_multimodal_gemma3_points_to_the_text_model(tmp_path):
    with pytest.raises(cw.ModelLoadError, match="gemma3_text"):
        cw.load(with_config(tmp_path, "gemma3-tiny", model_type="gemma3"))


PARITY = [
    ("qwen2-tiny", dict(sliding_window=3, use_sliding_window=True, max_window_layers=1, layer_types=DELETE)),
    ("qwen3-tiny", dict(sliding_window=4, use_sliding_window=True, layer_types=["full_attention", "sliding_attention"])),
    ("qwen3-tiny", dict(use_sliding_window=False, layer_types=["sliding_attention"] * 2)),  # no window: refused
    ("mistral-sw-tiny", dict(sliding_window=DELETE)),  # transformers' default window, 4096
    ("mistral-sw-tiny", dict(sliding_window=3, layer_types=["full_attention"] * 2)),  # Mistral ignores layer_types
    ("gemma3-tiny", dict(layer_types=DELETE, sliding_window_pattern=2)),
    ("gemma3-tiny", dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    ("gemma3-tiny", dict(query_pre_attn_scalar=7.0)),
    ("smollm3-tiny", dict(sliding_window=3, use_sliding_window=True, layer_types=DELETE)),
    ("smollm3-tiny", dict(no_rope_layers=DELETE, no_rope_layer_interval=2)),
    ("phi3-tiny", dict(sliding_window=4)),
    ("gptneox-tiny", dict(use_parallel_residual=False)),
    ("gpt2-tiny", dict(scale_attn_weights=False)),
    ("llama-tiny", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                         "rope_theta": 10000.0})),
    ("llama-tiny", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "beta_fast": 8,
                                         "beta_slow": 2, "truncate": False, "mscale": 2.0, "mscale_all_dim": 1.0,
                                         "original_max_position_embeddings": 32})),
    ("llama-tiny", dict(rope_scaling={"type": "linear", "factor": 3.0}, rope_parameters=DELETE, rope_theta=500.0)),
    # transformers' defaults where a key is missing
    ("llama-tiny", dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0},
                        original_max_position_embeddings=24)),
    ("gptneox-tiny", dict(partial_rotary_factor=DELETE, rope_parameters=DELETE, rotary_emb_base=500.0)),
    ("smollm3-tiny", dict(rope_parameters=DELETE)),
    ("gemma3-tiny", dict(rope_parameters=DELETE, rope_theta=5e5, rope_local_base_freq=2e3)),
    ("qwen3-tiny", dict(head_dim=DELETE)),
    ("smollm3-tiny", dict(no_rope_layers=DELETE, no_rope_layer_interval=0)),
]


@pytest.mark.parametrize("name,changes", PARITY)
def test_engine_and_reference_agree_on_edited_configs(tmp_path, name, changes):
    """The engine and the exact reference read every edited config alike: both refuse it, or both load it and
    their logits agree to float32 precision (1e-4)."""
    from candlewick import reference

    path = with_config(tmp_path, name, **changes)
    z = np.load(DATA / name / "reference.npz")
    ids = [int(t) for t in z["prompt3_ids"]]
    try:
        want = reference.load(path).logits(ids)
    except (NotImplementedError, ValueError):
        with pytest.raises(cw.ModelLoadError):
            cw.load(path)
        return
    got = cw.load(path).logits(ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
