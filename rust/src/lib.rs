//! candlewick: Transformer inference on Candle. The core is plain Rust; `py/` holds the only Python bindings.
//!
//! `kernels/` are the CPU kernels on slices; `nn/` the layers on tensors that hold weights and call them;
//! `models/` the architectures wired from those layers; `model.rs` loads any of them from safetensors or GGUF;
//! `scheduler.rs` runs many requests as one flattened batch over a paged KV cache; `generate.rs` and
//! `sampling.rs` decode. docs/architecture.md has the whole map.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod constraint;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod gguf_vocab;
pub mod kernels;
pub mod model;
pub mod models;
pub mod nn;
pub mod ops;
pub mod sampling;
pub mod scheduler;
pub mod tokenizer;
pub mod weights;

#[cfg(feature = "python")]
mod py;

pub use error::{Error, Result};
