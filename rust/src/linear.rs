//! y = x·Wᵀ + b with W stored [out, in] as in PyTorch checkpoints.
//!
//! On CPU with f32 activations, `forward` uses its own kernels:
//! - few rows (M = product of x's leading dims <= `SMALL_M`; decoding is M = 1): each output is the dot product
//!   of a contiguous weight row with x, the weight rows split into chunks across all threads, so every weight
//!   is read once per call, at the width it is stored (a bf16/f16 weight is widened in registers, streaming half
//!   the bytes of f32). Candle's matmul instead runs a single-threaded gemv at M = 1 and, for bf16 weights,
//!   first converts the whole weight to f32 on every call.
//! - many rows (prefill): bf16/f16 weights are widened block by block (a few hundred rows at a time, which stay in
//!   cache) and each block multiplied by gemm, blocks spread over the threads: no f32 copy of the whole weight.
//!   f32 weights go to Candle's gemm directly.
//!
//! Everything else (other devices, f64 or half activations) keeps the plain Candle path, `forward_naive`.

use candle_core::{DType, Storage, Tensor, WithDType};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Up to this many rows of x, `forward` uses the matrix-vector kernel; above it, gemm.
pub const SMALL_M: usize = 8;

#[derive(Debug, Clone)]
pub struct Linear {
    /// [out, in]; f32, bf16 or f16 (on CPU, activations stay f32 whatever the weight dtype)
    weight: Tensor,
    /// [out]
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self { weight: weight.contiguous()?, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// x [..., in] -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cpu(x)? {
            return Ok(y);
        }
        self.forward_naive(x)
    }

    /// The plain Candle version: `x · Wᵀ + b`, converting a bf16/f16 weight to x's dtype first.
    pub fn forward_naive(&self, x: &Tensor) -> Result<Tensor> {
        let w = if self.weight.dtype() == x.dtype() { self.weight.clone() } else { self.weight.to_dtype(x.dtype())? };
        let y = x.broadcast_matmul(&w.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// The CPU kernels, or None where they do not apply (the caller then takes the Candle path).
    fn forward_cpu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (n, k) = self.weight.dims2()?;
        if !x.device().is_cpu() || !self.weight.device().is_cpu() || x.dtype() != DType::F32 || x.rank() == 0 {
            return Ok(None);
        }
        if x.dims()[x.rank() - 1] != k || k == 0 || n == 0 || x.elem_count() == 0 {
            return Ok(None); // let Candle report the shape error (or handle the empty case)
        }
        let m = x.elem_count() / k;
        if m > SMALL_M && self.weight.dtype() == DType::F32 {
            return Ok(None); // prefill in f32: Candle's gemm
        }
        let x = x.contiguous()?;
        let bias = match &self.bias {
            Some(b) if b.dims1()? != n => return Ok(None),
            Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        let out = match self.weight.dtype() {
            DType::F32 => self.run::<f32>(&x, m, k, n, bias.as_ref())?,
            DType::BF16 => self.run::<bf16>(&x, m, k, n, bias.as_ref())?,
            DType::F16 => self.run::<f16>(&x, m, k, n, bias.as_ref())?,
            _ => return Ok(None),
        };
        let mut dims = x.dims().to_vec();
        *dims.last_mut().unwrap() = n;
        Ok(Some(Tensor::from_vec(out, dims, x.device())?))
    }

    fn run<W: Elem>(&self, x: &Tensor, m: usize, k: usize, n: usize, bias: Option<&Tensor>) -> Result<Vec<f32>> {
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = self.weight.storage_and_layout();
        let bg = bias.map(|b| b.storage_and_layout());
        let xs = cpu_slice::<f32>(&xg, xl)?;
        let ws = cpu_slice::<W>(&wg, wl)?;
        let bs = match &bg {
            Some((g, l)) => Some(cpu_slice::<f32>(g, l)?),
            None => None,
        };
        if xs.len() != m * k || ws.len() != n * k || bs.is_some_and(|b| b.len() != n) {
            return Err(Error::arg(format!("linear: unexpected sizes for x [{m}, {k}] and weight [{n}, {k}]")));
        }
        Ok(if m <= SMALL_M { matvec(xs, m, k, ws, n, bs) } else { gemm_blocked(xs, m, k, ws, n, bs) })
    }
}

/// The contiguous data of a CPU tensor.
fn cpu_slice<'a, T: WithDType>(storage: &'a Storage, layout: &candle_core::Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else { return Err(Error::arg("linear: expected a CPU tensor")) };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| Error::arg("linear: expected a contiguous tensor"))?;
    Ok(&cpu.as_slice::<T>()?[start..end])
}

