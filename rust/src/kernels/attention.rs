//! Causal (or full) scaled dot-product attention for f32 on CPU, without an additive mask: per (batch, head, block of
//! 64 queries) task, scores for only the keys the block can see (a causal block skips the keys after its last
//! query, which halves the work of a long prefill), a softmax with a vectorised `exp`, and the weighted sum of
//! values, all in one pass over a block-sized scratch buffer: no [B, H, Tq, Tk] score tensor, no mask tensor, no
//! copies of k and v (any strides with contiguous rows of D work, e.g. views into a larger cache).
//!
//! An additive f32 mask [B, 1, Tq, Tk] (what generation builds to hide a left-padded batch's padding) is added to
//! the scores before the softmax. The general path (other masks, other dtypes or devices) stays Candle's.

use candle_core::{DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::Result;
use super::cpu::SendPtr;

/// A paged pool's keys and values [S, Hkv·D] as `Paged` reads them.
#[derive(Clone, Copy)]
pub enum Pool<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [f16], &'a [f16]),
}

impl Pool<'_> {
    fn len(&self) -> (usize, usize) {
        match self {
            Pool::F32(k, v) => (k.len(), v.len()),
            Pool::F16(k, v) => (k.len(), v.len()),
        }
    }
}

thread_local! {
    /// An f16 pool's keys and values of one task, widened (see `Paged::run`).
    static WIDENED: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Queries per task.
const QBLOCK: usize = 64;

/// What a pool's keys and values are: f32, or f16 read as the f32 each widens to exactly (so an f16 pool read in
/// place gives the numbers of the same pool widened first).
pub(crate) trait KvElem: Copy + Sync + 'static {
    const F32: bool;
    fn get(self) -> f32;
    /// acc[l] += p · v[l] for the widened values, one chain per lane (`axpy`).
    fn axpy(acc: &mut [f32], p: f32, v: &[Self]);
    /// v[..64] widened.
    ///
    /// # Safety
    /// For f16: the CPU has AVX-512 F (the f16 block runs only there).
    unsafe fn row64(v: &[Self]) -> [f32; 64];
    /// 16 values at p, widened.
    ///
    /// # Safety
    /// AVX-512 F; 16 readable values at p.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl KvElem for f32 {
    const F32: bool = true;
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
        axpy(acc, p, v)
    }
    #[inline(always)]
    unsafe fn row64(v: &[f32]) -> [f32; 64] {
        v[..64].try_into().unwrap()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl KvElem for f16 {
    const F32: bool = false;
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn axpy(acc: &mut [f32], p: f32, v: &[f16]) {
        acc.iter_mut().zip(v).for_each(|(a, &x)| *a = p.mul_add(x.to_f32(), *a));
    }
    #[inline(always)]
    unsafe fn row64(v: &[f16]) -> [f32; 64] {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(v.len() >= 64);
            let mut out = [0f32; 64];
            for c in 0..4 {
                // SAFETY: AVX-512 F (the caller's); 16 values of v at 16c (v holds 64).
                unsafe { std::arch::x86_64::_mm512_storeu_ps(out.as_mut_ptr().add(16 * c), Self::load16(v.as_ptr().add(16 * c))) };
            }
            out
        }
        #[cfg(not(target_arch = "x86_64"))]
        std::array::from_fn(|l| v[l].to_f32())
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's (AVX-512 F, 16 values at p: 32 bytes).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// Strides (in elements) of a rank-4 [B, H, T, D] view whose rows of D are contiguous, with its start offset.
fn strides4(l: &Layout) -> Option<([usize; 3], usize)> {
    let s = l.stride();
    (s.len() == 4 && (s[3] == 1 || l.dims()[3] == 1)).then(|| ([s[0], s[1], s[2]], l.start_offset()))
}

/// softmax(q·kᵀ·scale [causal] [+ mask]) · v for q [B, H, Tq, D], k and v [B, Hkv, Tk, D] (shapes already checked
/// by the caller, H % Hkv == 0, Tq <= Tk when causal), `mask` additive f32 [B, 1, Tq, Tk]; None where this kernel
/// does not apply.
/// `window`: query i (at position Tk - Tq + i) sees only keys less than `window` positions before it; `softcap`:
/// scores s become cap·tanh(s / cap) before the mask.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    mask: Option<&Tensor>,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    let all_cpu_f32 = [q, k, v].iter().chain(mask.as_ref()).all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !all_cpu_f32 {
        return Ok(None);
    }
    let (b, h, tq, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    if k.dims4()? != (b, hkv, tk, d) || v.dims4()? != (b, hkv, tk, d) {
        return Ok(None);
    }
    if mask.is_some_and(|m| m.dims() != [b, 1, tq, tk]) {
        return Ok(None);
    }
    let mask = mask.map(Tensor::contiguous).transpose()?;
    if b == 0 || h == 0 || tq == 0 || d == 0 || tk == 0 || hkv == 0 || h % hkv != 0 || ((causal || window.is_some()) && tq > tk) {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (k, v) = match (strides4(k.layout()), strides4(v.layout())) {
        (Some(_), Some(_)) => (k.clone(), v.clone()),
        _ => (k.contiguous()?, v.contiguous()?),
    };
    let (Some((ks, k0)), Some((vs, v0))) = (strides4(k.layout()), strides4(v.layout())) else { return Ok(None) };
    let rep = h / hkv;
    let off = tk.saturating_sub(tq); // query i sits at position off + i (Tq <= Tk when causal or windowed)
    let scale = scale as f32;

    let mut out = vec![0f32; b * h * tq * d];
    {
        let (qg, _) = q.storage_and_layout();
        let (kg, _) = k.storage_and_layout();
        let (vg, _) = v.storage_and_layout();
        let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qg, &*kg, &*vg) else { return Ok(None) };
        let mg = mask.as_ref().map(|m| m.storage_and_layout());
        let md: Option<&[f32]> = match &mg {
            Some((g, l)) => match &**g {
                Storage::Cpu(c) => Some(&c.as_slice::<f32>()?[l.start_offset()..l.start_offset() + b * tq * tk]),
                _ => return Ok(None),
            },
            None => None,
        };
        let qd = &qc.as_slice::<f32>()?[q.layout().start_offset()..];
        let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
        // every element the tasks read must lie inside the storages
        let last = |s: [usize; 3], o: usize| o + (b - 1) * s[0] + (hkv - 1) * s[1] + (tk - 1) * s[2] + d;
        if qd.len() < b * h * tq * d || kd.len() < last(ks, k0) || vd.len() < last(vs, v0) {
            return Ok(None);
        }
        let nblk = tq.div_ceil(QBLOCK);
        let dst = SendPtr(out.as_mut_ptr());
        // one task per (batch, KV head, block of queries): the group's `rep` query heads share its key tiles
        let task = |t: usize| {
            let (bg, blk) = (t / nblk, t % nblk);
            let (bi, g) = (bg / hkv, bg % hkv);
            let i0 = blk * QBLOCK;
            let rows = QBLOCK.min(tq - i0);
            let kend = if causal { (off + i0 + rows).min(tk) } else { tk };
            // with a window, the block's first query sees nothing before kstart (and later ones less)
            let kstart = window.map_or(0, |w| (off + i0 + 1).saturating_sub(w)).min(kend);
            let first = (bi * h + g * rep) * tq + i0; // row of the group's first head's first query
            let kb = k0 + bi * ks[0] + g * ks[1];
            let vb = v0 + bi * vs[0] + g * vs[1];
            let mrows = md.map(|m| &m[(bi * tq + i0) * tk + kstart..(bi * tq + i0 + rows) * tk]);
            let span = Span { kend: kend - kstart, causal_first: causal.then(|| off + i0 - kstart), window_first: window.map(|w| (off + i0 + 1 - kstart, w)) };
            let seg = [Seg { k: kb + kstart * ks[2], v: vb + vs[2] * kstart, len: kend - kstart }];
            let kv = Kv { k: kd, k_rs: ks[2], v: vd, v_rs: vs[2], segs: &seg };
            let rg = Rows { heads: rep, rows, hs: tq * d, rs: d, d };
            // SAFETY: task t alone writes rows i0..i0+rows of heads g·rep.. of batch bi (inside `out`); q holds
            // the same rows (checked above), and the bounds of k and v were checked above.
            unsafe { block(&qd[first * d..], &rg, &kv, span, mrows, tk, scale, softcap.map(|c| c as f32), dst.get().add(first * d)) };
        };
        let n_tasks = b * hkv * nblk;
        // Decoding (one query per head, short context) is too little work to share out.
        if n_tasks > 1 && tq * tk * d * b * h >= 1 << 17 {
            (0..n_tasks).into_par_iter().for_each(task);
        } else {
            (0..n_tasks).for_each(task);
        }
    }
    Ok(Some(Tensor::from_vec(out, (b, h, tq, d), q.device())?))
}

/// Causal attention of a flattened (ragged) batch over a paged KV pool (f32 or f16), f32 on CPU: q [1, H, N, D],
/// pools [S, Hkv·D] (slot = block · block_size + offset) -> [1, H, N, D]; None where this kernel does not apply. Each
/// (sequence, KV head, block of 64 queries) is a task over the key runs of its blocks, as `attention` does for one
/// contiguous run.
#[allow(clippy::too_many_arguments)]
pub fn paged(
    q: &Tensor,
    pool: Pool,
    seqs: &[crate::nn::paged::PagedSeq],
    block_size: usize,
    hkv: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() || q.dtype() != DType::F32 {
        return Ok(None);
    }
    let (one, h, n, d) = q.dims4()?;
    if one != 1 {
        return Ok(None);
    }
    let (klen, vlen) = pool.len();
    let Some(job) = Paged::new(seqs, n, h, hkv, d, klen, block_size, scale, window, softcap) else { return Ok(None) };
    if vlen != klen {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let mut out = vec![0f32; h * n * d];
    {
        let (qg, ql) = q.storage_and_layout();
        let Storage::Cpu(qc) = &*qg else { return Ok(None) };
        let qd = &qc.as_slice::<f32>()?[ql.start_offset()..ql.start_offset() + h * n * d];
        let dst = SendPtr(out.as_mut_ptr());
        // SAFETY: `Paged::new` checked the shapes against q's, the pools' and out's sizes; tasks write disjoint rows.
        let task = |i: usize| unsafe { job.run(i, qd, pool, dst.get()) };
        let work: usize = seqs.iter().map(|s| s.rows * s.ctx).sum::<usize>() * d * h;
        if job.len() > 1 && work >= 1 << 17 {
            (0..job.len()).into_par_iter().for_each(task);
        } else {
            (0..job.len()).for_each(task);
        }
    }
    Ok(Some(Tensor::from_vec(out, (1, h, n, d), q.device())?))
}

/// The tasks of one paged attention: per (sequence, KV head, block of 64 queries), each writing its rows of the
/// output [H, N, D] from queries laid out alike and a pool's keys and values [S, Hkv·D]. The tasks of one job are
/// independent, so any thread may run any of them (the decode team claims them one by one, or in the runs of
/// `split_heads`).
pub struct Paged<'a> {
    /// (sequence, KV head, first query, first head of the group, heads)
    tasks: Vec<(usize, usize, usize, usize, usize)>,
    seqs: &'a [crate::nn::paged::PagedSeq<'a>],
    n: usize,
    rep: usize,
    d: usize,
    width: usize,
    block_size: usize,
    scale: f32,
    window: Option<usize>,
    softcap: Option<f32>,
    /// where `split_heads` made runs: the first task of each, then the number of tasks
    runs: Option<Vec<usize>>,
}

