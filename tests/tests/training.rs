//! The training loop at library level on tiny synthetic data: exact resume (mid-epoch, at an
//! epoch boundary, twice in a row), bit-for-bit determinism, overfitting one batch, gradient
//! accumulation, the non-finite-loss stop and checkpoint-write failures.
//!
//! Every run is a width-4 ResNet-18 on 256 synthetic 28×28 images, 8 steps per epoch (see
//! `resnet_tests::tiny_config`); a whole run takes a fraction of a second in the test profile.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use resnet_core::{checkpoint, ConvAlgorithm, ResNet, ResNetConfig};
use resnet_data::{batches, FashionMnist, Split};
use resnet_tests::{
    differing_tensors, ensure_identical, snapshot, synthetic_data, tiny_config, without_timing, Recorder, BATCH,
    STEPS_PER_EPOCH,
};
use resnet_train::run_dir::files;
use resnet_train::{
    loader_config, EpochMetrics, LrSchedule, MetricsRecord, Observer, Precision, RunDir, Schedule, SgdConfig, Silent,
    TimeToAccuracy, TrainConfig, TrainError, Trainer, ACCURACY_MILESTONES,
};
use tempfile::TempDir;

const CPU: Device = Device::Cpu;

/// A complete run of `cfg` in a fresh run directory, never interrupted.
fn uninterrupted(cfg: &TrainConfig, data: &FashionMnist) -> Result<(Trainer, TempDir)> {
    let dir = tempfile::tempdir()?;
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?.with_run_dir(RunDir::create(&dir.path().join("run"))?)?;
    let report = trainer.fit(data, &mut Silent)?;
    ensure!(!report.interrupted, "an uninterrupted run reported an interruption");
    Ok((trainer, dir))
}

/// A run of `cfg` interrupted (as by Ctrl-C) once the global step count reaches each of `stops`,
/// every time dropped and resumed from its run directory, then trained to the end.
fn interrupted_and_resumed(cfg: &TrainConfig, data: &FashionMnist, stops: &[usize]) -> Result<(Trainer, TempDir)> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let mut done = 0;
    for &stop in stops {
        let mut observer = Recorder::stop_after(stop - done);
        let report = trainer.fit(data, &mut observer)?;
        ensure!(report.interrupted, "stopping after step {stop}: fit did not report the interruption");
        ensure!(observer.steps.len() == stop - done, "stopping after step {stop}: {} steps ran", observer.steps.len());
        let checkpoint = run.join(files::CHECKPOINT);
        ensure!(checkpoint.is_file(), "no checkpoint after the interruption at step {stop}");
        ensure!(
            observer.checkpoints.last() == Some(&checkpoint),
            "the interruption at step {stop} did not report writing {}",
            checkpoint.display()
        );
        // Continue from the files alone, as a new process would.
        trainer = Trainer::resume(&run, &CPU)?;
        let s = trainer.state();
        // A stop in an epoch's last step comes before its evaluation: the epoch is not yet done.
        let want = match stop % STEPS_PER_EPOCH {
            0 => (stop, stop / STEPS_PER_EPOCH - 1, STEPS_PER_EPOCH),
            batch => (stop, stop / STEPS_PER_EPOCH, batch),
        };
        ensure!(
            (s.global_step, s.epochs_done, s.batches_done) == want,
            "resumed after step {stop} at global step {}, epoch {} + {} batches",
            s.global_step,
            s.epochs_done,
            s.batches_done
        );
        done = stop;
    }
    let report = trainer.fit(data, &mut Silent)?;
    ensure!(!report.interrupted && report.last.is_some(), "the resumed run did not finish: {report:?}");
    Ok((trainer, dir))
}

/// A model with `cfg`'s architecture holding the weights of `path`.
fn load_weights(cfg: &ResNetConfig, path: &Path) -> Result<(ResNet, VarMap)> {
    let vars = VarMap::new();
    let model = ResNet::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &CPU))?;
    checkpoint::load_into(&model, path)?;
    Ok((model, vars))
}

/// The records of a run directory's `metrics.jsonl`.
fn metrics_file(run: &Path) -> Result<Vec<MetricsRecord>> {
    let text = std::fs::read_to_string(run.join(files::METRICS))?;
    text.lines().map(|l| serde_json::from_str(l).with_context(|| format!("metrics line {l:?}"))).collect()
}

fn epoch_metrics(history: &[MetricsRecord]) -> Vec<EpochMetrics> {
    history.iter().filter_map(|r| if let MetricsRecord::Epoch(m) = r { Some(m.clone()) } else { None }).collect()
}

/// Files whose names say they are temporary (a write that was not finished or cleaned up).
fn temporaries(dir: &Path, except: &[&Path]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.contains(".tmp") && !except.contains(&path.as_path()) {
            out.push(path.display().to_string());
        }
    }
    Ok(out)
}

/// The resumed run must equal the uninterrupted one in every bit of every parameter and
/// BatchNorm buffer, in every metric but the timings, in `metrics.jsonl` and in `best.safetensors`.
fn check_resume_is_exact(stops: &[usize]) -> Result<()> {
    check_resume_of(&tiny_config(), stops)
}

fn check_resume_of(cfg: &TrainConfig, stops: &[usize]) -> Result<()> {
    let data = synthetic_data();
    let (full, full_dir) = uninterrupted(cfg, &data)?;
    let (resumed, resumed_dir) = interrupted_and_resumed(cfg, &data, stops)?;
    ensure_identical(full.model(), resumed.model(), &format!("weights after resuming at steps {stops:?}"))?;
    ensure_identical(full.eval_model(), resumed.eval_model(), &format!("evaluated weights, resumed at {stops:?}"))?;

    let (a, b) = (without_timing(&full.state().history), without_timing(&resumed.state().history));
    ensure!(a.len() == b.len(), "history lengths differ: {} vs {}", a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        ensure!(x == y, "metrics record {i} differs after resuming at steps {stops:?}:\n  {x:?}\n  {y:?}");
    }
    ensure!(epoch_metrics(&full.state().history).len() == cfg.epochs, "expected {} epoch records", cfg.epochs);

    let (full_run, resumed_run) = (full_dir.path().join("run"), resumed_dir.path().join("run"));
    ensure!(without_timing(&metrics_file(&resumed_run)?) == b, "metrics.jsonl of the resumed run is not its history");
    ensure!(without_timing(&metrics_file(&full_run)?) == a, "metrics.jsonl of the full run is not its history");

    let (best_full, _v1) = load_weights(&cfg.model, &full_run.join(files::BEST))?;
    let (best_resumed, _v2) = load_weights(&cfg.model, &resumed_run.join(files::BEST))?;
    ensure_identical(&best_full, &best_resumed, "best.safetensors")?;
    ensure!(full.state().best_acc == resumed.state().best_acc, "best accuracy differs");
    ensure!(full.state().best_epoch == resumed.state().best_epoch, "best epoch differs");
    Ok(())
}

