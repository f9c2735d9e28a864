//! Causal (or full) scaled dot-product attention for f32 on CPU, without an additive mask: per (batch, head, block of
//! 64 queries) task, scores for only the keys the block can see (a causal block skips the keys after its last
//! query, which halves the work of a long prefill), a softmax with a vectorised `exp`, and the weighted sum of
//! values, all in one pass over a block-sized scratch buffer: no [B, H, Tq, Tk] score tensor, no mask tensor, no
//! copies of k and v (any strides with contiguous rows of D work, e.g. views into a larger cache).
//!
//! An additive f32 mask [B, 1, Tq, Tk] (what generation builds to hide a left-padded batch's padding) is added to
//! the scores before the softmax. The general path (other masks, other dtypes or devices) stays Candle's.

use candle_core::{DType, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use super::cpu::SendPtr;

/// Queries per task.
const QBLOCK: usize = 64;

/// Strides (in elements) of a rank-4 [B, H, T, D] view whose rows of D are contiguous, with its start offset.
fn strides4(l: &Layout) -> Option<([usize; 3], usize)> {
    let s = l.stride();
    (s.len() == 4 && (s[3] == 1 || l.dims()[3] == 1)).then(|| ([s[0], s[1], s[2]], l.start_offset()))
}

/// softmax(q·kᵀ·scale [causal] [+ mask]) · v for q [B, H, Tq, D], k and v [B, Hkv, Tk, D] (shapes already checked
/// by the caller, H % Hkv == 0, Tq <= Tk when causal), `mask` additive f32 [B, 1, Tq, Tk]; None where this kernel
/// does not apply.
/// `window`: query i (at position Tk - Tq + i) sees only keys less than `window` positions before it; `softcap`:
/// scores s become cap·tanh(s / cap) before the mask.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    causal: bool,
    mask: Option<&Tensor>,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    let all_cpu_f32 = [q, k, v].iter().chain(mask.as_ref()).all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if !all_cpu_f32 {
        return Ok(None);
    }
    let (b, h, tq, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    if k.dims4()? != (b, hkv, tk, d) || v.dims4()? != (b, hkv, tk, d) {
        return Ok(None);
    }
    if mask.is_some_and(|m| m.dims() != [b, 1, tq, tk]) {
        return Ok(None);
    }
    let mask = mask.map(Tensor::contiguous).transpose()?;
    if b == 0 || h == 0 || tq == 0 || d == 0 || tk == 0 || hkv == 0 || h % hkv != 0 || ((causal || window.is_some()) && tq > tk) {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let (k, v) = match (strides4(k.layout()), strides4(v.layout())) {
        (Some(_), Some(_)) => (k.clone(), v.clone()),
        _ => (k.contiguous()?, v.contiguous()?),
    };
    let (Some((ks, k0)), Some((vs, v0))) = (strides4(k.layout()), strides4(v.layout())) else { return Ok(None) };
    let rep = h / hkv;
    let off = tk.saturating_sub(tq); // query i sits at position off + i (Tq <= Tk when causal or windowed)
    let scale = scale as f32;

    let mut out = vec![0f32; b * h * tq * d];
    {
        let (qg, _) = q.storage_and_layout();
        let (kg, _) = k.storage_and_layout();
        let (vg, _) = v.storage_and_layout();
        let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qg, &*kg, &*vg) else { return Ok(None) };
        let mg = mask.as_ref().map(|m| m.storage_and_layout());
        let md: Option<&[f32]> = match &mg {
            Some((g, l)) => match &**g {
                Storage::Cpu(c) => Some(&c.as_slice::<f32>()?[l.start_offset()..l.start_offset() + b * tq * tk]),
                _ => return Ok(None),
            },
            None => None,
        };
        let qd = &qc.as_slice::<f32>()?[q.layout().start_offset()..];
        let (kd, vd) = (kc.as_slice::<f32>()?, vc.as_slice::<f32>()?);
        // every element the tasks read must lie inside the storages
        let last = |s: [usize; 3], o: usize| o + (b - 1) * s[0] + (hkv - 1) * s[1] + (tk - 1) * s[2] + d;
        if qd.len() < b * h * tq * d || kd.len() < last(ks, k0) || vd.len() < last(vs, v0) {
            return Ok(None);
        }
        let nblk = tq.div_ceil(QBLOCK);
        let dst = SendPtr(out.as_mut_ptr());
        let task = |t: usize| {
            let (bh, blk) = (t / nblk, t % nblk);
            let (bi, hi) = (bh / h, bh % h);
            let g = hi / rep;
            let i0 = blk * QBLOCK;
            let rows = QBLOCK.min(tq - i0);
            let kend = if causal { (off + i0 + rows).min(tk) } else { tk };
            // with a window, the block's first query sees nothing before kstart (and later ones less)
            let kstart = window.map_or(0, |w| (off + i0 + 1).saturating_sub(w)).min(kend);
            let qp = &qd[(bh * tq + i0) * d..(bh * tq + i0 + rows) * d];
            let kb = k0 + bi * ks[0] + g * ks[1];
            let vb = v0 + bi * vs[0] + g * vs[1];
            // SAFETY: task t alone writes rows i0..i0+rows of head (bi, hi); bounds of k and v were checked above.
            let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add((bh * tq + i0) * d), rows * d) };
            let mrows = md.map(|m| &m[(bi * tq + i0) * tk + kstart..(bi * tq + i0 + rows) * tk]);
            let span = Span { kend: kend - kstart, causal_first: causal.then(|| off + i0 - kstart), window_first: window.map(|w| (off + i0 + 1 - kstart, w)) };
            let seg = [Seg { k: kb + kstart * ks[2], v: vb + vs[2] * kstart, len: kend - kstart }];
            let kv = Kv { k: kd, k_rs: ks[2], v: vd, v_rs: vs[2], segs: &seg };
            block(qp, d, rows, d, &kv, span, mrows, tk, scale, softcap.map(|c| c as f32), o, d);
        };
        let n_tasks = b * h * nblk;
        // Decoding (one query per head, short context) is too little work to share out.
        if n_tasks > 1 && tq * tk * d * b * h >= 1 << 17 {
            (0..n_tasks).into_par_iter().for_each(task);
        } else {
            (0..n_tasks).for_each(task);
        }
    }
    Ok(Some(Tensor::from_vec(out, (b, h, tq, d), q.device())?))
}

