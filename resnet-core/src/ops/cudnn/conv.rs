//! Convolution through cuDNN as one custom op whose backward is cuDNN's backward-data and
//! backward-filter, on channels-last activations and `(out, kh, kw, in)` weights.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result, sys};
use candle_core::cuda_backend::CudaStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::handle::{self, ConvDesc, FilterDesc, TensorDesc};
use crate::ops::plumbing::tape;

/// `y = conv(x, w)` without bias (the layer adds it with candle's broadcast add).
///
/// # Shapes
/// - `xs`: `(batch, height, width, in_channels)`
/// - `weight`: `(out_channels, kernel, kernel, in_channels)`
/// - returns `(batch, out_h, out_w, out_channels)`
pub(crate) fn conv2d(xs: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> candle_core::Result<Tensor> {
    xs.contiguous()?.apply_op2(&weight.contiguous()?, CudnnConv { stride, pad })
}

/// The geometry every direction shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Geometry {
    x: (usize, usize, usize, usize),
    w: (usize, usize, usize, usize),
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn y(&self) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, h, w, _) = self.x;
        let (o, kh, kw, _) = self.w;
        let out = |n: usize, k: usize| (n + 2 * self.pad).checked_sub(k).map(|d| d / self.stride + 1);
        match (out(h, kh), out(w, kw)) {
            (Some(oh), Some(ow)) if self.stride > 0 => Ok((b, oh, ow, o)),
            _ => candle_core::bail!("cuDNN conv: a {kh}x{kw} kernel does not fit a {h}x{w} input"),
        }
    }
}

/// Which of the three convolutions a cached algorithm belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Direction {
    Forward,
    Data,
    Filter,
}

/// Cache key: the algorithm cuDNN's heuristics pick depends on shape, dtype and math mode.
type Key = (Direction, Geometry, DType, bool);

/// An algorithm of one of the three directions.
#[derive(Debug, Clone, Copy)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

thread_local! {
    static ALGOS: RefCell<HashMap<Key, Algo>> = RefCell::new(HashMap::new());
}

/// The cached algorithm for `key`, or `pick()`'s, remembered: the heuristics query costs more
/// than a small convolution.
fn algorithm(key: Key, pick: impl FnOnce() -> candle_core::Result<Algo>) -> candle_core::Result<Algo> {
    if let Some(a) = ALGOS.with(|m| m.borrow().get(&key).copied()) {
        return Ok(a);
    }
    let a = pick()?;
    ALGOS.with(|m| m.borrow_mut().insert(key, a));
    Ok(a)
}

fn key(direction: Direction, g: Geometry, dtype: DType) -> Key {
    (direction, g, dtype, candle_core::cuda::gemm_reduced_precision_f32())
}

fn cpu_refused(name: &str) -> candle_core::Result<(CpuStorage, Shape)> {
    candle_core::bail!("{name} runs on CUDA devices only; the CPU uses the project's own kernels")
}

/// The forward op.
#[derive(Debug, Clone, Copy)]
struct CudnnConv {
    stride: usize,
    pad: usize,
}

