//! The run directory: config, metrics, curves and checkpoints of one training run.

use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// File names inside a run directory.
pub mod files {
    /// The training configuration, JSON.
    pub const CONFIG: &str = "config.json";
    /// One JSON record per line: ~5 points per epoch and one summary per epoch.
    pub const METRICS: &str = "metrics.jsonl";
    /// The latest checkpoint: weights, optimiser state, schedule position, epoch and RNG state.
    pub const CHECKPOINT: &str = "checkpoint.safetensors";
    /// The weights with the best test accuracy so far.
    pub const BEST: &str = "best.safetensors";
    /// Curves as PNG.
    pub const CURVES_PNG: &str = "curves.png";
    /// Curves as SVG.
    pub const CURVES_SVG: &str = "curves.svg";
}

/// A run directory on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates (or reuses, when empty of a checkpoint) `path`.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(|source| TrainError::Io { path: path.to_path_buf(), source })?;
        let dir = Self { path: path.to_path_buf() };
        if dir.checkpoint().exists() {
            return Err(TrainError::RunExists { path: path.to_path_buf() });
        }
        Ok(dir)
    }

    /// A fresh directory `runs/<preset>-<unix time>` under `parent`.
    pub fn fresh_under(parent: &Path, label: &str) -> Result<Self> {
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let mut path = parent.join(format!("{label}-{stamp}"));
        let mut n = 1;
        while path.exists() {
            path = parent.join(format!("{label}-{stamp}-{n}"));
            n += 1;
        }
        Self::create(&path)
    }

    /// An existing run directory, for resuming.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = Self { path: path.to_path_buf() };
        if !dir.checkpoint().is_file() {
            return Err(TrainError::Resume {
                path: path.to_path_buf(),
                reason: format!("no {} there; pass the --out directory of an earlier run", files::CHECKPOINT),
            });
        }
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The latest checkpoint's path.
    pub fn checkpoint(&self) -> PathBuf {
        self.path.join(files::CHECKPOINT)
    }

    /// The best checkpoint's path.
    pub fn best(&self) -> PathBuf {
        self.path.join(files::BEST)
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `bytes` to `name` atomically.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.file(name);
        resnet_core::checkpoint::write_atomic(&path, bytes).map_err(|source| TrainError::Io { path, source })
    }
}