#[test]
fn resume_mid_epoch_twice_equals_uninterrupted_run() -> Result<()> {
    // Step 5 is epoch 1, batch 5; step 13 is epoch 2, batch 5.
    check_resume_is_exact(&[5, 13])
}

#[test]
fn resume_at_epoch_boundary_equals_uninterrupted_run() -> Result<()> {
    check_resume_is_exact(&[STEPS_PER_EPOCH])
}

#[test]
fn weight_averaging_resumes_exactly() -> Result<()> {
    check_resume_of(&TrainConfig { ema_decay: Some(0.9), ..tiny_config() }, &[5, 13])
}

#[test]
fn weight_averaging_is_what_is_evaluated_and_saved_as_best() -> Result<()> {
    let data = synthetic_data();
    let cfg = TrainConfig { epochs: 1, ema_decay: Some(0.9), ..tiny_config() };
    let (trainer, dir) = uninterrupted(&cfg, &data)?;
    let averaged = trainer.eval_model();
    ensure!(!differing_tensors(trainer.model(), averaged)?.is_empty(), "the average equals the last step's weights");
    let recorded = epoch_metrics(&trainer.state().history)[0].test_acc;
    let evaluated = resnet_train::evaluate(averaged, &data.test, &loader_config(&cfg, false), &CPU, false)?.accuracy();
    ensure!(evaluated == recorded, "the epoch recorded {recorded}, the average scores {evaluated}");
    let (best, _vars) = load_weights(&cfg.model, &dir.path().join("run").join(files::BEST))?;
    ensure_identical(&best, averaged, "best.safetensors against the average")?;
    // The checkpoint holds the last step's weights (to resume from) and the average, which
    // `load_average_into` (what `eval` and `predict` use) puts in their place.
    let checkpoint_file = dir.path().join("run").join(files::CHECKPOINT);
    let (from_checkpoint, _v) = load_weights(&cfg.model, &checkpoint_file)?;
    ensure_identical(&from_checkpoint, trainer.model(), "checkpoint.safetensors' model tensors")?;
    ensure!(resnet_train::checkpoint::load_average_into(&from_checkpoint, &checkpoint_file)?, "no average loaded");
    ensure_identical(&from_checkpoint, averaged, "the checkpoint's average")?;
    ensure!(
        !resnet_train::checkpoint::load_average_into(&best, &dir.path().join("run").join(files::BEST))?,
        "best.safetensors holds an average besides its weights"
    );
    // Without averaging, evaluation uses the model itself.
    let (plain, _dir) = uninterrupted(&TrainConfig { ema_decay: None, ..cfg }, &data)?;
    ensure_identical(plain.eval_model(), plain.model(), "evaluated weights without averaging")?;
    Ok(())
}

#[test]
fn same_seed_gives_identical_weights_and_another_seed_does_not() -> Result<()> {
    let data = synthetic_data();
    let cfg = tiny_config();
    let fit = |cfg: TrainConfig| -> Result<Trainer> {
        let mut t = Trainer::new(cfg, &CPU)?;
        t.fit(&data, &mut Silent)?;
        Ok(t)
    };
    let a = fit(cfg.clone())?;
    let b = fit(cfg.clone())?;
    ensure_identical(a.model(), b.model(), "two runs with the same seed")?;
    ensure!(
        without_timing(&a.state().history) == without_timing(&b.state().history),
        "two runs with the same seed logged different metrics"
    );

    // Batches are prepared on background threads; how many must not change a single bit.
    let parallel = fit(TrainConfig { data_workers: 3, ..cfg.clone() })?;
    ensure_identical(a.model(), parallel.model(), "1 vs 3 data workers")?;

    let other = fit(TrainConfig { seed: cfg.seed + 1, ..cfg })?;
    let differing: BTreeSet<String> = differing_tensors(a.model(), other.model())?
        .into_iter()
        .filter_map(|d| d.split(':').next().map(str::to_string))
        .collect();
    let same: Vec<String> =
        a.model().parameters().into_iter().map(|p| p.name).filter(|n| !differing.contains(n)).collect();
    ensure!(same.is_empty(), "another seed left these parameters bit-identical: {same:?}");
    Ok(())
}

/// Fitting one batch: width 8, plain cross-entropy (no label smoothing, whose minimum is far
/// above zero), momentum SGD at a constant rate, no augmentation.
fn one_batch_config() -> TrainConfig {
    TrainConfig {
        model: ResNetConfig { base_width: 8, ..ResNetConfig::d2l_resnet18() },
        optimizer: SgdConfig { lr: 0.05, momentum: 0.9, nesterov: false, weight_decay: 0.0 },
        schedule: Schedule::Constant,
        warmup_epochs: 0.0,
        label_smoothing: 0.0,
        augment: None,
        ..tiny_config()
    }
}

/// The one synthetic batch of [`BATCH`] images that [`one_batch_config`] runs fit.
fn one_batch(cfg: &TrainConfig) -> Result<resnet_data::Batch> {
    let split = Split::synthetic(BATCH, 28, 28, 11);
    batches(Arc::new(split), &loader_config(cfg, false), 0)?.next().context("no batch")?.map_err(Into::into)
}

