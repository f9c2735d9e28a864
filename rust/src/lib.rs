//! candlewick: Transformer inference on Candle. The core is plain Rust; `py/` holds the only Python bindings.

pub mod config;
pub mod cpu_attention;
pub mod device;
pub mod error;
pub mod fastmath;
pub mod generate;
pub mod gguf;
pub mod gguf_vocab;
pub mod linear;
pub mod model;
pub mod models;
pub mod ops;
pub mod qkernels;
pub mod quantized;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
