//! Training-mode BatchNorm (then ReLU) followed by a max-pool, one pass each way: d2l's stem
//! where its images need a gradient (otherwise [`super::stem`] runs it without its activation).
//!
//! As two ops, the forward writes the normalised activation (at 96 px, 128 × 48 × 48 × 64
//! values, 75 MB) and the pool reads it back; the backward reads it again to find each window's
//! maximum and writes the pool's input gradient `dz` (cleared first), and the BatchNorm reads `x`
//! and `dz` twice, for its sums and for its input gradient. Here each image is normalised a few
//! rows at a time into a ring that stays in cache ([`RowRing`]: the rows under one row of
//! windows) and pooled from there, so the normalised activation is never written out; the
//! backward normalises the rows again the same way, finds each row of windows' winning cells
//! into a second ring, gathers each input row's gradient from the windows over it, and sums the
//! BatchNorm's terms from that row as it writes `dz` out once; the input gradient then reads `x`
//! and `dz` once.
//!
//! [`FusedBatchNorm::cpu_fwd_pooled`] is the forward, [`FusedBatchNorm::backward_pooled`] the
//! backward (a no-grad op on the CPU); the BatchNorm's own statistics and row arithmetic come
//! from [`super::batch_norm`].
//!
//! The arithmetic is the layers', in the same order (the BatchNorm's sums in the same blocks of
//! rows, each window's gradient routed to the same cell), so the results are bit-identical to
//! [`super::batch_norm`]'s op followed by [`super::pool`]'s.

use std::ops::Range;

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::batch_norm::{
    add_partials, batch_stats, gradient_sums_rows, input_grad_with, normalize_block, to_t, Affine, FusedBatchNorm,
    Stats, Sums, ROWS_PER_TASK,
};
use super::pool::{covering, gather_row, pool_row, window_range, winners_row, MaxPool2d};
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::scratch;
use crate::ops::plumbing::simd::with_fma;
use crate::ops::plumbing::storage::contiguous;

/// Images per backward task, about: each task recomputes the images its rows touch, so a task of
/// several images recomputes at most one image twice where its blocks of rows do not end on an
/// image's end.
const IMAGES_PER_TASK: usize = 4;

/// `pool(relu(bn(x)))` of `x` `(batch, h, w, c)` (the pool's geometry `win`) with the batch
/// statistics `stats`; ReLU with `RELU`.
pub(super) fn normalize_pool<T: WithDType, const RELU: bool>(x: &[T], stats: &Stats, win: &Window) -> Vec<T> {
    let affine = stats.affine::<T>();
    let (img_len, out_len) = (win.h * win.w * win.c, win.oh() * win.ow() * win.c);
    let row = win.w * win.c;
    let mut out = scratch::zeroed(win.batch * out_len);
    out.par_chunks_mut(out_len).enumerate().for_each(|(b, dst)| {
        let image = &x[b * img_len..(b + 1) * img_len];
        let mut z = RowRing::new(win.kh, row, 0);
        with_fma(
            #[inline(always)]
            || {
                for (oy, out) in dst.chunks_exact_mut(win.ow() * win.c).enumerate() {
                    z.normalize_window_rows::<RELU>(image, &affine, win, oy);
                    pool_row(|iy| z.row(iy), win, oy, out);
                }
            },
        );
        z.give();
    });
    out
}

/// The backward of [`normalize_pool`]: `[dx (batch·h·w·c) | dγ (c) | dβ (c)]` from `x`, the
/// pool's output `pooled` and its gradient `grad`.
pub(super) fn normalize_pool_backward<T: WithDType, const RELU: bool>(
    x: &[T],
    (pooled, grad): (&[T], &[T]),
    gamma: &[T],
    (stats, eps): (&Stats, f64),
    win: &Window,
) -> Vec<T> {
    let (dz, sums) = pool_gradient::<T, RELU>(x, (pooled, grad), stats, win);
    let out = input_grad_with::<T, RELU>(x, &dz, gamma, (stats, eps), &sums, Sums::None);
    scratch::give(dz);
    out
}

