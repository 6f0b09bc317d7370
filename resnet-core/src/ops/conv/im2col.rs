//! Channels-last im2col and col2im as differentiable candle custom ops.
//!
//! A convolution over `(batch, height, width, channels)` becomes one matrix product:
//! `cols (batch·oh·ow, kh·kw·c) @ weightᵀ (kh·kw·c, out)`. candle's autograd then derives the
//! backward as two more products over the whole batch (the input gradient `dY @ W` followed by
//! col2im, and the weight gradient `colsᵀ @ dY`), instead of candle's per-channel loops and naive
//! transposed convolution.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::matmul::gemm_strided;
use crate::ops::plumbing::scratch;
use crate::ops::plumbing::storage::contiguous;

/// Unfolds `(batch, h, w, c)` into `(batch·oh·ow, kh·kw·c)` patches; padding reads as zero.
#[derive(Debug, Clone, Copy)]
pub struct Im2col {
    /// Kernel height and width.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding.
    pub pad: usize,
}

/// Folds `(batch·oh·ow, kh·kw·c)` patches back into `(batch, h, w, c)`, summing overlaps: the
/// adjoint of [`Im2col`].
#[derive(Debug, Clone, Copy)]
pub struct Col2im {
    /// The geometry of the image the patches came from.
    pub window: Window,
}

impl Im2col {
    fn window(&self, layout: &Layout) -> candle_core::Result<Window> {
        let (batch, h, w, c) = layout.shape().dims4()?;
        let win = Window { batch, h, w, c, kh: self.kh, kw: self.kw, stride: self.stride, pad: self.pad };
        win.check("im2col")?;
        Ok(win)
    }
}

/// Patch extraction on slices; `out` has `batch·oh·ow` rows of `kh·kw·c`.
pub fn im2col_slice<T: WithDType>(x: &[T], win: &Window, out: &mut [T]) {
    let row_block = win.ow() * win.patch_len();
    // One image row of output pixels per task: enough work per task, and tasks never overlap.
    out.par_chunks_mut(row_block).enumerate().for_each(|(r, dst)| im2col_rows(x, win, r..r + 1, dst));
}

/// The patches of the output rows `rows` (indices into `batch · oh`), in order, into `dst`
/// (`rows.len() · ow` rows of `kh·kw·c`), on the calling thread.
pub fn im2col_rows<T: WithDType>(x: &[T], win: &Window, rows: std::ops::Range<usize>, dst: &mut [T]) {
    let (oh, ow, patch) = (win.oh(), win.ow(), win.patch_len());
    let c = win.c;
    for (r, dst_row) in rows.zip(dst.chunks_exact_mut(ow * patch)) {
        let (b, oy) = (r / oh, r % oh);
        let img = &x[b * win.h * win.w * c..(b + 1) * win.h * win.w * c];
        if c == 1 {
            super::direct::patches_of_rows(x, win, (b, oy..oy + 1), dst_row);
            continue;
        }
        for ox in 0..ow {
            let dst = &mut dst_row[ox * patch..(ox + 1) * patch];
            for ki in 0..win.kh {
                let iy = (oy * win.stride + ki) as isize - win.pad as isize;
                for kj in 0..win.kw {
                    let ix = (ox * win.stride + kj) as isize - win.pad as isize;
                    let d = &mut dst[(ki * win.kw + kj) * c..(ki * win.kw + kj + 1) * c];
                    if iy < 0 || ix < 0 || iy >= win.h as isize || ix >= win.w as isize {
                        d.fill(T::zero());
                    } else {
                        let src = (iy as usize * win.w + ix as usize) * c;
                        d.copy_from_slice(&img[src..src + c]);
                    }
                }
            }
        }
    }
}

/// Output pixels per chunk of [`weight_grad`]'s patches and [`input_grad`]'s patch gradients
/// (whole output image rows, at least one).
const GRAD_PIXELS_PER_CHUNK: usize = 256;

