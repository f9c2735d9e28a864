//! The integer dot-product kernels: one group of 16 weight rows against a tile of up to 6 activation rows,
//! for each instruction-set level, and the rounding of activations to 8 bits that they multiply.

use half::f16;

use super::format::Kind;
use super::pack::weight_q;
use super::{QWeight, ROWS};
use crate::kernels::cpu::Isa;

/// Activation rows per kernel call, at most.
pub(super) const TILE: usize = 6;
/// Tile sizes `QWeight::group` cuts its rows into, largest first. Six rows keep the AVX-512 kernel's 12
/// accumulators and 8 weight registers out of the stack: with eight its accumulators spilled, and one thread's
/// Q4_1 product of 16-64 rows (576x1536 and 3072x576) ran at 109-129 GMAC/s against 115-142 with six, in the same
/// runs (`_native.bench_matvec(..., rows=)`, best of 7).
pub(super) const TILES: [usize; 4] = [TILE, 4, 2, 1];

/// How far ahead of the block being multiplied the SIMD kernels prefetch weight bytes: 2 KiB (8 Q4_1 blocks of a
/// group, 4 of Q8_0). On a 2-vCPU Xeon a 2-thread Q4_1 matvec over 18 MB streamed 18.4 GB/s without it and 24-26
/// with 768-3072 bytes (Q8_0 19.7 -> 20.5-22.4) in the same run.
const PREFETCH: usize = 2048;

/// Activation rows rounded to 8 bits, as llama.cpp rounds them for each format: per block of 32 with the scale
/// rounded to f16 (its Q8_0 and Q8_1) for the 32-block formats, per 256 with an f32 scale (its Q8_K) for the
/// K-quants. `q` [rows][in]; per block of 32 the scale `a` (dx) [rows][nb] and two correction terms `c`
/// [rows][nb][2]: the min formats' s = dx·Σ qx (rounded to f16 for Q4_1 and Q5_1, as in Q8_1) in c[0]; the offset
/// formats' −offset·dx·Σ qx, over the block in c[0], or over its two halves in c[0] and c[1] (Q6_K).
pub(super) struct QActs {
    pub(super) q: Vec<i8>,
    pub(super) a: Vec<f32>,
    pub(super) c: Vec<f32>,
}

impl QActs {
    pub(super) fn view(&self) -> ActsRef<'_> {
        ActsRef { q: &self.q, a: &self.a, c: &self.c }
    }
}

/// Rounded activations as the kernels read them: `QActs`'s three arrays, wherever they are held.
#[derive(Clone, Copy)]
pub struct ActsRef<'a> {
    pub(super) q: &'a [i8],
    pub(super) a: &'a [f32],
    pub(super) c: &'a [f32],
}

pub(super) fn quantize_acts(kind: Kind, x: &[f32]) -> QActs {
    let n = x.len() / 32;
    let (mut q, mut a, mut c) = (vec![0i8; x.len()], vec![0f32; n], vec![0f32; 2 * n]);
    quantize_into(kind, x, &mut q, &mut a, &mut c);
    QActs { q, a, c }
}

/// `quantize_acts` into arrays of its sizes (q as long as x, a x.len()/32, c twice that). Rows of a length the
/// format's span (32, or 256 for the K-quants) divides round the same alone as together.
pub(super) fn quantize_into(kind: Kind, x: &[f32], q: &mut [i8], a: &mut [f32], c: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::cpu::isa() == crate::kernels::cpu::Isa::Avx512 && x.len().is_multiple_of(32) {
        assert!(q.len() >= x.len() && a.len() >= x.len() / 32 && c.len() >= x.len() / 16);
        // SAFETY: the CPU has AVX-512 F and BW (the Avx512 level); the sizes are checked above.
        unsafe { quantize_avx512(kind, x, q, a, c) };
        return;
    }
    quantize_scalar(kind, x, q, a, c)
}

/// The rounding's specification (and the kernel of CPUs without AVX-512).
fn quantize_scalar(kind: Kind, x: &[f32], q: &mut [i8], a: &mut [f32], c: &mut [f32]) {
    let k_quant = kind.k_quant();
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
}

