//! HTTP downloads: mirrors tried in order, a few tries each with exponential backoff, timeouts,
//! a size cap, and nothing installed that fails verification.

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use super::install::{commit, CommitError, TempFile};
use super::manifest::FileSpec;
use super::report::Reporter;
use super::verify::Encoding;

/// Network behaviour of a [`Downloader`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpOptions {
    /// Limit on resolving, connecting, receiving the response headers, and each read of the body.
    pub timeout: Duration,
    /// Further tries of one mirror after a transient failure (network error, timeout, HTTP 5xx).
    pub retries: u32,
    /// Wait before the first retry; doubles for each further one.
    pub backoff: Duration,
}

/// Downloads files from a list of mirrors into a directory.
#[derive(Debug)]
pub struct Downloader {
    agent: ureq::Agent,
    options: HttpOptions,
    /// Mirrors that failed every try for an earlier file: not tried again in this run, so that a
    /// machine without network falls back after one round of retries rather than four.
    unreachable: RefCell<HashSet<String>>,
}

/// The result of trying every mirror for one file.
#[derive(Debug)]
pub enum Outcome {
    Installed {
        url: String,
        encoding: Encoding,
    },
    /// No mirror delivered a verified copy; one line per mirror saying what happened.
    Failed {
        tried: Vec<String>,
        all_unreachable: bool,
    },
}

/// Why one try at one mirror failed.
#[derive(Debug)]
enum AttemptError {
    /// Worth trying the same mirror again: connection trouble, a timeout, HTTP 5xx.
    Transient(String),
    /// This mirror will not deliver this file: HTTP 4xx, a bad URL, content that fails
    /// verification.
    Permanent(String),
    /// Our side failed (disk full, permissions): no mirror can help.
    Local(io::Error),
}

