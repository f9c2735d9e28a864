//! CPU kernels for llama.cpp's Q4_0, Q4_1 and Q8_0 blocks, for the shapes decoding has (a few activation rows):
//! every core streams its share of the weight rows once per step, dequantizing in registers and accumulating in
//! f32 (activations are not rounded to 8 bits, unlike llama.cpp's). Candle has no SIMD path for Q4_1 at all.
//! Prefill (many rows) dequantizes each weight once per call and uses the f32 GEMM.
//!
//! Layouts (one block = 32 weights): Q4_0 {d: f16, qs: [u8; 16]} w = d·(q - 8); Q4_1 {d: f16, m: f16, qs: [u8; 16]}
//! w = d·q + m; Q8_0 {d: f16, qs: [i8; 32]} w = d·q. Nibble j of byte k is weight k (low) or k + 16 (high).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }
}

pub struct QWeight {
    kind: Kind,
    data: Vec<u8>,
    out: usize,
    inp: usize,
}

/// Rows at or below this go through the streaming kernel; above, dequantize + GEMM.
const SMALL_M: usize = 8;

#[inline(always)]
fn half(b: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// One output: Σ_blocks (weights of `row`) · x, with x's per-block sums `sx` (Q4_1's offset term).
#[inline(always)]
fn dot_row(kind: Kind, row: &[u8], x: &[f32], sx: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut extra = 0f32;
    match kind {
        Kind::Q4_1 | Kind::Q4_0 => {
            let bb = kind.block_bytes();
            for (b, blk) in row.chunks_exact(bb).enumerate() {
                let d = half(&blk[0..2]);
                let qs: &[u8; 16] = blk[bb - 16..].try_into().unwrap();
                let xb: &[f32; 32] = x[b * 32..b * 32 + 32].try_into().unwrap();
                for j in 0..16 {
                    acc[j] += d * ((qs[j] & 15) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16]);
                }
                extra += if kind == Kind::Q4_1 { half(&blk[2..4]) * sx[b] } else { -8.0 * d * sx[b] };
            }
        }
        Kind::Q8_0 => {
            let mut acc2 = [0f32; 16];
            for (b, blk) in row.chunks_exact(34).enumerate() {
                let d = half(&blk[0..2]);
                let qs: &[u8; 32] = blk[2..34].try_into().unwrap();
                let xb: &[f32; 32] = x[b * 32..b * 32 + 32].try_into().unwrap();
                for j in 0..16 {
                    acc[j] += d * (qs[j] as i8 as f32 * xb[j]);
                    acc2[j] += d * (qs[j + 16] as i8 as f32 * xb[j + 16]);
                }
            }
            for j in 0..16 {
                acc[j] += acc2[j];
            }
        }
    }
    acc.iter().sum::<f32>() + extra
}

/// y[m][r] for the rows of a chunk starting at `r0`, written transposed into `out` [chunk, M], with `dot` as the
/// row kernel. Always inlined, so that each `target_feature` wrapper below compiles it with its instruction set.
#[inline(always)]
fn for_rows(w: &QWeight, r0: usize, out: &mut [f32], xs: &[f32], sxs: &[f32], m: usize, dot: impl Fn(&[u8], &[f32], &[f32]) -> f32) {
    let rb = w.row_bytes();
    let nb = w.inp / 32;
    for (i, o) in out.chunks_exact_mut(m).enumerate() {
        let row = &w.data[(r0 + i) * rb..(r0 + i + 1) * rb];
        for (k, ok) in o.iter_mut().enumerate() {
            *ok = dot(row, &xs[k * w.inp..(k + 1) * w.inp], &sxs[k * nb..(k + 1) * nb]);
        }
    }
}

/// f16 -> f32 with the F16C instruction (the caller has checked for it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn half_f16c(b: &[u8]) -> f32 {
    use std::arch::x86_64::*;
    let bits = u16::from_le_bytes([b[0], b[1]]) as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// The 32 weights of a block as four vectors of eight i32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_ints_avx2(
    kind: Kind,
    blk: *const u8,
) -> (std::arch::x86_64::__m256i, std::arch::x86_64::__m256i, std::arch::x86_64::__m256i, std::arch::x86_64::__m256i) {
    use std::arch::x86_64::*;
    match kind {
        Kind::Q4_0 | Kind::Q4_1 => {
            let raw = _mm_loadu_si128(blk.add(kind.block_bytes() - 16) as *const __m128i);
            let mask = _mm_set1_epi8(15);
            let lo = _mm_and_si128(raw, mask); // weights 0..16
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask); // weights 16..32
            (
                _mm256_cvtepu8_epi32(lo),
                _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)),
                _mm256_cvtepu8_epi32(hi),
                _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)),
            )
        }
        Kind::Q8_0 => {
            let a = _mm_loadu_si128(blk.add(2) as *const __m128i);
            let c = _mm_loadu_si128(blk.add(18) as *const __m128i);
            (
                _mm256_cvtepi8_epi32(a),
                _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8)),
                _mm256_cvtepi8_epi32(c),
                _mm256_cvtepi8_epi32(_mm_srli_si128(c, 8)),
            )
        }
    }
}