impl<'a> Paged<'a> {
    /// None where the kernel does not apply (heads not a multiple of the KV heads, a pool not [S, Hkv·D] of
    /// `pool_len` values, a sequence whose rows or blocks fall outside the batch or the pool).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        seqs: &'a [crate::nn::paged::PagedSeq<'a>],
        n: usize,
        h: usize,
        hkv: usize,
        d: usize,
        pool_len: usize,
        block_size: usize,
        scale: f64,
        window: Option<usize>,
        softcap: Option<f64>,
    ) -> Option<Self> {
        let width = hkv * d;
        if hkv == 0 || d == 0 || !h.is_multiple_of(hkv) || block_size == 0 || !pool_len.is_multiple_of(width) {
            return None;
        }
        // every sequence's rows inside the batch, its context covered by its blocks, every block inside the pool
        let nb = pool_len / width / block_size;
        let fits = seqs.iter().all(|s| {
            s.row0 + s.rows <= n
                && s.rows <= s.ctx
                && s.blocks.len() * block_size >= s.ctx
                && s.blocks[..s.ctx.div_ceil(block_size)].iter().all(|&b| (b as usize) < nb)
        });
        if !fits {
            return None;
        }
        let rep = h / hkv;
        let mut tasks = vec![];
        for (si, s) in seqs.iter().enumerate() {
            for g in 0..hkv {
                for i0 in (0..s.rows).step_by(QBLOCK) {
                    tasks.push((si, g, i0, 0, rep));
                }
            }
        }
        let scale = scale as f32;
        Some(Self { tasks, seqs, n, rep, d, width, block_size, scale, window, softcap: softcap.map(|c| c as f32), runs: None })
    }

    /// For a decode step of few sequences, whose few groups would leave threads idle: the job cut into `parts`
    /// runs of about equal numbers of query heads, each a contiguous stretch of the (task, head) list, a task per
    /// group within a run. Every number is the same (a row's numbers never depend on the other rows of its
    /// block), and a group's keys and values are read once per run that has some of its heads: on a 9-head,
    /// 3-group model at batch 1, two runs (group 0 and two heads of group 1; the third and group 2) read four
    /// groups, where a task per head had each thread read its heads' groups once per head. Claim the parts with
    /// `parts` and `part`.
    pub fn split_heads(mut self, parts: usize) -> Self {
        if self.tasks.len() >= parts || self.rep == 1 {
            return self;
        }
        let per = (self.tasks.len() * self.rep).div_ceil(parts);
        let mut tasks = vec![];
        let mut starts = vec![0];
        for (ti, &(si, g, i0, _, _)) in self.tasks.iter().enumerate() {
            let mut h0 = 0;
            while h0 < self.rep {
                let flat = ti * self.rep + h0;
                if flat > 0 && flat.is_multiple_of(per) {
                    starts.push(tasks.len());
                }
                let heads = (per - flat % per).min(self.rep - h0);
                tasks.push((si, g, i0, h0, heads));
                h0 += heads;
            }
        }
        starts.push(tasks.len());
        self.tasks = tasks;
        self.runs = Some(starts);
        self
    }

    /// How many parts a thread team claims: the runs of `split_heads`, else one task each.
    pub fn parts(&self) -> usize {
        self.runs.as_ref().map_or(self.tasks.len(), |r| r.len() - 1)
    }

    /// The tasks of part `p`.
    pub fn part(&self, p: usize) -> std::ops::Range<usize> {
        self.runs.as_ref().map_or(p..p + 1, |r| r[p]..r[p + 1])
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Task `i`: its rows of `out` from `qd` [H, N, D] and the pool's keys and values. For a decoding row an f16
    /// pool is read in place on AVX-512 for a head size that is a multiple of 64, each key and value widened in
    /// registers; elsewhere the keys and values of the task's group are widened to f32 into a buffer of the
    /// thread's first (one contiguous run). Either way every number is the one an f32 pool holding the same values
    /// gives.
    ///
    /// # Safety
    /// `qd` and `out` hold [H, N, D] for the N and H of `new`, the pools `pool_len` values each; no other thread
    /// writes the pool slots the task reads, nor the rows of `out` it writes, while it runs (no two tasks write
    /// the same rows).
    pub unsafe fn run(&self, i: usize, qd: &[f32], pool: Pool, out: *mut f32) {
        match pool {
            // SAFETY: the caller's.
            Pool::F32(kd, vd) => unsafe { self.run_pool(i, qd, kd, vd, out) },
            // a decoding row's task reads the pool in place, widened in registers as the walk goes (AVX-512, a head
            // size of whole rows of 64); a block of prompt rows widens first, since each of its rows reads every key
            // (in place, a 512-token prefill ran at 1118 against 1406 tokens/s)
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller's.
            Pool::F16(kd, vd) if self.keys(i).0 == 1 && super::cpu::isa() >= super::cpu::Isa::Avx512 && self.d.is_multiple_of(64) => unsafe {
                self.run_pool(i, qd, kd, vd, out)
            },
            // SAFETY: the caller's.
            Pool::F16(kd, vd) => unsafe { self.run_widened(i, qd, kd, vd, out) },
        }
    }

    /// `run` for an f16 pool whose keys and values are widened first: the task's group's, into a buffer of
    /// the thread's (one contiguous run).
    ///
    /// # Safety
    /// As for `run`.
    unsafe fn run_widened(&self, i: usize, qd: &[f32], kd: &[f16], vd: &[f16], out: *mut f32) {
        WIDENED.with(|buf| {
            let (kw, vw) = &mut *buf.borrow_mut();
            let (d, width) = (self.d, self.width);
            let segs = self.segs(i);
            let total: usize = segs.iter().map(|s| s.len).sum();
            kw.resize(total * d, 0.0);
            vw.resize(total * d, 0.0);
            // every key and value row of the task asked for at once: they are widened one after another
            Ahead::new(&Kv { k: kd, k_rs: width, v: vd, v_rs: width, segs: &segs }, d).upto(total, true);
            let mut at = 0;
            for seg in &segs {
                for j in 0..seg.len {
                    kd[seg.k + j * width..][..d].convert_to_f32_slice(&mut kw[at..at + d]);
                    vd[seg.v + j * width..][..d].convert_to_f32_slice(&mut vw[at..at + d]);
                    at += d;
                }
            }
            let one = [Seg { k: 0, v: 0, len: total }];
            // SAFETY: the caller's, with the keys and values of the task's segments in kw, vw, d apart.
            unsafe { self.run_on(i, qd, &Kv { k: kw, k_rs: d, v: vw, v_rs: d, segs: &one }, out) }
        })
    }

    /// Task `i`'s query rows, the position of its sequence's first query, and the positions kstart..kend of the
    /// keys it sees.
    fn keys(&self, i: usize) -> (usize, usize, usize, usize) {
        let (si, _, i0, _, _) = self.tasks[i];
        let s = &self.seqs[si];
        let rows = QBLOCK.min(s.rows - i0);
        let off = s.ctx - s.rows; // query i sits at position off + i
        let kend = off + i0 + rows;
        let kstart = self.window.map_or(0, |w| (off + i0 + 1).saturating_sub(w)).min(kend);
        (rows, off, kstart, kend)
    }

    /// The runs of the pool that task `i`'s keys and values lie in, in order.
    fn segs(&self, i: usize) -> Vec<Seg> {
        let (si, g, _, _, _) = self.tasks[i];
        let (d, width, block_size) = (self.d, self.width, self.block_size);
        let s = &self.seqs[si];
        let (_, _, kstart, kend) = self.keys(i);
        let mut segs: Vec<Seg> = Vec::with_capacity((kend - kstart).div_ceil(block_size) + 1);
        let mut j = kstart;
        while j < kend {
            let (blk, at) = (j / block_size, j % block_size);
            let len = (block_size - at).min(kend - j);
            let slot = s.blocks[blk] as usize * block_size + at;
            let off = slot * width + g * d;
            match segs.last_mut() {
                // blocks next to each other in the pool are one run
                Some(last) if last.k + last.len * width == off => last.len += len,
                _ => segs.push(Seg { k: off, v: off, len }),
            }
            j += len;
        }
        segs
    }

    /// # Safety
    /// As for `run`; for an f16 pool, AVX-512 F.
    unsafe fn run_pool<T: KvElem>(&self, i: usize, qd: &[f32], kd: &[T], vd: &[T], out: *mut f32) {
        let segs = self.segs(i);
        // SAFETY: the caller's.
        unsafe { self.run_on(i, qd, &Kv { k: kd, k_rs: self.width, v: vd, v_rs: self.width, segs: &segs }, out) }
    }

    /// # Safety
    /// As for `run`, with the task's keys and values in `kv`.
    unsafe fn run_on<T: KvElem>(&self, i: usize, qd: &[f32], kv: &Kv<T>, out: *mut f32) {
        let (si, g, i0, h0, heads) = self.tasks[i];
        let (n, d, window) = (self.n, self.d, self.window);
        let s = &self.seqs[si];
        let (rows, off, kstart, kend) = self.keys(i);
        let row = (g * self.rep + h0) * n + s.row0 + i0; // the task's first head's first query
        let span = Span { kend: kend - kstart, causal_first: Some(off + i0 - kstart), window_first: window.map(|w| (off + i0 + 1 - kstart, w)) };
        let rg = Rows { heads, rows, hs: n * d, rs: d, d };
        // SAFETY: task (sequence, group, i0, h0, heads) alone writes rows i0..i0+rows of that sequence in heads
        // g·rep+h0..g·rep+h0+heads, which lie inside `out` and `qd` (row0 + rows <= N was checked by `new`).
        unsafe { block(&qd[row * d..], &rg, kv, span, None, 0, self.scale, self.softcap, out.add(row * d)) };
    }
}

