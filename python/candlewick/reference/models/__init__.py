"""Loading a checkpoint folder into a reference model with the surface of DESIGN.md (logits, generate, embed ...).

A folder holds config.json, *.safetensors (one file, or shards listed in model.safetensors.index.json) and
tokenizer.json; sentence-transformers encoders add modules.json and 1_Pooling/config.json.
Shape legend: B batch, T tokens, C channels, V vocabulary, N texts.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ... import structured
from .. import constraints
from .. import generate as generation
from ..functional import cross_entropy
from ...windows import perplexity_windows
from ..tokenizer import Tokenizer
from . import bert, gemma3, gpt2, gptneox, llama, phi3, qwen3, smollm3
from ._common import check_fields

# model_type -> the module with its Config, load_params, hidden_states (and final_logits where the head is more
# than a matrix). Mistral and Qwen2 are Llama with a few flags; the fields each reads: architectures.json.
ARCHITECTURES = {"gpt2": gpt2, "llama": llama, "mistral": llama, "qwen2": llama, "qwen3": qwen3,
                 "gemma3_text": gemma3, "phi3": phi3, "smollm3": smollm3, "gpt_neox": gptneox, "bert": bert}


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """One .safetensors file as float64 arrays (integer buffers such as position_ids are left as they are)."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors' own errors name no file
        if "BF16" in str(e) or "bfloat16" in str(e).lower():
            tensors = _load_bf16(path)
        else:
            raise ValueError(f"{path}: {e}") from e
    return {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}


def _load_bf16(path: Path) -> dict[str, np.ndarray]:
    """NumPy has no bfloat16, so safetensors.numpy cannot read it: read each tensor's raw 16 bits from the
    offsets in the header and widen them (a bf16 number is the top half of a float32)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header, tensors = json.loads(raw[8:8 + n]), {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = (8 + n + o for o in meta["data_offsets"])
        if meta["dtype"] == "BF16":
            bits = np.frombuffer(raw[a:b], dtype="<u2").astype(np.uint32) << 16
            tensors[name] = bits.view(np.float32).reshape(meta["shape"])
        else:
            dtype = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}[meta["dtype"]]
            tensors[name] = np.frombuffer(raw[a:b], dtype=dtype).reshape(meta["shape"])
    return tensors


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder} (the reference never loads pickles)")
    weights: dict[str, np.ndarray] = {}
    for name in files:
        weights.update(load_safetensors(folder / name))
    return weights


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load(path) -> "CausalLM | Encoder":
    """Read a Hugging Face-style folder: a causal LM of ARCHITECTURES or BERT (an encoder). A config field that
    changes the maths and that the architecture does not implement (architectures.json) is refused by name."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    raw = _read_json(folder / "config.json")
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(f"{folder / 'config.json'}: model_type {model_type!r} "
                                  f"(the reference knows {', '.join(ARCHITECTURES)})")
    module = ARCHITECTURES[model_type]
    check_fields(raw, model_type, folder / "config.json")
    config = module.Config.from_dict(raw)
    tensors = load_weights(folder)
    params = module.load_params(tensors, config)
    tokenizer = Tokenizer.from_pretrained(folder)
    if module is bert:
        return Encoder(config, params, tokenizer, folder)
    return CausalLM(module, config, params, tokenizer, tensors=tensors)


