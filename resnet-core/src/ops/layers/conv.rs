//! The 2-D convolution layer over channels-last tensors, with PyTorch-layout weights.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops::conv::dispatch::{ConvAlgorithm, Im2colConv};
use crate::ops::conv::im2col::im2col_portable;
use crate::ops::cudnn::{self, GpuOps};
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::tape;

/// A convolution's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Side of the square kernel.
    pub kernel_size: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

/// A convolution with bias (PyTorch's default), weights stored as PyTorch's
/// `(out_channels, in_channels, kernel_size, kernel_size)` so checkpoints interoperate. Which
/// algorithm computes it is a runtime setting ([`Conv2d::set_algorithm`]), Winograd by default;
/// on CUDA, [`Conv2d::set_gpu_ops`] chooses between candle's ops and cuDNN.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    cfg: Conv2dConfig,
    algorithm: ConvAlgorithm,
    gpu_ops: GpuOps,
}

impl Conv2d {
    /// Creates the layer's `weight` and `bias` under `vb`.
    pub fn new(cfg: Conv2dConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let k = cfg.kernel_size;
        let fan_in = (cfg.in_channels * k * k) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vb.get_with_hints(
            (cfg.out_channels, cfg.in_channels, k, k),
            "weight",
            Init::Uniform { lo: -bound, up: bound },
        )?;
        let bias = vb.get_with_hints(cfg.out_channels, "bias", Init::Uniform { lo: -bound, up: bound })?;
        Ok(Self { weight, bias, cfg, algorithm: ConvAlgorithm::default(), gpu_ops: GpuOps::default() })
    }

    /// Chooses the kernels later forward passes use on a CUDA device.
    pub fn set_gpu_ops(&mut self, ops: GpuOps) {
        self.gpu_ops = ops;
    }

    /// Chooses the algorithm for later forward passes; results agree to float rounding.
    pub fn set_algorithm(&mut self, algorithm: ConvAlgorithm) {
        self.algorithm = algorithm;
    }

    /// The algorithm forward passes use.
    #[cfg(test)]
    pub fn algorithm(&self) -> ConvAlgorithm {
        self.algorithm
    }

    /// The weight, `(out_channels, in_channels, kernel_size, kernel_size)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `(out_channels,)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The layer's hyper-parameters.
    pub(crate) fn config(&self) -> Conv2dConfig {
        self.cfg
    }

    /// The values per output channel (`batch · out_h · out_w`) where the shapes and dtypes let a
    /// fused op with the BatchNorm of parameters `(γ, β)` after this convolution run; `None`
    /// elsewhere, where the layers one after the other give the error that names what is wrong.
    pub(super) fn fused_rows(
        &self,
        xs: &Tensor,
        (gamma, beta): (&Tensor, &Tensor),
    ) -> candle_core::Result<Option<usize>> {
        let cfg = self.config();
        if xs.rank() != 4 || xs.dim(3)? != cfg.in_channels || gamma.dim(0)? != cfg.out_channels {
            return Ok(None);
        }
        let same = |t: &Tensor| t.dtype() == xs.dtype();
        if !(same(self.weight()) && same(self.bias()) && same(gamma) && same(beta)) {
            return Ok(None);
        }
        let (batch, h, w, _) = xs.dims4()?;
        let out_len = |len| Window::out_len(len, cfg.kernel_size, cfg.stride, cfg.padding);
        Ok(match (out_len(h), out_len(w)) {
            (Some(oh), Some(ow)) if batch * oh * ow >= 2 => Some(batch * oh * ow),
            _ => None,
        })
    }

    /// The CPU custom op [`Module::forward`] runs on `xs`, where it runs one (f32 or f64 on the
    /// CPU, with the im2col or Winograd algorithm), so that a caller can fuse it with what follows.
    pub(super) fn cpu_op(&self, xs: &Tensor) -> Option<Im2colConv> {
        let fast = matches!(self.algorithm, ConvAlgorithm::Im2col | ConvAlgorithm::Winograd);
        let cpu_float = xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64);
        let Conv2dConfig { kernel_size, stride, padding, .. } = self.cfg;
        (fast && cpu_float)
            .then(|| Im2colConv::new((kernel_size, stride, padding), self.algorithm == ConvAlgorithm::Winograd))
    }

    /// The im2col convolution from candle's differentiable ops (patches, then one matrix
    /// product), in the input's dtype: what CUDA and mixed precision run, so the products go to
    /// cuBLAS. [`Module::forward`] takes this path off the CPU and for dtypes other than f32/f64.
    ///
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, out_h, out_w, out_channels)`
    pub fn forward_portable(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let Conv2dConfig { in_channels, out_channels, kernel_size: k, stride, padding } = self.cfg;
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
    /// The training forward ([`Conv2d::forward_t`] with `train`).
    ///
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, out_h, out_w, out_channels)`
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_t(xs, true)
    }
}

