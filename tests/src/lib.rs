//! Shared fixtures for the workspace integration tests: a tiny synthetic dataset, a small but
//! complete training configuration, an observer that records a run and can interrupt it as
//! Ctrl-C does, and exact comparison of models and metrics between runs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use resnet_core::{ResNet, ResNetConfig};
use resnet_data::{FashionMnist, Split};
use resnet_train::{AugmentConfig, EpochMetrics, MetricsRecord, Observer, Schedule, SgdConfig, StepInfo, TrainConfig};

/// Training images in [`synthetic_data`].
pub const TRAIN_LEN: usize = 256;
/// Test images in [`synthetic_data`].
pub const TEST_LEN: usize = 64;
/// Side of the synthetic images (Fashion-MNIST's native 28 px).
pub const SIDE: usize = 28;
/// Batch size of [`tiny_config`].
pub const BATCH: usize = 32;
/// Optimiser steps per epoch of [`tiny_config`] on [`synthetic_data`].
pub const STEPS_PER_EPOCH: usize = TRAIN_LEN / BATCH;

/// 256 training and 64 test images of 28×28 from [`Split::synthetic`] (a learnable stand-in:
/// each class is a bright band at its own height).
pub fn synthetic_data() -> FashionMnist {
    FashionMnist { train: Split::synthetic(TRAIN_LEN, SIDE, SIDE, 1), test: Split::synthetic(TEST_LEN, SIDE, SIDE, 2) }
}

/// A width-4 ResNet-18 at 28 px, batch 32, 3 epochs of 8 steps, with every stateful part of the
/// recipe switched on so that resume and determinism tests cover it: Nesterov momentum, weight
/// decay, warm-up then cosine decay, label smoothing, normalisation, random crops and flips.
pub fn tiny_config() -> TrainConfig {
    TrainConfig {
        model: ResNetConfig { base_width: 4, ..ResNetConfig::d2l_resnet18() },
        epochs: 3,
        batch_size: BATCH,
        micro_batch: None,
        resize: SIDE,
        optimizer: SgdConfig { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5e-4 },
        schedule: Schedule::Cosine,
        warmup_epochs: 0.5,
        label_smoothing: 0.1,
        augment: Some(AugmentConfig { crop_padding: 2, hflip: true, erase: true }),
        normalize: true,
        seed: 7,
        limit_train: None,
        limit_test: None,
        eval_batch_size: 64,
        data_workers: 1,
        precision: resnet_train::Precision::F32,
        tf32: false,
        conv_algorithm: resnet_core::ConvAlgorithm::default(),
        gpu_ops: resnet_core::GpuOps::default(),
        val_split: 0,
        patience: None,
        init_weights: None,
        tta_hflip: false,
        ema_decay: None,
    }
}

/// Records a run and, with `stop_after: Some(n)`, asks it to stop once `n` steps of the current
/// `fit` call have run (what the CLI's Ctrl-C handler does).
#[derive(Debug, Default)]
pub struct Recorder {
    /// Steps of this `fit` call after which `should_stop` answers true.
    pub stop_after: Option<usize>,
    /// Every step seen.
    pub steps: Vec<StepInfo>,
    /// Every finished epoch.
    pub epochs: Vec<EpochMetrics>,
    /// Every checkpoint written.
    pub checkpoints: Vec<PathBuf>,
}

impl Recorder {
    /// A recorder that interrupts the run after `steps` steps.
    pub fn stop_after(steps: usize) -> Self {
        Self { stop_after: Some(steps), ..Self::default() }
    }
}

impl Observer for Recorder {
    fn on_step(&mut self, info: &StepInfo) {
        self.steps.push(*info);
    }
    fn on_epoch_end(&mut self, metrics: &EpochMetrics) {
        self.epochs.push(metrics.clone());
    }
    fn on_checkpoint(&mut self, path: &std::path::Path) {
        self.checkpoints.push(path.to_path_buf());
    }
    fn should_stop(&mut self) -> bool {
        self.stop_after.is_some_and(|n| self.steps.len() >= n)
    }
}

