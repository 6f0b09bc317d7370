//! The device check of every op a CUDA device runs: each layer on the device against the same
//! layer on the CPU (the project's tested CPU kernels), forward and backward, per kernel choice
//! ([`GpuOps`]) and dtype, with stated tolerances.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use serde::Serialize;

use crate::ops::{BatchNorm, Conv2d, Conv2dConfig, GpuOps, MaxPool2d};

/// Largest error allowed for f32, relative to the reference's largest magnitude: float
/// rounding of sums over a few thousand terms, in whatever order the library sums.
pub const F32_TOLERANCE: f64 = 1e-4;
/// Largest error allowed for bf16 (8 significant bits: one rounding of the output is 2^-9), with
/// inputs rounded to bf16 on both sides, relative to the reference's largest magnitude.
pub const BF16_TOLERANCE: f64 = 2e-2;

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    /// Every output within tolerance.
    Pass,
    /// Some output beyond tolerance, or the op failed to run.
    Fail,
    /// Not run here (no CUDA device, or the kernels are not in this build); never a pass.
    Skipped,
}

/// One op, kernel choice and dtype, checked forward and backward.
#[derive(Debug, Clone, Serialize)]
pub struct OpCheck {
    /// The op and its geometry, e.g. `conv 3x3/1/1 (4, 12, 12, 8 -> 16)`.
    pub op: String,
    /// The kernels checked.
    pub gpu_ops: GpuOps,
    /// The compute dtype on the device (`f32` or `bf16`).
    pub dtype: String,
    /// The verdict.
    pub outcome: Outcome,
    /// The largest relative error over every output (absent when not run).
    pub max_error: Option<f64>,
    /// The tolerance applied.
    pub tolerance: f64,
    /// Each output's error, or why the check was skipped or failed.
    pub detail: String,
}

/// Checks every op on `device` against the CPU: convolutions of each geometry the network uses,
/// training-mode BatchNorm (output, gradients and running statistics) and max-pooling, for each
/// [`GpuOps`] choice and in f32 and bf16. On a CPU device every check is [`Outcome::Skipped`].
pub fn check_ops(device: &Device) -> Vec<OpCheck> {
    let mut out = Vec::new();
    for case in CASES {
        for gpu_ops in GpuOps::ALL {
            for dtype in [DType::F32, DType::BF16] {
                let tolerance = if dtype == DType::F32 { F32_TOLERANCE } else { BF16_TOLERANCE };
                let mut check = OpCheck {
                    op: case.label(),
                    gpu_ops,
                    dtype: dtype.as_str().to_string(),
                    outcome: Outcome::Skipped,
                    max_error: None,
                    tolerance,
                    detail: String::new(),
                };
                if !device.is_cuda() {
                    check.detail = "no CUDA device: the check compares a GPU against the CPU".into();
                } else if !gpu_ops.compiled() {
                    check.detail = format!("this build has no {} kernels (build feature `cudnn`)", gpu_ops.name());
                } else {
                    match compare(case, gpu_ops, dtype, device) {
                        Ok(errors) => {
                            let worst = errors.iter().map(|(_, e)| *e).fold(0.0, f64::max);
                            let finite = errors.iter().all(|(_, e)| e.is_finite());
                            check.max_error = Some(worst);
                            check.outcome = if finite && worst <= tolerance { Outcome::Pass } else { Outcome::Fail };
                            check.detail =
                                errors.iter().map(|(n, e)| format!("{n} {e:.2e}")).collect::<Vec<_>>().join(", ");
                        }
                        Err(e) => {
                            check.outcome = Outcome::Fail;
                            check.detail = format!("the op failed: {e}");
                        }
                    }
                }
                out.push(check);
            }
        }
    }
    out
}

/// An op and its geometry.
#[derive(Debug, Clone, Copy)]
enum Case {
    /// `(batch, height, width, in, out, kernel, stride, pad)`.
    Conv(usize, usize, usize, usize, usize, usize, usize, usize),
    /// `(batch, height, width, channels)`.
    BatchNorm(usize, usize, usize, usize),
    /// `(batch, height, width, channels, kernel, stride, pad)`.
    MaxPool(usize, usize, usize, usize, usize, usize, usize),
}