/// Which keys (indices relative to the block's first key) the rows of a block see.
struct Span {
    /// keys 0..kend exist for this block
    kend: usize,
    /// causal: row r sees keys ..= causal_first + r
    causal_first: Option<usize>,
    /// sliding window (end, w): row r sees keys >= end + r - w (end = the first row's position + 1)
    window_first: Option<(usize, usize)>,
}

/// A run of consecutive keys (and their values) stored at one stride: offsets in elements of the first key and
/// value, and how many.
#[derive(Clone, Copy)]
struct Seg {
    k: usize,
    v: usize,
    len: usize,
}

/// The keys and values one block of queries sees, in order: runs of rows (each row D contiguous) in `k` and `v`,
/// consecutive rows of a run `k_rs` / `v_rs` apart. A contiguous cache is one run; a paged one, a run per block.
struct Kv<'a, T = f32> {
    k: &'a [T],
    k_rs: usize,
    v: &'a [T],
    v_rs: usize,
    segs: &'a [Seg],
}

/// A block's query rows (and its output rows, laid out alike): `heads` heads of `rows` rows of `d`, row r of
/// head i at i·hs + r·rs. The heads share their keys (one KV head's group), the rows differ in what they see.
struct Rows {
    heads: usize,
    rows: usize,
    hs: usize,
    rs: usize,
    d: usize,
}

