//! Text generation: batched decoding with a KV cache, stop ids and stop strings, n choices, logprobs, streaming.
//!
//! Each prompt is prefilled alone (so its numbers do not depend on what else is in the batch), then the rows of all
//! prompts × choices decode together: the caches are left-padded to a common length and a mask hides the padding.
//! Each row has its own random stream (seed, choice index), so a request gives the same tokens alone or batched.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::nn::Cache;
use crate::sampling::{log_softmax, next_token, History, Rng, LogitsParams};
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_new_tokens: usize,
    pub sampling: LogitsParams,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub seed: Option<u64>,
    pub n: usize,
    /// Return the chosen token's log-probability and this many top alternatives (raw model distribution).
    pub logprobs: Option<usize>,
}

impl Default for GenParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 16,
            sampling: LogitsParams::default(),
            stop: vec![],
            stop_token_ids: vec![],
            ignore_eos: false,
            seed: None,
            n: 1,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

#[derive(Debug, Clone)]
pub struct Choice {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: Finish,
    pub logprobs: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub prompt_token_ids: Vec<u32>,
    pub choices: Vec<Choice>,
}

/// One row of the batch: a choice of a prompt.
struct Seq {
    prompt: usize,
    prompt_len: usize,
    /// most new tokens this row may make: max_new_tokens capped by the context
    cap: usize,
    /// padding slots on the left of this row's cache
    pad: usize,
    generated: Vec<u32>,
    hist: History,
    rng: Rng,
    decoder: IncrementalDecoder,
    text: String,
    streamed: usize,
    finish: Option<Finish>,
    cut_by_stop_string: bool,
    logprobs: Vec<TokenLogprob>,
}

pub struct Generation {
    model: Arc<Model>,
    tok: Option<Arc<Tokenizer>>,
    params: GenParams,
    prompts: Vec<Vec<u32>>,
    seqs: Vec<Seq>,
    /// rows of the cache / of `logits`, as indices into `seqs`
    active: Vec<usize>,
    cache: Cache,
    /// next-token logits of the active rows [B, V]
    logits: Vec<Vec<f32>>,
    stops: HashSet<u32>,
}

