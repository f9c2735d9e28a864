//! config.json, read into one struct for every supported architecture (both rope config styles).
//!
//! Every field that changes the maths is either implemented or refused by name: `architectures.json` (shared
//! with the NumPy reference) lists those fields, their neutral values and which architecture implements each.

use std::path::Path;
use std::sync::OnceLock;

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    /// The pre-norm decoders with rotary positions (models/decoder.rs): Llama, Mistral, Qwen2, Qwen3, Gemma 3,
    /// Phi-3, SmolLM3, GPT-NeoX.
    Llama,
    Bert,
}

pub const SUPPORTED: &str =
    "gpt2, llama, mistral, qwen2, qwen3, gemma3_text, phi3, smollm3, gpt_neox (decoders) and bert (encoder)";

/// The shared declaration of math-changing config fields (python/candlewick/architectures.json).
const ARCHITECTURES_JSON: &str = include_str!("../../python/candlewick/architectures.json");

fn declaration() -> &'static Value {
    static DECL: OnceLock<Value> = OnceLock::new();
    DECL.get_or_init(|| serde_json::from_str(ARCHITECTURES_JSON).expect("architectures.json is valid JSON (compiled in)"))
}

/// Refuse a config that sets a math-changing field its architecture does not implement (the rule in
/// architectures.json: a value is neutral when it is listed, or is a list whose every element is).
pub fn check_fields(v: &Value, model_type: &str, file: &str) -> Result<()> {
    let decl = declaration();
    let implements: Vec<&str> = decl["architectures"][model_type]["implements"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(neutral) = decl["neutral"].as_object() else { return Ok(()) };
    for (field, ok) in neutral {
        let Some(x) = v.get(field) else { continue };
        let ok = ok.as_array().map(Vec::as_slice).unwrap_or(&[]);
        let is_neutral = |x: &Value| ok.iter().any(|n| n == x || (n.is_number() && x.as_f64() == n.as_f64()));
        let neutral = is_neutral(x) || x.as_array().is_some_and(|a| a.iter().all(is_neutral));
        if !neutral && !implements.contains(&field.as_str()) {
            return Err(Error::ModelLoad(format!(
                "{file}: {model_type} does not implement {field} = {x} (candlewick refuses rather than compute \
                 something else; see architectures.json)"
            )));
        }
    }
    Ok(())
}

/// RoPE frequency scaling, as HF configs spell it (`rope_scaling` or `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// YaRN (transformers' `_compute_yarn_parameters`): frequencies blended between interpolation and
    /// extrapolation over a ramp of dimensions; cos and sin multiplied by `attention_factor`.
    /// Per-dimension divisors of the frequencies (GGUF's rope_freqs tensor: Llama 3.1 scaling as llama.cpp stores it).
    FreqFactors(Vec<f64>),
    Yarn { factor: f64, original_max_position_embeddings: f64, beta_fast: f64, beta_slow: f64, attention_factor: f64, truncate: bool },
}

/// One RoPE table: its base and scaling (Gemma 3's local and global layers each have their own).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// How a block adds its attention and MLP to the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    /// x += attn(norm1(x)); x += mlp(norm2(x))
    Sequential,
    /// GPT-NeoX: x += attn(norm1(x)) + mlp(norm2(x))
    Parallel,
    /// Gemma: x += post_attn_norm(attn(norm1(x))); x += post_ffn_norm(mlp(pre_ffn_norm(x)))
    Sandwich,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Arch,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub norm_eps: f64,
    /// the main RoPE (`ropes[0]`)'s base, for display
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub hidden_act: String,
    /// Qwen2 (and `attention_bias: true` Llamas) have biases on q/k/v.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub type_vocab_size: usize,
    pub bos_token_id: Option<u32>,
    /// The RoPE tables the layers use.
    pub ropes: Vec<Rope>,
    /// Per layer: the index into `ropes`, or None for a layer without positions (SmolLM3's NoPE layers).
    pub layer_rope: Vec<Option<usize>>,
    /// Per layer: the sliding window (a query sees itself and the window - 1 keys before it), or None.
    pub layer_window: Vec<Option<usize>>,
    /// RoPE turns the first `rotary_dim` dimensions of each head (partial_rotary_factor · head_dim).
    pub rotary_dim: usize,
    /// Attention scores are q·k times this (default 1/√D; Gemma: query_pre_attn_scalar^-½).
    pub attn_scale: f64,
    /// GPT-2's scale_attn_by_inverse_layer_idx: layer i's scores divided by i + 1 as well.
    pub attn_scale_by_layer: bool,
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    pub residual: Residual,
    /// RMSNorm as x̂·(1 + w) (Gemma): folded into the weights at load from safetensors.
    pub norm_plus_one: bool,
    /// LayerNorm (with bias) rather than RMSNorm (GPT-NeoX).
    pub layer_norm: bool,
    /// RMSNorm on each head's q and k before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Embeddings multiplied by this (Gemma: √hidden_size).
    pub embed_scale: Option<f64>,
    /// A gated MLP (act(gate)·up, then down), or a plain one (act(up), then down: GPT-NeoX).
    pub gated_mlp: bool,
    /// learned absolute positions added to the token embeddings (GPT-2), instead of RoPE
    pub learned_positions: bool,
    pub raw: Value,
}

