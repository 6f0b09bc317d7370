//! d2l's stem in training, `pool(relu(bn(conv(x))))` over one-channel images, without its
//! convolution's output ever written out (at 96 px, batch 128: 128 × 48 × 48 × 64 values, 75 MB).
//!
//! With one input channel, each output value is `x = W·p + b` for the pixel's patch `p` (49
//! values for the 7×7), so the BatchNorm's batch statistics follow from the patches' moments
//! alone: over the batch's `N` output pixels, with `q = p − s` (`s` the images' mean value, so
//! that the moments hold little cancellation), `q̄ = Σ q / N` and `C = Σ q qᵀ / N − q̄ q̄ᵀ`, each
//! channel's mean is `W·(q̄ + s) + b` and its variance `W C Wᵀ` (in f64). The forward takes the
//! moments first ([`direct::moments_part`]: products over runs of rows fixed by the geometry,
//! small images a power of two to a run, so that a batch and the same images in micro-batches
//! get the same sums; about four fifths of the convolution's multiply-adds), then runs the convolution with the BatchNorm folded into
//! its weights (`W·γ/σ`) one image at a time, and pools each image's sums in cache, adding the
//! folded bias (`(b − μ)·γ/σ + β`) and clipping after the maximum, with which both commute, and
//! keeping each window's winning cell ([`pool_winners_row`]): what leaves the cache is the
//! pooled output and the winners.
//!
//! The backward needs no more. With `g` the gradient at the BatchNorm's output (the pool's
//! gradient at the winning cells that pass the ReLU), `s₀ = Σ g`, `S = Σ g (q − q̄)` and
//! `s₁ = W·S = Σ g (x − μ)`, BatchNorm's input gradient
//! `dx = γ/σ · (g − s₀/N − (x − μ) s₁/(σ² N))` sums against the patches to
//! `dW = γ/σ · (S − s₁/σ² · C Wᵀ)`, with `dγ = s₁/σ`, `dβ = s₀` and the bias's gradient 0
//! (`Σ dx` vanishes), `σ² = var + ε`. `S` sums each window's gradient times its winner's patch
//! ([`patch_gradient_sums`]); the gradient at the 75 MB of cells is never made.
//!
//! The sums are the layers' in another order and the folded convolution rounds its products
//! once more: against the layers in f64, the output, the running statistics and the gradients
//! agree within 1e-12 relative in f64 and within 5e-6 (output) and 2e-5 (gradients) in f32 (see
//! the test). Images that may need a gradient take the node of [`super::conv_bn`] instead,
//! which keeps the convolution's output ([`conv_bn_pool`] chooses).

use std::sync::Mutex;

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use super::batch_norm::{BatchNorm, FusedBatchNorm, Stats};
use super::conv::Conv2d;
use super::conv_bn::{self, conv_bn};
use super::pool::{window_range, MaxPool2d};
use crate::ops::conv::direct;
use crate::ops::conv::dispatch::{Im2colConv, ImageEpilogue};
use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::simd::with_fma;
use crate::ops::plumbing::storage::contiguous;
use crate::ops::plumbing::{gradients, scratch, tape};
use crate::ops::GpuOps;

/// `pool(relu(bn(conv(xs))))`, d2l's stem. In training on the CPU one node: for one-channel
/// images that need no gradient this module's op, which never writes the convolution's output
/// ([`train_node`]); otherwise the convolution–BatchNorm node of [`super::conv_bn`] with the
/// max-pool in it too, so candle's backward starts no gradient for the stem's largest activation
/// (at 96 px, 128 × 48 × 48 × 64 values) from a zero tensor plus an add, bit for bit the layers'
/// arithmetic. Elsewhere [`conv_bn`], then the pool.
///
/// # Shapes
/// - `xs`: `(batch, height, width, in_channels)`
/// - returns `(batch, pooled_h, pooled_w, out_channels)`
pub(crate) fn conv_bn_pool(
    conv: &Conv2d,
    bn: &BatchNorm,
    pool: MaxPool2d,
    xs: &Tensor,
    train: bool,
    gpu_ops: GpuOps,
) -> candle_core::Result<Tensor> {
    if train {
        if let Some(ys) = train_node(conv, bn, pool, xs)? {
            return Ok(ys);
        }
        if let Some(ys) = conv_bn::train_node(conv, bn, xs, true, Some(pool))? {
            return Ok(ys);
        }
    }
    pool.forward_on(&conv_bn(conv, bn, xs, train, true)?, gpu_ops)
}

