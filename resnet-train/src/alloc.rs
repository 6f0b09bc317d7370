//! Allocator tuning for processes that train or evaluate (applied by [`crate::tune_process`]).
//!
//! A training step allocates and frees the same few hundred megabytes of activations,
//! gradients and patch matrices every step. glibc serves allocations above 32 MB with fresh
//! `mmap`s and returns them with `munmap`, so every step the kernel would zero and map those
//! pages again (page faults, page clearing, TLB shootdowns). Keeping freed memory in the heap
//! for reuse avoids that without raising peak memory, since the step's allocations repeat.
//! The same holds for every thread: glibc gives threads other than the main one arenas of their
//! own, which hand freed memory back to the kernel, so a step run on one of rayon's workers
//! ([`crate::on_polling_workers`]) would fault its pages in again every time. With one arena,
//! every thread allocates from the main heap.

/// Makes glibc's `malloc` serve every allocation from its heap and keep freed memory for reuse
/// (`M_MMAP_MAX = 0`, trim threshold 2 GiB, 64 MiB top pad), from every thread
/// (`M_ARENA_MAX = 1`). Returns whether it applied: only glibc on Linux; elsewhere it does
/// nothing. Process-wide, so only binaries should call it.
pub(crate) fn retain_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc's tuning parameters; it is safe to call at any
        // time, and these values are within its documented ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
                && libc::mallopt(libc::M_TOP_PAD, 64 << 20) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}
