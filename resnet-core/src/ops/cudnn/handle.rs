//! What every cuDNN op needs: the per-thread cuDNN handle of a CUDA device, descriptors that
//! free themselves, and raw device pointers into candle's storages.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, CudaStorageSlice, DeviceId};
use candle_core::{DType, Layout, Shape};

/// A cuDNN handle bound to a device's stream. cuDNN handles are neither `Send` nor `Sync`, so
/// each thread keeps its own (candle runs a backward pass on the thread of its forward).
struct Handle(sys::cudnnHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create_handle` and is dropped once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, Handle>> = RefCell::new(HashMap::new());
}

/// The calling thread's cuDNN handle for `dev`, created on first use and set to the device's
/// stream, so cuDNN's kernels queue behind candle's.
pub(crate) fn handle(dev: &CudaDevice) -> candle_core::Result<sys::cudnnHandle_t> {
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if let Some(h) = handles.get(&dev.id()) {
            return Ok(h.0);
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread()?;
        let h = Handle(result::create_handle()?);
        // SAFETY: a live handle and the device's live stream.
        unsafe { result::set_stream(h.0, stream.cu_stream() as sys::cudaStream_t) }?;
        let raw = h.0;
        handles.insert(dev.id(), h);
        Ok(raw)
    })
}

/// cuDNN's name for a candle dtype; the ops take the floating-point types.
pub(crate) fn data_type(dtype: DType) -> candle_core::Result<sys::cudnnDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        other => candle_core::bail!("cuDNN ops take f32, bf16 or f16 tensors, got {other:?}"),
    })
}

/// A size as cuDNN's `int`.
pub(crate) fn int(n: usize) -> candle_core::Result<i32> {
    i32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("a size of {n} exceeds cuDNN's int range")))
}

/// A 4-D tensor descriptor, freed on drop.
pub(crate) struct TensorDesc(pub(crate) sys::cudnnTensorDescriptor_t);

impl TensorDesc {
    /// A channels-last activation `(batch, height, width, channels)`.
    pub(crate) fn nhwc(dtype: DType, (n, h, w, c): (usize, usize, usize, usize)) -> candle_core::Result<Self> {
        let desc = Self(result::create_tensor_descriptor()?);
        let dims = [int(n)?, int(c)?, int(h)?, int(w)?];
        let format = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        // SAFETY: a live descriptor.
        unsafe { result::set_tensor4d_descriptor(desc.0, format, data_type(dtype)?, dims) }?;
        Ok(desc)
    }

    /// A per-channel f32 vector `(1, channels, 1, 1)`: BatchNorm's scale, shift and statistics.
    pub(crate) fn per_channel(c: usize) -> candle_core::Result<Self> {
        let desc = Self(result::create_tensor_descriptor()?);
        let (format, float) = (sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, sys::cudnnDataType_t::CUDNN_DATA_FLOAT);
        // SAFETY: a live descriptor.
        unsafe { result::set_tensor4d_descriptor(desc.0, format, float, [1, int(c)?, 1, 1]) }?;
        Ok(desc)
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_tensor_descriptor`, dropped once.
        let _ = unsafe { result::destroy_tensor_descriptor(self.0) };
    }
}

/// A filter descriptor for a weight stored `(out, kh, kw, in)` (cuDNN's NHWC filter format).
pub(crate) struct FilterDesc(pub(crate) sys::cudnnFilterDescriptor_t);

impl FilterDesc {
    pub(crate) fn ohwi(dtype: DType, (o, kh, kw, i): (usize, usize, usize, usize)) -> candle_core::Result<Self> {
        let desc = Self(result::create_filter_descriptor()?);
        let dims = [int(o)?, int(i)?, int(kh)?, int(kw)?];
        let format = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        // SAFETY: a live descriptor.
        unsafe { result::set_filter4d_descriptor(desc.0, data_type(dtype)?, format, dims) }?;
        Ok(desc)
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_filter_descriptor`, dropped once.
        let _ = unsafe { result::destroy_filter_descriptor(self.0) };
    }
}

/// A convolution descriptor with its math mode, freed on drop.
pub(crate) struct ConvDesc(pub(crate) sys::cudnnConvolutionDescriptor_t);

impl ConvDesc {
    /// Cross-correlation (PyTorch's convolution) with f32 accumulation. The math mode follows
    /// the data: bf16/f16 on tensor cores; f32 on TF32 tensor cores only when candle's f32
    /// products are allowed reduced precision (the `tf32` setting), else exact f32 FMA.
    pub(crate) fn new(dtype: DType, stride: usize, pad: usize) -> candle_core::Result<Self> {
        let desc = Self(result::create_convolution_descriptor()?);
        let (s, p) = (int(stride)?, int(pad)?);
        let mode = sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
        let float = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        // SAFETY: a live descriptor.
        unsafe { result::set_convolution2d_descriptor(desc.0, p, p, s, s, 1, 1, mode, float) }?;
        let math = match dtype {
            DType::F32 if candle_core::cuda::gemm_reduced_precision_f32() => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
            DType::F32 | DType::F64 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        };
        // SAFETY: a live descriptor.
        unsafe { result::set_convolution_math_type(desc.0, math) }?;
        Ok(desc)
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_convolution_descriptor`, dropped once.
        let _ = unsafe { result::destroy_convolution_descriptor(self.0) };
    }
}

