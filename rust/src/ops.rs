//! The kernels the models are made of, on Candle tensors. Same names and meanings as
//! `candlewick.reference.functional` (the NumPy oracle) and `candlewick.ops` (these, from Python).
//!
//! Shape legend: B batch, T tokens, C channels, H heads, Hkv key/value heads, D head dim, V vocabulary.

use candle_core::{CpuStorage, DType, Device, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::config::RopeScaling;
use crate::error::{Error, Result};

/// softmax(x)_i = exp(x_i - max x) / Σ_j exp(x_j - max x), along `dim`.
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    if dim + 1 == x.rank() {
        Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?)
    } else {
        Ok(candle_nn::ops::softmax(x, dim)?)
    }
}

/// log_softmax(x)_i = x_i - logsumexp(x), along `dim`.
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// The causal mask as an additive bias [Tq, Tk]: 0 where key j is visible from query i, -inf after it (the
/// boolean form, True = may attend, is `candlewick.ops.causal_mask`). With Tq < Tk the queries are the last Tq
/// positions (decoding with a cache), so query i sits at position Tk - Tq + i.
pub fn causal_bias(tq: usize, tk: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    window_mask(tq, tk, true, None, dtype, device)
}

/// Additive mask [Tq, Tk] for query i at position Tk - Tq + i: -inf on keys after it (when `causal`) and on keys
/// `window` or more positions before it (a sliding window: a query sees itself and the window - 1 keys before).
pub fn window_mask(tq: usize, tk: usize, causal: bool, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
    let off = tk.saturating_sub(tq);
    let w = window.unwrap_or(usize::MAX);
    let m: Vec<f32> = (0..tq)
        .flat_map(|i| {
            (0..tk).map(move |j| {
                let p = i + off;
                if (causal && j > p) || (j <= p && p - j >= w) { f32::NEG_INFINITY } else { 0.0 }
            })
        })
        .collect();
    Ok(Tensor::from_vec(m, (tq, tk), device)?.to_dtype(dtype)?)
}

/// A boolean mask (nonzero = attend) as an additive one (0 / -inf).
pub fn additive_mask(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    if mask.dtype().is_float() {
        return Ok(mask.to_dtype(dtype)?);
    }
    let zeros = Tensor::zeros(mask.shape(), dtype, mask.device())?;
    let neg = Tensor::full(f32::NEG_INFINITY, mask.shape(), mask.device())?.to_dtype(dtype)?;
    Ok(mask.to_dtype(DType::F32)?.ne(0f32)?.where_cond(&zeros, &neg)?)
}

/// Scaled dot-product attention: softmax(q·kᵀ·scale + mask)·v.
///
/// q [B, H, Tq, D], k and v [B, Hkv, Tk, D] with H % Hkv == 0 (grouped-query: query head h reads key/value head
/// h / (H / Hkv)); `mask` additive or boolean, broadcastable to [B, H, Tq, Tk]; `scale` defaults to 1/√D.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    mask: Option<&Tensor>,
    scale: Option<f64>,
) -> Result<Tensor> {
    attention_with(q, k, v, causal, mask, scale, None, None)
}

/// `attention` with a sliding window (query i, at position Tk - Tq + i, sees keys less than `window` positions
/// before it) and logit soft-capping (scores s -> cap·tanh(s / cap) before the mask, as Gemma does).
#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    mask: Option<&Tensor>,
    scale: Option<f64>,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (bk, hkv, tk, dk) = k.dims4()?;
    if bk != b || dk != d || v.dims4()? != (b, hkv, tk, d) || hkv == 0 || h % hkv != 0 {
        return Err(Error::arg(format!(
            "attention: q {:?}, k {:?}, v {:?} do not fit [B, H, Tq, D], [B, Hkv, Tk, D] with H % Hkv == 0",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if tk == 0 {
        return Err(Error::arg(format!("attention: k {:?} has no keys (Tk = 0)", k.dims())));
    }
    if causal && tq > tk {
        return Err(Error::arg(format!(
            "attention: causal with more queries (Tq = {tq}) than keys (Tk = {tk}): q {:?}, k {:?}",
            q.dims(),
            k.dims()
        )));
    }
    let rep = h / hkv;
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    if window == Some(0) || softcap.is_some_and(|c| c.is_nan() || c <= 0.0) {
        return Err(Error::arg(format!("attention: window must be >= 1 and softcap > 0, got {window:?}, {softcap:?}")));
    }
    if tq > tk && window.is_some() {
        return Err(Error::arg(format!("attention: a sliding window needs Tq <= Tk, got q {:?}, k {:?}", q.dims(), k.dims())));
    }
    if let Some(y) = crate::kernels::attention::attention(q, k, v, causal, mask, scale, window, softcap)? {
        return Ok(y); // f32 on CPU: blocked, skipping the keys a causal block cannot see
    }
    // The query heads that share a key/value head are adjacent, so [B, H, Tq, D] reads as
    // [B, Hkv, rep·Tq, D]: one matmul per key/value head, without copying k and v rep times.
    let qg = (q.contiguous()? * scale)?.reshape((b, hkv, rep * tq, d))?;
    let scores = qg.matmul(&k.contiguous()?.t()?)?.reshape((b, h, tq, tk))?; // [B, H, Tq, Tk]
    let mut scores = scores;
    if let Some(cap) = softcap {
        scores = ((scores / cap)?.tanh()? * cap)?;
    }
    if (causal && tq > 1) || window.is_some_and(|w| w < tk) {
        scores = scores.broadcast_add(&window_mask(tq, tk, causal, window, scores.dtype(), scores.device())?)?;
    }
    if let Some(m) = mask {
        scores = scores.broadcast_add(&additive_mask(m, scores.dtype())?)?;
    }
    let probs = softmax(&scores, 3)?.reshape((b, hkv, rep * tq, tk))?;
    Ok(probs.matmul(&v.contiguous()?)?.reshape((b, h, tq, d))?) // [B, H, Tq, D]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    Mean,
    Sum,
    None,
}

impl std::str::FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Self::Mean),
            "sum" => Ok(Self::Sum),
            "none" => Ok(Self::None),
            _ => Err(Error::arg(format!("reduction must be \"mean\", \"sum\" or \"none\", got {s:?}"))),
        }
    }
}

