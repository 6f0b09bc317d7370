//! `resnet-cli device-check`: every op on a GPU against the CPU, then training and evaluation
//! speed and device memory per kernel choice and precision, as JSON (see
//! `scripts/device_check.sh`, which runs it on a GPU machine).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use resnet_core::op_check::{self, OpCheck, Outcome as CheckOutcome};
use resnet_core::GpuOps;
use resnet_train::{Precision, Schedule, SgdConfig, TrainConfig, Trainer};
use serde_json::{json, Value};

use super::Outcome;
use crate::args::{CheckPrecisionArg, DeviceCheckArgs};

/// One timed configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedConfig {
    /// Training steps (forward, backward, update) or evaluation forwards.
    pub train: bool,
    /// Image side.
    pub resize: usize,
    /// Batch size.
    pub batch: usize,
}

/// Parses `mode:resize:batch` (e.g. `train:96:256`).
pub fn parse_config(s: &str) -> Result<TimedConfig> {
    let parts: Vec<&str> = s.trim().split(':').collect();
    let [mode, resize, batch] = parts.as_slice() else {
        bail!("--configs entry `{s}`: expected mode:resize:batch, e.g. train:96:256");
    };
    let train = match *mode {
        "train" => true,
        "eval" => false,
        other => bail!("--configs entry `{s}`: mode `{other}` is neither train nor eval"),
    };
    let resize: usize = resize.parse().with_context(|| format!("--configs entry `{s}`: bad resize `{resize}`"))?;
    let batch: usize = batch.parse().with_context(|| format!("--configs entry `{s}`: bad batch `{batch}`"))?;
    if !(8..=512).contains(&resize) || !(2..=4096).contains(&batch) {
        bail!("--configs entry `{s}`: resize must be 8..=512 and batch 2..=4096");
    }
    Ok(TimedConfig { train, resize, batch })
}

pub fn run(a: DeviceCheckArgs) -> Result<Outcome> {
    let configs = a.configs.iter().map(|s| parse_config(s)).collect::<Result<Vec<_>>>()?;
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let (device, fallback) = open(&a.device);
    let label = describe(&device, fallback.as_deref());
    println!("device-check on {label}");
    let mut report = json!({
        "device": label,
        "cuda": device.is_cuda(),
        "fallback_reason": fallback,
        "unix_time": unix_time(),
        "tolerances": { "f32": op_check::F32_TOLERANCE, "bf16": op_check::BF16_TOLERANCE },
        "op_checks": [],
        "timings": [],
    });

    let started = Instant::now();
    let checks = if a.no_op_checks { Vec::new() } else { op_check::check_ops(&device) };
    for c in &checks {
        print_check(c);
    }
    let failed = checks.iter().filter(|c| c.outcome == CheckOutcome::Fail).count();
    report["op_checks"] = serde_json::to_value(&checks)?;
    report["op_check_seconds"] = json!(started.elapsed().as_secs_f64());
    write(&a.out, &report)?;

    if !a.ops_only {
        let mut timings = Vec::new();
        for cfg in &configs {
            for precision in &a.precisions {
                for ops in &a.gpu_ops {
                    let row = time_one(*cfg, *precision, GpuOps::from(*ops), &device, a.warmup, a.steps);
                    print_timing(&row);
                    timings.push(row);
                    // Rewritten after every measurement: a run cut short by its time limit keeps
                    // what it measured.
                    report["timings"] = Value::Array(timings.clone());
                    write(&a.out, &report)?;
                }
            }
        }
    }
    if let Some(path) = &a.out {
        println!("JSON report: {}", path.display());
    }
    if failed > 0 {
        bail!("{failed} op check(s) FAILED; see the table above");
    }
    Ok(Outcome::Done)
}

/// Opens the device, or the CPU with the reason the device could not be opened.
fn open(spec: &str) -> (Device, Option<String>) {
    match crate::device::select(spec) {
        Ok(d) => (d, None),
        Err(e) => {
            // The first line: candle appends a backtrace to some errors.
            let reason = format!("{e:#}").lines().next().unwrap_or_default().trim().to_string();
            tracing::warn!("device-check: {reason}; falling back to the CPU");
            (Device::Cpu, Some(reason))
        }
    }
}

