//! Metrics as d2l's `train_ch6` computes them, and the confusion matrix for evaluation.

use serde::{Deserialize, Serialize};

/// Running sums over part of an epoch: d2l's `Accumulator(3)` of loss·n, correct, n.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Running {
    /// Σ (batch mean loss × batch size).
    pub loss_sum: f64,
    /// Correct predictions of the training-mode forward.
    pub correct: u64,
    /// Examples seen.
    pub examples: u64,
    /// Seconds spent in training steps (copy, forward, backward, update, metric sync).
    pub step_seconds: f64,
    /// Wall-clock seconds of this epoch spent before an interruption (Ctrl-C), so a resumed
    /// epoch's `wall_seconds` counts both parts.
    #[serde(default)]
    pub wall_seconds: f64,
}

impl Running {
    /// Adds one batch.
    pub fn add(&mut self, mean_loss: f64, correct: u64, examples: u64, seconds: f64) {
        self.loss_sum += mean_loss * examples as f64;
        self.correct += correct;
        self.examples += examples;
        self.step_seconds += seconds;
    }

    /// Per-example mean loss.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.examples.max(1) as f64
    }

    /// Training accuracy.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.examples.max(1) as f64
    }
}

/// One line of `metrics.jsonl`: a point within an epoch (about five per epoch, as d2l plots) or
/// an epoch's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsRecord {
    /// A point within an epoch, from the running sums since the epoch began.
    Step {
        /// Position in epochs (e.g. 2.4 = 40 % through the third epoch).
        epoch: f64,
        /// Running train loss.
        train_loss: f64,
        /// Running train accuracy.
        train_acc: f64,
        /// Learning rate at that step.
        lr: f64,
    },
    /// The end of an epoch.
    Epoch(EpochMetrics),
    /// Training stopped before its planned epochs because validation accuracy stopped improving.
    EarlyStop(EarlyStop),
    /// The first epoch whose test accuracy reached one of [`ACCURACY_MILESTONES`].
    TimeToAccuracy(TimeToAccuracy),
}

/// Test accuracies whose first attainment a run records as [`MetricsRecord::TimeToAccuracy`].
pub const ACCURACY_MILESTONES: [f64; 3] = [0.90, 0.93, 0.95];

/// When a run first reached a test accuracy: in `metrics.jsonl` as
/// `{"kind":"time_to_accuracy","test_acc":0.93,"epoch":4,"wall_seconds":812.5}`, written right
/// after that epoch's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimeToAccuracy {
    /// The milestone reached (one of [`ACCURACY_MILESTONES`]).
    pub test_acc: f64,
    /// The first epoch (1-based) whose test accuracy was at least the milestone.
    pub epoch: usize,
    /// Wall-clock seconds from the start of training to the end of that epoch's evaluation: the
    /// sum of the epochs' `wall_seconds` (data, steps and evaluation; start-up and file writes
    /// excluded).
    pub wall_seconds: f64,
}

/// The milestones `history` reaches with its latest epoch record that no earlier epoch reached,
/// as records to append after it.
pub fn new_milestones(history: &[MetricsRecord]) -> Vec<TimeToAccuracy> {
    let epochs: Vec<&EpochMetrics> =
        history.iter().filter_map(|r| if let MetricsRecord::Epoch(m) = r { Some(m) } else { None }).collect();
    let Some((last, before)) = epochs.split_last() else {
        return Vec::new();
    };
    let best_before = before.iter().map(|m| m.test_acc).fold(f64::NEG_INFINITY, f64::max);
    let wall_seconds = epochs.iter().map(|m| m.wall_seconds).sum();
    ACCURACY_MILESTONES
        .iter()
        .filter(|&&t| last.test_acc >= t && best_before < t)
        .map(|&test_acc| TimeToAccuracy { test_acc, epoch: last.epoch, wall_seconds })
        .collect()
}

/// Why and where training stopped early (`patience`): in `metrics.jsonl` as
/// `{"kind":"early_stop","epoch":7,"best_epoch":4,"best_val_acc":0.91,"patience":3}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStop {
    /// The last epoch trained (1-based).
    pub epoch: usize,
    /// The epoch with the best validation accuracy, whose weights `best.safetensors` holds.
    pub best_epoch: usize,
    /// That validation accuracy.
    pub best_val_acc: f64,
    /// Epochs without improvement that were allowed.
    pub patience: usize,
}

