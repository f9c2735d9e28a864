//! A step of the running batch on a team of threads: every sequence adds its rows (one token it decodes, or a
//! chunk of its prompt), and the whole step (every layer, the final norm and the output projection of the rows
//! whose next token is wanted) runs as one job on all threads (`kernels::team`), the threads claiming parts of
//! each stage and going on once all of its parts are done, on plain arrays. Prompt chunks ride along with the
//! decoding rows: a server's steps mix them, and the general path made every such step pay for its tensors.
//!
//! The general path (`Decoder::forward_paged`) runs the same step as a chain of tensor operations, each its own
//! parallel region: a small quantized model's step at batch 1 is a few milliseconds, and a few hundred hand-offs
//! between threads (and the tensors made in between) took a third of it. This path computes the same numbers
//! with the same kernels in the same order, so a sequence's tokens and log-probabilities are the same, bit for
//! bit, whichever path ran its step (tests/test_decode_step.py holds both to that on every architecture here).
//!
//! It covers the blocks most checkpoints have: RMSNorm, sequential residuals, a SiLU-gated MLP, full RoPE (either
//! convention, on all or the first part of each head) or none, optional q/k norms, grouped-query attention with windows and soft-capping, projections in
//! the block formats of `kernels::quant` (several formats side by side too), f32 activations and the pool in
//! memory. Anything else takes the general path.
//!
//! Stages of a layer (N rows, each its own sequence):
//!   1 rows:   x̂ = rms_norm(x); rounded for each format the qkv parts take
//!   2 groups: qkv = x̂ Wᵀ (+ b)
//!   3 (row, KV head): k = rope(k_norm(k)), written to the pool with v; the group's q = rope(q_norm(q))
//!   4 attention tasks over the pool (kernels::attention::Paged)
//!   5 rows:   the heads' outputs side by side, rounded for the output projection
//!   6 groups: x += y Woᵀ (+ b)
//!   7 rows:   x̂ = rms_norm(x), rounded for the MLP's input
//!   8 groups: [gate | up] = x̂ Wᵀ (+ b)
//!   9 rows:   silu(gate)·up, rounded for the down projection
//!  10 groups: x += h Wdᵀ (+ b)
//! then rows: the final norm; groups: the logits.
//! Each thread claims its own stretch of a projection's groups first (`Claim::Homed`), and while it waits in a
//! stage it brings its stretch of the next projection into its cache (`Warm`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use candle_core::{DType, Storage, Tensor};

use super::Decoder;
use crate::config::{Act, Residual};
use crate::error::{Error, Result};
use crate::kernels::attention::{Paged, Pool};
use crate::kernels::team::Claim;
use crate::kernels::cpu::{self, SendPtr, SyncBuf};
use crate::kernels::quant::{ActsBuf, ActsRef, Kind, QWeight};
use crate::nn::paged::HostKv;
use crate::nn::{KvPool, Linear, Logits, Norm, PagedStep};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Which path decode steps take (`Mode`); `CANDLEWICK_DECODE_STEP=general` turns the team path off, tests and
/// benches compare the paths with `set_mode`.
static MODE: AtomicU8 = AtomicU8::new(Mode::Team as u8);
static STEPS: AtomicU64 = AtomicU64::new(0);
/// Whether waiting copies warm the next projection's weights (`Warm`); tests and benches compare with `set_warm`.
static WARM: AtomicBool = AtomicBool::new(true);

/// Turn the waiting copies' warming on or off; returns the setting before.
pub fn set_warm(on: bool) -> bool {
    WARM.swap(on, Ordering::Relaxed)
}

/// Which path decode steps take. There is no fallback to the general path on a crowded machine: with busy
/// processes beside the engine (one or two CPU hogs on a 2-vCPU VM, a server's own clients and event loop) or
/// twice as many threads as cores, the team ran as fast as the general path or faster in all runs measured but
/// one (docs/decisions.md, "Decode speed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// every step the general path
    General = 0,
    /// the team wherever it applies (the default)
    Team = 1,
}

fn env_allows() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| std::env::var("CANDLEWICK_DECODE_STEP").map(|v| v != "general").unwrap_or(true))
}