/// The stem's training node, `pool(relu(bn(conv(xs))))`, where it applies: one-channel images
/// (f32 or f64 on the CPU) that need no gradient, a convolution that runs one image at a time.
/// `None` elsewhere.
pub(super) fn train_node(
    conv: &Conv2d,
    bn: &BatchNorm,
    pool: MaxPool2d,
    xs: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let cfg = conv.config();
    if cfg.in_channels != 1 || !matches!(xs.dtype(), DType::F32 | DType::F64) || tape::may_want_grad(xs) {
        return Ok(None);
    }
    let (Some(op), Some(rows)) = (conv.cpu_op(xs), conv.fused_rows(xs, (bn.weight(), bn.bias()))?) else {
        return Ok(None);
    };
    let layout = xs.layout();
    let conv_out = op.output_layout(layout, cfg.out_channels)?;
    // The winners are cell indices held in the element type: whole numbers up to 2^24 in f32.
    let (_, oh, ow, _) = conv_out.shape().dims4()?;
    if !op.runs_per_image(layout) || pool.window(&conv_out).is_err() || oh * ow > 1 << 24 {
        return Ok(None);
    }
    // γ and β travel with the convolution's bias in one tensor: custom ops take three inputs.
    let packed = tape::cat(&[conv.bias(), bn.weight(), bn.bias()])?;
    let channels = cfg.out_channels;
    bn.train_with(true, rows, |bn_op| {
        let stem = StemTrain { conv: op, bn: bn_op, channels, pool, saved: Mutex::new(None) };
        tape::op3(&xs.contiguous()?, conv.weight(), &packed, stem)
    })
    .map(Some)
}

/// The patches' moments over the batch (see the module's notes), in f64.
#[derive(Debug, Clone)]
struct Moments {
    /// `s`, the value subtracted from every patch value (as the element type holds it).
    shift: f64,
    /// `q̄`, per tap.
    mean: Vec<f64>,
    /// `C`, taps × taps.
    cov: Vec<f64>,
}

impl Moments {
    /// From the sums of [`direct::moments_part`] over all `pixels` (`(taps + 1)²` values).
    fn new(sums: &[f64], taps: usize, pixels: usize, shift: f64) -> Self {
        let (k, n) = (taps + 1, pixels as f64);
        let mean: Vec<f64> = (0..taps).map(|i| sums[taps * k + i] / n).collect();
        let cov = (0..taps * taps).map(|ij| sums[ij / taps * k + ij % taps] / n - mean[ij / taps] * mean[ij % taps]);
        let cov = cov.collect();
        Moments { shift, mean, cov }
    }

    /// `C·w` for one channel's weights `w` (taps).
    fn cov_times(&self, w: &[f64]) -> Vec<f64> {
        self.cov.chunks_exact(w.len()).map(|row| row.iter().zip(w).map(|(c, w)| c * w).sum()).collect()
    }

    /// The mean and biased variance of each channel of the convolution `weights` (`(c, taps)`)
    /// plus `bias`.
    fn channel_stats(&self, weights: &[f64], bias: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let taps = self.mean.len();
        weights
            .chunks_exact(taps)
            .zip(bias)
            .map(|(w, b)| {
                let mean = w.iter().zip(&self.mean).map(|(w, m)| w * (m + self.shift)).sum::<f64>() + b;
                let var = w.iter().zip(self.cov_times(w)).map(|(w, cw)| w * cw).sum::<f64>();
                (mean, var.max(0.0))
            })
            .unzip()
    }
}

/// What the forward keeps for the backward.
#[derive(Debug)]
struct Saved {
    /// Each window's winning cell ([`pool_winners_row`]), the pooled output's shape.
    winners: CpuStorage,
    moments: Moments,
    conv: Window,
    pool: Window,
}

/// `(x, w, [bias | γ | β]) -> pool(relu(bn(conv(x))))` for one-channel images that need no
/// gradient (see the module's notes).
#[derive(Debug)]
struct StemTrain {
    conv: Im2colConv,
    bn: FusedBatchNorm,
    channels: usize,
    pool: MaxPool2d,
    saved: Mutex<Option<Saved>>,
}

/// Pools each image's convolution sums (the BatchNorm folded into the weights) in cache, adds
/// the folded bias and clips the pooled values, and writes each window's winning cell beside
/// them ([`pool_winners_row`]): a per-channel constant and the ReLU commute with the maximum, so
/// the image's output itself is never made.
struct StemEpilogue {
    /// The pool's geometry (one image's).
    win: Window,
    /// The folded bias, `(b − μ)·γ/σ + β` per channel, in f64.
    bias: Vec<f64>,
}

