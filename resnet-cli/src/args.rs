//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use resnet_core::{BlockKind, ConvAlgorithm, Depth, GpuOps, ResNetConfig};
use resnet_train::{AugmentConfig, Precision, Preset, Schedule, TrainConfig};

/// Train, evaluate and inspect d2l's ResNet on Fashion-MNIST.
#[derive(Debug, Parser)]
#[command(name = "resnet-cli", version, about)]
pub struct Cli {
    /// CPU threads for the numeric kernels (default: all cores).
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (d2l's train_ch6 and beyond), writing a run directory.
    #[command(after_help = TRAIN_EXAMPLES)]
    Train(Box<TrainArgs>),
    /// Test accuracy, per-class accuracy and the confusion matrix of saved weights.
    #[command(after_help = EVAL_EXAMPLES)]
    Eval(EvalArgs),
    /// Top classes for image files, folders of images or test-set indices.
    #[command(after_help = PREDICT_EXAMPLES)]
    Predict(PredictArgs),
    /// The per-stage output shapes and the parameter count, as the d2l chapter prints them.
    #[command(after_help = SUMMARY_EXAMPLES)]
    Summary(SummaryArgs),
    /// One self-contained HTML page (and PNG figures) comparing runs: curves, confusion matrix,
    /// per-class accuracy and the most confident mistakes.
    #[command(after_help = REPORT_EXAMPLES)]
    Report(ReportArgs),
    /// Print a shell completion script.
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
    /// Check a GPU: every op on the device against the CPU (forward and backward, f32 and bf16,
    /// PASS/FAIL per op; SKIPPED without a GPU), then time training and evaluation steps for
    /// each kernel choice and precision. Writes JSON.
    #[command(after_help = DEVICE_CHECK_EXAMPLES)]
    DeviceCheck(DeviceCheckArgs),
}

const DEVICE_CHECK_EXAMPLES: &str = "\
Examples:
  resnet-cli device-check --out check.json                 # ops, then 96/256 and 224/128 training, 96/256 eval
  resnet-cli device-check --ops-only --out ops.json
  resnet-cli device-check --device cpu --configs train:28:16 --precisions f32 --steps 2 --out cpu.json

On a machine without a usable GPU the op checks are SKIPPED (never PASS) and the timings run on
the CPU. Exit status 1 when an op check FAILS. scripts/device_check.sh runs this on a GPU machine.";

const TRAIN_EXAMPLES: &str = "\
Examples:
  resnet-cli train                                   # the quick recipe: 28 px, 3 epochs, ~0.90 test acc
  resnet-cli train --preset d2l --out runs/d2l       # d2l's chapter: 96 px, 10 epochs
  resnet-cli train --epochs 5 --lr 0.05 --out runs/lr0.05
  resnet-cli train --init-weights runs/d2l/best.safetensors --lr 0.01 --epochs 2
  resnet-cli train --resume runs/d2l                 # continue after Ctrl-C";

const EVAL_EXAMPLES: &str = "\
Examples:
  resnet-cli eval --weights runs/d2l/best.safetensors
  resnet-cli eval --weights d2l_resnet18.safetensors --json > eval.json";

const PREDICT_EXAMPLES: &str = "\
Examples:
  resnet-cli predict --weights runs/d2l/best.safetensors shirt.jpg boot.png
  resnet-cli predict --weights runs/d2l/best.safetensors --invert photos/   # a folder, recursively
  resnet-cli predict --weights runs/d2l/best.safetensors --index 0 --index 42 --top 1
  resnet-cli predict --weights runs/d2l/best.safetensors photos/ --json | jq .class";

const SUMMARY_EXAMPLES: &str = "\
Examples:
  resnet-cli summary                       # d2l's table at 96 px
  resnet-cli summary --resize 224 --depth 34";

const REPORT_EXAMPLES: &str = "\
Examples:
  resnet-cli report runs/d2l                          # writes runs/d2l/report/index.html
  resnet-cli report runs/lr0.05 runs/d2l --out cmp    # two runs' curves overlaid
  resnet-cli report runs/d2l --weights other.safetensors --data-dir ~/fashion-mnist";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  resnet-cli completions bash > ~/.local/share/bash-completion/completions/resnet-cli
  resnet-cli completions zsh > ~/.zfunc/_resnet-cli     # with fpath+=~/.zfunc in ~/.zshrc
  resnet-cli completions fish > ~/.config/fish/completions/resnet-cli.fish";

/// A training recipe to start from; flags override it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresetArg {
    /// d2l's chapter: resize 96, batch 256, plain SGD lr 0.05, 10 epochs; best epoch chosen on test accuracy.
    D2l,
    /// The seed's run: resize 224, batch 128.
    Seed,
    /// A CPU-sized run (28 px, 3 epochs) reaching ≥ 0.90 test accuracy in minutes.
    Quick,
    /// The most accurate recipe in about an hour on 2 CPU cores (56 px, half width, augmentation,
    /// 16 epochs, weight average, flip averaging, 5,000 examples held out for validation).
    Best,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::D2l => Preset::D2l,
            PresetArg::Seed => Preset::Seed,
            PresetArg::Quick => Preset::Quick,
            PresetArg::Best => Preset::Best,
        }
    }
}

/// Learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScheduleArg {
    /// Constant rate (d2l).
    Constant,
    /// Multiply by --step-gamma every --step-epochs.
    Step,
    /// Cosine decay to zero.
    Cosine,
}

/// Network depths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DepthArg {
    /// ResNet-18 (d2l).
    #[value(name = "18")]
    R18,
    /// ResNet-34.
    #[value(name = "34")]
    R34,
}

impl From<DepthArg> for Depth {
    fn from(d: DepthArg) -> Self {
        match d {
            DepthArg::R18 => Depth::R18,
            DepthArg::R34 => Depth::R34,
        }
    }
}

/// Residual block variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// d2l's block (conv-BN-ReLU-conv-BN, add, ReLU).
    Post,
    /// The pre-activation block (BN-ReLU-conv-BN-ReLU-conv, add).
    Pre,
}

impl From<VariantArg> for BlockKind {
    fn from(v: VariantArg) -> Self {
        match v {
            VariantArg::Post => BlockKind::PostActivation,
            VariantArg::Pre => BlockKind::PreActivation,
        }
    }
}

/// Convolution algorithms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AlgorithmArg {
    /// Winograd for 3×3 stride-1 convolutions, in-bounds taps only on small images, im2col for the rest (the default).
    Winograd,
    /// im2col and one matrix product for every convolution.
    Im2col,
    /// candle's stock conv2d (for comparison; the only one that uses cuDNN under --features cudnn).
    Candle,
}

impl From<AlgorithmArg> for ConvAlgorithm {
    fn from(k: AlgorithmArg) -> Self {
        match k {
            AlgorithmArg::Winograd => ConvAlgorithm::Winograd,
            AlgorithmArg::Im2col => ConvAlgorithm::Im2col,
            AlgorithmArg::Candle => ConvAlgorithm::Candle,
        }
    }
}

/// Which kernels run on a CUDA device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GpuOpsArg {
    /// candle's generic CUDA ops (the default).
    Candle,
    /// cuDNN's convolution, BatchNorm and max-pool (the CUDA build with cuDNN; opt-in until a device check passes it).
    Cudnn,
}

impl From<GpuOpsArg> for GpuOps {
    fn from(k: GpuOpsArg) -> Self {
        match k {
            GpuOpsArg::Candle => GpuOps::Candle,
            GpuOpsArg::Cudnn => GpuOps::Cudnn,
        }
    }
}

/// Numeric precision of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrecisionArg {
    /// f32 throughout.
    F32,
    /// bf16 mixed precision with f32 master weights (CUDA).
    Bf16,
    /// f16 mixed precision with f32 master weights (no loss scaling).
    F16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F16 => Precision::F16,
        }
    }
}

