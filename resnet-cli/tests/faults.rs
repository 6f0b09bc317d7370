//! Fault injection against the real `resnet-cli` binary on tiny synthetic data: `kill -9` at
//! seeded random instants and during checkpoint writes, a full disk (`RLIMIT_FSIZE`) during every
//! kind of write, and a read-only run folder. After each fault the run folder must either resume
//! (`train --resume`) to exactly the uninterrupted run's metrics and weights or be refused with a
//! clear message; every file under its final name is whole, and no temporary file outlives a
//! resume.
//!
//! A run here is a width-1 ResNet-18 on 96 images of 28×28: 4 epochs of 3 steps, well under a
//! second.
//! RELIABILITY.md records the trial counts and what each fault leaves behind.
#![cfg(unix)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use resnet_data::{FashionMnist, Split};
use serde_json::Value;
use tempfile::TempDir;

const TRAIN_LEN: usize = 96;
const TEST_LEN: usize = 32;
const EPOCHS: usize = 4;
/// Random-instant kill trials.
const KILL_TRIALS: usize = 20;
/// Kills that must land while a checkpoint is being written (a temporary file exists).
const WRITE_KILL_TRIALS: usize = 5;
const CHECKPOINT: &str = "checkpoint.safetensors";
const BEST: &str = "best.safetensors";

/// The flags of the run every test trains.
fn train_args(data: &Path, out: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--preset", "quick", "--data-dir"].map(String::from).to_vec();
    args.push(data.display().to_string());
    args.push("--out".into());
    args.push(out.display().to_string());
    let rest = ["--epochs", "4", "--batch-size", "32", "--eval-batch-size", "32", "--resize", "28", "--width", "1"];
    args.extend(rest.map(String::from));
    args.extend(["--seed", "7", "--workers", "1", "--device", "cpu"].map(String::from));
    args
}

fn resume_args(data: &Path, run: &Path) -> Vec<String> {
    vec![
        "train".into(),
        "--resume".into(),
        run.display().to_string(),
        "--data-dir".into(),
        data.display().to_string(),
        "--device".into(),
        "cpu".into(),
    ]
}

/// The binary, hermetic: only `--data-dir` points at data, one rayon thread, default logging.
fn command(args: &[String]) -> Command {
    command_of(Path::new(env!("CARGO_BIN_EXE_resnet-cli")), args)
}

/// [`command`] for a copy of the binary at `exe`.
fn command_of(exe: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(args).env_remove("RESNET_DATA_DIR").env_remove("RUST_LOG").env("RAYON_NUM_THREADS", "1");
    cmd
}

/// One finished invocation.
#[derive(Debug)]
struct Finished {
    code: Option<i32>,
    stderr: String,
}

fn finish(mut cmd: Command) -> Result<Finished> {
    let out = cmd.output().context("running resnet-cli")?;
    Ok(Finished { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() })
}

/// A clean refusal or failure: exit status 1, no panic, a message on stderr.
fn clean_failure(run: &Finished, what: &str) -> Result<()> {
    ensure!(run.code == Some(1), "{what}: expected exit status 1, got {:?}:\n{}", run.code, run.stderr);
    ensure!(!run.stderr.contains("panicked"), "{what} panicked:\n{}", run.stderr);
    ensure!(run.stderr.contains("error"), "{what}: no error message on stderr:\n{}", run.stderr);
    Ok(())
}

fn write_data(dir: &Path) -> Result<()> {
    let data =
        FashionMnist { train: Split::synthetic(TRAIN_LEN, 28, 28, 1), test: Split::synthetic(TEST_LEN, 28, 28, 2) };
    data.save(dir, false)?;
    Ok(())
}

/// What a finished run leaves that must not depend on how it got there.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    /// `metrics.jsonl` without the timing fields.
    metrics: Vec<Value>,
    /// Every tensor of the checkpoint (model and optimiser state), as raw bytes.
    checkpoint: BTreeMap<String, Vec<u8>>,
    /// Every tensor of the best file.
    best: BTreeMap<String, Vec<u8>>,
}

/// The uninterrupted run: its outcome, wall time and final file sizes.
#[derive(Debug)]
struct Reference {
    outcome: Outcome,
    wall: Duration,
    sizes: BTreeMap<String, u64>,
}

