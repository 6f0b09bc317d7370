//! Training-mode BatchNorm (then ReLU) followed by a max-pool, one pass each way: d2l's stem.
//!
//! As two ops, the forward writes the normalised activation (at 96 px, 128 × 48 × 48 × 64
//! values, 75 MB) and the pool reads it back; the backward reads it again to find each window's
//! maximum and writes the pool's input gradient `dz` (cleared first), and the BatchNorm reads `x`
//! and `dz` twice, for its sums and for its input gradient. Here each image is normalised into a
//! buffer that stays in cache and pooled from there, so the normalised activation is never
//! written out; the backward normalises each image again, routes the pool's gradient inside a
//! second buffer, and sums the BatchNorm's terms from it as it writes `dz` out once; the input
//! gradient then reads `x` and `dz` once. For d2l's stem, whose convolution has one input
//! channel and images that need no gradient, that input gradient is not written out either:
//! each run of rows is made in a buffer and the convolution's weight and bias gradients take
//! their terms from it there.
//!
//! The arithmetic is the layers', in the same order (the BatchNorm's sums in the same blocks of
//! rows, each window's gradient routed to the same cell), so the results are bit-identical to
//! [`super::batch_norm`]'s op followed by [`super::pool`]'s.

use std::ops::Range;

use candle_core::WithDType;
use rayon::prelude::*;

use super::batch_norm::{
    add_partials, gradient_sums_row, input_grad_row, input_grad_with, normalize_block, Affine, Stats, ROWS_PER_TASK,
};
use super::pool::{pool_image, pool_image_backward};
use crate::ops::conv::direct;
use crate::ops::plumbing::elementwise::{column_block_sums, column_sums_total, COLUMN_ROWS};
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::scratch;
use crate::ops::plumbing::simd::with_fma;

/// Images per backward task, about: each task recomputes the images its rows touch, so a task of
/// several images recomputes at most one image twice where its blocks of rows do not end on an
/// image's end.
const IMAGES_PER_TASK: usize = 4;

