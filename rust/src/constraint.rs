//! Constrained decoding: JSON schemas, regexes and Lark grammars as a token mask per step, on llguidance.
//!
//! A vocabulary becomes llguidance's token trie once per tokenizer (`Tokenizer::grammar_factory`): the bytes of
//! every token, read from the tokenizer's own pipeline the way `candlewick.reference.constraints.token_bytes`
//! reads it (byte-level BPE maps its characters back to bytes; SentencePiece vocabularies turn ▁ into a space
//! and <0xXX> into that byte; special tokens never match grammar text). Each constrained sequence then holds a
//! `Constraint`, which masks its logits before any sampling parameter and follows the tokens it takes.
//!
//! The rule, the same in the engine and in the reference (`candlewick.reference.generate`):
//!   1. the grammar's mask M of the tokens that may come next (EOS is in it once the grammar may end);
//!   2. if M holds one token, that token is taken: nothing is sampled and no random number is drawn;
//!   3. otherwise the logits outside M become -inf, then the usual steps 1-7 of `sampling` pick the token;
//!   4. the grammar takes the token; once it can take nothing more, the sequence ends (finish "stop").
//!
//! Logprobs stay those of the raw model distribution, as without a constraint.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::error::{Error, Result};

/// What a sequence is constrained to.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON schema, as JSON text (`{"type": "object"}` is any JSON object).
    JsonSchema(String),
    /// A regular expression the whole output must match (llguidance's syntax: Rust regex, no lookaround).
    Regex(String),
    /// A Lark grammar (llguidance's dialect: `start: ...`, `%json {...}`, `%import common...`).
    Lark(String),
}

impl Grammar {
    /// The parameter's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "grammar",
        }
    }

    fn top_level(&self) -> Result<TopLevelGrammar> {
        Ok(match self {
            Grammar::JsonSchema(s) => {
                let v: Value = serde_json::from_str(s)
                    .map_err(|e| Error::arg(format!("json_schema is not valid JSON: {e}")))?;
                if !(v.is_object() || v.is_boolean()) {
                    return Err(Error::arg("json_schema must be a JSON object (a schema), or true / false"));
                }
                TopLevelGrammar::from_json_schema(v)
            }
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// Bytes a grammar may hold, at most (a schema or grammar is compiled on the caller's thread, before any token).
pub const MAX_GRAMMAR_BYTES: usize = 1 << 20;

/// The characters GPT-2's byte-level BPE writes for the bytes 0..=255 (printable bytes stand for themselves,
/// the rest are shifted to U+0100 and up, in byte order).
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                next += 1;
                (char::from_u32(next - 1).expect("U+0100..U+0143 are chars"), b)
            }
        })
        .collect()
}

/// How a tokenizer's decoder turns tokens back into bytes.
#[derive(Debug, Default)]
struct Decoding {
    byte_level: bool,
    byte_fallback: bool,
    /// the character that stands for a space (SentencePiece's ▁), if any
    space: Option<char>,
}

fn read_decoder(d: &Value, out: &mut Decoding) {
    match d["type"].as_str() {
        Some("ByteLevel") => out.byte_level = true,
        Some("ByteFallback") => out.byte_fallback = true,
        Some("Metaspace") => {
            out.space = d["replacement"].as_str().and_then(|s| s.chars().next()).or(Some('\u{2581}'));
        }
        Some("Replace") if d["content"].as_str() == Some(" ") => {
            if let Some(s) = d["pattern"]["String"].as_str() {
                let mut c = s.chars();
                if let (Some(ch), None) = (c.next(), c.next()) {
                    out.space = Some(ch);
                }
            }
        }
        Some("Sequence") => {
            for x in d["decoders"].as_array().into_iter().flatten() {
                read_decoder(x, out);
            }
        }
        _ => {}
    }
}

/// The bytes of every token id below `n_vocab`, from a tokenizer.json document. Special tokens get llguidance's
/// marker byte in front (grammar text never matches them); ids the tokenizer lacks (a padded embedding) are
/// special placeholders; a byte-level token with a character outside the byte map is left empty (never allowed).
pub fn token_bytes(spec: &Value, n_vocab: usize) -> Result<Vec<Vec<u8>>> {
    let mut how = Decoding::default();
    read_decoder(&spec["decoder"], &mut how);
    if !how.byte_level && !how.byte_fallback && how.space.is_none() {
        return Err(Error::arg(format!(
            "constrained decoding needs a byte-level BPE or SentencePiece vocabulary; this tokenizer's decoder is {}",
            spec["decoder"]["type"].as_str().unwrap_or("missing")
        )));
    }
    let chars = byte_level_chars();
    let mut out: Vec<Option<Vec<u8>>> = vec![None; n_vocab];
    if let Some(vocab) = spec["model"]["vocab"].as_object() {
        for (piece, id) in vocab {
            let Some(id) = id.as_u64().map(|i| i as usize).filter(|&i| i < n_vocab) else { continue };
            out[id] = Some(piece_bytes(piece, &how, &chars));
        }
    } else if let Some(vocab) = spec["model"]["vocab"].as_array() {
        // Unigram: [[piece, score], ...]
        for (id, entry) in vocab.iter().enumerate().take(n_vocab) {
            if let Some(piece) = entry[0].as_str() {
                out[id] = Some(piece_bytes(piece, &how, &chars));
            }
        }
    }
    for t in spec["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else { continue };
        if (id as usize) < n_vocab {
            let mut b = content.as_bytes().to_vec();
            if t["special"].as_bool().unwrap_or(false) {
                b.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
            }
            out[id as usize] = Some(b);
        }
    }
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(id, b)| {
            b.unwrap_or_else(|| {
                let mut name = format!("<[{id}]>").into_bytes();
                name.insert(0, TokTrie::SPECIAL_TOKEN_MARKER);
                name
            })
        })
        .collect())
}

