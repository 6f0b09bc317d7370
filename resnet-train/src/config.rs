//! The training configuration: typed, serde-serialisable, with named presets.

use serde::{Deserialize, Serialize};

use resnet_core::{ConvAlgorithm, GpuOps, ResNetConfig};

use crate::error::{Result, TrainError};

/// Stochastic gradient descent with PyTorch's semantics for momentum, Nesterov and weight decay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SgdConfig {
    /// Peak learning rate. d2l: 0.05.
    pub lr: f64,
    /// Momentum factor; 0 is d2l's plain SGD.
    #[serde(default)]
    pub momentum: f64,
    /// Nesterov momentum (needs momentum > 0).
    #[serde(default)]
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    #[serde(default)]
    pub weight_decay: f64,
}

/// How the learning rate changes over training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schedule {
    /// The same rate throughout (d2l).
    Constant,
    /// Multiply by `gamma` every `every_epochs` epochs.
    Step {
        /// Epochs between decays.
        every_epochs: usize,
        /// Decay factor.
        gamma: f64,
    },
    /// Cosine decay from the peak to zero at the end of training.
    Cosine,
}

/// Light-weight augmentation, applied per training example from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AugmentConfig {
    /// Zero-pad by this many pixels, then crop back at a random offset; 0 disables.
    pub crop_padding: usize,
    /// Random horizontal flips.
    pub hflip: bool,
    /// Random erasing: half the images get one rectangle (2–33 % of the area) set to the mean pixel.
    #[serde(default)]
    pub erase: bool,
}

/// Numeric precision of the forward and backward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (d2l).
    #[default]
    F32,
    /// Mixed precision: bf16 activations and products with f32 master weights, f32 BatchNorm
    /// statistics and an f32 loss. Needs a CUDA device (candle's CPU matmul has no bf16).
    Bf16,
    /// The same with f16 (no loss scaling, so it suits short runs and tests); runs on CPU too.
    F16,
}

impl Precision {
    /// The dtype activations are computed in, or `None` for the parameters' own.
    pub fn compute_dtype(self) -> Option<candle_core::DType> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(candle_core::DType::BF16),
            Precision::F16 => Some(candle_core::DType::F16),
        }
    }
}

/// Everything that defines a training run. Flags override a preset field by field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The network.
    pub model: ResNetConfig,
    /// Passes over the training set.
    pub epochs: usize,
    /// Examples per optimiser step.
    pub batch_size: usize,
    /// Examples per forward/backward; gradients of `batch_size / micro_batch` micro-batches are
    /// accumulated into one step. `None` = the whole batch at once.
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// Side length images are resized to (d2l: 96; the seed: 224; 28 = no resize).
    pub resize: usize,
    /// The optimiser.
    pub optimizer: SgdConfig,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// Epochs of linear warm-up from 0 to the peak rate (fractions allowed).
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Label smoothing ε for the cross-entropy (0 = d2l).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Training-set augmentation (none in d2l).
    #[serde(default)]
    pub augment: Option<AugmentConfig>,
    /// Normalise pixels with Fashion-MNIST's mean and standard deviation (not in d2l).
    #[serde(default)]
    pub normalize: bool,
    /// Seeds initialisation, data order and augmentation.
    pub seed: u64,
    /// Use only the first N training examples.
    #[serde(default)]
    pub limit_train: Option<usize>,
    /// Use only the first N test examples.
    #[serde(default)]
    pub limit_test: Option<usize>,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// Background threads preparing batches.
    pub data_workers: usize,
    /// Precision of activations and products (mixed precision keeps f32 master weights).
    #[serde(default)]
    pub precision: Precision,
    /// Let CUDA run f32 matrix products on TF32 tensor cores (about 10 mantissa bits).
    #[serde(default)]
    pub tf32: bool,
    /// The convolution algorithm. Results agree to float rounding, not bit for bit, so a run
    /// records it and resumes with it.
    #[serde(default)]
    pub conv_algorithm: ConvAlgorithm,
    /// The kernels convolutions, BatchNorms and max-pools run on a CUDA device (the CPU ignores
    /// it). Results agree to float rounding, so a run records it and resumes with it.
    #[serde(default)]
    pub gpu_ops: GpuOps,
    /// Training examples held out (a seeded choice) to select the best epoch and to stop early;
    /// 0 selects on the test set, as d2l's chapter reports it.
    #[serde(default)]
    pub val_split: usize,
    /// Stop when validation accuracy has not improved for this many epochs (needs `val_split`).
    #[serde(default)]
    pub patience: Option<usize>,
    /// Weights to start from instead of the seeded initialisation: this project's
    /// `best.safetensors`/`checkpoint.safetensors` or d2l's PyTorch `state_dict` saved with
    /// safetensors. Every tensor must fit `model`; optimiser state is not taken over.
    #[serde(default)]
    pub init_weights: Option<std::path::PathBuf>,
    /// Test-time augmentation: evaluation averages the softmax of each image and its mirror image.
    #[serde(default)]
    pub tta_hflip: bool,
    /// Weight averaging: evaluate, select and save an exponential moving average of the weights
    /// with this decay per optimiser step (e.g. 0.999) instead of the last step's weights. See
    /// [`crate::ema`].
    #[serde(default)]
    pub ema_decay: Option<f64>,
}