/// Every tensor of a model, parameters and BatchNorm buffers alike, by name, as exact bit
/// patterns (each value widened to f64, which is exact for f32 and for the integer counters).
pub fn snapshot(model: &ResNet) -> Result<Vec<(String, Vec<u64>)>> {
    model
        .named_tensors()
        .into_iter()
        .map(|t| {
            let values: Vec<f64> = t.tensor.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
            Ok((t.name, values.into_iter().map(f64::to_bits).collect()))
        })
        .collect()
}

/// The tensors in which two models differ in any bit, each described with how many values
/// differ and by how much at most. Models with different tensor names are an error.
pub fn differing_tensors(a: &ResNet, b: &ResNet) -> Result<Vec<String>> {
    let (a, b) = (snapshot(a)?, snapshot(b)?);
    let names = |s: &[(String, Vec<u64>)]| s.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    if names(&a) != names(&b) {
        bail!("the models have different tensors: {:?} vs {:?}", names(&a), names(&b));
    }
    let mut out = Vec::new();
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let differing: Vec<f64> = x
            .iter()
            .zip(y)
            .filter(|(p, q)| p != q)
            .map(|(p, q)| (f64::from_bits(*p) - f64::from_bits(*q)).abs())
            .collect();
        if !differing.is_empty() {
            let max = differing.iter().copied().fold(0f64, f64::max);
            out.push(format!("{name}: {} of {} values differ, by up to {max:e}", differing.len(), x.len()));
        }
    }
    Ok(out)
}

/// Fails unless the two models agree in every bit of every parameter and buffer.
pub fn ensure_identical(a: &ResNet, b: &ResNet, what: &str) -> Result<()> {
    let diff = differing_tensors(a, b)?;
    if !diff.is_empty() {
        bail!("{what}: {} tensor(s) differ: {}", diff.len(), diff.into_iter().take(6).collect::<Vec<_>>().join("; "));
    }
    Ok(())
}

/// A metrics record without its timing fields, so that two runs can be compared exactly.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A point within an epoch.
    Step {
        /// Position in epochs.
        epoch: f64,
        /// Running train loss.
        train_loss: f64,
        /// Running train accuracy.
        train_acc: f64,
        /// Learning rate.
        lr: f64,
    },
    /// Training stopped early.
    EarlyStop(resnet_train::EarlyStop),
    /// A test-accuracy milestone first reached at an epoch.
    Milestone {
        /// The milestone.
        test_acc: f64,
        /// The epoch that reached it.
        epoch: usize,
    },
    /// An epoch's summary.
    Epoch {
        /// 1-based epoch.
        epoch: usize,
        /// Mean train loss.
        train_loss: f64,
        /// Train accuracy.
        train_acc: f64,
        /// Test accuracy.
        test_acc: f64,
        /// Validation accuracy, with a split.
        val_acc: Option<f64>,
        /// Examples trained on.
        examples: u64,
        /// Learning rate at the last step.
        lr: f64,
    },
}

/// `history` with timings dropped.
pub fn without_timing(history: &[MetricsRecord]) -> Vec<Progress> {
    history
        .iter()
        .map(|r| match r {
            MetricsRecord::Step { epoch, train_loss, train_acc, lr } => {
                Progress::Step { epoch: *epoch, train_loss: *train_loss, train_acc: *train_acc, lr: *lr }
            }
            MetricsRecord::Epoch(m) => Progress::Epoch {
                epoch: m.epoch,
                train_loss: m.train_loss,
                train_acc: m.train_acc,
                test_acc: m.test_acc,
                val_acc: m.val_acc,
                examples: m.examples,
                lr: m.lr,
            },
            MetricsRecord::EarlyStop(s) => Progress::EarlyStop(s.clone()),
            MetricsRecord::TimeToAccuracy(t) => Progress::Milestone { test_acc: t.test_acc, epoch: t.epoch },
        })
        .collect()
}
