//! The pre-norm decoders: GPT-2 (learned positions) and those with rotary positions: Llama, Mistral, Qwen2, Qwen3,
//! Gemma 3, Phi-3, SmolLM3, GPT-NeoX.
//!
//! One block, wired by the config (models differ in a handful of switches: norm kind, q/k norm, residual wiring,
//! gated or plain MLP, partial or no RoPE, sliding windows, soft-capping), and one loader for both formats: each
//! architecture gives a table of tensor names for safetensors (Hugging Face) and for GGUF (llama.cpp), as
//! llama.cpp's tensor-name map does.
//!
//!   x = embed[ids] (· embed_scale) (+ pos_embed[positions])
//!   each block: h = norm₁(x); q, k, v = split(h Wqkvᵀ); q, k = qk_norm(q, k); q, k = rope(q, k)
//!               a = attention(q, k, v; causal, window) Woᵀ
//!     sequential: x += a;            x += mlp(norm₂(x))
//!     parallel:   x += a + mlp(norm₂(x_in))                       (GPT-NeoX)
//!     sandwich:   x += norm_post(a); x += norm_post_ffn(mlp(norm₂(x)))  (Gemma)
//!   logits = norm_f(x) Wᵀ (softcapped)

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

#[path = "decode_step.rs"]
pub mod step;

use super::{last_rows, merge_heads, split_heads};
use crate::kernels::dense::Panels;
use crate::nn::{embed, Cache, KvPool, Linear, Logits, Norm, PagedSeq, PagedStep, Table};
use crate::config::{activation, Act, Config, Residual};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::ops;
use crate::weights::Weights;

/// Where a model's tensors come from.
pub enum Source<'a> {
    /// A Hugging Face checkpoint: projections in `dtype` (or quantized at load with `quant`), the rest in `act`.
    Safetensors { w: &'a Weights, dtype: DType, act: DType, quant: Option<GgmlDType> },
    /// A GGUF file: projections as stored, the rest f32.
    Gguf { g: &'a Gguf, device: &'a Device },
}