/// Declares the flags that set one configuration field each, once: the clap struct, how each
/// value lands in its field, and which field each flag sets (for naming flags in errors).
macro_rules! field_flags {
    ($(#[$struct_doc:meta])* $vis:vis struct $name:ident { $(
        $(#[doc = $doc:literal])* [$($arg:tt)*] $flag:ident : $ty:ty => $root:ident $(.$sub:ident)* = $conv:expr;
    )* }) => {
        $(#[$struct_doc])*
        #[derive(Debug, Clone, Default, Args)]
        $vis struct $name { $(
            $(#[doc = $doc])*
            #[arg(long, $($arg)*)]
            pub $flag: Option<$ty>,
        )* }

        impl $name {
            /// The configuration field (`optimizer.lr`) each flag (`lr`) sets.
            pub const FIELDS: &'static [(&'static str, &'static str)] =
                &[$((stringify!($flag), concat!(stringify!($root) $(, ".", stringify!($sub))*))),*];

            /// Sets the field of every flag given.
            pub fn apply(&self, c: &mut TrainConfig) {
                $(if let Some(v) = self.$flag.clone() {
                    c.$root $(.$sub)* = ($conv)(v);
                })*
            }
        }
    };
}

fn same<T>(v: T) -> T {
    v
}

field_flags! {
    /// Training flags that set one field each.
    pub struct FieldFlags {
        /// Peak learning rate.
        [allow_negative_numbers = true] lr: f64 => optimizer.lr = same;
        /// SGD momentum (0 also turns Nesterov off).
        [] momentum: f64 => optimizer.momentum = same;
        /// Weight decay.
        [] weight_decay: f64 => optimizer.weight_decay = same;
        /// Examples per optimiser step.
        [] batch_size: usize => batch_size = same;
        /// Examples per forward pass; gradients accumulate to --batch-size.
        [] micro_batch: usize => micro_batch = Some;
        /// Resize images to N×N (8..=512; 28 = native).
        [] resize: usize => resize = same;
        /// Random seed for initialisation, data order, augmentation and the validation split.
        [] seed: u64 => seed = same;
        /// Train on the first N examples only (before the validation split).
        [] limit_train: usize => limit_train = Some;
        /// Test on the first N examples only.
        [] limit_test: usize => limit_test = Some;
        /// Hold out N seeded training examples to choose the best epoch (0: choose on the test set, as d2l).
        [] val_split: usize => val_split = same;
        /// Stop when validation accuracy has not improved for N epochs (needs --val-split).
        [] patience: usize => patience = Some;
        /// Epochs of linear warm-up.
        [] warmup_epochs: f64 => warmup_epochs = same;
        /// Label smoothing ε.
        [] label_smoothing: f64 => label_smoothing = same;
        /// Evaluate, select and save an exponential moving average of the weights with this decay per step (e.g. 0.999).
        [value_name = "DECAY"] ema: f64 => ema_decay = Some;
        /// Evaluation batch size.
        [] eval_batch_size: usize => eval_batch_size = same;
        /// Background threads preparing batches.
        [] workers: usize => data_workers = same;
        /// Convolution algorithm (recorded in the run; a resumed run keeps it).
        [value_enum, alias = "conv-kernel"] conv_algorithm: AlgorithmArg => conv_algorithm = ConvAlgorithm::from;
        /// Kernels on a CUDA device: candle's ops or cuDNN's (recorded in the run; a resumed run keeps it).
        [value_enum] gpu_ops: GpuOpsArg => gpu_ops = GpuOps::from;
        /// Precision of activations and products (bf16 needs --device cuda).
        [value_enum] precision: PrecisionArg => precision = Precision::from;
        /// Network depth.
        [value_enum] depth: DepthArg => model.depth = Depth::from;
        /// Residual block variant.
        [value_enum] variant: VariantArg => model.block = BlockKind::from;
        /// Channels of the first stage (d2l: 64); later stages double it.
        [value_parser = clap::value_parser!(u16).range(1..=1024)] width: u16 => model.base_width = usize::from;
        /// Start from these weights instead of a random init: a run's best/checkpoint file or d2l's PyTorch state_dict saved with safetensors (shapes must fit the model).
        [value_name = "FILE"] init_weights: PathBuf => init_weights = Some;
    }
}

/// Training flags beyond one field each: schedules, augmentation and on/off pairs.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigFlags {
    /// Learning-rate schedule.
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// For --schedule step: epochs between decays.
    #[arg(long, default_value_t = 10)]
    pub step_epochs: usize,
    /// For --schedule step: decay factor.
    #[arg(long, default_value_t = 0.1)]
    pub step_gamma: f64,
    /// Random-crop padding in pixels (0 = no cropping).
    #[arg(long)]
    pub crop_padding: Option<usize>,
    /// Random horizontal flips.
    #[arg(long, overrides_with = "no_hflip")]
    pub hflip: bool,
    /// No random horizontal flips.
    #[arg(long, overrides_with = "hflip")]
    pub no_hflip: bool,
    /// Random erasing: half the training images get one rectangle set to the mean pixel.
    #[arg(long, overrides_with = "no_erase")]
    pub erase: bool,
    /// No random erasing.
    #[arg(long, overrides_with = "erase")]
    pub no_erase: bool,
    /// Evaluate each image and its mirror image and average the two predictions.
    #[arg(long, overrides_with = "no_tta_hflip")]
    pub tta_hflip: bool,
    /// Evaluate each image once.
    #[arg(long, overrides_with = "tta_hflip")]
    pub no_tta_hflip: bool,
    /// Normalise pixels with Fashion-MNIST's mean and std.
    #[arg(long, overrides_with = "no_normalize")]
    pub normalize: bool,
    /// Raw pixels in [0, 1] (d2l).
    #[arg(long, overrides_with = "normalize")]
    pub no_normalize: bool,
    /// Nesterov momentum.
    #[arg(long, overrides_with = "no_nesterov")]
    pub nesterov: bool,
    /// Classical momentum.
    #[arg(long, overrides_with = "nesterov")]
    pub no_nesterov: bool,
    /// Allow TF32 tensor-core matrix products (CUDA only).
    #[arg(long)]
    pub tf32: bool,
}

/// The group ids (clap names them after the structs; a struct that flattens another gets none,
/// so both are flattened side by side) of every flag that changes a run's configuration: all are
/// refused with --resume.
pub const CONFIG_GROUPS: [&str; 2] = ["ConfigFlags", "FieldFlags"];

impl ConfigFlags {
    /// The flags this struct handles itself, with the configuration field each sets.
    const FIELDS: &'static [(&'static str, &'static str)] = &[
        ("schedule", "schedule"),
        ("crop_padding", "augment.crop_padding"),
        ("hflip", "augment.hflip"),
        ("erase", "augment.erase"),
        ("tta_hflip", "tta_hflip"),
        ("normalize", "normalize"),
        ("nesterov", "optimizer.nesterov"),
        ("tf32", "tf32"),
    ];

    /// `preset` with every flag given, these and `fields`, applied on top.
    pub fn apply(&self, fields: &FieldFlags, preset: Preset) -> TrainConfig {
        let mut c = TrainConfig::preset(preset);
        fields.apply(&mut c);
        if c.optimizer.momentum == 0.0 {
            c.optimizer.nesterov = false;
        }
        if let Some(s) = self.schedule {
            c.schedule = match s {
                ScheduleArg::Constant => Schedule::Constant,
                ScheduleArg::Cosine => Schedule::Cosine,
                ScheduleArg::Step => Schedule::Step { every_epochs: self.step_epochs, gamma: self.step_gamma },
            };
        }
        let hflip = pair(self.hflip, self.no_hflip);
        let erase = pair(self.erase, self.no_erase);
        if self.crop_padding.is_some() || hflip.is_some() || erase.is_some() {
            let base = c.augment.unwrap_or(AugmentConfig { crop_padding: 0, hflip: false, erase: false });
            let aug = AugmentConfig {
                crop_padding: self.crop_padding.unwrap_or(base.crop_padding),
                hflip: hflip.unwrap_or(base.hflip),
                erase: erase.unwrap_or(base.erase),
            };
            c.augment = (aug.crop_padding > 0 || aug.hflip || aug.erase).then_some(aug);
        }
        if let Some(v) = pair(self.tta_hflip, self.no_tta_hflip) {
            c.tta_hflip = v;
        }
        if let Some(v) = pair(self.normalize, self.no_normalize) {
            c.normalize = v;
        }
        if let Some(v) = pair(self.nesterov, self.no_nesterov) {
            c.optimizer.nesterov = v;
        }
        c.tf32 |= self.tf32;
        c
    }

    /// `text` with every configuration field in backquotes (`` `optimizer.lr` ``) replaced by
    /// the flag that sets it (`--lr`).
    pub fn name_flags(text: &str) -> String {
        let mut text = text.to_string();
        for (flag, field) in FieldFlags::FIELDS.iter().chain(Self::FIELDS).chain(&[("epochs", "epochs")]) {
            text = text.replace(&format!("`{field}`"), &format!("--{}", flag.replace('_', "-")));
        }
        text
    }
}

