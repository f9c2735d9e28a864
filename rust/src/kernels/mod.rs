//! The CPU kernels: plain functions on slices of numbers, no tensors. Each fast kernel keeps a plain twin (the
//! portable Rust it must agree with) and a test comparing the two; which one runs is decided by `cpu::isa()`.
//!
//! - `cpu`: the instruction-set level (found once; `CANDLEWICK_ISA` lowers it) and the thread helpers;
//! - `dense`: f32 / bf16 / f16 weights in panels, matrix-vector and gemm products;
//! - `quant`: llama.cpp's block formats (format: the GGML blocks; pack: the repacked rows; tile: the
//!   integer dot-product kernels);
//! - `attention`: blocked causal attention without a score tensor;
//! - `act`: vectorised GELU, SiLU, SwiGLU and the softmax exponentials;
//! - `team`: every thread on one job in stages with barriers between (the decode step);
//! - `huge`: the buffers weights are packed into, in huge-page regions.
//!
//! The layers that hold weights and call these (and fall back to Candle elsewhere) live in `crate::nn`.

pub mod act;
pub mod attention;
pub mod cpu;
pub mod dense;
pub mod huge;
pub mod quant;
pub mod team;

#[cfg(test)]
pub(crate) mod testing;
