//! 2-D convolution over channels-last tensors with PyTorch-layout weights.

use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

use super::im2col::Im2col;
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
}

impl Module for Conv2d {
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, out_h, out_w, out_channels)`
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let Conv2dConfig { in_channels, out_channels, kernel: k, stride, padding } = self.cfg;
        let (b, h, w, c) = xs.dims4()?;
        if c != in_channels {
            candle_core::bail!("conv2d expects {in_channels} input channels, got {c}")
        }
        match self.kernel {
            ConvKernel::Im2col => {
                let (oh, ow) = match (
                    super::geometry::Window::out_len(h, k, stride, padding),
                    super::geometry::Window::out_len(w, k, stride, padding),
                ) {
                    (Some(oh), Some(ow)) => (oh, ow),
                    _ => candle_core::bail!("conv2d: a {k}x{k} kernel does not fit a {h}x{w} input"),
                };
                let cols = if k == 1 && stride == 1 && padding == 0 {
                    xs.reshape((b * h * w, c))?
                } else {
                    xs.contiguous()?.apply_op1(Im2col { kh: k, kw: k, stride, pad: padding })?
                };
                // Patches are in (kh, kw, c) order, so the weight goes to (out, kh, kw, in).
                let w_mat = self.weight.permute((0, 2, 3, 1))?.reshape((out_channels, k * k * c))?;
                let ys = super::elementwise::bias_add(&cols.matmul(&w_mat.t()?)?, &self.bias)?;
                ys.reshape((b, oh, ow, out_channels))
            }
            ConvKernel::Candle => {
                let nchw = xs.permute((0, 3, 1, 2))?;
                let ys = nchw.conv2d(&self.weight, padding, stride, 1, 1)?;
                let ys = ys.broadcast_add(&self.bias.reshape((1, out_channels, 1, 1))?)?;
                ys.permute((0, 2, 3, 1))?.contiguous()
            }
        }
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
            (2, 6, 6, 4, 3, 1, 2, 0),
            (1, 5, 5, 3, 2, 1, 1, 0),
            (2, 5, 4, 2, 3, 3, 3, 2),
            (2, 7, 7, 3, 3, 3, 2, 1),
        ];
        for &(b, h, w, cin, cout, k, s, p) in &cases {
            let case = (b, h, w, cin, cout, k, s, p);
            let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel: k, stride: s, padding: p };
            for dtype in [DType::F64, DType::F32] {
                let map = VarMap::new();
                let vb = VarBuilder::from_varmap(&map, dtype, &dev);
                let ours = Conv2d::new(cfg, ConvKernel::Im2col, vb)?;
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
                // candle's stock kernel agrees on the forward everywhere.
                let stock = Conv2d { kernel: ConvKernel::Candle, ..ours.clone() };
                let e = rel_err(&ours.forward(x.as_tensor())?, &stock.forward(x.as_tensor())?)?;
                assert!(e < 1e-4, "stock forward rel err {e} for {case:?}");
            }
        }
        Ok(())
    }
}