/// The pool's input gradient `dz` (a scratch buffer) and, as it is made, `Σ g` and
/// `Σ g·(x − mean)` per channel in blocks of [`ROWS_PER_TASK`] rows as the BatchNorm's own
/// backward sums them (g: `dz` masked by the ReLU).
fn pool_gradient<T: WithDType, const RELU: bool>(
    x: &[T],
    (pooled, grad): (&[T], &[T]),
    stats: &Stats,
    win: &Window,
) -> (Vec<T>, [Vec<f64>; 2]) {
    let c = win.c;
    let affine = stats.affine::<T>();
    let parts = Parts::new(x.len() / c, win);
    let mut dz = scratch::take(x.len());
    let partials: Vec<Vec<(Vec<T>, Vec<T>)>> = dz
        .par_chunks_mut(parts.per_task * ROWS_PER_TASK * c)
        .enumerate()
        .map(|(task, dz)| {
            let start = parts.rows(task).start;
            let mut blocks: Vec<(Vec<T>, Vec<T>)> = Vec::new();
            parts.visit::<T, RELU>(
                task,
                x,
                (pooled, grad),
                &affine,
                #[inline(always)]
                |first, xs, gs| {
                    dz[(first - start) * c..(first - start) * c + gs.len()].copy_from_slice(gs);
                    // The rows in runs that end where a block of sums does.
                    let mut at = 0;
                    while at < xs.len() / c {
                        let row = first + at;
                        if row % ROWS_PER_TASK == 0 {
                            blocks.push((vec![T::zero(); c], vec![T::zero(); c]));
                        }
                        let end = (xs.len() / c).min(at + ROWS_PER_TASK - row % ROWS_PER_TASK);
                        let (a0, a1) = blocks.last_mut().expect("a task starts at a block");
                        let run = (&xs[at * c..end * c], &gs[at * c..end * c]);
                        gradient_sums_rows::<T, RELU>((a0, a1), run, &affine);
                        at = end;
                    }
                },
            );
            blocks
        })
        .collect();
    (dz, add_partials(partials.into_iter().flatten(), c))
}

/// The backward's split of the batch's rows (pixels) into tasks of whole blocks of
/// [`ROWS_PER_TASK`] rows, a fixed number of them per task.
struct Parts<'w> {
    rows: usize,
    /// Blocks per task.
    per_task: usize,
    win: &'w Window,
}

impl<'w> Parts<'w> {
    fn new(rows: usize, win: &'w Window) -> Self {
        let per_task = (IMAGES_PER_TASK * win.h * win.w).div_ceil(ROWS_PER_TASK).max(1);
        Parts { rows, per_task, win }
    }

    fn rows(&self, task: usize) -> Range<usize> {
        let span = self.per_task * ROWS_PER_TASK;
        task * span..((task + 1) * span).min(self.rows)
    }

    /// Calls `f(first, x_rows, g_rows)` for the part of each image row that task `task`'s rows
    /// cover, in order: `first` the part's first row in the batch (a pixel), `g_rows` the pool's
    /// input gradient there (before the ReLU's mask), routed as [`super::pool::pool_image_backward`] routes
    /// it. An image is made a few rows at a time: the normalised rows under one row of windows,
    /// then those windows' winning cells, then each input row's gradient gathered from the
    /// windows over it, so that none of them leaves the cache. Runs on the calling thread, at the
    /// detected vector width.
    #[inline(always)]
    fn visit<T: WithDType, const RELU: bool>(
        &self,
        task: usize,
        x: &[T],
        (pooled, grad): (&[T], &[T]),
        affine: &Affine<T>,
        mut f: impl FnMut(usize, &[T], &[T]),
    ) {
        let win = self.win;
        let (pixels, c, w) = (win.h * win.w, win.c, win.w);
        let (row, out_row, out_len) = (w * c, win.ow() * c, win.oh() * win.ow() * c);
        let mut dz = scratch::take(row);
        let rows = self.rows(task);
        with_fma(
            #[inline(always)]
            || {
                let mut first = rows.start;
                while first < rows.end {
                    let n = first / pixels;
                    let end = ((n + 1) * pixels).min(rows.end);
                    let image = &x[n * pixels * c..(n + 1) * pixels * c];
                    let (maxima, g) = (&pooled[n * out_len..(n + 1) * out_len], &grad[n * out_len..(n + 1) * out_len]);
                    let (from, to) = (first - n * pixels, end - n * pixels);
                    let image_rows = from / w..(to - 1) / w + 1;
                    let first_window = covering(image_rows.start, win.stride, win.pad, win.kh, win.oh()).start;
                    let first_row = window_range(first_window, win.stride, win.pad, win.kh, win.h).start;
                    let (mut z, mut won) =
                        (RowRing::new(win.kh, row, first_row), RowRing::new(win.kh, out_row, first_window));
                    for iy in image_rows {
                        let windows = covering(iy, win.stride, win.pad, win.kh, win.oh());
                        while let Some((oy, won_row)) = won.next_before(windows.end) {
                            z.normalize_window_rows::<RELU>(image, affine, win, oy);
                            winners_row(|zy| z.row(zy), &maxima[oy * out_row..(oy + 1) * out_row], win, oy, won_row);
                        }
                        gather_row(|oy| won.row(oy), g, win, iy, &mut dz);
                        let part = (iy * w).max(from)..((iy + 1) * w).min(to);
                        let in_row = (part.start - iy * w) * c..(part.end - iy * w) * c;
                        f(n * pixels + part.start, &image[part.start * c..part.end * c], &dz[in_row]);
                    }
                    z.give();
                    won.give();
                    first = end;
                }
            },
        );
        scratch::give(dz);
    }
}