/// The named recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// [`TrainConfig::d2l`].
    D2l,
    /// [`TrainConfig::seed`].
    Seed,
    /// [`TrainConfig::quick`].
    Quick,
    /// [`TrainConfig::best`].
    Best,
}

impl Preset {
    /// Every preset.
    pub const ALL: [Preset; 4] = [Preset::D2l, Preset::Seed, Preset::Quick, Preset::Best];

    /// The preset's name, as run folders are named.
    pub fn name(self) -> &'static str {
        match self {
            Preset::D2l => "d2l",
            Preset::Seed => "seed",
            Preset::Quick => "quick",
            Preset::Best => "best",
        }
    }
}

/// Largest epoch count accepted; far beyond any real run, it keeps step counts from overflowing.
pub const MAX_EPOCHS: usize = 100_000;

impl TrainConfig {
    /// d2l's chapter: ResNet-18, resize 96, batch 256, plain SGD lr 0.05, 10 epochs.
    pub fn d2l() -> Self {
        Self {
            model: ResNetConfig::d2l_resnet18(),
            epochs: 10,
            batch_size: 256,
            micro_batch: None,
            resize: 96,
            optimizer: SgdConfig { lr: 0.05, momentum: 0.0, nesterov: false, weight_decay: 0.0 },
            schedule: Schedule::Constant,
            warmup_epochs: 0.0,
            label_smoothing: 0.0,
            augment: None,
            normalize: false,
            seed: 0,
            limit_train: None,
            limit_test: None,
            eval_batch_size: 256,
            data_workers: 1,
            precision: Precision::F32,
            tf32: false,
            conv_algorithm: ConvAlgorithm::default(),
            gpu_ops: GpuOps::default(),
            val_split: 0,
            patience: None,
            init_weights: None,
            tta_hflip: false,
            ema_decay: None,
        }
    }

    /// The seed's run: d2l's recipe at 224 px with batch 128 (its GPU ran out of memory at 256).
    pub fn seed() -> Self {
        Self { resize: 224, batch_size: 128, eval_batch_size: 128, ..Self::d2l() }
    }

