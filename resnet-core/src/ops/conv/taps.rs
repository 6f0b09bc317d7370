//! Convolution over the in-bounds kernel taps only, for small images where im2col's zero padding
//! is a large share of the work.
//!
//! At 28 px, ResNet-18's last two stages run 3×3 convolutions (padding 1) on 2×2 and 1×1 images:
//! im2col multiplies 36 and 9 taps per output pixel and channel pair where 16 and 1 land inside
//! the image. Here the output pixels are grouped into rectangles that share one window of
//! in-bounds taps ([`TapClass`]; at most 3 × 3 of them for a 3×3 kernel) and each class is one
//! matrix product over its taps alone, so no multiply touches padding. The backward does the
//! same per class: the weight gradient adds each class's `dYᵀ · cols` into its taps, the input
//! gradient adds `dY · W` back through them. A class with one pixel per image (every class of a
//! 1×1, 2×2 or 3×3 image) reads the images, and writes the input gradient, in place: its taps'
//! pixels are a few runs of each image ([`one_pixel_parts`]), one product per run; larger
//! classes gather their patches. Where every window covers the whole image (2×2 and 1×1 images
//! at 28 px) the classes' products are one dense product instead ([`whole`]).
//!
//! The forward of one-pixel classes of at least [`panels::MAX_K`] input channels (the 3×3×512
//! convolutions of a 96 px network) adds one product per tap (and per `MAX_K` channels) to
//! each output row, which starts as the bias ([`one_pixel_conv`]): on this crate's kernel
//! ([`panels`], at the AVX2 tier) with the weight's taps packed once and the products run tap by
//! tap, else on the gemm crate's, the same bits either way (and, where the gemm crate sums its
//! products in blocks of 512, those of the classes' products above). Other convolutions take
//! the classes' products above: splitting their longer sums per tap would round them otherwise.

use std::ops::Range;

use candle_core::WithDType;
use std::borrow::Cow;

use rayon::prelude::*;

use super::whole;
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::matmul::gemm_strided;
use crate::ops::plumbing::panels;
use crate::ops::plumbing::scratch;
use crate::ops::plumbing::weight_layout;

/// Take this path when padding makes up more than this share of im2col's taps.
const MAX_USEFUL_SHARE: f64 = 0.85;

/// A rectangle of output pixels (`oy × ox`) whose windows have the same in-bounds taps
/// (`ky × kx`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapClass {
    /// Output rows.
    pub oy: Range<usize>,
    /// Output columns.
    pub ox: Range<usize>,
    /// Kernel rows inside the image for every pixel of the class.
    pub ky: Range<usize>,
    /// Kernel columns inside the image for every pixel of the class.
    pub kx: Range<usize>,
}

impl TapClass {
    /// Output pixels per image.
    fn pixels(&self) -> usize {
        self.oy.len() * self.ox.len()
    }

    /// Taps per pixel.
    fn taps(&self) -> usize {
        self.ky.len() * self.kx.len()
    }
}

/// Runs of consecutive outputs along one axis with the same in-bounds kernel range:
/// `(outputs, kernel offsets)`.
fn runs(n: usize, out: usize, k: usize, stride: usize, pad: usize) -> Vec<(Range<usize>, Range<usize>)> {
    let mut runs: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    for o in 0..out {
        // Input index of tap t is o·s + t − p; keep 0 ≤ it < n.
        let start = (o * stride) as isize - pad as isize;
        let lo = (-start).clamp(0, k as isize) as usize;
        let hi = (n as isize - start).clamp(0, k as isize) as usize;
        match runs.last_mut() {
            Some((outs, taps)) if *taps == (lo..hi) && outs.end == o => outs.end = o + 1,
            _ => runs.push((o..o + 1, lo..hi)),
        }
    }
    runs
}

/// The tap classes of a window, row-major over the output rectangles.
pub fn classes(win: &Window) -> Vec<TapClass> {
    let ys = runs(win.h, win.oh(), win.kh, win.stride, win.pad);
    let xs = runs(win.w, win.ow(), win.kw, win.stride, win.pad);
    let mut out = Vec::with_capacity(ys.len() * xs.len());
    for (oy, ky) in &ys {
        for (ox, kx) in &xs {
            let class = TapClass { oy: oy.clone(), ox: ox.clone(), ky: ky.clone(), kx: kx.clone() };
            if class.taps() > 0 {
                out.push(class);
            }
        }
    }
    out
}

/// The share of im2col's taps that land inside the image.
pub fn useful_share(win: &Window) -> f64 {
    let useful: usize = classes(win).iter().map(|c| c.pixels() * c.taps()).sum();
    useful as f64 / (win.oh() * win.ow() * win.kh * win.kw) as f64
}

/// Whether a convolution of this shape is cheaper over its in-bounds taps than by im2col.
pub fn applies(win: &Window) -> bool {
    win.kh * win.kw > 1 && useful_share(win) < MAX_USEFUL_SHARE
}

