//! [`GpuOps`]: which kernels a model's convolutions, BatchNorms and max-pools run on a CUDA
//! device.

use serde::{Deserialize, Serialize};

/// Which kernels run the convolutions, training-mode BatchNorms and max-pools on a CUDA device:
/// a runtime setting of a built model ([`crate::ResNet::set_gpu_ops`]), like
/// [`crate::ConvAlgorithm`] for the CPU. The CPU ignores it.
///
/// ```
/// use resnet_core::GpuOps;
///
/// assert_eq!(GpuOps::default(), GpuOps::Candle);
/// let parsed: GpuOps = serde_json::from_str("\"cudnn\"")?;
/// assert_eq!(parsed, GpuOps::Cudnn);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuOps {
    /// candle's generic ops: convolution as patches times the weight matrix on cuBLAS, max-pool
    /// as the maximum of strided views, BatchNorm as element-wise kernels. The default until a
    /// device check has passed the cuDNN path on a GPU.
    #[default]
    Candle,
    /// cuDNN's convolution (forward, backward-data, backward-filter; f32 exact or TF32 with the
    /// `tf32` setting, bf16/f16 on tensor cores), BatchNorm (training forward with batch
    /// statistics, and backward) and max-pooling (forward, backward). Needs the `cudnn` build
    /// feature and libcudnn at run time.
    Cudnn,
}

impl GpuOps {
    /// Every choice.
    pub const ALL: [GpuOps; 2] = [GpuOps::Candle, GpuOps::Cudnn];

    /// Whether this build can run the choice (cuDNN needs the `cudnn` feature).
    pub fn compiled(self) -> bool {
        match self {
            GpuOps::Candle => true,
            GpuOps::Cudnn => cfg!(feature = "cudnn"),
        }
    }

    /// The name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            GpuOps::Candle => "candle",
            GpuOps::Cudnn => "cudnn",
        }
    }
}
