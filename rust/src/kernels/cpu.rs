//! What the CPU can do, found out once, and the thread helpers every kernel shares.
//!
//! Each fast kernel has a level of the instruction set it needs (`Isa`); `isa()` is the best level this CPU has,
//! lowered by the environment variable `CANDLEWICK_ISA` (`scalar`, `avx2`, `avx512`) to compare the kernels on
//! one machine. Every kernel asks `isa()`; none detects features itself. (The gemm crate, which runs the f32
//! prefill tiles, picks its own kernels.)

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Instruction-set levels the kernels are written for, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, vectorised by LLVM for the target's baseline (SSE2 on x86-64, NEON on aarch64).
    Scalar,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512 F, BW and VNNI (with AVX2, FMA and F16C).
    Avx512,
}

impl Isa {
    /// The name `CANDLEWICK_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().find(|i| i.name() == s)
    }
}

struct Detected {
    available: Vec<Isa>,
    bf16_dot: bool,
}

fn detected() -> &'static Detected {
    static D: OnceLock<Detected> = OnceLock::new();
    D.get_or_init(|| {
        let mut available = vec![Isa::Scalar];
        #[allow(unused_mut)]
        let mut bf16_dot = false;
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("fma") && has!("f16c") {
                available.push(Isa::Avx2);
                if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
                    available.push(Isa::Avx512);
                    bf16_dot = has!("avx512bf16");
                }
            }
        }
        Detected { available, bf16_dot }
    })
}

/// Every level this CPU runs, lowest first (whatever `CANDLEWICK_ISA` says: for tests comparing the kernels).
pub fn available() -> &'static [Isa] {
    &detected().available
}

/// The level asked for by `CANDLEWICK_ISA`, if it is set: an error names a value that is not a level.
pub fn requested() -> Result<Option<Isa>> {
    match std::env::var("CANDLEWICK_ISA") {
        Err(_) => Ok(None),
        Ok(s) if s.is_empty() => Ok(None),
        Ok(s) => Isa::parse(&s.to_ascii_lowercase()).map(Some).ok_or_else(|| {
            Error::arg(format!("CANDLEWICK_ISA={s:?} is not an instruction-set level (scalar, avx2 or avx512)"))
        }),
    }
}

/// The level the kernels use: the best this CPU has, at most the one `CANDLEWICK_ISA` names (read once;
/// `Model::load` refuses a value that names no level, so an unknown one never gets this far unseen).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = *available().last().expect("scalar is always available");
        match requested() {
            Ok(Some(cap)) => best.min(cap),
            _ => best,
        }
    })
}

/// AVX-512 BF16 dot products (`vdpbf16ps`), when the AVX-512 level is in use.
pub fn has_bf16_dot() -> bool {
    isa() == Isa::Avx512 && detected().bf16_dot
}

/// An output buffer shared by tasks that each write their own disjoint part of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);

// SAFETY: a SendPtr is only made over a buffer that outlives the parallel region using it (`par_tasks` returns
// when every task is done), and the tasks write disjoint elements of it, so sharing the address between
// threads cannot race.
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: the pointer itself is never written, and the elements behind it are disjoint per task.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

/// A buffer that the threads of one parallel job write in disjoint parts, and read once those writes are done
/// (in a later stage), as the decode team's stages do. Its accessors are unsafe: the caller keeps writes and
/// reads apart.
pub struct SyncBuf<T> {
    ptr: *mut T,
    len: usize,
    _own: Vec<T>,
}

// SAFETY: the buffer is owned memory like a Vec's; access goes through the unsafe accessors, whose callers keep
// threads' writes to disjoint elements and apart (in time) from reads.
unsafe impl<T: Send> Send for SyncBuf<T> {}
// SAFETY: as for Send.
unsafe impl<T: Send> Sync for SyncBuf<T> {}

impl<T: Copy + Default> SyncBuf<T> {
    pub fn new(len: usize) -> Self {
        let mut own = vec![T::default(); len];
        Self { ptr: own.as_mut_ptr(), len, _own: own }
    }

    pub fn from_vec(mut own: Vec<T>) -> Self {
        Self { ptr: own.as_mut_ptr(), len: own.len(), _own: own }
    }

    /// Elements `start..start + n` to write.
    ///
    /// # Safety
    /// No other reference to these elements is alive while the slice is (no other thread writes them, no
    /// `get` covers them).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part_mut(&self, start: usize, n: usize) -> &mut [T] {
        assert!(start + n <= self.len, "SyncBuf: {start}+{n} past {}", self.len);
        // SAFETY: inside the allocation (checked); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), n) }
    }

    /// The whole buffer to read.
    ///
    /// # Safety
    /// No thread writes any element while the slice is alive.
    pub unsafe fn get(&self) -> &[T] {
        // SAFETY: the whole allocation; no writes by the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The first element, for kernels that write through raw pointers (under `part_mut`'s rules).
    pub fn ptr(&self) -> *mut T {
        self.ptr
    }

    pub fn into_vec(self) -> Vec<T> {
        self._own
    }
}

/// Run f(0..n_tasks) on rayon's pool, returning when all are done (a single task runs on the caller).
pub(crate) fn par_tasks(n_tasks: usize, f: impl Fn(usize) + Sync) {
    if n_tasks <= 1 {
        (0..n_tasks).for_each(f);
        return;
    }
    (0..n_tasks).into_par_iter().for_each(&f);
}

/// Threads in the pool the kernels run on.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Ask for the `bytes` from `p` on to be brought into the L2 cache. A prefetch is a hint: it changes no number and
/// never faults, whatever the address.
#[inline(always)]
pub fn prefetch_l2(p: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..bytes).step_by(64) {
        // SAFETY: see above.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.wrapping_add(off) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_named() {
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        for i in [Isa::Scalar, Isa::Avx2, Isa::Avx512] {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert_eq!(Isa::parse("sse9"), None);
        assert_eq!(available()[0], Isa::Scalar);
        assert!(available().contains(&isa()));
    }
}
