//! Test helpers shared by the kernels' tests and the layers' tests.

/// Deterministic values in [-1, 1).
pub(crate) fn vals(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}


/// Plain f64 loop: the reference every kernel must agree with.
pub(crate) fn reference_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let d: f64 = (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum();
            out[i * n + j] = d + bias.map_or(0.0, |b| b[j] as f64);
        }
    }
    out
}

