//! Llama: pre-RMSNorm blocks, rotary positions, grouped-query attention, SwiGLU MLP.
//! Also Mistral (the same weights) and Qwen2 (q/k/v biases).

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::{embed, last_rows, merge_heads, split_heads, Cache};
use crate::config::Config;
use crate::error::Result;
use crate::gguf::Gguf;
use crate::linear::Linear;
use crate::ops;
use crate::quantized::Proj;
use crate::weights::Weights;

struct Attention {
    /// q, k and v projections side by side: [H·D | Hkv·D | Hkv·D] outputs
    qkv: Proj,
    o_proj: Proj,
}

struct Mlp {
    /// gate and up projections side by side: [F | F] outputs
    gate_up: Proj,
    down_proj: Proj,
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
    lm_head: Proj,
    cos: Tensor, // [P, D/2]
    sin: Tensor,
    act: DType,
    /// GGUF files store q/k permuted for llama.cpp's interleaved ("normal") RoPE; HF checkpoints use rotate_half.
    rope_interleaved: bool,
}

/// A dense projection, or one quantized at load time when `quant` is given.
fn proj(w: &Weights, name: &str, out: usize, inp: usize, bias: bool, dt: DType, act: DType, quant: Option<GgmlDType>) -> Result<Proj> {
    proj_fused(w, &[(name, out)], inp, bias, dt, act, quant)
}

/// Projections of the same input stored as one matrix: their weights (and biases) stacked in the order given.
fn proj_fused(
    w: &Weights,
    parts: &[(&str, usize)],
    inp: usize,
    bias: bool,
    dt: DType,
    act: DType,
    quant: Option<GgmlDType>,
) -> Result<Proj> {
    let cat = |ts: Vec<Tensor>| -> Result<Tensor> { Ok(if ts.len() == 1 { ts[0].clone() } else { Tensor::cat(&ts, 0)? }) };
    let b = if bias {
        Some(cat(parts.iter().map(|(n, o)| w.get(&format!("{n}.bias"), &[*o], act)).collect::<Result<_>>()?)?)
    } else {
        None
    };
    let weight = cat(parts.iter().map(|(n, o)| w.get(&format!("{n}.weight"), &[*o, inp], dt)).collect::<Result<_>>()?)?;
    match quant {
        Some(q) => Proj::quantize(&weight, b, q),
        None => Ok(Proj::Dense(Linear::new(weight, b)?)),
    }
}