/// Set the path decode steps take; returns the one before.
pub fn set_mode(mode: Mode) -> Mode {
    match MODE.swap(mode as u8, Ordering::SeqCst) {
        0 => Mode::General,
        _ => Mode::Team,
    }
}

/// Steps that took this path so far in the process.
pub fn steps() -> u64 {
    STEPS.load(Ordering::Relaxed)
}

/// A projection's parts: (weight, first output column), and the bias of all its outputs.
pub(super) struct Proj {
    parts: Vec<(Arc<QWeight>, usize)>,
    /// index into `Plan::acts` per part: the rounded input it reads
    acts: Vec<usize>,
    bias: Option<Vec<f32>>,
    out: usize,
    groups: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    qkv: Proj,
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
    o: Proj,
    ffn_norm: Vec<f32>,
    mlp_in: Proj,
    down: Proj,
}

/// What the team path needs of a decoder, read once at load.
pub(super) struct Plan {
    layers: Vec<Layer>,
    final_norm: Vec<f32>,
    /// the output projection, where it is in blocks (else the general lm_head runs on the hidden states)
    lm_head: Option<Proj>,
    /// (format, input size) of each rounded-activations buffer a step needs
    acts: Vec<(Kind, usize)>,
    eps: f32,
}

const STAGES_PER_LAYER: usize = 10;
/// Norms, RoPE and roundings of at most this many values in all are a stage for one thread.
const SERIAL_VALUES: usize = 8192;
/// a head's key is turned in a buffer on the stack
const MAX_HEAD_DIM: usize = 512;

fn host_f32(t: &Tensor) -> Option<Vec<f32>> {
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    t.flatten_all().ok()?.to_vec1().ok()
}

fn rms_weight(n: &Norm) -> Option<Vec<f32>> {
    if n.bias.is_some() {
        return None;
    }
    host_f32(&n.weight)
}

impl Plan {
    /// The plan for `m`, or None where some part of it takes the general path only.
    pub(super) fn new(m: &Decoder) -> Option<Plan> {
        let cfg = &m.cfg;
        let eligible = m.act == DType::F32
            && m.embed_tokens.device().is_cpu()
            && !cfg.layer_norm
            && cfg.residual == Residual::Sequential
            && cfg.gated_mlp
            && m.mlp_act == Act::Silu
            && m.embed_positions.is_none()
            && cfg.rotary_dim <= cfg.head_dim
            && cfg.rotary_dim.is_multiple_of(2)
            && cfg.head_dim <= MAX_HEAD_DIM
            && cfg.num_kv_heads > 0
            && cfg.num_heads.is_multiple_of(cfg.num_kv_heads);
        if !eligible {
            return None;
        }
        let mut acts: Vec<(Kind, usize)> = vec![];
        let mut proj = |l: &Linear, inp: usize| -> Option<Proj> {
            let pieces: Vec<(&Arc<QWeight>, &Option<Tensor>)> = match l {
                Linear::Blocks(w, b) => vec![(w, b)],
                Linear::Split(ps) => ps
                    .iter()
                    .map(|p| match p {
                        Linear::Blocks(w, b) => Some((w, b)),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?,
                _ => return None,
            };
            let (mut parts, mut idx, mut bias, mut off) = (vec![], vec![], vec![], 0);
            let any_bias = pieces.iter().any(|(_, b)| b.is_some());
            for (w, b) in pieces {
                if w.inp() != inp {
                    return None;
                }
                let key = (w.kind(), inp);
                let i = acts.iter().position(|&k| k == key).unwrap_or_else(|| {
                    acts.push(key);
                    acts.len() - 1
                });
                if any_bias {
                    match b {
                        Some(b) => bias.extend(host_f32(b)?),
                        None => bias.extend(std::iter::repeat_n(0f32, w.out())),
                    }
                }
                parts.push((w.clone(), off));
                idx.push(i);
                off += w.out();
            }
            if any_bias && bias.len() != off {
                return None;
            }
            let groups = parts.iter().map(|(w, _)| w.groups()).sum();
            Some(Proj { parts, acts: idx, bias: any_bias.then_some(bias), out: off, groups })
        };
        let (c, d, h, hkv, f) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let mut layers = vec![];
        for b in &m.layers {
            if b.post_attn_norm.is_some() || b.post_ffn_norm.is_some() || b.q_norm.is_some() != b.k_norm.is_some() {
                return None;
            }
            let qkv = proj(&b.qkv, c)?;
            let o = proj(&b.o, h * d)?;
            let mlp_in = proj(&b.mlp_in, c)?;
            let down = proj(&b.down, f)?;
            if qkv.out != (h + 2 * hkv) * d || o.out != c || mlp_in.out != 2 * f || down.out != c {
                return None;
            }
            let q_norm = match &b.q_norm {
                Some(n) => Some(rms_weight(n).filter(|w| w.len() == d)?),
                None => None,
            };
            let k_norm = match &b.k_norm {
                Some(n) => Some(rms_weight(n).filter(|w| w.len() == d)?),
                None => None,
            };
            layers.push(Layer {
                attn_norm: rms_weight(&b.attn_norm).filter(|w| w.len() == c)?,
                qkv,
                q_norm,
                k_norm,
                o,
                ffn_norm: rms_weight(&b.ffn_norm).filter(|w| w.len() == c)?,
                mlp_in,
                down,
            });
        }
        // norms share one eps (the config's)
        let eps = cfg.norm_eps as f32;
        let lm_head = if cfg.final_softcap.is_none() { proj(&m.lm_head, c).filter(|p| p.bias.is_none() && p.out == cfg.vocab_size) } else { None };
        Some(Plan { layers, final_norm: rms_weight(&m.norm).filter(|w| w.len() == c)?, lm_head, acts, eps })
    }
}

/// What a step gives back: the logits of every row, or (where the output projection is not in blocks) the
/// final hidden states for the general `lm_head`.
pub enum StepOut {
    Logits(Logits),
    Hidden(Tensor),
}

/// RMSNorm of one row as Candle's CPU kernel computes it (the general path's `ops::rms_norm`): the mean square
/// summed in order in f32, x / √(ms + eps) · w.
fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum2 = x.iter().map(|&v| v * v).sum::<f32>();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, &s), &a) in out.iter_mut().zip(x).zip(w) {
        *o = s / m * a;
    }
}

