//! Tokenisation with Hugging Face's `tokenizers`, plus what a checkpoint folder says about special tokens.
//!
//! A checkpoint spreads this over several files: tokenizer.json (the pipeline), tokenizer_config.json (bos / eos /
//! pad names and the chat template), config.json and generation_config.json (more stop ids). `Tokenizer` reads
//! them all once, so that encode/decode and every stop id live in one place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// A GGUF vocabulary's own encoder (llama.cpp's BPE, WordPiece and Unigram); `inner` still decodes.
    encoder: Option<std::sync::Arc<crate::gguf_vocab::Encoder>>,
    /// The tokenizer.json this was read from (for messages).
    pub source: PathBuf,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Every id that ends generation: config.json, generation_config.json and the tokenizer's eos token.
    pub eos_token_ids: Vec<u32>,
    /// The jinja chat template (tokenizer_config.json `chat_template`, or chat_template.jinja).
    pub chat_template: Option<String>,
    /// bos_token, eos_token, unk_token, pad_token, ... as strings: the names chat templates use.
    pub special_tokens: BTreeMap<String, String>,
    /// llguidance's compiler for this vocabulary, built on the first constrained request (crate::constraint)
    grammar: std::sync::OnceLock<std::result::Result<std::sync::Arc<llguidance::ParserFactory>, String>>,
}

const SPECIAL_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"];

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::tok(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::tok(format!("{}: not valid JSON: {e}", path.display())))
}

/// Token strings in tokenizer_config.json are either "<s>" or {"content": "<s>", ...}.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
        _ => None,
    }
}

/// `eos_token_id` may be an int, a list of ints or null.
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|i| i as u32).collect(),
        _ => vec![],
    }
}

fn push_unique(v: &mut Vec<u32>, ids: impl IntoIterator<Item = u32>) {
    for id in ids {
        if !v.contains(&id) {
            v.push(id);
        }
    }
}

