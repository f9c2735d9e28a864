//! CPU kernels for llama.cpp's block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), computed as
//! llama.cpp computes them: the activations are rounded to 8 bits (per block of 32 with an f16 scale, or per 256
//! with an f32 scale for the K-quants, as llama.cpp's Q8_0/Q8_1 and Q8_K) and every block's dot product is an
//! integer sum, scaled once per block. Candle's own kernels have no SIMD
//! path for Q4_1 at all, and at batch 1 they leave cores idle; these run every core on its share of the weight
//! rows, each row streamed once per step.
//!
//! At load every row is decoded into unsigned integers q per weight and, per block of 32, a scale (two for Q6_K,
//! one per 16) and either an offset or a min: w = d·(q − offset) (Q4_0: 8, Q5_0: 16, Q6_K: 32, Q8_0: 128, as
//! q = stored + 128) or w = d·q + m (Q4_1, Q5_1, and the K-quants' d·sc and −dmin·m per sub-block). The rows are
//! then repacked so that one SIMD register holds the same four weights of 16 consecutive rows: for a group of 16
//! rows and a block, chunk k holds, at byte 4·r + i, weight 4k + i of row r — as a byte (5-, 6- and 8-bit
//! formats, chunks 0..8) or as the low nibble beside weight 16 + 4k + i in the high nibble (4-bit formats,
//! chunks 0..4, the GGML byte order itself). A dot-product instruction (AVX-512 VNNI `vpdpbusd`, or AVX2
//! `vpmaddubsw`) against four activation bytes broadcast to every lane then sums four products per row for 16
//! rows at once, and the 16 rows' scales of a block load as one vector (f16 as in the file for the 32-blocks;
//! f32 for the K-quants, whose sub-block scale is a product). Per block and row, with qx the activations' bytes,
//! dx their scale and s = dx·Σ qx:
//!     offset formats:  d·(dx·Σ q·qx − offset·s)           min formats:  d·dx·Σ q·qx + m·s
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
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl Kind {
    const ALL: [Kind; 8] = [Kind::Q4_0, Kind::Q4_1, Kind::Q5_0, Kind::Q5_1, Kind::Q8_0, Kind::Q4K, Kind::Q5K, Kind::Q6K];

    fn from_ggml(t: GgmlDType) -> Option<Kind> {
        Some(match t {
            GgmlDType::Q4_0 => Kind::Q4_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q5_1 => Kind::Q5_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            GgmlDType::Q4K => Kind::Q4K,
            GgmlDType::Q5K => Kind::Q5K,
            GgmlDType::Q6K => Kind::Q6K,
            _ => return None,
        })
    }

    #[inline(always)]
    const fn from_id(id: u8) -> Kind {
        Kind::ALL[id as usize]
    }

    /// (weights, bytes) of one GGML block.
    fn ggml_block(self) -> (usize, usize) {
        match self {
            Kind::Q4_0 => (32, 18),
            Kind::Q4_1 => (32, 20),
            Kind::Q5_0 => (32, 22),
            Kind::Q5_1 => (32, 24),
            Kind::Q8_0 => (32, 34),
            Kind::Q4K => (256, 144),
            Kind::Q5K => (256, 176),
            Kind::Q6K => (256, 210),
        }
    }

    /// Weights stored as nibbles (else as bytes).
    #[inline(always)]
    const fn nibbles(self) -> bool {
        matches!(self, Kind::Q4_0 | Kind::Q4_1 | Kind::Q4K)
    }

    /// Scales kept as f32 (else as the file's f16).
    #[inline(always)]
    const fn f32_scales(self) -> bool {
        matches!(self, Kind::Q4K | Kind::Q5K | Kind::Q6K)
    }

    /// w = d·q + m (else w = d·(q − offset)).
    #[inline(always)]
    const fn has_min(self) -> bool {
        matches!(self, Kind::Q4_1 | Kind::Q5_1 | Kind::Q4K | Kind::Q5K)
    }

    /// One scale per 16 weights (else per 32).
    #[inline(always)]
    const fn halves(self) -> bool {
        matches!(self, Kind::Q6K)
    }

    #[inline(always)]
    const fn offset(self) -> f32 {
        match self {
            Kind::Q4_0 => 8.0,
            Kind::Q5_0 => 16.0,
            Kind::Q6K => 32.0,
            Kind::Q8_0 => 128.0,
            _ => 0.0,
        }
    }

    /// Bytes of the weights (no scales) of one block of a group of `ROWS` rows, repacked.
    #[inline(always)]
    const fn group_block_bytes(self) -> usize {
        if self.nibbles() {
            256
        } else {
            512
        }
    }

    /// Scales per block and row.
    #[inline(always)]
    const fn scales_per_block(self) -> usize {
        if self.halves() {
            2
        } else {
            1
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

    /// The best kernel this CPU runs, or the one `CANDLEWICK_ISA` (scalar, avx2, avx512) names if the CPU has it:
    /// for comparing the kernels on one machine.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let available = Isa::available();
            let asked = match std::env::var("CANDLEWICK_ISA").unwrap_or_default().to_ascii_lowercase().as_str() {
                "scalar" => Some(Isa::Scalar),
                "avx2" => Some(Isa::Avx2),
                "avx512" => Some(Isa::Avx512Vnni),
                _ => None,
            };
            asked.filter(|a| available.contains(a)).unwrap_or(*available.last().unwrap())
        })
    }
}

