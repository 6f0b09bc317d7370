//! The layers and ops candle lacks or that the project runs faster: channels-last convolution
//! (im2col), padded max-pooling with a backward, global average pooling, BatchNorm.

pub mod batch_norm;
pub mod conv;
mod direct;
pub mod elementwise;
pub mod geometry;
pub mod im2col;
mod matmul;
pub mod pool;
mod scratch;
mod simd;
mod storage;
mod taps;
mod winograd;

pub use batch_norm::BatchNorm;
pub use conv::{Conv2d, Conv2dConfig};
pub use elementwise::{add_relu, bias_add, relu};
pub use pool::{global_avg_pool, MaxPool2d};
pub use simd::{tier as simd_tier, SimdTier};
