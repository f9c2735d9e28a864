//! Dense matrix products on CPU: y = x·Wᵀ + b with W given [out, in] as in PyTorch checkpoints.
//!
//! `Panels::new` stores an f32, bf16 or f16 weight in *panels*: blocks of 64 output rows, each stored
//! transposed ([in, 64], row-major), one after the other — a permutation of the weight, no extra memory. Both
//! kernels then read the weight front to back:
//! - few rows (M = product of x's leading dims <= `SMALL_M`; decoding is M = 1): each panel gives 64 outputs as
//!   Σ_k x[k]·panel[k, 0..64], 64 accumulators in registers, the panels split in chunks across all threads, so
//!   every weight is read once per call at the width it is stored (a bf16/f16 weight is widened in registers:
//!   half the bytes of f32). Candle's matmul instead runs a single-threaded gemv at M = 1, and converts a bf16
//!   weight to f32 on every call.
//! - many rows (prefill): each (panel, block of up to 128 rows of x) is a task; a register tile of rows (6 x 64
//!   columns with AVX-512, 3 x 32 with AVX2) shares each load of the panel, and every element is summed as the
//!   matrix-vector kernel sums it (the same chain of fused multiply-adds over k, then the bias). So a row's
//!   numbers are the same whatever the row count: a batch, a prefill and a decode step agree bit for bit (the
//!   scheduler's promise that a request's output does not depend on the batch). An f16 panel is widened to f32
//!   first (exactly, then it stays in L2). A bf16 weight always multiplies activations rounded to bf16; on a
//!   CPU with AVX512-BF16 its full panels are stored in pairs of k and both kernels use `vdpbf16ps` (`bf16x`),
//!   so they also agree.
//!
//! The layer that holds a weight this way, and falls back to Candle's matmul elsewhere, is `nn::linear::Dense`.

use half::{bf16, f16};
use rayon::prelude::*;

use super::cpu::{self, par_tasks, SendPtr};
use super::huge::Buf;

/// Up to this many rows of x, `matmul` uses the panel matrix-vector kernel; above it, gemm.
pub const SMALL_M: usize = 8;

/// Output rows per panel.
const PANEL: usize = 64;

/// Rows of x per gemm task (prefill), at most.
const GEMM_ROWS: usize = 128;

/// The panels' elements, at the width the weight was given.
pub enum PanelData {
    F32(Buf<f32>),
    BF16(Buf<bf16>),
    F16(Buf<f16>),
}

/// An [n, k] weight in panels of `PANEL` rows: panel p (rows p·PANEL .. p·PANEL + nr) is stored transposed,
/// [k, nr] row-major, from element p·PANEL·k on.
pub struct Panels {
    data: PanelData,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dtype = match self.data {
            PanelData::F32(_) => "f32",
            PanelData::BF16(_) => "bf16",
            PanelData::F16(_) => "f16",
        };
        write!(f, "Panels[{}, {}; {dtype}; panels of {PANEL} rows]", self.n, self.k)
    }
}

