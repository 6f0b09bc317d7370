//! Learning-rate schedules: constant, step, cosine, each with an optional linear warm-up.

use crate::config::{Schedule, TrainConfig};

/// The learning rate at any point of training, as a pure function of the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    peak: f64,
    schedule: Schedule,
    warmup_steps: f64,
    steps_per_epoch: usize,
    total_steps: usize,
}

impl LrSchedule {
    /// The schedule for `cfg` with `steps_per_epoch` optimiser steps per epoch.
    pub fn new(cfg: &TrainConfig, steps_per_epoch: usize) -> Self {
        let steps_per_epoch = steps_per_epoch.max(1);
        Self {
            peak: cfg.optimizer.lr,
            schedule: cfg.schedule,
            warmup_steps: cfg.warmup_epochs * steps_per_epoch as f64,
            steps_per_epoch,
            total_steps: cfg.epochs * steps_per_epoch,
        }
    }

    /// The rate for 0-based optimiser step `step`.
    pub fn lr(&self, step: usize) -> f64 {
        let s = step as f64;
        if s < self.warmup_steps {
            return self.peak * (s + 1.0) / self.warmup_steps.ceil().max(1.0);
        }
        match self.schedule {
            Schedule::Constant => self.peak,
            Schedule::Step { every_epochs, gamma } => {
                let epoch = step / self.steps_per_epoch;
                self.peak * gamma.powi((epoch / every_epochs.max(1)) as i32)
            }
            Schedule::Cosine => {
                let span = (self.total_steps as f64 - self.warmup_steps).max(1.0);
                let t = ((s - self.warmup_steps) / span).clamp(0.0, 1.0);
                0.5 * self.peak * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule, warmup: f64) -> TrainConfig {
        TrainConfig { schedule, warmup_epochs: warmup, epochs: 4, ..TrainConfig::d2l() }
    }

    #[test]
    fn schedule_points() {
        let c = LrSchedule::new(&cfg(Schedule::Constant, 0.0), 10);
        assert_eq!((c.lr(0), c.lr(39)), (0.05, 0.05));
        let s = LrSchedule::new(&cfg(Schedule::Step { every_epochs: 2, gamma: 0.1 }, 0.0), 10);
        assert_eq!(s.lr(19), 0.05);
        assert!((s.lr(20) - 0.005).abs() < 1e-12);
        let cos = LrSchedule::new(&cfg(Schedule::Cosine, 0.0), 10);
        assert_eq!(cos.lr(0), 0.05);
        assert!((cos.lr(20) - 0.025).abs() < 1e-12, "half-way is half the peak");
        assert!(cos.lr(39) < 0.001 && cos.lr(39) > 0.0);
        let w = LrSchedule::new(&cfg(Schedule::Cosine, 1.0), 10);
        assert!((w.lr(0) - 0.005).abs() < 1e-12 && (w.lr(9) - 0.05).abs() < 1e-12, "linear warm-up over 10 steps");
        assert!(w.lr(10) <= 0.05 && w.lr(10) > 0.049);
    }
}
