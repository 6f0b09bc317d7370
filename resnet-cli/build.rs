//! Build script: tells the browser test whether Debian's `chromium` is on this machine.
//!
//! Without chromium the headless-rendering test is compiled as ignored, with the reason, so the
//! runner's own output shows the skip; under `CI=true` it is compiled to run and fails, because
//! CI installs chromium (`.ci/run`) and a missing browser there is a broken set-up.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(chromium_missing)");
    println!("cargo::rerun-if-env-changed=CI");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=CHROMIUM");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !ci && find_chromium().is_none() {
        println!("cargo::rustc-cfg=chromium_missing");
    }
}

fn find_chromium() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("chromium")).find(|p| p.is_file())
}