/// The class's patches over its taps: `(batch · pixels, ky · kx · c)`, rows in `(n, oy, ox)`
/// order, columns in `(ky, kx, c)` order. A [`scratch`] buffer (every element is written): give
/// it back.
fn gather_cols<T: WithDType>(x: &[T], win: &Window, class: &TapClass) -> Vec<T> {
    let c = win.c;
    let row_len = class.taps() * c;
    let mut cols = scratch::take(win.batch * class.pixels() * row_len);
    cols.par_chunks_mut(class.pixels() * row_len).enumerate().for_each(|(n, block)| {
        let img = &x[n * win.h * win.w * c..(n + 1) * win.h * win.w * c];
        let mut rows = block.chunks_exact_mut(row_len);
        for oy in class.oy.clone() {
            for ox in class.ox.clone() {
                let row = rows.next().expect("one row per pixel");
                let mut dst = row.chunks_exact_mut(c);
                for ky in class.ky.clone() {
                    let iy = oy * win.stride + ky - win.pad;
                    for kx in class.kx.clone() {
                        let ix = ox * win.stride + kx - win.pad;
                        let src = (iy * win.w + ix) * c;
                        dst.next().expect("one slot per tap").copy_from_slice(&img[src..src + c]);
                    }
                }
            }
        }
    });
    cols
}

/// The adjoint of [`gather_cols`]: adds each patch row back into `dx` `(batch, h, w, c)`.
fn scatter_cols<T: WithDType>(cols: &[T], win: &Window, class: &TapClass, dx: &mut [T]) {
    let c = win.c;
    let row_len = class.taps() * c;
    dx.par_chunks_mut(win.h * win.w * c).zip(cols.par_chunks(class.pixels() * row_len)).for_each(|(img, block)| {
        let mut rows = block.chunks_exact(row_len);
        for oy in class.oy.clone() {
            for ox in class.ox.clone() {
                let mut src = rows.next().expect("one row per pixel").chunks_exact(c);
                for ky in class.ky.clone() {
                    let iy = oy * win.stride + ky - win.pad;
                    for kx in class.kx.clone() {
                        let ix = ox * win.stride + kx - win.pad;
                        let dst = (iy * win.w + ix) * c;
                        for (d, s) in img[dst..dst + c].iter_mut().zip(src.next().expect("one slot per tap")) {
                            *d += *s;
                        }
                    }
                }
            }
        }
    });
}

/// A run of the class's patch columns that is contiguous in every row of the `(out, kh, kw, c)`
/// weight: `len` columns from `col` in the class's patches, from `offset` in a weight row.
struct Segment {
    col: usize,
    offset: usize,
    len: usize,
}

/// The class's taps as weight segments: one over a compact copy of its weight columns (`compact`)
/// or when the class spans whole kernel rows, else one per kernel row. The products read the
/// whole weight in place through them (no copy per class).
fn segments(win: &Window, class: &TapClass, compact: bool) -> Vec<Segment> {
    let c = win.c;
    if compact {
        return vec![Segment { col: 0, offset: 0, len: class.taps() * c }];
    }
    if class.kx.len() == win.kw {
        return vec![Segment { col: 0, offset: class.ky.start * win.kw * c, len: class.taps() * c }];
    }
    let row = class.kx.len() * c;
    class
        .ky
        .clone()
        .enumerate()
        .map(|(i, ky)| Segment { col: i * row, offset: (ky * win.kw + class.kx.start) * c, len: row })
        .collect()
}

/// The class's taps as indices into the kernel's `kh · kw`, in its patches' order.
fn class_taps<'a>(win: &Window, class: &'a TapClass) -> impl Iterator<Item = usize> + 'a {
    let kw = win.kw;
    class.ky.clone().flat_map(move |ky| class.kx.clone().map(move |kx| ky * kw + kx))
}

/// The weight as stored, `(out, c, kh, kw)`, and, made the first time a class asks for them
/// ([`scratch`] buffers, given back on drop), in the kernels' order `(out, kh, kw, c)`, where a
/// class's taps are contiguous runs of each row, and its transpose `(kh, kw, c, out)`, where
/// they are contiguous blocks of rows.
struct Weight<'a, T: WithDType> {
    oihw: &'a [T],
    ohwi: std::sync::OnceLock<Vec<T>>,
    hwio: std::sync::OnceLock<Vec<T>>,
    out: usize,
    /// Whether some class reads the whole weight in place (so the reordered copies are made
    /// anyway: compact classes of one pixel read them in place too, larger ones copy from
    /// them); else compact classes read the stored weight, only their taps.
    in_place: bool,
}

impl<'a, T: WithDType> Weight<'a, T> {
    fn new(oihw: &'a [T], out: usize, win: &Window, classes: &[TapClass]) -> Self {
        let in_place = classes.iter().any(|class| !compact(win, class));
        Self { oihw, ohwi: std::sync::OnceLock::new(), hwio: std::sync::OnceLock::new(), out, in_place }
    }

    fn ohwi(&self, win: &Window) -> &[T] {
        self.ohwi.get_or_init(|| {
            let mut t = scratch::take(self.oihw.len());
            weight_layout::swap_inner_into(self.oihw, win.c, win.kh * win.kw, &mut t);
            t
        })
    }

    fn hwio(&self, win: &Window) -> &[T] {
        self.hwio.get_or_init(|| {
            let taps: Vec<usize> = (0..win.kh * win.kw).collect();
            let mut t = scratch::take(self.oihw.len());
            weight_layout::oihw_to_hwio_into(self.oihw, (self.out, win.c, win.kh * win.kw), &taps, &mut t);
            t
        })
    }