/// `quantize_scalar` with AVX-512, the same numbers bit for bit: the maximum is exact in any order (a NaN is
/// passed over as `f32::max` passes it), the rounding to nearest even is the conversion's own (the default
/// MXCSR mode), NaN products become 0 as `as i8` makes them, and the sums are integers. At a batch of 64
/// decoding sequences the scalar loop was 6% of a step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(kind: Kind, x: &[f32], q: &mut [i8], a: &mut [f32], c: &mut [f32]) {
    use std::arch::x86_64::*;
    let k_quant = kind.k_quant();
    let span = if k_quant { 256 } else { 32 };
    // SAFETY: every load reads 16 floats inside x's span being rounded, every store 16 bytes inside q's (q is at
    // least as long as x, checked by the caller), and the target features are the caller's promise.
    unsafe {
        for (i, (xs, qs)) in x.chunks(span).zip(q.chunks_mut(span)).enumerate() {
            let mut mx = _mm512_setzero_ps();
            for v in xs.chunks_exact(16) {
                // max(|v|, m): where v is NaN this keeps m, as f32::max does
                mx = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(v.as_ptr())), mx);
            }
            let amax = _mm512_reduce_max_ps(mx).max(0.0);
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let dx = if k_quant { d } else { f16::from_f32(d).to_f32() };
            for (j, (xb, qb)) in xs.chunks_exact(32).zip(qs.chunks_exact_mut(32)).enumerate() {
                let mut sums = [0i32; 2];
                for (h, sum) in sums.iter_mut().enumerate() {
                    let p = _mm512_mul_ps(_mm512_loadu_ps(xb.as_ptr().add(16 * h)), id);
                    let ordered = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(p, p);
                    let qi = _mm512_maskz_mov_epi32(ordered, _mm512_cvtps_epi32(p));
                    _mm_storeu_si128(qb.as_mut_ptr().add(16 * h) as *mut __m128i, _mm512_cvtsepi32_epi8(qi));
                    *sum = _mm512_reduce_add_epi32(qi);
                }
                let b = i * span / 32 + j;
                let sum = (sums[0] + sums[1]) as f32;
                a[b] = dx;
                if kind.has_min() {
                    c[2 * b] = if k_quant { dx * sum } else { f16::from_f32(d * sum).to_f32() };
                } else if kind.halves() {
                    c[2 * b] = -kind.offset() * dx * sums[0] as f32;
                    c[2 * b + 1] = -kind.offset() * dx * sums[1] as f32;
                } else {
                    c[2 * b] = -kind.offset() * dx * sum;
                }
            }
        }
    }
}

/// One group (16 weight rows) against activation rows r0..r0+M, writing out[r][lane] for r < M ([M][16]).
pub(super) type TileFn = unsafe fn(&QWeight, usize, &ActsRef, usize, &mut [f32]);

/// Portable kernel (and the specification of the SIMD ones).
unsafe fn tile_scalar<const M: usize>(w: &QWeight, g: usize, xs: &ActsRef, r0: usize, out: &mut [f32]) {
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

/// Prefetch block `gi`'s bytes PREFETCH ahead, and its scales as far ahead: the hardware prefetcher alone left a
/// 2-thread Q4_1 matvec a quarter below the rate it reaches with it (see PREFETCH). A prefetch never faults; past
/// the end of the weights it is simply wasted.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(w: &QWeight, gi: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let kind = w.kind;
    let (gb, spb) = (kind.group_block_bytes(), kind.scales_per_block());
    // bytes per scale entry: a K-quant's sub-block integer, else an f16
    let sb = if kind.k_quant() { 1 } else { 2 };
    let ahead = w.qs.as_ptr().wrapping_add(gi * gb + PREFETCH);
    // SAFETY: prefetching is a hint with no effect on memory or faults, whatever the address.
    unsafe {
        for l in 0..gb.div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l * 64) as *const i8);
        }
        _mm_prefetch::<_MM_HINT_T0>(w.d.ptr(gi * spb * ROWS).wrapping_add(PREFETCH * spb * ROWS * sb / gb) as *const i8);
        if kind.has_min() {
            _mm_prefetch::<_MM_HINT_T0>(w.m.ptr(gi * ROWS).wrapping_add(PREFETCH * ROWS * sb / gb) as *const i8);
        }
    }
}

