//! llama.cpp's block formats: what a block holds and how it decodes into integers and scales.

use candle_core::quantized::GgmlDType;
use half::f16;

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
    pub(super) const ALL: [Kind; 8] = [Kind::Q4_0, Kind::Q4_1, Kind::Q5_0, Kind::Q5_1, Kind::Q8_0, Kind::Q4K, Kind::Q5K, Kind::Q6K];

    pub(super) fn from_ggml(t: GgmlDType) -> Option<Kind> {
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
    pub(super) const fn from_id(id: u8) -> Kind {
        Kind::ALL[id as usize]
    }

    /// (weights, bytes) of one GGML block.
    pub(super) fn ggml_block(self) -> (usize, usize) {
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

    /// Weights stored as nibbles, any bits above the fourth in bit planes (else as bytes: Q8_0).
    #[inline(always)]
    pub(super) const fn nibbles(self) -> bool {
        !matches!(self, Kind::Q8_0)
    }

    /// Bit planes beside the nibbles: one for the 5-bit formats (bit 4), two for Q6_K (bits 4 and 5).
    #[inline(always)]
    pub(super) const fn planes(self) -> usize {
        match self {
            Kind::Q5_0 | Kind::Q5_1 | Kind::Q5K => 1,
            Kind::Q6K => 2,
            _ => 0,
        }
    }

    /// The K-quants: 256-weight superblocks, integer sub-block scales under an f16 superblock scale (kept so:
    /// `Scales::Sub`), activations rounded per 256 (else per 32, and scales kept as the file's f16).
    #[inline(always)]
    pub(super) const fn k_quant(self) -> bool {
        matches!(self, Kind::Q4K | Kind::Q5K | Kind::Q6K)
    }

    /// w = d·q + m (else w = d·(q − offset)).
    #[inline(always)]
    pub(super) const fn has_min(self) -> bool {
        matches!(self, Kind::Q4_1 | Kind::Q5_1 | Kind::Q4K | Kind::Q5K)
    }

    /// One scale per 16 weights (else per 32).
    #[inline(always)]
    pub(super) const fn halves(self) -> bool {
        matches!(self, Kind::Q6K)
    }

    #[inline(always)]
    pub(super) const fn offset(self) -> f32 {
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
    pub(super) const fn group_block_bytes(self) -> usize {
        if self.nibbles() {
            256 + 64 * self.planes()
        } else {
            512
        }
    }

    /// Scales per block and row.
    #[inline(always)]
    pub(super) const fn scales_per_block(self) -> usize {
        if self.halves() {
            2
        } else {
            1
        }
    }
}

/// Sub-block scale and min of a K-quant superblock (llama.cpp's get_scale_min_k4).
pub(super) fn scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// A K-quant superblock's scales as the file holds them: the sub-block scales (8 for Q4_K and Q5_K, 16 for Q6_K,
/// Q6_K's as i8 bits) into `sc`, the mins (Q4_K, Q5_K) into `mn`; returns the f16 bits of the superblock scale and
/// of minus its min scale. `decode_block`'s scales are sup·sc and mins (−dmin)·mn, computed in f32.
pub(super) fn k_scales(kind: Kind, blk: &[u8], sc: &mut Vec<u8>, mn: &mut Vec<u8>) -> (u16, u16) {
    let bits = |i: usize| u16::from_le_bytes([blk[i], blk[i + 1]]);
    match kind {
        Kind::Q4K | Kind::Q5K => {
            for sub in 0..8 {
                let (s, m) = scale_min_k4(sub, &blk[4..16]);
                sc.push(s);
                mn.push(m);
            }
            (bits(0), bits(2) ^ 0x8000)
        }
        Kind::Q6K => {
            sc.extend_from_slice(&blk[192..208]);
            (bits(208), 0)
        }
        _ => unreachable!("{kind:?} is not a K-quant"),
    }
}

/// One GGML block decoded: q per weight (unsigned), scales (one per 32, or per 16 for Q6_K) and mins (per 32).
pub(super) fn decode_block(kind: Kind, blk: &[u8], q: &mut [u8], d: &mut Vec<f32>, m: &mut Vec<f32>) {
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
            for &s in sc {
                d.push(dd * s as i8 as f32);
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

pub(super) fn h2f(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

