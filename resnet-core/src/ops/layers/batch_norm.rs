//! Batch normalisation over the channel axis of channels-last tensors, with PyTorch semantics.

use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, Var, WithDType};
use candle_nn::{Init, ModuleT, VarBuilder};
use rayon::prelude::*;

use crate::ops::cudnn::{self, GpuOps};
use crate::ops::plumbing::elementwise::{column_sums_total, COLUMN_ROWS};
use crate::ops::plumbing::scratch::{self, Slot};
use crate::ops::plumbing::simd::with_fma;
use crate::ops::plumbing::storage::contiguous;
use crate::ops::plumbing::tape;

/// BatchNorm2d as PyTorch defines it: batch statistics and a running-average update
/// (momentum 0.1, unbiased variance) in training; running statistics in evaluation.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    num_batches_tracked: Var,
    eps: f64,
    momentum: f64,
    gpu_ops: GpuOps,
}

impl BatchNorm {
    /// PyTorch's defaults.
    pub const EPS: f64 = 1e-5;
    /// PyTorch's default momentum for the running statistics.
    pub const MOMENTUM: f64 = 0.1;

    /// Creates `weight`, `bias`, `running_mean`, `running_var` and `num_batches_tracked` under `vb`.
    pub fn new(channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        let running_mean = Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
        let running_var = Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
        // Kept as f32 so it lives beside the other buffers; exported as int64 for PyTorch.
        let num_batches_tracked = Var::from_tensor(&vb.get_with_hints((), "num_batches_tracked", Init::Const(0.0))?)?;
        Ok(Self {
            weight,
            bias,
            running_mean,
            running_var,
            num_batches_tracked,
            eps: Self::EPS,
            momentum: Self::MOMENTUM,
            gpu_ops: GpuOps::default(),
        })
    }

    /// Chooses the kernels training-mode forward passes use on a CUDA device (evaluation is one
    /// scale-and-shift either way).
    pub fn set_gpu_ops(&mut self, ops: GpuOps) {
        self.gpu_ops = ops;
    }

    /// Scale γ, `(channels,)`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Shift β, `(channels,)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Running mean, `(channels,)`.
    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    /// Running (unbiased) variance, `(channels,)`.
    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// The ε added to the variance.
    pub(super) fn eps(&self) -> f64 {
        self.eps
    }

    /// Training-mode forward passes so far (PyTorch's `num_batches_tracked`).
    pub fn num_batches_tracked(&self) -> &Tensor {
        self.num_batches_tracked.as_tensor()
    }

    /// Runs `apply` with a fresh training-mode CPU op over `rows` values per channel (the op
    /// records the batch statistics as it runs), then folds the statistics into the running ones.
    pub(super) fn train_with(
        &self,
        relu: bool,
        rows: usize,
        apply: impl FnOnce(FusedBatchNorm) -> candle_core::Result<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let stats = Arc::new(Mutex::new(None));
        let ys = apply(FusedBatchNorm { eps: self.eps, relu, stats: Arc::clone(&stats) })?;
        let (mean, var) = stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch-norm statistics lock poisoned".into()))?
            .clone()
            .map(|s: Stats| (s.mean, s.var))
            .ok_or_else(|| candle_core::Error::Msg("batch-norm forward produced no statistics".into()))?;
        let c = mean.len();
        let device = self.running_mean.device();
        let mean = Tensor::from_vec(mean, c, device)?.to_dtype(self.running_mean.dtype())?;
        let var = Tensor::from_vec(var, c, device)?.to_dtype(self.running_var.dtype())?;
        self.update_running_stats(&mean, &var, rows)?;
        Ok(ys)
    }

    fn update_running_stats(&self, mean: &Tensor, var: &Tensor, count: usize) -> candle_core::Result<()> {
        let m = self.momentum;
        let unbiased = (var * (count as f64 / (count.max(2) - 1) as f64))?;
        let rm = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let rv = ((self.running_var.as_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm.to_dtype(self.running_mean.dtype())?)?;
        self.running_var.set(&rv.to_dtype(self.running_var.dtype())?)?;
        let n = (self.num_batches_tracked.as_tensor() + 1.0)?;
        self.num_batches_tracked.set(&n)
    }
}

impl ModuleT for BatchNorm {
    /// # Shapes
    /// - `xs`: `(batch, height, width, channels)` (any leading dims; channels last)
    /// - returns the same shape
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(xs, train, false)
    }
}

