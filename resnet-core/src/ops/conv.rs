//! 2-D convolution over channels-last tensors with PyTorch-layout weights.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Shape, Tensor, WithDType,
};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use super::elementwise::column_sums_tensor;
use super::geometry::Window;
use super::im2col::{im2col_slice, Col2im, Im2col};
use super::matmul::{matmul_into, MatMul};
use super::scratch;
use super::storage::contiguous;
use super::{direct, taps, winograd};
use crate::config::ConvKernel;

/// A convolution's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

/// A convolution with bias (PyTorch's default), weights stored as PyTorch's
/// `(out_channels, in_channels, kernel, kernel)` so checkpoints interoperate.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    cfg: Conv2dConfig,
    kernel: ConvKernel,
}

impl Conv2d {
    /// Creates the layer's `weight` and `bias` under `vb`.
    pub fn new(cfg: Conv2dConfig, kernel: ConvKernel, vb: VarBuilder) -> candle_core::Result<Self> {
        let fan_in = (cfg.in_channels * cfg.kernel * cfg.kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vb.get_with_hints(
            (cfg.out_channels, cfg.in_channels, cfg.kernel, cfg.kernel),
            "weight",
            Init::Uniform { lo: -bound, up: bound },
        )?;
        let bias = vb.get_with_hints(cfg.out_channels, "bias", Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight, bias, cfg, kernel })
    }

    /// The weight, `(out_channels, in_channels, kernel, kernel)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(out_channels,)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The layer's hyper-parameters.
    pub fn config(&self) -> Conv2dConfig {
        self.cfg
    }

    /// The im2col convolution from candle's differentiable ops (patches, then one matrix
    /// product), in the input's dtype: what CUDA and mixed precision run, so the products go to
    /// cuBLAS. [`Module::forward`] takes this path off the CPU and for dtypes other than f32/f64.
    ///
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, out_h, out_w, out_channels)`
    pub fn forward_portable(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let Conv2dConfig { in_channels, out_channels, kernel: k, stride, padding } = self.cfg;
        let (b, h, w, c) = xs.dims4()?;
        if c != in_channels {
            candle_core::bail!("conv2d expects {in_channels} input channels, got {c}")
        }
        let (oh, ow) = match (Window::out_len(h, k, stride, padding), Window::out_len(w, k, stride, padding)) {
            (Some(oh), Some(ow)) => (oh, ow),
            _ => candle_core::bail!("conv2d: a {k}x{k} kernel does not fit a {h}x{w} input"),
        };
        let cols = im2col_portable(xs, k, stride, padding, (oh, ow))?;
        let weight = self.weight.to_dtype(xs.dtype())?;
        let w_mat = weight.permute((0, 2, 3, 1))?.reshape((out_channels, k * k * c))?;
        let ys = cols.matmul(&w_mat.t()?)?.broadcast_add(&self.bias.to_dtype(xs.dtype())?)?;
        ys.reshape((b, oh, ow, out_channels))
    }
}

impl Module for Conv2d {
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, out_h, out_w, out_channels)`
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let Conv2dConfig { in_channels, out_channels, kernel: k, stride, padding } = self.cfg;
        let c = xs.dim(3)?;
        if c != in_channels {
            candle_core::bail!("conv2d expects {in_channels} input channels, got {c}")
        }
        match self.kernel {
            ConvKernel::Im2col | ConvKernel::Winograd
                if xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64) =>
            {
                // The weight goes in as stored, (out, in, kh, kw); the op reorders it to match
                // the patches' (kh, kw, c) itself, so no permute-and-copy nodes join the graph
                // (their backward cost two more passes over every weight per step).
                let winograd = self.kernel == ConvKernel::Winograd;
                let op = Im2colConv { kernel: k, stride, pad: padding, winograd };
                xs.contiguous()?.apply_op3(&self.weight, &self.bias, op)
            }
            ConvKernel::Im2col | ConvKernel::Winograd => self.forward_portable(xs),
            ConvKernel::Candle => {
                let nchw = xs.permute((0, 3, 1, 2))?;
                let ys = nchw.conv2d(&self.weight.to_dtype(xs.dtype())?, padding, stride, 1, 1)?;
                let bias = self.bias.to_dtype(xs.dtype())?.reshape((1, out_channels, 1, 1))?;
                let ys = ys.broadcast_add(&bias)?;
                ys.permute((0, 2, 3, 1))?.contiguous()
            }
        }
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

