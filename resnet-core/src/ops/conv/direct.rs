//! Convolution of single-channel images: the stem's 7×7 over grayscale Fashion-MNIST.
//!
//! With one input channel the patch matrix is `(pixels, 49)`, and the forward is im2col's
//! product. Where this crate's kernel runs the products ([`panels`]), it reads the patches in
//! place from the rows under each output row, zero-padded ([`forward_rows`]), rather than
//! copying each pixel's 49 values out first; elsewhere the patches are copied a kernel row at a
//! time out of the image rows under each output row, padded once ([`patches_of_rows`]), for the
//! gemm crate's product. The weight gradient `dyᵀ · cols` is one long, thin product over every
//! pixel that the matrix kernels do not split across threads, so it would run on one core;
//! here it runs as products over fixed runs of pixels side by side, summed in a fixed order so
//! results repeat bit for bit. The input gradient (never needed for the images themselves)
//! accumulates each pixel's taps directly. For the stem's training op without its activation
//! ([`crate::ops::layers`]' `stem`), the patches' moments ([`moments_part`]) and the patches
//! shifted, with a one after them ([`shifted_patches`]), over runs of rows fixed by the geometry
//! ([`row_runs`], [`run_groups`]).

use candle_core::WithDType;
use rayon::prelude::*;

use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::matmul::matmul_general;
use crate::ops::plumbing::{panels, scratch};

/// Output pixels per product in the weight gradient (a fixed split keeps the sum order).
pub const PIXELS_PER_TASK: usize = 4096;

/// Whether this path applies: one input channel.
pub fn applies(win: &Window) -> bool {
    win.c == 1
}

