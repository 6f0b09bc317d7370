//! Thread tuning for processes that train or evaluate on the CPU (applied by
//! [`crate::tune_process`]).
//!
//! candle 0.11 runs its element-wise ops (the gradient additions of every backward, among
//! others) on a pool of its own, `CANDLE_NUM_THREADS − 1` helper threads that spin for a while
//! after each op before they sleep. The project's kernels run on rayon's threads; while they do,
//! a spinning helper takes a core from them. With `CANDLE_NUM_THREADS=1` the element-wise ops
//! run on the calling thread and rayon keeps every core.

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