/// The most layers, and the widest hidden size or head count, a config may ask for.
const MAX_LAYERS: usize = 4096;
const MAX_WIDTH: usize = 1 << 20;

struct Reader<'a> {
    v: &'a Value,
    file: &'a str,
}

impl Reader<'_> {
    fn opt(&self, keys: &[&str]) -> Option<&Value> {
        keys.iter().find_map(|k| self.v.get(*k).filter(|x| !x.is_null()))
    }
    fn usize(&self, keys: &[&str]) -> Result<usize> {
        match self.opt(keys) {
            Some(x) => x.as_u64().map(|n| n as usize).ok_or_else(|| {
                Error::ModelLoad(format!("{}: field {:?} must be a non-negative integer, got {x}", self.file, keys[0]))
            }),
            None => Err(Error::ModelLoad(format!("{}: missing field {:?}", self.file, keys[0]))),
        }
    }
    fn usize_or(&self, keys: &[&str], default: usize) -> Result<usize> {
        if self.opt(keys).is_some() { self.usize(keys) } else { Ok(default) }
    }
    fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>> {
        if self.opt(keys).is_some() { self.usize(keys).map(Some) } else { Ok(None) }
    }
    fn f64_or(&self, keys: &[&str], default: f64) -> Result<f64> {
        Ok(self.opt_f64(keys)?.unwrap_or(default))
    }
    fn opt_f64(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.opt(keys) {
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| Error::ModelLoad(format!("{}: field {:?} must be a number, got {x}", self.file, keys[0]))),
            None => Ok(None),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.v.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
    fn str_or(&self, keys: &[&str], default: &str) -> String {
        self.opt(keys).and_then(Value::as_str).unwrap_or(default).to_string()
    }
}

/// The keys a rope dict (`rope_parameters` / `rope_scaling`) may hold; any other is refused by name.
const ROPE_KEYS: &[&str] = &[
    "rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings", "partial_rotary_factor", "beta_fast", "beta_slow", "mscale",
    "mscale_all_dim", "attention_factor", "truncate",
];

/// get_mscale of transformers' YaRN: 0.1·m·ln(s) + 1 for s > 1.
fn yarn_mscale(scale: f64, m: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 }
}

