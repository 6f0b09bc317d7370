//! `cargo xtask bench`: training-step and evaluation throughput of d2l's ResNet-18 through the
//! project's real training step, optionally against PyTorch in the same invocation.
//!
//! Each configuration runs in a child process (`xtask bench-one`), so its peak memory is its own;
//! ours and PyTorch's alternate round by round, so machine noise hits both alike.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use resnet_core::{ConvAlgorithm, ResNet, ResNetConfig};
use resnet_train::{Precision, Schedule, SgdConfig, TrainConfig, Trainer};

/// What one configuration measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward + backward + SGD update + accuracy sync, training mode.
    Train,
    /// Evaluation-mode forward + argmax.
    Eval,
}

/// Convolution algorithms to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlgorithmArg {
    /// Winograd for 3×3 stride-1 convolutions, in-bounds taps only on small images, im2col for the rest (the default).
    Winograd,
    /// im2col and one matrix product for every convolution.
    Im2col,
    /// candle's stock conv2d (the straightforward port).
    Candle,
}

/// `cargo xtask bench` flags.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Also run scripts/bench_pytorch.py on the same configurations, alternating, and print ratios.
    #[arg(long)]
    pub compare_pytorch: bool,
    /// Python interpreter with torch installed (default: $RESNET_BENCH_PYTHON, else python3).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Configurations to run, e.g. `train:28:256,eval:96:256` (mode:resize:batch).
    #[arg(long, value_delimiter = ',', default_value = "train:28:256,train:96:128,train:224:32,eval:96:256")]
    pub configs: Vec<String>,
    /// Rounds per configuration (each round: ours, then PyTorch).
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Timed windows per round.
    #[arg(long, default_value_t = 3)]
    pub windows: usize,
    /// Steps per timed window.
    #[arg(long, default_value_t = 2)]
    pub steps: usize,
    /// Untimed warm-up steps per round.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// CPU threads for both sides.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Convolution algorithm for our side.
    #[arg(long, value_enum, default_value = "winograd", alias = "kernel")]
    pub algorithm: AlgorithmArg,
    /// Write the JSON report here (default: target/bench/bench.json).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Device for both sides: cpu, cuda or cuda:N (cuda needs a `cargo xtask build-cuda` binary).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision for both sides (bf16 = mixed precision with f32 weights; PyTorch uses autocast).
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
    /// Allow TF32 matrix products on both sides (CUDA).
    #[arg(long)]
    pub tf32: bool,
}

/// Training precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// f32 throughout.
    F32,
    /// bf16 activations and products, f32 master weights.
    Bf16,
    /// f16 activations and products, f32 master weights.
    F16,
}

impl PrecisionArg {
    fn name(self) -> &'static str {
        match self {
            PrecisionArg::F32 => "f32",
            PrecisionArg::Bf16 => "bf16",
            PrecisionArg::F16 => "f16",
        }
    }
}

/// Hidden `xtask bench-one` flags: one configuration in this process.
#[derive(Debug, Args)]
pub struct BenchOneArgs {
    #[arg(long, value_enum)]
    pub mode: Mode,
    #[arg(long)]
    pub resize: usize,
    #[arg(long)]
    pub batch: usize,
    #[arg(long)]
    pub windows: usize,
    #[arg(long)]
    pub steps: usize,
    #[arg(long)]
    pub warmup: usize,
    #[arg(long, value_enum, alias = "kernel")]
    pub algorithm: AlgorithmArg,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, value_enum, default_value = "f32")]
    pub precision: PrecisionArg,
    #[arg(long)]
    pub tf32: bool,
    /// Print milliseconds per step for each op and input shape (stderr) after the timed windows.
    #[arg(long)]
    pub profile: bool,
}

/// `cpu`, `cuda` or `cuda:N` as a candle device.
fn parse_device(s: &str) -> Result<Device> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("--device `{s}`: expected cpu, cuda or cuda:N"),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        bail!("--device {s}: this xtask was built without CUDA; build it with `cargo xtask build-cuda`");
    }
    Device::new_cuda(ordinal).with_context(|| format!("--device {s}: cannot open CUDA device {ordinal}"))
}

/// One side's measurement of one configuration in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Median examples/s over the round's windows.
    pub examples_per_sec: f64,
    /// Every window's examples/s.
    pub windows: Vec<f64>,
    /// Peak resident memory of the whole process.
    pub peak_rss_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