impl CustomOp2 for CudnnConv {
    fn name(&self) -> &'static str {
        "conv2d-cudnn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dtype = xs.dtype();
        if ws.dtype() != dtype {
            candle_core::bail!("cuDNN conv: input is {dtype:?} but weight is {:?}", ws.dtype())
        }
        let g = Geometry { x: xl.shape().dims4()?, w: wl.shape().dims4()?, stride: self.stride, pad: self.pad };
        if g.x.3 != g.w.3 {
            candle_core::bail!("cuDNN conv: input has {} channels, weight expects {}", g.x.3, g.w.3)
        }
        let y = g.y()?;
        let dev = xs.device().clone();
        let shape = Shape::from(y);
        let mut out = handle::alloc(&dev, &shape, dtype)?;
        let h = handle::handle(&dev)?;
        let (xd, wd, yd) = (TensorDesc::nhwc(dtype, g.x)?, FilterDesc::ohwi(dtype, g.w)?, TensorDesc::nhwc(dtype, y)?);
        let conv = ConvDesc::new(dtype, self.stride, self.pad)?;
        let algo = algorithm(key(Direction::Forward, g, dtype), || {
            let mut n = 0;
            // SAFETY: all-zero bytes are a valid perf struct (an enum discriminant of 0 exists).
            let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = unsafe { std::mem::zeroed() };
            // SAFETY: live descriptors; room for 8 results.
            unsafe {
                result::get_convolution_forward_algorithm(h, xd.0, wd.0, conv.0, yd.0, 8, &mut n, perf.as_mut_ptr())
            }?;
            let found =
                perf.iter().take(n.max(0) as usize).find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS);
            found
                .map(|p| Algo::Forward(p.algo))
                .ok_or_else(|| candle_core::Error::Msg("cuDNN has no forward algorithm for this convolution".into()))
        })?;
        let Algo::Forward(algo) = algo else { candle_core::bail!("cuDNN conv: a cached algorithm of the wrong kind") };
        // SAFETY: live descriptors.
        let ws_len = unsafe { result::get_convolution_forward_workspace_size(h, xd.0, wd.0, conv.0, yd.0, algo) }?;
        let mut work = handle::workspace(&dev, ws_len)?;
        let stream = dev.cuda_stream();
        {
            let (x, _gx) = handle::read_ptr(xs, xl, &stream)?;
            let (w, _gw) = handle::read_ptr(ws, wl, &stream)?;
            let (y_ptr, _gy) = handle::write_ptr(&mut out, &stream)?;
            let (work_ptr, _gk) = handle::workspace_ptr(work.as_mut(), &stream);
            // SAFETY: pointers to live device buffers of the sizes the descriptors state.
            unsafe {
                result::convolution_forward(
                    h,
                    handle::scalar(&handle::ONE),
                    xd.0,
                    x,
                    wd.0,
                    w,
                    conv.0,
                    algo,
                    work_ptr,
                    ws_len,
                    handle::scalar(&handle::ZERO),
                    yd.0,
                    y_ptr,
                )
            }?;
        }
        Ok((out, shape))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        ws: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (_, h, w, _) = xs.dims4()?;
        let (_, kh, kw, _) = ws.dims4()?;
        let dx = if tape::wants_grad(xs) {
            Some(grad.apply_op2_no_bwd(ws, &CudnnConvData { stride: self.stride, pad: self.pad, h, w })?)
        } else {
            None
        };
        let dw = xs.apply_op2_no_bwd(&grad, &CudnnConvFilter { stride: self.stride, pad: self.pad, kh, kw })?;
        Ok((dx, Some(dw)))
    }
}

/// `dx = conv_backward_data(dy, w)`; arguments `(dy, w)`.
#[derive(Debug, Clone, Copy)]
struct CudnnConvData {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for CudnnConvData {
    fn name(&self) -> &'static str {
        "conv2d-cudnn-backward-data"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        dys: &CudaStorage,
        dyl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dtype = dys.dtype();
        let (b, _, _, _) = dyl.shape().dims4()?;
        let wdims = wl.shape().dims4()?;
        let g = Geometry { x: (b, self.h, self.w, wdims.3), w: wdims, stride: self.stride, pad: self.pad };
        let y = g.y()?;
        if y != dyl.shape().dims4()? {
            candle_core::bail!("cuDNN conv backward: gradient {:?} does not match the output {y:?}", dyl.shape())
        }
        let dev = dys.device().clone();
        let shape = Shape::from(g.x);
        let mut out = handle::alloc(&dev, &shape, dtype)?;
        let h = handle::handle(&dev)?;
        let (xd, wd, yd) = (TensorDesc::nhwc(dtype, g.x)?, FilterDesc::ohwi(dtype, g.w)?, TensorDesc::nhwc(dtype, y)?);
        let conv = ConvDesc::new(dtype, self.stride, self.pad)?;
        let algo = algorithm(key(Direction::Data, g, dtype), || {
            let mut n = 0;
            // SAFETY: all-zero bytes are a valid perf struct.
            let mut perf: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 6] = unsafe { std::mem::zeroed() };
            // SAFETY: live descriptors; room for 6 results.
            unsafe {
                result::get_convolution_backward_data_algorithm(
                    h,
                    wd.0,
                    yd.0,
                    conv.0,
                    xd.0,
                    6,
                    &mut n,
                    perf.as_mut_ptr(),
                )
            }?;
            let found =
                perf.iter().take(n.max(0) as usize).find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS);
            found.map(|p| Algo::Data(p.algo)).ok_or_else(|| {
                candle_core::Error::Msg("cuDNN has no backward-data algorithm for this convolution".into())
            })
        })?;
        let Algo::Data(algo) = algo else { candle_core::bail!("cuDNN conv: a cached algorithm of the wrong kind") };
        // SAFETY: live descriptors.
        let ws_len =
            unsafe { result::get_convolution_backward_data_workspace_size(h, wd.0, yd.0, conv.0, xd.0, algo) }?;
        let mut work = handle::workspace(&dev, ws_len)?;
        let stream = dev.cuda_stream();
        {
            let (dy, _gy) = handle::read_ptr(dys, dyl, &stream)?;
            let (w, _gw) = handle::read_ptr(ws, wl, &stream)?;
            let (dx, _gx) = handle::write_ptr(&mut out, &stream)?;
            let (work_ptr, _gk) = handle::workspace_ptr(work.as_mut(), &stream);
            // SAFETY: pointers to live device buffers of the sizes the descriptors state.
            unsafe {
                result::convolution_backward_data(
                    h,
                    handle::scalar(&handle::ONE),
                    wd.0,
                    w,
                    yd.0,
                    dy,
                    conv.0,
                    algo,
                    work_ptr,
                    ws_len,
                    handle::scalar(&handle::ZERO),
                    xd.0,
                    dx,
                )
            }?;
        }
        Ok((out, shape))
    }
}