impl Source<'_> {
    pub fn has(&self, name: &str) -> bool {
        match self {
            Source::Safetensors { w, .. } => w.contains(name),
            Source::Gguf { g, .. } => g.has_tensor(name),
        }
    }

    pub fn act(&self) -> DType {
        match self {
            Source::Safetensors { act, .. } => *act,
            Source::Gguf { .. } => DType::F32,
        }
    }

    /// A tensor kept dense in the activation dtype (norms, biases, embeddings), its shape checked.
    pub fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        match self {
            Source::Safetensors { w, act, .. } => w.get(name, shape, *act),
            Source::Gguf { g, device } => g.dense(name, shape, device),
        }
    }

    /// Projections of one input stored as one matrix (their weights [out_i, inp] stacked in the order given),
    /// with biases `{name}.bias` when `bias`. `conv1d`: a safetensors checkpoint stores the weights [inp, out_i]
    /// (GPT-2's Conv1D), transposed here once.
    pub fn proj(&self, parts: &[(&str, usize)], inp: usize, bias: bool, conv1d: bool) -> Result<Linear> {
        let bias_of = |n: &str, o: usize| -> Result<Option<Tensor>> {
            if bias { Ok(Some(self.dense(&format!("{n}.bias"), &[o])?)) } else { Ok(None) }
        };
        match self {
            Source::Safetensors { w, dtype, act, quant } => {
                let cat = |ts: Vec<Tensor>| -> Result<Tensor> { Ok(if ts.len() == 1 { ts[0].clone() } else { Tensor::cat(&ts, 0)? }) };
                let b = if bias {
                    Some(cat(parts.iter().map(|(n, o)| w.get(&format!("{n}.bias"), &[*o], *act)).collect::<Result<_>>()?)?)
                } else {
                    None
                };
                let get = |n: &str, o: usize| -> Result<Tensor> {
                    let name = format!("{n}.weight");
                    if conv1d { Ok(w.get(&name, &[inp, o], *dtype)?.t()?.contiguous()?) } else { w.get(&name, &[o, inp], *dtype) }
                };
                // weights at their stored width on the CPU, one or stacked (q/k/v, gate/up) where every part fills
                // its last panel: packed straight from the mapped file into the panels of one matrix
                let rows: Vec<usize> = parts.iter().map(|(_, o)| *o).collect();
                if let (false, None, true, true) = (conv1d, quant, w.device().is_cpu(), Panels::stacks(&rows)) {
                    let raws = parts.iter().map(|(n, o)| w.raw(&format!("{n}.weight"), &[*o, inp])).collect::<Result<Vec<_>>>()?;
                    let bytes: Option<Vec<&[u8]>> =
                        raws.into_iter().map(|r| r.and_then(|(stored, bytes)| (stored == *dtype).then_some(bytes))).collect();
                    if let Some(bytes) = bytes {
                        let l = Linear::Dense(crate::nn::linear::Dense::from_bytes(*dtype, &bytes, inp, b)?);
                        bytes.iter().for_each(|b| crate::weights::release_pages(b));
                        return Ok(l);
                    }
                }
                let weight = cat(parts.iter().map(|(n, o)| get(n, *o)).collect::<Result<_>>()?)?;
                Linear::new(weight, b, *quant)
            }
            Source::Gguf { g, device } => {
                let ps = parts
                    .iter()
                    .map(|(n, o)| {
                        let name = format!("{n}.weight");
                        // our block formats are repacked straight from the mapped file (one copy, not two)
                        if device.is_cpu() {
                            let (dtype, bytes) = g.raw(&name, &[*o, inp])?;
                            let release = |b: &[u8]| g.done_with(b);
                            if let Some(w) =
                                crate::kernels::quant::QWeight::from_raw_releasing(dtype, bytes, *o, inp, &release)
                            {
                                g.done_with(bytes);
                                return Ok(Linear::Blocks(std::sync::Arc::new(w), bias_of(n, *o)?));
                            }
                        }
                        Linear::from_qtensor(g.qtensor(&name, &[*o, inp], device)?, bias_of(n, *o)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Linear::fuse(ps)
            }
        }
    }

    /// Whether a dense projection holds the checkpoint's numbers exactly (its width is the stored one, or f32),
    /// so that a tied embedding may read its rows from it.
    fn dense_is_exact(&self) -> bool {
        match self {
            Source::Safetensors { w, dtype, quant, .. } => {
                quant.is_none() && (*dtype == DType::F32 || *dtype == w.stored_dtype())
            }
            Source::Gguf { .. } => true,
        }
    }

    fn is_gguf(&self) -> bool {
        matches!(self, Source::Gguf { .. })
    }
}

/// How an architecture stores q, k and v.
#[derive(Clone, Copy)]
enum Qkv {
    Separate(&'static str, &'static str, &'static str),
    /// one [q | k | v] matrix
    Fused(&'static str),
    /// GPT-NeoX in safetensors: one matrix whose rows go head by head, [q_h | k_h | v_h] for each head h
    FusedPerHead(&'static str),
}

/// How an architecture stores its MLP's input projections.
#[derive(Clone, Copy)]
enum MlpIn {
    Gated(&'static str, &'static str),
    /// one [gate | up] matrix
    FusedGated(&'static str),
    Plain(&'static str),
}

/// The tensor names of one architecture in one format; `{i}` stands for the layer number. Norm entries name
/// the module (`.weight`, and `.bias` for LayerNorm, are appended).
struct Names {
    embed: &'static str,
    /// learned positions (GPT-2), or ""
    pos_embed: &'static str,
    /// projection weights stored [in, out] (GPT-2's Conv1D in safetensors)
    conv1d: bool,
    final_norm: &'static str,
    lm_head: &'static str,
    attn_norm: &'static str,
    qkv: Qkv,
    o: &'static str,
    q_norm: &'static str,
    k_norm: &'static str,
    /// Gemma's norm of the attention output (sandwich)
    post_attn_norm: &'static str,
    ffn_norm: &'static str,
    /// Gemma's norm of the MLP output (sandwich)
    post_ffn_norm: &'static str,
    mlp_in: MlpIn,
    down: &'static str,
}

/// llama.cpp's names (its tensor-name map), the same for every architecture but for the fused ones.
const GGUF: Names = Names {
    embed: "token_embd.weight",
    pos_embed: "position_embd.weight",
    conv1d: false,
    final_norm: "output_norm",
    lm_head: "output",
    attn_norm: "blk.{i}.attn_norm",
    qkv: Qkv::Separate("blk.{i}.attn_q", "blk.{i}.attn_k", "blk.{i}.attn_v"),
    o: "blk.{i}.attn_output",
    q_norm: "blk.{i}.attn_q_norm",
    k_norm: "blk.{i}.attn_k_norm",
    post_attn_norm: "blk.{i}.post_attention_norm",
    ffn_norm: "blk.{i}.ffn_norm",
    post_ffn_norm: "blk.{i}.post_ffw_norm",
    mlp_in: MlpIn::Gated("blk.{i}.ffn_gate", "blk.{i}.ffn_up"),
    down: "blk.{i}.ffn_down",
};

/// Hugging Face's Llama names, which most of these architectures share.
const HF_LLAMA: Names = Names {
    embed: "model.embed_tokens.weight",
    pos_embed: "",
    conv1d: false,
    final_norm: "model.norm",
    lm_head: "lm_head",
    attn_norm: "model.layers.{i}.input_layernorm",
    qkv: Qkv::Separate("model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.v_proj"),
    o: "model.layers.{i}.self_attn.o_proj",
    q_norm: "model.layers.{i}.self_attn.q_norm",
    k_norm: "model.layers.{i}.self_attn.k_norm",
    post_attn_norm: "",
    ffn_norm: "model.layers.{i}.post_attention_layernorm",
    post_ffn_norm: "",
    mlp_in: MlpIn::Gated("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj"),
    down: "model.layers.{i}.mlp.down_proj",
};

fn names(model_type: &str, gguf: bool) -> Names {
    match (model_type, gguf) {
        ("phi3", false) => Names {
            qkv: Qkv::Fused("model.layers.{i}.self_attn.qkv_proj"),
            mlp_in: MlpIn::FusedGated("model.layers.{i}.mlp.gate_up_proj"),
            ..HF_LLAMA
        },
        ("phi3", true) => Names { qkv: Qkv::Fused("blk.{i}.attn_qkv"), mlp_in: MlpIn::FusedGated("blk.{i}.ffn_up"), ..GGUF },
        ("gemma3_text", false) => Names {
            post_attn_norm: "model.layers.{i}.post_attention_layernorm",
            ffn_norm: "model.layers.{i}.pre_feedforward_layernorm",
            post_ffn_norm: "model.layers.{i}.post_feedforward_layernorm",
            ..HF_LLAMA
        },
        ("gpt_neox", false) => Names {
            embed: "gpt_neox.embed_in.weight",
            final_norm: "gpt_neox.final_layer_norm",
            lm_head: "embed_out",
            attn_norm: "gpt_neox.layers.{i}.input_layernorm",
            qkv: Qkv::FusedPerHead("gpt_neox.layers.{i}.attention.query_key_value"),
            o: "gpt_neox.layers.{i}.attention.dense",
            ffn_norm: "gpt_neox.layers.{i}.post_attention_layernorm",
            mlp_in: MlpIn::Plain("gpt_neox.layers.{i}.mlp.dense_h_to_4h"),
            down: "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
            ..HF_LLAMA
        },
        // llama.cpp's converter reorders GPT-NeoX's per-head query_key_value into [q | k | v]
        ("gpt_neox", true) => Names { qkv: Qkv::Fused("blk.{i}.attn_qkv"), mlp_in: MlpIn::Plain("blk.{i}.ffn_up"), ..GGUF },
        // (the loader also finds these under transformer., as GPT2LMHeadModel saves them)
        ("gpt2", false) => Names {
            embed: "wte.weight",
            pos_embed: "wpe.weight",
            conv1d: true,
            final_norm: "ln_f",
            lm_head: "lm_head",
            attn_norm: "h.{i}.ln_1",
            qkv: Qkv::Fused("h.{i}.attn.c_attn"),
            o: "h.{i}.attn.c_proj",
            ffn_norm: "h.{i}.ln_2",
            mlp_in: MlpIn::Plain("h.{i}.mlp.c_fc"),
            down: "h.{i}.mlp.c_proj",
            ..HF_LLAMA
        },
        ("gpt2", true) => Names { qkv: Qkv::Fused("blk.{i}.attn_qkv"), mlp_in: MlpIn::Plain("blk.{i}.ffn_up"), ..GGUF },
        (_, false) => HF_LLAMA,
        (_, true) => GGUF,
    }
}

struct Block {
    attn_norm: Norm,
    /// q, k and v projections side by side: [H·D | Hkv·D | Hkv·D] outputs
    qkv: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    o: Linear,
    post_attn_norm: Option<Norm>,
    ffn_norm: Norm,
    post_ffn_norm: Option<Norm>,
    /// gated: [gate | up] side by side; plain: up
    mlp_in: Linear,
    down: Linear,
    window: Option<usize>,
    /// index into `Decoder::ropes`, or None (no positions in this layer)
    rope: Option<usize>,
}

pub struct Decoder {
    pub cfg: Config,
    embed_tokens: Table, // [V, C]
    /// learned positions [P, C] (GPT-2)
    embed_positions: Option<Tensor>,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    /// per RoPE table: cos and sin [P, rotary_dim/2]
    ropes: Vec<(Tensor, Tensor)>,
    act: DType,
    mlp_act: Act,
    /// GGUF "llama" files store q/k permuted for llama.cpp's interleaved ("normal") RoPE; HF checkpoints and
    /// llama.cpp's other architectures use rotate_half ("neox").
    rope_interleaved: bool,
    /// what a decode step on the thread team needs (None: every step takes the general path)
    step_plan: Option<Box<step::Plan>>,
}

impl Decoder {
    /// From a Hugging Face checkpoint; `quant` quantizes the projections at load time.
    pub fn load(cfg: &Config, w: &Weights, dtype: DType, device: &Device, quant: Option<GgmlDType>) -> Result<Self> {
        let act = crate::nn::compute_dtype(dtype, device);
        Self::build(cfg, &Source::Safetensors { w, dtype, act, quant }, device)
    }

    /// From a GGUF file (llama.cpp names: blk.N.attn_q, ...): projections stay quantized, the rest is f32.
    pub fn load_gguf(cfg: &Config, g: &Gguf, device: &Device) -> Result<Self> {
        Self::build(cfg, &Source::Gguf { g, device }, device)
    }

    fn build(cfg: &Config, src: &Source, device: &Device) -> Result<Self> {
        let gguf = src.is_gguf();
        let n = names(&cfg.model_type, gguf);
        let (c, d, h, hkv, f) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let eps = cfg.norm_eps;
        // Gemma's RMSNorm is x̂·(1 + w): from safetensors the 1 is added here; llama.cpp's converter stores 1 + w.
        let plus_one = cfg.norm_plus_one && !gguf;
        let norm = |name: &str, size: usize| -> Result<Norm> {
            let weight = src.dense(&format!("{name}.weight"), &[size])?;
            let weight = if plus_one { (weight + 1.0)? } else { weight };
            let bias = if cfg.layer_norm { Some(src.dense(&format!("{name}.bias"), &[size])?) } else { None };
            Ok(Norm { weight, bias, eps })
        };
        let opt_norm = |name: &str, size: usize, on: bool| -> Result<Option<Norm>> { if on { norm(name, size).map(Some) } else { Ok(None) } };
        let mlp_act = activation(&cfg.hidden_act, &cfg.model_type)?;
        let sandwich = cfg.residual == Residual::Sandwich;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let at = |s: &str| s.replace("{i}", &i.to_string());
            let qkv = match n.qkv {
                Qkv::Separate(q, k, v) => src.proj(&[(&at(q), h * d), (&at(k), hkv * d), (&at(v), hkv * d)], c, cfg.qkv_bias, n.conv1d)?,
                Qkv::Fused(name) => src.proj(&[(&at(name), (h + 2 * hkv) * d)], c, cfg.qkv_bias, n.conv1d)?,
                Qkv::FusedPerHead(name) => per_head_qkv(src, &at(name), h, d, c, cfg.qkv_bias)?,
            };
            let mlp_in = match n.mlp_in {
                MlpIn::Gated(g, u) => src.proj(&[(&at(g), f), (&at(u), f)], c, cfg.mlp_bias, n.conv1d)?,
                MlpIn::FusedGated(name) => src.proj(&[(&at(name), 2 * f)], c, cfg.mlp_bias, n.conv1d)?,
                MlpIn::Plain(name) => src.proj(&[(&at(name), f)], c, cfg.mlp_bias, n.conv1d)?,
            };
            layers.push(Block {
                attn_norm: norm(&at(n.attn_norm), c)?,
                qkv,
                q_norm: opt_norm(&at(n.q_norm), d, cfg.qk_norm)?,
                k_norm: opt_norm(&at(n.k_norm), d, cfg.qk_norm)?,
                o: src.proj(&[(&at(n.o), c)], h * d, cfg.o_bias, n.conv1d)?,
                post_attn_norm: opt_norm(&at(n.post_attn_norm), c, sandwich)?,
                ffn_norm: norm(&at(n.ffn_norm), c)?,
                post_ffn_norm: opt_norm(&at(n.post_ffn_norm), c, sandwich)?,
                mlp_in,
                down: src.proj(&[(&at(n.down), c)], f, cfg.mlp_bias, n.conv1d)?,
                window: cfg.layer_window[i],
                rope: cfg.layer_rope[i],
            });
        }
        let embed_positions =
            if cfg.learned_positions { Some(src.dense(n.pos_embed, &[cfg.max_position_embeddings, c])?) } else { None };
        let own_head = src.has(&format!("{}.weight", n.lm_head)) && (gguf || !cfg.tie_word_embeddings);
        let embed_name = n.embed.trim_end_matches(".weight");
        let lm_head = if own_head {
            src.proj(&[(n.lm_head, cfg.vocab_size)], c, false, false)?
        } else {
            // tied: the (unscaled) embedding table
            src.proj(&[(embed_name, cfg.vocab_size)], c, false, false)?
        };
        // The embedding table is not held twice: a tied one reads its rows from the output projection (its
        // blocks, or its panels where they hold the checkpoint's numbers exactly); a GGUF table in a block format
        // our kernels take stays in it. Rows are dequantized or widened at lookup. Anything else is dense.
        let (scale, dev) = (cfg.embed_scale, device.clone());
        let table = match &lm_head {
            // (a GGUF file's own blocks; a checkpoint quantized at load keeps its table exact)
            Linear::Blocks(w, None) if !own_head && gguf => Some(Table::Blocks { w: w.clone(), scale, device: dev.clone() }),
            Linear::Dense(d) if !own_head && src.dense_is_exact() => {
                d.panels().map(|p| Table::Panels { p: p.clone(), scale, device: dev.clone() })
            }
            _ => None,
        };
        let table = match table {
            None if gguf => match src.proj(&[(embed_name, cfg.vocab_size)], c, false, false)? {
                Linear::Blocks(w, None) => Some(Table::Blocks { w, scale, device: dev }),
                _ => None,
            },
            t => t,
        };
        let embed_tokens = match table {
            Some(t) => t,
            None => {
                let t = src.dense(n.embed, &[cfg.vocab_size, c])?;
                Table::Dense(match cfg.embed_scale {
                    Some(s) => (t * s)?,
                    None => t,
                })
            }
        };
        let act = src.act();
        // tables only where some layer turns (none for GPT-2)
        let used = if cfg.layer_rope.iter().any(Option::is_some) { cfg.ropes.len() } else { 0 };
        let ropes = cfg.ropes[..used]
            .iter()
            .map(|r| {
                let inv = ops::rope_inv_freq(cfg.rotary_dim, r.theta, &r.scaling);
                let (cos, sin) = ops::rope_tables(&inv, cfg.max_position_embeddings, DType::F64, device)?;
                let a = ops::rope_attention_factor(&r.scaling);
                Ok(((cos * a)?.to_dtype(act)?, (sin * a)?.to_dtype(act)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut m = Self {
            cfg: cfg.clone(),
            embed_tokens,
            embed_positions,
            layers,
            norm: norm(n.final_norm, c)?,
            lm_head,
            ropes,
            act,
            mlp_act,
            // llama.cpp's converter permutes q/k for its interleaved RoPE in Llama and SmolLM3 files
            rope_interleaved: gguf && matches!(cfg.model_type.as_str(), "llama" | "smollm3"),
            step_plan: None,
        };
        m.step_plan = step::Plan::new(&m).map(Box::new);
        Ok(m)
    }

    /// RoPE on the first `rotary_dim` dimensions of each head of x [B, n, T, D]; cos/sin [B, T, rotary_dim/2].
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (rd, d) = (self.cfg.rotary_dim, self.cfg.head_dim);
        let turn = |x: &Tensor| -> Result<Tensor> {
            if self.rope_interleaved {
                Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)?)
            } else {
                ops::rope_apply(x, cos, sin)
            }
        };
        if rd == d {
            return turn(x);
        }
        let rot = turn(&x.narrow(3, 0, rd)?)?;
        Ok(Tensor::cat(&[&rot, &x.narrow(3, rd, d - rd)?], 3)?)
    }

    /// The MLP on normed input [B, T, C].
    fn mlp(&self, blk: &Block, x: &Tensor) -> Result<Tensor> {
        let y = blk.mlp_in.forward(x)?;
        let g = if self.cfg.gated_mlp {
            match self.mlp_act {
                Act::Silu => ops::swiglu(&y)?, // silu(gate) · up, one pass
                a => {
                    let f = self.cfg.intermediate_size;
                    (ops::gelu(&y.narrow(2, 0, f)?, gelu_kind(a))? * y.narrow(2, f, f)?)?
                }
            }
        } else {
            match self.mlp_act {
                Act::Silu => ops::silu(&y)?,
                a => ops::gelu(&y, gelu_kind(a))?,
            }
        };
        blk.down.forward(&g)
    }

    /// The rest of a block once attention has given y [B, T, H·D]: output projection, MLP and the residual
    /// wiring of this architecture.
    fn finish_block(&self, blk: &Block, x: Tensor, y: &Tensor) -> Result<Tensor> {
        let a = blk.o.forward(y)?;
        Ok(match self.cfg.residual {
            Residual::Sequential => {
                let x = (x + a)?;
                let m = self.mlp(blk, &blk.ffn_norm.forward(&x)?)?;
                (x + m)?
            }
            Residual::Parallel => {
                let m = self.mlp(blk, &blk.ffn_norm.forward(&x)?)?;
                ((x + a)? + m)?
            }
            Residual::Sandwich => {
                let post = blk.post_attn_norm.as_ref().expect("sandwich blocks have it");
                let x = (x + post.forward(&a)?)?;
                let m = self.mlp(blk, &blk.ffn_norm.forward(&x)?)?;
                let post = blk.post_ffn_norm.as_ref().expect("sandwich blocks have it");
                (x + post.forward(&m)?)?
            }
        })
    }

    /// `forward_paged` and the output projection: the logits of `out_rows`, through the team's decode step where
    /// it applies (`step`), else the general path. `buf`: memory for the logits (the team writes into it).
    pub fn paged_logits(&self, step: &PagedStep, pool: &mut KvPool, buf: Vec<f32>) -> Result<Logits> {
        let hidden = match self.decode_step(step, pool, buf)? {
            Some(step::StepOut::Logits(l)) => return Ok(l),
            Some(step::StepOut::Hidden(h)) => h,
            None => self.forward_paged(step, pool)?,
        };
        if step.out_rows.is_empty() {
            return Ok(Logits::default());
        }
        let logits = self.lm_head(&hidden)?.to_dtype(DType::F32)?;
        let (rows, vocab) = logits.dims2()?;
        Ok(Logits::new(logits.flatten_all()?.to_vec1::<f32>()?, rows, vocab))
    }

    /// A flattened (ragged) batch of N tokens from many sequences: ids and positions [N], the keys and values of
    /// the sequences' earlier positions in `pool`, and the pool slots this step's keys and values go to [N].
    /// Returns the final hidden states [M, C] of the rows `out_rows` (those whose next token is wanted).
    ///
    /// Every projection, norm and MLP works on the N rows as one matrix; attention goes sequence by sequence over
    /// the pool (nn::paged). The last block runs attention and MLP for `out_rows` only.
    pub fn forward_paged(&self, step: &PagedStep, pool: &mut KvPool) -> Result<Tensor> {
        let PagedStep { ids, positions, slots, seqs, out_rows } = *step;
        let n = ids.len();
        let (h, hkv, d) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let dev = self.embed_tokens.device();
        let half = self.cfg.rotary_dim / 2;
        let pos = Tensor::new(positions, dev)?;
        let tables = self
            .ropes
            .iter()
            .map(|(cos, sin)| Ok((cos.index_select(&pos, 0)?.reshape((1, n, half))?, sin.index_select(&pos, 0)?.reshape((1, n, half))?)))
            .collect::<Result<Vec<_>>>()?;
        let ids_t = Tensor::new(ids, dev)?.unsqueeze(0)?;
        let mut x = self.embed_tokens.lookup(&ids_t)?; // [1, N, C]
        if let Some(wpe) = &self.embed_positions {
            x = (x + embed(wpe, &pos.unsqueeze(0)?)?)?;
        }
        // the last block's queries: one row (the last) of each sequence that wants its next token
        let wanted: std::collections::HashSet<u32> = out_rows.iter().copied().collect();
        let last_seqs: Vec<PagedSeq> = seqs
            .iter()
            .map(|s| {
                let last = (s.row0 + s.rows - 1) as u32;
                PagedSeq { rows: usize::from(s.rows > 0 && wanted.contains(&last)), ..*s }
            })
            .scan(0, |row, s| {
                let out = PagedSeq { row0: *row, ..s };
                *row += s.rows;
                Some(out)
            })
            .collect();
        let last_idx = Tensor::new(out_rows, dev)?;
        for (i, blk) in self.layers.iter().enumerate() {
            let last = i + 1 == self.layers.len();
            let hn = blk.attn_norm.forward(&x)?;
            let qkv = blk.qkv.forward(&hn)?; // [1, N, (H + 2·Hkv)·D]
            let mut q = qkv.narrow(2, 0, h * d)?.reshape((1, n, h, d))?;
            let mut k = qkv.narrow(2, h * d, hkv * d)?.reshape((1, n, hkv, d))?;
            let v = qkv.narrow(2, (h + hkv) * d, hkv * d)?.reshape((n, hkv * d))?;
            if let (Some(qn), Some(kn)) = (&blk.q_norm, &blk.k_norm) {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            let mut q = q.transpose(1, 2)?.contiguous()?; // [1, H, N, D]
            if let Some(r) = blk.rope {
                let (cos, sin) = &tables[r];
                q = self.rope(&q, cos, sin)?;
                k = self.rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?.transpose(1, 2)?;
            }
            pool.write(i, slots, &k.reshape((n, hkv * d))?, &v)?;
            if last && out_rows.is_empty() {
                return Ok(Tensor::zeros((0, self.cfg.hidden_size), x.dtype(), dev)?); // a step of prompt chunks only
            }
            let scale = self.cfg.attn_scale / if self.cfg.attn_scale_by_layer { (i + 1) as f64 } else { 1.0 };
            let bs = pool.block_size;
            let (q, att_seqs) = if last { (q.contiguous()?.index_select(&last_idx, 2)?, &last_seqs[..]) } else { (q, seqs) };
            let y = crate::nn::paged::attention(&q, pool.layer(i), att_seqs, bs, hkv, scale, blk.window, self.cfg.attn_softcap)?;
            if last {
                x = x.contiguous()?.index_select(&last_idx, 1)?;
            }
            x = self.finish_block(blk, x, &merge_heads(&y)?)?;
        }
        Ok(self.norm.forward(&x)?.squeeze(0)?)
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
        let half = self.cfg.rotary_dim / 2;
        let pos = positions.flatten_all()?;
        let tables = self
            .ropes
            .iter()
            .map(|(cos, sin)| Ok((cos.index_select(&pos, 0)?.reshape((b, t, half))?, sin.index_select(&pos, 0)?.reshape((b, t, half))?)))
            .collect::<Result<Vec<_>>>()?;
        let mut x = self.embed_tokens.lookup(ids)?; // [B, T, C]
        if let Some(wpe) = &self.embed_positions {
            x = (x + embed(wpe, positions)?)?;
        }
        for (i, blk) in self.layers.iter().enumerate() {
            let last = last_only && i + 1 == self.layers.len();
            let hn = blk.attn_norm.forward(&x)?;
            let qkv = blk.qkv.forward(&hn)?; // [B, T, (H + 2·Hkv)·D]
            let mut q = split_heads(&qkv.narrow(2, 0, h * d)?, h, d)?; // [B, H, T, D]
            let mut k = split_heads(&qkv.narrow(2, h * d, hkv * d)?, hkv, d)?; // [B, Hkv, T, D]
            let v = split_heads(&qkv.narrow(2, (h + hkv) * d, hkv * d)?, hkv, d)?;
            if let (Some(qn), Some(kn)) = (&blk.q_norm, &blk.k_norm) {
                q = qn.forward(&q)?;
                k = kn.forward(&k)?;
            }
            if let Some(r) = blk.rope {
                let (cos, sin) = &tables[r];
                q = self.rope(&q, cos, sin)?;
                k = self.rope(&k, cos, sin)?;
            }
            let (k, v) = cache.append(i, k, v)?;
            let (q, mask_q) = last_rows(last, t, q, mask)?;
            // GPT-2's scale_attn_by_inverse_layer_idx: scores / (i + 1) as well
            let scale = self.cfg.attn_scale / if self.cfg.attn_scale_by_layer { (i + 1) as f64 } else { 1.0 };
            let y = ops::attention_with(&q, &k, &v, mask.is_none(), mask_q.as_ref(), Some(scale), blk.window, self.cfg.attn_softcap)?;
            if last {
                x = x.narrow(1, t - 1, 1)?;
            }
            x = self.finish_block(blk, x, &merge_heads(&y)?)?;
            if let Some(out) = layers_out.as_deref_mut() {
                out.push(x.clone());
            }
        }
        self.norm.forward(&x)
    }

    /// hidden [.., C] -> logits [.., V] (f32), soft-capped where the config says (Gemma).
    pub fn lm_head(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?.to_dtype(DType::F32)?;
        Ok(match self.cfg.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    pub fn act_dtype(&self) -> DType {
        self.act
    }
}

/// The GELU of a GELU activation.
fn gelu_kind(a: Act) -> ops::Gelu {
    if a == Act::GeluTanh { ops::Gelu::Tanh } else { ops::Gelu::Erf }
}

/// GPT-NeoX's query_key_value [H·3·D, C] (rows head by head: q_h, k_h, v_h) as one [q | k | v] projection.
fn per_head_qkv(src: &Source, name: &str, h: usize, d: usize, c: usize, bias: bool) -> Result<Linear> {
    let Source::Safetensors { w, dtype, act, quant } = src else {
        return Err(Error::ModelLoad(format!("{name}: a per-head fused qkv is a safetensors layout")));
    };
    let reorder = |t: Tensor, inner: &[usize]| -> Result<Tensor> {
        let mut dims = vec![h, 3, d];
        dims.extend_from_slice(inner);
        let mut out = vec![3 * h * d];
        out.extend_from_slice(inner);
        Ok(t.reshape(dims)?.transpose(0, 1)?.contiguous()?.reshape(out)?)
    };
    let weight = reorder(w.get(&format!("{name}.weight"), &[3 * h * d, c], *dtype)?, &[c])?;
    let b = if bias { Some(reorder(w.get(&format!("{name}.bias"), &[3 * h * d], *act)?, &[])?) } else { None };
    Linear::new(weight, b, *quant)
}