/// Causal attention of a flattened (ragged) batch over a paged KV pool, f32 on CPU: q [1, H, N, D], pools
/// [S, Hkv·D] (slot = block · block_size + offset) -> [1, H, N, D]; None where this kernel does not apply. Each
/// (sequence, head, block of 64 queries) is a task over the key runs of its blocks, as `attention` does for one
/// contiguous run.
#[allow(clippy::too_many_arguments)]
pub fn paged(
    q: &Tensor,
    kpool: &Tensor,
    vpool: &Tensor,
    seqs: &[crate::nn::paged::PagedSeq],
    block_size: usize,
    hkv: usize,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    if ![q, kpool, vpool].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32) {
        return Ok(None);
    }
    let (one, h, n, d) = q.dims4()?;
    let (slots, width) = kpool.dims2()?;
    if one != 1 || hkv == 0 || h % hkv != 0 || width != hkv * d || vpool.dims2()? != (slots, width) || block_size == 0 {
        return Ok(None);
    }
    if !kpool.is_contiguous() || !vpool.is_contiguous() {
        return Ok(None);
    }
    // every sequence's rows inside the batch, its context covered by its blocks, every block inside the pool
    let nb = slots / block_size;
    let fits = seqs.iter().all(|s| {
        s.row0 + s.rows <= n
            && s.rows <= s.ctx
            && s.blocks.len() * block_size >= s.ctx
            && s.blocks[..s.ctx.div_ceil(block_size)].iter().all(|&b| (b as usize) < nb)
    });
    if !fits {
        return Ok(None);
    }
    let q = q.contiguous()?;
    let rep = h / hkv;
    let scale = scale as f32;
    let mut tasks = vec![];
    for (si, s) in seqs.iter().enumerate() {
        for hi in 0..h {
            for i0 in (0..s.rows).step_by(QBLOCK) {
                tasks.push((si, hi, i0));
            }
        }
    }
    let mut out = vec![0f32; h * n * d];
    {
        let (qg, ql) = q.storage_and_layout();
        let (kg, kl) = kpool.storage_and_layout();
        let (vg, vl) = vpool.storage_and_layout();
        let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qg, &*kg, &*vg) else { return Ok(None) };
        let qd = &qc.as_slice::<f32>()?[ql.start_offset()..ql.start_offset() + h * n * d];
        let kd = &kc.as_slice::<f32>()?[kl.start_offset()..kl.start_offset() + slots * width];
        let vd = &vc.as_slice::<f32>()?[vl.start_offset()..vl.start_offset() + slots * width];
        let dst = SendPtr(out.as_mut_ptr());
        let task = |&(si, hi, i0): &(usize, usize, usize)| {
            let s = &seqs[si];
            let g = hi / rep;
            let rows = QBLOCK.min(s.rows - i0);
            let off = s.ctx - s.rows; // query i sits at position off + i
            let kend = off + i0 + rows;
            let kstart = window.map_or(0, |w| (off + i0 + 1).saturating_sub(w)).min(kend);
            let mut segs: Vec<Seg> = Vec::with_capacity((kend - kstart).div_ceil(block_size) + 1);
            let mut j = kstart;
            while j < kend {
                let (blk, at) = (j / block_size, j % block_size);
                let len = (block_size - at).min(kend - j);
                let slot = s.blocks[blk] as usize * block_size + at;
                let off = slot * width + g * d;
                match segs.last_mut() {
                    // blocks next to each other in the pool are one run
                    Some(last) if last.k + last.len * width == off => last.len += len,
                    _ => segs.push(Seg { k: off, v: off, len }),
                }
                j += len;
            }
            let row = hi * n + s.row0 + i0;
            let qp = &qd[row * d..(row + rows) * d];
            // SAFETY: task (sequence, head, i0) alone writes rows i0..i0+rows of that sequence's head hi, which
            // lie inside `out` (row0 + rows <= N was checked above).
            let o = unsafe { std::slice::from_raw_parts_mut(dst.get().add(row * d), rows * d) };
            let span = Span { kend: kend - kstart, causal_first: Some(off + i0 - kstart), window_first: window.map(|w| (off + i0 + 1 - kstart, w)) };
            let kv = Kv { k: kd, k_rs: width, v: vd, v_rs: width, segs: &segs };
            block(qp, d, rows, d, &kv, span, None, 0, scale, softcap.map(|c| c as f32), o, d);
        };
        let work: usize = seqs.iter().map(|s| s.rows * s.ctx).sum::<usize>() * d * h;
        if tasks.len() > 1 && work >= 1 << 17 {
            tasks.par_iter().for_each(task);
        } else {
            tasks.iter().for_each(task);
        }
    }
    Ok(Some(Tensor::from_vec(out, (1, h, n, d), q.device())?))
}

