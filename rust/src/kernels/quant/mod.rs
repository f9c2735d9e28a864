//! Products with weights in llama.cpp's block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K), computed as
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
//! rows and a block, chunk k (0..8) holds, at byte 4·r + i, weight 4k + i of row r. Q8_0 stores the chunks as
//! bytes (512 per group and block); every other format stores their low four bits as nibbles, chunk k < 4 in the
//! low and chunk k + 4 in the high nibble of 256 bytes (the GGML byte order itself), followed by one 64-bit plane
//! per bit above the fourth (one for Q5_0, Q5_1 and Q5_K, two for Q6_K): plane p holds for chunk k, at bit 4·r + i,
//! bit 4 + p of that weight, so that a byte-masked add restores it (320 and 384 bytes per group and block: a 5-bit
//! weight streams as 5 bits, not 8). A dot-product instruction (AVX-512 VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`)
//! against four activation bytes broadcast to every lane then sums four products per row for 16 rows at once, and
//! the 16 rows' scales of a block load as one vector (f16 as in the file for the 32-blocks; for the K-quants the
//! sub-blocks' integer scales, widened and multiplied by their superblock's f16 scale). Per block and row, with qx the activations' bytes,
//! dx their scale and s = dx·Σ qx:
//!     offset formats:  d·(dx·Σ q·qx − offset·s)           min formats:  d·dx·Σ q·qx + m·s
//! Many activation rows (prefill) go through the same kernel in tiles of up to 6 rows, so each group's weights
//! stay in L1 while every tile passes over them.

mod format;
mod pack;
mod tile;

use candle_core::quantized::QTensor;
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::cpu::{self, Isa};
use crate::kernels::huge::Buf;
pub use format::Kind;
pub use tile::ActsRef;
use tile::{quantize_acts, quantize_into, tile_fn, TILE, TILES};

/// Rows interleaved per group (one 512-bit register of i32 lanes).
const ROWS: usize = 16;

/// Scales or mins of every (group, block): [groups][nb][scales per block][ROWS].
enum Scales {
    /// the 32-block formats': as the file holds them
    F16(Buf<u16>),
    /// the K-quants': per entry the sub-block's integer scale or min (6 bits; Q6_K's scales i8), and per superblock
    /// of 8 blocks and row the f16 scale it is multiplied by ([groups][nb / 8][ROWS]), the product formed in f32
    /// where it is used, as llama.cpp forms it. An f32 per entry instead (an earlier layout) read a third more
    /// bytes than the file for Q4_K (0.75 a weight against 0.5625) and a fifth more for Q6_K.
    Sub { ints: Buf<u8>, sup: Buf<u16>, signed: bool, spb: usize },
    None,
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
    qs: Buf<u8>,
}

impl QWeight {
    /// A GGUF tensor's raw bytes [out, inp] in `dtype`, repacked, when our kernels take that format.
    pub fn from_raw(dtype: candle_core::quantized::GgmlDType, data: &[u8], out: usize, inp: usize) -> Option<Self> {
        Self::from_raw_releasing(dtype, data, out, inp, &|_| {})
    }

    /// `from_raw`, handing each stretch of `data` (about 1 MiB) to `release` once it is copied: a tensor read
    /// from a file mapping then never holds both its mapped pages and its copy in full.
    pub fn from_raw_releasing(
        dtype: candle_core::quantized::GgmlDType,
        data: &[u8],
        out: usize,
        inp: usize,
        release: &dyn Fn(&[u8]),
    ) -> Option<Self> {
        let kind = Kind::from_ggml(dtype)?;
        let (be, bb) = kind.ggml_block();
        if !inp.is_multiple_of(be) || data.len() != out * inp / be * bb {
            return None;
        }
        Some(Self::repack(kind, data, out, inp, release))
    }

