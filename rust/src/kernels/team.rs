//! Every thread of the pool on one job at once, in stages: how a decode step runs.
//!
//! A decode step is a few hundred small pieces of work (four products, norms and attention per layer), each
//! depending on the one before. Run as parallel loops, each piece hands its parts out and waits for them: a few
//! microseconds each, more when a thread has gone to sleep in between, and at batch 1 a small model's step is only
//! a few milliseconds. A team instead starts one copy of the job per thread once per step; inside, the copies
//! claim the parts of each stage from a shared counter and wait, spinning, until every part of the stage is done
//! before they go on to the next.
//!
//! Waiting for the parts rather than for the threads (a barrier) keeps a thread the system has taken away from
//! holding up the others: the ones running do its share, and a copy that starts late finds the early stages done
//! and catches up. The copies are rayon jobs of one scope, so one that no thread has started when the rest are done
//! is run by the thread waiting for the scope (and returns at once).
//!
//! A stage's parts can also be cut into one stretch per copy (`Claim::Homed`): each copy claims its own stretch
//! first, in order, then what is left of the others'. A copy then walks its share of a projection's weights as one
//! stream, and knows while it waits in the stage before which weights it will read (see `run_stage`'s `idle`).
//!
//! One team job runs at a time in the process (a lock), so two jobs never wait on each other. A panic in one copy
//! poisons the job: the others leave at their next wait, and `run` returns an error.

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What one copy of a team job sees: the team's size, its own number and the stages' counters.
pub struct Ctx<'a> {
    pub n: usize,
    /// the copy run by the thread that called `run` (which is there from the start and waits for the rest)
    pub leader: bool,
    /// this copy's number, 0 (the leader) to n - 1: which stretch of a `Claim::Homed` stage it claims first
    pub me: usize,
    /// per stage, a counter per copy's stretch (a `Claim::Shared` stage uses the first)
    claimed: &'a [AtomicUsize],
    done: &'a [AtomicUsize],
    poisoned: &'a AtomicBool,
}

/// How the copies share a stage's parts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Claim {
    /// every copy claims the next parts from one counter
    Shared,
    /// too small to share: the leader runs every part, the other copies wait for it. (A part another thread
    /// claimed holds everyone up while the system has that thread off its core; the leader's copy runs from the
    /// start, and small pieces of work are cheaper done than handed over.)
    Serial,
    /// the parts cut into `n` stretches in order (`Ctx::home`), copy k's the k-th: each copy claims its own
    /// stretch's parts first, in order, then what is left of the others'. A copy knows before the stage starts
    /// which parts it will most likely run (and can bring their data into its cache while it waits), and a copy
    /// off its core still holds no one up: the others take its stretch.
    Homed,
}