    /// The class's weight columns, compact: `(out, taps · c)`. A [`scratch`] buffer.
    fn compact(&self, win: &Window, class: &TapClass) -> Vec<T> {
        let (c, kc, taps) = (win.c, class.taps() * win.c, win.kh * win.kw);
        let mut wc = scratch::take(self.out * kc);
        if self.in_place {
            // Each row's taps are runs of the kernels' layout.
            let ohwi = self.ohwi(win);
            wc.par_chunks_mut(kc).zip(ohwi.par_chunks(win.patch_len())).for_each(|(dst, row)| {
                for (d, tap) in dst.chunks_exact_mut(c).zip(class_taps(win, class)) {
                    d.copy_from_slice(&row[tap * c..(tap + 1) * c]);
                }
            });
        } else {
            wc.par_chunks_mut(kc).zip(self.oihw.par_chunks(c * taps)).for_each(|(dst, row)| {
                for (d, tap) in dst.chunks_exact_mut(c).zip(class_taps(win, class)) {
                    for (ch, d) in d.iter_mut().enumerate() {
                        *d = row[ch * taps + tap];
                    }
                }
            });
        }
        wc
    }

    /// The transpose of [`Weight::compact`], `(taps · c, out)`: its taps' blocks of rows of
    /// `(kh, kw, c, out)`. A [`scratch`] buffer.
    fn compact_t(&self, win: &Window, class: &TapClass) -> Vec<T> {
        let block = win.c * self.out;
        let taps: Vec<usize> = class_taps(win, class).collect();
        let mut wt = scratch::take(taps.len() * block);
        if self.in_place {
            let hwio = self.hwio(win);
            wt.par_chunks_mut(block)
                .zip(taps)
                .for_each(|(dst, tap)| dst.copy_from_slice(&hwio[tap * block..(tap + 1) * block]));
        } else {
            weight_layout::oihw_to_hwio_into(self.oihw, (self.out, win.c, win.kh * win.kw), &taps, &mut wt);
        }
        wt
    }
}

impl<T: WithDType> Drop for Weight<'_, T> {
    fn drop(&mut self) {
        for buffer in [self.ohwi.take(), self.hwio.take()].into_iter().flatten() {
            scratch::give(buffer);
        }
    }
}

/// Whether a class is compact: fewer than half the kernel's taps (a corner, or the centre tap
/// alone on a 1×1 image), whose columns would be read scattered over the whole weight. Such a
/// class reads a copy of its weight columns unless the whole weight is reordered anyway
/// ([`copies_weight`]); the weight gradient of a convolution whose classes are all compact is
/// added into the stored layout, their taps only.
fn compact(win: &Window, class: &TapClass) -> bool {
    2 * class.taps() < win.kh * win.kw
}

/// A buffer borrowed in place or a [`scratch`] copy; [`release`] gives a copy back.
fn release<T: WithDType>(buffer: Cow<'_, [T]>) {
    if let Cow::Owned(v) = buffer {
        scratch::give(v);
    }
}

/// The weight as a class's products read it: rows `stride` apart; a compact copy (`compact`)
/// holds the class's taps in its patches' order, else the whole weight is read in place.
struct ClassWeights<'a, T: Clone> {
    data: Cow<'a, [T]>,
    stride: usize,
    compact: bool,
}

impl<T: Clone> ClassWeights<'_, T> {
    /// Where a segment starts along the taps' axis (a column of `(out, taps · c)`, a row of its
    /// transpose).
    fn at(&self, seg: &Segment) -> usize {
        if self.compact {
            seg.col
        } else {
            seg.offset
        }
    }
}

/// Whether the class's products read a compact copy of its weight: a [`compact`] class, unless
/// it has one pixel per image and the whole weight is reordered anyway, so its products read
/// their taps' runs in place.
fn copies_weight<T: WithDType>(w: &Weight<'_, T>, win: &Window, class: &TapClass) -> bool {
    compact(win, class) && !(w.in_place && class.pixels() == 1)
}

fn class_weights<'a, T: WithDType>(w: &'a Weight<'_, T>, win: &Window, class: &TapClass) -> ClassWeights<'a, T> {
    if copies_weight(w, win, class) {
        ClassWeights { data: Cow::Owned(w.compact(win, class)), stride: class.taps() * win.c, compact: true }
    } else {
        ClassWeights { data: Cow::Borrowed(w.ohwi(win)), stride: win.patch_len(), compact: false }
    }
}

/// The transpose of [`class_weights`] for the forward's products, `Wᵀ (taps · c, out)` with
/// rows `out` apart, so the products read the weight as contiguous rows: read as the columns of
/// `(out, taps · c)` instead, gemm's packing gathers them one element at a time.
fn class_weights_t<'a, T: WithDType>(w: &'a Weight<'_, T>, win: &Window, class: &TapClass) -> ClassWeights<'a, T> {
    if copies_weight(w, win, class) {
        ClassWeights { data: Cow::Owned(w.compact_t(win, class)), stride: w.out, compact: true }
    } else {
        ClassWeights { data: Cow::Borrowed(w.hwio(win)), stride: w.out, compact: false }
    }
}

/// A run of a class's taps that its products take as one: `seg` in the weight, its columns
/// from `at` in a patch row.
struct Part {
    seg: Segment,
    at: usize,
}

/// A class's patches as its products read them: rows `stride` apart, in `parts`.
struct ClassPatches<'a, T: Clone> {
    data: Cow<'a, [T]>,
    stride: usize,
    parts: Vec<Part>,
}