/// The geometries d2l's ResNet-18 runs: the stem's 7×7/2 on one channel, 3×3/1, 3×3/2, the
/// 1×1/2 shortcut; BatchNorm; the stem's 3×3/2/1 pool and a plain 2×2/2 one.
const CASES: [Case; 7] = [
    Case::Conv(4, 20, 20, 1, 8, 7, 2, 3),
    Case::Conv(4, 12, 12, 8, 16, 3, 1, 1),
    Case::Conv(4, 12, 12, 8, 16, 3, 2, 1),
    Case::Conv(4, 12, 12, 8, 16, 1, 2, 0),
    Case::BatchNorm(4, 6, 6, 16),
    Case::MaxPool(4, 12, 12, 8, 3, 2, 1),
    Case::MaxPool(4, 12, 12, 8, 2, 2, 0),
];

impl Case {
    fn label(&self) -> String {
        match *self {
            Case::Conv(b, h, w, ci, co, k, s, p) => format!("conv {k}x{k}/{s}/{p} ({b}, {h}, {w}, {ci} -> {co})"),
            Case::BatchNorm(b, h, w, c) => format!("batch-norm train ({b}, {h}, {w}, {c})"),
            Case::MaxPool(b, h, w, c, k, s, p) => format!("max-pool {k}x{k}/{s}/{p} ({b}, {h}, {w}, {c})"),
        }
    }
}

/// Max relative error: `max |a - b| / max |b|` (over one for an all-zero reference).
pub(crate) fn relative_error(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let scale = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(diff / if scale > 0.0 { scale } else { 1.0 })
}

/// Seeded inputs, rounded to `dtype` so both sides see the same values.
fn input(shape: (usize, usize, usize, usize), dtype: DType, seed: u64) -> candle_core::Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(dtype)?.to_dtype(DType::F32)
}