impl Tokenizer {
    /// Load from a checkpoint folder or a tokenizer.json file (its folder is searched for the config files).
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        // a GGUF file's tokenizer.ggml.* metadata, with or without tensors (llama-tokenize's vocab-only files)
        if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return crate::gguf::Gguf::open(path)?.tokenizer();
        }
        let (file, dir) = if path.is_dir() {
            (path.join("tokenizer.json"), path.to_path_buf())
        } else {
            (path.to_path_buf(), path.parent().map(Path::to_path_buf).unwrap_or_default())
        };
        if !file.is_file() {
            return Err(Error::tok(format!("{}: no such tokenizer file", file.display())));
        }
        let inner = no_panic(|| tokenizers::Tokenizer::from_file(&file))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(|e| Error::tok(format!("{}: not a valid tokenizer.json: {e}", file.display())))?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
        let config = read_json(&dir.join("config.json"))?;
        let gen_config = read_json(&dir.join("generation_config.json"))?;
        let mut chat_template = match tok_config.as_ref().and_then(|c| c.get("chat_template")) {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default" is what apply_chat_template uses.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.is_file() {
            chat_template = Some(
                std::fs::read_to_string(&jinja).map_err(|e| Error::tok(format!("{}: {e}", jinja.display())))?,
            );
        }
        Self::new(inner, file, tok_config.as_ref(), config.as_ref(), gen_config.as_ref(), chat_template)
    }

    /// Assemble from an already-built pipeline and the (optional) JSON configs of its checkpoint.
    pub fn new(
        mut inner: tokenizers::Tokenizer,
        source: PathBuf,
        tok_config: Option<&Value>,
        config: Option<&Value>,
        gen_config: Option<&Value>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        // Like transformers, encode() neither pads nor truncates unless asked (MiniLM's file pads to 128).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::tok(format!("{}: {e}", source.display())))?;
        let mut special_tokens = BTreeMap::new();
        let mut special_ids = BTreeMap::new();
        if let Some(tc) = tok_config {
            for name in SPECIAL_NAMES {
                if let Some(content) = tc.get(name).and_then(token_content) {
                    let id = inner.token_to_id(&content).ok_or_else(|| {
                        Error::tok(format!(
                            "{}: {name} {content:?} (tokenizer_config.json) is not in the vocabulary",
                            source.display()
                        ))
                    })?;
                    special_ids.insert(name, id);
                    special_tokens.insert(name.to_string(), content);
                }
            }
        }
        // Without tokenizer_config.json (GPT-2), config.json names the ids.
        for (name, key) in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "pad_token_id")] {
            if special_ids.contains_key(name) {
                continue;
            }
            if let Some(&id) = ids_of(config.and_then(|c| c.get(key))).first() {
                if let Some(tok) = inner.id_to_token(id) {
                    special_ids.insert(name, id);
                    special_tokens.insert(name.to_string(), tok);
                }
            }
        }
        let mut eos_token_ids = Vec::new();
        push_unique(&mut eos_token_ids, special_ids.get("eos_token").copied());
        push_unique(&mut eos_token_ids, ids_of(config.and_then(|c| c.get("eos_token_id"))));
        push_unique(&mut eos_token_ids, ids_of(gen_config.and_then(|c| c.get("eos_token_id"))));
        let vocab = inner.get_vocab_size(true) as u32;
        if let Some(bad) = eos_token_ids.iter().find(|&&id| id >= vocab) {
            return Err(Error::tok(format!(
                "{}: eos_token_id {bad} is out of range for a vocabulary of {vocab}",
                source.display()
            )));
        }
        Ok(Self {
            bos_token_id: special_ids.get("bos_token").copied(),
            pad_token_id: special_ids.get("pad_token").copied(),
            inner,
            encoder: None,
            source,
            eos_token_ids,
            chat_template,
            special_tokens,
            grammar: std::sync::OnceLock::new(),
        })
    }

    /// Encode with `encoder` instead of the `tokenizers` pipeline (which keeps decoding).
    pub fn with_encoder(mut self, encoder: std::sync::Arc<crate::gguf_vocab::Encoder>) -> Self {
        self.encoder = Some(encoder);
        self
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Size of the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        if let Some(e) = &self.encoder {
            return e.encode(text, add_special_tokens);
        }
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::tok(format!("cannot encode {:?}: {e}", short(text))))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode many texts in parallel (the `tokenizers` crate uses rayon).
    pub fn encode_batch(&self, texts: &[String], add_special_tokens: bool) -> Result<Vec<Vec<u32>>> {
        if let Some(e) = &self.encoder {
            use rayon::prelude::*;
            return texts.par_iter().map(|t| e.encode(t, add_special_tokens)).collect();
        }
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encs = self
            .inner
            .encode_batch(inputs, add_special_tokens)
            .map_err(|e| Error::tok(format!("cannot encode batch: {e}")))?;
        Ok(encs.iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab || self.inner.id_to_token(id).is_none()) {
            Some(bad) => Err(Error::tok(format!("token id {bad} is out of range for a vocabulary of {vocab}"))),
            None => Ok(()),
        }
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.check_ids(ids)?;
        if let Some(text) = self.encoder.as_ref().and_then(|e| e.decode(ids, skip_special_tokens)) {
            return Ok(text);
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::tok(format!("cannot decode: {e}")))
    }

    /// The grammar compiler for this vocabulary padded to `n_vocab` ids (the model's), built once.
    pub fn grammar_factory(&self, n_vocab: usize) -> Result<std::sync::Arc<llguidance::ParserFactory>> {
        self.grammar
            .get_or_init(|| {
                let spec: Value = serde_json::from_str(&self.inner.to_string(false).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                let bytes = crate::constraint::token_bytes(&spec, n_vocab).map_err(|e| e.to_string())?;
                let (inner, encoder) = (self.inner.clone(), self.encoder.clone());
                let encode = Box::new(move |s: &str| match &encoder {
                    Some(e) => e.encode(s, false).unwrap_or_default(),
                    None => inner.encode(s, false).map(|e| e.get_ids().to_vec()).unwrap_or_default(),
                });
                crate::constraint::factory(&bytes, &self.eos_token_ids, encode).map_err(|e| e.to_string())
            })
            .clone()
            .map_err(Error::arg)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// `f`, with a panic inside it (the `tokenizers` crate panics on some malformed files, e.g. a merge longer than
/// every token) turned into its message: a bad file is a load error naming the file, not a crash.
pub(crate) fn no_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        format!("the tokenizers library failed on it ({})", msg.unwrap_or_else(|| "a panic".into()))
    })
}

