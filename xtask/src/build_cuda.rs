//! `cargo xtask build-cuda`: the CUDA build of `resnet-cli` (and of `xtask` itself, for
//! `bench --device cuda`) on a machine with no GPU and no system CUDA toolkit.
//!
//! candle's `cuda` feature needs `nvcc` at build time and links the CUDA libraries. PyPI carries
//! the toolkit as wheels, so this task:
//! 1. installs them into a venv under `--toolkit-dir` (once; `--skip-install` reuses it),
//! 2. assembles a `CUDA_HOME`-like folder from the wheel's files (nvcc refuses a symlinked
//!    `bin/`, and the wheels ship only versioned `.so` names),
//! 3. generates a link-only stub `libcuda.so` (the driver library comes with the GPU driver,
//!    never from PyPI; the stub is never put on a run-time library path),
//! 4. runs `cargo build --release --features cuda` into `target/cuda` for the given compute
//!    capability, and
//! 5. reports what the binaries link against and how to run them, and
//! 6. with `--bundle`, assembles the device bundle ([`crate::bundle`]).
//!
//! With a system toolkit (`nvcc` on `PATH`), `--system` skips steps 1–3.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

/// `cargo xtask build-cuda` flags.
#[derive(Debug, Args)]
pub struct BuildCudaArgs {
    /// GPU compute capability to build kernels for (90 = H100/H200, 89 = L4/RTX 40xx, 80 = A100).
    #[arg(long, default_value_t = 90)]
    pub compute_cap: u32,
    /// Folder for the PyPI toolkit venv and the assembled CUDA_HOME.
    #[arg(long, value_name = "DIR", default_value = "target/cuda-toolkit")]
    pub toolkit_dir: PathBuf,
    /// Version of PyPI's `cuda-toolkit` meta-package (13.0.x suits driver 580 and newer).
    #[arg(long, default_value = "13.0.2")]
    pub cuda_version: String,
    /// Python used to create the toolkit venv.
    #[arg(long, value_name = "PATH", default_value = "python3")]
    pub python: PathBuf,
    /// Reuse the toolkit already installed under --toolkit-dir (no network).
    #[arg(long)]
    pub skip_install: bool,
    /// Use the system CUDA toolkit (CUDA_HOME or nvcc on PATH) instead of PyPI's.
    #[arg(long, conflicts_with_all = ["skip_install"])]
    pub system: bool,
    /// Also enable cuDNN (candle uses it for the forward convolution); installs nvidia-cudnn.
    #[arg(long)]
    pub cudnn: bool,
    /// Cargo target directory for the CUDA build (kept apart from the CPU build's).
    #[arg(long, value_name = "DIR", default_value = "target/cuda")]
    pub target_dir: PathBuf,
    /// Build with `cargo check` only (compiles the CUDA kernels and all Rust code, links nothing).
    #[arg(long)]
    pub check: bool,
    /// Then assemble the device bundle in DIR (default target/device-bundle): the stripped,
    /// xz-compressed resnet-cli, scripts/device_check.sh, the PyTorch benchmark and the
    /// Fashion-MNIST files, at most 60 MiB. Needs --cudnn.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "target/device-bundle",
          conflicts_with = "check", requires = "cudnn")]
    pub bundle: Option<PathBuf>,
}

/// Libraries candle's CUDA backend links and the binaries need at run time.
const RUNTIME_LIBS: [&str; 5] = ["libcudart.so", "libcublas.so", "libcublasLt.so", "libcurand.so", "libnvrtc.so"];