/// The activation dtype for weights of `dtype` on `device`: CPU computes in f32 (its matmuls have no bf16).
pub fn compute_dtype(dtype: DType, device: &candle_core::Device) -> DType {
    if device.is_cpu() { DType::F32 } else { dtype }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight element types

/// A weight element: f32, or a 16-bit float widened to f32 as it is read.
pub(crate) trait Elem: WithDType {
    fn to_f32(self) -> f32;
    /// Widen `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// The data itself when it is already f32.
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }
    /// 8 elements at `p`, widened; only called from functions compiled with avx2, fma and f16c.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn widen(src: &[f16], dst: &mut [f32]) {
        // half picks F16C / NEON at run time
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Few rows: matrix-vector products

/// Weight rows per parallel task: about 4 tasks per thread, each at least ~64 KiB of f32 work.
fn rows_per_task(n: usize, k: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads().max(1);
    n.div_ceil(tasks).max((16 * 1024) / k.max(1)).clamp(1, n.max(1))
}

/// out [M, N] = x [M, K] · w [N, K]ᵀ + bias, for small M: the weight rows are split into chunks over the threads
/// and each row is read once, against every row of x.
pub(crate) fn matvec<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    // Computed as outᵀ [N, M] so that each task owns one contiguous piece; transposed at the end when M > 1.
    let mut out_t = vec![0f32; n * m];
    let rows = rows_per_task(n, k);
    let task = |(ci, chunk): (usize, &mut [f32])| {
        let r0 = ci * rows;
        let nr = chunk.len() / m;
        rows_dot(x, m, k, &w[r0 * k..(r0 + nr) * k], nr, chunk);
        if let Some(b) = bias {
            for (j, o) in chunk.chunks_exact_mut(m).enumerate() {
                o.iter_mut().for_each(|v| *v += b[r0 + j]);
            }
        }
    };
    if n <= rows {
        task((0, &mut out_t[..]));
    } else {
        out_t.par_chunks_mut(rows * m).enumerate().for_each(task);
    }
    if m == 1 {
        return out_t;
    }
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// out_t [rows, M]: out_t[j, i] = w[j] · x[i] for `rows` weight rows.
fn rows_dot<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], rows: usize, out_t: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has avx2, fma and f16c (checked at run time); slices bounds are asserted by the caller.
        return unsafe { avx2::rows_dot(x, m, k, w, rows, out_t) };
    }
    portable::rows_dot(x, m, k, w, rows, out_t)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    })
}

/// Plain Rust that LLVM vectorises for the target's baseline (SSE2 on x86-64, NEON on aarch64): 16 independent
/// accumulators, 16-bit weights widened a block at a time into a stack buffer.
mod portable {
    use super::Elem;

