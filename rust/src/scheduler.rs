//! The iteration-level scheduler: many requests share one running batch, joining and leaving it at every step.
//!
//! A step runs the model once on a flattened batch of tokens: one token for every sequence that is decoding,
//! first, then chunks of prompts under what is left of the step's token budget (`max_batch_tokens`), so a long
//! prompt never stalls the streams already running (as vLLM and llama-server schedule). Keys and values live in
//! a pool of blocks (nn::paged); a new request first takes the blocks of its longest cached prefix (automatic
//! prefix caching), then computes the rest. When the pool is full, waiting requests wait; a decoding sequence that
//! needs a block preempts the youngest running one, which gives its blocks back and is recomputed later from its
//! tokens (its random stream and text go on where they were, so its output does not change).
//!
//! Each sequence has its own sampling parameters, seed, stop ids and strings, logprobs and limits. A request with
//! n choices is one sequence until its prompt is computed; then it forks into n that share the prompt's blocks.
//! Whatever else is in the batch, a sequence's rows are computed by the same kernels row by row, so a request
//! gives the same tokens alone or among others.
//!
//! `Handle` takes requests and aborts from any thread (they wait in an inbox until the next step); `Scheduler`
//! runs the steps.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};


use crate::constraint::{self, Constraint, Masked};
use crate::error::{Error, Result};
use crate::generate::{finalize_text, held_back, random_seed, stop_strings_hit, token_logprob, Finish, GenParams, TextState, TokenLogprob};
use crate::model::Model;
use crate::nn::{KvPool, PagedSeq};
use crate::sampling::{next_token, History, Rng};
use rayon::prelude::*;
use crate::tokenizer::Tokenizer;

/// How a scheduler shares the machine.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// positions per KV block
    pub block_size: usize,
    /// KV cache size in positions (rounded up to whole blocks)
    pub kv_tokens: usize,
    /// tokens per step, at most (decoding tokens first, then prompt chunks)
    pub max_batch_tokens: usize,
    /// sequences in the running batch, at most
    pub max_seqs: usize,
}

impl SchedulerConfig {
    /// Bytes one position of the KV cache takes (every layer's keys and values).
    pub fn bytes_per_token(model: &Model) -> usize {
        let (width, dtype) = model.kv_width();
        model.cfg.num_layers * width * 2 * dtype.size_in_bytes()
    }

    /// The default KV cache: a quarter of the memory available now (at least one full context, at most 2^20
    /// positions). Pool memory is only committed as positions are first used.
    pub fn default_kv_tokens(model: &Model) -> usize {
        let per = Self::bytes_per_token(model).max(1);
        let avail = available_memory().unwrap_or(8 << 30);
        (avail / 4 / per).clamp(model.cfg.context_length().min(1 << 20), 1 << 20)
    }

