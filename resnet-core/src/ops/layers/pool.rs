//! Pooling candle lacks: padded max-pooling with a backward for any kernel and stride, and
//! global average pooling, both over channels-last `(batch, height, width, channels)` tensors.

use std::mem::MaybeUninit;

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::ops::cudnn::{self, GpuOps};
use crate::ops::plumbing::scratch::{self, Slot};
use crate::ops::plumbing::simd::with_fma;
use crate::ops::plumbing::storage::contiguous;
use crate::ops::plumbing::tape;

use crate::ops::plumbing::geometry::Window;

/// Max-pooling with padding (padded cells never win), differentiable for any kernel and stride.
///
/// candle's `max_pool2d` has no padding and refuses a backward when kernel ≠ stride, which rules
/// out d2l's 3×3 stride-2 padding-1 stem. Ties go to the first cell in row-major window order,
/// as in PyTorch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Padding on every side; must be at most half the kernel, as in PyTorch.
    pub pad: usize,
}

impl MaxPool2d {
    /// d2l's stem pooling: 3×3, stride 2, padding 1.
    pub fn d2l_stem() -> Self {
        Self { kernel: 3, stride: 2, pad: 1 }
    }

    /// [`MaxPool2d::forward_on`] with the default kernels (the CPU's, or candle's on CUDA).
    #[cfg(test)]
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_on(xs, GpuOps::default())
    }

    /// Applies the pooling.
    ///
    /// # Shapes
    /// - `xs`: `(batch, height, width, channels)`
    /// - returns `(batch, out_h, out_w, channels)`
    ///
    /// On CPU (f32, f64) this is one custom op with its own backward; on CUDA with
    /// [`GpuOps::Cudnn`] it is cuDNN's pooling, forward and backward; on other devices and
    /// dtypes it is [`MaxPool2d::forward_portable`], made of candle's differentiable ops.
    pub fn forward_on(&self, xs: &Tensor, gpu_ops: GpuOps) -> candle_core::Result<Tensor> {
        if gpu_ops == GpuOps::Cudnn && xs.device().is_cuda() {
            self.window(xs.layout())?;
            cudnn::max_pool2d(xs, self.kernel, self.stride, self.pad)
        } else if xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) {
            tape::op1(&xs.contiguous()?, *self)
        } else {
            self.forward_portable(xs)
        }
    }

    /// The same pooling from candle's own ops, for every device and dtype (CUDA included): pad
    /// with -inf, then take the elementwise maximum of the `kernel²` strided views. A strided
    /// view is a `narrow` plus a reshape that splits each spatial axis into `(out, stride)`.
    /// candle's `maximum` backward shares a tied gradient between the tied cells instead of
    /// giving it all to the first, which changes nothing where the values differ.
    pub fn forward_portable(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let win = self.window(xs.layout())?;
        let (b, c, k, s, p) = (win.batch, win.c, self.kernel, self.stride, self.pad);
        let (oh, ow) = (win.oh(), win.ow());
        // Padded extents that hold every view: `k - 1 + s * out` cells from the top-left pad.
        let (ph, pw) = (k - 1 + s * oh, k - 1 + s * ow);
        let (below, right) = (ph.saturating_sub(p + win.h), pw.saturating_sub(p + win.w));
        let neg = |hh: usize, ww: usize| -> candle_core::Result<Tensor> {
            Tensor::full(f32::NEG_INFINITY, (b, hh, ww, c), xs.device())?.to_dtype(xs.dtype())
        };
        let mut padded = xs.clone();
        if p + right > 0 {
            padded = Tensor::cat(&[&neg(win.h, p)?, &padded, &neg(win.h, right)?], 2)?;
        }
        let width = p + win.w + right;
        if p + below > 0 {
            padded = Tensor::cat(&[&neg(p, width)?, &padded, &neg(below, width)?], 1)?;
        }
        let mut out: Option<Tensor> = None;
        for ki in 0..k {
            for kj in 0..k {
                let view = padded.narrow(1, ki, s * oh)?.narrow(2, kj, s * ow)?;
                let view = if s == 1 {
                    view
                } else {
                    view.reshape((b, oh, s, ow, s, c))?.narrow(2, 0, 1)?.narrow(4, 0, 1)?.reshape((b, oh, ow, c))?
                };
                out = Some(match out {
                    None => view,
                    Some(acc) => acc.maximum(&view)?,
                });
            }
        }
        out.ok_or_else(|| candle_core::Error::Msg("max-pool: empty kernel".into()))
    }

    pub(super) fn window(&self, layout: &Layout) -> candle_core::Result<Window> {
        let (batch, h, w, c) = layout.shape().dims4()?;
        if 2 * self.pad > self.kernel {
            candle_core::bail!("max-pool: padding {} exceeds half the kernel {}", self.pad, self.kernel)
        }
        let win = Window { batch, h, w, c, kh: self.kernel, kw: self.kernel, stride: self.stride, pad: self.pad };
        win.check("max-pool")?;
        if h * w * c > u32::MAX as usize {
            candle_core::bail!("max-pool: an image of {h}x{w}x{c} values exceeds the 2^32 the op indexes")
        }
        Ok(win)
    }
}

