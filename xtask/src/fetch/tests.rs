//! Tests of the whole fetch logic against a manifest of small synthetic files, served by the
//! loopback server in `tests/support/http_server.rs`.

use std::error::Error;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::{write::GzEncoder, Compression};

use super::http_server::{refused_url, Reply, TestServer};
use super::verify::sha256_hex;
use super::*;

type TestResult = Result<(), Box<dyn Error>>;

/// Two small IDX-like files and their manifest.
struct Fixture {
    manifest: Manifest,
    contents: Vec<Vec<u8>>,
}

impl Fixture {
    fn new() -> Self {
        let labels: Vec<u8> =
            [0u8, 0, 8, 1, 0, 0, 3, 232].into_iter().chain((0..1000u32).map(|i| (i * 7 % 10) as u8)).collect();
        // Big enough to take many reads and to show in a progress bar.
        let images: Vec<u8> = [0u8, 0, 8, 3, 0, 0, 0, 200, 0, 0, 0, 28, 0, 0, 0, 28]
            .into_iter()
            .chain((0..200 * 784u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8))
            .collect();
        let spec = |name: &str, content: &[u8]| FileSpec::new(name, content.len() as u64, &sha256_hex(content));
        Self {
            manifest: Manifest {
                files: vec![spec("synth-labels-idx1-ubyte.gz", &labels), spec("synth-images-idx3-ubyte.gz", &images)],
            },
            contents: vec![labels, images],
        }
    }

    fn names(&self) -> Vec<String> {
        self.manifest.files.iter().map(|f| f.name.clone()).collect()
    }

    /// Routes serving every file gzipped under `/prefix/`.
    fn good_routes(&self, prefix: &str) -> Vec<(String, Reply)> {
        self.routes(prefix, gzip)
    }

    fn routes(&self, prefix: &str, body: impl Fn(&[u8]) -> Vec<u8>) -> Vec<(String, Reply)> {
        self.manifest
            .files
            .iter()
            .zip(&self.contents)
            .map(|(spec, content)| (format!("/{prefix}{}", spec.name), Reply::Body(Arc::new(body(content)))))
            .collect()
    }

    /// Writes every file into `dir`, gzipped or not.
    fn write_local(&self, dir: &Path, gzipped: bool) -> std::io::Result<()> {
        for (spec, content) in self.manifest.files.iter().zip(&self.contents) {
            if gzipped {
                fs::write(dir.join(&spec.name), gzip(content))?;
            } else {
                fs::write(dir.join(spec.raw_name()), content)?;
            }
        }
        Ok(())
    }
}

fn gzip(content: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(content).expect("in-memory write");
    enc.finish().expect("in-memory write")
}

fn plan(dir: &Path, mirrors: Vec<String>, debian_dir: &Path) -> Plan {
    Plan {
        dir: dir.to_owned(),
        source: Source::Mirrors(mirrors),
        http: HttpOptions { timeout: Duration::from_secs(1), retries: 1, backoff: Duration::from_millis(10) },
        debian_dir: debian_dir.to_owned(),
    }
}

/// Every entry of `dir`, sorted: final names and any leftover temporary file.
fn entries(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}

fn sorted(mut names: Vec<String>) -> Vec<String> {
    names.sort();
    names
}

fn assert_all_verified(fx: &Fixture, dir: &Path) -> TestResult {
    assert_eq!(entries(dir)?, sorted(fx.names()), "exactly the final files, no temp files");
    for spec in &fx.manifest.files {
        assert_eq!(verify_file(&dir.join(&spec.name), spec)?, Encoding::Gzip);
    }
    Ok(())
}

