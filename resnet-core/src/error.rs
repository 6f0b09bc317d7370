//! The error type of resnet-core: what went wrong, with what was expected and what was found.

use std::path::PathBuf;

/// Everything resnet-core can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The model configuration is not usable.
    #[error("invalid model configuration: {0}")]
    InvalidConfig(String),

    /// The input is too small (or has the wrong channel count) for some stage of the network.
    #[error("input of shape {input:?} does not fit the network at stage {stage}: {reason}")]
    InputShape {
        /// The offending input shape, `(batch, channels, height, width)`.
        input: Vec<usize>,
        /// The stage that cannot accept it (`b1`, `b1.pool`, `b3`, ...).
        stage: String,
        /// What exactly goes wrong there.
        reason: String,
    },

    /// A checkpoint could not be read or written.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying IO error.
        source: std::io::Error,
    },

    /// A checkpoint's contents do not fit the model.
    #[error("checkpoint {path} does not fit the model: {problem}")]
    CheckpointMismatch {
        /// The file concerned.
        path: PathBuf,
        /// Every mismatch found (missing, unexpected or mis-shaped tensors, config differences).
        problem: String,
    },

    /// A checkpoint file is not valid safetensors or has unreadable metadata.
    #[error("checkpoint {path} is not a readable safetensors file: {reason}")]
    CheckpointFormat {
        /// The file concerned.
        path: PathBuf,
        /// Why it could not be parsed.
        reason: String,
    },
}

/// `Result` with [`CoreError`].
pub type Result<T> = std::result::Result<T, CoreError>;