impl Generation {
    pub fn new(model: Arc<Model>, prompts: Vec<Vec<u32>>, params: GenParams) -> Result<Self> {
        let cfg = &model.cfg;
        if params.n < 1 {
            return Err(Error::arg(format!("n must be >= 1, got {}", params.n)));
        }
        if prompts.is_empty() {
            return Err(Error::arg("no prompts given"));
        }
        params.sampling.validate(cfg.vocab_size)?;
        if let Some(bad) = params.stop_token_ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::arg(format!("stop_token_ids: {bad} is outside the vocabulary of {}", cfg.vocab_size)));
        }
        if params.stop.iter().any(String::is_empty) {
            return Err(Error::arg("stop strings must not be empty"));
        }
        let tok = model.tokenizer.clone();
        if !params.stop.is_empty() && tok.is_none() {
            return Err(Error::arg("stop strings need a tokenizer; this checkpoint has none"));
        }
        let bos = tok.as_ref().and_then(|t| t.bos_token_id).or(cfg.bos_token_id);
        let ctx = cfg.context_length();
        let mut prompts_ok = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.into_iter().enumerate() {
            let what = if i == 0 { "prompt".to_string() } else { format!("prompt {i}") };
            let p = if p.is_empty() {
                match bos {
                    Some(b) => vec![b],
                    None => return Err(Error::arg(format!("{what} is empty and the model has no BOS token to start from"))),
                }
            } else {
                p
            };
            if let Some(bad) = p.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::arg(format!("{what}: token id {bad} is out of range for a vocabulary of {}", cfg.vocab_size)));
            }
            if p.len() >= ctx {
                return Err(Error::arg(format!(
                    "{what} has {} tokens, which leaves no room to generate in the model's context of {ctx}",
                    p.len()
                )));
            }
            prompts_ok.push(p);
        }
        let mut stops: HashSet<u32> = params.stop_token_ids.iter().copied().collect();
        if !params.ignore_eos {
            if let Some(t) = &tok {
                stops.extend(t.eos_token_ids.iter().copied());
            }
        }
        let seed = params.seed.unwrap_or_else(random_seed);
        let max_len = prompts_ok.iter().map(Vec::len).max().unwrap_or(0);
        let mut seqs = Vec::new();
        let mut caches = Vec::new();
        let mut logits = Vec::new();
        for (pi, p) in prompts_ok.iter().enumerate() {
            // Prefill the prompt once, alone; its n choices share the result.
            let mut cache = model.new_cache();
            let ids = Tensor::new(p.as_slice(), &model.device)?.unsqueeze(0)?;
            let pos = crate::nn::positions(1, p.len(), 0, &model.device)?;
            let hidden = model.forward_last(&ids, &pos, None, &mut cache)?; // [1, 1, C]
            let last = model.lm_head(&hidden)?.flatten_all()?.to_vec1::<f32>()?;
            for c in 0..params.n {
                seqs.push(Seq {
                    prompt: pi,
                    prompt_len: p.len(),
                    cap: params.max_new_tokens.min(ctx - p.len()),
                    pad: max_len - p.len(),
                    generated: vec![],
                    hist: History::new(p),
                    rng: Rng::new(seed, c as u64),
                    decoder: IncrementalDecoder::new(true),
                    text: String::new(),
                    streamed: 0,
                    finish: None,
                    cut_by_stop_string: false,
                    logprobs: vec![],
                });
                caches.push(cache.clone());
                logits.push(last.clone());
            }
        }
        let cache = merge_left_padded(&caches, max_len)?;
        let active = (0..seqs.len()).collect();
        let mut g = Self { model, tok, params, prompts: prompts_ok, seqs, active, cache, logits, stops };
        // max_new_tokens = 0: nothing to generate
        for s in g.seqs.iter_mut() {
            if s.cap == 0 {
                s.finish = Some(Finish::Length);
            }
        }
        g.drop_finished()?;
        Ok(g)
    }

    pub fn is_done(&self) -> bool {
        self.active.is_empty()
    }

    /// Choose one token for every active row, then run the model on them. Returns false once all rows are done.
    pub fn step(&mut self) -> Result<bool> {
        if self.active.is_empty() {
            return Ok(false);
        }
        let mut fed = Vec::with_capacity(self.active.len());
        for (row, &si) in self.active.iter().enumerate() {
            let logits = &self.logits[row];
            let s = &mut self.seqs[si];
            let token = next_token(logits, &s.hist, &self.params.sampling, &mut s.rng);
            if let Some(k) = self.params.logprobs {
                s.logprobs.push(token_logprob(logits, token, k));
            }
            s.generated.push(token);
            s.hist.push(token);
            if self.stops.contains(&token) {
                s.finish = Some(Finish::Stop);
            } else {
                if let Some(tok) = &self.tok {
                    if let Some(piece) = s.decoder.step(tok, token)? {
                        let before = s.text.len();
                        s.text.push_str(&piece);
                        check_stop_strings(s, &self.params.stop, before);
                    }
                }
                if s.finish.is_none() && s.generated.len() >= s.cap {
                    s.finish = Some(Finish::Length);
                }
            }
            if s.finish.is_some() {
                finalize_text(s, self.tok.as_deref(), &self.params.stop)?;
            }
            fed.push(token);
        }
        // rows that just finished leave the batch before the next forward pass
        let keep = self.drop_finished()?;
        if self.active.is_empty() {
            return Ok(false);
        }
        if keep.len() != fed.len() {
            fed = keep.iter().map(|&r| fed[r]).collect();
        }
        self.forward_step(&fed)?;
        Ok(true)
    }

    fn forward_step(&mut self, fed: &[u32]) -> Result<()> {
        let dev = self.model.device.clone();
        let dev = &dev;
        let b = self.active.len();
        let tk = self.cache.len() + 1;
        let ids = Tensor::from_vec(fed.to_vec(), (b, 1), dev)?;
        let pos: Vec<u32> = self
            .active
            .iter()
            .map(|&si| (self.seqs[si].prompt_len + self.seqs[si].generated.len() - 1) as u32)
            .collect();
        let pos = Tensor::from_vec(pos, (b, 1), dev)?;
        let mask = if self.active.iter().any(|&si| self.seqs[si].pad > 0) {
            let m: Vec<f32> = self
                .active
                .iter()
                .flat_map(|&si| {
                    let pad = self.seqs[si].pad;
                    (0..tk).map(move |j| if j < pad { f32::NEG_INFINITY } else { 0.0 })
                })
                .collect();
            Some(Tensor::from_vec(m, (b, 1, 1, tk), dev)?.to_dtype(self.cache_dtype())?)
        } else {
            None
        };
        let hidden = self.model.forward(&ids, &pos, mask.as_ref(), &mut self.cache)?;
        let logits = self.model.lm_head(&hidden)?.squeeze(1)?.to_dtype(DType::F32)?; // [B, V]
        self.logits = logits.to_vec2()?;
        Ok(())
    }

    fn cache_dtype(&self) -> DType {
        match self.cache.layers.first() {
            Some(Some((k, _))) => k.dtype(),
            _ => DType::F32,
        }
    }

    /// Take finished rows out of the batch (active rows, their cache rows and logits); returns the positions
    /// (in the old batch) of the rows that stay.
    fn drop_finished(&mut self) -> Result<Vec<usize>> {
        let keep: Vec<usize> = (0..self.active.len()).filter(|&r| self.seqs[self.active[r]].finish.is_none()).collect();
        if keep.len() != self.active.len() {
            if keep.is_empty() {
                self.active.clear();
                self.logits.clear();
                return Ok(keep);
            }
            let rows: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
            self.cache = self.cache.select_rows(&rows)?;
            let mut logits = std::mem::take(&mut self.logits);
            self.logits = keep.iter().map(|&r| std::mem::take(&mut logits[r])).collect();
            self.active = keep.iter().map(|&r| self.active[r]).collect();
        }
        Ok(keep)
    }

    /// Text of row `row` that is safe to show now: never part of a stop string, never half a character.
    pub fn take_stream_text(&mut self, row: usize) -> String {
        let s = &mut self.seqs[row];
        let end = if s.finish.is_some() { s.text.len() } else { s.text.len() - held_back(&s.text, &self.params.stop) };
        if end <= s.streamed {
            return String::new();
        }
        let piece = s.text[s.streamed..end].to_string();
        s.streamed = end;
        piece
    }

    pub fn row_finished(&self, row: usize) -> bool {
        self.seqs[row].finish.is_some()
    }

    /// Run to the end, calling `interrupt` between steps (it returns an error to stop, e.g. on Ctrl-C).
    pub fn run(mut self, mut interrupt: impl FnMut() -> Result<()>) -> Result<Vec<Completion>> {
        while self.step()? {
            interrupt()?;
        }
        Ok(self.into_completions())
    }

    pub fn into_completions(self) -> Vec<Completion> {
        let mut out: Vec<Completion> =
            self.prompts.iter().map(|p| Completion { prompt_token_ids: p.clone(), choices: vec![] }).collect();
        let want_lp = self.params.logprobs.is_some();
        for s in self.seqs {
            out[s.prompt].choices.push(Choice {
                text: s.text,
                token_ids: s.generated,
                finish_reason: s.finish.unwrap_or(Finish::Length),
                logprobs: if want_lp { Some(s.logprobs) } else { None },
            });
        }
        out
    }
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let lp = log_softmax(logits);
    let mut order: Vec<usize> = (0..lp.len()).collect();
    let k = k.min(lp.len());
    if k > 0 {
        order.select_nth_unstable_by(k - 1, |&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    }
    let mut top: Vec<(u32, f64)> = order[..k].iter().map(|&i| (i as u32, lp[i])).collect();
    top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    TokenLogprob { token, logprob: lp[token as usize], top }
}