/// The `kh · kw` patch of output pixel `(oy, ox)` of a one-channel image `img` (`h · w`) into
/// `dst`: a kernel row's taps are a run of one image row, copied whole between the zeros of the
/// padding. A seven-wide row inside the image (d2l's stem, most of its rows) is copied as an
/// array of known length rather than by a `memcpy` call.
#[inline(always)]
pub fn one_channel_patch<T: WithDType>(img: &[T], win: &Window, oy: usize, ox: usize, dst: &mut [T]) {
    const STEM: usize = 7;
    let x0 = (ox * win.stride) as isize - win.pad as isize;
    // The kernel columns inside the image.
    let lo = (-x0).clamp(0, win.kw as isize) as usize;
    let hi = (win.w as isize - x0).clamp(lo as isize, win.kw as isize) as usize;
    for (ki, dst) in dst.chunks_exact_mut(win.kw).enumerate() {
        let iy = (oy * win.stride + ki) as isize - win.pad as isize;
        if iy < 0 || iy >= win.h as isize || lo == hi {
            dst.fill(T::zero());
            continue;
        }
        let start = iy as usize * win.w + (x0 + lo as isize) as usize;
        if let (0, STEM, Ok(whole)) = (lo, hi, <&mut [T; STEM]>::try_from(&mut *dst)) {
            *whole = *<&[T; STEM]>::try_from(&img[start..start + STEM]).expect("seven taps inside the image");
            continue;
        }
        dst[..lo].fill(T::zero());
        dst[lo..hi].copy_from_slice(&img[start..start + hi - lo]);
        dst[hi..].fill(T::zero());
    }
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
fn weight_grad_part<T: WithDType>(
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
fn weight_grad_total<T: WithDType>(partials: impl IntoIterator<Item = Vec<T>>, taps: usize, out: usize) -> Vec<T> {
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

/// Output pixels per run of [`row_runs`], about.
const RUN_PIXELS: usize = 2048;

/// Each of `batch` images' `rows` rows (of `pixels_per_row` output pixels each) shared evenly
/// between as few runs of at most about [`RUN_PIXELS`] pixels as hold them: `(image, rows)` in
/// order. Tasks over the runs (as [`moments_part`]'s) are fixed by the geometry alone, so their
/// sums add in the same order on every run and thread count.
pub fn row_runs(batch: usize, rows: usize, pixels_per_row: usize) -> Vec<(usize, std::ops::Range<usize>)> {
    let parts = (rows * pixels_per_row).div_ceil(RUN_PIXELS).clamp(1, rows.max(1));
    let per_run = rows.div_ceil(parts).max(1);
    (0..batch).flat_map(|n| (0..rows).step_by(per_run).map(move |r| (n, r..(r + per_run).min(rows)))).collect()
}

/// The patches of image `n`'s output rows `rows` of the one-channel images `x`, each value
/// less `shift` (the padding's zeros too), then a one: `kh · kw + 1` values per pixel at the
/// start of each row of `dst`, rows `stride` apart (the rest of each row zero).
pub fn shifted_patches<T: WithDType>(
    x: &[T],
    win: &Window,
    (n, rows): (usize, std::ops::Range<usize>),
    shift: T,
    (dst, stride): (&mut [T], usize),
) {
    let taps = win.kh * win.kw;
    assert!(stride > taps, "a row of {stride} holds no {taps} taps and a one");
    patch_rows(x, win, (n, rows), shift, (dst, stride), |row| {
        row[taps] = T::one();
        row[taps + 1..].fill(T::zero());
    });
}

/// The patches of image `n`'s output rows `rows` of the one-channel images `x` (`kh · kw`
/// values per pixel, zero in the padding) into `dst`, one after the other: im2col's patch
/// matrix.
pub fn patches_of_rows<T: WithDType>(x: &[T], win: &Window, (n, rows): (usize, std::ops::Range<usize>), dst: &mut [T]) {
    patch_rows(x, win, (n, rows), T::zero(), (dst, win.kh * win.kw), |_| ());
}

/// The patches of image `n`'s output rows `rows`, each value less `shift`, at the start of the
/// rows of `dst` (`stride` apart), `rest` then called on each row. Each output row's patches are
/// copied a kernel row at a time out of the `kh` image rows under it, shifted and padded once.
#[inline(always)]
fn patch_rows<T: WithDType>(
    x: &[T],
    win: &Window,
    (n, rows): (usize, std::ops::Range<usize>),
    shift: T,
    (dst, stride): (&mut [T], usize),
    rest: impl Fn(&mut [T]),
) {
    let (ow, taps) = (win.ow(), win.kh * win.kw);
    let image = &x[n * win.h * win.w..(n + 1) * win.h * win.w];
    // A padded row: `pad` values before the image row, and enough after for the last pixel.
    let line = (win.w + 2 * win.pad).max((ow - 1) * win.stride + win.kw);
    let mut under = scratch::take(win.kh * line);
    for (oy, dst) in rows.zip(dst.chunks_exact_mut(ow * stride)) {
        for (ky, padded) in under.chunks_exact_mut(line).enumerate() {
            padded.fill(T::zero() - shift);
            let iy = (oy * win.stride + ky).checked_sub(win.pad).filter(|&iy| iy < win.h);
            if let Some(iy) = iy {
                for (d, &v) in padded[win.pad..win.pad + win.w].iter_mut().zip(&image[iy * win.w..(iy + 1) * win.w]) {
                    *d = v - shift;
                }
            }
        }
        for (ox, row) in dst.chunks_exact_mut(stride).enumerate() {
            for (ky, taps_row) in row[..taps].chunks_exact_mut(win.kw).enumerate() {
                let from = ky * line + ox * win.stride;
                copy_taps(taps_row, &under[from..from + win.kw]);
            }
            rest(row);
        }
    }
    scratch::give(under);
}

/// `dst.copy_from_slice(src)`, as an array of known length for d2l's seven taps rather than a
/// `memcpy` call.
#[inline(always)]
fn copy_taps<T: WithDType>(dst: &mut [T], src: &[T]) {
    const STEM: usize = 7;
    match (<&mut [T; STEM]>::try_from(&mut *dst), <&[T; STEM]>::try_from(src)) {
        (Ok(d), Ok(s)) => *d = *s,
        _ => dst.copy_from_slice(src),
    }
}

/// The second moments of the shifted patches of the output rows of `runs` (a group of [`run_groups`]):
/// `Σ q qᵀ` with `q = [patch − shift | 1]`, `(kh · kw + 1)²` values (summed in `T`, returned in
/// f64), so that the last row holds `Σ (patch − shift)` and the pixel count. With one input channel these give the mean and
/// variance of every output channel of the convolution without making its output.
pub fn moments_part<T: WithDType>(
    x: &[T],
    win: &Window,
    runs: &[(usize, std::ops::Range<usize>)],
    shift: T,
) -> Vec<f64> {
    let k = win.kh * win.kw + 1;
    let pixels = runs.iter().map(|(_, rows)| rows.len() * win.ow()).sum();
    let mut q = scratch::take(pixels * k);
    let mut at = 0;
    for (n, rows) in runs {
        let len = rows.len() * win.ow() * k;
        shifted_patches(x, win, (*n, rows.clone()), shift, (&mut q[at..at + len], k));
        at += len;
    }
    let mut part = vec![T::zero(); k * k];
    matmul_general((k, k, pixels), &q, (1, k), &q, (k, 1), &mut part, k);
    scratch::give(q);
    part.iter().map(|v| v.to_f64()).collect()
}

/// [`row_runs`] gathered into groups: where an image is one run, `2^j` whole images to a group
/// (the most that fit in about [`RUN_PIXELS`] pixels), so that a batch and the same images in
/// micro-batches of a multiple of `2^j` make the same groups and the same sums; otherwise each
/// run alone.
pub fn run_groups(batch: usize, rows: usize, pixels_per_row: usize) -> Vec<Vec<(usize, std::ops::Range<usize>)>> {
    let runs = row_runs(batch, rows, pixels_per_row);
    let image = rows * pixels_per_row;
    let per_group = if runs.len() == batch && image > 0 {
        let mut n = 1;
        while 2 * n * image <= RUN_PIXELS {
            n *= 2;
        }
        n
    } else {
        1
    };
    runs.chunks(per_group).map(|group| group.to_vec()).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One-channel patches (seven-wide rows inside the image copied as arrays, the others run by
    /// run) against the definition, every tap its image value or zero in the padding: odd and
    /// even sizes, images narrower than the kernel, strides 1 and 2.
    #[test]
    fn one_channel_patches_are_the_image_under_the_kernel() {
        for &(h, w, k, stride, pad) in
            &[(9, 8, 7, 2, 3), (13, 13, 7, 2, 3), (5, 3, 7, 1, 3), (96, 96, 7, 2, 3), (6, 7, 3, 1, 1)]
        {
            let win = Window { batch: 1, h, w, c: 1, kh: k, kw: k, stride, pad };
            let img: Vec<f32> = (0..h * w).map(|i| i as f32 + 1.0).collect();
            let mut patch = vec![f32::NAN; k * k];
            for oy in 0..win.oh() {
                for ox in 0..win.ow() {
                    one_channel_patch(&img, &win, oy, ox, &mut patch);
                    for (tap, &got) in patch.iter().enumerate() {
                        let iy = (oy * stride + tap / k) as isize - pad as isize;
                        let ix = (ox * stride + tap % k) as isize - pad as isize;
                        let inside = (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                        let want = if inside { img[iy as usize * w + ix as usize] } else { 0.0 };
                        assert_eq!(got, want, "{:?} pixel {:?} tap {tap}", (h, w, k, stride, pad), (oy, ox));
                    }
                }
            }
        }
    }

    /// The row-at-a-time patches ([`patches_of_rows`], and [`shifted_patches`] with their shift
    /// and one) against [`one_channel_patch`], itself tested against the definition: odd and even
    /// sizes, images narrower than the kernel, strides 1 and 2, exactly.
    #[test]
    fn patches_of_rows_are_the_patches_one_by_one() {
        for &(h, w, k, stride, pad) in
            &[(9, 8, 7, 2, 3), (13, 13, 7, 2, 3), (5, 3, 7, 1, 3), (28, 28, 7, 2, 3), (6, 7, 3, 1, 1), (7, 9, 5, 2, 2)]
        {
            let win = Window { batch: 2, h, w, c: 1, kh: k, kw: k, stride, pad };
            let x: Vec<f32> = (0..2 * h * w).map(|i| (i % 97) as f32 * 0.25 + 1.0).collect();
            let (oh, ow, taps) = (win.oh(), win.ow(), k * k);
            let shift = 0.75f32;
            let stride_q = (taps + 1).next_multiple_of(16);
            for n in 0..2 {
                let rows = 1..oh;
                let mut plain = vec![f32::NAN; rows.len() * ow * taps];
                patches_of_rows(&x, &win, (n, rows.clone()), &mut plain);
                let mut shifted = vec![f32::NAN; rows.len() * ow * stride_q];
                shifted_patches(&x, &win, (n, rows.clone()), shift, (&mut shifted, stride_q));
                let mut want = vec![0f32; taps];
                for (i, oy) in rows.enumerate() {
                    for ox in 0..ow {
                        one_channel_patch(&x[n * h * w..(n + 1) * h * w], &win, oy, ox, &mut want);
                        let p = i * ow + ox;
                        assert_eq!(&plain[p * taps..(p + 1) * taps], &want[..], "{:?} {n} {oy} {ox}", (h, w, k));
                        let q = &shifted[p * stride_q..(p + 1) * stride_q];
                        let want_q: Vec<f32> = want.iter().map(|v| v - shift).chain([1.0]).collect();
                        assert_eq!(&q[..=taps], &want_q[..], "{:?} {n} {oy} {ox}", (h, w, k));
                        assert!(q[taps + 1..].iter().all(|&v| v == 0.0));
                    }
                }
            }
        }
    }

    /// The runs cover each image's rows once, in order, at most about [`RUN_PIXELS`] each (one
    /// row where a row is more), and the groups keep the runs' order.
    #[test]
    fn runs_cover_the_rows_in_order() {
        for &(batch, rows, per_row) in &[(3, 48, 48), (4, 14, 14), (2, 112, 112), (1, 1, 5000), (5, 7, 300)] {
            let runs = row_runs(batch, rows, per_row);
            let mut next = (0, 0);
            for (n, r) in &runs {
                if next.1 == rows {
                    next = (next.0 + 1, 0);
                }
                assert_eq!((*n, r.start), next, "{:?}", (batch, rows, per_row));
                assert!(!r.is_empty() && (r.len() == 1 || r.len() * per_row <= RUN_PIXELS));
                next = (*n, r.end);
            }
            assert_eq!(next, (batch - 1, rows));
            let flat: Vec<_> = run_groups(batch, rows, per_row).into_iter().flatten().collect();
            assert_eq!(flat, runs);
        }
        // Small images go eight (196-pixel images) to a group: a batch of 32 makes the groups of
        // its two halves, and so the same sums as two micro-batches of 16.
        let whole = run_groups(32, 14, 14);
        assert!(whole.iter().all(|g| g.len() == 8), "{whole:?}");
        let half = run_groups(16, 14, 14);
        let second: Vec<Vec<_>> = half.iter().map(|g| g.iter().map(|(n, r)| (n + 16, r.clone())).collect()).collect();
        assert_eq!(whole, [half, second].concat());
    }
}
