//! Which algorithm runs a convolution on the CPU, and the custom ops that run it forward and
//! backward: im2col + one matrix product, or a faster algorithm where the shape allows one.

use std::mem::MaybeUninit;

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::im2col::{self, im2col_rows, im2col_slice, Col2im, Im2col};
use super::{direct, taps, winograd};
use crate::ops::plumbing::elementwise::{
    add_relu_in_place, column_sums_tensor, mask_by_positive, relu_in_place, relu_rows,
};
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::matmul::{gemm_strided, gemm_strided_uninit, MatMul};
use crate::ops::plumbing::simd::with_fma;
use crate::ops::plumbing::storage::contiguous;
use crate::ops::plumbing::weight_layout::{ohwi_to_oihw, oihw_to_ohwi};
use crate::ops::plumbing::{gradients, tape};
use crate::ops::plumbing::{panels, scratch};

/// How the model computes its convolutions: a runtime setting, not part of the architecture
/// (checkpoints do not record it). All three agree to float rounding; they differ in speed.
///
/// ```
/// use resnet_core::ConvAlgorithm;
///
/// assert_eq!(ConvAlgorithm::default(), ConvAlgorithm::Winograd);
/// let parsed: ConvAlgorithm = serde_json::from_str("\"im2col\"")?;
/// assert_eq!(parsed, ConvAlgorithm::Im2col);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConvAlgorithm {
    /// The fastest algorithm per shape on the CPU: Winograd F(2×2, 3×3), F(3×3, 3×3) or
    /// F(4×4, 3×3) for the 3×3 stride-1 convolutions (forward and both gradients), products over the in-bounds kernel
    /// taps alone where padding is a large share of the work (the small images of the last
    /// stages), direct accumulation for one input channel (the stem), and im2col for the rest.
    #[default]
    Winograd,
    /// Channels-last im2col and one batched matrix product per convolution everywhere, with a
    /// matching backward.
    Im2col,
    /// candle's stock `conv2d` (and its backward), kept for comparison.
    Candle,
}

/// Convolution of channels-last `x` with an `(out, kh, kw, in)` weight and a bias, as one op:
/// forward is im2col + one matrix product over the whole batch; backward recomputes the patches
/// rather than keeping them, a chunk of output rows at a time where the output has pixels
/// enough ([`im2col::chunks_pay`]), and computes the weight gradient as `dYᵀ · cols`, the input
/// gradient as `dY · W` plus col2im (skipped when the input needs no gradient, as for the
/// images entering the stem), and the bias gradient as column sums.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Im2colConv {
    kernel: usize,
    stride: usize,
    pad: usize,
    /// Use Winograd where it applies (3×3, stride 1, padding 1, images of at least 4×4).
    winograd: bool,
    /// Let the forward take a larger tile where it is faster ([`winograd::Tile::choose_for_evaluation`])
    /// instead of F(2×2): for evaluation-mode forwards, whose outputs train nothing.
    free_forward_tile: bool,
    /// ReLU on the output ([`Im2colConv::with_relu`]).
    relu: bool,
}

impl Im2colConv {
    /// The op for a `kernel`×`kernel` convolution with this stride and zero padding.
    pub(crate) fn new((kernel, stride, pad): (usize, usize, usize), winograd: bool) -> Self {
        Self { kernel, stride, pad, winograd, free_forward_tile: false, relu: false }
    }

    /// The same op for an evaluation-mode forward: Winograd's forward may use a larger tile, as the
    /// gradients do. Training forwards stay on F(2×2) (see `forward_algo`); an evaluation's logits
    /// feed no update, so the rounding argument that keeps training there does not apply.
    pub(crate) fn for_evaluation(self) -> Self {
        Self { free_forward_tile: true, ..self }
    }

    /// The same op followed by ReLU: applied as the output is written (Winograd) or in place
    /// right after; the backward masks the incoming gradient by the output.
    pub(crate) fn with_relu(self) -> Self {
        Self { relu: true, ..self }
    }