/// A group's outputs (`src`, + `bias`) stored into `dst`, or added to it (`residual`): dst + (src + bias), in that
/// order, as the general path adds them.
#[inline(always)]
fn put(dst: &mut [f32; 16], src: &[f32; 16], bias: Option<&[f32; 16]>, residual: bool) {
    let mut v = *src;
    if let Some(b) = bias {
        for l in 0..16 {
            v[l] += b[l];
        }
    }
    if residual {
        for l in 0..16 {
            dst[l] += v[l];
        }
    } else {
        *dst = v;
    }
}

/// `put` for the last group of a projection whose outputs are not a multiple of 16.
fn put_slice(dst: &mut [f32], src: &[f32], bias: Option<&[f32]>, residual: bool) {
    for (l, d) in dst.iter_mut().enumerate() {
        let v = match bias {
            Some(b) => src[l] + b[l],
            None => src[l],
        };
        *d = if residual { *d + v } else { v };
    }
}

/// RoPE of one head vector's rotary part at one position, as Candle's kernels (`rope_i` interleaved, `rope`
/// half-split).
fn rope_row(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = x.len() / 2;
    if interleaved {
        for i in 0..half {
            let (a, b) = (x[2 * i], x[2 * i + 1]);
            x[2 * i] = a * cos[i] - b * sin[i];
            x[2 * i + 1] = a * sin[i] + b * cos[i];
        }
    } else {
        for i in 0..half {
            let (a, b) = (x[i], x[i + half]);
            x[i] = a * cos[i] - b * sin[i];
            x[i + half] = a * sin[i] + b * cos[i];
        }
    }
}

/// Groups of a projection claimed at a time by a copy of the team (`Claim::Homed`: each copy's stretch first).
fn proj_chunk(groups: usize, threads: usize) -> usize {
    groups.div_ceil(threads * 8).max(1)
}

