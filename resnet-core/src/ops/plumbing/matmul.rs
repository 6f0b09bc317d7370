//! Matrix products over raw row-major buffers through the `gemm` crate (what candle uses), for
//! the convolution's forward and backward without going through candle's `matmul` (its
//! broadcasting, layout checks and an extra allocation per call).

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Shape, WithDType};

use std::mem::MaybeUninit;
use std::time::Instant;

use rayon::prelude::*;

use super::panels;
use super::storage::contiguous;
use crate::profile::{ProductCall, ProductKernel, Replayed};

/// `c (m×n) = op(a) · op(b)`, plus the old `c` with `accumulate`, all row-major, where `op(a)`
/// is `a (m×k)` or, with `trans_a`, the transpose of `a (k×m)`; likewise `b (k×n)` or `bᵀ` of
/// `b (n×k)`.
pub(crate) fn matmul_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    trans_a: bool,
    b: &[T],
    trans_b: bool,
    c: &mut [T],
    accumulate: bool,
) {
    // Element strides (row, column) of op(a) as m×k and op(b) as k×n.
    let a_strides = if trans_a { (1, m) } else { (k, 1) };
    let b_strides = if trans_b { (1, k) } else { (n, 1) };
    gemm_strided((m, n, k), a, a_strides, b, b_strides, c, n, accumulate, true);
}

/// `c = a · b` (no transposes, no accumulation) with explicit row strides: `a` is `m×k` with
/// rows `lda` apart, `b` is `k×n` with rows `ldb` apart, `c` is `m×n` with rows `ldc` apart.
/// Single-threaded: for callers that run several products side by side.
pub(crate) fn matmul_strided<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    gemm_strided((m, n, k), a, (lda, 1), b, (ldb, 1), c, ldc, false, false);
}

/// `c = op(a) · op(b)` for matrices given by element strides: element `(i, p)` of the `m×k`
/// left factor is `a[i·a_rs + p·a_cs]`, element `(p, j)` of the `k×n` right factor is
/// `b[p·b_rs + j·b_cs]`, and `c` is `m×n` row-major with rows `ldc` apart (overwritten).
/// Single-threaded: for callers that run several products side by side.
pub(crate) fn matmul_general<T: WithDType>(
    mnk: (usize, usize, usize),
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    c: &mut [T],
    ldc: usize,
) {
    gemm_strided(mnk, a, a_strides, b, b_strides, c, ldc, false, false);
}

/// The one call into the `gemm` crate behind the helpers above, for matrices given by element
/// strides as in [`matmul_general`]; `accumulate` adds to `c`, `parallel` splits the product over
/// candle's threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided<T: WithDType>(
    mnk: (usize, usize, usize),
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    c: &mut [T],
    ldc: usize,
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: `c` is initialised, so reading it (to accumulate) is sound.
    unsafe { gemm_raw(mnk, (a, a_strides), (b, b_strides), (c.as_mut_ptr(), c.len(), ldc), accumulate, parallel) }
}

/// [`gemm_strided`] without accumulation into memory not yet written: every element of the
/// `m×n` block of `c` (rows `ldc` apart) is written, none is read. For outputs that would
/// otherwise be cleared first only to be overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_strided_uninit<T: WithDType>(
    mnk: (usize, usize, usize),
    a: &[T],
    a_strides: (usize, usize),
    b: &[T],
    b_strides: (usize, usize),
    c: &mut [MaybeUninit<T>],
    ldc: usize,
    parallel: bool,
) {
    // SAFETY: without accumulation the crate writes `c` and never reads it.
    unsafe {
        gemm_raw(mnk, (a, a_strides), (b, b_strides), (c.as_mut_ptr().cast::<T>(), c.len(), ldc), false, parallel)
    }
}

