//! Matrix products `c = a · b` whose right factor is packed once, ahead of many products, into
//! column panels of [`PANEL`] columns, for the Winograd convolutions' products: there every
//! entry's filter matrix `U_e` meets the tiles of every task, and the gemm crate packed it anew
//! for each of those products (and the tiles too, which [`product`] reads in place).
//!
//! The micro-kernel holds [`ROWS`] rows × [`PANEL`] columns of `c` in registers and adds
//! `a[i, p] · b[p, j]` with a fused multiply-add for `p` in order, so every element is one
//! in-order sum of fused products: the same bits at every vector width, and the gemm crate's
//! bits wherever it runs its shared dimension in one block (every shape of this project's
//! Winograd forwards and input gradients; `the_product_gives_the_gemm_crates_bits`).
//!
//! It runs in plain Rust compiled at the [`simd`] tier, and only at the AVX2 tier
//! ([`usable`]): there its 6 × 16 block is twelve of the sixteen vector registers, and it is
//! faster than the crate on this project's product shapes (BENCHMARKS.md, round 24). At the
//! AVX-512 tier the same block would be six of thirty-two registers, too few to keep both FMA
//! units busy, and no AVX-512 CPU was at hand to size one: the gemm crate's AVX-512 kernels run
//! there, and below AVX2 its baseline ones.

use candle_core::{DType, WithDType};
use rayon::prelude::*;

use super::simd::{self, with_fma, SimdTier};
use crate::profile::ProductKernel;

/// Columns per panel: two AVX2 vectors of `f32`.
pub(crate) const PANEL: usize = 16;

/// Rows of `c` the micro-kernel holds at a time.
pub(crate) const ROWS: usize = 6;

/// Whether [`product`] runs for element type `T` and `n` columns in this process: `f32`, whole
/// panels, at the AVX2 tier.
pub(crate) fn usable<T: WithDType>(n: usize) -> bool {
    T::DTYPE == DType::F32 && n % PANEL == 0 && simd::tier() == SimdTier::Avx2
}

/// `count` matrices `k × n` (row-major, rows `ldb` apart, matrix `e` from element `e · step` of
/// `b`) packed for [`product`]: matrix `e`'s panel `j` at `(e · n / PANEL + j) · k · PANEL`, its
/// row `p` at `p · PANEL` within. Matrices in parallel.
pub(crate) fn pack<T: WithDType>(b: &[T], (ldb, step): (usize, usize), count: usize, (k, n): (usize, usize)) -> Vec<T> {
    assert_eq!(n % PANEL, 0, "panels: {n} columns are not whole panels");
    let mut out = super::scratch::take(count * k * n);
    if k * n == 0 {
        return out;
    }
    assert!(b.len() >= (count - 1) * step + (k - 1) * ldb + n, "panels: the matrices run past their buffer");
    out.par_chunks_mut(k * n).enumerate().for_each(|(e, dst)| {
        for (j, panel) in dst.chunks_exact_mut(k * PANEL).enumerate() {
            for (p, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                let at = e * step + p * ldb + j * PANEL;
                row.copy_from_slice(&b[at..at + PANEL]);
            }
        }
    });
    out
}

/// `c (m × n, rows ldc apart) = a (m × k, rows lda apart) · b`, `b` one matrix as [`pack`] lays
/// it out; single-threaded, for callers that run several side by side. Only where [`usable`]
/// says so (it panics elsewhere).
pub(crate) fn product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[T], usize),
    panels: &[T],
    (c, ldc): (&mut [T], usize),
) {
    let call = Call { mnk: (m, n, k), a: (lda, 1), b: Right { panel: k * PANEL, row: PANEL }, ldc, accumulate: false };
    run(call, a, panels, c, ProductKernel::Packed);
}

/// `c (m × n, rows ldc apart) = aᵀ · b`, plus the old `c` with `accumulate`, for `a` `(k × m)`
/// and `b` `(k × n)`, row-major with rows `lda` and `ldb` apart, `b` read in place (its panels
/// are its runs of [`PANEL`] columns): the Winograd weight gradient's sums over tiles.
/// Single-threaded; only where [`usable`] says so.
pub(crate) fn transposed_product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[T], usize),
    (b, ldb): (&[T], usize),
    (c, ldc): (&mut [T], usize),
    accumulate: bool,
) {
    let call = Call { mnk: (m, n, k), a: (1, lda), b: Right { panel: PANEL, row: ldb }, ldc, accumulate };
    run(call, a, b, c, ProductKernel::InPlace);
}

/// Where panel `j`'s row `p` of a right factor starts: `j · panel + p · row` elements in.
#[derive(Debug, Clone, Copy)]
struct Right {
    panel: usize,
    row: usize,
}

/// A product's shape: `(m, n, k)`, the left factor's element strides (row, column) as `m × k`,
/// the right factor's panels, the output's row stride, and whether the product is added to it.
#[derive(Debug, Clone, Copy)]
struct Call {
    mnk: (usize, usize, usize),
    a: (usize, usize),
    b: Right,
    ldc: usize,
    accumulate: bool,
}