impl Panels {
    /// From an [n, k] row-major weight, packed straight into a huge-page region (`kernels::huge`).
    pub fn new<W: Elem>(w: &[W], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k);
        let mut out = Buf::<W>::zeroed(n * k);
        pack_into(&mut out, w, n, k, &|_| {});
        Self { data: W::into_data(out), n, k }
    }

    /// Whether weights of `rows` rows each, stacked in that order, are stored as their own panels one after
    /// another: every part but the last fills its last panel.
    pub fn stacks(rows: &[usize]) -> bool {
        rows.split_last().is_some_and(|(_, init)| init.iter().all(|r| r % PANEL == 0))
    }

    /// `new` for several [n_i, k] weights stacked along the rows (q, k and v), which must `stack`: each part is
    /// packed straight into its own panels of the one matrix (no stacked copy of the weights), calling `done`
    /// with each slab of a part's rows once it is packed (a mapped checkpoint gives the pages back as it goes, so
    /// a load does not hold the weight twice).
    pub fn from_parts_releasing<W: Elem>(parts: &[&[W]], k: usize, done: &(dyn Fn(&[W]) + Sync)) -> Self {
        assert!(k > 0 && parts.iter().all(|p| p.len() % k == 0));
        let rows: Vec<usize> = parts.iter().map(|p| p.len() / k).collect();
        assert!(Self::stacks(&rows), "parts of {rows:?} rows do not stack into panels of {PANEL}");
        let n = rows.iter().sum();
        let mut out = Buf::<W>::zeroed(n * k);
        let mut at = 0;
        for (p, r) in parts.iter().zip(rows) {
            pack_into(&mut out[at..at + r * k], p, r, k, done);
            at += r * k;
        }
        Self { data: W::into_data(out), n, k }
    }

    /// Output rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inputs per row.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The weight back as [n, k] row-major, at its width.
    pub fn unpack(&self) -> PanelData {
        let (n, k) = (self.n, self.k);
        match &self.data {
            PanelData::F32(d) => PanelData::F32(unpack(d, n, k).into()),
            PanelData::BF16(d) => PanelData::BF16(unpack(d, n, k).into()),
            PanelData::F16(d) => PanelData::F16(unpack(d, n, k).into()),
        }
    }

    /// Whether the panels hold f32 (and not a narrower width).
    pub fn is_f32(&self) -> bool {
        matches!(self.data, PanelData::F32(_))
    }

    /// Rows `rows` of the weight, widened to f32 [rows.len(), k] (a tied embedding's lookup).
    pub fn rows_f32(&self, rows: &[u32]) -> Vec<f32> {
        fn gather<W: Elem>(p: &[W], n: usize, k: usize, rows: &[u32]) -> Vec<f32> {
            let pairs = paired::<W>(k);
            let mut out = vec![0f32; rows.len() * k];
            let mut row = vec![W::default(); k];
            for (dst, &r) in out.chunks_mut(k).zip(rows) {
                let (b, j) = (r as usize / PANEL, r as usize % PANEL);
                let nr = PANEL.min(n - b * PANEL);
                let panel = &p[b * PANEL * k..b * PANEL * k + nr * k];
                for (q, v) in row.iter_mut().enumerate() {
                    *v = panel[at(q, j, nr, pairs)];
                }
                W::widen(&row, dst);
            }
            out
        }
        match &self.data {
            PanelData::F32(d) => gather(d, self.n, self.k, rows),
            PanelData::BF16(d) => gather(d, self.n, self.k, rows),
            PanelData::F16(d) => gather(d, self.n, self.k, rows),
        }
    }

    /// out [m, n] = x [m, k] · Wᵀ + bias [n].
    pub fn matmul(&self, x: &[f32], m: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        match &self.data {
            PanelData::F32(w) => matmul(x, m, k, w, n, bias),
            PanelData::BF16(w) => matmul(x, m, k, w, n, bias),
            PanelData::F16(w) => matmul(x, m, k, w, n, bias),
        }
    }
}

/// Whether full panels of a W weight with k inputs are stored in pairs of k ([k/2][64][2]: the layout AVX512-BF16's
/// `vdpbf16ps` multiplies), so that decode and prefill both use it and get the same numbers. A property of the
/// process (the CPU and `CANDLEWICK_ISA`), the same at packing and at every product.
fn paired<W: Elem>(k: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return W::IS_BF16 && k.is_multiple_of(2) && cpu::has_bf16_dot();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The bits of values already rounded to bf16 (`round_bf16`), as the bf16 kernels take them.
fn bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|v| (v.to_bits() >> 16) as u16).collect()
}

/// Where element (q, j) of a panel of nr columns sits in it.
#[inline(always)]
fn at(q: usize, j: usize, nr: usize, pairs: bool) -> usize {
    if pairs && nr == PANEL { (q / 2) * 2 * PANEL + 2 * j + q % 2 } else { q * nr + j }
}

/// Panels packed at a time by `pack` before it calls `done` (4096 rows).
const SLAB: usize = 64;

/// [n, k] row-major -> panels in `out` (n·k elements), slab by slab; `done` gets each slab's rows of `w` once
/// they are packed.
fn pack_into<W: Elem + Copy + Send + Sync + Default>(out: &mut [W], w: &[W], n: usize, k: usize, done: &(dyn Fn(&[W]) + Sync)) {
    assert_eq!(out.len(), n * k);
    let pairs = paired::<W>(k);
    if k == 0 {
        return;
    }
    for (s, slab) in out.chunks_mut(SLAB * PANEL * k).enumerate() {
        slab.par_chunks_mut(PANEL * k).enumerate().for_each(|(p, panel)| {
            let r0 = (s * SLAB + p) * PANEL;
            let nr = panel.len() / k;
            for j in 0..nr {
                let row = &w[(r0 + j) * k..(r0 + j + 1) * k];
                for (q, &v) in row.iter().enumerate() {
                    panel[at(q, j, nr, pairs)] = v;
                }
            }
        });
        let r0 = s * SLAB * PANEL;
        done(&w[r0 * k..(r0 * k + slab.len()).min(n * k)]);
    }
}

