//! Convolution of single-channel images: the stem's 7×7 over grayscale Fashion-MNIST.
//!
//! With one input channel the patch matrix is `(pixels, 49)`. Its forward product is short and
//! wide and runs well once the patches are made a kernel row at a time (see
//! `one_channel_patch`), so the forward is im2col's. The weight gradient `dyᵀ · cols` is one long, thin product over every
//! pixel that the matrix kernels do not split across threads, so it would run on one core;
//! here it runs as products over fixed runs of pixels side by side, summed in a fixed order so
//! results repeat bit for bit. The input gradient (never needed for the images themselves)
//! accumulates each pixel's taps directly.

use candle_core::WithDType;
use rayon::prelude::*;

use super::im2col::one_channel_patch;
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::matmul::matmul_general;
use crate::ops::plumbing::scratch;

/// Output pixels per product in the weight gradient (a fixed split keeps the sum order).
pub const PIXELS_PER_TASK: usize = 4096;

/// Whether this path applies: one input channel.
pub fn applies(win: &Window) -> bool {
    win.c == 1
}

/// `(out, kh, kw, 1)` → `(kh · kw, out)`.
fn taps_by_channel<T: WithDType>(w: &[T], taps: usize, out: usize) -> Vec<T> {
    let mut t = vec![T::zero(); taps * out];
    for o in 0..out {
        for tap in 0..taps {
            t[tap * out + o] = w[o * taps + tap];
        }
    }
    t
}

/// The input index of tap `(ky, kx)` for output `(oy, ox)`, or `None` in the padding.
#[inline]
fn input_at(win: &Window, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
    let iy = (oy * win.stride + ky).checked_sub(win.pad)?;
    let ix = (ox * win.stride + kx).checked_sub(win.pad)?;
    (iy < win.h && ix < win.w).then_some(iy * win.w + ix)
}

/// The patches of the output pixels `pixels` (indices into `batch · oh · ow`) of one-channel
/// images, `kh · kw` values per pixel (zero in the padding), into `dst`.
fn patches<T: WithDType>(x: &[T], win: &Window, pixels: std::ops::Range<usize>, dst: &mut [T]) {
    let (oh, ow, taps) = (win.oh(), win.ow(), win.kh * win.kw);
    for (p, dst) in pixels.zip(dst.chunks_exact_mut(taps)) {
        let (n, oy, ox) = (p / (oh * ow), p / ow % oh, p % ow);
        one_channel_patch(&x[n * win.h * win.w..(n + 1) * win.h * win.w], win, oy, ox, dst);
    }
}

/// `dW (out, kh, kw, 1)` of the convolution from `x` `(batch, h, w, 1)` and `dy`
/// `(batch · oh · ow, out)`: `dyᵀ · cols` as products over fixed runs of pixels side by side on
/// the threads (one product over all pixels would be one long, thin product the matrix kernels
/// do not split), summed in order. Each task makes its run's patches (cheap with one channel),
/// so the whole patch matrix is never written out.
pub fn weight_grad<T: WithDType>(x: &[T], dy: &[T], win: &Window, out: usize) -> Vec<T> {
    let pixels = win.batch * win.oh() * win.ow();
    let partials: Vec<Vec<T>> = (0..pixels.div_ceil(PIXELS_PER_TASK))
        .into_par_iter()
        .map(|task| {
            let run = task * PIXELS_PER_TASK..((task + 1) * PIXELS_PER_TASK).min(pixels);
            weight_grad_part(x, win, run.clone(), &dy[run.start * out..run.end * out], out)
        })
        .collect();
    weight_grad_total(partials, win.kh * win.kw, out)
}

/// Task `pixels`'s term of [`weight_grad`], `(kh · kw, out)`, from its rows of `dy` (`dy_rows`,
/// `pixels.len() × out`), wherever they are.
pub fn weight_grad_part<T: WithDType>(
    x: &[T],
    win: &Window,
    pixels: std::ops::Range<usize>,
    dy_rows: &[T],
    out: usize,
) -> Vec<T> {
    let taps = win.kh * win.kw;
    // This task's patches, made here (they stay in cache): its pixels' rows.
    let mut cols = scratch::take(pixels.len() * taps);
    let n = pixels.len();
    patches(x, win, pixels, &mut cols);
    // dWᵀ (taps × out) = colsᵀ · dy: the wide side (out) along the kernels' vectors.
    let mut part = vec![T::zero(); taps * out];
    matmul_general((taps, out, n), &cols, (1, taps), dy_rows, (out, 1), &mut part, out);
    scratch::give(cols);
    part
}

/// The tasks' terms of [`weight_grad`] ([`weight_grad_part`], in task order) added in order and
/// laid out as `(out, kh, kw, 1)`.
pub fn weight_grad_total<T: WithDType>(partials: impl IntoIterator<Item = Vec<T>>, taps: usize, out: usize) -> Vec<T> {
    let mut sum = vec![T::zero(); taps * out];
    for part in partials {
        for (s, p) in sum.iter_mut().zip(part) {
            *s += p;
        }
    }
    // (taps, out) → (out, taps) = (out, 1, kh, kw).
    let mut dw = vec![T::zero(); out * taps];
    for (tap, row) in sum.chunks_exact(out).enumerate() {
        for (o, &v) in row.iter().enumerate() {
            dw[o * taps + tap] = v;
        }
    }
    dw
}

/// `dx (batch, h, w, 1)` of the convolution from `dy` `(batch · oh · ow, out)` and `w` `(out, kh, kw, 1)`.
pub fn input_grad<T: WithDType>(dy: &[T], w: &[T], win: &Window, out: usize) -> Vec<T> {
    let taps = win.kh * win.kw;
    let wt = taps_by_channel(w, taps, out);
    let (oh, ow) = (win.oh(), win.ow());
    let mut dx = scratch::zeroed(win.batch * win.h * win.w);
    // Images are disjoint in dx: one task per image.
    dx.par_chunks_mut(win.h * win.w).enumerate().for_each(|(n, img)| {
        for oy in 0..oh {
            for ox in 0..ow {
                let p = (n * oh + oy) * ow + ox;
                let g = &dy[p * out..(p + 1) * out];
                for ky in 0..win.kh {
                    for kx in 0..win.kw {
                        if let Some(i) = input_at(win, oy, ox, ky, kx) {
                            let wr = &wt[(ky * win.kw + kx) * out..(ky * win.kw + kx + 1) * out];
                            img[i] += g.iter().zip(wr).fold(T::zero(), |s, (&a, &b)| s + a * b);
                        }
                    }
                }
            }
        }
    });
    dx
}