struct Config {
    mode: Mode,
    resize: usize,
    batch: usize,
}

#[derive(Debug, Serialize)]
struct Row {
    mode: Mode,
    resize: usize,
    batch: usize,
    examples_per_sec: f64,
    gflops_per_sec: f64,
    fraction_of_matmul_peak: f64,
    peak_rss_bytes: u64,
    pytorch_examples_per_sec: Option<f64>,
    pytorch_peak_rss_bytes: Option<u64>,
    ratio: Option<f64>,
    samples: Vec<Sample>,
    pytorch_samples: Vec<Sample>,
}

/// Runs the benchmark.
pub fn run(a: BenchArgs) -> Result<()> {
    let configs = a.configs.iter().map(|s| parse_config(s)).collect::<Result<Vec<_>>>()?;
    if a.rounds == 0 || a.windows == 0 || a.steps == 0 {
        bail!("--rounds, --windows and --steps must be at least 1");
    }
    let device = parse_device(&a.device)?;
    let python = if a.compare_pytorch { Some(find_python(a.python.as_deref())?) } else { None };
    let script = workspace_root().join("scripts/bench_pytorch.py");
    let peak = matmul_peak_gflops(a.threads, &device, a.precision)?;
    // The host memory's bandwidth bounds the CPU step's passes over activations; a GPU's own
    // memory is another matter.
    let memory = device.is_cpu().then(|| memory_bandwidth(a.threads));
    let cpu = cpu_description();
    eprintln!("CPU: {cpu}");
    if let Some(m) = memory {
        eprintln!(
            "memory ({} threads, {} MiB buffers): read {:.1} GB/s, copy {:.1} GB/s (read + written)",
            a.threads,
            MEMORY_PROBE_BYTES >> 20,
            m.read_gbps,
            m.copy_gbps
        );
    }
    eprintln!(
        "matmul peak (candle {} gemm on {}, {} threads): {peak:.1} GFLOP/s",
        a.precision.name(),
        a.device,
        a.threads
    );
    let stat_start = std::fs::read_to_string("/proc/stat").ok();
    let mut rows = Vec::new();
    for cfg in &configs {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for round in 0..a.rounds {
            eprintln!(
                "{} {} px, batch {}: round {}/{}",
                mode_name(cfg.mode),
                cfg.resize,
                cfg.batch,
                round + 1,
                a.rounds
            );
            ours.push(run_ours(cfg, &a)?);
            if let Some(py) = &python {
                theirs.push(run_pytorch(py, &script, cfg, &a)?);
            }
        }
        let eps = median(ours.iter().flat_map(|s| s.windows.iter().copied()).collect());
        let fwd = ResNet::forward_flops(&ResNetConfig::d2l_resnet18(), cfg.resize, cfg.resize)? as f64;
        let flops = if cfg.mode == Mode::Train { 3.0 * fwd } else { fwd };
        let gflops = eps * flops / 1e9;
        let py_eps =
            (!theirs.is_empty()).then(|| median(theirs.iter().flat_map(|s| s.windows.iter().copied()).collect()));
        rows.push(Row {
            mode: cfg.mode,
            resize: cfg.resize,
            batch: cfg.batch,
            examples_per_sec: eps,
            gflops_per_sec: gflops,
            fraction_of_matmul_peak: gflops / peak,
            peak_rss_bytes: ours.iter().map(|s| s.peak_rss_bytes).max().unwrap_or(0),
            pytorch_examples_per_sec: py_eps,
            pytorch_peak_rss_bytes: theirs.iter().map(|s| s.peak_rss_bytes).max(),
            ratio: py_eps.map(|p| eps / p),
            samples: ours,
            pytorch_samples: theirs,
        });
    }
    print_table(&rows, peak, &cpu, &a);
    // The host's speed, measured again: a figure is a ratio within one invocation, and one
    // taken while the host slowed or lent the cores elsewhere orders nothing.
    let peak_end = matmul_peak_gflops(a.threads, &device, a.precision)?;
    let stat_end = std::fs::read_to_string("/proc/stat").ok();
    let steal = stat_start.as_deref().zip(stat_end.as_deref()).and_then(|(s, e)| steal_fraction(s, e));
    let steal_text =
        steal.map(|f| format!("{:.1} % of the time stolen", 100.0 * f)).unwrap_or("steal time unknown".into());
    println!("host: matmul peak {peak:.0} GFLOP/s before, {peak_end:.0} after; {steal_text}");
    if let Some(m) = memory {
        println!(
            "host: memory read {:.1} GB/s, copy {:.1} GB/s ({} threads; the bound of the step's passes over activations)",
            m.read_gbps, m.copy_gbps, a.threads
        );
    }
    if let Some(warning) = host_warning(peak, peak_end, steal) {
        println!("warning: {warning}");
    }
    let report = serde_json::json!({
        "date": chrono_free_date(),
        "cpu": cpu,
        "threads": a.threads,
        "algorithm": format!("{:?}", a.algorithm),
        "device": a.device,
        "precision": a.precision.name(),
        "tf32": a.tf32,
        "matmul_peak_gflops": peak,
        "matmul_peak_gflops_after": peak_end,
        "memory_read_gbps": memory.map(|m| m.read_gbps),
        "memory_copy_gbps": memory.map(|m| m.copy_gbps),
        "steal_fraction": steal,
        "rows": rows,
    });
    let path = a.json.clone().unwrap_or_else(|| workspace_root().join("target/bench/bench.json"));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("JSON report: {}", path.display());
    Ok(())
}