/// The parts of a class with one pixel per image, read from the image in place: a patch row is
/// then the image itself, and each kernel row's taps a run of its pixels (`at`: the run's first
/// element in an image). Runs that follow each other in the image and in the weight (always,
/// for a compact copy) are one part. `None` for classes of more pixels.
fn one_pixel_parts(win: &Window, class: &TapClass, compact_weight: bool) -> Option<Vec<Part>> {
    if class.pixels() != 1 {
        return None;
    }
    let (c, oy, ox) = (win.c, class.oy.start, class.ox.start);
    let row = class.kx.len() * c;
    let ix = (ox * win.stride + class.kx.start) - win.pad;
    let mut parts: Vec<Part> = Vec::with_capacity(class.ky.len());
    for (i, ky) in class.ky.clone().enumerate() {
        let iy = (oy * win.stride + ky) - win.pad;
        let seg = Segment { col: i * row, offset: (ky * win.kw + class.kx.start) * c, len: row };
        let at = (iy * win.w + ix) * c;
        match parts.last_mut() {
            Some(p) if p.at + p.seg.len == at && (compact_weight || p.seg.offset + p.seg.len == seg.offset) => {
                p.seg.len += row
            }
            _ => parts.push(Part { seg, at }),
        }
    }
    Some(parts)
}

/// The class's patches: the images in place for a class of one pixel per image
/// ([`one_pixel_parts`]), else a gathered copy (rows `taps · c` apart) read whole against a
/// compact weight or by the weight's [`segments`].
fn class_patches<'a, T: WithDType>(
    x: &'a [T],
    win: &Window,
    class: &TapClass,
    compact_weight: bool,
) -> ClassPatches<'a, T> {
    if let Some(parts) = one_pixel_parts(win, class, compact_weight) {
        return ClassPatches { data: Cow::Borrowed(x), stride: win.h * win.w * win.c, parts };
    }
    let parts = segments(win, class, compact_weight).into_iter().map(|seg| Part { at: seg.col, seg }).collect();
    ClassPatches { data: Cow::Owned(gather_cols(x, win, class)), stride: class.taps() * win.c, parts }
}

/// The class's pixels as indices into one image's `oh · ow` outputs, in [`gather_cols`]' order.
fn class_pixels<'a>(win: &Window, class: &'a TapClass) -> impl Iterator<Item = usize> + 'a {
    let ow = win.ow();
    class.oy.clone().flat_map(move |oy| class.ox.clone().map(move |ox| oy * ow + ox))
}

/// Where the class's rows lie in a `(batch · oh · ow, width)` buffer when they are evenly
/// spaced, as `(first element, row stride)`: every row when one class covers every pixel, its
/// pixel's row in each image when it has one pixel.
fn rows_in_place(win: &Window, classes: &[TapClass], class: &TapClass, width: usize) -> Option<(usize, usize)> {
    if covers_all(win, classes) {
        Some((0, width))
    } else if class.pixels() == 1 {
        let pixel = class.oy.start * win.ow() + class.ox.start;
        Some((pixel * width, win.oh() * win.ow() * width))
    } else {
        None
    }
}

/// The class's rows of `dy` `(batch · oh · ow, out)`, in [`gather_cols`]' order. A [`scratch`]
/// buffer.
fn gather_rows<T: WithDType>(dy: &[T], win: &Window, class: &TapClass, out: usize) -> Vec<T> {
    let img = win.oh() * win.ow() * out;
    let mut rows = scratch::take(win.batch * class.pixels() * out);
    rows.par_chunks_mut(class.pixels() * out).zip(dy.par_chunks(img)).for_each(|(block, dy_img)| {
        for (dst, p) in block.chunks_exact_mut(out).zip(class_pixels(win, class)) {
            dst.copy_from_slice(&dy_img[p * out..(p + 1) * out]);
        }
    });
    rows
}

/// The class's rows of `dy` and their stride: in place where they are evenly spaced
/// ([`rows_in_place`]), else a gathered copy.
fn class_dy<'a, T: WithDType>(
    dy: &'a [T],
    win: &Window,
    classes: &[TapClass],
    class: &TapClass,
    out: usize,
) -> (Cow<'a, [T]>, usize) {
    match rows_in_place(win, classes, class, out) {
        Some((start, stride)) => (Cow::Borrowed(&dy[start..]), stride),
        None => (Cow::Owned(gather_rows(dy, win, class, out)), out),
    }
}

/// Whether one class covers every output pixel, so its rows are the output's rows in order.
fn covers_all(win: &Window, classes: &[TapClass]) -> bool {
    classes.len() == 1 && classes[0].pixels() == win.oh() * win.ow()
}

/// A one-pixel class's products: one per tap, in the class's tap order, and per
/// [`panels::MAX_K`] input channels of it, as `(tap, channels, offset)`: the tap's index in the
/// kernel's `kh · kw`, its run of input channels, and where that run starts in an image (the
/// images are read in place, one row each).
fn one_pixel_pieces(win: &Window, class: &TapClass) -> Vec<(usize, Range<usize>, usize)> {
    let (c, oy, ox) = (win.c, class.oy.start, class.ox.start);
    let mut pieces = Vec::new();
    for ky in class.ky.clone() {
        for kx in class.kx.clone() {
            let (iy, ix) = (oy * win.stride + ky - win.pad, ox * win.stride + kx - win.pad);
            for first in (0..c).step_by(panels::MAX_K) {
                let channels = first..(first + panels::MAX_K).min(c);
                pieces.push((ky * win.kw + kx, channels, (iy * win.w + ix) * c + first));
            }
        }
    }
    pieces
}

