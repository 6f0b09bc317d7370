//! Matrix-product tuning for processes that train or evaluate (applied by
//! [`crate::tune_process`]).
//!
//! The convolutions' products go through the `gemm` crate (`resnet_core`'s kernels and candle's
//! `matmul` alike). Before a product whose right factor (after the crate's own transposition)
//! has unit row stride, the crate copies that factor into packed panels when the product has
//! more than twice its kernel's row block of rows. On the AVX2 kernels (16-row blocks) that
//! packs the Winograd products of every layer with more than 32 output channels, and the
//! kernel reading the factor in place was faster at every product shape of a training and an
//! evaluation step. Packing moves values, it does not change the arithmetic: the products give
//! the same bits either way.

/// The crate packs a right factor of unit row stride when the product has more rows than this
/// many kernel row blocks (default 2). 256 is the crate's cap: with the AVX2 kernels' 16-row
/// blocks, it packs only products of more than 4,096 rows.
const RIGHT_FACTOR_PACKING_THRESHOLD: usize = 256;

/// Makes the `gemm` crate read right factors of unit row stride in place instead of packing
/// them, where it runs its AVX2 kernels (an x86-64 CPU with FMA and without AVX-512F). Returns
/// whether it applied. Process-wide (the crate's setting is global), so only binaries should
/// call it; results are the same bits either way.
pub(crate) fn unpacked_right_factors() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") && !std::arch::is_x86_feature_detected!("avx512f") {
            gemm::set_rhs_packing_threshold(RIGHT_FACTOR_PACKING_THRESHOLD);
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The crate's setting is process-wide: the tests that change it take turns.
    static SETTING: Mutex<()> = Mutex::new(());

    /// `c = a · b` through the crate as `resnet_core`'s kernels call it: row-major `a` (`m×k`,
    /// rows `lda` apart), `b` (`k×n`, rows `ldb` apart) and `c` (`m×n`), single-threaded.
    fn product(
        (m, n, k): (usize, usize, usize),
        (a, lda): (&[f32], usize),
        (b, ldb): (&[f32], usize),
        packing_threshold: usize,
    ) -> Vec<f32> {
        let mut c = vec![f32::NAN; m * n];
        gemm::set_rhs_packing_threshold(packing_threshold);
        // SAFETY: `a` holds `m` rows of `lda ≥ k` values, `b` `k` rows of `ldb ≥ n`, `c` is
        // `m×n` and written without being read (no accumulation).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                lda as isize,
                b.as_ptr(),
                1,
                ldb as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        gemm::set_rhs_packing_threshold(gemm::DEFAULT_RHS_PACKING_THRESHOLD);
        c
    }

    /// The claim the setting rests on: a product reading its right factor in place gives the
    /// same bits as one packing it. The shapes are the Winograd forward's (a task's tiles against
    /// one entry of the filters, whose rows lie `16 · cout` apart), with enough output channels
    /// that the crate packs at its default on both its AVX2 and AVX-512 kernels.
    #[test]
    fn reading_the_right_factor_in_place_gives_the_same_bits() {
        let _turn = SETTING.lock().unwrap_or_else(|e| e.into_inner());
        let values = |len: usize, seed: u32| -> Vec<f32> {
            (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5).collect()
        };
        for (m, n, k) in [(468, 64, 64), (234, 128, 128), (96, 256, 256), (37, 320, 75)] {
            let ldb = 16 * n;
            let (a, b) = (values(m * k, 1), values(k * ldb, 2));
            let packed = product((m, n, k), (&a, k), (&b, ldb), 0);
            let in_place = product((m, n, k), (&a, k), (&b, ldb), RIGHT_FACTOR_PACKING_THRESHOLD);
            assert!(packed.iter().all(|v| v.is_finite()), "{m}×{n}×{k}: the product left values unwritten");
            let differ = packed.iter().zip(&in_place).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
            assert_eq!(differ, 0, "{m}×{n}×{k}: {differ} values differ between packed and in-place right factors");
        }
    }

    /// Where the crate runs its AVX2 kernels the setting applies, elsewhere it is left alone.
    #[test]
    fn applies_exactly_where_the_crate_runs_its_avx2_kernels() {
        let _turn = SETTING.lock().unwrap_or_else(|e| e.into_inner());
        let applied = unpacked_right_factors();
        #[cfg(target_arch = "x86_64")]
        let avx2_kernels =
            std::arch::is_x86_feature_detected!("fma") && !std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2_kernels = false;
        let threshold = gemm::get_rhs_packing_threshold();
        gemm::set_rhs_packing_threshold(gemm::DEFAULT_RHS_PACKING_THRESHOLD);
        assert_eq!(applied, avx2_kernels);
        let expected = if avx2_kernels { RIGHT_FACTOR_PACKING_THRESHOLD } else { gemm::DEFAULT_RHS_PACKING_THRESHOLD };
        assert_eq!(threshold, expected);
    }
}
