//! Matrix products `c = a · b` for the Winograd convolutions, the in-bounds taps' forwards of
//! 3×3 images of 512 channels and the one-channel stem's forward, on a micro-kernel of this
//! crate's own: the Winograd filter matrices `U_e` and the taps' and stem's weights are packed
//! once per convolution into column panels, where the gemm crate packed them anew for every
//! product (and the left factors too, which [`product`] reads in place); the Winograd weight
//! gradient's sums read both factors in place, and the stem's patches are read in place from
//! its image ([`patch_product`]).
//!
//! The kernel holds [`ROWS`] rows × one panel of `c` in registers and adds `a[i, p] · b[p, j]`
//! with a fused multiply-add for `p` in order, so every element is one in-order sum of fused
//! products: the same bits at every vector width and panel width, and the gemm crate's bits,
//! since it takes only products whose shared dimension the crate runs in one block ([`MAX_K`]).
//!
//! It is plain Rust compiled at the [`simd`] tier. At the AVX2 tier its 6 × 16 block is twelve
//! of the sixteen vector registers, and it runs there by default: faster than the gemm crate on
//! this project's product shapes, alone and in the step (BENCHMARKS.md, round 24). At the
//! AVX-512 tier it runs only with `RESNET_PANELS=all`, on panels of 32 (6 × 32 is twelve of the
//! thirty-two registers): on the AVX-512 CPU that measured it (an Intel Xeon) the gemm crate's
//! AVX-512 kernels were faster in the step, with this block and with 12 × 32 (BENCHMARKS.md,
//! round 28). There, and below AVX2, the gemm crate's kernels run. `RESNET_PANELS=off` runs the gemm crate's everywhere, for
//! comparing the two in one binary. The variable is read once, at the first product; other
//! values leave the default, as `RESNET_SIMD`'s do.

use std::sync::OnceLock;

use candle_core::{DType, WithDType};
use rayon::prelude::*;

use super::simd::{self, with_fma, SimdTier};
use crate::profile::ProductKernel;

/// Rows of `c` the micro-kernel holds at a time.
pub(crate) const ROWS: usize = 6;

/// Where this crate's kernel runs the products (`RESNET_PANELS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    /// Nowhere (`off`).
    Off,
    /// At the AVX2 tier (the default).
    Avx2,
    /// At the AVX2 and AVX-512 tiers (`all`).
    All,
}

fn setting() -> Setting {
    static SETTING: OnceLock<Setting> = OnceLock::new();
    *SETTING.get_or_init(|| match std::env::var("RESNET_PANELS").as_deref() {
        Ok("off") => Setting::Off,
        Ok("all") => Setting::All,
        _ => Setting::Avx2,
    })
}

/// The longest shared dimension the kernel takes: the gemm crate's shortest block of it (its
/// `kc` is at least 512 on every CPU), so that a product the kernel runs is one in-order sum in
/// the crate too, whichever of its kernels would run it, and every tier gives the same bits.
pub(crate) const MAX_K: usize = 512;

/// The panel width this crate's kernel runs with in this process for element type `T`, `n`
/// columns and a shared dimension of `k`, or `None` where the gemm crate runs the product:
/// `f32`, whole panels, `k` at most [`MAX_K`], 16 columns (two vectors) at the AVX2 tier, 32
/// (two vectors) at the AVX-512 tier with `RESNET_PANELS=all`.
pub(crate) fn width<T: WithDType>(n: usize, k: usize) -> Option<usize> {
    if T::DTYPE != DType::F32 || k > MAX_K {
        return None;
    }
    let width = match (simd::tier(), setting()) {
        (SimdTier::Avx2, Setting::Avx2 | Setting::All) => 16,
        (SimdTier::Avx512, Setting::All) => 32,
        _ => return None,
    };
    (n % width == 0).then_some(width)
}

/// `count` matrices `k × n` (row-major, rows `ldb` apart, matrix `e` from element `e · step` of
/// `b`) packed in panels of `width` columns for [`product`]: matrix `e`'s panel `j` at `(e · n /
/// width + j) · k · width`, its row `p` at `p · width` within. Matrices in parallel.
pub(crate) fn pack<T: WithDType>(
    b: &[T],
    (ldb, step): (usize, usize),
    count: usize,
    (k, n): (usize, usize),
    width: usize,
) -> Vec<T> {
    assert!(width > 0 && n % width == 0, "panels: {n} columns are not whole panels of {width}");
    let mut out = super::scratch::take(count * k * n);
    if count * k * n == 0 {
        return out;
    }
    assert!(b.len() >= (count - 1) * step + (k - 1) * ldb + n, "panels: the matrices run past their buffer");
    out.par_chunks_mut(k * n).enumerate().for_each(|(e, dst)| {
        for (j, panel) in dst.chunks_exact_mut(k * width).enumerate() {
            for (p, row) in panel.chunks_exact_mut(width).enumerate() {
                let at = e * step + p * ldb + j * width;
                row.copy_from_slice(&b[at..at + width]);
            }
        }
    });
    out
}