/// The `used` taps of the weight `(out, c, kh, kw)` packed for [`panels::product`] in panels of
/// `width` output channels: tap `used[i]`'s `(c, out)` matrix as [`panels::pack`] lays out
/// matrix `i`, made in one pass over the weight, a panel's rows (`width` output channels'
/// weights, contiguous) at a time.
fn pack_taps<T: WithDType>(oihw: &[T], (out, c, taps): (usize, usize, usize), used: &[usize], width: usize) -> Vec<T> {
    let panels_per_tap = out / width;
    let mut packed = scratch::take(used.len() * c * out);
    // Panel `j` of every used tap: `used.len()` runs of `c · width`, `panels_per_tap` runs apart.
    let runs: Vec<(usize, &mut [T])> = packed.chunks_mut(c * width).enumerate().collect();
    let mut by_panel: Vec<Vec<&mut [T]>> = (0..panels_per_tap).map(|_| Vec::with_capacity(used.len())).collect();
    for (i, run) in runs {
        by_panel[i % panels_per_tap].push(run);
    }
    by_panel.into_par_iter().enumerate().for_each(|(j, mut dsts)| {
        let rows = &oihw[j * width * c * taps..(j + 1) * width * c * taps];
        for ch in 0..c {
            for (dst, &t) in dsts.iter_mut().zip(used) {
                let dst = &mut dst[ch * width..(ch + 1) * width];
                for (l, d) in dst.iter_mut().enumerate() {
                    *d = rows[(l * c + ch) * taps + t];
                }
            }
        }
    });
    packed
}

/// A class's outputs from column `col` on, `(batch, columns)`, in [`one_pixel_conv`].
struct ClassBlock<T> {
    class: usize,
    col: usize,
    values: Vec<T>,
}

/// Output columns per task of [`one_pixel_conv`] on this crate's kernel.
const GROUP_COLUMNS: usize = 128;

/// [`conv`] where every class has one pixel per image (images of at most 3×3) and the input
/// has at least [`panels::MAX_K`] channels: every output row starts as the bias and each class
/// adds its [`one_pixel_pieces`]' products in order, so each element is the bias plus one
/// in-order sum per piece, whichever kernel runs them ([`panels`]' and the gemm crate's give the
/// same bits on pieces of at most [`panels::MAX_K`]).
///
/// On this crate's kernel the weight's taps are packed once, in one pass ([`pack_taps`]), and
/// the products run tap by tap: the classes that read a tap run together, each task one class
/// and [`GROUP_COLUMNS`] output columns, so a tap's packed weights come from memory about once
/// for all of them (the gemm crate packs a product's right factor again for every call: at
/// 3×3×512, 51 MB of packing for the classes' taps of a 9.4 MB weight). On the gemm crate's
/// the classes run side by side, each product over the whole batch on one thread (128 rows
/// against 512 columns, which the crate splits poorly over threads).
fn one_pixel_conv<T: WithDType>(x: &[T], w: &Weight<'_, T>, bias: &[T], win: &Window, classes: &[TapClass]) -> Vec<T> {
    one_pixel_conv_on(x, w, bias, (win, classes), one_pixel_width::<T>(w.out, win.c))
}

/// The panel width [`one_pixel_conv`] runs this crate's kernel with for `out` output and `c`
/// input channels, or `None` where it runs the gemm crate's: [`panels::width`] for one product
/// per tap, where a tap's channels are one product.
fn one_pixel_width<T: WithDType>(out: usize, c: usize) -> Option<usize> {
    panels::width::<T>(out, c).filter(|_| c <= panels::MAX_K)
}