/// Scales or mins of every (group, block): [groups][nb][scales per block][ROWS].
enum Scales {
    F16(Vec<u16>),
    F32(Vec<f32>),
    None,
}

impl Scales {
    fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F16(v) => h2f(v[i]),
            Scales::F32(v) => v[i],
            Scales::None => 0.0,
        }
    }

    /// For the SIMD kernels: the address of entry `i` (f16 bits or f32, by the format).
    fn ptr(&self, i: usize) -> *const u8 {
        match self {
            Scales::F16(v) => v[i..].as_ptr() as *const u8,
            Scales::F32(v) => v[i..].as_ptr() as *const u8,
            Scales::None => std::ptr::null(),
        }
    }

    fn concat(parts: &[&Scales]) -> Scales {
        match parts[0] {
            Scales::F16(_) => Scales::F16(parts.iter().flat_map(|s| if let Scales::F16(v) = s { v.clone() } else { vec![] }).collect()),
            Scales::F32(_) => Scales::F32(parts.iter().flat_map(|s| if let Scales::F32(v) = s { v.clone() } else { vec![] }).collect()),
            Scales::None => Scales::None,
        }
    }
}

pub struct QWeight {
    kind: Kind,
    out: usize,
    inp: usize,
    /// blocks of 32 per row (inp / 32)
    nb: usize,
    /// groups of `ROWS` rows (the last one padded with zero rows)
    groups: usize,
    d: Scales,
    m: Scales,
    /// repacked weights, [groups][nb][group_block_bytes]
    qs: Vec<u8>,
}

/// Activation rows rounded to 8 bits, as llama.cpp rounds them for each format: per block of 32 with the scale
/// rounded to f16 (its Q8_0 and Q8_1) for the 32-block formats, per 256 with an f32 scale (its Q8_K) for the
/// K-quants. `q` [rows][in]; per block of 32 the scale `a` (dx) [rows][nb] and two correction terms `c`
/// [rows][nb][2]: the min formats' s = dx·Σ qx (rounded to f16 for Q4_1 and Q5_1, as in Q8_1) in c[0]; the offset
/// formats' −offset·dx·Σ qx, over the block in c[0], or over its two halves in c[0] and c[1] (Q6_K).
struct QActs {
    q: Vec<i8>,
    a: Vec<f32>,
    c: Vec<f32>,
}

