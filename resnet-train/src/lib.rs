//! Training and evaluation of resnet-core models on Fashion-MNIST: d2l's `train_ch6` (Xavier
//! init, SGD, cross-entropy; train loss, train acc, test acc and examples/sec per epoch) and what
//! goes beyond it (momentum, Nesterov, weight decay, schedules with warm-up, label smoothing,
//! augmentation, gradient accumulation), with run directories, plots, checkpoints and exact resume.
//!
//! Key types: [`TrainConfig`] (with presets `d2l`, `seed`, `quick`, `best`), [`Trainer`]
//! (`new`, `resume`, `fit`, `train_batch`), [`Observer`], [`evaluate`], [`predictions`], [`Confusion`],
//! and [`Report`] (the HTML page of `report::write`).
//!
//! ```no_run
//! use candle_core::Device;
//! use resnet_train::{Silent, TrainConfig, Trainer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (data, _dir) = resnet_data::load_default(None)?;
//! let cfg = TrainConfig { epochs: 1, limit_train: Some(2048), ..TrainConfig::quick() };
//! let mut trainer = Trainer::new(cfg, &Device::Cpu)?;
//! let report = trainer.fit(&data, &mut Silent)?;
//! println!("test acc {:.3}", report.last.map(|m| m.test_acc).unwrap_or_default());
//! # Ok(())
//! # }
//! ```

mod alloc;
pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod error;
pub mod metrics;
pub mod optim;
pub mod plot;
mod process;
pub mod report;
pub mod run_dir;
pub mod schedule;
mod threads;
pub mod trainer;

pub use checkpoint::DataFingerprint;
pub use config::{AugmentConfig, Precision, Preset, Schedule, SelectedOn, SgdConfig, TrainConfig, MAX_EPOCHS};
pub use ema::WeightAverage;
pub use error::{Result, TrainError};
pub use metrics::{Confusion, EarlyStop, EpochMetrics, MetricsRecord, Running, TimeToAccuracy, ACCURACY_MILESTONES};
pub use optim::Sgd;
pub use process::{tune_process, ProcessTuning};
pub use report::{Prediction, Report, ReportRun};
pub use run_dir::{write_atomic, RunDir};
pub use schedule::LrSchedule;
pub use threads::on_polling_workers;
pub use trainer::{
    class_probabilities, cross_entropy, evaluate, loader_config, predictions, steps_per_epoch, Observer, Silent,
    StepInfo, TrainReport, Trainer,
};
