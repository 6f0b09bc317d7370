//! Tidy checks: the architecture invariants of ARCHITECTURE.md that a test can check by reading
//! the workspace's own files (manifests and sources), with no build and no network.
//!
//! - Each crate depends only on the crates its layer allows (STYLE.md's arrows); binary-only
//!   crates (clap, anyhow, …) stay out of the libraries and network clients out of all but xtask.
//! - Library crates (resnet-core, resnet-data, resnet-train) never name a command-line flag
//!   (`--something`) outside their tests: the binaries own their flags.
//! - Every Rust source file opens with a `//!` line saying what lives there.
//! - No two modules of a crate import each other, directly or around a longer loop.
//!
//! Each check returns every violation it finds, so one run lists them all; the last test feeds
//! each check a broken input to show it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

/// Which workspace crates each member may depend on (any dependency section).
const LAYERS: &[(&str, &[&str])] = &[
    ("resnet-core", &[]),
    ("resnet-data", &[]),
    ("resnet-train", &["resnet-core", "resnet-data"]),
    ("resnet-cli", &["resnet-core", "resnet-data", "resnet-train"]),
    ("xtask", &["resnet-core", "resnet-data", "resnet-train"]),
    ("resnet-tests", &["resnet-core", "resnet-data", "resnet-train"]),
];

/// The library crates: no binary-only dependencies, no flag names.
const LIBRARIES: &[&str] = &["resnet-core", "resnet-data", "resnet-train"];

/// Crates that belong to binaries (argument parsing, error reports, log output, terminal
/// rendering, signals): never a library's normal dependency.
const BINARY_ONLY: &[&str] = &["clap", "anyhow", "tracing-subscriber", "indicatif", "ctrlc"];

/// Network clients: only xtask (fetch-data) may depend on one.
const NETWORK: &[&str] = &["ureq", "reqwest", "hf-hub", "curl", "attohttpc", "isahc", "hyper"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// The `members` of the workspace manifest.
fn members(root: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(root.join("Cargo.toml")).context("reading the workspace Cargo.toml")?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .context("the workspace Cargo.toml has no `members` line")?;
    Ok(line.split('"').skip(1).step_by(2).map(str::to_string).collect())
}

/// One dependency of a manifest: its name and whether it is a dev-dependency.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dependency {
    name: String,
    dev: bool,
}

/// The package name and dependencies of a Cargo.toml: every key of `[dependencies]`,
/// `[dev-dependencies]`, `[build-dependencies]` and their `[target.….…]` forms, with a
/// `package = "…"` rename resolved to the real crate name.
fn parse_manifest(text: &str) -> (Option<String>, Vec<Dependency>) {
    let mut name = None;
    let mut deps = Vec::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let Some((key, value)) = line.split_once('=') else { continue };
        let key = key.trim();
        if section == "package" && key == "name" {
            name = Some(value.trim().trim_matches('"').to_string());
        }
        let kind = section.rsplit('.').next().unwrap_or_default();
        if !matches!(kind, "dependencies" | "dev-dependencies" | "build-dependencies") {
            continue;
        }
        let key = key.split('.').next().unwrap_or_default().trim().to_string();
        let renamed = value.split("package").nth(1).and_then(|rest| rest.split('"').nth(1)).map(str::to_string);
        deps.push(Dependency { name: renamed.unwrap_or(key), dev: kind == "dev-dependencies" });
    }
    (name, deps)
}

/// Every way `package` with `deps` breaks the layering.
fn layering_violations(package: &str, deps: &[Dependency]) -> Vec<String> {
    let Some((_, allowed)) = LAYERS.iter().find(|(name, _)| *name == package) else {
        return vec![format!("{package}: not in the layering table of tests/tests/tidy.rs (add it with its layer)")];
    };
    let workspace: BTreeSet<&str> = LAYERS.iter().map(|(name, _)| *name).collect();
    let mut out = Vec::new();
    for d in deps {
        let name = d.name.as_str();
        if workspace.contains(name) && !allowed.contains(&name) {
            out.push(format!("{package} depends on {name}, which its layer does not allow (allowed: {allowed:?})"));
        }
        if LIBRARIES.contains(&package) && !d.dev && BINARY_ONLY.contains(&name) {
            out.push(format!("{package} is a library but depends on the binary-only crate {name}"));
        }
        if package != "xtask" && NETWORK.contains(&name) {
            out.push(format!("{package} depends on the network client {name}; only xtask touches the network"));
        }
    }
    out
}

/// A source file without its test module: everything from a `#[cfg(test)]` that precedes a
/// `mod` line to the end (STYLE.md puts `mod tests` last).
fn without_tests(source: &str) -> &str {
    let mut offset = 0;
    let mut lines = source.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod ")) {
            return &source[..offset];
        }
        offset += line.len() + 1;
    }
    source
}

