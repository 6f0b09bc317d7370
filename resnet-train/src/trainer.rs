//! THE training loop (d2l's `train_ch6` and beyond) and evaluation, shared by the CLI, the tests
//! and the benchmarks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};

use resnet_core::{checkpoint as core_ckpt, d2l_init, profile, GpuOps, ResNet};
use resnet_data::{batches, Augment, FashionMnist, LoaderConfig, Normalize, Split};

use crate::checkpoint::{self, DataFingerprint, RngState, TrainState};
use crate::config::{Precision, Schedule, SelectedOn, TrainConfig};
use crate::ema::WeightAverage;
use crate::error::{Result, TrainError};
use crate::metrics::{new_milestones, Confusion, EarlyStop, EpochMetrics, MetricsRecord, Running, TimeToAccuracy};
use crate::optim::Sgd;
use crate::plot::{self, Curves};
use crate::report::Prediction;
use crate::run_dir::{files, write_atomic, RunDir};
use crate::schedule::LrSchedule;

/// Progress within an epoch, for progress bars.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// 1-based epoch.
    pub epoch: usize,
    /// Total epochs.
    pub epochs: usize,
    /// 1-based batch within the epoch.
    pub batch: usize,
    /// Batches in the epoch.
    pub batches: usize,
    /// Running loss of the epoch so far.
    pub train_loss: f64,
    /// Running accuracy of the epoch so far.
    pub train_acc: f64,
    /// Current learning rate.
    pub lr: f64,
}

/// Receives training events; the CLI renders them, tests record them.
pub trait Observer {
    /// An epoch begins (`batches` counts those still to run in it).
    fn on_epoch_start(&mut self, _epoch: usize, _batches: usize) {}
    /// A training step finished.
    fn on_step(&mut self, _info: &StepInfo) {}
    /// Evaluation on the test set begins.
    fn on_eval_start(&mut self, _epoch: usize) {}
    /// An epoch finished and was evaluated.
    fn on_epoch_end(&mut self, _metrics: &EpochMetrics) {}
    /// A checkpoint was written.
    fn on_checkpoint(&mut self, _path: &Path) {}
    /// Polled after every step: `true` stops training after writing a checkpoint (Ctrl-C).
    fn should_stop(&mut self) -> bool {
        false
    }
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;
impl Observer for Silent {}

/// What a call to [`Trainer::fit`] achieved.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The last completed epoch's metrics (`None` if stopped before finishing one).
    pub last: Option<EpochMetrics>,
    /// Examples per second over all completed epochs (training-step time only, as d2l).
    pub examples_per_sec: f64,
    /// True when stopped early by the observer; a checkpoint was written.
    pub interrupted: bool,
    /// Set when validation accuracy stopped improving for `patience` epochs.
    pub early_stop: Option<EarlyStop>,
    /// The epoch `best.safetensors` holds, its accuracy, and which accuracy chose it.
    pub best: Option<(usize, f64, SelectedOn)>,
    /// The test accuracy milestones reached, in order.
    pub time_to_accuracy: Vec<TimeToAccuracy>,
    /// The run directory, if any.
    pub run_dir: Option<PathBuf>,
}

/// A model, its optimiser and where training stands.
pub struct Trainer {
    model: ResNet,
    _vars: VarMap,
    opt: Sgd,
    average: Option<WeightAverage>,
    device: Device,
    state: TrainState,
    run_dir: Option<RunDir>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model", self.model.config())
            .field("device", &self.device)
            .field("epochs_done", &self.state.epochs_done)
            .field("global_step", &self.state.global_step)
            .field("run_dir", &self.run_dir)
            .finish()
    }
}

/// The data-loading half of a [`TrainConfig`].
pub fn loader_config(cfg: &TrainConfig, train: bool) -> LoaderConfig {
    LoaderConfig {
        batch_size: if train { cfg.batch_size } else { cfg.eval_batch_size },
        resize: cfg.resize,
        shuffle: train,
        seed: cfg.seed,
        augment: if train {
            cfg.augment.map(|a| Augment { crop_padding: a.crop_padding, hflip: a.hflip, erase: a.erase })
        } else {
            None
        },
        normalize: cfg.normalize.then(Normalize::fashion_mnist),
        workers: cfg.data_workers,
        prefetch: 4,
    }
}

/// Optimiser steps per epoch over `examples` in batches of `batch_size`. A last batch of a single
/// example is dropped (BatchNorm cannot normalise one value per channel); which example that is
/// follows the epoch's shuffle.
pub fn steps_per_epoch(examples: usize, batch_size: usize) -> usize {
    let batch_size = batch_size.max(1);
    examples / batch_size + usize::from(examples % batch_size >= 2)
}