impl ImageEpilogue for StemEpilogue {
    fn image_dims(&self) -> (usize, usize, usize) {
        (self.win.oh(), self.win.ow(), self.win.c)
    }

    fn side_len(&self) -> usize {
        self.image_len()
    }

    fn takes_bias(&self) -> bool {
        true
    }

    fn apply<T: WithDType>(&self, image: &[T], dst: &mut [T], side: &mut [T]) {
        let row = self.win.ow() * self.win.c;
        let bias: Vec<T> = self.bias.iter().map(|&b| T::from_f64(b)).collect();
        with_fma(
            #[inline(always)]
            || {
                for (oy, (out, won)) in dst.chunks_exact_mut(row).zip(side.chunks_exact_mut(row)).enumerate() {
                    pool_winners_row(image, &self.win, oy, (out, won), &bias);
                }
            },
        )
    }
}

/// Channels a block of [`pool_winners_row`] keeps in registers.
const BLOCK: usize = 16;

/// Output row `oy` of `relu(pool(img) + bias)` (the pool's geometry `win`, `img` one image's
/// `(h, w, c)` sums) into `out`, and into `won` each window's winning cell, the first in
/// row-major order holding the maximum (the cell the pool's backward routes to), as its index
/// `iy · w + ix` in the image; −1 where the ReLU clips the window's value, so its mask stops the
/// gradient there.
#[inline(always)]
fn pool_winners_row<T: WithDType>(img: &[T], win: &Window, oy: usize, (out, won): (&mut [T], &mut [T]), bias: &[T]) {
    let c = win.c;
    let ys = window_range(oy, win.stride, win.pad, win.kh, win.h);
    let mut cells: Vec<(&[T], T)> = Vec::with_capacity(win.kh * win.kw);
    let none = T::from_f64(-1.0);
    for (ox, (best, at)) in out.chunks_exact_mut(c).zip(won.chunks_exact_mut(c)).enumerate() {
        let xs = window_range(ox, win.stride, win.pad, win.kw, win.w);
        cells.clear();
        for iy in ys.clone() {
            for ix in xs.clone() {
                let cell = iy * win.w + ix;
                cells.push((&img[cell * c..(cell + 1) * c], T::from_f64(cell as f64)));
            }
        }
        let Some((&(first, first_at), rest)) = cells.split_first() else { continue };
        let mut ch = 0;
        while ch + BLOCK <= c {
            let mut m: [T; BLOCK] = first[ch..ch + BLOCK].try_into().expect("a block");
            let mut k = [first_at; BLOCK];
            for &(cell, cell_at) in rest {
                for ((m, k), &v) in m.iter_mut().zip(&mut k).zip(&cell[ch..ch + BLOCK]) {
                    let greater = v > *m;
                    *m = if greater { v } else { *m };
                    *k = if greater { cell_at } else { *k };
                }
            }
            for ((m, k), &b) in m.iter_mut().zip(&mut k).zip(&bias[ch..ch + BLOCK]) {
                let v = *m + b;
                (*m, *k) = if v > T::zero() { (v, *k) } else { (T::zero(), none) };
            }
            best[ch..ch + BLOCK].copy_from_slice(&m);
            at[ch..ch + BLOCK].copy_from_slice(&k);
            ch += BLOCK;
        }
        for ch in ch..c {
            let (mut m, mut k) = (first[ch], first_at);
            for &(cell, cell_at) in rest {
                if cell[ch] > m {
                    (m, k) = (cell[ch], cell_at);
                }
            }
            let v = m + bias[ch];
            (best[ch], at[ch]) = if v > T::zero() { (v, k) } else { (T::zero(), none) };
        }
    }
}

/// The convolution's weight `w` (`(c, taps)`) and bias `b` with the BatchNorm's batch
/// statistics folded in: `w·s` (each rounded once) and `(b − μ)·s + β` (in f64) per channel,
/// `s = γ/σ`.
fn fold<T: WithDType>(w: &[T], b: &[T], stats: &Stats) -> (Vec<T>, Vec<f64>) {
    let (mean, scale, shift) = stats.affine::<f64>();
    let taps = w.len() / b.len();
    let w = w.chunks_exact(taps).zip(&scale).flat_map(|(w, s)| w.iter().map(move |&v| T::from_f64(v.to_f64() * s)));
    let b = (0..b.len()).map(|o| (b[o].to_f64() - mean[o]) * scale[o] + shift[o]);
    (w.collect(), b.collect())
}

