//! Training checkpoints: the model's weights plus everything needed to continue exactly — the
//! optimiser's momentum buffers, the schedule position, the epoch and batch, the partial-epoch
//! sums, the metrics history and the RNG state — in one safetensors file written atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use resnet_core::checkpoint::TRAIN_STATE_PREFIX;
use resnet_core::ResNet;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::metrics::{MetricsRecord, Running};

/// Metadata key holding [`TrainState`] as JSON.
pub const STATE_KEY: &str = "train_state";
const MOMENTUM_PREFIX: &str = "train.momentum.";

/// All randomness in training is a pure function of these: initialisation of `seed`, the data
/// order of `(seed, epoch)` and augmentation of `(seed, epoch, position)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The run's seed.
    pub seed: u64,
    /// The 0-based epoch whose data stream is next.
    pub epoch: u64,
    /// Examples of that epoch already consumed.
    pub position: u64,
}

/// Where training stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The run's configuration.
    pub config: TrainConfig,
    /// Completed epochs.
    pub epochs_done: usize,
    /// Batches done in the current, unfinished epoch (0 at an epoch boundary).
    pub batches_done: usize,
    /// Optimiser steps so far: the schedule position.
    pub global_step: usize,
    /// The unfinished epoch's running sums.
    pub running: Running,
    /// Every metrics record so far.
    pub history: Vec<MetricsRecord>,
    /// Best test accuracy so far.
    pub best_test_acc: Option<f64>,
    /// The RNG position.
    pub rng: RngState,
}

/// Serialises model + optimiser state + [`TrainState`] into one safetensors file's bytes.
pub fn to_bytes(model: &ResNet, momentum: &[(String, Tensor)], state: &TrainState) -> Result<Vec<u8>> {
    let extra: Vec<(String, Tensor)> =
        momentum.iter().map(|(name, t)| (format!("{MOMENTUM_PREFIX}{name}"), t.clone())).collect();
    let json = serde_json::to_string(state).map_err(|e| TrainError::InvalidConfig(e.to_string()))?;
    let mut meta = input_metadata(&state.config);
    meta.insert(STATE_KEY.to_string(), json);
    Ok(resnet_core::checkpoint::to_bytes_with(model, &extra, &meta)?)
}

/// Metadata key: the side length the model was trained at.
pub const INPUT_RESIZE_KEY: &str = "input_resize";
/// Metadata key: whether inputs were normalised with Fashion-MNIST's mean and std.
pub const INPUT_NORMALIZE_KEY: &str = "input_normalize";

/// How inputs must be prepared for a model trained with `cfg`, as checkpoint metadata, so
/// `eval` and `predict` prepare images the way training did.
pub fn input_metadata(cfg: &TrainConfig) -> HashMap<String, String> {
    HashMap::from([
        (INPUT_RESIZE_KEY.to_string(), cfg.resize.to_string()),
        (INPUT_NORMALIZE_KEY.to_string(), cfg.normalize.to_string()),
    ])
}

/// Reads the [`TrainState`] and the momentum buffers (by parameter name) of a checkpoint.
pub fn read(path: &Path, device: &Device) -> Result<(TrainState, HashMap<String, Tensor>)> {
    let (meta, tensors) = resnet_core::checkpoint::read_train_state(path, device)?;
    let json = meta.get(STATE_KEY).ok_or_else(|| TrainError::Resume {
        path: path.to_path_buf(),
        reason: "the file holds weights but no training state (was it exported, or saved as best?)".into(),
    })?;
    let state: TrainState = serde_json::from_str(json).map_err(|e| TrainError::Resume {
        path: path.to_path_buf(),
        reason: format!("unreadable training state: {e}"),
    })?;
    let momentum =
        tensors.into_iter().filter_map(|(k, t)| k.strip_prefix(MOMENTUM_PREFIX).map(|n| (n.to_string(), t))).collect();
    debug_assert!(MOMENTUM_PREFIX.starts_with(TRAIN_STATE_PREFIX));
    Ok((state, momentum))
}