/// Every `--flag` (two dashes, then a lowercase letter, not inside a longer word or dash run),
/// as `(line number, flag, line)`.
fn flag_names(source: &str) -> Vec<(usize, String, String)> {
    let mut out = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let bytes = line.as_bytes();
        for (i, _) in line.match_indices("--") {
            let before_ok = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || matches!(bytes[i - 1], b'-' | b'_'));
            let first_ok = bytes.get(i + 2).is_some_and(|b| b.is_ascii_lowercase());
            if before_ok && first_ok {
                let flag: String = line[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                    .collect();
                out.push((n + 1, flag, line.trim().to_string()));
            }
        }
    }
    out
}

/// Every `.rs` file under `dir`, skipping build output and hidden directories.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out)?;
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// A crate's module path (`["ops", "conv", "dispatch"]`) for each of its source files.
fn module_paths(src: &Path) -> Result<BTreeMap<Vec<String>, PathBuf>> {
    let mut files = Vec::new();
    rust_files(src, &mut files)?;
    let mut out = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src)?.with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts.last().is_some_and(|p| p == "mod" || p == "lib" || p == "main") {
            parts.pop();
        }
        out.insert(parts, file);
    }
    Ok(out)
}

/// The `crate::…` and `super::…` paths a source file names, with a `{a, b::c}` group expanded
/// to its first-level items; comments and the test module are left out.
fn named_paths(source: &str) -> Vec<String> {
    let code: String =
        without_tests(source).lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n");
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        for (i, _) in code.match_indices(start) {
            if code[..i].chars().next_back().is_some_and(is_ident) {
                continue;
            }
            let rest = &code[i..];
            let path: String = rest.chars().take_while(|&c| is_ident(c) || c == ':').collect();
            let path = path.trim_end_matches(':').to_string();
            let after = &rest[path.len()..];
            if let Some(group) = after.strip_prefix("::{").and_then(|g| g.split('}').next()) {
                for item in group.split(',') {
                    let item = item.split(" as ").next().unwrap_or_default().trim();
                    let first = item.split("::").next().unwrap_or_default();
                    if !first.is_empty() && first != "self" {
                        out.push(format!("{path}::{first}"));
                    }
                }
            }
            out.push(path);
        }
    }
    out
}

/// The module a path names, relative to the file's module `from`: the longest prefix that is a
/// source file of the crate.
fn resolve(modules: &BTreeMap<Vec<String>, PathBuf>, from: &[String], path: &str) -> Option<Vec<String>> {
    let mut parts = path.split("::").filter(|p| *p != "self");
    let mut base: Vec<String> = match parts.next()? {
        "crate" => Vec::new(),
        // `super` of a file's module is its parent module.
        _ => from[..from.len().saturating_sub(1)].to_vec(),
    };
    for p in parts {
        if p == "super" {
            base.pop();
        } else {
            base.push(p.to_string());
        }
    }
    (1..=base.len()).rev().map(|n| base[..n].to_vec()).find(|m| modules.contains_key(m))
}

/// The import graph of one crate: module → the other modules it names.
fn import_graph(src: &Path) -> Result<BTreeMap<Vec<String>, BTreeSet<Vec<String>>>> {
    let modules = module_paths(src)?;
    let mut graph = BTreeMap::new();
    for (module, file) in &modules {
        let source = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let edges = named_paths(&source)
            .iter()
            .filter_map(|p| resolve(&modules, module, p))
            .filter(|target| target != module)
            .collect();
        graph.insert(module.clone(), edges);
    }
    Ok(graph)
}

