//! `resnet-cli train`: preset + flags → `TrainConfig` → `Trainer::fit`, then d2l's closing lines.

use anyhow::{Context, Result};
use resnet_train::{Preset, RunDir, SelectedOn, TrainError, Trainer};

use super::Outcome;
use crate::args::{ConfigFlags, TrainArgs};
use crate::{device, progress::Progress};

/// Runs the command.
pub fn run(a: TrainArgs) -> Result<Outcome> {
    let device = device::select(&a.device)?;
    let (data, data_dir) = resnet_data::load_default(a.data_dir.as_deref())?;
    tracing::info!("Fashion-MNIST from {}", data_dir.display());
    let mut trainer = match &a.resume {
        Some(dir) => {
            let mut t = Trainer::resume(dir, &device)
                .map_err(with_flags)
                .with_context(|| format!("resuming {}", dir.display()))?;
            if let Some(epochs) = a.epochs {
                t.extend_epochs(epochs).map_err(with_flags)?;
            }
            t.check(&data).map_err(with_flags).with_context(|| format!("resuming {}", dir.display()))?;
            eprintln!(
                "resuming {} after epoch {} (batch {})",
                dir.display(),
                t.state().epochs_done,
                t.state().batches_done
            );
            t
        }
        None => {
            let preset = Preset::from(a.preset);
            let mut cfg = a.config.apply(&a.fields, preset);
            if let Some(epochs) = a.epochs {
                cfg.epochs = epochs;
            }
            // Everything that can fail before training runs before the run directory exists.
            let trainer = Trainer::new(cfg, &device).map_err(with_flags)?;
            trainer.check(&data).map_err(with_flags)?;
            let dir = match &a.out {
                Some(out) => RunDir::create(out),
                None => RunDir::fresh_under(std::path::Path::new("runs"), preset.name()),
            }
            .map_err(with_flags)?;
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
    let report = trainer.fit(&data, &mut progress).map_err(with_flags)?;
    if report.interrupted {
        eprintln!("interrupted; checkpoint written. Continue with: resnet-cli train --resume {}", dir_of(&trainer));
        return Ok(Outcome::Interrupted);
    }
    if let Some(stop) = &report.early_stop {
        eprintln!(
            "stopped early after epoch {}: validation accuracy has not improved for {} epochs since epoch {} ({:.3})",
            stop.epoch, stop.patience, stop.best_epoch, stop.best_val_acc
        );
    }
    if let Some(m) = &report.last {
        match m.val_acc {
            Some(v) => {
                println!(
                    "loss {:.3}, train acc {:.3}, val acc {v:.3}, test acc {:.3}",
                    m.train_loss, m.train_acc, m.test_acc
                )
            }
            None => println!("loss {:.3}, train acc {:.3}, test acc {:.3}", m.train_loss, m.train_acc, m.test_acc),
        }
        println!("{:.1} examples/sec on {}", report.examples_per_sec, device::label(&device));
    }
    for t in &report.time_to_accuracy {
        println!(
            "test acc {:.2} first reached after epoch {}, {:.1} min of training and evaluation",
            t.test_acc,
            t.epoch,
            t.wall_seconds / 60.0
        );
    }
    if let Some((epoch, acc, on)) = report.best {
        let how = match on {
            SelectedOn::ValAcc => format!("validation accuracy {acc:.3}"),
            SelectedOn::TestAcc => format!("test accuracy {acc:.3}, so its test accuracy is optimistic"),
        };
        eprintln!("best.safetensors holds epoch {epoch}, chosen on {how}");
    }
    println!("run directory: {}", dir_of(&trainer));
    Ok(Outcome::Done)
}

fn dir_of(trainer: &Trainer) -> String {
    trainer.run_dir().map(|p| p.display().to_string()).unwrap_or_else(|| "(none)".into())
}

/// The library names configuration fields (`optimizer.lr`); users know the flags (`--lr`).
fn with_flags(e: TrainError) -> anyhow::Error {
    match &e {
        TrainError::RunExists { path } => anyhow::anyhow!(
            "{} already holds a run; continue it with `resnet-cli train --resume {}`, or choose another --out",
            path.display(),
            path.display()
        ),
        TrainError::NotEmpty { .. } => anyhow::anyhow!("--out: {e}"),
        _ => anyhow::anyhow!(ConfigFlags::name_flags(&e.to_string())),
    }
}
