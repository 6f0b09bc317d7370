//! The error type of resnet-train.

use std::path::PathBuf;

/// Everything training and evaluation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model or a checkpoint failed.
    #[error(transparent)]
    Core(#[from] resnet_core::CoreError),
    /// The data failed to load or prepare.
    #[error(transparent)]
    Data(#[from] resnet_data::DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The training configuration is not usable.
    #[error("invalid training configuration: {0}")]
    InvalidConfig(String),
    /// The loss became NaN or infinite.
    #[error(
        "the loss became {value} at epoch {epoch}, batch {batch} (learning rate {lr}); \
         try a lower learning rate (--lr) or more warm-up; {}",
        checkpoint.as_ref().map(|p| format!("the last good checkpoint is kept at {}", p.display()))
            .unwrap_or_else(|| "no checkpoint had been written yet".into())
    )]
    NonFiniteLoss {
        /// 1-based epoch.
        epoch: usize,
        /// 1-based batch within the epoch.
        batch: usize,
        /// The learning rate at that step.
        lr: f64,
        /// The loss value.
        value: f32,
        /// The last good checkpoint, if any.
        checkpoint: Option<PathBuf>,
    },
    /// A checkpoint could not be written; the previous one (if any) is untouched.
    #[error("could not write checkpoint {path}: {source}; {}", if *.previous_intact { "the previous checkpoint is intact" } else { "no earlier checkpoint exists" })]
    CheckpointWrite {
        /// Where the checkpoint was going.
        path: PathBuf,
        /// The IO failure (full disk, read-only directory, ...).
        source: std::io::Error,
        /// Whether an earlier checkpoint at `path` survives.
        previous_intact: bool,
    },
    /// Resuming is impossible.
    #[error("cannot resume from {path}: {reason}")]
    Resume {
        /// The run directory or checkpoint.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The output directory already holds a run.
    #[error("{} already holds a run; continue it with --resume {0}, or choose another --out", path.display())]
    RunExists {
        /// The directory.
        path: PathBuf,
    },
    /// The weights named by `init_weights` cannot start this run.
    #[error("initial weights (init_weights) {}: {reason}", path.display())]
    InitWeights {
        /// The weights file.
        path: PathBuf,
        /// What is wrong: unreadable, or the first mismatched, missing and unexpected tensors.
        reason: String,
    },
    /// A run directory cannot be read for a report.
    #[error("{}: {reason}", path.display())]
    Report {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other file-system failure.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// Drawing the curves failed.
    #[error("plotting {path}: {reason}")]
    Plot {
        /// The image being written.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