    const LANES: usize = 16;
    const BLOCK: usize = 256;

    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        // aarch64 has a fused multiply-add in its baseline; elsewhere mul_add would be a libm call
        if cfg!(target_arch = "aarch64") { a.mul_add(b, c) } else { a * b + c }
    }

    #[inline(always)]
    fn dot_acc(w: &[f32], x: &[f32], acc: &mut [f32; LANES]) -> f32 {
        let mut wc = w.chunks_exact(LANES);
        let mut xc = x.chunks_exact(LANES);
        for (wb, xb) in (&mut wc).zip(&mut xc) {
            for l in 0..LANES {
                acc[l] = fma(wb[l], xb[l], acc[l]);
            }
        }
        wc.remainder().iter().zip(xc.remainder()).map(|(a, b)| a * b).sum()
    }

    fn reduce(acc: &[f32; LANES]) -> f32 {
        let mut a = *acc;
        let mut width = LANES / 2;
        while width > 0 {
            for l in 0..width {
                a[l] += a[l + width];
            }
            width /= 2;
        }
        a[0]
    }

    pub(super) fn rows_dot<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], rows: usize, out_t: &mut [f32]) {
        let mut buf = [0f32; BLOCK];
        for j in 0..rows {
            let wr = &w[j * k..(j + 1) * k];
            let o = &mut out_t[j * m..(j + 1) * m];
            if let Some(wf) = W::as_f32(wr) {
                for (i, oi) in o.iter_mut().enumerate() {
                    let mut acc = [0f32; LANES];
                    let tail = dot_acc(wf, &x[i * k..(i + 1) * k], &mut acc);
                    *oi = reduce(&acc) + tail;
                }
            } else {
                let mut accs = vec![[0f32; LANES]; m];
                let mut tails = vec![0f32; m];
                for b0 in (0..k).step_by(BLOCK) {
                    let len = BLOCK.min(k - b0);
                    W::widen(&wr[b0..b0 + len], &mut buf[..len]);
                    for i in 0..m {
                        tails[i] += dot_acc(&buf[..len], &x[i * k + b0..i * k + b0 + len], &mut accs[i]);
                    }
                }
                for i in 0..m {
                    o[i] = reduce(&accs[i]) + tails[i];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // const-sized loops over register arrays, unrolled by the compiler
mod avx2 {
    use std::arch::x86_64::*;

    use super::Elem;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The dot products of one weight row `w` with R rows of x (at `x`, `x + k`, ...), with U accumulators of 8
    /// lanes per x row.
    #[inline(always)]
    unsafe fn dots<W: Elem, const R: usize, const U: usize>(w: *const W, x: *const f32, k: usize) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); U]; R];
        let step = 8 * U;
        let mut p = 0;
        while p + step <= k {
            for u in 0..U {
                let wv = W::load8(w.add(p + 8 * u));
                for r in 0..R {
                    acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(r * k + p + 8 * u)), acc[r][u]);
                }
            }
            p += step;
        }
        while p + 8 <= k {
            let wv = W::load8(w.add(p));
            for r in 0..R {
                acc[r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(r * k + p)), acc[r][0]);
            }
            p += 8;
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let mut s = acc[r][0];
            for u in 1..U {
                s = _mm256_add_ps(s, acc[r][u]);
            }
            let mut t = hsum(s);
            for q in p..k {
                t += (*w.add(q)).to_f32() * *x.add(r * k + q);
            }
            out[r] = t;
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_dot<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], rows: usize, out_t: &mut [f32]) {
        assert!(x.len() >= m * k && w.len() >= rows * k && out_t.len() >= rows * m);
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        for j in 0..rows {
            let wr = wp.add(j * k);
            let o = &mut out_t[j * m..(j + 1) * m];
            let mut i = 0;
            while i + 4 <= m {
                o[i..i + 4].copy_from_slice(&dots::<W, 4, 2>(wr, xp.add(i * k), k));
                i += 4;
            }
            match m - i {
                3 => o[i..].copy_from_slice(&dots::<W, 3, 2>(wr, xp.add(i * k), k)),
                2 => o[i..].copy_from_slice(&dots::<W, 2, 2>(wr, xp.add(i * k), k)),
                1 => o[i..].copy_from_slice(&dots::<W, 1, 4>(wr, xp.add(i * k), k)),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Many rows: gemm on blocks of widened weight rows

/// Weight rows widened and multiplied per task: a block of 16-bit weights stays in L2 as f32.
const GEMM_BLOCK_ROWS: usize = 128;

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// out [M, N] = x [M, K] · w [N, K]ᵀ + bias for large M: blocks of weight rows are widened to f32 (unless already
/// f32) and each block multiplied by a single-threaded gemm into its columns of out, blocks spread over threads.
pub(crate) fn gemm_blocked<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    let mut out = vec![0f32; m * n];
    if let Some(b) = bias {
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(b);
        }
    }
    let rows = GEMM_BLOCK_ROWS.min(n);
    let n_blocks = n.div_ceil(rows);
    let dst = SendPtr(out.as_mut_ptr());
    let dst = &dst;
    (0..n_blocks).into_par_iter().for_each_init(Vec::new, |buf: &mut Vec<f32>, bi| {
        let r0 = bi * rows;
        let nr = rows.min(n - r0);
        let wb = &w[r0 * k..(r0 + nr) * k];
        let wf: &[f32] = match W::as_f32(wb) {
            Some(s) => s,
            None => {
                buf.resize(nr * k, 0.0);
                W::widen(wb, buf);
                buf
            }
        };
        // SAFETY: block bi writes only columns r0..r0+nr of out, which no other block touches; all pointers stay
        // inside x, wf and out for the given sizes and strides.
        unsafe {
            gemm::gemm(
                m,
                nr,
                k,
                dst.0.add(r0),
                1,
                n as isize,
                bias.is_some(),
                x.as_ptr(),
                1,
                k as isize,
                wf.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [-1, 1).
    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Plain f64 loop: the reference every kernel must agree with.
    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let d: f64 = (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum();
                out[i * n + j] = d + bias.map_or(0.0, |b| b[j] as f64);
            }
        }
        out
    }

    /// Compare `forward` (the fast kernels) and `forward_naive` with the f64 reference, for x of shape `lead` + [k].
    fn check(lead: &[usize], k: usize, n: usize, dtype: DType, with_bias: bool) {
        let dev = Device::Cpu;
        let m: usize = lead.iter().product();
        let (xv, wv, bv) = (vals(m * k, 1 + k as u64), vals(n * k, 2 + n as u64), vals(n, 3));
        let w = Tensor::from_vec(wv, (n, k), &dev).unwrap().to_dtype(dtype).unwrap();
        // the reference sees the weight as rounded to its dtype
        let w32: Vec<f32> = w.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let bias = with_bias.then(|| Tensor::from_vec(bv.clone(), n, &dev).unwrap());
        let lin = Linear::new(w, bias).unwrap();
        let mut shape = lead.to_vec();
        shape.push(k);
        let x = Tensor::from_vec(xv.clone(), shape.clone(), &dev).unwrap();
        let want = reference(&xv, m, k, &w32, n, with_bias.then_some(&bv[..]));
        let fast = lin.forward(&x).unwrap();
        let naive = lin.forward_naive(&x).unwrap();
        let mut out_shape = lead.to_vec();
        out_shape.push(n);
        assert_eq!(fast.dims(), &out_shape[..]);
        assert_eq!(naive.dims(), &out_shape[..]);
        let fast: Vec<f32> = fast.flatten_all().unwrap().to_vec1().unwrap();
        let naive: Vec<f32> = naive.flatten_all().unwrap().to_vec1().unwrap();
        // |x|, |w| < 1: sums of k products; f32 accumulation error grows ~ k·eps at worst
        let tol = 1e-5 * (k as f64).sqrt().max(1.0) + 1e-6;
        for (idx, want) in want.iter().enumerate() {
            let scale = 1.0f64.max(want.abs());
            let (f, nv) = (fast[idx] as f64, naive[idx] as f64);
            assert!((f - want).abs() <= tol * scale, "{lead:?}x{k}->{n} {dtype:?} bias={with_bias} [{idx}]: fast {f} vs {want}");
            assert!((nv - want).abs() <= tol * scale, "naive {nv} vs {want}");
            assert!((f - nv).abs() <= tol * scale, "fast {f} vs naive {nv}");
        }
    }

    #[test]
    fn fast_matches_naive() {
        let shapes: &[(&[usize], usize, usize)] = &[
            (&[1], 7, 13),
            (&[1, 1], 1, 1),
            (&[1, 1], 8, 3),
            (&[1, 1], 33, 70),
            (&[3], 257, 100),
            (&[2, 3], 100, 257),
            (&[1, 5], 768, 1000),
            (&[7], 64, 31),
            (&[8], 129, 65),
            (&[9], 257, 100),
            (&[2, 17], 100, 300),
            (&[1, 40], 96, 257),
        ];
        for &(lead, k, n) in shapes {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                for bias in [false, true] {
                    check(lead, k, n, dtype, bias);
                }
            }
        }
    }

    #[test]
    fn portable_kernel_matches() {
        // the fallback for CPUs without AVX2 (and the aarch64 path), exercised directly
        fn run<W: Elem>(w: &[W], x: &[f32], m: usize, k: usize, n: usize) {
            let w32: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let want = reference(x, m, k, &w32, n, None);
            let mut got = vec![0f32; n * m];
            portable::rows_dot(x, m, k, w, n, &mut got);
            let tol = 1e-5 * (k as f64).sqrt();
            for j in 0..n {
                for i in 0..m {
                    let (g, w) = (got[j * m + i] as f64, want[i * n + j]);
                    assert!((g - w).abs() <= tol * w.abs().max(1.0), "{m}x{k}->{n} [{i}, {j}]: {g} vs {w}");
                }
            }
        }
        for &(m, k, n) in &[(1usize, 7usize, 13usize), (3, 257, 100), (2, 600, 9)] {
            let (x, w32) = (vals(m * k, 5), vals(n * k, 6));
            run(&w32, &x, m, k, n);
            run(&w32.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), &x, m, k, n);
            run(&w32.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), &x, m, k, n);
        }
    }

    #[test]
    fn non_contiguous_input() {
        let dev = Device::Cpu;
        let (k, n) = (40, 23);
        let w = Tensor::from_vec(vals(n * k, 9), (n, k), &dev).unwrap();
        let lin = Linear::new(w, None).unwrap();
        let x = Tensor::from_vec(vals(k * 3, 10), (k, 3), &dev).unwrap().t().unwrap(); // [3, k], strided
        let a: Vec<f32> = lin.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = lin.forward_naive(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