    /// The forward on contiguous data: `x (batch, h, w, c)`, `w_oihw (out, c, kh, kw)`, `b (out,)`,
    /// plus `residual` (the output's shape) before the ReLU where given.
    fn forward<T: WithDType>(
        &self,
        algo: Option<Algo>,
        (x, w_oihw, b): (&[T], &[T], &[T]),
        win: &Window,
        residual: Option<&[T]>,
    ) -> Vec<T> {
        let ohwi = || oihw_to_ohwi(w_oihw, b.len(), win.c, win.kh * win.kw);
        // Where the algorithm cannot take the residual as it writes its output: the ReLU waits
        // for it, in one pass after.
        let relu = self.relu && residual.is_none();
        let mut y = match algo {
            Some(Algo::Winograd(tile)) => {
                let dims = (win.batch, win.h, win.w, win.c);
                let epi = winograd::Epilogue { bias: Some(b), residual, relu: self.relu };
                return winograd::conv3x3(x, winograd::Filters::Stored(w_oihw), epi, dims, b.len(), tile);
            }
            // Reads the stored layout itself (often only a few of the taps).
            Some(Algo::Taps) => {
                let mut y = taps::conv(x, w_oihw, b, win);
                if relu {
                    relu_in_place(&mut y);
                }
                y
            }
            // Patches of one channel are cheap to make and the product runs at the matrix
            // kernels' speed: faster than the direct loop for the forward.
            Some(Algo::Direct) => conv_forward(x, &ohwi(), b, win, (false, relu)),
            None => conv_forward(x, &ohwi(), b, win, (self.pointwise(), relu)),
        };
        if let Some(r) = residual {
            add_relu_in_place(&mut y, r, self.relu);
        }
        y
    }