/// [`product`] and [`add_transposed_product`] for any `T`: checked, recorded, run on `f32`.
fn run<T: WithDType>(call: Call, a: &[T], b: &[T], c: &mut [T], kernel: ProductKernel) {
    let (m, n, k) = call.mnk;
    assert!(usable::<T>(n), "panels: the product does not run for {:?} with {n} columns here", T::DTYPE);
    crate::profile::add_product(crate::profile::ProductCall {
        dtype: T::DTYPE,
        m,
        n,
        k,
        a_strides: call.a,
        b_strides: if kernel == ProductKernel::Packed { (n, 1) } else { (call.b.row, 1) },
        ldc: call.ldc,
        accumulate: call.accumulate,
        parallel: false,
        kernel,
    });
    // SAFETY: `usable` checked that `T` is `f32`, the only `WithDType` of that dtype.
    let (a, b, c) = unsafe {
        (
            std::slice::from_raw_parts(a.as_ptr().cast::<f32>(), a.len()),
            std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), b.len()),
            std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f32>(), c.len()),
        )
    };
    run_f32(call, a, b, c);
}

/// The products on `f32` buffers, at whatever tier the process runs (the same bits at each).
fn run_f32(call: Call, a: &[f32], b: &[f32], c: &mut [f32]) {
    let ((m, n, k), (a_rs, a_cs), Right { panel, row }, ldc) = (call.mnk, call.a, call.b, call.ldc);
    assert_eq!(n % PANEL, 0, "panels: {n} columns are not whole panels");
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "panels: an empty shared dimension");
    assert!(a.len() > (m - 1) * a_rs + (k - 1) * a_cs, "panels: the left factor runs past its buffer");
    assert!(
        b.len() >= (n / PANEL - 1) * panel + (k - 1) * row + PANEL,
        "panels: the right factor runs past its buffer"
    );
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "panels: the output runs past its buffer");
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    with_fma(
        #[inline(always)]
        // SAFETY: the asserts bound every element the loops address.
        || unsafe { blocks(call, a, b, c) },
    );
}

/// The loops: panel by panel (it stays in the L1 cache), blocks of [`ROWS`] rows down the
/// panel, the last block of fewer rows.
///
/// # Safety
/// As [`run_f32`] asserts: `a`, `b` and `c` valid for the elements the call addresses.
#[inline(always)]
unsafe fn blocks(call: Call, a: *const f32, b: *const f32, c: *mut f32) {
    let ((m, n, _), (a_rs, _), ldc) = (call.mnk, call.a, call.ldc);
    let whole = m - m % ROWS;
    for j in 0..n / PANEL {
        // SAFETY (all below): within the bounds the caller vouches for.
        let (b, c) = unsafe { (b.add(j * call.b.panel), c.add(j * PANEL)) };
        for i in (0..whole).step_by(ROWS) {
            unsafe { kernel::<ROWS>(call, a.add(i * a_rs), b, c.add(i * ldc)) };
        }
        let (a, c) = unsafe { (a.add(whole * a_rs), c.add(whole * ldc)) };
        match m % ROWS {
            1 => unsafe { kernel::<1>(call, a, b, c) },
            2 => unsafe { kernel::<2>(call, a, b, c) },
            3 => unsafe { kernel::<3>(call, a, b, c) },
            4 => unsafe { kernel::<4>(call, a, b, c) },
            5 => unsafe { kernel::<5>(call, a, b, c) },
            _ => {}
        }
    }
}