    pub fn new(model: &Model, kv_tokens: Option<usize>, max_batch_tokens: usize, max_seqs: usize) -> Result<Self> {
        if max_batch_tokens == 0 || max_seqs == 0 {
            return Err(Error::arg(format!("max_batch_tokens and max_seqs must be >= 1, got {max_batch_tokens} and {max_seqs}")));
        }
        let kv_tokens = kv_tokens.unwrap_or_else(|| Self::default_kv_tokens(model));
        if kv_tokens < 2 {
            return Err(Error::arg(format!("kv_cache: {kv_tokens} positions cannot hold a prompt and one new token")));
        }
        Ok(Self { block_size: 16, kv_tokens, max_batch_tokens, max_seqs })
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What a step produced for one choice of one request: the text safe to show now (never part of a stop string,
/// never half a character), the new token ids and their logprobs, and the finish reason once it is done.
#[derive(Debug, Clone)]
pub struct Delta {
    pub request: u64,
    pub choice: usize,
    pub text: String,
    pub tokens: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<Finish>,
    pub prompt_tokens: usize,
    /// prompt tokens whose keys and values came from the prefix cache
    pub cached_tokens: usize,
    /// why this sequence failed (its grammar or its text), the others going on; set with `finish`
    pub error: Option<String>,
}

/// One choice of one request.
struct Seq {
    request: u64,
    choice: usize,
    /// arrival order (choices of a request share it): the youngest is preempted first
    order: u64,
    params: Arc<GenParams>,
    stops: Arc<HashSet<u32>>,
    seed: u64,
    /// prompt then generated tokens
    tokens: Vec<u32>,
    prompt_len: usize,
    /// most new tokens: max_new_tokens capped by the context
    cap: usize,
    /// positions whose keys and values are in `blocks`
    computed: usize,
    blocks: Vec<u32>,
    /// leading blocks registered in the prefix cache
    registered: usize,
    /// choices still to fork off once the prompt is computed (n - 1, then 0)
    fork: usize,
    admitted: bool,
    cached_tokens: usize,
    hist: History,
    rng: Rng,
    text: TextState,
    /// tokens[..sent] went out in a delta already
    sent: usize,
    pending_logprobs: Vec<TokenLogprob>,
    /// the grammar state of a constrained request (crate::constraint)
    constraint: Option<Box<Constraint>>,
    /// set by `fail`, sent with the last delta
    error: Option<String>,
}

impl Seq {
    fn remaining(&self) -> usize {
        self.tokens.len() - self.computed
    }

    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// Requests in, aborts in, from any thread.
pub struct Handle {
    model: Arc<Model>,
    capacity_blocks: usize,
    block_size: usize,
    next_id: AtomicU64,
    adds: Mutex<Vec<Seq>>,
    aborts: Mutex<Vec<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Handle {
    /// Check a request and queue it for the next step; returns its id and the prompt as it will run (an empty
    /// prompt starts from BOS). `what` names the prompt in errors ("prompt", "prompt 3").
    pub fn add(&self, prompt: Vec<u32>, params: GenParams, what: &str) -> Result<(u64, Vec<u32>)> {
        let (prompt, stops, constraint) = prepare(&self.model, prompt, &params, what)?;
        let need = (prompt.len() + 1).div_ceil(self.block_size);
        if need > self.capacity_blocks {
            return Err(Error::arg(format!(
                "{what} has {} tokens, more than the KV cache holds ({} positions); start with a larger kv_cache",
                prompt.len(),
                self.capacity_blocks * self.block_size - 1
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ctx = self.model.cfg.context_length();
        let seed = params.seed.unwrap_or_else(random_seed);
        let seq = Seq {
            request: id,
            choice: 0,
            order: id,
            seed,
            tokens: prompt.clone(),
            prompt_len: prompt.len(),
            cap: params.max_new_tokens.min(ctx - prompt.len()),
            computed: 0,
            blocks: vec![],
            registered: 0,
            fork: params.n - 1,
            admitted: false,
            cached_tokens: 0,
            hist: History::new(&prompt),
            rng: Rng::new(seed, 0),
            text: TextState::default(),
            sent: prompt.len(),
            pending_logprobs: vec![],
            constraint,
            error: None,
            params: Arc::new(params),
            stops: Arc::new(stops),
        };
        lock(&self.adds).push(seq);
        Ok((id, prompt))
    }

    /// Stop request `id` at the next step and give its blocks back (a request that is already done is ignored).
    pub fn abort(&self, id: u64) {
        lock(&self.aborts).push(id);
    }

    pub fn queued(&self) -> usize {
        lock(&self.adds).len()
    }
}

/// Stop strings per request, at most (OpenAI takes 4; agents send more).
pub const MAX_STOP_STRINGS: usize = 64;
/// Bytes per stop string, at most.
pub const MAX_STOP_BYTES: usize = 1024;
/// Stop token ids per request, at most.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;
/// logit_bias entries per request, at most (OpenAI documents 300; vLLM and llama.cpp set none).
pub const MAX_LOGIT_BIAS: usize = 2048;

/// A request's prompt, stop ids and compiled grammar, checked against the model.
pub(crate) type Prepared = (Vec<u32>, HashSet<u32>, Option<Box<Constraint>>);

pub(crate) fn prepare(model: &Model, prompt: Vec<u32>, params: &GenParams, what: &str) -> Result<Prepared> {
    let cfg = &model.cfg;
    if !model.is_decoder() {
        return Err(Error::arg("this is an encoder model (BERT): use embed(), not logits or generation"));
    }
    if params.n < 1 {
        return Err(Error::arg(format!("n must be >= 1, got {}", params.n)));
    }
    if params.sampling.logit_bias.len() > MAX_LOGIT_BIAS {
        return Err(Error::arg(format!("logit_bias: {} entries, at most {MAX_LOGIT_BIAS} are taken", params.sampling.logit_bias.len())));
    }
    params.sampling.validate(cfg.vocab_size)?;
    if let Some(bad) = params.stop_token_ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(Error::arg(format!("stop_token_ids: {bad} is outside the vocabulary of {}", cfg.vocab_size)));
    }
    if params.stop.iter().any(String::is_empty) {
        return Err(Error::arg("stop strings must not be empty"));
    }
    if params.stop.len() > MAX_STOP_STRINGS {
        return Err(Error::arg(format!("stop: {} strings, at most {MAX_STOP_STRINGS} are taken", params.stop.len())));
    }
    if let Some(s) = params.stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(Error::arg(format!("stop: a string of {} bytes, at most {MAX_STOP_BYTES} are taken", s.len())));
    }
    if params.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(Error::arg(format!("stop_token_ids: {} ids, at most {MAX_STOP_TOKEN_IDS} are taken", params.stop_token_ids.len())));
    }
    if let Some(l) = params.logprobs.filter(|&l| l > cfg.vocab_size) {
        return Err(Error::arg(format!("logprobs: {l} alternatives asked for from a vocabulary of {}", cfg.vocab_size)));
    }
    let tok = model.tokenizer.as_ref();
    if !params.stop.is_empty() && tok.is_none() {
        return Err(Error::arg("stop strings need a tokenizer; this checkpoint has none"));
    }
    let prompt = if prompt.is_empty() {
        match tok.and_then(|t| t.bos_token_id).or(cfg.bos_token_id) {
            Some(b) => vec![b],
            None => return Err(Error::arg(format!("{what} is empty and the model has no BOS token to start from"))),
        }
    } else {
        prompt
    };
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(Error::arg(format!("{what}: token id {bad} is out of range for a vocabulary of {}", cfg.vocab_size)));
    }
    let ctx = cfg.context_length();
    if prompt.len() >= ctx {
        return Err(Error::arg(format!(
            "{what} has {} tokens, which leaves no room to generate in the model's context of {ctx}",
            prompt.len()
        )));
    }
    let mut stops: HashSet<u32> = params.stop_token_ids.iter().copied().collect();
    if !params.ignore_eos {
        if let Some(t) = tok {
            stops.extend(t.eos_token_ids.iter().copied());
        }
    }
    let constraint = match &params.grammar {
        None => None,
        Some(g) => {
            let t = tok.ok_or_else(|| Error::arg(format!("{} needs a tokenizer; this checkpoint has none", g.name())))?;
            Some(Box::new(Constraint::new(&*t.grammar_factory(cfg.vocab_size)?, g)?))
        }
    };
    Ok((prompt, stops, constraint))
}

/// Counters since the scheduler started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub steps: u64,
    /// prompt tokens of requests admitted (each once), and of those the ones found in the prefix cache
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    /// positions computed (prompt chunks, recomputation and decoding)
    pub computed_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub finished: u64,
    pub aborted: u64,
}

/// Where the scheduler stands now.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    pub block_size: usize,
    pub kv_blocks: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    pub counters: Counters,
}

pub struct Scheduler {
    model: Arc<Model>,
    tok: Option<Arc<Tokenizer>>,
    cfg: SchedulerConfig,
    pool: KvPool,
    handle: Arc<Handle>,
    waiting: VecDeque<Seq>,
    /// in arrival order
    running: Vec<Seq>,
    counters: Counters,
    /// the last step's logits memory, for the next (see nn::Logits)
    logits_buf: Vec<f32>,
}

impl Scheduler {
    pub fn new(model: Arc<Model>, cfg: SchedulerConfig) -> Result<Self> {
        if !model.is_decoder() {
            return Err(Error::arg("this is an encoder model (BERT): use embed(), not logits or generation"));
        }
        let blocks = cfg.kv_tokens.div_ceil(cfg.block_size);
        let (width, dtype) = model.kv_width();
        let pool = KvPool::new(model.cfg.num_layers, blocks, cfg.block_size, width, dtype, &model.device)?;
        let handle = Arc::new(Handle {
            model: model.clone(),
            capacity_blocks: blocks,
            block_size: cfg.block_size,
            next_id: AtomicU64::new(0),
            adds: Mutex::new(vec![]),
            aborts: Mutex::new(vec![]),
        });
        Ok(Self { tok: model.tokenizer.clone(), model, cfg, pool, handle, waiting: VecDeque::new(), running: vec![], counters: Counters::default(), logits_buf: vec![] })
    }

    pub fn handle(&self) -> Arc<Handle> {
        self.handle.clone()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty() || self.handle.queued() > 0
    }

    pub fn stats(&self) -> Stats {
        Stats {
            running: self.running.len(),
            waiting: self.waiting.len() + self.handle.queued(),
            block_size: self.cfg.block_size,
            kv_blocks: self.pool.num_blocks(),
            kv_blocks_used: self.pool.used_blocks(),
            kv_blocks_cached: self.pool.cached_blocks(),
            counters: self.counters,
        }
    }

    /// Take new requests and aborts from the handle. Requests with nothing to generate finish at once.
    fn take_inbox(&mut self, out: &mut Vec<Delta>) {
        let adds = std::mem::take(&mut *lock(&self.handle.adds));
        for s in adds {
            if s.cap == 0 {
                for choice in 0..=s.fork {
                    out.push(Delta {
                        request: s.request,
                        choice,
                        text: String::new(),
                        tokens: vec![],
                        logprobs: vec![],
                        finish: Some(Finish::Length),
                        prompt_tokens: s.prompt_len,
                        cached_tokens: 0,
                        error: None,
                    });
                }
                self.counters.finished += 1;
            } else {
                self.waiting.push_back(s);
            }
        }
        let aborts: HashSet<u64> = std::mem::take(&mut *lock(&self.handle.aborts)).into_iter().collect();
        if aborts.is_empty() {
            return;
        }
        let mut gone = vec![];
        let (keep, drop): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.running).into_iter().partition(|s| !aborts.contains(&s.request));
        self.running = keep;
        gone.extend(drop);
        let (keep, drop): (VecDeque<Seq>, VecDeque<Seq>) = std::mem::take(&mut self.waiting).into_iter().partition(|s| !aborts.contains(&s.request));
        self.waiting = keep;
        gone.extend(drop);
        let mut reqs = HashSet::new();
        for mut s in gone {
            reqs.insert(s.request);
            self.free_blocks(&mut s);
        }
        self.counters.aborted += reqs.len() as u64;
    }

    fn free_blocks(&mut self, s: &mut Seq) {
        for b in s.blocks.drain(..) {
            self.pool.release(b);
        }
        s.computed = 0;
        s.registered = 0;
    }

    /// Give back the youngest running sequence's blocks and queue it to be recomputed.
    fn preempt_youngest(&mut self) {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| (self.running[i].order, self.running[i].choice)) else { return };
        let mut s = self.running.remove(i);
        self.free_blocks(&mut s);
        self.counters.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Blocks for positions up to `upto` of sequence `s`, as many as the pool gives: returns the positions covered.
    fn grow(&mut self, s: &mut Seq, upto: usize) -> usize {
        let bs = self.cfg.block_size;
        while s.blocks.len() * bs < upto {
            match self.pool.alloc() {
                Some(b) => s.blocks.push(b),
                None => break,
            }
        }
        upto.min(s.blocks.len() * bs)
    }

    /// A newly admitted sequence takes the cached blocks of its longest prefix (whole blocks, leaving at least
    /// one token to compute so that the step gives its next-token logits).
    fn take_prefix(&mut self, s: &mut Seq) {
        let bs = self.cfg.block_size;
        let whole = (s.tokens.len() - 1) / bs;
        let mut parent = None;
        for i in 0..whole {
            match self.pool.lookup(parent, &s.tokens[i * bs..(i + 1) * bs]) {
                Some(b) => {
                    self.pool.retain(b);
                    s.blocks.push(b);
                    parent = Some(b);
                }
                None => break,
            }
        }
        s.computed = s.blocks.len() * bs;
        s.registered = s.blocks.len();
        if !s.admitted {
            s.admitted = true;
            s.cached_tokens = s.computed.min(s.prompt_len);
            self.counters.prompt_tokens += s.prompt_len as u64;
            self.counters.cached_prompt_tokens += s.cached_tokens as u64;
            self.pool.stats.queried_tokens += s.prompt_len as u64;
            self.pool.stats.hit_tokens += s.cached_tokens as u64;
        }
    }

    /// This step's work: (index into running, tokens to compute).
    fn plan(&mut self, out: &mut Vec<Delta>) -> Vec<(usize, usize)> {
        let bs = self.cfg.block_size;
        for _ in 0..=self.running.len() + self.waiting.len() {
            // decoding sequences that cross into a new block need one each; preempt until they fit
            loop {
                let need = self.running.iter().filter(|s| s.remaining() == 1 && s.computed + 1 > s.blocks.len() * bs).count();
                if need <= self.pool.available() {
                    break;
                }
                if self.running.len() == 1 {
                    // one sequence fills the whole cache: it ends here
                    let mut s = self.running.pop().expect("one running");
                    s.text.finish = Some(Finish::Length);
                    out.push(self.finish(&mut s));
                    break;
                }
                self.preempt_youngest();
            }
            let mut budget = self.cfg.max_batch_tokens;
            let mut plan = vec![];
            // (taken out of self while the pool hands out blocks to its sequences)
            let mut running = std::mem::take(&mut self.running);
            for (i, s) in running.iter_mut().enumerate() {
                if budget > 0 && s.remaining() == 1 {
                    let upto = s.computed + 1;
                    if self.grow(s, upto) == upto {
                        plan.push((i, 1));
                        budget -= 1;
                    }
                }
            }
            // prompt chunks: running sequences part-way through theirs, then new arrivals
            for (i, s) in running.iter_mut().enumerate() {
                if budget > 0 && s.remaining() > 1 {
                    let upto = s.computed + s.remaining().min(budget);
                    let n = self.grow(s, upto) - s.computed;
                    if n > 0 {
                        plan.push((i, n));
                        budget -= n;
                    }
                }
            }
            self.running = running;
            while budget > 0 && self.running.len() < self.cfg.max_seqs {
                let Some(mut s) = self.waiting.pop_front() else { break };
                if s.blocks.is_empty() {
                    self.take_prefix(&mut s);
                }
                let upto = s.computed + s.remaining().min(budget);
                let n = self.grow(&mut s, upto).saturating_sub(s.computed);
                if n == 0 {
                    self.free_blocks(&mut s);
                    self.waiting.push_front(s);
                    break;
                }
                self.running.push(s);
                plan.push((self.running.len() - 1, n));
                budget -= n;
            }
            if !plan.is_empty() || self.running.is_empty() {
                return plan;
            }
            // every running sequence is stuck part-way through a prompt with the pool full: make room
            self.preempt_youngest();
        }
        vec![]
    }

    /// One step: schedule, run the model once on the batch, sample where a sequence's tokens are all computed.
    /// Returns what each choice produced.
    pub fn step(&mut self) -> Result<Vec<Delta>> {
        let mut out = vec![];
        self.take_inbox(&mut out);
        let plan = self.plan(&mut out);
        if plan.is_empty() {
            return Ok(out);
        }
        self.counters.steps += 1;
        let bs = self.cfg.block_size;
        let total: usize = plan.iter().map(|p| p.1).sum();
        let (mut ids, mut positions, mut slots) = (Vec::with_capacity(total), Vec::with_capacity(total), Vec::with_capacity(total));
        let mut out_rows = vec![];
        let mut logit_of = vec![None; plan.len()];
        for (pi, &(i, n)) in plan.iter().enumerate() {
            let s = &self.running[i];
            let row0 = ids.len();
            for j in s.computed..s.computed + n {
                ids.push(s.tokens[j]);
                positions.push(j as u32);
                slots.push(s.blocks[j / bs] * bs as u32 + (j % bs) as u32);
            }
            if s.computed + n == s.tokens.len() {
                logit_of[pi] = Some(out_rows.len());
                out_rows.push((row0 + n - 1) as u32);
            }
        }
        let logits = {
            let mut row0 = 0;
            let seqs: Vec<PagedSeq> = plan
                .iter()
                .map(|&(i, n)| {
                    let s = &self.running[i];
                    let p = PagedSeq { row0, rows: n, ctx: s.computed + n, blocks: &s.blocks };
                    row0 += n;
                    p
                })
                .collect();
            let step = crate::nn::PagedStep { ids: &ids, positions: &positions, slots: &slots, seqs: &seqs, out_rows: &out_rows };
            self.model.paged_logits(&step, &mut self.pool, std::mem::take(&mut self.logits_buf))?
        };
        self.counters.computed_tokens += total as u64;
        let mut forks = vec![];
        // (taken out of self while they sample; put back before an error goes up, so no sequence is lost)
        let mut running = std::mem::take(&mut self.running);
        // Every sequence draws its token from its own logits and random stream, all at once on the threads (a
        // top-p draw sorts part of the vocabulary: the sequences' draws together rival the forward pass)
        let mut drawn: Vec<Option<Result<Drawn>>> = {
            let mut jobs: Vec<(usize, &mut Seq)> = vec![];
            let mut by_row: Vec<Option<usize>> = vec![None; running.len()];
            for (pi, &(i, _)) in plan.iter().enumerate() {
                by_row[i] = logit_of[pi];
            }
            for (i, s) in running.iter_mut().enumerate() {
                if let Some(r) = by_row[i] {
                    jobs.push((r, s));
                }
            }
            let mut d: Vec<Option<Result<Drawn>>> = (0..logits.len()).map(|_| None).collect();
            let results: Vec<(usize, Result<Drawn>)> =
                jobs.into_par_iter().map(|(r, s)| (r, draw_token(s, logits.row(r)))).collect();
            for (r, t) in results {
                d[r] = Some(t);
            }
            d
        };
        let sampled = (|| -> Result<()> {
            for (pi, &(i, n)) in plan.iter().enumerate() {
                let s = &mut running[i];
                s.computed += n;
                self.register_full_blocks(s);
                if let Some(r) = logit_of[pi] {
                    if s.fork > 0 {
                        forks.extend(self.fork(s, logits.row(r), &mut out)?);
                    }
                    let t = drawn[r].take().expect("every row of logits is drawn from");
                    if let Err(e) = t.and_then(|t| self.take_token(s, t)) {
                        fail(s, e);
                    }
                    out.push(self.delta(s));
                }
            }
            Ok(())
        })();
        self.running = running;
        self.logits_buf = logits.into_buf();
        sampled?;
        // finished sequences leave the batch and give their blocks back (full ones stay cached)
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].text.finish.is_some() {
                let mut s = self.running.remove(i);
                self.free_blocks(&mut s);
                if s.choice == 0 {
                    self.counters.finished += 1;
                }
            } else {
                i += 1;
            }
        }
        for s in forks {
            if s.text.finish.is_some() {
                let mut s = s;
                self.free_blocks(&mut s);
            } else if s.remaining() == 1 {
                self.running.push(s);
            } else {
                self.waiting.push_front(s);
            }
        }
        Ok(out)
    }