/// Refuses precision settings the device cannot honour.
fn check_precision(cfg: &TrainConfig, device: &Device) -> Result<()> {
    if !device.is_cuda() {
        if cfg.precision == Precision::Bf16 {
            return Err(TrainError::InvalidField {
                field: "precision",
                what: "precision bf16",
                reason: "needs a CUDA device (candle's CPU matrix product has no bf16); use f32 on CPU".into(),
            });
        }
        if cfg.tf32 {
            return Err(TrainError::InvalidField {
                field: "tf32",
                what: "TF32",
                reason: "applies to CUDA devices only; turn it off on CPU".into(),
            });
        }
        if cfg.gpu_ops != GpuOps::default() {
            return Err(TrainError::InvalidField {
                field: "gpu_ops",
                what: "GPU kernels",
                reason: format!("`{}` applies to CUDA devices only; use the default on CPU", cfg.gpu_ops.name()),
            });
        }
    }
    if !cfg.gpu_ops.compiled() {
        return Err(TrainError::InvalidField {
            field: "gpu_ops",
            what: "GPU kernels",
            reason: format!(
                "`{}` is not in this build: it needs the CUDA build with the `cudnn` feature (README, \"GPU\")",
                cfg.gpu_ops.name()
            ),
        });
    }
    Ok(())
}

/// What [`Trainer::fit`] works through, derived from the configuration and the data before any
/// step runs: the splits, the step count and the schedule.
struct Plan {
    train: Arc<Split>,
    val: Option<Split>,
    test: Split,
    fingerprint: DataFingerprint,
    steps_per_epoch: usize,
    schedule: LrSchedule,
    points: Vec<usize>,
}

impl Plan {
    fn new(cfg: &TrainConfig, data: &FashionMnist) -> Result<Self> {
        let train = limited(&data.train, cfg.limit_train);
        let test = limited(&data.test, cfg.limit_test);
        if test.is_empty() {
            return Err(TrainError::InvalidConfig("the test split holds no examples".into()));
        }
        let fingerprint = DataFingerprint::of(&train, &test);
        let (train, val) = if cfg.val_split > 0 {
            if cfg.val_split.saturating_add(2) > train.len() {
                return Err(TrainError::InvalidField {
                    field: "val_split",
                    what: "validation split",
                    reason: format!(
                        "of {} must leave at least 2 of the {} training examples",
                        cfg.val_split,
                        train.len()
                    ),
                });
            }
            let (rest, val) = train.split_off_seeded(cfg.val_split, cfg.seed)?;
            (rest, Some(val))
        } else {
            (train, None)
        };
        let steps_per_epoch = steps_per_epoch(train.len(), cfg.batch_size);
        if steps_per_epoch == 0 {
            return Err(TrainError::InvalidConfig(format!(
                "the training split holds {} example(s); BatchNorm needs batches of at least 2",
                train.len()
            )));
        }
        if cfg.epochs.checked_mul(steps_per_epoch).is_none_or(|n| n > u32::MAX as usize) {
            return Err(TrainError::InvalidField {
                field: "epochs",
                what: "epochs",
                reason: format!(
                    "{} × {steps_per_epoch} steps per epoch is more steps than a run can count",
                    cfg.epochs
                ),
            });
        }
        Ok(Self {
            train: Arc::new(train),
            val,
            test,
            fingerprint,
            steps_per_epoch,
            schedule: LrSchedule::new(cfg, steps_per_epoch),
            points: plot_points(steps_per_epoch),
        })
    }
}

/// Whether training goes on after a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

impl Trainer {
    /// A fresh model on `device` computing with `cfg.conv_algorithm`, initialised from
    /// `cfg.seed` as d2l does, then loaded from `cfg.init_weights` when set (every tensor
    /// checked against the model before any is used).
    pub fn new(cfg: TrainConfig, device: &Device) -> Result<Self> {
        let trainer = Self::initialised(cfg, device)?;
        if let Some(path) = &trainer.state.config.init_weights {
            load_init_weights(&trainer.model, path)?;
            if let Some(average) = &trainer.average {
                average.copy_from(&trainer.model)?;
            }
            tracing::info!(path = %path.display(), "initial weights loaded");
        }
        Ok(trainer)
    }

