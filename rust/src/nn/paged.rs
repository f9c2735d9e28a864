//! The paged KV cache: keys and values of every running sequence in one pool of fixed-size blocks, and the
//! automatic prefix cache over those blocks.
//!
//! Per layer the pool is two arrays [num_blocks · block_size, Hkv·D] (slot s = block · block_size + offset), so
//! the keys of a run of consecutive positions inside one block are one contiguous piece: writing a step's keys is
//! one copy per sequence and layer, and attention reads a block's keys for a head at a fixed stride. A sequence
//! owns a list of blocks (its block table); sequences of any length share the pool.
//!
//! Prefix caching: a full block whose keys and values are computed is registered under its key (the block
//! before it in the sequence, and its own tokens). The key is exact, not a hash: a block's contents depend on
//! every token before it, and its parent block stands for all of those. A sequence that starts with the same
//! tokens finds the blocks and takes a reference instead of computing them. Blocks no sequence references but
//! that hold a registered prefix stay cached until the pool needs them (least recently released first); when one
//! is evicted, the blocks registered after it (its children, which no sequence can be using either) go with it.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};
use crate::kernels::attention::Pool;
use crate::kernels::huge::Buf;
use crate::ops;

/// No parent: the first block of a sequence.
const ROOT: u32 = u32::MAX;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    parent: u32,
    tokens: Box<[u32]>,
}

/// Counters of the prefix cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrefixStats {
    /// prompt tokens looked up / found in cached blocks
    pub queried_tokens: u64,
    pub hit_tokens: u64,
    pub evicted_blocks: u64,
}

/// Keys and values of every layer: f32 or f16 arrays in memory on the CPU (which the kernels read and write in
/// place), tensors elsewhere.
enum Store {
    Host { k: Vec<Buf<f32>>, v: Vec<Buf<f32>> },
    HostF16 { k: Vec<Buf<f16>>, v: Vec<Buf<f16>> },
    Device { k: Vec<Tensor>, v: Vec<Tensor> },
}

/// Every layer's keys and values [S, Hkv·D] in memory, to write in place: (keys, values) by layer.
pub enum HostKv<'a> {
    F32(&'a mut [Buf<f32>], &'a mut [Buf<f32>]),
    F16(&'a mut [Buf<f16>], &'a mut [Buf<f16>]),
}

/// One layer's keys and values [S, Hkv·D], as `KvPool::layer` lends them.
#[derive(Clone, Copy)]
pub enum LayerKv<'a> {
    /// arrays in memory, as the CPU kernel reads them
    Host(Pool<'a>),
    Device { k: &'a Tensor, v: &'a Tensor },
}

pub struct KvPool {
    pub block_size: usize,
    num_blocks: usize,
    width: usize,
    store: Store,
    refs: Vec<u32>,
    /// blocks holding nothing
    free: Vec<u32>,
    key_of: Vec<Option<BlockKey>>,
    cached: HashMap<BlockKey, u32>,
    children: Vec<Vec<u32>>,
    /// unreferenced blocks that hold a registered prefix, by the tick they were released at
    lru: BTreeMap<u64, u32>,
    released_at: Vec<u64>,
    tick: u64,
    pub stats: PrefixStats,
}