    fn register_full_blocks(&mut self, s: &mut Seq) {
        let bs = self.cfg.block_size;
        while s.registered < s.computed / bs {
            let r = s.registered;
            let parent = if r == 0 { None } else { Some(s.blocks[r - 1]) };
            self.pool.register(s.blocks[r], parent, &s.tokens[r * bs..(r + 1) * bs]);
            s.registered += 1;
        }
    }

    /// Choices 1..n of a request whose prompt is now computed: each shares the prompt's full blocks, gets its
    /// own copy of the partial last one, and samples its first token from the same logits with its own stream.
    /// (Without a free block for the copy, a choice recomputes the tail of the prompt later instead.)
    fn fork(&mut self, s: &mut Seq, logits: &[f32], out: &mut Vec<Delta>) -> Result<Vec<Seq>> {
        let bs = self.cfg.block_size;
        let full = s.computed / bs;
        let mut kids = Vec::with_capacity(s.fork);
        for choice in 1..=s.fork {
            let mut k = Seq {
                request: s.request,
                choice,
                order: s.order,
                params: s.params.clone(),
                stops: s.stops.clone(),
                seed: s.seed,
                tokens: s.tokens.clone(),
                prompt_len: s.prompt_len,
                cap: s.cap,
                computed: full * bs,
                blocks: s.blocks[..full].to_vec(),
                registered: s.registered.min(full),
                fork: 0,
                admitted: true,
                cached_tokens: s.cached_tokens,
                hist: s.hist.clone(),
                rng: Rng::new(s.seed, choice as u64),
                text: TextState::default(),
                sent: s.sent,
                pending_logprobs: vec![],
                constraint: s.constraint.clone(),
                error: None,
            };
            for &b in &k.blocks {
                self.pool.retain(b);
            }
            if full * bs < s.computed {
                if let Some(b) = self.pool.alloc() {
                    self.pool.copy_block(s.blocks[full], b)?;
                    k.blocks.push(b);
                    k.computed = s.computed;
                }
            }
            if k.computed == s.computed {
                if let Err(e) = self.sample(&mut k, logits) {
                    fail(&mut k, e);
                }
                out.push(self.delta(&mut k));
            }
            kids.push(k);
        }
        s.fork = 0;
        Ok(kids)
    }

