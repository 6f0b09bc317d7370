//! A convolution followed by BatchNorm (and ReLU) as one graph node on the CPU.
//!
//! In training, candle's backward starts the gradient of every node's input from a zero tensor
//! and adds the node's contribution to it, on one thread. Between a convolution and its BatchNorm
//! that costs two passes over an activation-sized tensor per layer and step, for a gradient that
//! only the convolution reads. As one op, the BatchNorm's input gradient goes straight into the
//! convolution's backward. The arithmetic is the two ops' own, in the same order, so results are
//! bit-identical to running them one after the other.
//!
//! In evaluation, BatchNorm is a per-channel affine map with the running statistics, which folds
//! into the convolution's weight and bias (`w·s`, `(b − μ)·s + β` with `s = γ / √(σ² + ε)`), and
//! the ReLU is applied as the output is written: no pass over the activation beyond the
//! convolution's own. The fold rounds differently from the layers (within 1e-4 relative in f32).

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Shape, Storage, Tensor, WithDType};

use super::batch_norm::{BatchNorm, FusedBatchNorm, Sums};
use super::conv::Conv2d;
use super::pool::{pool_image, MaxPool2d};
use crate::ops::conv::dispatch::{Im2colConv, ImageEpilogue};
use crate::ops::plumbing::elementwise::COLUMN_ROWS;
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::simd::with_fma;
use crate::ops::plumbing::storage::contiguous;
use crate::ops::plumbing::tape;

/// `bn(conv(xs))`, then ReLU with `relu`: one node on the CPU (f32 or f64, with the im2col or
/// Winograd algorithm) in training, and in evaluation where the activation outweighs the weight
/// (there the BatchNorm folds into the convolution, [`folds`]); the two layers one after the
/// other everywhere else.
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
    let channels = conv.config().out_channels;
    if !train {
        return match conv.cpu_op(xs) {
            Some(op) if folds(conv, bn, xs)? => {
                let op = if relu { op.for_evaluation().with_relu() } else { op.for_evaluation() };
                let packed = folding_parameters(conv, bn)?;
                let folded = FoldedConvBatchNorm { conv: op, channels, eps: bn.eps(), residual: None, pool: None };
                xs.contiguous()?.apply_op3(conv.weight(), &packed, folded)
            }
            _ => bn.forward_act(&conv.forward_t(xs, false)?, false, relu),
        };
    }
    match train_node(conv, bn, xs, relu, None)? {
        Some(ys) => Ok(ys),
        None => bn.forward_act(&conv.forward_t(xs, true)?, true, relu),
    }
}

/// `[bias | γ | β | μ | σ²]`, the operand of [`FoldedConvBatchNorm`]: bias, γ, β and the running
/// statistics in one tensor (custom ops take three inputs); the statistics are buffers, not
/// parameters, so they get no gradient.
fn folding_parameters(conv: &Conv2d, bn: &BatchNorm) -> candle_core::Result<Tensor> {
    Tensor::cat(&[conv.bias(), bn.weight(), bn.bias(), &bn.running_mean().detach(), &bn.running_var().detach()], 0)
}

/// `relu(bn(conv(xs)) + shortcut)` in evaluation mode, for inference only (no backward graph):
/// a residual block's last convolution, its BatchNorm folded in, with the block's add+ReLU done
/// as the convolution writes its output instead of in a pass of its own. `None` where the
/// BatchNorm does not fold ([`folds`]); the caller then runs the layers one after the other.
///
/// # Shapes
/// - `xs`: `(batch, height, width, in_channels)`
/// - `shortcut`: the output's shape, `(batch, out_h, out_w, out_channels)`
pub(crate) fn conv_bn_add_relu_inference(
    conv: &Conv2d,
    bn: &BatchNorm,
    xs: &Tensor,
    shortcut: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    if shortcut.dtype() != xs.dtype() || !shortcut.device().is_cpu() {
        return Ok(None);
    }
    folded_inference(conv, bn, xs, Some(shortcut.contiguous()?), None)
}

