//! `resnet-cli device-check` and `scripts/device_check.sh` without a GPU: every op check is
//! SKIPPED with a reason (never PASS), CUDA-only timings are SKIPPED, the CPU timings run, a
//! device that cannot be opened falls back to the CPU with the reason, and the script's library
//! search finds PyTorch's `nvidia/*/lib` folders through a fake Python.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

fn device_check(args: &[&str]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_resnet-cli"))
        .arg("device-check")
        .args(args)
        .env_remove("RUST_LOG")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .context("running resnet-cli device-check")?;
    Ok((out.status.code(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn rows<'a>(report: &'a Value, key: &str) -> Result<&'a Vec<Value>> {
    report[key].as_array().with_context(|| format!("no `{key}` array in {report}"))
}

#[test]
fn on_the_cpu_ops_are_skipped_and_cpu_timings_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("check.json");
    let out_s = out.to_string_lossy().into_owned();
    let args = [
        "--device",
        "cpu",
        "--configs",
        "train:16:4,eval:16:4",
        "--precisions",
        "f32,bf16",
        "--gpu-ops",
        "candle,cudnn",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        &out_s,
    ];
    let (code, stdout, stderr) = device_check(&args)?;
    ensure!(code == Some(0), "exit {code:?}:\n{stdout}\n{stderr}");
    ensure!(!stdout.contains("PASS"), "nothing may pass without a GPU:\n{stdout}");
    let report = read_json(&out)?;
    ensure!(report["cuda"] == false, "{report}");
    let checks = rows(&report, "op_checks")?;
    ensure!(checks.len() == 28, "7 cases x 2 kernel choices x 2 dtypes, got {}", checks.len());
    for c in checks {
        ensure!(c["outcome"] == "SKIPPED", "{c}");
        ensure!(c["detail"].as_str().is_some_and(|d| d.contains("no CUDA device")), "{c}");
    }
    let timings = rows(&report, "timings")?;
    ensure!(timings.len() == 8, "2 configs x 2 precisions x 2 kernel choices, got {}", timings.len());
    for t in timings {
        let cpu_runnable = t["precision"] == "f32" && t["gpu_ops"] == "candle";
        if cpu_runnable {
            ensure!(t["status"] == "OK", "{t}");
            ensure!(t["examples_per_sec"].as_f64().is_some_and(|v| v > 0.0), "{t}");
        } else {
            ensure!(t["status"] == "SKIPPED", "{t}");
            ensure!(t["reason"].as_str().is_some_and(|r| !r.is_empty()), "{t}");
        }
    }
    Ok(())
}

/// A device that cannot be opened (here: CUDA in a CPU build) is a fallback with its reason,
/// not an error and not a panic.
#[test]
fn an_unusable_gpu_falls_back_to_the_cpu_with_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("ops.json");
    let (code, stdout, stderr) = device_check(&["--device", "cuda", "--ops-only", "--out", &out.to_string_lossy()])?;
    if cfg!(feature = "cuda") {
        // A CUDA build on a machine with a GPU opens it; nothing to check here.
        return Ok(());
    }
    ensure!(code == Some(0), "exit {code:?}:\n{stdout}\n{stderr}");
    ensure!(!stderr.contains("panicked"), "{stderr}");
    let report = read_json(&out)?;
    let device = report["device"].as_str().unwrap_or_default();
    ensure!(device.starts_with("CPU (fallback:") && device.contains("without CUDA"), "{device}");
    ensure!(rows(&report, "op_checks")?.iter().all(|c| c["outcome"] == "SKIPPED"), "{report}");
    ensure!(rows(&report, "timings")?.is_empty(), "--ops-only times nothing");
    Ok(())
}

#[test]
fn bad_configs_are_refused_naming_the_entry() -> Result<()> {
    let (code, _, stderr) = device_check(&["--device", "cpu", "--configs", "train:96"])?;
    ensure!(code == Some(1), "exit {code:?}: {stderr}");
    ensure!(stderr.contains("train:96") && stderr.contains("mode:resize:batch"), "{stderr}");
    Ok(())
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/device_check.sh")
}

/// Writes an executable shell script.
fn write_exe(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

fn lib_path(python: &Path, env: &[(&str, String)]) -> Result<String> {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).arg("--print-lib-path").env("PYTHON", python).env_remove("LD_LIBRARY_PATH");
    for var in ["RESNET_DEVICE_CHECK_LIB_DIRS", "RESNET_DEVICE_CHECK_STUB_DIR"] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().context("running device_check.sh")?;
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// The script asks Python for PyTorch's `nvidia/*/lib` folders (a fake Python answers here),
/// keeps those that exist, puts explicit folders first and the local-proof stub last.
#[test]
fn the_script_finds_pytorchs_cuda_libraries() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let site = dir.path().join("site/nvidia");
    let (cu13, cudnn) = (site.join("cu13/lib"), site.join("cudnn/lib"));
    for d in [&cu13, &cudnn] {
        std::fs::create_dir_all(d)?;
    }
    let gone = site.join("cublas/lib");
    let python = dir.path().join("python");
    write_exe(
        &python,
        &format!("#!/bin/sh\nprintf '%s\\n' '{}' '{}' '{}'\n", cu13.display(), cudnn.display(), gone.display()),
    )?;
    let found = lib_path(&python, &[])?;
    ensure!(found == format!("{}:{}", cu13.display(), cudnn.display()), "got `{found}`");

    let extra = dir.path().join("extra");
    let stub = dir.path().join("stubs");
    std::fs::create_dir_all(&extra)?;
    let found = lib_path(
        &python,
        &[
            ("RESNET_DEVICE_CHECK_LIB_DIRS", extra.display().to_string()),
            ("RESNET_DEVICE_CHECK_STUB_DIR", stub.display().to_string()),
        ],
    )?;
    let want = format!("{}:{}:{}:{}", extra.display(), cu13.display(), cudnn.display(), stub.display());
    ensure!(found == want, "got `{found}`, want `{want}`");

    // No PyTorch CUDA packages: nothing found, and no error.
    let bare = dir.path().join("python-bare");
    write_exe(&bare, "#!/bin/sh\nexit 0\n")?;
    ensure!(lib_path(&bare, &[])?.is_empty(), "a bare Python yields no folders");
    Ok(())
}

#[test]
fn the_script_without_a_binary_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("device_check.sh");
    std::fs::copy(script(), &copy)?;
    let out = Command::new("bash").arg(&copy).arg(dir.path().join("out")).output()?;
    ensure!(out.status.code() == Some(2), "exit {:?}", out.status.code());
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("no resnet-cli"), "{text}");
    Ok(())
}