impl Ctx<'_> {
    /// Stage `stage` (every stage its own number, in order): run `f` on the parts of 0..total, `chunk` at a time,
    /// that this copy claims (each part goes to exactly one copy), then wait until every part is done: what the
    /// stage wrote is visible after.
    pub fn stage(&self, stage: usize, total: usize, chunk: usize, f: impl FnMut(Range<usize>)) {
        self.run_stage(stage, total, chunk, Claim::Shared, f, &mut |_| {})
    }

    /// A stage too small to share (`Claim::Serial`).
    pub fn serial_stage(&self, stage: usize, total: usize, f: impl FnMut(Range<usize>)) {
        self.run_stage(stage, total, total, Claim::Serial, f, &mut |_| {})
    }

    /// The parts of copy `k`'s stretch in a `Claim::Homed` stage of `total` parts claimed `chunk` at a time.
    pub fn home(&self, total: usize, chunk: usize, k: usize) -> Range<usize> {
        let (chunk, chunks) = (chunk.max(1), total.div_ceil(chunk.max(1)));
        let at = |k: usize| (k * chunks / self.n * chunk).min(total);
        at(k)..at(k + 1)
    }

    /// A stage as `stage` does it, its parts claimed as `how` says. Where this copy has run all it could claim
    /// while other parts are still running, `idle` runs once before it waits, given a test of whether the stage
    /// is done (to stop at): work that changes no number, such as bringing a later stage's data into the cache.
    pub fn run_stage(&self, stage: usize, total: usize, chunk: usize, how: Claim, mut f: impl FnMut(Range<usize>), idle: &mut dyn FnMut(&dyn Fn() -> bool)) {
        let chunk = chunk.max(1);
        let done = &self.done[stage];
        let mut run = |s: usize, e: usize| {
            f(s..e);
            done.fetch_add(e - s, Ordering::Release);
        };
        match how {
            Claim::Shared | Claim::Serial => {
                if how == Claim::Shared || self.leader {
                    let claimed = &self.claimed[stage * self.n];
                    loop {
                        let s = claimed.fetch_add(chunk, Ordering::Relaxed);
                        if s >= total {
                            break;
                        }
                        run(s, (s + chunk).min(total));
                    }
                }
            }
            Claim::Homed => {
                for k in (0..self.n).map(|i| (self.me + i) % self.n) {
                    let home = self.home(total, chunk, k);
                    let claimed = &self.claimed[stage * self.n + k];
                    loop {
                        let s = home.start + claimed.fetch_add(chunk, Ordering::Relaxed);
                        if s >= home.end {
                            break;
                        }
                        run(s, (s + chunk).min(home.end));
                    }
                }
            }
        }
        let finished = || done.load(Ordering::Acquire) >= total;
        if !finished() {
            idle(&finished);
        }
        let mut spins = 0u32;
        while !finished() {
            if self.poisoned.load(Ordering::Relaxed) {
                panic!("another copy of the team job failed");
            }
            spins = spins.saturating_add(1);
            if spins < 1 << 11 {
                std::hint::spin_loop();
            } else {
                // the thread with the last part is not running (more threads than free cores): give it this
                // core rather than spin on
                std::thread::park_timeout(std::time::Duration::from_micros(20));
            }
        }
    }
}