fn quantize_acts(kind: Kind, x: &[f32]) -> QActs {
    let n = x.len() / 32;
    let (mut q, mut a, mut c) = (vec![0i8; x.len()], vec![0f32; n], vec![0f32; 2 * n]);
    let k_quant = kind.f32_scales();
    let span = if k_quant { 256 } else { 32 };
    for (i, (xs, qs)) in x.chunks(span).zip(q.chunks_mut(span)).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (o, &v) in qs.iter_mut().zip(xs) {
            // round half to even by the 1.5·2^23 trick (|v·id| <= 127): no libm call, vectorises
            *o = ((v * id + 12_582_912.0) - 12_582_912.0) as i8;
        }
        let dx = if k_quant { d } else { f16::from_f32(d).to_f32() };
        for (j, qb) in qs.chunks_exact(32).enumerate() {
            let b = i * span / 32 + j;
            let sum = |r: std::ops::Range<usize>| qb[r].iter().map(|&v| v as i32).sum::<i32>() as f32;
            a[b] = dx;
            if kind.has_min() {
                c[2 * b] = if k_quant { dx * sum(0..32) } else { f16::from_f32(d * sum(0..32)).to_f32() };
            } else if kind.halves() {
                c[2 * b] = -kind.offset() * dx * sum(0..16);
                c[2 * b + 1] = -kind.offset() * dx * sum(16..32);
            } else {
                c[2 * b] = -kind.offset() * dx * sum(0..32);
            }
        }
    }
    QActs { q, a, c }
}

/// One group (16 weight rows) against activation rows r0..r0+M, writing out[r][lane] for r < M ([M][16]).
type TileFn = unsafe fn(&QWeight, usize, &QActs, usize, &mut [f32]);

/// The integer weight at position j of block `gi`'s row `lane`, as the kernels read it.
#[inline(always)]
fn weight_q(w: &QWeight, gi: usize, lane: usize, j: usize) -> i32 {
    let (quad, i) = (j / 4, j % 4);
    let base = gi * w.kind.group_block_bytes();
    if !w.kind.nibbles() {
        w.qs[base + quad * 64 + lane * 4 + i] as i32
    } else if quad < 4 {
        (w.qs[base + quad * 64 + lane * 4 + i] & 15) as i32
    } else {
        (w.qs[base + (quad - 4) * 64 + lane * 4 + i] >> 4) as i32
    }
}