/// Panels -> [n, k] row-major.
fn unpack<W: Elem + Copy + Send + Sync + Default>(p: &[W], n: usize, k: usize) -> Vec<W> {
    let pairs = paired::<W>(k);
    let mut out = vec![W::default(); n * k];
    if k == 0 {
        return out;
    }
    out.par_chunks_mut(PANEL * k).enumerate().for_each(|(b, rows)| {
        let nr = rows.len() / k;
        let panel = &p[b * PANEL * k..b * PANEL * k + nr * k];
        for j in 0..nr {
            for q in 0..k {
                rows[j * k + q] = panel[at(q, j, nr, pairs)];
            }
        }
    });
    out
}

/// out [M, N] = x [M, K] · Wᵀ + bias, W [N, K] in panels.
fn matmul<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    // bf16 weights multiply activations rounded to bf16, as PyTorch's bf16 matmuls do and as the CPU's bf16 dot
    // product instructions need: decode and prefill, with or without those instructions, get the same products.
    let rounded: Vec<f32>;
    let x = if W::IS_BF16 {
        rounded = x.iter().map(|&v| round_bf16(v)).collect();
        &rounded[..]
    } else {
        x
    };
    if m <= SMALL_M {
        matvec(x, m, k, w, n, bias)
    } else {
        gemm_panels(x, m, k, w, n, bias)
    }
}

/// The bf16 nearest to `v` (ties to even), as an f32.
#[inline(always)]
pub(crate) fn round_bf16(v: f32) -> f32 {
    let b = v.to_bits();
    if v.is_nan() {
        return v;
    }
    f32::from_bits((b.wrapping_add(0x7FFF + ((b >> 16) & 1))) & 0xFFFF_0000)
}

// ---------------------------------------------------------------------------------------------------------------
// Weight element types

/// A weight element: f32, or a 16-bit float widened to f32 as it is read.
pub trait Elem: Copy + Send + Sync + Default + bytemuck::Pod + 'static {
    /// Widen `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]);
    /// The data itself when it is already f32.
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }
    /// bf16 weights multiply activations rounded to bf16.
    const IS_BF16: bool = false;
    /// The raw bits when the weight is bf16.
    fn bf16_bits(_s: &[Self]) -> Option<&[u16]> {
        None
    }
    /// The panels' storage for elements of this type.
    fn into_data(v: Buf<Self>) -> PanelData;
    /// 8 elements at `p`, widened.
    ///
    /// # Safety
    /// `p` points to 8 readable elements, and the caller is compiled with (and runs on a CPU that has) avx2,
    /// fma and f16c.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl Elem for f32 {
    fn into_data(v: Buf<f32>) -> PanelData {
        PanelData::F32(v)
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
        // SAFETY: the caller passes 8 readable f32 at p, from code compiled with avx2 (unaligned load).
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
}