/// Groups of chunks whose weight-gradient sums [`weight_grad`] keeps apart at most: enough to
/// keep the threads busy, a constant so that the sums do not depend on the thread count.
const WEIGHT_GRAD_GROUPS: usize = 8;

/// [`weight_grad`] and [`input_grad`] take a convolution whose output has at least this many
/// pixels per output channel; fewer, and the weight gradient's groups' sums (each as large as the
/// gradient) and the weight read once per chunk weigh more than the patches they spare, while
/// one product over the whole patch matrix runs near the kernels' peak.
const CHUNKED_MIN_PIXELS_PER_OUTPUT: usize = 4;

/// Whether [`weight_grad`] and [`input_grad`] pay for a convolution of this window with `out`
/// output channels (else the caller makes the patch matrix whole and takes one product).
pub fn chunks_pay(win: &Window, out: usize) -> bool {
    win.batch * win.oh() * win.ow() >= CHUNKED_MIN_PIXELS_PER_OUTPUT * out
}

/// `dW (out, kh, kw, c) = dYᵀ · cols` with `dy` `(batch · oh · ow, out)`, without the patch
/// matrix: each chunk of a few output image rows has its patches made in a buffer that stays in
/// cache and its product added into its group's sum; the groups' sums (as many as keep their
/// total below the patch matrix's size, up to [`WEIGHT_GRAD_GROUPS`]) are added in order at the
/// end. Each product's inner dimension is a chunk's pixels rather than the whole batch's, and
/// the threads take groups instead of splitting one long, thin product between them.
pub fn weight_grad<T: WithDType>(x: &[T], dy: &[T], win: &Window, out: usize) -> Vec<T> {
    let (k, ow) = (win.patch_len(), win.ow());
    let (image_rows, pixels) = (win.batch * win.oh(), win.batch * win.oh() * ow);
    let rows_per_chunk = (GRAD_PIXELS_PER_CHUNK / ow).max(1);
    let chunks = image_rows.div_ceil(rows_per_chunk);
    let groups = (pixels / out).clamp(1, WEIGHT_GRAD_GROUPS).min(chunks);
    let per_group = chunks.div_ceil(groups);
    let groups = chunks.div_ceil(per_group);
    let mut sums = scratch::take(groups * out * k);
    sums.par_chunks_mut(out * k).enumerate().for_each(|(g, sum)| {
        let mut cols = scratch::take(rows_per_chunk * ow * k);
        let first_chunk = g * per_group;
        for chunk in first_chunk..((g + 1) * per_group).min(chunks) {
            let rows = chunk * rows_per_chunk..((chunk + 1) * rows_per_chunk).min(image_rows);
            let n = rows.len() * ow;
            let dyc = &dy[rows.start * ow * out..rows.end * ow * out];
            im2col_rows(x, win, rows, &mut cols[..n * k]);
            // sum (+)= dycᵀ · cols
            gemm_strided((out, k, n), dyc, (1, out), &cols, (k, 1), sum, k, chunk > first_chunk, false);
        }
        scratch::give(cols);
    });
    let (dw, rest) = sums.split_at_mut(out * k);
    if !rest.is_empty() {
        dw.par_chunks_mut(k).enumerate().for_each(|(o, row)| {
            for other in rest.chunks_exact(out * k) {
                for (d, &v) in row.iter_mut().zip(&other[o * k..(o + 1) * k]) {
                    *d += v;
                }
            }
        });
    }
    let mut result = scratch::take(out * k);
    result.copy_from_slice(dw);
    scratch::give(sums);
    result
}

/// The adjoint of [`im2col_slice`]: scatter-adds patches into `out` (`batch·h·w·c`, zeroed here).
pub fn col2im_slice<T: WithDType>(cols: &[T], win: &Window, out: &mut [T]) {
    let (oh, ow, patch) = (win.oh(), win.ow(), win.patch_len());
    let img_len = win.h * win.w * win.c;
    // Images are disjoint in the output, so each task owns one image.
    out.par_chunks_mut(img_len).enumerate().for_each(|(b, img)| {
        img.fill(T::zero());
        col2im_add_rows(&cols[b * oh * ow * patch..(b + 1) * oh * ow * patch], win, b * oh..(b + 1) * oh, img);
    });
}