/// A slice of `T` from a storage, contiguous.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    contiguous(s.as_slice::<T>()?, l, what)
}

impl StemTrain {
    /// The batch statistics of the convolution's output and the patches' moments.
    fn statistics<T: WithDType>(&self, (x, w, packed): (&[T], &[T], &[T]), conv: &Window) -> (Stats, Moments) {
        let _span = crate::profile::span("stem-moments", &[conv.batch, conv.h, conv.w, 1]);
        let c = self.channels;
        let taps = conv.kh * conv.kw;
        // The images' mean value, summed in a fixed order.
        let chunks: Vec<f64> = x.par_chunks(1 << 16).map(|part| part.iter().map(|v| v.to_f64()).sum()).collect();
        let shift = T::from_f64(chunks.iter().sum::<f64>() / x.len() as f64);
        let (oh, ow) = (conv.oh(), conv.ow());
        let parts: Vec<Vec<f64>> = direct::run_groups(conv.batch, oh, ow)
            .into_par_iter()
            .map(|group| direct::moments_part(x, conv, &group, shift))
            .collect();
        let mut sums = vec![0f64; (taps + 1) * (taps + 1)];
        for part in parts {
            for (s, v) in sums.iter_mut().zip(part) {
                *s += v;
            }
        }
        let moments = Moments::new(&sums, taps, conv.batch * conv.oh() * conv.ow(), shift.to_f64());
        let as_f64 = |v: &[T]| v.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
        let (mean, var) = moments.channel_stats(&as_f64(w), &as_f64(&packed[..c]));
        let stats = Stats::new(mean, var, &packed[c..2 * c], &packed[2 * c..], self.bn.eps());
        (stats, moments)
    }
}

