//! The repacked rows: 16 rows interleaved per group so that one SIMD register holds the same four weights of 16
//! rows (see the module above), with their scales side by side.

use half::f16;
use rayon::prelude::*;

use super::format::{decode_block, h2f, k_scales, Kind};
use super::{QWeight, Scales, ROWS};
use crate::kernels::huge::Buf;

impl Scales {
    /// Entry `i`'s superblock scale: `Sub`'s `sup` index.
    #[inline(always)]
    fn sup_index(i: usize, spb: usize) -> usize {
        (i / ROWS / spb / 8) * ROWS + i % ROWS
    }

    pub(super) fn get(&self, i: usize) -> f32 {
        match self {
            Scales::F16(v) => h2f(v[i]),
            Scales::Sub { ints, sup, signed, spb } => {
                let q = if *signed { ints[i] as i8 as f32 } else { ints[i] as f32 };
                h2f(sup[Self::sup_index(i, *spb)]) * q
            }
            Scales::None => 0.0,
        }
    }

    /// For the SIMD kernels: the address of entry `i` (f16 bits, or `Sub`'s integer).
    pub(super) fn ptr(&self, i: usize) -> *const u8 {
        match self {
            Scales::F16(v) => v[i..].as_ptr() as *const u8,
            Scales::Sub { ints, .. } => ints[i..].as_ptr(),
            Scales::None => std::ptr::null(),
        }
    }

    /// For the SIMD kernels: the address of block `gi`'s 16 superblock scales (f16 bits; `Sub` only), the
    /// `sup_index` of its entries without dividing by the scales per block.
    pub(super) fn sup_ptr(&self, gi: usize) -> *const u8 {
        match self {
            Scales::Sub { sup, .. } => sup[gi / 8 * ROWS..].as_ptr() as *const u8,
            _ => std::ptr::null(),
        }
    }

    /// The bytes of blocks `a..b` (block index gi = group · nb + block), `spb` entries a block for `F16`:
    /// (address, length) of the entries, and of `Sub`'s superblock scales (empty where there are none).
    pub(super) fn bytes(&self, a: usize, b: usize, spb: usize) -> [(*const u8, usize); 2] {
        match self {
            Scales::F16(v) => [(v[a * spb * ROWS..].as_ptr() as *const u8, (b - a) * spb * ROWS * 2), (std::ptr::null(), 0)],
            Scales::Sub { ints, sup, spb, .. } => {
                let (ea, eb) = (a * spb * ROWS, b * spb * ROWS);
                let (sa, sb) = (a / 8 * ROWS, b.div_ceil(8) * ROWS);
                [(ints[ea..].as_ptr(), eb - ea), (sup[sa..].as_ptr() as *const u8, (sb - sa) * 2)]
            }
            Scales::None => [(std::ptr::null(), 0); 2],
        }
    }

    pub(super) fn concat(parts: &[&Scales]) -> Scales {
        match parts[0] {
            Scales::F16(_) => {
                Scales::F16(Buf::concat(&parts.iter().filter_map(|s| if let Scales::F16(v) = s { Some(&v[..]) } else { None }).collect::<Vec<_>>()))
            }
            &Scales::Sub { signed, spb, .. } => {
                let subs: Vec<(&[u8], &[u16])> =
                    parts.iter().filter_map(|s| if let Scales::Sub { ints, sup, .. } = s { Some((&ints[..], &sup[..])) } else { None }).collect();
                let ints = Buf::concat(&subs.iter().map(|s| s.0).collect::<Vec<_>>());
                let sup = Buf::concat(&subs.iter().map(|s| s.1).collect::<Vec<_>>());
                Scales::Sub { ints, sup, signed, spb }
            }
            Scales::None => Scales::None,
        }
    }
}

/// The integer weight at position j of block `gi`'s row `lane`, as the kernels read it.
#[inline(always)]
pub(super) fn weight_q(w: &QWeight, gi: usize, lane: usize, j: usize) -> i32 {
    let (quad, i) = (j / 4, j % 4);
    let base = gi * w.kind.group_block_bytes();
    if !w.kind.nibbles() {
        return w.qs[base + quad * 64 + lane * 4 + i] as i32;
    }
    let byte = w.qs[base + (quad % 4) * 64 + lane * 4 + i];
    let mut q = if quad < 4 { byte & 15 } else { byte >> 4 } as i32;
    for p in 0..w.kind.planes() {
        let bits = u64::from_le_bytes(w.qs[base + 256 + 64 * p + 8 * quad..][..8].try_into().unwrap());
        q |= (((bits >> (lane * 4 + i)) & 1) as i32) << (4 + p);
    }
    q
}