    /// [`CustomOp3::cpu_fwd`] on `[(x), (w), (b)]`, plus `residual` (a tensor of the output's
    /// shape, in the storage of the input's type) added before the ReLU where given: a residual
    /// block's add+ReLU in the convolution's own pass, for evaluation (no backward).
    pub(crate) fn cpu_fwd_with(
        &self,
        [(s1, l1), (s2, l2), (s3, l3)]: [(&CpuStorage, &Layout); 3],
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let win = self.window(l1)?;
        let algo = self.forward_algo(&win);
        // The profile names the algorithm that ran (the one-channel "direct" case runs im2col's
        // product in the forward, see below).
        let name = match algo {
            Some(Algo::Winograd(_)) => "conv2d-winograd-nhwc",
            Some(Algo::Taps) => "conv2d-taps-nhwc",
            Some(Algo::Direct) | None => self.name(),
        };
        let _span = crate::profile::span(name, l1.dims());
        let out = l3.shape().elem_count();
        if let Some((_, l)) = residual {
            if l.shape().dims() != [win.batch, win.oh(), win.ow(), out] {
                candle_core::bail!(
                    "conv2d: a residual of shape {:?} for an output of ({}, {}, {}, {out})",
                    l.shape(),
                    win.batch,
                    win.oh(),
                    win.ow()
                )
            }
        }
        if l2.shape().dims() != [out, win.c, win.kh, win.kw] {
            candle_core::bail!(
                "conv2d: weight {:?} does not fit ({out}, {}, {}, {})",
                l2.shape(),
                win.c,
                win.kh,
                win.kw
            )
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(self.forward(
                algo,
                operands((x, w, b), [l1, l2, l3])?,
                &win,
                residual.map(|(r, l)| contiguous(r.as_slice::<f32>()?, l, "residual")).transpose()?,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(self.forward(
                algo,
                operands((x, w, b), [l1, l2, l3])?,
                &win,
                residual.map(|(r, l)| contiguous(r.as_slice::<f64>()?, l, "residual")).transpose()?,
            )),
            _ => candle_core::bail!("conv2d supports matching f32 or f64 tensors, got {:?}", s1.dtype()),
        };
        Ok((y, Shape::from((win.batch, win.oh(), win.ow(), out))))
    }

    /// The forward of `[(x), (w), (b)]` where it runs im2col's product (the one-channel stem's
    /// case among them), one image per task: each image's output is made in a buffer of the
    /// task's own, a band of rows at a time, and handed to `epilogue`, which writes what the op
    /// returns in its place, so the output is never written out whole. `None` where another
    /// algorithm runs the forward.
    /// The same products, bias and ReLU as [`Self::cpu_fwd_with`]'s, so the same bits (the bias
    /// and ReLU left to an epilogue that takes them, [`ImageEpilogue::takes_bias`]).
    pub(crate) fn cpu_fwd_per_image<E: ImageEpilogue>(
        &self,
        inputs: [(&CpuStorage, &Layout); 3],
        epilogue: &E,
    ) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        Ok(self.cpu_fwd_per_image_with_side(inputs, epilogue)?.map(|(y, shape, _)| (y, shape)))
    }

    /// [`Self::cpu_fwd_per_image`], also returning what the epilogue writes beside each image's
    /// output ([`ImageEpilogue::side_len`] values per image, in image order).
    pub(crate) fn cpu_fwd_per_image_with_side<E: ImageEpilogue>(
        &self,
        [(s1, l1), (s2, l2), (s3, l3)]: [(&CpuStorage, &Layout); 3],
        epilogue: &E,
    ) -> candle_core::Result<Option<(CpuStorage, Shape, CpuStorage)>> {
        let win = self.window(l1)?;
        let out = l3.shape().elem_count();
        if !self.runs_per_image(l1) || l2.shape().dims() != [out, win.c, win.kh, win.kw] {
            return Ok(None);
        }
        let _span = crate::profile::span("conv2d-im2col-per-image-nhwc", l1.dims());
        fn run<T: WithDType + 'static, E: ImageEpilogue>(
            (x, w_oihw, b): (&[T], &[T], &[T]),
            win: &Window,
            relu: bool,
            epilogue: &E,
        ) -> (Vec<T>, Vec<T>) {
            let (pixels, k, out) = (win.oh() * win.ow(), win.patch_len(), b.len());
            let w = oihw_to_ohwi(w_oihw, out, win.c, win.kh * win.kw);
            // One channel on this crate's kernel: the patches read in place.
            let packed = panels::width::<T>(out, k)
                .filter(|_| direct::applies(win))
                .map(|width| (direct::pack_weights(&w, win, out, width), width));
            let (image_len, side_len) = (epilogue.image_len(), epilogue.side_len());
            // The epilogue writes every value of both: they are not cleared first.
            let mut y = scratch::take(win.batch * image_len);
            // One value per image where the epilogue writes nothing beside: chunks are not empty.
            let side_stride = side_len.max(1);
            let mut side = scratch::take(win.batch * side_stride);
            // The sums alone where the epilogue adds the bias (and applies the ReLU) itself.
            let raw = epilogue.takes_bias();
            let zeros = vec![T::zero(); if raw { out } else { 0 }];
            let (b, relu) = if raw { (&zeros[..], false) } else { (b, relu) };
            // The image's rows a band at a time, as many as the batched forward's tasks hold, so
            // that a band's patches and output stay in the core's cache through its product.
            let band = (FORWARD_PIXELS_PER_TASK / win.ow()).clamp(1, win.oh());
            y.par_chunks_mut(image_len).zip(side.par_chunks_mut(side_stride)).enumerate().for_each(
                |(n, (dst, side))| {
                    // Patches for the gemm crate's products only.
                    let patches = if packed.is_some() { 0 } else { band * win.ow() * k };
                    let (mut cols, mut z) = (scratch::take(patches), scratch::take(pixels * out));
                    for (i, rows) in z.chunks_mut(band * win.ow() * out).enumerate() {
                        let (first, band_pixels) = (n * win.oh() + i * band, rows.len() / out);
                        if let Some((packed, width)) = &packed {
                            rows.chunks_exact_mut(out).for_each(|row| row.copy_from_slice(b));
                            let band_rows = first..first + band_pixels / win.ow();
                            one_channel_rows(x, win, band_rows, (packed, *width), (rows, out), relu);
                            continue;
                        }
                        let cols = &mut cols[..band_pixels * k];
                        im2col_rows(x, win, first..first + band_pixels / win.ow(), cols);
                        gemm_strided((band_pixels, out, k), cols, (k, 1), &w, (1, k), rows, out, false, false);
                        if !raw {
                            bias_relu_rows(rows, b, relu);
                        }
                    }
                    epilogue.apply(&z, dst, &mut side[..side_len]);
                    scratch::give(cols);
                    scratch::give(z);
                },
            );
            if side_len == 0 {
                scratch::give(side);
                return (y, Vec::new());
            }
            (y, side)
        }
        let (y, side) = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let (y, side) = run(operands((x, w, b), [l1, l2, l3])?, &win, self.relu, epilogue);
                (CpuStorage::F32(y), CpuStorage::F32(side))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let (y, side) = run(operands((x, w, b), [l1, l2, l3])?, &win, self.relu, epilogue);
                (CpuStorage::F64(y), CpuStorage::F64(side))
            }
            _ => return Ok(None),
        };
        let (h, w, c) = epilogue.image_dims();
        Ok(Some((y, Shape::from((win.batch, h, w, c)), side)))
    }

    /// Whether [`Self::cpu_fwd_per_image`] takes input `x`: a valid geometry whose forward runs
    /// im2col's product.
    pub(crate) fn runs_per_image(&self, x: &Layout) -> bool {
        self.window(x)
            .is_ok_and(|win| matches!(self.forward_algo(&win), Some(Algo::Direct) | None) && !self.pointwise())
    }

    /// The contiguous `(batch, out_h, out_w, out)` layout of the output for input `x`.
    pub(crate) fn output_layout(&self, x: &Layout, out: usize) -> candle_core::Result<Layout> {
        let win = self.window(x)?;
        Ok(Layout::contiguous((win.batch, win.oh(), win.ow(), out)))
    }

    /// The geometry of the convolution of input `x`.
    pub(crate) fn window_of(&self, x: &Layout) -> candle_core::Result<Window> {
        self.window(x)
    }

    fn window(&self, x: &Layout) -> candle_core::Result<Window> {
        let (batch, h, w, c) = x.shape().dims4()?;
        let win = Window { batch, h, w, c, kh: self.kernel, kw: self.kernel, stride: self.stride, pad: self.pad };
        win.check("conv2d")?;
        Ok(win)
    }

    fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.pad == 0
    }

    /// The forward's algorithm: the gradients' ([`Im2colConv::algo`]), with Winograd's tile its
    /// own. Evaluation forwards take [`winograd::Tile::choose_for_evaluation`]'s tile. A training
    /// forward stays on F(2×2): larger tiles' transform constants round enough that a whole batch
    /// and the same images in two micro-batches (the products' blocking depends on the batch
    /// size) give updates further apart than gradient accumulation's tolerance; F(2×2) keeps them
    /// within it. On images below 4 pixels a side, where F(2×2)'s tiles overhang the image (64
    /// multiplies per channel pair for a 3×3 image), a training forward takes the in-bounds taps
    /// (49) instead.
    fn forward_algo(&self, win: &Window) -> Option<Algo> {
        match self.algo(win) {
            Some(Algo::Winograd(_)) if self.free_forward_tile => {
                Some(Algo::Winograd(winograd::Tile::choose_for_evaluation(win.h, win.w)))
            }
            Some(Algo::Winograd(_)) if win.h < 4 || win.w < 4 => taps::applies(win).then_some(Algo::Taps),
            Some(Algo::Winograd(_)) => Some(Algo::Winograd(winograd::Tile::F2)),
            other => other,
        }
    }

    /// The fast algorithm for this shape's gradients, if any: direct accumulation for one input
    /// channel, Winograd where it applies (with [`winograd::Tile::choose`]'s tile), else the
    /// in-bounds taps where padding is a large share of im2col's work.
    fn algo(&self, win: &Window) -> Option<Algo> {
        if !self.winograd {
            None
        } else if direct::applies(win) {
            Some(Algo::Direct)
        } else if winograd::applies(self.kernel, self.stride, self.pad, win.h, win.w) {
            Some(Algo::Winograd(winograd::Tile::choose(win.h, win.w)))
        } else if taps::applies(win) {
            Some(Algo::Taps)
        } else {
            None
        }
    }
}