/// Every cycle in `graph`, each as the modules on it joined by `::` (one per strongly connected
/// group of more than one module).
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    // Two modules are on a cycle when each reaches the other.
    let reach = |from: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<_, _> = graph.keys().map(|m| (m.clone(), reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for m in graph.keys() {
        if done.contains(m) || !reaches[m].contains(m) {
            continue;
        }
        let group: Vec<Vec<String>> =
            graph.keys().filter(|o| reaches[m].contains(*o) && reaches[*o].contains(m)).cloned().collect();
        done.extend(group.iter().cloned());
        out.push(group.iter().map(|g| if g.is_empty() { "crate".into() } else { g.join("::") }).collect());
    }
    out
}

fn report(what: &str, violations: &[String]) -> Result<()> {
    ensure!(violations.is_empty(), "{what}:\n  {}", violations.join("\n  "));
    Ok(())
}

#[test]
fn crates_depend_only_on_the_layers_below() -> Result<()> {
    let root = workspace_root();
    let mut violations = Vec::new();
    let members = members(&root)?;
    ensure!(members.len() >= LAYERS.len(), "found only {members:?} as workspace members");
    for member in &members {
        let path = root.join(member).join("Cargo.toml");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let (name, deps) = parse_manifest(&text);
        let name = name.with_context(|| format!("{} has no package name", path.display()))?;
        violations.extend(layering_violations(&name, &deps));
    }
    report("dependency layering (STYLE.md, ARCHITECTURE.md)", &violations)
}

#[test]
fn library_crates_never_name_a_flag() -> Result<()> {
    let root = workspace_root();
    let mut violations = Vec::new();
    for lib in LIBRARIES {
        let mut files = Vec::new();
        rust_files(&root.join(lib).join("src"), &mut files)?;
        ensure!(!files.is_empty(), "no sources found for {lib}");
        for file in files {
            let source = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            for (line, flag, text) in flag_names(without_tests(&source)) {
                let rel = file.strip_prefix(&root).unwrap_or(&file).display().to_string();
                violations.push(format!("{rel}:{line}: `{flag}` in `{text}`"));
            }
        }
    }
    report("flag names in library crates (the binaries add them; name the config field instead)", &violations)
}

#[test]
fn every_source_file_opens_with_a_module_doc_line() -> Result<()> {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files)?;
    ensure!(files.len() > 20, "found only {} Rust files under {}", files.len(), root.display());
    let mut sources = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        sources.push((file, source));
    }
    // A fragment pulled in with `include!` cannot hold an inner doc comment (`//!` is an inner
    // attribute there); it opens with a plain `//` comment instead.
    let mut included = std::collections::BTreeSet::new();
    for (file, source) in &sources {
        let dir = file.parent().unwrap_or(&root);
        for (at, _) in source.match_indices("include!(\"") {
            let rest = &source[at + "include!(\"".len()..];
            if let Some(end) = rest.find('"') {
                included.insert(dir.join(&rest[..end]));
            }
        }
    }
    let mut violations = Vec::new();
    for (file, source) in &sources {
        let opening = if included.contains(file) { "//" } else { "//!" };
        if !source.starts_with(opening) {
            violations.push(file.strip_prefix(&root).unwrap_or(file).display().to_string());
        }
    }
    report("files that do not open with a `//!` line (a fragment pulled in with `include!`: a `//` line)", &violations)
}

#[test]
fn no_module_imports_form_a_cycle() -> Result<()> {
    let root = workspace_root();
    let mut violations = Vec::new();
    for member in members(&root)? {
        let src = root.join(&member).join("src");
        let graph = import_graph(&src)?;
        ensure!(!graph.is_empty(), "no modules found in {}", src.display());
        for cycle in cycles(&graph) {
            violations.push(format!("{member}: {}", cycle.join(" <-> ")));
        }
    }
    report("module import cycles", &violations)
}

/// Each check, fed a broken input, reports it: the checks above can fail.
#[test]
fn the_checks_catch_what_they_guard() -> Result<()> {
    let manifest = r#"
[package]
name = "resnet-core"
[dependencies]
candle-core.workspace = true
resnet-train = { path = "../resnet-train" } # an upward arrow
cli = { package = "clap", version = "4" }
[target.'cfg(unix)'.dependencies]
ureq = "3"
[dev-dependencies]
anyhow.workspace = true
"#;
    let (name, deps) = parse_manifest(manifest);
    ensure!(name.as_deref() == Some("resnet-core"), "package name parsed as {name:?}");
    let found = layering_violations("resnet-core", &deps);
    ensure!(found.len() == 3, "expected the upward arrow, clap and ureq, got {found:?}");
    ensure!(layering_violations("resnet-train", &parse_manifest(manifest).1).len() == 3);
    ensure!(layering_violations("resnet-cli", &[]).is_empty());
    ensure!(layering_violations("new-crate", &[]).len() == 1, "an unknown member must be reported");

    let source = "//! Docs.\nconst A: &str = \"pass --lr 0.1\";\n// a -- b, x--y, ---, --9\n#[cfg(test)]\nmod tests {\n    const B: &str = \"--epochs\";\n}\n";
    let flags: Vec<String> = flag_names(without_tests(source)).into_iter().map(|(_, f, _)| f).collect();
    ensure!(flags == ["--lr"], "flags found: {flags:?}");

    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("ops"))?;
    std::fs::write(src.join("lib.rs"), "//! Root.\nmod a;\nmod ops;\n")?;
    std::fs::write(src.join("a.rs"), "//! A.\nuse crate::ops::{conv::Conv, pool};\n")?;
    std::fs::write(src.join("ops/mod.rs"), "//! Ops.\npub mod conv;\npub mod pool;\n")?;
    std::fs::write(src.join("ops/conv.rs"), "//! Conv.\nuse super::pool::max; // uses pool\n")?;
    std::fs::write(src.join("ops/pool.rs"), "//! Pool.\nfn f() { super::conv::g() }\n")?;
    let graph = import_graph(&src)?;
    let found = cycles(&graph);
    ensure!(found == [vec!["ops::conv".to_string(), "ops::pool".to_string()]], "cycles found: {found:?}");
    std::fs::write(src.join("ops/pool.rs"), "//! Pool.\n#[cfg(test)]\nmod tests {\n    use super::super::conv;\n}\n")?;
    ensure!(cycles(&import_graph(&src)?).is_empty(), "a test module's import is not a cycle");
    Ok(())
}