/// Convolution of channels-last `x` with an `(out, kh, kw, in)` weight and a bias, as one op:
/// forward is im2col + one matrix product over the whole batch; backward recomputes the patches
/// rather than keeping them, and computes the weight gradient as one product (`dYᵀ · cols`), the
/// input gradient as one product plus col2im (skipped when the input needs no gradient, as for
/// the images entering the stem), and the bias gradient as column sums.
#[derive(Debug, Clone, Copy)]
struct Im2colConv {
    kernel: usize,
    stride: usize,
    pad: usize,
    /// Use Winograd where it applies (3×3, stride 1, padding 1, images of at least 4×4).
    winograd: bool,
}

impl Im2colConv {
    fn window(&self, x: &Layout) -> candle_core::Result<Window> {
        let (batch, h, w, c) = x.shape().dims4()?;
        let win = Window { batch, h, w, c, kh: self.kernel, kw: self.kernel, stride: self.stride, pad: self.pad };
        win.check("conv2d")?;
        Ok(win)
    }

    fn pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.pad == 0
    }

    /// The fast algorithm for this shape, if any: direct accumulation for one input channel,
    /// Winograd where it applies, else the in-bounds taps where padding is a large share of
    /// im2col's work.
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
    /// Winograd F(2×2, 3×3) or F(4×4, 3×3) ([`winograd`]).
    Winograd(winograd::Tile),
    /// One product per class of in-bounds kernel taps ([`taps`]).
    Taps,
    /// Direct accumulation for single-channel inputs ([`direct`]).
    Direct,
}