/// The algorithms beside plain im2col.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algo {
    /// Winograd F(m×m, 3×3) with m = 2, 3 or 4 ([`winograd`]).
    Winograd(winograd::Tile),
    /// One product per class of in-bounds kernel taps ([`taps`]).
    Taps,
    /// Direct accumulation for single-channel inputs ([`direct`]).
    Direct,
}

/// Output pixels per task of [`conv_forward`]'s patches and product (whole output image rows,
/// at least one).
const FORWARD_PIXELS_PER_TASK: usize = 512;

/// Tasks of [`conv_forward`] at least, where the batch has that many output image rows: enough
/// to keep the threads busy. A constant, so the split (and so each product's shape) does not
/// depend on the number of threads.
const FORWARD_MIN_TASKS: usize = 8;

/// Patch matrices up to this many elements (4 MB of `f32`) are made whole and multiplied in one
/// product split over the threads: they stay in cache anyway.
const WHOLE_PATCHES: usize = 1 << 20;

/// A convolution's input, weight and bias as contiguous slices.
fn operands<'a, T: WithDType>(
    (x, w, b): (&'a [T], &'a [T], &'a [T]),
    [l1, l2, l3]: [&Layout; 3],
) -> candle_core::Result<(&'a [T], &'a [T], &'a [T])> {
    Ok((contiguous(x, l1, "conv2d input")?, contiguous(w, l2, "conv2d weight")?, contiguous(b, l3, "conv2d bias")?))
}