/// [`one_pixel_conv`] on this crate's kernel with panels of `width`, or on the gemm crate's
/// with `None`.
fn one_pixel_conv_on<T: WithDType>(
    x: &[T],
    w: &Weight<'_, T>,
    bias: &[T],
    (win, classes): (&Window, &[TapClass]),
    width: Option<usize>,
) -> Vec<T> {
    let (out, c, batch) = (w.out, win.c, win.batch);
    let (pixels, image) = (win.oh() * win.ow(), win.h * win.w * c);
    if batch == 0 {
        return Vec::new();
    }
    let parts: Vec<ClassBlock<T>> = match width {
        Some(width) => {
            let used: Vec<usize> = (0..win.kh * win.kw)
                .filter(|&t| classes.iter().any(|cl| class_taps(win, cl).any(|u| u == t)))
                .collect();
            let packed = pack_taps(w.oihw, (out, c, win.kh * win.kw), &used, width);
            let group = GROUP_COLUMNS.max(width) / width * width;
            let mut parts: Vec<ClassBlock<T>> = (0..classes.len())
                .flat_map(|class| (0..out).step_by(group).map(move |col| (class, col)))
                .map(|(class, col)| {
                    let cols = group.min(out - col);
                    let mut block = scratch::take(batch * cols);
                    for row in block.chunks_exact_mut(cols) {
                        row.copy_from_slice(&bias[col..col + cols]);
                    }
                    ClassBlock { class, col, values: block }
                })
                .collect();
            // Tap by tap: the classes that read a tap's weights run together, one group of
            // columns after another, so each part of the packed weight comes from memory about
            // once. Each class still takes its taps in its own order.
            let pieces: Vec<Vec<(usize, usize)>> = classes
                .iter()
                .map(|class| one_pixel_pieces(win, class).into_iter().map(|(tap, _, at)| (tap, at)).collect())
                .collect();
            for (t, &tap) in used.iter().enumerate() {
                let mut units: Vec<(usize, &mut ClassBlock<T>)> = parts
                    .iter_mut()
                    .filter_map(|part| Some((pieces[part.class].iter().find(|&&(u, _)| u == tap)?.1, part)))
                    .collect();
                units.sort_by_key(|(_, part)| (part.col, part.class));
                units.into_par_iter().for_each(|(at, part)| {
                    let cols = part.values.len() / batch;
                    let b = &packed[(t * out + part.col) * c..];
                    panels::product((batch, cols, c), (&x[at..], image), b, (&mut part.values, cols), (true, width));
                });
            }
            scratch::give(packed);
            parts
        }
        None => classes
            .par_iter()
            .enumerate()
            .map(|(i, class)| {
                let cw = class_weights_t(w, win, class);
                let mut block = scratch::take(batch * out);
                for row in block.chunks_exact_mut(out) {
                    row.copy_from_slice(bias);
                }
                for (n, (tap, channels, at)) in one_pixel_pieces(win, class).into_iter().enumerate() {
                    // A compact copy holds the class's taps in order, the whole weight all of them.
                    let index = if cw.compact { n / c.div_ceil(panels::MAX_K) } else { tap };
                    let b = &cw.data[(index * c + channels.start) * out..];
                    let mnk = (batch, out, channels.len());
                    gemm_strided(mnk, &x[at..], (image, 1), b, (out, 1), &mut block, out, true, false);
                }
                release(cw.data);
                ClassBlock { class: i, col: 0, values: block }
            })
            .collect(),
    };
    // Pixels no tap reaches (padding wider than the kernel) have no class and keep the bias.
    let mut reached = vec![false; pixels];
    for class in classes {
        reached[class.oy.start * win.ow() + class.ox.start] = true;
    }
    let fill = |y: &mut [std::mem::MaybeUninit<T>]| {
        y.par_chunks_mut(pixels * out).enumerate().for_each(|(n, y_img)| {
            for (row, _) in y_img.chunks_exact_mut(out).zip(&reached).filter(|(_, &r)| !r) {
                for (dst, &b) in row.iter_mut().zip(bias) {
                    dst.write(b);
                }
            }
            for ClassBlock { class, col, values } in &parts {
                let cols = values.len() / batch;
                let cl = &classes[*class];
                let at = (cl.oy.start * win.ow() + cl.ox.start) * out + col;
                for (dst, &v) in y_img[at..at + cols].iter_mut().zip(&values[n * cols..(n + 1) * cols]) {
                    dst.write(v);
                }
            }
        });
    };
    // SAFETY: every row of every image is written: the bias where no class is, else the parts
    // of its class, which cover its columns.
    let y = unsafe { scratch::written(batch * pixels * out, fill) };
    parts.into_iter().for_each(|part| scratch::give(part.values));
    y
}

/// `y (batch, oh, ow, out) = conv(x, w) + bias` with `x` `(batch, h, w, c)` and `w`
/// `(out, c, kh, kw)`.
pub fn conv<T: WithDType>(x: &[T], w: &[T], bias: &[T], win: &Window) -> Vec<T> {
    if whole::applies(win) {
        return whole::conv(x, w, bias, win);
    }
    let out = bias.len();
    let classes = classes(win);
    let w = Weight::new(w, out, win, &classes);
    if classes.iter().all(|class| class.pixels() == 1) && win.c >= panels::MAX_K {
        return one_pixel_conv(x, &w, bias, win, &classes);
    }
    // Every output row starts as the bias (the pixels no tap reaches keep it); each class adds
    // its products to its pixels' rows.
    let mut y = scratch::take(win.batch * win.oh() * win.ow() * out);
    y.par_chunks_mut(out).for_each(|row| row.copy_from_slice(bias));
    if classes.iter().all(|class| class.pixels() == 1) {
        // One pixel per class (images of at most 3×3): the classes run side by side, each into
        // its own `(batch, out)` block, so every product runs on one thread over the whole
        // batch instead of each being split over the threads (128 rows against 4,608 taps at
        // 3×3×512, which the matrix kernels split poorly).
        let blocks: Vec<Vec<T>> = classes
            .par_iter()
            .map(|class| {
                let cw = class_weights_t(&w, win, class);
                let cp = class_patches(x, win, class, cw.compact);
                let mut yc = scratch::take(win.batch * out);
                for row in yc.chunks_exact_mut(out) {
                    row.copy_from_slice(bias);
                }
                for part in &cp.parts {
                    let (a, b) = (&cp.data[part.at..], &cw.data[cw.at(&part.seg) * cw.stride..]);
                    let mnk = (win.batch, out, part.seg.len);
                    gemm_strided(mnk, a, (cp.stride, 1), b, (cw.stride, 1), &mut yc, out, true, false);
                }
                release(cp.data);
                release(cw.data);
                yc
            })
            .collect();
        let pixels = win.oh() * win.ow();
        y.par_chunks_mut(pixels * out).enumerate().for_each(|(n, y_img)| {
            for (class, block) in classes.iter().zip(&blocks) {
                let p = class.oy.start * win.ow() + class.ox.start;
                y_img[p * out..(p + 1) * out].copy_from_slice(&block[n * out..(n + 1) * out]);
            }
        });
        blocks.into_iter().for_each(scratch::give);
        return y;
    }
    for class in &classes {
        let rc = win.batch * class.pixels();
        let cw = class_weights_t(&w, win, class);
        let cp = class_patches(x, win, class, cw.compact);
        let product = |dst: &mut [T], ldc: usize| {
            for part in &cp.parts {
                // dst += patches[:, part] · Wᵀ[part, :]
                let (a, b) = (&cp.data[part.at..], &cw.data[cw.at(&part.seg) * cw.stride..]);
                gemm_strided((rc, out, part.seg.len), a, (cp.stride, 1), b, (cw.stride, 1), dst, ldc, true, true);
            }
        };
        match rows_in_place(win, &classes, class, out) {
            Some((start, stride)) => product(&mut y[start..], stride),
            None => {
                let mut yc = scratch::take(rc * out);
                yc.par_chunks_mut(out).for_each(|row| row.copy_from_slice(bias));
                product(&mut yc, out);
                let img = win.oh() * win.ow() * out;
                y.par_chunks_mut(img).zip(yc.par_chunks(class.pixels() * out)).for_each(|(y_img, block)| {
                    for (src, p) in block.chunks_exact(out).zip(class_pixels(win, class)) {
                        y_img[p * out..(p + 1) * out].copy_from_slice(src);
                    }
                });
                scratch::give(yc);
            }
        }
        release(cp.data);
        release(cw.data);
    }
    y
}

