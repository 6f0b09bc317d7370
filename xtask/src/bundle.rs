//! `cargo xtask build-cuda --cudnn --bundle [DIR]`: the folder a GPU machine without Rust or
//! network runs (`scripts/device_check.sh`): the CUDA `resnet-cli` stripped and xz-compressed,
//! the check script, the PyTorch benchmark and its model file, and the four Fashion-MNIST files,
//! at most [`MAX_BUNDLE_BYTES`] in all and never the link-only `libcuda.so` stub.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The most a bundle may hold: the device machine takes 64 MiB of files, and the check's own
/// outputs need room.
pub const MAX_BUNDLE_BYTES: u64 = 60 * 1024 * 1024;

/// The scripts the bundle carries, from the repository's `scripts/`.
const SCRIPTS: [&str; 3] = ["device_check.sh", "bench_pytorch.py", "make_parity_fixture.py"];

/// Builds the bundle in `dir` (replacing it) from the built `resnet-cli` at `binary`, and
/// prints its size and how to run it.
pub fn build(root: &Path, binary: &Path, dir: &Path) -> Result<()> {
    let staging = dir.with_extension("partial");
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("cannot clear {}", staging.display()))?;
    }
    fs::create_dir_all(staging.join("data")).with_context(|| format!("cannot create {}", staging.display()))?;

    let stripped = staging.join("resnet-cli");
    let ok = Command::new("objcopy")
        .arg("--strip-all")
        .arg(binary)
        .arg(&stripped)
        .status()
        .context("cannot run objcopy (Debian: apt-get install binutils)")?;
    if !ok.success() {
        bail!("objcopy --strip-all {} failed", binary.display());
    }
    println!("compressing {} with xz", stripped.display());
    let ok = Command::new("xz")
        .args(["-9", "-T0", "--force"])
        .arg(&stripped)
        .status()
        .context("cannot run xz (Debian: apt-get install xz-utils)")?;
    if !ok.success() {
        bail!("xz failed on {}", stripped.display());
    }

    for script in SCRIPTS {
        let src = root.join("scripts").join(script);
        fs::copy(&src, staging.join(script)).with_context(|| format!("cannot copy {}", src.display()))?;
    }
    let data = data_source()?;
    for name in resnet_data::FILES {
        let src = data.join(format!("{name}.gz"));
        crate::fetch::verify_dataset_file(&src)?;
        fs::copy(&src, staging.join("data").join(format!("{name}.gz")))
            .with_context(|| format!("cannot copy {}", src.display()))?;
    }
    let total = check_bundle(&staging, MAX_BUNDLE_BYTES)?;
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    fs::rename(&staging, dir).with_context(|| format!("cannot move the bundle to {}", dir.display()))?;

    println!("\ndevice bundle: {} ({:.1} MiB of at most 60 MiB)", dir.display(), total as f64 / 1048576.0);
    for entry in list_files(dir)? {
        let size = fs::metadata(&entry)?.len();
        let rel = entry.strip_prefix(dir).unwrap_or(&entry);
        println!("  {:>10}  {}", size, rel.display());
    }
    println!(
        "\nOn the GPU machine (NVIDIA driver and PyTorch with CUDA 13 installed), with the folder copied \
         there as device-bundle/:\n  bash device-bundle/device_check.sh \"$OUT\"\n\
         It finishes within 8 minutes and writes results.json and results.md into $OUT."
    );
    Ok(())
}

/// Where the Fashion-MNIST `.gz` files come from: the user cache `fetch-data` fills, else
/// Debian's package.
fn data_source() -> Result<PathBuf> {
    let has_all = |d: &Path| resnet_data::FILES.iter().all(|n| d.join(format!("{n}.gz")).is_file());
    let cache = crate::fetch::default_data_dir()?;
    for dir in [cache, PathBuf::from(resnet_data::DEBIAN_DIR)] {
        if has_all(&dir) {
            return Ok(dir);
        }
    }
    bail!(
        "the four Fashion-MNIST .gz files are neither in the cache nor in {}; run cargo xtask fetch-data",
        resnet_data::DEBIAN_DIR
    )
}

/// Every regular file under `dir`, sorted.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The bundle's total size, after checking that it holds no driver library (the link-only stub
/// must never reach a machine with a real driver) and fits `limit` bytes.
pub fn check_bundle(dir: &Path, limit: u64) -> Result<u64> {
    let mut total = 0;
    for path in list_files(dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.starts_with("libcuda.so") || name.starts_with("libcuda-stub") {
            bail!("{} is the CUDA driver (or its link stub) and must not be in the bundle", path.display());
        }
        total += fs::metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?.len();
    }
    if total > limit {
        bail!(
            "the bundle at {} is {:.1} MiB, over the {:.0} MiB limit; list it with `du -ah {}`",
            dir.display(),
            total as f64 / 1048576.0,
            limit as f64 / 1048576.0,
            dir.display()
        );
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_over_the_limit_or_with_the_driver_stub_is_refused() -> Result<()> {
        let dir = tempfile::tempdir()?;
        fs::create_dir_all(dir.path().join("data"))?;
        fs::write(dir.path().join("resnet-cli.xz"), vec![0u8; 1000])?;
        fs::write(dir.path().join("data").join("x.gz"), vec![0u8; 24])?;
        assert_eq!(check_bundle(dir.path(), 1024)?, 1024, "files in subfolders count");
        let over = check_bundle(dir.path(), 1023).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(over.contains("over the"), "{over}");
        fs::write(dir.path().join("libcuda.so"), b"stub")?;
        let stub = check_bundle(dir.path(), 1 << 20).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(stub.contains("must not be in the bundle"), "{stub}");
        Ok(())
    }
}
