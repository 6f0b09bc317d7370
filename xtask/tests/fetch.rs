//! End-to-end tests of `xtask fetch-data`: the built binary against a loopback HTTP server.
//!
//! Tests marked "real data" need Debian's `dataset-fashion-mnist` (the checksums are those of
//! the real files). Where it is not installed, the build script compiles them as ignored, so the
//! runner prints `ignored, <why>`; under `CI=true` they always run and missing data fails them.
//! The download logic itself is tested on synthetic files in `src/fetch/tests.rs`.

#[path = "support/http_server.rs"]
mod http_server;

use std::error::Error;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::{read::MultiGzDecoder, write::GzEncoder, Compression};

use http_server::{refused_url, Reply, TestServer};

type TestResult = Result<(), Box<dyn Error>>;

/// A file name and the bytes served for it.
type Served = (String, Arc<Vec<u8>>);

const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";
const FILES: [&str; 4] = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
];

/// Runs `xtask fetch-data ARGS` without proxies, so that loopback requests stay loopback.
fn fetch_data(args: &[&str]) -> std::io::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("fetch-data").args(args);
    for var in ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    cmd.output()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn entries(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

fn path_str(path: &Path) -> Result<&str, Box<dyn Error>> {
    path.to_str().ok_or_else(|| format!("non-UTF-8 path {}", path.display()).into())
}

/// Debian's copy of the data; an error naming the package when it is not installed.
fn debian_data() -> Result<PathBuf, Box<dyn Error>> {
    let dir = PathBuf::from(DEBIAN_DIR);
    match FILES.iter().find(|f| !dir.join(f).is_file()) {
        None => Ok(dir),
        Some(missing) => Err(format!(
            "{} is missing: this test needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
            dir.join(missing).display()
        )
        .into()),
    }
}

/// The real files, decompressed and gzipped again, so that their bytes match neither upstream
/// nor Debian while their content matches both.
fn regzipped(dir: &Path) -> Result<Vec<Served>, Box<dyn Error>> {
    FILES
        .iter()
        .map(|name| {
            let mut content = Vec::new();
            MultiGzDecoder::new(fs::File::open(dir.join(name))?).read_to_end(&mut content)?;
            let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
            enc.write_all(&content)?;
            Ok(((*name).to_owned(), Arc::new(enc.finish()?)))
        })
        .collect()
}

#[test]
fn help_lists_the_public_flags_only() -> TestResult {
    let out = fetch_data(&["--help"])?;
    assert!(out.status.success());
    let help = text(&out.stdout);
    for flag in ["--dir", "--from", "--mirror", "--timeout", "--retries"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(!help.contains("--debian-dir"), "the test hook is hidden");
    Ok(())
}

#[test]
fn nothing_available_exits_non_zero_with_advice() -> TestResult {
    let (dest, empty) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let refused = refused_url()?;
    let absent = empty.path().join("no-such-dir");
    let out = fetch_data(&[
        "--dir",
        path_str(dest.path())?,
        "--mirror",
        &refused,
        "--retries",
        "0",
        "--debian-dir",
        path_str(&absent)?,
    ])?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for expected in [
        "error: could not obtain 4 of 4 Fashion-MNIST files",
        &refused,
        "not present (package dataset-fashion-mnist is not installed)",
        "apt-get install dataset-fashion-mnist",
        "--from DIR",
    ] {
        assert!(stderr.contains(expected), "{expected:?} missing from:\n{stderr}");
    }
    assert!(entries(dest.path())?.is_empty());
    Ok(())
}

#[test]
fn a_stalled_server_times_out_quickly() -> TestResult {
    let routes = FILES.iter().map(|f| (format!("/{f}"), Reply::Stall)).collect();
    let server = TestServer::start(routes)?;
    let (dest, empty) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let started = Instant::now();
    let out = fetch_data(&[
        "--dir",
        path_str(dest.path())?,
        "--mirror",
        &server.url(""),
        "--timeout",
        "1",
        "--retries",
        "1",
        "--debian-dir",
        path_str(&empty.path().join("absent"))?,
    ])?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    assert!(stderr.contains("2 tries, last: timed out"), "{stderr}");
    // Two 1 s tries of the first file, then the mirror is known to be unreachable.
    assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
    assert!(entries(dest.path())?.is_empty());
    Ok(())
}

#[test]
fn from_with_a_bad_file_installs_nothing() -> TestResult {
    let (src, dest) = (tempfile::tempdir()?, tempfile::tempdir()?);
    for name in FILES {
        fs::write(src.path().join(name), b"\x1f\x8bnot really gzip")?;
    }
    let out = fetch_data(&["--dir", path_str(dest.path())?, "--from", path_str(src.path())?])?;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("nothing was installed"), "{stderr}");
    assert!(stderr.contains("cannot read or decompress"), "{stderr}");
    assert!(entries(dest.path())?.is_empty());
    Ok(())
}

/// Real data: a corrupt mirror is skipped, a re-gzipped copy installs, a second run is a no-op.
#[test]
#[cfg_attr(
    not(debian_fashion_mnist_installed),
    ignore = "Debian's Fashion-MNIST not installed: apt-get install dataset-fashion-mnist"
)]
fn real_data_downloads_verify_and_a_second_run_fetches_nothing() -> TestResult {
    let debian = debian_data()?;
    let files = regzipped(&debian)?;
    let mut routes = Vec::new();
    for (i, (name, body)) in files.iter().enumerate() {
        routes.push((format!("/good/{name}"), Reply::Body(Arc::clone(body))));
        // The corrupt mirror serves each name with another file's (valid gzip) bytes.
        let (_, other) = &files[(i + 1) % files.len()];
        routes.push((format!("/corrupt/{name}"), Reply::Body(Arc::clone(other))));
    }
    let server = TestServer::start(routes)?;
    let (dest, empty) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let dir = dest.path().join("fashion-mnist");
    let absent = empty.path().join("absent");
    let args = [
        "--dir",
        path_str(&dir)?,
        "--mirror",
        &server.url("corrupt/"),
        "--mirror",
        &server.url("good/"),
        "--debian-dir",
        path_str(&absent)?,
    ];

    let out = fetch_data(&args)?;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("served a bad copy, not installed"), "{stderr}");
    assert!(text(&out.stdout).contains("4 files verified"), "{}", text(&out.stdout));
    let mut expected: Vec<String> = FILES.iter().map(|f| (*f).to_owned()).collect();
    expected.sort();
    assert_eq!(entries(&dir)?, expected);
    for (name, body) in &files {
        assert_eq!(&fs::read(dir.join(name))?, body.as_ref(), "{name} is the good mirror's copy");
    }

    let requests = server.requests().len();
    let again = fetch_data(&args)?;
    let stderr = text(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert_eq!(stderr.matches("already present and verified").count(), 4, "{stderr}");
    assert_eq!(server.requests().len(), requests, "the second run made no request");
    Ok(())
}

