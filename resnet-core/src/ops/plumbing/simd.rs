//! Running a hot loop compiled for the CPU it runs on.
//!
//! The crates build for the baseline x86-64 target (SSE2), so loops the compiler vectorises run
//! four lanes wide without fused multiply-add. [`with_fma`] runs a closure inside a function
//! compiled for AVX2 and FMA when the CPU has them (checked once, then cached by `std`), so the
//! closure, once inlined there, is vectorised eight lanes wide. Elsewhere it just calls it.

/// Runs `f`, compiled for AVX2 + FMA when the CPU supports them.
#[inline(always)]
pub fn with_fma<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: both features were just detected on this CPU.
            return unsafe { run(f) };
        }
    }
    f()
}
