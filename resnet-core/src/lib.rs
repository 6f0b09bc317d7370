//! The d2l.ai ResNet family on [candle](https://github.com/huggingface/candle): d2l's `Residual`
//! block and its pre-activation variant, `resnet_block` stages, ResNet-18 and ResNet-34, with the
//! ops candle lacks (padded max-pooling with a backward, global average pooling, fast CPU
//! convolutions), seeded Xavier initialisation, and safetensors checkpoints that interoperate
//! with d2l's PyTorch `state_dict`.
//!
//! Key items:
//! - [`ResNetConfig`] (typed, serde; presets [`ResNetConfig::d2l_resnet18`] and
//!   [`ResNetConfig::resnet34`]) with [`Depth`] and [`BlockKind`];
//! - [`ResNet`]: `new(cfg, vb)`, candle's [`ModuleT`](candle_nn::ModuleT) for training,
//!   [`ResNet::forward_train`] for training with the network's own backward, [`ResNet::infer`] for evaluation without a graph, [`ResNet::set_conv_algorithm`]
//!   ([`ConvAlgorithm`]), [`ResNet::set_gpu_ops`] ([`GpuOps`]: candle's CUDA ops or cuDNN's)
//!   and [`ResNet::set_compute_dtype`] as runtime settings;
//! - [`Residual`] / [`ResidualConfig`] and [`Stage`] / [`StageConfig`], the blocks it is made of;
//! - [`d2l_init`], d2l's seeded initialisation;
//! - [`backward`], candle's `loss.backward()` with less work for the convolution weights, and
//!   the one that runs [`ResNet::forward_train`]'s backward;
//! - [`checkpoint`]: [`checkpoint::save`], [`checkpoint::read_config`], [`checkpoint::load_into`];
//! - [`op_check`]: [`op_check::check_ops`], every op on a GPU against the CPU;
//! - [`CoreError`], every failure, naming what was expected and found.
//!
//! Every public tensor is PyTorch-shaped: images `(batch, channels, height, width)`, logits
//! `(batch, num_classes)`.
//!
//! # Build, train one step, save, reload
//!
//! ```
//! use candle_core::{DType, Device, Tensor, Var};
//! use candle_nn::{loss, ModuleT, Optimizer, VarBuilder, VarMap, SGD};
//! use resnet_core::{checkpoint, d2l_init, ResNet, ResNetConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu;
//! // d2l's ResNet-18, narrowed to width 8 so the example runs in a moment.
//! let cfg = ResNetConfig { base_width: 8, ..ResNetConfig::d2l_resnet18() };
//! let vars = VarMap::new();
//! let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &device))?;
//! d2l_init(&model, 42)?;
//!
//! // One SGD step on a batch of four 28×28 grey images: (batch, channels, height, width).
//! let xs = Tensor::rand(0f32, 1., (4, 1, 28, 28), &device)?;
//! let ys = Tensor::new(&[0u32, 3, 7, 9], &device)?;
//! let params = model.parameters().iter().map(|p| Var::from_tensor(&p.tensor)).collect::<Result<Vec<_>, _>>()?;
//! let mut sgd = SGD::new(params, 0.05)?;
//! // `forward_t(&xs, true)` and `loss.backward()` give the same gradients; `forward_train`
//! // and `resnet_core::backward` run the network's own backward, with less work.
//! let before = loss::cross_entropy(&model.forward_train(&xs)?, &ys)?;
//! sgd.step(&resnet_core::backward(&before)?)?;
//!
//! // Save, then build a second model from the file alone and load the weights into it.
//! let path = std::env::temp_dir().join(format!("resnet-core-doc-{}.safetensors", std::process::id()));
//! checkpoint::save(&model, &path)?;
//! let cfg2 = checkpoint::read_config(&path)?;
//! assert_eq!(cfg2, cfg);
//! let vars2 = VarMap::new();
//! let reloaded = ResNet::new(&cfg2, VarBuilder::from_varmap(&vars2, DType::F32, &device))?;
//! checkpoint::load_into(&reloaded, &path)?;
//! std::fs::remove_file(&path)?;
//!
//! // The reloaded model is the trained one: same evaluation logits, bit for bit.
//! let (a, b) = (model.infer(&xs)?, reloaded.infer(&xs)?);
//! assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
//! // And the step changed the weights: the untrained model (same seed) gives other logits.
//! let fresh_vars = VarMap::new();
//! let fresh = ResNet::new(&cfg, VarBuilder::from_varmap(&fresh_vars, DType::F32, &device))?;
//! d2l_init(&fresh, 42)?;
//! let moved = (fresh.infer(&xs)? - &a)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(moved > 0.0);
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod block;
pub mod checkpoint;
mod config;
mod error;
mod init;
mod layout;
pub mod op_check;
mod ops;
pub mod profile;
mod resnet;
mod tensors;

pub use block::{Residual, ResidualConfig, Stage, StageConfig};
pub use config::{BlockKind, Depth, ResNetConfig};
pub use error::{CoreError, Result};
pub use init::d2l_init;
pub use ops::{backward, replay_products, simd_tier, ConvAlgorithm, GpuOps, SimdTier};
pub use resnet::{ResNet, StageShape};
pub use tensors::{NamedTensor, TensorRole};

/// The README's Rust snippet, compiled and run with the doc tests so it cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeSnippet;