/// `y (rows, out) = cols (rows, k) · wᵀ + bias`, with `w` as `(out, k)` row-major.
fn conv_forward<T: WithDType + 'static>(x: &[T], w: &[T], bias: &[T], win: &Window, pointwise: bool) -> Vec<T> {
    let rows = win.batch * win.oh() * win.ow();
    let k = win.patch_len();
    let out = bias.len();
    // Not from the scratch pool: the stem's patches at 96 px (58 MB) would stay held there.
    let owned = (!pointwise).then(|| {
        let mut buf = scratch::zeroed(rows * k);
        im2col_slice(x, win, &mut buf);
        buf
    });
    let cols: &[T] = owned.as_deref().unwrap_or(x);
    let mut y = Vec::with_capacity(rows * out);
    for _ in 0..rows {
        y.extend_from_slice(bias);
    }
    matmul_into((rows, out, k), cols, false, w, true, &mut y, true);
    y
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
        let _span = crate::profile::span(self.name(), l1.dims());
        let win = self.window(l1)?;
        let out = l3.shape().elem_count();
        if l2.shape().dims() != [out, win.c, win.kh, win.kw] {
            candle_core::bail!(
                "conv2d: weight {:?} does not fit ({out}, {}, {}, {})",
                l2.shape(),
                win.c,
                win.kh,
                win.kw
            )
        }
        let pw = self.pointwise();
        if let Some(algo) = self.algo(&win) {
            fn run<T: WithDType>(algo: Algo, x: &[T], w_oihw: &[T], b: &[T], win: &Window) -> Vec<T> {
                let ohwi = || oihw_to_ohwi(w_oihw, b.len(), win.c, win.kh * win.kw);
                match algo {
                    // The forward stays on F(2×2): F(4×4)'s larger transform constants round
                    // enough that the same images gave updates differing by 4e-3 of the update
                    // between a whole batch and two micro-batches (the products' blocking
                    // depends on the batch size), where F(2×2) keeps them within 1e-4. The
                    // gradients take the tile `Tile::choose` picks.
                    Algo::Winograd(_) => {
                        let dims = (win.batch, win.h, win.w, win.c);
                        winograd::conv3x3(x, &ohwi(), Some(b), dims, b.len(), winograd::Tile::F2)
                    }
                    // Reads the stored layout itself (often only a few of the taps).
                    Algo::Taps => taps::conv(x, w_oihw, b, win),
                    // Patches of one channel are cheap to make and the product runs at the
                    // matrix kernels' speed: faster than the direct loop for the forward.
                    Algo::Direct => conv_forward(x, &ohwi(), b, win, false),
                }
            }
            let y = match (s1, s2, s3) {
                (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(run(
                    algo,
                    contiguous(x, l1, "conv2d input")?,
                    contiguous(w, l2, "conv2d weight")?,
                    contiguous(b, l3, "conv2d bias")?,
                    &win,
                )),
                (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(run(
                    algo,
                    contiguous(x, l1, "conv2d input")?,
                    contiguous(w, l2, "conv2d weight")?,
                    contiguous(b, l3, "conv2d bias")?,
                    &win,
                )),
                _ => candle_core::bail!("conv2d supports matching f32 or f64 tensors, got {:?}", s1.dtype()),
            };
            return Ok((y, Shape::from((win.batch, win.oh(), win.ow(), out))));
        }
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(conv_forward(
                contiguous(x, l1, "conv2d input")?,
                &oihw_to_ohwi(contiguous(w, l2, "conv2d weight")?, out, win.c, win.kh * win.kw),
                contiguous(b, l3, "conv2d bias")?,
                &win,
                pw,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(conv_forward(
                contiguous(x, l1, "conv2d input")?,
                &oihw_to_ohwi(contiguous(w, l2, "conv2d weight")?, out, win.c, win.kh * win.kw),
                contiguous(b, l3, "conv2d bias")?,
                &win,
                pw,
            )),
            _ => candle_core::bail!("conv2d supports matching f32 or f64 tensors, got {:?}", s1.dtype()),
        };
        Ok((y, Shape::from((win.batch, win.oh(), win.ow(), out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let win = self.window(x.layout())?;
        let (out, k) = (bias.elem_count(), win.patch_len());
        let rows = win.batch * win.oh() * win.ow();
        let dy = grad.contiguous()?.reshape((rows, out))?;
        let algo = self.algo(&win);
        let dy4 = dy.reshape((win.batch, win.oh(), win.ow(), out))?;
        let dw = if let Some(algo) = algo {
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
        let db = column_sums_tensor(&dy)?;
        let dx = if let (true, Some(algo)) = (x.track_op(), algo) {
            Some(dy4.apply_op2_no_bwd(w, &ConvGrad { wrt: Wrt::Input, algo, win, cout: out })?)
        } else if x.track_op() {
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
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `(out, in, kh, kw)` (PyTorch's layout, the one stored) → `(out, kh, kw, in)` (the kernels'),
/// borrowed when there is one tap.
fn oihw_to_ohwi<T: WithDType>(w: &[T], out: usize, cin: usize, taps: usize) -> std::borrow::Cow<'_, [T]> {
    swap_inner(w, out, cin, taps)
}

/// `(out, kh, kw, in)` → `(out, in, kh, kw)`, the inverse of [`oihw_to_ohwi`].
fn ohwi_to_oihw<T: WithDType>(w: &[T], out: usize, cin: usize, taps: usize) -> std::borrow::Cow<'_, [T]> {
    swap_inner(w, out, taps, cin)
}

/// Each of the `out` blocks of `w`, an `(a, b)` matrix, transposed to `(b, a)`, in parallel
/// over the blocks; borrowed when either side is 1 (nothing moves).
pub(super) fn swap_inner<T: WithDType>(w: &[T], out: usize, a: usize, b: usize) -> std::borrow::Cow<'_, [T]> {
    if a == 1 || b == 1 {
        return std::borrow::Cow::Borrowed(w);
    }
    let mut t = vec![T::zero(); out * a * b];
    t.par_chunks_mut(a * b).zip(w.par_chunks(a * b)).for_each(|(dst, src)| {
        for (i, row) in src.chunks_exact(b).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                dst[j * a + i] = v;
            }
        }
    });
    std::borrow::Cow::Owned(t)
}

/// The gradients of a convolution that runs through a fast [`Algo`], as no-grad ops:
/// - `Wrt::Input`: `(dy (b, oh, ow, out), w (out, in, kh, kw)) -> dx (b, h, w, in)`;
/// - `Wrt::Weight`: `(x (b, h, w, in), dy (b, oh, ow, out)) -> dW (out, in, kh, kw)`.
///
/// Winograd's input gradient is itself a 3×3 convolution with the filters flipped.
#[derive(Debug, Clone, Copy)]
struct ConvGrad {
    wrt: Wrt,
    algo: Algo,
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
        // The Winograd and direct kernels take `(out, kh, kw, in)`; the taps read and write the
        // stored layout themselves.
        let ohwi = || oihw_to_ohwi(b, cout, win.c, taps);
        let oihw = |dw: Vec<T>| ohwi_to_oihw(&dw, cout, win.c, taps).into_owned();
        match (self.algo, self.wrt) {
            (Algo::Winograd(tile), Wrt::Input) => {
                let (n, h, w, _) = dims;
                let flipped = winograd::flip_filters(&ohwi(), win.c, cout);
                winograd::conv3x3(a, &flipped, None, (n, h, w, cout), win.c, tile)
            }
            (Algo::Winograd(tile), Wrt::Weight) => oihw(winograd::conv3x3_weight_grad(a, b, dims, cout, tile)),
            (Algo::Taps, Wrt::Input) => taps::input_grad(a, b, win, cout),
            (Algo::Taps, Wrt::Weight) => taps::weight_grad(a, b, win, cout),
            (Algo::Direct, Wrt::Input) => direct::input_grad(a, &ohwi(), win, cout),
            (Algo::Direct, Wrt::Weight) => oihw(direct::weight_grad(a, b, win, cout)),
        }
    }
}

impl CustomOp2 for ConvGrad {
    fn name(&self) -> &'static str {
        match (self.algo, self.wrt) {
            (Algo::Winograd(_), Wrt::Input) => "conv2d-winograd-input-grad",
            (Algo::Winograd(_), Wrt::Weight) => "conv2d-winograd-weight-grad",
            (Algo::Taps, Wrt::Input) => "conv2d-taps-input-grad",
            (Algo::Taps, Wrt::Weight) => "conv2d-taps-weight-grad",
            (Algo::Direct, Wrt::Input) => "conv2d-direct-input-grad",
            (Algo::Direct, Wrt::Weight) => "conv2d-direct-weight-grad",
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
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    /// Max relative error `|a - b| / max(|b|, 1)`, elementwise.
    fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
        let scale = b.abs()?.maximum(1.0)?;
        ((a - b)?.abs()? / scale)?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    /// An independent convolution: zero-pad, take the k×k strided views, and sum one matrix
    /// product per kernel offset. Only stock candle ops, so its autograd is candle's.
    fn reference_conv(x: &Tensor, conv: &Conv2d) -> candle_core::Result<Tensor> {
        let Conv2dConfig { kernel: k, stride: s, padding: p, out_channels, .. } = conv.config();
        let (b, h, w, c) = x.dims4()?;
        let oh = super::super::geometry::Window::out_len(h, k, s, p).expect("fits");
        let ow = super::super::geometry::Window::out_len(w, k, s, p).expect("fits");
        let (ph, pw) = (p + k + s * oh, p + k + s * ow);
        let zeros = |hh: usize, ww: usize| Tensor::zeros((b, hh, ww, c), x.dtype(), x.device());
        let x = Tensor::cat(&[&zeros(h, p)?, x, &zeros(h, pw - w)?], 2)?;
        let x = Tensor::cat(&[&zeros(p, p + pw)?, &x, &zeros(ph - h, p + pw)?], 1)?;
        let mut acc: Option<Tensor> = None;
        for ki in 0..k {
            for kj in 0..k {
                let v = x.narrow(1, ki, s * oh)?.narrow(2, kj, s * ow)?;
                let v = v.reshape((b, oh, s, ow, s, c))?.narrow(2, 0, 1)?.narrow(4, 0, 1)?;
                let v = v.reshape((b * oh * ow, c))?;
                let wk = conv.weight().narrow(2, ki, 1)?.narrow(3, kj, 1)?.reshape((out_channels, c))?;
                let term = v.matmul(&wk.t()?)?;
                acc = Some(match acc {
                    Some(a) => (a + term)?,
                    None => term,
                });
            }
        }
        acc.expect("k >= 1").broadcast_add(conv.bias())?.reshape((b, oh, ow, out_channels))
    }

    /// Our im2col convolution against the independent formulation in float64 and against
    /// candle's stock conv2d, forward and all three gradients, on a sweep of shapes, strides and
    /// paddings (including the stem's 7×7/2/3 and the 1×1/2 shortcut). Tolerance: 1e-4 relative.
    #[test]
    fn im2col_matches_references_forward_and_backward() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cases = [
            (2, 9, 9, 3, 4, 3, 1, 1),
            (3, 8, 7, 2, 5, 3, 2, 1),
            (2, 12, 12, 1, 6, 7, 2, 3),
            (2, 9, 8, 1, 5, 3, 1, 1),
            (2, 6, 6, 4, 3, 1, 2, 0),
            (1, 5, 5, 3, 2, 1, 1, 0),
            (2, 5, 4, 2, 3, 3, 3, 2),
            (2, 7, 7, 3, 3, 3, 2, 1),
            (2, 4, 4, 5, 6, 3, 1, 1),
            (1, 10, 7, 8, 4, 3, 1, 1),
            // Small images, where the in-bounds-taps path takes over: 1×1, 2×2, 3×3, strided.
            (3, 1, 1, 4, 5, 3, 1, 1),
            (2, 2, 2, 3, 4, 3, 1, 1),
            (2, 3, 2, 3, 2, 3, 2, 1),
            (2, 3, 3, 4, 3, 3, 1, 1),
            // Left and right edge classes (part of each kernel row) beside whole-row ones.
            (2, 3, 5, 3, 4, 3, 1, 1),
        ];
        for &(b, h, w, cin, cout, k, s, p) in &cases {
            let case = (b, h, w, cin, cout, k, s, p);
            let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel: k, stride: s, padding: p };
            for dtype in [DType::F64, DType::F32] {
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, dtype, &dev);
                let ours = Conv2d::new(cfg, ConvKernel::Im2col, vb)?;
                // Winograd where it applies (3×3/1/1), im2col elsewhere: same checks.
                let wino = Conv2d { kernel: ConvKernel::Winograd, ..ours.clone() };
                let x = Var::randn(0f32, 1., (b, h, w, cin), &dev)?;
                let x = Var::from_tensor(&x.to_dtype(dtype)?)?;
                let y1 = ours.forward(x.as_tensor())?;
                let y2 = reference_conv(x.as_tensor(), &ours)?;
                assert_eq!(y1.dims(), y2.dims());
                let e = rel_err(&y1, &y2)?;
                assert!(e < 1e-4, "forward rel err {e} for {case:?}");
                let probe = Tensor::randn(0f32, 1., y1.shape(), &dev)?.to_dtype(dtype)?;
                let g1 = (y1 * &probe)?.sum_all()?.backward()?;
                let g2 = (y2 * &probe)?.sum_all()?.backward()?;
                for (name, t) in [("input", x.as_tensor()), ("weight", ours.weight()), ("bias", ours.bias())] {
                    let e = rel_err(g1.get(t).expect("grad"), g2.get(t).expect("grad"))?;
                    assert!(e < 1e-4, "{name} grad rel err {e} for {case:?} in {dtype:?}");
                }
                // Winograd or the in-bounds taps (where they apply; im2col otherwise) and the portable path (CUDA,
                // mixed precision) agree on everything too.
                let wino_y = wino.forward(x.as_tensor())?;
                let portable_y = ours.forward_portable(x.as_tensor())?;
                for (label, y) in [("winograd", wino_y), ("portable", portable_y)] {
                    let e = rel_err(&y, &reference_conv(x.as_tensor(), &ours)?)?;
                    assert!(e < 1e-4, "{label} forward rel err {e} for {case:?}");
                    let g = (y * &probe)?.sum_all()?.backward()?;
                    for (name, t) in [("input", x.as_tensor()), ("weight", ours.weight()), ("bias", ours.bias())] {
                        let e = rel_err(g.get(t).expect("grad"), g2.get(t).expect("grad"))?;
                        assert!(e < 1e-4, "{label} {name} grad rel err {e} for {case:?} in {dtype:?}");
                    }
                }
                // candle's stock kernel agrees on the forward everywhere.
                let stock = Conv2d { kernel: ConvKernel::Candle, ..ours.clone() };
                let e = rel_err(&ours.forward(x.as_tensor())?, &stock.forward(x.as_tensor())?)?;
                assert!(e < 1e-4, "stock forward rel err {e} for {case:?}");
            }
        }
        Ok(())
    }
}