/// The product of [`gemm_strided`] into `c` given as a pointer, its length and row stride.
///
/// # Safety
/// `c` must point to `c_len` elements valid for writes (and, with `accumulate`, initialised),
/// not aliasing `a` or `b`.
unsafe fn gemm_raw<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (a, (a_rs, a_cs)): (&[T], (usize, usize)),
    (b, (b_rs, b_cs)): (&[T], (usize, usize)),
    (c, c_len, ldc): (*mut T, usize, usize),
    accumulate: bool,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(ldc >= n && c_len >= (m - 1) * ldc + n, "matmul: output buffer too small for its strides");
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                for j in 0..n {
                    // SAFETY: `row · ldc + j < c_len` (asserted above), valid for writes.
                    unsafe { c.add(row * ldc + j).write(T::zero()) };
                }
            }
        }
        return;
    }
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs && b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "matmul: input buffers too small for their strides"
    );
    crate::profile::add_product(crate::profile::ProductCall {
        dtype: T::DTYPE,
        m,
        n,
        k,
        a_strides: (a_rs, a_cs),
        b_strides: (b_rs, b_cs),
        ldc,
        accumulate,
        parallel,
        kernel: crate::profile::ProductKernel::Gemm,
    });
    // rayon's own count (the pool the product runs on), not candle's `get_num_threads`, which
    // parses /proc/cpuinfo on every call when RAYON_NUM_THREADS is unset.
    let threads = rayon::current_num_threads();
    let parallelism = if parallel && threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the asserts bound the last element addressed in each buffer (strides are
    // non-negative); the caller vouches for `c` (valid for writes, initialised where read, not
    // aliasing `a` or `b`).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The matrix products a profiled run recorded ([`crate::profile`], `steps` steps' worth; taken,
/// so cleared) run again, each shape on its own: one step's worth of calls at a time, after one of warm-up, at least five times
/// and for at least 50 ms, keeping the fastest. Products split over the threads run one after
/// another as in the step; single-threaded ones run side by side on rayon's threads, as their
/// callers run them. The operands hold the same value everywhere (the products' speed does not
/// depend on it) and stay in cache wherever they fit, and the fastest repetition counts, so the
/// sum is a floor for the step's products, not an estimate of them. Slowest first; element
/// types other than f32 and f64 are left out.
pub fn replay_products(steps: usize) -> Vec<Replayed> {
    let steps = steps.max(1);
    let products = crate::profile::take_products();
    let mut out: Vec<Replayed> = products
        .into_iter()
        .filter_map(|(call, count)| {
            let per_step = (count as usize).div_ceil(steps);
            let seconds = match call.dtype {
                DType::F32 => replay::<f32>(&call, per_step),
                DType::F64 => replay::<f64>(&call, per_step),
                _ => return None,
            };
            Some(Replayed { call, calls_per_step: count as f64 / steps as f64, seconds_per_step: seconds })
        })
        .collect();
    out.sort_by(|a, b| b.seconds_per_step.total_cmp(&a.seconds_per_step));
    out
}

/// Seconds of the fastest of several repetitions of `per_step` calls of `call`, after one of
/// warm-up.
fn replay<T: WithDType>(call: &ProductCall, per_step: usize) -> f64 {
    const MIN_REPEATS: usize = 5;
    const MIN_SECONDS: f64 = 0.05;
    let ProductCall { m, n, k, a_strides, b_strides, ldc, accumulate, parallel, kernel, .. } = *call;
    let span = |(rs, cs): (usize, usize), rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs + 1;
    let a = vec![T::from_f64(0.5); span(a_strides, m, k)];
    let b = vec![T::from_f64(0.5); span(b_strides, k, n)];
    // A packed product's right factor is packed once, ahead of the products, as its caller
    // packs it.
    let width = panels::width::<T>(n, k).unwrap_or(0);
    let packed = if kernel == ProductKernel::InPlace || kernel == ProductKernel::Gemm {
        Vec::new()
    } else {
        panels::pack(&b, (b_strides.0, 0), 1, (k, n), width)
    };
    let offsets: Vec<usize> = (0..k).map(|p| p * a_strides.1).collect();
    let c_len = (m - 1) * ldc + n;
    let run = |c: &mut Vec<T>| match kernel {
        ProductKernel::Packed => panels::product((m, n, k), (&a, a_strides.0), &packed, (c, ldc), (accumulate, width)),
        ProductKernel::Patches => {
            panels::patch_product((m, n, k), (&a, a_strides.0, &offsets), &packed, (c, ldc), (accumulate, width))
        }
        ProductKernel::InPlace => {
            panels::transposed_product((m, n, k), (&a, a_strides.1), (&b, b_strides.0), (c, ldc), (accumulate, width))
        }
        ProductKernel::Gemm => gemm_strided((m, n, k), &a, a_strides, &b, b_strides, c, ldc, accumulate, parallel),
    };
    let mut c = vec![T::zero(); c_len];
    let threads = rayon::current_num_threads();
    let mut side_by_side: Vec<Vec<T>> = (0..threads).map(|_| vec![T::zero(); c_len]).collect();
    let mut one_step = || {
        let started = Instant::now();
        if parallel {
            for _ in 0..per_step {
                run(&mut c);
            }
        } else {
            // Each thread takes its share of the calls, on its own output.
            side_by_side.par_iter_mut().enumerate().for_each(|(t, c)| {
                for _ in (t..per_step).step_by(threads) {
                    run(c);
                }
            });
        }
        started.elapsed().as_secs_f64()
    };
    one_step();
    let (mut best, mut total, mut repeats) = (f64::MAX, 0.0, 0);
    while repeats < MIN_REPEATS || total < MIN_SECONDS {
        let seconds = one_step();
        best = best.min(seconds);
        total += seconds;
        repeats += 1;
    }
    best
}

/// A product of two contiguous 2-D CPU tensors as an op without a backward (used inside the
/// convolution's backward): `op(a) · op(b)`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatMul {
    pub trans_a: bool,
    pub trans_b: bool,
}