/// Mixed precision through the trainer: f16 (the CPU stand-in for CUDA's bf16, same code path)
/// learns one batch with f32 master weights and momentum; bf16 and TF32 on the CPU are refused
/// with a message naming the flag.
#[test]
fn mixed_precision_trains_with_f32_master_weights() -> Result<()> {
    let cfg = TrainConfig { precision: Precision::F16, ..one_batch_config() };
    let batch = one_batch(&cfg)?;
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?;
    ensure!(trainer.model().compute_dtype() == Some(DType::F16), "the model computes in f16");
    let mut losses = Vec::new();
    for _ in 0..30 {
        losses.push(trainer.train_batch(&batch.images, &batch.labels, cfg.optimizer.lr)?.0);
    }
    ensure!(losses.iter().all(|l| l.is_finite()), "non-finite f16 loss: {losses:?}");
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    ensure!(first > 1.5 && last < 0.5, "f16 training should fit one batch: loss {first} -> {last}");
    for p in trainer.model().parameters() {
        ensure!(p.tensor.dtype() == DType::F32, "{} is stored as {:?}, not f32", p.name, p.tensor.dtype());
    }
    for (bad, flag) in [
        // The library names configuration fields; the CLI swaps in its flags.
        (TrainConfig { precision: Precision::Bf16, ..cfg.clone() }, "`precision`"),
        (TrainConfig { tf32: true, ..cfg }, "`tf32`"),
    ] {
        let err = Trainer::new(bad, &CPU).err().context("a CUDA-only setting was accepted on the CPU")?;
        ensure!(err.to_string().contains(flag), "error should name {flag}: {err}");
    }
    Ok(())
}

#[test]
fn overfits_a_single_batch() -> Result<()> {
    let cfg = one_batch_config();
    let batch = one_batch(&cfg)?;
    ensure!(batch.indices.len() == BATCH, "expected one batch of {BATCH}");
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?;
    // The loss falls below 0.01 within ~20 steps; the rest lets the BatchNorm running statistics
    // (momentum 0.1) catch up with the final weights, so that evaluation mode agrees.
    const STEPS: usize = 100;
    let mut losses = Vec::with_capacity(STEPS);
    let mut correct = 0;
    for _ in 0..STEPS {
        let (loss, c) = trainer.train_batch(&batch.images, &batch.labels, cfg.optimizer.lr)?;
        losses.push(loss);
        correct = c;
    }
    let (first, last) = (losses[0], losses[STEPS - 1]);
    ensure!(first > 1.5, "the untrained loss should be near ln 10 = 2.3, got {first}");
    ensure!(last < 0.01, "after {STEPS} steps on one batch the loss is still {last} (from {first})");
    ensure!(correct == BATCH as u64, "after {STEPS} steps only {correct}/{BATCH} correct (training mode)");
    // In evaluation mode too, with the running statistics gathered on that same batch.
    let logits = trainer.model().forward_t(&batch.images, false)?;
    let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let labels: Vec<u32> = batch.labels.to_vec1()?;
    let right = predicted.iter().zip(&labels).filter(|(p, l)| p == l).count();
    ensure!(right == BATCH, "evaluation mode gets {right}/{BATCH} of the memorised batch");
    Ok(())
}

#[test]
fn micro_batches_average_their_gradients() -> Result<()> {
    // A batch made of the same 16 images twice: each micro-batch of 16 then has exactly the
    // batch's BatchNorm statistics, so the loss as a function of the weights is the same and
    // accumulating two half-batch gradients (each scaled by 1/2) must give the full-batch step,
    // up to float rounding. Summing instead of averaging would double every update.
    let whole_cfg = TrainConfig { augment: None, ..tiny_config() };
    let micro_cfg = TrainConfig { micro_batch: Some(BATCH / 2), ..whole_cfg.clone() };
    let half = Split::synthetic(BATCH / 2, 28, 28, 5);
    let b = batches(Arc::new(half), &loader_config(&whole_cfg, false), 0)?.next().context("no batch")??;
    let images = Tensor::cat(&[&b.images, &b.images], 0)?;
    let labels = Tensor::cat(&[&b.labels, &b.labels], 0)?;

    let mut whole = Trainer::new(whole_cfg, &CPU)?;
    let mut micro = Trainer::new(micro_cfg, &CPU)?;
    ensure_identical(whole.model(), micro.model(), "the two fresh models")?;
    let before = snapshot(whole.model())?;
    for lr in [0.1, 0.05, 0.02] {
        let (lw, cw) = whole.train_batch(&images, &labels, lr)?;
        let (lm, cm) = micro.train_batch(&images, &labels, lr)?;
        ensure!((lw - lm).abs() <= 1e-5 * lw.abs().max(1.0), "loss {lw} (whole batch) vs {lm} (micro-batches)");
        ensure!(cw == cm, "correct count {cw} vs {cm}");
    }
    // Each tensor's gap is measured against its own update, except that a bias is measured
    // against the larger of its own and its weight's: the bias of a convolution feeding a
    // BatchNorm has a true gradient of zero (the batch mean cancels it), so its update is weight
    // decay plus rounding noise, and comparing noise with noise says nothing.
    let (w, m) = (snapshot(whole.model())?, snapshot(micro.model())?);
    let params: BTreeSet<String> = whole.model().parameters().into_iter().map(|p| p.name).collect();
    let value = |bits: u64| f64::from_bits(bits);
    let max_abs =
        |a: &[u64], b: &[u64]| a.iter().zip(b).map(|(x, y)| (value(*x) - value(*y)).abs()).fold(0f64, f64::max);
    let update_of = |name: &str| -> f64 {
        let i = before.iter().position(|(n, _)| n == name);
        i.map(|i| max_abs(&before[i].1, &w[i].1)).unwrap_or(0.0)
    };
    let (mut worst_ratio, mut worst_name, mut biggest_update) = (0f64, String::new(), 0f64);
    for ((name, w1), (_, m1)) in w.iter().zip(&m) {
        if !params.contains(name) {
            continue;
        }
        let mut scale = update_of(name);
        biggest_update = biggest_update.max(scale);
        if let Some(stem) = name.strip_suffix("bias") {
            scale = scale.max(update_of(&format!("{stem}weight")));
        }
        let ratio = max_abs(w1, m1) / (scale + 1e-9);
        if ratio > worst_ratio {
            (worst_ratio, worst_name) = (ratio, name.clone());
        }
    }
    ensure!(biggest_update > 1e-2, "the three steps barely moved the weights ({biggest_update}); the check is void");
    ensure!(
        worst_ratio < 1e-4,
        "micro-batch and whole-batch updates differ in `{worst_name}` by {worst_ratio:e} of the update"
    );
    Ok(())
}

