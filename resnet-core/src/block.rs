//! The residual block (d2l's `Residual` and its pre-activation variant) and `resnet_block` stages.

use candle_core::{Module, Tensor};
use candle_nn::{ModuleT, VarBuilder};

use crate::config::{BlockKind, ConvKernel};
use crate::ops::{add_relu, BatchNorm, Conv2d, Conv2dConfig};
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
    pub fn new(cfg: ResidualConfig, kernel: ConvKernel, vb: VarBuilder) -> candle_core::Result<Self> {
        let ResidualConfig { in_channels, out_channels, use_1x1conv, stride, kind } = cfg;
        let conv = |cin, k, s, p| Conv2dConfig { in_channels: cin, out_channels, kernel: k, stride: s, padding: p };
        let conv1 = Conv2d::new(conv(in_channels, 3, stride, 1), kernel, vb.pp("conv1"))?;
        let conv2 = Conv2d::new(conv(out_channels, 3, 1, 1), kernel, vb.pp("conv2"))?;
        let conv3 = if use_1x1conv {
            Some(Conv2d::new(conv(in_channels, 1, stride, 0), kernel, vb.pp("conv3"))?)
        } else {
            None
        };
        let bn1_channels = match kind {
            BlockKind::PostActivation => out_channels,
            BlockKind::PreActivation => in_channels,
        };
        let bn1 = BatchNorm::new(bn1_channels, vb.pp("bn1"))?;
        let bn2 = BatchNorm::new(out_channels, vb.pp("bn2"))?;
        Ok(Self { conv1, bn1, conv2, bn2, conv3, kind })
    }
}

impl ModuleT for Residual {
    /// # Shapes
    /// - `xs`: `(batch, height, width, in_channels)`
    /// - returns `(batch, height / stride, width / stride, out_channels)` (rounded up)
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match self.kind {
            BlockKind::PostActivation => {
                let ys = self.bn1.forward_relu_t(&self.conv1.forward(xs)?, train)?;
                let ys = self.bn2.forward_t(&self.conv2.forward(&ys)?, train)?;
                let shortcut = match &self.conv3 {
                    Some(c) => c.forward(xs)?,
                    None => xs.clone(),
                };
                add_relu(&ys, &shortcut)
            }
            BlockKind::PreActivation => {
                let act = self.bn1.forward_relu_t(xs, train)?;
                let ys = self.conv1.forward(&act)?;
                let ys = self.conv2.forward(&self.bn2.forward_relu_t(&ys, train)?)?;
                let shortcut = match &self.conv3 {
                    Some(c) => c.forward(&act)?,
                    None => xs.clone(),
                };
                ys + shortcut
            }
        }
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

/// d2l's `resnet_block`: `num_residuals` blocks; unless `first_block`, the first one halves the
/// resolution and uses a 1×1 shortcut.
#[derive(Debug, Clone)]
pub struct Stage {
    blocks: Vec<Residual>,
}

impl Stage {
    /// Builds the stage; block `i` is named `{vb prefix}.{i}`.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        num_residuals: usize,
        first_block: bool,
        kind: BlockKind,
        kernel: ConvKernel,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let blocks = (0..num_residuals)
            .map(|i| {
                let cfg = if i == 0 && !first_block {
                    ResidualConfig { in_channels, out_channels, use_1x1conv: true, stride: 2, kind }
                } else {
                    let cin = if i == 0 { in_channels } else { out_channels };
                    ResidualConfig { in_channels: cin, out_channels, use_1x1conv: cin != out_channels, stride: 1, kind }
                };
                Residual::new(cfg, kernel, vb.pp(i))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// The residual blocks, in order.
    pub fn blocks(&self) -> &[Residual] {
        &self.blocks
    }
}

impl ModuleT for Stage {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let mut ys = xs.clone();
        for b in &self.blocks {
            ys = b.forward_t(&ys, train)?;
        }
        Ok(ys)
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
            let x = Tensor::randn(0f32, 1., (4, 6, 6, 3), &dev)?;
            let same = ResidualConfig { in_channels: 3, out_channels: 3, use_1x1conv: false, stride: 1, kind };
            let blk = Residual::new(same, ConvKernel::Im2col, vb.pp("a"))?;
            assert_eq!(blk.forward_t(&x, true)?.dims(), &[4, 6, 6, 3]);
            let down = ResidualConfig { in_channels: 3, out_channels: 6, use_1x1conv: true, stride: 2, kind };
            let blk = Residual::new(down, ConvKernel::Im2col, vb.pp("b"))?;
            assert_eq!(blk.forward_t(&x, false)?.dims(), &[4, 3, 3, 6]);
        }
        Ok(())
    }
}