impl CustomOp2 for MatMul {
    fn name(&self) -> &'static str {
        "matmul-nograd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        let (r1, c1) = l1.shape().dims2()?;
        let (r2, c2) = l2.shape().dims2()?;
        let (m, k1) = if self.trans_a { (c1, r1) } else { (r1, c1) };
        let (k2, n) = if self.trans_b { (c2, r2) } else { (r2, c2) };
        if k1 != k2 {
            candle_core::bail!("matmul: inner dimensions {k1} and {k2} differ ({:?} · {:?})", l1.shape(), l2.shape())
        }
        fn run<T: WithDType>(a: &[T], b: &[T], (m, n, k): (usize, usize, usize), op: &MatMul) -> Vec<T> {
            let mut c = super::scratch::zeroed(m * n);
            matmul_into((m, n, k), a, op.trans_a, b, op.trans_b, &mut c, false);
            c
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(run(
                contiguous(a, l1, "matmul lhs")?,
                contiguous(b, l2, "matmul rhs")?,
                (m, n, k1),
                self,
            )),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(run(
                contiguous(a, l1, "matmul lhs")?,
                contiguous(b, l2, "matmul rhs")?,
                (m, n, k1),
                self,
            )),
            _ => candle_core::bail!("matmul supports matching f32 or f64 tensors, got {:?}", s1.dtype()),
        };
        Ok((out, Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a float64 triple loop, for every transposition and for accumulation.
    /// Tolerance: 1e-5 relative to the larger of the value and k.
    #[test]
    fn products_match_a_float64_reference() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 1000) as f32 / 500.0 - 1.0).collect();
        let c0: Vec<f32> = (0..m * n).map(|i| (i % 13) as f32 - 6.0).collect();
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for accumulate in [false, true] {
                    let at = |i: usize, p: usize| if trans_a { a[p * m + i] } else { a[i * k + p] } as f64;
                    let bt = |p: usize, j: usize| if trans_b { b[j * k + p] } else { b[p * n + j] } as f64;
                    {
                        let mut c = c0.clone();
                        matmul_into((m, n, k), &a, trans_a, &b, trans_b, &mut c, accumulate);
                        for i in 0..m {
                            for j in 0..n {
                                let want: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum::<f64>()
                                    + if accumulate { c0[i * n + j] as f64 } else { 0.0 };
                                let got = c[i * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * want.abs().max(k as f64),
                                    "({i},{j}) {got} vs {want}: trans {trans_a}/{trans_b}, acc {accumulate}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
