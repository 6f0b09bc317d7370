//! What the user sees: log lines on stderr, and a progress bar when stderr is a terminal.

use std::cell::RefCell;
use std::fmt::Display;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where messages and progress go.
#[derive(Debug)]
pub struct Reporter {
    mode: Mode,
    /// Messages kept in the tests' `Mode::Capture`; always empty otherwise.
    #[cfg_attr(not(test), allow(dead_code))]
    captured: RefCell<Vec<String>>,
}

/// Progress of one download; clears its bar when dropped.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    /// For plain output: what is logged every [`PLAIN_PROGRESS_EVERY`].
    label: String,
    total: Option<u64>,
    done: u64,
    last_line: Instant,
    plain: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Progress bars on stderr.
    Terminal,
    /// Only log lines on stderr (CI logs, pipes).
    Plain,
    /// Nothing printed; messages kept for tests to read.
    #[cfg(test)]
    Capture,
}

const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Reporter {
    /// Progress bars if stderr is a terminal, plain log lines otherwise.
    pub fn stderr() -> Self {
        let mode = if std::io::stderr().is_terminal() { Mode::Terminal } else { Mode::Plain };
        Self { mode, captured: RefCell::new(Vec::new()) }
    }

    /// Prints nothing and keeps every message for [`Reporter::messages`].
    #[cfg(test)]
    pub fn capture() -> Self {
        Self { mode: Mode::Capture, captured: RefCell::new(Vec::new()) }
    }

    #[cfg(test)]
    pub fn messages(&self) -> Vec<String> {
        self.captured.borrow().clone()
    }

    pub fn info(&self, msg: impl Display) {
        self.emit(format!("fetch-data: {msg}"));
    }

    pub fn warn(&self, msg: impl Display) {
        self.emit(format!("fetch-data: warning: {msg}"));
    }

    /// Starts reporting the download of `label`, `total` bytes if the server said so.
    pub fn progress(&self, label: &str, total: Option<u64>) -> Progress {
        let bar = (self.mode == Mode::Terminal).then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let template = if total.is_some() {
                "{msg:28} [{bar:30}] {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} {eta:>4}"
            } else {
                "{msg:28} {spinner} {bytes:>10} {bytes_per_sec:>12}"
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(label.to_owned());
            bar
        });
        Progress {
            bar,
            label: label.to_owned(),
            total,
            done: 0,
            last_line: Instant::now(),
            plain: self.mode == Mode::Plain,
        }
    }

    fn emit(&self, line: String) {
        match self.mode {
            Mode::Terminal | Mode::Plain => eprintln!("{line}"),
            #[cfg(test)]
            Mode::Capture => self.captured.borrow_mut().push(line),
        }
    }
}

impl Progress {
    pub fn inc(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        } else if self.plain && self.last_line.elapsed() >= PLAIN_PROGRESS_EVERY {
            self.last_line = Instant::now();
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            match self.total {
                Some(total) => eprintln!("fetch-data: {}: {:.1} of {:.1} MiB", self.label, mib(self.done), mib(total)),
                None => eprintln!("fetch-data: {}: {:.1} MiB", self.label, mib(self.done)),
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