/// AVX2 + FMA: each block's weights widened to f32 and scaled by d, multiplied into four independent
/// accumulators (one FMA chain per quarter block, so the loop is not bound by FMA latency).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row_avx2(kind: Kind, row: &[u8], x: &[f32], sx: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let bb = kind.block_bytes();
    let nb = row.len() / bb;
    debug_assert!(x.len() >= nb * 32 && sx.len() >= nb);
    let (mut a0, mut a1, mut a2, mut a3) = (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
    let mut extra = [0f32; 4];
    for b in 0..nb {
        let blk = row.as_ptr().add(b * bb);
        let d = half_f16c(std::slice::from_raw_parts(blk, 2));
        match kind {
            Kind::Q4_1 => extra[b & 3] += half_f16c(std::slice::from_raw_parts(blk.add(2), 2)) * sx[b],
            Kind::Q4_0 => extra[b & 3] -= 8.0 * d * sx[b],
            Kind::Q8_0 => {}
        }
        let dv = _mm256_set1_ps(d);
        let (q0, q1, q2, q3) = block_ints_avx2(kind, blk);
        let xp = x.as_ptr().add(b * 32);
        a0 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q0), dv), _mm256_loadu_ps(xp), a0);
        a1 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q1), dv), _mm256_loadu_ps(xp.add(8)), a1);
        a2 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q2), dv), _mm256_loadu_ps(xp.add(16)), a2);
        a3 = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q3), dv), _mm256_loadu_ps(xp.add(24)), a3);
    }
    let acc = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s) + (extra[0] + extra[1]) + (extra[2] + extra[3])
}

/// AVX-512: sixteen lanes, four independent accumulators over pairs of blocks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn dot_row_avx512(kind: Kind, row: &[u8], x: &[f32], sx: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let bb = kind.block_bytes();
    let nb = row.len() / bb;
    debug_assert!(x.len() >= nb * 32 && sx.len() >= nb);
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut extra = [0f32; 4];
    let mask = _mm_set1_epi8(15);
    for b in 0..nb {
        let blk = row.as_ptr().add(b * bb);
        let d = half_f16c(std::slice::from_raw_parts(blk, 2));
        let (q0, q1) = match kind {
            Kind::Q4_0 | Kind::Q4_1 => {
                if kind == Kind::Q4_1 {
                    extra[b & 3] += half_f16c(std::slice::from_raw_parts(blk.add(2), 2)) * sx[b];
                } else {
                    extra[b & 3] -= 8.0 * d * sx[b];
                }
                let raw = _mm_loadu_si128(blk.add(bb - 16) as *const __m128i);
                (
                    _mm512_cvtepu8_epi32(_mm_and_si128(raw, mask)),
                    _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), mask)),
                )
            }
            Kind::Q8_0 => (
                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(2) as *const __m128i)),
                _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(18) as *const __m128i)),
            ),
        };
        let dv = _mm512_set1_ps(d);
        let xp = x.as_ptr().add(b * 32);
        let k = (b & 1) * 2;
        acc[k] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q0), dv), _mm512_loadu_ps(xp), acc[k]);
        acc[k + 1] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q1), dv), _mm512_loadu_ps(xp.add(16)), acc[k + 1]);
    }
    let acc = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(acc) + (extra[0] + extra[1]) + (extra[2] + extra[3])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn chunk_avx512(kind: Kind, w: &QWeight, r0: usize, out: &mut [f32], xs: &[f32], sxs: &[f32], m: usize) {
    // SAFETY (both closures): only reached after `chunk` checked the CPU features.
    for_rows(w, r0, out, xs, sxs, m, |row, x, sx| unsafe { dot_row_avx512(kind, row, x, sx) })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn chunk_avx2(kind: Kind, w: &QWeight, r0: usize, out: &mut [f32], xs: &[f32], sxs: &[f32], m: usize) {
    for_rows(w, r0, out, xs, sxs, m, |row, x, sx| unsafe { dot_row_avx2(kind, row, x, sx) })
}

fn chunk(kind: Kind, w: &QWeight, r0: usize, out: &mut [f32], xs: &[f32], sxs: &[f32], m: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        // SAFETY: the CPU has the features each function was compiled for (checked here).
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        if avx2 && has!("avx512f") && std::env::var_os("CANDLEWICK_NO_AVX512").is_none() {
            return unsafe { chunk_avx512(kind, w, r0, out, xs, sxs, m) };
        }
        if avx2 {
            return unsafe { chunk_avx2(kind, w, r0, out, xs, sxs, m) };
        }
    }
    for_rows(w, r0, out, xs, sxs, m, |row, x, sx| dot_row(kind, row, x, sx))
}

