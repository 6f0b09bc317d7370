//! Training checkpoints: the model's weights plus everything needed to continue exactly — the
//! optimiser's momentum buffers, the schedule position, the epoch and batch, the partial-epoch
//! sums, the metrics history and the RNG state — in one safetensors file written atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use resnet_core::checkpoint::TRAIN_STATE_PREFIX;
use resnet_core::ResNet;
use resnet_data::Split;
use sha2::{Digest, Sha256};

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};
use crate::metrics::{EarlyStop, MetricsRecord, Running};

/// Metadata key holding [`TrainState`] as JSON.
pub const STATE_KEY: &str = "train_state";
const MOMENTUM_PREFIX: &str = "train.momentum.";
const AVERAGE_PREFIX: &str = "train.average.";

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
    /// Best accuracy so far on the selection set ([`TrainConfig::selection_metric`]).
    #[serde(alias = "best_test_acc")]
    pub best_acc: Option<f64>,
    /// The epoch (1-based) that reached it.
    #[serde(default)]
    pub best_epoch: Option<usize>,
    /// The RNG position.
    pub rng: RngState,
    /// What the run trains and tests on, checked when it resumes.
    #[serde(default)]
    pub data: Option<DataFingerprint>,
    /// Set when training stopped early; a resumed run then has nothing left to do.
    #[serde(default)]
    pub early_stop: Option<EarlyStop>,
}

/// The identity of the data a run used: counts and SHA-256 digests of the (limited) splits'
/// sizes, labels and pixels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// Training examples (before any validation hold-out).
    pub train_examples: usize,
    /// SHA-256 of the training split, hex.
    pub train_sha256: String,
    /// Test examples.
    pub test_examples: usize,
    /// SHA-256 of the test split, hex.
    pub test_sha256: String,
}

impl DataFingerprint {
    /// The fingerprint of the splits a run uses.
    pub fn of(train: &Split, test: &Split) -> Self {
        Self {
            train_examples: train.len(),
            train_sha256: digest(train),
            test_examples: test.len(),
            test_sha256: digest(test),
        }
    }

    /// An error naming the first split that differs from `self`, the recorded fingerprint.
    pub fn check(&self, now: &DataFingerprint) -> Result<()> {
        let words = |n: usize, h: &str| format!("{n} examples, SHA-256 {}", h.get(..12).unwrap_or(h));
        if (self.train_examples, &self.train_sha256) != (now.train_examples, &now.train_sha256) {
            return Err(TrainError::DataMismatch {
                split: "training",
                expected: words(self.train_examples, &self.train_sha256),
                found: words(now.train_examples, &now.train_sha256),
            });
        }
        if (self.test_examples, &self.test_sha256) != (now.test_examples, &now.test_sha256) {
            return Err(TrainError::DataMismatch {
                split: "test",
                expected: words(self.test_examples, &self.test_sha256),
                found: words(now.test_examples, &now.test_sha256),
            });
        }
        Ok(())
    }
}

