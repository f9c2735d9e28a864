//! Every thread of the pool on one job at once, in stages with a barrier between them: how a decode step runs.
//!
//! A decode step is a few hundred small pieces of work (four products, norms and attention per layer), each
//! depending on the one before. Run as parallel loops, each piece hands its parts out and waits for them: a few
//! microseconds each, more when a thread has gone to sleep in between, and at batch 1 a small model's step is only
//! a few milliseconds. A team instead enters one job on every thread once per step (`rayon::broadcast`); inside,
//! the threads claim parts of each stage from a shared counter and meet at a spinning barrier before the next.
//!
//! One team job runs at a time in the process (a lock), so two jobs never wait on each other's barriers. A panic
//! on one thread poisons the barrier: the others leave at their next wait, and `run` returns an error.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Barrier {
    n: usize,
    count: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
}

impl Barrier {
    fn wait(&self) {
        if self.n == 1 {
            return;
        }
        let gen = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Relaxed);
            self.generation.store(gen.wrapping_add(1), Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == gen {
            if self.poisoned.load(Ordering::Relaxed) {
                panic!("another thread of the team failed");
            }
            spins = spins.saturating_add(1);
            if spins < 1 << 11 {
                std::hint::spin_loop();
            } else {
                // more threads than cores at the moment: let the one we wait for run
                std::thread::yield_now();
            }
        }
    }
}

/// What one thread of a team job sees: its index, the team's size, the stages' counters and the barrier.
pub struct Ctx<'a> {
    pub tid: usize,
    pub n: usize,
    barrier: &'a Barrier,
    counters: &'a [AtomicUsize],
}

impl Ctx<'_> {
    /// Wait until every thread of the team has got here: what the stage before wrote is visible after.
    pub fn barrier(&self) {
        self.barrier.wait();
    }

    /// The parts of 0..total, `chunk` at a time, that this thread claims in stage `stage` (every stage its own
    /// counter: each part goes to exactly one thread).
    pub fn claim(&self, stage: usize, total: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> + '_ {
        let chunk = chunk.max(1);
        let c = &self.counters[stage];
        std::iter::from_fn(move || {
            let s = c.fetch_add(chunk, Ordering::Relaxed);
            (s < total).then(|| s..(s + chunk).min(total))
        })
    }
}

/// Run `job` on every thread of the pool at once, with `stages` counters for `Ctx::claim`; returns when all are
/// done. A panic in the job is an error naming `what`.
pub fn run(what: &str, stages: usize, job: &(dyn Fn(&Ctx) + Sync)) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let n = rayon::current_num_threads().max(1);
    let barrier = Barrier { n, count: AtomicUsize::new(0), generation: AtomicUsize::new(0), poisoned: AtomicBool::new(false) };
    let counters: Vec<AtomicUsize> = (0..stages).map(|_| AtomicUsize::new(0)).collect();
    let ok: Vec<bool> = rayon::broadcast(|b| {
        debug_assert_eq!(b.num_threads(), n);
        let ctx = Ctx { tid: b.index(), n, barrier: &barrier, counters: &counters };
        let fine = catch_unwind(AssertUnwindSafe(|| job(&ctx))).is_ok();
        if !fine {
            barrier.poisoned.store(true, Ordering::Relaxed);
        }
        fine
    });
    if ok.iter().all(|&f| f) {
        Ok(())
    } else {
        Err(Error::Internal(format!("{what}: a thread of the decode team panicked")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages see what the stage before wrote; every part of a stage goes to exactly one thread.
    #[test]
    fn stages_are_ordered_and_parts_claimed_once() {
        let n = 1000;
        let a: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let b: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..20 {
            run("test", 2, &|ctx| {
                for r in ctx.claim(0, n, 7) {
                    for i in r {
                        a[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
                ctx.barrier();
                for r in ctx.claim(1, n, 3) {
                    for i in r {
                        // the other half's element, written by whichever thread in stage 0
                        let j = (i + n / 2) % n;
                        b[i].store(a[j].load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
            })
            .unwrap();
        }
        assert!(a.iter().all(|x| x.load(Ordering::Relaxed) == 20));
        assert!(b.iter().all(|x| x.load(Ordering::Relaxed) == 20));
    }

    /// A panic on one thread is an error, not a hang, and the team runs the next job.
    #[test]
    fn a_panic_is_an_error() {
        let r = run("test", 1, &|ctx| {
            if ctx.tid == 0 {
                panic!("on purpose");
            }
            ctx.barrier();
            ctx.barrier();
        });
        assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");
        assert!(run("test", 1, &|ctx| ctx.barrier()).is_ok());
    }
}