/// Cross-entropy -log softmax(logits)[target] per row; rows whose target is `ignore_index` count as 0 and are
/// left out of the mean. logits [N, V], targets [N] (i64).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: i64, reduction: Reduction) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    let t: Vec<i64> = targets.to_dtype(DType::I64)?.to_vec1()?;
    if t.len() != n {
        return Err(Error::arg(format!("cross_entropy: {n} rows of logits but {} targets", t.len())));
    }
    if let Some(bad) = t.iter().find(|&&x| x != ignore_index && (x < 0 || x >= v as i64)) {
        return Err(Error::arg(format!("cross_entropy: target {bad} is out of range for {v} classes")));
    }
    let keep: Vec<f32> = t.iter().map(|&x| if x == ignore_index { 0.0 } else { 1.0 }).collect();
    let idx: Vec<u32> = t.iter().map(|&x| if x == ignore_index { 0 } else { x as u32 }).collect();
    let dev = logits.device();
    let idx = Tensor::from_vec(idx, (n, 1), dev)?;
    let keep_t = Tensor::from_vec(keep.clone(), n, dev)?.to_dtype(logits.dtype())?;
    let nll = log_softmax(logits, 1)?.gather(&idx, 1)?.squeeze(1)?.neg()?.mul(&keep_t)?; // [N]
    Ok(match reduction {
        Reduction::None => nll,
        Reduction::Sum => nll.sum_all()?,
        Reduction::Mean => {
            let count: f32 = keep.iter().sum();
            (nll.sum_all()? / count as f64)?
        }
    })
}

/// (x - mean) / sqrt(var + eps) · weight + bias, over the last dimension.
///
/// Not candle-nn's fused layer_norm: it takes var = E[x²] - mean² in f32, which cancels catastrophically when
/// |mean| >> std (it loses ~1e-3 relative at mean 100, std 1, and can go negative). Here f32 on the CPU is one
/// fused pass per row with f64 sums (mean first, then Σ(x - mean)²); other dtypes and devices take the plain
/// tensor path, `layer_norm_naive`, which has the same two-pass maths.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if weight.dims() != [c] || bias.dims() != [c] {
        return Err(Error::arg(format!(
            "layer_norm: weight {:?} and bias {:?} must be [C] = [{c}] for x {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        )));
    }
    let same = weight.dtype() == x.dtype() && bias.dtype() == x.dtype();
    if x.device().is_cpu() && x.dtype() == DType::F32 && same && c > 0 {
        let (w, b) = (weight.contiguous()?, bias.contiguous()?);
        return Ok(x.contiguous()?.apply_op3_no_bwd(&w, &b, &LayerNormF32 { eps })?);
    }
    layer_norm_naive(x, weight, bias, eps)
}

/// The plain twin of `layer_norm`, in tensor ops: centre first, then the mean square (f32 inside for f16/bf16).
pub fn layer_norm_naive(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let inner = if matches!(dtype, DType::F16 | DType::BF16) { DType::F32 } else { dtype };
    let x = x.to_dtype(inner)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?; // [.., C]
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
    let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(&weight.to_dtype(inner)?)?.broadcast_add(&bias.to_dtype(inner)?)?.to_dtype(dtype)?)
}