impl Conv2d {
    /// The forward for training (`train`) or evaluation. The two agree to float rounding; on
    /// the CPU an evaluation forward may use Winograd F(4×4, 3×3), which a training forward
    /// leaves to the gradients (its rounding would move micro-batch updates apart).
    ///
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, out_h, out_w, out_channels)`
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let Conv2dConfig { in_channels, out_channels, stride, padding, .. } = self.cfg;
        let c = xs.dim(3)?;
        if c != in_channels {
            candle_core::bail!("conv2d expects {in_channels} input channels, got {c}")
        }
        if self.gpu_ops == GpuOps::Cudnn && xs.device().is_cuda() {
            // cuDNN takes the weight as (out, kh, kw, in) to match the channels-last input; the
            // permute is a graph node, so the weight's gradient arrives in PyTorch's layout.
            let weight = self.weight.to_dtype(xs.dtype())?.permute((0, 2, 3, 1))?;
            let ys = cudnn::conv2d(xs, &weight, stride, padding)?;
            return ys.broadcast_add(&self.bias.to_dtype(xs.dtype())?);
        }
        if let Some(op) = self.cpu_op(xs) {
            // The weight goes in as stored, (out, in, kh, kw); the op reorders it to match the
            // patches' (kh, kw, c) itself, so no permute-and-copy nodes join the graph (their
            // backward would be two more passes over every weight per step).
            let op = if train { op } else { op.for_evaluation() };
            return tape::op3(&xs.contiguous()?, &self.weight, &self.bias, op);
        }
        match self.algorithm {
            ConvAlgorithm::Im2col | ConvAlgorithm::Winograd => self.forward_portable(xs),
            ConvAlgorithm::Candle => {
                let nchw = xs.permute((0, 3, 1, 2))?;
                let ys = nchw.conv2d(&self.weight.to_dtype(xs.dtype())?, padding, stride, 1, 1)?;
                let bias = self.bias.to_dtype(xs.dtype())?.reshape((1, out_channels, 1, 1))?;
                let ys = ys.broadcast_add(&bias)?;
                ys.permute((0, 2, 3, 1))?.contiguous()
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    /// Max relative error `|a - b| / max(|b|, 1)`, elementwise.
    pub(in crate::ops::layers) fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
        let scale = b.abs()?.maximum(1.0)?;
        ((a - b)?.abs()? / scale)?.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    /// An independent convolution: zero-pad, take the k×k strided views, and sum one matrix
    /// product per kernel offset. Only stock candle ops, so its autograd is candle's.
    fn reference_conv(x: &Tensor, conv: &Conv2d) -> candle_core::Result<Tensor> {
        let Conv2dConfig { kernel_size: k, stride: s, padding: p, out_channels, .. } = conv.config();
        let (b, h, w, c) = x.dims4()?;
        let oh = Window::out_len(h, k, s, p).expect("fits");
        let ow = Window::out_len(w, k, s, p).expect("fits");
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
            // Few output pixels per output channel: the weight gradient from the whole patch matrix.
            (1, 3, 3, 2, 12, 3, 2, 1),
            // Images every window covers whole: one dense product each way, stride 1 and 2.
            (3, 1, 2, 3, 4, 3, 1, 1),
            (2, 2, 2, 5, 3, 3, 2, 1),
            // Left and right edge classes (part of each kernel row) beside whole-row ones.
            (2, 3, 5, 3, 4, 3, 1, 1),
            // Padding wider than the kernel: the outer outputs see padding alone (the bias).
            (2, 1, 2, 2, 3, 3, 1, 3),
        ];
        for &(b, h, w, cin, cout, k, s, p) in &cases {
            let case = (b, h, w, cin, cout, k, s, p);
            let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride: s, padding: p };
            for dtype in [DType::F64, DType::F32] {
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, dtype, &dev);
                let mut ours = Conv2d::new(cfg, vb)?;
                ours.set_algorithm(ConvAlgorithm::Im2col);
                // Winograd where it applies (3×3/1/1), im2col elsewhere: same checks.
                let wino = Conv2d { algorithm: ConvAlgorithm::Winograd, ..ours.clone() };
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
                // The evaluation forward (F(4×4) where it has fewer products) too.
                let wino_y = wino.forward(x.as_tensor())?;
                let wino_eval_y = wino.forward_t(x.as_tensor(), false)?;
                let portable_y = ours.forward_portable(x.as_tensor())?;
                for (label, y) in [("winograd", wino_y), ("winograd evaluation", wino_eval_y), ("portable", portable_y)]
                {
                    let e = rel_err(&y, &reference_conv(x.as_tensor(), &ours)?)?;
                    assert!(e < 1e-4, "{label} forward rel err {e} for {case:?}");
                    let g = (y * &probe)?.sum_all()?.backward()?;
                    for (name, t) in [("input", x.as_tensor()), ("weight", ours.weight()), ("bias", ours.bias())] {
                        let e = rel_err(g.get(t).expect("grad"), g2.get(t).expect("grad"))?;
                        assert!(e < 1e-4, "{label} {name} grad rel err {e} for {case:?} in {dtype:?}");
                    }
                }
                // candle's stock kernel agrees on the forward everywhere.
                let stock = Conv2d { algorithm: ConvAlgorithm::Candle, ..ours.clone() };
                let e = rel_err(&ours.forward(x.as_tensor())?, &stock.forward(x.as_tensor())?)?;
                assert!(e < 1e-4, "stock forward rel err {e} for {case:?}");
            }
        }
        Ok(())
    }

    /// An evaluation forward runs F(4×4) on a 12×12 image, F(2×2) on an 8×8 one and F(3×3) on
    /// 6×6 and 3×3 ones ([`Tile::choose_for_evaluation`](crate::ops::conv::winograd::Tile::choose_for_evaluation)),
    /// a training forward F(2×2) from 4×4 up and the in-bounds taps below: each bit for bit the
    /// kernel it names; the evaluation's tile and the training forward differ (in f32) by
    /// rounding only: at most 3e-5 of max(|y|, 1) per output. The inputs are unseeded, and
    /// F(4×4)'s transforms (points ±2, ±½) scale the rounding of 16 channels' products by their
    /// coefficients: the bound leaves room for that spread, while a wrong transform or tile gives
    /// errors of the outputs' own size.
    #[test]
    fn evaluation_forward_takes_the_larger_tiles() -> candle_core::Result<()> {
        use crate::ops::conv::taps;
        use crate::ops::conv::winograd::{self, Tile};
        use crate::ops::plumbing::geometry::Window;
        let dev = Device::Cpu;
        let (b, cin, cout) = (2, 16, 8);
        let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: 3, stride: 1, padding: 1 };
        let conv = Conv2d::new(cfg, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev))?;
        assert_eq!(conv.algorithm(), ConvAlgorithm::Winograd);
        let wv: Vec<f32> = conv.weight().flatten_all()?.to_vec1()?;
        let bv: Vec<f32> = conv.bias().to_vec1()?;
        for (side, grad_tile, eval_tile) in
            [(12, Tile::F4, Tile::F4), (8, Tile::F4, Tile::F2), (6, Tile::F3, Tile::F3), (3, Tile::F3, Tile::F3)]
        {
            assert_eq!(Tile::choose(side, side), grad_tile, "the gradients' tile at {side} px");
            let x = Tensor::randn(0f32, 1., (b, side, side, cin), &dev)?;
            let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let kernel = |tile| {
                let epi = winograd::Epilogue { bias: Some(&bv[..]), ..winograd::Epilogue::none() };
                winograd::conv3x3(&xv, winograd::Filters::Stored(&wv), epi, (b, side, side, cin), cout, tile)
            };
            let eval: Vec<f32> = conv.forward_t(&x, false)?.flatten_all()?.to_vec1()?;
            let train: Vec<f32> = conv.forward_t(&x, true)?.flatten_all()?.to_vec1()?;
            assert_eq!(eval, kernel(eval_tile), "the evaluation forward at {side} px is not {eval_tile:?}");
            let want_train = if side >= 4 {
                kernel(Tile::F2)
            } else {
                let win = Window { batch: b, h: side, w: side, c: cin, kh: 3, kw: 3, stride: 1, pad: 1 };
                taps::conv(&xv, &wv, &bv, &win)
            };
            assert_eq!(train, want_train, "the training forward at {side} px is not F(2×2) or the taps");
            let other = if eval_tile == Tile::F2 { kernel(Tile::F4) } else { eval };
            assert_ne!(
                other, train,
                "the two forwards rounded identically at {side} px: the test cannot tell them apart"
            );
            let gap = other.iter().zip(&train).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
            assert!(gap < 3e-5, "the two forwards differ by {gap} relative at {side} px");
        }
        Ok(())
    }
}
