//! Convolution algorithms: [`dispatch`] picks one per shape and runs it as a custom op; the
//! others are the algorithms themselves, on raw channels-last buffers.

pub(crate) mod direct;
pub(crate) mod dispatch;
pub(crate) mod im2col;
pub(crate) mod taps;
pub(crate) mod whole;
pub(crate) mod winograd;

pub use dispatch::ConvAlgorithm;
