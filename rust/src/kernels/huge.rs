//! Weights in huge pages. A decode step streams every weight once, and with the kernel's 4 KiB pages each page of
//! it is a TLB miss and a page walk: on this project's machines a 2-thread read of 96 MiB runs at 22 GB/s from
//! 4 KiB pages and at 32 GB/s from 2 MiB ones. Linux backs anonymous memory with 2 MiB pages where the
//! process asks for them (`MADV_HUGEPAGE`, when `/sys/kernel/mm/transparent_hugepage/enabled` is `madvise`, as
//! distributions ship it) or everywhere (`always`), but only for whole 2 MiB-aligned stretches: a single
//! projection of a small model (0.5 MiB) never fills one. So the weights are packed straight into shared
//! regions of 64 MiB (a tensor larger than 16 MiB gets one of its own), mapped 2 MiB-aligned and marked for
//! huge pages before anything touches them. The space a buffer gives back is taken again by later ones (the
//! parts of a fused projection, once copied into it), and a region is unmapped when the last buffer in it goes.
//! The CPU KV pool's arrays live here too: at a long context a decode step streams its keys and values as it
//! streams the weights. Space no buffer has held is the mapping's own zeros and is not written when handed out,
//! so a pool's pages are committed only as positions reach them.
//!
//! Nothing here changes a number: a `Buf` is a slice wherever it lives. Where the system gives no huge pages
//! (`never`, no free 2 MiB pages, not Linux) the regions are ordinary pages. `CANDLEWICK_HUGE_PAGES=0` keeps
//! every buffer on the heap (to compare, or where memory is tight: the last huge page of a region may hold up to
//! 2 MiB that no weight uses).

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// The huge page size on x86-64 and most aarch64 kernels.
const HUGE: usize = 2 << 20;
/// Bytes of a shared region.
const REGION: usize = 64 << 20;
/// Buffers smaller than this stay on the heap (a norm's weights, a tiny test model).
const MIN_BYTES: usize = 64 << 10;
/// Start of every buffer in a region, at least (a cache line).
const ALIGN: usize = 64;

/// Whether large buffers go to huge-page regions (`CANDLEWICK_HUGE_PAGES=0` says no).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| !matches!(std::env::var("CANDLEWICK_HUGE_PAGES").as_deref(), Ok("0" | "off" | "false")))
}

/// An anonymous mapping, 2 MiB-aligned, marked for huge pages, and which of its bytes buffers hold.
struct Region {
    base: NonNull<u8>,
    len: usize,
    space: Mutex<Space>,
}

/// The bytes of a region given out: all below `top` but the `free` ranges (start, len), sorted and apart. No
/// byte at or above `clean` was ever given out: those are still the zeros the system mapped, and no page of
/// them is committed.
#[derive(Default)]
struct Space {
    top: usize,
    free: Vec<(usize, usize)>,
    clean: usize,
}

impl Space {
    /// Room for `bytes` at an `ALIGN`ed offset below `cap`: the first free range it fits in, else the top.
    fn take(&mut self, bytes: usize, cap: usize) -> Option<usize> {
        for i in 0..self.free.len() {
            let (start, len) = self.free[i];
            let at = start.next_multiple_of(ALIGN);
            if at + bytes <= start + len {
                let rest = (at + bytes, start + len - at - bytes);
                self.free.remove(i);
                if rest.1 > 0 {
                    self.free.insert(i, rest);
                }
                if at > start {
                    self.free.insert(i, (start, at - start));
                }
                return Some(at);
            }
        }
        let at = self.top.next_multiple_of(ALIGN);
        if at + bytes > cap {
            return None;
        }
        if at > self.top {
            // the few bytes skipped to align are free too, so that a range given back beside them merges
            self.free.push((self.top, at - self.top));
        }
        self.top = at + bytes;
        Some(at)
    }

    /// `take`, and how many of the bytes from the offset on may hold an earlier buffer's numbers (the rest are
    /// the mapping's own zeros).
    fn take_zeroed(&mut self, bytes: usize, cap: usize) -> Option<(usize, usize)> {
        let at = self.take(bytes, cap)?;
        let dirty = self.clean.saturating_sub(at).min(bytes);
        self.clean = self.clean.max(at + bytes);
        Some((at, dirty))
    }

