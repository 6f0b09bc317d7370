//! Batch normalisation over the channel axis of channels-last tensors, with PyTorch semantics.

use candle_core::{DType, Tensor, Var};
use candle_nn::{Init, ModuleT, VarBuilder};

/// BatchNorm2d as PyTorch defines it: batch statistics and a running-average update
/// (momentum 0.1, unbiased variance) in training; running statistics in evaluation.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// PyTorch's defaults.
    pub const EPS: f64 = 1e-5;
    /// PyTorch's default momentum for the running statistics.
    pub const MOMENTUM: f64 = 0.1;

    /// Creates `weight`, `bias`, `running_mean`, `running_var` and `num_batches_tracked` under `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
        // Kept as f32 so it lives beside the other buffers; exported as int64 for PyTorch.
        let num_batches_tracked = Var::from_tensor(&vb.get_with_hints((), "num_batches_tracked", Init::Const(0.0))?)?;
        Ok(Self { weight, bias, running_mean, running_var, num_batches_tracked, eps: Self::EPS, momentum: Self::MOMENTUM })
    }

    /// Scale γ, `(channels,)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Shift β, `(channels,)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Running mean, `(channels,)`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// Running (unbiased) variance, `(channels,)`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Training-mode forward passes so far (PyTorch's `num_batches_tracked`).
    pub fn num_batches_tracked(&self) -> &Tensor {
        self.num_batches_tracked.as_tensor()
    }

    fn update_running_stats(&self, mean: &Tensor, var: &Tensor, count: usize) -> candle_core::Result<()> {
        let m = self.momentum;
        let unbiased = (var * (count as f64 / (count.max(2) - 1) as f64))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm.to_dtype(self.running_mean.dtype())?)?;
        self.running_var.set(&rv.to_dtype(self.running_var.dtype())?)?;
        let n = (self.num_batches_tracked.as_tensor() + 1.0)?;
        self.num_batches_tracked.set(&n)
    }
}

impl ModuleT for BatchNorm {
    /// # Shapes
    /// - `xs`: `(batch, height, width, channels)` (any leading dims; channels last)
    /// - returns the same shape
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let c = self.weight.dim(0)?;
        let dims = xs.dims().to_vec();
        if dims.last() != Some(&c) {
            candle_core::bail!("batch-norm over {c} channels got shape {dims:?}")
        }
        let rows = xs.elem_count() / c;
        let flat = xs.reshape((rows, c))?;
        let ys = if train {
            if rows < 2 {
                candle_core::bail!("batch-norm in training needs more than one value per channel, got shape {dims:?}")
            }
            let mean = flat.mean_keepdim(0)?;
            let centered = flat.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(0)?;
            let inv_std = (var.clone() + self.eps)?.sqrt()?.recip()?;
            let scale = inv_std.broadcast_mul(&self.weight.unsqueeze(0)?)?;
            self.update_running_stats(&mean.detach().squeeze(0)?, &var.detach().squeeze(0)?, rows)?;
            centered.broadcast_mul(&scale)?.broadcast_add(&self.bias)?
        } else {
            let inv_std = (self.running_var.as_tensor() + self.eps)?.sqrt()?.recip()?;
            let scale = (inv_std * &self.weight)?;
            let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
            flat.broadcast_mul(&scale)?.broadcast_add(&shift)?
        };
        ys.reshape(dims)
    }
}

/// The dtype running statistics are kept in.
pub const BUFFER_DTYPE: DType = DType::F32;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    #[test]
    fn train_normalises_and_updates_running_stats_like_pytorch() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let bn = BatchNorm::new(2, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        // Channel 0: 1,2,3,4 (mean 2.5, biased var 1.25, unbiased 5/3); channel 1: all 7.
        let x = Tensor::new(&[[[[1f32, 7.], [2., 7.]], [[3., 7.], [4., 7.]]]], &dev)?;
        let y = bn.forward_t(&x, true)?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let s = (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 / s, 0., -0.5 / s, 0., 0.5 / s, 0., 1.5 / s, 0.];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        let rm: Vec<f32> = bn.running_mean().to_vec1()?;
        let rv: Vec<f32> = bn.running_var().to_vec1()?;
        assert!((rm[0] - 0.25).abs() < 1e-6 && (rm[1] - 0.7).abs() < 1e-6, "{rm:?}");
        assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6 && (rv[1] - 0.9).abs() < 1e-6, "{rv:?}");
        assert_eq!(bn.num_batches_tracked().to_scalar::<f32>()?, 1.0);
        // Evaluation uses the running statistics and leaves them alone.
        let e: Vec<f32> = bn.forward_t(&x, false)?.flatten_all()?.to_vec1()?;
        assert!((e[0] - (1.0 - 0.25) / (rv[0] + 1e-5).sqrt()).abs() < 1e-5);
        assert_eq!(bn.running_mean().to_vec1::<f32>()?, rm);
        Ok(())
    }
}
