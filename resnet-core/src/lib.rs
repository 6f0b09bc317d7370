//! The d2l.ai ResNet family on [candle](https://github.com/huggingface/candle): d2l's `Residual`
//! block and its pre-activation variant, `resnet_block` stages, ResNet-18 and ResNet-34, with the
//! ops candle lacks (padded max-pooling with a backward, global average pooling, a fast
//! channels-last convolution), seeded Xavier initialisation, and safetensors checkpoints that
//! interoperate with d2l's PyTorch `state_dict`.
//!
//! Key types: [`ResNetConfig`] (typed, serde), [`ResNet`] (the model, `forward_t(xs, train)`),
//! [`Residual`] and [`Stage`], [`d2l_init`], and the [`checkpoint`] functions.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use resnet_core::{checkpoint, d2l_init, ResNet, ResNetConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = ResNetConfig { base_width: 8, ..ResNetConfig::d2l_resnet18() };
//! let vars = VarMap::new();
//! let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
//! d2l_init(&model, 42)?;
//!
//! // A batch of two 28×28 grey images: (batch, channels, height, width).
//! let xs = Tensor::zeros((2, 1, 28, 28), DType::F32, &Device::Cpu)?;
//! let logits = model.forward_t(&xs, false)?;
//! assert_eq!(logits.dims(), &[2, 10]);
//!
//! let path = std::env::temp_dir().join(format!("resnet-doc-{}.safetensors", std::process::id()));
//! checkpoint::save(&model, &path)?;
//! assert_eq!(checkpoint::read_config(&path)?, cfg);
//! # std::fs::remove_file(&path)?;
//! # Ok(())
//! # }
//! ```

pub mod block;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod init;
pub mod ops;
pub mod profile;
pub mod resnet;
pub mod tensors;

pub use block::{Residual, ResidualConfig, Stage};
pub use config::{BlockKind, ConvKernel, Depth, ResNetConfig};
pub use error::{CoreError, Result};
pub use init::d2l_init;
pub use ops::{simd_tier, SimdTier};
pub use resnet::{ResNet, StageShape};
pub use tensors::{NamedTensor, TensorRole};
