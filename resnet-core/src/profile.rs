//! Wall-clock time per op and tensor shape, for finding where a training step goes.
//!
//! Off by default, and then a span costs one atomic load. [`enable`] turns it on for the
//! process; every custom op of this crate then records its CPU kernel's time under its name
//! and its first input's shape, and callers can add spans of their own (the trainer marks its
//! forward, backward and optimiser phases). [`report`] then sums them up; the benchmark
//! prints it after its timed windows when asked to profile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TIMES: Mutex<Option<HashMap<String, (f64, u64)>>> = Mutex::new(None);

/// Turns recording on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans are being recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A running span; its time is recorded when it is dropped.
#[derive(Debug)]
pub struct Span {
    key: String,
    start: Instant,
}

/// Starts a span named `name` for an input of shape `dims`, or nothing while recording is off.
pub fn span(name: &str, dims: &[usize]) -> Option<Span> {
    enabled().then(|| Span { key: format!("{name} {dims:?}"), start: Instant::now() })
}

impl Drop for Span {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
        let entry = times.get_or_insert_with(HashMap::new).entry(std::mem::take(&mut self.key)).or_insert((0.0, 0));
        entry.0 += secs;
        entry.1 += 1;
    }
}

/// One line of the profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Span name and input shape.
    pub key: String,
    /// Total seconds.
    pub seconds: f64,
    /// Number of spans.
    pub calls: u64,
}

/// Takes the recorded times (clearing them), slowest first.
pub fn take() -> Vec<Entry> {
    let times = TIMES.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    let mut entries: Vec<Entry> =
        times.into_iter().map(|(key, (seconds, calls))| Entry { key, seconds, calls }).collect();
    entries.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.key.cmp(&b.key)));
    entries
}

/// Takes the recorded times as a table, each divided by `steps` (seconds per step).
pub fn report(steps: usize) -> String {
    let steps = steps.max(1) as f64;
    let mut out = format!("{:>10} {:>7}  op [first input's shape]\n", "ms/step", "calls");
    for e in take() {
        out.push_str(&format!("{:>10.2} {:>7.1}  {}\n", 1e3 * e.seconds / steps, e.calls as f64 / steps, e.key));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_record_only_while_enabled() {
        drop(span("profile-test-off", &[1]));
        enable(true);
        drop(span("profile-test-on", &[2, 3]));
        drop(span("profile-test-on", &[2, 3]));
        enable(false);
        let entries = take();
        assert!(entries.iter().all(|e| !e.key.starts_with("profile-test-off")));
        let on = entries.iter().find(|e| e.key == "profile-test-on [2, 3]").expect("recorded");
        assert_eq!(on.calls, 2);
        assert!(on.seconds >= 0.0);
    }
}
