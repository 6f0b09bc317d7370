//! Rendering training progress: a bar with ETA in a terminal, plain lines otherwise; Ctrl-C.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use resnet_train::{EpochMetrics, Observer, StepInfo};

/// The CLI's observer.
pub struct Progress {
    bar: Option<ProgressBar>,
    terminal: bool,
    stop: Arc<AtomicBool>,
    last_logged: usize,
}

impl Progress {
    /// Installs a Ctrl-C handler that asks training to stop after the current step.
    pub fn new() -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                // A second Ctrl-C: the user really wants out now.
                std::process::exit(130);
            }
            eprintln!("\nCtrl-C: finishing the current step and writing a checkpoint (Ctrl-C again to abort)");
        })?;
        Ok(Self { bar: None, terminal: std::io::stderr().is_terminal(), stop, last_logged: 0 })
    }
}

impl Observer for Progress {
    fn on_epoch_start(&mut self, epoch: usize, batches: usize) {
        self.last_logged = 0;
        if self.terminal {
            let bar = ProgressBar::new(batches as u64);
            bar.set_style(
                ProgressStyle::with_template("epoch {prefix} {bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_prefix(epoch.to_string());
            self.bar = Some(bar);
        }
    }

    fn on_step(&mut self, s: &StepInfo) {
        let msg = format!("loss {:.3}, train acc {:.3}, lr {:.4}", s.train_loss, s.train_acc, s.lr);
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(msg);
            }
            None => {
                // About ten lines per epoch when not on a terminal (logs, CI).
                let every = (s.batches / 10).max(1);
                if s.batch % every == 0 || s.batch == s.batches {
                    eprintln!("epoch {}/{} batch {}/{}: {msg}", s.epoch, s.epochs, s.batch, s.batches);
                    self.last_logged = s.batch;
                }
            }
        }
    }

    fn on_eval_start(&mut self, _epoch: usize) {
        if let Some(bar) = &self.bar {
            bar.set_message("evaluating");
        }
    }

    fn on_epoch_end(&mut self, m: &EpochMetrics) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let val = m.val_acc.map(|v| format!(", val acc {v:.3}")).unwrap_or_default();
        eprintln!(
            "epoch {}: loss {:.3}, train acc {:.3}{val}, test acc {:.3}, {:.1} examples/sec, {:.0} s",
            m.epoch, m.train_loss, m.train_acc, m.test_acc, m.examples_per_sec, m.wall_seconds
        );
    }

    fn on_checkpoint(&mut self, path: &Path) {
        tracing::info!("checkpoint written to {}", path.display());
    }

    fn should_stop(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}