fn pool_fwd<T: WithDType>(x: &[T], win: &Window) -> Vec<T> {
    let (img_len, out_len) = (win.h * win.w * win.c, win.oh() * win.ow() * win.c);
    let mut out = scratch::zeroed(win.batch * out_len);
    out.par_chunks_mut(out_len).enumerate().for_each(|(b, dst)| {
        with_fma(
            #[inline(always)]
            || pool_image(&x[b * img_len..(b + 1) * img_len], win, dst),
        )
    });
    out
}

/// The max-pool of one `(h, w, c)` image into `dst` (`(oh, ow, c)`). Maxima only (the backward
/// finds the arg-max again): a select per channel, which vectorises, where tracking indices kept
/// the loop scalar: the first cell, then strictly greater cells.
#[inline(always)]
pub(super) fn pool_image<T: WithDType>(img: &[T], win: &Window, dst: &mut [T]) {
    let row = win.w * win.c;
    for (oy, out) in dst.chunks_exact_mut(win.ow() * win.c).enumerate() {
        pool_row(|iy| &img[iy * row..(iy + 1) * row], win, oy, out);
    }
}

/// Runs `$body` over the channels `0..$c` in blocks of 16, then 8, then 1 channels, `$ch` the
/// block's first channel and `$n` its width (a constant): a block's values stay in registers
/// over a window's cells, where a loop over a slice of all the channels loaded and stored them
/// at every cell.
macro_rules! channel_blocks {
    ($c:expr, |$ch:ident, $n:ident| $body:block) => {{
        let c = $c;
        let mut $ch = 0;
        {
            const $n: usize = 16;
            while $ch + $n <= c {
                $body
                $ch += $n;
            }
        }
        {
            const $n: usize = 8;
            while $ch + $n <= c {
                $body
                $ch += $n;
            }
        }
        {
            const $n: usize = 1;
            while $ch < c {
                $body
                $ch += $n;
            }
        }
    }};
}

/// `N` values from `at` in `v`, as an array (its length known to the compiler).
#[inline(always)]
fn block<T, const N: usize>(v: &[T], at: usize) -> &[T; N] {
    v[at..at + N].try_into().expect("a block of N values")
}

/// Output row `oy` of [`pool_image`] (`(ow, c)`), the image's rows `(w, c)` taken from
/// `rows(iy)`: only the rows under the row's windows are read, so a caller can make the image a
/// few rows at a time.
#[inline(always)]
pub(super) fn pool_row<'a, T: WithDType>(rows: impl Fn(usize) -> &'a [T], win: &Window, oy: usize, out: &mut [T]) {
    let c = win.c;
    let ys = window_range(oy, win.stride, win.pad, win.kh, win.h);
    for (ox, best) in out.chunks_exact_mut(c).enumerate() {
        let xs = window_range(ox, win.stride, win.pad, win.kw, win.w);
        channel_blocks!(c, |ch, N| {
            let mut m = [T::zero(); N];
            let mut first = true;
            for iy in ys.clone() {
                let image_row = rows(iy);
                for ix in xs.clone() {
                    let cell = block::<T, N>(image_row, ix * c + ch);
                    if first {
                        m = *cell;
                        first = false;
                    } else {
                        for (m, &v) in m.iter_mut().zip(cell) {
                            *m = if v > *m { v } else { *m };
                        }
                    }
                }
            }
            best[ch..ch + N].copy_from_slice(&m);
        });
    }
}