impl BatchNorm {
    /// `relu(batch_norm(xs))` as one op on CPU (one node, one pass less forward and backward).
    ///
    /// # Shapes
    /// - `xs`: `(batch, height, width, channels)`; returns the same shape
    pub fn forward_relu_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.forward_act(xs, train, true)
    }

    pub(super) fn forward_act(&self, xs: &Tensor, train: bool, relu: bool) -> candle_core::Result<Tensor> {
        if matches!(xs.dtype(), DType::F16 | DType::BF16) {
            // Mixed precision: statistics and normalisation in f32, as autocast does.
            let full = xs.to_dtype(self.weight.dtype())?;
            return self.forward_act(&full, train, relu)?.to_dtype(xs.dtype());
        }
        let c = self.weight.dim(0)?;
        let dims = xs.dims().to_vec();
        if dims.last() != Some(&c) {
            candle_core::bail!("batch-norm over {c} channels got shape {dims:?}")
        }
        let rows = xs.elem_count() / c;
        let flat = xs.reshape((rows, c))?;
        let fusable = xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64);
        let ys = if train && self.gpu_ops == GpuOps::Cudnn && xs.device().is_cuda() && xs.rank() == 4 {
            let (ys, mean, var) = cudnn::batch_norm_train(xs, &self.weight, &self.bias, self.eps)?;
            self.update_running_stats(&mean, &var, rows)?;
            if relu {
                return crate::ops::plumbing::elementwise::relu(&ys);
            }
            return Ok(ys);
        } else if train && fusable {
            if rows < 2 {
                candle_core::bail!("batch-norm in training needs more than one value per channel, got shape {dims:?}")
            }
            // On the tensor as it is, channels last: a reshape on either side would be a graph
            // node whose backward starts its gradient from a zero tensor and adds to it: two
            // more passes over the activation per BatchNorm and step.
            return self.train_with(relu, rows, |op| tape::op3(&xs.contiguous()?, &self.weight, &self.bias, op));
        } else if train {
            if rows < 2 {
                candle_core::bail!("batch-norm in training needs more than one value per channel, got shape {dims:?}")
            }
            // Any device: the same computation from candle's differentiable ops.
            let mean = flat.mean_keepdim(0)?;
            let centered = flat.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(0)?;
            let inv_std = (var.clone() + self.eps)?.sqrt()?.recip()?;
            let scale = inv_std.broadcast_mul(&self.weight.unsqueeze(0)?)?;
            self.update_running_stats(&mean.detach().squeeze(0)?, &var.detach().squeeze(0)?, rows)?;
            centered.broadcast_mul(&scale)?.broadcast_add(&self.bias)?
        } else {
            let inv_std = (self.running_var.as_tensor() + self.eps)?.sqrt()?.recip()?;
            let scale = (inv_std * &self.weight)?;
            let shift = (&self.bias - (self.running_mean.as_tensor() * &scale)?)?;
            if fusable && !flat.track_op() {
                // Inference: one pass, activation included.
                let op = ScaleShift { relu };
                return flat.contiguous()?.apply_op3_no_bwd(&scale, &shift, &op)?.reshape(dims);
            }
            flat.broadcast_mul(&scale)?.broadcast_add(&shift)?
        };
        let ys = ys.reshape(dims)?;
        if relu {
            crate::ops::plumbing::elementwise::relu(&ys)
        } else {
            Ok(ys)
        }
    }
}

/// Evaluation-mode `y = x·scale + shift` per channel, optionally followed by ReLU.
#[derive(Debug, Clone, Copy)]
struct ScaleShift {
    relu: bool,
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "batch-norm-eval"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        let y = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(scale_shift_rows(
                contiguous(x, l1, "x")?,
                contiguous(a, l2, "scale")?,
                contiguous(b, l3, "shift")?,
                self.relu,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(scale_shift_rows(
                contiguous(x, l1, "x")?,
                contiguous(a, l2, "scale")?,
                contiguous(b, l3, "shift")?,
                self.relu,
            )),
            _ => candle_core::bail!("batch-norm eval supports matching f32 or f64 tensors"),
        };
        Ok((y, l1.shape().clone()))
    }
}

/// Per-channel batch statistics of one training forward, shared with the op's backward.
#[derive(Debug, Clone)]
pub(super) struct Stats {
    mean: Vec<f64>,
    /// Biased variance.
    var: Vec<f64>,
    /// The forward's per-channel `y = (x − mean)·scale + shift` (before ReLU).
    scale: Vec<f64>,
    shift: Vec<f64>,
}

/// The forward's `(mean, scale, shift)` per channel in `T`, as the rows are normalised with them.
pub(super) type Affine<T> = (Vec<T>, Vec<T>, Vec<T>);

/// The input gradient's `dx = a·g + b·x + k` per channel in `T` (see [`Stats::input_grad`]).
pub(super) type InputGrad<T> = (Vec<T>, Vec<T>, Vec<T>);

impl Stats {
    /// From the batch's mean and biased variance per channel, with γ, β and ε.
    pub(super) fn new<T: WithDType>(mean: Vec<f64>, var: Vec<f64>, gamma: &[T], beta: &[T], eps: f64) -> Self {
        let scale: Vec<f64> = var.iter().zip(gamma).map(|(v, g)| g.to_f64() / (v + eps).sqrt()).collect();
        let shift: Vec<f64> = beta.iter().map(|b| b.to_f64()).collect();
        Stats { mean, var, scale, shift }
    }

    /// The biased variance per channel.
    pub(super) fn var(&self) -> &[f64] {
        &self.var
    }

    /// `(mean, scale, shift)` in `T`.
    pub(super) fn affine<T: WithDType>(&self) -> Affine<T> {
        (to_t(&self.mean), to_t(&self.scale), to_t(&self.shift))
    }

    /// From the sums `Σ g` and `Σ g·(x − mean)` per channel over `rows` rows (g: the masked
    /// output gradient): the input gradient's coefficients, `dx = γ·σ⁻¹·(g − Σg/m − x̂·Σg·x̂/m) =
    /// a·g + b·x + k`, and `[dγ | dβ]` (`dγ = Σ g·x̂`, `dβ = Σ g`).
    pub(super) fn input_grad<T: WithDType>(
        &self,
        gamma: &[T],
        [s0, s1]: &[Vec<f64>; 2],
        rows: usize,
        eps: f64,
    ) -> (InputGrad<T>, Vec<T>) {
        let c = gamma.len();
        let inv_std: Vec<f64> = self.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        let m = rows as f64;
        let a: Vec<f64> = (0..c).map(|ch| gamma[ch].to_f64() * inv_std[ch]).collect();
        let b: Vec<f64> = (0..c).map(|ch| -a[ch] * inv_std[ch] * inv_std[ch] * s1[ch] / m).collect();
        let k: Vec<f64> = (0..c).map(|ch| -a[ch] * s0[ch] / m - b[ch] * self.mean[ch]).collect();
        let tail =
            (0..c).map(|ch| T::from_f64(s1[ch] * inv_std[ch])).chain(s0.iter().map(|&s| T::from_f64(s))).collect();
        ((to_t(&a), to_t(&b), to_t(&k)), tail)
    }
}

