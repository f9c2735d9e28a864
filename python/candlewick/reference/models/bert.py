"""BERT encoder in NumPy (post-LN), with sentence-transformers pooling for embeddings.

    x = LayerNorm(word[ids] + position[0..T-1] + token_type[types])
    for each layer:  x = LayerNorm(x + attn(x));  x = LayerNorm(x + ffn(x))     (post-LN: norm after the sum)
      attn: softmax(q kᵀ/√D + padding mask) v, no causal mask;  ffn: W2 gelu(W1 x), exact (erf) GELU
    embedding = normalise(pool(x over the tokens the attention mask keeps))
Shape legend: B batch, T tokens, C channels (hidden_size), H heads, D head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..functional import attention, layer_norm, linear
from ._common import Weights, activation, merge_heads, split_heads


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    architecture: str = "BertModel"
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        activation(d.get("hidden_act", "gelu"), "bert")  # position_embedding_type: models.check_fields
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                   intermediate_size=d["intermediate_size"], max_position_embeddings=d["max_position_embeddings"],
                   type_vocab_size=d.get("type_vocab_size", 2), layer_norm_eps=d.get("layer_norm_eps", 1e-12),
                   hidden_act=d.get("hidden_act", "gelu"), pad_token_id=d.get("pad_token_id", 0),
                   architecture=(d.get("architectures") or ["BertModel"])[0], raw=d)


def load_params(tensors: dict[str, np.ndarray], cfg: Config) -> dict:
    """Checkpoint names -> a nested dict, checking every shape. The `bert.` prefix is optional; the pooler,
    the MLM head and `embeddings.position_ids` are not used."""
    w = Weights(tensors, "bert", prefix="bert.")
    take, C, F = w.take, cfg.hidden_size, cfg.intermediate_size

    def dense(name, out_dim, in_dim):
        return w.linear(name, out_dim, in_dim, True)

    def norm(name):
        return {"weight": take(name + ".weight", (C,)), "bias": take(name + ".bias", (C,))}

    def layer(i):
        a = f"encoder.layer.{i}."
        return {"query": dense(a + "attention.self.query", C, C), "key": dense(a + "attention.self.key", C, C),
                "value": dense(a + "attention.self.value", C, C),
                "attn_out": dense(a + "attention.output.dense", C, C),
                "attn_norm": norm(a + "attention.output.LayerNorm"),
                "intermediate": dense(a + "intermediate.dense", F, C), "output": dense(a + "output.dense", C, F),
                "out_norm": norm(a + "output.LayerNorm")}

    e = "embeddings."
    return {"word": take(e + "word_embeddings.weight", (cfg.vocab_size, C)),
            "position": take(e + "position_embeddings.weight", (cfg.max_position_embeddings, C)),
            "token_type": take(e + "token_type_embeddings.weight", (cfg.type_vocab_size, C)),
            "embed_norm": norm(e + "LayerNorm"), "layers": [layer(i) for i in range(cfg.num_hidden_layers)]}


def self_attention(x, p, cfg: Config, keep):  # [B, T, C], keep [B, 1, 1, T] -> [B, T, C]
    q, k, v = (split_heads(linear(x, *p[n]), cfg.num_attention_heads) for n in ("query", "key", "value"))
    y = attention(q, k, v, causal=False, mask=keep)                          # [B, H, T, D]
    return linear(merge_heads(y), *p["attn_out"])


def ffn(x, p, cfg: Config):  # [B, T, C] -> [B, T, C]
    return linear(activation(cfg.hidden_act, "bert")(linear(x, *p["intermediate"])), *p["output"])


def encoder_layer(x, p, cfg: Config, keep):  # [B, T, C] -> [B, T, C]
    eps = cfg.layer_norm_eps
    x = layer_norm(x + self_attention(x, p, cfg, keep), **p["attn_norm"], eps=eps)
    return layer_norm(x + ffn(x, p, cfg), **p["out_norm"], eps=eps)


def hidden_states(params, cfg: Config, input_ids, attention_mask=None, token_type_ids=None):  # [B, T] -> [B, T, C]
    """last_hidden_state. Padded positions are computed too (they attend to the real tokens), as in transformers."""
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    x = params["word"][ids] + params["position"][np.arange(ids.shape[-1])] + params["token_type"][types]  # [B, T, C]
    x = layer_norm(x, **params["embed_norm"], eps=cfg.layer_norm_eps)
    keep = mask.astype(bool)[:, None, None, :]                               # [B, 1, 1, T]: padding keys are masked
    for p in params["layers"]:
        x = encoder_layer(x, p, cfg, keep)
    return x


# --- sentence-transformers pooling ------------------------------------------------------------------------------

def pool(h, mask, mode="mean"):  # h [B, T, C], mask [B, T] -> [B, C]
    """Sentence vector from the token vectors the mask keeps: "mean", "cls" (first token), "max", or
    "mean_sqrt_len" (the sum divided by √(number of tokens))."""
    m = np.asarray(mask, dtype=np.float64)[..., None]                        # [B, T, 1]
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return np.where(m > 0, h, -1e9).max(axis=1)
    total, count = (h * m).sum(axis=1), np.maximum(m.sum(axis=1), 1e-9)      # [B, C], [B, 1]
    if mode == "mean":
        return total / count
    if mode == "mean_sqrt_len":
        return total / np.sqrt(count)
    raise NotImplementedError(f"bert: pooling mode {mode!r}")


def l2_normalize(x, eps=1e-12):  # [B, C] -> [B, C]
    """x / max(‖x‖₂, eps), as torch.nn.functional.normalize."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
