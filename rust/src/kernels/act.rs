//! Vectorised CPU element-wise activations. Candle evaluates GELU (tanh form) and SiLU one element at a time through
//! libm's `tanhf`/`expf`, which took 10-15% of a GPT-2 prefill; these use a polynomial `exp` (Cephes `expf`, within
//! ~2 ulp) that LLVM vectorises, compiled for AVX2+FMA (chosen at run time) and for the baseline instruction set,
//! and split over the threads for large tensors.
//!
//! GELU is evaluated as x·σ(2z) (= ½x(1 + tanh z), z = √(2/π)(x + 0.044715x³)), which stays accurate for very
//! negative x where 1 + tanh z cancels.

use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// e^x for x in [-87.3, 88.7] (clamped outside: e^x saturates to ~1e-38 or ~3e38 rather than 0 or inf).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.7);
    // round(x·log2 e) by the 1.5·2^23 trick: no floor/round call, so it vectorises on any SIMD level
    let fx = (x * LOG2E + 12_582_912.0) - 12_582_912.0;
    let r = x - fx * C1 - fx * C2;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r
        + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((fx as i32 + 127) as u32) << 23)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// ½x(1 + tanh(√(2/π)(x + 0.044715x³)))
    GeluTanh,
    /// x·σ(x)
    Silu,
}

#[inline(always)]
fn act(a: Act, x: f32) -> f32 {
    match a {
        Act::GeluTanh => {
            const K: f32 = 0.797_884_6; // √(2/π)
            let z = K * (x + 0.044_715 * x * x * x);
            x / (1.0 + exp(-2.0 * z))
        }
        Act::Silu => x / (1.0 + exp(-x)),
    }
}

#[inline(always)]
fn apply_generic(a: Act, src: &[f32], dst: &mut [f32]) {
    match a {
        Act::GeluTanh => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = act(Act::GeluTanh, s)),
        Act::Silu => dst.iter_mut().zip(src).for_each(|(d, &s)| *d = act(Act::Silu, s)),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn apply_avx2(a: Act, src: &[f32], dst: &mut [f32]) {
    apply_generic(a, src, dst)
}

/// dst[i] = act(src[i]) on this thread.
pub fn apply(a: Act, src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if super::cpu::isa() >= super::cpu::Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (the Avx2 level).
        return unsafe { apply_avx2(a, src, dst) };
    }
    apply_generic(a, src, dst)
}