impl Elem for bf16 {
    fn into_data(v: Buf<bf16>) -> PanelData {
        PanelData::BF16(v)
    }
    const IS_BF16: bool = true;
    fn bf16_bits(s: &[bf16]) -> Option<&[u16]> {
        Some(half::slice::HalfFloatSliceExt::reinterpret_cast(s))
    }
    fn widen(src: &[bf16], dst: &mut [f32]) {
        // exact: a bf16 is the top half of an f32 (vectorises, unlike a call per element)
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller passes 8 readable bf16 (16 bytes) at p, from code compiled with avx2.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
}

impl Elem for f16 {
    fn into_data(v: Buf<f16>) -> PanelData {
        PanelData::F16(v)
    }
    fn widen(src: &[f16], dst: &mut [f32]) {
        // half picks F16C / NEON at run time
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller passes 8 readable f16 (16 bytes) at p, from code compiled with avx2 and f16c.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Few rows: matrix-vector products on panels

/// Weight bytes per parallel task, at least: below this, waking another thread costs more than it saves.
const MIN_TASK_BYTES: usize = 256 * 1024;

/// Panels per parallel task: about 4 tasks per thread, each at least `MIN_TASK_BYTES` of weights.
fn panels_per_task(n_panels: usize, panel_bytes: usize) -> usize {
    let tasks = 4 * cpu::threads();
    n_panels.div_ceil(tasks).max(MIN_TASK_BYTES.div_ceil(panel_bytes.max(1))).clamp(1, n_panels.max(1))
}

/// out [M, N] = x [M, K] · Wᵀ + bias for small M, W in panels: the panels are split into chunks over the threads
/// and each is read once, front to back, against every row of x (a panel stays in L2 between rows).
pub(crate) fn matvec<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    let mut out = vec![0f32; m * n];
    let n_panels = n.div_ceil(PANEL);
    let per = panels_per_task(n_panels, PANEL * k * std::mem::size_of::<W>());
    let dst = SendPtr(out.as_mut_ptr());
    // bf16 panels in pairs: x as bf16 bits (already rounded by `matmul`), the products as prefill computes them
    let xb = paired::<W>(k).then(|| bf16_bits(x));
    par_tasks(n_panels.div_ceil(per), |t| {
        let mut acc = [0f32; PANEL];
        for p in t * per..((t + 1) * per).min(n_panels) {
            let r0 = p * PANEL;
            let nr = PANEL.min(n - r0);
            let panel = &w[r0 * k..(r0 + nr) * k];
            #[cfg(target_arch = "x86_64")]
            if let (Some(xb), Some(bits), true) = (&xb, W::bf16_bits(panel), nr == PANEL) {
                for i in 0..m {
                    // SAFETY: this task alone writes columns r0..r0+64 of out; row i is inside it.
                    let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * n + r0), PANEL) };
                    if let Some(b) = bias {
                        o.copy_from_slice(&b[r0..r0 + PANEL]);
                    }
                    // SAFETY: the CPU has AVX512-BF16 (`paired`); one row of k (even) bits, a [k/2][64][2] panel.
                    unsafe { bf16x::panel_rows(&xb[i * k..(i + 1) * k], 1, k, bits, o.as_mut_ptr(), n, bias.is_some()) };
                }
                continue;
            }
            for i in 0..m {
                let acc = &mut acc[..nr];
                panel_dot(&x[i * k..(i + 1) * k], panel, nr, acc);
                if let Some(b) = bias {
                    acc.iter_mut().zip(&b[r0..r0 + nr]).for_each(|(a, b)| *a += b);
                }
                // SAFETY: this task alone writes columns r0..r0+nr of out; row i of out is inside it.
                let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * n + r0), nr) };
                o.copy_from_slice(acc);
            }
        }
    });
    out
}

/// out[j] = Σ_q x[q] · panel[q·nr + j] for j < nr: one panel ([K, nr] row-major) against one row of x.
fn panel_dot<W: Elem>(x: &[f32], panel: &[W], nr: usize, out: &mut [f32]) {
    assert!(panel.len() == x.len() * nr && out.len() == nr);
    #[cfg(target_arch = "x86_64")]
    if nr == PANEL && cpu::isa() >= cpu::Isa::Avx2 {
        // SAFETY: the CPU has avx2, fma and f16c (the Avx2 level); sizes asserted above.
        return unsafe { avx2::panel_dot(x, panel, out) };
    }
    portable::panel_dot(x, panel, nr, out)
}

