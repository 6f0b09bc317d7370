//! Atomic installation: write to a temporary name in the target directory, verify, then rename.
//!
//! Invariant: a file under its final name has passed [`verify_file`]; a temporary file never
//! outlives the attempt that created it, except when the process is killed: then it keeps a hidden
//! `.part` name that nothing reads, and the next run removes it ([`remove_stale_parts`]).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::{write::GzEncoder, Compression};

use super::manifest::FileSpec;
use super::verify::{verify_file, Encoding, VerifyError};

/// A hidden file in the target directory that is removed when dropped unless persisted.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

/// Why a candidate file was not installed.
#[derive(Debug)]
pub enum CommitError {
    /// The candidate does not match its spec; nothing was installed.
    Rejected(VerifyError),
    /// Writing, compressing or renaming failed on our side.
    Io(io::Error),
}

/// Where to find a local copy of `spec` in `dir`: the gzipped name, then the uncompressed one.
pub fn local_candidates(dir: &Path, spec: &FileSpec) -> [PathBuf; 2] {
    [dir.join(&spec.name), dir.join(spec.raw_name())]
}

/// Copies `src` (gzipped or not) into `dir` under `spec.name`, verified, gzipped and atomically.
pub fn install_local(src: &Path, spec: &FileSpec, dir: &Path) -> Result<Encoding, CommitError> {
    let mut input = File::open(src).map_err(CommitError::Io)?;
    let mut temp = TempFile::create(dir, &spec.name).map_err(CommitError::Io)?;
    io::copy(&mut input, temp.file()).map_err(CommitError::Io)?;
    commit(temp, spec, dir)
}

/// Verifies `temp` and renames it to `dir/spec.name`, gzipping it first if it is uncompressed.
///
/// On any error the temporary file(s) are removed and nothing appears under the final name.
pub fn commit(mut temp: TempFile, spec: &FileSpec, dir: &Path) -> Result<Encoding, CommitError> {
    temp.file().flush().map_err(CommitError::Io)?;
    let encoding = verify_file(temp.path(), spec).map_err(CommitError::Rejected)?;
    let temp = match encoding {
        Encoding::Gzip => temp,
        Encoding::Raw => {
            // The data loader reads `.gz` names, so an uncompressed copy is stored compressed,
            // then verified again: what gets renamed is always what was checked.
            let gz = gzip_copy(temp.path(), dir, &spec.name).map_err(CommitError::Io)?;
            verify_file(gz.path(), spec).map_err(CommitError::Rejected)?;
            gz
        }
    };
    temp.persist(&dir.join(&spec.name)).map_err(CommitError::Io)?;
    Ok(encoding)
}

impl TempFile {
    /// Creates `dir/.NAME.PID-N.part`, failing rather than reusing an existing file.
    pub fn create(dir: &Path, final_name: &str) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{final_name}.{}-{n}.part", std::process::id()));
        let file = OpenOptions::new().write(true).read(true).create_new(true).open(&path)?;
        Ok(Self { path, file: Some(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("the file is only taken by persist, which consumes self")
    }

    /// Flushes the file to disk and renames it to `dest`.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        let file = self.file.take().expect("the file is only taken here");
        file.sync_all()?;
        drop(file);
        fs::rename(&self.path, dest)?;
        // Renamed: there is nothing left for Drop to remove.
        self.path = PathBuf::new();
        // The rename is durable only once the directory entry is on disk.
        if let Some(dir) = dest.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Removes the `.part` files of `final_name` in `dir` that a killed run left: those whose
/// creating process no longer exists. A live process's file is kept, so two runs into one
/// directory do not break each other. Returns the names removed.
pub fn remove_stale_parts(dir: &Path, final_name: &str) -> io::Result<Vec<String>> {
    let prefix = format!(".{final_name}.");
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".part")) else {
            continue;
        };
        let Some(pid) = pid.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !process_exists(pid) {
            fs::remove_file(dir.join(&name))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Whether process `pid` exists. Where that cannot be told (no `/proc`), it is assumed to, so
/// nothing is removed that might still be written.
fn process_exists(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.path.as_os_str().is_empty() {
            // Best effort: a leftover `.part` file is hidden and never read.
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl fmt::Display for CommitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommitError::Rejected(e) => write!(f, "failed verification: {e}"),
            CommitError::Io(e) => write!(f, "could not write the file: {e}"),
        }
    }
}

impl std::error::Error for CommitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CommitError::Rejected(e) => Some(e),
            CommitError::Io(e) => Some(e),
        }
    }
}