#[test]
fn training_with_micro_batches_learns() -> Result<()> {
    let data = synthetic_data();
    let cfg = TrainConfig { micro_batch: Some(8), augment: None, ..tiny_config() };
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?;
    let mut recorder = Recorder::default();
    trainer.fit(&data, &mut recorder)?;
    ensure!(recorder.steps.len() == cfg.epochs * STEPS_PER_EPOCH, "{} steps ran", recorder.steps.len());
    let losses: Vec<f64> = recorder.epochs.iter().map(|m| m.train_loss).collect();
    ensure!(losses.len() == cfg.epochs && losses.iter().all(|l| l.is_finite()), "epoch losses {losses:?}");
    ensure!(losses[cfg.epochs - 1] < 0.8 * losses[0], "the loss did not fall: {losses:?}");

    // A micro-batch that does not divide the batch is refused before anything runs.
    let bad = TrainConfig { micro_batch: Some(12), ..cfg };
    match Trainer::new(bad, &CPU) {
        Err(TrainError::InvalidField { field: "micro_batch", reason, .. }) if reason.contains("12") => Ok(()),
        other => bail!("micro-batch 12 of 32 should be refused, got {other:?}"),
    }
}

/// Sets every value of `model`'s tensor `name` to +∞ (through a file: model tensors
/// can only be replaced the way a checkpoint is loaded).
fn poison(model: &ResNet, name: &str, scratch: &Path) -> Result<()> {
    let path = scratch.join("poisoned.safetensors");
    checkpoint::save(model, &path)?;
    let mut tensors = candle_core::safetensors::load(&path, &CPU)?;
    let dims = tensors.get(name).with_context(|| format!("no tensor {name}"))?.dims().to_vec();
    tensors.insert(name.to_string(), Tensor::full(f32::INFINITY, dims, &CPU)?);
    candle_core::safetensors::save(&tensors, &path)?;
    checkpoint::load_into(model, &path)?;
    Ok(())
}

#[test]
fn non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint() -> Result<()> {
    // A genuinely diverging learning rate blows up at a step that depends on the seed and the
    // kernels, so the divergence is made certain instead: after an interruption at epoch 1,
    // batch 5 (which writes a checkpoint), the classifier's bias is set to +∞, which makes every
    // logit row hold an infinity and the next loss NaN.
    let data = synthetic_data();
    let cfg = tiny_config();
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let ckpt = run.join(files::CHECKPOINT);
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    ensure!(trainer.fit(&data, &mut Recorder::stop_after(5))?.interrupted, "the run was not interrupted");
    let good = std::fs::read(&ckpt)?;
    poison(trainer.model(), "7.bias", dir.path())?;

    let want_lr = LrSchedule::new(&cfg, STEPS_PER_EPOCH).lr(5);
    let err = match trainer.fit(&data, &mut Silent) {
        Err(e) => e,
        Ok(report) => bail!("training on with an infinite bias succeeded: {report:?}"),
    };
    let message = err.to_string();
    let TrainError::Diverged { what, epoch, batch, lr, checkpoint } = err else {
        bail!("expected Diverged, got: {message}");
    };
    ensure!((epoch, batch) == (1, 6), "reported epoch {epoch}, batch {batch}; the first bad step is epoch 1, batch 6");
    ensure!(lr == want_lr, "reported learning rate {lr}, the schedule's is {want_lr}");
    ensure!(what.contains("loss") && what.contains("NaN"), "reported {what}");
    ensure!(checkpoint.as_deref() == Some(ckpt.as_path()), "reported checkpoint {checkpoint:?}");
    // The advice must be one a user can follow: resume cannot change the learning rate.
    for needle in
        ["epoch 1, batch 6", "lower learning rate", "`optimizer.lr`", "start a new run", &ckpt.display().to_string()]
    {
        ensure!(message.contains(needle), "the message lacks {needle:?}: {message}");
    }

    // The last good checkpoint is untouched, and training can continue from it.
    ensure!(std::fs::read(&ckpt)? == good, "the checkpoint changed after the non-finite loss");
    ensure!(temporaries(&run, &[])?.is_empty(), "temporary files left: {:?}", temporaries(&run, &[])?);
    let resumed = Trainer::resume(&run, &CPU)?;
    ensure!(resumed.state().global_step == 5, "the checkpoint is at step {}", resumed.state().global_step);
    for t in resumed.model().named_tensors() {
        let finite = t.tensor.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().all(|v| v.is_finite());
        ensure!(finite, "the kept checkpoint holds non-finite values in {}", t.name);
    }

    // Without a run directory the error says where it happened and names no checkpoint.
    let mut bare = Trainer::new(cfg, &CPU)?;
    poison(bare.model(), "7.bias", dir.path())?;
    match bare.fit(&data, &mut Silent) {
        Err(TrainError::Diverged { epoch: 1, batch: 1, checkpoint: None, .. }) => Ok(()),
        other => {
            bail!("expected Diverged at epoch 1, batch 1 without a checkpoint, got {other:?}")
        }
    }
}

/// Makes every later write of `checkpoint.safetensors` fail, once `after_epoch` has ended, by
/// putting a directory where `resnet_core::checkpoint::write_atomic` creates its temporary file
/// (`.checkpoint.safetensors.<pid>.tmp`). Tests run as root here, where a read-only directory
/// does not stop writes; and a read-only directory would fail `metrics.jsonl` first anyway.
struct BlockCheckpoints {
    after_epoch: usize,
    blocker: PathBuf,
    checkpoint: PathBuf,
    /// The checkpoint's bytes when the blocker went up.
    saved: Option<Vec<u8>>,
    failure: Option<String>,
}