/// Training-mode batch normalisation of a contiguous `(rows, channels)` tensor as one op:
/// two passes forward (statistics, normalise) and two backward, instead of the dozen-odd
/// passes candle's elementwise graph takes. `(x, γ, β) -> y`.
#[derive(Debug)]
pub(super) struct FusedBatchNorm {
    eps: f64,
    relu: bool,
    stats: Arc<Mutex<Option<Stats>>>,
}

impl FusedBatchNorm {
    /// `(dx, dγ, dβ)` from the input `x`, γ and the output's gradient, with the statistics the
    /// forward recorded.
    pub(super) fn backward(&self, x: &Tensor, gamma: &Tensor, grad: &Tensor) -> candle_core::Result<[Tensor; 3]> {
        let [dx, dgamma, dbeta, _] = self.backward_summed(x, gamma, grad, Sums::None)?;
        Ok([dx, dgamma, dbeta])
    }

    /// [`FusedBatchNorm::backward`], then `Σ dx` per channel with [`Sums::Columns`] (else an
    /// empty tensor): the bias gradient of the convolution whose output `x` is.
    pub(super) fn backward_summed(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        grad: &Tensor,
        sums: Sums,
    ) -> candle_core::Result<[Tensor; 4]> {
        let (n, c) = (x.elem_count(), gamma.elem_count());
        let op = FusedBatchNormBackward { eps: self.eps, relu: self.relu, stats: self.recorded()?, sums };
        let packed = x.apply_op3_no_bwd(&grad.contiguous()?, &gamma.contiguous()?, &op)?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let summed = if sums == Sums::Columns { c } else { 0 };
        Ok([dx, packed.narrow(0, n, c)?, packed.narrow(0, n + c, c)?, packed.narrow(0, n + 2 * c, summed)?])
    }
}

impl FusedBatchNorm {
    /// ε.
    pub(super) fn eps(&self) -> f64 {
        self.eps
    }

    /// Whether ReLU follows.
    pub(super) fn relu(&self) -> bool {
        self.relu
    }

    /// Records a forward's statistics for the backward and the running statistics.
    pub(super) fn record(&self, stats: Stats) -> candle_core::Result<()> {
        *self.stats.lock().map_err(|_| candle_core::Error::Msg("batch-norm lock poisoned".into()))? = Some(stats);
        Ok(())
    }

    /// The statistics the forward recorded.
    pub(super) fn recorded(&self) -> candle_core::Result<Stats> {
        self.stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch-norm lock poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("batch-norm backward before forward".into()))
    }
}

/// Rows per parallel task; fixed, so sums are added in the same order on every run.
pub(super) const ROWS_PER_TASK: usize = 256;

/// Channels whose sums [`channel_sums`] keeps in registers while it runs down a task's rows:
/// four AVX-512 vectors of f32 per accumulator.
const SUM_BLOCK: usize = 64;

/// Per-channel sums over all rows of `f(acc0, acc1, x_row, y_row, channels)`, which adds the
/// `channels` of one row (`x_row` and `y_row` hold those channels alone) into the accumulators:
/// accumulated in `T` within a task of [`ROWS_PER_TASK`] rows, each channel's rows added in
/// order, then in f64 across tasks, in a fixed order. A task takes [`SUM_BLOCK`] channels at a
/// time down its rows, their sums in local arrays that stay in registers (summed in memory,
/// the sums of each row waited for the previous row's stores), then any channels left over.
fn channel_sums<T: WithDType>(
    x: &[T],
    y: &[T],
    c: usize,
    f: impl Fn(&mut [T], &mut [T], &[T], &[T], Range<usize>) + Sync,
) -> [Vec<f64>; 2] {
    let partials: Vec<(Vec<T>, Vec<T>)> = x
        .par_chunks(ROWS_PER_TASK * c)
        .zip(y.par_chunks(ROWS_PER_TASK * c))
        .map(|(xb, yb)| {
            with_fma(
                #[inline(always)]
                || {
                    let (mut a0, mut a1) = (vec![T::zero(); c], vec![T::zero(); c]);
                    add_rows_in_blocks((&mut a0, &mut a1), (xb, yb), &f);
                    (a0, a1)
                },
            )
        })
        .collect();
    add_partials(partials, c)
}

/// Adds the rows of `xs` and `ys` (of `a0`'s channels each) to the sums `a0` and `a1` with
/// `f(acc0, acc1, x_row, y_row, channels)` as [`channel_sums`] describes: [`SUM_BLOCK`] channels
/// at a time down the rows, their sums (starting from `a0`'s and `a1`'s) in local arrays the
/// compiler keeps in registers, then any channels left over; each channel's rows in order.
#[inline(always)]
fn add_rows_in_blocks<T: WithDType>(
    (a0, a1): (&mut [T], &mut [T]),
    (xs, ys): (&[T], &[T]),
    f: impl Fn(&mut [T], &mut [T], &[T], &[T], Range<usize>),
) {
    let c = a0.len();
    let whole = c / SUM_BLOCK * SUM_BLOCK;
    for ch in (0..whole).step_by(SUM_BLOCK) {
        let block = ch..ch + SUM_BLOCK;
        let mut b0: [T; SUM_BLOCK] = a0[block.clone()].try_into().expect("a block");
        let mut b1: [T; SUM_BLOCK] = a1[block.clone()].try_into().expect("a block");
        for (xr, yr) in xs.chunks_exact(c).zip(ys.chunks_exact(c)) {
            let xr: &[T; SUM_BLOCK] = xr[block.clone()].try_into().expect("a block");
            let yr: &[T; SUM_BLOCK] = yr[block.clone()].try_into().expect("a block");
            f(&mut b0, &mut b1, xr, yr, block.clone());
        }
        a0[block.clone()].copy_from_slice(&b0);
        a1[block].copy_from_slice(&b1);
    }
    if whole < c {
        let (t0, t1) = (&mut a0[whole..], &mut a1[whole..]);
        for (xr, yr) in xs.chunks_exact(c).zip(ys.chunks_exact(c)) {
            f(t0, t1, &xr[whole..], &yr[whole..], whole..c);
        }
    }
}