/// Adds the patches of output rows `rows` (indices into `batch · oh`; `cols` holds their
/// `rows.len() · ow` patch rows) back into `images`, the images those rows belong to, from the
/// first row's image on; on the calling thread.
fn col2im_add_rows<T: WithDType>(cols: &[T], win: &Window, rows: std::ops::Range<usize>, images: &mut [T]) {
    let (oh, ow, patch, c) = (win.oh(), win.ow(), win.patch_len(), win.c);
    let img_len = win.h * win.w * c;
    let first_image = rows.start / oh;
    for (r, row_cols) in rows.zip(cols.chunks_exact(ow * patch)) {
        let (b, oy) = (r / oh, r % oh);
        let img = &mut images[(b - first_image) * img_len..(b - first_image + 1) * img_len];
        for (ox, src_patch) in row_cols.chunks_exact(patch).enumerate() {
            for ki in 0..win.kh {
                let iy = (oy * win.stride + ki) as isize - win.pad as isize;
                if iy < 0 || iy >= win.h as isize {
                    continue;
                }
                for kj in 0..win.kw {
                    let ix = (ox * win.stride + kj) as isize - win.pad as isize;
                    if ix < 0 || ix >= win.w as isize {
                        continue;
                    }
                    let dst = (iy as usize * win.w + ix as usize) * c;
                    let src = &src_patch[(ki * win.kw + kj) * c..(ki * win.kw + kj + 1) * c];
                    for (d, s) in img[dst..dst + c].iter_mut().zip(src) {
                        *d += *s;
                    }
                }
            }
        }
    }
}

/// `dx (batch, h, w, c)` from `dy` `(batch · oh · ow, out)` and the weight in the kernels'
/// `(out, kh · kw · c)`, without the patch gradients' matrix: each task takes whole images
/// (enough of them for a chunk of about [`GRAD_PIXELS_PER_CHUNK`] output pixels, or one image
/// taken a chunk of output rows at a time, in order), multiplies a chunk's rows of `dy` by the
/// weight into a buffer that stays in cache, and folds it back into its images at once. For
/// the convolutions where [`chunks_pay`].
pub fn input_grad<T: WithDType>(dy: &[T], w: &[T], win: &Window, out: usize) -> Vec<T> {
    let (k, oh, ow) = (win.patch_len(), win.oh(), win.ow());
    let img_len = win.h * win.w * win.c;
    let images_per_task = (GRAD_PIXELS_PER_CHUNK / (oh * ow)).max(1);
    let rows_per_chunk = if images_per_task > 1 { images_per_task * oh } else { (GRAD_PIXELS_PER_CHUNK / ow).max(1) };
    let mut dx = scratch::zeroed(win.batch * img_len);
    dx.par_chunks_mut(images_per_task * img_len).enumerate().for_each(|(task, images)| {
        let first = task * images_per_task * oh;
        let last = first + images.len() / img_len * oh;
        let mut dcols = scratch::take(rows_per_chunk.min(last - first) * ow * k);
        for start in (first..last).step_by(rows_per_chunk) {
            let rows = start..(start + rows_per_chunk).min(last);
            let n = rows.len() * ow;
            let dyc = &dy[rows.start * ow * out..rows.end * ow * out];
            // dcols = dyc · W
            gemm_strided((n, k, out), dyc, (out, 1), w, (k, 1), &mut dcols[..n * k], k, false, false);
            col2im_add_rows(&dcols[..n * k], win, rows, images);
        }
        scratch::give(dcols);
    });
    dx
}