    /// Our kernels take the formats of `Kind` on the CPU; anything else stays with Candle's.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        if !q.device().is_cpu() {
            return Ok(None);
        }
        let (out, inp) = q.shape().dims2()?;
        Ok(Self::from_raw(q.dtype(), &q.data()?, out, inp))
    }

    pub fn out(&self) -> usize {
        self.out
    }

    pub fn inp(&self) -> usize {
        self.inp
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Groups of 16 output rows (the last one padded).
    pub fn groups(&self) -> usize {
        self.groups
    }

    /// The memory groups `gs` read, as (address, length) stretches: their weights, then their scales and their
    /// offsets or mins (empty stretches where the format has none). For bringing them into a cache ahead of use.
    pub fn group_bytes(&self, gs: std::ops::Range<usize>) -> [(*const u8, usize); 5] {
        assert!(gs.start <= gs.end && gs.end <= self.groups);
        let (a, b) = (gs.start * self.nb, gs.end * self.nb);
        let (gb, spb) = (self.kind.group_block_bytes(), self.kind.scales_per_block());
        let [d0, d1] = self.d.bytes(a, b, spb);
        let [m0, m1] = self.m.bytes(a, b, spb);
        [(self.qs[a * gb..].as_ptr(), (b - a) * gb), d0, d1, m0, m1]
    }

    /// Group `g` of y = x·Wᵀ for the `m` rows of `acts` (rounded for this weight's kind and input size):
    /// out [m][16], lanes past `out()` zero. The same numbers whatever `m` is and whichever thread runs it.
    pub fn group(&self, isa: Isa, acts: &ActsRef, m: usize, g: usize, out: &mut [f32]) {
        assert!(g < self.groups && out.len() == m * ROWS && acts.q.len() >= m * self.inp && acts.a.len() >= m * self.nb && acts.c.len() >= 2 * m * self.nb && cpu::available().contains(&isa));
        let mut r = 0;
        while r < m {
            let t = TILES.into_iter().find(|&t| t <= m - r).unwrap();
            // SAFETY: `isa` is one this CPU has (checked), and the slices have the kernel's sizes (checked).
            unsafe { tile_fn(isa, self.kind, t)(self, g, acts, r, &mut out[r * ROWS..(r + t) * ROWS]) };
            r += t;
        }
    }

    /// y [m, out] = x [m, in] · Wᵀ with the kernels of `isa`.
    pub fn matmul(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.inp);
        let acts = quantize_acts(self.kind, x);
        let acts = acts.view();
        let mut yt = vec![0f32; self.groups * m * ROWS]; // [groups][m][ROWS]
        let run = |g0: usize, out: &mut [f32]| {
            for (i, o) in out.chunks_exact_mut(m * ROWS).enumerate() {
                self.group(isa, &acts, m, g0 + i, o);
            }
        };
        // Split the groups between the threads; a matrix too small to be worth a hand-off stays on this thread.
        let threads = cpu::threads();
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

/// Activations of `m` rows of `inp` values rounded for one kind of weight, each row set by whichever thread of a
/// team (rows apart), then read by all of them (in a later stage).
pub struct ActsBuf {
    kind: Kind,
    inp: usize,
    q: cpu::SyncBuf<i8>,
    a: cpu::SyncBuf<f32>,
    c: cpu::SyncBuf<f32>,
}

impl ActsBuf {
    pub fn new(kind: Kind, m: usize, inp: usize) -> Self {
        let nb = inp / 32;
        Self { kind, inp, q: cpu::SyncBuf::new(m * inp), a: cpu::SyncBuf::new(m * nb), c: cpu::SyncBuf::new(2 * m * nb) }
    }

    /// Round row `r` (`x`, `inp` values) as `QWeight::matmul` rounds it.
    ///
    /// # Safety
    /// No other thread sets row `r`, and no `view` is alive, while this runs.
    pub unsafe fn set_row(&self, r: usize, x: &[f32]) {
        assert_eq!(x.len(), self.inp);
        let nb = self.inp / 32;
        // SAFETY: row r's parts alone, exclusive by the caller's promise.
        unsafe { quantize_into(self.kind, x, self.q.part_mut(r * self.inp, self.inp), self.a.part_mut(r * nb, nb), self.c.part_mut(2 * r * nb, 2 * nb)) }
    }

    /// # Safety
    /// No `set_row` runs while the view is alive.
    pub unsafe fn view(&self) -> ActsRef<'_> {
        // SAFETY: reads only, by the caller's promise.
        unsafe { ActsRef { q: self.q.get(), a: self.a.get(), c: self.c.get() } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::{Device, Tensor};
    use half::f16;

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
                    for &isa in cpu::available() {
                        let got = ours.matmul(isa, &x, m);
                        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
                        let err = got.iter().zip(&scalar).fold(0f32, |a, (g, s)| a.max((g - s).abs()));
                        assert!(err <= 1e-5 * scale, "{isa:?} {dt:?} {out}x{inp} m={m}: {err} from the scalar kernel");
                    }
                }
            }
        }
    }

    /// `group_bytes` names every byte a group's kernel reads: the stretches of consecutive groups follow each
    /// other, and those of all groups together are the whole of the weights and scales.
    #[test]
    fn group_bytes_cover_the_buffers() {
        let dev = Device::Cpu;
        for dt in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
            let inp = if dt.block_size() == 256 { 512 } else { 96 };
            let w = Tensor::randn(0f32, 1.0, (70, inp), &dev).unwrap();
            let ours = QWeight::from_qtensor(&QTensor::quantize(&w, dt).unwrap()).unwrap().unwrap();
            let all = ours.group_bytes(0..ours.groups());
            let scales = |s: &Scales| match s {
                Scales::F16(v) => (v.as_ptr() as *const u8, v.len() * 2, std::ptr::null(), 0),
                Scales::Sub { ints, sup, .. } => (ints.as_ptr(), ints.len(), sup.as_ptr() as *const u8, sup.len() * 2),
                Scales::None => (std::ptr::null(), 0, std::ptr::null(), 0),
            };
            let (d, m) = (scales(&ours.d), scales(&ours.m));
            let want = [(ours.qs.as_ptr(), ours.qs.len()), (d.0, d.1), (d.2, d.3), (m.0, m.1), (m.2, m.3)];
            for (i, (got, want)) in all.iter().zip(want).enumerate() {
                assert_eq!(got.1, want.1, "{dt:?} stretch {i}: length");
                if want.1 > 0 {
                    assert_eq!(got.0, want.0, "{dt:?} stretch {i}: start");
                }
            }
            for g in 0..ours.groups() - 1 {
                let (a, b) = (ours.group_bytes(g..g + 1), ours.group_bytes(g + 1..g + 2));
                // the weights and the entries of consecutive groups are contiguous (superblock scales are per 8 blocks)
                for i in [0, 1, 3] {
                    if a[i].1 > 0 {
                        assert_eq!(a[i].0.wrapping_add(a[i].1), b[i].0, "{dt:?} group {g} stretch {i}");
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