/// `pool(relu(bn(conv(xs))))` in evaluation mode, for inference only (no backward graph): d2l's
/// stem with its BatchNorm folded in, where the convolution runs im2col's product, each image's
/// output pooled while it is in cache instead of written out and read back. `None` where the
/// BatchNorm does not fold ([`folds`]); the caller then runs the stem's training-or-evaluation
/// `conv_bn_pool`.
pub(crate) fn conv_bn_pool_inference(
    conv: &Conv2d,
    bn: &BatchNorm,
    pool: MaxPool2d,
    xs: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    folded_inference(conv, bn, xs, None, Some(pool))
}

/// `relu(bn(conv(xs)) + residual)`, then `pool`, as one folded op without a backward, where the
/// convolution runs on the CPU and the BatchNorm folds ([`folds`]); else `None`.
fn folded_inference(
    conv: &Conv2d,
    bn: &BatchNorm,
    xs: &Tensor,
    residual: Option<Tensor>,
    pool: Option<MaxPool2d>,
) -> candle_core::Result<Option<Tensor>> {
    let Some(op) = conv.cpu_op(xs) else { return Ok(None) };
    if !folds(conv, bn, xs)? {
        return Ok(None);
    }
    let packed = folding_parameters(conv, bn)?;
    let channels = conv.config().out_channels;
    let folded = FoldedConvBatchNorm { conv: op.for_evaluation().with_relu(), channels, eps: bn.eps(), residual, pool };
    xs.contiguous()?.apply_op3_no_bwd(&conv.weight().detach(), &packed.detach(), &folded).map(Some)
}

/// Each image's convolution output max-pooled into the op's output.
struct PoolEpilogue(Window);

impl ImageEpilogue for PoolEpilogue {
    fn image_dims(&self) -> (usize, usize, usize) {
        (self.0.oh(), self.0.ow(), self.0.c)
    }

    fn apply<T: WithDType>(&self, image: &[T], dst: &mut [T], _side: &mut [T]) {
        with_fma(
            #[inline(always)]
            || pool_image(image, &self.0, dst),
        )
    }
}

/// The training node of [`conv_bn`] (with the stem's max-pool where `pool` is given), or `None` where the
/// shapes, dtypes or device do not let it run.
pub(super) fn train_node(
    conv: &Conv2d,
    bn: &BatchNorm,
    xs: &Tensor,
    relu: bool,
    pool: Option<MaxPool2d>,
) -> candle_core::Result<Option<Tensor>> {
    let fused = match conv.cpu_op(xs) {
        Some(op) => fused_rows(conv, bn, xs)?.map(|rows| (op, rows)),
        None => None,
    };
    let Some((op, rows)) = fused else { return Ok(None) };
    let channels = conv.config().out_channels;
    // γ and β travel with the convolution's bias in one tensor: custom ops take three inputs.
    let packed = tape::cat(&[conv.bias(), bn.weight(), bn.bias()])?;
    bn.train_with(relu, rows, |bn_op| {
        let fused = ConvBatchNorm { conv: op, bn: bn_op, channels, pool, saved: Mutex::new(None) };
        tape::op3(&xs.contiguous()?, conv.weight(), &packed, fused)
    })
    .map(Some)
}

/// The BatchNorm's values per channel where the fused op can run ([`Conv2d::fused_rows`]).
fn fused_rows(conv: &Conv2d, bn: &BatchNorm, xs: &Tensor) -> candle_core::Result<Option<usize>> {
    conv.fused_rows(xs, (bn.weight(), bn.bias()))
}

/// Whether an evaluation-mode `bn(conv(xs))` runs folded: shapes and dtypes that the CPU op
/// takes, and an output at least as large as the weight (folding costs a pass over the weight,
/// and saves one over the output: not worth it for a few images through the last stages).
pub(crate) fn folds(conv: &Conv2d, bn: &BatchNorm, xs: &Tensor) -> candle_core::Result<bool> {
    let Some(rows) = fused_rows(conv, bn, xs)? else { return Ok(false) };
    let same = |t: &Tensor| t.dtype() == xs.dtype();
    let cfg = conv.config();
    Ok(same(bn.running_mean()) && same(bn.running_var()) && rows >= cfg.in_channels * cfg.kernel_size.pow(2))
}