/// What one epoch achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based epoch.
    pub epoch: usize,
    /// Per-example mean training loss over the epoch.
    pub train_loss: f64,
    /// Training accuracy over the epoch (training-mode forward, pre-update weights).
    pub train_acc: f64,
    /// Test accuracy in evaluation mode over the whole (possibly limited) test set.
    pub test_acc: f64,
    /// Accuracy on the held-out validation examples, when the run has a validation split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_acc: Option<f64>,
    /// Examples per second of training-step time, d2l's measure.
    pub examples_per_sec: f64,
    /// Training examples in the epoch.
    pub examples: u64,
    /// Seconds of training-step time in the epoch.
    pub step_seconds: f64,
    /// Wall-clock seconds of the whole epoch, data and evaluation included.
    pub wall_seconds: f64,
    /// Learning rate at the epoch's last step.
    pub lr: f64,
}

/// A confusion matrix: `counts[true][predicted]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Counts by true class (rows) and predicted class (columns).
    pub counts: Vec<Vec<u64>>,
}

impl Confusion {
    /// An empty matrix for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Self { counts: vec![vec![0; classes]; classes] }
    }

    /// Records predictions; labels or predictions out of range are ignored.
    pub fn add(&mut self, labels: &[u32], predictions: &[u32]) {
        for (&t, &p) in labels.iter().zip(predictions) {
            if let Some(cell) = self.counts.get_mut(t as usize).and_then(|r| r.get_mut(p as usize)) {
                *cell += 1;
            }
        }
    }

    /// Examples recorded.
    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// Overall accuracy.
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.counts.len()).map(|i| self.counts[i][i]).sum();
        correct as f64 / self.total().max(1) as f64
    }

    /// Accuracy per true class (`None` for a class with no examples).
    pub fn per_class(&self) -> Vec<Option<f64>> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let n: u64 = row.iter().sum();
                (n > 0).then(|| row[i] as f64 / n as f64)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_sums_follow_train_ch6() {
        let mut r = Running::default();
        r.add(2.0, 3, 4, 0.5);
        r.add(1.0, 1, 2, 0.25);
        assert!((r.loss() - 10.0 / 6.0).abs() < 1e-12);
        assert!((r.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(r.step_seconds, 0.75);
    }

    fn epoch(epoch: usize, test_acc: f64) -> MetricsRecord {
        MetricsRecord::Epoch(EpochMetrics {
            epoch,
            train_loss: 0.5,
            train_acc: 0.8,
            test_acc,
            val_acc: None,
            examples_per_sec: 100.0,
            examples: 100,
            step_seconds: 1.0,
            wall_seconds: 10.0 * epoch as f64,
            lr: 0.1,
        })
    }

    #[test]
    fn milestones_are_recorded_once_at_their_first_epoch() {
        let mut h = vec![epoch(1, 0.85)];
        assert!(new_milestones(&h).is_empty());
        h.push(epoch(2, 0.931));
        // Epoch 2 passes 0.90 and 0.93 at once; wall time is the sum over epochs (10 + 20).
        let got = new_milestones(&h);
        assert_eq!(
            got,
            vec![
                TimeToAccuracy { test_acc: 0.90, epoch: 2, wall_seconds: 30.0 },
                TimeToAccuracy { test_acc: 0.93, epoch: 2, wall_seconds: 30.0 },
            ]
        );
        h.extend(got.into_iter().map(MetricsRecord::TimeToAccuracy));
        // A dip and a recovery reach nothing new; 0.95 is reached at epoch 5 after 150 s.
        h.push(epoch(3, 0.89));
        assert!(new_milestones(&h).is_empty());
        h.push(epoch(4, 0.935));
        assert!(new_milestones(&h).is_empty());
        h.push(epoch(5, 0.95));
        assert_eq!(new_milestones(&h), vec![TimeToAccuracy { test_acc: 0.95, epoch: 5, wall_seconds: 150.0 }]);
        assert!(new_milestones(&[]).is_empty());
    }

    #[test]
    fn confusion_arithmetic() {
        let mut c = Confusion::new(3);
        c.add(&[0, 0, 1, 2, 2, 7], &[0, 1, 1, 2, 0, 0]);
        assert_eq!(c.total(), 5);
        assert!((c.accuracy() - 3.0 / 5.0).abs() < 1e-12);
        assert_eq!(c.per_class(), vec![Some(0.5), Some(1.0), Some(0.5)]);
        assert_eq!(Confusion::new(2).per_class(), vec![None, None]);
    }
}