/// Longest wait between two tries, however many retries were asked for.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Downloader {
    pub fn new(options: HttpOptions) -> Self {
        let timeout = Some(options.timeout);
        let agent = ureq::Agent::config_builder()
            .timeout_resolve(timeout)
            .timeout_connect(timeout)
            .timeout_send_request(timeout)
            .timeout_recv_response(timeout)
            // A per-read limit rather than a total one: a slow but steady download of 26 MB
            // must not fail, a stalled one must.
            .timeout_per_read(timeout)
            .user_agent(concat!("resnet-fashion-xtask/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { agent, options, unreachable: RefCell::new(HashSet::new()) }
    }

    /// Tries each mirror in turn until one delivers a copy of `spec` that verifies, and installs
    /// it atomically as `dir/spec.name`.
    ///
    /// `Err` only for failures on our side (the target directory cannot be written); mirrors
    /// failing is an [`Outcome::Failed`].
    pub fn fetch(
        &self,
        mirrors: &[String],
        spec: &FileSpec,
        dir: &Path,
        reporter: &Reporter,
    ) -> anyhow::Result<Outcome> {
        let mut tried = Vec::new();
        let mut all_unreachable = true;
        for mirror in mirrors {
            let url = file_url(mirror, &spec.name);
            if self.unreachable.borrow().contains(mirror) {
                tried.push(format!("{url}: skipped, unreachable for an earlier file"));
                continue;
            }
            match self.fetch_from(&url, spec, dir, reporter)? {
                Ok(encoding) => return Ok(Outcome::Installed { url, encoding }),
                Err(MirrorFailure::Unreachable(why)) => {
                    self.unreachable.borrow_mut().insert(mirror.clone());
                    tried.push(format!("{url}: {why}"));
                }
                Err(MirrorFailure::Refused(why)) => {
                    all_unreachable = false;
                    tried.push(format!("{url}: {why}"));
                }
            }
        }
        Ok(Outcome::Failed { tried, all_unreachable })
    }

    /// Up to `1 + retries` tries at one URL.
    fn fetch_from(
        &self,
        url: &str,
        spec: &FileSpec,
        dir: &Path,
        reporter: &Reporter,
    ) -> anyhow::Result<Result<Encoding, MirrorFailure>> {
        let tries = self.options.retries.saturating_add(1);
        let mut wait = self.options.backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            reporter.info(format_args!("{}: downloading {url}", spec.name));
            match self.try_once(url, spec, dir, reporter) {
                Ok(encoding) => {
                    reporter.info(format_args!("{}: verified and installed", spec.name));
                    return Ok(Ok(encoding));
                }
                Err(AttemptError::Local(e)) => {
                    return Err(e).with_context(|| format!("cannot write {} in {}", spec.name, dir.display()));
                }
                Err(AttemptError::Permanent(why)) => {
                    reporter.warn(format_args!("{url}: {why}; trying the next mirror"));
                    return Ok(Err(MirrorFailure::Refused(why)));
                }
                Err(AttemptError::Transient(why)) if attempt == tries => {
                    reporter.warn(format_args!("{url}: {why} (try {attempt} of {tries})"));
                    let plural = if tries == 1 { "try" } else { "tries" };
                    return Ok(Err(MirrorFailure::Unreachable(format!("{tries} {plural}, last: {why}"))));
                }
                Err(AttemptError::Transient(why)) => {
                    reporter.warn(format_args!(
                        "{url}: {why} (try {attempt} of {tries}); retrying in {:.1} s",
                        wait.as_secs_f64()
                    ));
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One GET into a temporary file, then verification and rename.
    fn try_once(&self, url: &str, spec: &FileSpec, dir: &Path, reporter: &Reporter) -> Result<Encoding, AttemptError> {
        let response = self.agent.get(url).call().map_err(classify)?;
        let limit = spec.max_download_bytes();
        let total = response.body().content_length();
        if let Some(len) = total.filter(|&len| len > limit) {
            return Err(AttemptError::Permanent(format!(
                "announces {len} bytes, more than the {limit} a copy of {} can take",
                spec.name
            )));
        }
        let mut body = response.into_body().into_reader();
        let mut temp = TempFile::create(dir, &spec.name).map_err(AttemptError::Local)?;
        let mut progress = reporter.progress(&spec.name, total);
        let mut buf = vec![0u8; 1 << 16];
        let mut received = 0u64;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(AttemptError::Transient(format!("download broke off after {received} bytes: {e}")))
                }
            };
            received += n as u64;
            if received > limit {
                return Err(AttemptError::Permanent(format!(
                    "sent more than the {limit} bytes a copy of {} can take",
                    spec.name
                )));
            }
            let chunk = buf.get(..n).expect("read returns at most the buffer's length");
            temp.file().write_all(chunk).map_err(AttemptError::Local)?;
            progress.inc(n as u64);
        }
        drop(progress);
        commit(temp, spec, dir).map_err(|e| match e {
            CommitError::Rejected(why) => AttemptError::Permanent(format!("served a bad copy, not installed: {why}")),
            CommitError::Io(e) => AttemptError::Local(e),
        })
    }
}

/// Why a mirror gave up on a file.
#[derive(Debug)]
enum MirrorFailure {
    /// Every try failed with a transient error.
    Unreachable(String),
    /// The mirror answered, but not with a good copy.
    Refused(String),
}

/// `base` joined with `name`, whether or not `base` ends in a slash.
pub fn file_url(base: &str, name: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

fn classify(error: ureq::Error) -> AttemptError {
    match error {
        ureq::Error::StatusCode(code) if code >= 500 || code == 408 || code == 429 => {
            AttemptError::Transient(format!("HTTP {code}"))
        }
        ureq::Error::StatusCode(code) => AttemptError::Permanent(format!("HTTP {code}")),
        e @ (ureq::Error::BadUri(_)
        | ureq::Error::Http(_)
        | ureq::Error::RedirectFailed
        | ureq::Error::TooManyRedirects
        | ureq::Error::InvalidProxyUrl) => AttemptError::Permanent(e.to_string()),
        ureq::Error::Timeout(which) => AttemptError::Transient(format!("timed out ({which})")),
        e => AttemptError::Transient(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_joined_with_one_slash() {
        assert_eq!(file_url("http://a/b/", "x.gz"), "http://a/b/x.gz");
        assert_eq!(file_url("http://a/b", "x.gz"), "http://a/b/x.gz");
    }

    #[test]
    fn status_codes_are_classified() {
        assert!(matches!(classify(ureq::Error::StatusCode(503)), AttemptError::Transient(_)));
        assert!(matches!(classify(ureq::Error::StatusCode(429)), AttemptError::Transient(_)));
        assert!(matches!(classify(ureq::Error::StatusCode(404)), AttemptError::Permanent(_)));
    }
}
