//! The layers a residual block is built from, over channels-last `(batch, height, width,
//! channels)` tensors with PyTorch-layout parameters.

mod batch_norm;
mod bn_pool;
mod conv;
mod conv_bn;
mod pool;
mod stem;

pub(crate) use batch_norm::BatchNorm;
pub(crate) use conv::{Conv2d, Conv2dConfig};
pub(crate) use conv_bn::{conv_bn, conv_bn_add_relu_inference, conv_bn_pool_inference};
pub(crate) use pool::{global_avg_pool, MaxPool2d};
pub(crate) use stem::conv_bn_pool;
