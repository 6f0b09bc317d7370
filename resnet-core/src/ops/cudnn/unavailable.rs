//! The cuDNN entry points of a build without the `cudnn` feature: each refuses, naming it.

use candle_core::Tensor;

fn refuse<T>() -> candle_core::Result<T> {
    candle_core::bail!("this build has no cuDNN ops: it needs the `cudnn` build feature (see the README, \"GPU\")")
}

pub(crate) fn conv2d(_: &Tensor, _: &Tensor, _: usize, _: usize) -> candle_core::Result<Tensor> {
    refuse()
}

pub(crate) fn batch_norm_train(
    _: &Tensor,
    _: &Tensor,
    _: &Tensor,
    _: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    refuse()
}

pub(crate) fn max_pool2d(_: &Tensor, _: usize, _: usize, _: usize) -> candle_core::Result<Tensor> {
    refuse()
}