fn describe(device: &Device, fallback: Option<&str>) -> String {
    match (device, fallback) {
        (Device::Cpu, Some(why)) => format!("CPU (fallback: {why})"),
        (Device::Cpu, None) => "CPU".to_string(),
        _ => gpu_name(device).unwrap_or_else(|| "CUDA device".to_string()),
    }
}

#[cfg(feature = "cuda")]
fn gpu_name(device: &Device) -> Option<String> {
    let ctx = device.as_cuda_device().ok()?.cuda_stream().context().clone();
    let name = ctx.name().ok()?;
    let cap = ctx.compute_capability().ok().map(|(a, b)| format!(", sm_{a}{b}")).unwrap_or_default();
    Some(format!("{name}{cap}"))
}

#[cfg(not(feature = "cuda"))]
fn gpu_name(_: &Device) -> Option<String> {
    None
}

/// Device memory in use (total − free, all processes), after waiting for queued work.
#[cfg(feature = "cuda")]
fn device_memory_in_use(device: &Device) -> Option<u64> {
    device.synchronize().ok()?;
    let ctx = device.as_cuda_device().ok()?.cuda_stream().context().clone();
    ctx.mem_get_info().ok().map(|(free, total)| (total - free) as u64)
}

#[cfg(not(feature = "cuda"))]
fn device_memory_in_use(_: &Device) -> Option<u64> {
    None
}

fn precision_name(p: CheckPrecisionArg) -> &'static str {
    match p {
        CheckPrecisionArg::F32 => "f32",
        CheckPrecisionArg::Tf32 => "tf32",
        CheckPrecisionArg::Bf16 => "bf16",
    }
}