/// A 2-D max-pooling descriptor; padded cells never win.
pub(crate) struct PoolDesc(pub(crate) sys::cudnnPoolingDescriptor_t);

impl PoolDesc {
    pub(crate) fn max(kernel: usize, stride: usize, pad: usize) -> candle_core::Result<Self> {
        let desc = Self(result::create_pooling_descriptor()?);
        let (k, s, p) = (int(kernel)?, int(stride)?, int(pad)?);
        let mode = sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC;
        let nan = sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN;
        // SAFETY: a live descriptor; three arrays of two.
        unsafe { result::set_pooling_descriptor(desc.0, mode, nan, 2, &[k, k], &[p, p], &[s, s]) }?;
        Ok(desc)
    }
}

impl Drop for PoolDesc {
    fn drop(&mut self) {
        // SAFETY: created by `create_pooling_descriptor`, dropped once.
        let _ = unsafe { sys::cudnnDestroyPoolingDescriptor(self.0) };
    }
}

/// The device address of a storage's first element under `layout`, which must be contiguous,
/// and the guard that orders later work on the storage after the read.
pub(crate) fn read_ptr<'a>(
    s: &'a CudaStorage,
    layout: &Layout,
    stream: &'a CudaStream,
) -> candle_core::Result<(*const c_void, SyncOnDrop<'a>)> {
    if !layout.is_contiguous() {
        candle_core::bail!("cuDNN ops take contiguous tensors, got strides {:?}", layout.stride())
    }
    let (base, guard) = match &s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr(stream),
        CudaStorageSlice::BF16(x) => x.device_ptr(stream),
        CudaStorageSlice::F16(x) => x.device_ptr(stream),
        _ => candle_core::bail!("cuDNN ops take f32, bf16 or f16 tensors, got {:?}", s.dtype()),
    };
    let offset = layout.start_offset() * s.dtype().size_in_bytes();
    Ok(((base as usize + offset) as *const c_void, guard))
}

/// The device address of a whole storage, for writing.
pub(crate) fn write_ptr<'a>(
    s: &'a mut CudaStorage,
    stream: &'a CudaStream,
) -> candle_core::Result<(*mut c_void, SyncOnDrop<'a>)> {
    let dtype = s.dtype();
    let (base, guard) = match &mut s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr_mut(stream),
        CudaStorageSlice::BF16(x) => x.device_ptr_mut(stream),
        CudaStorageSlice::F16(x) => x.device_ptr_mut(stream),
        _ => candle_core::bail!("cuDNN ops write f32, bf16 or f16 tensors, got {dtype:?}"),
    };
    Ok((base as usize as *mut c_void, guard))
}

/// Fresh device memory for a `shape` of `dtype`; every op here overwrites all of it.
pub(crate) fn alloc(dev: &CudaDevice, shape: &Shape, dtype: DType) -> candle_core::Result<CudaStorage> {
    // SAFETY: the callers write every element before the storage is read.
    unsafe { dev.alloc_uninit(shape, dtype) }
}

/// A byte workspace of `len` bytes (none for 0).
pub(crate) fn workspace(
    dev: &CudaDevice,
    len: usize,
) -> candle_core::Result<Option<candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>>> {
    if len == 0 {
        return Ok(None);
    }
    // SAFETY: cuDNN's workspace needs no initial contents.
    Ok(Some(unsafe { dev.alloc::<u8>(len) }?))
}

/// The address of an optional workspace (null for none) and its guard.
pub(crate) fn workspace_ptr<'a>(
    work: Option<&'a mut candle_core::cuda_backend::cudarc::driver::CudaSlice<u8>>,
    stream: &'a CudaStream,
) -> (*mut c_void, Option<SyncOnDrop<'a>>) {
    match work {
        Some(buf) => {
            let (p, g) = buf.device_ptr_mut(stream);
            (p as usize as *mut c_void, Some(g))
        }
        None => (std::ptr::null_mut(), None),
    }
}

/// cuDNN's scaling factors: `f32` for f32, bf16 and f16 data.
pub(crate) const ONE: f32 = 1.0;
/// See [`ONE`].
pub(crate) const ZERO: f32 = 0.0;

/// `&ONE`/`&ZERO` as cuDNN takes them.
pub(crate) fn scalar(v: &f32) -> *const c_void {
    v as *const f32 as *const c_void
}