impl Rows {
    fn at(&self, i: usize, r: usize) -> usize {
        i * self.hs + r * self.rs
    }
}

/// Keys per tile: 64 rows of V (16 KiB at D = 64) stay in L1 while every row of the block passes over them.
const VT: usize = 64;

/// One block of query rows against their keys: o = softmax(q·kᵀ·scale [softcapped] [+ mask]) · v, each row
/// seeing the keys `span` gives it.
///
/// Batch-invariant: every number a row gets is computed the same way whatever the other rows of the block are,
/// how many there are, and how the keys are split into runs (a paged cache's blocks or one contiguous run). A
/// score is `dot` (the same numbers from every instruction set's version of it), an output element one chain of
/// fused multiply-adds over the row's visible keys in order; only the keys a row sees are
/// touched, and the softmax sums a row's visible scores alone. So a sequence's logits are the same, bit for bit,
/// decoded alone, in any batch, or with its prompt in any chunks (a general matrix product picks its kernel and
/// the order of its sums from the shapes).
///
/// # Safety
/// q holds every row of `rg` (rows `mask_rs` apart in `mask`); o has room for them; the runs of `kv` lie inside
/// its slices; no other thread touches the rows of o this block writes.
#[allow(clippy::too_many_arguments)]
unsafe fn block<T: KvElem>(q: &[f32], rg: &Rows, kv: &Kv<T>, span: Span, mask: Option<&[f32]>, mask_rs: usize, scale: f32, softcap: Option<f32>, o: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::isa() >= super::cpu::Isa::Avx512 {
        // SAFETY: the CPU has AVX-512 F (the Avx512 level); the rest is the caller's.
        return unsafe { block_avx512(q, rg, kv, span, mask, mask_rs, scale, softcap, o) };
    }
    assert!(T::F32, "an f16 pool is read in place on AVX-512 only");
    #[cfg(target_arch = "x86_64")]
    if super::cpu::isa() >= super::cpu::Isa::Avx2 {
        // SAFETY: the CPU has AVX2 and FMA (the Avx2 level); the rest is the caller's.
        return unsafe { block_avx2(q, rg, kv, span, mask, mask_rs, scale, softcap, o) };
    }
    // SAFETY: the caller's.
    unsafe { block_generic(q, rg, kv, span, mask, mask_rs, scale, softcap, o) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512<T: KvElem>(q: &[f32], rg: &Rows, kv: &Kv<T>, span: Span, mask: Option<&[f32]>, mask_rs: usize, scale: f32, softcap: Option<f32>, o: *mut f32) {
    // SAFETY: the caller's.
    unsafe { block_generic(q, rg, kv, span, mask, mask_rs, scale, softcap, o) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx2<T: KvElem>(q: &[f32], rg: &Rows, kv: &Kv<T>, span: Span, mask: Option<&[f32]>, mask_rs: usize, scale: f32, softcap: Option<f32>, o: *mut f32) {
    // SAFETY: the caller's.
    unsafe { block_generic(q, rg, kv, span, mask, mask_rs, scale, softcap, o) }
}

/// Lanes of a score's partial sums: lane l sums the products of elements l, l + 16, l + 32, ... of D.
const LANES: usize = 16;

/// q · k: 16 lanes of fused multiply-adds over D (the tail padded with zeros), then the lanes summed in a fixed
/// tree (lane l += lane l + w for w = 8, 4, 2, 1). The vector versions in `dots` compute exactly these numbers.
#[inline(always)]
fn dot<T: KvElem>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [0f32; LANES];
    let (qc, kc) = (q.chunks_exact(LANES), k[..q.len()].chunks_exact(LANES));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for l in 0..LANES {
            acc[l] = a[l].mul_add(b[l].get(), acc[l]);
        }
    }
    if !qr.is_empty() {
        for l in 0..LANES {
            let (a, b) = if l < qr.len() { (qr[l], kr[l].get()) } else { (0.0, 0.0) };
            acc[l] = a.mul_add(b, acc[l]);
        }
    }
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// out[j] = scale · q · k_j for the keys k_j = k[j·k_rs ..][..D], j < out.len(): `dot` for each, 16 (AVX-512) or 8
/// (AVX2) keys at a time whose lane sums are reduced together, the rest one by one.
#[inline(always)]
fn dots<T: KvElem>(q: &[f32], k: &[T], k_rs: usize, scale: f32, out: &mut [f32]) {
    let n = out.len();
    let d = q.len();
    assert!(n == 0 || k.len() >= (n - 1) * k_rs + d);
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let isa = super::cpu::isa();
        // an f16 key's tail of D would need a masked 16-bit load: f16 keys come here with D a multiple of 16
        if isa >= super::cpu::Isa::Avx512 && (T::F32 || d.is_multiple_of(LANES)) {
            while j + 16 <= n {
                // SAFETY: AVX-512 F is there (the Avx512 level); keys j..j+16 lie inside k (asserted above).
                unsafe { simd::dots16(q, k.as_ptr().add(j * k_rs), k_rs, scale, out.as_mut_ptr().add(j)) };
                j += 16;
            }
        } else if isa >= super::cpu::Isa::Avx2 && T::F32 {
            while j + 8 <= n {
                // SAFETY: AVX2 and FMA are there (the Avx2 level); keys j..j+8 lie inside k (asserted above), f32
                // (T::F32).
                unsafe { simd::dots8(q, k.as_ptr().add(j * k_rs) as *const f32, k_rs, scale, out.as_mut_ptr().add(j)) };
                j += 8;
            }
        }
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        *o = dot(q, &k[jj * k_rs..jj * k_rs + d]) * scale;
    }
}

/// `dot` for 16 or 8 keys at once: the same lanes and the same tree, the keys' partial sums shuffled together so
/// that each tree level is one vector add for several keys.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod simd {
    use std::arch::x86_64::*;

    use super::{KvElem, LANES};

    /// # Safety
    /// AVX-512 F; 16 keys of q.len() elements at k, k + k_rs, ...; 16 writable floats at out; for f16 keys,
    /// q.len() a multiple of 16.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn dots16<T: KvElem>(q: &[f32], k: *const T, k_rs: usize, scale: f32, out: *mut f32) {
        // SAFETY: the caller's; loads stay inside each key's d elements (masked at the tail).
        unsafe {
            let d = q.len();
            let mut a = [_mm512_setzero_ps(); 16];
            let mut c = 0;
            while c + LANES <= d {
                let qv = _mm512_loadu_ps(q.as_ptr().add(c));
                for j in 0..16 {
                    a[j] = _mm512_fmadd_ps(qv, T::load16(k.add(j * k_rs + c)), a[j]);
                }
                c += LANES;
            }
            if c < d {
                assert!(T::F32, "f16 keys of a whole number of 16 values");
                let k = k as *const f32;
                let m: __mmask16 = (1u32 << (d - c)) as u16 - 1;
                let qv = _mm512_maskz_loadu_ps(m, q.as_ptr().add(c));
                for j in 0..16 {
                    a[j] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k.add(j * k_rs + c)), a[j]);
                }
            }
            // w = 8: lanes l and l + 8 of keys 2p and 2p+1 into one vector (lanes 0..8 and 8..16)
            let mut x = [_mm512_setzero_ps(); 8];
            for p in 0..8 {
                let (u, v) = (a[2 * p], a[2 * p + 1]);
                x[p] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(u, v), _mm512_shuffle_f32x4::<0xEE>(u, v));
            }
            // w = 4: quarter i of y[p] holds key 4p + i's four partial sums
            let mut y = [_mm512_setzero_ps(); 4];
            for p in 0..4 {
                let (u, v) = (x[2 * p], x[2 * p + 1]);
                y[p] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(u, v), _mm512_shuffle_f32x4::<0xDD>(u, v));
            }
            // w = 2: in quarter i of z[p], elements 0-1 belong to key 8p + i, elements 2-3 to key 8p + 4 + i
            let mut z = [_mm512_setzero_ps(); 2];
            for p in 0..2 {
                let (u, v) = (y[2 * p], y[2 * p + 1]);
                z[p] = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(u, v), _mm512_shuffle_ps::<0xEE>(u, v));
            }
            // w = 1: lane 4i + e holds key 4e + i
            let w = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(z[0], z[1]), _mm512_shuffle_ps::<0xDD>(z[0], z[1]));
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            let r = _mm512_mul_ps(_mm512_permutexvar_ps(idx, w), _mm512_set1_ps(scale));
            _mm512_storeu_ps(out, r);
        }
    }

    /// # Safety
    /// AVX2 and FMA; 8 keys of q.len() elements at k, k + k_rs, ...; 8 writable floats at out.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dots8(q: &[f32], k: *const f32, k_rs: usize, scale: f32, out: *mut f32) {
        // SAFETY: the caller's; loads stay inside each key's d elements (masked at the tail).
        unsafe {
            let d = q.len();
            let mut lo = [_mm256_setzero_ps(); 8];
            let mut hi = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c + LANES <= d {
                let (q0, q1) = (_mm256_loadu_ps(q.as_ptr().add(c)), _mm256_loadu_ps(q.as_ptr().add(c + 8)));
                for j in 0..8 {
                    let kp = k.add(j * k_rs + c);
                    lo[j] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(kp), lo[j]);
                    hi[j] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(kp.add(8)), hi[j]);
                }
                c += LANES;
            }
            if c < d {
                let rem = (d - c) as i32;
                let m0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let (mlo, mhi) = (_mm256_cmpgt_epi32(_mm256_set1_epi32(rem), m0), _mm256_cmpgt_epi32(_mm256_set1_epi32(rem - 8), m0));
                let (q0, q1) = (_mm256_maskload_ps(q.as_ptr().add(c), mlo), _mm256_maskload_ps(q.as_ptr().add(c + 8), mhi));
                for j in 0..8 {
                    let kp = k.add(j * k_rs + c);
                    lo[j] = _mm256_fmadd_ps(q0, _mm256_maskload_ps(kp, mlo), lo[j]);
                    hi[j] = _mm256_fmadd_ps(q1, _mm256_maskload_ps(kp.add(8), mhi), hi[j]);
                }
            }
            // w = 8
            let b: [__m256; 8] = std::array::from_fn(|j| _mm256_add_ps(lo[j], hi[j]));
            // w = 4: lanes 0-3 of x[p] hold key 2p's partial sums, lanes 4-7 key 2p + 1's
            let x: [__m256; 4] = std::array::from_fn(|p| {
                let (u, v) = (b[2 * p], b[2 * p + 1]);
                _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u, v), _mm256_permute2f128_ps::<0x31>(u, v))
            });
            // w = 2: in half h of y[p], elements 0-1 belong to key 4p + h, elements 2-3 to key 4p + 2 + h
            let y: [__m256; 2] = std::array::from_fn(|p| {
                let (u, v) = (x[2 * p], x[2 * p + 1]);
                _mm256_add_ps(_mm256_shuffle_ps::<0x44>(u, v), _mm256_shuffle_ps::<0xEE>(u, v))
            });
            // w = 1: lane 4h + e holds key 2e + h
            let w = _mm256_add_ps(_mm256_shuffle_ps::<0x88>(y[0], y[1]), _mm256_shuffle_ps::<0xDD>(y[0], y[1]));
            let idx = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let r = _mm256_mul_ps(_mm256_permutevar8x32_ps(w, idx), _mm256_set1_ps(scale));
            _mm256_storeu_ps(out, r);
        }
    }
}