impl Llama {
    pub fn load(cfg: &Config, w: &Weights, dtype: DType, device: &Device, quant: Option<GgmlDType>) -> Result<Self> {
        let act = crate::linear::compute_dtype(dtype, device);
        let (c, d, h, hkv, f) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let l = |n: &str, o, inp, bias| proj(w, &format!("{p}.{n}"), o, inp, bias, dtype, act, quant);
            let fused = |parts: &[(&str, usize)], bias| {
                let names: Vec<(String, usize)> = parts.iter().map(|(n, o)| (format!("{p}.{n}"), *o)).collect();
                let names: Vec<(&str, usize)> = names.iter().map(|(n, o)| (n.as_str(), *o)).collect();
                proj_fused(w, &names, c, bias, dtype, act, quant)
            };
            layers.push(Block {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[c], act)?,
                self_attn: Attention {
                    qkv: fused(&[("self_attn.q_proj", h * d), ("self_attn.k_proj", hkv * d), ("self_attn.v_proj", hkv * d)], cfg.qkv_bias)?,
                    o_proj: l("self_attn.o_proj", c, h * d, cfg.o_bias)?,
                },
                post_attention_layernorm: w.get(&format!("{p}.post_attention_layernorm.weight"), &[c], act)?,
                mlp: Mlp {
                    gate_up: fused(&[("mlp.gate_proj", f), ("mlp.up_proj", f)], cfg.mlp_bias)?,
                    down_proj: l("mlp.down_proj", c, f, cfg.mlp_bias)?,
                },
            });
        }
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, c], act)?;
        let head = if w.contains("lm_head.weight") && !cfg.tie_word_embeddings { "lm_head" } else { "model.embed_tokens" };
        let lm_head = proj(w, head, cfg.vocab_size, c, false, dtype, act, quant)?;
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
            rope_interleaved: false,
        })
    }

    /// From a GGUF file (llama.cpp names: blk.N.attn_q, ...): projections stay quantized, the rest is f32.
    pub fn load_gguf(cfg: &Config, g: &Gguf, device: &Device) -> Result<Self> {
        let (c, d, h, hkv, f) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let q = |n: &str, out: usize, inp: usize, bias: bool| -> Result<Proj> {
            let b = if bias { Some(g.dense(&n.replace(".weight", ".bias"), &[out], device)?) } else { None };
            Proj::from_qtensor(g.qtensor(n, &[out, inp], device)?, b)
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("blk.{i}");
            layers.push(Block {
                input_layernorm: g.dense(&format!("{p}.attn_norm.weight"), &[c], device)?,
                self_attn: Attention {
                    qkv: Proj::fuse(vec![
                        q(&format!("{p}.attn_q.weight"), h * d, c, cfg.qkv_bias)?,
                        q(&format!("{p}.attn_k.weight"), hkv * d, c, cfg.qkv_bias)?,
                        q(&format!("{p}.attn_v.weight"), hkv * d, c, cfg.qkv_bias)?,
                    ])?,
                    o_proj: q(&format!("{p}.attn_output.weight"), c, h * d, false)?,
                },
                post_attention_layernorm: g.dense(&format!("{p}.ffn_norm.weight"), &[c], device)?,
                mlp: Mlp {
                    gate_up: Proj::fuse(vec![
                        q(&format!("{p}.ffn_gate.weight"), f, c, false)?,
                        q(&format!("{p}.ffn_up.weight"), f, c, false)?,
                    ])?,
                    down_proj: q(&format!("{p}.ffn_down.weight"), c, f, false)?,
                },
            });
        }
        let head = if g.has_tensor("output.weight") { "output.weight" } else { "token_embd.weight" };
        let inv = ops::rope_inv_freq(d, cfg.rope_theta, &cfg.rope_scaling);
        let (cos, sin) = ops::rope_tables(&inv, cfg.max_position_embeddings, DType::F32, device)?;
        Ok(Self {
            cfg: cfg.clone(),
            embed_tokens: g.dense("token_embd.weight", &[cfg.vocab_size, c], device)?,
            layers,
            norm: g.dense("output_norm.weight", &[c], device)?,
            lm_head: q(head, cfg.vocab_size, c, false)?,
            cos,
            sin,
            act: DType::F32,
            rope_interleaved: cfg.model_type == "llama",
        })
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.rope_interleaved {
            Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)?)
        } else {
            ops::rope(x, cos, sin)
        }
    }

    /// ids [B, T], positions [B, T] -> final hidden states [B, T, C]. `mask` (additive, [B, 1, T, Tcache+T])
    /// replaces the causal mask when given (ragged batches); `cache` receives this step's keys and values.
    /// `last_only`: only the last position's hidden state is wanted ([B, 1, C]), so the last block computes its
    /// keys and values for every position (the cache needs them) but attention, output projection and MLP for
    /// the last position alone, as llama.cpp does.
    pub fn forward(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Cache,
        mut layers_out: Option<&mut Vec<Tensor>>,
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (h, hkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let half = d / 2;
        let pos = positions.flatten_all()?;
        let cos = self.cos.index_select(&pos, 0)?.reshape((b, t, half))?;
        let sin = self.sin.index_select(&pos, 0)?.reshape((b, t, half))?;
        let mut x = embed(&self.embed_tokens, ids)?; // [B, T, C]
        for (i, blk) in self.layers.iter().enumerate() {
            let last = last_only && i + 1 == self.layers.len();
            let a = &blk.self_attn;
            let hn = ops::rms_norm(&x, &blk.input_layernorm, self.cfg.norm_eps)?;
            let qkv = a.qkv.forward(&hn)?; // [B, T, (H + 2·Hkv)·D]
            let q = self.rope(&split_heads(&qkv.narrow(2, 0, h * d)?, h, d)?, &cos, &sin)?; // [B, H, T, D]
            let k = self.rope(&split_heads(&qkv.narrow(2, h * d, hkv * d)?, hkv, d)?, &cos, &sin)?; // [B, Hkv, T, D]
            let v = split_heads(&qkv.narrow(2, (h + hkv) * d, hkv * d)?, hkv, d)?;
            let (k, v) = cache.append(i, k, v)?;
            let (q, mask_q) = last_rows(last, t, q, mask)?;
            let y = ops::attention(&q, &k, &v, mask.is_none(), mask_q.as_ref(), None)?;
            if last {
                x = x.narrow(1, t - 1, 1)?;
            }
            x = (x + a.o_proj.forward(&merge_heads(&y)?)?)?;
            let hn = ops::rms_norm(&x, &blk.post_attention_layernorm, self.cfg.norm_eps)?;
            let m = &blk.mlp;
            let g = ops::swiglu(&m.gate_up.forward(&hn)?)?; // silu(gate) · up
            x = (x + m.down_proj.forward(&g)?)?;
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