    /// Give back [at, at + bytes), merged with the free ranges beside it (and into the top when it ends there).
    fn give(&mut self, at: usize, bytes: usize) {
        let i = self.free.partition_point(|&(s, _)| s < at);
        let (mut start, mut end) = (at, at + bytes);
        if i < self.free.len() && self.free[i].0 == end {
            end += self.free.remove(i).1;
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start {
            start = self.free.remove(i - 1).0;
        }
        if end >= self.top {
            self.top = start;
        } else {
            let j = self.free.partition_point(|&(s, _)| s < start);
            self.free.insert(j, (start, end - start));
        }
    }
}

// SAFETY: the mapping is plain memory owned by this value; the buffers placed in it are disjoint (each `Buf`
// holds its own range) and only reached through them.
unsafe impl Send for Region {}
// SAFETY: as for Send; `space` is behind a Mutex.
unsafe impl Sync for Region {}

impl Region {
    /// `len` bytes (a multiple of `HUGE`), zero until written; None when the system has no such mapping to give.
    #[cfg(unix)]
    fn map(len: usize) -> Option<Region> {
        debug_assert!(len.is_multiple_of(HUGE));
        let total = len.checked_add(HUGE)?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is named.
        let p = unsafe {
            libc::mmap(std::ptr::null_mut(), total, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        let start = p as usize;
        let base = start.next_multiple_of(HUGE);
        // SAFETY: both trimmed stretches lie inside the mapping just made and are not used.
        unsafe {
            if base > start {
                libc::munmap(start as *mut libc::c_void, base - start);
            }
            let tail = start + total - (base + len);
            if tail > 0 {
                libc::munmap((base + len) as *mut libc::c_void, tail);
            }
        }
        // SAFETY: [base, base + len) is the mapping kept; MADV_HUGEPAGE only asks the kernel to back it with huge
        // pages (a hint: failure changes nothing).
        #[cfg(target_os = "linux")]
        unsafe {
            libc::madvise(base as *mut libc::c_void, len, libc::MADV_HUGEPAGE)
        };
        Some(Region { base: NonNull::new(base as *mut u8)?, len, space: Mutex::default() })
    }

    #[cfg(not(unix))]
    fn map(_len: usize) -> Option<Region> {
        None
    }

    fn space(&self) -> std::sync::MutexGuard<'_, Space> {
        self.space.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` kept; every buffer in it is gone (each held an Arc of this region).
        #[cfg(unix)]
        unsafe {
            libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.len)
        };
    }
}

/// The region small buffers are placed in. Held weakly: a region lives as long as a buffer in it does, not as
/// long as the process.
static CURRENT: Mutex<Option<Weak<Region>>> = Mutex::new(None);

/// Room for `bytes` in a region: the region, the offset, and how many of the bytes may hold an earlier buffer's
/// numbers (`Space::take_zeroed`). The space a buffer gives back when it goes is taken again by later ones (the
/// parts of a fused projection, copied into it and dropped, make room for the next layer's parts).
fn place(bytes: usize) -> Option<(Arc<Region>, usize, usize)> {
    if bytes > REGION / 4 {
        // a region of its own; the shared one stays current for the small buffers
        let r = Arc::new(Region::map(bytes.next_multiple_of(HUGE))?);
        let (at, dirty) = r.space().take_zeroed(bytes, r.len)?;
        return Some((r, at, dirty));
    }
    let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(r) = current.as_ref().and_then(Weak::upgrade) {
        let got = r.space().take_zeroed(bytes, r.len);
        if let Some((at, dirty)) = got {
            return Some((r, at, dirty));
        }
    }
    let r = Arc::new(Region::map(REGION)?);
    let (at, dirty) = r.space().take_zeroed(bytes, r.len)?;
    *current = Some(Arc::downgrade(&r));
    Some((r, at, dirty))
}

enum Repr<T> {
    Heap(Vec<T>),
    Region { region: Arc<Region>, ptr: NonNull<T>, len: usize },
}

/// A buffer of plain numbers: made by `zeroed` (or `concat`), in a huge-page region when it is large enough to
/// matter and huge pages are on, else a Vec (as `From<Vec>` makes it). Derefs to a slice.
pub struct Buf<T: bytemuck::Pod> {
    repr: Repr<T>,
}

// SAFETY: a Buf owns its elements (a Vec, or a range of a region no other Buf touches), as a Vec<T> does.
unsafe impl<T: bytemuck::Pod + Send> Send for Buf<T> {}
// SAFETY: as for Send: shared access is a shared slice, as for a Vec<T>.
unsafe impl<T: bytemuck::Pod + Sync> Sync for Buf<T> {}

impl<T: bytemuck::Pod> Buf<T> {
    /// A range of a region for `n` elements, when huge pages are on and it is large enough, and how many of its
    /// first bytes may hold an earlier buffer's numbers (the rest are zero and untouched: no page committed).
    fn in_region(n: usize) -> Option<(Arc<Region>, NonNull<T>, usize)> {
        let bytes = n.checked_mul(std::mem::size_of::<T>())?;
        if bytes < MIN_BYTES || !enabled() || std::mem::align_of::<T>() > ALIGN {
            return None;
        }
        let (region, at, dirty) = place(bytes)?;
        // SAFETY: [at, at + bytes) is inside the mapping (place checks it against the region's length) and
        // aligned for T (ALIGN is a multiple of T's alignment, checked above).
        let ptr = unsafe { NonNull::new_unchecked(region.base.as_ptr().add(at) as *mut T) };
        Some((region, ptr, dirty))
    }

    /// `n` zeros, straight in a region where one is to be had (the weights are then packed in place, never
    /// held twice). Only space an earlier buffer held is written with zeros: the rest is the mapping's own, and
    /// its pages are committed as they are first written (a KV pool's as positions are reached), as a large
    /// zeroed Vec's are.
    pub fn zeroed(n: usize) -> Self {
        match Self::in_region(n) {
            Some((region, ptr, dirty)) => Self::zeros_at(region, ptr, n, dirty),
            None => Buf { repr: Repr::Heap(vec![T::zeroed(); n]) },
        }
    }

    /// The buffer of the `n` elements at `ptr` in `region`, whose first `dirty` bytes may hold an earlier
    /// buffer's numbers (the rest are the mapping's zeros).
    fn zeros_at(region: Arc<Region>, ptr: NonNull<T>, n: usize, dirty: usize) -> Self {
        // SAFETY: the range is this buffer's alone (place hands each byte to one buffer at a time), `dirty` is at
        // most its length in bytes, and zero bits are a valid T (Pod).
        unsafe { std::ptr::write_bytes(ptr.as_ptr() as *mut u8, 0, dirty.min(n * std::mem::size_of::<T>())) };
        Buf { repr: Repr::Region { region, ptr, len: n } }
    }

    /// The parts one after another, placed as `zeroed` places them (a fused projection from its parts).
    pub fn concat(parts: &[&[T]]) -> Self {
        let mut b = Self::zeroed(parts.iter().map(|p| p.len()).sum());
        let mut at = 0;
        for p in parts {
            b[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        b
    }

    /// Whether the elements live in a huge-page region.
    pub fn is_in_region(&self) -> bool {
        matches!(self.repr, Repr::Region { .. })
    }

    /// The elements as a Vec (a copy when they live in a region).
    pub fn into_vec(mut self) -> Vec<T> {
        match &mut self.repr {
            Repr::Heap(v) => std::mem::take(v),
            Repr::Region { .. } => self.to_vec(),
        }
    }
}

impl<T: bytemuck::Pod> Drop for Buf<T> {
    fn drop(&mut self) {
        if let Repr::Region { region, ptr, len } = &self.repr {
            let at = ptr.as_ptr() as usize - region.base.as_ptr() as usize;
            region.space().give(at, len * std::mem::size_of::<T>());
        }
    }
}

impl<T: bytemuck::Pod> From<Vec<T>> for Buf<T> {
    fn from(v: Vec<T>) -> Self {
        Buf { repr: Repr::Heap(v) }
    }
}

impl<T: bytemuck::Pod> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.repr {
            Repr::Heap(v) => v,
            // SAFETY: ptr/len name this buffer's initialised range of a region it keeps alive.
            Repr::Region { ptr, len, .. } => unsafe { std::slice::from_raw_parts(ptr.as_ptr(), *len) },
        }
    }
}

impl<T: bytemuck::Pod> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.repr {
            Repr::Heap(v) => v,
            // SAFETY: as in deref; the range is this buffer's alone, borrowed mutably through it.
            Repr::Region { ptr, len, .. } => unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), *len) },
        }
    }
}

impl<T: bytemuck::Pod + std::fmt::Debug> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process, in bytes (Linux).
    #[cfg(target_os = "linux")]
    fn resident() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: usize = statm.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("resident pages");
        pages * 4096
    }

    /// A large buffer (a KV pool's array) commits no memory until it is written: 1 GiB of zeros leaves the
    /// resident set where it was, and writing one element commits one page (2 MiB at most), not the buffer.
    /// (Other tests run beside this one and allocate too: the bounds leave them 256 MiB.)
    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_buffer_is_committed_as_it_is_written() {
        let n = (1usize << 30) / 4;
        let before = resident();
        let mut b = Buf::<f32>::zeroed(n);
        assert!(resident() < before + (256 << 20), "1 GiB of zeros committed {} MiB", (resident() - before) >> 20);
        b[n / 2] = 1.0;
        assert!(b[n / 2 - 1] == 0.0 && b[n / 2] == 1.0 && b[n - 1] == 0.0);
        assert!(resident() < before + (256 << 20), "one element written committed {} MiB", (resident() - before) >> 20);
    }

    #[test]
    fn buffers_keep_their_numbers_and_their_own_ranges() {
        // several buffers share a region; each keeps its numbers, and writing one leaves the others alone
        let want: Vec<Vec<u32>> = (0..5u32).map(|b| (0..40_000u32).map(|i| i.wrapping_mul(2654435761) ^ b).collect()).collect();
        let mut bufs: Vec<Buf<u32>> = want.iter().map(|w| Buf::concat(&[&w[..20_000], &w[20_000..]])).collect();
        if enabled() {
            assert!(bufs.iter().all(Buf::is_in_region));
            assert!(bufs.windows(2).all(|w| (w[0].as_ptr() as usize).is_multiple_of(ALIGN) && w[0].as_ptr() != w[1].as_ptr()));
        }
        bufs[2].fill(7);
        for (i, (b, w)) in bufs.iter().zip(&want).enumerate() {
            if i == 2 {
                assert!(b.iter().all(|&x| x == 7));
            } else {
                assert_eq!(&b[..], &w[..]);
            }
        }
        // a small buffer stays on the heap; a large one gets a region of its own
        let small = Buf::<u8>::zeroed(100);
        assert!(!small.is_in_region() && small.iter().all(|&x| x == 0));
        let mut large = Buf::<u16>::zeroed(REGION / 2 / 2 + 1);
        assert_eq!(large.is_in_region(), enabled());
        large.fill(3);
        assert!(large.iter().all(|&x| x == 3));
        assert_eq!(bufs.pop().unwrap().into_vec(), want[4]);
    }

    #[test]
    fn the_space_of_a_buffer_that_goes_is_taken_again() {
        // a region of the test's own (the shared one is used by other tests' weights at the same time)
        let Some(region) = Region::map(REGION).map(Arc::new) else { return };
        let make = |fill: u32| {
            let (at, dirty) = region.space().take_zeroed(40_000 * 4, region.len).expect("room in a fresh region");
            // SAFETY: at + 160 000 bytes lie in the region (take checked), aligned for u32.
            let ptr = unsafe { NonNull::new_unchecked(region.base.as_ptr().add(at) as *mut u32) };
            let mut b = Buf::zeros_at(region.clone(), ptr, 40_000, dirty);
            if fill != 0 {
                b.fill(fill);
            }
            b
        };
        let (a, b, c) = (make(1), make(2), make(3));
        let at = b.as_ptr();
        drop(b);
        // the space b held (its 2s) is zeroed for the buffer that takes it
        let again = make(0);
        assert_eq!(again.as_ptr(), at);
        assert!(again.iter().all(|&x| x == 0));
        assert!(a.iter().all(|&x| x == 1) && c.iter().all(|&x| x == 3));
        drop((a, again, c));
        // everything given back: the region's space is empty again
        let space = region.space();
        assert_eq!((space.top, space.free.len()), (0, 0));
    }

    /// Only bytes some buffer held before count as dirty: fresh space is the mapping's zeros, left untouched.
    #[test]
    fn only_space_held_before_is_dirty() {
        let mut s = Space::default();
        let cap = 1 << 20;
        assert_eq!(s.take_zeroed(1000, cap), Some((0, 0)));
        assert_eq!(s.take_zeroed(1000, cap), Some((1024, 0)));
        s.give(0, 1000);
        // the first range again: all 1000 bytes held before; then 24 + 1000 of which 0 were held
        assert_eq!(s.take_zeroed(1000, cap), Some((0, 1000)));
        assert_eq!(s.take_zeroed(1000, cap), Some((2048, 0)));
        // the top given back and taken again, longer: only the part below the old top was held
        s.give(2048, 1000);
        assert_eq!(s.take_zeroed(2000, cap), Some((2048, 1000)));
    }

    #[test]
    fn space_merges_what_is_given_back() {
        let mut s = Space::default();
        let cap = 1 << 20;
        let a = s.take(1000, cap).unwrap();
        let b = s.take(1000, cap).unwrap();
        let c = s.take(1000, cap).unwrap();
        assert_eq!((a, b, c), (0, 1024, 2048));
        assert_eq!(s.take(cap, cap), None);
        assert_eq!(s.free, vec![(1000, 24), (2024, 24)]);
        s.give(b, 1000);
        assert_eq!(s.free, vec![(1000, 1048)]);
        // too large for the hole: from the top
        assert_eq!(s.take(2000, cap), Some(3072));
        assert_eq!(s.free, vec![(1000, 1048), (3048, 24)]);
        s.give(a, 1000);
        assert_eq!(s.free, vec![(0, 2048), (3048, 24)]);
        // fits the merged hole, at its start
        assert_eq!(s.take(1500, cap), Some(0));
        assert_eq!(s.free, vec![(1500, 548), (3048, 24)]);
        s.give(3072, 2000);
        s.give(c, 1000);
        s.give(0, 1500);
        // everything back: the free ranges merged into the top
        assert_eq!((s.top, s.free.len()), (0, 0));
    }
}