impl BlockCheckpoints {
    fn new(run: &Path, after_epoch: usize) -> Self {
        Self {
            after_epoch,
            blocker: run.join(format!(".{}.{}.tmp", files::CHECKPOINT, std::process::id())),
            checkpoint: run.join(files::CHECKPOINT),
            saved: None,
            failure: None,
        }
    }

    fn block(&mut self) {
        self.saved = std::fs::read(&self.checkpoint).ok();
        if let Err(e) = std::fs::create_dir(&self.blocker) {
            self.failure = Some(format!("creating {}: {e}", self.blocker.display()));
        }
    }
}

impl Observer for BlockCheckpoints {
    fn on_epoch_end(&mut self, m: &EpochMetrics) {
        if m.epoch == self.after_epoch {
            self.block();
        }
    }
}

#[test]
fn failed_checkpoint_write_keeps_the_previous_checkpoint() -> Result<()> {
    let data = synthetic_data();
    let cfg = tiny_config();
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let mut blocker = BlockCheckpoints::new(&run, 1);
    let result = trainer.fit(&data, &mut blocker);
    if let Some(f) = &blocker.failure {
        bail!("{f}");
    }
    let message = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
    match result {
        Err(TrainError::CheckpointWrite { path, previous_intact: true, .. }) if path == blocker.checkpoint => {}
        other => {
            bail!("expected CheckpointWrite with the previous checkpoint intact, got {other:?}")
        }
    }
    for needle in ["could not write checkpoint", "the previous checkpoint is intact", &run.display().to_string()] {
        ensure!(message.contains(needle), "the message lacks {needle:?}: {message}");
    }
    let saved = blocker.saved.as_ref().context("no checkpoint existed after epoch 1")?;
    ensure!(std::fs::read(&blocker.checkpoint)? == *saved, "the epoch-1 checkpoint changed");
    let leftovers = temporaries(&run, &[blocker.blocker.as_path()])?;
    ensure!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");

    // The epoch-1 checkpoint still loads, and once the fault is gone the run resumes from it and
    // ends exactly where an undisturbed run does.
    let resumed = Trainer::resume(&run, &CPU)?;
    ensure!(resumed.state().epochs_done == 1, "the kept checkpoint is after epoch {}", resumed.state().epochs_done);
    std::fs::remove_dir(&blocker.blocker)?;
    let mut resumed = resumed;
    resumed.fit(&data, &mut Silent)?;
    let (full, _full_dir) = uninterrupted(&cfg, &data)?;
    ensure_identical(full.model(), resumed.model(), "resumed after a failed checkpoint write")
}