impl KvPool {
    /// A pool of `num_blocks` blocks of `block_size` positions for `layers` layers of `width` = Hkv·D values.
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, width: usize, dtype: DType, device: &Device) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(Error::arg(format!("kv cache: need at least one block of at least one position, got {num_blocks} × {block_size}")));
        }
        if num_blocks >= ROOT as usize {
            return Err(Error::arg(format!("kv cache: {num_blocks} blocks is too many")));
        }
        let slots = num_blocks * block_size;
        let store = if device.is_cpu() && dtype == DType::F32 {
            // in huge pages (kernels/huge.rs), where a decode step at a long context reads its keys and values at
            // the rate of the weights; space never held is the mapping's own zeros, so pages no sequence reaches
            // are never touched
            let zeros = || Buf::<f32>::zeroed(slots * width);
            Store::Host { k: (0..layers).map(|_| zeros()).collect(), v: (0..layers).map(|_| zeros()).collect() }
        } else if device.is_cpu() && dtype == DType::F16 {
            let zeros = || Buf::<f16>::zeroed(slots * width);
            Store::HostF16 { k: (0..layers).map(|_| zeros()).collect(), v: (0..layers).map(|_| zeros()).collect() }
        } else {
            let zeros = || Tensor::zeros((slots, width), dtype, device);
            let k = (0..layers).map(|_| zeros()).collect::<candle_core::Result<Vec<_>>>()?;
            let v = (0..layers).map(|_| zeros()).collect::<candle_core::Result<Vec<_>>>()?;
            Store::Device { k, v }
        };
        Ok(Self {
            block_size,
            num_blocks,
            width,
            store,
            refs: vec![0; num_blocks],
            free: (0..num_blocks as u32).rev().collect(),
            key_of: vec![None; num_blocks],
            cached: HashMap::new(),
            children: vec![vec![]; num_blocks],
            lru: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            tick: 0,
            stats: PrefixStats::default(),
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks some sequence references.
    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len() - self.lru.len()
    }

    /// Unreferenced blocks kept for their cached prefix (reclaimed when needed).
    pub fn cached_blocks(&self) -> usize {
        self.lru.len()
    }

    /// Blocks `alloc` can still hand out.
    pub fn available(&self) -> usize {
        self.free.len() + self.lru.len()
    }

    /// Values per slot (Hkv·D).
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn layer(&self, i: usize) -> LayerKv<'_> {
        match &self.store {
            Store::Host { k, v } => LayerKv::Host(Pool::F32(&k[i], &v[i])),
            Store::HostF16 { k, v } => LayerKv::Host(Pool::F16(&k[i], &v[i])),
            Store::Device { k, v } => LayerKv::Device { k: &k[i], v: &v[i] },
        }
    }

    /// Every layer's key and value arrays, to be written in place (None off the CPU).
    pub fn host_mut(&mut self) -> Option<HostKv<'_>> {
        match &mut self.store {
            Store::Host { k, v } => Some(HostKv::F32(k, v)),
            Store::HostF16 { k, v } => Some(HostKv::F16(k, v)),
            Store::Device { .. } => None,
        }
    }

    /// A block for one sequence (reference count 1): an empty one, else the least recently used cached one.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.free.is_empty() {
            let (_, b) = self.lru.pop_first()?;
            self.evict(b);
        }
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Take `b`'s cached prefix, and that of every block registered after it, out of the cache; those no sequence
    /// references go onto the free list. (Every sequence that holds a block holds its parent too, as prefixes are
    /// looked up from the start, so `b`'s descendants are unreferenced; they are unregistered in any case, as a key
    /// naming a reused block as its parent would be wrong.)
    fn evict(&mut self, b: u32) {
        let mut stack = vec![b];
        while let Some(x) = stack.pop() {
            if let Some(key) = self.key_of[x as usize].take() {
                self.cached.remove(&key);
                if key.parent != ROOT && key.parent != b {
                    self.children[key.parent as usize].retain(|&c| c != x);
                }
            }
            stack.append(&mut self.children[x as usize]);
            if self.refs[x as usize] == 0 {
                if x != b {
                    self.lru.remove(&self.released_at[x as usize]);
                }
                self.stats.evicted_blocks += 1;
                self.free.push(x);
            }
        }
    }

    /// One more sequence uses block `b`.
    pub fn retain(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.lru.remove(&self.released_at[b as usize]);
        }
        self.refs[b as usize] += 1;
    }

    /// A sequence no longer uses block `b`.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released more often than taken");
        *r -= 1;
        if *r == 0 {
            if self.key_of[b as usize].is_some() {
                self.tick += 1;
                self.released_at[b as usize] = self.tick;
                self.lru.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// The cached block holding `tokens` after `parent` (None: at the start of a sequence).
    pub fn lookup(&self, parent: Option<u32>, tokens: &[u32]) -> Option<u32> {
        let key = BlockKey { parent: parent.unwrap_or(ROOT), tokens: tokens.into() };
        self.cached.get(&key).copied()
    }

    /// Register full, computed block `b` as holding `tokens` after `parent`. A prefix cached already (in another
    /// block) stays where it is.
    pub fn register(&mut self, b: u32, parent: Option<u32>, tokens: &[u32]) {
        debug_assert_eq!(tokens.len(), self.block_size);
        if self.key_of[b as usize].is_some() {
            return;
        }
        let key = BlockKey { parent: parent.unwrap_or(ROOT), tokens: tokens.into() };
        if self.cached.contains_key(&key) {
            return;
        }
        if let Some(p) = parent {
            self.children[p as usize].push(b);
        }
        self.cached.insert(key.clone(), b);
        self.key_of[b as usize] = Some(key);
    }

    /// Write rows of `k`, `v` [N, Hkv·D] to the pool slots `slots` (one per row) of layer `layer`; runs of
    /// consecutive slots are one copy each.
    pub fn write(&mut self, layer: usize, slots: &[u32], k: &Tensor, v: &Tensor) -> Result<()> {
        let w = self.width;
        if let Store::Device { k: pk, v: pv } = &self.store {
            let (pk, pv) = (&pk[layer], &pv[layer]);
            let mut r = 0;
            while r < slots.len() {
                let mut e = r + 1;
                while e < slots.len() && slots[e] == slots[e - 1] + 1 {
                    e += 1;
                }
                pk.slice_set(&k.narrow(0, r, e - r)?.contiguous()?, 0, slots[r] as usize)?;
                pv.slice_set(&v.narrow(0, r, e - r)?.contiguous()?, 0, slots[r] as usize)?;
                r = e;
            }
            return Ok(());
        }
        let rows = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?) };
        let (kr, vr) = (rows(k)?, rows(v)?);
        if kr.len() != slots.len() * w || vr.len() != slots.len() * w {
            return Err(Error::arg(format!("kv cache: {} rows of {w} for {} slots", kr.len() / w.max(1), slots.len())));
        }
        for (r, &slot) in slots.iter().enumerate() {
            let (at, row) = (slot as usize * w, r * w..(r + 1) * w);
            match &mut self.store {
                Store::Host { k: pk, v: pv } => {
                    pk[layer][at..at + w].copy_from_slice(&kr[row.clone()]);
                    pv[layer][at..at + w].copy_from_slice(&vr[row]);
                }
                Store::HostF16 { k: pk, v: pv } => {
                    // rounded to nearest (even), as the decode team's writes round them
                    pk[layer][at..at + w].convert_from_f32_slice(&kr[row.clone()]);
                    pv[layer][at..at + w].convert_from_f32_slice(&vr[row]);
                }
                Store::Device { .. } => unreachable!("written above"),
            }
        }
        Ok(())
    }

    /// Copy block `src`'s keys and values (every layer) into block `dst`.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let bs = self.block_size;
        match &mut self.store {
            Store::Host { k, v } => copy_host_block(k.iter_mut().chain(v.iter_mut()), bs * self.width, src, dst),
            Store::HostF16 { k, v } => copy_host_block(k.iter_mut().chain(v.iter_mut()), bs * self.width, src, dst),
            Store::Device { k, v } => {
                for (pk, pv) in k.iter().zip(v.iter()) {
                    pk.slice_set(&pk.narrow(0, src as usize * bs, bs)?.copy()?, 0, dst as usize * bs)?;
                    pv.slice_set(&pv.narrow(0, src as usize * bs, bs)?.copy()?, 0, dst as usize * bs)?;
                }
            }
        }
        Ok(())
    }
}