/// The tasks' partial sums (each `(Σ₀, Σ₁)` over `c` channels in `T`) added in f64, in order.
pub(super) fn add_partials<T: WithDType>(
    partials: impl IntoIterator<Item = (Vec<T>, Vec<T>)>,
    c: usize,
) -> [Vec<f64>; 2] {
    let mut total = [vec![0f64; c], vec![0f64; c]];
    for (p0, p1) in partials {
        for ch in 0..c {
            total[0][ch] += p0[ch].to_f64();
            total[1][ch] += p1[ch].to_f64();
        }
    }
    total
}

pub(super) fn to_t<T: WithDType>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

/// `y = x·scale + shift` per channel (then ReLU), in `T`.
fn scale_shift_rows<T: WithDType>(x: &[T], scale: &[T], shift: &[T], relu: bool) -> Vec<T> {
    let zeros = vec![T::zero(); scale.len()];
    normalize_rows(x, &zeros, scale, shift, relu)
}

/// `y = (x − center)·scale + shift` per channel (then ReLU), in `T`. Centering first keeps a
/// constant channel at exactly `shift`.
fn normalize_rows<T: WithDType>(x: &[T], center: &[T], scale: &[T], shift: &[T], relu: bool) -> Vec<T> {
    if relu {
        normalize_rows_with::<T, true>(x, center, scale, shift)
    } else {
        normalize_rows_with::<T, false>(x, center, scale, shift)
    }
}

/// [`normalize_rows`] with the ReLU choice a constant (a select, not a branch, per element).
fn normalize_rows_with<T: WithDType, const RELU: bool>(x: &[T], center: &[T], scale: &[T], shift: &[T]) -> Vec<T> {
    let c = scale.len();
    assert!(c > 0 && x.len() % c == 0, "normalize: {} values are not rows of {c} channels", x.len());
    let fill = |y: &mut [MaybeUninit<T>]| {
        y.par_chunks_mut(ROWS_PER_TASK * c).zip(x.par_chunks(ROWS_PER_TASK * c)).for_each(|(yb, xb)| {
            with_fma(
                #[inline(always)]
                || normalize_block::<T, _, RELU>(yb, xb, (center, scale, shift)),
            )
        })
    };
    // SAFETY: `normalize_block` writes every row of `y`, which has `x`'s length.
    unsafe { scratch::written(x.len(), fill) }
}

/// `y = (x − center)·scale + shift` (then ReLU) for the rows of `x` into `y`.
#[inline(always)]
pub(super) fn normalize_block<T: WithDType, S: Slot<T>, const RELU: bool>(
    y: &mut [S],
    x: &[T],
    (center, scale, shift): (&[T], &[T], &[T]),
) {
    let c = scale.len();
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        for ((((o, &v), &m), &a), &b) in yr.iter_mut().zip(xr).zip(center).zip(scale).zip(shift) {
            let t = (v - m) * a + b;
            o.put(if RELU && t < T::zero() { T::zero() } else { t });
        }
    }
}

fn fused_fwd<T: WithDType>(x: &[T], gamma: &[T], beta: &[T], eps: f64, relu: bool) -> (Vec<T>, Stats) {
    let stats = batch_stats(x, gamma, beta, eps);
    let (mean, scale, shift) = stats.affine();
    (normalize_rows(x, &mean, &scale, &shift, relu), stats)
}

/// The batch statistics of the `(rows, channels)` tensor `x`, and the forward's scale and shift.
pub(super) fn batch_stats<T: WithDType>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Stats {
    let c = gamma.len();
    let rows = (x.len() / c) as f64;
    let [sums, _] = channel_sums(
        x,
        x,
        c,
        #[inline(always)]
        |a0, _, xr, _, _| {
            for (a, &v) in a0.iter_mut().zip(xr) {
                *a += v;
            }
        },
    );
    let mean: Vec<f64> = sums.iter().map(|s| s / rows).collect();
    // Second pass for the variance: exact even when |mean| ≫ std.
    let mean_t: Vec<T> = to_t(&mean);
    let [sq, _] = channel_sums(
        x,
        x,
        c,
        #[inline(always)]
        |a0, _, xr, _, channels| {
            for ((a, &v), &m) in a0.iter_mut().zip(xr).zip(&mean_t[channels]) {
                let d = v - m;
                *a += d * d;
            }
        },
    );
    let var: Vec<f64> = sq.iter().map(|s| s / rows).collect();
    Stats::new(mean, var, gamma, beta, eps)
}

/// `[dx (rows·c) | dγ (c) | dβ (c)]` in one buffer, then `Σ dx` (c) per channel with
/// `column_sums` ([`Sums::Columns`]). With `relu`, the gradient is first masked where the
/// forward's output was clipped, recomputing that output exactly as the forward did.
fn fused_bwd<T: WithDType>(x: &[T], dy: &[T], gamma: &[T], stats: &Stats, eps: f64, relu: bool, sums: Sums) -> Vec<T> {
    if relu {
        fused_bwd_with::<T, true>(x, dy, gamma, stats, eps, sums)
    } else {
        fused_bwd_with::<T, false>(x, dy, gamma, stats, eps, sums)
    }
}

/// [`fused_bwd`] with the ReLU choice a constant, so the masking compiles to a branch-free
/// select and the loops vectorise (a run-time flag read inside them kept them scalar).
fn fused_bwd_with<T: WithDType, const RELU: bool>(
    x: &[T],
    dy: &[T],
    gamma: &[T],
    stats: &Stats,
    eps: f64,
    column_sums: Sums,
) -> Vec<T> {
    let c = gamma.len();
    let affine = stats.affine::<T>();
    let sums = channel_sums(
        x,
        dy,
        c,
        #[inline(always)]
        |a0, a1, xr, gr, channels| gradient_sums_block::<T, RELU>((a0, a1), xr, gr, &affine, channels),
    );
    input_grad_with::<T, RELU>(x, dy, gamma, (stats, eps), &sums, column_sums)
}

