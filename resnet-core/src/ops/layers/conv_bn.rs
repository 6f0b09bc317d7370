//! A convolution followed by training-mode BatchNorm (and ReLU) as one graph node on the CPU.
//!
//! candle's backward starts the gradient of every node's input from a zero tensor and adds the
//! node's contribution to it, on one thread. Between a convolution and its BatchNorm that costs
//! two passes over an activation-sized tensor per layer and step, for a gradient that only the
//! convolution reads. As one op, the BatchNorm's input gradient goes straight into the
//! convolution's backward. The arithmetic is the two ops' own, in the same order, so results are
//! bit-identical to running them one after the other.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Module, Shape, Tensor};

use super::batch_norm::{BatchNorm, FusedBatchNorm};
use super::conv::Conv2d;
use crate::ops::conv::dispatch::Im2colConv;
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::storage::contiguous;

/// `bn(conv(xs))`, then ReLU with `relu`: one node in training on the CPU (f32 or f64, with the
/// im2col or Winograd algorithm), the two layers one after the other everywhere else.
///
/// # Shapes
/// - `xs`: `(batch, height, width, in_channels)`
/// - returns `(batch, out_h, out_w, out_channels)`
pub(crate) fn conv_bn(
    conv: &Conv2d,
    bn: &BatchNorm,
    xs: &Tensor,
    train: bool,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let fused = match (train, conv.cpu_op(xs)) {
        (true, Some(op)) => fused_rows(conv, bn, xs)?.map(|rows| (op, rows)),
        _ => None,
    };
    let Some((op, rows)) = fused else {
        return bn.forward_act(&conv.forward(xs)?, train, relu);
    };
    // γ and β travel with the convolution's bias in one tensor: custom ops take three inputs.
    let packed = Tensor::cat(&[conv.bias(), bn.weight(), bn.bias()], 0)?;
    let channels = conv.config().out_channels;
    bn.train_with(relu, rows, |bn_op| {
        let fused = ConvBatchNorm { conv: op, bn: bn_op, channels, saved: Mutex::new(None) };
        xs.contiguous()?.apply_op3(conv.weight(), &packed, fused)
    })
}

/// The BatchNorm's values per channel (`batch · out_h · out_w`) where the shapes and dtypes let
/// the fused op run; `None` elsewhere, where the layers one after the other give the error that
/// names what is wrong.
fn fused_rows(conv: &Conv2d, bn: &BatchNorm, xs: &Tensor) -> candle_core::Result<Option<usize>> {
    let cfg = conv.config();
    if xs.rank() != 4 || xs.dim(3)? != cfg.in_channels || bn.weight().dim(0)? != cfg.out_channels {
        return Ok(None);
    }
    let same = |t: &Tensor| t.dtype() == xs.dtype();
    if !(same(conv.weight()) && same(conv.bias()) && same(bn.weight()) && same(bn.bias())) {
        return Ok(None);
    }
    let (batch, h, w, _) = xs.dims4()?;
    let out_len = |len| Window::out_len(len, cfg.kernel_size, cfg.stride, cfg.padding);
    Ok(match (out_len(h), out_len(w)) {
        (Some(oh), Some(ow)) if batch * oh * ow >= 2 => Some(batch * oh * ow),
        _ => None,
    })
}

/// The convolution's output, kept for the backward: as the forward left it, then as a tensor.
#[derive(Debug)]
enum Saved {
    Storage(CpuStorage, Shape),
    Tensor(Tensor),
}

/// `(x, w, [bias | γ | β]) -> bn(conv(x))` (then ReLU): the convolution op and the BatchNorm op
/// run back to back, and backward chains their backwards without a graph node between them.
#[derive(Debug)]
struct ConvBatchNorm {
    conv: Im2colConv,
    bn: FusedBatchNorm,
    channels: usize,
    saved: Mutex<Option<Saved>>,
}