fn gzip_copy(src: &Path, dir: &Path, final_name: &str) -> io::Result<TempFile> {
    let mut gz = TempFile::create(dir, final_name)?;
    let mut input = BufReader::new(File::open(src)?);
    let mut encoder = GzEncoder::new(BufWriter::new(gz.file()), Compression::default());
    io::copy(&mut input, &mut encoder)?;
    encoder.finish()?.flush()?;
    Ok(gz)
}

#[cfg(test)]
mod tests {
    use super::super::verify::sha256_hex;
    use super::*;

    fn names_in(dir: &Path) -> io::Result<Vec<String>> {
        let mut names = fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<io::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    }

    #[test]
    fn a_raw_copy_is_installed_gzipped() -> Result<(), Box<dyn std::error::Error>> {
        let (src, dest) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let content = b"\0\0\x08\x01\0\0\0\x03\x01\x02\x03".to_vec();
        let spec = FileSpec::new("l-idx1-ubyte.gz", content.len() as u64, &sha256_hex(&content));
        let raw = src.path().join(spec.raw_name());
        fs::write(&raw, &content)?;
        assert_eq!(install_local(&raw, &spec, dest.path())?, Encoding::Raw);
        assert_eq!(names_in(dest.path())?, vec![spec.name.clone()]);
        assert_eq!(verify_file(&dest.path().join(&spec.name), &spec)?, Encoding::Gzip);
        Ok(())
    }

    #[test]
    fn a_rejected_file_leaves_nothing_behind() -> Result<(), Box<dyn std::error::Error>> {
        let (src, dest) = (tempfile::tempdir()?, tempfile::tempdir()?);
        let spec = FileSpec::new("l-idx1-ubyte.gz", 3, &sha256_hex(b"abc"));
        let bad = src.path().join("bad");
        fs::write(&bad, b"abd")?;
        let result = install_local(&bad, &spec, dest.path());
        assert!(matches!(result, Err(CommitError::Rejected(VerifyError::Checksum { .. }))));
        assert!(names_in(dest.path())?.is_empty());
        Ok(())
    }

    #[test]
    fn stale_parts_of_dead_processes_are_removed_and_live_ones_kept() -> Result<(), Box<dyn std::error::Error>> {
        let dest = tempfile::tempdir()?;
        let live = TempFile::create(dest.path(), "x.gz")?;
        // No process has this id (above Linux's pid_max).
        let dead = ".x.gz.4294967295-0.part";
        for name in [dead, ".y.gz.4294967295-0.part", ".x.gz.notapid.part", "x.gz"] {
            fs::write(dest.path().join(name), b"partial")?;
        }
        assert_eq!(remove_stale_parts(dest.path(), "x.gz")?, vec![dead.to_string()]);
        let mut expected = vec![".x.gz.notapid.part", ".y.gz.4294967295-0.part", "x.gz"];
        let live_name = live.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        expected.push(&live_name);
        expected.sort();
        assert_eq!(names_in(dest.path())?, expected);
        Ok(())
    }

    #[test]
    fn a_dropped_temp_file_is_removed() -> Result<(), Box<dyn std::error::Error>> {
        let dest = tempfile::tempdir()?;
        let mut temp = TempFile::create(dest.path(), "x.gz")?;
        temp.file().write_all(b"partial")?;
        assert_eq!(names_in(dest.path())?.len(), 1);
        drop(temp);
        assert!(names_in(dest.path())?.is_empty());
        Ok(())
    }
}
