//! CPU kernels for llama.cpp's Q4_0, Q4_1 and Q8_0 blocks, as llama.cpp computes them: the activations are
//! rounded to 8 bits per block of 32 (Q8_0-style, one f16 scale each) and every block's dot product is an integer
//! sum, scaled once per block. Candle's own kernels have no SIMD path for Q4_1 at all, and at batch 1 they leave
//! cores idle; these run every core on its share of the weight rows, each row streamed once per step.
//!
//! GGML layouts (one block = 32 weights): Q4_0 {d: f16, qs: [u8; 16]} w = d·(q - 8); Q4_1 {d: f16, m: f16,
//! qs: [u8; 16]} w = d·q + m; Q8_0 {d: f16, qs: [i8; 32]} w = d·q. Nibble j of byte k is weight k (low) or k + 16.
//!
//! At load the blocks are repacked so that one SIMD register holds the same four weights of 16 consecutive rows:
//! for a group of 16 rows and a block b, byte 4·r + i of chunk k is byte 4·k + i of row r's block (so its low
//! nibbles are weights 4k..4k+4 and its high nibbles weights 16+4k..16+4k+4), and Q8_0 bytes are stored as
//! q + 128 (unsigned). A dot-product instruction (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`) against four
//! activation bytes broadcast to every lane then sums four products per row, for 16 rows at once, and the 16 rows'
//! scales of a block load as one vector. Per block and row:
//!     Q4_0:  d·(dx·Σ q·qx − 8·dx·Σ qx)      Q8_0:  d·(dx·Σ (q+128)·qx − 128·dx·Σ qx)
//!     Q4_1:  d·dx·Σ q·qx + m·s              (s = dx·Σ qx, rounded to f16, as in llama.cpp's Q8_1)
//! Many activation rows (prefill) go through the same kernel in tiles of up to 8 rows, so each group's weights
//! stay in L1 while every tile passes over them.

use std::sync::OnceLock;

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
    /// Bytes of one GGML block.
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 => 18,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }

    /// Bytes of the weights (no scales) of one block of a group of `ROWS` rows, repacked.
    fn group_block_bytes(self) -> usize {
        match self {
            Kind::Q4_0 | Kind::Q4_1 => 256,
            Kind::Q8_0 => 512,
        }
    }
}

/// Rows interleaved per group (one 512-bit register of i32 lanes).
const ROWS: usize = 16;
/// Activation rows per kernel call, at most.
const TILE: usize = 8;

/// Instruction sets the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// Every kernel this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                v.push(Isa::Avx2);
                if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                    v.push(Isa::Avx512Vnni);
                }
            }
        }
        v
    }

    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| *Isa::available().last().unwrap())
    }
}

pub struct QWeight {
    kind: Kind,
    out: usize,
    inp: usize,
    /// blocks per row (inp / 32)
    nb: usize,
    /// groups of `ROWS` rows (the last one padded with zero rows)
    groups: usize,
    /// f16 bits of d, [groups][nb][ROWS]
    d: Vec<u16>,
    /// Q4_1's f16 bits of m, [groups][nb][ROWS] (empty for the others)
    m: Vec<u16>,
    /// repacked weights, [groups][nb][group_block_bytes]
    qs: Vec<u8>,
}

/// Activation rows rounded to 8 bits per block of 32: `q` [rows][in], and per block the scale `a` (dx, rounded to
/// f16) and the correction `c` (Q4_1: s = dx·Σ qx; Q4_0 and Q8_0: −offset·dx·Σ qx), [rows][nb].
struct QActs {
    q: Vec<i8>,
    a: Vec<f32>,
    c: Vec<f32>,
}

fn quantize_acts(kind: Kind, x: &[f32]) -> QActs {
    let n = x.len() / 32;
    let (mut q, mut a, mut c) = (vec![0i8; x.len()], vec![0f32; n], vec![0f32; n]);
    for (i, (xb, qb)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (o, &v) in qb.iter_mut().zip(xb) {
            // round half to even by the 1.5·2^23 trick (|v·id| <= 127): no libm call, vectorises
            *o = ((v * id + 12_582_912.0) - 12_582_912.0) as i8;
            sum += *o as i32;
        }
        let dh = f16::from_f32(d).to_f32();
        a[i] = dh;
        c[i] = match kind {
            Kind::Q4_1 => f16::from_f32(d * sum as f32).to_f32(),
            Kind::Q4_0 => -8.0 * dh * sum as f32,
            Kind::Q8_0 => -128.0 * dh * sum as f32,
        };
    }
    QActs { q, a, c }
}