/// What one copy of the team brings into its cache while it waits for the others: the weights of its own stretch
/// of the next projection (the groups it claims first there), walked on from where its last wait stopped, up to
/// `WARM_BYTES`. The memory is the limit at batch 1, and a copy waiting (behind a stage the leader runs alone, or
/// for the last parts of a stage) would otherwise leave it idle. Prefetches are hints: no number changes.
struct Warm {
    /// the projection walked (its address), its stretches of memory, and where the walk stands
    key: *const Proj,
    spans: Vec<(*const u8, usize)>,
    span: usize,
    off: usize,
    left: usize,
}

/// How much of its next stretch a waiting copy asks for, at most (the tile kernels' own look-ahead takes it from
/// there): half an L2 cache of the machines measured. 192 KiB and 1 MiB gained about as much (docs/decisions.md).
const WARM_BYTES: usize = 512 * 1024;

/// Steps of at most this many rows warm (decoding batches). A prompt chunk's products are held up by their
/// arithmetic, not the memory, and its rounded inputs (0.8 MB for 512 rows of SmolLM2's 1536), read again for every
/// group, are better left in the L2 cache than pushed out by warming: 512-token prefills ran 1-1.5% slower with it
/// in one process, within the noise there, with nothing for it to gain.
const WARM_ROWS: usize = 64;

impl Warm {
    fn new() -> Self {
        Self { key: std::ptr::null(), spans: vec![], span: 0, off: 0, left: 0 }
    }

    /// Walk on over the memory of groups `home` of `p` (this copy's stretch; used when `p` is new to the walk)
    /// until `finished()`, the stretch's end or `WARM_BYTES`.
    fn run(&mut self, p: &Proj, home: std::ops::Range<usize>, finished: &dyn Fn() -> bool) {
        if !std::ptr::eq(self.key, p) {
            self.key = p;
            self.spans.clear();
            let mut g0 = 0;
            for (w, _) in &p.parts {
                let (a, b) = (home.start.max(g0), home.end.min(g0 + w.groups()));
                if a < b {
                    self.spans.extend(w.group_bytes(a - g0..b - g0).into_iter().filter(|s| s.1 > 0));
                }
                g0 += w.groups();
            }
            (self.span, self.off, self.left) = (0, 0, WARM_BYTES);
        }
        while self.span < self.spans.len() && self.left > 0 && !finished() {
            let (at, len) = self.spans[self.span];
            let n = (len - self.off).min(4096).min(self.left);
            cpu::prefetch_l2(at.wrapping_add(self.off), n);
            self.off += n;
            self.left -= n;
            if self.off >= len {
                (self.span, self.off) = (self.span + 1, 0);
            }
        }
    }
}