/// Measures one configuration in this process and prints a [`Sample`] as JSON.
pub fn run_one(a: BenchOneArgs) -> Result<()> {
    let algorithm = match a.algorithm {
        AlgorithmArg::Winograd => ConvAlgorithm::Winograd,
        AlgorithmArg::Im2col => ConvAlgorithm::Im2col,
        AlgorithmArg::Candle => ConvAlgorithm::Candle,
    };
    let device = parse_device(&a.device)?;
    let precision = match a.precision {
        PrecisionArg::F32 => Precision::F32,
        PrecisionArg::Bf16 => Precision::Bf16,
        PrecisionArg::F16 => Precision::F16,
    };
    let cfg = TrainConfig {
        model: ResNetConfig::d2l_resnet18(),
        conv_algorithm: algorithm,
        precision,
        tf32: a.tf32,
        batch_size: a.batch,
        eval_batch_size: a.batch,
        resize: a.resize,
        optimizer: SgdConfig { lr: 0.05, momentum: 0.0, nesterov: false, weight_decay: 0.0 },
        schedule: Schedule::Constant,
        ..TrainConfig::d2l()
    };
    let mut trainer = Trainer::new(cfg, &device)?;
    let xs = Tensor::rand(0f32, 1., (a.batch, 1, a.resize, a.resize), &device)?;
    let labels: Vec<u32> = (0..a.batch as u32).map(|i| (i * 7) % 10).collect();
    let ys = Tensor::from_vec(labels, a.batch, &device)?;
    let step = |trainer: &mut Trainer| -> Result<()> {
        match a.mode {
            Mode::Train => {
                trainer.train_batch(&xs, &ys, 0.05)?;
            }
            Mode::Eval => {
                // No backward graph, as the PyTorch side's `torch.no_grad()`.
                let logits = trainer.model().infer(&xs)?;
                let _: Vec<u32> = logits.argmax(D::Minus1)?.to_dtype(DType::U32)?.to_vec1()?;
            }
        }
        Ok(())
    };
    for _ in 0..a.warmup {
        step(&mut trainer)?;
    }
    let mut windows = Vec::new();
    resnet_core::profile::enable(a.profile);
    let started = Instant::now();
    for _ in 0..a.windows {
        let t = Instant::now();
        for _ in 0..a.steps {
            step(&mut trainer)?;
        }
        windows.push((a.batch * a.steps) as f64 / t.elapsed().as_secs_f64());
    }
    if a.profile {
        let steps = a.windows * a.steps;
        let step_ms = 1e3 * started.elapsed().as_secs_f64() / steps as f64;
        eprintln!("{step_ms:.1} ms per step in all");
        eprint!("{}", resnet_core::profile::report(steps));
        resnet_core::profile::enable(false);
        eprintln!(
            "\nthe step's matrix products replayed alone, each on the kernel that ran it (the gemm crate, or our own):"
        );
        let replayed = resnet_core::replay_products(steps);
        eprint!("{}", resnet_core::profile::replay_report(&replayed, step_ms));
    }
    let sample = Sample { examples_per_sec: median(windows.clone()), windows, peak_rss_bytes: peak_rss() };
    println!("{}", serde_json::to_string(&sample)?);
    Ok(())
}

