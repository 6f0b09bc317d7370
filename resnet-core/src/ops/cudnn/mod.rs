//! The CUDA ops that go through cuDNN (convolution forward, backward-data and backward-filter;
//! training-mode BatchNorm; max-pooling), each a candle custom op whose backward is cuDNN's
//! too, and [`GpuOps`], the runtime setting that chooses them. Built with the `cudnn` feature;
//! without it the entry points refuse with a message that names the feature.

#[cfg(feature = "cudnn")]
mod batch_norm;
#[cfg(feature = "cudnn")]
mod conv;
#[cfg(feature = "cudnn")]
mod handle;
#[cfg(feature = "cudnn")]
mod pool;
mod setting;
#[cfg(not(feature = "cudnn"))]
mod unavailable;

#[cfg(feature = "cudnn")]
pub(crate) use batch_norm::batch_norm_train;
#[cfg(feature = "cudnn")]
pub(crate) use conv::conv2d;
#[cfg(feature = "cudnn")]
pub(crate) use pool::max_pool2d;
pub use setting::GpuOps;
#[cfg(not(feature = "cudnn"))]
pub(crate) use unavailable::{batch_norm_train, conv2d, max_pool2d};
