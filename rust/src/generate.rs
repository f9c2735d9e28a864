//! Text generation: parameters and results, the text of a choice (stop strings, streaming), and `Generation`,
//! which runs a list of prompts to the end on a scheduler of its own (crate::scheduler: one flattened batch over
//! a paged KV cache).
//!
//! Each row has its own random stream (seed, choice index), so a request gives the same tokens alone or batched.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::sampling::{log_softmax, LogitsParams};
use crate::scheduler::{Scheduler, SchedulerConfig};
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
    /// Constrain the output to a JSON schema, regex or grammar (crate::constraint).
    pub grammar: Option<crate::constraint::Grammar>,
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
            grammar: None,
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

/// The text of one choice as it is generated: decoded piece by piece, cut at stop strings, streamed up to
/// `streamed`.
pub(crate) struct TextState {
    pub decoder: IncrementalDecoder,
    pub text: String,
    pub streamed: usize,
    pub finish: Option<Finish>,
    pub cut_by_stop_string: bool,
}

impl Default for TextState {
    fn default() -> Self {
        Self { decoder: IncrementalDecoder::new(true), text: String::new(), streamed: 0, finish: None, cut_by_stop_string: false }
    }
}

/// Requests run through a `Scheduler` of their own, sized so that nothing waits or is preempted: each prompt
/// is prefilled in one chunk, then all rows decode together. Rows are prompt by prompt, choice by choice.
pub struct Generation {
    sched: Scheduler,
    ids: Vec<u64>,
    prompts: Vec<Vec<u32>>,
    /// first row of each prompt
    row0: Vec<usize>,
    choices: Vec<Choice>,
    done: Vec<bool>,
    /// text produced and not yet taken by `take_stream_text`, per row
    unstreamed: Vec<String>,
    left: usize,
}

impl Generation {
    pub fn new(model: Arc<Model>, prompts: Vec<Vec<u32>>, params: GenParams) -> Result<Self> {
        Self::new_each(model, prompts.into_iter().map(|p| (p, params.clone())).collect())
    }

    /// One request per prompt, each with its own parameters.
    pub fn new_each(model: Arc<Model>, requests: Vec<(Vec<u32>, GenParams)>) -> Result<Self> {
        if requests.is_empty() {
            return Err(Error::arg("no prompts given"));
        }
        let ctx = model.cfg.context_length();
        let bs = 16;
        // a cache with room for every row (an empty prompt runs as BOS: one token); the requests are checked
        // by `add`, before any step runs
        let mut blocks = 0;
        let mut longest = 0;
        for (p, params) in &requests {
            let len = p.len().max(1);
            let cap = params.max_new_tokens.min(ctx.saturating_sub(len));
            blocks += (len.div_ceil(bs) + 1) + params.n * (len + cap + 1).div_ceil(bs);
            longest = longest.max(len);
        }
        let rows: usize = requests.iter().map(|r| r.1.n).sum();
        let cfg = SchedulerConfig { block_size: bs, kv_tokens: blocks * bs, max_batch_tokens: (longest + rows).max(512), max_seqs: rows.max(1) };
        let sched = Scheduler::new(model, cfg)?;
        let handle = sched.handle();
        let mut g = Self { sched, ids: vec![], prompts: vec![], row0: vec![], choices: vec![], done: vec![], unstreamed: vec![], left: 0 };
        for (i, (p, params)) in requests.into_iter().enumerate() {
            let what = if i == 0 { "prompt".to_string() } else { format!("prompt {i}") };
            let n = params.n;
            let lp = params.logprobs.is_some();
            let (id, p) = handle.add(p, params, &what)?;
            g.ids.push(id);
            g.prompts.push(p);
            g.row0.push(g.choices.len());
            for _ in 0..n {
                g.choices.push(Choice { text: String::new(), token_ids: vec![], finish_reason: Finish::Length, logprobs: lp.then(Vec::new) });
                g.done.push(false);
                g.unstreamed.push(String::new());
            }
            g.left += n;
        }
        Ok(g)
    }

    pub fn is_done(&self) -> bool {
        self.left == 0
    }

    /// One step of the scheduler. Returns false once all rows are done.
    pub fn step(&mut self) -> Result<bool> {
        if self.left == 0 {
            return Ok(false);
        }
        for d in self.sched.step()? {
            let p = self.ids.iter().position(|&i| i == d.request).expect("a request of this generation");
            if let Some(e) = d.error {
                // one result for the whole call: a failed row fails it (the server's requests fail alone)
                let what = if self.ids.len() == 1 { String::new() } else { format!("prompt {p}: ") };
                return Err(Error::Internal(format!("{what}{e}")));
            }
            let row = self.row0[p] + d.choice;
            let c = &mut self.choices[row];
            c.text.push_str(&d.text);
            self.unstreamed[row].push_str(&d.text);
            c.token_ids.extend_from_slice(&d.tokens);
            if let Some(lp) = c.logprobs.as_mut() {
                lp.extend(d.logprobs);
            }
            if let Some(f) = d.finish {
                c.finish_reason = f;
                if !self.done[row] {
                    self.done[row] = true;
                    self.left -= 1;
                }
            }
        }
        Ok(self.left > 0)
    }

    /// Text of row `row` that is safe to show now: never part of a stop string, never half a character.
    pub fn take_stream_text(&mut self, row: usize) -> String {
        std::mem::take(&mut self.unstreamed[row])
    }

    pub fn row_finished(&self, row: usize) -> bool {
        self.done[row]
    }

    /// Run to the end, calling `interrupt` between steps (it returns an error to stop, e.g. on Ctrl-C).
    pub fn run(mut self, mut interrupt: impl FnMut() -> Result<()>) -> Result<Vec<Completion>> {
        while self.step()? {
            interrupt()?;
        }
        Ok(self.into_completions())
    }

    pub fn into_completions(self) -> Vec<Completion> {
        let mut choices = self.choices.into_iter();
        let mut out = Vec::with_capacity(self.prompts.len());
        for (p, prompt) in self.prompts.into_iter().enumerate() {
            let end = self.row0.get(p + 1).copied().unwrap_or(usize::MAX);
            let n = end.saturating_sub(self.row0[p]);
            out.push(Completion { prompt_token_ids: prompt, choices: choices.by_ref().take(n).collect() });
        }
        out
    }
}

pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}

pub(crate) fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
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
pub(crate) fn stop_strings_hit(s: &mut TextState, stops: &[String], before: usize) {
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
pub(crate) fn finalize_text(s: &mut TextState, tok: Option<&Tokenizer>, stops: &[String]) -> crate::Result<()> {
    if s.cut_by_stop_string {
        return Ok(());
    }
    if let Some(tok) = tok {
        let rest = s.decoder.finish(tok)?;
        if !rest.is_empty() {
            let before = s.text.len();
            s.text.push_str(&rest);
            stop_strings_hit(s, stops, before);
        }
    }
    Ok(())
}

/// Bytes at the end of `text` that could be the start of a stop string (held back from a stream).
pub(crate) fn held_back(text: &str, stops: &[String]) -> usize {
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