fn h2f(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// Portable kernel (and the specification of the SIMD ones).
unsafe fn tile_scalar<const M: usize>(w: &QWeight, g: usize, xs: &QActs, r0: usize, out: &mut [f32]) {
    let k = w.kind;
    let spb = k.scales_per_block();
    for r in 0..M {
        let row = r0 + r;
        for lane in 0..ROWS {
            let mut acc = 0f32;
            for b in 0..w.nb {
                let gi = g * w.nb + b;
                let qx = &xs.q[row * w.inp + b * 32..][..32];
                let isum = |js: std::ops::Range<usize>| js.map(|j| weight_q(w, gi, lane, j) * qx[j] as i32).sum::<i32>() as f32;
                let (a, c) = (xs.a[row * w.nb + b], &xs.c[2 * (row * w.nb + b)..][..2]);
                let d = |h: usize| w.d.get((gi * spb + h) * ROWS + lane);
                acc += if k.halves() {
                    d(0) * (isum(0..16) * a + c[0]) + d(1) * (isum(16..32) * a + c[1])
                } else if k.has_min() {
                    d(0) * a * isum(0..32) + w.m.get(gi * ROWS + lane) * c[0]
                } else {
                    d(0) * (isum(0..32) * a + c[0])
                };
            }
            out[r * ROWS + lane] = acc;
        }
    }
}

/// AVX-512 VNNI: 16 rows per register; two accumulators per activation row (even and odd blocks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_vnni<const K: u8, const M: usize>(w: &QWeight, g: usize, xs: &QActs, r0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let kind = Kind::from_id(K);
    let (nb, gb, spb) = (w.nb, kind.group_block_bytes(), kind.scales_per_block());
    let low = _mm512_set1_epi8(15);
    let load_scales = |p: *const u8| {
        if kind.f32_scales() {
            _mm512_loadu_ps(p as *const f32)
        } else {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
    };
    let mut f = [[_mm512_setzero_ps(); M]; 2];
    macro_rules! block {
        ($b:expr, $acc:expr) => {{
            let b = $b;
            let gi = g * nb + b;
            let base = w.qs.as_ptr().add(gi * gb);
            let mut ws = [_mm512_setzero_si512(); 8];
            if kind.nibbles() {
                for k in 0..4 {
                    let l = _mm512_loadu_si512(base.add(k * 64) as *const _);
                    ws[k] = _mm512_and_si512(l, low);
                    ws[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(l), low);
                }
            } else {
                for k in 0..8 {
                    ws[k] = _mm512_loadu_si512(base.add(k * 64) as *const _);
                }
            }
            let dw = load_scales(w.d.ptr(gi * spb * ROWS));
            for r in 0..M {
                let row = r0 + r;
                let xp = xs.q.as_ptr().add(row * w.inp + b * 32) as *const i32;
                let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                for k in 0..4 {
                    s0 = _mm512_dpbusd_epi32(s0, ws[k], _mm512_set1_epi32(xp.add(k).read_unaligned()));
                    s1 = _mm512_dpbusd_epi32(s1, ws[k + 4], _mm512_set1_epi32(xp.add(k + 4).read_unaligned()));
                }
                let a = _mm512_set1_ps(*xs.a.get_unchecked(row * nb + b));
                let c = xs.c.as_ptr().add(2 * (row * nb + b));
                if kind.halves() {
                    let dw1 = load_scales(w.d.ptr((gi * spb + 1) * ROWS));
                    let lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), a, _mm512_set1_ps(*c));
                    let hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), a, _mm512_set1_ps(*c.add(1)));
                    $acc[r] = _mm512_fmadd_ps(dw, lo, $acc[r]);
                    $acc[r] = _mm512_fmadd_ps(dw1, hi, $acc[r]);
                } else {
                    let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                    if kind.has_min() {
                        let mw = load_scales(w.m.ptr(gi * ROWS));
                        $acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, a), isum, $acc[r]);
                        $acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*c), $acc[r]);
                    } else {
                        $acc[r] = _mm512_fmadd_ps(dw, _mm512_fmadd_ps(isum, a, _mm512_set1_ps(*c)), $acc[r]);
                    }
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
/// offset term is not added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const K: u8, const M: usize>(w: &QWeight, g: usize, xs: &QActs, r0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let kind = Kind::from_id(K);
    let q8 = kind == Kind::Q8_0;
    let (nb, gb, spb) = (w.nb, kind.group_block_bytes(), kind.scales_per_block());
    let low = _mm256_set1_epi8(15);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let load_scales = |p: *const u8, half: usize| {
        if kind.f32_scales() {
            _mm256_loadu_ps((p as *const f32).add(half * 8))
        } else {
            _mm256_cvtph_ps(_mm_loadu_si128((p as *const u16).add(half * 8) as *const __m128i))
        }
    };
    for half in 0..2 {
        let mut f = [_mm256_setzero_ps(); M];
        for b in 0..nb {
            let gi = g * nb + b;
            let base = w.qs.as_ptr().add(gi * gb + half * 32);
            let mut ws = [_mm256_setzero_si256(); 8];
            if kind.nibbles() {
                for k in 0..4 {
                    let l = _mm256_loadu_si256(base.add(k * 64) as *const _);
                    ws[k] = _mm256_and_si256(l, low);
                    ws[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(l), low);
                }
            } else {
                for k in 0..8 {
                    let l = _mm256_loadu_si256(base.add(k * 64) as *const _);
                    ws[k] = if q8 { _mm256_xor_si256(l, flip) } else { l };
                }
            }
            let dw = load_scales(w.d.ptr(gi * spb * ROWS), half);
            for r in 0..M {
                let row = r0 + r;
                let xp = xs.q.as_ptr().add(row * w.inp + b * 32) as *const i32;
                let xb = |k: usize| _mm256_set1_epi32(xp.add(k).read_unaligned());
                let (s0, s1) = if kind.nibbles() {
                    // 15·127·2 per pair, four pairs per half: fits in i16
                    let (mut p0, mut p1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for k in 0..4 {
                        p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(ws[k], xb(k)));
                        p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(ws[k + 4], xb(k + 4)));
                    }
                    (_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones))
                } else {
                    let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for k in 0..8 {
                        let p = if q8 {
                            _mm256_maddubs_epi16(_mm256_abs_epi8(ws[k]), _mm256_sign_epi8(xb(k), ws[k]))
                        } else {
                            _mm256_maddubs_epi16(ws[k], xb(k))
                        };
                        let p = _mm256_madd_epi16(p, ones);
                        if k < 4 {
                            s0 = _mm256_add_epi32(s0, p);
                        } else {
                            s1 = _mm256_add_epi32(s1, p);
                        }
                    }
                    (s0, s1)
                };
                let a = _mm256_set1_ps(*xs.a.get_unchecked(row * nb + b));
                let c = xs.c.as_ptr().add(2 * (row * nb + b));
                if kind.halves() {
                    let dw1 = load_scales(w.d.ptr((gi * spb + 1) * ROWS), half);
                    let lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), a, _mm256_set1_ps(*c));
                    let hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), a, _mm256_set1_ps(*c.add(1)));
                    f[r] = _mm256_fmadd_ps(dw, lo, f[r]);
                    f[r] = _mm256_fmadd_ps(dw1, hi, f[r]);
                    continue;
                }
                let isum = _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1));
                if q8 {
                    f[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, a), isum, f[r]);
                } else if kind.has_min() {
                    let mw = load_scales(w.m.ptr(gi * ROWS), half);
                    f[r] = _mm256_fmadd_ps(_mm256_mul_ps(dw, a), isum, f[r]);
                    f[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*c), f[r]);
                } else {
                    f[r] = _mm256_fmadd_ps(dw, _mm256_fmadd_ps(isum, a, _mm256_set1_ps(*c)), f[r]);
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
        ($f:ident, $k:expr) => {
            match t {
                1 => $f::<$k, 1> as TileFn,
                2 => $f::<$k, 2> as TileFn,
                4 => $f::<$k, 4> as TileFn,
                _ => $f::<$k, 8> as TileFn,
            }
        };
    }
    macro_rules! by_kind {
        ($f:ident) => {
            match kind {
                Kind::Q4_0 => by_rows!($f, 0),
                Kind::Q4_1 => by_rows!($f, 1),
                Kind::Q5_0 => by_rows!($f, 2),
                Kind::Q5_1 => by_rows!($f, 3),
                Kind::Q8_0 => by_rows!($f, 4),
                Kind::Q4K => by_rows!($f, 5),
                Kind::Q5K => by_rows!($f, 6),
                Kind::Q6K => by_rows!($f, 7),
            }
        };
    }
    debug_assert!(Kind::ALL.iter().enumerate().all(|(i, k)| Kind::from_id(i as u8) == *k));
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

