//! Llama: pre-RMSNorm blocks, rotary positions, grouped-query attention, SwiGLU MLP.
//! Also Mistral (the same weights) and Qwen2 (q/k/v biases).

use candle_core::{DType, Device, Tensor};

use super::{embed, merge_heads, split_heads, Cache};
use crate::config::Config;
use crate::error::Result;
use crate::linear::Linear;
use crate::ops;
use crate::weights::Weights;

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

pub struct Llama {
    pub cfg: Config,
    embed_tokens: Tensor, // [V, C]
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    cos: Tensor, // [P, D/2]
    sin: Tensor,
    act: DType,
}

fn linear(w: &Weights, name: &str, out: usize, inp: usize, bias: bool, dt: DType, act: DType) -> Result<Linear> {
    let b = if bias { Some(w.get(&format!("{name}.bias"), &[out], act)?) } else { None };
    Linear::new(w.get(&format!("{name}.weight"), &[out, inp], dt)?, b)
}

impl Llama {
    pub fn load(cfg: &Config, w: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        let act = crate::linear::compute_dtype(dtype, device);
        let (c, d, h, hkv, f) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let l = |n: &str, o, inp, bias| linear(w, &format!("{p}.{n}"), o, inp, bias, dtype, act);
            layers.push(Block {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[c], act)?,
                self_attn: Attention {
                    q_proj: l("self_attn.q_proj", h * d, c, cfg.qkv_bias)?,
                    k_proj: l("self_attn.k_proj", hkv * d, c, cfg.qkv_bias)?,
                    v_proj: l("self_attn.v_proj", hkv * d, c, cfg.qkv_bias)?,
                    o_proj: l("self_attn.o_proj", c, h * d, cfg.o_bias)?,
                },
                post_attention_layernorm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[c], act)?,
                mlp: Mlp {
                    gate_proj: l("mlp.gate_proj", f, c, cfg.mlp_bias)?,
                    up_proj: l("mlp.up_proj", f, c, cfg.mlp_bias)?,
                    down_proj: l("mlp.down_proj", c, f, cfg.mlp_bias)?,
                },
            });
        }
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, c], act)?;
        let lm_head = if w.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            linear(w, "lm_head", cfg.vocab_size, c, false, dtype, act)?
        } else {
            Linear::new(w.get("model.embed_tokens.weight", &[cfg.vocab_size, c], dtype)?, None)?
        };
        let inv = ops::rope_inv_freq(d, cfg.rope_theta, &cfg.rope_scaling);
        let (cos, sin) = ops::rope_tables(&inv, cfg.max_position_embeddings, act, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens,
            layers,
            norm: w.get("model.norm.weight", &[c], act)?,
            lm_head,
            cos,
            sin,
            act,
        })
    }

    /// ids [B, T], positions [B, T] -> final hidden states [B, T, C]. `mask` (additive, [B, 1, T, Tcache+T])
    /// replaces the causal mask when given (ragged batches); `cache` receives this step's keys and values.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Cache,
        mut layers_out: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, hkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let half = d / 2;
        let pos = positions.flatten_all()?;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, t, half))?;
        let mut x = embed(&self.embed_tokens, ids)?; // [B, T, C]
        for (i, blk) in self.layers.iter().enumerate() {
            let a = &blk.self_attn;
            let hn = ops::rms_norm(&x, &blk.input_layernorm, self.cfg.norm_eps)?;
            let q = ops::rope(&split_heads(&a.q_proj.forward(&hn)?, h, d)?, &cos, &sin)?; // [B, H, T, D]
            let k = ops::rope(&split_heads(&a.k_proj.forward(&hn)?, hkv, d)?, &cos, &sin)?; // [B, Hkv, T, D]
            let v = split_heads(&a.v_proj.forward(&hn)?, hkv, d)?;
            let (k, v) = cache.append(i, k, v)?;
            let y = ops::attention(&q, &k, &v, mask.is_none(), mask, None)?;
            x = (x + a.o_proj.forward(&merge_heads(&y)?)?)?;
            let hn = ops::rms_norm(&x, &blk.post_attention_layernorm, self.cfg.norm_eps)?;
            let m = &blk.mlp;
            let g = ops::silu(&m.gate_proj.forward(&hn)?)? * m.up_proj.forward(&hn)?;
            x = (x + m.down_proj.forward(&g?)?)?;
            if let Some(out) = layers_out.as_deref_mut() {
                out.push(x.clone());
            }
        }
        ops::rms_norm(&x, &self.norm, self.cfg.norm_eps)
    }

    /// hidden [.., C] -> logits [.., V] (f32)
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    pub fn act_dtype(&self) -> DType {
        self.act
    }
}