impl CustomOp3 for StemTrain {
    fn name(&self) -> &'static str {
        "stem-train"
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
        let c = self.channels;
        let conv = self.conv.window_of(l1)?;
        if conv.c != 1 || l2.shape().dims() != [c, 1, conv.kh, conv.kw] || l3.shape().dims() != [3 * c] {
            candle_core::bail!(
                "stem: weight {:?} and packed parameters {:?} for images {:?} and {c} channels",
                l2.shape(),
                l3.shape(),
                l1.shape()
            )
        }
        let pool = self.pool.window(&self.conv.output_layout(l1, c)?)?;
        let (stats, moments, bias) = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let packed = slice::<f32>(s3, l3, "stem parameters")?;
                let operands = (slice(s1, l1, "images")?, slice(s2, l2, "stem weight")?, packed);
                let (stats, moments) = self.statistics::<f32>(operands, &conv);
                (stats, moments, CpuStorage::F32(packed[..c].to_vec()))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let packed = slice::<f64>(s3, l3, "stem parameters")?;
                let operands = (slice(s1, l1, "images")?, slice(s2, l2, "stem weight")?, packed);
                let (stats, moments) = self.statistics::<f64>(operands, &conv);
                (stats, moments, CpuStorage::F64(packed[..c].to_vec()))
            }
            _ => candle_core::bail!("stem supports matching f32 or f64 tensors, got {:?}", s1.dtype()),
        };
        // The BatchNorm folded into the convolution: `w·s` and `(b − μ)·s + β`, `s = γ/σ`; the
        // epilogue adds the bias (the convolution's operand is unused).
        let (weight, folded_bias) = match (s2, &bias) {
            (CpuStorage::F32(_), CpuStorage::F32(b)) => {
                let (w, b) = fold(slice::<f32>(s2, l2, "stem weight")?, b, &stats);
                (CpuStorage::F32(w), b)
            }
            (CpuStorage::F64(_), CpuStorage::F64(b)) => {
                let (w, b) = fold(slice::<f64>(s2, l2, "stem weight")?, b, &stats);
                (CpuStorage::F64(w), b)
            }
            _ => candle_core::bail!("stem supports matching f32 or f64 tensors, got {:?}", s2.dtype()),
        };
        self.bn.record(stats)?;
        let epilogue = StemEpilogue { win: pool, bias: folded_bias };
        let inputs = [(s1, l1), (&weight, &Layout::contiguous(l2.shape())), (&bias, &Layout::contiguous(c))];
        let Some((pooled, shape, winners)) = self.conv.cpu_fwd_per_image_with_side(inputs, &epilogue)? else {
            candle_core::bail!("stem: the convolution does not run one image at a time for images {:?}", l1.shape())
        };
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("stem lock poisoned".into()))? =
            Some(Saved { winners, moments, conv, pool });
        Ok((pooled, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if tape::wants_grad(x) {
            candle_core::bail!("stem: the training node without its activation gives no gradient for its images")
        }
        let guard = self.saved.lock().map_err(|_| candle_core::Error::Msg("stem lock poisoned".into()))?;
        let Some(saved) = guard.as_ref() else { candle_core::bail!("stem backward before forward") };
        let _span = crate::profile::span("stem-train-backward", x.dims());
        let c = self.channels;
        let taps = saved.conv.kh * saved.conv.kw;
        let grad = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = grad.storage_and_layout();
        let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("stem backward: the images and the gradient must be on the CPU")
        };
        let sums = match (xs, gs, &saved.winners) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(won)) => {
                let (x, g) = (slice::<f32>(xs, xl, "images")?, slice::<f32>(gs, gl, "stem gradient")?);
                patch_gradient_sums(x, (g, won), saved)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(won)) => {
                let (x, g) = (slice::<f64>(xs, xl, "images")?, slice::<f64>(gs, gl, "stem gradient")?);
                patch_gradient_sums(x, (g, won), saved)
            }
            _ => candle_core::bail!("stem backward: mismatched dtypes {:?} and {:?}", x.dtype(), grad.dtype()),
        };
        if grad.dims() != [saved.pool.batch, saved.pool.oh(), saved.pool.ow(), c] {
            candle_core::bail!("stem backward: gradient {:?} does not match the output", grad.dims())
        }
        let stats = self.bn.recorded()?;
        let to_f64 = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
        let (weights, gamma) = (to_f64(w)?, to_f64(&packed.narrow(0, c, c)?)?);
        let eps = self.bn.eps();
        let (mut dw, mut dgamma, mut dbeta) =
            (Vec::with_capacity(c * taps), Vec::with_capacity(c), Vec::with_capacity(c));
        for o in 0..c {
            let wo = &weights[o * taps..(o + 1) * taps];
            let s0 = sums[taps * c + o];
            // S = Σ g (q − q̄) and s₁ = W·S.
            let centred: Vec<f64> = (0..taps).map(|i| sums[i * c + o] - s0 * saved.moments.mean[i]).collect();
            let s1: f64 = wo.iter().zip(&centred).map(|(w, s)| w * s).sum();
            let sigma2 = stats.var()[o] + eps;
            let (a, k) = (gamma[o] / sigma2.sqrt(), s1 / sigma2);
            dw.extend(centred.iter().zip(saved.moments.cov_times(wo)).map(|(s, cw)| a * (s - k * cw)));
            dgamma.push(s1 / sigma2.sqrt());
            dbeta.push(s0);
        }
        let dtype = x.dtype();
        let tensor = |v: Vec<f64>, shape: Shape| Tensor::from_vec(v, shape, x.device())?.to_dtype(dtype);
        let dw = tensor(dw, Shape::from(w.dims()))?;
        let dparams = tensor([vec![0.0; c], dgamma, dbeta].concat(), Shape::from(3 * c))?;
        Ok((None, gradients::route(w, Some(dw)), Some(dparams)))
    }
}