/// The input rows (or columns) under output `o`'s window, clipped to the image.
pub(super) fn window_range(o: usize, stride: usize, pad: usize, k: usize, n: usize) -> std::ops::Range<usize> {
    let start = (o * stride) as isize - pad as isize;
    start.max(0) as usize..((start + k as isize).min(n as isize)).max(0) as usize
}

fn pool_bwd<T: WithDType>(x: &[T], y: &[T], grad: &[T], win: &Window) -> Vec<T> {
    let (img_len, out_len) = (win.h * win.w * win.c, win.oh() * win.ow() * win.c);
    let fill = |dx: &mut [MaybeUninit<T>]| {
        dx.par_chunks_mut(img_len).enumerate().for_each(|(b, dst)| {
            with_fma(
                #[inline(always)]
                || {
                    let (maxima, g) = (&y[b * out_len..(b + 1) * out_len], &grad[b * out_len..(b + 1) * out_len]);
                    pool_image_backward(&x[b * img_len..(b + 1) * img_len], (maxima, g), win, dst);
                },
            )
        })
    };
    // SAFETY: `pool_image_backward` writes every element of each image's chunk.
    unsafe { scratch::written(win.batch * img_len, fill) }
}

/// The input gradient of one image's max-pool into `dst` (`(h, w, c)`), writing every element
/// once: each window's gradient goes to the cell the forward kept, the first cell (row-major)
/// holding the window's maximum (`maxima`, the forward's output). A NaN maximum (the first cell
/// NaN, which the forward keeps) matches no cell, and the first cell takes it, as the forward
/// kept that one. Two passes, both selects that vectorise over the channels: each window's
/// winning cell per channel (its position in the window, as `T`), then each cell's gradient
/// gathered from the windows that cover it, added in row-major window order from +0, the order
/// and values a scatter into a zeroed `dst` would add.
#[inline(always)]
pub(super) fn pool_image_backward<T: WithDType, S: Slot<T>>(
    img: &[T],
    (maxima, g): (&[T], &[T]),
    win: &Window,
    dst: &mut [S],
) {
    let (row, out_row) = (win.w * win.c, win.ow() * win.c);
    let mut winner = scratch::take::<T>(win.oh() * out_row);
    for (oy, won) in winner.chunks_exact_mut(out_row).enumerate() {
        winners_row(|iy| &img[iy * row..(iy + 1) * row], &maxima[oy * out_row..(oy + 1) * out_row], win, oy, won);
    }
    for (iy, out) in dst.chunks_exact_mut(row).enumerate() {
        gather_row(|oy| &winner[oy * out_row..(oy + 1) * out_row], g, win, iy, out);
    }
    scratch::give(winner);
}