/// The named outputs and gradients of `case` on `device` with `gpu_ops` in `dtype`, each with
/// its relative error against the CPU in f32.
fn compare(
    case: Case,
    gpu_ops: GpuOps,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Vec<(&'static str, f64)>> {
    let cpu = run(case, GpuOps::Candle, DType::F32, &Device::Cpu, dtype)?;
    let dev = run(case, gpu_ops, dtype, device, dtype)?;
    cpu.iter().zip(&dev).map(|((name, c), (_, d))| Ok((*name, relative_error(d, c)?))).collect()
}

/// Runs `case` once forward and backward (loss = Σ y · probe) and returns its outputs.
fn run(
    case: Case,
    gpu_ops: GpuOps,
    dtype: DType,
    device: &Device,
    rounding: DType,
) -> candle_core::Result<Vec<(&'static str, Tensor)>> {
    let (x_shape, seed) = match case {
        Case::Conv(b, h, w, c, ..) | Case::MaxPool(b, h, w, c, ..) | Case::BatchNorm(b, h, w, c) => ((b, h, w, c), 1),
    };
    let x = Var::from_tensor(&input(x_shape, rounding, seed)?.to_device(device)?)?;
    let xs = x.as_tensor().to_dtype(dtype)?;
    match case {
        Case::Conv(_, _, _, cin, cout, k, stride, padding) => {
            let cfg = Conv2dConfig { in_channels: cin, out_channels: cout, kernel_size: k, stride, padding };
            let mut map = VarMap::new();
            let mut conv = Conv2d::new(cfg, VarBuilder::from_varmap(&map, DType::F32, device))?;
            conv.set_gpu_ops(gpu_ops);
            map.set_one("weight", input((cout, cin, k, k), rounding, 2)?.to_device(device)?)?;
            map.set_one("bias", input((1, 1, 1, cout), rounding, 3)?.reshape(cout)?.to_device(device)?)?;
            let y = candle_core::Module::forward(&conv, &xs)?.to_dtype(DType::F32)?;
            let probe = input(dims4(&y)?, rounding, 4)?.to_device(device)?;
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let get = |t: &Tensor, what: &str| {
                grads.get(t).cloned().ok_or_else(|| candle_core::Error::Msg(format!("no gradient for the {what}")))
            };
            Ok(vec![
                ("y", y.clone()),
                ("dx", get(x.as_tensor(), "input")?),
                ("dw", get(conv.weight(), "weight")?),
                ("db", get(conv.bias(), "bias")?),
            ])
        }
        Case::BatchNorm(.., c) => {
            let mut map = VarMap::new();
            let mut bn = BatchNorm::new(c, VarBuilder::from_varmap(&map, DType::F32, device))?;
            bn.set_gpu_ops(gpu_ops);
            let shift = |seed: u64, by: f64| -> candle_core::Result<Tensor> {
                (input((1, 1, 1, c), rounding, seed)?.reshape(c)? + by)?.to_device(device)
            };
            map.set_one("weight", shift(5, 1.5)?)?;
            map.set_one("bias", shift(6, 0.0)?)?;
            let y = bn.forward_t(&xs, true)?.to_dtype(DType::F32)?;
            let probe = input(dims4(&y)?, rounding, 4)?.to_device(device)?;
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let get = |t: &Tensor, what: &str| {
                grads.get(t).cloned().ok_or_else(|| candle_core::Error::Msg(format!("no gradient for the {what}")))
            };
            Ok(vec![
                ("y", y.clone()),
                ("dx", get(x.as_tensor(), "input")?),
                ("dgamma", get(bn.weight(), "scale")?),
                ("dbeta", get(bn.bias(), "shift")?),
                ("running_mean", bn.running_mean().clone()),
                ("running_var", bn.running_var().clone()),
            ])
        }
        Case::MaxPool(.., k, stride, pad) => {
            let pool = MaxPool2d { kernel: k, stride, pad };
            let y = pool.forward_on(&xs, gpu_ops)?.to_dtype(DType::F32)?;
            let probe = input(dims4(&y)?, rounding, 4)?.to_device(device)?;
            let grads = (&y * &probe)?.sum_all()?.backward()?;
            let dx =
                grads.get(x.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no input gradient".into()))?;
            Ok(vec![("y", y), ("dx", dx)])
        }
    }
}

fn dims4(t: &Tensor) -> candle_core::Result<(usize, usize, usize, usize)> {
    t.dims4()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU every check is skipped with its reason, and none passes.
    #[test]
    fn on_the_cpu_every_check_is_skipped() -> candle_core::Result<()> {
        let checks = check_ops(&Device::Cpu);
        assert_eq!(checks.len(), CASES.len() * GpuOps::ALL.len() * 2);
        for c in &checks {
            assert_eq!(c.outcome, Outcome::Skipped, "{c:?}");
            assert!(c.detail.contains("no CUDA device"), "{c:?}");
            assert!(c.max_error.is_none());
        }
        Ok(())
    }

    /// The comparison itself runs every case end to end (here CPU against CPU, so the errors are
    /// zero), and the error measure sees a real difference.
    #[test]
    fn the_comparison_runs_every_case_and_measures_errors() -> candle_core::Result<()> {
        for case in CASES {
            let errors = compare(case, GpuOps::Candle, DType::F32, &Device::Cpu)?;
            assert!(errors.len() >= 2, "{case:?}: {errors:?}");
            for (name, e) in errors {
                assert!(e <= F32_TOLERANCE, "{case:?} {name}: {e}");
            }
        }
        let b = Tensor::new(&[1f32, -4.0, 2.0], &Device::Cpu)?;
        let a = Tensor::new(&[1f32, -4.0, 2.2], &Device::Cpu)?;
        let e = relative_error(&a, &b)?;
        assert!((e - 0.05).abs() < 1e-6, "0.2 off a largest magnitude of 4: {e}");
        Ok(())
    }

    /// Inputs rounded to bf16 are representable in bf16 exactly, so both sides see one value.
    #[test]
    fn rounded_inputs_survive_the_cast() -> candle_core::Result<()> {
        let x = input((2, 3, 3, 2), DType::BF16, 9)?;
        let back = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        assert_eq!(relative_error(&back, &x)?, 0.0);
        Ok(())
    }
}