/// Which keys (indices relative to the block's first key) the rows of a block see.
struct Span {
    /// keys 0..kend exist for this block
    kend: usize,
    /// causal: row r sees keys ..= causal_first + r
    causal_first: Option<usize>,
    /// sliding window (end, w): row r sees keys >= end + r - w (end = the first row's position + 1)
    window_first: Option<(usize, usize)>,
}

/// A run of consecutive keys (and their values) stored at one stride: offsets in elements of the first key and
/// value, and how many.
#[derive(Clone, Copy)]
struct Seg {
    k: usize,
    v: usize,
    len: usize,
}

/// The keys and values one block of queries sees, in order: runs of rows (each row D contiguous) in `k` and `v`,
/// consecutive rows of a run `k_rs` / `v_rs` apart. A contiguous cache is one run; a paged one, a run per block.
struct Kv<'a> {
    k: &'a [f32],
    k_rs: usize,
    v: &'a [f32],
    v_rs: usize,
    segs: &'a [Seg],
}

/// One block of `rows` queries (rows `q_rs` apart) against its keys: o = softmax(q·kᵀ·scale [softcapped]
/// [+ mask]) · v, each row seeing the keys `span` gives it; output rows `o_rs` apart.
#[allow(clippy::too_many_arguments)]
fn block(
    q: &[f32],
    q_rs: usize,
    rows: usize,
    d: usize,
    kv: &Kv,
    span: Span,
    mask: Option<&[f32]>,
    mask_rs: usize,
    scale: f32,
    softcap: Option<f32>,
    o: &mut [f32],
    o_rs: usize,
) {
    let kend = span.kend;
    debug_assert_eq!(kv.segs.iter().map(|s| s.len).sum::<usize>(), kend);
    debug_assert!(q.len() >= (rows - 1) * q_rs + d && o.len() >= (rows - 1) * o_rs + d);
    let mut s = vec![0f32; rows * kend];
    // S = scale · Q Kᵀ   [rows, kend], a run of columns per segment
    let mut col = 0;
    for seg in kv.segs {
        debug_assert!(seg.len == 0 || kv.k.len() >= seg.k + (seg.len - 1) * kv.k_rs + d);
        // SAFETY: Q is [rows, d] read at q[r·q_rs + c] (inside q: checked by the caller); this run of Kᵀ is
        // [d, len] read at k[seg.k + j·k_rs + c] (inside k: checked by the caller); S's columns col..col+len of
        // rows kend apart.
        unsafe {
            gemm::gemm(
                rows,
                seg.len,
                d,
                s.as_mut_ptr().add(col),
                1,
                kend as isize,
                false,
                q.as_ptr(),
                1,
                q_rs as isize,
                kv.k.as_ptr().add(seg.k),
                kv.k_rs as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
        col += seg.len;
    }
    let mut inv = vec![0f32; rows];
    for (r, row) in s.chunks_exact_mut(kend).enumerate() {
        if let Some(cap) = softcap {
            row.iter_mut().for_each(|x| *x = cap * (*x / cap).tanh());
        }
        if let Some(m) = mask {
            row.iter_mut().zip(&m[r * mask_rs..r * mask_rs + kend]).for_each(|(x, &a)| *x += a);
        }
        let seen = span.causal_first.map_or(kend, |p| (p + r + 1).min(kend));
        let from = span.window_first.map_or(0, |(end, w)| (end + r).saturating_sub(w)).min(seen);
        let (before, rest) = row.split_at_mut(from);
        before.fill(0.0);
        let (vis, hidden) = rest.split_at_mut(seen - from);
        hidden.fill(0.0);
        inv[r] = 1.0 / crate::kernels::act::exp_shifted_sum(vis);
    }
    // O = P V   [rows, d], summed over the segments
    let mut col = 0;
    for (i, seg) in kv.segs.iter().enumerate() {
        debug_assert!(seg.len == 0 || kv.v.len() >= seg.v + (seg.len - 1) * kv.v_rs + d);
        // SAFETY: this run of P is S's columns col..col+len; V's run is [len, d] read at v[seg.v + j·v_rs + c]
        // (inside v: checked by the caller); O is [rows, d] at o[r·o_rs + c].
        unsafe {
            gemm::gemm(
                rows,
                d,
                seg.len,
                o.as_mut_ptr(),
                1,
                o_rs as isize,
                i > 0,
                s.as_ptr().add(col),
                1,
                kend as isize,
                kv.v.as_ptr().add(seg.v),
                1,
                kv.v_rs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
        col += seg.len;
    }
    for (r, &f) in inv.iter().enumerate() {
        o[r * o_rs..r * o_rs + d].iter_mut().for_each(|x| *x *= f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The Candle path of ops::attention (scores, mask, softmax, matmul), as the reference.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool, scale: f64) -> Tensor {
        let (b, h, tq, d) = q.dims4().unwrap();
        let (_, hkv, tk, _) = k.dims4().unwrap();
        let rep = h / hkv;
        let k = k.contiguous().unwrap().repeat_interleave_heads(rep);
        let v = v.contiguous().unwrap().repeat_interleave_heads(rep);
        let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if causal {
            let m = crate::ops::causal_bias(tq, tk, DType::F32, &Device::Cpu).unwrap();
            s = s.broadcast_add(&m).unwrap();
        }
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        let y = p.matmul(&v).unwrap();
        assert_eq!(y.dims(), &[b, h, tq, d]);
        y
    }

    trait Rep {
        fn repeat_interleave_heads(&self, rep: usize) -> Tensor;
    }
    impl Rep for Tensor {
        fn repeat_interleave_heads(&self, rep: usize) -> Tensor {
            let (b, hkv, t, d) = self.dims4().unwrap();
            self.unsqueeze(2).unwrap().expand((b, hkv, rep, t, d)).unwrap().reshape((b, hkv * rep, t, d)).unwrap()
        }
    }

    #[test]
    fn matches_reference() {
        let dev = Device::Cpu;
        // (b, h, hkv, tq, tk, d)
        for &(b, h, hkv, tq, tk, d) in &[
            (1, 1, 1, 1, 1, 1),
            (1, 2, 2, 5, 5, 4),
            (2, 4, 2, 7, 7, 8),
            (1, 3, 1, 1, 9, 16),
            (2, 6, 3, 3, 70, 33),
            (1, 2, 1, 130, 130, 64),
            (1, 9, 3, 65, 200, 64),
            (1, 2, 2, 9, 4, 8), // more queries than keys (not causal)
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, h, tq, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, hkv, tk, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, hkv, tk, d), &dev).unwrap();
            for causal in [true, false] {
                if causal && tq > tk {
                    continue;
                }
                let scale = 1.0 / (d as f64).sqrt();
                let got = attention(&q, &k, &v, causal, None, scale, None, None).unwrap().unwrap();
                let want = reference(&q, &k, &v, causal, scale);
                let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
                assert!(diff < 2e-5, "{:?} causal={causal}: max difference {diff}", (b, h, hkv, tq, tk, d));
            }
        }
    }

    /// A left-padding mask as generation builds it ([B, 1, 1, Tk], -inf on each row's padding), on strided keys:
    /// the same as Candle's path with the mask added to the scores.
    #[test]
    fn padding_mask() {
        let dev = Device::Cpu;
        let (b, h, hkv, tk, cap, d) = (3, 4, 2, 11, 16, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, 1, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, hkv, cap, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, hkv, cap, d), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, tk).unwrap(), vbuf.narrow(2, 0, tk).unwrap());
        let pads = [0usize, 3, 7];
        let m: Vec<f32> = pads.iter().flat_map(|&p| (0..tk).map(move |j| if j < p { f32::NEG_INFINITY } else { 0.0 })).collect();
        let mask = Tensor::from_vec(m, (b, 1, 1, tk), &dev).unwrap();
        let got = attention(&q, &k, &v, false, Some(&mask), 0.35, None, None).unwrap().unwrap();
        let ks = k.contiguous().unwrap().repeat_interleave_heads(h / hkv);
        let vv = v.contiguous().unwrap().repeat_interleave_heads(h / hkv);
        let s = (q.matmul(&ks.t().unwrap()).unwrap() * 0.35).unwrap().broadcast_add(&mask).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&s).unwrap().matmul(&vv).unwrap();
        let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 2e-5, "max difference {diff}");
        // and a mask of another shape is left to the general path
        let other = Tensor::zeros((1, tk), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &v, false, Some(&other), 0.35, None, None).unwrap().is_none());
    }

    #[test]
    fn strided_keys_and_values() {
        // k, v as views of the first Tk positions of a longer buffer (a preallocated cache)
        let dev = Device::Cpu;
        let (b, h, tq, tk, cap, d) = (2, 3, 4, 10, 16, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, tq, d), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (b, h, cap, d), &dev).unwrap();
        let (k, v) = (kbuf.narrow(2, 0, tk).unwrap(), vbuf.narrow(2, 0, tk).unwrap());
        assert!(!k.is_contiguous());
        let got = attention(&q, &k, &v, true, None, 0.3, None, None).unwrap().unwrap();
        let want = reference(&q, &k, &v, true, 0.3);
        let diff: f32 = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(diff < 2e-5, "max difference {diff}");
    }
}