    /// The seeded initialisation alone (resuming replaces the weights from the checkpoint).
    fn initialised(cfg: TrainConfig, device: &Device) -> Result<Self> {
        cfg.validate()?;
        check_precision(&cfg, device)?;
        let vars = VarMap::new();
        let mut model = ResNet::new(&cfg.model, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        model.set_compute_dtype(cfg.precision.compute_dtype())?;
        model.set_conv_algorithm(cfg.conv_algorithm);
        model.set_gpu_ops(cfg.gpu_ops);
        if cfg.tf32 {
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
        d2l_init(&model, cfg.seed)?;
        let average = cfg.ema_decay.map(|d| WeightAverage::new(&model, &cfg, d, device)).transpose()?;
        let opt = Sgd::new(model.parameters(), cfg.optimizer)?;
        let rng = RngState { seed: cfg.seed, epoch: 0, position: 0 };
        let state = TrainState {
            config: cfg,
            epochs_done: 0,
            batches_done: 0,
            global_step: 0,
            running: Running::default(),
            history: Vec::new(),
            best_acc: None,
            best_epoch: None,
            rng,
            data: None,
            early_stop: None,
        };
        Ok(Self { model, _vars: vars, opt, average, device: device.clone(), state, run_dir: None })
    }

    /// Continues the run in `dir` exactly where its last checkpoint left it, with every setting
    /// it recorded (the convolution algorithm included).
    pub fn resume(dir: &Path, device: &Device) -> Result<Self> {
        let run_dir = RunDir::open(dir)?;
        let path = run_dir.checkpoint();
        let saved = checkpoint::read(&path, device)?;
        let mut trainer = Self::initialised(saved.state.config.clone(), device)?;
        core_ckpt::load_into(&trainer.model, &path)?;
        trainer.opt.load_state(saved.momentum)?;
        if let Some(average) = &trainer.average {
            if saved.average.is_empty() {
                return Err(TrainError::Resume {
                    path,
                    reason: "the run averages its weights (`ema_decay`) but the checkpoint holds no average".into(),
                });
            }
            average
                .load_state(saved.average)
                .map_err(|e| TrainError::Resume { path: path.clone(), reason: e.to_string() })?;
        }
        trainer.state = saved.state;
        trainer.run_dir = Some(run_dir);
        Ok(trainer)
    }

    /// Plans a resumed run for `epochs` epochs instead of the recorded number: the one setting a
    /// resume may change. Only a longer run is possible, and only where the learning rate of the
    /// steps already taken stays what it was: the constant and step schedules. The cosine
    /// schedule spans the planned epochs, so extending it is refused.
    pub fn extend_epochs(&mut self, epochs: usize) -> Result<()> {
        let cfg = &self.state.config;
        if epochs == cfg.epochs {
            return Ok(());
        }
        let refuse = |reason: String| Err(TrainError::InvalidField { field: "epochs", what: "epochs", reason });
        if epochs < cfg.epochs {
            return refuse(format!(
                "can only grow on resume: the run is planned for {} epochs, got {epochs}",
                cfg.epochs
            ));
        }
        if cfg.schedule == Schedule::Cosine {
            return refuse(format!(
                "cannot grow from {} to {epochs} on resume: the cosine schedule decays to zero at the planned last \
                 epoch, so a longer plan would change the rate of steps already taken; start a new run",
                cfg.epochs
            ));
        }
        if let Some(stop) = &self.state.early_stop {
            return refuse(format!("cannot grow: the run stopped early at epoch {} (patience)", stop.epoch));
        }
        let mut cfg = cfg.clone();
        cfg.epochs = epochs;
        cfg.validate()?;
        self.state.config = cfg;
        if let Some(dir) = &self.run_dir {
            dir.write(files::CONFIG, &config_json(&self.state.config)?)?;
        }
        Ok(())
    }

    /// Writes config, metrics, curves and checkpoints into `dir` as training proceeds.
    pub fn with_run_dir(mut self, dir: RunDir) -> Result<Self> {
        dir.write(files::CONFIG, &config_json(&self.state.config)?)?;
        self.run_dir = Some(dir);
        Ok(self)
    }

    /// The model.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// The weights evaluation, selection and `best.safetensors` use: the weight average when
    /// the run keeps one (`ema_decay`), else the model itself.
    pub fn eval_model(&self) -> &ResNet {
        self.average.as_ref().map_or(&self.model, |a| a.model())
    }

    /// Where training stands.
    pub fn state(&self) -> &TrainState {
        &self.state
    }

    /// The run directory, if one is attached.
    pub fn run_dir(&self) -> Option<&Path> {
        self.run_dir.as_ref().map(|d| d.path())
    }

    /// The device training runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Everything [`Trainer::fit`] can know before its first step: that the data fits the
    /// configuration (sizes, validation split, step counts) and, for a resumed run, is the data
    /// the run started on. Call it before creating a run directory.
    pub fn check(&self, data: &FashionMnist) -> Result<()> {
        self.plan(data).map(|_| ())
    }

    /// Trains until `config.epochs` are done, validation accuracy stops improving for
    /// `patience` epochs, or the observer asks to stop.
    pub fn fit(&mut self, data: &FashionMnist, observer: &mut dyn Observer) -> Result<TrainReport> {
        let plan = self.plan(data)?;
        self.state.data = Some(plan.fingerprint.clone());
        self.write_logs_if_stale();
        let mut interrupted = false;
        while self.state.epochs_done < self.state.config.epochs && self.state.early_stop.is_none() {
            let wall = Instant::now();
            if self.train_epoch(&plan, observer)? == Flow::Stop {
                self.state.running.wall_seconds += wall.elapsed().as_secs_f64();
                self.write_checkpoint(observer)?;
                interrupted = true;
                break;
            }
            self.check_finite()?;
            let metrics = self.evaluate_epoch(&plan, wall, observer)?;
            let improved = self.record_epoch(&metrics);
            self.write_epoch(improved, observer)?;
            observer.on_epoch_end(&metrics);
            if observer.should_stop() {
                interrupted = true;
                break;
            }
        }
        Ok(self.report(interrupted))
    }

    fn plan(&self, data: &FashionMnist) -> Result<Plan> {
        let plan = Plan::new(&self.state.config, data)?;
        if let Some(recorded) = &self.state.data {
            recorded.check(&plan.fingerprint)?;
        }
        if self.state.batches_done > plan.steps_per_epoch {
            return Err(TrainError::InvalidConfig(format!(
                "the checkpoint is at batch {} of an epoch that has {} batches",
                self.state.batches_done, plan.steps_per_epoch
            )));
        }
        Ok(plan)
    }

    /// Runs the current epoch's remaining steps; `Stop` when the observer asked to stop.
    fn train_epoch(&mut self, plan: &Plan, observer: &mut dyn Observer) -> Result<Flow> {
        let cfg = self.state.config.clone();
        let epoch = self.state.epochs_done;
        let skip = self.state.batches_done;
        let iter = batches(Arc::clone(&plan.train), &loader_config(&cfg, true), epoch as u64)?;
        observer.on_epoch_start(epoch + 1, plan.steps_per_epoch.saturating_sub(skip));
        for (i, batch) in iter.enumerate().take(plan.steps_per_epoch).skip(skip) {
            let batch = batch?;
            let lr = plan.schedule.lr(self.state.global_step);
            let t = Instant::now();
            let (loss, correct) = self.train_batch(&batch.images, &batch.labels, lr)?;
            if !loss.is_finite() {
                return Err(self.diverged(format!("the loss ({loss})"), i + 1, lr));
            }
            let n = batch.indices.len() as u64;
            self.state.running.add(loss as f64, correct, n, t.elapsed().as_secs_f64());
            self.state.global_step += 1;
            self.state.batches_done = i + 1;
            self.state.rng = RngState { seed: cfg.seed, epoch: epoch as u64, position: self.state.running.examples };
            let r = self.state.running;
            let info = StepInfo {
                epoch: epoch + 1,
                epochs: cfg.epochs,
                batch: i + 1,
                batches: plan.steps_per_epoch,
                train_loss: r.loss(),
                train_acc: r.accuracy(),
                lr,
            };
            if plan.points.contains(&(i + 1)) {
                self.state.history.push(MetricsRecord::Step {
                    epoch: epoch as f64 + (i + 1) as f64 / plan.steps_per_epoch as f64,
                    train_loss: info.train_loss,
                    train_acc: info.train_acc,
                    lr,
                });
            }
            observer.on_step(&info);
            if observer.should_stop() {
                return Ok(Flow::Stop);
            }
        }
        Ok(Flow::Continue)
    }

    /// Test (and validation) accuracy of the epoch just trained, with its training figures.
    fn evaluate_epoch(&self, plan: &Plan, wall: Instant, observer: &mut dyn Observer) -> Result<EpochMetrics> {
        let cfg = &self.state.config;
        observer.on_eval_start(self.state.epochs_done + 1);
        let loader = loader_config(cfg, false);
        let tta = cfg.tta_hflip;
        let model = self.eval_model();
        let test_acc = evaluate(model, &plan.test, &loader, &self.device, tta)?.accuracy();
        let val_acc = match &plan.val {
            Some(val) => Some(evaluate(model, val, &loader, &self.device, tta)?.accuracy()),
            None => None,
        };
        let r = self.state.running;
        let metrics = EpochMetrics {
            epoch: self.state.epochs_done + 1,
            train_loss: r.loss(),
            train_acc: r.accuracy(),
            test_acc,
            val_acc,
            examples_per_sec: r.examples as f64 / r.step_seconds.max(1e-9),
            examples: r.examples,
            step_seconds: r.step_seconds,
            wall_seconds: r.wall_seconds + wall.elapsed().as_secs_f64(),
            lr: plan.schedule.lr(self.state.global_step.saturating_sub(1)),
        };
        tracing::info!(
            epoch = metrics.epoch,
            train_loss = metrics.train_loss,
            train_acc = metrics.train_acc,
            test_acc,
            val_acc,
            examples_per_sec = metrics.examples_per_sec,
            "epoch done"
        );
        Ok(metrics)
    }

    /// Closes the epoch in the state: history, counters, the best epoch and early stopping.
    /// Returns whether this epoch is the best so far.
    fn record_epoch(&mut self, metrics: &EpochMetrics) -> bool {
        let cfg = &self.state.config;
        self.state.history.push(MetricsRecord::Epoch(metrics.clone()));
        for reached in new_milestones(&self.state.history) {
            tracing::info!(test_acc = reached.test_acc, epoch = reached.epoch, "test accuracy milestone reached");
            self.state.history.push(MetricsRecord::TimeToAccuracy(reached));
        }
        self.state.epochs_done += 1;
        self.state.batches_done = 0;
        self.state.running = Running::default();
        self.state.rng = RngState { seed: cfg.seed, epoch: self.state.epochs_done as u64, position: 0 };
        let score = metrics.val_acc.unwrap_or(metrics.test_acc);
        let improved = self.state.best_acc.is_none_or(|best| score > best);
        if improved {
            self.state.best_acc = Some(score);
            self.state.best_epoch = Some(metrics.epoch);
        }
        if let (Some(patience), Some(best_epoch), Some(best_val_acc)) =
            (cfg.patience, self.state.best_epoch, self.state.best_acc)
        {
            if metrics.epoch - best_epoch >= patience && self.state.epochs_done < cfg.epochs {
                let stop = EarlyStop { epoch: metrics.epoch, best_epoch, best_val_acc, patience };
                tracing::info!(epoch = stop.epoch, best_epoch, "validation accuracy stopped improving; stopping early");
                self.state.history.push(MetricsRecord::EarlyStop(stop.clone()));
                self.state.early_stop = Some(stop);
            }
        }
        improved
    }

    /// One optimiser step on a batch at learning rate `lr`, with gradient accumulation over
    /// micro-batches. Returns the batch's mean loss and correct count (training-mode forward).
    /// On the CPU the step runs through [`crate::on_polling_workers`] (which polls only in a
    /// process [`crate::tune_process`] tuned); the result is the same either way.
    ///
    /// # Shapes
    /// - `images`: `(batch, channels, height, width)`, any device
    /// - `labels`: `(batch,)` u32
    pub fn train_batch(&mut self, images: &Tensor, labels: &Tensor, lr: f64) -> Result<(f32, u64)> {
        if self.device.is_cpu() {
            crate::on_polling_workers(|| self.train_batch_here(images, labels, lr))
        } else {
            self.train_batch_here(images, labels, lr)
        }
    }

    /// [`Trainer::train_batch`] on the calling thread.
    fn train_batch_here(&mut self, images: &Tensor, labels: &Tensor, lr: f64) -> Result<(f32, u64)> {
        let n = images.dim(0)?;
        if n < 2 {
            return Err(TrainError::InvalidConfig(format!(
                "a training batch needs at least 2 examples (BatchNorm), got {n}"
            )));
        }
        let micro = self.state.config.micro_batch_size().min(n).max(2);
        let smoothing = self.state.config.label_smoothing;
        let mut grads: Option<GradStore> = None;
        let (mut loss_sum, mut correct) = (0f32, 0u64);
        let mut start = 0;
        while start < n {
            let mut len = micro.min(n - start);
            if n - start - len == 1 {
                // A micro-batch of one example would break BatchNorm: the last one joins this one.
                len += 1;
            }
            let x = images.narrow(0, start, len)?.to_device(&self.device)?;
            let y = labels.narrow(0, start, len)?.to_device(&self.device)?;
            let span = profile::span("step: forward and loss", x.dims());
            let logits = self.model.forward_train(&x)?;
            let loss = cross_entropy(&logits, &y, smoothing)?;
            drop(span);
            let _span = profile::span("step: backward", x.dims());
            let scaled = if len == n { loss.clone() } else { (&loss * (len as f64 / n as f64))? };
            let g = resnet_core::backward(&scaled)?;
            grads = Some(match grads {
                None => g,
                Some(acc) => add_grads(acc, g, &self.model)?,
            });
            loss_sum += loss.to_dtype(DType::F32)?.to_scalar::<f32>()? * len as f32;
            correct += count_correct(&logits, &y)?;
            start += len;
        }
        if let Some(g) = grads {
            let _span = profile::span("step: optimiser", images.dims());
            self.opt.step(&g, lr)?;
            if let Some(average) = &self.average {
                average.update(&self.model, self.state.global_step)?;
            }
        }
        Ok((loss_sum / n as f32, correct))
    }

    /// The divergence error, pointing at the last good checkpoint.
    fn diverged(&self, what: String, batch: usize, lr: f64) -> TrainError {
        TrainError::Diverged {
            what,
            epoch: self.state.epochs_done + 1,
            batch,
            lr,
            checkpoint: self.run_dir.as_ref().map(|d| d.checkpoint()).filter(|p| p.exists()),
        }
    }

    /// Refuses weights that an update made NaN or infinite, before anything evaluates or saves them.
    fn check_finite(&self) -> Result<()> {
        for p in self.model.parameters() {
            let sum = p.tensor.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
            if !sum.is_finite() {
                let batch = self.state.batches_done;
                let lr = self.state.config.optimizer.lr;
                return Err(self.diverged(format!("the weights (`{}`)", p.name), batch, lr));
            }
        }
        Ok(())
    }

    /// The training checkpoint, after checking the weights are finite.
    fn write_checkpoint(&self, observer: &mut dyn Observer) -> Result<()> {
        let Some(dir) = &self.run_dir else {
            return Ok(());
        };
        self.check_finite()?;
        let path = dir.checkpoint();
        let previous_intact = path.exists();
        let average = self.average.as_ref().map(|a| a.state()).unwrap_or_default();
        let bytes = checkpoint::to_bytes(&self.model, &self.opt.state(), &average, &self.state)?;
        write_atomic(&path, &bytes).map_err(|source| TrainError::CheckpointWrite {
            path: path.clone(),
            source,
            previous_intact,
        })?;
        observer.on_checkpoint(&path);
        Ok(())
    }

    /// The end-of-epoch files, in the order that keeps the folder consistent after a kill at
    /// any instant: the best weights first, then the checkpoint that records them (a kill in
    /// between resumes from the previous checkpoint and redoes the epoch, rewriting the best
    /// file), then metrics and curves, which are rebuilt from the checkpoint's history and whose
    /// failure only warns.
    fn write_epoch(&self, improved: bool, observer: &mut dyn Observer) -> Result<()> {
        let Some(dir) = &self.run_dir else {
            return Ok(());
        };
        if improved {
            let best = dir.best();
            let previous_intact = best.exists();
            let epoch = self.state.best_epoch.unwrap_or(self.state.epochs_done);
            let bytes = core_ckpt::to_bytes(self.eval_model(), &checkpoint::best_metadata(&self.state.config, epoch))?;
            write_atomic(&best, &bytes).map_err(|source| TrainError::CheckpointWrite {
                path: best.clone(),
                source,
                previous_intact,
            })?;
        }
        self.write_checkpoint(observer)?;
        if let Err(e) = self.write_logs(dir) {
            tracing::warn!("{e}; the checkpoint is written and the next epoch rewrites these files");
        }
        Ok(())
    }

    /// Rewrites metrics and curves when `metrics.jsonl` lags the checkpoint's history (a kill
    /// between the two writes).
    fn write_logs_if_stale(&self) {
        let Some(dir) = &self.run_dir else { return };
        if self.state.history.is_empty() {
            return;
        }
        let Ok(lines) = metrics_lines(&self.state.history) else { return };
        if std::fs::read(dir.file(files::METRICS)).ok().as_deref() != Some(lines.as_bytes()) {
            if let Err(e) = self.write_logs(dir) {
                tracing::warn!("{e}");
            }
        }
    }

    fn write_logs(&self, dir: &RunDir) -> Result<()> {
        dir.write(files::METRICS, metrics_lines(&self.state.history)?.as_bytes())?;
        let curves = Curves::from_history(&self.state.history);
        plot::draw(&curves, self.state.config.epochs, &dir.file(files::CURVES_PNG), &dir.file(files::CURVES_SVG))
    }

    fn report(&self, interrupted: bool) -> TrainReport {
        let epochs: Vec<&EpochMetrics> = self
            .state
            .history
            .iter()
            .filter_map(|r| if let MetricsRecord::Epoch(m) = r { Some(m) } else { None })
            .collect();
        let (n, secs) = epochs.iter().fold((0u64, 0f64), |(n, s), m| (n + m.examples, s + m.step_seconds));
        let selected_on = self.state.config.selection_metric();
        TrainReport {
            last: epochs.last().map(|m| (*m).clone()),
            examples_per_sec: n as f64 / secs.max(1e-9),
            interrupted,
            early_stop: self.state.early_stop.clone(),
            best: self.state.best_epoch.zip(self.state.best_acc).map(|(e, a)| (e, a, selected_on)),
            time_to_accuracy: self
                .state
                .history
                .iter()
                .filter_map(|r| if let MetricsRecord::TimeToAccuracy(t) = r { Some(t.clone()) } else { None })
                .collect(),
            run_dir: self.run_dir.as_ref().map(|d| d.path().to_path_buf()),
        }
    }
}

/// Loads `path` into `model` for `init_weights`, with errors that name the field and the file.
fn load_init_weights(model: &ResNet, path: &Path) -> Result<()> {
    let err = |reason: String| TrainError::InitWeights { path: path.to_path_buf(), reason };
    if !path.is_file() {
        return Err(err("no such file".into()));
    }
    core_ckpt::load_into(model, path).map_err(|e| match e {
        resnet_core::CoreError::CheckpointMismatch { problem, .. } => err(format!("does not fit the model: {problem}")),
        resnet_core::CoreError::CheckpointFormat { reason, .. } => {
            err(format!("not a readable safetensors file: {reason}"))
        }
        other => err(other.to_string()),
    })
}

/// Evaluation-mode predictions over a whole split (last partial batch included); `tta_hflip`
/// averages each image's softmax with its mirror image's (see [`class_probabilities`]).
pub fn evaluate(
    model: &ResNet,
    split: &Split,
    loader: &LoaderConfig,
    device: &Device,
    tta_hflip: bool,
) -> Result<Confusion> {
    let mut confusion = Confusion::new(model.config().num_classes);
    let predicted: Vec<u32> = predictions(model, split, loader, device, tta_hflip)?.iter().map(|p| p.class).collect();
    let labels: Vec<u32> = split.labels.iter().map(|&l| l as u32).collect();
    confusion.add(&labels, &predicted);
    Ok(confusion)
}

/// Every example's most probable class and its softmax probability, in split order, evaluation
/// mode (the loader's shuffling and augmentation are switched off; `tta_hflip` as in
/// [`class_probabilities`]).
pub fn predictions(
    model: &ResNet,
    split: &Split,
    loader: &LoaderConfig,
    device: &Device,
    tta_hflip: bool,
) -> Result<Vec<Prediction>> {
    let mut out = Vec::with_capacity(split.len());
    let cfg = LoaderConfig { shuffle: false, augment: None, ..loader.clone() };
    for batch in batches(Arc::new(split.clone()), &cfg, 0)? {
        let batch = batch?;
        let probs = class_probabilities(model, &batch.images.to_device(device)?, tta_hflip)?;
        let best = probs.max_keepdim(D::Minus1)?.squeeze(D::Minus1)?;
        let class: Vec<u32> = probs.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1()?;
        let confidence: Vec<f32> = best.to_device(&Device::Cpu)?.to_vec1()?;
        out.extend(class.into_iter().zip(confidence).map(|(class, confidence)| Prediction { class, confidence }));
    }
    Ok(out)
}

/// Evaluation-mode class probabilities (softmax, f32). With `tta_hflip`, the mean of the
/// probabilities of each image and of its left-right mirror image: test-time augmentation for
/// models trained with random flips.
///
/// # Shapes
/// - `images`: `(batch, channels, height, width)` on the model's device → `(batch, classes)`
pub fn class_probabilities(model: &ResNet, images: &Tensor, tta_hflip: bool) -> Result<Tensor> {
    let probs = |x: &Tensor| -> Result<Tensor> {
        Ok(candle_nn::ops::softmax(&model.infer(x)?.to_dtype(DType::F32)?, D::Minus1)?)
    };
    let p = probs(images)?;
    if !tta_hflip {
        return Ok(p);
    }
    let mirrored = images.flip(&[3])?;
    Ok(((p + probs(&mirrored)?)? * 0.5)?)
}

/// Mean cross-entropy with label smoothing ε: `(1-ε)·nll + ε·mean_k(-log p_k)`.
///
/// # Shapes
/// - `logits`: `(batch, classes)`; `labels`: `(batch,)` u32
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let nll = candle_nn::loss::nll(&logp, labels)?;
    if smoothing == 0.0 {
        return Ok(nll);
    }
    let uniform = logp.mean(D::Minus1)?.mean_all()?.neg()?;
    Ok(((nll * (1.0 - smoothing))? + (uniform * smoothing)?)?)
}

fn count_correct(logits: &Tensor, labels: &Tensor) -> Result<u64> {
    let pred = logits.argmax(D::Minus1)?;
    Ok(pred.eq(labels)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()? as u64)
}

fn add_grads(mut acc: GradStore, more: GradStore, model: &ResNet) -> Result<GradStore> {
    for p in model.parameters() {
        if let Some(g) = more.get(&p.tensor) {
            let sum = match acc.get(&p.tensor) {
                Some(a) => (a + g)?.detach(),
                None => g.detach(),
            };
            acc.insert(&p.tensor, sum);
        }
    }
    Ok(acc)
}

/// The batches after which d2l's animator plots a point: five per epoch, and the last.
fn plot_points(batches: usize) -> Vec<usize> {
    let step = (batches / 5).max(1);
    (1..=batches).filter(|i| i % step == 0 || *i == batches).collect()
}

fn config_json(cfg: &TrainConfig) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(cfg).map_err(|e| TrainError::InvalidConfig(e.to_string()))
}