fn run_ours(cfg: &Config, a: &BenchArgs) -> Result<Sample> {
    let exe = std::env::current_exe()?;
    let algorithm = match a.algorithm {
        AlgorithmArg::Winograd => "winograd",
        AlgorithmArg::Im2col => "im2col",
        AlgorithmArg::Candle => "candle",
    };
    let out = Command::new(exe)
        .env("RAYON_NUM_THREADS", a.threads.to_string())
        .args(["bench-one", "--mode", mode_name(cfg.mode), "--algorithm", algorithm])
        .args(["--resize", &cfg.resize.to_string(), "--batch", &cfg.batch.to_string()])
        .args(["--windows", &a.windows.to_string(), "--steps", &a.steps.to_string(), "--warmup", &a.warmup.to_string()])
        .args(["--device", &a.device, "--precision", a.precision.name()])
        .args(a.tf32.then_some("--tf32"))
        .output()
        .context("running xtask bench-one")?;
    parse_sample(&out, "our benchmark")
}

fn run_pytorch(python: &Path, script: &Path, cfg: &Config, a: &BenchArgs) -> Result<Sample> {
    let out = Command::new(python)
        .arg(script)
        .args(["--mode", mode_name(cfg.mode), "--resize", &cfg.resize.to_string(), "--batch", &cfg.batch.to_string()])
        .args(["--threads", &a.threads.to_string(), "--windows", &a.windows.to_string()])
        .args(["--steps", &a.steps.to_string(), "--warmup", &a.warmup.to_string()])
        .args(["--device", &a.device, "--precision", a.precision.name()])
        .args(a.tf32.then_some("--tf32"))
        .output()
        .with_context(|| format!("running {} {}", python.display(), script.display()))?;
    parse_sample(&out, "the PyTorch benchmark")
}

fn parse_sample(out: &std::process::Output, what: &str) -> Result<Sample> {
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("{what} printed no result: {stdout}"))
}

