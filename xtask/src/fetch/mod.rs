//! `cargo xtask fetch-data`: downloads Fashion-MNIST, or installs a local copy, verified by the
//! SHA-256 and size of each file's decompressed content.
//!
//! The only network code in the workspace. Invariants: a file under its final name in the target
//! directory has been verified; an interrupted or failed run leaves no partial file under a final
//! name; a run with every file already present and verified touches nothing.
//!
//! Order of sources: files already present, then `--from DIR` (exclusively) or the mirrors in
//! order, then Debian's `dataset-fashion-mnist` directory when no mirror delivers a file.

mod download;
mod install;
mod manifest;
mod report;
mod verify;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};

use download::{Downloader, HttpOptions, Outcome};
use install::{install_local, local_candidates, remove_stale_parts, CommitError};
use manifest::{FileSpec, Manifest, DEBIAN_DATA_DIR, DEBIAN_PACKAGE, FASHION_MNIST_MIRRORS};
use report::Reporter;
use verify::{verify_file, Encoding, VerifyError};

/// Flags of `cargo xtask fetch-data`.
#[derive(Debug, Clone, clap::Args)]
pub struct FetchArgs {
    /// Directory to install into [default: $XDG_CACHE_HOME/resnet-fashion/fashion-mnist,
    /// else ~/.cache/resnet-fashion/fashion-mnist, where the data loader looks]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Install from a local copy of the four files (`.gz` or uncompressed) instead of downloading;
    /// every file is verified before any is installed
    #[arg(long, value_name = "DIR", conflicts_with = "mirrors")]
    pub from: Option<PathBuf>,

    /// Base URL to download from instead of the built-in mirrors; repeat to try several in order
    #[arg(long = "mirror", value_name = "URL")]
    pub mirrors: Vec<String>,

    /// Timeout in seconds for connecting, for the response, and for each read of the body
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Further tries of a mirror after a network error or HTTP 5xx, with exponential backoff
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retries: u32,

    /// Directory of Debian's dataset-fashion-mnist package, used when no mirror delivers a file
    #[arg(long, value_name = "DIR", default_value = DEBIAN_DATA_DIR, hide = true)]
    pub debian_dir: PathBuf,
}

/// Everything [`fetch`] needs, resolved from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub dir: PathBuf,
    pub source: Source,
    pub http: HttpOptions,
    /// Fallback when no mirror delivers a file; ignored with [`Source::Local`].
    pub debian_dir: PathBuf,
}

/// Where missing files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Base URLs, tried in order.
    Mirrors(Vec<String>),
    /// A directory holding a copy (`--from`).
    Local(PathBuf),
}

/// What a successful [`fetch`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Files that were already present and verified.
    pub present: Vec<String>,
    /// Files installed by this run, and from where.
    pub installed: Vec<(String, Origin)>,
}

/// Where an installed file came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Mirror(String),
    Local(PathBuf),
    Debian(PathBuf),
}

/// First wait between two tries of a mirror.
const BACKOFF: Duration = Duration::from_millis(500);

/// Runs `cargo xtask fetch-data`.
pub fn run(args: FetchArgs) -> anyhow::Result<()> {
    let plan = Plan::from_args(args)?;
    let manifest = Manifest::fashion_mnist();
    let summary = fetch(&manifest, &plan, &Reporter::stderr())?;
    let installed = summary.installed.len();
    println!(
        "Fashion-MNIST: {} files verified in {} ({installed} installed, {} already present)",
        manifest.files.len(),
        plan.dir.display(),
        summary.present.len()
    );
    Ok(())
}

impl Plan {
    pub fn from_args(args: FetchArgs) -> anyhow::Result<Self> {
        let dir = match args.dir {
            Some(dir) => dir,
            None => default_data_dir()?,
        };
        let source = match args.from {
            Some(from) => {
                if !from.is_dir() {
                    bail!("--from {}: not a directory", from.display());
                }
                Source::Local(from)
            }
            None if args.mirrors.is_empty() => {
                Source::Mirrors(FASHION_MNIST_MIRRORS.iter().map(|m| (*m).to_owned()).collect())
            }
            None => {
                if let Some(bad) =
                    args.mirrors.iter().find(|m| !(m.starts_with("http://") || m.starts_with("https://")))
                {
                    bail!("--mirror {bad}: expected an http:// or https:// URL");
                }
                Source::Mirrors(args.mirrors)
            }
        };
        let http = HttpOptions { timeout: args.timeout, retries: args.retries, backoff: BACKOFF };
        Ok(Self { dir, source, http, debian_dir: args.debian_dir })
    }
}