/// Block `src` of every array into block `dst` (blocks of `n` values).
fn copy_host_block<'a, T: bytemuck::Pod + 'a>(bufs: impl Iterator<Item = &'a mut Buf<T>>, n: usize, src: u32, dst: u32) {
    for buf in bufs {
        buf.copy_within(src as usize * n..(src as usize + 1) * n, dst as usize * n);
    }
}

/// One sequence of a flattened (ragged) batch, as attention sees it: its queries are rows row0..row0+rows of the
/// batch, at the last `rows` of its `ctx` positions; its keys and values for positions 0..ctx are in `blocks`.
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    pub row0: usize,
    pub rows: usize,
    pub ctx: usize,
    pub blocks: &'a [u32],
}

/// One step of a flattened (ragged) batch of N tokens from many sequences: ids and positions [N], the pool slots
/// this step's keys and values go to [N], the sequences (their rows of the batch and their blocks), and the rows
/// whose next token is wanted.
#[derive(Debug, Clone, Copy)]
pub struct PagedStep<'a> {
    pub ids: &'a [u32],
    pub positions: &'a [u32],
    pub slots: &'a [u32],
    pub seqs: &'a [PagedSeq<'a>],
    pub out_rows: &'a [u32],
}

/// The logits of a step's wanted rows, [M][V] in one array. Its memory is handed back to the next step
/// (`into_buf`): at a batch of 64 and a 49k-token vocabulary a step's logits are 12.6 MB, and a fresh array's
/// page faults and zeroing, then a copy per row, took a tenth of a step.
#[derive(Debug, Default)]
pub struct Logits {
    data: Vec<f32>,
    vocab: usize,
}