/// `c (m × n, rows ldc apart) = a (m × k, rows lda apart) · b`, plus the old `c` with
/// `accumulate`, `b` one matrix as [`pack`] lays it out in panels of `width`, the width
/// [`width`] gives; single-threaded, for callers that run several side by side.
pub(crate) fn product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[T], usize),
    panels: &[T],
    (c, ldc): (&mut [T], usize),
    (accumulate, width): (bool, usize),
) {
    let b = Right { width, panel: k * width, row: width };
    let call = Call { mnk: (m, n, k), a: (lda, 1), taps: std::ptr::null(), b, ldc, accumulate };
    run(call, a, panels, c, ProductKernel::Packed);
}

/// [`product`] with the left factor's columns at `offsets`: its element `(i, p)` at
/// `i · lda + offsets[p]`. A one-channel convolution's patches read in place from its image
/// (padded): `lda` the image step from one output pixel to the next, `offsets` the taps' places
/// from a pixel's first, in the patch matrix's order, so the sums are im2col's.
pub(crate) fn patch_product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (a, lda, offsets): (&[T], usize, &[usize]),
    panels: &[T],
    (c, ldc): (&mut [T], usize),
    (accumulate, width): (bool, usize),
) {
    assert_eq!(offsets.len(), k, "panels: {} tap offsets for a shared dimension of {k}", offsets.len());
    let b = Right { width, panel: k * width, row: width };
    let call = Call { mnk: (m, n, k), a: (lda, 0), taps: offsets.as_ptr(), b, ldc, accumulate };
    run(call, a, panels, c, ProductKernel::Patches);
}

/// `c (m × n, rows ldc apart) = aᵀ · b`, plus the old `c` with `accumulate`, for `a` `(k × m)`
/// and `b` `(k × n)`, row-major with rows `lda` and `ldb` apart, `b` read in place (its panels
/// are its runs of `width` columns, the width [`width`] gives): the Winograd weight gradient's
/// sums over tiles. Single-threaded.
pub(crate) fn transposed_product<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (a, lda): (&[T], usize),
    (b, ldb): (&[T], usize),
    (c, ldc): (&mut [T], usize),
    (accumulate, width): (bool, usize),
) {
    let right = Right { width, panel: width, row: ldb };
    let call = Call { mnk: (m, n, k), a: (1, lda), taps: std::ptr::null(), b: right, ldc, accumulate };
    run(call, a, b, c, ProductKernel::InPlace);
}

/// A right factor's panels: `width` columns each, panel `j`'s row `p` at `j · panel + p · row`
/// elements from its start.
#[derive(Debug, Clone, Copy)]
struct Right {
    width: usize,
    panel: usize,
    row: usize,
}

/// A product's shape: `(m, n, k)`, the left factor's element strides (row, column) as `m × k`
/// or its row stride and column offsets (`taps`, `k` of them, where not null), the right
/// factor's panels, the output's row stride, and whether the product is added to it.
#[derive(Debug, Clone, Copy)]
struct Call {
    mnk: (usize, usize, usize),
    a: (usize, usize),
    taps: *const usize,
    b: Right,
    ldc: usize,
    accumulate: bool,
}

/// [`product`] and [`transposed_product`] for any `T`: checked against [`width`], recorded, run
/// on `f32`.
fn run<T: WithDType>(call: Call, a: &[T], b: &[T], c: &mut [T], kernel: ProductKernel) {
    let (m, n, k) = call.mnk;
    assert_eq!(
        width::<T>(n, k),
        Some(call.b.width),
        "panels: the kernel does not run on panels of {} for {:?} with {n} columns here",
        call.b.width,
        T::DTYPE
    );
    crate::profile::add_product(crate::profile::ProductCall {
        dtype: T::DTYPE,
        m,
        n,
        k,
        a_strides: if kernel == ProductKernel::Patches { (call.a.0, 1) } else { call.a },
        b_strides: if kernel == ProductKernel::InPlace { (call.b.row, 1) } else { (n, 1) },
        ldc: call.ldc,
        accumulate: call.accumulate,
        parallel: false,
        kernel,
    });
    // SAFETY: `width` is only `Some` for `f32`, the only `WithDType` of that dtype.
    let (a, b, c) = unsafe {
        (
            std::slice::from_raw_parts(a.as_ptr().cast::<f32>(), a.len()),
            std::slice::from_raw_parts(b.as_ptr().cast::<f32>(), b.len()),
            std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f32>(), c.len()),
        )
    };
    run_f32(call, a, b, c);
}