/// The convolution's output, kept for the backward: as the forward left it, then as a tensor.
#[derive(Debug)]
enum Saved {
    Storage(CpuStorage, Shape),
    Tensor(Tensor),
}

/// `(x, w, [bias | γ | β]) -> bn(conv(x))` (then ReLU, then the max-pool when `pool` is set):
/// the ops run back to back, and backward chains their backwards without a graph node between
/// them.
#[derive(Debug)]
struct ConvBatchNorm {
    conv: Im2colConv,
    bn: FusedBatchNorm,
    channels: usize,
    pool: Option<MaxPool2d>,
    /// The convolution's output.
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
        Self::tensor(&self.saved)
    }

    /// A kept output as a tensor (made once, on the first backward).
    fn tensor(saved: &Mutex<Option<Saved>>) -> candle_core::Result<Tensor> {
        let mut slot = saved.lock().map_err(|_| candle_core::Error::Msg("conv-batch-norm lock poisoned".into()))?;
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
        let layout = Layout::contiguous(&shape);
        let out = match self.pool {
            Some(pool) => self.bn.cpu_fwd_pooled(&y, &layout, (&gamma, &beta), pool)?,
            None => self.bn.cpu_fwd(&y, &layout, &gamma, &vector, &beta, &vector)?,
        };
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("conv-batch-norm lock poisoned".into()))? =
            Some(Saved::Storage(y, shape));
        Ok(out)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = self.channels;
        let y = self.conv_output()?;
        let gamma = packed.narrow(0, c, c)?;
        // Without the pool, the BatchNorm's input gradient pass also sums it for the bias, where
        // its blocks of rows are enough tasks to keep the threads even.
        let summed = y.elem_count() / c >= Sums::MIN_BLOCKS * COLUMN_ROWS;
        let (dy, dgamma, dbeta, dbias) = match self.pool {
            Some(pool) => {
                let [dy, dgamma, dbeta] = self.bn.backward_pooled(&y, (res, grad), &gamma, pool)?;
                (dy, dgamma, dbeta, None)
            }
            None if !summed => {
                let [dy, dgamma, dbeta] = self.bn.backward(&y, &gamma, grad)?;
                (dy, dgamma, dbeta, None)
            }
            None => {
                let [dy, dgamma, dbeta, db] = self.bn.backward_summed(&y, &gamma, grad, Sums::Columns)?;
                (dy, dgamma, dbeta, Some(db))
            }
        };
        let (dx, dw, dbias) = self.conv.gradients(x, w, c, (&y, &dy), dbias)?;
        let dbias = match dbias {
            Some(d) => d,
            None => Tensor::zeros(c, packed.dtype(), packed.device())?,
        };
        Ok((dx, dw, Some(Tensor::cat(&[&dbias, &dgamma, &dbeta], 0)?)))
    }
}

/// Evaluation-mode `(x, w, [bias | γ | β | μ | σ²]) -> bn(conv(x))` (then ReLU, as the
/// convolution op is set): the BatchNorm folded into the convolution's weight and bias.
#[derive(Debug)]
struct FoldedConvBatchNorm {
    conv: Im2colConv,
    channels: usize,
    eps: f64,
    /// Added to the output before the ReLU ([`conv_bn_add_relu_inference`]); an op with one is
    /// applied without a backward.
    residual: Option<Tensor>,
    /// The max-pool applied to each image's output while it is in cache
    /// ([`conv_bn_pool_inference`]); an op with one is applied without a backward.
    pool: Option<MaxPool2d>,
}

impl FoldedConvBatchNorm {
    /// The folded weight `w·s` and bias `(b − μ)·s + β`, `s = γ / √(σ² + ε)` per output channel.
    fn fold<T: WithDType>(&self, w: &[T], packed: &[T]) -> (Vec<T>, Vec<T>) {
        let c = self.channels;
        let [bias, gamma, beta, mean, var] = [0, 1, 2, 3, 4].map(|i| &packed[i * c..(i + 1) * c]);
        let scale: Vec<T> =
            (0..c).map(|o| T::from_f64(gamma[o].to_f64() / (var[o].to_f64() + self.eps).sqrt())).collect();
        // Each output channel's weights are one run of `per_out`, scaled by that channel's factor.
        let per_out = w.len() / c;
        let mut w_folded = Vec::with_capacity(w.len());
        for (run, &s) in w.chunks_exact(per_out).zip(&scale) {
            w_folded.extend(run.iter().map(|&v| v * s));
        }
        let b_folded = (0..c).map(|o| (bias[o] - mean[o]) * scale[o] + beta[o]).collect();
        (w_folded, b_folded)
    }
}