/// `pool(relu(bn(x)))` of `x` `(batch, h, w, c)` (the pool's geometry `win`) with the batch
/// statistics `stats`; ReLU with `RELU`.
pub(super) fn normalize_pool<T: WithDType, const RELU: bool>(x: &[T], stats: &Stats, win: &Window) -> Vec<T> {
    let affine = stats.affine::<T>();
    let (img_len, out_len) = (win.h * win.w * win.c, win.oh() * win.ow() * win.c);
    let mut out = scratch::zeroed(win.batch * out_len);
    out.par_chunks_mut(out_len).enumerate().for_each(|(b, dst)| {
        let mut z = scratch::take(img_len);
        with_fma(
            #[inline(always)]
            || {
                normalize_block::<T, RELU>(
                    &mut z,
                    &x[b * img_len..(b + 1) * img_len],
                    (&affine.0, &affine.1, &affine.2),
                );
                pool_image(&z, win, dst);
            },
        );
        scratch::give(z);
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
    let out = input_grad_with::<T, RELU>(x, &dz, gamma, (stats, eps), &sums);
    scratch::give(dz);
    out
}

/// [`normalize_pool_backward`] where `x` is the output of the one-channel convolution of
/// `images` ([`direct`], d2l's stem, geometry `conv`, no gradient wanted for the images):
/// `[dW (c, kh, kw, 1) | db (c) | dγ (c) | dβ (c)]`. The BatchNorm's input gradient, the
/// convolution's output gradient, is made a run of [`direct::PIXELS_PER_TASK`] rows at a time
/// in a buffer, and the convolution's weight and bias gradients take their terms from it there
/// (as [`direct::weight_grad`] and the bias's column sums split their rows), so it is never
/// written out.
pub(super) fn normalize_pool_backward_direct<T: WithDType, const RELU: bool>(
    x: &[T],
    (pooled, grad): (&[T], &[T]),
    gamma: &[T],
    (stats, eps): (&Stats, f64),
    (win, images, conv): (&Window, &[T], &Window),
) -> Vec<T> {
    const _: () = assert!(direct::PIXELS_PER_TASK % COLUMN_ROWS == 0, "a task's rows are whole blocks of sums");
    let c = win.c;
    let pixels = x.len() / c;
    let (dz, sums) = pool_gradient::<T, RELU>(x, (pooled, grad), stats, win);
    let affine = stats.affine::<T>();
    let (coefficients, tail) = stats.input_grad(gamma, &sums, pixels, eps);
    let terms: Vec<(Vec<T>, Vec<Vec<f64>>)> = (0..pixels.div_ceil(direct::PIXELS_PER_TASK))
        .into_par_iter()
        .map(|task| {
            let run = task * direct::PIXELS_PER_TASK..((task + 1) * direct::PIXELS_PER_TASK).min(pixels);
            let mut dy = scratch::take(run.len() * c);
            let (xs, gs) = (&x[run.start * c..run.end * c], &dz[run.start * c..run.end * c]);
            with_fma(
                #[inline(always)]
                || {
                    for ((or, xr), gr) in dy.chunks_exact_mut(c).zip(xs.chunks_exact(c)).zip(gs.chunks_exact(c)) {
                        input_grad_row::<T, RELU>(or, xr, gr, &affine, &coefficients);
                    }
                },
            );
            let dw = direct::weight_grad_part(images, conv, run, &dy, c);
            let db = dy.chunks(COLUMN_ROWS * c).map(|block| column_block_sums(block, c)).collect();
            scratch::give(dy);
            (dw, db)
        })
        .collect();
    scratch::give(dz);
    let (dw, db): (Vec<Vec<T>>, Vec<Vec<Vec<f64>>>) = terms.into_iter().unzip();
    let mut out = direct::weight_grad_total(dw, conv.kh * conv.kw, c);
    out.extend(column_sums_total::<T>(db.into_iter().flatten(), c));
    out.extend(tail);
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
                    for (i, (xr, gr)) in xs.chunks_exact(c).zip(gs.chunks_exact(c)).enumerate() {
                        if (first + i) % ROWS_PER_TASK == 0 {
                            blocks.push((vec![T::zero(); c], vec![T::zero(); c]));
                        }
                        let (a0, a1) = blocks.last_mut().expect("a task starts at a block");
                        gradient_sums_row::<T, RELU>((a0, a1), xr, gr, &affine);
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

    /// Calls `f(first, x_rows, g_rows)` for the part of each image that task `task`'s rows cover,
    /// in order: `first` the part's first row in the batch, `g_rows` the pool's input gradient
    /// there (before the ReLU's mask), made by normalising the whole image into a buffer and
    /// routing its windows' gradients as [`pool_image_backward`] does. Runs on the calling
    /// thread, at the detected vector width.
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
        let (pixels, c, out_len) = (win.h * win.w, win.c, win.oh() * win.ow() * win.c);
        let (mut z, mut dz) = (scratch::take(pixels * c), scratch::take(pixels * c));
        let rows = self.rows(task);
        with_fma(
            #[inline(always)]
            || {
                let mut first = rows.start;
                while first < rows.end {
                    let n = first / pixels;
                    let end = ((n + 1) * pixels).min(rows.end);
                    let image = &x[n * pixels * c..(n + 1) * pixels * c];
                    normalize_block::<T, RELU>(&mut z, image, (&affine.0, &affine.1, &affine.2));
                    dz.fill(T::zero());
                    let window = (&pooled[n * out_len..(n + 1) * out_len], &grad[n * out_len..(n + 1) * out_len]);
                    pool_image_backward(&z, window, win, &mut dz);
                    let part = (first - n * pixels) * c..(end - n * pixels) * c;
                    f(first, &image[part.clone()], &dz[part]);
                    first = end;
                }
            },
        );
        scratch::give(z);
        scratch::give(dz);
    }
}