/// Whether the input gradient's pass also sums its output per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sums {
    /// `[dx | dγ | dβ]`.
    None,
    /// `[dx | dγ | dβ | Σ dx]`: the column sums of `dx` as
    /// [`column_sums_tensor`](crate::ops::plumbing::elementwise::column_sums_tensor) adds them
    /// (f64, in blocks of [`COLUMN_ROWS`] rows, the blocks in order), taken while each block's
    /// rows are in cache, for the bias gradient of a convolution whose output the BatchNorm
    /// normalises.
    Columns,
}

impl Sums {
    /// The fewest blocks of [`COLUMN_ROWS`] rows worth summing in the pass: its tasks are then
    /// those blocks, fewer and larger than [`ROWS_PER_TASK`]'s, and with fewer blocks than this
    /// the threads' shares of them are uneven enough to cost more than a separate pass of sums
    /// (BENCHMARKS.md, round 29).
    pub(crate) const MIN_BLOCKS: usize = 8;
}

/// `[dx | dγ | dβ]` from `x`, the output gradient `dy` and the sums `Σ g`, `Σ g·(x − mean)`,
/// then `Σ dx` with [`Sums::Columns`].
pub(super) fn input_grad_with<T: WithDType, const RELU: bool>(
    x: &[T],
    dy: &[T],
    gamma: &[T],
    (stats, eps): (&Stats, f64),
    sums: &[Vec<f64>; 2],
    column_sums: Sums,
) -> Vec<T> {
    let c = gamma.len();
    let affine = stats.affine::<T>();
    let (coefficients, tail) = stats.input_grad(gamma, sums, x.len() / c, eps);
    assert!(
        c > 0 && x.len() % c == 0 && dy.len() == x.len(),
        "batch-norm input gradient: {} values and {} gradients for {c} channels",
        x.len(),
        dy.len()
    );
    let summed = column_sums == Sums::Columns;
    // A task is one block of the column sums' rows where it sums them.
    let rows = if summed { COLUMN_ROWS } else { ROWS_PER_TASK };
    let fill = |out: &mut [MaybeUninit<T>]| {
        let (dx, out_tail) = out.split_at_mut(x.len());
        let blocks: Vec<Vec<f64>> = dx
            .par_chunks_mut(rows * c)
            .zip(x.par_chunks(rows * c).zip(dy.par_chunks(rows * c)))
            .map(|(ob, (xb, gb))| {
                with_fma(
                    #[inline(always)]
                    || {
                        if summed {
                            // As `channel_sums`: a block of channels down the rows at a time,
                            // its sums in registers.
                            let mut acc = vec![0f64; c];
                            let whole = c / SUM_BLOCK * SUM_BLOCK;
                            let coefficients = (&affine, &coefficients);
                            for ch in (0..whole).step_by(SUM_BLOCK) {
                                let mut sums = [0f64; SUM_BLOCK];
                                let rows = ob.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(gb.chunks_exact(c));
                                for ((or, xr), gr) in rows {
                                    let block = ch..ch + SUM_BLOCK;
                                    let operands = (&mut or[block.clone()], &xr[block.clone()], &gr[block.clone()]);
                                    input_grad_block_summed::<T, RELU>(operands, coefficients, block, &mut sums);
                                }
                                acc[ch..ch + SUM_BLOCK].copy_from_slice(&sums);
                            }
                            if whole < c {
                                let rows = ob.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(gb.chunks_exact(c));
                                for ((or, xr), gr) in rows {
                                    let operands = (&mut or[whole..], &xr[whole..], &gr[whole..]);
                                    input_grad_block_summed::<T, RELU>(
                                        operands,
                                        coefficients,
                                        whole..c,
                                        &mut acc[whole..],
                                    );
                                }
                            }
                            acc
                        } else {
                            let rows = ob.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(gb.chunks_exact(c));
                            for ((or, xr), gr) in rows {
                                input_grad_row::<T, _, RELU>(or, xr, gr, &affine, &coefficients);
                            }
                            Vec::new()
                        }
                    },
                )
            })
            .collect();
        let column_tail = if summed { column_sums_total::<T>(blocks, c) } else { Vec::new() };
        for (o, &v) in out_tail.iter_mut().zip(tail.iter().chain(&column_tail)) {
            o.write(v);
        }
    };
    let extra = if summed { 3 * c } else { 2 * c };
    // SAFETY: `input_grad_row` writes every row of `dx` (`x`'s length) and the tail's `2c` (or
    // `3c`, with the column sums) values are written after it.
    unsafe { scratch::written(x.len() + extra, fill) }
}

/// Adds each row's `g` and `g·(x − mean)` per channel to `a0` and `a1`, the rows of `xs` and
/// `gs` in order, `g` being the output gradient masked where the forward's output was clipped
/// (recomputed exactly as the forward computed it), by [`add_rows_in_blocks`] (the same sums as
/// row by row).
#[inline(always)]
pub(super) fn gradient_sums_rows<T: WithDType, const RELU: bool>(
    (a0, a1): (&mut [T], &mut [T]),
    (xs, gs): (&[T], &[T]),
    affine: &Affine<T>,
) {
    add_rows_in_blocks(
        (a0, a1),
        (xs, gs),
        #[inline(always)]
        |a0, a1, xr, gr, channels| gradient_sums_block::<T, RELU>((a0, a1), xr, gr, affine, channels),
    );
}