impl Decoder {
    /// The step through the team, when the plan, the pool and the batch allow: each sequence's rows together and
    /// in order, the wanted rows last rows of sequences. None: take the general path. The logits go into `buf`'s
    /// memory.
    pub(super) fn decode_step(&self, step: &PagedStep, pool: &mut KvPool, mut buf: Vec<f32>) -> Result<Option<StepOut>> {
        let Some(plan) = &self.step_plan else { return Ok(None) };
        let PagedStep { ids, positions, slots, seqs, out_rows } = *step;
        let n = ids.len();
        // every sequence's rows one after another in the batch, at the positions that end its context (a token
        // it decodes, or a chunk of its prompt); the rows wanted are last rows of sequences, in order
        let mut next_row = 0;
        let laid_out = n > 0
            && positions.len() == n
            && slots.len() == n
            && seqs.iter().all(|s| {
                let ok = s.rows >= 1
                    && s.row0 == next_row
                    && s.ctx >= s.rows
                    && s.row0 + s.rows <= n
                    && (0..s.rows).all(|j| positions[s.row0 + j] as usize + s.rows == s.ctx + j);
                next_row += s.rows;
                ok
            })
            && next_row == n
            && out_rows.windows(2).all(|w| w[0] < w[1])
            && out_rows.iter().all(|&r| seqs.iter().any(|s| s.row0 + s.rows == r as usize + 1));
        let m = out_rows.len();
        let mode = MODE.load(Ordering::Relaxed);
        if !laid_out || mode == Mode::General as u8 || !env_allows() {
            return Ok(None);
        }
        let cfg = &self.cfg;
        let (c, d, h, hkv, f) = (cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size);
        let width = hkv * d;
        let bs = pool.block_size;
        if pool.width() != width {
            return Ok(None);
        }
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= cfg.max_position_embeddings) {
            return Err(Error::arg(format!("position {p} is past the context of {} positions", cfg.max_position_embeddings)));
        }
        // the pool's arrays by layer, as addresses (f32 or f16 elements: `half`)
        let (kptr, vptr, pool_len, half_kv): (Vec<SendPtr>, Vec<SendPtr>, usize, bool) = match pool.host_mut() {
            Some(HostKv::F32(pk, pv)) => {
                let len = pk.first().map_or(0, |b| b.len());
                (pk.iter_mut().map(|b| SendPtr(b.as_mut_ptr())).collect(), pv.iter_mut().map(|b| SendPtr(b.as_mut_ptr())).collect(), len, false)
            }
            Some(HostKv::F16(pk, pv)) => {
                let len = pk.first().map_or(0, |b| b.len());
                let p = |b: &mut crate::kernels::huge::Buf<f16>| SendPtr(b.as_mut_ptr() as *mut f32);
                (pk.iter_mut().map(p).collect(), pv.iter_mut().map(p).collect(), len, true)
            }
            None => return Ok(None),
        };
        if kptr.len() != plan.layers.len() || slots.iter().any(|&s| (s as usize + 1) * width > pool_len) {
            return Ok(None);
        }
        let mut jobs = Vec::with_capacity(plan.layers.len());
        for (i, blk) in self.layers.iter().enumerate() {
            let scale = cfg.attn_scale / if cfg.attn_scale_by_layer { (i + 1) as f64 } else { 1.0 };
            match Paged::new(seqs, n, h, hkv, d, pool_len, bs, scale, blk.window, cfg.attn_softcap) {
                Some(j) => jobs.push(j.split_heads(cpu::threads())),
                None => return Ok(None),
            }
        }
        // the inputs: embeddings (as the general path looks them up)
        let ids_t = Tensor::new(ids, self.embed_tokens.device())?.unsqueeze(0)?;
        let x0: Vec<f32> = self.embed_tokens.lookup(&ids_t)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let guards: Vec<_> = self.ropes.iter().map(|(cos, sin)| (cos.storage_and_layout(), sin.storage_and_layout())).collect();
        let mut tables: Vec<(&[f32], &[f32])> = vec![];
        for ((cg, cl), (sg, sl)) in &guards {
            let (Storage::Cpu(cc), Storage::Cpu(sc)) = (&**cg, &**sg) else { return Ok(None) };
            tables.push((&cc.as_slice::<f32>()?[cl.start_offset()..], &sc.as_slice::<f32>()?[sl.start_offset()..]));
        }
        let (rd, half) = (cfg.rotary_dim, cfg.rotary_dim / 2);
        if tables.iter().any(|(cs, sn)| cs.len() < cfg.max_position_embeddings * half || sn.len() < cfg.max_position_embeddings * half) {
            return Ok(None);
        }

        let x = SyncBuf::from_vec(x0);
        let acts: Vec<ActsBuf> = plan.acts.iter().map(|&(k, inp)| ActsBuf::new(k, n, inp)).collect();
        let qkv_w = (h + 2 * hkv) * d;
        let qkv = SyncBuf::<f32>::new(n * qkv_w);
        let qh = SyncBuf::<f32>::new(h * n * d);
        let y = SyncBuf::<f32>::new(h * n * d);
        let hb = SyncBuf::<f32>::new(n * 2 * f);
        let vocab = plan.lm_head.as_ref().map_or(0, |p| p.out);
        // every element is written by the job (all lanes of every group of the output projection, or the whole
        // final norm row): the memory of the last step is used as it is, not zeroed
        let out_len = if plan.lm_head.is_some() { m * vocab } else { m * c };
        buf.resize(out_len, 0.0);
        let out = SyncBuf::from_vec(buf);
        let isa = cpu::isa();
        let rep = h / hkv;
        let eps = plan.eps;
        let threads = cpu::threads();
        let interleaved = self.rope_interleaved;
        let n_stages = plan.layers.len() * STAGES_PER_LAYER + 2;

