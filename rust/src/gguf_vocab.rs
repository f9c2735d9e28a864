//! GGUF vocabularies (tokenizer.ggml.*) as tokenizers, the way llama.cpp's src/llama-vocab.cpp reads and applies
//! them: "gpt2" (byte-level BPE, with llama.cpp's per-pre-tokenizer regexes), "llama" (SentencePiece BPE),
//! "bert" (WordPiece, llm_tokenizer_wpm) and "t5" (Unigram, llm_tokenizer_ugm).
//!
//! "llama" files go through the `tokenizers` crate (transformers' LlamaTokenizerFast pipeline, which agrees with
//! llama.cpp on the project's texts). The other kinds are encoded here, step for step as llama.cpp does it
//! (special-token partition, then the kind's own session), and decoded by an equivalent `tokenizers` pipeline.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::gguf_file::Value;
use serde_json::json;

use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::tokenizer::Tokenizer;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::AddedToken;

// llama.cpp's token types (llama_token_type)
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Token texts llama.cpp's loader makes control tokens whatever their type (its "auto-detect special tokens by
/// text": end-of-generation, end-of-turn and fill-in-the-middle markers), so they are split out of the text.
/// llama.cpp takes only the first fill-in-the-middle marker of each kind it meets in a hash map; all are taken here.
const AUTO_CONTROL: &[&str] = &[
    "</s>", "<EOT>", "<MID>", "<PAD>", "<PRE>", "<REPO>", "<SUF>", "<end_of_turn>", "<end_of_utterance>", "<eos>",
    "<fim-middle>", "<fim-pad>", "<fim-prefix>", "<fim-repo>", "<fim-suffix>", "<fim_middle>", "<fim_pad>",
    "<fim_prefix>", "<fim_suffix>", "<reponame>", "<turn|>", "<|calls|>", "<|call|>", "<|code_middle|>",
    "<|code_prefix|>", "<|code_suffix|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<|eom_id|>", "<|eot_id|>",
    "<|file_sep|>", "<|fim_middle|>", "<|fim_pad|>", "<|fim_prefix|>", "<|fim_repo|>", "<|fim_suffix|>", "<|flush|>",
    "<|im_end|>", "<|middle|>", "<|prefix|>", "<|repo_name|>", "<|return|>", "<|suffix|>", "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>", "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
    "<\u{ff5c}fim\u{2581}end\u{ff5c}>", "<\u{ff5c}fim\u{2581}hole\u{ff5c}>", "[EOS]", "[EOT]", "[PAD]", "[e~[",
    "_<EOT>", "\u{2581}<MID>", "\u{2581}<PRE>", "\u{2581}<SUF>",
];

/// tokenizer.ggml.pre values, as llama.cpp's llama_vocab::impl::load maps them: (names, pre-tokenizer type,
/// ignore_merges, add_bos by default). "" (absent) is llama.cpp's "default".
const PRE_NAMES: &[(&[&str], &str, bool, bool)] = &[
    (&["default"], "DEFAULT", false, false),
    (&["minicpm5"], "MINICPM5", true, false),
    (&["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"], "LLAMA3", true, true),
    (&["deepseek-llm"], "DEEPSEEK_LLM", false, false),
    (&["deepseek-coder"], "DEEPSEEK_CODER", false, false),
    (&["deepseek-v3"], "DEEPSEEK3_LLM", false, false),
    (&["spark2_5"], "SPARK2_5", false, false),
    (&["youtu"], "YOUTU", true, false),
    (&["falcon"], "FALCON", false, false),
    (&["mpt"], "MPT", false, false),
    (&["starcoder"], "STARCODER", false, false),
    (&["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum", "modern-bert"], "GPT2", false, false),
    (&["jais-2"], "JAIS2", false, false),
    (&["gemma4", "granite-embed-multi-311m"], "GEMMA4", false, false),
    (&["sarvam-moe"], "SARVAM_MOE", false, false),
    (&["jina-v1-en", "jina-v2-code", "roberta-bpe"], "GPT2", false, false),
    (&["whitespace"], "WHITESPACE", false, false),
    (&["refact"], "REFACT", false, false),
    (&["command-r"], "COMMAND_R", false, false),
    (&["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"], "QWEN2", false, false),
    (&["qwen35"], "QWEN35", false, false),
    (&["stablelm2"], "STABLELM2", false, false),
    (&["olmo"], "OLMO", false, false),
    (&["dbrx"], "DBRX", false, false),
    (&["smaug-bpe"], "SMAUG", false, false),
    (&["poro-chat"], "PORO", false, false),
    (&["chatglm-bpe"], "CHATGLM4", false, false),
    (&["glm4", "glm5"], "CHATGLM4", true, false),
    (&["viking"], "VIKING", false, false),
    (&["jais"], "JAIS", false, false),
    (&["tekken"], "TEKKEN", true, true),
    (&["smollm"], "SMOLLM", false, false),
    (&["codeshell"], "CODESHELL", false, false),
    (&["bloom"], "BLOOM", false, false),
    (&["gpt3-finnish"], "GPT3_FINNISH", false, false),
    (&["exaone"], "EXAONE", false, false),
    (&["exaone4"], "GPT2", false, false),
    (&["exaone-moe"], "EXAONE_MOE", false, false),
    (&["chameleon"], "CHAMELEON", false, true),
    (&["minerva-7b"], "MINERVA", false, false),
    (&["megrez"], "QWEN2", false, false),
    (&["gpt-4o", "llama4", "kanana2", "talkie"], "GPT4O", false, false),
    (&["granite-embed-multi-97m"], "GRANITE_EMB_MULTI", true, false),
    (&["tiny_aya", "cohere2moe"], "TINY_AYA", false, false),
    (&["superbpe"], "SUPERBPE", false, false),
    (&["trillion"], "TRILLION", false, false),
    (&["granite-docling"], "GRANITE_DOCLING", false, false),
    (&["bailingmoe", "bailingmoe2", "llada-moe"], "BAILINGMOE", false, false),
    (&["seed-coder"], "SEED_CODER", false, false),
    (&["hunyuan"], "HUNYUAN", false, false),
    (&["hunyuan-dense"], "HUNYUAN_DENSE", false, false),
    (&["hy_v4"], "HY_V4", false, false),
    (&["joyai-llm"], "JOYAI_LLM", false, false),
    (&["kimi-k2"], "KIMI_K2", false, false),
    (&["ufakzeka"], "UFAKZEKA", false, false),
    (&["grok-2"], "GROK_2", false, false),
    (&["afmoe"], "AFMOE", false, false),
    (&["laguna"], "LAGUNA", false, false),
    (&["minimax-m2"], "MINIMAX_M2", false, false),
    (&["solar-open"], "SOLAR_OPEN", false, false),
    (&["mellum2"], "MELLUM2", false, false),
];