impl CustomOp3 for FoldedConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv-batch-norm-folded"
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
        let c = self.channels;
        if l3.shape().dims() != [5 * c] || l2.shape().dims().first() != Some(&c) {
            candle_core::bail!(
                "folded conv-batch-norm: weight {:?} and parameters {:?} for {c} channels",
                l2.shape(),
                l3.shape()
            )
        }
        let (w, b) = match (s2, s3) {
            (CpuStorage::F32(w), CpuStorage::F32(p)) => {
                let (w, b) = self.fold(contiguous(w, l2, "conv weight")?, contiguous(p, l3, "batch-norm parameters")?);
                (CpuStorage::F32(w), CpuStorage::F32(b))
            }
            (CpuStorage::F64(w), CpuStorage::F64(p)) => {
                let (w, b) = self.fold(contiguous(w, l2, "conv weight")?, contiguous(p, l3, "batch-norm parameters")?);
                (CpuStorage::F64(w), CpuStorage::F64(b))
            }
            _ => {
                candle_core::bail!("folded conv-batch-norm supports matching f32 or f64 tensors, got {:?}", s2.dtype())
            }
        };
        let (w_layout, b_layout) = (Layout::contiguous(l2.shape()), Layout::contiguous(c));
        if let Some(pool) = self.pool {
            let conv_out = self.conv.output_layout(l1, c)?;
            let epilogue = PoolEpilogue(pool.window(&conv_out)?);
            let inputs = [(s1, l1), (&w, &w_layout), (&b, &b_layout)];
            if let Some(pooled) = self.conv.cpu_fwd_per_image(inputs, &epilogue)? {
                return Ok(pooled);
            }
            let (y, shape) = self.conv.cpu_fwd_with(inputs, None)?;
            return pool.cpu_fwd(&y, &Layout::contiguous(shape));
        }
        let residual = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match residual.as_ref().map(|(storage, layout)| (&**storage, *layout)) {
            Some((Storage::Cpu(r), layout)) => Some((r, layout)),
            Some(_) => candle_core::bail!("folded conv-batch-norm: the residual is not on the CPU"),
            None => None,
        };
        self.conv.cpu_fwd_with([(s1, l1), (&w, &w_layout), (&b, &b_layout)], residual)
    }

    /// With `g` and `gb` the gradients of the folded weight and bias (the convolution op applies
    /// the ReLU's mask): `dw = g·s`, `db = gb·s`, `dγ = (Σ g⊙w + gb·(b − μ)) / √(σ² + ε)`,
    /// `dβ = gb`; none for the statistics.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.residual.is_some() || self.pool.is_some() {
            candle_core::bail!("folded conv-batch-norm with a residual or a pool is for inference: it has no backward")
        }
        let c = self.channels;
        let (w, packed) = (w.detach(), packed.detach());
        let part = |i: usize| packed.narrow(0, i * c, c);
        let (bias, gamma, beta, mean, var) = (part(0)?, part(1)?, part(2)?, part(3)?, part(4)?);
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        let scale = (&inv_std * &gamma)?.reshape((c, 1, 1, 1))?;
        let centered_bias = (&bias - &mean)?;
        let w_folded = w.broadcast_mul(&scale)?;
        let scale = scale.flatten_all()?;
        let b_folded = ((&centered_bias * &scale)? + beta)?;
        let (dx, gw, gb) = self.conv.bwd(x, &w_folded, &b_folded, res, grad)?;
        let (Some(gw), Some(gb)) = (gw, gb) else {
            candle_core::bail!("folded conv-batch-norm: the convolution gave no weight or bias gradient")
        };
        let dw = gw.broadcast_mul(&scale.reshape((c, 1, 1, 1))?)?;
        let dbias = (&gb * &scale)?;
        let dgamma = (((&gw * &w)?.sum((1, 2, 3))? + (&gb * &centered_bias)?)? * &inv_std)?;
        let zeros = Tensor::zeros(2 * c, packed.dtype(), packed.device())?;
        Ok((dx, Some(dw), Some(Tensor::cat(&[&dbias, &dgamma, &gb, &zeros], 0)?)))
    }
}