/// `dw = conv_backward_filter(x, dy)`; arguments `(x, dy)`.
#[derive(Debug, Clone, Copy)]
struct CudnnConvFilter {
    stride: usize,
    pad: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for CudnnConvFilter {
    fn name(&self) -> &'static str {
        "conv2d-cudnn-backward-filter"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_refused(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        dys: &CudaStorage,
        dyl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dtype = xs.dtype();
        let x = xl.shape().dims4()?;
        let (_, _, _, o) = dyl.shape().dims4()?;
        let g = Geometry { x, w: (o, self.kh, self.kw, x.3), stride: self.stride, pad: self.pad };
        let y = g.y()?;
        if y != dyl.shape().dims4()? {
            candle_core::bail!("cuDNN conv backward: gradient {:?} does not match the output {y:?}", dyl.shape())
        }
        let dev = xs.device().clone();
        let shape = Shape::from(g.w);
        let mut out = handle::alloc(&dev, &shape, dtype)?;
        let h = handle::handle(&dev)?;
        let (xd, wd, yd) = (TensorDesc::nhwc(dtype, g.x)?, FilterDesc::ohwi(dtype, g.w)?, TensorDesc::nhwc(dtype, y)?);
        let conv = ConvDesc::new(dtype, self.stride, self.pad)?;
        let algo = algorithm(key(Direction::Filter, g, dtype), || {
            let mut n = 0;
            // SAFETY: all-zero bytes are a valid perf struct.
            let mut perf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 7] = unsafe { std::mem::zeroed() };
            // SAFETY: live descriptors; room for 7 results.
            unsafe {
                result::get_convolution_backward_filter_algorithm(
                    h,
                    xd.0,
                    yd.0,
                    conv.0,
                    wd.0,
                    7,
                    &mut n,
                    perf.as_mut_ptr(),
                )
            }?;
            let found =
                perf.iter().take(n.max(0) as usize).find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS);
            found.map(|p| Algo::Filter(p.algo)).ok_or_else(|| {
                candle_core::Error::Msg("cuDNN has no backward-filter algorithm for this convolution".into())
            })
        })?;
        let Algo::Filter(algo) = algo else { candle_core::bail!("cuDNN conv: a cached algorithm of the wrong kind") };
        // SAFETY: live descriptors.
        let ws_len =
            unsafe { result::get_convolution_backward_filter_workspace_size(h, xd.0, yd.0, conv.0, wd.0, algo) }?;
        let mut work = handle::workspace(&dev, ws_len)?;
        let stream = dev.cuda_stream();
        {
            let (x_ptr, _gx) = handle::read_ptr(xs, xl, &stream)?;
            let (dy, _gy) = handle::read_ptr(dys, dyl, &stream)?;
            let (dw, _gw) = handle::write_ptr(&mut out, &stream)?;
            let (work_ptr, _gk) = handle::workspace_ptr(work.as_mut(), &stream);
            // SAFETY: pointers to live device buffers of the sizes the descriptors state.
            unsafe {
                result::convolution_backward_filter(
                    h,
                    handle::scalar(&handle::ONE),
                    xd.0,
                    x_ptr,
                    yd.0,
                    dy,
                    conv.0,
                    algo,
                    work_ptr,
                    ws_len,
                    handle::scalar(&handle::ZERO),
                    wd.0,
                    dw,
                )
            }?;
        }
        Ok((out, shape))
    }
}