/// Cut the text at the first stop string that the text added since byte `before` completes.
fn check_stop_strings(s: &mut Seq, stops: &[String], before: usize) {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    if longest == 0 {
        return;
    }
    let mut start = before.saturating_sub(longest - 1);
    while !s.text.is_char_boundary(start) {
        start -= 1;
    }
    let hit = stops.iter().filter_map(|st| s.text[start..].find(st.as_str()).map(|p| start + p)).min();
    if let Some(p) = hit {
        s.text.truncate(p);
        s.finish = Some(Finish::Stop);
        s.cut_by_stop_string = true;
    }
}

/// Once a row is finished: flush what the decoder still holds (the tail of a character; an EOS id is never fed
/// to it), unless a stop string cut the text, and look for a stop string once more.
fn finalize_text(s: &mut Seq, tok: Option<&Tokenizer>, stops: &[String]) -> crate::Result<()> {
    if s.cut_by_stop_string {
        return Ok(());
    }
    if let Some(tok) = tok {
        let rest = s.decoder.finish(tok)?;
        if !rest.is_empty() {
            let before = s.text.len();
            s.text.push_str(&rest);
            check_stop_strings(s, stops, before);
        }
    }
    Ok(())
}

/// Bytes at the end of `text` that could be the start of a stop string (held back from a stream).
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for st in stops {
        for (k, _) in st.char_indices().skip(1) {
            if k > hold && text.ends_with(&st[..k]) {
                hold = k;
            }
        }
    }
    hold
}

/// Stack per-prompt caches [1, Hkv, L_i, D] into one [N, Hkv, max_len, D], padding each on the left.
fn merge_left_padded(caches: &[Cache], max_len: usize) -> Result<Cache> {
    let layers = caches[0].layers.len();
    let mut out = Cache::new(layers);
    for l in 0..layers {
        let mut ks = Vec::with_capacity(caches.len());
        let mut vs = Vec::with_capacity(caches.len());
        for c in caches {
            let (k, v) = c.layers[l].as_ref().ok_or_else(|| Error::arg("empty cache"))?;
            let pad = max_len - k.dims()[2];
            ks.push(if pad > 0 { k.pad_with_zeros(2, pad, 0)? } else { k.clone() });
            vs.push(if pad > 0 { v.pad_with_zeros(2, pad, 0)? } else { v.clone() });
        }
        out.layers[l] = Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_prefixes() {
        let stops = vec!["###".to_string(), "END".to_string()];
        assert_eq!(held_back("hello #", &stops), 1);
        assert_eq!(held_back("hello ##", &stops), 2);
        assert_eq!(held_back("hello EN", &stops), 2);
        assert_eq!(held_back("hello", &stops), 0);
    }
}