fn short(text: &str) -> String {
    text.chars().take(40).collect()
}

/// Streaming detokenisation: text pieces that never split a UTF-8 character and join to `decode(all ids)`.
///
/// Decoding token by token breaks multi-byte characters (byte-level BPE spreads one emoji over several tokens) and
/// loses the spaces some decoders add between tokens. As in vLLM and transformers' TextStreamer, each step decodes a
/// short window `ids[prefix..]` and emits what it adds beyond `ids[prefix..read]`, holding back text that ends in
/// U+FFFD (an incomplete character). `finish` emits whatever the full decode has beyond what was emitted.
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special_tokens: bool,
    emitted: String,
}

impl IncrementalDecoder {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { ids: vec![], prefix: 0, read: 0, skip_special_tokens, emitted: String::new() }
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Add one token; returns the new text it completes, if any ("" is never returned).
    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        tok.check_ids(&[id])?;
        let before = tok.decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        self.ids.push(id);
        let after = tok.decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before) {
            let piece = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            self.emitted.push_str(&piece);
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// The rest of the text once no more tokens will come.
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let full = tok.decode(&self.ids, self.skip_special_tokens)?;
        let rest = full.strip_prefix(self.emitted.as_str()).unwrap_or("").to_string();
        self.emitted.push_str(&rest);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(p: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data").join(p)
    }

    #[test]
    fn gpt2_ids_and_stop_ids() {
        let tok = Tokenizer::from_pretrained(data("gpt2-tiny")).unwrap();
        assert_eq!(tok.encode("makes it unnecessary.", true).unwrap(), vec![49123, 340, 13114, 13]);
        assert_eq!(tok.eos_token_ids, vec![50256]);
        assert_eq!(tok.bos_token_id, Some(50256));
    }

    #[test]
    fn llama_special_tokens_and_template() {
        let tok = Tokenizer::from_pretrained(data("llama-tiny")).unwrap();
        assert_eq!(tok.bos_token_id, Some(0));
        assert_eq!(tok.eos_token_ids, vec![1]);
        assert_eq!(tok.encode("hi", true).unwrap()[0], 0);
        assert!(tok.chat_template.as_deref().unwrap().contains("<|user|>"));
    }

    #[test]
    fn stream_joins_to_decode() {
        let tok = Tokenizer::from_pretrained(data("gpt2-tiny")).unwrap();
        let text = "naïve café — 日本語 👩‍🚀 done";
        let ids = tok.encode(text, false).unwrap();
        let mut dec = IncrementalDecoder::new(true);
        let mut out = String::new();
        for &id in &ids {
            if let Some(p) = dec.step(&tok, id).unwrap() {
                assert!(!p.contains('\u{FFFD}'));
                out.push_str(&p);
            }
        }
        out.push_str(&dec.finish(&tok).unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn out_of_range_id_is_an_error() {
        let tok = Tokenizer::from_pretrained(data("gpt2-tiny")).unwrap();
        let err = tok.decode(&[1, 999_999], true).unwrap_err().to_string();
        assert!(err.contains("999999"), "{err}");
    }

    #[test]
    fn missing_and_malformed_files() {
        let err = Tokenizer::from_pretrained(data("nope")).err().unwrap().to_string();
        assert!(err.contains("nope"), "{err}");
        let dir = std::env::temp_dir().join("cw-bad-tok");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let err = Tokenizer::from_pretrained(&dir).err().unwrap().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
