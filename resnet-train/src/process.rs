//! One call that sets a training or evaluation process up for CPU speed: the allocator and the
//! thread pools (see `alloc.rs` and `threads.rs` for why each setting matters).

use crate::{alloc, threads};

/// What [`tune_process`] changed; a setting the user already made through the environment, or
/// one the platform lacks, is left alone and reported as `false`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessTuning {
    /// glibc keeps freed memory in its heap for reuse (Linux with glibc only).
    pub retain_freed_memory: bool,
    /// `CANDLE_NUM_THREADS=1` was set, so candle's spinning element-wise pool does not take a
    /// core from the kernels' rayon threads.
    pub candle_pool_off: bool,
    /// `RAYON_NUM_THREADS` was set to the available parallelism.
    pub rayon_threads_named: bool,
    /// [`crate::on_polling_workers`] keeps rayon's idle workers polling while a CPU training
    /// step runs (only where glibc's allocator was tuned, and with more than one worker).
    pub polling_workers: bool,
}

/// Tunes the whole process for training and evaluation: glibc keeps freed memory for reuse,
/// `CANDLE_NUM_THREADS=1` and `RAYON_NUM_THREADS` set to the available parallelism unless the
/// environment sets them, and CPU training steps run with rayon's workers polling
/// ([`crate::on_polling_workers`]). Process-wide and partly read once, so binaries call it
/// first thing in `main`, before any candle op and before spawning threads; libraries never
/// call it.
///
/// ```
/// let tuning = resnet_train::tune_process();
/// // Whatever was set, the environment now names both thread counts.
/// assert!(std::env::var_os("CANDLE_NUM_THREADS").is_some());
/// assert!(std::env::var_os("RAYON_NUM_THREADS").is_some());
/// # let _ = tuning;
/// ```
pub fn tune_process() -> ProcessTuning {
    let retain_freed_memory = alloc::retain_freed_memory();
    let candle_pool_off = threads::keep_candle_pool_off_the_cores();
    let rayon_threads_named = threads::name_rayon_thread_count();
    // After the thread count is named: rayon's pool starts on first use and reads it then.
    let polling_workers = retain_freed_memory && threads::enable_polling_workers();
    ProcessTuning { retain_freed_memory, candle_pool_off, rayon_threads_named, polling_workers }
}
