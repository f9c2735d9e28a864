//! Coverage for scripts/fuzz.py: built only with the `fuzz` feature, in an extension compiled with LLVM's sancov
//! passes (inline 8-bit counters and comparison hooks). The counters would normally register with libFuzzer;
//! here they register with these hooks, and `_fuzz_coverage` hands the ones hit since the last call to the
//! script, which feeds them to atheris' own coverage map (so atheris' libFuzzer sees the Rust code's edges).

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use pyo3::prelude::*;

static START: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static LEN: AtomicUsize = AtomicUsize::new(0);

/// Called by the module's constructor with its counters (one module: this extension).
#[no_mangle]
pub extern "C" fn __sanitizer_cov_8bit_counters_init(start: *mut u8, end: *mut u8) {
    START.store(start, Ordering::SeqCst);
    LEN.store(end as usize - start as usize, Ordering::SeqCst);
}

#[no_mangle]
pub extern "C" fn __sanitizer_cov_pcs_init(_start: *const usize, _end: *const usize) {}

macro_rules! ignore {
    ($($name:ident($($t:ty),*);)*) => {$(
        #[no_mangle]
        pub extern "C" fn $name($(_: $t),*) {}
    )*};
}

ignore! {
    __sanitizer_cov_trace_cmp1(u8, u8);
    __sanitizer_cov_trace_cmp2(u16, u16);
    __sanitizer_cov_trace_cmp4(u32, u32);
    __sanitizer_cov_trace_cmp8(u64, u64);
    __sanitizer_cov_trace_const_cmp1(u8, u8);
    __sanitizer_cov_trace_const_cmp2(u16, u16);
    __sanitizer_cov_trace_const_cmp4(u32, u32);
    __sanitizer_cov_trace_const_cmp8(u64, u64);
    __sanitizer_cov_trace_switch(u64, *const u64);
}

/// The indices of the counters hit since the last call (they are reset).
#[pyfunction]
pub fn _fuzz_coverage() -> Vec<u32> {
    let (start, len) = (START.load(Ordering::SeqCst), LEN.load(Ordering::SeqCst));
    if start.is_null() {
        return vec![];
    }
    // SAFETY: [start, start + len) is this module's counter section, as its constructor registered it; the
    // counters are plain bytes that instrumented code increments (a race only loses a count).
    let counters = unsafe { std::slice::from_raw_parts_mut(start, len) };
    let mut hit = Vec::new();
    for (i, c) in counters.iter_mut().enumerate() {
        if *c != 0 {
            hit.push(i as u32);
            *c = 0;
        }
    }
    hit
}
