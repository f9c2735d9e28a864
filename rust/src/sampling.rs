//! Logits processing and sampling: the same steps, order and maths as `candlewick.reference.generate`.
//!
//! Order (a step whose parameter is neutral does nothing):
//!   1. repetition_penalty (transformers): over the distinct ids of prompt + generated, x > 0 -> x / p, else x · p
//!   2. presence / frequency penalty (OpenAI): over generated ids, x -= frequency · count + presence · (count > 0)
//!   3. logit_bias: x[id] += bias
//!   4. temperature: x / T; T = 0 is greedy (argmax of steps 1-3, lowest id on a tie; 5-7 skipped, no draw)
//!   5. top_k: keep x >= the k-th largest (ties at the boundary stay)
//!   6. top_p: sort by probability descending (ties: lower id first), keep the shortest prefix whose
//!      cumulative probability is >= top_p (at least one token)
//!   7. min_p: keep p >= min_p · max p
//!
//! The token is drawn by inverse CDF: u uniform in [0, 1); the first id whose cumulative probability > u · total.
//! All of this runs in f64 on the model's f32 logits, so the engine's distribution matches the reference's.

use std::collections::HashMap;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::{Error, Result};

/// The parameters of steps 1-7 above: what turns logits into a distribution. (The reference's `SamplingParams`
/// holds these and the generation limits, as `GenParams` does here; the name is kept for that one meaning.)
#[derive(Debug, Clone, PartialEq)]
pub struct LogitsParams {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    pub min_p: f64,
    pub repetition_penalty: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub logit_bias: Vec<(u32, f64)>,
}

impl Default for LogitsParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: vec![],
        }
    }
}

impl LogitsParams {
    pub fn validate(&self, vocab: usize) -> Result<()> {
        let finite = |name: &str, v: f64| -> Result<()> {
            if v.is_finite() { Ok(()) } else { Err(Error::arg(format!("{name} must be a finite number, got {v}"))) }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repetition_penalty", self.repetition_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err(Error::arg(format!("temperature must be >= 0 (0 is greedy), got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::arg(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::arg(format!("min_p must be in [0, 1], got {}", self.min_p)));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(Error::arg(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty)));
        }
        for &(id, b) in &self.logit_bias {
            if id as usize >= vocab {
                return Err(Error::arg(format!("logit_bias: token id {id} is outside the vocabulary of {vocab}")));
            }
            finite("logit_bias value", b)?;
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// What a sequence has seen so far, for the penalties.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// distinct ids of prompt + generated (repetition penalty)
    pub seen: std::collections::HashSet<u32>,
    /// counts of generated ids (presence / frequency penalties)
    pub counts: HashMap<u32, u32>,
}

impl History {
    pub fn new(prompt: &[u32]) -> Self {
        Self { seen: prompt.iter().copied().collect(), counts: HashMap::new() }
    }
    pub fn push(&mut self, id: u32) {
        self.seen.insert(id);
        *self.counts.entry(id).or_insert(0) += 1;
    }
}

/// softmax in f64 (-inf -> 0)
pub fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|&v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|v| v / z).collect()
}