/// The first pass of [`pool_image_backward`] for output row `oy`: each window's winning cell per
/// channel, its position in the window as `T`, into `won` (`(ow, c)`), from the row's maxima
/// and the image's rows `rows(iy)` under its windows.
#[inline(always)]
pub(super) fn winners_row<'a, T: WithDType>(
    rows: impl Fn(usize) -> &'a [T],
    maxima: &[T],
    win: &Window,
    oy: usize,
    won: &mut [T],
) {
    let c = win.c;
    let ys = window_range(oy, win.stride, win.pad, win.kh, win.h);
    let image_rows: Vec<&[T]> = ys.clone().map(&rows).collect();
    // A window's cells, last to first, each its `c` values and its position in the window as
    // `T`. Made once per window, outside the channel loop.
    let mut cells: Vec<(&[T], T)> = Vec::with_capacity(win.kh * win.kw);
    for (ox, (won, best)) in won.chunks_exact_mut(c).zip(maxima.chunks_exact(c)).enumerate() {
        let xs = window_range(ox, win.stride, win.pad, win.kw, win.w);
        cells.clear();
        for (dy, image_row) in image_rows.iter().enumerate().rev() {
            for ix in xs.clone().rev() {
                let pos = T::from_f64((dy * xs.len() + ix - xs.start) as f64);
                cells.push((&image_row[ix * c..(ix + 1) * c], pos));
            }
        }
        channel_blocks!(c, |ch, N| {
            let best = block::<T, N>(best, ch);
            // Visiting the cells last to first, the last match is the first cell holding the
            // maximum; with none (a NaN maximum), the first cell (position 0) keeps it.
            let mut k = [T::zero(); N];
            for &(cell, pos) in &cells {
                for ((k, &v), &m) in k.iter_mut().zip(block::<T, N>(cell, ch)).zip(best) {
                    *k = if v == m { pos } else { *k };
                }
            }
            won[ch..ch + N].copy_from_slice(&k);
        });
    }
}

/// The second pass of [`pool_image_backward`] for input row `iy`: each cell's gradient, the sum
/// of the gradients `g` (the image's, `(oh, ow, c)`) of the windows that chose it, added in
/// row-major window order from +0, into `out` (`(w, c)`), from the winners of the output rows
/// whose windows cover the row, `winners(oy)` (as [`winners_row`] makes them).
#[inline(always)]
pub(super) fn gather_row<'a, T: WithDType, S: Slot<T>>(
    winners: impl Fn(usize) -> &'a [T],
    g: &[T],
    win: &Window,
    iy: usize,
    out: &mut [S],
) {
    let (c, w, ow) = (win.c, win.w, win.ow());
    let oys = covering(iy, win.stride, win.pad, win.kh, win.oh());
    // The output rows whose windows cover row `iy`: their winners, their gradients and `iy`'s
    // row within their windows.
    let over: Vec<(&[T], &[T], usize)> = oys
        .map(|oy| {
            let ys = window_range(oy, win.stride, win.pad, win.kh, win.h);
            (winners(oy), &g[oy * ow * c..(oy + 1) * ow * c], iy - ys.start)
        })
        .collect();
    // The windows over a cell, in row-major window order: each window's winners, gradients and
    // the cell's position in it as `T`. Made once per cell, outside the channel loop.
    let mut windows: Vec<(&[T], &[T], T)> = Vec::with_capacity(over.len() * win.kw);
    for (ix, dst) in out.chunks_exact_mut(c).enumerate() {
        let oxs = covering(ix, win.stride, win.pad, win.kw, ow);
        windows.clear();
        for &(won_row, g_row, dy) in &over {
            for ox in oxs.clone() {
                let xs = window_range(ox, win.stride, win.pad, win.kw, w);
                let pos = T::from_f64((dy * xs.len() + ix - xs.start) as f64);
                windows.push((&won_row[ox * c..(ox + 1) * c], &g_row[ox * c..(ox + 1) * c], pos));
            }
        }
        channel_blocks!(c, |ch, N| {
            let mut sum = [T::zero(); N];
            for &(won, gs, pos) in &windows {
                let (won, gs) = (block::<T, N>(won, ch), block::<T, N>(gs, ch));
                for ((a, &k), &gv) in sum.iter_mut().zip(won).zip(gs) {
                    *a += if k == pos { gv } else { T::zero() };
                }
            }
            for (d, &a) in dst[ch..ch + N].iter_mut().zip(&sum) {
                d.put(a);
            }
        });
    }
}

