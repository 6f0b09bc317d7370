//! Single-pass channels-last elementwise ops with single-pass backwards: ReLU and residual
//! add + ReLU, and the per-channel column sums of a bias gradient. On CPU each replaces several candle passes (and
//! allocations); on other devices they fall back to candle's own ops.

use std::mem::MaybeUninit;

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::scratch;
use super::simd::with_fma;
use super::storage::contiguous;
use super::tape;

/// Elements per parallel task.
const CHUNK: usize = 64 * 1024;

/// `f(a, b)` element by element (`b` at least as long as `a`).
fn map2<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    assert!(b.len() >= a.len(), "map2: the second operand is shorter than the first");
    let fill = |out: &mut [MaybeUninit<T>]| {
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (x, y))| {
            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                o.write(f(x, y));
            }
        })
    };
    // SAFETY: each chunk of the output is zipped with `a`'s chunk of the same length and `b`'s,
    // at least as long: every element is written.
    unsafe { scratch::written(a.len(), fill) }
}

/// `f(a)` element by element.
fn map1<T: WithDType>(a: &[T], f: impl Fn(T) -> T + Sync) -> Vec<T> {
    let fill = |out: &mut [MaybeUninit<T>]| {
        out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK)).for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                o.write(f(x));
            }
        })
    };
    // SAFETY: each chunk of the output is zipped with `a`'s chunk of the same length.
    unsafe { scratch::written(a.len(), fill) }
}

macro_rules! dispatch2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $op:expr, |$a:ident, $b:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let ($a, $b) = (contiguous(a, $l1, $op)?, contiguous(b, $l2, $op)?);
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let ($a, $b) = (contiguous(a, $l1, $op)?, contiguous(b, $l2, $op)?);
                CpuStorage::F64($body)
            }
            (a, _) => candle_core::bail!("{} supports matching f32 or f64 tensors, got {:?}", $op, a.dtype()),
        }
    };
}

fn use_fused(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// `max(x, 0)` in place, in parallel (a NaN stays a NaN).
pub(crate) fn relu_in_place<T: WithDType>(ys: &mut [T]) {
    ys.par_chunks_mut(CHUNK).for_each(relu_rows);
}

/// `ys + rs` in place, then ReLU with `relu`, in parallel (`rs` of `ys`'s length).
pub(crate) fn add_relu_in_place<T: WithDType>(ys: &mut [T], rs: &[T], relu: bool) {
    assert_eq!(ys.len(), rs.len(), "add_relu_in_place: operands of different lengths");
    ys.par_chunks_mut(CHUNK).zip(rs.par_chunks(CHUNK)).for_each(|(y, r)| {
        with_fma(
            #[inline(always)]
            || {
                for (v, &rv) in y.iter_mut().zip(r) {
                    let t = *v + rv;
                    *v = if relu && t < T::zero() { T::zero() } else { t };
                }
            },
        )
    });
}

/// [`relu_in_place`] on the calling thread: for a task's own rows, while they are in its cache.
pub(crate) fn relu_rows<T: WithDType>(ys: &mut [T]) {
    with_fma(
        #[inline(always)]
        || {
            for v in ys {
                *v = if *v < T::zero() { T::zero() } else { *v };
            }
        },
    )
}

/// `grad` where `ys > 0`, else 0: the gradient through a ReLU whose output was `ys`.
pub(crate) fn mask_by_positive(ys: &Tensor, grad: &Tensor) -> candle_core::Result<Tensor> {
    ys.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &MaskByPositive)
}

/// `max(x, 0)`.
pub fn relu(xs: &Tensor) -> candle_core::Result<Tensor> {
    if use_fused(xs) {
        tape::op1(&xs.contiguous()?, Relu)
    } else {
        xs.relu()
    }
}

/// `max(a + b, 0)`: the end of d2l's residual block.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if a.dims() != b.dims() {
        candle_core::bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims())
    }
    if use_fused(a) {
        tape::op2(&a.contiguous()?, &b.contiguous()?, AddRelu)
    } else {
        (a + b)?.relu()
    }
}

#[derive(Debug, Clone, Copy)]
struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-fused"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l.dims());
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(map1(contiguous(x, l, "relu")?, |v| if v > 0.0 { v } else { 0.0 })),
            CpuStorage::F64(x) => CpuStorage::F64(map1(contiguous(x, l, "relu")?, |v| if v > 0.0 { v } else { 0.0 })),
            other => candle_core::bail!("relu supports f32 or f64, got {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(mask_by_positive(res, grad)?))
    }
}

/// `(y, dy) -> dy where y > 0, else 0`: the backward of both ReLU ops.
#[derive(Debug, Clone, Copy)]
struct MaskByPositive;

impl CustomOp2 for MaskByPositive {
    fn name(&self) -> &'static str {
        "relu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: operands of shapes {:?} and {:?}", self.name(), l1.shape(), l2.shape())
        }
        let out = dispatch2!(s1, l1, s2, l2, "relu-backward", |y, g| map2(y, g, |y, g| if y > Default::default() {
            g
        } else {
            Default::default()
        }));
        Ok((out, l1.shape().clone()))
    }
}