/// One group (16 weight rows) against activation rows r0..r0+M, writing out[r][lane] for r < M ([M][16]).
type TileFn = unsafe fn(&QWeight, usize, &QActs, usize, &mut [f32]);

/// The weight nibble/byte at position j of block `gi`'s row `lane`, as the kernels read it (Q8_0: q + 128).
#[inline(always)]
fn weight_q(w: &QWeight, gi: usize, lane: usize, j: usize) -> i32 {
    let (quad, i) = (j / 4, j % 4);
    let base = gi * w.kind.group_block_bytes();
    match w.kind {
        Kind::Q8_0 => w.qs[base + quad * 64 + lane * 4 + i] as i32,
        _ if quad < 4 => (w.qs[base + quad * 64 + lane * 4 + i] & 15) as i32,
        _ => (w.qs[base + (quad - 4) * 64 + lane * 4 + i] >> 4) as i32,
    }
}

fn h2f(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Portable kernel (and the specification of the SIMD ones).
unsafe fn tile_scalar<const M: usize>(w: &QWeight, g: usize, xs: &QActs, r0: usize, out: &mut [f32]) {
    for r in 0..M {
        let row = r0 + r;
        for lane in 0..ROWS {
            let mut acc = 0f32;
            for b in 0..w.nb {
                let gi = g * w.nb + b;
                let qx = &xs.q[row * w.inp + b * 32..][..32];
                let isum: i32 = (0..32).map(|j| weight_q(w, gi, lane, j) * qx[j] as i32).sum();
                let (a, c) = (xs.a[row * w.nb + b], xs.c[row * w.nb + b]);
                let d = h2f(w.d[gi * ROWS + lane]);
                acc += match w.kind {
                    Kind::Q4_1 => d * a * isum as f32 + h2f(w.m[gi * ROWS + lane]) * c,
                    _ => d * (isum as f32 * a + c),
                };
            }
            out[r * ROWS + lane] = acc;
        }
    }
}

/// AVX-512 VNNI: 16 rows per register; two accumulators per activation row (even and odd blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_vnni<const Q8: bool, const MIN: bool, const M: usize>(
    w: &QWeight,
    g: usize,
    xs: &QActs,
    r0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (nb, gb) = (w.nb, if Q8 { 512 } else { 256 });
    let low = _mm512_set1_epi8(15);
    let mut f = [[_mm512_setzero_ps(); M]; 2];
    macro_rules! block {
        ($b:expr, $acc:expr) => {{
            let b = $b;
            let gi = g * nb + b;
            let base = w.qs.as_ptr().add(gi * gb);
            let mut ws = [_mm512_setzero_si512(); 8];
            if Q8 {
                for k in 0..8 {
                    ws[k] = _mm512_loadu_si512(base.add(k * 64) as *const _);
                }
            } else {
                for k in 0..4 {
                    let l = _mm512_loadu_si512(base.add(k * 64) as *const _);
                    ws[k] = _mm512_and_si512(l, low);
                    ws[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(l), low);
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.d.as_ptr().add(gi * ROWS) as *const __m256i));
            for r in 0..M {
                let row = r0 + r;
                let xp = xs.q.as_ptr().add(row * w.inp + b * 32) as *const i32;
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in 0..4 {
                    s0 = _mm512_dpbusd_epi32(s0, ws[k], _mm512_set1_epi32(xp.add(k).read_unaligned()));
                    s1 = _mm512_dpbusd_epi32(s1, ws[k + 4], _mm512_set1_epi32(xp.add(k + 4).read_unaligned()));
                }
                let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                let a = _mm512_set1_ps(*xs.a.get_unchecked(row * nb + b));
                let c = _mm512_set1_ps(*xs.c.get_unchecked(row * nb + b));
                if MIN {
                    let mw = _mm512_cvtph_ps(_mm256_loadu_si256(w.m.as_ptr().add(gi * ROWS) as *const __m256i));
                    $acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, a), isum, $acc[r]);
                    $acc[r] = _mm512_fmadd_ps(mw, c, $acc[r]);
                } else {
                    $acc[r] = _mm512_fmadd_ps(dw, _mm512_fmadd_ps(isum, a, c), $acc[r]);
                }
            }
        }};
    }
    let [f0, f1] = &mut f;
    let mut b = 0;
    while b + 1 < nb {
        block!(b, f0);
        block!(b + 1, f1);
        b += 2;
    }
    if b < nb {
        block!(b, f0);
    }
    for r in 0..M {
        _mm512_storeu_ps(out.as_mut_ptr().add(r * ROWS), _mm512_add_ps(f0[r], f1[r]));
    }
}