/// Walk the keys of `segs` (in order, `VT` at a time) and, for each tile, every row that sees some of it: the
/// body runs with `seg`, `col` (the run's first key), `r` and `a..b`, the keys (block-relative) row r sees there.
/// `$tile` runs first at each tile with `$end`, the key (block-relative) the tile ends before.
/// A macro, not a function taking a closure: a closure would be compiled without the caller's target features.
macro_rules! for_each_tile {
    ($segs:expr, $rows:expr, $vis:expr, |$end:ident| $tile:block, |$seg:ident, $col:ident, $r:ident, $a:ident, $b:ident| $body:block) => {{
        let mut $col = 0;
        for $seg in $segs {
            for t0 in (0..$seg.len).step_by(VT) {
                let (j0, j1) = ($col + t0, $col + (t0 + VT).min($seg.len));
                {
                    let $end = j1;
                    $tile
                }
                for $r in 0..$rows {
                    let (from, seen) = $vis($r);
                    let ($a, $b) = (j0.max(from), j1.min(seen));
                    if $a < $b $body
                }
            }
            $col += $seg.len;
        }
    }};
}

/// Keys ahead of the walk whose rows `Ahead` asks for: two tiles, 32 KiB of keys and as much of values at D = 64.
const AHEAD: usize = 2 * VT;