fn reference() -> Result<&'static Reference> {
    static REFERENCE: OnceLock<std::result::Result<Reference, String>> = OnceLock::new();
    REFERENCE
        .get_or_init(|| {
            (|| -> Result<Reference> {
                let dir = tempfile::tempdir()?;
                let data = dir.path().join("data");
                write_data(&data)?;
                // Three runs: they must agree (a CPU run is repeatable), and the fastest sets the
                // span the kill instants are drawn from.
                let mut runs = Vec::new();
                for i in 0..3 {
                    let run = dir.path().join(format!("run-{i}"));
                    let started = Instant::now();
                    let done = finish(command(&train_args(&data, &run)))?;
                    let wall = started.elapsed();
                    ensure!(done.code == Some(0), "the reference run failed:\n{}", done.stderr);
                    let mut sizes = BTreeMap::new();
                    for entry in std::fs::read_dir(&run)? {
                        let entry = entry?;
                        sizes.insert(entry.file_name().to_string_lossy().into_owned(), entry.metadata()?.len());
                    }
                    runs.push(Reference { outcome: outcome(&run)?, wall, sizes });
                }
                ensure!(
                    runs.windows(2).all(|w| w[0].outcome == w[1].outcome),
                    "three uninterrupted runs with one seed disagree"
                );
                runs.sort_by_key(|r| r.wall);
                runs.into_iter().next().context("no reference run")
            })()
            .map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn outcome(run: &Path) -> Result<Outcome> {
    Ok(Outcome { metrics: metrics(run)?, checkpoint: tensors(&run.join(CHECKPOINT))?, best: tensors(&run.join(BEST))? })
}

/// `metrics.jsonl`'s records without the fields that measure time.
fn metrics(run: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl"))?;
    text.lines()
        .map(|line| {
            let mut v: Value = serde_json::from_str(line).with_context(|| format!("metrics.jsonl line {line:?}"))?;
            if let Value::Object(map) = &mut v {
                map.retain(|k, _| !(k.ends_with("_seconds") || k.ends_with("_per_sec")));
            }
            Ok(v)
        })
        .collect()
}

fn tensors(path: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{} is torn", path.display()))?;
    Ok(st.tensors().into_iter().map(|(name, view)| (name, view.data().to_vec())).collect())
}

/// The `train_state` JSON of a checkpoint.
fn train_state(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("train_state"))
        .with_context(|| format!("{} holds no train_state", path.display()))?;
    Ok(serde_json::from_str(json)?)
}

fn names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Hidden or temporary files: what an interrupted atomic write leaves.
fn temporaries(dir: &Path) -> Result<Vec<String>> {
    Ok(names(dir)?.into_iter().filter(|n| n.starts_with('.') || n.ends_with(".tmp")).collect())
}

/// Every file under its final name is whole: JSON parses, every metrics line parses and the
/// records are a prefix of the uninterrupted run's, safetensors files deserialise, images end.
fn check_whole(run: &Path, reference: &Outcome) -> Result<()> {
    for name in names(run)? {
        let path = run.join(&name);
        let bytes = std::fs::read(&path)?;
        match name.as_str() {
            "config.json" => {
                serde_json::from_slice::<Value>(&bytes).with_context(|| format!("{name} is torn"))?;
            }
            "metrics.jsonl" => {
                let records = metrics(run)?;
                ensure!(
                    reference.metrics.starts_with(&records),
                    "metrics.jsonl is not a prefix of the uninterrupted run's:\n{records:?}"
                );
            }
            CHECKPOINT | BEST => {
                safetensors::SafeTensors::deserialize(&bytes).with_context(|| format!("{name} is torn"))?;
            }
            "curves.png" => ensure!(bytes.ends_with(&[0xae, 0x42, 0x60, 0x82]), "{name} lacks its IEND chunk"),
            "curves.svg" => ensure!(String::from_utf8_lossy(&bytes).trim_end().ends_with("</svg>"), "{name} is torn"),
            _ => {}
        }
    }
    // A checkpoint that records a best accuracy has the best weights beside it.
    if run.join(CHECKPOINT).is_file() {
        let state = train_state(&run.join(CHECKPOINT))?;
        let records_best = ["best_test_acc", "best_val_acc", "best_acc"].iter().any(|k| state[k].is_number());
        ensure!(
            !records_best || run.join(BEST).is_file(),
            "the checkpoint records a best accuracy but {BEST} is missing"
        );
    }
    Ok(())
}

/// Resumes `run` after a fault. With a checkpoint, the resume must succeed and end exactly where
/// the uninterrupted run ended, with no temporary file left; without one it must be refused with
/// a message that says why. Returns whether it resumed.
fn resume_and_compare(data: &Path, run: &Path, reference: &Outcome, what: &str) -> Result<bool> {
    let had_checkpoint = run.join(CHECKPOINT).is_file();
    let resumed = finish(command(&resume_args(data, run)))?;
    if !had_checkpoint {
        clean_failure(&resumed, what)?;
        ensure!(
            resumed.stderr.contains(CHECKPOINT) || resumed.stderr.contains("resume"),
            "{what}: the refusal does not say why:\n{}",
            resumed.stderr
        );
        return Ok(false);
    }
    ensure!(resumed.code == Some(0), "{what}: resume failed with {:?}:\n{}", resumed.code, resumed.stderr);
    let got = outcome(run).with_context(|| what.to_string())?;
    ensure!(
        got.metrics == reference.metrics,
        "{what}: metrics differ from the uninterrupted run's:\n{:?}",
        got.metrics
    );
    for (file, got, want) in [(CHECKPOINT, &got.checkpoint, &reference.checkpoint), (BEST, &got.best, &reference.best)]
    {
        let differing: Vec<&String> =
            want.keys().chain(got.keys()).filter(|k| got.get(*k) != want.get(*k)).take(5).collect();
        ensure!(differing.is_empty(), "{what}: {file} differs from the uninterrupted run's in {differing:?}");
    }
    let left = temporaries(run)?;
    ensure!(left.is_empty(), "{what}: temporary files left after the resume: {left:?}");
    Ok(true)
}

/// A seeded stream of fractions in [0, 1) (SplitMix64), so the kill instants are reproducible.
struct Fractions(u64);

impl Iterator for Fractions {
    type Item = f64;
    fn next(&mut self) -> Option<f64> {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Some((z ^ (z >> 31)) as f64 / 2f64.powi(64))
    }
}

fn spawn_quiet(args: &[String]) -> Result<Child> {
    command(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().context("starting resnet-cli")
}

/// SIGKILL (what `kill -9` sends) and reap; false when the run had already exited.
fn kill_9(child: &mut Child) -> Result<bool> {
    let running = child.try_wait()?.is_none();
    if running {
        child.kill()?;
    }
    child.wait()?;
    Ok(running)
}

#[test]
fn kill_9_at_random_instants_then_resume_matches_the_uninterrupted_run() -> Result<()> {
    let reference = reference()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    // Instants spread over the whole uninterrupted run, start-up included, and a little past it.
    let horizon = reference.wall.mul_f64(1.1);
    let (mut refused, mut resumed_partial, mut finished) = (0, 0, 0);
    for (trial, fraction) in Fractions(12).take(KILL_TRIALS).enumerate() {
        let run = dir.path().join(format!("run-{trial}"));
        let delay = horizon.mul_f64(fraction);
        let what = format!("trial {trial} (kill -9 after {delay:?})");
        let mut child = spawn_quiet(&train_args(&data, &run))?;
        std::thread::sleep(delay);
        let killed = kill_9(&mut child)?;
        if run.is_dir() {
            check_whole(&run, &reference.outcome).with_context(|| what.clone())?;
        }
        if !run.is_dir() {
            refused += 1;
        } else if resume_and_compare(&data, &run, &reference.outcome, &what)? {
            if killed {
                resumed_partial += 1;
            } else {
                finished += 1;
            }
        } else {
            refused += 1;
        }
        std::fs::remove_dir_all(&run).ok();
    }
    // The trials must have interrupted real training, not only start-up or a finished run.
    ensure!(
        resumed_partial >= 3,
        "only {resumed_partial} of {KILL_TRIALS} kills left a checkpoint to resume \
         ({refused} before the first checkpoint, {finished} after the end)"
    );
    Ok(())
}

#[test]
fn kill_9_during_a_file_write_leaves_nothing_stale_after_resume() -> Result<()> {
    let reference = reference()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    // Kill the moment a checkpoint's temporary file exists (its write and fsync take the longest)
    // until WRITE_KILL_TRIALS kills have stranded one; attempt a waits for the (a mod EPOCHS)-th
    // such write, so the kills land in different epochs.
    let (mut stranded, mut attempts) = (0, 0);
    while stranded < WRITE_KILL_TRIALS && attempts < 4 * WRITE_KILL_TRIALS {
        let run = dir.path().join(format!("run-{attempts}"));
        let mut child = spawn_quiet(&train_args(&data, &run))?;
        let (mut writes, mut present) = (0, false);
        while child.try_wait()?.is_none() {
            let tmp =
                if run.is_dir() { temporaries(&run)?.into_iter().any(|n| n.contains("safetensors")) } else { false };
            if tmp && !present {
                writes += 1;
                if writes > attempts % EPOCHS {
                    kill_9(&mut child)?;
                    break;
                }
            }
            present = tmp;
            std::thread::sleep(Duration::from_micros(100));
        }
        child.wait()?;
        attempts += 1;
        let left = temporaries(&run)?;
        if left.is_empty() {
            std::fs::remove_dir_all(&run).ok();
            continue;
        }
        stranded += 1;
        let what = format!("kill -9 leaving {left:?}");
        check_whole(&run, &reference.outcome).with_context(|| what.clone())?;
        resume_and_compare(&data, &run, &reference.outcome, &what)?;
        std::fs::remove_dir_all(&run).ok();
    }
    ensure!(stranded >= 1, "no kill in {attempts} attempts landed while a checkpoint was being written");
    Ok(())
}

#[test]
fn kill_9_the_instant_each_checkpoint_lands_keeps_the_best_file_it_records() -> Result<()> {
    let reference = reference()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    // Trial e kills the run as soon as the checkpoint of epoch e + 1 is in place (a rename gives
    // it a new inode): any file the write order puts after the checkpoint is not there yet.
    for trial in 0..EPOCHS {
        let run = dir.path().join(format!("run-{trial}"));
        let mut child = spawn_quiet(&train_args(&data, &run))?;
        let (mut inode, mut landed) = (None, 0);
        while child.try_wait()?.is_none() {
            let now = std::fs::metadata(run.join(CHECKPOINT)).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
            if now.is_some() && now != inode {
                inode = now;
                landed += 1;
                if landed > trial {
                    kill_9(&mut child)?;
                    break;
                }
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        child.wait()?;
        let what = format!("kill -9 as checkpoint {} landed", trial + 1);
        check_whole(&run, &reference.outcome).with_context(|| what.clone())?;
        resume_and_compare(&data, &run, &reference.outcome, &what)?;
        std::fs::remove_dir_all(&run).ok();
    }
    Ok(())
}

/// Sets the child's largest writable file size to `bytes` and ignores SIGXFSZ, so a write past
/// it returns EFBIG (as a full disk returns ENOSPC) instead of killing the process.
fn limit_file_size(cmd: &mut Command, bytes: u64) {
    // SAFETY: only async-signal-safe calls (setrlimit, signal) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[test]
fn a_full_disk_during_any_write_fails_clearly_and_the_run_stays_resumable() -> Result<()> {
    let reference = reference()?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    // Nothing writable, then a little short of each file the run writes, which fails that file
    // (and every larger one) at the latest in the last epoch. The margin covers the few bytes by
    // which the recorded timings make sizes vary between runs.
    let mut limits: Vec<(u64, String)> = vec![(0, "everything".into())];
    for (name, size) in &reference.sizes {
        limits.push((size.saturating_sub(size / 50 + 16), name.clone()));
    }
    for (i, (limit, file)) in limits.iter().enumerate() {
        let run = dir.path().join(format!("run-{i}"));
        let what = format!("RLIMIT_FSIZE {limit} bytes (short of {file})");
        let mut cmd = command(&train_args(&data, &run));
        limit_file_size(&mut cmd, *limit);
        let done = finish(cmd)?;
        clean_failure(&done, &what)?;
        ensure!(
            done.stderr.contains("File too large") || done.stderr.contains("No space"),
            "{what}: the error does not name the cause:\n{}",
            done.stderr
        );
        if run.is_dir() {
            check_whole(&run, &reference.outcome).with_context(|| what.clone())?;
            let left = temporaries(&run)?;
            ensure!(left.is_empty(), "{what}: temporary files left by the failed write: {left:?}");
            resume_and_compare(&data, &run, &reference.outcome, &what)?;
        }
    }
    Ok(())
}

/// Runs the command as `nobody` when the tests run as root, for whom permissions do not stop
/// writes.
fn as_unprivileged(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() == 0
                && (libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(65534) != 0 || libc::setuid(65534) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes `path` and its ancestors up to `/` traversable by others, so `nobody` reaches the binary
/// and the data (a temporary directory is private by default).
fn open_to_others(path: &Path) -> Result<()> {
    for dir in path.ancestors() {
        if dir.as_os_str().is_empty() || dir == Path::new("/") {
            continue;
        }
        let mut perms = std::fs::metadata(dir)?.permissions();
        if perms.mode() & 0o005 != 0o005 {
            perms.set_mode(perms.mode() | 0o005);
            std::fs::set_permissions(dir, perms)?;
        }
    }
    Ok(())
}

/// A copy of the binary in `dir` (opened to others) that an unprivileged user can run: the build
/// folder may sit under a folder only root can enter, such as a clone in a 0700 home or
/// temporary folder.
fn binary_for_others(dir: &Path) -> Result<PathBuf> {
    let copy = dir.join("resnet-cli");
    std::fs::copy(env!("CARGO_BIN_EXE_resnet-cli"), &copy)?;
    set_mode(&copy, 0o755)?;
    Ok(copy)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    Ok(std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?)
}

fn snapshot(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    names(dir)?.into_iter().map(|n| Ok((n.clone(), std::fs::read(dir.join(n))?))).collect()
}

#[test]
fn a_read_only_run_folder_is_refused_and_left_untouched() -> Result<()> {
    let reference = reference()?;
    let dir: TempDir = tempfile::tempdir()?;
    let (data, run) = (dir.path().join("data"), dir.path().join("run"));
    write_data(&data)?;
    // A run stopped after its first epoch: kill -9 once its checkpoint and best file exist.
    let mut child = spawn_quiet(&train_args(&data, &run))?;
    while child.try_wait()?.is_none() && !(run.join(CHECKPOINT).is_file() && run.join(BEST).is_file()) {
        std::thread::sleep(Duration::from_micros(200));
    }
    kill_9(&mut child)?;
    ensure!(run.join(CHECKPOINT).is_file(), "the run ended without a checkpoint");
    let state = train_state(&run.join(CHECKPOINT))?;
    ensure!(state["epochs_done"].as_u64().is_some_and(|e| (e as usize) < EPOCHS), "the run finished before the kill");

    for path in [dir.path(), &data] {
        open_to_others(path)?;
    }
    for entry in std::fs::read_dir(&data)? {
        set_mode(&entry?.path(), 0o644)?;
    }
    for entry in std::fs::read_dir(&run)? {
        set_mode(&entry?.path(), 0o444)?;
    }
    set_mode(&run, 0o555)?;
    let before = snapshot(&run)?;
    let exe = binary_for_others(dir.path())?;

    let mut cmd = command_of(&exe, &resume_args(&data, &run));
    as_unprivileged(&mut cmd);
    let done = finish(cmd)?;
    clean_failure(&done, "resume into a read-only folder")?;
    ensure!(
        done.stderr.contains("Permission denied") || done.stderr.contains("read-only"),
        "the error does not say the folder cannot be written:\n{}",
        done.stderr
    );
    ensure!(snapshot(&run)? == before, "a refused resume changed the read-only folder");

    // A new run under a read-only parent is refused too, and leaves nothing.
    let parent = dir.path().join("read-only-parent");
    std::fs::create_dir(&parent)?;
    set_mode(&parent, 0o555)?;
    let mut cmd = command_of(&exe, &train_args(&data, &parent.join("run")));
    as_unprivileged(&mut cmd);
    let done = finish(cmd)?;
    clean_failure(&done, "train --out under a read-only folder")?;
    ensure!(names(&parent)?.is_empty(), "a refused run wrote into the read-only parent");

    // Writable again, the stopped run resumes to the uninterrupted result.
    set_mode(&run, 0o755)?;
    for entry in std::fs::read_dir(&run)? {
        set_mode(&entry?.path(), 0o644)?;
    }
    ensure!(resume_and_compare(&data, &run, &reference.outcome, "resume once writable")?, "the run did not resume");
    Ok(())
}