/// One row's terms of [`gradient_sums_rows`] for the `channels` of the row alone: `a0`, `a1`, `xr` and `gr` hold
/// those channels.
#[inline(always)]
fn gradient_sums_block<T: WithDType, const RELU: bool>(
    (a0, a1): (&mut [T], &mut [T]),
    xr: &[T],
    gr: &[T],
    (mean, scale, shift): &Affine<T>,
    channels: Range<usize>,
) {
    let c = channels.len();
    let (a0, a1, xr, gr) = (&mut a0[..c], &mut a1[..c], &xr[..c], &gr[..c]);
    let (mt, sc, sh) = (&mean[channels.clone()], &scale[channels.clone()], &shift[channels]);
    let (mt, sc, sh) = (&mt[..c], &sc[..c], &sh[..c]);
    for ch in 0..c {
        let v = xr[ch];
        let g = masked::<T, RELU>(v, gr[ch], mt[ch], sc[ch], sh[ch]);
        a0[ch] += g;
        a1[ch] += g * (v - mt[ch]);
    }
}

/// One row of the input gradient, `a·g + b·x + k` per channel (`g` masked as in
/// [`gradient_sums_rows`]).
#[inline(always)]
fn input_grad_row<T: WithDType, S: Slot<T>, const RELU: bool>(
    or: &mut [S],
    xr: &[T],
    gr: &[T],
    (mean, scale, shift): &Affine<T>,
    (a, b, k): &InputGrad<T>,
) {
    let c = mean.len();
    let (or, xr, gr) = (&mut or[..c], &xr[..c], &gr[..c]);
    let (mt, sc, sh, at, bt, kt) = (&mean[..c], &scale[..c], &shift[..c], &a[..c], &b[..c], &k[..c]);
    for ch in 0..c {
        let v = xr[ch];
        let g = masked::<T, RELU>(v, gr[ch], mt[ch], sc[ch], sh[ch]);
        or[ch].put(at[ch] * g + bt[ch] * v + kt[ch]);
    }
}

/// [`input_grad_row`] for the `channels` of a row alone (`or`, `xr`, `gr` and `acc` hold those
/// channels), into `dx` values, each also added to its channel in `acc` in f64 (as
/// [`column_block_sums`](crate::ops::plumbing::elementwise::column_block_sums) adds a row).
#[inline(always)]
fn input_grad_block_summed<T: WithDType, const RELU: bool>(
    (or, xr, gr): (&mut [MaybeUninit<T>], &[T], &[T]),
    ((mean, scale, shift), (a, b, k)): (&Affine<T>, &InputGrad<T>),
    channels: Range<usize>,
    acc: &mut [f64],
) {
    let c = channels.len();
    let (or, xr, gr, acc) = (&mut or[..c], &xr[..c], &gr[..c], &mut acc[..c]);
    let (mt, sc, sh) = (&mean[channels.clone()], &scale[channels.clone()], &shift[channels.clone()]);
    let (at, bt, kt) = (&a[channels.clone()], &b[channels.clone()], &k[channels]);
    let (mt, sc, sh, at, bt, kt) = (&mt[..c], &sc[..c], &sh[..c], &at[..c], &bt[..c], &kt[..c]);
    for ch in 0..c {
        let v = xr[ch];
        let g = masked::<T, RELU>(v, gr[ch], mt[ch], sc[ch], sh[ch]);
        let d = at[ch] * g + bt[ch] * v + kt[ch];
        or[ch].write(d);
        acc[ch] += d.to_f64();
    }
}

/// The output gradient `g` where the forward's output `(v − m)·a + b` was positive (or
/// everywhere without ReLU), else 0.
#[inline(always)]
fn masked<T: WithDType, const RELU: bool>(v: T, g: T, m: T, a: T, b: T) -> T {
    if !RELU || (v - m) * a + b > T::zero() {
        g
    } else {
        T::zero()
    }
}

impl CustomOp3 for FusedBatchNorm {
    fn name(&self) -> &'static str {
        "fused-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        let c = l2.shape().elem_count();
        if l1.dims().last() != Some(&c) || l3.shape().elem_count() != c {
            candle_core::bail!("fused batch-norm: input {:?} for γ {:?} and β {:?}", l1.shape(), l2.shape(), l3.shape())
        }
        let (y, stats) = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                let (y, s) = fused_fwd(
                    contiguous(x, l1, "x")?,
                    contiguous(g, l2, "γ")?,
                    contiguous(b, l3, "β")?,
                    self.eps,
                    self.relu,
                );
                (CpuStorage::F32(y), s)
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                let (y, s) = fused_fwd(
                    contiguous(x, l1, "x")?,
                    contiguous(g, l2, "γ")?,
                    contiguous(b, l3, "β")?,
                    self.eps,
                    self.relu,
                );
                (CpuStorage::F64(y), s)
            }
            _ => candle_core::bail!("fused batch-norm supports matching f32 or f64 tensors, got {:?}", s1.dtype()),
        };
        *self.stats.lock().map_err(|_| candle_core::Error::Msg("batch-norm lock poisoned".into()))? = Some(stats);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dgamma, dbeta] = self.backward(x, gamma, grad)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `(x, dy, γ) -> [dx | dγ | dβ]` (then `Σ dx` with [`Sums::Columns`]), with the forward's
/// batch statistics.
#[derive(Debug)]
struct FusedBatchNormBackward {
    eps: f64,
    relu: bool,
    stats: Stats,
    sums: Sums,
}