fn piece_bytes(piece: &str, how: &Decoding, chars: &std::collections::HashMap<char, u8>) -> Vec<u8> {
    if how.byte_level {
        return piece.chars().map(|c| chars.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_default();
    }
    if how.byte_fallback && piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&piece[3..5], 16) {
            return vec![b];
        }
    }
    match how.space {
        Some(sp) => piece.replace(sp, " ").into_bytes(),
        None => piece.as_bytes().to_vec(),
    }
}

/// The vocabulary's tokenizer, for text a grammar spells out.
pub type Encode = Box<dyn Fn(&str) -> Vec<u32> + Send + Sync>;

/// llguidance's view of a vocabulary: the trie, and the tokenizer for the text a grammar forces.
struct Env {
    trie: TokTrie,
    encode: Encode,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Tokens that spell exactly `s` (llguidance takes them as the tokens a forced text starts with). The
    /// tokenizer's own tokens where they spell it; otherwise the trie's longest-match tokens. (A SentencePiece
    /// encoder puts a ▁ in front of the text, which would force a space the grammar never asked for.)
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let toks = self.trie.tokenize_with_greedy_fallback(s, |s| (self.encode)(s));
        if self.trie.decode_raw(&toks) == s {
            toks
        } else {
            self.trie.greedy_tokenize(s)
        }
    }
}

/// The compiler of grammars for one vocabulary. `eos` are the ids that end generation (the mask allows them
/// once the grammar may end).
pub fn factory(
    token_bytes: &[Vec<u8>],
    eos: &[u32],
    encode: Encode,
) -> Result<Arc<ParserFactory>> {
    let Some(&first) = eos.first() else {
        return Err(Error::arg("constrained decoding needs an EOS token, and this tokenizer names none"));
    };
    let info = TokRxInfo::new(token_bytes.len() as u32, first);
    let trie = TokTrie::from(&info, token_bytes).with_eos_tokens(eos);
    let env: TokEnv = Arc::new(Env { trie, encode });
    let mut f = ParserFactory::new_simple(&env).map_err(|e| Error::Internal(format!("llguidance: {e}")))?;
    f.quiet();
    Ok(Arc::new(f))
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    m: Matcher,
}

impl Constraint {
    /// Compile `g` for a vocabulary; an invalid schema, regex or grammar is an InvalidArgument naming the problem.
    pub fn new(factory: &ParserFactory, g: &Grammar) -> Result<Self> {
        let text_len = match g {
            Grammar::JsonSchema(s) | Grammar::Regex(s) | Grammar::Lark(s) => s.len(),
        };
        if text_len > MAX_GRAMMAR_BYTES {
            return Err(Error::arg(format!("{}: {text_len} bytes, at most {MAX_GRAMMAR_BYTES} are taken", g.name())));
        }
        let parser = factory
            .create_parser(g.top_level()?)
            .map_err(|e| Error::arg(format!("{}: {}", g.name(), first_line(&e.to_string()))))?;
        let mut m = Matcher::new(Ok(parser));
        if let Some(e) = m.get_error() {
            return Err(Error::arg(format!("{}: {}", g.name(), first_line(&e))));
        }
        // a grammar that allows nothing at all (an empty regex class, `false`) is refused here, not mid-request
        let mask = m.compute_mask().map_err(|e| Error::arg(format!("{}: {}", g.name(), first_line(&e.to_string()))))?;
        if mask.is_zero() {
            return Err(Error::arg(format!("{}: no output can satisfy it", g.name())));
        }
        Ok(Self { m })
    }

    /// The tokens that may come next.
    pub fn mask(&mut self) -> Result<SimpleVob> {
        self.m.compute_mask().map_err(|e| Error::Internal(format!("grammar: {}", first_line(&e.to_string()))))
    }

    /// Take a token (one the mask allowed).
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.m.consume_token(token).map_err(|e| Error::Internal(format!("grammar: {}", first_line(&e.to_string()))))
    }

    /// The grammar can take nothing more: the sequence is complete.
    pub fn is_stopped(&self) -> bool {
        self.m.is_stopped()
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Step 1-3 of the rule above on one row of logits: the forced token, or the masked logits to sample from.
pub enum Masked {
    Forced(u32),
    Logits(Vec<f32>),
}

pub fn apply(mask: &SimpleVob, logits: &[f32]) -> Result<Masked> {
    let allowed = mask.num_set();
    if allowed == 0 {
        return Err(Error::Internal("grammar: no token may come next".into()));
    }
    if allowed == 1 {
        let t = mask.first_bit_set().expect("one bit is set") as u32;
        return Ok(Masked::Forced(t));
    }
    let mut x = logits.to_vec();
    for (i, v) in x.iter_mut().enumerate() {
        if !mask.is_allowed(i as u32) {
            *v = f32::NEG_INFINITY;
        }
    }
    Ok(Masked::Logits(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_map_is_gpt2s() {
        let m = byte_level_chars();
        assert_eq!(m[&'Ġ'], b' ');
        assert_eq!(m[&'Ċ'], b'\n');
        assert_eq!(m[&'a'], b'a');
        assert_eq!(m.len(), 256);
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    #[test]
    fn regex_mask_on_llama_tiny() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/llama-tiny");
        let tok = crate::tokenizer::Tokenizer::from_pretrained(&root).unwrap();
        let f = tok.grammar_factory(tok.vocab_size()).unwrap();
        let mut c = Constraint::new(&f, &Grammar::Regex("[0-9]+".into())).unwrap();
        let m = c.mask().unwrap();
        eprintln!("allowed {} of {}", m.num_set(), tok.vocab_size());
        assert!(m.num_set() < 100);
    }
}