/// Asks for the key and value rows of a block's runs to be brought into the L2 cache `AHEAD` keys before the walk
/// reaches them, as it goes: a block reads a few dozen to a few thousand rows, one run per block of a paged pool,
/// each row a third or less of a pool row (one KV head's part), too short and scattered for the hardware's
/// prefetchers. Asking for every row up front (as an earlier build did) queued thousands of misses before the
/// first dot product, and the walk then waited on them. A prefetch is a hint: it changes no number and never faults.
struct Ahead<'a, T> {
    kv: &'a Kv<'a, T>,
    d: usize,
    /// the run and the row in it to ask for next, and how many keys were asked for
    seg: usize,
    row: usize,
    asked: usize,
}

impl<'a, T> Ahead<'a, T> {
    fn new(kv: &'a Kv<'a, T>, d: usize) -> Self {
        Ahead { kv, d, seg: 0, row: 0, asked: 0 }
    }

    /// Ask for the rows of keys (block-relative) up to `end` + AHEAD not asked for yet: keys and values, or values
    /// alone.
    #[inline(always)]
    fn upto(&mut self, end: usize, keys: bool) {
        let mut left = (end + AHEAD).saturating_sub(self.asked);
        let bytes = self.d * std::mem::size_of::<T>();
        while left > 0 && self.seg < self.kv.segs.len() {
            let seg = self.kv.segs[self.seg];
            let n = left.min(seg.len - self.row);
            for j in self.row..self.row + n {
                if keys {
                    super::cpu::prefetch_l2(self.kv.k.as_ptr().wrapping_add(seg.k + j * self.kv.k_rs) as *const u8, bytes);
                }
                super::cpu::prefetch_l2(self.kv.v.as_ptr().wrapping_add(seg.v + j * self.kv.v_rs) as *const u8, bytes);
            }
            left -= n;
            self.asked += n;
            self.row += n;
            if self.row == seg.len {
                (self.seg, self.row) = (self.seg + 1, 0);
            }
        }
    }
}

/// For H rows (their scores and output rows): out[c0..c0+64] += Σ_{j in a..b} p_j · v_j[c0..c0+64], each element
/// one chain over j in order (as `axpy` would sum it row by row), every row of V (`vs`, rows `v_rs` apart from
/// key a on) loaded once for the H rows.
#[inline(always)]
///
/// # Safety
/// For f16 values: AVX-512 F (`KvElem::row64`).
unsafe fn pv<const H: usize, T: KvElem>(rows: [(&[f32], &mut [f32]); H], a: usize, b: usize, vs: &[T], v_rs: usize, c0: usize) {
    let mut acc = [[0f32; 64]; H];
    for (h, (_, o)) in rows.iter().enumerate() {
        acc[h].copy_from_slice(&o[c0..c0 + 64]);
    }
    for j in a..b {
        // SAFETY: the caller's.
        let vj: [f32; 64] = unsafe { T::row64(&vs[(j - a) * v_rs..]) };
        for h in 0..H {
            let p = rows[h].0[j];
            for l in 0..64 {
                acc[h][l] = p.mul_add(vj[l], acc[h][l]);
            }
        }
    }
    for (h, (_, o)) in rows.into_iter().enumerate() {
        o[c0..c0 + 64].copy_from_slice(&acc[h]);
    }
}