macro_rules! float_dispatch {
    ($storage:expr, $layout:expr, $op:expr, |$x:ident| $body:expr) => {
        match $storage {
            CpuStorage::F32(data) => {
                let $x = contiguous(data, $layout, $op)?;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(data) => {
                let $x = contiguous(data, $layout, $op)?;
                CpuStorage::F64($body)
            }
            other => candle_core::bail!("{} supports f32 and f64, got {:?}", $op, other.dtype()),
        }
    };
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "im2col-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), layout.dims());
        let win = self.window(layout)?;
        let rows = win.batch * win.oh() * win.ow();
        let out = float_dispatch!(storage, layout, "im2col", |x| {
            let mut out = vec![Default::default(); rows * win.patch_len()];
            im2col_slice(x, &win, &mut out);
            out
        });
        Ok((out, Shape::from((rows, win.patch_len()))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let win = self.window(arg.layout())?;
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2im { window: win })?))
    }
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "col2im-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), layout.dims());
        let win = self.window;
        let rows = win.batch * win.oh() * win.ow();
        if layout.shape().dims() != [rows, win.patch_len()] {
            candle_core::bail!(
                "col2im: expected patches of shape ({rows}, {}), got {:?}",
                win.patch_len(),
                layout.shape()
            )
        }
        let out = float_dispatch!(storage, layout, "col2im", |cols| {
            let mut out = vec![Default::default(); win.batch * win.h * win.w * win.c];
            col2im_slice(cols, &win, &mut out);
            out
        });
        Ok((out, Shape::from((win.batch, win.h, win.w, win.c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let win = self.window;
        let op = Im2col { kh: win.kh, kw: win.kw, stride: win.stride, pad: win.pad };
        Ok(Some(grad_res.contiguous()?.apply_op1(op)?))
    }
}

/// The patches of channels-last `xs` as a `(batch · out_h · out_w, k · k · channels)` matrix in
/// `(kh, kw, c)` column order, from candle's differentiable ops (zero padding, then `k²` strided
/// views concatenated along the channels), so it runs, and differentiates, on any device.
pub(crate) fn im2col_portable(
    xs: &Tensor,
    k: usize,
    stride: usize,
    pad: usize,
    (oh, ow): (usize, usize),
) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = xs.dims4()?;
    if k == 1 && stride == 1 && pad == 0 {
        return xs.reshape((b * h * w, c));
    }
    // Padded extents that hold every strided view.
    let (ph, pw) = (k - 1 + stride * oh, k - 1 + stride * ow);
    let padded =
        xs.pad_with_zeros(1, pad, ph.saturating_sub(pad + h))?.pad_with_zeros(2, pad, pw.saturating_sub(pad + w))?;
    let mut views = Vec::with_capacity(k * k);
    for ki in 0..k {
        for kj in 0..k {
            let view = padded.narrow(1, ki, stride * oh)?.narrow(2, kj, stride * ow)?;
            let view = if stride == 1 {
                view
            } else {
                view.reshape((b, oh, stride, ow, stride, c))?
                    .narrow(2, 0, 1)?
                    .narrow(4, 0, 1)?
                    .reshape((b, oh, ow, c))?
            };
            views.push(view);
        }
    }
    Tensor::cat(&views, 3)?.reshape((b * oh * ow, k * k * c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// col2im is the adjoint of im2col: <im2col(x), y> == <x, col2im(y)> for any x, y.
    #[test]
    fn col2im_is_the_adjoint_of_im2col() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(h, w, c, k, s, p) in &[(5, 6, 3, 3, 1, 1), (7, 7, 2, 3, 2, 1), (9, 8, 1, 7, 2, 3), (4, 4, 5, 1, 2, 0)] {
            let x = Tensor::randn(0f64, 1., (2, h, w, c), &dev)?;
            let cols = x.apply_op1_no_bwd(&Im2col { kh: k, kw: k, stride: s, pad: p })?;
            let y = Tensor::randn(0f64, 1., cols.shape(), &dev)?;
            let win = Window { batch: 2, h, w, c, kh: k, kw: k, stride: s, pad: p };
            let back = y.apply_op1_no_bwd(&Col2im { window: win })?;
            let lhs = (cols * &y)?.sum_all()?.to_scalar::<f64>()?;
            let rhs = (x * back)?.sum_all()?.to_scalar::<f64>()?;
            assert!((lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
        }
        Ok(())
    }

    /// The gradients a chunk at a time equal those of the whole patch matrix (f64, summed
    /// directly; 1e-12 relative): the weight gradient `dYᵀ · cols`, the input gradient col2im of
    /// `dY · W`; where chunks cross images and do not divide the batch's rows, groups hold
    /// several chunks, tasks hold several images or one image in several chunks, and one chunk
    /// holds everything.
    #[test]
    fn chunked_gradients_equal_the_whole_products() {
        for &(batch, h, w, c, k, stride, pad, out) in &[
            (12usize, 20usize, 20usize, 3usize, 3usize, 1usize, 1usize, 8usize),
            (7, 17, 15, 2, 3, 2, 1, 5),
            (9, 30, 30, 3, 1, 2, 0, 4),
            (2, 5, 5, 3, 3, 1, 1, 2),
            (5, 9, 8, 2, 3, 2, 1, 3),
        ] {
            let win = Window { batch, h, w, c, kh: k, kw: k, stride, pad };
            let (rows, len) = (batch * win.oh() * win.ow(), win.patch_len());
            assert!(chunks_pay(&win, out));
            let x: Vec<f64> = (0..batch * h * w * c).map(|i| ((i * 7919) % 1013) as f64 / 507.0 - 1.0).collect();
            let dy: Vec<f64> = (0..rows * out).map(|i| ((i * 104_729) % 997) as f64 / 499.0 - 1.0).collect();
            let mut cols = vec![0f64; rows * len];
            im2col_slice(&x, &win, &mut cols);
            let wt: Vec<f64> = (0..out * len).map(|i| ((i * 6151) % 1009) as f64 / 503.0 - 1.0).collect();
            let mut dcols = vec![0f64; rows * len];
            for (r, row) in dcols.chunks_exact_mut(len).enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (0..out).map(|o| dy[r * out + o] * wt[o * len + j]).sum();
                }
            }
            let mut want_dx = vec![0f64; x.len()];
            col2im_slice(&dcols, &win, &mut want_dx);
            for (i, (g, e)) in input_grad(&dy, &wt, &win, out).iter().zip(&want_dx).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-12 * e.abs().max(1.0),
                    "{:?}: dx[{i}] {g} vs {e}",
                    (batch, h, w, k, stride)
                );
            }
            let got = weight_grad(&x, &dy, &win, out);
            assert_eq!(got.len(), out * len);
            for o in 0..out {
                for j in 0..len {
                    let want: f64 = (0..rows).map(|r| dy[r * out + o] * cols[r * len + j]).sum();
                    let g = got[o * len + j];
                    assert!(
                        (g - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "{:?}: ({o}, {j}) {g} vs {want}",
                        (batch, h, w, k, stride)
                    );
                }
            }
        }
    }

    #[test]
    fn padding_reads_as_zero_and_patches_are_in_kh_kw_c_order() -> candle_core::Result<()> {
        // 1 image, 2x2, 2 channels: values 1..=8.
        let x = Tensor::arange(1f32, 9., &Device::Cpu)?.reshape((1, 2, 2, 2))?;
        let cols = x.apply_op1_no_bwd(&Im2col { kh: 3, kw: 3, stride: 1, pad: 1 })?;
        assert_eq!(cols.dims(), &[4, 18]);
        let first: Vec<f32> = cols.get(0)?.to_vec1()?;
        // Output pixel (0,0): window rows -1..=1, cols -1..=1; only (0,0),(0,1),(1,0),(1,1) inside.
        let want = [0., 0., 0., 0., 0., 0., 0., 0., 1., 2., 3., 4., 0., 0., 5., 6., 7., 8.];
        assert_eq!(first, want);
        assert_eq!(x.to_dtype(DType::F32)?.dims(), &[1, 2, 2, 2]);
        Ok(())
    }
}