/// Plain Rust that LLVM vectorises for the target's baseline (SSE2 on x86-64, NEON on aarch64): 64 accumulators
/// in a fixed-size array, the 16-bit weights widened a panel row at a time.
mod portable {
    use super::{Elem, PANEL};

    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        // aarch64 has a fused multiply-add in its baseline; elsewhere mul_add would be a libm call
        if cfg!(target_arch = "aarch64") { a.mul_add(b, c) } else { a * b + c }
    }

    pub(super) fn panel_dot<W: Elem>(x: &[f32], panel: &[W], nr: usize, out: &mut [f32]) {
        let mut buf = [0f32; PANEL];
        if nr == PANEL {
            let mut acc = [0f32; PANEL];
            for (q, &xq) in x.iter().enumerate() {
                let row = &panel[q * PANEL..(q + 1) * PANEL];
                let wf: &[f32] = match W::as_f32(row) {
                    Some(r) => r,
                    None => {
                        W::widen(row, &mut buf);
                        &buf
                    }
                };
                for j in 0..PANEL {
                    acc[j] = fma(wf[j], xq, acc[j]);
                }
            }
            out.copy_from_slice(&acc);
        } else {
            out.fill(0.0);
            for (q, &xq) in x.iter().enumerate() {
                let row = &panel[q * nr..(q + 1) * nr];
                W::widen(row, &mut buf[..nr]);
                for (o, &w) in out.iter_mut().zip(&buf[..nr]) {
                    *o = fma(w, xq, *o);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // const-sized loops over register arrays, unrolled by the compiler
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Elem, PANEL};

    /// A full panel (64 columns) against one row of x: 8 registers of 8 accumulators.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn panel_dot<W: Elem>(x: &[f32], panel: &[W], out: &mut [f32]) {
        assert!(panel.len() >= x.len() * PANEL && out.len() >= PANEL);
        // SAFETY: the caller guarantees avx2, fma and f16c; the assert bounds every read (q·PANEL + 8u + 8 <=
        // panel.len()) and write (8u + 8 <= PANEL <= out.len()).
        unsafe {
            let mut acc = [_mm256_setzero_ps(); PANEL / 8];
            let p = panel.as_ptr();
            for (q, &xq) in x.iter().enumerate() {
                let xb = _mm256_set1_ps(xq);
                let row = p.add(q * PANEL);
                for u in 0..PANEL / 8 {
                    acc[u] = _mm256_fmadd_ps(W::load8(row.add(8 * u)), xb, acc[u]);
                }
            }
            for u in 0..PANEL / 8 {
                _mm256_storeu_ps(out.as_mut_ptr().add(8 * u), acc[u]);
            }
        }
    }

    /// `panel_rows` for a full panel with AVX2: R rows x 32 columns of accumulators, each half of the panel in turn.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn panel_rows(x: &[f32], rows: usize, k: usize, panel: &[f32], out: *mut f32, os: usize) {
        let mut i = 0;
        while i < rows {
            let r = 3.min(rows - i);
            for half in 0..2 {
                // SAFETY: the caller's (x [rows, k], panel [k, 64], out rows os apart).
                unsafe {
                    let (xs, o) = (&x[i * k..], out.add(i * os + 32 * half));
                    match r {
                        3 => tile::<3>(xs, k, panel, half, o, os),
                        2 => tile::<2>(xs, k, panel, half, o, os),
                        _ => tile::<1>(xs, k, panel, half, o, os),
                    }
                }
            }
            i += r;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(x: &[f32], k: usize, panel: &[f32], half: usize, out: *mut f32, os: usize) {
        debug_assert!(x.len() >= R * k && panel.len() >= k * PANEL);
        // SAFETY: reads x[r·k + q] for r < R, q < k and 32 floats of panel row q; writes 32 floats of R rows.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            let (xp, p) = (x.as_ptr(), panel.as_ptr().add(32 * half));
            for q in 0..k {
                let w: [__m256; 4] = std::array::from_fn(|u| _mm256_loadu_ps(p.add(q * PANEL + 8 * u)));
                for r in 0..R {
                    let xb = _mm256_set1_ps(*xp.add(r * k + q));
                    for u in 0..4 {
                        acc[r][u] = _mm256_fmadd_ps(w[u], xb, acc[r][u]);
                    }
                }
            }
            for r in 0..R {
                for u in 0..4 {
                    _mm256_storeu_ps(out.add(r * os + 8 * u), acc[r][u]);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Many rows: gemm on panels

/// out [M, N] = x [M, K] · Wᵀ + bias for large M: one single-threaded gemm per (panel, block of 128 rows of x),
/// the tasks spread over the threads; a bf16/f16 panel is widened to f32 first (it then stays in L2).
pub(crate) fn gemm_panels<W: Elem>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    assert!(x.len() == m * k && w.len() == n * k && bias.is_none_or(|b| b.len() == n));
    let mut out = vec![0f32; m * n];
    let n_panels = n.div_ceil(PANEL);
    // blocks of at most 128 rows of x, smaller (down to 32) when there are too few panels to keep all threads busy
    let want_tasks = 8 * cpu::threads();
    let n_mc = m.div_ceil(GEMM_ROWS).max(want_tasks.div_ceil(n_panels).min(m.div_ceil(32)));
    let rows = m.div_ceil(n_mc);
    let n_mc = m.div_ceil(rows);
    let dst = SendPtr(out.as_mut_ptr());
    // bf16 panels in pairs: x as bf16 bits (already rounded by `matmul`)
    #[cfg(target_arch = "x86_64")]
    let xb = paired::<W>(k).then(|| bf16_bits(x));
    // consecutive tasks share a panel (rayon hands each thread a contiguous range of tasks)
    par_tasks(n_panels * n_mc, |t| {
        let (p, c) = (t / n_mc, t % n_mc);
        let (r0, i0) = (p * PANEL, c * rows);
        let (nr, mr) = (PANEL.min(n - r0), rows.min(m - i0));
        let panel = &w[r0 * k..(r0 + nr) * k];
        #[cfg(target_arch = "x86_64")]
        if let (Some(xb), Some(bits), true) = (&xb, W::bf16_bits(panel), nr == PANEL) {
            if let Some(b) = bias {
                for i in i0..i0 + mr {
                    // SAFETY: task t alone writes rows i0..i0+mr x columns r0..r0+64 of out (rows of n).
                    unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * n + r0), PANEL) }.copy_from_slice(&b[r0..r0 + PANEL]);
                }
            }
            // SAFETY: the CPU has AVX512-BF16 (`paired`); task t alone writes rows i0..i0+mr x columns
            // r0..r0+64 of out, which has rows of n; xb is [m, k] with k even.
            unsafe { bf16x::panel_rows(&xb[i0 * k..(i0 + mr) * k], mr, k, bits, dst.get().add(i0 * n + r0), n, bias.is_some()) };
            return;
        }
        let buf: Vec<f32>;
        let wf: &[f32] = match W::as_f32(panel) {
            Some(s) => s,
            None => {
                let mut b = vec![0f32; nr * k];
                W::widen(panel, &mut b);
                buf = b;
                &buf
            }
        };
        // SAFETY: task t alone writes rows i0..i0+mr x columns r0..r0+nr of out (rows of n); x rows i0..i0+mr
        // are [mr, k]; the panel is [k, nr].
        unsafe { panel_rows(&x[i0 * k..(i0 + mr) * k], mr, k, wf, nr, dst.get().add(i0 * n + r0), n, bias.map(|b| &b[r0..r0 + nr])) };
    });
    out
}

/// out[i][j] = Σ_q x[i][q]·panel[q][j] (+ bias[j]) for i < rows, j < nr, rows of out `os` apart: every element
/// summed exactly as `panel_dot` sums it (the same chain of multiply-adds over q, then the bias), so a row's
/// numbers do not depend on how many rows are computed together (decode, prefill, a batch). Several rows
/// share each load of the panel: 6 x 64 columns in AVX-512 registers, 3 x 32 in AVX2 ones.
///
/// # Safety
/// x is [rows, k], panel [k, nr]; out has `rows` rows `os` apart with nr writable columns each.
#[allow(clippy::too_many_arguments)]
unsafe fn panel_rows(x: &[f32], rows: usize, k: usize, panel: &[f32], nr: usize, out: *mut f32, os: usize, bias: Option<&[f32]>) {
    #[cfg(target_arch = "x86_64")]
    let tiled = nr == PANEL && cpu::isa() >= cpu::Isa::Avx2;
    #[cfg(not(target_arch = "x86_64"))]
    let tiled = false;
    if tiled {
        // SAFETY: the CPU has the level's instructions; the rest is the caller's.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            if cpu::isa() >= cpu::Isa::Avx512 {
                rows512::panel_rows(x, rows, k, panel, out, os);
            } else {
                avx2::panel_rows(x, rows, k, panel, out, os);
            }
        }
    } else {
        let mut acc = vec![0f32; nr];
        for i in 0..rows {
            panel_dot(&x[i * k..(i + 1) * k], panel, nr, &mut acc);
            // SAFETY: row i of out has nr writable columns (the caller's).
            unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add(i * os), nr) };
        }
    }
    if let Some(b) = bias {
        for i in 0..rows {
            // SAFETY: as above.
            let o = unsafe { std::slice::from_raw_parts_mut(out.add(i * os), nr) };
            o.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}

/// `panel_rows` for a full panel with AVX-512: R rows x 64 columns of accumulators (4 registers a row).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod rows512 {
    use std::arch::x86_64::*;

    use super::PANEL;

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn panel_rows(x: &[f32], rows: usize, k: usize, panel: &[f32], out: *mut f32, os: usize) {
        let mut i = 0;
        while i < rows {
            let r = 6.min(rows - i);
            // SAFETY: the caller's (x [rows, k], panel [k, 64], out rows os apart).
            unsafe {
                let (xs, o) = (&x[i * k..], out.add(i * os));
                match r {
                    6 => tile::<6>(xs, k, panel, o, os),
                    5 => tile::<5>(xs, k, panel, o, os),
                    4 => tile::<4>(xs, k, panel, o, os),
                    3 => tile::<3>(xs, k, panel, o, os),
                    2 => tile::<2>(xs, k, panel, o, os),
                    _ => tile::<1>(xs, k, panel, o, os),
                }
            }
            i += r;
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile<const R: usize>(x: &[f32], k: usize, panel: &[f32], out: *mut f32, os: usize) {
        debug_assert!(x.len() >= (R - 1) * k + k && panel.len() >= k * PANEL);
        // SAFETY: reads x[r·k + q] for r < R, q < k and panel[q·64 .. q·64 + 64]; writes 64 floats of R rows.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            let (xp, p) = (x.as_ptr(), panel.as_ptr());
            for q in 0..k {
                let w: [__m512; 4] = std::array::from_fn(|u| _mm512_loadu_ps(p.add(q * PANEL + 16 * u)));
                for r in 0..R {
                    let xb = _mm512_set1_ps(*xp.add(r * k + q));
                    for u in 0..4 {
                        acc[r][u] = _mm512_fmadd_ps(w[u], xb, acc[r][u]);
                    }
                }
            }
            for r in 0..R {
                for u in 0..4 {
                    _mm512_storeu_ps(out.add(r * os + 16 * u), acc[r][u]);
                }
            }
        }
    }
}

/// bf16 weights × bf16-rounded activations with AVX512-BF16's `vdpbf16ps` (two products per f32 lane, exact, summed in
/// f32): twice the multiply rate of f32 FMAs. A full panel of bf16 is stored in pairs of k ([k/2][64][2], see
/// `paired`), so one 512-bit load holds the pairs of 16 columns; each row of x supplies one broadcast pair. Decode
/// (matvec) uses the same kernel on such panels, so both compute the same numbers.
#[cfg(target_arch = "x86_64")]
mod bf16x {
    use std::arch::x86_64::*;

    use super::PANEL;

    /// out[i][j] (+)= Σ_q x[i][q]·panel[q][j] for i < rows, j < 64; x [rows, k] bf16 bits, the panel stored in
    /// pairs of q ([k/2][64][2], as `pack` stores it), out rows `os` apart; `add`: out already holds the bias.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn panel_rows(x: &[u16], rows: usize, k: usize, pairs: &[u16], out: *mut f32, os: usize, add: bool) {
        // SAFETY: the caller guarantees AVX512-F and BF16, x [rows, k] and pairs (a [k, 64] panel) as asserted, and that out has rows·os elements with 64 columns writable in each row; tile reads and writes only inside those.
        unsafe {
            debug_assert!(k.is_multiple_of(2) && x.len() == rows * k && pairs.len() == k * PANEL);
            let mut i = 0;
            while i + 6 <= rows {
                tile::<6>(x[i * k..].as_ptr(), k, pairs, out.add(i * os), os, add);
                i += 6;
            }
            while i < rows {
                tile::<1>(x[i * k..].as_ptr(), k, pairs, out.add(i * os), os, add);
                i += 1;
            }
        }
    }

    /// MR rows × 64 columns: MR·4 accumulators.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const MR: usize>(x: *const u16, k: usize, pairs: &[u16], out: *mut f32, os: usize, add: bool) {
        // SAFETY: the caller (panel_rows) passes x with MR rows of k (even) u16, pairs of k·64 u16, and out with MR rows of 64 writable f32 spaced os apart: every load and store below stays inside them; the transmutes reinterpret 512 bits as 512 bits.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; MR];
            let wp = pairs.as_ptr();
            for q2 in 0..k / 2 {
                let mut w = [_mm512_setzero_si512(); 4];
                for v in 0..4 {
                    w[v] = _mm512_loadu_si512(wp.add(q2 * 2 * PANEL + v * 32) as *const _);
                }
                for r in 0..MR {
                    let xr = _mm512_set1_epi32((x.add(r * k + 2 * q2) as *const i32).read_unaligned());
                    for v in 0..4 {
                        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], std::mem::transmute::<__m512i, __m512bh>(w[v]), std::mem::transmute::<__m512i, __m512bh>(xr));
                    }
                }
            }
            for r in 0..MR {
                for v in 0..4 {
                    let o = out.add(r * os + 16 * v);
                    let y = if add { _mm512_add_ps(acc[r][v], _mm512_loadu_ps(o)) } else { acc[r][v] };
                    _mm512_storeu_ps(o, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{reference_matmul as reference, vals};

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        for v in [1.0f32, -2.5, 1e-30, 3.0e38, f32::INFINITY, 0.0] {
            assert_eq!(round_bf16(v), half::bf16::from_f32(v).to_f32());
        }
        // halfway cases go to the even neighbour
        assert_eq!(round_bf16(f32::from_bits(0x3F80_8000)), f32::from_bits(0x3F80_0000));
        assert_eq!(round_bf16(f32::from_bits(0x3F81_8000)), f32::from_bits(0x3F82_0000));
        assert!(round_bf16(f32::NAN).is_nan());
        for v in vals(10_000, 9) {
            assert_eq!(round_bf16(v * 1e3), half::bf16::from_f32(v * 1e3).to_f32());
        }
    }

    /// [n, k] row-major -> panels, as `Panels::new` packs them.
    fn pack<W: Elem>(w: &[W], n: usize, k: usize) -> Vec<W> {
        let mut out = vec![W::default(); n * k];
        pack_into(&mut out, w, n, k, &|_| {});
        out
    }

    #[test]
    fn portable_kernel_matches() {
        // the fallback for CPUs without AVX2 (and the aarch64 path), exercised directly on full and partial panels
        fn run<W: Elem + Default>(w: &[W], x: &[f32], k: usize, n: usize) {
            let mut w32 = vec![0f32; w.len()];
            W::widen(w, &mut w32);
            let want = reference(x, 1, k, &w32, n, None);
            // the plain [k, nr] layout (packing is a permutation; bf16 full panels may be stored in pairs)
            let order = pack(&(0..n * k).map(|i| i as f32).collect::<Vec<_>>(), n, k);
            let packed: Vec<W> = order.iter().map(|&i| w[i as usize]).collect();
            for r0 in (0..n).step_by(PANEL) {
                let nr = PANEL.min(n - r0);
                let mut got = vec![0f32; nr];
                portable::panel_dot(x, &packed[r0 * k..(r0 + nr) * k], nr, &mut got);
                for j in 0..nr {
                    let (g, w) = (got[j] as f64, want[r0 + j]);
                    assert!((g - w).abs() <= 1e-5 * (k as f64).sqrt() * w.abs().max(1.0), "{k}->{n} [{}]: {g} vs {w}", r0 + j);
                }
            }
        }
        for &(k, n) in &[(7usize, 13usize), (257, 100), (600, 64), (33, 130)] {
            let (x, w32) = (vals(k, 5), vals(n * k, 6));
            run(&w32, &x, k, n);
            run(&w32.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), &x, k, n);
            run(&w32.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), &x, k, n);
        }
    }

    /// Batch invariance, bit for bit: row i of a many-row product (the prefill kernel) equals the same row
    /// computed alone (the decode kernel), for f32 and f16 weights, full and partial panels, with and without a
    /// bias, at every row count around the kernels' register tiles; and it agrees with the f64 reference.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        fn run<W: Elem + Default>(w: &[W], k: usize, n: usize, bias: Option<&[f32]>) {
            let packed = pack(w, n, k);
            let mut w32 = vec![0f32; w.len()];
            W::widen(w, &mut w32);
            for m in [9, 13, 40] {
                let x = vals(m * k, 11);
                let many = matmul(&x, m, k, &packed, n, bias);
                // bf16 weights multiply activations rounded to bf16
                let xr: Vec<f32> = x.iter().map(|&v| if W::IS_BF16 { round_bf16(v) } else { v }).collect();
                let want = reference(&xr, m, k, &w32, n, bias);
                for i in 0..m {
                    let one = matmul(&x[i * k..(i + 1) * k], 1, k, &packed, n, bias);
                    assert_eq!(&many[i * n..(i + 1) * n], &one[..], "{k}->{n} m={m} row {i}");
                    for j in 0..n {
                        let (g, r) = (one[j] as f64, want[i * n + j]);
                        assert!((g - r).abs() <= 1e-5 * (k as f64).sqrt() * r.abs().max(1.0), "{g} vs {r}");
                    }
                }
            }
        }
        for &(k, n) in &[(7usize, 13usize), (257, 100), (600, 128), (96, 200)] {
            let w = vals(n * k, 3);
            let b = vals(n, 4);
            run(&w, k, n, None);
            run(&w, k, n, Some(&b));
            run(&w.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(), k, n, Some(&b));
            run(&w.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(), k, n, Some(&b));
        }
    }

}