/// Run `job` on every thread of the pool at once (a copy each), with `stages` stages for `Ctx::stage`; returns
/// when all copies are done. A panic in the job is an error naming `what`.
pub fn run(what: &str, stages: usize, job: &(dyn Fn(&Ctx) + Sync)) -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let n = rayon::current_num_threads().max(1);
    let claimed: Vec<AtomicUsize> = (0..stages * n).map(|_| AtomicUsize::new(0)).collect();
    let done: Vec<AtomicUsize> = (0..stages).map(|_| AtomicUsize::new(0)).collect();
    let poisoned = AtomicBool::new(false);
    let next = AtomicUsize::new(1);
    let copy = |leader: bool| {
        let me = if leader { 0 } else { next.fetch_add(1, Ordering::Relaxed) };
        let ctx = Ctx { n, leader, me, claimed: &claimed, done: &done, poisoned: &poisoned };
        if catch_unwind(AssertUnwindSafe(|| job(&ctx))).is_err() {
            poisoned.store(true, Ordering::Relaxed);
        }
    };
    rayon::in_place_scope(|s| {
        for _ in 1..n {
            s.spawn(|_| copy(false));
        }
        copy(true);
    });
    if poisoned.load(Ordering::Relaxed) {
        return Err(Error::Internal(format!("{what}: a thread of the decode team panicked")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stages see what the stage before wrote; every part of a stage goes to exactly one copy.
    #[test]
    fn stages_are_ordered_and_parts_claimed_once() {
        let n = 1000;
        let a: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let b: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for _ in 0..20 {
            run("test", 2, &|ctx| {
                ctx.stage(0, n, 7, |r| {
                    for i in r {
                        a[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                ctx.stage(1, n, 3, |r| {
                    for i in r {
                        // the other half's element, written by whichever copy in stage 0
                        let j = (i + n / 2) % n;
                        b[i].store(a[j].load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                });
            })
            .unwrap();
        }
        assert!(a.iter().all(|x| x.load(Ordering::Relaxed) == 20));
        assert!(b.iter().all(|x| x.load(Ordering::Relaxed) == 20));
    }

    /// A homed stage: every part goes to exactly one copy, the stretches cut 0..total in order, and a copy that
    /// comes late finds its stretch taken by the others (none waits for it); `idle` runs only while parts are
    /// still running, and the stage is done when it returns.
    #[test]
    fn homed_stages_claim_each_part_once_and_take_a_late_copys_stretch() {
        let (total, chunk) = (1000, 7);
        let ran: Vec<AtomicUsize> = (0..total).map(|_| AtomicUsize::new(usize::MAX)).collect();
        let (idled, n_seen) = (AtomicUsize::new(0), AtomicUsize::new(0));
        run("test", 2, &|ctx| {
            n_seen.store(ctx.n, Ordering::Relaxed);
            let homes: Vec<Range<usize>> = (0..ctx.n).map(|k| ctx.home(total, chunk, k)).collect();
            assert_eq!(homes.first().map(|h| h.start), Some(0));
            assert_eq!(homes.last().map(|h| h.end), Some(total));
            assert!(homes.windows(2).all(|w| w[0].end == w[1].start && w[0].start % chunk == 0));
            if !ctx.leader {
                // this copy comes when the leader has done the whole stage
                while ctx.done[0].load(Ordering::Acquire) < total {
                    std::hint::spin_loop();
                }
            }
            let mut idle = |finished: &dyn Fn() -> bool| {
                idled.fetch_add(1, Ordering::Relaxed);
                while !finished() {
                    std::hint::spin_loop();
                }
            };
            ctx.run_stage(0, total, chunk, Claim::Homed, |r| {
                for i in r {
                    assert_eq!(ran[i].swap(ctx.me, Ordering::Relaxed), usize::MAX, "part {i} ran twice");
                }
            }, &mut idle);
            ctx.stage(1, 1, 1, |_| {});
        })
        .unwrap();
        // the leader ran every part, its own stretch and the late copy's; it never waited, so never idled
        assert!(ran.iter().all(|c| c.load(Ordering::Relaxed) == 0));
        assert_eq!(idled.into_inner(), 0, "n = {}", n_seen.into_inner());
    }

    /// `idle` runs on a copy that has nothing left to claim while a part is still running, and the stage is done
    /// once it sees `finished`: here the last part cannot end until some copy idles.
    #[test]
    fn a_copy_with_nothing_left_idles_until_the_stage_is_done() {
        let idled = AtomicUsize::new(0);
        let after = AtomicUsize::new(0);
        run("test", 2, &|ctx| {
            let mut idle = |finished: &dyn Fn() -> bool| {
                idled.fetch_add(1, Ordering::Release);
                while !finished() {
                    std::hint::spin_loop();
                }
            };
            ctx.run_stage(0, 2, 1, Claim::Homed, |r| {
                // the part of whichever copy comes second waits for the other to idle (alone, nothing can)
                if r.start == 1 && ctx.n > 1 {
                    while idled.load(Ordering::Acquire) == 0 {
                        std::hint::spin_loop();
                    }
                }
            }, &mut idle);
            after.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        let (n, idled) = (rayon::current_num_threads(), idled.into_inner());
        assert!(if n > 1 { idled >= 1 } else { idled == 0 }, "{idled} idled of {n}");
        assert_eq!(after.into_inner(), n);
    }

    /// A panic in one copy is an error, not a hang, and the team runs the next job.
    #[test]
    fn a_panic_is_an_error() {
        let r = run("test", 2, &|ctx| {
            ctx.stage(0, 4, 1, |r| {
                if r.start == 1 {
                    panic!("on purpose");
                }
            });
            ctx.stage(1, 4, 1, |_| {});
        });
        assert!(matches!(r, Err(Error::Internal(_))), "{r:?}");
        assert!(run("test", 1, &|ctx| ctx.stage(0, 3, 1, |_| {})).is_ok());
    }

    /// A serial stage runs on the leader alone, once per part; the stages after it see what it wrote.
    #[test]
    fn serial_stages_run_on_the_leader() {
        let on_leader = AtomicUsize::new(0);
        let elsewhere = AtomicUsize::new(0);
        let seen = AtomicUsize::new(0);
        run("test", 2, &|ctx| {
            ctx.serial_stage(0, 5, |r| {
                let c = if ctx.leader { &on_leader } else { &elsewhere };
                c.fetch_add(r.len(), Ordering::Relaxed);
            });
            ctx.stage(1, 1, 1, |_| seen.store(on_leader.load(Ordering::Relaxed), Ordering::Relaxed));
        })
        .unwrap();
        assert_eq!((on_leader.into_inner(), elsewhere.into_inner(), seen.into_inner()), (5, 0, 5));
    }
}