class CausalLM:
    """A decoder-only language model: logits, token_nll, perplexity and generate, all float64, and for GPT-2 and
    the Llama family loss_and_grads, for training. Every call runs the whole sequence again (no KV cache): slow,
    but nothing to get wrong.

    `tensors` holds the checkpoint's arrays by their names in the file; `params` arranges the same arrays (not
    copies) for the forward pass, so a change made in place to a tensor (an optimizer step) is what the next
    forward pass sees."""

    def __init__(self, module, config, params, tokenizer: Tokenizer, tensors: dict[str, np.ndarray] | None = None):
        self.module, self.config, self.params, self.tokenizer = module, config, params, tokenizer
        self.tensors = tensors if tensors is not None else {}

    def _ids(self, ids_or_text) -> list[int]:
        ids = self.tokenizer.encode(ids_or_text) if isinstance(ids_or_text, str) else [int(i) for i in ids_or_text]
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        vocab = self.params["lm_head"].shape[0]
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {vocab}")
        if len(ids) > self.config.context_length:
            raise ValueError(f"{len(ids)} tokens is longer than the context of {self.config.context_length}")
        return ids

    def hidden_states(self, ids) -> np.ndarray:  # [T] -> [T, C]
        return self.module.hidden_states(self.params, self.config, np.asarray([self._ids(ids)]))[0]

    def all_hidden_states(self, ids) -> list[np.ndarray]:  # [T] -> L + 1 arrays [T, C]
        """The residual stream after each of the L blocks, then the final normed hidden state (what the
        engine's `_native.hidden_states` returns), for comparing the two layer by layer."""
        layers = self.module.hidden_states(self.params, self.config, np.asarray([self._ids(ids)]), all_layers=True)
        return [h[0] for h in layers]

    def logits(self, ids) -> np.ndarray:
        """float64 [T, V] for one sequence; [B, T, V] for a list of sequences, right-padded with zeros
        (row b holds sequence b's positions 0 .. len_b - 1)."""
        if len(ids) and not isinstance(ids, str) and isinstance(ids[0], (list, tuple, np.ndarray)):
            rows = [self.logits(seq) for seq in ids]
            out = np.zeros((len(rows), max(len(r) for r in rows), rows[0].shape[-1]))
            for b, r in enumerate(rows):
                out[b, :len(r)] = r
            return out
        return self.head(self.hidden_states(ids))                           # [T, C] -> [T, V]

    def next_logits(self, ids) -> np.ndarray:  # [T] -> [V], the logits after the last token only
        return self.head(self.hidden_states(ids)[-1])

    def head(self, hidden) -> np.ndarray:  # [..., C] -> [..., V]
        """hidden Wᵀ with W = lm_head, or the architecture's own final_logits (Gemma soft-caps them)."""
        final = getattr(self.module, "final_logits", None)
        return final(self.params, self.config, hidden) if final else hidden @ self.params["lm_head"].T

    def loss_and_grads(self, ids) -> tuple[float, dict[str, np.ndarray]]:
        """L = -1/(T-1) Σ_t log p(x[t+1] | x[..t]), the mean next-token cross-entropy over one sequence of ids [T]
        (or over every prediction of a batch [B, T]), and ∂L/∂θ for every parameter θ, keyed by the checkpoint's
        own tensor names (a tied head adds its gradient to the embedding's). GPT-2 and the Llama family (Llama,
        Mistral, Qwen2, Qwen3, SmolLM3)."""
        backward = getattr(self.module, "loss_and_grads", None)
        if backward is None:
            raise NotImplementedError(f"{self.config.architecture}: the reference has no backward pass for it "
                                      "(it has GPT-2 and the Llama family)")
        batch = np.asarray(ids)
        rows = np.asarray([self._ids(row[:-1]) + self._ids(row[-1:]) for row in (batch if batch.ndim == 2 else [batch])
                           if len(row) >= 2], dtype=np.int64)  # the model reads all but the last token of a row
        if rows.size == 0:
            raise ValueError("loss_and_grads needs at least two tokens: one to read, one to predict")
        loss, grads = backward(self.params, self.config, rows[:, :-1], rows[:, 1:])   # row t predicts token t + 1
        prefix = getattr(self.module, "PREFIX", "")
        return loss, {name if name in self.tensors or not self.tensors else prefix + name: g
                      for name, g in grads.items()}

    def token_nll(self, text_or_ids) -> np.ndarray:
        """-log p(x[t+1] | x[..t]) for t = 0 .. T-2: float64 [T-1]."""
        ids = self._ids(text_or_ids)
        return cross_entropy(self.logits(ids)[:-1], ids[1:], reduction="none")

    def perplexity(self, text_or_ids, *, stride: int | None = None) -> float:
        """exp(mean NLL). Past the context length L, windows of L tokens start every `stride` tokens (default
        L // 2) and each scores only the tokens the previous window did not, as in Hugging Face's perplexity
        guide: with stride < L every token but the first is scored once, with at least L - stride tokens of
        context; with stride = L (disjoint windows) the first token of each window is not scored."""
        ids = text_or_ids if not isinstance(text_or_ids, str) else self.tokenizer.encode(text_or_ids)
        ids = [int(i) for i in ids]
        if len(ids) < 2:
            raise ValueError("perplexity needs at least two tokens")
        total, count = 0.0, 0
        for begin, end, first in perplexity_windows(len(ids), self.config.context_length, stride):
            new = self.token_nll(ids[begin:end])[first - begin - 1:]   # nll[j] scores token begin + j + 1
            total, count = total + new.sum(), count + len(new)
        return math.exp(total / count)

    def generate(self, prompt, *, rng: np.random.Generator | None = None, json_schema=None, regex=None,
                 grammar=None, response_format=None, **params) -> list[int]:
        """The new token ids after `prompt` (text or ids); parameters and their order as in reference.generate.
        temperature 0 is greedy; sampling draws from `rng`, e.g. np.random.default_rng(seed). json_schema,
        regex, grammar or response_format constrain the output (candlewick.structured, reference.constraints)."""
        spec = structured.constraint_from(json_schema=json_schema, regex=regex, grammar=grammar,
                                          response_format=response_format)
        constraint = None
        if spec is not None:
            if getattr(self, "_vocabulary", None) is None:
                self._vocabulary = constraints.Vocabulary(self.tokenizer, self.config.vocab_size)
            constraint = constraints.GrammarConstraint(self._vocabulary, *spec)
        return generation.generate(self.next_logits, self._ids(prompt), eos_token_ids=self.tokenizer.eos_token_ids,
                                   rng=rng, max_context=self.config.context_length, constraint=constraint, **params)

    def embed(self, texts):
        raise TypeError(f"{self.config.architecture} is a causal language model; embed needs an encoder (BERT)")