#[cfg(test)]
pub(in crate::ops::layers) mod tests {
    use super::*;
    use crate::ops::conv::ConvAlgorithm;
    use crate::ops::layers::conv::tests::rel_err;
    use crate::ops::layers::Conv2dConfig;
    use candle_core::{DType, Module, Var};
    use candle_nn::{ModuleT, VarBuilder, VarMap};

    /// Two convolution-BatchNorm pairs holding the same values in separate variables (γ and β
    /// moved off their 1 and 0 starts), so each side has its own gradients and running
    /// statistics.
    pub(in crate::ops::layers) fn twin_layers(
        cfg: Conv2dConfig,
        dtype: DType,
        algorithm: ConvAlgorithm,
    ) -> candle_core::Result<[(Conv2d, BatchNorm); 2]> {
        let dev = Device::Cpu;
        let maps = [VarMap::new(), VarMap::new()];
        let layers = |map: &VarMap| -> candle_core::Result<(Conv2d, BatchNorm)> {
            let vb = VarBuilder::from_varmap(map, dtype, &dev);
            let mut conv = Conv2d::new(cfg, vb.pp("conv"))?;
            conv.set_algorithm(algorithm);
            Ok((conv, BatchNorm::new(cfg.out_channels, vb.pp("bn"))?))
        };
        let twins = [layers(&maps[0])?, layers(&maps[1])?];
        for (name, var) in maps[0].data().lock().expect("vars").iter() {
            let shift = if name == "bn.weight" || name == "bn.bias" { 0.3 } else { 0.0 };
            let value = (var.as_tensor() + shift)?;
            var.set(&value)?;
            maps[1].data().lock().expect("vars")[name].set(&value)?;
        }
        Ok(twins)
    }

    /// The largest absolute difference of two tensors.
    pub(in crate::ops::layers) fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    /// `fused` (from the first twin) and `apart` (from the second) agree bit for bit: the
    /// outputs, the gradients of `x` (when it is a variable) and of the four trained parameters
    /// under one random probe, and the running statistics.
    pub(in crate::ops::layers) fn assert_twins_agree(
        fused: Tensor,
        apart: Tensor,
        x: Option<&Var>,
        [(conv, bn), (twin_conv, twin_bn)]: &[(Conv2d, BatchNorm); 2],
        case: &str,
    ) -> candle_core::Result<()> {
        assert_eq!(fused.dims(), apart.dims(), "{case}");
        assert_eq!(max_diff(&fused, &apart)?, 0.0, "forward differs for {case}");
        let probe = Tensor::randn(0f32, 1., fused.shape(), &Device::Cpu)?.to_dtype(fused.dtype())?;
        let g1 = (fused * &probe)?.sum_all()?.backward()?;
        let g2 = (apart * &probe)?.sum_all()?.backward()?;
        let mut pairs = vec![
            ("conv weight", conv.weight(), twin_conv.weight()),
            ("conv bias", conv.bias(), twin_conv.bias()),
            ("bn weight", bn.weight(), twin_bn.weight()),
            ("bn bias", bn.bias(), twin_bn.bias()),
        ];
        if let Some(x) = x {
            pairs.push(("input", x.as_tensor(), x.as_tensor()));
        }
        for (name, a, b) in pairs {
            let d = max_diff(g1.get(a).expect("grad"), g2.get(b).expect("grad"))?;
            assert_eq!(d, 0.0, "{name} gradient differs for {case}");
        }
        assert_eq!(max_diff(bn.running_mean(), twin_bn.running_mean())?, 0.0, "running mean {case}");
        assert_eq!(max_diff(bn.running_var(), twin_bn.running_var())?, 0.0, "running var {case}");
        Ok(())
    }