        // The job's buffers are written by stages as their parts are claimed (each row, group of 16 columns or
        // task goes to one copy) and read in later stages, which start once every part of the stages before is
        // done: no element is written by two threads, and none is read in the stage that writes it. The SAFETY
        // notes below say which stage is which.
        let job = |ctx: &crate::kernels::team::Ctx| {
            let mut row = vec![0f32; c.max(h * d)];
            let mut gbuf = vec![0f32; f];
            let mut tile = vec![0f32; n * 16];
            let warm = std::cell::RefCell::new(Warm::new());
            // while this copy waits in a stage: warm its stretch of projection `next`
            let idle = |next: Option<&Proj>, finished: &dyn Fn() -> bool| {
                if let Some(p) = next.filter(|_| n <= WARM_ROWS && WARM.load(Ordering::Relaxed)) {
                    warm.borrow_mut().run(p, ctx.home(p.groups, proj_chunk(p.groups, threads), ctx.me), finished)
                }
            };
            // row r of x: read by the norms (stages 1, 7 and the final one); x is written in stages 6 and 10 only
            let x_row = |r: usize| -> &[f32] {
                // SAFETY: called in the norm stages, where no thread writes x.
                unsafe { &x.get()[r * c..(r + 1) * c] }
            };
            // rows of `w` values through `prep`, rounded into the buffers `proj` reads
            // (a few rows are one thread's work: see Ctx::serial_stage)
            let set_rows = |stage: usize, proj: &Proj, n: usize, w: usize, row: &mut [f32], prep: &dyn Fn(usize, &mut [f32])| {
                // the rows are `proj`'s input: its weights come next
                let part = |rr: std::ops::Range<usize>| {
                    for r in rr {
                        prep(r, &mut row[..w]);
                        for (pi, &ai) in proj.acts.iter().enumerate() {
                            if proj.acts[..pi].contains(&ai) {
                                continue;
                            }
                            // SAFETY: row r was claimed by this copy alone; the buffer is read (viewed) only
                            // in the projection's stage, after this one.
                            unsafe { acts[ai].set_row(r, &row[..w]) };
                        }
                    }
                };
                let how = if n * w <= SERIAL_VALUES { Claim::Serial } else { Claim::Shared };
                ctx.run_stage(stage, n, 1, how, part, &mut |f: &dyn Fn() -> bool| idle(Some(proj), f));
            };
            // a projection's groups: each output (+ bias) stored, or added to `dst` (residual)
            // (`next`: the projection after, whose weights a copy waiting here warms)
            let matmul = |stage: usize, proj: &Proj, n: usize, dst: &SyncBuf<f32>, dst_w: usize, residual: bool, tile: &mut [f32], next: Option<&Proj>| {
                let chunk = proj_chunk(proj.groups, threads);
                ctx.run_stage(stage, proj.groups, chunk, Claim::Homed, |gr| {
                    for gg in gr {
                        let (mut g, mut pi) = (gg, 0);
                        while g >= proj.parts[pi].0.groups() {
                            g -= proj.parts[pi].0.groups();
                            pi += 1;
                        }
                        let (w, off) = (&proj.parts[pi].0, proj.parts[pi].1);
                        // SAFETY: the rounded inputs were set in the stage before (done before this one starts); none is
                        // set in this stage.
                        let view: ActsRef = unsafe { acts[proj.acts[pi]].view() };
                        w.group(isa, &view, n, g, &mut tile[..n * 16]);
                        let lanes = 16.min(w.out() - g * 16);
                        let j0 = off + g * 16;
                        for r in 0..n {
                            // SAFETY: columns j0..j0+lanes of every row belong to group gg, claimed by this thread
                            // alone; `dst` is not read by other threads in this stage.
                            let dst = unsafe { dst.part_mut(r * dst_w + j0, lanes) };
                            let src = &tile[r * 16..r * 16 + lanes];
                            let bias = proj.bias.as_ref().map(|b| &b[j0..j0 + lanes]);
                            if lanes == 16 {
                                // a whole group: a few vector instructions, no call (a branch per element here
                                // was a tenth of a 64-sequence step, a memcpy call per row half of that)
                                let as16 = |b: &[f32]| -> [f32; 16] { b.try_into().expect("16 lanes") };
                                let d: &mut [f32; 16] = dst.try_into().expect("16 lanes");
                                put(d, &as16(src), bias.map(as16).as_ref(), residual);
                            } else {
                                put_slice(dst, src, bias, residual);
                            }
                        }
                    }
                }, &mut |f: &dyn Fn() -> bool| idle(next, f));
            };
            for (i, (layer, blk)) in plan.layers.iter().zip(&self.layers).enumerate() {
                let s0 = i * STAGES_PER_LAYER;
                // 1: attention norm
                set_rows(s0, &layer.qkv, n, c, &mut row, &|r, o| rms_row(x_row(r), &layer.attn_norm, eps, o));
                // 2: q, k, v
                matmul(s0 + 1, &layer.qkv, n, &qkv, qkv_w, false, &mut tile, Some(&layer.o));
                // 3: q/k norms and RoPE; keys and values into the pool
                // SAFETY: qkv was written in stage 2 (the stage before) and is not written here.
                let qkv_all = unsafe { qkv.get() };
                let rope_part = |tr: std::ops::Range<usize>| {
                    for t in tr {
                        let (r, g) = (t / hkv, t % hkv);
                        let src = &qkv_all[r * qkv_w..(r + 1) * qkv_w];
                        let pos = positions[r] as usize;
                        let turn = |v: &mut [f32]| {
                            if let Some(ri) = blk.rope {
                                let (cs, sn) = tables[ri];
                                rope_row(&mut v[..rd], &cs[pos * half..(pos + 1) * half], &sn[pos * half..(pos + 1) * half], interleaved);
                            }
                        };
                        let mut kv = [0f32; MAX_HEAD_DIM];
                        let kbuf = &mut kv[..d];
                        let (k0, v0) = (h * d + g * d, (h + hkv) * d + g * d);
                        match &layer.k_norm {
                            Some(wn) => rms_row(&src[k0..k0 + d], wn, eps, kbuf),
                            None => kbuf.copy_from_slice(&src[k0..k0 + d]),
                        }
                        turn(kbuf);
                        let at = slots[r] as usize * width + g * d;
                        // SAFETY: slot slots[r], columns of KV head g: this task's alone (each sequence writes its
                        // own new slot; the check above kept every slot inside the pool); the pool is read only in
                        // stage 4.
                        unsafe {
                            if half_kv {
                                // rounded to nearest (even), as KvPool::write rounds the general path's
                                let (kp, vp) = (kptr[i].get() as *mut f16, vptr[i].get() as *mut f16);
                                std::slice::from_raw_parts_mut(kp.add(at), d).convert_from_f32_slice(kbuf);
                                std::slice::from_raw_parts_mut(vp.add(at), d).convert_from_f32_slice(&src[v0..v0 + d]);
                            } else {
                                std::ptr::copy_nonoverlapping(kbuf.as_ptr(), kptr[i].get().add(at), d);
                                std::ptr::copy_nonoverlapping(src[v0..v0 + d].as_ptr(), vptr[i].get().add(at), d);
                            }
                        }
                        for hh in g * rep..(g + 1) * rep {
                            // SAFETY: head hh of row r, one of KV head g's query heads: this task's alone; read
                            // only in stage 4.
                            let q = unsafe { qh.part_mut((hh * n + r) * d, d) };
                            match &layer.q_norm {
                                Some(wn) => rms_row(&src[hh * d..(hh + 1) * d], wn, eps, q),
                                None => q.copy_from_slice(&src[hh * d..(hh + 1) * d]),
                            }
                            turn(q);
                        }
                    }
                };
                let how = if n * qkv_w <= SERIAL_VALUES { Claim::Serial } else { Claim::Shared };
                ctx.run_stage(s0 + 2, n * hkv, 1, how, rope_part, &mut |f: &dyn Fn() -> bool| idle(Some(&layer.o), f));
                // 4: attention over the pool
                // SAFETY: the pool and the queries were written in stage 3 (the stage before) and are not
                // written here.
                let (kv, qd) = unsafe {
                    let (kp, vp) = (kptr[i].get(), vptr[i].get());
                    let kv = if half_kv {
                        Pool::F16(std::slice::from_raw_parts(kp as *const f16, pool_len), std::slice::from_raw_parts(vp as *const f16, pool_len))
                    } else {
                        Pool::F32(std::slice::from_raw_parts(kp as *const f32, pool_len), std::slice::from_raw_parts(vp as *const f32, pool_len))
                    };
                    (kv, qh.get())
                };
                let attend = |pr: std::ops::Range<usize>| {
                    for t in pr.flat_map(|p| jobs[i].part(p)) {
                        // SAFETY: Paged::new checked the shapes against the pool and the batch; task t writes its
                        // own rows of y, which no one reads before stage 5.
                        unsafe { jobs[i].run(t, qd, kv, y.ptr()) };
                    }
                };
                ctx.run_stage(s0 + 3, jobs[i].parts(), 1, Claim::Shared, attend, &mut |f: &dyn Fn() -> bool| idle(Some(&layer.o), f));
                // 5: heads side by side, rounded for the output projection
                set_rows(s0 + 4, &layer.o, n, h * d, &mut row, &|r, o| {
                    // SAFETY: y was written in stage 4 (the stage before) and is not written here.
                    let yd = unsafe { y.get() };
                    for hh in 0..h {
                        o[hh * d..(hh + 1) * d].copy_from_slice(&yd[(hh * n + r) * d..(hh * n + r + 1) * d]);
                    }
                });
                // 6: x += o(y)
                matmul(s0 + 5, &layer.o, n, &x, c, true, &mut tile, Some(&layer.mlp_in));
                // 7: MLP norm
                set_rows(s0 + 6, &layer.mlp_in, n, c, &mut row, &|r, o| rms_row(x_row(r), &layer.ffn_norm, eps, o));
                // 8: [gate | up]
                matmul(s0 + 7, &layer.mlp_in, n, &hb, 2 * f, false, &mut tile, Some(&layer.down));
                // 9: silu(gate)·up, rounded for the down projection
                set_rows(s0 + 8, &layer.down, n, f, &mut gbuf, &|r, o| {
                    // SAFETY: [gate | up] was written in stage 8 (the stage before) and is not written here.
                    let hd = unsafe { hb.get() };
                    crate::kernels::act::silu_mul(&hd[r * 2 * f..(r + 1) * 2 * f], o, f)
                });
                // 10: x += down(h)
                let after = plan.layers.get(i + 1).map(|l| &l.qkv).or(plan.lm_head.as_ref());
                matmul(s0 + 9, &layer.down, n, &x, c, true, &mut tile, after);
            }
            let s = plan.layers.len() * STAGES_PER_LAYER;
            // the rows wanted: final norm, then the logits (row r of `out` is batch row out_rows[r])
            let wanted = |r: usize| out_rows[r] as usize;
            match &plan.lm_head {
                Some(_) if m == 0 => {}
                Some(head) => {
                    set_rows(s, head, m, c, &mut row, &|r, o| rms_row(x_row(wanted(r)), &plan.final_norm, eps, o));
                    matmul(s + 1, head, m, &out, vocab, false, &mut tile, None);
                }
                None => {
                    ctx.serial_stage(s, m, |rr| {
                        for r in rr {
                            // SAFETY: row r of `out`, written by the leader alone; read after the job.
                            let o = unsafe { out.part_mut(r * c, c) };
                            rms_row(x_row(wanted(r)), &plan.final_norm, eps, o);
                        }
                    });
                }
            }
        };
        crate::kernels::team::run("decode step", n_stages, &job)?;
        drop(tables);
        drop(guards);
        STEPS.fetch_add(1, Ordering::Relaxed);
        let out = out.into_vec();
        Ok(Some(match &plan.lm_head {
            Some(head) => StepOut::Logits(Logits::new(out, m, head.out)),
            None => StepOut::Hidden(Tensor::from_vec(out, (m, c), self.embed_tokens.device())?),
        }))
    }
}