fn digest(split: &Split) -> String {
    let mut h = Sha256::new();
    for n in [split.len(), split.rows, split.cols] {
        h.update((n as u64).to_le_bytes());
    }
    h.update(&split.labels);
    h.update(&split.images);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Serialises model + optimiser state + weight average (empty without one) + [`TrainState`]
/// into one safetensors file's bytes.
pub fn to_bytes(
    model: &ResNet,
    momentum: &[(String, Tensor)],
    average: &[(String, Tensor)],
    state: &TrainState,
) -> Result<Vec<u8>> {
    let extra: Vec<(String, Tensor)> = momentum
        .iter()
        .map(|(name, t)| (format!("{MOMENTUM_PREFIX}{name}"), t.clone()))
        .chain(average.iter().map(|(name, t)| (format!("{AVERAGE_PREFIX}{name}"), t.clone())))
        .collect();
    let json = serde_json::to_string(state).map_err(|e| TrainError::InvalidConfig(e.to_string()))?;
    let mut meta = input_metadata(&state.config);
    meta.insert(STATE_KEY.to_string(), json);
    Ok(resnet_core::checkpoint::to_bytes_with(model, &extra, &meta)?)
}

/// Metadata key: the side length the model was trained at.
pub const INPUT_RESIZE_KEY: &str = "input_resize";
/// Metadata key: whether inputs were normalised with Fashion-MNIST's mean and std.
pub const INPUT_NORMALIZE_KEY: &str = "input_normalize";
/// Metadata key: whether the run evaluated with flip test-time augmentation (`tta_hflip`).
pub const EVAL_TTA_HFLIP_KEY: &str = "eval_tta_hflip";

/// How inputs must be prepared for a model trained with `cfg`, as checkpoint metadata, so
/// `eval` and `predict` prepare images the way training did.
pub fn input_metadata(cfg: &TrainConfig) -> HashMap<String, String> {
    HashMap::from([
        (INPUT_RESIZE_KEY.to_string(), cfg.resize.to_string()),
        (INPUT_NORMALIZE_KEY.to_string(), cfg.normalize.to_string()),
        (EVAL_TTA_HFLIP_KEY.to_string(), cfg.tta_hflip.to_string()),
    ])
}

/// Metadata key of `best.safetensors`: the accuracy it was chosen on (`val_acc` or `test_acc`).
pub const SELECTED_ON_KEY: &str = "selected_on";
/// Metadata key of `best.safetensors`: the epoch (1-based) whose weights it holds.
pub const SELECTED_EPOCH_KEY: &str = "selected_epoch";

/// The metadata of `best.safetensors`: the input preparation and how the epoch was chosen.
pub fn best_metadata(cfg: &TrainConfig, epoch: usize) -> HashMap<String, String> {
    let mut meta = input_metadata(cfg);
    meta.insert(SELECTED_ON_KEY.to_string(), cfg.selection_metric().as_str().to_string());
    meta.insert(SELECTED_EPOCH_KEY.to_string(), epoch.to_string());
    meta
}

/// What a training checkpoint holds beside the model's weights.
#[derive(Debug)]
pub struct SavedTraining {
    /// Where training stands.
    pub state: TrainState,
    /// The optimiser's momentum buffers, by parameter name.
    pub momentum: HashMap<String, Tensor>,
    /// The weight average's tensors by name (empty when the run keeps none).
    pub average: HashMap<String, Tensor>,
}

/// Reads the [`TrainState`], the momentum buffers and the weight average of a checkpoint.
pub fn read(path: &Path, device: &Device) -> Result<SavedTraining> {
    let (meta, tensors) = resnet_core::checkpoint::read_train_state(path, device)?;
    let json = meta.get(STATE_KEY).ok_or_else(|| TrainError::Resume {
        path: path.to_path_buf(),
        reason: "the file holds weights but no training state (was it exported, or saved as best?)".into(),
    })?;
    let state: TrainState = serde_json::from_str(json).map_err(|e| TrainError::Resume {
        path: path.to_path_buf(),
        reason: format!("unreadable training state: {e}"),
    })?;
    debug_assert!(MOMENTUM_PREFIX.starts_with(TRAIN_STATE_PREFIX) && AVERAGE_PREFIX.starts_with(TRAIN_STATE_PREFIX));
    let (momentum, average) = (prefixed(&tensors, MOMENTUM_PREFIX), prefixed(&tensors, AVERAGE_PREFIX));
    Ok(SavedTraining { state, momentum, average })
}

/// The tensors whose names start with `prefix`, named without it.
fn prefixed(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors.iter().filter_map(|(k, t)| k.strip_prefix(prefix).map(|n| (n.to_string(), t.clone()))).collect()
}

/// Loads the weight average a run kept (`ema_decay`) from its checkpoint into `model`, the
/// weights the run evaluated; `Ok(false)` leaves `model` alone when the file holds no average
/// (a run without one, `best.safetensors`, an export).
pub fn load_average_into(model: &ResNet, path: &Path) -> Result<bool> {
    let device = model.named_tensors().first().map(|t| t.tensor.device().clone()).unwrap_or(Device::Cpu);
    let (_, tensors) = resnet_core::checkpoint::read_train_state(path, &device)?;
    let average = prefixed(&tensors, AVERAGE_PREFIX);
    if average.is_empty() {
        return Ok(false);
    }
    crate::ema::set_tensors(model, average).map_err(|e| {
        TrainError::InvalidConfig(format!("{}: its weight average does not fit the model: {e}", path.display()))
    })?;
    Ok(true)
}

/// Whether the training checkpoint at `path` holds a weight average (a run with `ema_decay`).
pub fn has_average(path: &Path) -> Result<bool> {
    let (_, tensors) = resnet_core::checkpoint::read_train_state(path, &Device::Cpu)?;
    Ok(tensors.keys().any(|name| name.starts_with(AVERAGE_PREFIX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_data_apart() {
        let (a, b) = (Split::synthetic(20, 4, 4, 1), Split::synthetic(20, 4, 4, 2));
        let fp = DataFingerprint::of(&a, &b);
        assert!(fp.check(&DataFingerprint::of(&a, &b)).is_ok());
        assert!(matches!(
            fp.check(&DataFingerprint::of(&b, &b)),
            Err(TrainError::DataMismatch { split: "training", .. })
        ));
        assert!(matches!(fp.check(&DataFingerprint::of(&a, &a)), Err(TrainError::DataMismatch { split: "test", .. })));
        let fewer = a.clone().limit(19);
        assert!(fp.check(&DataFingerprint::of(&fewer, &b)).is_err());
    }
}