class Encoder:
    """A BERT encoder with sentence-transformers pooling (1_Pooling/config.json) and optional L2 normalisation
    (a Normalize entry in modules.json)."""

    POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                    "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}

    def __init__(self, config, params, tokenizer: Tokenizer, folder: Path):
        self.config, self.params, self.tokenizer = config, params, tokenizer
        modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
        pooling = next((m["path"] for m in modules if m["type"].endswith("Pooling")), "1_Pooling")
        pool_cfg = _read_json(folder / pooling / "config.json")
        modes = [mode for key, mode in self.POOLING_KEYS.items() if pool_cfg.get(key)] or ["mean"]
        if len(modes) > 1:
            raise NotImplementedError(f"{folder / pooling}: several pooling modes at once ({modes})")
        self.pooling = modes[0]
        self.normalize = any(m["type"].endswith("Normalize") for m in modules)
        st = _read_json(folder / "sentence_bert_config.json")
        limit = config.max_position_embeddings
        self.max_seq_length = min(st.get("max_seq_length", limit), limit)

    def hidden_states(self, input_ids, attention_mask=None) -> np.ndarray:  # [B, T] -> [B, T, C]
        return bert.hidden_states(self.params, self.config, input_ids, attention_mask)

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids [N, T] (truncated to max_seq_length, right-padded) and the attention mask [N, T]."""
        room = self.max_seq_length - self.tokenizer.num_special_tokens_to_add
        rows = [self.tokenizer.post_process(self.tokenizer.encode(t, add_special_tokens=False)[:room]) for t in texts]
        T = max(len(r) for r in rows)
        ids = np.full((len(rows), T), self.config.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), T), dtype=np.int64)
        for n, r in enumerate(rows):
            ids[n, :len(r)], mask[n, :len(r)] = r, 1
        return ids, mask

    def embed(self, texts) -> np.ndarray:
        """float64 [N, C] (or [C] for one string): pooled over the mask, L2-normalised when modules.json says."""
        single = isinstance(texts, str)
        ids, mask = self.encode_batch([texts] if single else list(texts))
        e = bert.pool(self.hidden_states(ids, mask), mask, self.pooling)     # [N, C]
        e = bert.l2_normalize(e) if self.normalize else e
        return e[0] if single else e

    def logits(self, ids):
        raise TypeError(f"{self.config.architecture} is an encoder without a language-model head; use embed")

    token_nll = perplexity = generate = logits