/// A rope dict's type and parameters. `max_pos` is the config's max_position_embeddings (YaRN's defaults use it).
fn rope_scaling(obj: Option<&Value>, file: &str, max_pos: usize, top_original: Option<f64>) -> Result<RopeScaling> {
    let Some(o) = obj.filter(|o| o.is_object()) else { return Ok(RopeScaling::None) };
    if let Some(bad) = o.as_object().into_iter().flatten().map(|(k, _)| k).find(|k| !ROPE_KEYS.contains(&k.as_str())) {
        return Err(Error::ModelLoad(format!("{file}: rope parameter {bad:?} is not implemented")));
    }
    let r = Reader { v: o, file };
    let kind = r.str_or(&["rope_type", "type"], "default");
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: r.f64_or(&["factor"], 1.0)? },
        "llama3" => RopeScaling::Llama3 {
            factor: r.f64_or(&["factor"], 8.0)?,
            low_freq_factor: r.f64_or(&["low_freq_factor"], 1.0)?,
            high_freq_factor: r.f64_or(&["high_freq_factor"], 4.0)?,
            original_max_position_embeddings: match top_original {
                Some(o) => o,
                None => r.f64_or(&["original_max_position_embeddings"], 8192.0)?,
            },
        },
        "yarn" => {
            // as transformers 5: original_max_position_embeddings defaults to the context; a missing factor
            // is their ratio
            let original = match top_original {
                Some(o) => o,
                None => r.f64_or(&["original_max_position_embeddings"], max_pos as f64)?,
            };
            let factor = r.f64_or(&["factor"], max_pos as f64 / original)?;
            let attention_factor = match r.opt_f64(&["attention_factor"])? {
                Some(a) => a,
                None => match (r.opt_f64(&["mscale"])?, r.opt_f64(&["mscale_all_dim"])?) {
                    (Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => yarn_mscale(factor, m) / yarn_mscale(factor, ma),
                    _ => yarn_mscale(factor, 1.0),
                },
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: r.f64_or(&["beta_fast"], 32.0)?,
                beta_slow: r.f64_or(&["beta_slow"], 1.0)?,
                attention_factor,
                truncate: r.bool_or("truncate", true),
            }
        }
        other => {
            return Err(Error::ModelLoad(format!(
                "{file}: rope type {other:?} is not implemented (implemented: default, linear, llama3, yarn)"
            )))
        }
    })
}

