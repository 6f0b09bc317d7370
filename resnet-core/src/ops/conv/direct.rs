//! Convolution of single-channel images: the stem's 7×7 over grayscale Fashion-MNIST.
//!
//! With one input channel the patch matrix is `(pixels, 49)`, and the forward is im2col's
//! product. Where this crate's kernel runs the products ([`panels`]), it reads the patches in
//! place from the rows under each output row, zero-padded ([`forward_rows`]), rather than
//! copying each pixel's 49 values out first; elsewhere the patches are made a kernel row at a
//! time (see `one_channel_patch`) for the gemm crate's product. The weight gradient `dyᵀ · cols` is one long, thin product over every
//! pixel that the matrix kernels do not split across threads, so it would run on one core;
//! here it runs as products over fixed runs of pixels side by side, summed in a fixed order so
//! results repeat bit for bit. The input gradient (never needed for the images themselves)
//! accumulates each pixel's taps directly.

use candle_core::WithDType;
use rayon::prelude::*;

use super::im2col::one_channel_patch;
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::matmul::matmul_general;
use crate::ops::plumbing::{panels, scratch};

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

/// The forward's right factor for [`forward_rows`]: the weights `w` `(out, kh, kw, 1)` as the
/// patch matrix's `(kh · kw) × out` right factor, packed in panels of `width` (as
/// [`panels::width`] gives it for `out` columns).
pub fn pack_weights<T: WithDType>(w: &[T], win: &Window, out: usize, width: usize) -> Vec<T> {
    let taps = win.kh * win.kw;
    panels::pack(&taps_by_channel(w, taps, out), (out, 0), 1, (taps, out), width)
}

/// Output rows `rows` (indices into `batch · oh`) of the convolution of the one-channel images
/// `x`, without the bias, added to `dst` (their `rows.len() · ow · out` values), the weights
/// packed by [`pack_weights`] in panels of `width`. Each output row is one product on this
/// crate's kernel whose left factor is read in place from a zero-padded copy of the image rows
/// under it: pixel `ox`'s patch starts `ox · stride` along the copy and its taps are at fixed
/// offsets from there, in the patch matrix's `(kh, kw)` order, so each sum is the one im2col's
/// product makes, the padding's taps included (each adds `0 · w`).
pub fn forward_rows<T: WithDType>(
    x: &[T],
    win: &Window,
    rows: std::ops::Range<usize>,
    (packed, width): (&[T], usize),
    (dst, out): (&mut [T], usize),
) {
    let (oh, ow, image) = (win.oh(), win.ow(), win.h * win.w);
    // The padded copy's row: the image row between `pad` zeros on the left and zeros up to the
    // last output pixel's last tap on the right.
    let line = (win.w + 2 * win.pad).max((ow - 1) * win.stride + win.kw);
    let offsets: Vec<usize> = (0..win.kh).flat_map(|ky| (0..win.kw).map(move |kx| ky * line + kx)).collect();
    let mut under = scratch::take(win.kh * line);
    for (r, dst) in rows.zip(dst.chunks_exact_mut(ow * out)) {
        let (n, oy) = (r / oh, r % oh);
        for (ky, padded) in under.chunks_exact_mut(line).enumerate() {
            padded.fill(T::zero());
            let iy = (oy * win.stride + ky).checked_sub(win.pad).filter(|&iy| iy < win.h);
            if let Some(iy) = iy {
                let at = n * image + iy * win.w;
                padded[win.pad..win.pad + win.w].copy_from_slice(&x[at..at + win.w]);
            }
        }
        panels::patch_product(
            (ow, out, win.kh * win.kw),
            (&under, win.stride, &offsets),
            packed,
            (dst, out),
            (true, width),
        );
    }
    scratch::give(under);
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