    fn sample(&mut self, s: &mut Seq, logits: &[f32]) -> Result<()> {
        let t = draw_token(s, logits)?;
        self.take_token(s, t)
    }

    /// Append a drawn token to `s`: its text, stop ids and strings, and the length limit.
    fn take_token(&mut self, s: &mut Seq, (token, logprob): Drawn) -> Result<()> {
        let p = s.params.clone();
        if let Some(lp) = logprob {
            s.pending_logprobs.push(lp);
        }
        s.tokens.push(token);
        s.hist.push(token);
        self.counters.generated_tokens += 1;
        let grammar_done = match s.constraint.as_mut() {
            Some(c) => {
                c.consume(token)?;
                c.is_stopped()
            }
            None => false,
        };
        if s.stops.contains(&token) {
            s.text.finish = Some(Finish::Stop);
        } else {
            if let Some(tok) = &self.tok {
                if let Some(piece) = s.text.decoder.step(tok, token)? {
                    let before = s.text.text.len();
                    s.text.text.push_str(&piece);
                    stop_strings_hit(&mut s.text, &p.stop, before);
                }
            }
            if s.text.finish.is_none() && grammar_done {
                s.text.finish = Some(Finish::Stop);
            }
            if s.text.finish.is_none() && s.generated() >= s.cap {
                s.text.finish = Some(Finish::Length);
            }
        }
        if s.text.finish.is_some() {
            finalize_text(&mut s.text, self.tok.as_deref(), &p.stop)?;
        }
        Ok(())
    }