/// Sub-block scale and min of a K-quant superblock (llama.cpp's get_scale_min_k4).
fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// One GGML block decoded: q per weight (unsigned), scales (one per 32, or per 16 for Q6_K) and mins (per 32).
fn decode_block(kind: Kind, blk: &[u8], q: &mut [u8], d: &mut Vec<f32>, m: &mut Vec<f32>) {
    let h = |i: usize| h2f(u16::from_le_bytes([blk[i], blk[i + 1]]));
    let nib = |qs: &[u8], q: &mut [u8]| {
        for j in 0..16 {
            q[j] = qs[j] & 15;
            q[j + 16] = qs[j] >> 4;
        }
    };
    match kind {
        Kind::Q4_0 | Kind::Q4_1 => {
            d.push(h(0));
            if kind == Kind::Q4_1 {
                m.push(h(2));
            }
            nib(&blk[blk.len() - 16..], q);
        }
        Kind::Q5_0 | Kind::Q5_1 => {
            d.push(h(0));
            let o = if kind == Kind::Q5_1 {
                m.push(h(2));
                4
            } else {
                2
            };
            let qh = u32::from_le_bytes(blk[o..o + 4].try_into().unwrap());
            nib(&blk[o + 4..o + 20], q);
            for (j, v) in q.iter_mut().enumerate() {
                *v |= (((qh >> j) & 1) as u8) << 4;
            }
        }
        Kind::Q8_0 => {
            d.push(h(0));
            for j in 0..32 {
                q[j] = blk[2 + j] ^ 0x80; // i8 + 128
            }
        }
        Kind::Q4K | Kind::Q5K => {
            let (dd, dmin, sc) = (h(0), h(2), &blk[4..16]);
            let (qh, ql) = if kind == Kind::Q5K { (&blk[16..48], &blk[48..176]) } else { (&[][..], &blk[16..144]) };
            for sub in 0..8 {
                let (s, mn) = scale_min_k4(sub, sc);
                d.push(dd * s as f32);
                m.push(-(dmin * mn as f32));
                let (chunk, high) = (sub / 2, sub % 2 == 1);
                for l in 0..32 {
                    let byte = ql[chunk * 32 + l];
                    let mut v = if high { byte >> 4 } else { byte & 15 };
                    if kind == Kind::Q5K && qh[l] & (1 << sub) != 0 {
                        v += 16;
                    }
                    q[sub * 32 + l] = v;
                }
            }
        }
        Kind::Q6K => {
            let (ql, qh, sc, dd) = (&blk[0..128], &blk[128..192], &blk[192..208], h(208));
            for e in 0..16 {
                d.push(dd * sc[e] as i8 as f32);
            }
            for n in 0..2 {
                let (ql, qh, y) = (&ql[64 * n..], &qh[32 * n..], &mut q[128 * n..]);
                for l in 0..32 {
                    y[l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
    }
}

impl QWeight {
    /// Our kernels take the formats of `Kind` on the CPU; anything else stays with Candle's.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(kind) = Kind::from_ggml(q.dtype()) else { return Ok(None) };
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let (out, inp) = q.shape().dims2()?;
        let data = q.data()?;
        let (be, bb) = kind.ggml_block();
        if inp % be != 0 || data.len() != out * inp / be * bb {
            return Ok(None);
        }
        Ok(Some(Self::repack(kind, &data, out, inp)))
    }

    fn repack(kind: Kind, data: &[u8], out: usize, inp: usize) -> Self {
        let nb = inp / 32;
        let groups = out.div_ceil(ROWS);
        let (be, bb) = kind.ggml_block();
        let (gb, spb) = (kind.group_block_bytes(), kind.scales_per_block());
        let mut d = vec![0f32; groups * nb * spb * ROWS];
        let mut m = vec![0f32; if kind.has_min() { groups * nb * ROWS } else { 0 }];
        let mut qs = vec![0u8; groups * nb * gb];
        let row_bytes = inp / be * bb;
        let (mut q, mut ds, mut ms) = (vec![0u8; inp], Vec::with_capacity(nb * spb), Vec::with_capacity(nb));
        for r in 0..out {
            let (g, lane) = (r / ROWS, r % ROWS);
            ds.clear();
            ms.clear();
            for (i, blk) in data[r * row_bytes..(r + 1) * row_bytes].chunks_exact(bb).enumerate() {
                decode_block(kind, blk, &mut q[i * be..(i + 1) * be], &mut ds, &mut ms);
            }
            for b in 0..nb {
                let gi = g * nb + b;
                for h in 0..spb {
                    d[(gi * spb + h) * ROWS + lane] = ds[b * spb + h];
                }
                if kind.has_min() {
                    m[gi * ROWS + lane] = ms[b];
                }
                let (src, dst) = (&q[b * 32..b * 32 + 32], &mut qs[gi * gb..][..gb]);
                for k in 0..if kind.nibbles() { 4 } else { 8 } {
                    for i in 0..4 {
                        dst[k * 64 + lane * 4 + i] =
                            if kind.nibbles() { src[4 * k + i] | (src[16 + 4 * k + i] << 4) } else { src[4 * k + i] };
                    }
                }
            }
        }
        let pack = |v: Vec<f32>| {
            if v.is_empty() {
                Scales::None
            } else if kind.f32_scales() {
                Scales::F32(v)
            } else {
                // exact: these came from the file's f16
                Scales::F16(v.iter().map(|&x| f16::from_f32(x).to_bits()).collect())
            }
        };
        Self { kind, out, inp, nb, groups, d: pack(d), m: pack(m), qs }
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
        Some(QWeight {
            kind: first.kind,
            out: parts.iter().map(|w| w.out).sum(),
            inp: first.inp,
            nb: first.nb,
            groups: parts.iter().map(|w| w.groups).sum(),
            d: Scales::concat(&parts.iter().map(|w| &w.d).collect::<Vec<_>>()),
            m: Scales::concat(&parts.iter().map(|w| &w.m).collect::<Vec<_>>()),
            qs: parts.iter().flat_map(|w| w.qs.iter().copied()).collect(),
        })
    }

    /// The weight as f32 [out, in] (the same numbers as GGML's dequantization).
    pub fn dequantize(&self) -> Vec<f32> {
        let k = self.kind;
        let spb = k.scales_per_block();
        let mut w = vec![0f32; self.out * self.inp];
        w.par_chunks_mut(self.inp).enumerate().for_each(|(r, dst)| {
            let (g, lane) = (r / ROWS, r % ROWS);
            for b in 0..self.nb {
                let gi = g * self.nb + b;
                for j in 0..32 {
                    let q = weight_q(self, gi, lane, j) as f32;
                    let d = self.d.get((gi * spb + j * spb / 32) * ROWS + lane);
                    dst[b * 32 + j] = if k.has_min() { d * q + self.m.get(gi * ROWS + lane) } else { d * (q - k.offset()) };
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

    /// For every format: the repacked weights dequantize to exactly GGML's numbers (Candle's dequantization),
    /// every kernel equals the scalar one (the same integer arithmetic: equal up to float rounding), and all of
    /// them are close to an f32 matmul with the dequantized weights (they differ by the activations' 8-bit
    /// rounding).
    #[test]
    fn kernels_match_scalar_and_dequantized_matmul() {
        let dev = Device::Cpu;
        let types = [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ];
        for dt in types {
            // 70 rows: a padded last group; 96 inputs: an odd number of blocks (32-block formats only)
            let shapes: &[(usize, usize)] = if dt.block_size() == 256 { &[(70, 256), (48, 512)] } else { &[(70, 96), (64, 256)] };
            for &(out, inp) in shapes {
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

    /// The activation rounding is llama.cpp's: scale amax/127 per 32 stored as f16 (Q8_0), or per 256 in f32 for
    /// the K-quants (Q8_K), values rounded to nearest.
    #[test]
    fn activations_round_like_llama_cpp() {
        let x: Vec<f32> = (0..512).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 97) as f32)).collect();
        for (kind, span) in [(Kind::Q4_0, 32), (Kind::Q6K, 256)] {
            let qa = quantize_acts(kind, &x);
            for (s, xs) in x.chunks(span).enumerate() {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let want = if span == 32 { f16::from_f32(amax / 127.0).to_f32() } else { amax / 127.0 };
                for b in s * span / 32..(s + 1) * span / 32 {
                    assert_eq!(qa.a[b], want, "{kind:?} block {b}");
                }
                for (j, &v) in xs.iter().enumerate() {
                    let back = qa.q[s * span + j] as f32 * amax / 127.0;
                    assert!((back - v).abs() <= amax / 254.0 + 1e-5);
                }
                assert!(qa.q[s * span..(s + 1) * span].iter().any(|&v| v.abs() == 127));
            }
        }
    }
}