/// Times one configuration; a configuration that cannot run here is `SKIPPED` with the reason,
/// one that fails is `FAILED` with the error.
fn time_one(
    cfg: TimedConfig,
    precision: CheckPrecisionArg,
    ops: GpuOps,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> Value {
    let mut row = json!({
        "mode": if cfg.train { "train" } else { "eval" },
        "resize": cfg.resize,
        "batch": cfg.batch,
        "precision": precision_name(precision),
        "gpu_ops": ops.name(),
    });
    let skip = if !device.is_cuda() && precision != CheckPrecisionArg::F32 {
        Some(format!("{} needs a CUDA device", precision_name(precision)))
    } else if !device.is_cuda() && ops != GpuOps::Candle {
        Some(format!("the {} kernels run on CUDA devices only", ops.name()))
    } else if !ops.compiled() {
        Some(format!("this build has no {} kernels", ops.name()))
    } else {
        None
    };
    if let Some(why) = skip {
        row["status"] = json!("SKIPPED");
        row["reason"] = json!(why);
        return row;
    }
    match measure(cfg, precision, ops, device, warmup, steps) {
        Ok(m) => {
            row["status"] = json!("OK");
            row["examples_per_sec"] = json!(m.examples_per_sec);
            row["ms_per_step"] = json!(m.ms_per_step);
            row["device_memory_before_bytes"] = json!(m.memory_before);
            row["device_memory_peak_bytes"] = json!(m.memory_peak);
            row["steps"] = json!(steps);
        }
        Err(e) => {
            row["status"] = json!("FAILED");
            row["reason"] = json!(format!("{e:#}"));
        }
    }
    row
}

struct Measurement {
    examples_per_sec: f64,
    ms_per_step: f64,
    memory_before: Option<u64>,
    memory_peak: Option<u64>,
}

fn measure(
    cfg: TimedConfig,
    precision: CheckPrecisionArg,
    ops: GpuOps,
    device: &Device,
    warmup: usize,
    steps: usize,
) -> Result<Measurement> {
    // TF32 is a process-wide switch that the trainer only ever turns on: start each
    // measurement from off.
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let memory_before = device_memory_in_use(device);
    let train_cfg = TrainConfig {
        precision: if precision == CheckPrecisionArg::Bf16 { Precision::Bf16 } else { Precision::F32 },
        tf32: precision == CheckPrecisionArg::Tf32,
        gpu_ops: ops,
        batch_size: cfg.batch,
        eval_batch_size: cfg.batch,
        resize: cfg.resize,
        optimizer: SgdConfig { lr: 0.05, momentum: 0.0, nesterov: false, weight_decay: 0.0 },
        schedule: Schedule::Constant,
        ..TrainConfig::d2l()
    };
    let mut trainer = Trainer::new(train_cfg, device)?;
    let xs = Tensor::rand(0f32, 1., (cfg.batch, 1, cfg.resize, cfg.resize), device)?;
    let labels: Vec<u32> = (0..cfg.batch as u32).map(|i| (i * 7) % 10).collect();
    let ys = Tensor::from_vec(labels, cfg.batch, device)?;
    let mut peak = memory_before;
    let step = |trainer: &mut Trainer| -> Result<()> {
        if cfg.train {
            // Reads back the loss and the correct count: the step has finished when it returns.
            trainer.train_batch(&xs, &ys, 0.05)?;
        } else {
            let logits = trainer.model().infer(&xs)?;
            let _: Vec<u32> = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?;
        }
        Ok(())
    };
    for _ in 0..warmup {
        step(&mut trainer)?;
    }
    let t = Instant::now();
    for _ in 0..steps {
        step(&mut trainer)?;
    }
    let seconds = t.elapsed().as_secs_f64();
    // Sampled after the timed steps so the sampling's synchronisation is not timed.
    if let Some(m) = device_memory_in_use(device) {
        peak = Some(peak.map_or(m, |p| p.max(m)));
    }
    Ok(Measurement {
        examples_per_sec: (cfg.batch * steps) as f64 / seconds,
        ms_per_step: 1e3 * seconds / steps as f64,
        memory_before,
        memory_peak: peak,
    })
}

fn print_check(c: &OpCheck) {
    let outcome = match c.outcome {
        CheckOutcome::Pass => "PASS",
        CheckOutcome::Fail => "FAIL",
        CheckOutcome::Skipped => "SKIPPED",
    };
    let err = c.max_error.map(|e| format!("{e:.2e}")).unwrap_or_else(|| "-".into());
    println!(
        "{outcome:<8} {:<40} {:<7} {:<5} max err {err} (tol {:.0e}): {}",
        c.op,
        c.gpu_ops.name(),
        c.dtype,
        c.tolerance,
        c.detail
    );
}

fn print_timing(row: &Value) {
    let head = format!(
        "{} {}px batch {} {} {}",
        row["mode"].as_str().unwrap_or("?"),
        row["resize"],
        row["batch"],
        row["precision"].as_str().unwrap_or("?"),
        row["gpu_ops"].as_str().unwrap_or("?")
    );
    match row["status"].as_str() {
        Some("OK") => {
            let mem = row["device_memory_peak_bytes"]
                .as_u64()
                .map(|b| format!(", device memory {:.2} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_default();
            println!(
                "{head}: {:.1} examples/s ({:.1} ms/step{mem})",
                row["examples_per_sec"].as_f64().unwrap_or(0.0),
                row["ms_per_step"].as_f64().unwrap_or(0.0)
            );
        }
        status => println!("{head}: {} ({})", status.unwrap_or("?"), row["reason"].as_str().unwrap_or("")),
    }
}

fn write(path: &Option<std::path::PathBuf>, report: &Value) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    let text = serde_json::to_string_pretty(report)?;
    write_report(path, text.as_bytes())
}

fn write_report(path: &Path, bytes: &[u8]) -> Result<()> {
    resnet_train::write_atomic(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn unix_time() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_and_bad_ones_name_the_entry() -> Result<()> {
        assert_eq!(parse_config("train:96:256")?, TimedConfig { train: true, resize: 96, batch: 256 });
        assert_eq!(parse_config("eval:224:128")?, TimedConfig { train: false, resize: 224, batch: 128 });
        for bad in ["train:96", "fit:96:256", "train:x:256", "train:96:1", "eval:4:8"] {
            let e = parse_config(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(bad), "`{bad}` should be refused naming itself, got `{e}`");
        }
        Ok(())
    }

    /// On the CPU, tf32, bf16 and the cuDNN kernels are skipped with a reason, never timed.
    #[test]
    fn cpu_only_settings_are_skipped_with_a_reason() {
        let cfg = TimedConfig { train: true, resize: 16, batch: 4 };
        for (p, ops) in [
            (CheckPrecisionArg::Tf32, GpuOps::Candle),
            (CheckPrecisionArg::Bf16, GpuOps::Candle),
            (CheckPrecisionArg::F32, GpuOps::Cudnn),
        ] {
            let row = time_one(cfg, p, ops, &Device::Cpu, 0, 1);
            assert_eq!(row["status"], "SKIPPED", "{row}");
            assert!(row["reason"].as_str().is_some_and(|r| !r.is_empty()), "{row}");
        }
    }
}