    /// A CPU-sized run: native 28 px, momentum SGD with a warm-up and cosine decay (peak rate
    /// 0.1), a little weight decay and label smoothing, 3 epochs. Reaches ≥ 0.90 test accuracy
    /// in about three minutes on 2 cores; BENCHMARKS.md ("Training runs") has its accuracy over
    /// seeds and why the peak rate is 0.1.
    pub fn quick() -> Self {
        Self {
            epochs: 3,
            batch_size: 256,
            resize: 28,
            optimizer: SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4 },
            schedule: Schedule::Cosine,
            warmup_epochs: 0.5,
            label_smoothing: 0.1,
            normalize: true,
            ..Self::d2l()
        }
    }

    /// The most accurate recipe that trains within about an hour on two CPU cores: d2l's
    /// ResNet-18 at half width (32 channels in the first stage) on images upsampled to 56 px,
    /// normalised, with random crops (4 px) and flips, Nesterov momentum, weight decay, label
    /// smoothing, one warm-up epoch and cosine decay over 16 epochs; evaluated on the weight
    /// average (decay 0.998) with flip averaging, and 5,000 training examples held out to choose
    /// the best epoch. BENCHMARKS.md ("Training runs") has its measured accuracy and the
    /// alternatives it was chosen over.
    pub fn best() -> Self {
        Self {
            model: ResNetConfig { base_width: 32, ..ResNetConfig::d2l_resnet18() },
            epochs: 16,
            batch_size: 128,
            resize: 56,
            optimizer: SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4 },
            schedule: Schedule::Cosine,
            warmup_epochs: 1.0,
            label_smoothing: 0.1,
            augment: Some(AugmentConfig { crop_padding: 4, hflip: true, erase: false }),
            normalize: true,
            val_split: 5000,
            tta_hflip: true,
            ema_decay: Some(0.998),
            ..Self::d2l()
        }
    }

    /// A named recipe.
    pub fn preset(preset: Preset) -> Self {
        match preset {
            Preset::D2l => Self::d2l(),
            Preset::Seed => Self::seed(),
            Preset::Quick => Self::quick(),
            Preset::Best => Self::best(),
        }
    }

    /// The examples per forward pass.
    pub fn micro_batch_size(&self) -> usize {
        self.micro_batch.unwrap_or(self.batch_size).min(self.batch_size)
    }

    /// Checks every field and names the first that is wrong (by its field name, e.g.
    /// `optimizer.lr`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, what: &'static str, reason: String| {
            Err(TrainError::InvalidField { field, what, reason })
        };
        self.model.validate()?;
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return bad("epochs", "epochs", format!("must be in 1..={MAX_EPOCHS}, got {}", self.epochs));
        }
        if self.batch_size < 2 {
            return bad(
                "batch_size",
                "batch size",
                format!("must be at least 2 (BatchNorm needs it), got {}", self.batch_size),
            );
        }
        if let Some(m) = self.micro_batch {
            if m < 2 || m > self.batch_size || self.batch_size % m != 0 {
                return bad(
                    "micro_batch",
                    "micro-batch",
                    format!("{m} must be at least 2 and divide the batch size {}", self.batch_size),
                );
            }
        }
        if !(8..=512).contains(&self.resize) {
            return bad("resize", "resize", format!("must be between 8 and 512 pixels, got {}", self.resize));
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0 && o.lr <= 10.0) {
            return bad("optimizer.lr", "learning rate", format!("must be in (0, 10], got {}", o.lr));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return bad("optimizer.momentum", "momentum", format!("must be in [0, 1), got {}", o.momentum));
        }
        if o.nesterov && o.momentum == 0.0 {
            return bad("optimizer.nesterov", "Nesterov momentum", "needs `optimizer.momentum` > 0".into());
        }
        if !(0.0..=0.1).contains(&o.weight_decay) {
            return bad(
                "optimizer.weight_decay",
                "weight decay",
                format!("must be in [0, 0.1], got {}", o.weight_decay),
            );
        }
        if let Schedule::Step { every_epochs, gamma } = self.schedule {
            if every_epochs == 0 || !(gamma > 0.0 && gamma <= 1.0) {
                return bad(
                    "schedule",
                    "step schedule",
                    format!("needs every_epochs ≥ 1 and gamma in (0, 1], got {every_epochs}, {gamma}"),
                );
            }
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs <= self.epochs as f64) {
            return bad(
                "warmup_epochs",
                "warm-up",
                format!("must be between 0 and {} epochs, got {}", self.epochs, self.warmup_epochs),
            );
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                "label smoothing",
                format!("must be in [0, 0.5), got {}", self.label_smoothing),
            );
        }
        if let Some(a) = self.augment {
            if a.crop_padding > self.resize / 2 {
                return bad(
                    "augment.crop_padding",
                    "crop padding",
                    format!("{} is more than half the image size {}", a.crop_padding, self.resize),
                );
            }
        }
        if let Some(d) = self.ema_decay {
            if !(d > 0.0 && d < 1.0) {
                return bad("ema_decay", "weight-average decay", format!("must be in (0, 1), got {d}"));
            }
        }
        if self.limit_train == Some(0) {
            return bad("limit_train", "training limit", "must be at least 1".into());
        }
        if self.limit_test == Some(0) {
            return bad("limit_test", "test limit", "must be at least 1".into());
        }
        if self.eval_batch_size == 0 {
            return bad("eval_batch_size", "evaluation batch size", "must be at least 1".into());
        }
        if !(1..=resnet_data::MAX_WORKERS).contains(&self.data_workers) {
            return bad(
                "data_workers",
                "data workers",
                format!("must be in 1..={}, got {}", resnet_data::MAX_WORKERS, self.data_workers),
            );
        }
        match self.patience {
            Some(0) => return bad("patience", "patience", "must be at least 1 epoch".into()),
            Some(_) if self.val_split == 0 => {
                return bad(
                    "patience",
                    "patience",
                    "needs a validation split (`val_split` > 0): stopping on the test set would select on it".into(),
                )
            }
            _ => {}
        }
        Ok(())
    }

    /// The setting accuracy is selected on: validation with a split, else test (d2l).
    pub fn selection_metric(&self) -> SelectedOn {
        if self.val_split > 0 {
            SelectedOn::ValAcc
        } else {
            SelectedOn::TestAcc
        }
    }
}