/// `dW (out, c, kh, kw)` of [`conv`] from `x` `(batch, h, w, c)` and `dy` `(batch · oh · ow, out)`.
pub fn weight_grad<T: WithDType>(x: &[T], dy: &[T], win: &Window, out: usize) -> Vec<T> {
    if whole::applies(win) {
        return whole::weight_grad(x, dy, win, out);
    }
    let (c, taps, wrow) = (win.c, win.kh * win.kw, win.patch_len());
    let classes = classes(win);
    if classes.iter().all(|class| compact(win, class)) {
        // Every class has a few taps: each class's product is added straight into the stored
        // layout, its taps only.
        let mut dw = scratch::zeroed(out * wrow);
        for class in &classes {
            let cp = class_patches(x, win, class, true);
            let (dyc, dy_stride) = class_dy(dy, win, &classes, class, out);
            let (rc, kc) = (win.batch * class.pixels(), class.taps() * c);
            // Every column is written: the parts cover the class's taps.
            let mut dwc = scratch::take(out * kc);
            for part in &cp.parts {
                let (b, dst) = (&cp.data[part.at..], &mut dwc[part.seg.col..]);
                gemm_strided((out, part.seg.len, rc), &dyc, (1, dy_stride), b, (cp.stride, 1), dst, kc, false, true);
            }
            dw.par_chunks_mut(wrow).zip(dwc.par_chunks(kc)).for_each(|(dst, src)| {
                for (src, tap) in src.chunks_exact(c).zip(class_taps(win, class)) {
                    for (ch, &v) in src.iter().enumerate() {
                        dst[ch * taps + tap] += v;
                    }
                }
            });
            scratch::give(dwc);
            release(cp.data);
            release(dyc);
        }
        return dw;
    }
    // Else every class's products accumulate into one sum in the kernels' layout, reordered into
    // the stored one at the end.
    let mut sum = scratch::take(out * wrow);
    sum.par_iter_mut().for_each(|v| *v = T::zero());
    for class in &classes {
        let cp = class_patches(x, win, class, false);
        let (dyc, dy_stride) = class_dy(dy, win, &classes, class, out);
        let rc = win.batch * class.pixels();
        for part in &cp.parts {
            // dW[:, part] += dyᵀ · patches[:, part]
            let (b, dst) = (&cp.data[part.at..], &mut sum[part.seg.offset..]);
            gemm_strided((out, part.seg.len, rc), &dyc, (1, dy_stride), b, (cp.stride, 1), dst, wrow, true, true);
        }
        release(cp.data);
        release(dyc);
    }
    let mut dw = scratch::zeroed(out * wrow);
    weight_layout::swap_inner_into(&sum, taps, c, &mut dw);
    scratch::give(sum);
    dw
}

