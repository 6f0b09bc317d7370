//! Thread tuning for processes that train or evaluate on the CPU (applied by
//! [`crate::tune_process`]).
//!
//! candle 0.11 runs its element-wise ops (the gradient additions of every backward, among
//! others) on a pool of its own, `CANDLE_NUM_THREADS − 1` helper threads that spin for a while
//! after each op before they sleep. The project's kernels run on rayon's threads; while they do,
//! a spinning helper takes a core from them. With `CANDLE_NUM_THREADS=1` the element-wise ops
//! run on the calling thread and rayon keeps every core.

use std::sync::atomic::{AtomicBool, Ordering};

/// The variable candle reads for its element-wise pool's size.
pub const CANDLE_NUM_THREADS: &str = "CANDLE_NUM_THREADS";

/// Sets `CANDLE_NUM_THREADS=1` unless the user set it. Returns whether it set it. Process-wide
/// and read once, when candle first needs the pool, so only binaries should call it, before
/// any candle op and before spawning threads.
pub(crate) fn keep_candle_pool_off_the_cores() -> bool {
    set_unless_set(CANDLE_NUM_THREADS, "1")
}

/// Sets `var` to `value` unless the environment already has it; returns whether it set it.
fn set_unless_set(var: &str, value: &str) -> bool {
    if std::env::var_os(var).is_some() {
        return false;
    }
    std::env::set_var(var, value);
    true
}

/// The variable rayon (and candle's `get_num_threads`) read for the number of worker threads.
pub const RAYON_NUM_THREADS: &str = "RAYON_NUM_THREADS";

/// Sets `RAYON_NUM_THREADS` to the number of threads rayon would start anyway (the available
/// parallelism) unless the user set it. Returns whether it set it. With it unset, candle 0.11's
/// `get_num_threads` works the default out again on every call by parsing `/proc/cpuinfo`, and
/// its matrix products ask on every call. Same rules as [`keep_candle_pool_off_the_cores`]:
/// binaries only, first thing in `main`.
pub(crate) fn name_rayon_thread_count() -> bool {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_unless_set(RAYON_NUM_THREADS, &n.to_string())
}

/// Whether [`on_polling_workers`] polls; set by [`crate::tune_process`] together with the
/// allocator setting that makes it pay (see `alloc.rs`).
static POLLING: AtomicBool = AtomicBool::new(false);

/// Lets [`on_polling_workers`] keep rayon's workers polling (process-wide). Returns whether it
/// will: only with more than one worker.
pub(crate) fn enable_polling_workers() -> bool {
    POLLING.store(true, Ordering::Relaxed);
    rayon::current_num_threads() > 1
}

/// Runs `f` on one of rayon's workers while every other worker polls the pool for work instead
/// of going to sleep, and returns its result; once `f` returns, the others stop polling before
/// this returns.
///
/// A CPU training step starts hundreds of short parallel ops (over a thousand at 28 px), with
/// serial work on the calling thread between them. Left alone, rayon's idle workers sleep a few
/// tens of microseconds after an op ends, and every op then pays for waking them and, from a
/// thread outside the pool, for handing its work over and waking the caller when it is done,
/// which puts the kernel's scheduler high in a small step's profile (BENCHMARKS.md). Here the
/// step runs on a worker (its ops' work is shared through the workers' own queues) and the
/// others look for work in a loop ([`rayon::yield_now`]), as an OpenMP team spins between
/// parallel regions; finding none, a poller yields its core to any other runnable thread
/// (`sched_yield`), so a data loader's threads still get the cores while the step runs serial
/// work.
///
/// Runs `f` where it is called, without polling, unless [`crate::tune_process`] enabled it (it
/// also makes every thread allocate from glibc's main heap: a worker's own arena would hand the
/// step's freed activations back to the kernel, and the step would fault its pages in again
/// every time), when rayon has a single worker, or when called on a worker already.
pub fn on_polling_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if !POLLING.load(Ordering::Relaxed) || rayon::current_num_threads() < 2 || rayon::current_thread_index().is_some() {
        return f();
    }
    /// Tells the pollers to stop when dropped: when `f` returns, and also when it panics, since
    /// the scope waits for the pollers before it passes the panic on.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
        }
    }
    let stop = AtomicBool::new(false);
    rayon::scope(|scope| {
        let home = rayon::current_thread_index();
        let stop = &stop;
        let _stop_on_exit = Stop(stop);
        scope.spawn_broadcast(move |_, worker| {
            if Some(worker.index()) == home {
                return;
            }
            while !stop.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    // Nothing to steal: let a runnable thread (the data loader's) have the core.
                    std::thread::yield_now();
                }
            }
        });
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// With polling on, `f` runs on a worker, its parallel work gives the serial result, a nested
    /// call runs in place, and the call returns (the pollers stop).
    #[test]
    fn polling_workers_run_the_closure_on_a_worker_and_stop() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a pool");
        POLLING.store(true, Ordering::Relaxed);
        let values: Vec<u64> = (0..100_000).collect();
        let serial: u64 = values.iter().map(|v| v * v % 7).sum();
        pool.install(|| {
            // `install` runs on the pool already: the call runs in place.
            assert!(on_polling_workers(|| rayon::current_thread_index().is_some()));
        });
        for _ in 0..20 {
            let (on_worker, sum, inner) = on_polling_workers(|| {
                let sum: u64 = (0..50).into_par_iter().map(|_| values.par_iter().map(|v| v * v % 7).sum::<u64>()).sum();
                (rayon::current_thread_index().is_some(), sum, on_polling_workers(|| 5))
            });
            if rayon::current_num_threads() > 1 {
                assert!(on_worker, "the closure ran outside rayon's pool");
            }
            assert_eq!(sum, 50 * serial);
            assert_eq!(inner, 5);
        }
    }

    /// A panic in `f` reaches the caller and the pollers stop, instead of the scope waiting for
    /// them forever.
    #[test]
    fn a_panic_in_the_closure_stops_the_pollers_and_reaches_the_caller() {
        POLLING.store(true, Ordering::Relaxed);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| on_polling_workers(|| panic!("a failing step")));
            let _ = done.send(outcome.is_err());
        });
        let panicked = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("on_polling_workers did not return after its closure panicked");
        assert!(panicked, "the closure's panic did not reach the caller");
    }
}