/// An `--x`/`--no-x` pair: `Some(true)`, `Some(false)`, or `None` when neither was given.
fn pair(on: bool, off: bool) -> Option<bool> {
    match (on, off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    }
}

/// Model-shape flags of `summary`.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Network depth.
    #[arg(long, value_enum)]
    pub depth: Option<DepthArg>,
    /// Residual block variant.
    #[arg(long, value_enum)]
    pub variant: Option<VariantArg>,
    /// Channels of the first stage (d2l: 64); later stages double it.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub width: Option<u16>,
}

impl ModelArgs {
    /// Applies the flags given to `cfg`.
    pub fn apply(&self, cfg: &mut ResNetConfig) {
        if let Some(d) = self.depth {
            cfg.depth = d.into();
        }
        if let Some(v) = self.variant {
            cfg.block = v.into();
        }
        if let Some(w) = self.width {
            cfg.base_width = usize::from(w);
        }
    }
}

/// `train` flags.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Recipe to start from.
    #[arg(long, value_enum, default_value = "quick", conflicts_with = "resume")]
    pub preset: PresetArg,
    /// Continue the run in this folder from its last checkpoint, with the settings it recorded (only --epochs may grow).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = CONFIG_GROUPS)]
    pub resume: Option<PathBuf>,
    /// Where to write the run: a new or empty folder (default: `runs/<preset>-<UTC time>`).
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Directory holding the Fashion-MNIST files (default: search RESNET_DATA_DIR, the cache, Debian's package).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Passes over the training set; with --resume, a larger number extends a run on a constant or step schedule.
    #[arg(long)]
    pub epochs: Option<usize>,
    #[command(flatten)]
    pub fields: FieldFlags,
    #[command(flatten)]
    pub config: ConfigFlags,
}

