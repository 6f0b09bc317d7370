//! Running a hot loop compiled for the widest vector unit of the CPU it runs on.
//!
//! The crates build for the baseline x86-64 target (SSE2), so loops the compiler vectorises run
//! four lanes wide without fused multiply-add. [`with_fma`] runs a closure inside a function
//! compiled for AVX-512 (sixteen lanes) or AVX2 + FMA (eight lanes), whichever the CPU has
//! (detected once), so the closure, once inlined there, is vectorised at that width. Elsewhere
//! it just calls it.
//!
//! Only code inlined into that function gets its width: callers mark the closure
//! `#[inline(always)]` (`with_fma(#[inline(always)] || ...)`), and the functions it calls as
//! well. A closure left to the compiler's judgement is not inlined once it is large, and is
//! then compiled for the baseline like any other function (the disassembly shows SSE registers
//! only).
//!
//! The tier changes how many lanes a loop runs, never what it computes: the loops these
//! closures hold are element-wise or keep their reductions in source order (the compiler does
//! not reassociate floating-point sums), so every tier gives bit-identical results.
//!
//! `RESNET_SIMD=avx2` (or `baseline`) in the environment caps the tier, for comparing paths on
//! one machine; it is read once, at the first call.

use std::sync::OnceLock;

/// The instruction sets a hot loop may be compiled for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdTier {
    /// The build's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F/BW/DQ/VL, with AVX2 and FMA.
    Avx512,
}

/// The tier hot loops run at in this process: the widest the CPU supports, capped by
/// `RESNET_SIMD`.
pub fn tier() -> SimdTier {
    static TIER: OnceLock<SimdTier> = OnceLock::new();
    *TIER.get_or_init(|| {
        let cap = match std::env::var("RESNET_SIMD").as_deref() {
            Ok("baseline") => SimdTier::Baseline,
            Ok("avx2") => SimdTier::Avx2,
            _ => SimdTier::Avx512,
        };
        detected().min(cap)
    })
}

/// The widest tier this CPU supports.
fn detected() -> SimdTier {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let avx512 = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512dq")
            && std::is_x86_feature_detected!("avx512vl");
        if avx2 && avx512 {
            return SimdTier::Avx512;
        }
        if avx2 {
            return SimdTier::Avx2;
        }
    }
    SimdTier::Baseline
}

/// Runs `f`, compiled for the process's [`tier`].
#[inline(always)]
pub fn with_fma<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        /// # Safety
        /// The CPU must support AVX-512 F/BW/DQ/VL, AVX2 and FMA.
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
        unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match tier() {
            // SAFETY: `tier` returns Avx512 only when every one of these features was detected.
            SimdTier::Avx512 => return unsafe { run_avx512(f) },
            // SAFETY: `tier` returns Avx2 only when AVX2 and FMA were detected.
            SimdTier::Avx2 => return unsafe { run_avx2(f) },
            SimdTier::Baseline => {}
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tier_never_exceeds_what_the_cpu_has() {
        assert!(tier() <= detected());
    }

    #[test]
    fn every_tier_computes_the_same_bits() {
        // An element-wise fused multiply-add and an in-order sum, the two shapes of loop the
        // kernels hand to `with_fma`.
        let xs: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1013) as f32 / 97.0 - 5.0).collect();
        let ys: Vec<f32> = (0..1000).map(|i| ((i * 104729) % 997) as f32 / 31.0 + 0.25).collect();
        let work = || {
            let fused: Vec<f32> = xs.iter().zip(&ys).map(|(x, y)| x.mul_add(*y, 0.5)).collect();
            let sum = xs.iter().zip(&ys).fold(0f32, |acc, (x, y)| acc + x * y);
            (fused, sum)
        };
        let plain = work();
        let dispatched = with_fma(work);
        assert_eq!(
            plain.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            dispatched.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert_eq!(plain.1.to_bits(), dispatched.1.to_bits());
    }
}