/// AVX-512 VNNI: 16 rows per register; two accumulators per activation row (even and odd blocks, added at the
/// end), the same arithmetic in the same order for every tile size, so a row's numbers are the same bit for bit
/// whatever tile it is in. The rows of a tile (1, 2, 4 or 6) are unrolled by hand so that every accumulator has a
/// register of its own: left as a loop, the compiler kept them on the stack and each block's two multiply-adds
/// per row went through memory.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn tile_vnni<const K: u8, const M: usize>(w: &QWeight, g: usize, xs: &ActsRef, r0: usize, out: &mut [f32]) {
    // SAFETY: the caller (QWeight::matmul through tile_fn) has checked that the CPU has the Avx512 level, passes a group g < w.groups, activations of at least r0 + M rows made by quantize_acts for this weight's input size, and out of M·16 floats; the loads below read blocks of that group (w.qs, w.d, w.m sized groups·nb per block), 32 activation bytes per block of rows r0..r0+M, and the stores write out's M rows of 16.
    unsafe {
        use std::arch::x86_64::*;
        let kind = Kind::from_id(K);
        let (nb, gb, spb) = (w.nb, kind.group_block_bytes(), kind.scales_per_block());
        let low = _mm512_set1_epi8(15);
        // the 16 rows' entry i of `s`: f16 as the file has them, or a K-quant's sub-block integers times their
        // superblock's f16 scale (the f32 product Scales::get gives)
        let load_scales = |s: &super::Scales, i: usize, gi: usize| {
            if kind.k_quant() {
                let ints = _mm_loadu_si128(s.ptr(i) as *const __m128i);
                let ints = if kind == Kind::Q6K { _mm512_cvtepi8_epi32(ints) } else { _mm512_cvtepu8_epi32(ints) };
                _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(s.sup_ptr(gi) as *const __m256i)), _mm512_cvtepi32_ps(ints))
            } else {
                _mm512_cvtph_ps(_mm256_loadu_si256(s.ptr(i) as *const __m256i))
            }
        };
        let zero = _mm512_setzero_ps();
        // eight slots whatever M is: `row!` names slots 0..8 by literal, and those at or past M are compiled out
        let (mut f0, mut f1) = ([zero; 8], [zero; 8]);
        // one block of the group against every row of the tile, added into `acc` (f0 for even blocks, f1 for odd)
        macro_rules! block {
            ($b:expr, $acc:ident) => {{
            let b: usize = $b;
            let acc: &mut [__m512; 8] = &mut $acc;
            let gi = g * nb + b;
            let base = w.qs.as_ptr().add(gi * gb);
            prefetch(w, gi);
            let mut ws = [_mm512_setzero_si512(); 8];
            if kind.nibbles() {
                for k in 0..4 {
                    let l = _mm512_loadu_si512(base.add(k * 64) as *const _);
                    ws[k] = _mm512_and_si512(l, low);
                    ws[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(l), low);
                }
                for p in 0..kind.planes() {
                    let bit = _mm512_set1_epi8(16 << p);
                    for k in 0..8 {
                        let plane = (base.add(256 + 64 * p + 8 * k) as *const u64).read_unaligned();
                        ws[k] = _mm512_mask_add_epi8(ws[k], plane, ws[k], bit);
                    }
                }
            } else {
                for k in 0..8 {
                    ws[k] = _mm512_loadu_si512(base.add(k * 64) as *const _);
                }
            }
            let dw = load_scales(&w.d, gi * spb * ROWS, gi);
            let dw1 = if kind.halves() { load_scales(&w.d, (gi * spb + 1) * ROWS, gi) } else { zero };
            let mw = if kind.has_min() { load_scales(&w.m, gi * ROWS, gi) } else { zero };
            macro_rules! row {
                ($r:literal) => {
                    if $r < M {
                        let row = r0 + $r;
                        let xp = xs.q.as_ptr().add(row * w.inp + b * 32) as *const i32;
                        let (mut s0, mut s1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                        for k in 0..4 {
                            s0 = _mm512_dpbusd_epi32(s0, ws[k], _mm512_set1_epi32(xp.add(k).read_unaligned()));
                            s1 = _mm512_dpbusd_epi32(s1, ws[k + 4], _mm512_set1_epi32(xp.add(k + 4).read_unaligned()));
                        }
                        let a = _mm512_set1_ps(*xs.a.get_unchecked(row * nb + b));
                        let c = xs.c.as_ptr().add(2 * (row * nb + b));
                        if kind.halves() {
                            let lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), a, _mm512_set1_ps(*c));
                            let hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), a, _mm512_set1_ps(*c.add(1)));
                            acc[$r] = _mm512_fmadd_ps(dw, lo, acc[$r]);
                            acc[$r] = _mm512_fmadd_ps(dw1, hi, acc[$r]);
                        } else {
                            let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
                            if kind.has_min() {
                                acc[$r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, a), isum, acc[$r]);
                                acc[$r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*c), acc[$r]);
                            } else {
                                acc[$r] = _mm512_fmadd_ps(dw, _mm512_fmadd_ps(isum, a, _mm512_set1_ps(*c)), acc[$r]);
                            }
                        }
                    }
                };
            }
            row!(0);
            row!(1);
            row!(2);
            row!(3);
            row!(4);
            row!(5);
            row!(6);
            row!(7);
            }};
        }
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
}