/// What [`Im2colConv::cpu_fwd_per_image`] does with each image's `(oh, ow, out)` output.
pub(crate) trait ImageEpilogue: Sync {
    /// The `(h, w, c)` it writes per image.
    fn image_dims(&self) -> (usize, usize, usize);

    /// Values it writes per image.
    fn image_len(&self) -> usize {
        let (h, w, c) = self.image_dims();
        h * w * c
    }

    /// Values it writes beside each image's output (none by default).
    fn side_len(&self) -> usize {
        0
    }

    /// Whether it adds the convolution's bias (and applies its ReLU) itself: the image's output
    /// then comes as the products' sums alone, without a pass over it for them.
    fn takes_bias(&self) -> bool {
        false
    }

    /// Writes every element of `dst` (`image_len` values) and of `side` (`side_len` values),
    /// whatever they hold on entry, from one image's output.
    fn apply<T: WithDType>(&self, image: &[T], dst: &mut [T], side: &mut [T]);
}

/// `y (rows, out) = cols (rows, k) · wᵀ + bias`, then ReLU with `relu`, with `w` as `(out, k)`
/// row-major. A pointwise
/// convolution's patches are `x` itself, and small patch matrices ([`WHOLE_PATCHES`]) are made
/// whole: one product over every row. Otherwise each task makes the patches of a few output
/// image rows in a scratch buffer that stays in cache and multiplies them on its own thread, so
/// the whole patch matrix (58 MB for the stem at 96 px) is never written out and read back. The
/// products' sums are those of the one product wherever the matrix kernels treat the task's
/// product as they treat the whole (they split `k` by its size alone; tasks of a few pixels and
/// outputs take the crate's small-product kernels, which sum in another order). The ReLU goes
/// over each task's rows while they are in cache, not as a pass of its own over the output
/// (151 MB for the evaluation stem at 96 px, batch 256).
fn conv_forward<T: WithDType + 'static>(
    x: &[T],
    w: &[T],
    bias: &[T],
    win: &Window,
    (pointwise, relu): (bool, bool),
) -> Vec<T> {
    let (rows, k) = (win.batch * win.oh() * win.ow(), win.patch_len());
    let image_rows = if pointwise || rows * k <= WHOLE_PATCHES {
        None
    } else {
        let at_most = (win.batch * win.oh()).div_ceil(FORWARD_MIN_TASKS);
        Some((FORWARD_PIXELS_PER_TASK / win.ow()).min(at_most).max(1))
    };
    conv_forward_in(x, w, bias, win, (pointwise, relu), image_rows)
}