/// The products on `f32` buffers, at whatever tier the process runs (the same bits at each),
/// on panels of 16 or 32 columns.
fn run_f32(call: Call, a: &[f32], b: &[f32], c: &mut [f32]) {
    let ((m, n, k), (a_rs, a_cs), Right { width, panel, row }, ldc) = (call.mnk, call.a, call.b, call.ldc);
    assert!(matches!(width, 16 | 32) && n % width == 0, "panels: {n} columns are not whole panels of {width}");
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "panels: an empty shared dimension");
    // The left factor's last column: its offset, or `(k − 1)` column strides.
    let last = if call.taps.is_null() {
        (k - 1) * a_cs
    } else {
        // SAFETY: `patch_product` passes `k` offsets.
        unsafe { std::slice::from_raw_parts(call.taps, k) }.iter().copied().max().unwrap_or(0)
    };
    assert!(a.len() > (m - 1) * a_rs + last, "panels: the left factor runs past its buffer");
    assert!(
        b.len() >= (n / width - 1) * panel + (k - 1) * row + width,
        "panels: the right factor runs past its buffer"
    );
    assert!(ldc >= n && c.len() >= (m - 1) * ldc + n, "panels: the output runs past its buffer");
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    // SAFETY: the asserts bound every element the loops address.
    match (width, call.taps.is_null()) {
        (16, true) => with_fma(
            #[inline(always)]
            || unsafe { blocks::<16, false>(call, a, b, c) },
        ),
        (16, false) => with_fma(
            #[inline(always)]
            || unsafe { blocks::<16, true>(call, a, b, c) },
        ),
        (_, true) => with_fma(
            #[inline(always)]
            || unsafe { blocks::<32, false>(call, a, b, c) },
        ),
        (_, false) => with_fma(
            #[inline(always)]
            || unsafe { blocks::<32, true>(call, a, b, c) },
        ),
    }
}

/// The loops: panel by panel (it stays in the L1 cache), blocks of [`ROWS`] rows down the
/// panel, the last block of fewer rows; the left factor's columns at the call's `taps` with
/// `TAPS`.
///
/// # Safety
/// As [`run_f32`] asserts: `a`, `b` and `c` valid for the elements the call addresses.
#[inline(always)]
unsafe fn blocks<const P: usize, const TAPS: bool>(call: Call, a: *const f32, b: *const f32, c: *mut f32) {
    let ((m, n, _), (a_rs, _), ldc) = (call.mnk, call.a, call.ldc);
    let whole = m - m % ROWS;
    for j in 0..n / P {
        // SAFETY (all below): within the bounds the caller vouches for.
        let (b, c) = unsafe { (b.add(j * call.b.panel), c.add(j * P)) };
        for i in (0..whole).step_by(ROWS) {
            unsafe { kernel::<ROWS, P, TAPS>(call, a.add(i * a_rs), b, c.add(i * ldc)) };
        }
        let (a, c) = unsafe { (a.add(whole * a_rs), c.add(whole * ldc)) };
        match m % ROWS {
            1 => unsafe { kernel::<1, P, TAPS>(call, a, b, c) },
            2 => unsafe { kernel::<2, P, TAPS>(call, a, b, c) },
            3 => unsafe { kernel::<3, P, TAPS>(call, a, b, c) },
            4 => unsafe { kernel::<4, P, TAPS>(call, a, b, c) },
            5 => unsafe { kernel::<5, P, TAPS>(call, a, b, c) },
            _ => {}
        }
    }
}