/// `dx (batch, h, w, c)` of [`conv`] from `dy` `(batch · oh · ow, out)` and `w` `(out, c, kh, kw)`.
pub fn input_grad<T: WithDType>(dy: &[T], w: &[T], win: &Window, out: usize) -> Vec<T> {
    if whole::applies(win) {
        return whole::input_grad(dy, w, win, out);
    }
    let classes = classes(win);
    let w = Weight::new(w, out, win, &classes);
    let image = win.h * win.w * win.c;
    let mut dx = scratch::zeroed(win.batch * image);
    for class in &classes {
        let (dyc, dy_stride) = class_dy(dy, win, &classes, class, out);
        let rc = win.batch * class.pixels();
        let cw = class_weights(&w, win, class);
        if let Some(parts) = one_pixel_parts(win, class, cw.compact) {
            for part in &parts {
                // dx[:, part] += dy · W[:, part], into the images in place.
                let (b, dst) = (&cw.data[cw.at(&part.seg)..], &mut dx[part.at..]);
                gemm_strided((rc, part.seg.len, out), &dyc, (dy_stride, 1), b, (cw.stride, 1), dst, image, true, true);
            }
        } else {
            let kc = class.taps() * win.c;
            let segs = segments(win, class, cw.compact);
            // Every column is written: the segments cover the class's taps.
            let mut dcols = scratch::take(rc * kc);
            for seg in &segs {
                // dcols[:, seg] = dy · W[:, seg]
                let (b, dst) = (&cw.data[cw.at(seg)..], &mut dcols[seg.col..]);
                gemm_strided((rc, seg.len, out), &dyc, (dy_stride, 1), b, (cw.stride, 1), dst, kc, false, true);
            }
            scatter_cols(&dcols, win, class, &mut dx);
            scratch::give(dcols);
        }
        release(dyc);
        release(cw.data);
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(h: usize, w: usize, k: usize, stride: usize, pad: usize) -> Window {
        Window { batch: 2, h, w, c: 3, kh: k, kw: k, stride, pad }
    }

    #[test]
    fn classes_partition_the_output_and_keep_only_in_bounds_taps() {
        for (h, w, k, s, p) in [(1, 1, 3, 1, 1), (2, 2, 3, 1, 1), (2, 2, 3, 2, 1), (7, 5, 3, 2, 1), (9, 9, 7, 2, 3)] {
            let win = win(h, w, k, s, p);
            let classes = classes(&win);
            let mut seen = vec![0; win.oh() * win.ow()];
            for class in &classes {
                for oy in class.oy.clone() {
                    for ox in class.ox.clone() {
                        seen[oy * win.ow() + ox] += 1;
                        // Every tap in the class is in bounds; every tap outside it is not.
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - p as isize;
                                let ix = (ox * s + kx) as isize - p as isize;
                                let inside = iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize;
                                assert_eq!(inside, class.ky.contains(&ky) && class.kx.contains(&kx));
                            }
                        }
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{:?}: pixels covered {seen:?}", (h, w, k, s, p));
        }
    }

    /// `conv` in float64, directly from its definition.
    fn direct(x: &[f64], w: &[f64], bias: &[f64], win: &Window, out: usize) -> Vec<f64> {
        let (c, taps) = (win.c, win.kh * win.kw);
        let mut y = Vec::new();
        for n in 0..win.batch {
            for oy in 0..win.oh() {
                for ox in 0..win.ow() {
                    for (o, &b) in bias.iter().enumerate().take(out) {
                        let mut sum = b;
                        for ky in 0..win.kh {
                            for kx in 0..win.kw {
                                let (iy, ix) = (
                                    (oy * win.stride + ky) as isize - win.pad as isize,
                                    (ox * win.stride + kx) as isize - win.pad as isize,
                                );
                                if iy < 0 || ix < 0 || iy >= win.h as isize || ix >= win.w as isize {
                                    continue;
                                }
                                let at = ((n * win.h + iy as usize) * win.w + ix as usize) * c;
                                for ch in 0..c {
                                    sum += x[at + ch] * w[(o * c + ch) * taps + ky * win.kw + kx];
                                }
                            }
                        }
                        y.push(sum);
                    }
                }
            }
        }
        y
    }

    /// Convolutions whose classes all have one pixel per image (3×3, 2×2 and 1×1 images,
    /// stride 1 and 2, padding wider than the kernel so that some pixels see no tap, and
    /// [`panels::MAX_K`] input channels or more, where `conv` takes [`one_pixel_conv`]):
    /// [`one_pixel_conv_on`] on this crate's kernel (where this process runs it) and the gemm
    /// crate's bit for bit, and `conv` within 1e-5 of max(|y|, 1) of a float64 direct
    /// convolution.
    #[test]
    fn one_pixel_classes_give_the_same_bits_on_both_kernels() {
        let data = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| ((i * 7919 + seed * 104729) % 1013) as f32 / 1013.0 - 0.5).collect()
        };
        // (batch, h, w, c, out, stride, pad)
        for (batch, h, w, c, out, stride, pad) in [
            (13, 3, 3, 32, 48, 1, 1),
            (7, 1, 1, 64, 32, 1, 1),
            (6, 3, 3, 16, 32, 2, 1),
            (3, 3, 3, 520, 16, 1, 1),
            (5, 3, 3, 512, 32, 1, 1),
            (4, 1, 2, 16, 32, 1, 3),
            (256, 2, 2, 256, 256, 1, 1),
            (16, 1, 1, 512, 512, 1, 1),
        ] {
            let win = Window { batch, h, w, c, kh: 3, kw: 3, stride, pad };
            let classes = classes(&win);
            assert!(classes.iter().all(|class| class.pixels() == 1), "{win:?}: a class of several pixels");
            let (x, wt, bias) = (data(batch * h * w * c, 1), data(out * c * 9, 2), data(out, 3));
            let weight = Weight::new(&wt, out, &win, &classes);
            let on_gemm = one_pixel_conv_on(&x, &weight, &bias, (&win, &classes), None);
            let width = panels::width::<f32>(out, c).filter(|_| c <= panels::MAX_K);
            if let Some(width) = width {
                let on_ours = one_pixel_conv_on(&x, &weight, &bias, (&win, &classes), Some(width));
                let same = on_ours.iter().zip(&on_gemm).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{win:?}: the kernels differ");
            }
            let y = conv(&x, &wt, &bias, &win);
            assert_eq!(y.len(), batch * win.oh() * win.ow() * out);
            let f64s = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let want = direct(&f64s(&x), &f64s(&wt), &f64s(&bias), &win, out);
            for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{win:?}: y[{i}] {got} against {want}"
                );
            }
        }
    }

    #[test]
    fn useful_share_of_the_small_stages() {
        // 3×3 / 1 / 1 on a 1×1 image: only the centre tap; on 2×2: 4 of 9 per pixel.
        assert_eq!(useful_share(&win(1, 1, 3, 1, 1)), 1.0 / 9.0);
        assert_eq!(useful_share(&win(2, 2, 3, 1, 1)), 4.0 / 9.0);
        assert!(applies(&win(3, 3, 3, 1, 1)));
        assert!(!applies(&win(28, 28, 3, 1, 1)));
        assert!(!applies(&win(4, 4, 1, 2, 0)));
    }
}