/// [`conv_forward`] with `image_rows` output image rows per task, or one product over every row
/// (`None`).
fn conv_forward_in<T: WithDType + 'static>(
    x: &[T],
    w: &[T],
    bias: &[T],
    win: &Window,
    (pointwise, relu): (bool, bool),
    image_rows: Option<usize>,
) -> Vec<T> {
    let (rows, k, out, ow) = (win.batch * win.oh() * win.ow(), win.patch_len(), bias.len(), win.ow());
    // One channel on this crate's kernel: the patches read in place.
    let packed = image_rows
        .and_then(|_| panels::width::<T>(out, k).filter(|_| direct::applies(win) && !pointwise))
        .map(|width| (direct::pack_weights(w, win, out, width), width));
    let fill = |dst: &mut [MaybeUninit<T>]| match image_rows {
        None => {
            let owned = (!pointwise).then(|| {
                let mut buf = scratch::take(rows * k);
                im2col_slice(x, win, &mut buf);
                buf
            });
            gemm_strided_uninit((rows, out, k), owned.as_deref().unwrap_or(x), (k, 1), w, (1, k), dst, out, true);
            if let Some(buf) = owned {
                scratch::give(buf);
            }
            dst.par_chunks_mut(FORWARD_PIXELS_PER_TASK * out).for_each(|part| {
                // SAFETY: the product wrote every element of `dst`.
                bias_relu_rows(unsafe { scratch::assume_init(part) }, bias, relu);
            });
        }
        Some(image_rows) => dst.par_chunks_mut(image_rows * ow * out).enumerate().for_each(|(task, part)| {
            let pixels = part.len() / out;
            let first = task * image_rows;
            if let Some((packed, width)) = &packed {
                for row in part.chunks_exact_mut(out) {
                    for (v, &b) in row.iter_mut().zip(bias) {
                        v.write(b);
                    }
                }
                // SAFETY: every element was just written.
                let part = unsafe { scratch::assume_init(part) };
                one_channel_rows(x, win, first..first + pixels / ow, (packed, *width), (part, out), relu);
                return;
            }
            let mut cols = scratch::take(pixels * k);
            im2col_rows(x, win, first..first + pixels / ow, &mut cols);
            gemm_strided_uninit((pixels, out, k), &cols, (k, 1), w, (1, k), part, out, false);
            scratch::give(cols);
            // SAFETY: the product wrote every element of `part`.
            bias_relu_rows(unsafe { scratch::assume_init(part) }, bias, relu);
        }),
    };
    // SAFETY: the product writes every element (its `rows × out` block, rows `out` apart, is the
    // whole buffer) before the bias and the ReLU read it: no clearing pass.
    unsafe { scratch::written(rows * out, fill) }
}

/// [`direct::forward_rows`] of output rows `rows` added to `dst` (`(pixels, out)`, which holds
/// the bias), then ReLU with `relu`: the bias plus the product's sum in one rounding, as
/// [`bias_relu_rows`] adds them after im2col's product.
fn one_channel_rows<T: WithDType>(
    x: &[T],
    win: &Window,
    rows: std::ops::Range<usize>,
    packed: (&[T], usize),
    (dst, out): (&mut [T], usize),
    relu: bool,
) {
    direct::forward_rows(x, win, rows, packed, (&mut *dst, out));
    if relu {
        relu_rows(dst);
    }
}

/// Each `bias.len()`-wide row of `ys` plus `bias` (the product's sum plus the bias, one rounding
/// as when the product adds to rows that hold the bias), then ReLU with `relu`; on the calling
/// thread, for a task's own rows while they are in its cache.
fn bias_relu_rows<T: WithDType>(ys: &mut [T], bias: &[T], relu: bool) {
    with_fma(
        #[inline(always)]
        || {
            for row in ys.chunks_exact_mut(bias.len()) {
                for (v, &b) in row.iter_mut().zip(bias) {
                    let t = *v + b;
                    *v = if relu && t < T::zero() { T::zero() } else { t };
                }
            }
        },
    )
}

impl CustomOp3 for Im2colConv {
    fn name(&self) -> &'static str {
        "conv2d-im2col-nhwc"
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
        self.cpu_fwd_with([(s1, l1), (s2, l2), (s3, l3)], None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.gradients(x, w, bias.elem_count(), (res, grad), None)
    }
}