/// `R` rows × [`PANEL`] columns of `c` from `R` rows of `a` and one panel of `b`, summed in
/// registers over `p` in order from zero, then stored or added to `c`.
///
/// # Safety
/// `a` valid for `R` rows of `k` (the call's strides), `b` for the panel's `k` rows of
/// [`PANEL`], `c` for `R` rows of `PANEL` (rows `ldc` apart).
#[inline(always)]
unsafe fn kernel<const R: usize>(call: Call, a: *const f32, b: *const f32, c: *mut f32) {
    let ((_, _, k), (a_rs, a_cs), ldc) = (call.mnk, call.a, call.ldc);
    let mut acc = [[0f32; PANEL]; R];
    for p in 0..k {
        // SAFETY: within the bounds the caller vouches for.
        let row: [f32; PANEL] = unsafe { b.add(p * call.b.row).cast::<[f32; PANEL]>().read_unaligned() };
        let a = unsafe { a.add(p * a_cs) };
        for (r, sums) in acc.iter_mut().enumerate() {
            let x = unsafe { a.add(r * a_rs).read() };
            for (s, &y) in sums.iter_mut().zip(&row) {
                *s = x.mul_add(y, *s);
            }
        }
    }
    for (r, sums) in acc.iter().enumerate() {
        let c = unsafe { c.add(r * ldc).cast::<[f32; PANEL]>() };
        if call.accumulate {
            let mut old = unsafe { c.read_unaligned() };
            for (o, &s) in old.iter_mut().zip(sums) {
                *o += s;
            }
            unsafe { c.write_unaligned(old) };
        } else {
            unsafe { c.write_unaligned(*sums) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::plumbing::matmul::matmul_strided;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104729) % 1013) as f32 / 1013.0 - 0.5).collect()
    }

    /// `(m, n, k)` of every kind the Winograd convolutions give the kernel: row counts with each
    /// remainder of six, 16 to 512 columns, shared dimensions of 1 to 512.
    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 16, 1),
        (5, 16, 3),
        (13, 32, 64),
        (96, 256, 256),
        (62, 64, 64),
        (9, 512, 512),
        (40, 128, 17),
        (64, 64, 108),
    ];

    /// `Σ_p x(p) · y(p)` in order from zero, each term a fused multiply-add: what every element
    /// of the kernel's output is.
    fn in_order(k: usize, x: impl Fn(usize) -> f32, y: impl Fn(usize) -> f32) -> f32 {
        (0..k).fold(0f32, |s, p| x(p).mul_add(y(p), s))
    }

    /// Two matrices packed side by side with padded rows, then each times a left factor with
    /// padded rows: each element is the in-order sum of fused products, bit for bit, whatever
    /// the tier, within rounding of the gemm crate's product, and the padding is left alone.
    #[test]
    fn the_packed_product_is_the_in_order_sum_of_fused_products() {
        assert!(!usable::<f64>(PANEL) && !usable::<f32>(PANEL + 8));
        assert_eq!(usable::<f32>(PANEL), simd::tier() == SimdTier::Avx2);
        for (m, n, k) in SHAPES {
            let (ldb, step, lda, ldc) = (2 * n + 16, n, k + 3, n + 16);
            let b = data(k * ldb, 1);
            let a = data(m * lda, 2);
            let packed = pack(&b, (ldb, step), 2, (k, n));
            for e in 0..2 {
                let (mut ours, mut theirs) = (vec![f32::NAN; m * ldc], vec![f32::NAN; m * ldc]);
                let call = Call {
                    mnk: (m, n, k),
                    a: (lda, 1),
                    b: Right { panel: k * PANEL, row: PANEL },
                    ldc,
                    accumulate: false,
                };
                run_f32(call, &a, &packed[e * k * n..], &mut ours);
                matmul_strided((m, n, k), &a, lda, &b[e * step..], ldb, &mut theirs, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let exact = in_order(k, |p| a[i * lda + p], |p| b[e * step + p * ldb + j]);
                        let (x, y) = (ours[i * ldc + j], theirs[i * ldc + j]);
                        assert_eq!(
                            x.to_bits(),
                            exact.to_bits(),
                            "{m}×{n}×{k}, matrix {e}: c[{i}, {j}] {x} against {exact}"
                        );
                        assert!((x - y).abs() <= 1e-5 * k as f32, "{m}×{n}×{k}: c[{i}, {j}] {x}, the gemm crate's {y}");
                    }
                    assert!(ours[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    /// `c += aᵀ · b` with `b` in place: the old `c` plus the in-order sum, bit for bit, within
    /// rounding of the gemm crate's, the padding left alone.
    #[test]
    fn the_transposed_product_adds_the_in_order_sum_of_fused_products() {
        for (m, n, k) in SHAPES {
            let (lda, ldb, ldc) = (m + 5, n + 16, n + 16);
            let (a, b) = (data(k * lda, 3), data(k * ldb, 4));
            let old = data(m * ldc, 5);
            let (mut ours, mut theirs) = (old.clone(), old.clone());
            let call = Call { mnk: (m, n, k), a: (1, lda), b: Right { panel: PANEL, row: ldb }, ldc, accumulate: true };
            run_f32(call, &a, &b, &mut ours);
            crate::ops::plumbing::matmul::gemm_strided(
                (m, n, k),
                &a,
                (1, lda),
                &b,
                (ldb, 1),
                &mut theirs,
                ldc,
                true,
                false,
            );
            for i in 0..m {
                for j in 0..n {
                    let exact = old[i * ldc + j] + in_order(k, |p| a[p * lda + i], |p| b[p * ldb + j]);
                    let (x, y) = (ours[i * ldc + j], theirs[i * ldc + j]);
                    assert_eq!(x.to_bits(), exact.to_bits(), "{m}×{n}×{k}: c[{i}, {j}] {x} against {exact}");
                    assert!((x - y).abs() <= 1e-5 * k as f32, "{m}×{n}×{k}: c[{i}, {j}] {x}, the gemm crate's {y}");
                }
                assert_eq!(ours[i * ldc + n..(i + 1) * ldc], old[i * ldc + n..(i + 1) * ldc]);
            }
        }
    }

    #[test]
    fn packing_puts_each_panel_row_together() {
        let (k, n, ldb) = (3, 32, 40);
        let b: Vec<f64> = (0..2 * k * ldb).map(|i| i as f64).collect();
        let packed = pack(&b, (ldb, k * ldb), 2, (k, n));
        for e in 0..2 {
            for j in 0..n / PANEL {
                for p in 0..k {
                    for l in 0..PANEL {
                        let got = packed[(e * n / PANEL + j) * k * PANEL + p * PANEL + l];
                        assert_eq!(got, b[e * k * ldb + p * ldb + j * PANEL + l]);
                    }
                }
            }
        }
    }
}
