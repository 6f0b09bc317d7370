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
    /// One setting is out of range; `field` is its name in [`crate::TrainConfig`] (`optimizer.lr`).
    #[error("invalid training configuration: {what} (`{field}`) {reason}")]
    InvalidField {
        /// The field's path in the configuration, e.g. `optimizer.lr`.
        field: &'static str,
        /// What the field means, in words.
        what: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// Training diverged: the loss or the updated weights became NaN or infinite. No checkpoint
    /// holds the bad weights.
    #[error(
        "training diverged: {what} became non-finite at epoch {epoch}, batch {batch} (learning rate {lr}); \
         a resumed run would diverge the same way, so start a new run with a lower learning rate \
         (`optimizer.lr`) or more warm-up (`warmup_epochs`); {}",
        checkpoint.as_ref().map(|p| format!("the last good checkpoint is kept at {}", p.display()))
            .unwrap_or_else(|| "no checkpoint had been written yet".into())
    )]
    Diverged {
        /// What became non-finite: "the loss (NaN)" or "the weights".
        what: String,
        /// 1-based epoch.
        epoch: usize,
        /// 1-based batch within the epoch.
        batch: usize,
        /// The learning rate at that step.
        lr: f64,
        /// The last good checkpoint, if any.
        checkpoint: Option<PathBuf>,
    },
    /// The data differs from the data the run was started on.
    #[error(
        "the {split} data differs from the data this run was trained on ({expected} recorded, {found} now); \
         point to the data the run started with, or start a new run"
    )]
    DataMismatch {
        /// `training` or `test`.
        split: &'static str,
        /// The recorded fingerprint, in words.
        expected: String,
        /// The present data's fingerprint, in words.
        found: String,
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
    #[error("{} already holds a run; resume it, or choose another run folder", path.display())]
    RunExists {
        /// The directory.
        path: PathBuf,
    },
    /// The output directory exists and holds files that are not a run: they are never overwritten.
    #[error("{} is not empty ({entries}); choose a new or empty run folder, nothing there is overwritten", path.display())]
    NotEmpty {
        /// The directory.
        path: PathBuf,
        /// The first few entries found.
        entries: String,
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