/// Real data: with no mirror reachable, Debian's directory is used and the output says so.
#[test]
#[cfg_attr(
    not(debian_fashion_mnist_installed),
    ignore = "Debian's Fashion-MNIST not installed: apt-get install dataset-fashion-mnist"
)]
fn real_data_falls_back_to_debians_directory() -> TestResult {
    let debian = debian_data()?;
    let dest = tempfile::tempdir()?;
    let out = fetch_data(&[
        "--dir",
        path_str(dest.path())?,
        "--mirror",
        &refused_url()?,
        "--retries",
        "0",
        "--debian-dir",
        path_str(&debian)?,
    ])?;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("no mirror is reachable; installed Debian's copy"), "{stderr}");
    assert!(stderr.contains("4 file(s) came from Debian's package directory"), "{stderr}");
    assert_eq!(entries(dest.path())?.len(), 4);
    Ok(())
}

/// Real data: `--from` accepts uncompressed files and installs them gzipped.
#[test]
#[cfg_attr(
    not(debian_fashion_mnist_installed),
    ignore = "Debian's Fashion-MNIST not installed: apt-get install dataset-fashion-mnist"
)]
fn real_data_from_a_raw_copy() -> TestResult {
    let debian = debian_data()?;
    let (src, dest) = (tempfile::tempdir()?, tempfile::tempdir()?);
    for name in FILES {
        let mut content = Vec::new();
        MultiGzDecoder::new(fs::File::open(debian.join(name))?).read_to_end(&mut content)?;
        fs::write(src.path().join(name.trim_end_matches(".gz")), content)?;
    }
    let out = fetch_data(&["--dir", path_str(dest.path())?, "--from", path_str(src.path())?])?;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("installed from").count(), 4, "{stderr}");
    let mut expected: Vec<String> = FILES.iter().map(|f| (*f).to_owned()).collect();
    expected.sort();
    assert_eq!(entries(dest.path())?, expected);
    Ok(())
}