pub fn run(args: BuildCudaArgs) -> Result<()> {
    let root = workspace_root()?;
    let toolkit_dir = root.join(&args.toolkit_dir);
    let target_dir = root.join(&args.target_dir);
    let mut envs: Vec<(String, String)> = vec![("CUDA_COMPUTE_CAP".into(), args.compute_cap.to_string())];
    let cuda_home = if args.system {
        let home = system_cuda_home()?;
        println!("using the system CUDA toolkit at {}", home.display());
        home
    } else {
        let site = install_toolkit(&args, &toolkit_dir)?;
        let home = toolkit_dir.join("cuda-home");
        assemble_cuda_home(&site, &home, args.cudnn)?;
        let stub_dir = home.join("lib64").join("stubs");
        write_driver_stub(&root, &stub_dir)?;
        envs.push(("LIBRARY_PATH".into(), join_paths(&[home.join("lib64"), stub_dir], "LIBRARY_PATH")));
        home
    };
    let nvcc = cuda_home.join("bin").join("nvcc");
    let version =
        Command::new(&nvcc).arg("--version").output().with_context(|| format!("cannot run {}", nvcc.display()))?;
    let version = String::from_utf8_lossy(&version.stdout);
    let release = version.lines().find(|l| l.contains("release")).unwrap_or("unknown release").trim().to_string();
    println!("nvcc: {release}");
    envs.push(("CUDA_HOME".into(), cuda_home.display().to_string()));
    envs.push(("CUDA_PATH".into(), cuda_home.display().to_string()));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![cuda_home.join("bin")];
    dirs.extend(std::env::split_paths(&path));
    envs.push(("PATH".into(), join_paths(&dirs, "PATH")));

    let features = if args.cudnn { "resnet-cli/cudnn,xtask/cudnn" } else { "resnet-cli/cuda,xtask/cuda" };
    let verb = if args.check { "check" } else { "build" };
    println!(
        "cargo {verb} --release -p resnet-cli -p xtask --features {features} (compute capability {}, target dir {})",
        args.compute_cap,
        target_dir.display()
    );
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(&root)
        .args([verb, "--release", "-p", "resnet-cli", "-p", "xtask", "--features", features, "--target-dir"])
        .arg(&target_dir)
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("the CUDA build failed ({status}); the compiler's messages are above");
    }
    if args.check {
        println!("CUDA check passed: every crate compiles with the `cuda` feature for sm_{}", args.compute_cap);
        return Ok(());
    }
    report(&target_dir.join("release"), &cuda_home, args.system)?;
    if let Some(dir) = &args.bundle {
        crate::bundle::build(&root, &target_dir.join("release").join("resnet-cli"), &root.join(dir))?;
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).context("xtask has no parent directory")
}

fn join_paths(dirs: &[PathBuf], what: &str) -> String {
    std::env::join_paths(dirs)
        .unwrap_or_else(|e| panic!("{what} entry contains a separator: {e}"))
        .to_string_lossy()
        .into_owned()
}

fn system_cuda_home() -> Result<PathBuf> {
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(dir) = std::env::var_os(var) {
            let dir = PathBuf::from(dir);
            if dir.join("bin").join("nvcc").is_file() {
                return Ok(dir);
            }
        }
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("nvcc").is_file() {
            if let Some(home) = dir.parent() {
                return Ok(home.to_path_buf());
            }
        }
    }
    let default = PathBuf::from("/usr/local/cuda");
    if default.join("bin/nvcc").is_file() {
        return Ok(default);
    }
    bail!("--system: no CUDA toolkit found (set CUDA_HOME, put nvcc on PATH, or drop --system to use PyPI's)")
}

/// Installs PyPI's toolkit wheels into `<dir>/venv` and returns the `site-packages` folder.
fn install_toolkit(args: &BuildCudaArgs, dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let python = venv.join("bin").join("python");
    let marker = dir.join(format!(".installed-{}{}", args.cuda_version, if args.cudnn { "-cudnn" } else { "" }));
    if args.skip_install || marker.is_file() {
        if !python.is_file() {
            bail!("--skip-install: no toolkit venv at {} (run once without --skip-install)", venv.display());
        }
    } else {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if !python.is_file() {
            println!("creating a venv for the CUDA toolkit at {}", venv.display());
            let ok = Command::new(&args.python)
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .with_context(|| format!("cannot run {} (pass --python)", args.python.display()))?;
            if !ok.success() {
                bail!("`{} -m venv` failed (on Debian: apt-get install python3-venv)", args.python.display());
            }
        }
        let mut packages =
            vec![format!("cuda-toolkit[nvcc,crt,cccl,cudart,cublas,curand,nvrtc,nvvm]=={}", args.cuda_version)];
        if args.cudnn {
            packages.push("nvidia-cudnn-cu13".into());
        }
        println!("installing {} from PyPI (about 1.5 GB)", packages.join(" "));
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "--quiet"])
            .args(&packages)
            .status()
            .context("cannot run pip in the toolkit venv")?;
        if !ok.success() {
            bail!("pip could not install the CUDA toolkit wheels (network? see pip's message above)");
        }
        fs::write(&marker, "").with_context(|| format!("cannot write {}", marker.display()))?;
    }
    let lib = venv.join("lib");
    let entries = fs::read_dir(&lib).with_context(|| format!("cannot read {}", lib.display()))?;
    for entry in entries {
        let site = entry?.path().join("site-packages");
        if site.join("nvidia").is_dir() {
            return Ok(site);
        }
    }
    bail!("no site-packages/nvidia under {}; the wheels did not install", lib.display())
}

/// Symlinks `src`'s entries into the real directory `dst`.
fn link_entries(src: &Path, dst: &Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let entry = entry?;
        let link = dst.join(entry.file_name());
        if !link.exists() {
            std::os::unix::fs::symlink(entry.path(), &link)
                .with_context(|| format!("cannot link {}", link.display()))?;
        }
    }
    Ok(())
}