/// The rows of an image made one at a time, in order, of which the last `k` are kept (a ring of
/// `k` rows of `len` values in a scratch buffer): the rows under one row of a pool's windows,
/// which stay in cache where the whole image would not.
struct RowRing<T: WithDType> {
    buf: Vec<T>,
    len: usize,
    /// Rows made so far: the next row to make.
    made: usize,
}

impl<T: WithDType> RowRing<T> {
    /// A ring of `k` rows of `len` values whose first row to make is `first`.
    fn new(k: usize, len: usize, first: usize) -> Self {
        RowRing { buf: scratch::take(k * len), len, made: first }
    }

    /// The next row to make, if it is before `end`: its index and its slot, which the caller
    /// writes whole; it counts as made. A loop over these rows rather than a closure per row, so
    /// that the caller's vector width reaches the code that makes them.
    #[inline(always)]
    fn next_before(&mut self, end: usize) -> Option<(usize, &mut [T])> {
        if self.made >= end {
            return None;
        }
        let (i, slot) = (self.made, self.slot(self.made));
        self.made += 1;
        Some((i, &mut self.buf[slot]))
    }

    /// Where row `i` lives in the ring.
    #[inline(always)]
    fn slot(&self, i: usize) -> Range<usize> {
        let at = i % (self.buf.len() / self.len) * self.len;
        at..at + self.len
    }

    /// Makes the rows under output row `oy`'s windows (and any before them not yet made) of
    /// `relu(bn(image))` with the BatchNorm's `affine`, one image row of `win` each.
    #[inline(always)]
    fn normalize_window_rows<const RELU: bool>(&mut self, image: &[T], affine: &Affine<T>, win: &Window, oy: usize) {
        let ys = window_range(oy, win.stride, win.pad, win.kh, win.h);
        let len = self.len;
        while let Some((iy, z_row)) = self.next_before(ys.end) {
            normalize_block::<T, T, RELU>(z_row, &image[iy * len..(iy + 1) * len], (&affine.0, &affine.1, &affine.2));
        }
    }

    /// Row `i`, one of the last `k` made.
    #[inline(always)]
    fn row(&self, i: usize) -> &[T] {
        let k = self.buf.len() / self.len;
        debug_assert!(i < self.made && i + k >= self.made, "row {i} is not among the last {k} made");
        &self.buf[self.slot(i)]
    }

    fn give(self) {
        scratch::give(self.buf);
    }
}