/// Real data: `fetch-data` killed (SIGKILL) while a file is half downloaded leaves nothing under
/// a final name; run again, it removes the partial file, installs all four and verifies them.
#[test]
#[cfg_attr(
    not(debian_fashion_mnist_installed),
    ignore = "Debian's Fashion-MNIST not installed: apt-get install dataset-fashion-mnist"
)]
fn real_data_a_fetch_killed_mid_download_completes_when_run_again() -> TestResult {
    let debian = debian_data()?;
    let files = regzipped(&debian)?;
    let mut routes = Vec::new();
    for (name, body) in &files {
        routes.push((format!("/good/{name}"), Reply::Body(Arc::clone(body))));
        let sent = body.len() / 2;
        routes.push((format!("/stalls/{name}"), Reply::StallAfter { body: Arc::clone(body), sent }));
    }
    let server = TestServer::start(routes)?;
    let (dest, empty) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let dir = dest.path().join("fashion-mnist");
    let absent = empty.path().join("absent");
    let args = |mirror: &str| -> Result<Vec<String>, Box<dyn Error>> {
        Ok(["--dir", path_str(&dir)?, "--mirror", mirror, "--timeout", "30", "--debian-dir", path_str(&absent)?]
            .map(String::from)
            .to_vec())
    };

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.arg("fetch-data").args(args(&server.url("stalls/"))?).stdout(Stdio::null()).stderr(Stdio::null());
    for var in ["http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    let mut child = cmd.spawn()?;
    // Kill once half of the first file has reached the disk under its temporary name.
    let deadline = Instant::now() + Duration::from_secs(30);
    let half = files.iter().map(|(_, body)| body.len() as u64 / 2).min().unwrap_or_default();
    let partial = loop {
        let found = match fs::read_dir(&dir) {
            Ok(entries) => entries.filter_map(Result::ok).find(|e| {
                e.file_name().to_string_lossy().ends_with(".part") && e.metadata().is_ok_and(|m| m.len() >= half)
            }),
            Err(_) => None,
        };
        if let Some(entry) = found {
            break entry.file_name().to_string_lossy().into_owned();
        }
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            child.kill().ok();
            return Err(format!("no half-written .part file appeared in {}", dir.display()).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill()?;
    child.wait()?;
    let left = entries(&dir)?;
    assert!(left.iter().all(|n| n.starts_with('.')), "a final name appeared before verification: {left:?}");
    assert!(left.contains(&partial), "{left:?}");

    let out = fetch_data(&args(&server.url("good/"))?.iter().map(String::as_str).collect::<Vec<_>>())?;
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("partial download(s) of an interrupted run"), "{stderr}");
    assert!(text(&out.stdout).contains("4 files verified"), "{}", text(&out.stdout));
    let mut expected: Vec<String> = FILES.iter().map(|f| (*f).to_owned()).collect();
    expected.sort();
    assert_eq!(entries(&dir)?, expected, "only the four verified files remain");
    for (name, body) in &files {
        assert_eq!(&fs::read(dir.join(name))?, body.as_ref(), "{name}");
    }
    Ok(())
}
