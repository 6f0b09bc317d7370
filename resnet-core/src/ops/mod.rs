//! The layers and ops candle lacks or that the project runs faster, in four levels, each using
//! only the ones below it:
//!
//! - [`layers`]: the layers a block is built from (convolution, BatchNorm, pooling), taking and
//!   returning channels-last tensors;
//! - [`conv`]: which algorithm runs a convolution ([`conv::dispatch`]) and the algorithms
//!   themselves (im2col, Winograd, in-bounds taps, direct);
//! - [`cudnn`]: the CUDA ops that go through cuDNN, and the [`GpuOps`] setting that picks them;
//! - [`plumbing`]: what both share: matrix products, SIMD dispatch, scratch buffers, window
//!   geometry, weight reordering and the element-wise ops.

pub(crate) mod conv;
pub(crate) mod cudnn;
pub(crate) mod layers;
pub(crate) mod plumbing;

pub use conv::ConvAlgorithm;
pub use cudnn::GpuOps;
pub(crate) use layers::{
    conv_bn, conv_bn_add_relu_inference, conv_bn_pool, conv_bn_pool_inference, global_avg_pool, BatchNorm, Conv2d,
    Conv2dConfig, MaxPool2d,
};
pub use plumbing::gradients::backward;
pub use plumbing::matmul::replay_products;
pub use plumbing::simd::{tier as simd_tier, SimdTier};
pub(crate) use plumbing::{add_relu, tape};