/// The outputs whose windows hold input row (or column) `i`: `o·s − p ≤ i < o·s − p + k`.
pub(super) fn covering(i: usize, stride: usize, pad: usize, k: usize, out: usize) -> std::ops::Range<usize> {
    let lo = if i + pad >= k { (i + pad - k) / stride + 1 } else { 0 };
    lo.min(out)..((i + pad) / stride + 1).min(out)
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max-pool2d-nhwc"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), layout.dims());
        let win = self.window(layout)?;
        let out = match storage {
            CpuStorage::F32(d) => CpuStorage::F32(pool_fwd(contiguous(d, layout, "max-pool input")?, &win)),
            CpuStorage::F64(d) => CpuStorage::F64(pool_fwd(contiguous(d, layout, "max-pool input")?, &win)),
            other => candle_core::bail!("max-pool supports f32 and f64, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from((win.batch, win.oh(), win.ow(), win.c))))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?;
        Ok(Some(arg.apply_op3_no_bwd(res, &grad, &MaxPool2dBackward(*self))?))
    }
}

/// The input gradient of [`MaxPool2d`]: `(input, output, output gradient) -> input gradient`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MaxPool2dBackward(pub(crate) MaxPool2d);

impl CustomOp3 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max-pool2d-nhwc-backward"
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
        let win = self.0.window(l1)?;
        let out_dims = [win.batch, win.oh(), win.ow(), win.c];
        if l2.shape().dims() != out_dims || l3.shape().dims() != out_dims {
            candle_core::bail!(
                "max-pool backward: output {:?} and gradient {:?} do not match the output shape {out_dims:?}",
                l2.shape(),
                l3.shape()
            )
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(pool_bwd(
                contiguous(x, l1, "max-pool input")?,
                contiguous(y, l2, "max-pool output")?,
                contiguous(g, l3, "max-pool gradient")?,
                &win,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(pool_bwd(
                contiguous(x, l1, "max-pool input")?,
                contiguous(y, l2, "max-pool output")?,
                contiguous(g, l3, "max-pool gradient")?,
                &win,
            )),
            _ => candle_core::bail!("max-pool backward supports matching f32 or f64 tensors"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// Global average pooling: the mean over height and width.
///
/// # Shapes
/// - `xs`: `(batch, height, width, channels)`
/// - returns `(batch, channels)`
pub fn global_avg_pool(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = xs.dims4()?;
    xs.reshape((b, h * w, c))?.mean(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// An independent max-pool: pad with -inf, gather the k×k strided views, take the max.
    /// candle's own `max` backward sends the gradient to the maximal element.
    fn reference_pool(x: &Tensor, k: usize, s: usize, p: usize) -> candle_core::Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let oh = Window::out_len(h, k, s, p).expect("fits");
        let ow = Window::out_len(w, k, s, p).expect("fits");
        // Pad generously with -inf so every strided view exists.
        let (ph, pw) = (p + (k - 1) + s * oh, p + (k - 1) + s * ow);
        let neg = |hh: usize, ww: usize| Tensor::full(f64::NEG_INFINITY, (b, hh, ww, c), x.device());
        let x = Tensor::cat(&[&neg(h, p)?, x, &neg(h, pw - w)?], 2)?;
        let x = Tensor::cat(&[&neg(p, p + pw)?, &x, &neg(ph - h, p + pw)?], 1)?;
        let mut views = Vec::new();
        for ki in 0..k {
            for kj in 0..k {
                let v = x.narrow(1, ki, s * oh)?.narrow(2, kj, s * ow)?;
                let v = v.reshape((b, oh, s, ow, s, c))?.narrow(2, 0, 1)?.narrow(4, 0, 1)?;
                views.push(v.reshape((b, oh, ow, c))?);
            }
        }
        Tensor::stack(&views, 4)?.max(D::Minus1)
    }

    #[test]
    fn matches_an_independent_formulation_forward_and_backward() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(h, w, c, k, s, p) in &[
            (9, 9, 3, 3, 2, 1),
            (8, 7, 2, 3, 2, 1),
            (6, 6, 4, 2, 2, 0),
            (5, 8, 2, 3, 1, 1),
            (1, 1, 2, 3, 2, 1),
            (9, 9, 25, 3, 2, 1),
        ] {
            let x = Var::randn(0f64, 1., (2, h, w, c), &dev)?;
            let pool = MaxPool2d { kernel: k, stride: s, pad: p };
            let ours = pool.forward(x.as_tensor())?;
            let theirs = reference_pool(x.as_tensor(), k, s, p)?;
            let diff = (&ours - &theirs)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff == 0.0, "forward differs by {diff} for {:?}", (h, w, c, k, s, p));
            let weights = Tensor::randn(0f64, 1., ours.shape(), &dev)?;
            let g1 = (ours * &weights)?.sum_all()?.backward()?;
            let g2 = (theirs * &weights)?.sum_all()?.backward()?;
            let (a, b) = (g1.get(&x).expect("grad"), g2.get(&x).expect("grad"));
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "backward differs by {diff} for {:?}", (h, w, c, k, s, p));
        }
        Ok(())
    }

    /// The portable path (what CUDA runs) against the CPU op, forward and backward, in f32.
    #[test]
    fn portable_path_matches_the_cpu_op() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(h, w, c, k, s, p) in &[
            (9, 9, 3, 3, 2, 1),
            (8, 7, 2, 3, 2, 1),
            (6, 6, 4, 2, 2, 0),
            (5, 8, 2, 3, 1, 1),
            (1, 1, 2, 3, 2, 1),
            (12, 12, 5, 3, 3, 1),
        ] {
            let x = Var::randn(0f32, 1., (2, h, w, c), &dev)?;
            let pool = MaxPool2d { kernel: k, stride: s, pad: p };
            let ours = pool.forward(x.as_tensor())?;
            let portable = pool.forward_portable(x.as_tensor())?;
            assert_eq!(ours.dims(), portable.dims(), "{:?}", (h, w, c, k, s, p));
            let diff = (&ours - &portable)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff == 0.0, "forward differs by {diff} for {:?}", (h, w, c, k, s, p));
            let weights = Tensor::randn(0f32, 1., ours.shape(), &dev)?;
            let g1 = (ours * &weights)?.sum_all()?.backward()?;
            let g2 = (portable * &weights)?.sum_all()?.backward()?;
            let (a, b) = (g1.get(&x).expect("grad"), g2.get(&x).expect("grad"));
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "backward differs by {diff} for {:?}", (h, w, c, k, s, p));
        }
        Ok(())
    }

    /// Half precision takes the portable path and agrees with f32 after rounding.
    #[test]
    fn half_precision_uses_the_portable_path() -> candle_core::Result<()> {
        let x = Tensor::randn(0f32, 1., (2, 9, 9, 3), &Device::Cpu)?;
        let pool = MaxPool2d::d2l_stem();
        let full = pool.forward(&x)?;
        let half = pool.forward(&x.to_dtype(DType::F16)?)?.to_dtype(DType::F32)?;
        let diff = (full - half)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 2e-3, "f16 max-pool differs by {diff}");
        Ok(())
    }

    #[test]
    fn gradient_matches_finite_differences() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1., (1, 6, 6, 2), &dev)?;
        let pool = MaxPool2d::d2l_stem();
        let weights = Tensor::randn(0f64, 1., (1, 3, 3, 2), &dev)?;
        let loss =
            |t: &Tensor| -> candle_core::Result<f64> { (pool.forward(t)? * &weights)?.sum_all()?.to_scalar::<f64>() };
        let grads = (pool.forward(x.as_tensor())? * &weights)?.sum_all()?.backward()?;
        let analytic: Vec<f64> = grads.get(&x).expect("grad").flatten_all()?.to_vec1()?;
        let base: Vec<f64> = x.flatten_all()?.to_vec1()?;
        let eps = 1e-6;
        for i in 0..base.len() {
            let mut plus = base.clone();
            plus[i] += eps;
            let mut minus = base.clone();
            minus[i] -= eps;
            let fp = loss(&Tensor::from_vec(plus, x.shape(), &dev)?)?;
            let fm = loss(&Tensor::from_vec(minus, x.shape(), &dev)?)?;
            let numeric = (fp - fm) / (2.0 * eps);
            assert!((numeric - analytic[i]).abs() < 1e-6, "element {i}: {numeric} vs {}", analytic[i]);
        }
        Ok(())
    }

    /// The backward as a scatter, one scalar window at a time: each window's gradient added to
    /// the first cell equal to its maximum (the first cell when none is, a NaN maximum).
    fn scatter_backward(x: &[f32], maxima: &[f32], g: &[f32], win: &Window) -> Vec<f32> {
        let (c, ow) = (win.c, win.ow());
        let mut dx = vec![0f32; x.len()];
        for n in 0..win.batch {
            let (img, out) = (n * win.h * win.w * c, n * win.oh() * ow * c);
            for oy in 0..win.oh() {
                let ys = window_range(oy, win.stride, win.pad, win.kh, win.h);
                for ox in 0..ow {
                    let xs = window_range(ox, win.stride, win.pad, win.kw, win.w);
                    for ch in 0..c {
                        let at = out + (oy * ow + ox) * c + ch;
                        let cells =
                            ys.clone().flat_map(|iy| xs.clone().map(move |ix| img + (iy * win.w + ix) * c + ch));
                        let cells: Vec<usize> = cells.collect();
                        let to = cells.iter().copied().find(|&i| x[i] == maxima[at]).unwrap_or(cells[0]);
                        dx[to] += g[at];
                    }
                }
            }
        }
        dx
    }

    /// Ties (small integers), NaN cells, and cells no window covers (stride above the kernel):
    /// the gathering backward gives a scatter's values bit for bit. Channel counts that take
    /// every block width of the loops (16, 8 and 1 channels: 25, 16, 9, 3).
    #[test]
    fn backward_equals_a_scatter_with_ties_and_nan() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(h, w, c, k, s, p) in &[
            (9, 9, 3, 3, 2, 1),
            (8, 7, 9, 3, 2, 1),
            (6, 6, 4, 2, 2, 0),
            (5, 8, 2, 3, 1, 1),
            (7, 7, 2, 2, 3, 0),
            (9, 9, 25, 3, 2, 1),
            (6, 7, 16, 3, 1, 1),
        ] {
            let ints = Tensor::randn(0f32, 1.5, (2, h, w, c), &dev)?.round()?;
            let mut values: Vec<f32> = ints.flatten_all()?.to_vec1()?;
            for i in (0..values.len()).step_by(7) {
                values[i] = f32::NAN;
            }
            let x = Tensor::from_vec(values.clone(), (2, h, w, c), &dev)?;
            let pool = MaxPool2d { kernel: k, stride: s, pad: p };
            let y = pool.forward(&x)?;
            let g = Tensor::randn(0f32, 1., y.shape(), &dev)?;
            let dx = pool_bwd(
                &values,
                &y.flatten_all()?.to_vec1()?,
                &g.flatten_all()?.to_vec1()?,
                &pool.window(x.layout())?,
            );
            let win = pool.window(x.layout())?;
            let want = scatter_backward(&values, &y.flatten_all()?.to_vec1()?, &g.flatten_all()?.to_vec1()?, &win);
            let (got, want): (Vec<u32>, Vec<u32>) =
                (dx.iter().map(|v| v.to_bits()).collect(), want.iter().map(|v| v.to_bits()).collect());
            assert_eq!(got, want, "{:?}", (h, w, c, k, s, p));
        }
        Ok(())
    }

    #[test]
    fn ties_go_to_the_first_cell() -> candle_core::Result<()> {
        let x = Var::ones((1, 2, 2, 1), candle_core::DType::F32, &Device::Cpu)?;
        let pool = MaxPool2d { kernel: 2, stride: 2, pad: 0 };
        let g = pool.forward(x.as_tensor())?.sum_all()?.backward()?;
        let dx: Vec<f32> = g.get(&x).expect("grad").flatten_all()?.to_vec1()?;
        assert_eq!(dx, vec![1.0, 0.0, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn global_average_pool_is_the_spatial_mean() -> candle_core::Result<()> {
        let x = Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((2, 2, 2, 2))?;
        let y: Vec<Vec<f32>> = global_avg_pool(&x)?.to_vec2()?;
        assert_eq!(y, vec![vec![3.0, 4.0], vec![11.0, 12.0]]);
        Ok(())
    }
}