/// Builds a CUDA_HOME-like folder from the wheels' `nvidia/cu13` tree.
fn assemble_cuda_home(site: &Path, home: &Path, cudnn: bool) -> Result<()> {
    let cu = ["cu13", "cu12"].iter().map(|v| site.join("nvidia").join(v)).find(|p| p.join("bin").is_dir());
    let Some(cu) = cu else { bail!("no nvidia/cu13/bin under {}; is the nvcc wheel installed?", site.display()) };
    if home.exists() {
        fs::remove_dir_all(home).with_context(|| format!("cannot clear {}", home.display()))?;
    }
    link_entries(&cu.join("bin"), &home.join("bin"))?;
    link_entries(&cu.join("include"), &home.join("include"))?;
    std::os::unix::fs::symlink(cu.join("nvvm"), home.join("nvvm")).context("cannot link nvvm")?;
    let lib64 = home.join("lib64");
    link_entries(&cu.join("lib"), &lib64)?;
    if cudnn {
        let dir = site.join("nvidia").join("cudnn");
        link_entries(&dir.join("include"), &home.join("include"))?;
        link_entries(&dir.join("lib"), &lib64)?;
    }
    // Unversioned names for the linker: libfoo.so.13.0.2 -> libfoo.so.
    for entry in fs::read_dir(&lib64)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(pos) = name.find(".so.") {
            let plain = lib64.join(&name[..pos + 3]);
            if !plain.exists() {
                std::os::unix::fs::symlink(&name, &plain)
                    .with_context(|| format!("cannot link {}", plain.display()))?;
            }
        }
    }
    for lib in RUNTIME_LIBS {
        if !lib64.join(lib).exists() {
            bail!("{lib} is missing from the toolkit wheels under {}", cu.display());
        }
    }
    Ok(())
}

/// Writes and compiles a link-only `libcuda.so` (soname `libcuda.so.1`) that defines every
/// driver entry point cudarc declares. The real driver library replaces it at run time.
fn write_driver_stub(root: &Path, dir: &Path) -> Result<()> {
    let sys = cudarc_driver_bindings(root)?;
    let text = fs::read_to_string(&sys).with_context(|| format!("cannot read {}", sys.display()))?;
    let mut names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("pub unsafe fn "))
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| name.starts_with("cu"))
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.len() < 100 {
        bail!("found only {} driver functions in {}; cudarc's layout changed", names.len(), sys.display());
    }
    fs::create_dir_all(dir)?;
    let mut source = String::from("/* Link-only stub of the CUDA driver; generated by cargo xtask build-cuda. */\n");
    for name in &names {
        source.push_str(&format!("int {name}(void) {{ return 999; }}\n"));
    }
    let c = dir.join("libcuda-stub.c");
    fs::write(&c, source)?;
    let ok = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(dir.join("libcuda.so"))
        .arg(&c)
        .status()
        .context("cannot run cc to build the libcuda stub")?;
    if !ok.success() {
        bail!("cc failed to build the libcuda link stub");
    }
    Ok(())
}

/// cudarc's driver bindings file, found through `cargo metadata`.
fn cudarc_driver_bindings(root: &Path) -> Result<PathBuf> {
    let out = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--features", "resnet-core/cuda"])
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("cargo metadata output")?;
    let packages = meta["packages"].as_array().context("cargo metadata has no packages")?;
    for package in packages {
        if package["name"] == "cudarc" {
            let manifest = PathBuf::from(package["manifest_path"].as_str().unwrap_or_default());
            if let Some(dir) = manifest.parent() {
                return Ok(dir.join("src/driver/sys/mod.rs"));
            }
        }
    }
    bail!("cudarc is not among the dependencies (is the `cuda` feature wired?)")
}

fn report(release: &Path, cuda_home: &Path, system: bool) -> Result<()> {
    println!("\nbuilt for CUDA:");
    for bin in ["resnet-cli", "xtask"] {
        let path = release.join(bin);
        let size = fs::metadata(&path).with_context(|| format!("no binary at {}", path.display()))?.len();
        println!("  {} ({:.1} MB)", path.display(), size as f64 / 1e6);
    }
    let out = Command::new("readelf").arg("-d").arg(release.join("resnet-cli")).output();
    match out {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            let needed: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("(NEEDED)"))
                .filter_map(|l| l.split('[').nth(1)?.split(']').next())
                .collect();
            println!("  links: {}", needed.join(", "));
        }
        _ => println!("  (readelf not available; cannot list the linked libraries)"),
    }
    let lib = cuda_home.join("lib64");
    if system {
        println!("run it on a machine with the NVIDIA driver and this toolkit's libraries on the loader path.");
    } else {
        println!(
            "run it with the NVIDIA driver installed and LD_LIBRARY_PATH={} (or the nvidia/cu13/lib folder of any \
             PyPI CUDA 13 install, e.g. PyTorch's); never put lib64/stubs on that path.",
            std::fs::canonicalize(&lib).unwrap_or(lib).display()
        );
    }
    println!("  e.g. {} train --device cuda --preset d2l", release.join("resnet-cli").display());
    Ok(())
}
