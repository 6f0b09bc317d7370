//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    Train(Box<TrainArgs>),
    /// Test accuracy, per-class accuracy and the confusion matrix of saved weights.
    Eval(EvalArgs),
    /// Top classes for PNG images or test-set indices.
    Predict(PredictArgs),
    /// The per-stage output shapes and the parameter count, as the d2l chapter prints them.
    Summary(SummaryArgs),
}

/// A training recipe to start from; flags override it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Preset {
    /// d2l's chapter: resize 96, batch 256, plain SGD lr 0.05, 10 epochs.
    D2l,
    /// The seed's run: resize 224, batch 128.
    Seed,
    /// A CPU-sized run (28 px, 3 epochs) reaching ≥ 0.90 test accuracy in minutes.
    Quick,
    /// The most accurate recipe (96 px, augmentation, 30 epochs).
    Best,
}

impl Preset {
    /// The preset's name as `TrainConfig::preset` knows it.
    pub fn name(self) -> &'static str {
        match self {
            Preset::D2l => "d2l",
            Preset::Seed => "seed",
            Preset::Quick => "quick",
            Preset::Best => "best",
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

/// Residual block variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// d2l's block (conv-BN-ReLU-conv-BN, add, ReLU).
    Post,
    /// The pre-activation block (BN-ReLU-conv-BN-ReLU-conv, add).
    Pre,
}

/// Convolution kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelArg {
    /// Winograd for 3×3 stride-1 convolutions, in-bounds taps only on small images, im2col for the rest (the default).
    Winograd,
    /// The project's im2col kernels (fast).
    Im2col,
    /// candle's stock conv2d (for comparison).
    Candle,
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

/// Model-shape flags shared by train and summary.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Network depth.
    #[arg(long, value_parser = ["18", "34"])]
    pub depth: Option<String>,
    /// Residual block variant.
    #[arg(long, value_enum)]
    pub variant: Option<VariantArg>,
    /// Channels of the first stage (d2l: 64); later stages double it.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub width: Option<u16>,
}

/// `train` flags.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Recipe to start from.
    #[arg(long, value_enum, default_value = "quick")]
    pub preset: Preset,
    /// Continue the run in this directory from its last checkpoint (other flags are not allowed).
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// Where to write the run (default: runs/<preset>-<time>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Directory holding the Fashion-MNIST files (default: search RESNET_DATA_DIR, the cache, Debian's package).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Passes over the training set.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Peak learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Examples per optimiser step.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Examples per forward pass; gradients accumulate to --batch-size.
    #[arg(long)]
    pub micro_batch: Option<usize>,
    /// Resize images to N×N (8..=512; 28 = native).
    #[arg(long)]
    pub resize: Option<usize>,
    /// Random seed for initialisation, data order and augmentation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Train on the first N examples only.
    #[arg(long)]
    pub limit_train: Option<usize>,
    /// Test on the first N examples only.
    #[arg(long)]
    pub limit_test: Option<usize>,
    /// SGD momentum.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: Option<bool>,
    /// Weight decay.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule.
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleArg>,
    /// For --schedule step: epochs between decays.
    #[arg(long, default_value_t = 10)]
    pub step_epochs: usize,
    /// For --schedule step: decay factor.
    #[arg(long, default_value_t = 0.1)]
    pub step_gamma: f64,
    /// Epochs of linear warm-up.
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    /// Label smoothing ε.
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Random-crop padding in pixels (0 = no cropping).
    #[arg(long)]
    pub crop_padding: Option<usize>,
    /// Random horizontal flips.
    #[arg(long)]
    pub hflip: Option<bool>,
    /// Normalise pixels with Fashion-MNIST's mean and std.
    #[arg(long)]
    pub normalize: Option<bool>,
    /// Evaluation batch size.
    #[arg(long)]
    pub eval_batch_size: Option<usize>,
    /// Background threads preparing batches.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Convolution implementation.
    #[arg(long, value_enum)]
    pub conv_kernel: Option<KernelArg>,
    /// Precision of activations and products (bf16 needs --device cuda).
    #[arg(long, value_enum)]
    pub precision: Option<PrecisionArg>,
    /// Allow TF32 tensor-core matrix products (CUDA only).
    #[arg(long)]
    pub tf32: bool,
    #[command(flatten)]
    pub model: ModelArgs,
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
    #[arg(long)]
    pub normalize: Option<bool>,
    /// Directory holding the Fashion-MNIST files (for eval and predict --index).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
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
    /// PNG images (any size; converted to grey and resized as in training).
    #[arg(value_name = "IMAGE.png")]
    pub images: Vec<PathBuf>,
    /// Test-set indices to classify (repeatable).
    #[arg(long = "index", value_name = "N")]
    pub indices: Vec<usize>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=10))]
    pub top: u8,
    /// Invert PNG images (dark object on light background → Fashion-MNIST's light on dark).
    #[arg(long)]
    pub invert: bool,
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