/// The CPU f32 kernel of `layer_norm`: rows in parallel, f64 sums, two passes.
struct LayerNormF32 {
    eps: f64,
}

impl candle_core::CustomOp3 for LayerNormF32 {
    fn name(&self) -> &'static str {
        "candlewick-layer-norm-f32"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
            match (s, l.contiguous_offsets()) {
                (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
                _ => candle_core::bail!("layer_norm: {what} must be a contiguous f32 tensor"),
            }
        }
        let (x, w, b) = (slice(s1, l1, "x")?, slice(s2, l2, "weight")?, slice(s3, l3, "bias")?);
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(y, x)| {
            let n = c as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let inv_std = 1.0 / (var + self.eps).sqrt();
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                *y = ((x as f64 - mean) * inv_std * w as f64 + b as f64) as f32;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

/// x / sqrt(mean(x²) + eps) · weight, over the last dimension.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32)?)
}

/// Which GELU: PyTorch's `approximate` argument ("tanh" or "none").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// ½x(1 + tanh(√(2/π)(x + 0.044715x³))): GPT-2's gelu_new, gelu_pytorch_tanh
    Tanh,
    /// x·Φ(x), exact (BERT's gelu)
    Erf,
}

/// GELU, exact or in its tanh approximation.
pub fn gelu(x: &Tensor, approximate: Gelu) -> Result<Tensor> {
    if approximate == Gelu::Tanh {
        if let Some(y) = crate::kernels::act::activation(x, crate::kernels::act::Act::GeluTanh)? {
            return Ok(y); // f32 on CPU: vectorised
        }
    }
    Ok(match approximate {
        Gelu::Tanh => x.gelu()?,
        Gelu::Erf => x.gelu_erf()?,
    })
}

/// SiLU (swish): x·σ(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    if let Some(y) = crate::kernels::act::activation(x, crate::kernels::act::Act::Silu)? {
        return Ok(y); // f32 on CPU: vectorised
    }
    Ok(x.silu()?)
}

/// SwiGLU on fused gate/up projections: y [..., 2F] -> silu(y[..., :F]) · y[..., F:].
pub fn swiglu(y: &Tensor) -> Result<Tensor> {
    if let Some(out) = crate::kernels::act::swiglu(y)? {
        return Ok(out); // f32 on CPU: one vectorised pass
    }
    let last = y.rank() - 1;
    let f = y.dims()[last] / 2;
    Ok((silu(&y.narrow(last, 0, f)?)? * y.narrow(last, f, f)?)?)
}

/// The RoPE inverse frequencies θ^(-2i/D), i < D/2, with the config's scaling (linear or llama3), in f64.
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: &RopeScaling) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64)).collect();
    match *scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        RopeScaling::FreqFactors(ref f) => base.iter().zip(f.iter().chain(std::iter::repeat(&1.0))).map(|(b, f)| b / f).collect(),
        RopeScaling::Yarn { factor, original_max_position_embeddings: old, beta_fast, beta_slow, truncate, .. } => {
            // transformers' _compute_yarn_parameters: a ramp over the dimensions between the correction range of
            // beta_fast and beta_slow rotations blends interpolated (f / factor) and extrapolated (f) frequencies
            let dim = head_dim as f64;
            let corr = |rot: f64| dim * (old / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
            let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
            if low == high {
                high += 0.001;
            }
            base.iter()
                .enumerate()
                .map(|(i, &f)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    f / factor * (1.0 - extrapolation) + f * extrapolation
                })
                .collect()
        }
    }
}

/// The factor RoPE's cos and sin are multiplied by (YaRN's attention factor; 1 otherwise).
pub fn rope_attention_factor(scaling: &RopeScaling) -> f64 {
    match *scaling {
        RopeScaling::Yarn { attention_factor, .. } => attention_factor,
        _ => 1.0,
    }
}

/// cos and sin tables [P, D/2] for positions 0..P, computed in f64 then cast to `dtype`.
pub fn rope_tables(inv_freq: &[f64], positions: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let pos: Vec<i64> = (0..positions as i64).collect();
    rope_tables_at(inv_freq, &pos, dtype, device)
}