/// The first index of the largest value (comparisons with NaN are false: a NaN is kept only at index 0).
fn argmax<T: PartialOrd + Copy>(x: &[T]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Steps 1-7 on one logits vector: the processed logits, -inf where a token was removed.
pub fn process_logits(logits: &[f32], hist: &History, p: &LogitsParams) -> Vec<f64> {
    let mut x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
    // 1. repetition penalty
    if p.repetition_penalty != 1.0 {
        for &id in &hist.seen {
            let v = &mut x[id as usize];
            *v = if *v > 0.0 { *v / p.repetition_penalty } else { *v * p.repetition_penalty };
        }
    }
    // 2. presence and frequency penalties
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        for (&id, &c) in &hist.counts {
            x[id as usize] -= p.frequency_penalty * c as f64 + p.presence_penalty;
        }
    }
    // 3. logit bias
    for &(id, b) in &p.logit_bias {
        x[id as usize] += b;
    }
    // 4. temperature (0: greedy)
    if p.temperature == 0.0 {
        let best = argmax(&x);
        return x.iter().enumerate().map(|(i, &v)| if i == best { v } else { f64::NEG_INFINITY }).collect();
    }
    if p.temperature != 1.0 {
        x.iter_mut().for_each(|v| *v /= p.temperature);
    }
    // 5. top-k
    if p.top_k > 0 && p.top_k < x.len() {
        let mut sorted = x.clone();
        let k = p.top_k;
        sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = sorted[k - 1];
        x.iter_mut().for_each(|v| if *v < kth { *v = f64::NEG_INFINITY });
    }
    // 6. top-p
    if p.top_p < 1.0 {
        let probs = softmax(&x);
        let mut order: Vec<usize> = (0..x.len()).filter(|&i| probs[i] > 0.0).collect();
        let by_prob = |&a: &usize, &b: &usize| probs[b].total_cmp(&probs[a]).then(a.cmp(&b));
        // The kept tokens are nearly always a short head of the order: sort only the first TOP_P_HEAD (a total
        // order, so they are exactly the full sort's first ones, summed in the same order), and the whole
        // vocabulary only when they do not reach top_p.
        let mut keep = None;
        if order.len() > TOP_P_HEAD {
            order.select_nth_unstable_by(TOP_P_HEAD - 1, by_prob);
            order[..TOP_P_HEAD].sort_by(by_prob);
            keep = shortest_prefix(&order[..TOP_P_HEAD], &probs, p.top_p);
        }
        let keep = keep.unwrap_or_else(|| {
            order.sort_by(by_prob);
            shortest_prefix(&order, &probs, p.top_p).unwrap_or(order.len())
        });
        let mut kept = vec![false; x.len()];
        order[..keep].iter().for_each(|&i| kept[i] = true);
        x.iter_mut().zip(kept).for_each(|(v, k)| if !k { *v = f64::NEG_INFINITY });
    }
    // 7. min-p
    if p.min_p > 0.0 {
        let probs = softmax(&x);
        let cut = p.min_p * probs.iter().cloned().fold(0.0, f64::max);
        x.iter_mut().zip(probs).for_each(|(v, q)| if q < cut { *v = f64::NEG_INFINITY });
    }
    x
}

/// Tokens top_p sorts first, before it sorts the whole vocabulary.
const TOP_P_HEAD: usize = 512;

/// How many of `order` (sorted by probability) it takes for their probabilities, summed in that order, to reach
/// `top_p`; None if all of them do not.
fn shortest_prefix(order: &[usize], probs: &[f64], top_p: f64) -> Option<usize> {
    let mut cum = 0.0;
    for (n, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum >= top_p {
            return Some(n + 1);
        }
    }
    None
}

/// The distribution the next token is drawn from: softmax of the processed logits (one-hot when greedy).
pub fn sampling_probs(logits: &[f32], hist: &History, p: &LogitsParams) -> Vec<f64> {
    softmax(&process_logits(logits, hist, p))
}

/// A per-request random stream: ChaCha8 seeded from `seed`, one stream per choice, so choice i of a request
/// draws the same numbers whether it runs alone, in a batch, streamed or not.
pub struct Rng(ChaCha8Rng);