impl FusedBatchNorm {
    /// The training forward followed by `pool` as one pass ([`normalize_pool`]):
    /// `(x, γ, β) -> pool(bn(x))` (with ReLU between as the op is set), the statistics recorded
    /// as [`CustomOp3::cpu_fwd`] records them.
    pub(super) fn cpu_fwd_pooled(
        &self,
        x: &CpuStorage,
        layout: &Layout,
        (gamma, beta): (&CpuStorage, &CpuStorage),
        pool: MaxPool2d,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span("batch-norm-max-pool", layout.dims());
        let win = pool.window(layout)?;
        fn run<T: WithDType>(x: &[T], g: &[T], b: &[T], eps: f64, relu: bool, win: &Window) -> (Vec<T>, Stats) {
            let stats = batch_stats(x, g, b, eps);
            let pooled = if relu {
                normalize_pool::<T, true>(x, &stats, win)
            } else {
                normalize_pool::<T, false>(x, &stats, win)
            };
            (pooled, stats)
        }
        let vector = Layout::contiguous(win.c);
        let (pooled, stats) = match (x, gamma, beta) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                let (x, g, b) =
                    (contiguous(x, layout, "x")?, contiguous(g, &vector, "γ")?, contiguous(b, &vector, "β")?);
                let (y, s) = run(x, g, b, self.eps(), self.relu(), &win);
                (CpuStorage::F32(y), s)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                let (x, g, b) =
                    (contiguous(x, layout, "x")?, contiguous(g, &vector, "γ")?, contiguous(b, &vector, "β")?);
                let (y, s) = run(x, g, b, self.eps(), self.relu(), &win);
                (CpuStorage::F64(y), s)
            }
            _ => {
                candle_core::bail!("batch-norm with max-pool supports matching f32 or f64 tensors, got {:?}", x.dtype())
            }
        };
        self.record(stats)?;
        Ok((pooled, Shape::from((win.batch, win.oh(), win.ow(), win.c))))
    }

    /// The backward of [`FusedBatchNorm::cpu_fwd_pooled`]: `(dx, dγ, dβ)` from the input `x`, the
    /// pooled output, γ and the pooled output's gradient.
    pub(super) fn backward_pooled(
        &self,
        x: &Tensor,
        (pooled, grad): (&Tensor, &Tensor),
        gamma: &Tensor,
        pool: MaxPool2d,
    ) -> candle_core::Result<[Tensor; 3]> {
        let (n, c) = (x.elem_count(), gamma.elem_count());
        let packed = self.pooled_backward_op(x, (pooled, grad), gamma, pool)?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        Ok([dx, packed.narrow(0, n, c)?, packed.narrow(0, n + c, c)?])
    }

    fn pooled_backward_op(
        &self,
        x: &Tensor,
        (pooled, grad): (&Tensor, &Tensor),
        gamma: &Tensor,
        pool: MaxPool2d,
    ) -> candle_core::Result<Tensor> {
        let op = BatchNormPoolBackward {
            eps: self.eps(),
            relu: self.relu(),
            stats: self.recorded()?,
            gamma: gamma.to_dtype(DType::F64)?.to_vec1()?,
            pool,
        };
        x.apply_op3_no_bwd(&pooled.contiguous()?, &grad.contiguous()?, &op)
    }
}

/// `(x, pooled, pooled gradient) -> [dx | dγ | dβ]` for [`FusedBatchNorm::cpu_fwd_pooled`], with
/// the forward's batch statistics.
#[derive(Debug)]
struct BatchNormPoolBackward {
    eps: f64,
    relu: bool,
    stats: Stats,
    /// γ, exactly (f32 and f64 values are f64 values).
    gamma: Vec<f64>,
    pool: MaxPool2d,
}

impl CustomOp3 for BatchNormPoolBackward {
    fn name(&self) -> &'static str {
        "batch-norm-max-pool-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        let win = self.pool.window(l1)?;
        let out_dims = [win.batch, win.oh(), win.ow(), win.c];
        if l2.shape().dims() != out_dims || l3.shape().dims() != out_dims || self.gamma.len() != win.c {
            candle_core::bail!(
                "batch-norm max-pool backward: output {:?} and gradient {:?} do not match the output shape {out_dims:?}",
                l2.shape(),
                l3.shape()
            )
        }
        /// The backward on contiguous data.
        fn go<T: WithDType>(
            op: &BatchNormPoolBackward,
            [(s1, l1), (s2, l2), (s3, l3)]: [(&CpuStorage, &Layout); 3],
            win: &Window,
        ) -> candle_core::Result<Vec<T>> {
            let x = contiguous(s1.as_slice::<T>()?, l1, "x")?;
            let ys = (
                contiguous(s2.as_slice::<T>()?, l2, "max-pool output")?,
                contiguous(s3.as_slice::<T>()?, l3, "max-pool gradient")?,
            );
            let (g, st) = (&to_t(&op.gamma), (&op.stats, op.eps));
            Ok(if op.relu {
                normalize_pool_backward::<T, true>(x, ys, g, st, win)
            } else {
                normalize_pool_backward::<T, false>(x, ys, g, st, win)
            })
        }
        let operands = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(go::<f32>(self, operands, &win)?),
            DType::F64 => CpuStorage::F64(go::<f64>(self, operands, &win)?),
            other => candle_core::bail!("batch-norm max-pool backward supports f32 or f64, got {other:?}"),
        };
        // `[dx | dγ | dβ]`.
        let len = l1.shape().elem_count() + 2 * win.c;
        Ok((out, Shape::from(len)))
    }
}