impl ConvBatchNorm {
    /// Bias, γ and β as separate contiguous storages.
    fn split(&self, packed: &CpuStorage, layout: &Layout) -> candle_core::Result<[CpuStorage; 3]> {
        let c = self.channels;
        if layout.shape().dims() != [3 * c] {
            candle_core::bail!("conv-batch-norm: packed parameters {:?}, want ({})", layout.shape(), 3 * c)
        }
        Ok(match packed {
            CpuStorage::F32(v) => {
                let v = contiguous(v, layout, "conv-batch-norm parameters")?;
                [0, 1, 2].map(|i| CpuStorage::F32(v[i * c..(i + 1) * c].to_vec()))
            }
            CpuStorage::F64(v) => {
                let v = contiguous(v, layout, "conv-batch-norm parameters")?;
                [0, 1, 2].map(|i| CpuStorage::F64(v[i * c..(i + 1) * c].to_vec()))
            }
            other => candle_core::bail!("conv-batch-norm supports f32 or f64, got {:?}", other.dtype()),
        })
    }

    /// The convolution's output as a tensor (made once, on the first backward).
    fn conv_output(&self) -> candle_core::Result<Tensor> {
        let mut slot =
            self.saved.lock().map_err(|_| candle_core::Error::Msg("conv-batch-norm lock poisoned".into()))?;
        let tensor = match slot.take() {
            Some(Saved::Tensor(t)) => t,
            Some(Saved::Storage(CpuStorage::F32(v), shape)) => Tensor::from_vec(v, shape, &Device::Cpu)?,
            Some(Saved::Storage(CpuStorage::F64(v), shape)) => Tensor::from_vec(v, shape, &Device::Cpu)?,
            Some(Saved::Storage(other, _)) => {
                candle_core::bail!("conv-batch-norm kept a {:?} output", other.dtype())
            }
            None => candle_core::bail!("conv-batch-norm backward before forward"),
        };
        *slot = Some(Saved::Tensor(tensor.clone()));
        Ok(tensor)
    }
}