#[test]
fn good_mirror_installs_and_a_second_run_is_a_no_op() -> TestResult {
    let fx = Fixture::new();
    let server = TestServer::start(fx.good_routes("good/"))?;
    let (dest, no_debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let plan = plan(dest.path(), vec![server.url("good/")], &no_debian.path().join("absent"));

    let summary = fetch(&fx.manifest, &plan, &Reporter::capture())?;
    assert_eq!(summary.installed.len(), 2);
    assert!(summary.present.is_empty());
    assert_all_verified(&fx, dest.path())?;
    let requests = server.requests().len();
    assert_eq!(requests, 2);

    let reporter = Reporter::capture();
    let again = fetch(&fx.manifest, &plan, &reporter)?;
    assert!(again.installed.is_empty());
    assert_eq!(again.present.len(), 2);
    assert_eq!(server.requests().len(), requests, "the second run made no request");
    let messages = reporter.messages();
    assert!(messages.iter().any(|m| m.contains("already present and verified")), "{messages:?}");
    Ok(())
}

#[test]
fn corrupt_and_missing_copies_are_rejected_and_the_next_mirror_is_used() -> TestResult {
    let fx = Fixture::new();
    let mut routes = fx.good_routes("good/");
    // A flipped byte inside otherwise valid gzip: right size, wrong SHA-256.
    routes.extend(fx.routes("corrupt/", |content| {
        let mut bad = content.to_vec();
        if let Some(b) = bad.last_mut() {
            *b ^= 0xff;
        }
        gzip(&bad)
    }));
    let server = TestServer::start(routes)?;
    let (dest, no_debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mirrors = vec![server.url("missing/"), server.url("corrupt/"), server.url("good/")];
    let reporter = Reporter::capture();

    let summary = fetch(&fx.manifest, &plan(dest.path(), mirrors, no_debian.path()), &reporter)?;
    assert_all_verified(&fx, dest.path())?;
    assert!(summary
        .installed
        .iter()
        .all(|(_, origin)| matches!(origin, Origin::Mirror(url) if url.contains("/good/"))));
    let messages = reporter.messages().join("\n");
    assert!(messages.contains("HTTP 404"), "{messages}");
    assert!(messages.contains("served a bad copy, not installed: SHA-256"), "{messages}");
    // A refusal is not a network error: the corrupt mirror was asked once per file, not retried.
    let corrupt_requests = server.requests().iter().filter(|p| p.starts_with("/corrupt/")).count();
    assert_eq!(corrupt_requests, 2);
    Ok(())
}

#[test]
fn truncated_and_oversized_copies_are_rejected() -> TestResult {
    let fx = Fixture::new();
    let mut routes = fx.good_routes("good/");
    routes.extend(fx.routes("truncated/", |content| {
        let gz = gzip(content);
        gz[..gz.len() * 2 / 3].to_vec()
    }));
    routes.extend(fx.routes("huge/", |content| vec![0; content.len() * 2 + 100_000]));
    let server = TestServer::start(routes)?;
    let (dest, no_debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mirrors = vec![server.url("truncated/"), server.url("huge/"), server.url("good/")];
    let reporter = Reporter::capture();

    fetch(&fx.manifest, &plan(dest.path(), mirrors, no_debian.path()), &reporter)?;
    assert_all_verified(&fx, dest.path())?;
    let messages = reporter.messages().join("\n");
    assert!(messages.contains("/truncated/synth-images-idx3-ubyte.gz: served a bad copy"));
    assert!(messages.contains("more than the"), "{messages}");
    Ok(())
}

#[test]
fn uncompressed_download_is_stored_gzipped() -> TestResult {
    let fx = Fixture::new();
    let server = TestServer::start(fx.routes("raw/", <[u8]>::to_vec))?;
    let (dest, no_debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let reporter = Reporter::capture();
    fetch(&fx.manifest, &plan(dest.path(), vec![server.url("raw/")], no_debian.path()), &reporter)?;
    assert_all_verified(&fx, dest.path())?;
    assert!(reporter.messages().iter().any(|m| m.contains("uncompressed; stored gzipped")));
    Ok(())
}

#[test]
fn a_stalled_server_times_out_and_the_next_mirror_is_used() -> TestResult {
    let fx = Fixture::new();
    let mut routes = fx.good_routes("good/");
    for (spec, content) in fx.manifest.files.iter().zip(&fx.contents) {
        routes.push((format!("/silent/{}", spec.name), Reply::Stall));
        let body = Arc::new(gzip(content));
        let sent = body.len() / 2;
        routes.push((format!("/midway/{}", spec.name), Reply::StallAfter { body, sent }));
    }
    let server = TestServer::start(routes)?;
    let (dest, no_debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mut plan =
        plan(dest.path(), vec![server.url("midway/"), server.url("silent/"), server.url("good/")], no_debian.path());
    plan.http.retries = 0;
    let reporter = Reporter::capture();

    let started = Instant::now();
    fetch(&fx.manifest, &plan, &reporter)?;
    assert_all_verified(&fx, dest.path())?;
    // Two 1 s timeouts for the first file; both mirrors are then skipped for the second.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let messages = reporter.messages().join("\n");
    assert!(messages.contains("/midway/synth-labels-idx1-ubyte.gz: download broke off"), "{messages}");
    assert!(messages.contains("/silent/synth-labels-idx1-ubyte.gz: timed out"), "{messages}");
    assert!(!server.requests().iter().any(|p| p.starts_with("/silent/synth-images")));
    Ok(())
}

#[test]
fn unreachable_mirrors_fall_back_to_debians_directory() -> TestResult {
    let fx = Fixture::new();
    let (dest, debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    fx.write_local(debian.path(), true)?;
    let refused = refused_url()?;
    let reporter = Reporter::capture();

    let summary = fetch(&fx.manifest, &plan(dest.path(), vec![refused], debian.path()), &reporter)?;
    assert_all_verified(&fx, dest.path())?;
    assert!(summary.installed.iter().all(|(_, origin)| matches!(origin, Origin::Debian(_))));
    let messages = reporter.messages().join("\n");
    assert!(messages.contains("no mirror is reachable; installed Debian's copy"), "{messages}");
    assert!(messages.contains("2 file(s) came from Debian's package directory"), "{messages}");
    Ok(())
}

#[test]
fn a_corrupt_debian_copy_is_not_installed() -> TestResult {
    let fx = Fixture::new();
    let (dest, debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    fx.write_local(debian.path(), true)?;
    fs::write(debian.path().join(&fx.manifest.files[1].name), gzip(b"not the images"))?;
    let plan = plan(dest.path(), vec![refused_url()?], debian.path());

    let error = fetch(&fx.manifest, &plan, &Reporter::capture()).err().ok_or("expected an error")?;
    let message = format!("{error:#}");
    assert!(message.contains("could not obtain 1 of 2"), "{message}");
    assert!(message.contains("content is 14 bytes"), "{message}");
    // The good file is installed; the bad one is not, under any name.
    assert_eq!(entries(dest.path())?, vec![fx.manifest.files[0].name.clone()]);
    Ok(())
}

#[test]
fn nothing_available_fails_with_a_clear_message_and_leaves_nothing() -> TestResult {
    let fx = Fixture::new();
    let server = TestServer::start(Vec::new())?;
    let (dest, no_debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let mirrors = vec![refused_url()?, server.url("empty/")];
    let plan = plan(dest.path(), mirrors, &no_debian.path().join("absent"));

    let error = fetch(&fx.manifest, &plan, &Reporter::capture()).err().ok_or("expected an error")?;
    let message = format!("{error:#}");
    for expected in [
        "could not obtain 2 of 2",
        "2 tries, last:",
        "skipped, unreachable for an earlier file",
        "HTTP 404",
        "not present (package dataset-fashion-mnist is not installed)",
        "apt-get install dataset-fashion-mnist",
        "--from DIR",
    ] {
        assert!(message.contains(expected), "{expected:?} missing from:\n{message}");
    }
    assert!(entries(dest.path())?.is_empty());
    Ok(())
}

#[test]
fn from_dir_accepts_gzipped_and_raw_copies() -> TestResult {
    let fx = Fixture::new();
    for gzipped in [true, false] {
        let (src, dest) = (tempfile::tempdir()?, tempfile::tempdir()?);
        fx.write_local(src.path(), gzipped)?;
        let plan = Plan { source: Source::Local(src.path().to_owned()), ..plan(dest.path(), Vec::new(), src.path()) };
        let summary = fetch(&fx.manifest, &plan, &Reporter::capture())?;
        assert_eq!(summary.installed.len(), 2);
        assert_all_verified(&fx, dest.path())?;
    }
    Ok(())
}

#[test]
fn from_dir_with_a_bad_file_installs_nothing() -> TestResult {
    let fx = Fixture::new();
    let (src, dest) = (tempfile::tempdir()?, tempfile::tempdir()?);
    fx.write_local(src.path(), true)?;
    let truncated = gzip(&fx.contents[1][..100]);
    fs::write(src.path().join(&fx.manifest.files[1].name), truncated)?;
    let plan = Plan { source: Source::Local(src.path().to_owned()), ..plan(dest.path(), Vec::new(), src.path()) };

    let error = fetch(&fx.manifest, &plan, &Reporter::capture()).err().ok_or("expected an error")?;
    let message = format!("{error:#}");
    assert!(message.contains("nothing was installed"), "{message}");
    assert!(message.contains("synth-images-idx3-ubyte.gz"), "{message}");
    assert!(entries(dest.path())?.is_empty(), "not even the good file");
    Ok(())
}

#[test]
fn an_installed_file_that_fails_verification_is_replaced() -> TestResult {
    let fx = Fixture::new();
    let server = TestServer::start(fx.good_routes(""))?;
    let (dest, no_debian) = (tempfile::tempdir()?, tempfile::tempdir()?);
    fs::write(dest.path().join(&fx.manifest.files[0].name), b"garbage")?;
    let reporter = Reporter::capture();
    let summary = fetch(&fx.manifest, &plan(dest.path(), vec![server.url("")], no_debian.path()), &reporter)?;
    assert_eq!(summary.installed.len(), 2);
    assert_all_verified(&fx, dest.path())?;
    assert!(reporter.messages().iter().any(|m| m.contains("fails verification")));
    Ok(())
}

#[test]
fn default_dir_ends_in_the_loader_path() -> TestResult {
    let dir = default_data_dir()?;
    assert!(dir.ends_with("resnet-fashion/fashion-mnist"), "{}", dir.display());
    Ok(())
}

#[test]
fn timeouts_are_parsed_and_bounded() {
    assert_eq!(parse_timeout("1.5"), Ok(Duration::from_millis(1500)));
    assert!(parse_timeout("0").is_err());
    assert!(parse_timeout("-1").is_err());
    assert!(parse_timeout("NaN").is_err());
    assert!(parse_timeout("soon").is_err());
}