/// acc[l] += p · v[l] for l < 64 (or all of v when it is shorter): one output element's chain per lane.
#[inline(always)]
fn axpy(acc: &mut [f32], p: f32, v: &[f32]) {
    if acc.len() == 64 && v.len() == 64 {
        let (a, v): (&mut [f32; 64], &[f32; 64]) = (acc.try_into().unwrap(), v.try_into().unwrap());
        for l in 0..64 {
            a[l] = p.mul_add(v[l], a[l]);
        }
    } else {
        acc.iter_mut().zip(v).for_each(|(a, &x)| *a = p.mul_add(x, *a));
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn block_generic<T: KvElem>(q: &[f32], rg: &Rows, kv: &Kv<T>, span: Span, mask: Option<&[f32]>, mask_rs: usize, scale: f32, softcap: Option<f32>, o: *mut f32) {
    let (kend, d, rows, nrow) = (span.kend, rg.d, rg.rows, rg.heads * rg.rows);
    debug_assert_eq!(kv.segs.iter().map(|s| s.len).sum::<usize>(), kend);
    debug_assert!(q.len() >= rg.at(rg.heads - 1, rows - 1) + d);
    // the keys row r sees: from..seen (indices relative to the block's first key)
    let vis = |r: usize| {
        let seen = span.causal_first.map_or(kend, |p| (p + r + 1).min(kend));
        let from = span.window_first.map_or(0, |(end, w)| (end + r).saturating_sub(w)).min(seen);
        (from, seen)
    };
    // scores [head·rows + r][key], a tile of keys at a time for every row that sees some of them
    let mut s = vec![0f32; nrow * kend];
    let mut ahead = Ahead::new(kv, d);
    for_each_tile!(kv.segs, rows, vis, |end| { ahead.upto(end, true) }, |seg, col, r, a, b| {
        debug_assert!(kv.k.len() >= seg.k + (b - col - 1) * kv.k_rs + d);
        for i in 0..rg.heads {
            let qr = &q[rg.at(i, r)..][..d];
            let sr = &mut s[(i * rows + r) * kend + a..(i * rows + r) * kend + b];
            dots(qr, &kv.k[seg.k + (a - col) * kv.k_rs..], kv.k_rs, scale, sr);
        }
    });
    let mut inv = vec![0f32; nrow];
    for (ir, row) in s.chunks_exact_mut(kend).enumerate() {
        let r = ir % rows;
        let (from, seen) = vis(r);
        let row = &mut row[from..seen];
        if let Some(cap) = softcap {
            row.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
        }
        if let Some(m) = mask {
            row.iter_mut().zip(&m[r * mask_rs + from..r * mask_rs + seen]).for_each(|(x, &a)| *x += a);
        }
        inv[ir] = 1.0 / crate::kernels::act::exp_shifted_sum(row);
    }
    // O = P V: per row and element, one chain of multiply-adds over the visible keys in order, a tile of V at a
    // time (the chain goes on where the last tile left it)
    // SAFETY: the caller gives o room for every row of `rg`, written by this block alone.
    let orow = |i: usize, r: usize| unsafe { std::slice::from_raw_parts_mut(o.add(rg.at(i, r)), d) };
    for i in 0..rg.heads {
        for r in 0..rows {
            orow(i, r).fill(0.0);
        }
    }
    let mut ahead = Ahead::new(kv, d);
    for_each_tile!(kv.segs, rows, vis, |end| { ahead.upto(end, false) }, |seg, col, r, a, b| {
        debug_assert!(kv.v.len() >= seg.v + (b - col - 1) * kv.v_rs + d);
        if d % 64 == 0 {
            // up to 3 heads of the group at once: each row of V loaded once for all of them
            let mut i = 0;
            while i < rg.heads {
                let h = 3.min(rg.heads - i);
                for c0 in (0..d).step_by(64) {
                    let vs = &kv.v[seg.v + (a - col) * kv.v_rs + c0..];
                    let row = |k: usize| (&s[((i + k) * rows + r) * kend..][..kend], orow(i + k, r));
                    // SAFETY: f16 values come here on AVX-512 only (`block`).
                    unsafe {
                        match h {
                            3 => pv::<3, T>([row(0), row(1), row(2)], a, b, vs, kv.v_rs, c0),
                            2 => pv::<2, T>([row(0), row(1)], a, b, vs, kv.v_rs, c0),
                            _ => pv::<1, T>([row(0)], a, b, vs, kv.v_rs, c0),
                        }
                    }
                }
                i += h;
            }
            continue;
        }
        for i in 0..rg.heads {
            let or = orow(i, r);
            let sr = &s[(i * rows + r) * kend..][..kend];
            for c0 in (0..d).step_by(64) {
                let w = 64.min(d - c0);
                let mut acc = [0f32; 64];
                acc[..w].copy_from_slice(&or[c0..c0 + w]);
                for (j, &p) in sr.iter().enumerate().take(b).skip(a) {
                    T::axpy(&mut acc[..w], p, &kv.v[seg.v + (j - col) * kv.v_rs + c0..][..w]);
                }
                or[c0..c0 + w].copy_from_slice(&acc[..w]);
            }
        }
    });
    for i in 0..rg.heads {
        for r in 0..rows {
            let f = inv[i * rows + r];
            orow(i, r).iter_mut().for_each(|x| *x *= f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The Candle path of ops::attention (scores, mask, softmax, matmul), as the reference.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Tensor {
        let (b, h, tq, d) = q.dims4().unwrap();
        let (_, hkv, tk, _) = k.dims4().unwrap();
        let rep = h / hkv;
        let k = k.contiguous().unwrap().repeat_interleave_heads(rep);
        let v = v.contiguous().unwrap().repeat_interleave_heads(rep);
        let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if causal {
            let m = crate::ops::causal_bias(tq, tk, DType::F32, &Device::Cpu).unwrap();
            s = s.broadcast_add(&m).unwrap();
        }
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        let y = p.matmul(&v).unwrap();
        assert_eq!(y.dims(), &[b, h, tq, d]);
        y
    }

    trait Rep {
        fn repeat_interleave_heads(&self, rep: usize) -> Tensor;
    }
    impl Rep for Tensor {
        fn repeat_interleave_heads(&self, rep: usize) -> Tensor {
            let (b, hkv, t, d) = self.dims4().unwrap();
            self.unsqueeze(2).unwrap().expand((b, hkv, rep, t, d)).unwrap().reshape((b, hkv * rep, t, d)).unwrap()
        }
    }

    #[test]
    fn matches_reference() {
        let dev = Device::Cpu;
        // (b, h, hkv, tq, tk, d)
        for &(b, h, hkv, tq, tk, d) in &[
            (1, 1, 1, 1, 1, 1),
            (1, 2, 2, 5, 5, 4),
            (2, 4, 2, 7, 7, 8),
            (1, 3, 1, 1, 9, 16),
            (2, 6, 3, 3, 70, 33),
            (1, 2, 1, 130, 130, 64),
            (1, 9, 3, 65, 200, 64),
            (1, 2, 2, 9, 4, 8), // more queries than keys (not causal)
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, h, tq, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, hkv, tk, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, hkv, tk, d), &dev).unwrap();
            for causal in [true, false] {
                if causal && tq > tk {
                    continue;
                }
                let scale = 1.0 / (d as f64).sqrt();
                let got = attention(&q, &k, &v, causal, None, scale, None, None).unwrap().unwrap();
                let want = reference(&q, &k, &v, causal, scale);
                let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(diff < 2e-5, "{:?} causal={causal}: max difference {diff}", (b, h, hkv, tq, tk, d));
            }
        }
    }

    /// A left-padding mask as generation builds it ([B, 1, 1, Tk], -inf on each row's padding), on strided keys:
    /// the same as Candle's path with the mask added to the scores.
    #[test]
    fn padding_mask() {
        let dev = Device::Cpu;
        let (b, h, hkv, tk, cap, d) = (3, 4, 2, 11, 16, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, 1, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, hkv, cap, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, hkv, cap, d), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, tk).unwrap(), vbuf.narrow(2, 0, tk).unwrap());
        let pads = [0usize, 3, 7];
        let m: Vec<f32> = pads.iter().flat_map(|&p| (0..tk).map(move |j| if j < p { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(m, (b, 1, 1, tk), &dev).unwrap();
        let got = attention(&q, &k, &v, false, Some(&mask), 0.35, None, None).unwrap().unwrap();
        let ks = k.contiguous().unwrap().repeat_interleave_heads(h / hkv);
        let vv = v.contiguous().unwrap().repeat_interleave_heads(h / hkv);
        let s = (q.matmul(&ks.t().unwrap()).unwrap() * 0.35).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&vv).unwrap();
        let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 2e-5, "max difference {diff}");
        // and a mask of another shape is left to the general path
        let other = Tensor::zeros((1, tk), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &v, false, Some(&other), 0.35, None, None).unwrap().is_none());
    }

    /// Batch invariance, bit for bit: a query's output is the same whether it is computed alone (decoding), as
    /// a row of a longer causal prefill, or next to other queries, and whether its keys are one run or many.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        // query heads per KV head 2, 3, 1 and 5; D with a tail, and multiples of 64 (the grouped value path)
        for (h, hkv, d) in [(4, 2, 72), (6, 2, 64), (3, 3, 128), (5, 1, 64)] {
            rows_do_not_depend_on_the_batch_for(h, hkv, d);
        }
    }

    fn rows_do_not_depend_on_the_batch_for(h: usize, hkv: usize, d: usize) {
        let dev = Device::Cpu;
        let t = 150;
        let q = Tensor::randn(0f32, 1.0, (1, h, t, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, hkv, t, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, hkv, t, d), &dev).unwrap();
        for window in [None, Some(40)] {
            let full: Vec<f32> = attention(&q, &k, &v, true, None, 0.2, window, None).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            for i in [0, 1, 17, 63, 64, 65, 100, 149] {
                let qi = q.narrow(2, i, 1).unwrap();
                let (ki, vi) = (k.narrow(2, 0, i + 1).unwrap(), v.narrow(2, 0, i + 1).unwrap());
                let one: Vec<f32> = attention(&qi, &ki, &vi, true, None, 0.2, window, None).unwrap().unwrap().flatten_all().unwrap().to_vec1().unwrap();
                for hi in 0..h {
                    assert_eq!(&one[hi * d..(hi + 1) * d], &full[(hi * t + i) * d..(hi * t + i + 1) * d], "query {i} head {hi} window {window:?}");
                }
            }
        }
        // one contiguous run against the same keys cut into runs of 5
        let (qd, kd, vd): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            q.flatten_all().unwrap().to_vec1().unwrap(),
            k.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
            v.narrow(1, 0, 1).unwrap().flatten_all().unwrap().to_vec1().unwrap(),
        );
        let span = || Span { kend: t, causal_first: Some(t - 3), window_first: None };
        let whole = [Seg { k: 0, v: 0, len: t }];
        let cut: Vec<Seg> = (0..t).step_by(5).map(|j| Seg { k: j * d, v: j * d, len: 5.min(t - j) }).collect();
        let (mut a, mut b) = (vec![0f32; 3 * d], vec![0f32; 3 * d]);
        let q3 = &qd[(t - 3) * d..];
        let rg = Rows { heads: 1, rows: 3, hs: 0, rs: d, d };
        // SAFETY: q3, a and b hold 3 rows of d; the runs lie inside kd and vd.
        unsafe {
            block(q3, &rg, &Kv { k: &kd, k_rs: d, v: &vd, v_rs: d, segs: &whole }, span(), None, 0, 0.2, None, a.as_mut_ptr());
            block(q3, &rg, &Kv { k: &kd, k_rs: d, v: &vd, v_rs: d, segs: &cut }, span(), None, 0, 0.2, None, b.as_mut_ptr());
        }
        assert_eq!(a, b);
    }

    /// An f16 pool read in place (on AVX-512, D a multiple of 64) gives the numbers of the same pool widened
    /// first, bit for bit: decode rows and a prompt chunk, grouped heads, a window, soft-capping, blocks out of
    /// order. (Where the CPU has no AVX-512 both are the widened path.)
    #[test]
    fn f16_pool_in_place_equals_widened() {
        use crate::nn::paged::PagedSeq;
        for (h, hkv, d) in [(9usize, 3usize, 64usize), (4, 2, 128), (2, 2, 64)] {
            let (bs, nb) = (16, 24);
            let n_el = nb * bs * hkv * d;
            let half = |a: usize, b: usize| -> Vec<f16> { (0..n_el).map(|i| f16::from_f32((i * a % b) as f32 / (b / 2) as f32 - 1.0)).collect() };
            let (kd, vd) = (half(7919, 2003), half(104_729, 1009));
            let blocks: Vec<u32> = (0..nb as u32).map(|i| (i * 7) % nb as u32).collect();
            // decode rows at 37 and 100 positions, a chunk of 20 prompt rows ending at 90
            let seqs = [
                PagedSeq { row0: 0, rows: 1, ctx: 37, blocks: &blocks[0..3] },
                PagedSeq { row0: 1, rows: 1, ctx: 100, blocks: &blocks[3..10] },
                PagedSeq { row0: 2, rows: 20, ctx: 90, blocks: &blocks[10..16] },
            ];
            let n = 22;
            let q: Vec<f32> = (0..h * n * d).map(|i| (i * 31 % 97) as f32 / 48.0 - 1.0).collect();
            for (window, softcap) in [(None, None), (Some(30), None), (None, Some(5.0))] {
                let job = Paged::new(&seqs, n, h, hkv, d, n_el, bs, 0.125, window, softcap).unwrap();
                let (mut a, mut b) = (vec![f32::NAN; h * n * d], vec![f32::NAN; h * n * d]);
                for t in 0..job.len() {
                    // SAFETY: q, a and b hold [H, N, D]; the pool is the job's; one thread.
                    unsafe {
                        job.run(t, &q, Pool::F16(&kd, &vd), a.as_mut_ptr());
                        job.run_widened(t, &q, &kd, &vd, b.as_mut_ptr());
                    }
                }
                assert!(a.iter().all(|x| x.is_finite()), "h {h} hkv {hkv} d {d}: every row written");
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "h {h} hkv {hkv} d {d} window {window:?} softcap {softcap:?}");
            }
        }
    }

    /// Every instruction set's `dots` gives `dot`'s numbers exactly, for D with and without a tail.
    #[test]
    fn vector_dots_equal_the_scalar_tree() {
        let dev = Device::Cpu;
        for d in [1, 8, 15, 16, 17, 64, 72, 96, 128, 256] {
            let n = 37;
            let q: Vec<f32> = Tensor::randn(0f32, 1.0, d, &dev).unwrap().to_vec1().unwrap();
            let k: Vec<f32> = Tensor::randn(0f32, 1.0, n * (d + 3), &dev).unwrap().to_vec1().unwrap();
            let want: Vec<f32> = (0..n).map(|j| dot(&q, &k[j * (d + 3)..j * (d + 3) + d]) * 0.3).collect();
            let mut got = vec![0f32; n];
            dots(&q, &k, d + 3, 0.3, &mut got);
            assert_eq!(got, want, "d = {d} ({:?})", crate::kernels::cpu::isa());
        }
    }

    #[test]
    fn strided_keys_and_values() {
        // k, v as views of the first Tk positions of a longer buffer (a preallocated cache)
        let dev = Device::Cpu;
        let (b, h, tq, tk, cap, d) = (2, 3, 4, 10, 16, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, tq, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, tk).unwrap(), vbuf.narrow(2, 0, tk).unwrap());
        assert!(!k.is_contiguous());
        let got = attention(&q, &k, &v, true, None, 0.3, None, None).unwrap().unwrap();
        let want = reference(&q, &k, &v, true, 0.3);
        let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 2e-5, "max difference {diff}");
    }
}