impl CustomOp3 for ConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv-batch-norm"
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
        let [bias, gamma, beta] = self.split(s3, l3)?;
        let vector = Layout::contiguous(self.channels);
        let (y, shape) = self.conv.cpu_fwd(s1, l1, s2, l2, &bias, &vector)?;
        let (z, _) = self.bn.cpu_fwd(&y, &Layout::contiguous(&shape), &gamma, &vector, &beta, &vector)?;
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("conv-batch-norm lock poisoned".into()))? =
            Some(Saved::Storage(y, shape.clone()));
        Ok((z, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.channels;
        let y = self.conv_output()?;
        let [dy, dgamma, dbeta] = self.bn.backward(&y, &packed.narrow(0, c, c)?, grad)?;
        let bias = packed.narrow(0, 0, c)?;
        let (dx, dw, dbias) = self.conv.bwd(x, w, &bias, &y, &dy)?;
        let dbias = match dbias {
            Some(d) => d,
            None => Tensor::zeros(c, packed.dtype(), packed.device())?,
        };
        Ok((dx, dw, Some(Tensor::cat(&[&dbias, &dgamma, &dbeta], 0)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::ConvAlgorithm;
    use crate::ops::layers::Conv2dConfig;
    use candle_core::{DType, Var};
    use candle_nn::{ModuleT, VarBuilder, VarMap};

    /// The fused node against the two layers run one after the other, on twin layers with the
    /// same parameters: output, the gradients of the input and of all five parameters, and the
    /// running statistics, in f32 and f64, with and without ReLU, for the Winograd, in-bounds
    /// taps, strided and 1×1 shapes. They run the same arithmetic in the same order, so the
    /// results must be bit-identical (tolerance 0).
    #[test]
    fn fused_node_equals_the_layers_one_after_the_other() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (batch, h, w, cin, cout, kernel, stride, pad)
        let cases =
            [(2, 8, 8, 3, 4, 3, 1, 1), (3, 3, 3, 4, 5, 3, 1, 1), (2, 7, 6, 3, 4, 3, 2, 1), (2, 5, 5, 4, 3, 1, 2, 0)];
        for &(b, h, w, cin, cout, k, s, p) in &cases {
            for dtype in [DType::F32, DType::F64] {
                for (relu, algorithm) in [(true, ConvAlgorithm::Winograd), (false, ConvAlgorithm::Im2col)] {
                    let case = (b, h, w, cin, cout, k, s, p, dtype, relu, algorithm);
                    let cfg =
                        Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride: s, padding: p };
                    let map = VarMap::new();
                    let vb = VarBuilder::from_varmap(&map, dtype, &dev);
                    let mut conv = Conv2d::new(cfg, vb.pp("conv"))?;
                    conv.set_algorithm(algorithm);
                    let bn = BatchNorm::new(cout, vb.pp("bn"))?;
                    // Twins: the same values in separate variables, so each side has its own
                    // gradients and running statistics.
                    let twin_map = VarMap::new();
                    let twin_vb = VarBuilder::from_varmap(&twin_map, dtype, &dev);
                    let mut twin_conv = Conv2d::new(cfg, twin_vb.pp("conv"))?;
                    twin_conv.set_algorithm(algorithm);
                    let twin_bn = BatchNorm::new(cout, twin_vb.pp("bn"))?;
                    for (name, var) in map.data().lock().expect("vars").iter() {
                        // γ and β away from their 1 and 0 starts.
                        let shift = if name == "bn.weight" || name == "bn.bias" { 0.3 } else { 0.0 };
                        let value = (var.as_tensor() + shift)?;
                        var.set(&value)?;
                        twin_map.data().lock().expect("vars")[name].set(&value)?;
                    }
                    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, w, cin), &dev)?.to_dtype(dtype)?)?;
                    // The fused node runs (not the fallback, which would compare the layers with themselves).
                    assert!(
                        conv.cpu_op(x.as_tensor()).is_some() && fused_rows(&conv, &bn, x.as_tensor())?.is_some(),
                        "{case:?}"
                    );
                    let fused = conv_bn(&conv, &bn, x.as_tensor(), true, relu)?;
                    let apart = twin_bn.forward_act(&twin_conv.forward(x.as_tensor())?, true, relu)?;
                    let same = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
                        (a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()
                    };
                    assert_eq!(same(&fused, &apart)?, 0.0, "forward differs for {case:?}");
                    let probe = Tensor::randn(0f32, 1., fused.shape(), &dev)?.to_dtype(dtype)?;
                    let g1 = (fused * &probe)?.sum_all()?.backward()?;
                    let g2 = (apart * &probe)?.sum_all()?.backward()?;
                    let gx = same(g1.get(x.as_tensor()).expect("dx"), g2.get(x.as_tensor()).expect("dx"))?;
                    assert_eq!(gx, 0.0, "input gradient differs for {case:?}");
                    let pairs = [
                        ("conv weight", conv.weight(), twin_conv.weight()),
                        ("conv bias", conv.bias(), twin_conv.bias()),
                        ("bn weight", bn.weight(), twin_bn.weight()),
                        ("bn bias", bn.bias(), twin_bn.bias()),
                    ];
                    for (name, a, b) in pairs {
                        let d = same(g1.get(a).expect("grad"), g2.get(b).expect("grad"))?;
                        assert_eq!(d, 0.0, "{name} gradient differs for {case:?}");
                    }
                    assert_eq!(same(bn.running_mean(), twin_bn.running_mean())?, 0.0, "running mean {case:?}");
                    assert_eq!(same(bn.running_var(), twin_bn.running_var())?, 0.0, "running var {case:?}");
                    assert_eq!(bn.num_batches_tracked().to_dtype(DType::F64)?.to_scalar::<f64>()?, 1.0);
                    // Evaluation mode takes the layers one after the other.
                    let eval = conv_bn(&conv, &bn, x.as_tensor(), false, relu)?;
                    let want = bn.forward_t(&conv.forward(x.as_tensor())?, false)?;
                    let want = if relu { want.relu()? } else { want };
                    assert_eq!(same(&eval, &want)?, 0.0, "evaluation differs for {case:?}");
                }
            }
        }
        Ok(())
    }

    /// Shapes the fused op cannot take get the layers' own errors.
    #[test]
    fn wrong_channels_get_the_convolutions_error() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
        let cfg = Conv2dConfig { in_channels: 3, out_channels: 4, kernel_size: 3, stride: 1, padding: 1 };
        let conv = Conv2d::new(cfg, vb.pp("conv"))?;
        let bn = BatchNorm::new(4, vb.pp("bn"))?;
        let err =
            conv_bn(&conv, &bn, &Tensor::zeros((2, 5, 5, 2), DType::F32, &dev)?, true, true).expect_err("refused");
        assert!(err.to_string().contains("expects 3 input channels, got 2"), "{err}");
        let one = Tensor::zeros((1, 1, 1, 3), DType::F32, &dev)?;
        let err = conv_bn(&conv, &bn, &one, true, true).expect_err("refused");
        assert!(err.to_string().contains("more than one value per channel"), "{err}");
        Ok(())
    }
}
