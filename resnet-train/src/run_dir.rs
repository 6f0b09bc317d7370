//! The run directory: config, metrics, curves and checkpoints of one training run, and the
//! crash-safe way every file in it is written.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

/// File names inside a run directory.
pub mod files {
    /// The training configuration, JSON.
    pub const CONFIG: &str = "config.json";
    /// One JSON record per line: ~5 points per epoch, one summary per epoch, an early stop.
    pub const METRICS: &str = "metrics.jsonl";
    /// The latest checkpoint: weights, optimiser state, schedule position, epoch and RNG state.
    pub const CHECKPOINT: &str = "checkpoint.safetensors";
    /// The weights of the best epoch so far (by validation accuracy with a split, else test).
    pub const BEST: &str = "best.safetensors";
    /// Curves as PNG.
    pub const CURVES_PNG: &str = "curves.png";
    /// Curves as SVG.
    pub const CURVES_SVG: &str = "curves.svg";
}

/// A run directory on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Takes `path` for a new run: it must not exist (it is created, with missing parents) or be
    /// an empty directory. A folder holding a run, or anything else, is refused untouched.
    pub fn create(path: &Path) -> Result<Self> {
        let io = |source| TrainError::Io { path: path.to_path_buf(), source };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| TrainError::Io { path: parent.to_path_buf(), source })?;
        }
        match std::fs::create_dir(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !path.is_dir() {
                    return Err(io(e));
                }
                if path.join(files::CHECKPOINT).exists() {
                    return Err(TrainError::RunExists { path: path.to_path_buf() });
                }
                let mut names: Vec<String> = std::fs::read_dir(path)
                    .map_err(io)?
                    .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect();
                if !names.is_empty() {
                    names.sort();
                    let more = names.len().saturating_sub(3);
                    names.truncate(3);
                    let mut entries = names.join(", ");
                    if more > 0 {
                        entries.push_str(&format!(" and {more} more"));
                    }
                    return Err(TrainError::NotEmpty { path: path.to_path_buf(), entries });
                }
            }
            Err(e) => return Err(io(e)),
        }
        Ok(Self { path: path.to_path_buf() })
    }

    /// A new directory `<parent>/<label>-<UTC time>` such as `runs/quick-2026-11-30T16-26-00`.
    /// The leaf is created atomically; when another run took the name in the same second, `-2`,
    /// `-3`, ... is appended.
    pub fn fresh_under(parent: &Path, label: &str) -> Result<Self> {
        std::fs::create_dir_all(parent).map_err(|source| TrainError::Io { path: parent.to_path_buf(), source })?;
        let stamp = utc_stamp(std::time::SystemTime::now());
        for n in 1..=1000u32 {
            let name = if n == 1 { format!("{label}-{stamp}") } else { format!("{label}-{stamp}-{n}") };
            let path = parent.join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(TrainError::Io { path, source }),
            }
        }
        Err(TrainError::Io {
            path: parent.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "1000 runs already started this second"),
        })
    }

    /// An existing run directory, for resuming. Temporary files that writers killed mid-write
    /// left behind (their process is gone) are removed; they are never read.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = Self { path: path.to_path_buf() };
        if !dir.checkpoint().is_file() {
            return Err(TrainError::Resume {
                path: path.to_path_buf(),
                reason: format!("no {} there; give the folder of an earlier run", files::CHECKPOINT),
            });
        }
        dir.sweep_stale_temporaries();
        Ok(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The latest checkpoint's path.
    pub fn checkpoint(&self) -> PathBuf {
        self.path.join(files::CHECKPOINT)
    }

    /// The best checkpoint's path.
    pub fn best(&self) -> PathBuf {
        self.path.join(files::BEST)
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes `bytes` to `name` with [`write_atomic`].
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.file(name);
        write_atomic(&path, bytes).map_err(|source| TrainError::Io { path, source })
    }

    fn sweep_stale_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.path) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = temporary_owner(&name) else { continue };
            if pid != std::process::id() && !process_alive(pid) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => tracing::warn!("removed {name}, left by an interrupted write of process {pid}"),
                    Err(e) => tracing::warn!("could not remove the stale temporary {name}: {e}"),
                }
            }
        }
    }
}