fn metrics_lines(history: &[MetricsRecord]) -> Result<String> {
    let mut lines = String::new();
    for r in history {
        lines.push_str(&serde_json::to_string(r).map_err(|e| TrainError::InvalidConfig(e.to_string()))?);
        lines.push('\n');
    }
    Ok(lines)
}

fn limited(split: &Split, limit: Option<usize>) -> Split {
    match limit {
        Some(n) if n < split.len() => split.clone().limit(n),
        _ => split.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_of_one_example_are_dropped() {
        assert_eq!(steps_per_epoch(257, 256), 1);
        assert_eq!(steps_per_epoch(258, 256), 2);
        assert_eq!(steps_per_epoch(256, 256), 1);
        assert_eq!(steps_per_epoch(1, 256), 0);
    }

    #[test]
    fn five_points_per_epoch() {
        assert_eq!(plot_points(235).len(), 5);
        assert_eq!(plot_points(3), vec![1, 2, 3]);
        assert_eq!(plot_points(12), vec![2, 4, 6, 8, 10, 12]);
    }

    /// Flip TTA is the mean of two softmaxes, the second of the image mirrored left-right, here
    /// mirrored independently by gathering columns in reverse order.
    #[test]
    fn flip_tta_averages_an_image_and_its_mirror() -> Result<()> {
        let vars = candle_nn::VarMap::new();
        let cfg = resnet_core::ResNetConfig { base_width: 4, ..resnet_core::ResNetConfig::d2l_resnet18() };
        let model = ResNet::new(&cfg, candle_nn::VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
        let x = Tensor::randn(0f32, 1.0, (3, 1, 28, 28), &Device::Cpu)?;
        let reversed = Tensor::new((0..28u32).rev().collect::<Vec<_>>().as_slice(), &Device::Cpu)?;
        let mirror = x.index_select(&reversed, 3)?;
        let softmax = |t: &Tensor| -> Result<Tensor> { Ok(candle_nn::ops::softmax(&model.infer(t)?, D::Minus1)?) };
        let want: Vec<Vec<f32>> = ((softmax(&x)? + softmax(&mirror)?)? * 0.5)?.to_vec2()?;
        let got: Vec<Vec<f32>> = class_probabilities(&model, &x, true)?.to_vec2()?;
        let plain: Vec<Vec<f32>> = class_probabilities(&model, &x, false)?.to_vec2()?;
        let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.iter().flatten().zip(b.iter().flatten()).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max)
        };
        assert!(max_diff(&got, &want) < 1e-6, "TTA differs from the mean of the two softmaxes");
        assert!(max_diff(&plain, &softmax(&x)?.to_vec2()?) == 0.0);
        // A random image is not symmetric, so the average must differ from one pass.
        assert!(max_diff(&got, &plain) > 1e-6);
        for row in &got {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        Ok(())
    }

    #[test]
    fn label_smoothing_matches_the_formula() -> Result<()> {
        let logits = Tensor::new(&[[2.0f32, 0.0, -1.0]], &Device::Cpu)?;
        let labels = Tensor::new(&[0u32], &Device::Cpu)?;
        let z = (2f64.exp() + 1.0 + (-1f64).exp()).ln();
        let logp = [2.0 - z, -z, -1.0 - z];
        let want = 0.9 * -logp[0] + 0.1 * -(logp.iter().sum::<f64>() / 3.0);
        let got = cross_entropy(&logits, &labels, 0.1)?.to_scalar::<f32>()? as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        let plain = cross_entropy(&logits, &labels, 0.0)?.to_scalar::<f32>()? as f64;
        assert!((plain + logp[0]).abs() < 1e-6);
        Ok(())
    }
}