/// `R` rows × `P` columns of `c` from `R` rows of `a` and one panel of `b`, summed in registers
/// over `p` in order from zero, then stored or added to `c`; `a`'s column `p` at the call's
/// `taps[p]` with `TAPS`, else `p` column strides.
///
/// # Safety
/// `a` valid for `R` rows of `k` (the call's strides or taps), `b` for the panel's `k` rows of
/// `P`, `c` for `R` rows of `P` (rows `ldc` apart).
#[inline(always)]
unsafe fn kernel<const R: usize, const P: usize, const TAPS: bool>(
    call: Call,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
) {
    let ((_, _, k), (a_rs, a_cs), ldc) = (call.mnk, call.a, call.ldc);
    let mut acc = [[0f32; P]; R];
    for p in 0..k {
        // SAFETY: within the bounds the caller vouches for.
        let row: [f32; P] = unsafe { b.add(p * call.b.row).cast::<[f32; P]>().read_unaligned() };
        let a = unsafe { a.add(if TAPS { call.taps.add(p).read() } else { p * a_cs }) };
        for (r, sums) in acc.iter_mut().enumerate() {
            let x = unsafe { a.add(r * a_rs).read() };
            for (s, &y) in sums.iter_mut().zip(&row) {
                *s = x.mul_add(y, *s);
            }
        }
    }
    for (r, sums) in acc.iter().enumerate() {
        let c = unsafe { c.add(r * ldc).cast::<[f32; P]>() };
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
    use crate::ops::plumbing::matmul::gemm_strided;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104729) % 1013) as f32 / 1013.0 - 0.5).collect()
    }

    /// `(m, n, k)` of every kind the Winograd convolutions give the kernel: row counts with each
    /// remainder of six, 16 to 512 columns, shared dimensions of 1 to [`MAX_K`].
    const SHAPES: [(usize, usize, usize); 8] = [
        (1, 16, 1),
        (5, 32, 3),
        (13, 32, 64),
        (96, 256, 256),
        (62, 64, 64),
        (9, 512, 512),
        (40, 128, 17),
        (64, 64, 108),
    ];

    /// The panel widths a shape runs on: 16, and 32 where its columns are whole panels of 32.
    fn widths(n: usize) -> impl Iterator<Item = usize> {
        [16, 32].into_iter().filter(move |w| n % w == 0)
    }

    /// `Σ_p x(p) · y(p)` in order from zero, each term a fused multiply-add: what every element
    /// of the kernel's output is.
    fn in_order(k: usize, x: impl Fn(usize) -> f32, y: impl Fn(usize) -> f32) -> f32 {
        (0..k).fold(0f32, |s, p| x(p).mul_add(y(p), s))
    }

    #[test]
    fn the_kernel_runs_on_f32_at_the_tiers_its_setting_names() {
        assert_eq!(width::<f64>(64, 64), None);
        let expected = match (simd::tier(), setting()) {
            (SimdTier::Avx2, Setting::Avx2 | Setting::All) => Some(16),
            (SimdTier::Avx512, Setting::All) => Some(32),
            _ => None,
        };
        assert_eq!(width::<f32>(64, MAX_K), expected);
        assert_eq!(width::<f32>(64, MAX_K + 1), None);
        assert_eq!(width::<f32>(8, 64), None);
    }

    /// The left factor read through column offsets (a one-channel image's patches in place:
    /// rows `lda` apart, overlapping), written and added to an old `c`: each element is the
    /// in-order sum of fused products over the offsets' elements, bit for bit.
    #[test]
    fn the_patch_product_reads_the_left_factor_at_its_offsets() {
        for (m, n, k, lda) in [(13, 32, 49, 2), (6, 16, 25, 1), (5, 64, 7, 3)] {
            for width in widths(n) {
                let offsets: Vec<usize> = (0..k).map(|p| (p / 7) * 40 + p % 7 + (p * 3) % 5).collect();
                let a = data((m - 1) * lda + offsets.iter().max().expect("offsets") + 1, 3);
                let b = data(k * n, 4);
                let old = data(m * n, 5);
                let packed = pack(&b, (n, 0), 1, (k, n), width);
                for accumulate in [false, true] {
                    let mut ours = old.clone();
                    let right = Right { width, panel: k * width, row: width };
                    let call =
                        Call { mnk: (m, n, k), a: (lda, 0), taps: offsets.as_ptr(), b: right, ldc: n, accumulate };
                    run_f32(call, &a, &packed, &mut ours);
                    for i in 0..m {
                        for j in 0..n {
                            let sum = in_order(k, |p| a[i * lda + offsets[p]], |p| b[p * n + j]);
                            let exact = if accumulate { old[i * n + j] + sum } else { sum };
                            let x = ours[i * n + j];
                            assert_eq!(
                                x.to_bits(),
                                exact.to_bits(),
                                "{m}×{n}×{k} on {width}: c[{i}, {j}] {x} against {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Two matrices packed side by side with padded rows, then each times a left factor with
    /// padded rows, written and added to an old `c`, on panels of 16 and of 32: each element is
    /// the in-order sum of fused products (plus the old `c`) and the gemm crate's element, bit
    /// for bit, whatever the tier, and the padding is left alone.
    #[test]
    fn the_packed_product_is_the_in_order_sum_of_fused_products() {
        let shapes = SHAPES.into_iter().flat_map(|s| widths(s.1).map(move |w| (s, w)));
        for (((m, n, k), width), accumulate) in shapes.flat_map(|s| [(s, false), (s, true)]) {
            let (ldb, step, lda, ldc) = (2 * n + 16, n, k + 3, n + 16);
            let b = data(k * ldb, 1);
            let a = data(m * lda, 2);
            let old = data(m * ldc, 6);
            let packed = pack(&b, (ldb, step), 2, (k, n), width);
            for e in 0..2 {
                let (mut ours, mut theirs) = (old.clone(), old.clone());
                let right = Right { width, panel: k * width, row: width };
                let call = Call { mnk: (m, n, k), a: (lda, 1), taps: std::ptr::null(), b: right, ldc, accumulate };
                run_f32(call, &a, &packed[e * k * n..], &mut ours);
                gemm_strided((m, n, k), &a, (lda, 1), &b[e * step..], (ldb, 1), &mut theirs, ldc, accumulate, false);
                for i in 0..m {
                    for j in 0..n {
                        let sum = in_order(k, |p| a[i * lda + p], |p| b[e * step + p * ldb + j]);
                        let exact = if accumulate { old[i * ldc + j] + sum } else { sum };
                        let (x, y) = (ours[i * ldc + j], theirs[i * ldc + j]);
                        let at =
                            format!("{m}×{n}×{k} on {width}, matrix {e}, accumulate {accumulate}: c[{i}, {j}] {x}");
                        assert_eq!(x.to_bits(), exact.to_bits(), "{at} against {exact}");
                        assert_eq!(x.to_bits(), y.to_bits(), "{at}, the gemm crate's {y}");
                    }
                    assert_eq!(ours[i * ldc + n..(i + 1) * ldc], old[i * ldc + n..(i + 1) * ldc]);
                }
            }
        }
    }

    /// `c = aᵀ · b` and `c += aᵀ · b` with `b` in place, on panels of 16 and of 32: the in-order
    /// sum (plus the old `c`) and the gemm crate's element, bit for bit, the padding left alone.
    #[test]
    fn the_transposed_product_is_the_in_order_sum_of_fused_products() {
        let shapes = SHAPES.into_iter().flat_map(|s| widths(s.1).map(move |w| (s, w)));
        for (((m, n, k), width), accumulate) in shapes.flat_map(|s| [(s, false), (s, true)]) {
            let (lda, ldb, ldc) = (m + 5, n + 16, n + 16);
            let (a, b) = (data(k * lda, 3), data(k * ldb, 4));
            let old = data(m * ldc, 5);
            let (mut ours, mut theirs) = (old.clone(), old.clone());
            let right = Right { width, panel: width, row: ldb };
            run_f32(
                Call { mnk: (m, n, k), a: (1, lda), taps: std::ptr::null(), b: right, ldc, accumulate },
                &a,
                &b,
                &mut ours,
            );
            gemm_strided((m, n, k), &a, (1, lda), &b, (ldb, 1), &mut theirs, ldc, accumulate, false);
            for i in 0..m {
                for j in 0..n {
                    let sum = in_order(k, |p| a[p * lda + i], |p| b[p * ldb + j]);
                    let exact = if accumulate { old[i * ldc + j] + sum } else { sum };
                    let (x, y) = (ours[i * ldc + j], theirs[i * ldc + j]);
                    let at = format!("{m}×{n}×{k} on {width}, accumulate {accumulate}: c[{i}, {j}] {x}");
                    assert_eq!(x.to_bits(), exact.to_bits(), "{at} against {exact}");
                    assert_eq!(x.to_bits(), y.to_bits(), "{at}, the gemm crate's {y}");
                }
                assert_eq!(ours[i * ldc + n..(i + 1) * ldc], old[i * ldc + n..(i + 1) * ldc]);
            }
        }
    }

    #[test]
    fn packing_puts_each_panel_row_together() {
        let (k, n, ldb) = (3, 64, 70);
        let b: Vec<f64> = (0..2 * k * ldb).map(|i| i as f64).collect();
        for width in [16, 32] {
            let packed = pack(&b, (ldb, k * ldb), 2, (k, n), width);
            for e in 0..2 {
                for j in 0..n / width {
                    for p in 0..k {
                        for l in 0..width {
                            let got = packed[(e * n / width + j) * k * width + p * width + l];
                            assert_eq!(got, b[e * k * ldb + p * ldb + j * width + l], "width {width}");
                        }
                    }
                }
            }
        }
    }
}