impl CustomOp3 for FusedBatchNormBackward {
    fn name(&self) -> &'static str {
        "fused-batch-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        let (st, eps, relu, sums) = (&self.stats, self.eps, self.relu, self.sums);
        if l2.shape() != l1.shape() || l1.dims().last() != Some(&l3.shape().elem_count()) {
            candle_core::bail!(
                "fused batch-norm backward: input {:?}, gradient {:?} and γ {:?} do not match",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }

        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(dy), CpuStorage::F32(g)) => CpuStorage::F32(fused_bwd(
                contiguous(x, l1, "x")?,
                contiguous(dy, l2, "dy")?,
                contiguous(g, l3, "γ")?,
                st,
                eps,
                relu,
                sums,
            )),
            (CpuStorage::F64(x), CpuStorage::F64(dy), CpuStorage::F64(g)) => CpuStorage::F64(fused_bwd(
                contiguous(x, l1, "x")?,
                contiguous(dy, l2, "dy")?,
                contiguous(g, l3, "γ")?,
                st,
                eps,
                relu,
                sums,
            )),
            _ => {
                candle_core::bail!("fused batch-norm backward supports matching f32 or f64 tensors")
            }
        };
        let c = l3.shape().elem_count();
        let n = l1.shape().elem_count() + if sums == Sums::Columns { 3 * c } else { 2 * c };
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// An input whose last axis is not γ's channels, and a gradient of another shape than the
    /// input, are errors naming the shapes (the op writes its outputs row by row, unchecked).
    #[test]
    fn mismatched_shapes_are_refused() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let stats = Arc::new(Mutex::new(None));
        let op = || FusedBatchNorm { eps: 1e-5, relu: true, stats: Arc::clone(&stats) };
        let (gamma, beta) = (Tensor::ones(4, DType::F32, &dev)?, Tensor::zeros(4, DType::F32, &dev)?);
        let wrong = Tensor::randn(0f32, 1., (6, 5), &dev)?;
        let err = wrong.apply_op3_no_bwd(&gamma, &beta, &op()).expect_err("5 channels against γ of 4");
        assert!(err.to_string().contains("[6, 5]"), "{err}");
        let x = Tensor::randn(0f32, 1., (6, 4), &dev)?;
        let fused = op();
        x.apply_op3_no_bwd(&gamma, &beta, &fused)?;
        let short = Tensor::randn(0f32, 1., (5, 4), &dev)?;
        let err = fused.backward(&x, &gamma, &short).expect_err("a gradient of 5 rows for 6");
        assert!(err.to_string().contains("[5, 4]"), "{err}");
        Ok(())
    }

    /// The fused CPU op against candle's elementwise graph (the path other devices take), in
    /// float64: output, all three gradients, running statistics. Tolerance 1e-10 relative.
    #[test]
    fn fused_op_matches_candles_graph() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for &(rows, c) in &[(7usize, 3usize), (600, 5), (2, 1)] {
            let x = Var::randn(1.5f64, 2.0, (rows, c), &dev)?;
            let gamma = Var::randn(1f64, 0.5, c, &dev)?;
            let beta = Var::randn(0f64, 0.5, c, &dev)?;
            let probe = Tensor::randn(0f64, 1.0, (rows, c), &dev)?;
            let stats = Arc::new(Mutex::new(None));
            let op = FusedBatchNorm { eps: 1e-5, relu: false, stats: Arc::clone(&stats) };
            let fused = x.as_tensor().apply_op3(gamma.as_tensor(), beta.as_tensor(), op)?;
            let mean = x.as_tensor().mean_keepdim(0)?;
            let centered = x.as_tensor().broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(0)?;
            let scale = (var.clone() + 1e-5)?.sqrt()?.recip()?.broadcast_mul(&gamma.as_tensor().unsqueeze(0)?)?;
            let graph = centered.broadcast_mul(&scale)?.broadcast_add(beta.as_tensor())?;
            let close = |a: &Tensor, b: &Tensor| -> candle_core::Result<f64> {
                let s = b.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
                Ok((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? / s)
            };
            assert!(close(&fused, &graph)? < 1e-10);
            let g1 = (fused * &probe)?.sum_all()?.backward()?;
            let g2 = (graph * &probe)?.sum_all()?.backward()?;
            for t in [x.as_tensor(), gamma.as_tensor(), beta.as_tensor()] {
                let e = close(g1.get(t).expect("grad"), g2.get(t).expect("grad"))?;
                assert!(e < 1e-10, "gradient differs by {e} for ({rows}, {c})");
            }
            let st = stats.lock().expect("lock").clone().expect("stats");
            let want: Vec<f64> = var.squeeze(0)?.to_vec1()?;
            for (a, b) in st.var.iter().zip(want) {
                assert!((a - b).abs() < 1e-12);
            }
        }
        Ok(())
    }

    /// The backward with the column sums ([`Sums::Columns`]) gives the plain backward's bits and,
    /// after them, the column sums of its input gradient bit for bit as the column-sums op adds
    /// them; with ReLU and without, f32 and f64, for rows that end inside a block of
    /// [`COLUMN_ROWS`] and a single partial block.
    #[test]
    fn summed_backward_equals_the_backward_then_its_column_sums() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (rows, c, relu, dtype) in [
            (3 * COLUMN_ROWS + 37, SUM_BLOCK + 5, true, DType::F32),
            (2 * COLUMN_ROWS, 3, false, DType::F32),
            (300, 4, true, DType::F64),
        ] {
            let x = Tensor::randn(0.2f32, 1.5, (rows, c), &dev)?.to_dtype(dtype)?;
            let grad = Tensor::randn(0f32, 1., (rows, c), &dev)?.to_dtype(dtype)?;
            let gamma = Tensor::randn(1f32, 0.5, c, &dev)?.to_dtype(dtype)?;
            let beta = Tensor::randn(0f32, 0.5, c, &dev)?.to_dtype(dtype)?;
            let op = FusedBatchNorm { eps: 1e-5, relu, stats: Arc::new(Mutex::new(None)) };
            x.apply_op3_no_bwd(&gamma, &beta, &op)?;
            let plain = op.backward(&x, &gamma, &grad)?;
            let [dx, dgamma, dbeta, sums] = op.backward_summed(&x, &gamma, &grad, Sums::Columns)?;
            let bits = |t: &Tensor| -> candle_core::Result<Vec<u64>> {
                Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().map(|v| v.to_bits()).collect())
            };
            for (a, b) in plain.iter().zip([&dx, &dgamma, &dbeta]) {
                assert_eq!(bits(a)?, bits(b)?, "({rows}, {c}), relu {relu}, {dtype:?}");
            }
            let want = crate::ops::plumbing::elementwise::column_sums_tensor(&dx)?;
            assert_eq!(bits(&sums)?, bits(&want)?, "column sums of ({rows}, {c}), relu {relu}, {dtype:?}");
            let naive = dx.to_dtype(DType::F64)?.sum(0)?;
            let gap = (sums.to_dtype(DType::F64)? - naive)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(gap < 1e-6, "column sums {gap} from candle's sum");
        }
        Ok(())
    }

    /// The per-channel sums taken [`SUM_BLOCK`] channels at a time equal, bit for bit, the sums
    /// of each task's rows in order per channel in `T`, then of the tasks in f64: for whole
    /// blocks, a block and leftover channels, and fewer channels than a block, in f32 and f64.
    #[test]
    fn channel_sums_add_each_channels_rows_in_order() {
        fn check<T: WithDType>(rows: usize, c: usize) {
            let x: Vec<T> = (0..rows * c).map(|i| T::from_f64(((i * 7919) % 1013) as f64 / 97.0 - 5.0)).collect();
            let y: Vec<T> = x.iter().map(|&v| v * T::from_f64(0.37) + T::from_f64(1.5)).collect();
            let [s0, s1] = channel_sums(&x, &y, c, |a0, a1, xr, yr, _| {
                for (((a, b), &u), &v) in a0.iter_mut().zip(a1.iter_mut()).zip(xr).zip(yr) {
                    *a += u;
                    *b += u * v;
                }
            });
            let (mut w0, mut w1) = (vec![0f64; c], vec![0f64; c]);
            for (xb, yb) in x.chunks(ROWS_PER_TASK * c).zip(y.chunks(ROWS_PER_TASK * c)) {
                for ch in 0..c {
                    let (mut t0, mut t1) = (T::zero(), T::zero());
                    for (xr, yr) in xb.chunks_exact(c).zip(yb.chunks_exact(c)) {
                        t0 += xr[ch];
                        t1 += xr[ch] * yr[ch];
                    }
                    w0[ch] += t0.to_f64();
                    w1[ch] += t1.to_f64();
                }
            }
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&s0), bits(&w0), "first sums, ({rows}, {c}) {:?}", T::DTYPE);
            assert_eq!(bits(&s1), bits(&w1), "second sums, ({rows}, {c}) {:?}", T::DTYPE);
        }
        for (rows, c) in [(600, 2 * SUM_BLOCK), (600, 2 * SUM_BLOCK + 3), (300, SUM_BLOCK - 1), (7, 1)] {
            check::<f32>(rows, c);
            check::<f64>(rows, c);
        }
    }

    /// `forward_relu_t` equals ReLU after `forward_t`, in both modes, forward and backward.
    #[test]
    fn fused_relu_matches_separate_relu() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let (map_a, map_b) = (VarMap::new(), VarMap::new());
        let a = BatchNorm::new(4, VarBuilder::from_varmap(&map_a, DType::F64, &dev))?;
        let b = BatchNorm::new(4, VarBuilder::from_varmap(&map_b, DType::F64, &dev))?;
        let x = Var::randn(0.3f64, 1., (2, 3, 5, 4), &dev)?;
        let probe = Tensor::randn(0f64, 1., (2, 3, 5, 4), &dev)?;
        for train in [true, false] {
            let y1 = a.forward_relu_t(x.as_tensor(), train)?;
            let y2 = b.forward_t(x.as_tensor(), train)?.relu()?;
            let d = (&y1 - &y2)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            assert!(d < 1e-12, "forward differs by {d} (train = {train})");
            let g1 = (y1 * &probe)?.sum_all()?.backward()?;
            let g2 = (y2 * &probe)?.sum_all()?.backward()?;
            let d = (g1.get(x.as_tensor()).expect("grad") - g2.get(x.as_tensor()).expect("grad"))?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f64>()?;
            assert!(d < 1e-10, "input gradient differs by {d} (train = {train})");
        }
        // Inference without gradients takes the one-pass path.
        let y1 = a.forward_relu_t(&x.as_tensor().detach(), false)?;
        let y2 = b.forward_t(&x.as_tensor().detach(), false)?.relu()?;
        assert!((y1 - y2)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()? < 1e-12);
        Ok(())
    }

    #[test]
    fn train_normalises_and_updates_running_stats_like_pytorch() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let map = VarMap::new();
        let bn = BatchNorm::new(2, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        // Channel 0: 1,2,3,4 (mean 2.5, biased var 1.25, unbiased 5/3); channel 1: all 7.
        let x = Tensor::new(&[[[[1f32, 7.], [2., 7.]], [[3., 7.], [4., 7.]]]], &dev)?;
        let y = bn.forward_t(&x, true)?;
        let y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let s = (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 / s, 0., -0.5 / s, 0., 0.5 / s, 0., 1.5 / s, 0.];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{y:?}");
        }
        let rm: Vec<f32> = bn.running_mean().to_vec1()?;
        let rv: Vec<f32> = bn.running_var().to_vec1()?;
        assert!((rm[0] - 0.25).abs() < 1e-6 && (rm[1] - 0.7).abs() < 1e-6, "{rm:?}");
        assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6 && (rv[1] - 0.9).abs() < 1e-6, "{rv:?}");
        assert_eq!(bn.num_batches_tracked().to_scalar::<f32>()?, 1.0);
        // Evaluation uses the running statistics and leaves them alone.
        let e: Vec<f32> = bn.forward_t(&x, false)?.flatten_all()?.to_vec1()?;
        assert!((e[0] - (1.0 - 0.25) / (rv[0] + 1e-5).sqrt()).abs() < 1e-5);
        assert_eq!(bn.running_mean().to_vec1::<f32>()?, rm);
        Ok(())
    }
}