impl QWeight {
    /// Our kernels take Q4_0, Q4_1 and Q8_0 on the CPU; anything else stays with Candle's.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let kind = match q.dtype() {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let (out, inp) = q.shape().dims2()?;
        let data = q.data()?.into_owned();
        if inp % 32 != 0 || data.len() != out * inp / 32 * kind.block_bytes() {
            return Ok(None);
        }
        Ok(Some(Self { kind, data, out, inp }))
    }

    fn row_bytes(&self) -> usize {
        self.inp / 32 * self.kind.block_bytes()
    }

    /// The weight as f32 [out, in].
    pub fn dequantize(&self) -> Vec<f32> {
        let rb = self.row_bytes();
        let mut w = vec![0f32; self.out * self.inp];
        w.par_chunks_mut(self.inp).enumerate().for_each(|(r, dst)| {
            for (b, blk) in self.data[r * rb..(r + 1) * rb].chunks_exact(self.kind.block_bytes()).enumerate() {
                let d = half(&blk[0..2]);
                let o = &mut dst[b * 32..b * 32 + 32];
                match self.kind {
                    Kind::Q4_0 | Kind::Q4_1 => {
                        let m = if self.kind == Kind::Q4_1 { half(&blk[2..4]) } else { -8.0 * d };
                        let qs = &blk[blk.len() - 16..];
                        for j in 0..16 {
                            o[j] = d * (qs[j] & 15) as f32 + m;
                            o[j + 16] = d * (qs[j] >> 4) as f32 + m;
                        }
                    }
                    Kind::Q8_0 => {
                        for j in 0..32 {
                            o[j] = d * blk[2 + j] as i8 as f32;
                        }
                    }
                }
            }
        });
        w
    }

    /// x [..., in] (f32, CPU) -> [..., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let m: usize = dims[..dims.len() - 1].iter().product();
        let mut out_dims = dims.clone();
        *out_dims.last_mut().unwrap() = self.out;
        if m > SMALL_M {
            let w = Tensor::from_vec(self.dequantize(), (self.out, self.inp), &Device::Cpu)?;
            return Ok(x.reshape((m, self.inp))?.matmul(&w.t()?)?.reshape(out_dims)?);
        }
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let sxs: Vec<f32> = xs.chunks_exact(32).map(|c| c.iter().sum()).collect();
        let mut yt = vec![0f32; self.out * m]; // [out, M]
        // Split the rows between the threads; a matrix too small to be worth a hand-off stays on this thread.
        let threads = rayon::current_num_threads().max(1);
        if threads == 1 || self.data.len() < 32 * 1024 {
            chunk(self.kind, self, 0, &mut yt, &xs, &sxs, m);
        } else {
            let rows = self.out.div_ceil(threads * 4);
            yt.par_chunks_mut(rows * m).enumerate().for_each(|(c, o)| chunk(self.kind, self, c * rows, o, &xs, &sxs, m));
        }
        let mut y = vec![0f32; m * self.out];
        for r in 0..self.out {
            for k in 0..m {
                y[k * self.out + r] = yt[r * m + k];
            }
        }
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;

    /// Our kernels against Candle's dequantize + f32 matmul on the same blocks.
    #[test]
    fn kernels_match_dequantized_matmul() {
        check_kernels();
        // and the AVX2 path on machines that would take the AVX-512 one
        std::env::set_var("CANDLEWICK_NO_AVX512", "1");
        check_kernels();
        std::env::remove_var("CANDLEWICK_NO_AVX512");
    }

    fn check_kernels() {
        let dev = Device::Cpu;
        for (dt, m) in [(GgmlDType::Q4_0, 1), (GgmlDType::Q4_1, 1), (GgmlDType::Q8_0, 3), (GgmlDType::Q4_1, 20)] {
            let w = Tensor::randn(0f32, 1.0, (70, 96), &dev).unwrap();
            let q = QTensor::quantize(&w, dt).unwrap();
            let ours = QWeight::from_qtensor(&q).unwrap().unwrap();
            let deq = q.dequantize(&dev).unwrap();
            let plain: Vec<f32> = deq.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(ours.dequantize(), plain);
            let x = Tensor::randn(0f32, 1.0, (m, 96), &dev).unwrap();
            let want = x.matmul(&deq.t().unwrap()).unwrap();
            let got = ours.forward(&x).unwrap();
            let err: f32 = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(err < 1e-3, "{dt:?} m={m}: {err}");
            // and Candle's own kernel (which also rounds x to 8 bits) is close
            let theirs = candle_core::quantized::QMatMul::from_qtensor(q).unwrap().forward(&x).unwrap();
            let e2: f32 = (theirs - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(e2 < 0.5, "{e2}");
        }
    }
}