/// The activations a model may name, as the engine's kernels: (gelu with the tanh approximation?).
pub fn activation(name: &str, file: &str) -> Result<Act> {
    Ok(match name {
        "silu" | "swish" => Act::Silu,
        "gelu" | "gelu_exact" => Act::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
        other => {
            return Err(Error::ModelLoad(format!(
                "{file}: activation {other:?} is not implemented (implemented: silu, gelu, gelu_new, gelu_pytorch_tanh)"
            )))
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Silu,
    Gelu,
    GeluTanh,
}

/// SmolLM3's NoPE layers: no_rope_layers[i] == 0, or every no_rope_layer_interval-th layer (default 4).
fn no_rope_layers(r: &Reader, mt: &str, num_layers: usize, file: &str) -> Result<Vec<bool>> {
    if mt != "smollm3" {
        return Ok(vec![false; num_layers]);
    }
    Ok(match r.v.get("no_rope_layers").and_then(Value::as_array) {
        Some(a) if a.len() == num_layers => a.iter().map(|x| x.as_u64() == Some(0)).collect(),
        Some(a) => return Err(Error::ModelLoad(format!("{file}: no_rope_layers has {} entries for {num_layers} layers", a.len()))),
        None => {
            let k = match r.v.get("no_rope_layer_interval") {
                None => 4,
                Some(_) => r.usize_or(&["no_rope_layer_interval"], 0)?,
            };
            if k == 0 {
                return Err(Error::ModelLoad(format!("{file}: no_rope_layers is absent and no_rope_layer_interval is null or 0")));
            }
            (0..num_layers).map(|i| (i + 1) % k == 0).collect()
        }
    })
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::load(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::load(path, format!("not valid JSON: {e}")))?;
        Self::from_value(v, &path.display().to_string())
    }

    pub fn from_value(v: Value, file: &str) -> Result<Self> {
        let r = Reader { v: &v, file };
        let model_type = r.str_or(&["model_type"], "");
        let arch = match model_type.as_str() {
            "gpt2" => Arch::Gpt2,
            "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3_text" | "phi3" | "smollm3" | "gpt_neox" => Arch::Llama,
            "bert" => Arch::Bert,
            "gemma3" => {
                return Err(Error::ModelLoad(format!(
                    "{file}: model_type \"gemma3\" is the multimodal Gemma 3; its text model (model_type \
                     \"gemma3_text\", Gemma3ForCausalLM) is supported"
                )))
            }
            other => {
                return Err(Error::ModelLoad(format!(
                    "{file}: unsupported architecture {other:?} (model_type); supported: {SUPPORTED}"
                )))
            }
        };
        check_fields(&v, &model_type, file)?;
        let mt = model_type.as_str();
        let gemma = mt == "gemma3_text";
        let neox = mt == "gpt_neox";
        let hidden_size = r.usize(&["hidden_size", "n_embd"])?;
        let num_heads = r.usize(&["num_attention_heads", "n_head"])?;
        let num_kv_heads = r.usize_or(&["num_key_value_heads"], num_heads)?;
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::ModelLoad(format!(
                "{file}: num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let num_layers = r.usize(&["num_hidden_layers", "n_layer"])?;
        // absurd sizes are refused before anything is sized by them (the largest released models have ~130 layers
        // and hidden sizes of ~20k)
        for (field, value, max) in [("num_hidden_layers", num_layers, MAX_LAYERS), ("hidden_size", hidden_size, MAX_WIDTH),
                                    ("num_attention_heads", num_heads, MAX_WIDTH)] {
            if value == 0 || value > max {
                return Err(Error::ModelLoad(format!("{file}: {field} = {value} is out of range (1 to {max})")));
            }
        }
        // transformers' defaults where the key is missing: Qwen3 128, Gemma 3 256, else hidden / heads
        let head_dim = r.usize_or(&["head_dim"], match mt {
            "qwen3" => 128,
            "gemma3_text" => 256,
            _ => hidden_size / num_heads,
        })?;
        if arch != Arch::Llama && head_dim * num_heads != hidden_size {
            return Err(Error::ModelLoad(format!(
                "{file}: hidden_size ({hidden_size}) is not divisible by the number of heads ({num_heads})"
            )));
        }
        if head_dim == 0 {
            return Err(Error::ModelLoad(format!("{file}: head_dim must be positive")));
        }
        let max_position_embeddings = r.usize_or(
            &["max_position_embeddings", "n_positions", "n_ctx"],
            match arch {
                Arch::Gpt2 => 1024,
                Arch::Llama => 2048,
                Arch::Bert => 512,
            },
        )?;
        // Sliding windows, as each architecture's transformers config decides them: the window (a missing
        // sliding_window defaults to 4096 where transformers' config has that default), then which layers use it
        // (layer_types, or derived when absent).
        let window = match v.get("sliding_window") {
            None if matches!(mt, "mistral" | "qwen2" | "qwen3" | "gemma3_text") => Some(4096),
            _ => r.opt_usize(&["sliding_window"])?,
        };
        let window_used = match mt {
            "qwen2" | "qwen3" | "smollm3" => window.filter(|_| r.bool_or("use_sliding_window", false)),
            _ => window,
        };
        let nope = no_rope_layers(&r, mt, num_layers, file)?;
        let explicit_types = match v.get("layer_types").and_then(Value::as_array) {
            // Mistral's attention reads sliding_window alone
            Some(_) if mt == "mistral" => None,
            Some(a) => {
                let t: Vec<String> = a.iter().map(|x| x.as_str().unwrap_or("?").to_string()).collect();
                if t.len() != num_layers {
                    return Err(Error::ModelLoad(format!("{file}: layer_types has {} entries for {num_layers} layers", t.len())));
                }
                if let Some(bad) = t.iter().find(|x| !matches!(x.as_str(), "full_attention" | "sliding_attention")) {
                    return Err(Error::ModelLoad(format!("{file}: layer type {bad:?} is not implemented")));
                }
                Some(t)
            }
            None => None,
        };
        let max_window_layers = r.usize_or(&["max_window_layers"], 28)?;
        let pattern = r.usize_or(&["sliding_window_pattern"], 6)?;
        let layer_types: Vec<String> = match explicit_types {
            Some(t) => t,
            None => (0..num_layers)
                .map(|i| {
                    let sliding = match mt {
                        "mistral" | "phi3" => window_used.is_some(),
                        "qwen2" | "qwen3" => window_used.is_some() && i >= max_window_layers,
                        "smollm3" => window_used.is_some() && nope[i],
                        "gemma3_text" => pattern == 0 || (i + 1) % pattern != 0,
                        _ => false,
                    };
                    if sliding { "sliding_attention" } else { "full_attention" }.to_string()
                })
                .collect(),
        };
        let layer_window: Vec<Option<usize>> =
            layer_types.iter().map(|t| if t == "sliding_attention" { window_used } else { None }).collect();
        if layer_window.contains(&Some(0)) {
            return Err(Error::ModelLoad(format!("{file}: sliding_window must be positive")));
        }
        if layer_types.iter().any(|t| t == "sliding_attention") && window_used.is_none() {
            return Err(Error::ModelLoad(format!(
                "{file}: layer_types asks for sliding_attention but there is no sliding window (sliding_window is \
                 null, or use_sliding_window is false)"
            )));
        }
        // RoPE: transformers 5 nests it in `rope_parameters` (Gemma 3: one per layer type); older configs keep
        // `rope_theta`/`rope_scaling` on top.
        let rp = v.get("rope_parameters").filter(|x| x.is_object());
        let per_type = gemma && rp.is_some_and(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        let rope_of = |p: Option<&Value>, default_theta: f64| -> Result<Rope> {
            let theta = match p.and_then(|p| p.get("rope_theta")) {
                Some(t) => t.as_f64().ok_or_else(|| Error::ModelLoad(format!("{file}: rope_theta must be a number")))?,
                None => default_theta,
            };
            let top_original = r.opt_f64(&["original_max_position_embeddings"])?;
            Ok(Rope { theta, scaling: rope_scaling(p, file, max_position_embeddings, top_original)? })
        };
        let top_theta = match mt {
            // GPT-NeoX reads rotary_emb_base, never a top-level rope_theta
            "gpt_neox" => r.f64_or(&["rotary_emb_base"], 10000.0)?,
            "smollm3" => r.f64_or(&["rope_theta"], 2_000_000.0)?,
            "gemma3_text" => r.f64_or(&["rope_theta"], 1_000_000.0)?,
            _ => r.f64_or(&["rope_theta"], 10000.0)?,
        };
        let ropes: Vec<Rope> = if per_type {
            let p = rp.expect("checked");
            if let Some(bad) = p.as_object().into_iter().flatten().map(|(k, _)| k).find(|k| !matches!(k.as_str(), "full_attention" | "sliding_attention")) {
                return Err(Error::ModelLoad(format!("{file}: rope_parameters.{bad} is not implemented")));
            }
            vec![rope_of(p.get("full_attention"), top_theta)?, rope_of(p.get("sliding_attention"), 10000.0)?]
        } else {
            let main = rope_of(rp.or(v.get("rope_scaling")).filter(|x| x.is_object()), top_theta)?;
            let main = if rp.is_none() { Rope { theta: top_theta, ..main } } else { main };
            if gemma {
                // older Gemma 3 configs: rope_theta and rope_scaling for global layers, rope_local_base_freq local
                let local = Rope { theta: r.f64_or(&["rope_local_base_freq"], 10000.0)?, scaling: RopeScaling::None };
                vec![main, local]
            } else {
                vec![main]
            }
        };
        let layer_rope: Vec<Option<usize>> = (0..num_layers)
            .map(|i| {
                if nope[i] || arch == Arch::Gpt2 {
                    None
                } else if gemma && layer_types[i] == "sliding_attention" {
                    Some(1)
                } else {
                    Some(0)
                }
            })
            .collect();
        let partial = match rp.and_then(|p| p.get("partial_rotary_factor")).and_then(Value::as_f64) {
            Some(f) => f,
            None => r.f64_or(&["partial_rotary_factor", "rotary_pct"], if neox { 0.25 } else { 1.0 })?,
        };
        if !(partial > 0.0 && partial <= 1.0) {
            return Err(Error::ModelLoad(format!("{file}: partial_rotary_factor must be in (0, 1], got {partial}")));
        }
        let rotary_dim = (head_dim as f64 * partial) as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
            return Err(Error::ModelLoad(format!(
                "{file}: partial_rotary_factor {partial} gives an odd or empty rotary dimension ({rotary_dim}) for head_dim {head_dim}"
            )));
        }
        let (norm_eps, default_act) = match arch {
            Arch::Gpt2 => (r.f64_or(&["layer_norm_epsilon"], 1e-5)?, "gelu_new"),
            Arch::Llama if neox => (r.f64_or(&["layer_norm_eps"], 1e-5)?, "gelu"),
            Arch::Llama if gemma => (r.f64_or(&["rms_norm_eps"], 1e-6)?, "gelu_pytorch_tanh"),
            Arch::Llama => (r.f64_or(&["rms_norm_eps"], 1e-6)?, "silu"),
            Arch::Bert => (r.f64_or(&["layer_norm_eps"], 1e-12)?, "gelu"),
        };
        let hidden_act = r.str_or(&[if gemma { "hidden_activation" } else { "hidden_act" }, "activation_function"], default_act);
        activation(&hidden_act, file)?;
        let intermediate_default = if arch == Arch::Gpt2 { 4 * hidden_size } else { 0 };
        let intermediate_size = r.usize_or(&["intermediate_size", "n_inner"], intermediate_default)?;
        if intermediate_size == 0 {
            return Err(Error::ModelLoad(format!("{file}: missing field \"intermediate_size\"")));
        }
        let attention_bias = r.bool_or("attention_bias", neox);
        let gpt2 = arch == Arch::Gpt2;
        let qkv_bias = mt == "qwen2" || attention_bias || gpt2;
        let attn_scale = if gemma {
            r.f64_or(&["query_pre_attn_scalar"], 256.0)?.powf(-0.5)
        } else if arch == Arch::Gpt2 && !r.bool_or("scale_attn_weights", true) {
            1.0
        } else {
            1.0 / (head_dim as f64).sqrt()
        };
        let rope0 = ropes[0].clone();
        Ok(Self {
            arch,
            vocab_size: r.usize(&["vocab_size"])?,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            max_position_embeddings,
            norm_eps,
            rope_theta: rope0.theta,
            rope_scaling: rope0.scaling,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", !matches!(mt, "llama" | "mistral" | "phi3" | "gpt_neox")),
            hidden_act,
            qkv_bias,
            o_bias: (mt != "qwen2" && attention_bias) || gpt2,
            mlp_bias: r.bool_or("mlp_bias", neox) || gpt2,
            type_vocab_size: r.usize_or(&["type_vocab_size"], 2)?,
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            ropes,
            layer_rope,
            layer_window,
            rotary_dim,
            attn_scale,
            attn_scale_by_layer: arch == Arch::Gpt2 && r.bool_or("scale_attn_by_inverse_layer_idx", false),
            attn_softcap: r.opt_f64(&["attn_logit_softcapping"])?,
            final_softcap: r.opt_f64(&["final_logit_softcapping"])?,
            residual: if gemma {
                Residual::Sandwich
            } else if neox && r.bool_or("use_parallel_residual", true) {
                Residual::Parallel
            } else {
                Residual::Sequential
            },
            norm_plus_one: gemma,
            layer_norm: neox || gpt2,
            qk_norm: matches!(mt, "qwen3" | "gemma3_text"),
            embed_scale: gemma.then(|| (hidden_size as f64).sqrt()),
            gated_mlp: !neox && !gpt2,
            learned_positions: gpt2,
            model_type,
            raw: v,
        })
    }

    /// The context length: the longest sequence the model accepts.
    pub fn context_length(&self) -> usize {
        self.max_position_embeddings
    }

    /// A plain config of the classic shape (every layer: full attention, RoPE 0 over the whole head), for GGUF
    /// files; the caller fills in the architecture's differences.
    pub fn uniform_layers(&mut self) {
        self.layer_rope = vec![Some(0); self.num_layers];
        self.layer_window = vec![None; self.num_layers];
        self.ropes = vec![Rope { theta: self.rope_theta, scaling: self.rope_scaling.clone() }];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_rope_styles() {
        let base = json!({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 10, "intermediate_size": 8});
        let mut top = base.clone();
        top["rope_theta"] = json!(500000.0);
        top["rope_scaling"] = json!({"rope_type": "linear", "factor": 2.0});
        let mut nested = base.clone();
        nested["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "linear", "factor": 2.0});
        for v in [top, nested] {
            let c = Config::from_value(v, "config.json").unwrap();
            assert_eq!(c.rope_theta, 500000.0);
            assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
        }
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let e = Config::from_value(json!({"model_type": "mamba"}), "x/config.json").unwrap_err().to_string();
        assert!(e.contains("mamba") && e.contains("gpt2, llama"), "{e}");
    }
}