#[test]
fn failed_first_checkpoint_write_says_there_is_no_earlier_one() -> Result<()> {
    let data = synthetic_data();
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let mut blocker = BlockCheckpoints::new(&run, 0);
    blocker.block();
    if let Some(f) = &blocker.failure {
        bail!("{f}");
    }
    let result = trainer.fit(&data, &mut blocker);
    let message = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
    ensure!(
        matches!(result, Err(TrainError::CheckpointWrite { previous_intact: false, .. })),
        "expected CheckpointWrite without an earlier checkpoint, got {result:?}"
    );
    ensure!(message.contains("no earlier checkpoint exists"), "message: {message}");
    ensure!(!blocker.checkpoint.exists(), "a checkpoint appeared although its write failed");
    let leftovers = temporaries(&run, &[blocker.blocker.as_path()])?;
    ensure!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Trustworthy runs (issue 12)

/// A run directory path inside a fresh temporary directory.
fn fresh_run() -> Result<(TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("run");
    Ok((dir, run))
}

#[test]
fn resume_keeps_the_convolution_algorithm() -> Result<()> {
    let data = synthetic_data();
    let cfg = TrainConfig { conv_algorithm: ConvAlgorithm::Im2col, ..tiny_config() };
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    ensure!(trainer.model().conv_algorithm() == ConvAlgorithm::Im2col, "the new model ignores conv_algorithm");
    ensure!(trainer.fit(&data, &mut Recorder::stop_after(3))?.interrupted, "not interrupted");
    let resumed = Trainer::resume(&run, &CPU)?;
    ensure!(
        resumed.model().conv_algorithm() == ConvAlgorithm::Im2col,
        "resumed on {:?}, the run was started with im2col",
        resumed.model().conv_algorithm()
    );
    ensure!(resumed.state().config == cfg, "the resumed configuration differs from the recorded one");
    Ok(())
}

#[test]
fn resume_refuses_other_or_smaller_data() -> Result<()> {
    let data = synthetic_data();
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    ensure!(trainer.fit(&data, &mut Recorder::stop_after(7))?.interrupted, "not interrupted");
    let before = std::fs::read(run.join(files::CHECKPOINT))?;

    let other = FashionMnist { train: Split::synthetic(256, 28, 28, 99), test: data.test.clone() };
    let smaller = FashionMnist { train: data.train.clone().limit(64), test: data.test.clone() };
    let other_test = FashionMnist { train: data.train.clone(), test: Split::synthetic(64, 28, 28, 98) };
    for (what, split, changed) in
        [("training", "training", &other), ("smaller", "training", &smaller), ("test", "test", &other_test)]
    {
        let mut resumed = Trainer::resume(&run, &CPU)?;
        ensure!(
            matches!(resumed.check(changed), Err(TrainError::DataMismatch { split: s, .. }) if s == split),
            "{what}: check accepted other data"
        );
        let result = resumed.fit(changed, &mut Silent);
        let message = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
        ensure!(matches!(result, Err(TrainError::DataMismatch { .. })), "{what}: fit on other data: {result:?}");
        ensure!(message.contains("differs from the data this run was trained on"), "{what}: {message}");
    }
    ensure!(std::fs::read(run.join(files::CHECKPOINT))? == before, "a refused resume changed the checkpoint");
    // The right data still resumes.
    Trainer::resume(&run, &CPU)?.fit(&data, &mut Silent)?;
    Ok(())
}

#[test]
fn a_longer_run_extends_exactly_on_a_constant_schedule_and_is_refused_on_cosine() -> Result<()> {
    let data = synthetic_data();
    let constant = TrainConfig { schedule: Schedule::Constant, warmup_epochs: 0.0, epochs: 1, ..tiny_config() };
    let (_dir, run) = fresh_run()?;
    let mut short = Trainer::new(constant.clone(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    short.fit(&data, &mut Silent)?;
    let mut extended = Trainer::resume(&run, &CPU)?;
    extended.extend_epochs(2)?;
    extended.fit(&data, &mut Silent)?;
    let (full, _full_dir) = uninterrupted(&TrainConfig { epochs: 2, ..constant }, &data)?;
    ensure_identical(full.model(), extended.model(), "a 1-epoch run extended to 2 vs a 2-epoch run")?;
    let recorded: TrainConfig = serde_json::from_slice(&std::fs::read(run.join(files::CONFIG))?)?;
    ensure!(recorded.epochs == 2, "config.json still says {} epochs", recorded.epochs);
    ensure!(epoch_metrics(&metrics_file(&run)?).len() == 2, "metrics.jsonl lacks the second epoch");

    let (_dir2, cosine_run) = fresh_run()?;
    let cosine = TrainConfig { epochs: 1, warmup_epochs: 0.0, ..tiny_config() };
    Trainer::new(cosine, &CPU)?.with_run_dir(RunDir::create(&cosine_run)?)?.fit(&data, &mut Silent)?;
    let mut resumed = Trainer::resume(&cosine_run, &CPU)?;
    match resumed.extend_epochs(2) {
        Err(TrainError::InvalidField { field: "epochs", reason, .. }) if reason.contains("cosine") => {}
        other => bail!("extending a cosine run: {other:?}"),
    }
    ensure!(
        matches!(resumed.extend_epochs(0), Err(TrainError::InvalidField { field: "epochs", .. })),
        "a shorter plan was accepted"
    );
    Ok(())
}

/// Checks, at every checkpoint, that the best file already holds the epoch the checkpoint
/// records as best: the order that keeps the folder consistent after a kill between the writes.
struct CheckBestFirst {
    failures: Vec<String>,
    checked: usize,
}

impl Observer for CheckBestFirst {
    fn on_checkpoint(&mut self, path: &Path) {
        let result = (|| -> Result<()> {
            let state = resnet_train::checkpoint::read(path, &CPU)?.state;
            let best = path.with_file_name(files::BEST);
            let meta = checkpoint::read_metadata(&best).context("best.safetensors is missing")?;
            let epoch = meta.get(resnet_train::checkpoint::SELECTED_EPOCH_KEY).context("no selected_epoch")?;
            ensure!(
                state.best_epoch.map(|e| e.to_string()).as_ref() == Some(epoch),
                "the checkpoint records best epoch {:?}, best.safetensors holds epoch {epoch}",
                state.best_epoch
            );
            Ok(())
        })();
        self.checked += 1;
        if let Err(e) = result {
            self.failures.push(format!("{e:#}"));
        }
    }
}

#[test]
fn the_best_file_is_written_before_the_checkpoint_that_records_it() -> Result<()> {
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let mut check = CheckBestFirst { failures: Vec::new(), checked: 0 };
    trainer.fit(&synthetic_data(), &mut check)?;
    ensure!(check.checked == 3, "{} checkpoints seen", check.checked);
    ensure!(check.failures.is_empty(), "{:?}", check.failures);
    Ok(())
}

#[test]
fn a_plot_failure_costs_no_checkpoint() -> Result<()> {
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    // A directory where the curves go makes every plot write fail.
    std::fs::create_dir(run.join(files::CURVES_PNG))?;
    let report = trainer.fit(&synthetic_data(), &mut Silent)?;
    ensure!(report.last.as_ref().is_some_and(|m| m.epoch == 3), "the run did not finish: {report:?}");
    let resumed = Trainer::resume(&run, &CPU)?;
    ensure!(resumed.state().epochs_done == 3, "the checkpoint is after epoch {}", resumed.state().epochs_done);
    ensure!(epoch_metrics(&metrics_file(&run)?).len() == 3, "metrics.jsonl lacks epochs");
    Ok(())
}

/// Makes one parameter infinite right after the optimiser step `at_step` (1-based, of this `fit`).
struct PoisonAfterStep {
    var: candle_core::Var,
    at_step: usize,
    steps: usize,
    evaluations: usize,
    failure: Option<String>,
}

impl Observer for PoisonAfterStep {
    fn on_step(&mut self, _info: &resnet_train::StepInfo) {
        self.steps += 1;
        if self.steps == self.at_step {
            if let Err(e) = Tensor::full(f32::INFINITY, self.var.dims(), &CPU).and_then(|t| self.var.set(&t)) {
                self.failure = Some(format!("poisoning failed: {e}"));
            }
        }
    }
    fn on_eval_start(&mut self, _epoch: usize) {
        self.evaluations += 1;
    }
}

#[test]
fn weights_made_non_finite_by_an_update_are_never_checkpointed() -> Result<()> {
    let data = synthetic_data();
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let bias = trainer.model().parameters().into_iter().find(|p| p.name == "7.bias").context("no 7.bias")?;
    // The last step of epoch 2: the loss of that step was finite, the weights after it are not.
    let mut poison = PoisonAfterStep {
        var: candle_core::Var::from_tensor(&bias.tensor)?,
        at_step: 2 * STEPS_PER_EPOCH,
        steps: 0,
        evaluations: 0,
        failure: None,
    };
    let result = trainer.fit(&data, &mut poison);
    if let Some(f) = poison.failure {
        bail!("{f}");
    }
    let message = result.as_ref().err().map(ToString::to_string).unwrap_or_default();
    match result {
        Err(TrainError::Diverged { what, epoch: 2, checkpoint: Some(c), .. })
            if what.contains("weights") && c == run.join(files::CHECKPOINT) => {}
        other => bail!("expected divergence of the weights in epoch 2 keeping the checkpoint, got {other:?}"),
    }
    ensure!(message.contains("start a new run"), "{message}");
    ensure!(poison.evaluations == 1, "the non-finite weights were evaluated ({} evaluations)", poison.evaluations);
    let kept = Trainer::resume(&run, &CPU)?;
    ensure!(kept.state().epochs_done == 1, "the checkpoint is after epoch {}", kept.state().epochs_done);
    for t in kept.model().named_tensors() {
        let finite = t.tensor.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?.iter().all(|v| v.is_finite());
        ensure!(finite, "the kept checkpoint holds non-finite values in {}", t.name);
    }
    Ok(())
}

#[test]
fn a_validation_split_chooses_the_best_epoch_and_d2l_says_it_chose_on_test() -> Result<()> {
    let data = synthetic_data();
    for (val_split, selected_on) in [(64, "val_acc"), (0, "test_acc")] {
        let (_dir, run) = fresh_run()?;
        let cfg = TrainConfig { val_split, ..tiny_config() };
        let mut trainer = Trainer::new(cfg, &CPU)?.with_run_dir(RunDir::create(&run)?)?;
        let report = trainer.fit(&data, &mut Silent)?;
        let epochs = epoch_metrics(&metrics_file(&run)?);
        ensure!(epochs.len() == 3, "{} epochs", epochs.len());
        let scores: Vec<f64> = epochs.iter().map(|m| m.val_acc.unwrap_or(m.test_acc)).collect();
        ensure!(epochs.iter().all(|m| m.val_acc.is_some() == (val_split > 0)), "val_acc presence: {epochs:?}");
        // Fewer training examples per epoch with a split: 192 of 256 in 6 steps.
        let want_examples = if val_split > 0 { 192 } else { 256 };
        ensure!(epochs.iter().all(|m| m.examples == want_examples), "examples per epoch: {epochs:?}");
        let best = scores.iter().cloned().fold(f64::MIN, f64::max);
        let best_epoch = scores.iter().position(|&s| s == best).map(|i| i + 1);
        ensure!(trainer.state().best_acc == Some(best) && trainer.state().best_epoch == best_epoch, "best {scores:?}");
        let meta = checkpoint::read_metadata(&run.join(files::BEST))?;
        ensure!(meta.get("selected_on").map(String::as_str) == Some(selected_on), "metadata {meta:?}");
        ensure!(meta.get("selected_epoch") == best_epoch.map(|e| e.to_string()).as_ref(), "metadata {meta:?}");
        ensure!(report.best.map(|b| b.0) == best_epoch, "report {report:?}");
        let text = std::fs::read_to_string(run.join(files::METRICS))?;
        ensure!(text.contains("\"val_acc\"") == (val_split > 0), "metrics.jsonl and val_acc:\n{text}");
    }
    Ok(())
}

#[test]
fn patience_stops_and_records_why() -> Result<()> {
    let data = synthetic_data();
    let (_dir, run) = fresh_run()?;
    // A rate too small to move the weights: validation accuracy stops improving at once.
    let cfg = TrainConfig {
        epochs: 12,
        val_split: 64,
        patience: Some(2),
        schedule: Schedule::Constant,
        warmup_epochs: 0.0,
        optimizer: SgdConfig { lr: 1e-7, momentum: 0.0, nesterov: false, weight_decay: 0.0 },
        ..tiny_config()
    };
    let mut trainer = Trainer::new(cfg, &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let report = trainer.fit(&data, &mut Silent)?;
    let stop = report.early_stop.clone().context("no early stop in 12 epochs at a rate of 1e-7")?;
    ensure!(stop.epoch - stop.best_epoch == 2 && stop.patience == 2, "{stop:?}");
    let records = metrics_file(&run)?;
    ensure!(records.last() == Some(&MetricsRecord::EarlyStop(stop.clone())), "last record {:?}", records.last());
    let epochs = epoch_metrics(&records);
    ensure!(epochs.len() == stop.epoch, "{} epochs trained, stopped at {}", epochs.len(), stop.epoch);
    let line = std::fs::read_to_string(run.join(files::METRICS))?;
    ensure!(line.lines().last().is_some_and(|l| l.starts_with("{\"kind\":\"early_stop\",\"epoch\":")), "{line}");
    // A resumed run has nothing left to do.
    let mut resumed = Trainer::resume(&run, &CPU)?;
    let again = resumed.fit(&data, &mut Silent)?;
    ensure!(again.early_stop == Some(stop), "resumed: {again:?}");
    ensure!(epoch_metrics(&metrics_file(&run)?).len() == epochs.len(), "the resumed run trained on");
    Ok(())
}

#[test]
fn a_tail_of_one_example_is_dropped_not_fatal() -> Result<()> {
    // 225 = 7 × 32 + 1: the last batch of each epoch would hold one example.
    let data = FashionMnist { train: synthetic_data().train.limit(225), test: synthetic_data().test };
    let cfg = TrainConfig { epochs: 2, ..tiny_config() };
    let mut recorder = Recorder::default();
    let report = Trainer::new(cfg.clone(), &CPU)?.fit(&data, &mut recorder)?;
    ensure!(recorder.steps.iter().all(|s| s.batches == 7), "steps per epoch: {:?}", recorder.steps.last());
    ensure!(report.last.as_ref().is_some_and(|m| m.examples == 224 && m.train_loss.is_finite()), "{report:?}");
    // Micro-batches never leave one example alone either: 33 = 16 + 17.
    let micro = TrainConfig { micro_batch: Some(16), ..cfg };
    let batch = Split::synthetic(33, 28, 28, 3);
    let pixels: Vec<f32> = batch.images.iter().map(|&p| p as f32 / 255.0).collect();
    let images = Tensor::from_vec(pixels, (33, 1, 28, 28), &CPU)?;
    let labels = Tensor::from_vec(batch.labels.iter().map(|&l| l as u32).collect::<Vec<_>>(), 33, &CPU)?;
    let (loss, _) = Trainer::new(micro, &CPU)?.train_batch(&images, &labels, 0.05)?;
    ensure!(loss.is_finite(), "loss {loss}");
    Ok(())
}

/// Asks to stop while the final epoch is being evaluated.
struct StopDuringLastEvaluation {
    last_epoch: usize,
    asked: bool,
}

impl Observer for StopDuringLastEvaluation {
    fn on_eval_start(&mut self, epoch: usize) {
        self.asked |= epoch == self.last_epoch;
    }
    fn should_stop(&mut self) -> bool {
        self.asked
    }
}

#[test]
fn a_stop_in_an_epoch_s_last_step_skips_its_evaluation_and_the_final_epoch_reports_it() -> Result<()> {
    let data = synthetic_data();
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let mut recorder = Recorder::stop_after(STEPS_PER_EPOCH);
    let report = trainer.fit(&data, &mut recorder)?;
    ensure!(report.interrupted, "not interrupted");
    ensure!(recorder.epochs.is_empty(), "the evaluation ran after the stop: {:?}", recorder.epochs);
    let mut resumed = Trainer::resume(&run, &CPU)?;
    ensure!(resumed.state().batches_done == STEPS_PER_EPOCH, "{:?}", resumed.state().batches_done);
    let mut last = StopDuringLastEvaluation { last_epoch: 3, asked: false };
    let report = resumed.fit(&data, &mut last)?;
    ensure!(report.interrupted, "a stop during the final epoch was not reported (the CLI exits 130 on it)");
    ensure!(report.last.as_ref().is_some_and(|m| m.epoch == 3), "{report:?}");
    // The interrupted run, resumed, equals an uninterrupted one.
    let (full, _full_dir) = uninterrupted(&tiny_config(), &data)?;
    ensure_identical(full.model(), resumed.model(), "stopped in the last step of epoch 1, resumed")
}

#[test]
fn a_stale_temporary_file_is_swept_when_a_run_resumes() -> Result<()> {
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    trainer.fit(&synthetic_data(), &mut Recorder::stop_after(2))?;
    // What a kill -9 during a checkpoint write leaves: a torn temporary of a process now gone.
    let torn = run.join(format!(".{}.{}.tmp", files::CHECKPOINT, u32::MAX - 1));
    std::fs::write(&torn, b"torn half of a checkpoint")?;
    Trainer::resume(&run, &CPU)?;
    ensure!(!torn.exists(), "the stale temporary was left");
    Ok(())
}

#[test]
fn best_files_hold_only_what_pytorch_s_strict_loading_accepts() -> Result<()> {
    // README says best.safetensors loads into the book's `net` with a strict load_state_dict;
    // checkpoint.safetensors also holds the optimiser's `train.` tensors, so it does not.
    let (_dir, run) = fresh_run()?;
    let mut trainer = Trainer::new(tiny_config(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    trainer.fit(&synthetic_data(), &mut Silent)?;
    let best = candle_core::safetensors::load(run.join(files::BEST), &CPU)?;
    let names: BTreeSet<String> = trainer.model().named_tensors().into_iter().map(|t| t.name).collect();
    ensure!(best.keys().cloned().collect::<BTreeSet<_>>() == names, "best.safetensors holds other tensors");
    let ckpt = candle_core::safetensors::load(run.join(files::CHECKPOINT), &CPU)?;
    ensure!(ckpt.keys().any(|k| k.starts_with("train.momentum.")), "the checkpoint lacks momentum buffers");
    Ok(())
}

/// A run with flip test-time augmentation reports the accuracy `evaluate` gives its final
/// weights with flips, and every test-accuracy milestone is recorded once, right after the first
/// epoch that reaches it, with the summed wall time of the epochs so far.
#[test]
fn milestones_and_flip_tta_are_recorded_as_evaluated() -> Result<()> {
    let data = synthetic_data();
    let (_dir, run) = fresh_run()?;
    let cfg = TrainConfig { tta_hflip: true, epochs: 8, augment: None, ..tiny_config() };
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?.with_run_dir(RunDir::create(&run)?)?;
    let report = trainer.fit(&data, &mut Silent)?;
    let records = metrics_file(&run)?;
    let epochs = epoch_metrics(&records);
    let last = epochs.last().context("no epochs")?;
    let loader = resnet_train::loader_config(&cfg, false);
    let with_tta = resnet_train::evaluate(trainer.model(), &data.test, &loader, &CPU, true)?.accuracy();
    ensure!(last.test_acc == with_tta, "printed {} but evaluate with flips gives {with_tta}", last.test_acc);
    let mut want = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let MetricsRecord::Epoch(m) = record else { continue };
        let before = epochs.iter().take_while(|e| e.epoch < m.epoch).map(|e| e.test_acc).fold(f64::MIN, f64::max);
        let wall: f64 = epochs.iter().take_while(|e| e.epoch <= m.epoch).map(|e| e.wall_seconds).sum();
        for &t in ACCURACY_MILESTONES.iter().filter(|&&t| m.test_acc >= t && before < t) {
            want.push((i, TimeToAccuracy { test_acc: t, epoch: m.epoch, wall_seconds: wall }));
        }
    }
    ensure!(!want.is_empty(), "the run reached no milestone (test accuracies {epochs:?}), so nothing was checked");
    let got: Vec<(usize, TimeToAccuracy)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| if let MetricsRecord::TimeToAccuracy(t) = r { Some((i, t.clone())) } else { None })
        .collect();
    ensure!(got.len() == want.len(), "milestone records {got:?}, expected {want:?}");
    for ((gi, g), (wi, w)) in got.iter().zip(&want) {
        ensure!(g == w, "milestone {g:?}, expected {w:?}");
        // Right after its epoch record, after any milestones of the same epoch.
        ensure!(*gi > *wi && records[*wi + 1..*gi].iter().all(|r| matches!(r, MetricsRecord::TimeToAccuracy(_))));
    }
    ensure!(report.time_to_accuracy == got.into_iter().map(|g| g.1).collect::<Vec<_>>(), "report {report:?}");
    let meta = checkpoint::read_metadata(&run.join(files::BEST))?;
    ensure!(meta.get("eval_tta_hflip").map(String::as_str) == Some("true"), "best metadata {meta:?}");
    Ok(())
}