#[derive(Debug, Clone, Copy)]
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        tape::ADD_RELU
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: operands of shapes {:?} and {:?}", self.name(), l1.shape(), l2.shape())
        }
        let out = dispatch2!(s1, l1, s2, l2, "add-relu", |a, b| map2(a, b, |a, b| {
            let s = a + b;
            if s > Default::default() {
                s
            } else {
                Default::default()
            }
        }));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &MaskByPositive)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// Column sums of a `(rows, c)` matrix in a fixed order (deterministic across runs).
fn column_sums<T: WithDType>(g: &[T], c: usize) -> Vec<T> {
    let partials: Vec<Vec<f64>> = g.par_chunks(COLUMN_ROWS * c).map(|block| column_block_sums(block, c)).collect();
    column_sums_total(partials, c)
}

/// Rows per block of [`column_sums`]: fixed, so the sums are added in the same order on every
/// run, and in the same order by a caller that makes the rows a multiple of it at a time.
pub(crate) const COLUMN_ROWS: usize = 1024;

/// Columns whose sums [`column_block_sums`] keeps in registers while it runs down the rows.
const COLUMN_BLOCK: usize = 64;

/// One block's sums per column (`block`: at most [`COLUMN_ROWS`] rows of `c`), in f64, each
/// column's rows added in order: [`COLUMN_BLOCK`] columns at a time down the rows, their sums
/// in registers, then any columns left over.
pub(crate) fn column_block_sums<T: WithDType>(block: &[T], c: usize) -> Vec<f64> {
    let mut acc = vec![0f64; c];
    let whole = c / COLUMN_BLOCK * COLUMN_BLOCK;
    with_fma(
        #[inline(always)]
        || {
            for col in (0..whole).step_by(COLUMN_BLOCK) {
                let mut sums = [0f64; COLUMN_BLOCK];
                for row in block.chunks_exact(c) {
                    let row: &[T; COLUMN_BLOCK] = row[col..col + COLUMN_BLOCK].try_into().expect("a block");
                    for (a, &v) in sums.iter_mut().zip(row) {
                        *a += v.to_f64();
                    }
                }
                acc[col..col + COLUMN_BLOCK].copy_from_slice(&sums);
            }
            if whole < c {
                for row in block.chunks_exact(c) {
                    for (a, &v) in acc[whole..].iter_mut().zip(&row[whole..]) {
                        *a += v.to_f64();
                    }
                }
            }
        },
    );
    acc
}

/// [`column_sums`] from its blocks' sums ([`column_block_sums`]), in block order.
pub(crate) fn column_sums_total<T: WithDType>(partials: impl IntoIterator<Item = Vec<f64>>, c: usize) -> Vec<T> {
    let mut total = vec![0f64; c];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total.into_iter().map(T::from_f64).collect()
}

/// Sums of a contiguous `(rows, c)` tensor's columns, `(c,)`, in a fixed order.
pub fn column_sums_tensor(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (_, c) = xs.dims2()?;
    if use_fused(xs) {
        xs.contiguous()?.apply_op1_no_bwd(&ColumnSums { c })
    } else {
        xs.sum(0)
    }
}

#[derive(Debug, Clone, Copy)]
struct ColumnSums {
    c: usize,
}

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l.dims());
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(column_sums(contiguous(x, l, "column-sums")?, self.c)),
            CpuStorage::F64(x) => CpuStorage::F64(column_sums(contiguous(x, l, "column-sums")?, self.c)),
            other => candle_core::bail!("column sums support f32 or f64, got {:?}", other.dtype()),
        };
        Ok((out, Shape::from(self.c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
    }

    /// Each fused op against candle's own ops in float64, forward and backward (exact up to
    /// summation order: tolerance 1e-12).
    #[test]
    fn fused_ops_match_candle_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let a = Var::randn(0f64, 1., (300, 7), &dev)?;
        let b = Var::randn(0f64, 1., (300, 7), &dev)?;
        let probe = Tensor::randn(0f64, 1., (300, 7), &dev)?;
        let pairs = [
            (relu(a.as_tensor())?, a.as_tensor().relu()?),
            (add_relu(a.as_tensor(), b.as_tensor())?, (a.as_tensor() + b.as_tensor())?.relu()?),
        ];
        for (ours, theirs) in pairs {
            assert!(max_diff(&ours, &theirs)? < 1e-12);
            let g1 = (ours * &probe)?.sum_all()?.backward()?;
            let g2 = (theirs * &probe)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                match (g1.get(v.as_tensor()), g2.get(v.as_tensor())) {
                    (Some(x), Some(y)) => assert!(max_diff(x, y)? < 1e-12),
                    (None, None) => {}
                    _ => panic!("gradient present in one formulation only"),
                }
            }
        }
        Ok(())
    }
}