impl Im2colConv {
    /// [`CustomOp3::bwd`] for `out` output channels: `(dx, dW, db)`, `db` the given bias
    /// gradient where the caller has it (the column sums of the output gradient, which a
    /// BatchNorm's backward takes as it writes that gradient), else summed here.
    pub(crate) fn gradients(
        &self,
        x: &Tensor,
        w: &Tensor,
        out: usize,
        (res, grad): (&Tensor, &Tensor),
        db: Option<Tensor>,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let masked;
        let grad = if self.relu {
            masked = mask_by_positive(res, grad)?;
            &masked
        } else {
            grad
        };
        let win = self.window(x.layout())?;
        let k = win.patch_len();
        let rows = win.batch * win.oh() * win.ow();
        let dy = grad.contiguous()?.reshape((rows, out))?;
        let algo = self.algo(&win);
        let dy4 = dy.reshape((win.batch, win.oh(), win.ow(), out))?;
        // Im2col's gradients a chunk of output rows at a time in cache ([`im2col::weight_grad`],
        // [`im2col::input_grad`]) where that pays; else the whole patch matrix and one product.
        let chunked = algo.is_none() && !self.pointwise() && im2col::chunks_pay(&win, out);
        let dw = if algo.is_some() || chunked {
            x.apply_op2_no_bwd(&dy4, &ConvGrad { wrt: Wrt::Weight, algo, win, cout: out })?
        } else {
            let cols = if self.pointwise() {
                x.reshape((rows, k))?
            } else {
                x.apply_op1_no_bwd(&Im2col { kh: win.kh, kw: win.kw, stride: win.stride, pad: win.pad })?
            };
            let dw = dy.apply_op2_no_bwd(&cols, &MatMul { trans_a: true, trans_b: false })?;
            dw.reshape((out, win.kh, win.kw, win.c))?.permute((0, 3, 1, 2))?.contiguous()?
        };
        let db = match db {
            Some(db) if !self.relu => db,
            _ => column_sums_tensor(&dy)?,
        };
        let dx = if tape::wants_grad(x) && (algo.is_some() || chunked) {
            Some(dy4.apply_op2_no_bwd(w, &ConvGrad { wrt: Wrt::Input, algo, win, cout: out })?)
        } else if tape::wants_grad(x) {
            let w_mat = w.detach().permute((0, 2, 3, 1))?.contiguous()?.reshape((out, k))?;
            let dcols = dy.apply_op2_no_bwd(&w_mat, &MatMul { trans_a: false, trans_b: false })?;
            Some(if self.pointwise() {
                dcols.reshape(x.shape())?
            } else {
                dcols.apply_op1_no_bwd(&Col2im { window: win })?
            })
        } else {
            None
        };
        Ok((dx, gradients::route(w, Some(dw)), Some(db)))
    }
}

/// The gradients of a convolution that runs through a fast [`Algo`], as no-grad ops:
/// - `Wrt::Input`: `(dy (b, oh, ow, out), w (out, in, kh, kw)) -> dx (b, h, w, in)`;
/// - `Wrt::Weight`: `(x (b, h, w, in), dy (b, oh, ow, out)) -> dW (out, in, kh, kw)`.
///
/// Winograd's input gradient is itself a 3×3 convolution with the filters flipped.
#[derive(Debug, Clone, Copy)]
struct ConvGrad {
    wrt: Wrt,
    /// `None`: im2col a chunk at a time ([`im2col::weight_grad`], [`im2col::input_grad`]).
    algo: Option<Algo>,
    /// The forward convolution's geometry.
    win: Window,
    cout: usize,
}

/// Which gradient a [`ConvGrad`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wrt {
    Input,
    Weight,
}

impl ConvGrad {
    /// The output shape, after checking both operands against the window.
    fn check(&self, l1: &Layout, l2: &Layout) -> candle_core::Result<Shape> {
        let Window { batch, h, w, c, kh, kw, .. } = self.win;
        let (oh, ow, out) = (self.win.oh(), self.win.ow(), self.cout);
        let (want1, want2, shape) = match self.wrt {
            Wrt::Input => (vec![batch, oh, ow, out], vec![out, c, kh, kw], Shape::from((batch, h, w, c))),
            Wrt::Weight => (vec![batch, h, w, c], vec![batch, oh, ow, out], Shape::from((out, c, kh, kw))),
        };
        if l1.shape().dims() != want1.as_slice() || l2.shape().dims() != want2.as_slice() {
            candle_core::bail!(
                "{}: operands {:?} and {:?} do not fit {want1:?} and {want2:?}",
                self.name(),
                l1.shape(),
                l2.shape()
            )
        }
        Ok(shape)
    }

    /// `a`, `b` as in the type's doc; weights and weight gradients in the stored layout.
    fn run<T: WithDType>(&self, a: &[T], b: &[T]) -> Vec<T> {
        let win = &self.win;
        let (taps, cout) = (win.kh * win.kw, self.cout);
        let dims = (win.batch, win.h, win.w, win.c);
        // The direct kernels take and give `(out, kh, kw, in)`; Winograd and the taps read and
        // write the stored layout themselves.
        let ohwi = || oihw_to_ohwi(b, cout, win.c, taps);
        let oihw = |dw: Vec<T>| ohwi_to_oihw(&dw, cout, win.c, taps).into_owned();
        match (self.algo, self.wrt) {
            (Some(Algo::Winograd(tile)), Wrt::Input) => {
                let (n, h, w, _) = dims;
                winograd::conv3x3(
                    a,
                    winograd::Filters::Adjoint(b),
                    winograd::Epilogue::none(),
                    (n, h, w, cout),
                    win.c,
                    tile,
                )
            }
            (Some(Algo::Winograd(tile)), Wrt::Weight) => winograd::conv3x3_weight_grad(a, b, dims, cout, tile),
            (Some(Algo::Taps), Wrt::Input) => taps::input_grad(a, b, win, cout),
            (Some(Algo::Taps), Wrt::Weight) => taps::weight_grad(a, b, win, cout),
            (Some(Algo::Direct), Wrt::Input) => direct::input_grad(a, &ohwi(), win, cout),
            (Some(Algo::Direct), Wrt::Weight) => oihw(direct::weight_grad(a, b, win, cout)),
            (None, Wrt::Weight) => oihw(im2col::weight_grad(a, b, win, cout)),
            (None, Wrt::Input) => im2col::input_grad(a, &ohwi(), win, cout),
        }
    }
}

