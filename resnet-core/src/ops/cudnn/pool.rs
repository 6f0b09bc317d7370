//! Max-pooling through cuDNN, forward and backward, any kernel, stride and padding, over
//! channels-last activations.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::handle::{self, PoolDesc, TensorDesc};

/// Max-pooling in which padded cells never win.
///
/// # Shapes
/// - `xs`: `(batch, height, width, channels)`
/// - returns `(batch, out_h, out_w, channels)`
pub(crate) fn max_pool2d(xs: &Tensor, kernel: usize, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op1(CudnnMaxPool { kernel, stride, pad })
}

/// The forward op.
#[derive(Debug, Clone, Copy)]
struct CudnnMaxPool {
    kernel: usize,
    stride: usize,
    pad: usize,
}

impl CudnnMaxPool {
    fn out_dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, h, w, c) = l.shape().dims4()?;
        let out = |n: usize| (n + 2 * self.pad).checked_sub(self.kernel).map(|d| d / self.stride + 1);
        match (out(h), out(w)) {
            (Some(oh), Some(ow)) if self.stride > 0 && 2 * self.pad <= self.kernel => Ok((b, oh, ow, c)),
            _ => candle_core::bail!(
                "cuDNN max-pool: kernel {} stride {} padding {} does not fit a {h}x{w} input",
                self.kernel,
                self.stride,
                self.pad
            ),
        }
    }
}

impl CustomOp1 for CudnnMaxPool {
    fn name(&self) -> &'static str {
        "max-pool-cudnn"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA devices only", self.name())
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let dtype = xs.dtype();
        let y = self.out_dims(xl)?;
        let dev = xs.device().clone();
        let shape = Shape::from(y);
        let mut out = handle::alloc(&dev, &shape, dtype)?;
        let h = handle::handle(&dev)?;
        let (xd, yd) = (TensorDesc::nhwc(dtype, xl.shape().dims4()?)?, TensorDesc::nhwc(dtype, y)?);
        let pool = PoolDesc::max(self.kernel, self.stride, self.pad)?;
        let stream = dev.cuda_stream();
        {
            let (x, _gx) = handle::read_ptr(xs, xl, &stream)?;
            let (y_ptr, _gy) = handle::write_ptr(&mut out, &stream)?;
            // SAFETY: pointers to live device buffers of the sizes the descriptors state.
            unsafe {
                sys::cudnnPoolingForward(
                    h,
                    pool.0,
                    handle::scalar(&handle::ONE),
                    xd.0,
                    x,
                    handle::scalar(&handle::ZERO),
                    yd.0,
                    y_ptr,
                )
                .result()
            }?;
        }
        Ok((out, shape))
    }

    fn bwd(&self, xs: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = CudnnMaxPoolBackward { pool: *self };
        Ok(Some(xs.apply_op3_no_bwd(res, &grad.contiguous()?, &op)?))
    }
}

/// The backward op; arguments `(x, y, dy)`, result `dx`.
#[derive(Debug, Clone, Copy)]
struct CudnnMaxPoolBackward {
    pool: CudnnMaxPool,
}

impl CustomOp3 for CudnnMaxPoolBackward {
    fn name(&self) -> &'static str {
        "max-pool-cudnn-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{} runs on CUDA devices only", self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ys: &CudaStorage,
        yl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dtype = xs.dtype();
        let y = self.pool.out_dims(xl)?;
        if yl.shape().dims4()? != y || dyl.shape().dims4()? != y {
            candle_core::bail!(
                "cuDNN max-pool backward: output {:?} and gradient {:?}, expected {y:?}",
                yl.shape(),
                dyl.shape()
            )
        }
        let dev = xs.device().clone();
        let shape = xl.shape().clone();
        let mut dx = handle::alloc(&dev, &shape, dtype)?;
        let h = handle::handle(&dev)?;
        let (xd, yd) = (TensorDesc::nhwc(dtype, xl.shape().dims4()?)?, TensorDesc::nhwc(dtype, y)?);
        let pool = PoolDesc::max(self.pool.kernel, self.pool.stride, self.pool.pad)?;
        let stream = dev.cuda_stream();
        {
            let (x, _gx) = handle::read_ptr(xs, xl, &stream)?;
            let (y_ptr, _gy) = handle::read_ptr(ys, yl, &stream)?;
            let (dy, _gdy) = handle::read_ptr(dys, dyl, &stream)?;
            let (dx_p, _gdx) = handle::write_ptr(&mut dx, &stream)?;
            // SAFETY: pointers to live device buffers of the sizes the descriptors state.
            unsafe {
                sys::cudnnPoolingBackward(
                    h,
                    pool.0,
                    handle::scalar(&handle::ONE),
                    yd.0,
                    y_ptr,
                    yd.0,
                    dy,
                    xd.0,
                    x,
                    handle::scalar(&handle::ZERO),
                    xd.0,
                    dx_p,
                )
                .result()
            }?;
        }
        Ok((dx, shape))
    }
}