/// AVX2: the group in two halves of 8 rows; `vpmaddubsw` + `vpmaddwd` for the four-byte sums. Q8_0 bytes go back
/// to signed here (|q|·sign(qx, q), llama.cpp's trick: q + 128 would overflow the 16-bit pair sums), so its
/// correction term is not added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const Q8: bool, const MIN: bool, const M: usize>(
    w: &QWeight,
    g: usize,
    xs: &QActs,
    r0: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (nb, gb) = (w.nb, if Q8 { 512 } else { 256 });
    let low = _mm256_set1_epi8(15);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    for half in 0..2 {
        let mut f = [_mm256_setzero_ps(); M];
        for b in 0..nb {
            let gi = g * nb + b;
            let base = w.qs.as_ptr().add(gi * gb + half * 32);
            let mut ws = [_mm256_setzero_si256(); 8];
            if Q8 {
                for k in 0..8 {
                    ws[k] = _mm256_xor_si256(_mm256_loadu_si256(base.add(k * 64) as *const _), flip);
                }
            } else {
                for k in 0..4 {
                    let l = _mm256_loadu_si256(base.add(k * 64) as *const _);
                    ws[k] = _mm256_and_si256(l, low);
                    ws[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(l), low);
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(w.d.as_ptr().add(gi * ROWS + half * 8) as *const __m128i));
            for r in 0..M {
                let row = r0 + r;
                let xp = xs.q.as_ptr().add(row * w.inp + b * 32) as *const i32;
                let isum = if Q8 {
                    let mut s = _mm256_setzero_si256();
                    for k in 0..8 {
                        let xb = _mm256_set1_epi32(xp.add(k).read_unaligned());
                        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws[k]), _mm256_sign_epi8(xb, ws[k]));
                        s = _mm256_add_epi32(s, _mm256_madd_epi16(p, ones));
                    }
                    s
                } else {
                    // 15·127·2 per pair, eight pairs: 30480 fits in i16
                    let mut p = _mm256_setzero_si256();
                    for k in 0..8 {
                        let xb = _mm256_set1_epi32(xp.add(k).read_unaligned());
                        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(ws[k], xb));
                    }
                    _mm256_madd_epi16(p, ones)
                };
                let isum = _mm256_cvtepi32_ps(isum);
                let a = _mm256_set1_ps(*xs.a.get_unchecked(row * nb + b));
                if Q8 {
                    f[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, a), isum, f[r]);
                } else if MIN {
                    let c = _mm256_set1_ps(*xs.c.get_unchecked(row * nb + b));
                    let mw = _mm256_cvtph_ps(_mm_loadu_si128(w.m.as_ptr().add(gi * ROWS + half * 8) as *const __m128i));
                    f[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, a), isum, f[r]);
                    f[r] = _mm256_fmadd_ps(mw, c, f[r]);
                } else {
                    let c = _mm256_set1_ps(*xs.c.get_unchecked(row * nb + b));
                    f[r] = _mm256_fmadd_ps(dw, _mm256_fmadd_ps(isum, a, c), f[r]);
                }
            }
        }
        for r in 0..M {
            _mm256_storeu_ps(out.as_mut_ptr().add(r * ROWS + half * 8), f[r]);
        }
    }
}

