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
}

const TRAIN_EXAMPLES: &str = "\
Examples:
  resnet-cli train                                   # the quick recipe: 28 px, 3 epochs, ~0.90 test acc
  resnet-cli train --preset d2l --out runs/d2l       # d2l's chapter: 96 px, 10 epochs
  resnet-cli train --epochs 5 --lr 0.1 --out runs/lr0.1
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
  resnet-cli report runs/lr0.05 runs/lr0.1 --out cmp  # two runs' curves overlaid
  resnet-cli report runs/d2l --weights other.safetensors --data-dir ~/fashion-mnist";

const COMPLETIONS_EXAMPLES: &str = "\
Examples:
  resnet-cli completions bash > ~/.local/share/bash-completion/completions/resnet-cli
  resnet-cli completions zsh > ~/.zfunc/_resnet-cli     # with fpath+=~/.zfunc in ~/.zshrc
  resnet-cli completions fish > ~/.config/fish/completions/resnet-cli.fish";

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
    /// Start from these weights instead of a random init: a run's best/checkpoint file or d2l's
    /// PyTorch state_dict saved with safetensors (shapes must fit the model).
    #[arg(long, value_name = "FILE")]
    pub init_weights: Option<PathBuf>,
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
