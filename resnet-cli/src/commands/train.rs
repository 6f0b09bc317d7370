//! `resnet-cli train`: preset + flags → `TrainConfig` → `Trainer::fit`, then d2l's closing lines.

use anyhow::{bail, Context, Result};
use resnet_train::{AugmentConfig, Precision, RunDir, Schedule, TrainConfig, Trainer};

use super::{apply_model_args, Outcome};
use crate::args::{KernelArg, PrecisionArg, ScheduleArg, TrainArgs};
use crate::{device, progress::Progress};

/// Runs the command.
pub fn run(a: TrainArgs) -> Result<Outcome> {
    let device = device::select(&a.device)?;
    let (data, data_dir) = resnet_data::load_default(a.data_dir.as_deref())?;
    tracing::info!("Fashion-MNIST from {}", data_dir.display());
    let mut trainer = match &a.resume {
        Some(dir) => {
            if a.out.is_some() {
                bail!("--resume continues the run in its own directory; drop --out");
            }
            let overrides = overriding_flags(&a);
            if !overrides.is_empty() {
                bail!(
                    "--resume continues the run with the configuration it was started with; drop {}",
                    overrides.join(", ")
                );
            }
            let t = Trainer::resume(dir, &device).with_context(|| format!("resuming {}", dir.display()))?;
            eprintln!(
                "resuming {} after epoch {} (batch {})",
                dir.display(),
                t.state().epochs_done,
                t.state().batches_done
            );
            t
        }
        None => {
            let cfg = config(&a)?;
            // The trainer first: a setting the device refuses must not leave a run directory.
            let trainer = Trainer::new(cfg, &device)?;
            let dir = match &a.out {
                Some(out) => RunDir::create(out)?,
                None => RunDir::fresh_under(std::path::Path::new("runs"), a.preset.name())?,
            };
            trainer.with_run_dir(dir)?
        }
    };
    let cfg = trainer.state().config.clone();
    eprintln!(
        "training ResNet-{} (width {}, {} parameters) at {} px, batch {}, {} epochs on {}; run directory {}",
        cfg.model.depth.layers(),
        cfg.model.base_width,
        trainer.model().num_parameters(),
        cfg.resize,
        cfg.batch_size,
        cfg.epochs,
        device::label(&device),
        dir_of(&trainer),
    );
    let mut progress = Progress::new()?;
    let report = trainer.fit(&data, &mut progress)?;
    if report.interrupted {
        eprintln!("interrupted; checkpoint written. Continue with: resnet-cli train --resume {}", dir_of(&trainer));
        return Ok(Outcome::Interrupted);
    }
    if let Some(m) = &report.last {
        println!("loss {:.3}, train acc {:.3}, test acc {:.3}", m.train_loss, m.train_acc, m.test_acc);
        println!("{:.1} examples/sec on {}", report.examples_per_sec, device::label(&device));
    }
    println!("run directory: {}", dir_of(&trainer));
    Ok(Outcome::Done)
}

fn dir_of(trainer: &Trainer) -> String {
    trainer.run_dir().map(|p| p.display().to_string()).unwrap_or_else(|| "(none)".into())
}

/// Training flags that were given (they would change the configuration).
fn overriding_flags(a: &TrainArgs) -> Vec<&'static str> {
    let m = &a.model;
    [
        ("--epochs", a.epochs.is_some()),
        ("--lr", a.lr.is_some()),
        ("--batch-size", a.batch_size.is_some()),
        ("--micro-batch", a.micro_batch.is_some()),
        ("--resize", a.resize.is_some()),
        ("--seed", a.seed.is_some()),
        ("--limit-train", a.limit_train.is_some()),
        ("--limit-test", a.limit_test.is_some()),
        ("--momentum", a.momentum.is_some()),
        ("--nesterov", a.nesterov.is_some()),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--schedule", a.schedule.is_some()),
        ("--warmup-epochs", a.warmup_epochs.is_some()),
        ("--label-smoothing", a.label_smoothing.is_some()),
        ("--crop-padding", a.crop_padding.is_some()),
        ("--hflip", a.hflip.is_some()),
        ("--normalize", a.normalize.is_some()),
        ("--eval-batch-size", a.eval_batch_size.is_some()),
        ("--workers", a.workers.is_some()),
        ("--conv-kernel", a.conv_kernel.is_some()),
        ("--precision", a.precision.is_some()),
        ("--tf32", a.tf32),
        ("--init-weights", a.init_weights.is_some()),
        ("--depth", m.depth.is_some()),
        ("--variant", m.variant.is_some()),
        ("--width", m.width.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, set)| set.then_some(name))
    .collect()
}

/// The preset with every given flag applied on top.
fn config(a: &TrainArgs) -> Result<TrainConfig> {
    let mut c = TrainConfig::preset(a.preset.name()).context("unknown preset")?;
    apply_model_args(&mut c.model, &a.model)?;
    if let Some(v) = a.epochs {
        c.epochs = v;
    }
    if let Some(v) = a.lr {
        c.optimizer.lr = v;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v;
    }
    if a.micro_batch.is_some() {
        c.micro_batch = a.micro_batch;
    }
    if let Some(v) = a.resize {
        c.resize = v;
    }
    if let Some(v) = a.seed {
        c.seed = v;
    }
    if a.limit_train.is_some() {
        c.limit_train = a.limit_train;
    }
    if a.limit_test.is_some() {
        c.limit_test = a.limit_test;
    }
    if let Some(v) = a.momentum {
        c.optimizer.momentum = v;
        if v == 0.0 {
            c.optimizer.nesterov = false;
        }
    }
    if let Some(v) = a.nesterov {
        c.optimizer.nesterov = v;
    }
    if let Some(v) = a.weight_decay {
        c.optimizer.weight_decay = v;
    }
    if let Some(s) = a.schedule {
        c.schedule = match s {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Cosine => Schedule::Cosine,
            ScheduleArg::Step => Schedule::Step { every_epochs: a.step_epochs, gamma: a.step_gamma },
        };
    }
    if let Some(v) = a.warmup_epochs {
        c.warmup_epochs = v;
    }
    if let Some(v) = a.label_smoothing {
        c.label_smoothing = v;
    }
    if a.crop_padding.is_some() || a.hflip.is_some() {
        let base = c.augment.unwrap_or(AugmentConfig { crop_padding: 0, hflip: false });
        let aug = AugmentConfig {
            crop_padding: a.crop_padding.unwrap_or(base.crop_padding),
            hflip: a.hflip.unwrap_or(base.hflip),
        };
        c.augment = (aug.crop_padding > 0 || aug.hflip).then_some(aug);
    }
    if let Some(v) = a.normalize {
        c.normalize = v;
    }
    if let Some(v) = a.eval_batch_size {
        c.eval_batch_size = v;
    }
    if let Some(v) = a.workers {
        c.data_workers = v;
    }
    if let Some(k) = a.conv_kernel {
        c.model.conv_kernel = match k {
            KernelArg::Winograd => resnet_core::ConvKernel::Winograd,
            KernelArg::Im2col => resnet_core::ConvKernel::Im2col,
            KernelArg::Candle => resnet_core::ConvKernel::Candle,
        };
    }
    if let Some(p) = a.precision {
        c.precision = match p {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
            PrecisionArg::F16 => Precision::F16,
        };
    }
    c.tf32 |= a.tf32;
    if a.init_weights.is_some() {
        c.init_weights.clone_from(&a.init_weights);
    }
    c.validate()?;
    Ok(c)
}