/// The interpreter to run PyTorch with, checked to import torch.
fn find_python(flag: Option<&Path>) -> Result<PathBuf> {
    let candidate = flag
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("RESNET_BENCH_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let ok =
        Command::new(&candidate).args(["-c", "import torch"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        bail!(
            "--compare-pytorch needs a Python with torch: `{}` cannot import torch. Install it \
             (`python3 -m venv ~/torch && ~/torch/bin/pip install torch`) and pass --python ~/torch/bin/python \
             or set RESNET_BENCH_PYTHON",
            candidate.display()
        );
    }
    Ok(candidate)
}

fn parse_config(s: &str) -> Result<Config> {
    let parts: Vec<&str> = s.split(':').collect();
    let [mode, resize, batch] = parts.as_slice() else {
        bail!("--configs entry `{s}`: expected mode:resize:batch, e.g. train:96:128");
    };
    let mode = match *mode {
        "train" => Mode::Train,
        "eval" => Mode::Eval,
        other => bail!("--configs entry `{s}`: mode `{other}` is neither train nor eval"),
    };
    let resize: usize = resize.parse().with_context(|| format!("--configs entry `{s}`: bad resize"))?;
    let batch: usize = batch.parse().with_context(|| format!("--configs entry `{s}`: bad batch"))?;
    if !(8..=512).contains(&resize) || !(2..=4096).contains(&batch) {
        bail!("--configs entry `{s}`: resize must be 8..=512 and batch 2..=4096");
    }
    Ok(Config { mode, resize, batch })
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Train => "train",
        Mode::Eval => "eval",
    }
}

/// Best of five square products through candle (the same gemm the model uses): 2048³ on the
/// CPU, 8192³ on a GPU, in the benchmark's precision (f32 for f32 on the CPU).
fn matmul_peak_gflops(threads: usize, device: &Device, precision: PrecisionArg) -> Result<f64> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let n = if device.is_cpu() { 2048 } else { 8192 };
    let dtype = match (device.is_cpu(), precision) {
        (false, PrecisionArg::Bf16) => DType::BF16,
        (_, PrecisionArg::F16) => DType::F16,
        _ => DType::F32,
    };
    let a = Tensor::rand(0f32, 1., (n, n), device)?.to_dtype(dtype)?;
    let b = Tensor::rand(0f32, 1., (n, n), device)?.to_dtype(dtype)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        let _ = c.get(0)?.get(0)?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// Bytes of each buffer [`memory_bandwidth`] streams: larger than the last-level caches the
/// project's machines report, so the figure is the memory's, as the step's passes over
/// activations of tens of megabytes meet it.
const MEMORY_PROBE_BYTES: usize = 512 << 20;

/// The host's memory bandwidth on `threads` threads, in GB/s.
#[derive(Debug, Clone, Copy)]
struct MemoryBandwidth {
    /// Summing a buffer (bytes read per second).
    read_gbps: f64,
    /// Copying a buffer into another, both already mapped (bytes read plus bytes written).
    copy_gbps: f64,
}

/// The best of three passes of each kind over [`MEMORY_PROBE_BYTES`] buffers, each pass split
/// evenly over `threads` threads: the bandwidth that the step's memory-bound passes (BatchNorm,
/// ReLU, sums) can at best reach on this host.
fn memory_bandwidth(threads: usize) -> MemoryBandwidth {
    let threads = threads.max(1);
    let len = MEMORY_PROBE_BYTES / std::mem::size_of::<f32>();
    let src: Vec<f32> = (0..len).map(|i| (i % 251) as f32).collect();
    let mut dst = vec![0f32; len];
    let part = len.div_ceil(threads);
    /// Seconds of the fastest of three runs of `pass`.
    fn best(mut pass: impl FnMut()) -> f64 {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                pass();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }
    let mut checksum = 0f32;
    let read = best(|| {
        let sums: Vec<f32> = std::thread::scope(|scope| {
            let handles: Vec<_> = src
                .chunks(part)
                .map(|chunk| {
                    scope.spawn(move || {
                        // Sixteen independent lanes, so the loop is bound by the loads.
                        let mut lanes = [0f32; 16];
                        for block in chunk.chunks_exact(16) {
                            for (l, &v) in lanes.iter_mut().zip(block) {
                                *l += v;
                            }
                        }
                        lanes.iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).collect()
        });
        checksum += sums.iter().sum::<f32>();
    });
    let copy = best(|| {
        std::thread::scope(|scope| {
            for (d, s) in dst.chunks_mut(part).zip(src.chunks(part)) {
                scope.spawn(move || d.copy_from_slice(s));
            }
        });
    });
    // Keeps the sums (and so the reads) from being optimised away.
    std::hint::black_box((checksum, &dst));
    let bytes = MEMORY_PROBE_BYTES as f64;
    MemoryBandwidth { read_gbps: bytes / read / 1e9, copy_gbps: 2.0 * bytes / copy / 1e9 }
}

/// The share of the machine's time the hypervisor gave to others (`steal`) between two
/// readings of `/proc/stat`, from their `cpu` lines; `None` if either lacks one or no time passed.
fn steal_fraction(before: &str, after: &str) -> Option<f64> {
    // user nice system idle iowait irq softirq steal (guest time is counted in user and nice).
    let ticks = |stat: &str| -> Option<Vec<u64>> {
        let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let fields: Vec<u64> =
            line.split_whitespace().skip(1).take(8).map(|v| v.parse().ok()).collect::<Option<_>>()?;
        (fields.len() == 8).then_some(fields)
    };
    let (b, e) = (ticks(before)?, ticks(after)?);
    let delta: Vec<u64> = e.iter().zip(&b).map(|(e, b)| e.saturating_sub(*b)).collect();
    let total: u64 = delta.iter().sum();
    (total > 0).then(|| delta[7] as f64 / total as f64)
}

/// Why this invocation's figures say little, if they do: the matrix-product peak moved by more
/// than a fifth between the start and the end, or more than 2 % of the time was stolen.
fn host_warning(peak_before: f64, peak_after: f64, steal: Option<f64>) -> Option<String> {
    let mut reasons = Vec::new();
    let change = peak_after / peak_before;
    if !(0.8..=1.25).contains(&change) {
        reasons.push(format!("the matmul peak moved from {peak_before:.0} to {peak_after:.0} GFLOP/s"));
    }
    if let Some(f) = steal.filter(|&f| f > 0.02) {
        reasons.push(format!("the hypervisor took {:.1} % of the time", 100.0 * f));
    }
    (!reasons.is_empty()).then(|| {
        format!("{}: the host was not steady during the run, so its ratios are not comparable with other runs'; run it again", reasons.join(" and "))
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 where unknown.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn chrono_free_date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn print_table(rows: &[Row], peak: f64, cpu: &str, a: &BenchArgs) {
    println!();
    println!("CPU: {cpu}");
    let tf32 = if a.tf32 { ", TF32" } else { "" };
    println!(
        "d2l ResNet-18 on {}, {}{tf32}, {} CPU threads; matmul peak {peak:.0} GFLOP/s",
        a.device,
        a.precision.name(),
        a.threads
    );
    println!(
        "{:<18} {:>10} {:>9} {:>7} {:>10} {:>12} {:>11} {:>7}",
        "config", "ex/s", "GFLOP/s", "% peak", "peak RSS", "PyTorch ex/s", "PyTorch RSS", "ratio"
    );
    for r in rows {
        let name = format!("{} {}px b{}", mode_name(r.mode), r.resize, r.batch);
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_else(|| "-".into());
        println!(
            "{:<18} {:>10.1} {:>9.1} {:>6.0}% {:>10} {:>12} {:>11} {:>7}",
            name,
            r.examples_per_sec,
            r.gflops_per_sec,
            100.0 * r.fraction_of_matmul_peak,
            gib(r.peak_rss_bytes),
            opt(r.pytorch_examples_per_sec, &|v| format!("{v:.1}")),
            opt(r.pytorch_peak_rss_bytes.map(|b| b as f64), &|b| gib(b as u64)),
            opt(r.ratio, &|v| format!("{v:.2}x")),
        );
    }
}

/// The CPU as `/proc/cpuinfo` names it (model name, family, model) and the widest vector
/// instructions the project's kernels and gemm's products use on it, so that every figure
/// carries the machine it was taken on.
fn cpu_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim() == key).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "?".into())
    };
    let simd = match resnet_core::simd_tier() {
        resnet_core::SimdTier::Avx512 => "AVX-512",
        resnet_core::SimdTier::Avx2 => "AVX2+FMA",
        resnet_core::SimdTier::Baseline => "baseline SSE2",
    };
    let gemm = if cfg!(target_arch = "x86_64") && std::is_x86_feature_detected!("avx512f") {
        "AVX-512"
    } else {
        "AVX2 or narrower"
    };
    format!(
        "{} (cpu family {}, model {}); our kernels: {simd}; gemm: {gemm}",
        field("model name"),
        field("cpu family"),
        field("model")
    )
}

fn gib(b: u64) -> String {
    format!("{:.2} GB", b as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_strings_parse_and_reject_nonsense() {
        let c = parse_config("train:96:128").expect("valid");
        assert_eq!((c.mode, c.resize, c.batch), (Mode::Train, 96, 128));
        assert!(parse_config("train:96").is_err());
        assert!(parse_config("infer:96:128").is_err());
        assert!(parse_config("eval:4:128").is_err());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn steal_is_the_share_of_the_ticks_between_two_readings() {
        let before = "cpu  100 0 20 800 5 0 1 10 0 0\ncpu0 50 0 10 400 2 0 0 5 0 0\n";
        let after = "cpu  150 0 30 960 5 0 1 40 0 0\ncpu0 75 0 15 480 2 0 0 20 0 0\n";
        // 50 + 10 + 160 + 30 ticks passed, 30 of them stolen.
        let f = steal_fraction(before, after).expect("both readings have a cpu line");
        assert!((f - 30.0 / 250.0).abs() < 1e-12, "{f}");
        assert_eq!(steal_fraction(before, before), None, "no time passed");
        assert_eq!(steal_fraction("intr 1 2 3\n", after), None, "no cpu line");
        assert_eq!(steal_fraction("cpu  1 2 3\n", after), None, "a truncated cpu line");
    }

    #[test]
    fn a_moving_peak_or_stolen_time_is_warned_about() {
        assert_eq!(host_warning(170.0, 160.0, Some(0.001)), None);
        assert_eq!(host_warning(170.0, 160.0, None), None);
        let slowed = host_warning(170.0, 92.0, Some(0.001)).expect("the peak fell by almost half");
        assert!(slowed.contains("from 170 to 92 GFLOP/s"), "{slowed}");
        let stolen = host_warning(170.0, 170.0, Some(0.05)).expect("5 % stolen");
        assert!(stolen.contains("5.0 %") && !stolen.contains("peak moved"), "{stolen}");
        assert!(host_warning(100.0, 130.0, Some(0.03)).expect("both").contains(" and "));
    }
}