/// `Σ q ⊗ g` over the batch (`(taps + 1, c)` values in f64): `q` the shifted patches with their
/// one ([`direct::shifted_patches`]), `g` the BatchNorm's output gradient, the pooled gradient
/// `grad` routed to each window's winning cell in `won` (none where the ReLU's mask stops it).
/// Each task takes a run of pooled rows of one image, makes the patches of the cells under them
/// and adds each window's gradient times its winner's patch, channel by channel: the gradient
/// at the cells, mostly zero, is never made. A masked window adds `0 ·` a patch rather than
/// branch: whether the ReLU passes a window does not follow a pattern.
fn patch_gradient_sums<T: WithDType>(x: &[T], (grad, won): (&[T], &[T]), saved: &Saved) -> Vec<f64> {
    let (conv, pool) = (&saved.conv, &saved.pool);
    let (c, ow) = (pool.c, conv.ow());
    let k = conv.kh * conv.kw + 1;
    // Patch rows in whole vectors.
    let stride = k.next_multiple_of(BLOCK);
    let (pooled_row, pooled_len) = (pool.ow() * c, pool.oh() * pool.ow() * c);
    let shift = T::from_f64(saved.moments.shift);
    let parts: Vec<Vec<T>> = direct::row_runs(conv.batch, pool.oh(), ow * pool.stride)
        .into_par_iter()
        .map(|(n, oys)| {
            // The cells under these windows: conv rows `first..last`.
            let first = window_range(oys.start, pool.stride, pool.pad, pool.kh, pool.h).start;
            let last = window_range(oys.end - 1, pool.stride, pool.pad, pool.kh, pool.h).end;
            let mut q = scratch::take((last - first) * ow * stride);
            direct::shifted_patches(x, conv, (n, first..last), shift, (&mut q, stride));
            let windows = oys.start * pooled_row..oys.end * pooled_row;
            let (g, won) = (&grad[n * pooled_len..][windows.clone()], &won[n * pooled_len..][windows]);
            let mut acc = vec![T::zero(); c * stride];
            // The run's first cell, as the winners give cells (an index into the image).
            let base = first * ow;
            let add = (&mut acc[..], &q[..], (g, won), c, base);
            with_fma(
                #[inline(always)]
                || match stride {
                    16 => add_winners::<T, 16>(add),
                    32 => add_winners::<T, 32>(add),
                    48 => add_winners::<T, 48>(add),
                    64 => add_winners::<T, 64>(add),
                    _ => add_winners_blocks::<T>(add, stride),
                },
            );
            scratch::give(q);
            // (c, stride) → (k, c).
            let mut part = vec![T::zero(); k * c];
            for (o, acc) in acc.chunks_exact(stride).enumerate() {
                for (i, &a) in acc[..k].iter().enumerate() {
                    part[i * c + o] = a;
                }
            }
            part
        })
        .collect();
    let mut sums = vec![0f64; k * c];
    for part in parts {
        for (s, v) in sums.iter_mut().zip(part) {
            *s += v.to_f64();
        }
    }
    sums
}

/// The operands of [`add_winners`]: the sums `acc` (`(c, S)`), the run's patches `q` (rows of
/// `S`), the run's pooled gradient and winners, the channels and the run's first cell.
type Winners<'a, T> = (&'a mut [T], &'a [T], (&'a [T], &'a [T]), usize, usize);

/// Each window's gradient times its winner's patch added to its channel's row of `acc`, a
/// channel at a time and windows in order, for patch rows of `S` values (a constant: the
/// channel's sums stay in registers over the windows).
#[inline(always)]
fn add_winners<T: WithDType, const S: usize>((acc, q, (g, won), c, base): Winners<T>) {
    for (o, acc) in acc.chunks_exact_mut(S).enumerate() {
        let mut sum: [T; S] = (*acc).try_into().expect("a row of sums");
        for (&gv, &at) in g[o..].iter().step_by(c).zip(won[o..].iter().step_by(c)) {
            if at < T::zero() {
                continue;
            }
            let cell = at.to_f64() as usize - base;
            let patch: &[T; S] = q[cell * S..(cell + 1) * S].try_into().expect("a patch");
            for (s, &p) in sum.iter_mut().zip(patch) {
                *s += gv * p;
            }
        }
        acc.copy_from_slice(&sum);
    }
}