/// Which accuracy chose `best.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SelectedOn {
    /// Held-out training examples (`val_split`): the test accuracy stays an unbiased estimate.
    ValAcc,
    /// The test set itself, as d2l's chapter does: the best file's test accuracy is optimistic.
    TestAcc,
}

impl SelectedOn {
    /// The name as metadata and metrics record it.
    pub fn as_str(self) -> &'static str {
        match self {
            SelectedOn::ValAcc => "val_acc",
            SelectedOn::TestAcc => "test_acc",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip() -> std::result::Result<(), Box<dyn std::error::Error>> {
        for preset in Preset::ALL {
            let cfg = TrainConfig::preset(preset);
            cfg.validate()?;
            let back: TrainConfig = serde_json::from_str(&serde_json::to_string(&cfg)?)?;
            assert_eq!(back, cfg, "{}", preset.name());
        }
        assert_eq!(TrainConfig::best().selection_metric(), SelectedOn::ValAcc);
        assert_eq!(TrainConfig::d2l().selection_metric(), SelectedOn::TestAcc);
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = TrainConfig::d2l();
        c.optimizer.lr = f64::NAN;
        assert!(matches!(c.validate(), Err(TrainError::InvalidField { field: "optimizer.lr", .. })));
        let mut c = TrainConfig::d2l();
        c.micro_batch = Some(100);
        assert!(matches!(c.validate(), Err(TrainError::InvalidField { field: "micro_batch", .. })));
        let mut c = TrainConfig::d2l();
        c.optimizer.nesterov = true;
        assert!(c.validate().is_err());
    }

    #[test]
    fn start_time_bounds_are_checked() {
        let c = TrainConfig { data_workers: 300, ..TrainConfig::quick() };
        assert!(matches!(c.validate(), Err(TrainError::InvalidField { field: "data_workers", .. })));
        let c = TrainConfig { epochs: usize::MAX, ..TrainConfig::quick() };
        assert!(matches!(c.validate(), Err(TrainError::InvalidField { field: "epochs", .. })));
        let c = TrainConfig { patience: Some(3), ..TrainConfig::quick() };
        assert!(matches!(c.validate(), Err(TrainError::InvalidField { field: "patience", .. })));
        let c = TrainConfig { patience: Some(3), val_split: 100, ..TrainConfig::quick() };
        assert!(c.validate().is_ok());
    }

    /// A config saved before the convolution algorithm was a training setting (a run directory's
    /// `config.json`, a checkpoint's state) still loads, with the default algorithm.
    #[test]
    fn configs_without_a_conv_algorithm_load_with_the_default() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let cfg = TrainConfig { conv_algorithm: ConvAlgorithm::Im2col, ..TrainConfig::quick() };
        let mut json = serde_json::to_value(&cfg)?;
        let removed = json.as_object_mut().ok_or("a JSON object")?.remove("conv_algorithm");
        assert_eq!(removed, Some(serde_json::json!("im2col")));
        let back: TrainConfig = serde_json::from_value(json)?;
        assert_eq!(back, TrainConfig { conv_algorithm: ConvAlgorithm::Winograd, ..cfg });
        Ok(())
    }
}
