// Shared by the build scripts of resnet-data, resnet-tests and xtask (each `include!`s this file):
// it decides at build time whether the real Fashion-MNIST is installed, so that tests needing it
// are compiled as `#[ignore = "<why>"]` where it is not and the test runner's own output shows
// `ignored, <why>` instead of a silent pass. Under `CI=true` the data is required: the cfg is set
// whatever is found, and a missing data set fails the tests that need it.

use std::path::{Path, PathBuf};

/// The four files, without the `.gz` that each may carry.
const DATA_FILES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];
/// Debian's `dataset-fashion-mnist` directory.
const DEBIAN_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Which directories count and which form the files must take there.
#[allow(dead_code)] // Each build script uses one of the two.
enum Wanted {
    /// `$RESNET_DATA_DIR`, the user cache `cargo xtask fetch-data` installs into, then Debian's
    /// directory; each file raw or gzipped (what resnet-data loads).
    AnyInstall,
    /// Debian's directory with the four `.gz` files (what the fetch tests serve and install).
    DebianGzip,
}

/// Emits `cargo::rustc-cfg=<cfg>` when the data `wanted` is installed or `CI` is `true`, with
/// the check-cfg declaration and the rerun triggers for every variable and directory consulted.
fn emit_data_cfg(cfg: &str, wanted: Wanted) {
    println!("cargo::rustc-check-cfg=cfg({cfg})");
    for var in ["CI", "RESNET_DATA_DIR", "XDG_CACHE_HOME", "HOME"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let dirs = match wanted {
        Wanted::AnyInstall => candidate_dirs(),
        Wanted::DebianGzip => vec![PathBuf::from(DEBIAN_DATA_DIR)],
    };
    let gzip_only = matches!(wanted, Wanted::DebianGzip);
    for dir in &dirs {
        // Cargo reruns the script when a watched path changes, and on every build when one is
        // missing (which would rebuild the crate each time), so only existing paths are watched:
        // the data folder, or its parent where the folder does not exist yet, so that installing
        // the data there is noticed.
        if let Some(watched) = [Some(dir.as_path()), dir.parent()].into_iter().flatten().find(|p| p.is_dir()) {
            println!("cargo::rerun-if-changed={}", watched.display());
        }
    }
    let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let found = dirs.iter().find(|dir| {
        DATA_FILES
            .iter()
            .all(|name| dir.join(format!("{name}.gz")).is_file() || (!gzip_only && dir.join(name).is_file()))
    });
    if found.is_some() || ci {
        println!("cargo::rustc-cfg={cfg}");
    }
}

fn candidate_dirs() -> Vec<PathBuf> {
    let env = |var: &str| std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from);
    let cache = env("XDG_CACHE_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .map(|base| base.join("resnet-fashion").join("fashion-mnist"));
    env("RESNET_DATA_DIR").into_iter().chain(cache).chain([Path::new(DEBIAN_DATA_DIR).to_path_buf()]).collect()
}