impl QWeight {
    pub(super) fn repack(kind: Kind, data: &[u8], out: usize, inp: usize, release: &dyn Fn(&[u8])) -> Self {
        let nb = inp / 32;
        let groups = out.div_ceil(ROWS);
        let (be, bb) = kind.ggml_block();
        let (gb, spb) = (kind.group_block_bytes(), kind.scales_per_block());
        let k = kind.k_quant();
        // the 32-block formats' scales and mins (the K-quants' go into the four arrays after)
        let mut d = vec![0f32; if k { 0 } else { groups * nb * spb * ROWS }];
        let mut m = vec![0f32; if kind.has_min() && !k { groups * nb * ROWS } else { 0 }];
        // (the repacked rows and every scale go straight into huge-page regions: `kernels::huge`)
        let (mut d_int, mut d_sup) = (Buf::<u8>::zeroed(if k { groups * nb * spb * ROWS } else { 0 }), Buf::<u16>::zeroed(if k { groups * nb / 8 * ROWS } else { 0 }));
        let (mut m_int, mut m_sup) = (Buf::<u8>::zeroed(if k && kind.has_min() { groups * nb * ROWS } else { 0 }), Buf::<u16>::zeroed(if k && kind.has_min() { groups * nb / 8 * ROWS } else { 0 }));
        let (mut sc, mut mn) = (Vec::with_capacity(16), Vec::with_capacity(8));
        let mut qs = Buf::<u8>::zeroed(groups * nb * gb);
        let row_bytes = inp / be * bb;
        let (mut q, mut ds, mut ms) = (vec![0u8; inp], Vec::with_capacity(nb * spb), Vec::with_capacity(nb));
        let mut released = 0;
        for r in 0..out {
            if (r * row_bytes - released) >= 1 << 20 {
                release(&data[released..r * row_bytes]);
                released = r * row_bytes;
            }
            let (g, lane) = (r / ROWS, r % ROWS);
            ds.clear();
            ms.clear();
            for (i, blk) in data[r * row_bytes..(r + 1) * row_bytes].chunks_exact(bb).enumerate() {
                decode_block(kind, blk, &mut q[i * be..(i + 1) * be], &mut ds, &mut ms);
                if k {
                    // superblock i: blocks 8i..8i+8 of the row
                    sc.clear();
                    mn.clear();
                    let (sd, sm) = k_scales(kind, blk, &mut sc, &mut mn);
                    let gs = g * nb / 8 + i;
                    d_sup[gs * ROWS + lane] = sd;
                    for (j, &v) in sc.iter().enumerate() {
                        d_int[((g * nb + 8 * i) * spb + j) * ROWS + lane] = v;
                    }
                    if kind.has_min() {
                        m_sup[gs * ROWS + lane] = sm;
                        for (j, &v) in mn.iter().enumerate() {
                            m_int[(g * nb + 8 * i + j) * ROWS + lane] = v;
                        }
                    }
                }
            }
            for b in 0..nb {
                let gi = g * nb + b;
                if !k {
                    for h in 0..spb {
                        d[(gi * spb + h) * ROWS + lane] = ds[b * spb + h];
                    }
                    if kind.has_min() {
                        m[gi * ROWS + lane] = ms[b];
                    }
                }
                let (src, dst) = (&q[b * 32..b * 32 + 32], &mut qs[gi * gb..][..gb]);
                for k in 0..8 {
                    for i in 0..4 {
                        let (v, at) = (src[4 * k + i], lane * 4 + i);
                        if !kind.nibbles() {
                            dst[k * 64 + at] = v;
                            continue;
                        }
                        dst[(k % 4) * 64 + at] |= (v & 15) << if k < 4 { 0 } else { 4 };
                        for p in 0..kind.planes() {
                            dst[256 + 64 * p + 8 * k + at / 8] |= ((v >> (4 + p)) & 1) << (at % 8);
                        }
                    }
                }
            }
        }
        let pack = |v: Vec<f32>| {
            if v.is_empty() {
                Scales::None
            } else {
                // exact: these came from the file's f16
                let mut bits = Buf::zeroed(v.len());
                bits.iter_mut().zip(&v).for_each(|(b, &x)| *b = f16::from_f32(x).to_bits());
                Scales::F16(bits)
            }
        };
        let (d, m) = if k {
            let signed = kind == Kind::Q6K;
            let m = if kind.has_min() { Scales::Sub { ints: m_int, sup: m_sup, signed, spb: 1 } } else { Scales::None };
            (Scales::Sub { ints: d_int, sup: d_sup, signed, spb }, m)
        } else {
            (pack(d), pack(m))
        };
        Self { kind, out, inp, nb, groups, d, m, qs }
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
            qs: Buf::concat(&parts.iter().map(|w| &w.qs[..]).collect::<Vec<_>>()),
        })
    }

    /// The weight as f32 [out, in] (the same numbers as GGML's dequantization).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        w.par_chunks_mut(self.inp).enumerate().for_each(|(r, dst)| self.dequantize_row(r, dst));
        w
    }

    /// Rows `rows` as f32 [rows.len(), in], as `dequantize` gives them (an embedding lookup in the file's type).
    pub fn dequantize_rows(&self, rows: &[u32]) -> Vec<f32> {
        let mut w = vec![0f32; rows.len() * self.inp];
        w.chunks_mut(self.inp).zip(rows).for_each(|(dst, &r)| self.dequantize_row(r as usize, dst));
        w
    }

    fn dequantize_row(&self, r: usize, dst: &mut [f32]) {
        let k = self.kind;
        let spb = k.scales_per_block();
        let (g, lane) = (r / ROWS, r % ROWS);
        for b in 0..self.nb {
            let gi = g * self.nb + b;
            for j in 0..32 {
                let q = weight_q(self, gi, lane, j) as f32;
                let d = self.d.get((gi * spb + j * spb / 32) * ROWS + lane);
                dst[b * 32 + j] = if k.has_min() { d * q + self.m.get(gi * ROWS + lane) } else { d * (q - k.offset()) };
            }
        }
    }

}