/// The kernel for an instruction set, a block format and a tile of `t` (1, 2, 4 or 8) activation rows.
fn tile_fn(isa: Isa, kind: Kind, t: usize) -> TileFn {
    macro_rules! by_rows {
        ($f:ident, $q8:expr, $min:expr) => {
            match t {
                1 => $f::<$q8, $min, 1> as TileFn,
                2 => $f::<$q8, $min, 2> as TileFn,
                4 => $f::<$q8, $min, 4> as TileFn,
                _ => $f::<$q8, $min, 8> as TileFn,
            }
        };
    }
    macro_rules! by_kind {
        ($f:ident) => {
            match kind {
                Kind::Q4_0 => by_rows!($f, false, false),
                Kind::Q4_1 => by_rows!($f, false, true),
                Kind::Q8_0 => by_rows!($f, true, false),
            }
        };
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => by_kind!(tile_vnni),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_kind!(tile_avx2),
        _ => match t {
            1 => tile_scalar::<1> as TileFn,
            2 => tile_scalar::<2> as TileFn,
            4 => tile_scalar::<4> as TileFn,
            _ => tile_scalar::<8> as TileFn,
        },
    }
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
        let data = q.data()?;
        if inp % 32 != 0 || data.len() != out * inp / 32 * kind.block_bytes() {
            return Ok(None);
        }
        Ok(Some(Self::repack(kind, &data, out, inp)))
    }

    fn repack(kind: Kind, data: &[u8], out: usize, inp: usize) -> Self {
        let nb = inp / 32;
        let groups = out.div_ceil(ROWS);
        let (bb, gb) = (kind.block_bytes(), kind.group_block_bytes());
        let mut d = vec![0u16; groups * nb * ROWS];
        let mut m = if kind == Kind::Q4_1 { vec![0u16; groups * nb * ROWS] } else { Vec::new() };
        let mut qs = vec![0u8; groups * nb * gb];
        let bits = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
        for r in 0..out {
            let (g, lane) = (r / ROWS, r % ROWS);
            for b in 0..nb {
                let blk = &data[(r * nb + b) * bb..][..bb];
                let gi = g * nb + b;
                d[gi * ROWS + lane] = bits(&blk[0..2]);
                let dst = &mut qs[gi * gb..][..gb];
                match kind {
                    Kind::Q4_0 | Kind::Q4_1 => {
                        if kind == Kind::Q4_1 {
                            m[gi * ROWS + lane] = bits(&blk[2..4]);
                        }
                        let src = &blk[bb - 16..];
                        for k in 0..4 {
                            dst[k * 64 + lane * 4..][..4].copy_from_slice(&src[k * 4..k * 4 + 4]);
                        }
                    }
                    Kind::Q8_0 => {
                        for k in 0..8 {
                            for i in 0..4 {
                                dst[k * 64 + lane * 4 + i] = blk[2 + k * 4 + i] ^ 0x80;
                            }
                        }
                    }
                }
            }
        }
        Self { kind, out, inp, nb, groups, d, m, qs }
    }

    pub fn out(&self) -> usize {
        self.out
    }

    /// The rows of several weights of one format and input size, in order, as one weight; None when they differ
    /// or a part other than the last does not fill its last group of rows.
    pub fn concat(parts: &[&QWeight]) -> Option<QWeight> {
        let first = parts.first()?;
        let init = &parts[..parts.len() - 1];
        if parts.iter().any(|w| w.kind != first.kind || w.inp != first.inp) || init.iter().any(|w| w.out % ROWS != 0) {
            return None;
        }
        let cat = |f: fn(&QWeight) -> &Vec<u16>| parts.iter().flat_map(|w| f(w).iter().copied()).collect::<Vec<u16>>();
        Some(QWeight {
            kind: first.kind,
            out: parts.iter().map(|w| w.out).sum(),
            inp: first.inp,
            nb: first.nb,
            groups: parts.iter().map(|w| w.groups).sum(),
            d: cat(|w| &w.d),
            m: cat(|w| &w.m),
            qs: parts.iter().flat_map(|w| w.qs.iter().copied()).collect(),
        })
    }

    /// The weight as f32 [out, in].
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        w.par_chunks_mut(self.inp).enumerate().for_each(|(r, dst)| {
            let (g, lane) = (r / ROWS, r % ROWS);
            for b in 0..self.nb {
                let gi = g * self.nb + b;
                let d = h2f(self.d[gi * ROWS + lane]);
                for j in 0..32 {
                    let q = weight_q(self, gi, lane, j) as f32;
                    dst[b * 32 + j] = match self.kind {
                        Kind::Q4_0 => d * (q - 8.0),
                        Kind::Q4_1 => d * q + h2f(self.m[gi * ROWS + lane]),
                        Kind::Q8_0 => d * (q - 128.0),
                    };
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
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let y = self.matmul(Isa::best(), &xs, m);
        Ok(Tensor::from_vec(y, out_dims, &Device::Cpu)?)
    }

    /// y [m, out] = x [m, in] · Wᵀ with the kernels of `isa`.
    pub fn matmul(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.inp);
        let acts = quantize_acts(self.kind, x);
        let mut yt = vec![0f32; self.groups * m * ROWS]; // [groups][m][ROWS]
        let run = |g0: usize, out: &mut [f32]| {
            for (i, o) in out.chunks_exact_mut(m * ROWS).enumerate() {
                let mut r = 0;
                while r < m {
                    let t = [TILE, 4, 2, 1].into_iter().find(|&t| t <= m - r).unwrap();
                    // SAFETY: `isa` is one this CPU has (Isa::available), and the slices have the kernel's sizes.
                    unsafe { tile_fn(isa, self.kind, t)(self, g0 + i, &acts, r, &mut o[r * ROWS..(r + t) * ROWS]) };
                    r += t;
                }
            }
        };
        // Split the groups between the threads; a matrix too small to be worth a hand-off stays on this thread.
        let threads = rayon::current_num_threads().max(1);
        let bytes = self.qs.len() * m.min(TILE);
        if threads == 1 || bytes < 32 * 1024 {
            run(0, &mut yt);
        } else {
            let per = self.groups.div_ceil(threads * 4);
            yt.par_chunks_mut(per * m * ROWS).enumerate().for_each(|(c, o)| run(c * per, o));
        }
        if m == 1 {
            yt.truncate(self.out);
            return yt;
        }
        let mut y = vec![0f32; m * self.out];
        for (g, blk) in yt.chunks_exact(m * ROWS).enumerate() {
            let n = ROWS.min(self.out - g * ROWS);
            for (k, src) in blk.chunks_exact(ROWS).enumerate() {
                y[k * self.out + g * ROWS..][..n].copy_from_slice(&src[..n]);
            }
        }
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    /// Every kernel against the scalar one (same integer arithmetic: equal up to float rounding), and all of them
    /// against an f32 matmul with the dequantized weights (they differ by the activations' 8-bit rounding).
    #[test]
    fn kernels_match_scalar_and_dequantized_matmul() {
        let dev = Device::Cpu;
        // 70 rows: a padded last group; 96 inputs: an odd number of blocks
        for dt in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
            for (out, inp) in [(70, 96), (64, 256)] {
                let w = Tensor::randn(0f32, 1.0, (out, inp), &dev).unwrap();
                let q = QTensor::quantize(&w, dt).unwrap();
                let ours = QWeight::from_qtensor(&q).unwrap().unwrap();
                let deq: Vec<f32> = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(ours.dequantize(), deq, "{dt:?}: repacked weights dequantize differently");
                for m in [1, 3, 8, 13] {
                    let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m, inp), &dev).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                    let want: Vec<f32> = (0..m)
                        .flat_map(|i| (0..out).map(move |o| (i, o)))
                        .map(|(i, o)| (0..inp).map(|j| x[i * inp + j] * deq[o * inp + j]).sum())
                        .collect();
                    let scalar = ours.matmul(Isa::Scalar, &x, m);
                    let e = rel_l2(&scalar, &want);
                    assert!(e < 0.02, "{dt:?} {out}x{inp} m={m}: 8-bit activations off by {e}");
                    for isa in Isa::available() {
                        let got = ours.matmul(isa, &x, m);
                        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let err = got.iter().zip(&scalar).fold(0f32, |a, (g, s)| a.max((g - s).abs()));
                        assert!(err <= 1e-5 * scale, "{isa:?} {dt:?} {out}x{inp} m={m}: {err} from the scalar kernel");
                    }
                }
            }
        }
    }

    /// The activation rounding is llama.cpp's: scale amax/127 stored as f16, values rounded to nearest.
    #[test]
    fn activations_round_like_q8_0() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * (1.0 + i as f32)).collect();
        let qa = quantize_acts(Kind::Q4_0, &x);
        for b in 0..2 {
            let xb = &x[b * 32..b * 32 + 32];
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(qa.a[b], f16::from_f32(amax / 127.0).to_f32());
            for j in 0..32 {
                let back = qa.q[b * 32 + j] as f32 * amax / 127.0;
                assert!((back - xb[j]).abs() <= amax / 254.0 + 1e-6);
            }
            assert!(qa.q[b * 32..b * 32 + 32].iter().any(|&v| v.abs() == 127));
        }
    }
}