/// llama.cpp's llm_tokenizer_bpe regexes for each pre-tokenizer type, applied in sequence (unicode_regex_split).
const PRE_REGEXES: &[(&str, &[&str])] = &[
    ("LLAMA3", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("JAIS2", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s{512}(?!\\S)|\\s{256}(?!\\S)|\\s{128}(?!\\S)|\\s{64}(?!\\S)|\\s{32}(?!\\S)|\\s{16}(?!\\S)|\\s{8}(?!\\S)|\\s{4}(?!\\S)|\\s{1,2}(?!\\S)|\\s{1}",
    ]),
    ("DBRX", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("SMAUG", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("DEEPSEEK_LLM", &[
        "[\r\n]",
        "\\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
        "\\s+$",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}+",
    ]),
    ("DEEPSEEK3_LLM", &[
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("HUNYUAN_DENSE", &[
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("JOYAI_LLM", &[
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("HY_V4", &[
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("SPARK2_5", &[
        "\\p{N}{1,3}",
        "[一-龥぀-ゟ゠-ヿ]+",
        "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+|[\r\n]|\\s+(?!\\S)|\\s+",
        "\\p{N}",
    ]),
    ("YOUTU", &[
        "[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
        "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("DEEPSEEK_CODER", &[
        "[\r\n]",
        "\\s?\\p{L}+",
        "\\s?\\p{P}+",
        "[一-龥ࠀ-一가-퟿]+",
        "\\p{N}",
    ]),
    ("FALCON", &[
        "[\\p{P}\\$\\+<=>\\^~\\|`]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "[0-9][0-9][0-9]",
    ]),
    ("STARCODER", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("REFACT", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("COMMAND_R", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("SMOLLM", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("CODESHELL", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("EXAONE", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("MINERVA", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("MELLUM2", &[
        "\\p{N}",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("GPT2", &[
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("MPT", &[
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("OLMO", &[
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("JAIS", &[
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("TRILLION", &[
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("GRANITE_DOCLING", &[
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("STABLELM2", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("QWEN2", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("HUNYUAN", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("SOLAR_OPEN", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("QWEN35", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("PORO", &[
        " ?[^(\\s|.,!?…。，、।۔،)]+",
    ]),
    ("BLOOM", &[
        " ?[^(\\s|.,!?…。，、।۔،)]+",
    ]),
    ("GPT3_FINNISH", &[
        " ?[^(\\s|.,!?…。，、।۔،)]+",
    ]),
    ("CHATGLM4", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("VIKING", &[
        " ?[^(\\s|.,!?…。，、।۔،)]+",
        "\\p{N}",
    ]),
    ("TEKKEN", &[
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("CHAMELEON", &[
        "<sentinel:[0-9]+>",
        "(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        "([\\t\\n]|    |  )",
        "\\p{N}",
        "[\\p{P}!-/:-@\\[-`{-~]",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
    ]),
    ("GPT4O", &[
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("MINIMAX_M2", &[
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))*((?=[\\p{L}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}])([^a-z]))+((?=[\\p{L}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("GRANITE_EMB_MULTI", &[
        "[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))*((?=[\\p{L}\\p{M}])([^A-Z]))+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\\r\\n\\p{L}\\p{N}]?((?=[\\p{L}\\p{M}])([^a-z]))+((?=[\\p{L}\\p{M}])([^A-Z]))*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("SUPERBPE", &[
        "\\p{N}+",
        "(?=(\\d{3})+(?!\\d))",
    ]),
    ("BAILINGMOE", &[
        "'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
    ]),
    ("SEED_CODER", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1}| ?[^\\s\\p{L}\\p{N}\\r\\n]+|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("UFAKZEKA", &[
        "[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("GROK_2", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("LAGUNA", &[
        "[^\\n]+|[\\n]+",
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("EXAONE_MOE", &[
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?(?:\\p{L}\\p{M}*(?: \\p{L}\\p{M}*)*)+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]?|\\s*[\\r\\n]|\\s+(?!\\S)|\\s+",
    ]),
    ("MINICPM5", &[
        "\\p{N}{1,3}",
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}+| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    ]),
    ("DEFAULT", &[
        "[\\p{P}\\$\\+<=>\\^~\\|]+",
        "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)",
        "\\p{N}+",
        "[0-9][0-9][0-9]",
    ]),
];

/// Pre-tokenizer types llama.cpp implements with code of its own rather than regexes: refused by name.
const PRE_UNSUPPORTED: &[(&str, &str)] = &[
    ("KIMI_K2", "its split is llama.cpp's own code (\\p{Han} exclusion), not a regex"),
    ("AFMOE", "its digit split is llama.cpp's own code"),
    ("TINY_AYA", "its digit split is llama.cpp's own code"),
    ("GEMMA4", "SentencePiece-style BPE on raw UTF-8"),
    ("SARVAM_MOE", "SentencePiece-style BPE on raw UTF-8"),
    ("WHITESPACE", "not byte-level"),
];

fn err(g: &Gguf, msg: impl std::fmt::Display) -> Error {
    Error::load(&g.path, msg)
}

fn strings(g: &Gguf, key: &str) -> Result<Vec<String>> {
    match g.get(key)? {
        Value::Array(v) => v
            .iter()
            .map(|x| x.to_string().cloned().map_err(|_| err(g, format!("{key} holds a non-string"))))
            .collect(),
        _ => Err(err(g, format!("metadata {key:?} is not an array"))),
    }
}

fn opt_bool(g: &Gguf, key: &str) -> Option<bool> {
    g.meta(key).and_then(|v| v.to_bool().ok())
}

fn num_of(v: &Value) -> Option<f64> {
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .or_else(|_| v.to_i32().map(f64::from))
        .or_else(|_| v.to_u32().map(f64::from))
        .ok()
}

/// The tokenizer described by tokenizer.ggml.*.
pub fn tokenizer(g: &Gguf) -> Result<Tokenizer> {
    let model = g.str("tokenizer.ggml.model")?;
    if !["gpt2", "llama", "bert", "t5"].contains(&model.as_str()) {
        return Err(err(
            g,
            format!(
                "tokenizer.ggml.model {model:?} is not supported (supported: \"gpt2\", byte-level BPE; \"llama\", \
                 SentencePiece BPE; \"bert\", WordPiece; \"t5\", Unigram)"
            ),
        ));
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    // llama.cpp names an empty token [EMPTY_i]
    let tokens: Vec<String> =
        tokens.into_iter().enumerate().map(|(i, t)| if t.is_empty() { format!("[EMPTY_{i}]") } else { t }).collect();
    let types: Vec<i32> = match g.meta("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v.iter().map(|x| x.to_i32().unwrap_or(NORMAL)).collect(),
        _ => vec![NORMAL; tokens.len()],
    };
    if types.len() < tokens.len() {
        return Err(err(g, format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    // control tokens, with llama.cpp's by-text ones (their type is otherwise kept: a normal one still matches)
    let control: Vec<bool> =
        tokens.iter().zip(&types).map(|(t, &ty)| ty == CONTROL || AUTO_CONTROL.contains(&t.as_str())).collect();
    let scores: Option<Vec<f32>> = match g.meta("tokenizer.ggml.scores") {
        Some(Value::Array(v)) => Some(v.iter().map(|x| num_of(x).unwrap_or(0.0) as f32).collect()),
        Some(_) => return Err(err(g, "metadata \"tokenizer.ggml.scores\" is not an array")),
        None => None,
    };
    if let Some(s) = &scores {
        if s.len() < tokens.len() {
            return Err(err(g, format!("{} token scores for {} tokens", s.len(), tokens.len())));
        }
    }
    let n = tokens.len();
    let id = |key: &str| g.opt_num(key).map(|x| x as usize).filter(|&i| i < n);
    // llama.cpp's defaults for each kind, then the file's keys
    let [d_bos, d_eos, d_unk, d_sep, d_pad]: [Option<usize>; 5] = match model.as_str() {
        "llama" => [Some(1), Some(2), Some(0), None, None],
        "bert" => [Some(101), None, Some(100), Some(102), Some(0)],
        "gpt2" => [Some(11), Some(11), None, None, None],
        _ => [None, Some(1), Some(2), None, Some(0)],
    };
    let pick = |key: &str, d: Option<usize>| id(key).or(d.filter(|&i| i < n));
    let bos = pick("tokenizer.ggml.bos_token_id", d_bos);
    let eos = pick("tokenizer.ggml.eos_token_id", d_eos);
    let unk = pick("tokenizer.ggml.unknown_token_id", d_unk);
    let sep = pick("tokenizer.ggml.seperator_token_id", d_sep);
    let pad = pick("tokenizer.ggml.padding_token_id", d_pad);

    // The `tokenizers` pipeline is built from its parts, not from a tokenizer.json text: the vocabulary and merges
    // of a 49k-token file as JSON values, text and serde's buffers took ~100 MB at the peak of a load.
    let vocab = || {
        let mut v = Vocab::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            v.insert(t.clone(), i as u32);
        }
        v
    };
    let strip_decoder = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
    let unk_name = |default: &str| unk.map(|u| tokens[u].clone()).unwrap_or(default.into());
    let word_level = |default: &str| -> std::result::Result<ModelWrapper, String> {
        let m = WordLevel::builder().vocab(vocab()).unk_token(unk_name(default)).build();
        Ok(m.map_err(|e| e.to_string())?.into())
    };
    let mut encoder = None;
    let mut add_bos_default = false;
    let (normalizer, decoder, hf_model) = match model.as_str() {
        "llama" => {
            let scores = scores.as_ref().ok_or_else(|| err(g, "missing metadata key \"tokenizer.ggml.scores\""))?;
            let scores: Vec<f64> = scores[..n].iter().map(|&s| f64::from(s)).collect();
            add_bos_default = true;
            // SentencePiece BPE as transformers' LlamaTokenizerFast has it: spaces as ▁ with one in front of
            // every piece of text, merges ranked by the score of the piece they make, unknown characters as
            // <0xXX> byte tokens
            let mut bpe = BPE::builder()
                .vocab_and_merges(vocab(), spm_merges(&tokens, &scores))
                .fuse_unk(true)
                .byte_fallback(true);
            if let Some(u) = unk {
                bpe = bpe.unk_token(tokens[u].clone());
            }
            (
                json!({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u{2581}"},
                       {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]}),
                strip_decoder,
                crate::tokenizer::no_panic(|| bpe.build().map(ModelWrapper::from).map_err(|e| e.to_string()))
                    .and_then(|r| r),
            )
        }
        "gpt2" => {
            let pre = g.meta("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
            let (pre_type, ignore_merges, add_bos) = pre_type(&pre).map_err(|e| err(g, e))?;
            add_bos_default = add_bos;
            let merges = strings(g, "tokenizer.ggml.merges")?;
            let mut ranks: Ranks = HashMap::new();
            for (i, m) in merges.iter().enumerate() {
                // llama.cpp: the first space after the first character separates the two halves
                let cut = m.char_indices().skip(1).find(|&(_, c)| c == ' ').map(|(at, _)| at);
                let (l, r) = match cut {
                    Some(at) => (&m[..at], &m[at + 1..]),
                    None => ("", ""),
                };
                // the first rank of a repeated merge wins, as std::map::emplace keeps it
                ranks.entry(l.to_string()).or_default().entry(r.to_string()).or_insert(i);
            }
            drop(merges);
            encoder = Some(Kind::Bpe { split: Splitter::new(pre_type).map_err(|e| err(g, e))?, ranks, ignore_merges });
            // The `tokenizers` model only decodes here (the encoder above encodes, as llama.cpp does), so it needs
            // the vocabulary and no merges (llama.cpp takes files whose merges `tokenizers` would refuse).
            let bpe = BPE::builder().vocab_and_merges(vocab(), Vec::new());
            (
                serde_json::Value::Null,
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                crate::tokenizer::no_panic(|| bpe.build().map(ModelWrapper::from).map_err(|e| e.to_string()))
                    .and_then(|r| r),
            )
        }
        "bert" => {
            let lowercase = opt_bool(g, "tokenizer.ggml.normalizer.lowercase").unwrap_or(true);
            let strip_accents = opt_bool(g, "tokenizer.ggml.normalizer.strip_accents").unwrap_or(lowercase);
            encoder = Some(Kind::Wpm { lowercase, strip_accents });
            (serde_json::Value::Null, strip_decoder, word_level("[UNK]"))
        }
        _ => {
            let scores = scores.as_ref().ok_or_else(|| err(g, "missing metadata key \"tokenizer.ggml.scores\""))?;
            let charsmap: Vec<u8> = match g.meta("tokenizer.ggml.precompiled_charsmap") {
                Some(Value::Array(v)) => v
                    .iter()
                    .map(|x| x.to_u8().or_else(|_| x.to_i8().map(|b| b as u8)))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| err(g, "tokenizer.ggml.precompiled_charsmap is not an array of bytes"))?,
                Some(_) => return Err(err(g, "tokenizer.ggml.precompiled_charsmap is not an array of bytes")),
                None => vec![],
            };
            let charsmap = Charsmap::new(charsmap).map_err(|e| err(g, e))?;
            let min_score = (0..n).filter(|&i| types[i] == NORMAL).map(|i| scores[i]).fold(f32::MAX, f32::min);
            encoder = Some(Kind::Ugm {
                scores: scores[..n].to_vec(),
                unknown_score: f64::from(min_score - 10.0),
                charsmap,
                add_space_prefix: opt_bool(g, "tokenizer.ggml.add_space_prefix").unwrap_or(false),
                remove_extra_whitespaces: opt_bool(g, "tokenizer.ggml.remove_extra_whitespaces").unwrap_or(false),
            });
            (serde_json::Value::Null, strip_decoder, word_level("<unk>"))
        }
    };
    let add_bos = opt_bool(g, "tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);
    let add_eos = opt_bool(g, "tokenizer.ggml.add_eos_token").unwrap_or(model == "t5");
    // split out of the text as llama.cpp's tokenizer_st_partition does (parse_special): control and unknown tokens
    // (special), user-defined ones (added, not special)
    let added: Vec<AddedToken> = (0..n)
        .filter(|&i| control[i] || types[i] == USER_DEFINED || types[i] == UNKNOWN)
        .map(|i| AddedToken::from(tokens[i].clone(), control[i] || types[i] == UNKNOWN).normalized(false))
        .collect();
    let post = match (model.as_str(), add_bos, bos) {
        ("llama", true, Some(b)) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": tokens[b], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {tokens[b].clone(): {"id": tokens[b], "ids": [b], "tokens": [tokens[b]]}}}),
        _ => serde_json::Value::Null,
    };
    let inner = hf_model
        .and_then(|m| assemble(m, normalizer, decoder, post, added))
        .map_err(|e| err(g, format!("cannot build the tokenizer from its metadata: {e}")))?;
    let mut tok_config = serde_json::Map::new();
    for (name, i) in [("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad), ("sep_token", sep)] {
        if let Some(i) = i {
            tok_config.insert(name.into(), json!(tokens[i]));
        }
    }
    if model == "bert" {
        if let Some(b) = bos {
            tok_config.insert("cls_token".into(), json!(tokens[b]));
        }
    }
    let mut config = HashMap::new();
    if let Some(e) = eos {
        config.insert("eos_token_id", json!(e));
    }
    if let Some(e) = id("tokenizer.ggml.eot_token_id") {
        config.insert("eot_token_id", json!(e));
    }
    let gen = id("tokenizer.ggml.eot_token_id").map(|e| json!({"eos_token_id": [e]}));
    let template = g.meta("tokenizer.chat_template").and_then(|v| v.to_string().ok()).cloned();
    let tok = Tokenizer::new(inner, g.path.clone(), Some(&json!(tok_config)), Some(&json!(config)), gen.as_ref(), template)?;
    Ok(match encoder {
        None => tok,
        Some(kind) => {
            let token_to_id = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
            let mut specials: Vec<u32> = (0..n)
                .filter(|&i| control[i] || matches!(types[i], USER_DEFINED | UNKNOWN))
                .map(|i| i as u32)
                .collect();
            specials.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
            let max_token_len = tokens.iter().map(String::len).max().unwrap_or(0);
            let u = |x: Option<usize>| x.map(|i| i as u32);
            tok.with_encoder(Arc::new(Encoder {
                kind,
                tokens,
                types,
                control,
                token_to_id,
                specials,
                max_token_len,
                bos: u(bos),
                eos: u(eos),
                unk: u(unk),
                sep: u(sep),
                add_bos,
                add_eos,
            }))
        }
    })
}

/// A `tokenizers` pipeline from its model, its small parts as tokenizer.json has them (null for none) and its added
/// tokens (taken as tokenizer.json's `added_tokens` are: all at once, after the rest).
fn assemble(
    model: ModelWrapper,
    normalizer: serde_json::Value,
    decoder: serde_json::Value,
    post: serde_json::Value,
    added: Vec<AddedToken>,
) -> std::result::Result<tokenizers::Tokenizer, String> {
    crate::tokenizer::no_panic(|| -> std::result::Result<tokenizers::Tokenizer, String> {
        let mut tok = tokenizers::Tokenizer::new(model);
        fn part<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> std::result::Result<Option<T>, String> {
            serde_json::from_value(v).map_err(|e| e.to_string())
        }
        tok.with_normalizer(part::<NormalizerWrapper>(normalizer)?).map_err(|e| e.to_string())?;
        tok.with_decoder(part::<DecoderWrapper>(decoder)?);
        tok.with_post_processor(part::<PostProcessorWrapper>(post)?);
        tok.add_tokens(added).map_err(|e| e.to_string())?;
        Ok(tok)
    })
    .and_then(|r| r)
}

/// BPE merges for a SentencePiece vocabulary, as transformers derives them for Llama tokenizers: every split of a
/// piece into two pieces of the vocabulary is a merge, ranked by the score of the piece it makes (highest first;
/// splits of one piece in the order of their halves' ids).
fn spm_merges(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (t, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*index.get(&t[..at])?, *index.get(&t[at..])?)))
            .collect();
        local.sort();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    // a stable sort, highest score first, as Python's sorted(..., reverse=True) leaves equal scores in order
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges.into_iter().map(|(_, l, r)| (tokens[l].clone(), tokens[r].clone())).collect()
}

/// The pre-tokenizer type of a tokenizer.ggml.pre value, with llama.cpp's ignore_merges and add_bos defaults.
fn pre_type(pre: &str) -> std::result::Result<(&'static str, bool, bool), String> {
    // a missing value is llama.cpp's "default" (with a warning there); "gpt2" is what some writers (this
    // project's own test helpers among them) put for GPT-2's regex, which llama.cpp spells "gpt-2"
    let pre = match pre {
        "" => "default",
        "gpt2" => "gpt-2",
        p => p,
    };
    if let Some(&(_, t, ignore_merges, add_bos)) = PRE_NAMES.iter().find(|(names, ..)| names.contains(&pre)) {
        if let Some((_, why)) = PRE_UNSUPPORTED.iter().find(|(u, _)| *u == t) {
            return Err(format!("tokenizer.ggml.pre {pre:?} is not supported: {why}"));
        }
        return Ok((t, ignore_merges, add_bos));
    }
    let mut known: Vec<&str> = PRE_NAMES
        .iter()
        .filter(|(_, t, ..)| !PRE_UNSUPPORTED.iter().any(|(u, _)| u == t))
        .flat_map(|(names, ..)| names.iter().copied())
        .collect();
    known.sort();
    Err(format!("tokenizer.ggml.pre {pre:?} is not supported (supported, as llama.cpp: {})", known.join(", ")))
}

/// Every tokenizer.ggml.pre value this reads (for the docs and tests).
pub fn supported_pre_names() -> Vec<&'static str> {
    PRE_NAMES
        .iter()
        .filter(|(_, t, ..)| !PRE_UNSUPPORTED.iter().any(|(u, _)| u == t))
        .flat_map(|(names, ..)| names.iter().copied())
        .collect()
}

enum Kind {
    Bpe { split: Splitter, ranks: Ranks, ignore_merges: bool },
    Wpm { lowercase: bool, strip_accents: bool },
    Ugm { scores: Vec<f32>, unknown_score: f64, charsmap: Charsmap, add_space_prefix: bool, remove_extra_whitespaces: bool },
}

/// A GGUF vocabulary's encoder: llama_vocab::impl::tokenize for the BPE, WPM and UGM kinds.
pub struct Encoder {
    kind: Kind,
    tokens: Vec<String>,
    types: Vec<i32>,
    /// control tokens (by type, or by text as llama.cpp detects them)
    control: Vec<bool>,
    token_to_id: HashMap<String, u32>,
    /// control, user-defined and unknown tokens, longest first (llama.cpp's cache_special_tokens)
    specials: Vec<u32>,
    max_token_len: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    sep: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

enum Frag<'a> {
    Text(&'a str),
    Token(u32),
}

impl Encoder {
    /// llama_tokenize(text, add_special, parse_special = true).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let need = |id: Option<u32>, what: &str| id.ok_or_else(|| Error::tok(format!("the vocabulary has no {what} token")));
        let frags = self.partition(text);
        let (pre, post) = match &self.kind {
            Kind::Wpm { .. } => (add_special, add_special),
            _ => (add_special && self.add_bos, add_special && self.add_eos),
        };
        if pre {
            out.push(need(self.bos, "BOS")?);
        }
        for f in frags {
            match f {
                Frag::Token(id) => out.push(id),
                Frag::Text(t) => match &self.kind {
                    Kind::Bpe { split, ranks, ignore_merges } => self.bpe(t, split, ranks, *ignore_merges, &mut out)?,
                    Kind::Wpm { lowercase, strip_accents } => self.wpm(t, *lowercase, *strip_accents, &mut out)?,
                    Kind::Ugm { .. } => self.ugm(t, &mut out)?,
                },
            }
        }
        if post {
            out.push(match &self.kind {
                Kind::Wpm { .. } => need(self.sep, "SEP")?,
                _ => need(self.eos, "EOS")?,
            });
        }
        Ok(out)
    }

    /// llama.cpp's detokenize for byte-level BPE: normal tokens back to their bytes, user-defined and (unless
    /// skipped) control tokens as their text. None for the other kinds (their `tokenizers` decoder is used).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Option<String> {
        if !matches!(self.kind, Kind::Bpe { .. }) {
            return None;
        }
        let chars = byte_chars();
        let mut bytes = Vec::new();
        for &id in ids {
            let text = &self.tokens[id as usize];
            if self.control[id as usize] {
                if !skip_special_tokens {
                    bytes.extend_from_slice(text.as_bytes());
                }
            } else if self.types[id as usize] == USER_DEFINED {
                bytes.extend_from_slice(text.as_bytes());
            } else {
                for c in text.chars() {
                    match chars.iter().position(|&b| b == c) {
                        Some(b) => bytes.push(b as u8),
                        None => bytes.extend_from_slice(c.to_string().as_bytes()),
                    }
                }
            }
        }
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// tokenizer_st_partition: every occurrence of a special token's text becomes that token, longest first.
    fn partition<'a>(&self, text: &'a str) -> Vec<Frag<'a>> {
        let mut frags = if text.is_empty() { vec![] } else { vec![Frag::Text(text)] };
        for &id in &self.specials {
            let s = self.tokens[id as usize].as_str();
            if !frags.iter().any(|f| matches!(f, Frag::Text(t) if t.contains(s))) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Frag::Text(mut t) => {
                        while let Some(at) = t.find(s) {
                            if at > 0 {
                                next.push(Frag::Text(&t[..at]));
                            }
                            next.push(Frag::Token(id));
                            t = &t[at + s.len()..];
                        }
                        if !t.is_empty() {
                            next.push(Frag::Text(t));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    /// llm_tokenizer_bpe_session::tokenize: split, map bytes to GPT-2's characters, merge by rank.
    fn bpe(
        &self,
        text: &str,
        split: &Splitter,
        ranks: &Ranks,
        ignore_merges: bool,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let bytes = byte_chars();
        for word in split.split(text)? {
            let word: String = word.bytes().map(|b| bytes[b as usize]).collect();
            if ignore_merges {
                if let Some(&id) = self.token_to_id.get(&word) {
                    out.push(id);
                    continue;
                }
            }
            let symbols = merge(&word, ranks);
            for s in symbols {
                match self.token_to_id.get(s) {
                    Some(&id) => out.push(id),
                    // llama.cpp looks each byte of a piece outside the vocabulary up as a one-byte token
                    None => out.extend(
                        s.bytes().filter(|b| b.is_ascii()).filter_map(|b| self.token_to_id.get(&(b as char).to_string()).copied()),
                    ),
                }
            }
        }
        Ok(())
    }

    /// llm_tokenizer_wpm_session::tokenize: BERT's basic split, then the longest vocabulary piece at each point of
    /// "▁" + word (llama.cpp's converter writes word starts as ▁x and continuations without ##).
    fn wpm(&self, text: &str, lowercase: bool, strip_accents: bool, out: &mut Vec<u32>) -> Result<()> {
        use unicode_normalization_alignments::UnicodeNormalization;
        // llama.cpp's unicode_cpts_normalize_nfd keeps one code point per character: the first of its NFD (é -> e,
        // 어 -> ᄋ), so a decomposition's marks and trailing jamo are dropped, not split off
        let first_nfd = |c: char| c.to_string().as_str().nfd().next().map(|(d, _)| d).unwrap_or(c);
        let cpts: Vec<char> = if strip_accents { text.chars().map(first_nfd).collect() } else { text.chars().collect() };
        let mut words: Vec<String> = vec![String::new()];
        for c in cpts {
            if c.is_whitespace() {
                if !words.last().unwrap().is_empty() {
                    words.push(String::new());
                }
                continue;
            }
            let cat = category(c);
            if c == '\0' || c == '\u{FFFD}' || cat == Cat::Control {
                continue;
            }
            if strip_accents && cat == Cat::Mark {
                continue;
            }
            let c = if lowercase { c.to_lowercase().next().unwrap_or(c) } else { c };
            if cat == Cat::Punct || ((c as u32) < 0x7F && cat == Cat::Symbol) || is_chinese_char(c as u32) {
                if !words.last().unwrap().is_empty() {
                    words.push(String::new());
                }
                *words.last_mut().unwrap() = c.to_string();
                words.push(String::new());
            } else {
                words.last_mut().unwrap().push(c);
            }
        }
        for word in words.iter().filter(|w| !w.is_empty()) {
            let word = format!("\u{2581}{word}");
            let n = word.len();
            let start = out.len();
            let mut i = 0;
            while i < n {
                let mut found = false;
                let mut j = n.min(i + self.max_token_len + 1);
                while j > i {
                    if let Some(&id) = word.get(i..j).and_then(|p| self.token_to_id.get(p)) {
                        out.push(id);
                        found = true;
                        i = j;
                        break;
                    }
                    j -= 1;
                }
                if !found {
                    out.truncate(start);
                    break;
                }
            }
            if out.len() == start {
                out.push(self.unk.ok_or_else(|| Error::tok("the vocabulary has no unknown token"))?);
            }
        }
        Ok(())
    }

    /// llm_tokenizer_ugm_session::tokenize: SentencePiece's normalisation (precompiled charsmap, spaces as ▁),
    /// then the best-scoring segmentation (Viterbi), unknown characters scored min score - 10.
    fn ugm(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let Kind::Ugm { scores, unknown_score, charsmap, add_space_prefix, remove_extra_whitespaces } = &self.kind else {
            unreachable!()
        };
        let unk = self.unk.ok_or_else(|| Error::tok("the vocabulary has no unknown token"))?;
        // normalize
        let input = text.as_bytes();
        let mut norm: Vec<u8> = Vec::with_capacity(input.len() * 3);
        let space = "\u{2581}".as_bytes();
        let user_defined = |at: usize| -> usize {
            (1..=self.max_token_len.min(input.len() - at))
                .rev()
                .find(|&l| {
                    std::str::from_utf8(&input[at..at + l])
                        .ok()
                        .and_then(|p| self.token_to_id.get(p))
                        .is_some_and(|&id| self.types[id as usize] == USER_DEFINED)
                })
                .unwrap_or(0)
        };
        let (mut prepended, mut in_word) = (false, false);
        let mut at = 0;
        while at < input.len() {
            let (piece, consumed): (Vec<u8>, usize) = match user_defined(at) {
                0 => match charsmap.longest(&input[at..])? {
                    Some((repl, len)) => (repl, len),
                    None => {
                        let l = utf8_len(input[at]).min(input.len() - at);
                        (input[at..at + l].to_vec(), l)
                    }
                },
                l => (input[at..at + l].to_vec(), l),
            };
            for &c in &piece {
                if c != b' ' {
                    if !in_word {
                        in_word = true;
                        if (*add_space_prefix && !prepended) || *remove_extra_whitespaces {
                            norm.extend_from_slice(space);
                            prepended = true;
                        }
                    }
                    norm.push(c);
                } else {
                    in_word = false;
                    if !*remove_extra_whitespaces {
                        norm.extend_from_slice(space);
                    }
                }
            }
            at += consumed;
        }
        let len = norm.len();
        if len == 0 {
            return Ok(());
        }
        // Viterbi over byte offsets
        let mut best: Vec<(u32, usize, f64)> = vec![(unk, 0, f64::MIN); len + 1];
        best[0] = (unk, 0, 0.0);
        let mut pos = 0;
        while pos < len {
            let cp_len = utf8_len(norm[pos]).min(len - pos);
            let here = best[pos].2;
            let mut single = false;
            for end in pos + 1..=len.min(pos + self.max_token_len) {
                let Ok(piece) = std::str::from_utf8(&norm[pos..end]) else { continue };
                let Some(&id) = self.token_to_id.get(piece) else { continue };
                let t = self.types[id as usize];
                if !(t == NORMAL || t == USER_DEFINED || t == UNUSED) {
                    continue;
                }
                if end - pos == cp_len {
                    single = true;
                }
                let score = here + if t == USER_DEFINED { 0.0 } else { f64::from(scores[id as usize]) };
                if score > best[end].2 {
                    best[end] = (id, pos, score);
                }
            }
            if !single {
                let score = here + unknown_score;
                if score > best[pos + cp_len].2 {
                    best[pos + cp_len] = (unk, pos, score);
                }
            }
            pos += cp_len;
        }
        let start = out.len();
        let mut at = len;
        let mut prev_unknown = false;
        loop {
            let (id, from, _) = best[at];
            let unknown = id == unk;
            if !(prev_unknown && unknown) {
                out.push(id);
            }
            if from == 0 {
                break;
            }
            prev_unknown = unknown;
            at = from;
        }
        out[start..].reverse();
        Ok(())
    }
}

/// BPE ranks: left half -> right half -> rank (looked up without building a key).
type Ranks = HashMap<String, HashMap<String, usize>>;

/// llm_tokenizer_bpe_session's merging: one symbol per character, then always the adjacent pair of lowest rank
/// (the leftmost of equal ranks), with a queue of pairs checked against the symbols' current lengths.
fn merge<'a>(word: &'a str, ranks: &Ranks) -> Vec<&'a str> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // (start, len, prev, next) of each symbol; len 0 = merged away
    let mut sym: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (i, (at, c)) in word.char_indices().enumerate() {
        sym.push((at, c.len_utf8(), i.wrapping_sub(1), i + 1));
    }
    let n = sym.len();
    let text = |s: &(usize, usize, usize, usize)| &word[s.0..s.0 + s.1];
    let mut queue: BinaryHeap<Reverse<(usize, usize, usize, usize)>> = BinaryHeap::new();
    let push = |queue: &mut BinaryHeap<_>, sym: &[(usize, usize, usize, usize)], l: usize, r: usize| {
        if l >= n || r >= n {
            return;
        }
        if let Some(&rank) = ranks.get(text(&sym[l])).and_then(|m| m.get(text(&sym[r]))) {
            queue.push(Reverse((rank, l, sym[l].1, sym[r].1)));
        }
    };
    for i in 1..n {
        push(&mut queue, &sym, i - 1, i);
    }
    while let Some(Reverse((_, l, len_l, len_r))) = queue.pop() {
        let r = sym[l].3;
        if sym[l].1 != len_l || r >= n || sym[r].1 != len_r || len_l == 0 || len_r == 0 {
            continue; // outdated
        }
        sym[l].1 += sym[r].1;
        sym[r].1 = 0;
        sym[l].3 = sym[r].3;
        if sym[r].3 < n {
            let next = sym[r].3;
            sym[next].2 = l;
        }
        let prev = sym[l].2;
        push(&mut queue, &sym, prev, l);
        let next = sym[l].3;
        push(&mut queue, &sym, l, next);
    }
    sym.iter().filter(|s| s.1 > 0).map(text).collect()
}

fn utf8_len(b: u8) -> usize {
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4][(b >> 4) as usize]
}

fn is_chinese_char(c: u32) -> bool {
    (0x4E00..=0x9FFF).contains(&c)
        || (0x3400..=0x4DBF).contains(&c)
        || (0x20000..=0x2A6DF).contains(&c)
        || (0x2A700..=0x2B73F).contains(&c)
        || (0x2B740..=0x2B81F).contains(&c)
        || (0x2B920..=0x2CEAF).contains(&c)
        || (0xF900..=0xFAFF).contains(&c)
        || (0x2F800..=0x2FA1F).contains(&c)
}

/// GPT-2's bytes_to_unicode: every byte as a printable character.
fn byte_chars() -> &'static [char; 256] {
    static T: OnceLock<[char; 256]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
            t[b as usize] = if printable {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            };
        }
        t
    })
}

/// llama.cpp's unicode_cpt_flags categories.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cat {
    Number,
    Letter,
    Punct,
    Mark,
    Symbol,
    Control,
    Other,
}

fn category(c: char) -> Cat {
    static RE: OnceLock<Vec<(regex::Regex, Cat)>> = OnceLock::new();
    let re = RE.get_or_init(|| {
        [(r"\p{N}", Cat::Number), (r"\p{L}", Cat::Letter), (r"\p{P}", Cat::Punct), (r"\p{M}", Cat::Mark),
         (r"\p{S}", Cat::Symbol), (r"\p{C}", Cat::Control)]
            .into_iter()
            .map(|(p, c)| (regex::Regex::new(&format!("^{p}$")).expect("category regex"), c))
            .collect()
    });
    let mut buf = [0u8; 4];
    let s = c.encode_utf8(&mut buf);
    re.iter().find(|(r, _)| r.is_match(s)).map(|&(_, c)| c).unwrap_or(Cat::Other)
}

/// How one of llama.cpp's regexes runs (unicode_regex_split): its hand-written splitters (GPT-2, Llama 3, Qwen2,
/// Qwen3.5, newlines) are the regex itself on full Unicode classes; any other regex with \p{..} classes runs on
/// the "collapsed" text (each non-ASCII character replaced by a stand-in for its category, the class by that
/// stand-in plus its ASCII members); one without them runs on the text with non-ASCII spaces as \x0B, as
/// std::wregex sees it.
enum Mode {
    Unicode,
    Collapsed,
    Wide,
}

struct Splitter {
    regexes: Vec<(fancy_regex::Regex, Mode)>,
}

const GPT2_REGEX: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const NEWLINES_REGEX: &str = r"[^\n]+|[\n]+";

/// The categories llama.cpp collapses (k_ucat_enum / k_ucat_cpt / k_ucat_map): stand-in character, ASCII members.
fn collapsed_class(name: &str) -> Option<(char, &'static str)> {
    const PUNCT: &str = r"\x{21}-\x{23}\x{25}-\x{2A}\x{2C}-\x{2F}\x{3A}-\x{3B}\x{3F}-\x{40}\x{5B}-\x{5D}\x{5F}\x{7B}\x{7D}";
    const SYMBOL: &str = r"\x{24}\x{2B}\x{3C}-\x{3E}\x{5E}\x{60}\x{7C}\x{7E}";
    Some(match name {
        "N" => ('\u{F0D1}', "0-9"),
        "L" | "Lu" | "Ll" | "Lt" | "Lm" | "Lo" => ('\u{F0D2}', "A-Za-z"),
        "P" => ('\u{F0D3}', PUNCT),
        "M" => ('\u{F0D4}', ""),
        "S" => ('\u{F0D5}', SYMBOL),
        _ => return None,
    })
}

fn collapse(c: char) -> char {
    if c.is_ascii() {
        return c;
    }
    if c.is_whitespace() {
        return '\x0B';
    }
    match category(c) {
        Cat::Number => '\u{F0D1}',
        Cat::Letter => '\u{F0D2}',
        Cat::Punct => '\u{F0D3}',
        Cat::Mark => '\u{F0D4}',
        Cat::Symbol => '\u{F0D5}',
        _ => '\u{F0D0}',
    }
}

/// A regex of llama.cpp's table in the syntax of the Rust engine, with ECMAScript's ASCII \s \d \w, and (collapsed)
/// each \p{..} as llama.cpp rewrites it.
fn translate(regex: &str, collapsed: bool) -> std::result::Result<String, String> {
    const WS: &str = r"\t\n\x0B\x0C\r ";
    let c: Vec<char> = regex.chars().collect();
    let mut out = String::new();
    let mut inside = false;
    let mut i = 0;
    while i < c.len() {
        if c[i] == '[' && (i == 0 || c[i - 1] != '\\') {
            out.push('[');
            inside = true;
            i += 1;
            continue;
        }
        if inside && c[i] == ']' && c[i - 1] != '\\' {
            out.push(']');
            inside = false;
            i += 1;
            continue;
        }
        if c[i] == '\\' && i + 1 < c.len() {
            let d = c[i + 1];
            if d == 'p' && collapsed && c.get(i + 2) == Some(&'{') {
                if let Some(close) = c[i + 3..].iter().position(|&x| x == '}').map(|p| p + i + 3) {
                    let name: String = c[i + 3..close].iter().collect();
                    let (stand_in, ascii) =
                        collapsed_class(&name).ok_or_else(|| format!("regex class \\p{{{name}}} is not implemented"))?;
                    let body = format!("\\x{{{:X}}}{ascii}", stand_in as u32);
                    out.push_str(&if inside { body } else { format!("[{body}]") });
                    i = close + 1;
                    continue;
                }
            }
            let class = |set: &str, neg: bool| -> std::result::Result<String, String> {
                match (inside, neg) {
                    (true, false) => Ok(set.to_string()),
                    (true, true) => Err(format!("a negated class inside [] in {regex:?} is not implemented")),
                    (false, n) => Ok(format!("[{}{set}]", if n { "^" } else { "" })),
                }
            };
            let rep = match d {
                's' => Some(class(WS, false)?),
                'S' => Some(class(WS, true)?),
                'd' => Some(class("0-9", false)?),
                'D' => Some(class("0-9", true)?),
                'w' => Some(class("0-9A-Za-z_", false)?),
                'W' => Some(class("0-9A-Za-z_", true)?),
                _ => None,
            };
            match rep {
                Some(r) => out.push_str(&r),
                None => {
                    out.push('\\');
                    out.push(d);
                }
            }
            i += 2;
            continue;
        }
        out.push(c[i]);
        i += 1;
    }
    Ok(out)
}

impl Splitter {
    fn new(pre_type: &str) -> std::result::Result<Self, String> {
        let (_, regexes) = PRE_REGEXES
            .iter()
            .find(|(t, _)| *t == pre_type)
            .ok_or_else(|| format!("pre-tokenizer type {pre_type} has no regexes"))?;
        let regexes = regexes
            .iter()
            .map(|&r| {
                let (pattern, mode) = if r == GPT2_REGEX {
                    // llama.cpp's hand-written GPT-2 splitter ends with the \s+ the regex leaves out
                    (format!("{r}|\\s+"), Mode::Unicode)
                } else if [LLAMA3_REGEX, QWEN2_REGEX, QWEN35_REGEX, NEWLINES_REGEX].contains(&r) {
                    (r.to_string(), Mode::Unicode)
                } else if ["\\p{N}", "\\p{L}", "\\p{P}", "\\p{M}", "\\p{S}"].iter().any(|p| r.contains(p)) {
                    if !r.is_ascii() {
                        return Err(format!("regex {r:?} has both \\p{{..}} classes and non-ASCII characters"));
                    }
                    (translate(r, true)?, Mode::Collapsed)
                } else {
                    (translate(r, false)?, Mode::Wide)
                };
                let re = fancy_regex::Regex::new(&pattern).map_err(|e| format!("regex {r:?}: {e}"))?;
                Ok((re, mode))
            })
            .collect::<std::result::Result<_, String>>()?;
        Ok(Self { regexes })
    }

    /// unicode_regex_split without the byte encoding: each regex splits every piece the previous ones made into
    /// its matches and the text between them.
    fn split<'a>(&self, text: &'a str) -> Result<Vec<&'a str>> {
        let chars: Vec<char> = text.chars().collect();
        let offsets = |s: &str| -> Vec<usize> { s.char_indices().map(|(i, _)| i).chain([s.len()]).collect() };
        let orig = offsets(text);
        let mut views: [Option<(String, Vec<usize>)>; 3] = [None, None, None];
        let mut pieces: Vec<(usize, usize)> = vec![(0, chars.len())];
        for (re, mode) in &self.regexes {
            let k = match mode {
                Mode::Unicode => 0,
                Mode::Collapsed => 1,
                Mode::Wide => 2,
            };
            if views[k].is_none() {
                let s: String = match mode {
                    Mode::Unicode => text.to_string(),
                    Mode::Collapsed => chars.iter().map(|&c| collapse(c)).collect(),
                    Mode::Wide => chars.iter().map(|&c| if !c.is_ascii() && c.is_whitespace() { '\x0B' } else { c }).collect(),
                };
                let o = offsets(&s);
                views[k] = Some((s, o));
            }
            let (s, off) = views[k].as_ref().unwrap();
            let to_char = |byte: usize| off.binary_search(&byte).expect("a match ends on a character boundary");
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for &(a, b) in &pieces {
                let base = off[a];
                let mut last = a;
                for m in re.find_iter(&s[base..off[b]]) {
                    let m = m.map_err(|e| Error::tok(format!("pre-tokenizer regex: {e}")))?;
                    let (ms, me) = (to_char(base + m.start()), to_char(base + m.end()));
                    if ms > last {
                        next.push((last, ms));
                    }
                    if me > ms {
                        next.push((ms, me));
                    }
                    last = me;
                }
                if last < b {
                    next.push((last, b));
                }
            }
            pieces = next;
        }
        Ok(pieces.into_iter().map(|(a, b)| &text[orig[a]..orig[b]]).collect())
    }
}

/// SentencePiece's precompiled charsmap (tokenizer.ggml.precompiled_charsmap): an XOR-compressed double array of
/// prefixes and their null-terminated replacements, read as llama.cpp's llm_tokenizer_ugm reads it.
struct Charsmap {
    xcda: Vec<u32>,
    replacements: Vec<u8>,
}

impl Charsmap {
    fn new(bytes: Vec<u8>) -> std::result::Result<Self, String> {
        if bytes.is_empty() {
            return Ok(Self { xcda: vec![], replacements: vec![] });
        }
        if bytes.len() < 4 {
            return Err("precompiled_charsmap is too small for its header".into());
        }
        let size = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        if size + 4 >= bytes.len() {
            return Err("precompiled_charsmap: its double array runs past its end".into());
        }
        let xcda = bytes[4..4 + size].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        Ok(Self { xcda, replacements: bytes[4 + size..].to_vec() })
    }

    /// The replacement of the longest prefix of `input` in the map, and that prefix's length.
    fn longest(&self, input: &[u8]) -> Result<Option<(Vec<u8>, usize)>> {
        if self.xcda.is_empty() {
            return Ok(None);
        }
        let node = |i: usize| -> Result<u32> {
            self.xcda.get(i).copied().ok_or_else(|| Error::tok("precompiled_charsmap: index out of bounds"))
        };
        let base = |n: u32| ((n >> 10) << ((n & (1 << 9)) >> 6)) as usize;
        let lcheck = |n: u32| n & ((1 << 31) | 0xff);
        let leaf = |n: u32| (n >> 8) & 1 == 1;
        let value = |n: u32| (n & ((1 << 31) - 1)) as usize;
        let mut best: Option<(usize, usize)> = None;
        let mut index = base(node(0)?);
        for (k, &c) in input.iter().enumerate() {
            if c == 0 {
                break;
            }
            index ^= c as usize;
            let n = node(index)?;
            if lcheck(n) != c as u32 {
                break;
            }
            let is_leaf = leaf(n);
            index ^= base(n);
            if is_leaf {
                best = Some((k + 1, value(node(index)?)));
            }
        }
        let Some((len, at)) = best else { return Ok(None) };
        let rest = self.replacements.get(at..).ok_or_else(|| Error::tok("precompiled_charsmap: index out of bounds"))?;
        let end = rest.iter().position(|&b| b == 0).ok_or_else(|| Error::tok("precompiled_charsmap: unterminated string"))?;
        Ok(Some((rest[..end].to_vec(), len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(pre: &str, text: &str) -> Vec<String> {
        let (t, ..) = pre_type(pre).unwrap();
        Splitter::new(t).unwrap().split(text).unwrap().into_iter().map(String::from).collect()
    }

    #[test]
    fn every_supported_pre_compiles() {
        for name in supported_pre_names() {
            let (t, ..) = pre_type(name).unwrap();
            Splitter::new(t).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn pre_splits_as_llama_cpp() {
        assert_eq!(split("gpt-2", "Hello world's  123"), ["Hello", " world", "'s", " ", " 123"]);
        assert_eq!(split("llama-bpe", "12345 abc"), ["123", "45", " abc"]);
        assert_eq!(split("qwen2", "12 x"), ["1", "2", " x"]);
        // falcon: punctuation runs first, then GPT-2's regex, then 3-digit groups
        assert_eq!(split("falcon", "a+b 1234"), ["a", "+", "b", " ", "123", "4"]);
        assert_eq!(split("superbpe", "1234567"), ["1", "234", "567"]);
    }

    #[test]
    fn unknown_pre_lists_the_supported_ones() {
        let e = pre_type("nope").unwrap_err();
        assert!(e.contains("\"nope\"") && e.contains("deepseek-llm") && e.contains("tekken"), "{e}");
        assert!(pre_type("kimi-k2").unwrap_err().contains("kimi-k2"));
    }
}
