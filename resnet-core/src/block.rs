//! The residual block (d2l's `Residual` and its pre-activation variant) and `resnet_block` stages.

use candle_core::{Module, Tensor};
use candle_nn::{ModuleT, VarBuilder};

use crate::config::BlockKind;
use crate::layout::{to_channels_first, to_channels_last};
use crate::ops::{
    add_relu, conv_bn, conv_bn_add_relu_inference, tape, BatchNorm, Conv2d, Conv2dConfig, ConvAlgorithm, GpuOps,
};
use crate::tensors::{CollectTensors, NamedTensor};

/// d2l's `Residual`: two 3×3 convolutions with BatchNorm, and an identity or 1×1-conv shortcut.
#[derive(Debug, Clone)]
pub struct Residual {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Option<Conv2d>,
    kind: BlockKind,
}

/// How one residual block is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResidualConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Use a 1×1 convolution (stride `stride`) on the shortcut.
    pub use_1x1conv: bool,
    /// Stride of the first 3×3 convolution (and the shortcut).
    pub stride: usize,
    /// Post- (d2l) or pre-activation ordering.
    pub kind: BlockKind,
}

impl Residual {
    /// Builds the block with d2l's names: `conv1`, `bn1`, `conv2`, `bn2`, `conv3`.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{ModuleT, VarBuilder, VarMap};
    /// use resnet_core::{BlockKind, Residual, ResidualConfig};
    ///
    /// # fn main() -> candle_core::Result<()> {
    /// // d2l: Residual(3, 6, use_1x1conv=True, strides=2) halves (4, 3, 6, 6) to (4, 6, 3, 3).
    /// let cfg = ResidualConfig {
    ///     in_channels: 3,
    ///     out_channels: 6,
    ///     use_1x1conv: true,
    ///     stride: 2,
    ///     kind: BlockKind::PostActivation,
    /// };
    /// let vars = VarMap::new();
    /// let block = Residual::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
    /// let xs = Tensor::randn(0f32, 1., (4, 3, 6, 6), &Device::Cpu)?;
    /// assert_eq!(block.forward_t(&xs, true)?.dims(), &[4, 6, 3, 3]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn new(cfg: ResidualConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ResidualConfig { in_channels, out_channels, use_1x1conv, stride, kind } = cfg;
        let conv =
            |cin, k, s, p| Conv2dConfig { in_channels: cin, out_channels, kernel_size: k, stride: s, padding: p };
        let conv1 = Conv2d::new(conv(in_channels, 3, stride, 1), vb.pp("conv1"))?;
        let conv2 = Conv2d::new(conv(out_channels, 3, 1, 1), vb.pp("conv2"))?;
        let conv3 =
            if use_1x1conv { Some(Conv2d::new(conv(in_channels, 1, stride, 0), vb.pp("conv3"))?) } else { None };
        let bn1_channels = match kind {
            BlockKind::PostActivation => out_channels,
            BlockKind::PreActivation => in_channels,
        };
        let bn1 = BatchNorm::new(bn1_channels, vb.pp("bn1"))?;
        let bn2 = BatchNorm::new(out_channels, vb.pp("bn2"))?;
        Ok(Self { conv1, bn1, conv2, bn2, conv3, kind })
    }

    /// Chooses how the block's convolutions are computed from now on.
    pub fn set_conv_algorithm(&mut self, algorithm: ConvAlgorithm) {
        self.conv1.set_algorithm(algorithm);
        self.conv2.set_algorithm(algorithm);
        if let Some(c) = &mut self.conv3 {
            c.set_algorithm(algorithm);
        }
    }

    /// Chooses the kernels the block's convolutions and BatchNorms use on a CUDA device.
    pub fn set_gpu_ops(&mut self, ops: GpuOps) {
        for c in [&mut self.conv1, &mut self.conv2].into_iter().chain(self.conv3.as_mut()) {
            c.set_gpu_ops(ops);
        }
        self.bn1.set_gpu_ops(ops);
        self.bn2.set_gpu_ops(ops);
    }

    /// The block on channels-last tensors, as the network runs it.
    ///
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, height / stride, width / stride, out_channels)` (rounded up)
    pub(crate) fn forward_channels_last(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self.kind {
            BlockKind::PostActivation => {
                let ys = conv_bn(&self.conv1, &self.bn1, xs, train, true)?;
                let ys = conv_bn(&self.conv2, &self.bn2, &ys, train, false)?;
                let shortcut = match &self.conv3 {
                    Some(c) => c.forward(xs)?,
                    None => xs.clone(),
                };
                add_relu(&ys, &shortcut)
            }
            BlockKind::PreActivation => {
                let act = self.bn1.forward_relu_t(xs, train)?;
                let ys = self.conv2.forward_t(&conv_bn(&self.conv1, &self.bn2, &act, train, true)?, train)?;
                let shortcut = match &self.conv3 {
                    Some(c) => c.forward(&act)?,
                    None => xs.clone(),
                };
                tape::add(&ys, &shortcut)
            }
        }
    }
}

impl Residual {
    /// [`Residual::forward_channels_last`] in evaluation mode for inference (no backward graph):
    /// the same values, with the post-activation block's add+ReLU done by its last convolution
    /// as it writes its output where the BatchNorm folds ([`conv_bn_add_relu_inference`]).
    pub(crate) fn infer_channels_last(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.kind != BlockKind::PostActivation {
            return self.forward_channels_last(xs, false);
        }
        let ys = conv_bn(&self.conv1, &self.bn1, xs, false, true)?;
        let shortcut = match &self.conv3 {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        match conv_bn_add_relu_inference(&self.conv2, &self.bn2, &ys, &shortcut)? {
            Some(out) => Ok(out),
            None => add_relu(&conv_bn(&self.conv2, &self.bn2, &ys, false, false)?, &shortcut),
        }
    }
}

impl ModuleT for Residual {
    /// `train` selects BatchNorm's batch statistics (and updates the running ones).
    ///
    /// # Shapes
    /// - `xs`: `(batch, in_channels, height, width)`
    /// - returns `(batch, out_channels, height / stride, width / stride)` (rounded up)
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        to_channels_first(&self.forward_channels_last(&to_channels_last(xs)?, train)?)
    }
}

impl CollectTensors for Residual {
    fn collect_tensors(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        self.conv1.collect_tensors(&format!("{prefix}.conv1"), out);
        self.conv2.collect_tensors(&format!("{prefix}.conv2"), out);
        if let Some(c) = &self.conv3 {
            c.collect_tensors(&format!("{prefix}.conv3"), out);
        }
        self.bn1.collect_tensors(&format!("{prefix}.bn1"), out);
        self.bn2.collect_tensors(&format!("{prefix}.bn2"), out);
    }
}

/// How one stage (d2l's `resnet_block`) is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageConfig {
    /// Channels entering the stage.
    pub in_channels: usize,
    /// Channels of every block's output.
    pub out_channels: usize,
    /// Residual blocks in the stage.
    pub num_residuals: usize,
    /// Whether the first block halves the resolution (stride 2, 1×1-conv shortcut). d2l's
    /// `resnet_block` does this unless `first_block`, i.e. in every stage but `b2`.
    pub downsample: bool,
    /// Post- (d2l) or pre-activation ordering.
    pub kind: BlockKind,
}

/// d2l's `resnet_block`: `num_residuals` [`Residual`] blocks; with `downsample`, the first one
/// halves the resolution and uses a 1×1 shortcut.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{ModuleT, VarBuilder, VarMap};
/// use resnet_core::{BlockKind, Stage, StageConfig};
///
/// # fn main() -> candle_core::Result<()> {
/// // d2l's b3: resnet_block(64, 128, 2).
/// let cfg = StageConfig {
///     in_channels: 64,
///     out_channels: 128,
///     num_residuals: 2,
///     downsample: true,
///     kind: BlockKind::PostActivation,
/// };
/// let vars = VarMap::new();
/// let stage = Stage::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
/// let xs = Tensor::randn(0f32, 1., (2, 64, 8, 8), &Device::Cpu)?;
/// assert_eq!(stage.forward_t(&xs, false)?.dims(), &[2, 128, 4, 4]);
/// assert_eq!(stage.blocks().len(), 2);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Stage {
    blocks: Vec<Residual>,
}

impl Stage {
    /// Builds the stage; block `i` is named `{vb prefix}.{i}`.
    pub fn new(cfg: StageConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let StageConfig { in_channels, out_channels, num_residuals, downsample, kind } = cfg;
        let blocks = (0..num_residuals)
            .map(|i| {
                let cfg = if i == 0 && downsample {
                    ResidualConfig { in_channels, out_channels, use_1x1conv: true, stride: 2, kind }
                } else {
                    let cin = if i == 0 { in_channels } else { out_channels };
                    ResidualConfig { in_channels: cin, out_channels, use_1x1conv: cin != out_channels, stride: 1, kind }
                };
                Residual::new(cfg, vb.pp(i))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// The residual blocks, in order.
    pub fn blocks(&self) -> &[Residual] {
        &self.blocks
    }

    /// Chooses how the stage's convolutions are computed from now on.
    pub fn set_conv_algorithm(&mut self, algorithm: ConvAlgorithm) {
        for b in &mut self.blocks {
            b.set_conv_algorithm(algorithm);
        }
    }

    /// Chooses the kernels the stage's convolutions and BatchNorms use on a CUDA device.
    pub fn set_gpu_ops(&mut self, ops: GpuOps) {
        for b in &mut self.blocks {
            b.set_gpu_ops(ops);
        }
    }

    /// The stage on channels-last tensors, as the network runs it.
    pub(crate) fn forward_channels_last(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut ys = xs.clone();
        for b in &self.blocks {
            ys = b.forward_channels_last(&ys, train)?;
        }
        Ok(ys)
    }
}

impl ModuleT for Stage {
    /// `train` selects BatchNorm's batch statistics (and updates the running ones).
    ///
    /// # Shapes
    /// - `xs`: `(batch, in_channels, height, width)`
    /// - returns `(batch, out_channels, height', width')`, halved (rounded up) with `downsample`
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        to_channels_first(&self.forward_channels_last(&to_channels_last(xs)?, train)?)
    }
}

impl CollectTensors for Stage {
    fn collect_tensors(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        for (i, b) in self.blocks.iter().enumerate() {
            b.collect_tensors(&format!("{prefix}.{i}"), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn d2l_residual_shapes() -> candle_core::Result<()> {
        // d2l: Residual(3, 3) keeps (4, 3, 6, 6); Residual(3, 6, use_1x1conv, strides=2) gives (4, 6, 3, 3).
        let dev = Device::Cpu;
        for kind in [BlockKind::PostActivation, BlockKind::PreActivation] {
            let map = VarMap::new();
            let vb = VarBuilder::from_varmap(&map, DType::F32, &dev);
            let x = Tensor::randn(0f32, 1., (4, 3, 6, 6), &dev)?;
            let same = ResidualConfig { in_channels: 3, out_channels: 3, use_1x1conv: false, stride: 1, kind };
            let blk = Residual::new(same, vb.pp("a"))?;
            assert_eq!(blk.forward_t(&x, true)?.dims(), &[4, 3, 6, 6]);
            let down = ResidualConfig { in_channels: 3, out_channels: 6, use_1x1conv: true, stride: 2, kind };
            let blk = Residual::new(down, vb.pp("b"))?;
            assert_eq!(blk.forward_t(&x, false)?.dims(), &[4, 6, 3, 3]);
        }
        Ok(())
    }

    /// The public NCHW forward is the channels-last one with the layout moved, exactly, and the
    /// algorithm setting reaches every convolution (the three agree to rounding).
    #[test]
    fn nchw_forward_matches_channels_last_for_every_algorithm() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let cfg = StageConfig {
            in_channels: 3,
            out_channels: 5,
            num_residuals: 2,
            downsample: true,
            kind: BlockKind::PostActivation,
        };
        let mut stage = Stage::new(cfg, VarBuilder::from_varmap(&map, DType::F64, &dev))?;
        let x = Tensor::randn(0f64, 1., (2, 3, 7, 7), &dev)?;
        let want = stage.forward_t(&x, false)?;
        let inner = to_channels_first(&stage.forward_channels_last(&to_channels_last(&x)?, false)?)?;
        assert_eq!(want.flatten_all()?.to_vec1::<f64>()?, inner.flatten_all()?.to_vec1::<f64>()?);
        for algorithm in [ConvAlgorithm::Im2col, ConvAlgorithm::Candle] {
            stage.set_conv_algorithm(algorithm);
            let got = stage.forward_t(&x, false)?;
            let diff = (&got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-10, "{algorithm:?} differs by {diff}");
            let c = &stage.blocks()[0].conv1;
            assert_eq!(c.algorithm(), algorithm);
        }
        Ok(())
    }
}