#[inline(always)]
fn silu_mul_generic(src: &[f32], dst: &mut [f32], f: usize) {
    for (row, out) in src.chunks_exact(2 * f).zip(dst.chunks_exact_mut(f)) {
        let (gate, up) = row.split_at(f);
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = act(Act::Silu, g) * u;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(src: &[f32], dst: &mut [f32], f: usize) {
    silu_mul_generic(src, dst, f)
}

/// SwiGLU on fused gate/up rows: src rows of 2f ([gate | up]) -> dst rows of f, silu(gate)·up, on this thread.
pub fn silu_mul(src: &[f32], dst: &mut [f32], f: usize) {
    assert!(f > 0 && src.len() == 2 * dst.len() && dst.len().is_multiple_of(f));
    #[cfg(target_arch = "x86_64")]
    if super::cpu::isa() >= super::cpu::Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (the Avx2 level).
        return unsafe { silu_mul_avx2(src, dst, f) };
    }
    silu_mul_generic(src, dst, f)
}

/// x ← exp(x - max x) in place; returns Σ exp(x - max x) (a softmax row before its division).
pub fn exp_shifted_sum(x: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::isa() >= super::cpu::Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (the Avx2 level).
        return unsafe { exp_shifted_sum_avx2(x) };
    }
    exp_shifted_sum_generic(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_sum_avx2(x: &mut [f32]) -> f32 {
    exp_shifted_sum_generic(x)
}

#[inline(always)]
fn exp_shifted_sum_generic(x: &mut [f32]) -> f32 {
    const L: usize = 16;
    let mut m = [f32::NEG_INFINITY; L];
    let mut chunks = x.chunks_exact(L);
    for c in &mut chunks {
        for l in 0..L {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let max = chunks.remainder().iter().chain(&m).fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = [0f32; L];
    let mut chunks = x.chunks_exact_mut(L);
    for c in &mut chunks {
        for l in 0..L {
            let e = exp(c[l] - max);
            c[l] = e;
            s[l] += e;
        }
    }
    let mut sum: f32 = s.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        sum += *v;
    }
    sum
}

/// `f` on the data of an f32 CPU tensor (made contiguous), None for other dtypes and devices.
fn with_cpu_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    Ok(Some(f(&cpu.as_slice::<f32>()?[start..end])))
}

/// Elements per parallel task, and the least work worth splitting.
const CHUNK: usize = 16 * 1024;

/// The activation of a tensor: the vectorised kernels for f32 on CPU, None otherwise (the caller falls back).
pub fn activation(x: &Tensor, a: Act) -> Result<Option<Tensor>> {
    let out = with_cpu_f32(x, |src| {
        let mut out = vec![0f32; src.len()];
        if src.len() >= 4 * CHUNK {
            out.par_chunks_mut(CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(d, s)| apply(a, s, d));
        } else {
            apply(a, src, &mut out);
        }
        out
    })?;
    out.map(|o| Ok(Tensor::from_vec(o, x.shape(), x.device())?)).transpose()
}

/// y [..., 2F] (gate then up) -> silu(gate)·up [..., F]: the vectorised kernel for f32 on CPU, None otherwise.
pub fn swiglu(y: &Tensor) -> Result<Option<Tensor>> {
    let Some(&last) = y.dims().last() else { return Ok(None) };
    if last == 0 || last % 2 != 0 {
        return Ok(None);
    }
    let f = last / 2;
    let mut shape = y.dims().to_vec();
    *shape.last_mut().unwrap() = f;
    let out = with_cpu_f32(y, |src| {
        let mut out = vec![0f32; src.len() / 2];
        let rows_per_task = (CHUNK / f).max(1);
        if out.len() >= 4 * CHUNK {
            out.par_chunks_mut(rows_per_task * f).zip(src.par_chunks(rows_per_task * 2 * f)).for_each(|(d, s)| silu_mul(s, d, f));
        } else {
            silu_mul(src, &mut out, f);
        }
        out
    })?;
    out.map(|o| Ok(Tensor::from_vec(o, shape, y.device())?)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64) - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert!(exp(-200.0) < 1e-37 && exp(200.0) > 1e38);
    }

    #[test]
    fn activations_match_f64() {
        let xs: Vec<f32> = (0..20001).map(|i| (i as f32 - 10000.0) * 0.002).chain([-30.0, -90.0, 50.0, 0.0]).collect();
        let mut g = vec![0f32; xs.len()];
        let mut s = vec![0f32; xs.len()];
        apply(Act::GeluTanh, &xs, &mut g);
        apply(Act::Silu, &xs, &mut s);
        apply_generic(Act::GeluTanh, &xs, &mut g.clone()); // the baseline path compiles and runs too
        for (i, &x) in xs.iter().enumerate() {
            let x64 = x as f64;
            let gw = 0.5 * x64 * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3))).tanh());
            let sw = x64 / (1.0 + (-x64).exp());
            assert!((g[i] as f64 - gw).abs() <= 1e-6 * gw.abs().max(1e-3), "gelu({x}) = {} vs {gw}", g[i]);
            assert!((s[i] as f64 - sw).abs() <= 1e-6 * sw.abs().max(1e-3), "silu({x}) = {} vs {sw}", s[i]);
        }
        let mut generic = vec![0f32; xs.len()];
        apply_generic(Act::Silu, &xs, &mut generic);
        for (a, b) in generic.iter().zip(&s) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3));
        }
    }

    #[test]
    fn exp_shifted_sum_is_a_softmax() {
        for n in [1usize, 7, 16, 33, 500] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 1.7).collect();
            let mut y = x.clone();
            let sum = exp_shifted_sum(&mut y);
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let want: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
            assert!(((sum as f64) - want).abs() <= 1e-6 * want);
            for (a, &b) in y.iter().zip(&x) {
                assert!(((*a as f64) - (b as f64 - m).exp()).abs() <= 1e-6);
            }
        }
    }

    #[test]
    fn swiglu_matches_candle() {
        let dev = candle_core::Device::Cpu;
        for rows in [1usize, 3, 200] {
            let y = Tensor::randn(0f32, 3.0, (rows, 2 * 384), &dev).unwrap();
            let want = (y.narrow(1, 0, 384).unwrap().silu().unwrap() * y.narrow(1, 384, 384).unwrap()).unwrap();
            let got = swiglu(&y).unwrap().unwrap();
            assert_eq!(got.dims(), want.dims());
            let d: f32 = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d <= 1e-6 * scale, "rows {rows}: max difference {d}");
        }
    }

    #[test]
    fn tensor_activation_matches_candle() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (3, 50_000), &dev).unwrap();
        for (a, want) in [(Act::GeluTanh, x.gelu().unwrap()), (Act::Silu, x.silu().unwrap())] {
            let got = activation(&x, a).unwrap().unwrap();
            let d: f32 = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-5, "{a:?}: max difference {d}");
        }
        // a non-contiguous input
        let xt = x.t().unwrap();
        let got = activation(&xt, Act::Silu).unwrap().unwrap();
        let d: f32 = (got - xt.silu().unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-5);
    }
}