impl Rng {
    pub fn new(seed: u64, choice: u64) -> Self {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(choice);
        Self(r)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Inverse-CDF draw from `probs`.
pub fn draw(probs: &[f64], u: f64) -> usize {
    let total: f64 = probs.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    for (i, &q) in probs.iter().enumerate() {
        cum += q;
        if cum > target {
            return i;
        }
    }
    probs.len() - 1
}

/// Choose the next token: greedy argmax, or a draw from the processed distribution.
pub fn next_token(logits: &[f32], hist: &History, p: &LogitsParams, rng: &mut Rng) -> u32 {
    let untouched = p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 && p.logit_bias.is_empty();
    if p.is_greedy() && untouched {
        // the argmax of the logits themselves: widening to f64 keeps their order, and nothing else changes them
        // (no copy of the vocabulary per sequence and step: at 64 greedy sequences those were 50 MB a step)
        return argmax(logits) as u32;
    }
    let x = process_logits(logits, hist, p);
    if p.is_greedy() {
        return argmax(&x) as u32;
    }
    draw(&softmax(&x), rng.uniform()) as u32
}

/// log_softmax of raw logits, in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
    logits.iter().map(|&v| v as f64 - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_after_penalties() {
        let logits = [1.0f32, 3.0, 2.0];
        let mut hist = History::new(&[1]);
        hist.push(1);
        let p = LogitsParams { temperature: 0.0, repetition_penalty: 2.0, ..Default::default() };
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(next_token(&logits, &hist, &p, &mut Rng::new(0, 0)), 2);
    }

    /// Greedy without penalties or bias takes the argmax of the raw logits: the same token as the full
    /// processing, the first of tied maxima, NaN passed over as the processed vector's argmax passes it.
    #[test]
    fn greedy_fast_path_equals_processing() {
        let p = LogitsParams { temperature: 0.0, ..Default::default() };
        let cases: [&[f32]; 5] = [&[1.0, 3.0, 2.0], &[3.0, 3.0, 1.0], &[-1.0, f32::NAN, -0.5], &[f32::NAN, 0.0, 2.0], &[f32::NEG_INFINITY; 3]];
        for logits in cases {
            let full = argmax(&process_logits(logits, &History::default(), &p));
            assert_eq!(next_token(logits, &History::default(), &p, &mut Rng::new(0, 0)) as usize, full, "{logits:?}");
        }
    }

    #[test]
    fn top_p_keeps_shortest_prefix() {
        let logits: Vec<f32> = [0.5f64, 0.3, 0.2].iter().map(|p| p.ln() as f32).collect();
        let p = LogitsParams { top_p: 0.7, ..Default::default() };
        let probs = sampling_probs(&logits, &History::default(), &p);
        assert!((probs[0] - 0.625).abs() < 1e-6 && (probs[1] - 0.375).abs() < 1e-6 && probs[2] == 0.0);
    }

    /// top_p sorting only the head of the order gives exactly what sorting the whole vocabulary gives, for
    /// peaked and flat distributions (the head too short: the full sort), with ties among the probabilities.
    #[test]
    fn top_p_head_equals_the_full_sort() {
        let full = |x: &[f64], top_p: f64| -> Vec<f64> {
            let probs = softmax(x);
            let mut order: Vec<usize> = (0..x.len()).filter(|&i| probs[i] > 0.0).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let keep = shortest_prefix(&order, &probs, top_p).unwrap_or(order.len());
            let mut kept = vec![false; x.len()];
            order[..keep].iter().for_each(|&i| kept[i] = true);
            x.iter().zip(kept).map(|(&v, k)| if k { v } else { f64::NEG_INFINITY }).collect()
        };
        let mut rng = Rng::new(3, 0);
        for (spread, vocab) in [(8.0f64, 5000usize), (0.5, 5000), (0.0, 3000), (3.0, 600)] {
            // values on a coarse grid, so that many tie
            let logits: Vec<f32> = (0..vocab).map(|_| ((rng.uniform() * spread * 4.0).round() / 4.0) as f32).collect();
            for top_p in [0.1, 0.5, 0.9, 0.99, 0.999999] {
                let p = LogitsParams { top_p, ..Default::default() };
                let got = process_logits(&logits, &History::default(), &p);
                let x: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
                assert_eq!(got, full(&x, top_p), "spread {spread} vocab {vocab} top_p {top_p}");
            }
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let (mut a, mut b, mut c) = (Rng::new(7, 0), Rng::new(7, 0), Rng::new(7, 1));
        let xs: Vec<f64> = (0..5).map(|_| a.uniform()).collect();
        assert_eq!(xs, (0..5).map(|_| b.uniform()).collect::<Vec<_>>());
        assert_ne!(xs, (0..5).map(|_| c.uniform()).collect::<Vec<_>>());
    }
}