    /// What `s` produced since its last delta.
    fn delta(&mut self, s: &mut Seq) -> Delta {
        let t = &mut s.text;
        let end = if t.finish.is_some() { t.text.len() } else { t.text.len() - held_back(&t.text, &s.params.stop) };
        let text = if end > t.streamed { t.text[t.streamed..end].to_string() } else { String::new() };
        t.streamed = t.streamed.max(end);
        let tokens = s.tokens[s.sent..].to_vec();
        s.sent = s.tokens.len();
        Delta {
            request: s.request,
            choice: s.choice,
            text,
            tokens,
            logprobs: std::mem::take(&mut s.pending_logprobs),
            finish: s.text.finish,
            prompt_tokens: s.prompt_len,
            cached_tokens: s.cached_tokens,
            error: s.error.take(),
        }
    }

    /// The last delta of a sequence that ends outside sampling (the cache cannot hold it).
    fn finish(&mut self, s: &mut Seq) -> Delta {
        let p = s.params.clone();
        // the decoder's tail, as at any finish (cannot fail for tokens the decoder took already)
        let _ = finalize_text(&mut s.text, self.tok.as_deref(), &p.stop);
        let d = self.delta(s);
        self.free_blocks(s);
        if s.choice == 0 {
            self.counters.finished += 1;
        }
        d
    }
}

/// End `s` because of `e` (its grammar refused a token, its text could not be decoded): the sequence stops
/// with what it has, its delta carries the error, and the rest of the batch goes on.
fn fail(s: &mut Seq, e: Error) {
    s.error = Some(e.to_string());
    s.text.finish = Some(Finish::Stop);
}

/// A sequence's next token, and its logprob entry when asked for.
type Drawn = (u32, Option<TokenLogprob>);

/// Draw the next token of `s` from its logits (advancing its random stream): thread-safe per sequence. A
/// constrained sequence draws from its grammar's mask, or takes the one token the grammar allows without a
/// draw (crate::constraint); the grammar takes the token in `take_token`.
fn draw_token(s: &mut Seq, logits: &[f32]) -> Result<Drawn> {
    let token = match s.constraint.as_mut() {
        None => next_token(logits, &s.hist, &s.params.sampling, &mut s.rng),
        Some(c) => match constraint::apply(&c.mask()?, logits)? {
            Masked::Forced(t) => t,
            Masked::Logits(x) => next_token(&x, &s.hist, &s.params.sampling, &mut s.rng),
        },
    };
    Ok((token, s.params.logprobs.map(|k| token_logprob(logits, token, k))))
}