/// Flags shared by `eval` and `predict`: the weights, how inputs are prepared, where the data
/// is and what runs it.
#[derive(Debug, Args)]
pub struct InferenceArgs {
    /// Weights: a run's checkpoint/best file, or a d2l PyTorch state_dict saved with safetensors.
    #[arg(long, value_name = "FILE")]
    pub weights: PathBuf,
    /// Resize images to N×N (default: what the model was trained at; 96 for d2l files).
    #[arg(long)]
    pub resize: Option<usize>,
    /// Normalise pixels (default: as in training).
    #[arg(long, overrides_with = "no_normalize")]
    pub normalize: bool,
    /// Raw pixels in [0, 1] (default: as in training).
    #[arg(long, overrides_with = "normalize")]
    pub no_normalize: bool,
    /// Average each image's prediction with its mirror image's (default: as the run evaluated).
    #[arg(long, overrides_with = "no_tta_hflip")]
    pub tta_hflip: bool,
    /// One prediction per image (default: as the run evaluated).
    #[arg(long, overrides_with = "tta_hflip")]
    pub no_tta_hflip: bool,
    /// Use a training checkpoint's last weights, not the weight average that a run with --ema evaluated.
    #[arg(long)]
    pub last_weights: bool,
    /// Directory holding the Fashion-MNIST files (for eval and predict --index).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl InferenceArgs {
    /// `--normalize` / `--no-normalize`, or `None` to follow the weights file.
    pub fn normalize(&self) -> Option<bool> {
        pair(self.normalize, self.no_normalize)
    }