impl CustomOp2 for ConvGrad {
    fn name(&self) -> &'static str {
        match (self.algo, self.wrt) {
            (Some(Algo::Winograd(_)), Wrt::Input) => "conv2d-winograd-input-grad",
            (Some(Algo::Winograd(_)), Wrt::Weight) => "conv2d-winograd-weight-grad",
            (Some(Algo::Taps), Wrt::Input) => "conv2d-taps-input-grad",
            (Some(Algo::Taps), Wrt::Weight) => "conv2d-taps-weight-grad",
            (Some(Algo::Direct), Wrt::Input) => "conv2d-direct-input-grad",
            (Some(Algo::Direct), Wrt::Weight) => "conv2d-direct-weight-grad",
            (None, Wrt::Input) => "conv2d-im2col-input-grad",
            (None, Wrt::Weight) => "conv2d-im2col-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        let shape = self.check(l1, l2)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.run(contiguous(a, l1, self.name())?, contiguous(b, l2, self.name())?))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.run(contiguous(a, l1, self.name())?, contiguous(b, l2, self.name())?))
            }
            _ => candle_core::bail!("{} supports matching f32 or f64 tensors", self.name()),
        };
        Ok((out, shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The im2col forward made a few output rows per task gives the bits of the one product
    /// over the whole patch matrix (then ReLU'd, with ReLU), for rows per task that cross images
    /// or exceed the batch, one channel or several, with and without stride and padding. (Tasks
    /// and outputs are kept above 16 each: the gemm crate multiplies products of at most 16 × 16
    /// with other kernels.)
    #[test]
    fn im2col_forward_per_task_equals_the_whole_product() {
        for &(batch, h, w, c, k, stride, pad, out) in &[
            (3usize, 40usize, 36usize, 1usize, 7usize, 2usize, 3usize, 32usize),
            (2, 33, 35, 1, 7, 2, 3, 64),
            (2, 34, 38, 1, 5, 1, 2, 48),
            (2, 36, 36, 16, 3, 2, 1, 24),
            (4, 18, 18, 8, 3, 1, 1, 20),
            (2, 40, 40, 32, 1, 2, 0, 48),
        ] {
            let win = Window { batch, h, w, c, kh: k, kw: k, stride, pad };
            let x: Vec<f32> = (0..batch * h * w * c).map(|i| ((i * 7919) % 1013) as f32 / 507.0 - 1.0).collect();
            let wt: Vec<f32> = (0..out * c * k * k).map(|i| ((i * 104_729) % 997) as f32 / 499.0 - 1.0).collect();
            let bias: Vec<f32> = (0..out).map(|i| i as f32 * 0.1 - 0.2).collect();
            let whole = conv_forward_in(&x, &wt, &bias, &win, (false, false), None);
            assert!(win.ow() > 16 && out > 16, "every task above 16 pixels and outputs");
            assert!(whole.iter().any(|&v| v < 0.0), "outputs of both signs, so the ReLU changes some");
            let rectified: Vec<f32> = whole.iter().map(|&v| if v < 0.0 { 0.0 } else { v }).collect();
            for (relu, want) in [(false, &whole), (true, &rectified)] {
                for image_rows in [1, 3, batch * win.oh() + 1] {
                    let tasks = conv_forward_in(&x, &wt, &bias, &win, (false, relu), Some(image_rows));
                    let same = want.iter().zip(&tasks).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same && want.len() == tasks.len(),
                        "{:?}, {image_rows} rows per task, ReLU {relu}",
                        (batch, h, w, c, k, stride, pad)
                    );
                }
            }
        }
    }
}
