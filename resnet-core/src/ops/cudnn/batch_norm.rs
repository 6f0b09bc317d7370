//! Training-mode BatchNorm through cuDNN: batch statistics forward, cuDNN's backward for the
//! input, scale and shift, over channels-last f32 activations.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::sys;
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor};

use super::handle::{self, TensorDesc};

/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` with the batch's per-channel mean and
/// biased variance, which are returned too (for the running statistics).
///
/// # Shapes
/// - `xs`: `(batch, height, width, channels)`, f32
/// - `gamma`, `beta`: `(channels,)`, f32
/// - returns `y` as `xs`, and the mean and variance as `(channels,)`
pub(crate) fn batch_norm_train(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let saved = Arc::new(Mutex::new(None));
    let op = CudnnBatchNorm { eps, saved: Arc::clone(&saved) };
    let ys = xs.contiguous()?.apply_op3(gamma, beta, op)?;
    let (mean, inv_std) = take(&saved)?;
    // cuDNN saves 1/sqrt(var + eps); the running statistics want var.
    let var = (inv_std.sqr()?.recip()? - eps)?;
    Ok((ys, mean, var))
}

/// The forward pass's saved per-channel mean and 1/sqrt(var + eps).
type Saved = Arc<Mutex<Option<(Tensor, Tensor)>>>;

fn take(saved: &Saved) -> candle_core::Result<(Tensor, Tensor)> {
    saved
        .lock()
        .map_err(|_| candle_core::Error::Msg("cuDNN batch-norm: statistics lock poisoned".into()))?
        .clone()
        .ok_or_else(|| candle_core::Error::Msg("cuDNN batch-norm: the forward produced no statistics".into()))
}

fn put(saved: &Saved, value: (Tensor, Tensor)) -> candle_core::Result<()> {
    *saved.lock().map_err(|_| candle_core::Error::Msg("cuDNN batch-norm: statistics lock poisoned".into()))? =
        Some(value);
    Ok(())
}

fn dims(l: &Layout, c_expected: usize) -> candle_core::Result<(usize, usize, usize, usize)> {
    let d = l.shape().dims4()?;
    if d.3 != c_expected {
        candle_core::bail!("cuDNN batch-norm over {c_expected} channels got shape {:?}", l.shape())
    }
    if d.0 * d.1 * d.2 < 2 {
        candle_core::bail!("batch-norm in training needs more than one value per channel, got shape {:?}", l.shape())
    }
    Ok(d)
}

fn check_f32(s: &CudaStorage, what: &str) -> candle_core::Result<()> {
    if s.dtype() != DType::F32 {
        candle_core::bail!("cuDNN batch-norm computes in f32, got {what} in {:?}", s.dtype())
    }
    Ok(())
}

fn tensor(storage: CudaStorage, len: usize) -> Tensor {
    Tensor::from_storage(Storage::Cuda(storage), len, BackpropOp::none(), false)
}

/// The forward op; arguments `(x, gamma, beta)`.
#[derive(Debug, Clone)]
struct CudnnBatchNorm {
    eps: f64,
    saved: Saved,
}

impl CustomOp3 for CudnnBatchNorm {
    fn name(&self) -> &'static str {
        "batch-norm-cudnn"
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
        gs: &CudaStorage,
        gl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        for (s, what) in [(xs, "the input"), (gs, "the scale"), (bs, "the shift")] {
            check_f32(s, what)?;
        }
        let c = gl.shape().elem_count();
        let d = dims(xl, c)?;
        let dev = xs.device().clone();
        let shape = xl.shape().clone();
        let mut out = handle::alloc(&dev, &shape, DType::F32)?;
        let mut mean = handle::alloc(&dev, &Shape::from(c), DType::F32)?;
        let mut inv_std = handle::alloc(&dev, &Shape::from(c), DType::F32)?;
        let h = handle::handle(&dev)?;
        let (xd, pd) = (TensorDesc::nhwc(DType::F32, d)?, TensorDesc::per_channel(c)?);
        let stream = dev.cuda_stream();
        {
            let (x, _gx) = handle::read_ptr(xs, xl, &stream)?;
            let (g, _gg) = handle::read_ptr(gs, gl, &stream)?;
            let (b, _gb) = handle::read_ptr(bs, bl, &stream)?;
            let (y, _gy) = handle::write_ptr(&mut out, &stream)?;
            let (m, _gm) = handle::write_ptr(&mut mean, &stream)?;
            let (v, _gv) = handle::write_ptr(&mut inv_std, &stream)?;
            // SAFETY: pointers to live device buffers of the sizes the descriptors state; the
            // running statistics are null together (the layer updates its own, in PyTorch's way).
            unsafe {
                sys::cudnnBatchNormalizationForwardTraining(
                    h,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    handle::scalar(&handle::ONE),
                    handle::scalar(&handle::ZERO),
                    xd.0,
                    x,
                    xd.0,
                    y,
                    pd.0,
                    g,
                    b,
                    0.0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    self.eps,
                    m,
                    v,
                )
                .result()
            }?;
        }
        put(&self.saved, (tensor(mean, c), tensor(inv_std, c)))?;
        Ok((out, shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = Arc::new(Mutex::new(None));
        let op = CudnnBatchNormBackward { eps: self.eps, saved: take(&self.saved)?, grads: Arc::clone(&grads) };
        let dx = xs.apply_op3_no_bwd(gamma, &grad.contiguous()?, &op)?;
        let (dgamma, dbeta) = take(&grads)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward op; arguments `(x, gamma, dy)`, result `dx`; `dgamma` and `dbeta` go to `grads`.
#[derive(Debug, Clone)]
struct CudnnBatchNormBackward {
    eps: f64,
    saved: (Tensor, Tensor),
    grads: Saved,
}

impl CustomOp3 for CudnnBatchNormBackward {
    fn name(&self) -> &'static str {
        "batch-norm-cudnn-backward"
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
        gs: &CudaStorage,
        gl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        for (s, what) in [(xs, "the input"), (gs, "the scale"), (dys, "the gradient")] {
            check_f32(s, what)?;
        }
        let c = gl.shape().elem_count();
        let d = dims(xl, c)?;
        if dyl.shape() != xl.shape() {
            candle_core::bail!("cuDNN batch-norm backward: gradient {:?} for input {:?}", dyl.shape(), xl.shape())
        }
        let dev = xs.device().clone();
        let shape = xl.shape().clone();
        let mut dx = handle::alloc(&dev, &shape, DType::F32)?;
        let mut dgamma = handle::alloc(&dev, &Shape::from(c), DType::F32)?;
        let mut dbeta = handle::alloc(&dev, &Shape::from(c), DType::F32)?;
        let h = handle::handle(&dev)?;
        let (xd, pd) = (TensorDesc::nhwc(DType::F32, d)?, TensorDesc::per_channel(c)?);
        let stream = dev.cuda_stream();
        let (mean_store, mean_l) = self.saved.0.storage_and_layout();
        let (inv_store, inv_l) = self.saved.1.storage_and_layout();
        let (Storage::Cuda(mean_s), Storage::Cuda(inv_s)) = (&*mean_store, &*inv_store) else {
            candle_core::bail!("cuDNN batch-norm backward: saved statistics are not on the GPU")
        };
        {
            let (x, _gx) = handle::read_ptr(xs, xl, &stream)?;
            let (g, _gg) = handle::read_ptr(gs, gl, &stream)?;
            let (dy, _gdy) = handle::read_ptr(dys, dyl, &stream)?;
            let (m, _gm) = handle::read_ptr(mean_s, mean_l, &stream)?;
            let (v, _gv) = handle::read_ptr(inv_s, inv_l, &stream)?;
            let (dx_p, _gdx) = handle::write_ptr(&mut dx, &stream)?;
            let (dg, _gdg) = handle::write_ptr(&mut dgamma, &stream)?;
            let (db, _gdb) = handle::write_ptr(&mut dbeta, &stream)?;
            // SAFETY: pointers to live device buffers of the sizes the descriptors state.
            unsafe {
                sys::cudnnBatchNormalizationBackward(
                    h,
                    sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                    handle::scalar(&handle::ONE),
                    handle::scalar(&handle::ZERO),
                    handle::scalar(&handle::ONE),
                    handle::scalar(&handle::ZERO),
                    xd.0,
                    x,
                    xd.0,
                    dy,
                    xd.0,
                    dx_p,
                    pd.0,
                    g,
                    dg,
                    db,
                    self.eps,
                    m,
                    v,
                )
                .result()
            }?;
        }
        put(&self.grads, (tensor(dgamma, c), tensor(dbeta, c)))?;
        Ok((dx, shape))
    }
}