/// Writes `bytes` to a temporary sibling `.<name>.<pid>.tmp`, syncs it, renames it over `path`
/// and syncs the directory, so after a crash at any instant `path` holds either the old or the
/// new contents, and after return the new contents survive a power cut.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)
    })();
    if result.is_err() {
        // The temporary may not exist (the create failed); there is nothing else to undo.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes a rename in `path`'s directory durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(parent)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// The PID in a temporary name written by [`write_atomic`] (`.<name>.<pid>.tmp`) or by the
/// plots, whose temporaries keep their extension (`.<stem>.<pid>.tmp.<ext>`).
fn temporary_owner(name: &str) -> Option<u32> {
    let inner = name.strip_prefix('.')?;
    let stem = inner.strip_suffix(".tmp").or_else(|| inner.rsplit_once(".tmp.").map(|(stem, _)| stem))?;
    stem.rsplit_once('.')?.1.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    #[cfg(target_os = "linux")]
    {
        Path::new("/proc").join(pid.to_string()).exists()
    }
    #[cfg(not(target_os = "linux"))]
    {
        // Without /proc there is no cheap check: keep the file rather than remove a live write.
        let _ = pid;
        true
    }
}

/// `YYYY-MM-DDTHH-MM-SS` in UTC (hyphens instead of colons, which some file systems refuse).
fn utc_stamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}-{:02}-{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn stamps_are_readable_utc() {
        let t = |s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(utc_stamp(t(0)), "1970-01-01T00-00-00");
        assert_eq!(utc_stamp(t(1_796_055_996)), "2026-11-30T16-26-36");
        assert_eq!(utc_stamp(t(951_782_400)), "2000-02-29T00-00-00");
    }

    #[test]
    fn create_refuses_folders_with_files_and_runs() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let user = tmp.path().join("mine");
        std::fs::create_dir(&user)?;
        std::fs::write(user.join("config.json"), b"the user's own")?;
        assert!(matches!(RunDir::create(&user), Err(TrainError::NotEmpty { .. })));
        assert_eq!(std::fs::read(user.join("config.json"))?, b"the user's own");
        let run = tmp.path().join("run");
        std::fs::create_dir(&run)?;
        std::fs::write(run.join(files::CHECKPOINT), b"x")?;
        assert!(matches!(RunDir::create(&run), Err(TrainError::RunExists { .. })));
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty)?;
        RunDir::create(&empty)?;
        RunDir::create(&tmp.path().join("a/b/new"))?;
        Ok(())
    }

    #[test]
    fn fresh_names_never_collide() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let a = RunDir::fresh_under(tmp.path(), "quick")?;
        let b = RunDir::fresh_under(tmp.path(), "quick")?;
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().and_then(|n| n.to_str()).ok_or("name")?;
        assert!(name.starts_with("quick-20") && name.contains('T') && name.len() == "quick-2026-11-30T16-26-00".len());
        Ok(())
    }

    #[test]
    fn stale_temporaries_of_dead_writers_are_swept_on_open() -> TestResult {
        let tmp = tempfile::tempdir()?;
        std::fs::write(tmp.path().join(files::CHECKPOINT), b"x")?;
        // PID 0 is never a user process, so its temporary is stale.
        let stale = tmp.path().join(".checkpoint.safetensors.0.tmp");
        let mine = tmp.path().join(format!(".checkpoint.safetensors.{}.tmp", std::process::id()));
        std::fs::write(&stale, b"torn")?;
        std::fs::write(&mine, b"in progress")?;
        RunDir::open(tmp.path())?;
        assert!(!stale.exists() && mine.exists());
        assert_eq!(temporary_owner(".best.safetensors.42.tmp"), Some(42));
        assert_eq!(temporary_owner(".curves.17254.tmp.svg"), Some(17254));
        assert_eq!(temporary_owner("curves.svg"), None);
        assert_eq!(temporary_owner("best.safetensors"), None);
        Ok(())
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let path = tmp.path().join("f");
        write_atomic(&path, b"one")?;
        write_atomic(&path, b"two")?;
        assert_eq!(std::fs::read(&path)?, b"two");
        assert_eq!(std::fs::read_dir(tmp.path())?.count(), 1);
        Ok(())
    }
}