/// `$XDG_CACHE_HOME/resnet-fashion/fashion-mnist`, else `$HOME/.cache/resnet-fashion/fashion-mnist`:
/// the directory the data loader searches.
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    let from_env = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|p| p.is_absolute());
    let cache = match (from_env("XDG_CACHE_HOME"), from_env("HOME")) {
        (Some(xdg), _) => xdg,
        (None, Some(home)) => home.join(".cache"),
        (None, None) => bail!("neither XDG_CACHE_HOME nor HOME is set; pass --dir DIR"),
    };
    Ok(cache.join("resnet-fashion").join("fashion-mnist"))
}

/// Checks one Fashion-MNIST file (gzip or raw, by its name in the manifest) against the
/// manifest's size and SHA-256 of the decompressed content.
pub fn verify_dataset_file(path: &Path) -> anyhow::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let manifest = Manifest::fashion_mnist();
    let Some(spec) = manifest.files.iter().find(|s| s.name == name || s.raw_name() == name) else {
        bail!("{} is not one of the Fashion-MNIST files", path.display());
    };
    verify_file(path, spec).map(|_| ()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Makes every file of `manifest` present and verified in `plan.dir`.
pub fn fetch(manifest: &Manifest, plan: &Plan, reporter: &Reporter) -> anyhow::Result<Summary> {
    let dir = &plan.dir;
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut summary = Summary { present: Vec::new(), installed: Vec::new() };
    let mut missing = Vec::new();
    for spec in &manifest.files {
        let stale = remove_stale_parts(dir, &spec.name)
            .with_context(|| format!("cannot remove a partial download of {} in {}", spec.name, dir.display()))?;
        if !stale.is_empty() {
            reporter.info(format_args!(
                "{}: removed {} partial download(s) of an interrupted run",
                spec.name,
                stale.len()
            ));
        }
        let path = dir.join(&spec.name);
        match verify_file(&path, spec) {
            Ok(_) => {
                reporter.info(format_args!("{}: already present and verified", spec.name));
                summary.present.push(spec.name.clone());
            }
            Err(VerifyError::Unreadable(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                missing.push(spec);
            }
            Err(why) => {
                // A file that fails verification must not stay where the loader looks for it.
                reporter.warn(format_args!(
                    "{}: the installed copy fails verification ({why}); removing it",
                    path.display()
                ));
                fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
                missing.push(spec);
            }
        }
    }
    if missing.is_empty() {
        reporter.info("nothing to fetch");
        return Ok(summary);
    }
    match &plan.source {
        Source::Local(from) => install_from(from, &missing, dir, reporter, &mut summary)?,
        Source::Mirrors(mirrors) => {
            download_all(mirrors, &missing, plan, manifest, reporter, &mut summary)?;
        }
    }
    Ok(summary)
}

/// `--from`: checks every missing file's source first, and installs only if all of them pass.
fn install_from(
    from: &Path,
    missing: &[&FileSpec],
    dir: &Path,
    reporter: &Reporter,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let mut sources = Vec::new();
    let mut problems = String::new();
    for &spec in missing {
        match find_verified(from, spec) {
            Ok(src) => sources.push((spec, src)),
            Err(why) => {
                let _ = write!(problems, "\n  {}: {why}", spec.name);
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "--from {}: {} of {} needed files are missing or fail verification; \
             nothing was installed:{problems}",
            from.display(),
            missing.len() - sources.len(),
            missing.len()
        );
    }
    for (spec, src) in sources {
        install_checked(&src, spec, dir)?;
        reporter.info(format_args!("{}: installed from {}", spec.name, src.display()));
        summary.installed.push((spec.name.clone(), Origin::Local(src)));
    }
    Ok(())
}

/// Downloads each missing file, falling back to Debian's directory for those no mirror delivers.
fn download_all(
    mirrors: &[String],
    missing: &[&FileSpec],
    plan: &Plan,
    manifest: &Manifest,
    reporter: &Reporter,
    summary: &mut Summary,
) -> anyhow::Result<()> {
    let downloader = Downloader::new(plan.http);
    let mut failures = String::new();
    let mut failed = 0;
    let mut from_debian = 0;
    for &spec in missing {
        let (tried, all_unreachable) = match downloader.fetch(mirrors, spec, &plan.dir, reporter)? {
            Outcome::Installed { url, encoding } => {
                if encoding == Encoding::Raw {
                    reporter.info(format_args!("{}: the server sent it uncompressed; stored gzipped", spec.name));
                }
                summary.installed.push((spec.name.clone(), Origin::Mirror(url)));
                continue;
            }
            Outcome::Failed { tried, all_unreachable } => (tried, all_unreachable),
        };
        let why_no_mirror = if all_unreachable { "no mirror is reachable" } else { "no mirror delivered a good copy" };
        match debian_fallback(&plan.debian_dir, spec, &plan.dir)? {
            Ok(src) => {
                reporter.warn(format_args!(
                    "{}: {why_no_mirror}; installed Debian's copy from {} instead",
                    spec.name,
                    src.display()
                ));
                summary.installed.push((spec.name.clone(), Origin::Debian(src)));
                from_debian += 1;
            }
            Err(why) => {
                failed += 1;
                let _ = write!(failures, "\n  {} ({why_no_mirror}):", spec.name);
                for line in tried {
                    let _ = write!(failures, "\n    {line}");
                }
                let _ = write!(failures, "\n    Debian's package directory {}: {why}", plan.debian_dir.display());
            }
        }
    }
    if failed > 0 {
        bail!(
            "could not obtain {failed} of {} Fashion-MNIST files into {}:{failures}\n\
             Install Debian's copy with `apt-get install {DEBIAN_PACKAGE}`, or pass `--from DIR` \
             with a directory holding the files (.gz or uncompressed).",
            manifest.files.len(),
            plan.dir.display()
        );
    }
    if from_debian > 0 {
        reporter.info(format_args!(
            "{from_debian} file(s) came from Debian's package directory {} (package {DEBIAN_PACKAGE}) \
             because the mirrors could not deliver them",
            plan.debian_dir.display()
        ));
    }
    Ok(())
}

/// Installs `spec` from Debian's directory: `Ok(Err(why))` when that is not possible.
fn debian_fallback(debian_dir: &Path, spec: &FileSpec, dir: &Path) -> anyhow::Result<Result<PathBuf, String>> {
    if !debian_dir.is_dir() {
        return Ok(Err(format!("not present (package {DEBIAN_PACKAGE} is not installed)")));
    }
    match find_verified(debian_dir, spec) {
        Ok(src) => {
            install_checked(&src, spec, dir)?;
            Ok(Ok(src))
        }
        Err(why) => Ok(Err(why)),
    }
}

/// The first local candidate for `spec` in `dir` that verifies, or why there is none.
fn find_verified(dir: &Path, spec: &FileSpec) -> Result<PathBuf, String> {
    let mut problems = Vec::new();
    for candidate in local_candidates(dir, spec) {
        if !candidate.exists() {
            continue;
        }
        match verify_file(&candidate, spec) {
            Ok(_) => return Ok(candidate),
            Err(why) => problems.push(format!("{}: {why}", candidate.display())),
        }
    }
    if problems.is_empty() {
        let [gz, raw] = local_candidates(dir, spec);
        Err(format!("neither {} nor {} exists", gz.display(), raw.display()))
    } else {
        Err(problems.join("; "))
    }
}

/// Copies an already verified local file into `dir`, verifying the copy again.
fn install_checked(src: &Path, spec: &FileSpec, dir: &Path) -> anyhow::Result<()> {
    install_local(src, spec, dir).map(drop).or_else(|e| match e {
        CommitError::Rejected(why) => {
            bail!("{}: the copy failed verification although the source passed: {why}", src.display())
        }
        CommitError::Io(e) => {
            Err(e).with_context(|| format!("cannot install {} into {}", src.display(), dir.display()))
        }
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("{s} s: expected more than 0 and at most 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
#[path = "../../tests/support/http_server.rs"]
mod http_server;

#[cfg(test)]
mod tests;