impl Logits {
    /// `data` holds rows of `vocab` values (any rows past `rows` are ignored).
    pub fn new(mut data: Vec<f32>, rows: usize, vocab: usize) -> Self {
        data.truncate(rows * vocab);
        assert_eq!(data.len(), rows * vocab, "logits: {rows} rows of {vocab} values");
        Self { data, vocab }
    }

    /// Rows (wanted positions) in the step.
    pub fn len(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }

    /// The memory, for the next step's logits.
    pub fn into_buf(self) -> Vec<f32> {
        self.data
    }
}

/// Causal attention of a flattened batch over the pool: q [1, H, N, D] (the batch's N tokens) -> [1, H, N, D].
/// `window`, `softcap` and `scale` as in ops::attention_with. Rows of sequences with `rows` 0 are absent (N counts
/// only the others).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    kv: LayerKv,
    seqs: &[PagedSeq],
    block_size: usize,
    hkv: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    if let LayerKv::Host(pool) = kv {
        if let Some(y) = crate::kernels::attention::paged(q, pool, seqs, block_size, hkv, scale, window, softcap)? {
            return Ok(y);
        }
    }
    attention_gathered(q, kv, seqs, block_size, hkv, scale, window, softcap)
}

/// `attention` by gathering each sequence's keys and values into a contiguous [1, Hkv, ctx, D] and calling
/// ops::attention_with: every device and dtype, and the plain twin the CPU kernel is checked against.
#[allow(clippy::too_many_arguments)]
pub fn attention_gathered(
    q: &Tensor,
    kv: LayerKv,
    seqs: &[PagedSeq],
    block_size: usize,
    hkv: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (_, _, _, d) = q.dims4()?;
    let host;
    let (k, v) = match kv {
        LayerKv::Device { k, v } => (k, v),
        LayerKv::Host(Pool::F32(k, v)) => {
            let rows = k.len() / (hkv * d).max(1);
            host = (Tensor::from_slice(k, (rows, hkv * d), q.device())?, Tensor::from_slice(v, (rows, hkv * d), q.device())?);
            (&host.0, &host.1)
        }
        LayerKv::Host(Pool::F16(k, v)) => {
            let rows = k.len() / (hkv * d).max(1);
            let f32s = |p: &[f16]| -> Result<Tensor> { Ok(Tensor::from_slice(p, (rows, hkv * d), q.device())?.to_dtype(DType::F32)?) };
            host = (f32s(k)?, f32s(v)?);
            (&host.0, &host.1)
        }
    };
    let mut out = Vec::with_capacity(seqs.len());
    for s in seqs.iter().filter(|s| s.rows > 0) {
        let slots: Vec<u32> = (0..s.ctx).map(|j| s.blocks[j / block_size] * block_size as u32 + (j % block_size) as u32).collect();
        let idx = Tensor::new(slots.as_slice(), k.device())?;
        let gather = |pool: &Tensor| -> Result<Tensor> {
            Ok(pool.index_select(&idx, 0)?.reshape((1, s.ctx, hkv, d))?.transpose(1, 2)?.contiguous()?)
        };
        let qs = q.narrow(2, s.row0, s.rows)?;
        out.push(ops::attention_with(&qs, &gather(k)?, &gather(v)?, true, None, Some(scale), window, softcap)?);
    }
    if out.is_empty() {
        let (_, h, _, _) = q.dims4()?;
        return Ok(Tensor::zeros((1, h, 0, d), q.dtype(), q.device())?);
    }
    Ok(Tensor::cat(&out, 2)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks are handed out, shared, cached after release, found again by their exact key, and evicted with
    /// their children once the pool needs them.
    #[test]
    fn blocks_and_prefix_cache() {
        let mut p = KvPool::new(1, 4, 2, 3, DType::F32, &Device::Cpu).unwrap();
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        p.register(a, None, &[1, 2]);
        p.register(b, Some(a), &[3, 4]);
        assert_eq!(p.lookup(None, &[1, 2]), Some(a));
        assert_eq!(p.lookup(Some(a), &[3, 4]), Some(b));
        assert_eq!(p.lookup(Some(b), &[3, 4]), None);
        assert_eq!(p.lookup(None, &[3, 4]), None);
        p.retain(a); // a second sequence shares a
        p.release(a);
        p.release(a);
        p.release(b);
        assert_eq!((p.used_blocks(), p.cached_blocks(), p.available()), (0, 2, 4));
        // two empty blocks first, then the oldest cached one (a) is evicted and takes its child b with it
        let got: Vec<u32> = (0..3).map(|_| p.alloc().unwrap()).collect();
        assert!(![a, b].contains(&got[0]) && ![a, b].contains(&got[1]) && [a, b].contains(&got[2]));
        assert_eq!(p.lookup(Some(a), &[3, 4]), None);
        assert_eq!(p.lookup(None, &[1, 2]), None);
        assert_eq!((p.used_blocks(), p.cached_blocks(), p.available()), (3, 0, 1));
        assert!(p.alloc().is_some() && p.alloc().is_none());
    }

    /// The CPU kernel and the gathered plain twin agree on ragged batches of blocks in scrambled order, with
    /// grouped-query heads, a window and soft-capping.
    /// The same with an f16 pool: its values are the f32 ones rounded to nearest.
    #[test]
    fn kernel_matches_gathered() {
        let dev = Device::Cpu;
        let (h, hkv, d, bs) = (6, 2, 16, 4);
        for dtype in [DType::F32, DType::F16] {
            let mut pool = KvPool::new(1, 40, bs, hkv * d, dtype, &dev).unwrap();
            let kv = Tensor::randn(0f32, 1.0, (40 * bs, hkv * d), &dev).unwrap();
            pool.write(0, &(0..160).collect::<Vec<u32>>(), &kv, &(kv.clone() * 0.5).unwrap()).unwrap();
            if let LayerKv::Host(Pool::F16(k, _)) = pool.layer(0) {
                let want: Vec<f32> = kv.flatten_all().unwrap().to_vec1().unwrap();
                assert!(k.iter().zip(&want).all(|(a, b)| *a == f16::from_f32(*b)), "f16 pool: values rounded to nearest");
            } else {
                assert_eq!(dtype, DType::F32, "an f16 pool on the CPU is held in memory");
            }
            // blocks scrambled, and in pool order (consecutive blocks are read as one run)
            for blocks in [(0..40).map(|i| (i * 7) % 40).collect::<Vec<u32>>(), (0..40).collect()] {
                check_ragged(&pool, &blocks, h, hkv, d, bs);
            }
        }
    }

    /// A decode step's job cut into runs of heads (as the decode team claims it) gives every head of every
    /// sequence exactly the numbers of the whole job, whatever the number of runs.
    #[test]
    fn runs_of_heads_give_the_same_numbers() {
        use crate::kernels::attention::Paged;
        let dev = Device::Cpu;
        for (h, hkv, nseq) in [(9usize, 3usize, 1usize), (8, 1, 1), (12, 4, 1), (6, 2, 2), (4, 4, 1)] {
            let (d, bs) = (16, 4);
            let mut pool = KvPool::new(1, 40, bs, hkv * d, DType::F32, &dev).unwrap();
            let kv = Tensor::randn(0f32, 1.0, (40 * bs, hkv * d), &dev).unwrap();
            pool.write(0, &(0..160).collect::<Vec<u32>>(), &kv, &(kv.clone() * 0.5).unwrap()).unwrap();
            let blocks: Vec<u32> = (0..40).map(|i| (i * 7) % 40).collect();
            let seqs: Vec<PagedSeq> = (0..nseq).map(|i| PagedSeq { row0: i, rows: 1, ctx: 30 + 7 * i, blocks: &blocks[10 * i..10 * i + 10] }).collect();
            let q: Vec<f32> = Tensor::randn(0f32, 1.0, (h * nseq * d,), &dev).unwrap().to_vec1().unwrap();
            let LayerKv::Host(kv) = pool.layer(0) else { unreachable!("a CPU pool") };
            let Pool::F32(k, _) = kv else { unreachable!("a pool of f32") };
            let run = |job: &Paged| {
                let mut out = vec![f32::NAN; h * nseq * d];
                let mut seen = 0;
                for p in 0..job.parts() {
                    for t in job.part(p) {
                        // SAFETY: q and out hold [H, N, D]; the pool is the job's; one thread.
                        unsafe { job.run(t, &q, kv, out.as_mut_ptr()) };
                        seen += 1;
                    }
                }
                assert_eq!(seen, job.len());
                out
            };
            let whole = Paged::new(&seqs, nseq, h, hkv, d, k.len(), bs, 0.25, None, None).unwrap();
            let want = run(&whole);
            assert!(want.iter().all(|x| x.is_finite()));
            for parts in [2, 3, 5, 16] {
                let split = Paged::new(&seqs, nseq, h, hkv, d, k.len(), bs, 0.25, None, None).unwrap().split_heads(parts);
                if whole.len() < parts && h > hkv {
                    // runs of ceil(heads / parts) heads each, the last perhaps fewer
                    let per = (h * nseq).div_ceil(parts);
                    assert_eq!(split.parts(), (h * nseq).div_ceil(per), "h {h} hkv {hkv} seqs {nseq}: {parts} runs");
                }
                assert_eq!(run(&split), want, "h {h} hkv {hkv} seqs {nseq}: {parts} runs");
            }
        }
    }

    fn check_ragged(pool: &KvPool, blocks: &[u32], h: usize, hkv: usize, d: usize, bs: usize) {
        let dev = Device::Cpu;
        // (rows, ctx): a decode step, a prefill chunk after a cached prefix, a whole prompt, a long chunk
        let shape = [(1usize, 9usize), (5, 13), (3, 3), (70, 80)];
        let mut seqs = vec![];
        let (mut row0, mut b0) = (0, 0);
        for &(rows, ctx) in &shape {
            let nb = ctx.div_ceil(bs);
            seqs.push(PagedSeq { row0, rows, ctx, blocks: &blocks[b0..b0 + nb] });
            row0 += rows;
            b0 += nb;
        }
        let q = Tensor::randn(0f32, 1.0, (1, h, row0, d), &dev).unwrap();
        for (window, softcap) in [(None, None), (Some(5), None), (None, Some(3.0))] {
            let got = attention(&q, pool.layer(0), &seqs, bs, hkv, 0.25, window, softcap).unwrap();
            let want = attention_gathered(&q, pool.layer(0), &seqs, bs, hkv, 0.25, window, softcap).unwrap();
            let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(diff < 2e-5, "window {window:?} softcap {softcap:?}: max difference {diff}");
        }
    }
}