    /// Whether to average with mirror images: the flags, else what the weights file records.
    pub fn tta_hflip(&self, recorded: bool) -> bool {
        pair(self.tta_hflip, self.no_tta_hflip).unwrap_or(recorded)
    }

    /// Which of a training checkpoint's weights to load.
    pub fn pick(&self) -> crate::weights::Pick {
        if self.last_weights {
            crate::weights::Pick::Last
        } else {
            crate::weights::Pick::Evaluated
        }
    }
}

/// `device-check` flags.
#[derive(Debug, Args)]
pub struct DeviceCheckArgs {
    /// Device to check: cuda, cuda:N, or cpu (timings only; op checks are skipped). If the GPU
    /// cannot be opened, the check says why and falls back to the CPU.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Timed configurations, `mode:resize:batch` (mode train or eval), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "train:96:256,train:224:128,eval:96:256")]
    pub configs: Vec<String>,
    /// Precisions to time: f32, tf32 (f32 with TF32 products) and bf16 (mixed precision).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,tf32,bf16")]
    pub precisions: Vec<CheckPrecisionArg>,
    /// Kernel choices to time, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "candle,cudnn")]
    pub gpu_ops: Vec<GpuOpsArg>,
    /// Untimed steps before each measurement.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Timed steps per measurement.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Check the ops only, no timings (with --no-op-checks: only open the device and report it).
    #[arg(long)]
    pub ops_only: bool,
    /// Time only, without the op checks.
    #[arg(long)]
    pub no_op_checks: bool,
    /// Write the JSON report here (written to a temporary name, then renamed).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Precisions `device-check` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CheckPrecisionArg {
    /// f32 throughout.
    F32,
    /// f32 with TF32 tensor-core products (CUDA only).
    Tf32,
    /// bf16 activations and products, f32 master weights (CUDA only).
    Bf16,
}

/// `eval` flags.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub input: InferenceArgs,
    /// Batch size.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Evaluate the first N test images only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `predict` flags.
#[derive(Debug, Args)]
pub struct PredictArgs {
    #[command(flatten)]
    pub input: InferenceArgs,
    /// Image files (PNG, JPEG, GIF, BMP, TIFF, WebP; any size; converted to grey as Pillow's
    /// convert("L") and resized as in training) and folders (searched recursively, sorted).
    #[arg(value_name = "IMAGE|FOLDER")]
    pub images: Vec<PathBuf>,
    /// Test-set indices to classify (repeatable).
    #[arg(long = "index", value_name = "N")]
    pub indices: Vec<usize>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub top: u8,
    /// Invert image files (dark object on light background → Fashion-MNIST's light on dark).
    #[arg(long)]
    pub invert: bool,
    /// Print JSON lines: one object per image, {"path" (or "index" and "true_class"), "class",
    /// "probabilities": {class: p, ...} for all classes}.
    #[arg(long)]
    pub json: bool,
}

/// `summary` flags.
#[derive(Debug, Args)]
pub struct SummaryArgs {
    /// Input side length.
    #[arg(long, default_value_t = 96)]
    pub resize: usize,
    /// Batch size of the traced input.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `report` flags.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run directories (from `train --out`); their curves are overlaid.
    #[arg(value_name = "RUN_DIR", required = true)]
    pub runs: Vec<PathBuf>,
    /// Where to write index.html and the PNG figures (default: FIRST_RUN_DIR/report).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Weights for the confusion matrix and the mistakes (default: the first run's best.safetensors).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Directory holding the Fashion-MNIST files (default: search RESNET_DATA_DIR, the cache, Debian's package).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// How many of the most confident mistakes to show.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u16).range(1..=200))]
    pub mistakes: u16,
}

/// `completions` flags.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}
