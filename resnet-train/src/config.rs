//! The training configuration: typed, serde-serialisable, with named presets.

use serde::{Deserialize, Serialize};

use resnet_core::{ConvAlgorithm, ResNetConfig};

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
    /// How the model computes its convolutions; a speed setting that leaves the results the
    /// same to float rounding.
    #[serde(default)]
    pub conv_algorithm: ConvAlgorithm,
}

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
        }
    }

    /// The seed's run: d2l's recipe at 224 px with batch 128 (its GPU ran out of memory at 256).
    pub fn seed() -> Self {
        Self { resize: 224, batch_size: 128, eval_batch_size: 128, ..Self::d2l() }
    }

    /// A CPU-sized run: native 28 px, momentum SGD with a warm-up and cosine decay, a little
    /// weight decay and label smoothing, 3 epochs. Reaches ≥ 0.90 test accuracy in about ten
    /// minutes on 2 cores.
    pub fn quick() -> Self {
        Self {
            epochs: 3,
            batch_size: 256,
            resize: 28,
            optimizer: SgdConfig { lr: 0.15, momentum: 0.9, nesterov: true, weight_decay: 5e-4 },
            schedule: Schedule::Cosine,
            warmup_epochs: 0.5,
            label_smoothing: 0.1,
            normalize: true,
            ..Self::d2l()
        }
    }

    /// The most accurate recipe here: d2l's model at 96 px with normalisation, random crops and
    /// flips, Nesterov momentum, weight decay, warm-up and cosine decay over 30 epochs.
    pub fn best() -> Self {
        Self {
            epochs: 30,
            batch_size: 128,
            resize: 96,
            optimizer: SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4 },
            schedule: Schedule::Cosine,
            warmup_epochs: 1.0,
            label_smoothing: 0.1,
            augment: Some(AugmentConfig { crop_padding: 8, hflip: true }),
            normalize: true,
            ..Self::d2l()
        }
    }

    /// A preset by name: `d2l`, `seed`, `quick` or `best`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "d2l" => Some(Self::d2l()),
            "seed" => Some(Self::seed()),
            "quick" => Some(Self::quick()),
            "best" => Some(Self::best()),
            _ => None,
        }
    }

    /// The examples per forward pass.
    pub fn micro_batch_size(&self) -> usize {
        self.micro_batch.unwrap_or(self.batch_size).min(self.batch_size)
    }

    /// Checks every field and names the first that is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TrainError::InvalidConfig(m));
        self.model.validate()?;
        if self.epochs == 0 {
            return bad("epochs (--epochs) must be at least 1".into());
        }
        if self.batch_size < 2 {
            return bad(format!(
                "batch size (--batch-size) must be at least 2 (BatchNorm needs it), got {}",
                self.batch_size
            ));
        }
        if let Some(m) = self.micro_batch {
            if m < 2 || m > self.batch_size || self.batch_size % m != 0 {
                return bad(format!(
                    "micro-batch (--micro-batch) {m} must be at least 2 and divide the batch size {}",
                    self.batch_size
                ));
            }
        }
        if !(8..=512).contains(&self.resize) {
            return bad(format!("resize (--resize) must be between 8 and 512 pixels, got {}", self.resize));
        }
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0 && o.lr <= 10.0) {
            return bad(format!("learning rate (--lr) must be in (0, 10], got {}", o.lr));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return bad(format!("momentum (--momentum) must be in [0, 1), got {}", o.momentum));
        }
        if o.nesterov && o.momentum == 0.0 {
            return bad("Nesterov momentum needs --momentum > 0".into());
        }
        if !(0.0..=0.1).contains(&o.weight_decay) {
            return bad(format!("weight decay (--weight-decay) must be in [0, 0.1], got {}", o.weight_decay));
        }
        if let Schedule::Step { every_epochs, gamma } = self.schedule {
            if every_epochs == 0 || !(gamma > 0.0 && gamma <= 1.0) {
                return bad(format!(
                    "step schedule needs every_epochs ≥ 1 and gamma in (0, 1], got {every_epochs}, {gamma}"
                ));
            }
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs <= self.epochs as f64) {
            return bad(format!(
                "warm-up (--warmup-epochs) must be between 0 and {} epochs, got {}",
                self.epochs, self.warmup_epochs
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return bad(format!(
                "label smoothing (--label-smoothing) must be in [0, 0.5), got {}",
                self.label_smoothing
            ));
        }
        if let Some(a) = self.augment {
            if a.crop_padding > self.resize / 2 {
                return bad(format!(
                    "crop padding {} is more than half the image size {}",
                    a.crop_padding, self.resize
                ));
            }
        }
        if self.limit_train == Some(0) || self.limit_test == Some(0) {
            return bad("--limit-train/--limit-test must be at least 1".into());
        }
        if self.eval_batch_size == 0 || self.data_workers == 0 {
            return bad("eval batch size and data workers must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip() -> std::result::Result<(), Box<dyn std::error::Error>> {
        for name in ["d2l", "seed", "quick", "best"] {
            let cfg = TrainConfig::preset(name).ok_or("preset")?;
            cfg.validate()?;
            let back: TrainConfig = serde_json::from_str(&serde_json::to_string(&cfg)?)?;
            assert_eq!(back, cfg, "{name}");
        }
        assert!(TrainConfig::preset("fast").is_none());
        Ok(())
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = TrainConfig::d2l();
        c.optimizer.lr = f64::NAN;
        assert!(matches!(c.validate(), Err(TrainError::InvalidConfig(m)) if m.contains("learning rate")));
        let mut c = TrainConfig::d2l();
        c.micro_batch = Some(100);
        assert!(matches!(c.validate(), Err(TrainError::InvalidConfig(m)) if m.contains("micro-batch")));
        let mut c = TrainConfig::d2l();
        c.optimizer.nesterov = true;
        assert!(c.validate().is_err());
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
