//! config.json, read into one struct for every supported architecture (both rope config styles).

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    /// Llama and its variants: Mistral, Qwen2 (q/k/v biases), SmolLM.
    Llama,
    Bert,
}

pub const SUPPORTED: &str = "gpt2, llama, mistral, qwen2 (decoders) and bert (encoder)";

/// RoPE frequency scaling, as HF configs spell it (`rope_scaling` or `rope_parameters`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    Linear { factor: f64 },
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
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
    pub raw: Value,
}

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
    fn f64_or(&self, keys: &[&str], default: f64) -> Result<f64> {
        match self.opt(keys) {
            Some(x) => x
                .as_f64()
                .ok_or_else(|| Error::ModelLoad(format!("{}: field {:?} must be a number, got {x}", self.file, keys[0]))),
            None => Ok(default),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> bool {
        self.v.get(key).and_then(Value::as_bool).unwrap_or(default)
    }
    fn str_or(&self, keys: &[&str], default: &str) -> String {
        self.opt(keys).and_then(Value::as_str).unwrap_or(default).to_string()
    }
}

fn rope_scaling(obj: Option<&Value>, file: &str) -> Result<RopeScaling> {
    let Some(o) = obj.filter(|o| o.is_object()) else { return Ok(RopeScaling::None) };
    let r = Reader { v: o, file };
    let kind = r.str_or(&["rope_type", "type"], "default");
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: r.f64_or(&["factor"], 1.0)? },
        "llama3" => RopeScaling::Llama3 {
            factor: r.f64_or(&["factor"], 8.0)?,
            low_freq_factor: r.f64_or(&["low_freq_factor"], 1.0)?,
            high_freq_factor: r.f64_or(&["high_freq_factor"], 4.0)?,
            original_max_position_embeddings: r.f64_or(&["original_max_position_embeddings"], 8192.0)?,
        },
        other => {
            return Err(Error::ModelLoad(format!(
                "{file}: rope type {other:?} is not supported (supported: default, linear, llama3)"
            )))
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
            "llama" | "mistral" | "qwen2" => Arch::Llama,
            "bert" => Arch::Bert,
            other => {
                return Err(Error::ModelLoad(format!(
                    "{file}: unsupported architecture {other:?} (model_type); supported: {SUPPORTED}"
                )))
            }
        };
        let hidden_size = r.usize(&["hidden_size", "n_embd"])?;
        let num_heads = r.usize(&["num_attention_heads", "n_head"])?;
        let num_kv_heads = r.usize_or(&["num_key_value_heads"], num_heads)?;
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Error::ModelLoad(format!(
                "{file}: num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = r.usize_or(&["head_dim"], hidden_size / num_heads)?;
        if arch != Arch::Llama && head_dim * num_heads != hidden_size {
            return Err(Error::ModelLoad(format!(
                "{file}: hidden_size ({hidden_size}) is not divisible by the number of heads ({num_heads})"
            )));
        }
        // RoPE: transformers 5 nests it in `rope_parameters`; older configs keep `rope_theta`/`rope_scaling` on top.
        let rp = v.get("rope_parameters").filter(|x| x.is_object());
        let rope_theta = match rp.and_then(|p| p.get("rope_theta")) {
            Some(t) => t.as_f64().ok_or_else(|| Error::ModelLoad(format!("{file}: rope_parameters.rope_theta must be a number")))?,
            None => r.f64_or(&["rope_theta"], 10000.0)?,
        };
        let rope_scaling = rope_scaling(rp.or(v.get("rope_scaling")), file)?;
        let (norm_eps, default_act, max_pos_default) = match arch {
            Arch::Gpt2 => (r.f64_or(&["layer_norm_epsilon"], 1e-5)?, "gelu_new", 1024),
            Arch::Llama => (r.f64_or(&["rms_norm_eps"], 1e-6)?, "silu", 2048),
            Arch::Bert => (r.f64_or(&["layer_norm_eps"], 1e-12)?, "gelu", 512),
        };
        let intermediate_default = if arch == Arch::Gpt2 { 4 * hidden_size } else { 0 };
        let intermediate_size = r.usize_or(&["intermediate_size", "n_inner"], intermediate_default)?;
        if intermediate_size == 0 {
            return Err(Error::ModelLoad(format!("{file}: missing field \"intermediate_size\"")));
        }
        let qkv_bias = model_type == "qwen2" || r.bool_or("attention_bias", false);
        Ok(Self {
            arch,
            vocab_size: r.usize(&["vocab_size"])?,
            hidden_size,
            num_layers: r.usize(&["num_hidden_layers", "n_layer"])?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            max_position_embeddings: r.usize_or(&["max_position_embeddings", "n_positions", "n_ctx"], max_pos_default)?,
            norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", arch != Arch::Llama || model_type == "qwen2"),
            hidden_act: r.str_or(&["hidden_act", "activation_function"], default_act),
            qkv_bias,
            o_bias: model_type != "qwen2" && r.bool_or("attention_bias", false),
            mlp_bias: r.bool_or("mlp_bias", false),
            type_vocab_size: r.usize_or(&["type_vocab_size"], 2)?,
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            model_type,
            raw: v,
        })
    }

    /// The context length: the longest sequence the model accepts.
    pub fn context_length(&self) -> usize {
        self.max_position_embeddings
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