/// cos and sin tables [P, D/2] for the given positions (any order, any integers), in f64 then cast to `dtype`.
pub fn rope_tables_at(inv_freq: &[f64], positions: &[i64], dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let angles: Vec<f64> = positions.iter().flat_map(|&p| inv_freq.iter().map(move |f| p as f64 * f)).collect();
    let cos: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
    let cos = Tensor::from_vec(cos, (positions.len(), half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (positions.len(), half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Rotary position embedding from its tables, half-split ("rotate_half") convention: x [B, H, T, D], cos/sin
/// [T, D/2] or [B, T, D/2] for the positions of x (from `rope_tables_at`; Python's `rope(x, positions, ...)`
/// is `rope_inv_freq` → `rope_tables_at` → this).
pub fn rope_apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, &cos.contiguous()?, &sin.contiguous()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain per-position loop the fast attention must agree with.
    fn attention_naive(q: &[f32], k: &[f32], v: &[f32], t: usize, d: usize) -> Vec<f32> {
        let mut out = vec![0.0; t * d];
        for i in 0..t {
            let s: Vec<f32> = (0..=i)
                .map(|j| (0..d).map(|c| q[i * d + c] * k[j * d + c]).sum::<f32>() / (d as f32).sqrt())
                .collect();
            let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = s.iter().map(|x| (x - m).exp()).sum();
            for (j, sj) in s.iter().enumerate() {
                for c in 0..d {
                    out[i * d + c] += (sj - m).exp() / z * v[j * d + c];
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_naive_loop() {
        let (t, d) = (5, 4);
        let dev = Device::Cpu;
        let vals = |s: f32| (0..t * d).map(|i| ((i as f32) * s).sin()).collect::<Vec<f32>>();
        let (q, k, v) = (vals(0.37), vals(0.91), vals(1.3));
        let qt = Tensor::from_vec(q.clone(), (1, 1, t, d), &dev).unwrap();
        let kt = Tensor::from_vec(k.clone(), (1, 1, t, d), &dev).unwrap();
        let vt = Tensor::from_vec(v.clone(), (1, 1, t, d), &dev).unwrap();
        let got: Vec<f32> = attention(&qt, &kt, &vt, true, None, None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = attention_naive(&q, &k, &v, t, d);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn layer_norm_kernel_matches_naive_and_f64() {
        // A large mean beside a small spread: where E[x²] - mean² in f32 would lose three digits.
        let (rows, c) = (7, 33);
        let dev = Device::Cpu;
        let xs: Vec<f32> = (0..rows * c).map(|i| 1000.0 + ((i as f32) * 0.77).sin()).collect();
        let ws: Vec<f32> = (0..c).map(|i| 1.0 + (i as f32 * 0.3).cos()).collect();
        let bs: Vec<f32> = (0..c).map(|i| (i as f32 * 0.1).sin()).collect();
        let x = Tensor::from_vec(xs.clone(), (rows, c), &dev).unwrap();
        let w = Tensor::from_vec(ws.clone(), c, &dev).unwrap();
        let b = Tensor::from_vec(bs.clone(), c, &dev).unwrap();
        let fast: Vec<f32> = layer_norm(&x, &w, &b, 1e-5).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let naive: Vec<f32> = layer_norm_naive(&x, &w, &b, 1e-5).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for r in 0..rows {
            let row: Vec<f64> = xs[r * c..(r + 1) * c].iter().map(|&v| v as f64).collect();
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            for i in 0..c {
                let want = (row[i] - mean) / (var + 1e-5).sqrt() * ws[i] as f64 + bs[i] as f64;
                let (f, n) = (fast[r * c + i] as f64, naive[r * c + i] as f64);
                assert!((f - want).abs() < 1e-5 * want.abs().max(1.0), "kernel {f} vs {want}");
                // The naive path centres in f32, so x - mean carries 1000·2⁻²⁴ of rounding.
                assert!((n - want).abs() < 1e-3 * want.abs().max(1.0), "naive {n} vs {want}");
            }
        }
    }

    #[test]
    fn attention_rejects_causal_with_more_queries_than_keys() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 3, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 1, 2, 4), DType::F32, &dev).unwrap();
        assert!(matches!(attention(&q, &k, &k, true, None, None), Err(Error::InvalidArgument(_))));
        assert!(attention(&q, &k, &k, false, None, None).is_ok());
    }

    #[test]
    fn rope_tables_at_matches_rope_tables() {
        let inv = rope_inv_freq(8, 10000.0, &RopeScaling::None);
        let (c1, s1) = rope_tables(&inv, 5, DType::F32, &Device::Cpu).unwrap();
        let (c2, s2) = rope_tables_at(&inv, &[3, 4], DType::F32, &Device::Cpu).unwrap();
        let narrow = |t: &Tensor| t.narrow(0, 3, 2).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(narrow(&c1), c2.to_vec2::<f32>().unwrap());
        assert_eq!(narrow(&s1), s2.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn cross_entropy_ignores_rows() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &dev).unwrap();
        let t = Tensor::new(&[2i64, -100], &dev).unwrap();
        let l: f32 = cross_entropy(&logits, &t, -100, Reduction::Mean).unwrap().to_scalar().unwrap();
        let want = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln() - 3.0;
        assert!((l - want).abs() < 1e-6);
    }
}