/// [`add_winners`] for patch rows of any multiple of [`BLOCK`] values.
#[inline(always)]
fn add_winners_blocks<T: WithDType>((acc, q, (g, won), c, base): Winners<T>, stride: usize) {
    for (gs, ats) in g.chunks_exact(c).zip(won.chunks_exact(c)) {
        for ((acc, &gv), &at) in acc.chunks_exact_mut(stride).zip(gs).zip(ats) {
            if at < T::zero() {
                continue;
            }
            let cell = at.to_f64() as usize - base;
            let patch = &q[cell * stride..(cell + 1) * stride];
            for (a, p) in acc.chunks_exact_mut(BLOCK).zip(patch.chunks_exact(BLOCK)) {
                let (mut sum, p): ([T; BLOCK], &[T; BLOCK]) =
                    ((*a).try_into().expect("a block"), p.try_into().expect("a block"));
                for (s, &p) in sum.iter_mut().zip(p) {
                    *s += gv * p;
                }
                a.copy_from_slice(&sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::ConvAlgorithm;
    use crate::ops::layers::conv_bn::tests::{assert_twins_agree, max_diff, twin_layers};
    use crate::ops::layers::Conv2dConfig;
    use candle_core::{Device, Module, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// Variables' values by name, in f64.
    type Values = Vec<(String, Tensor)>;

    /// A stem `(conv, bn)` in `dtype` holding `values` where given, and the values it holds.
    fn stem_layers(
        cout: usize,
        dtype: DType,
        values: Option<&[(String, Tensor)]>,
    ) -> candle_core::Result<((Conv2d, BatchNorm), Values)> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, dtype, &Device::Cpu);
        let cfg = Conv2dConfig { in_channels: 1, out_channels: cout, kernel_size: 7, stride: 2, padding: 3 };
        let layers = (Conv2d::new(cfg, vb.pp("conv"))?, BatchNorm::new(cout, vb.pp("bn"))?);
        let data = map.data().lock().expect("vars");
        let mut held = Vec::new();
        for (name, var) in data.iter() {
            let value = match values {
                Some(values) => values.iter().find(|(n, _)| n == name).expect("a value per variable").1.clone(),
                // γ and β off their 1 and 0 starts, the running statistics off 0 and 1.
                None => match name.as_str() {
                    "bn.weight" => var.as_tensor().rand_like(0.5, 1.5)?,
                    "bn.bias" | "bn.running_mean" => var.as_tensor().rand_like(-0.5, 0.5)?,
                    "bn.running_var" => var.as_tensor().rand_like(0.5, 2.0)?,
                    _ => {
                        held.push((name.clone(), var.as_tensor().to_dtype(DType::F64)?));
                        continue;
                    }
                },
            };
            var.set(&value.to_dtype(dtype)?)?;
            held.push((name.clone(), value.to_dtype(DType::F64)?));
        }
        drop(data);
        Ok((layers, held))
    }

    /// `max |a − b| / max |b|` over all elements.
    fn err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
        let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
        let scalar = |t: Tensor| t.to_scalar::<f64>();
        Ok(scalar((&a - &b)?.abs()?.max_all()?)? / scalar(b.abs()?.max_all()?)?.max(f64::MIN_POSITIVE))
    }

    /// Images whose values repeat from run to run: `offset` plus a smooth pattern plus noise from
    /// a hash, like upsampled photographs.
    fn images(b: usize, h: usize, offset: f64) -> candle_core::Result<Tensor> {
        let v: Vec<f64> = (0..b * h * h)
            .map(|i| {
                let (n, y, x) = (i / (h * h), i / h % h, i % h);
                let hash = (i as u64 ^ 0x9e37_79b9).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
                let smooth = ((x as f64 * 0.21 + n as f64).sin() * (y as f64 * 0.13).cos()).abs();
                offset + smooth + 0.5 * (hash as f64 / (1u64 << 24) as f64)
            })
            .collect();
        Tensor::from_vec(v, (b, h, h, 1), &Device::Cpu)
    }

    /// The training stem without its activation against the layers one after the other in f64
    /// (convolution, BatchNorm with ReLU, pool, candle's backward through the pool), with the
    /// same parameters and images: the output, the gradients of the convolution's weight, γ and β
    /// under one probe, the running statistics, and the bias's gradient, which is 0 here and
    /// within rounding of 0 through the layers. Tolerances (`max |a − b| / max |b|`): 1e-12 in
    /// f64 (the sums in another order); in f32, 5e-6 for the output and the statistics (the
    /// convolution's f32 output rounds about as much) and 2e-5 for the gradients (sums of over 10⁴
    /// f32 terms). Cases: 96 px images (two runs each, channels past a
    /// block of 64), 28 px (one run, 196 pixels), 224 px (seven runs), and images far from
    /// zero, whose moments would cancel without the shift.
    #[test]
    fn the_stem_without_its_activation_matches_the_layers() -> candle_core::Result<()> {
        let pool = MaxPool2d::d2l_stem();
        // (batch, side, channels, offset)
        let cases = [(2, 96, 67, 0.0), (6, 28, 8, 0.0), (1, 224, 4, 0.0), (3, 40, 5, 100.0), (2, 16, 3, -3.0)];
        for &(b, h, cout, offset) in &cases {
            let ((conv, bn), values) = stem_layers(cout, DType::F64, None)?;
            let x = images(b, h, offset)?;
            let probe = Tensor::randn(0f64, 1., (b, h.div_ceil(4), h.div_ceil(4), cout), &Device::Cpu)?;
            // The reference: the images as a variable, so the node that keeps the activation runs.
            let xv = Var::from_tensor(&x)?;
            let want = conv_bn_pool(&conv, &bn, pool, xv.as_tensor(), true, GpuOps::default())?;
            let want_grads = (&want * &probe)?.sum_all()?.backward()?;
            for dtype in [DType::F64, DType::F32] {
                let case = format!("{:?}", (b, h, cout, offset, dtype));
                let ((conv2, bn2), _) = stem_layers(cout, dtype, Some(&values))?;
                let xs = x.to_dtype(dtype)?;
                assert!(train_node(&conv2, &bn2, pool, &xs)?.is_some(), "{case}: the node applies");
                // A fresh pair: the line above ran one forward of its own.
                let ((conv2, bn2), _) = stem_layers(cout, dtype, Some(&values))?;
                let got = conv_bn_pool(&conv2, &bn2, pool, &xs, true, GpuOps::default())?;
                let got_grads = (&got * &probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
                let (tol_y, tol_g) = if dtype == DType::F64 { (1e-12, 1e-12) } else { (5e-6, 2e-5) };
                let e = err(&got, &want)?;
                assert!(e < tol_y, "{case}: output err {e}");
                for (name, t, t2, tol) in [
                    ("running mean", bn.running_mean(), bn2.running_mean(), tol_y),
                    ("running var", bn.running_var(), bn2.running_var(), tol_y),
                ] {
                    let e = err(t2, t)?;
                    assert!(e < tol, "{case}: {name} err {e}");
                }
                for (name, t, t2) in [
                    ("conv weight", conv.weight(), conv2.weight()),
                    ("bn weight", bn.weight(), bn2.weight()),
                    ("bn bias", bn.bias(), bn2.bias()),
                ] {
                    let e = err(got_grads.get(t2).expect("grad"), want_grads.get(t).expect("grad"))?;
                    assert!(e < tol_g, "{case}: {name} gradient err {e}");
                }
                let bias_grad = got_grads.get(conv2.bias()).expect("grad").abs()?.max_all()?.to_dtype(DType::F64)?;
                assert_eq!(bias_grad.to_scalar::<f64>()?, 0.0, "{case}");
                let scale = want_grads.get(conv.weight()).expect("grad").abs()?.max_all()?.to_scalar::<f64>()?;
                let through_layers = want_grads.get(conv.bias()).expect("grad").abs()?.max_all()?.to_scalar::<f64>()?;
                assert!(through_layers < 1e-9 * scale, "{case}: the layers' bias gradient {through_layers}");
            }
        }
        Ok(())
    }

    /// The stem's node with its max-pool against the layers one after the other (convolution,
    /// BatchNorm with ReLU, pool) on twin layers, for images that need a gradient (those that
    /// need none take this module's op): output, the gradients of the input and of
    /// the four trained parameters, and the running statistics, bit for bit, in f32 and f64, for
    /// d2l's 7×7/2 stem and a 3×3 Winograd shape; in evaluation the pool after [`conv_bn`]. The
    /// node's backward sums the BatchNorm's blocks of 256 rows from images it recomputes in
    /// parts: the 28 px cases have 196 rows per image, so blocks and tasks end inside images.
    #[test]
    fn stem_node_with_its_pool_equals_the_layers() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let pool = MaxPool2d::d2l_stem();
        // The last has channels in a block of the sums' `SUM_BLOCK` and after it.
        let cases = [
            (2, 16, 1, 4, 7, 2, 3),
            (3, 8, 3, 5, 3, 1, 1),
            (6, 28, 1, 4, 7, 2, 3),
            (22, 28, 1, 8, 7, 2, 3),
            (6, 28, 1, 67, 7, 2, 3),
        ];
        for &(b, h, cin, cout, k, s, p) in &cases {
            for dtype in [DType::F32, DType::F64] {
                let case = format!("{:?}", (b, h, cin, cout, k, s, p, dtype));
                let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride: s, padding: p };
                let twins = twin_layers(cfg, dtype, ConvAlgorithm::Winograd)?;
                let [(conv, bn), (twin_conv, twin_bn)] = &twins;
                let var = Var::from_tensor(&Tensor::randn(0f32, 1., (b, h, h, cin), &dev)?.to_dtype(dtype)?)?;
                let x = var.as_tensor();
                let fused = conv_bn_pool(conv, bn, pool, x, true, GpuOps::default())?;
                let apart = pool.forward(&twin_bn.forward_act(&twin_conv.forward(x)?, true, true)?)?;
                assert_twins_agree(fused, apart, Some(&var), &twins, &case)?;
                let eval = conv_bn_pool(conv, bn, pool, x, false, GpuOps::default())?;
                let want = pool.forward(&conv_bn(conv, bn, x, false, true)?)?;
                assert_eq!(max_diff(&eval, &want)?, 0.0, "evaluation differs for {case}");
            }
        }
        Ok(())
    }
}