/// AVX2: the group in two halves of 8 rows; `vpmaddubsw` + `vpmaddwd` for the four-byte sums. Q8_0 bytes go back
/// to signed here (|q|·sign(qx, q), llama.cpp's trick: q + 128 would overflow the 16-bit pair sums), so its
/// offset term is not added.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // const-sized loops over register arrays, unrolled by the compiler
unsafe fn tile_avx2<const K: u8, const M: usize>(w: &QWeight, g: usize, xs: &ActsRef, r0: usize, out: &mut [f32]) {
    // SAFETY: as for tile_vnni, with the Avx2 level: every load stays inside group g's blocks and rows r0..r0+M of the activations, every store inside out's M rows of 16.
    unsafe {
        use std::arch::x86_64::*;
        let kind = Kind::from_id(K);
        let q8 = kind == Kind::Q8_0;
        let (nb, gb, spb) = (w.nb, kind.group_block_bytes(), kind.scales_per_block());
        let low = _mm256_set1_epi8(15);
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let spread_bytes = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
        let bit_of_byte = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        // as in tile_vnni, for 8 rows: this half's
        let load_scales = |s: &super::Scales, i: usize, gi: usize, half: usize| {
            let i = i + half * 8;
            let f16s = if kind.k_quant() { (s.sup_ptr(gi) as *const u16).add(half * 8) as *const u8 } else { s.ptr(i) };
            let sup = _mm256_cvtph_ps(_mm_loadu_si128(f16s as *const __m128i));
            if kind.k_quant() {
                let ints = _mm_loadl_epi64(s.ptr(i) as *const __m128i);
                let ints = if kind == Kind::Q6K { _mm256_cvtepi8_epi32(ints) } else { _mm256_cvtepu8_epi32(ints) };
                _mm256_mul_ps(sup, _mm256_cvtepi32_ps(ints))
            } else {
                sup
            }
        };
        for half in 0..2 {
            let mut f = [_mm256_setzero_ps(); M];
            for b in 0..nb {
                let gi = g * nb + b;
                if half == 0 {
                    prefetch(w, gi);
                }
                let base = w.qs.as_ptr().add(gi * gb + half * 32);
                let mut ws = [_mm256_setzero_si256(); 8];
                if kind.nibbles() {
                    for k in 0..4 {
                        let l = _mm256_loadu_si256(base.add(k * 64) as *const _);
                        ws[k] = _mm256_and_si256(l, low);
                        ws[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(l), low);
                    }
                    for p in 0..kind.planes() {
                        let bit = _mm256_set1_epi8(16 << p);
                        for k in 0..8 {
                            // this half's 32 bits of the plane, bit j to byte j: 0xFF where set
                            let plane = (w.qs.as_ptr().add(gi * gb + 256 + 64 * p + 8 * k + 4 * half) as *const i32).read_unaligned();
                            let spread = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(plane), spread_bytes), bit_of_byte);
                            let set = _mm256_cmpeq_epi8(spread, bit_of_byte);
                            ws[k] = _mm256_add_epi8(ws[k], _mm256_and_si256(set, bit));
                        }
                    }
                } else {
                    for k in 0..8 {
                        let l = _mm256_loadu_si256(base.add(k * 64) as *const _);
                        ws[k] = if q8 { _mm256_xor_si256(l, flip) } else { l };
                    }
                }
                let dw = load_scales(&w.d, gi * spb * ROWS, gi, half);
                for r in 0..M {
                    let row = r0 + r;
                    let xp = xs.q.as_ptr().add(row * w.inp + b * 32) as *const i32;
                    let xb = |k: usize| _mm256_set1_epi32(xp.add(k).read_unaligned());
                    let (s0, s1) = if kind.nibbles() && kind.planes() < 2 {
                        // at most 31·127·2 per pair, four pairs per half: fits in i16 (not Q6_K's 63)
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
                        let dw1 = load_scales(&w.d, (gi * spb + 1) * ROWS, gi, half);
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
                        let mw = load_scales(&w.m, gi * ROWS, gi, half);
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
}

/// The kernel for an instruction set, a block format and a tile of `t` (1, 2, 4 or TILE) activation rows.
pub(super) fn tile_fn(isa: Isa, kind: Kind, t: usize) -> TileFn {
    macro_rules! by_rows {
        ($f:ident, $k:expr) => {
            match t {
                1 => $f::<$k, 1> as TileFn,
                2 => $f::<$k, 2> as TileFn,
                4 => $f::<$k, 4> as TileFn,
                _ => $f::<$k, TILE> as TileFn,
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
        Isa::Avx512 => by_kind!(tile_vnni),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => by_kind!(tile_avx2),
        _ => match t {
            1 => tile_scalar::<1> as TileFn,
            2 => tile_scalar::<2> as TileFn,
            4 => tile_scalar::<4> as TileFn,
            _ => tile_scalar::<TILE> as TileFn,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 rounding equals the scalar one bit for bit, for every format's span and correction terms, on
    /// rows with zeros, ties, NaN and infinities among ordinary values.
    #[test]
    fn simd_rounding_equals_scalar() {
        #[cfg(target_arch = "x86_64")]
        {
            if !crate::kernels::cpu::available().contains(&crate::kernels::cpu::Isa::Avx512) {
                return;
            }
            let mut s = 12345u64;
            let mut next = || {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
            };
            let mut rows: Vec<Vec<f32>> = vec![];
            for _ in 0..20 {
                rows.push((0..512).map(|_| next()).collect());
            }
            rows.push(vec![0.0; 512]);
            // ties: values that land on k + 0.5 once scaled (amax 127 makes the scale 1)
            rows.push((0..512).map(|i| if i % 32 == 0 { 127.0 } else { (i % 7) as f32 - 3.5 }).collect());
            let mut special: Vec<f32> = (0..512).map(|_| next()).collect();
            special[3] = f32::NAN;
            special[40] = f32::INFINITY;
            special[300] = f32::NEG_INFINITY;
            special[301] = f32::NAN;
            special[77] = -0.0;
            rows.push(special);
            for kind in Kind::ALL {
                for x in &rows {
                    let n = x.len();
                    let (mut q0, mut a0, mut c0) = (vec![0i8; n], vec![0f32; n / 32], vec![0f32; n / 16]);
                    let (mut q1, mut a1, mut c1) = (vec![0i8; n], vec![0f32; n / 32], vec![0f32; n / 16]);
                    quantize_scalar(kind, x, &mut q0, &mut a0, &mut c0);
                    // SAFETY: the CPU has the Avx512 level (checked above); the arrays have the sizes asked for.
                    unsafe { quantize_avx512(kind, x, &mut q1, &mut a1, &mut c1) };
                    assert_eq!(q0, q1, "{kind:?}");
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a0), bits(&a1), "{kind:?}");
                    assert_eq!(bits(&c0), bits(&c1), "{kind:?}");
                }
            }
        }
    }
}