    /// The fused node against the two layers run one after the other, on twin layers with the
    /// same parameters: output, the gradients of the input and of all five parameters, and the
    /// running statistics, in f32 and f64, with and without ReLU, for the Winograd, in-bounds
    /// taps, strided and 1×1 shapes. They run the same arithmetic in the same order, so the
    /// results must be bit-identical (tolerance 0).
    #[test]
    fn fused_node_equals_the_layers_one_after_the_other() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (batch, h, w, cin, cout, kernel, stride, pad)
        // The last case has enough output rows for the BatchNorm's backward to sum the bias
        // gradient as it writes its input gradient (`Sums::Columns`), ending inside a block,
        // and channels in a block of `SUM_BLOCK` and after it.
        let cases = [
            (2, 8, 8, 3, 4, 3, 1, 1),
            (3, 3, 3, 4, 5, 3, 1, 1),
            (2, 7, 6, 3, 4, 3, 2, 1),
            (2, 5, 5, 4, 3, 1, 2, 0),
            (2, 64, 66, 3, 67, 3, 1, 1),
        ];
        assert!(cases.iter().any(|&(b, h, w, ..)| b * h * w > Sums::MIN_BLOCKS * COLUMN_ROWS));
        let mut folded_cases = 0;
        for &(b, h, w, cin, cout, k, s, p) in &cases {
            for dtype in [DType::F32, DType::F64] {
                for (relu, algorithm) in [(true, ConvAlgorithm::Winograd), (false, ConvAlgorithm::Im2col)] {
                    let case = format!("{:?}", (b, h, w, cin, cout, k, s, p, dtype, relu, algorithm));
                    let cfg =
                        Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride: s, padding: p };
                    let twins = twin_layers(cfg, dtype, algorithm)?;
                    let [(conv, bn), (twin_conv, twin_bn)] = &twins;
                    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, w, cin), &dev)?.to_dtype(dtype)?)?;
                    // The fused node runs (not the fallback, which would compare the layers with themselves).
                    assert!(
                        conv.cpu_op(x.as_tensor()).is_some() && fused_rows(conv, bn, x.as_tensor())?.is_some(),
                        "{case}"
                    );
                    let fused = conv_bn(conv, bn, x.as_tensor(), true, relu)?;
                    let apart = twin_bn.forward_act(&twin_conv.forward(x.as_tensor())?, true, relu)?;
                    assert_twins_agree(fused, apart, Some(&x), &twins, &case)?;
                    assert_eq!(bn.num_batches_tracked().to_dtype(DType::F64)?.to_scalar::<f64>()?, 1.0);
                    // Evaluation mode: folded where that pays, else the layers one after the
                    // other (then bit-identical).
                    let eval = conv_bn(conv, bn, x.as_tensor(), false, relu)?;
                    let want = bn.forward_t(&conv.forward_t(x.as_tensor(), false)?, false)?;
                    let want = if relu { want.relu()? } else { want };
                    if folds(conv, bn, x.as_tensor())? {
                        folded_cases += 1;
                    } else {
                        assert_eq!(max_diff(&eval, &want)?, 0.0, "evaluation differs for {case}");
                    }
                }
            }
        }
        assert!(folded_cases > 0, "no case ran folded in evaluation");
        Ok(())
    }

    /// A convolution and the BatchNorm after it, with running statistics away from 0 and 1 and
    /// γ and β away from 1 and 0, so that folding changes every weight and bias.
    fn folding_layers(cfg: Conv2dConfig, dtype: DType) -> candle_core::Result<(Conv2d, BatchNorm)> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, dtype, &Device::Cpu);
        let conv = Conv2d::new(cfg, vb.pp("conv"))?;
        let bn = BatchNorm::new(conv.config().out_channels, vb.pp("bn"))?;
        for (name, var) in map.data().lock().expect("vars").iter() {
            let value = match name.as_str() {
                "bn.weight" => (var.as_tensor().rand_like(0.5, 1.5))?,
                "bn.bias" | "bn.running_mean" => (var.as_tensor().rand_like(-0.5, 0.5))?,
                "bn.running_var" => (var.as_tensor().rand_like(0.2, 3.0))?,
                _ => continue,
            };
            var.set(&value)?;
        }
        Ok((conv, bn))
    }

    /// The residual block's add+ReLU done by the folded convolution as it writes its output
    /// gives the bits of the folded convolution followed by the add+ReLU op: on Winograd (F(4×4)
    /// and F(2×2) forwards) and on the algorithms that add the residual in a pass after
    /// (im2col, strided; in-bounds taps), in f32 and f64.
    #[test]
    fn a_folded_convolution_with_the_residual_equals_the_add_and_relu_after() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (batch, h, w, cin, cout, kernel, stride, pad)
        let cases = [
            (8, 12, 12, 16, 16, 3, 1, 1),
            (8, 8, 8, 4, 32, 3, 1, 1),
            (8, 7, 6, 3, 4, 3, 2, 1),
            (8, 5, 5, 4, 3, 1, 1, 0),
            (64, 2, 2, 8, 8, 3, 1, 1),
        ];
        for &(b, h, w, cin, cout, k, s, p) in &cases {
            for dtype in [DType::F32, DType::F64] {
                let case = (b, h, w, cin, cout, k, s, p, dtype);
                let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride: s, padding: p };
                let (conv, bn) = folding_layers(cfg, dtype)?;
                let x = Tensor::randn(0f32, 1., (b, h, w, cin), &dev)?.to_dtype(dtype)?;
                let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
                let shortcut = Tensor::randn(0f32, 1., (b, oh, ow, cout), &dev)?.to_dtype(dtype)?;
                let fused = conv_bn_add_relu_inference(&conv, &bn, &x, &shortcut)?
                    .unwrap_or_else(|| panic!("{case:?}: the convolution does not fold"));
                let after = crate::ops::add_relu(&conv_bn(&conv, &bn, &x, false, false)?, &shortcut)?;
                let (a, e) = (fused.flatten_all()?.to_dtype(DType::F64)?, after.flatten_all()?.to_dtype(DType::F64)?);
                let (a, e): (Vec<f64>, Vec<f64>) = (a.to_vec1()?, e.to_vec1()?);
                assert!(e.contains(&0.0) && e.iter().any(|&v| v > 0.0), "{case:?}: ReLU clips some, not all");
                assert_eq!(a, e, "{case:?}");
                assert!(!fused.track_op(), "{case:?}: inference builds no graph");
            }
        }
        Ok(())
    }

    /// The inference stem (each image's output max-pooled in cache) against the folded
    /// convolution and then the pool, bit for bit: one-channel stems (the per-image im2col
    /// path, which the convolution op is asked directly whether it takes), and a three-channel 7×7
    /// and a 3×3 (Winograd) that other algorithms run, the op pooling their output after; in f32
    /// and f64.
    #[test]
    fn the_inference_stem_equals_the_convolution_then_the_pool() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let pool = MaxPool2d::d2l_stem();
        // (batch, h, cin, cout, kernel, stride, pad, per image)
        let cases = [
            (3, 28, 1, 8, 7, 2, 3, true),
            (2, 40, 1, 16, 7, 2, 3, true),
            (2, 17, 3, 4, 7, 2, 3, false),
            (2, 12, 4, 8, 3, 1, 1, false),
        ];
        for &(b, h, cin, cout, k, s, p, per_image) in &cases {
            for dtype in [DType::F32, DType::F64] {
                let case = (b, h, cin, cout, k, s, p, dtype);
                let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride: s, padding: p };
                let (conv, bn) = folding_layers(cfg, dtype)?;
                let x = Tensor::randn(0f32, 1., (b, h, h, cin), &dev)?.to_dtype(dtype)?;
                let fused = conv_bn_pool_inference(&conv, &bn, pool, &x)?
                    .unwrap_or_else(|| panic!("{case:?}: the convolution does not fold"));
                let op = conv.cpu_op(&x).expect("a CPU convolution").for_evaluation().with_relu();
                let ((xs, xl), (ws, wl), (bs, bl)) =
                    (x.storage_and_layout(), conv.weight().storage_and_layout(), conv.bias().storage_and_layout());
                let (Storage::Cpu(xs), Storage::Cpu(ws), Storage::Cpu(bs)) = (&*xs, &*ws, &*bs) else {
                    panic!("{case:?}: not on the CPU")
                };
                let epilogue = PoolEpilogue(pool.window(&op.output_layout(xl, cout)?)?);
                let ran = op.cpu_fwd_per_image([(xs, xl), (ws, wl), (bs, bl)], &epilogue)?.is_some();
                assert_eq!(ran, per_image, "{case:?}: the per-image path ran: {ran}");
                let after = pool.forward(&conv_bn(&conv, &bn, &x, false, true)?)?;
                assert_eq!(fused.dims(), after.dims(), "{case:?}");
                let (a, e) = (fused.flatten_all()?.to_dtype(DType::F64)?, after.flatten_all()?.to_dtype(DType::F64)?);
                let (a, e): (Vec<f64>, Vec<f64>) = (a.to_vec1()?, e.to_vec1()?);
                assert!(e.iter().any(|&v| v > 0.0), "{case:?}: some output is positive");
                assert_eq!(a, e, "{case:?}");
                assert!(!fused.track_op(), "{case:?}: inference builds no graph");
            }
        }
        Ok(())
    }

    /// Evaluation mode with the BatchNorm folded into the convolution against the two layers one
    /// after the other (with running statistics away from 0 and 1, γ and β away from 1 and 0):
    /// output and the gradients of the input, the convolution's weight and bias and γ and β,
    /// none for the statistics; f32 and f64, with and without ReLU, on Winograd F(4×4) and
    /// F(2×2), strided, 1×1 and stem-like shapes. Tolerance for the output 1e-4 relative in f32
    /// (the scales γ/σ here reach 3.4; the convolution tests allow 1e-4 against float64) and 1e-12
    /// in f64; for the gradients 5e-4 in f32 (two f32 computations that round differently, each
    /// held within 1e-4 of float64 by the convolution tests; 1.7e-4 seen over 30 runs) and 1e-10
    /// in f64.
    #[test]
    fn folded_evaluation_matches_the_layers() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // (batch, h, w, cin, cout, kernel, stride, pad)
        let cases = [
            (2, 12, 12, 6, 5, 3, 1, 1),
            (4, 8, 8, 4, 6, 3, 1, 1),
            (4, 7, 6, 3, 4, 3, 2, 1),
            (4, 5, 5, 4, 3, 1, 2, 0),
            (2, 12, 12, 1, 4, 7, 2, 3),
        ];
        for &(b, h, w, cin, cout, k, s, p) in &cases {
            for dtype in [DType::F32, DType::F64] {
                for relu in [true, false] {
                    let case = (b, h, w, cin, cout, k, s, p, dtype, relu);
                    let cfg =
                        Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride: s, padding: p };
                    let (conv, bn) = folding_layers(cfg, dtype)?;
                    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, w, cin), &dev)?.to_dtype(dtype)?)?;
                    assert!(folds(&conv, &bn, x.as_tensor())?, "{case:?} does not fold");
                    let folded = conv_bn(&conv, &bn, x.as_tensor(), false, relu)?;
                    let layers = bn.forward_act(&conv.forward_t(x.as_tensor(), false)?, false, relu)?;
                    let (tol_y, tol_g) = if dtype == DType::F32 { (1e-4, 5e-4) } else { (1e-12, 1e-10) };
                    let e = rel_err(&folded, &layers)?;
                    assert!(e < tol_y, "output rel err {e} for {case:?}");
                    let probe = Tensor::randn(0f32, 1., folded.shape(), &dev)?.to_dtype(dtype)?;
                    let g1 = (folded * &probe)?.sum_all()?.backward()?;
                    let g2 = (layers * &probe)?.sum_all()?.backward()?;
                    let params = [
                        ("input", x.as_tensor()),
                        ("conv weight", conv.weight()),
                        ("conv bias", conv.bias()),
                        ("bn weight", bn.weight()),
                        ("bn bias", bn.bias()),
                    ];
                    for (name, t) in params {
                        let e = rel_err(g1.get(t).expect("grad"), g2.get(t).expect("grad"))?;
                        assert!(e < tol_g, "{name} gradient rel err {e} for {case:?}");
                    }
                    for t in [bn.running_mean(), bn.running_var()] {
                        assert!(g1.get(t).is_none(), "a running statistic got a gradient for {case:?}");
                    }
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
