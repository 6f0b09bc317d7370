//! The `resnet-cli` binary end to end on tiny synthetic IDX files written to a temporary
//! directory: `summary`, `train`, `eval`, `predict`, `--resume`, `--init-weights`, `report`,
//! `completions` and `--help`, and the bad input a user can
//! give each of them (which must fail with exit status 1 or 2, a message on stderr naming what
//! is wrong, no panic, and nothing half-written).
//!
//! A training run here is a width-4 ResNet-18 on 256 images of 28×28, 2 epochs of 8 steps: well
//! under a second, so every test trains its own run in its own directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use resnet_data::{FashionMnist, Split, CLASS_NAMES, TEST_LABELS, TRAIN_IMAGES};
use tempfile::TempDir;

const TRAIN_LEN: usize = 256;
const TEST_LEN: usize = 64;
const EPOCHS: usize = 2;
/// Steps per epoch: 256 images in batches of 32.
const STEPS: usize = 8;
const RUN_FILES: [&str; 6] =
    ["config.json", "metrics.jsonl", "checkpoint.safetensors", "best.safetensors", "curves.png", "curves.svg"];

/// One finished invocation of the binary.
#[derive(Debug)]
struct Invocation {
    args: Vec<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn cli(args: &[&str]) -> Result<Invocation> {
    cli_in(Path::new("."), args)
}

/// Runs the binary in the working directory `cwd`.
fn cli_in(cwd: &Path, args: &[&str]) -> Result<Invocation> {
    let out = Command::new(env!("CARGO_BIN_EXE_resnet-cli"))
        .current_dir(cwd)
        .args(args)
        // Hermetic: only --data-dir may point at data, and logging stays at its default level.
        .env_remove("RESNET_DATA_DIR")
        .env_remove("RUST_LOG")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .context("running resnet-cli")?;
    Ok(Invocation {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout)?,
        stderr: String::from_utf8(out.stderr)?,
    })
}

/// Runs the binary and requires success.
fn ok(args: &[&str]) -> Result<Invocation> {
    let run = cli(args)?;
    ensure!(run.code == Some(0), "{:?} exited with {:?}:\n{}", run.args, run.code, run.stderr);
    Ok(run)
}

/// Runs the binary and requires a clean failure (status 1, or 2 for clap's usage errors) whose
/// stderr mentions every one of `needles`.
fn fails(args: &[&str], needles: &[&str]) -> Result<Invocation> {
    let run = cli(args)?;
    ensure!(
        matches!(run.code, Some(1 | 2)),
        "{:?} should fail cleanly, exited with {:?}:\n{}",
        run.args,
        run.code,
        run.stderr
    );
    ensure!(!run.stderr.contains("panicked"), "{:?} panicked:\n{}", run.args, run.stderr);
    for needle in needles {
        ensure!(run.stderr.contains(needle), "{:?}: stderr lacks {needle:?}:\n{}", run.args, run.stderr);
    }
    Ok(run)
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 temporary path")
}

/// Writes the synthetic dataset (raw IDX, so tests can corrupt it byte by byte) into `dir`.
fn write_data(dir: &Path) -> Result<FashionMnist> {
    let data =
        FashionMnist { train: Split::synthetic(TRAIN_LEN, 28, 28, 1), test: Split::synthetic(TEST_LEN, 28, 28, 2) };
    data.save(dir, false)?;
    Ok(data)
}

/// The flags of the small run every test trains (the `quick` recipe shrunk).
fn train_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--preset",
        "quick",
        "--data-dir",
        data,
        "--out",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--eval-batch-size",
        "64",
        "--resize",
        "28",
        "--width",
        "4",
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
}

/// A temporary directory with the synthetic data in `data/` and a finished run in `run/`.
struct Trained {
    dir: TempDir,
    data: PathBuf,
    run: PathBuf,
    test: Split,
    train: Invocation,
}

impl Trained {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let (data, run) = (dir.path().join("data"), dir.path().join("run"));
        let test = write_data(&data)?.test;
        let train = ok(&train_args(path_str(&data)?, path_str(&run)?))?;
        Ok(Self { dir, data, run, test, train })
    }

    fn data(&self) -> Result<&str> {
        path_str(&self.data)
    }

    fn file(&self, name: &str) -> Result<String> {
        Ok(path_str(&self.run.join(name))?.to_string())
    }

    /// The epoch records of `metrics.jsonl`.
    fn epochs(&self) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(self.run.join("metrics.jsonl"))?;
        let records: Vec<serde_json::Value> =
            text.lines().map(serde_json::from_str).collect::<std::result::Result<_, _>>()?;
        Ok(records.into_iter().filter(|r| r["kind"] == "epoch").collect())
    }
}

/// Every file in `dir` with its contents.
fn contents(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        out.push((entry.file_name().to_string_lossy().into_owned(), std::fs::read(entry.path())?));
    }
    out.sort();
    Ok(out)
}

fn no_temporaries(dir: &Path) -> Result<()> {
    let names: Vec<String> = contents(dir)?.into_iter().map(|(n, _)| n).filter(|n| n.contains(".tmp")).collect();
    ensure!(names.is_empty(), "temporary files left in {}: {names:?}", dir.display());
    Ok(())
}

fn f64_field(v: &serde_json::Value, key: &str) -> Result<f64> {
    v[key].as_f64().with_context(|| format!("no number `{key}` in {v}"))
}

// ---------------------------------------------------------------------------------------------
// summary

const SEED_SHAPES: [&str; 8] = [
    "(1, 64, 56, 56)",
    "(1, 64, 56, 56)",
    "(1, 128, 28, 28)",
    "(1, 256, 14, 14)",
    "(1, 512, 7, 7)",
    "(1, 512, 1, 1)",
    "(1, 512)",
    "(1, 10)",
];

/// The shapes of the `output shape:` lines, in order.
fn shapes(stdout: &str) -> Vec<String> {
    stdout.lines().filter_map(|l| l.split_once("output shape:").map(|(_, s)| s.trim().to_string())).collect()
}

#[test]
fn summary_prints_the_seed_s_shapes_and_parameter_count() -> Result<()> {
    let run = ok(&["summary", "--resize", "224"])?;
    ensure!(shapes(&run.stdout) == SEED_SHAPES, "shapes {:?}\n{}", shapes(&run.stdout), run.stdout);
    let classes: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains("output shape:"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let want = [
        "Sequential",
        "Sequential",
        "Sequential",
        "Sequential",
        "Sequential",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Linear",
    ];
    ensure!(classes == want, "layer names {classes:?}");
    ensure!(run.stdout.contains("Trainable parameters: 11,178,378"), "{}", run.stdout);
    Ok(())
}

#[test]
fn summary_of_other_depths_variants_and_widths() -> Result<()> {
    // Parameter counts by hand: ResNet-34 has 3, 4, 6, 3 blocks (torchvision's 21,797,672 less
    // its 1000-class head and 3-channel stem, less its shortcut BatchNorms, plus d2l's conv
    // biases); the pre-activation block moves the first BatchNorm of each down-sampling block to
    // the narrower input (−896) and adds a final BatchNorm of 512 channels (+1,024).
    let deep = ok(&["summary", "--resize", "224", "--depth", "34"])?;
    ensure!(deep.stdout.contains("ResNet-34"), "{}", deep.stdout);
    ensure!(shapes(&deep.stdout) == SEED_SHAPES, "{}", deep.stdout);
    ensure!(deep.stdout.contains("Trainable parameters: 21,290,250"), "{}", deep.stdout);

    let pre = ok(&["summary", "--resize", "224", "--variant", "pre"])?;
    ensure!(pre.stdout.contains("PreActivation"), "{}", pre.stdout);
    ensure!(shapes(&pre.stdout) == SEED_SHAPES, "{}", pre.stdout);
    ensure!(pre.stdout.contains("Trainable parameters: 11,178,506"), "{}", pre.stdout);

    let narrow = ok(&["summary", "--resize", "28", "--width", "4"])?;
    let want = [
        "(1, 4, 7, 7)",
        "(1, 4, 7, 7)",
        "(1, 8, 4, 4)",
        "(1, 16, 2, 2)",
        "(1, 32, 1, 1)",
        "(1, 32, 1, 1)",
        "(1, 32)",
        "(1, 10)",
    ];
    ensure!(shapes(&narrow.stdout) == want, "{}", narrow.stdout);
    ensure!(narrow.stdout.contains("Trainable parameters: 44,898"), "{}", narrow.stdout);
    Ok(())
}

#[test]
fn summary_rejects_bad_values() -> Result<()> {
    fails(&["summary", "--resize", "0"], &["--resize 0"])?;
    fails(&["summary", "--resize", "513"], &["--resize 513"])?;
    fails(&["summary", "--depth", "50"], &["--depth", "50", "18", "34"])?;
    fails(&["summary", "--width", "0"], &["--width", "0"])?;
    fails(&["summary", "--variant", "sideways"], &["--variant", "sideways"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// train

#[test]
fn train_prints_d2l_s_lines_and_writes_a_complete_run_directory() -> Result<()> {
    let t = Trained::new()?;

    // d2l's closing lines, with the numbers of the last epoch.
    let epochs = t.epochs()?;
    ensure!(epochs.len() == EPOCHS, "{} epoch records in metrics.jsonl", epochs.len());
    let last = &epochs[EPOCHS - 1];
    let want = format!(
        "loss {:.3}, train acc {:.3}, test acc {:.3}",
        f64_field(last, "train_loss")?,
        f64_field(last, "train_acc")?,
        f64_field(last, "test_acc")?
    );
    let lines: Vec<&str> = t.train.stdout.lines().collect();
    ensure!(lines.first() == Some(&want.as_str()), "stdout should start with {want:?}:\n{}", t.train.stdout);
    let speed = lines.get(1).context("no second line")?;
    let number = speed.strip_suffix(" examples/sec on cpu").context("no `examples/sec on cpu` line")?;
    ensure!(number.parse::<f64>().is_ok_and(|v| v > 0.0), "bad speed line {speed:?}");
    ensure!(t.train.stderr.contains("epoch 2/2 batch 8/8"), "no progress lines on stderr:\n{}", t.train.stderr);

    // The run directory: every file, nothing else.
    let names: Vec<String> = contents(&t.run)?.into_iter().map(|(n, _)| n).collect();
    let mut want_names: Vec<String> = RUN_FILES.iter().map(|s| s.to_string()).collect();
    want_names.sort();
    ensure!(names == want_names, "run directory holds {names:?}");

    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(t.run.join("config.json"))?)?;
    for (key, value) in [("epochs", 2), ("batch_size", 32), ("resize", 28), ("seed", 1)] {
        ensure!(config[key] == value, "config.json {key} = {}", config[key]);
    }
    ensure!(config["model"]["base_width"] == 4, "config.json model {}", config["model"]);

    let text = std::fs::read_to_string(t.run.join("metrics.jsonl"))?;
    let records: Vec<serde_json::Value> =
        text.lines().map(serde_json::from_str).collect::<std::result::Result<_, _>>()?;
    let steps = records.iter().filter(|r| r["kind"] == "step").count();
    // d2l plots five points per epoch, or every batch when an epoch has fewer than ten.
    ensure!(steps == EPOCHS * STEPS, "{steps} step records");
    for (i, e) in epochs.iter().enumerate() {
        ensure!(e["epoch"] == i + 1 && e["examples"] == TRAIN_LEN, "epoch record {e}");
        for key in ["train_loss", "train_acc", "test_acc", "examples_per_sec"] {
            ensure!(f64_field(e, key)?.is_finite(), "{key} in {e}");
        }
    }

    let png = std::fs::read(t.run.join("curves.png"))?;
    ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000, "curves.png is not a PNG");
    let svg = std::fs::read_to_string(t.run.join("curves.svg"))?;
    ensure!(svg.contains("<svg") && svg.trim_end().ends_with("</svg>"), "curves.svg is not a whole SVG");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// eval

#[test]
fn eval_reproduces_the_test_accuracy_of_training() -> Result<()> {
    let t = Trained::new()?;
    let epochs = t.epochs()?;
    let accs: Vec<f64> = epochs.iter().map(|e| f64_field(e, "test_acc")).collect::<Result<_>>()?;
    let best = accs.iter().copied().fold(f64::MIN, f64::max);
    let data = t.data()?;
    // --batch-size as in training (evaluation-mode results do not depend on it, but this keeps
    // the comparison exact even for a tie broken by rounding).
    for (file, want) in [("checkpoint.safetensors", accs[EPOCHS - 1]), ("best.safetensors", best)] {
        let weights = t.file(file)?;
        let json = ok(&[
            "eval",
            "--weights",
            &weights,
            "--data-dir",
            data,
            "--device",
            "cpu",
            "--batch-size",
            "64",
            "--json",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&json.stdout).context("eval --json is not JSON")?;
        ensure!(v["examples"] == TEST_LEN && v["resize"] == 28, "{v}");
        let acc = f64_field(&v, "test_acc")?;
        ensure!(acc == want, "{file}: eval says test acc {acc}, training said {want}");

        let counts: Vec<Vec<u64>> = serde_json::from_value(v["confusion"].clone())?;
        ensure!(counts.len() == 10 && counts.iter().all(|r| r.len() == 10), "confusion is not 10×10");
        let total: u64 = counts.iter().flatten().sum();
        ensure!(total == TEST_LEN as u64, "confusion counts sum to {total}");
        let class_counts = t.test.class_counts();
        for (i, row) in counts.iter().enumerate() {
            ensure!(row.iter().sum::<u64>() == class_counts[i] as u64, "row {i} of the confusion matrix: {row:?}");
        }
        let diagonal: u64 = (0..10).map(|i| counts[i][i]).sum();
        ensure!(acc == diagonal as f64 / TEST_LEN as f64, "test_acc {acc} is not the diagonal's {diagonal}/{TEST_LEN}");
        let per_class = v["per_class"].as_array().context("no per_class")?;
        ensure!(per_class.len() == 10 && per_class[0]["class"] == CLASS_NAMES[0], "per_class {}", v["per_class"]);

        let text = ok(&["eval", "--weights", &weights, "--data-dir", data, "--device", "cpu", "--batch-size", "64"])?;
        let head = format!("test acc {acc:.4} on {TEST_LEN} images at 28 px");
        ensure!(text.stdout.starts_with(&head), "eval should start with {head:?}:\n{}", text.stdout);
        ensure!(text.stdout.contains("confusion matrix"), "no confusion matrix:\n{}", text.stdout);
        for name in CLASS_NAMES {
            ensure!(
                text.stdout.matches(name).count() == 2,
                "{name} should head a table row and a matrix row:\n{}",
                text.stdout
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// predict

/// The `(class, probability)` list predict printed for the input labelled `name`.
fn predictions(stdout: &str, name: &str) -> Result<Vec<(String, f64)>> {
    let prefix = format!("{name}: ");
    let line =
        stdout.lines().find(|l| l.starts_with(&prefix)).with_context(|| format!("no line for {name}:\n{stdout}"))?;
    let mut out = Vec::new();
    for item in line[prefix.len()..].split(", ") {
        let (class, p) = item.rsplit_once(' ').with_context(|| format!("bad item {item:?}"))?;
        ensure!(CLASS_NAMES.contains(&class), "unknown class {class:?} in {line:?}");
        let p: f64 = p.parse()?;
        ensure!((0.0..=1.0).contains(&p), "probability {p} in {line:?}");
        out.push((class.to_string(), p));
    }
    ensure!(out.len() == 3, "expected the top 3 classes: {line:?}");
    ensure!(out.windows(2).all(|w| w[0].1 >= w[1].1), "not in descending order: {line:?}");
    ensure!(out.iter().map(|(_, p)| p).sum::<f64>() <= 1.0 + 2e-3, "probabilities sum above 1: {line:?}");
    Ok(out)
}

fn write_png(path: &Path, width: usize, height: usize, color: png::ColorType, pixels: &[u8]) -> Result<()> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, width as u32, height as u32);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(pixels)?;
    writer.finish()?;
    Ok(())
}

#[test]
fn predict_names_classes_for_test_indices_and_png_files() -> Result<()> {
    let t = Trained::new()?;
    let (weights, data) = (t.file("best.safetensors")?, t.data()?);

    let run =
        ok(&["predict", "--weights", &weights, "--index", "0", "--index", "3", "--data-dir", data, "--device", "cpu"])?;
    for i in [0, 3] {
        let truth = CLASS_NAMES[t.test.labels[i] as usize];
        predictions(&run.stdout, &format!("test[{i}] (true: {truth})"))?;
    }

    // Test image 0 as a grey PNG, as an RGB PNG (R = G = B, whose luma is the grey value
    // exactly), and enlarged to 56×56: the first two must get exactly test[0]'s prediction.
    let image = t.test.image(0);
    let grey = t.dir.path().join("grey.png");
    write_png(&grey, 28, 28, png::ColorType::Grayscale, image)?;
    let rgb = t.dir.path().join("rgb.png");
    let rgb_pixels: Vec<u8> = image.iter().flat_map(|&p| [p, p, p]).collect();
    write_png(&rgb, 28, 28, png::ColorType::Rgb, &rgb_pixels)?;
    let big = t.dir.path().join("big.png");
    let big_pixels: Vec<u8> = (0..56 * 56).map(|i| image[(i / 56 / 2) * 28 + (i % 56) / 2]).collect();
    write_png(&big, 56, 56, png::ColorType::Grayscale, &big_pixels)?;
    let (grey_s, rgb_s, big_s) = (path_str(&grey)?, path_str(&rgb)?, path_str(&big)?);
    let run = ok(&[
        "predict",
        "--weights",
        &weights,
        grey_s,
        rgb_s,
        big_s,
        "--index",
        "0",
        "--data-dir",
        data,
        "--device",
        "cpu",
    ])?;
    let reference = predictions(&run.stdout, &format!("test[0] (true: {})", CLASS_NAMES[t.test.labels[0] as usize]))?;
    ensure!(predictions(&run.stdout, grey_s)? == reference, "grey PNG vs test[0]:\n{}", run.stdout);
    ensure!(predictions(&run.stdout, rgb_s)? == reference, "RGB PNG vs test[0]:\n{}", run.stdout);
    predictions(&run.stdout, big_s)?;
    // PNG files alone need no dataset.
    let alone = ok(&["predict", "--weights", &weights, grey_s, "--device", "cpu"])?;
    ensure!(predictions(&alone.stdout, grey_s)? == reference, "grey PNG alone:\n{}", alone.stdout);

    // Predicting every test image agrees with eval's accuracy (same preparation of inputs).
    let mut args = vec!["predict", "--weights", weights.as_str(), "--data-dir", data, "--device", "cpu", "--top", "1"];
    let indices: Vec<String> = (0..TEST_LEN).map(|i| i.to_string()).collect();
    for i in &indices {
        args.extend(["--index", i.as_str()]);
    }
    let all = ok(&args)?;
    let right = all
        .stdout
        .lines()
        .filter(|l| {
            let truth = l.split_once("(true: ").and_then(|(_, r)| r.split_once("): "));
            truth.is_some_and(|(t, rest)| rest.rsplit_once(' ').is_some_and(|(c, _)| c == t))
        })
        .count();
    ensure!(all.stdout.lines().count() == TEST_LEN, "expected {TEST_LEN} lines:\n{}", all.stdout);
    let eval = ok(&["eval", "--weights", &weights, "--data-dir", data, "--device", "cpu", "--json"])?;
    let acc = f64_field(&serde_json::from_str(&eval.stdout)?, "test_acc")?;
    ensure!(right as f64 == acc * TEST_LEN as f64, "predict gets {right}/{TEST_LEN} right, eval says {acc}");
    Ok(())
}

#[test]
fn predict_rejects_bad_requests() -> Result<()> {
    let t = Trained::new()?;
    let (weights, data) = (t.file("best.safetensors")?, t.data()?);
    fails(&["predict", "--weights", &weights, "--device", "cpu"], &["nothing to predict"])?;
    fails(
        &["predict", "--weights", &weights, "--index", "64", "--data-dir", data, "--device", "cpu"],
        &["--index 64", "64 images"],
    )?;
    let not_png = t.dir.path().join("not.png");
    std::fs::write(&not_png, b"GIF89a definitely not a PNG")?;
    fails(&["predict", "--weights", &weights, path_str(&not_png)?, "--device", "cpu"], &["not.png", "cannot decode"])?;
    let text = t.dir.path().join("notes.txt");
    std::fs::write(&text, b"plain text")?;
    fails(
        &["predict", "--weights", &weights, path_str(&text)?, "--device", "cpu"],
        &["notes.txt", "supported format"],
    )?;
    let missing = t.dir.path().join("missing-folder");
    fails(&["predict", "--weights", &weights, path_str(&missing)?, "--device", "cpu"], &["missing-folder", "no such"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// resume

#[test]
fn resuming_a_finished_run_changes_nothing() -> Result<()> {
    let t = Trained::new()?;
    let before = contents(&t.run)?;
    let run = ok(&["train", "--resume", path_str(&t.run)?, "--data-dir", t.data()?, "--device", "cpu"])?;
    ensure!(run.stderr.contains("after epoch 2"), "stderr should say where the run stands:\n{}", run.stderr);
    let first = |s: &str| s.lines().next().map(str::to_string);
    ensure!(
        first(&run.stdout) == first(&t.train.stdout),
        "final line {:?} vs {:?}",
        first(&run.stdout),
        first(&t.train.stdout)
    );
    ensure!(contents(&t.run)? == before, "resuming a finished run changed its files");
    Ok(())
}

#[test]
fn resume_needs_a_run_directory_of_its_own() -> Result<()> {
    let t = Trained::new()?;
    let data = t.data()?;
    let empty = t.dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    fails(
        &["train", "--resume", path_str(&empty)?, "--data-dir", data, "--device", "cpu"],
        &["cannot resume", "checkpoint.safetensors"],
    )?;
    let missing = t.dir.path().join("missing");
    fails(
        &["train", "--resume", path_str(&missing)?, "--data-dir", data, "--device", "cpu"],
        &["cannot resume", "missing"],
    )?;
    let elsewhere = t.dir.path().join("elsewhere");
    fails(
        &[
            "train",
            "--resume",
            path_str(&t.run)?,
            "--out",
            path_str(&elsewhere)?,
            "--data-dir",
            data,
            "--device",
            "cpu",
        ],
        &["--resume", "--out"],
    )?;
    // Flags that would change the configuration are refused, naming them, rather than ignored.
    for flag in [
        &["--lr", "0.5"][..],
        &["--width", "8"],
        &["--no-hflip"],
        &["--conv-algorithm", "im2col"],
        &["--preset", "d2l"],
    ] {
        let mut args = vec!["train", "--resume", path_str(&t.run)?, "--data-dir", data, "--device", "cpu"];
        args.extend_from_slice(flag);
        fails(&args, &["--resume", flag[0]])?;
    }
    // --epochs may grow, but not on the cosine schedule this run uses.
    fails(
        &["train", "--resume", path_str(&t.run)?, "--epochs", "5", "--data-dir", data, "--device", "cpu"],
        &["(--epochs)", "cosine", "start a new run"],
    )?;
    ensure!(!elsewhere.exists() && !missing.exists(), "a failed resume created a directory");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bad input

#[test]
fn missing_data_names_fetch_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (nowhere, out) = (dir.path().join("nowhere"), dir.path().join("run"));
    fails(
        &train_args(path_str(&nowhere)?, path_str(&out)?),
        &["Fashion-MNIST not found", "cargo xtask fetch-data", "nowhere"],
    )?;
    ensure!(!out.exists(), "a run directory was created without data");
    // An existing directory without all four files is no better.
    let partial = dir.path().join("partial");
    write_data(&partial)?;
    std::fs::remove_file(partial.join(TEST_LABELS))?;
    fails(&train_args(path_str(&partial)?, path_str(&out)?), &["fetch-data", TEST_LABELS])?;
    Ok(())
}

#[test]
fn corrupt_idx_files_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_data(&data)?;
    let (data_s, out_s) = (path_str(&data)?, path_str(&out)?);

    let images = data.join(TRAIN_IMAGES);
    let whole = std::fs::read(&images)?;
    std::fs::write(&images, &whole[..5000])?;
    fails(&train_args(data_s, out_s), &[TRAIN_IMAGES, "truncated"])?;
    ensure!(!out.exists(), "a run directory was created from corrupt data");
    std::fs::write(&images, &whole)?;

    let labels = data.join(TEST_LABELS);
    let mut bytes = std::fs::read(&labels)?;
    bytes[3] = 0x03; // an images magic number (3 dimensions) in a labels file
    std::fs::write(&labels, &bytes)?;
    fails(&train_args(data_s, out_s), &[TEST_LABELS, "dimension"])?;
    bytes[3] = 0x01;
    bytes[0] = 0x12; // no IDX file at all
    std::fs::write(&labels, &bytes)?;
    fails(&train_args(data_s, out_s), &[TEST_LABELS, "magic"])?;
    bytes[0] = 0x00;
    bytes[20] = 42; // a label that is no class
    std::fs::write(&labels, &bytes)?;
    fails(&train_args(data_s, out_s), &[TEST_LABELS, "label 42"])?;

    // A gzip file that stops half-way.
    std::fs::remove_file(&labels)?;
    let labels_gz = data.join(format!("{TEST_LABELS}.gz"));
    let full = resnet_data::gzip(&bytes_with_labels(TEST_LEN));
    std::fs::write(&labels_gz, &full[..full.len() / 2])?;
    fails(&train_args(data_s, out_s), &[TEST_LABELS])?;
    ensure!(!out.exists(), "a run directory was created from corrupt data");
    Ok(())
}

/// A valid IDX labels file of `n` labels cycling through the classes.
fn bytes_with_labels(n: usize) -> Vec<u8> {
    resnet_data::encode_labels(&resnet_data::IdxLabels { labels: (0..n).map(|i| (i % 10) as u8).collect() })
}

/// Rewrites the model configuration recorded in a safetensors file's metadata.
fn with_recorded_width(src: &Path, dst: &Path, width: usize) -> Result<()> {
    let bytes = std::fs::read(src)?;
    let prefix: [u8; 8] = bytes.get(..8).context("shorter than a safetensors header")?.try_into()?;
    let len = usize::try_from(u64::from_le_bytes(prefix))?;
    let header = bytes.get(8..8 + len).context("header longer than the file")?;
    let mut header: serde_json::Value = serde_json::from_slice(header)?;
    let config = header["__metadata__"]["resnet_config"].as_str().context("no resnet_config metadata")?;
    let mut config: serde_json::Value = serde_json::from_str(config)?;
    config["base_width"] = width.into();
    header["__metadata__"]["resnet_config"] = config.to_string().into();
    let mut text = serde_json::to_vec(&header)?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + len..]);
    std::fs::write(dst, out)?;
    Ok(())
}

#[test]
fn bad_weights_files_fail_clearly() -> Result<()> {
    let t = Trained::new()?;
    let data = t.data()?;
    let eval = |weights: &Path, needles: &[&str]| -> Result<()> {
        fails(&["eval", "--weights", path_str(weights)?, "--data-dir", data, "--device", "cpu"], needles)?;
        fails(
            &["predict", "--weights", path_str(weights)?, "--index", "0", "--data-dir", data, "--device", "cpu"],
            needles,
        )?;
        Ok(())
    };
    let dir = t.dir.path();
    eval(&dir.join("absent.safetensors"), &["absent.safetensors", "no such file"])?;
    eval(&t.run, &["no such file"])?;

    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect::<Vec<u8>>())?;
    eval(&garbage, &["garbage.safetensors", "not a readable safetensors file"])?;

    let best = std::fs::read(t.run.join("best.safetensors"))?;
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &best[..best.len() / 2])?;
    eval(&truncated, &["truncated.safetensors", "not a readable safetensors file"])?;
    let stub = dir.join("stub.safetensors");
    std::fs::write(&stub, &best[..5])?;
    eval(&stub, &["stub.safetensors"])?;

    // Weights of a width-4 model whose metadata claims width 8: every tensor is mis-shaped.
    let liar = dir.join("liar.safetensors");
    with_recorded_width(&t.run.join("best.safetensors"), &liar, 8)?;
    eval(&liar, &["liar.safetensors", "does not fit", "has shape [4, 1, 7, 7], the model needs [8, 1, 7, 7]"])?;
    // The same rewrite with the true width loads (so the failure above is the width's doing).
    let honest = dir.join("honest.safetensors");
    with_recorded_width(&t.run.join("best.safetensors"), &honest, 4)?;
    ok(&["eval", "--weights", path_str(&honest)?, "--data-dir", data, "--device", "cpu"])?;
    Ok(())
}

#[test]
fn bad_training_flags_fail_before_anything_is_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_data(&data)?;
    let (data_s, out_s) = (path_str(&data)?, path_str(&out)?);
    let cases: [(&[&str], &[&str]); 15] = [
        (&["--workers", "300"], &["(--workers)", "300"]),
        (&["--epochs", "18446744073709551615"], &["(--epochs)"]),
        (&["--val-split", "255"], &["(--val-split)", "255", "256 training examples"]),
        (&["--patience", "2"], &["(--patience)", "--val-split"]),
        (&["--limit-train", "1"], &["1 example(s)", "at least 2"]),
        (&["--lr=-1"], &["learning rate (--lr)", "-1"]),
        (&["--lr", "-1"], &["learning rate (--lr)", "-1"]),
        (&["--lr", "0"], &["learning rate (--lr)", "got 0"]),
        (&["--batch-size", "1"], &["batch size (--batch-size)", "got 1"]),
        (&["--resize", "4"], &["resize (--resize)", "got 4"]),
        (&["--micro-batch", "12"], &["(--micro-batch) 12", "32"]),
        (&["--epochs", "0"], &["(--epochs)"]),
        (&["--device", "cuda:0"], &["--device cuda:0", "without CUDA", "--device cpu"]),
        (&["--precision", "bf16"], &["(--precision)", "bf16", "CUDA"]),
        (&["--tf32"], &["--tf32", "CUDA"]),
    ];
    for (extra, needles) in cases {
        let mut args: Vec<&str> = train_args(data_s, out_s);
        // Later flags would clash with the defaults above, so replace the ones given.
        for flag in extra.iter().filter(|a| a.starts_with("--")) {
            let name = flag.split('=').next().unwrap_or(flag);
            if let Some(i) = args.iter().position(|a| *a == name) {
                args.drain(i..i + 2);
            }
        }
        args.extend_from_slice(extra);
        fails(&args, needles)?;
        ensure!(!out.exists(), "{extra:?}: a run directory was created");
    }
    fails(&["train", "--data-dir", data_s, "--out", out_s, "--device", "tpu"], &["--device tpu", "cpu"])?;
    ensure!(!out.exists(), "--device tpu: a run directory was created");
    Ok(())
}

#[test]
fn out_pointing_at_an_existing_run_suggests_resume() -> Result<()> {
    let t = Trained::new()?;
    let before = contents(&t.run)?;
    let run_s = path_str(&t.run)?;
    fails(&train_args(t.data()?, run_s), &["already holds a run", "--resume", run_s])?;
    ensure!(contents(&t.run)? == before, "the existing run was modified");
    no_temporaries(&t.run)?;
    // Corrupt input on an otherwise good command leaves the run untouched too.
    let bad = t.dir.path().join("bad");
    write_data(&bad)?;
    std::fs::write(bad.join(TRAIN_IMAGES), b"\0\0\x08\x03")?;
    fails(&["train", "--resume", run_s, "--data-dir", path_str(&bad)?, "--device", "cpu"], &[TRAIN_IMAGES])?;
    ensure!(contents(&t.run)? == before, "a failed resume modified the run");
    no_temporaries(&t.run)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// trustworthy runs

#[test]
fn out_holding_other_files_is_refused_untouched() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, mine) = (dir.path().join("data"), dir.path().join("mine"));
    write_data(&data)?;
    std::fs::create_dir(&mine)?;
    std::fs::write(mine.join("config.json"), b"my own config")?;
    std::fs::write(mine.join("metrics.jsonl"), b"my own metrics")?;
    let before = contents(&mine)?;
    fails(&train_args(path_str(&data)?, path_str(&mine)?), &["--out", "not empty", "config.json", "overwritten"])?;
    ensure!(contents(&mine)? == before, "the user's files were changed");
    // `--out .` is the same refusal for the current folder.
    let run = cli_in(&mine, &train_args(path_str(&data)?, "."))?;
    ensure!(run.code == Some(1) && run.stderr.contains("not empty"), "--out .: {run:?}");
    ensure!(contents(&mine)? == before, "--out . changed the user's files");
    // An empty folder is fine.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    ok(&train_args(path_str(&data)?, path_str(&empty)?))?;
    Ok(())
}

#[test]
fn default_run_folders_are_readable_and_never_shared() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_data(&data)?;
    let mut args = train_args(path_str(&data)?, "unused");
    let at = args.iter().position(|a| *a == "--out").context("--out")?;
    args.drain(at..at + 2);
    let mut folders = Vec::new();
    for _ in 0..2 {
        let run = cli_in(dir.path(), &args)?;
        ensure!(run.code == Some(0), "{run:?}");
        let line = run.stdout.lines().find_map(|l| l.strip_prefix("run directory: ")).context("no run directory")?;
        folders.push(line.to_string());
    }
    ensure!(folders[0] != folders[1], "two runs share {}", folders[0]);
    for f in &folders {
        ensure!(dir.path().join(f).join("checkpoint.safetensors").is_file(), "{f} holds no run");
        let name = Path::new(f).file_name().and_then(|n| n.to_str()).context("name")?;
        // quick-2026-11-30T16-26-00, with -2 when the second run started in the same second
        let stamp = name.strip_prefix("quick-").context("no preset in the name")?;
        let digits: String = stamp.chars().take(19).filter(char::is_ascii_digit).collect();
        ensure!(digits.len() == 14 && stamp.get(10..11) == Some("T"), "unreadable name {name}");
    }
    Ok(())
}

#[test]
fn a_last_batch_of_one_example_trains_on() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_data(&data)?;
    let mut args = train_args(path_str(&data)?, path_str(&out)?);
    // 225 = 7 × 32 + 1
    args.extend_from_slice(&["--limit-train", "225"]);
    ok(&args)?;
    Ok(())
}

#[test]
fn a_run_on_a_constant_schedule_extends_with_epochs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_data(&data)?;
    let mut args = train_args(path_str(&data)?, path_str(&out)?);
    args.extend_from_slice(&["--schedule", "constant", "--warmup-epochs", "0"]);
    ok(&args)?;
    ok(&["train", "--resume", path_str(&out)?, "--epochs", "3", "--data-dir", path_str(&data)?, "--device", "cpu"])?;
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    ensure!(text.lines().filter(|l| l.contains("\"kind\":\"epoch\"")).count() == 3, "{text}");
    Ok(())
}

#[test]
fn eval_of_a_d2l_style_best_file_says_it_was_chosen_on_test_accuracy() -> Result<()> {
    let t = Trained::new()?;
    let run = ok(&["eval", "--weights", &t.file("best.safetensors")?, "--data-dir", t.data()?, "--device", "cpu"])?;
    ensure!(run.stdout.contains("chosen on this test accuracy"), "{}", run.stdout);
    let dir = t.dir.path().join("val");
    let mut args = train_args(t.data()?, path_str(&dir)?);
    args.extend_from_slice(&["--val-split", "64", "--patience", "5"]);
    let train = ok(&args)?;
    ensure!(train.stdout.contains("val acc") && train.stderr.contains("val acc"), "{train:?}");
    let run = ok(&[
        "eval",
        "--weights",
        path_str(&dir.join("best.safetensors"))?,
        "--data-dir",
        t.data()?,
        "--device",
        "cpu",
    ])?;
    ensure!(run.stdout.contains("chosen on validation accuracy"), "{}", run.stdout);
    Ok(())
}

#[test]
fn predict_index_on_an_empty_test_set_fails_clearly() -> Result<()> {
    let t = Trained::new()?;
    let empty = t.dir.path().join("empty-test");
    FashionMnist { train: Split::synthetic(4, 28, 28, 1), test: Split::synthetic(0, 28, 28, 2) }.save(&empty, false)?;
    fails(
        &[
            "predict",
            "--weights",
            &t.file("best.safetensors")?,
            "--index",
            "0",
            "--data-dir",
            path_str(&empty)?,
            "--device",
            "cpu",
        ],
        &["--index", "no images"],
    )?;
    Ok(())
}

#[test]
fn huge_models_are_refused_or_computed_before_allocating() -> Result<()> {
    let t = Trained::new()?;
    // A small file whose metadata claims width 1024: 2.9 billion parameters.
    let claim = t.dir.path().join("claim.safetensors");
    with_recorded_width(&t.run.join("best.safetensors"), &claim, 1024)?;
    fails(
        &["eval", "--weights", path_str(&claim)?, "--data-dir", t.data()?, "--device", "cpu"],
        &["claim.safetensors", "parameters"],
    )?;
    let run = ok(&["summary", "--width", "1024", "--resize", "512"])?;
    ensure!(run.stderr.contains("without running the network"), "{}", run.stderr);
    ensure!(shapes(&run.stdout).first().map(String::as_str) == Some("(1, 1024, 128, 128)"), "{}", run.stdout);
    ensure!(run.stdout.contains("Trainable parameters: 2,8"), "{}", run.stdout);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// predict: formats, folders, JSON

/// The committed Pillow fixture images (PNG, JPEG, GIF, BMP, TIFF, WebP).
fn luma_fixtures() -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/luma");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())).collect::<std::result::Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e != "json"));
    files.sort();
    ensure!(files.len() >= 15, "fixture images missing in {}", dir.display());
    Ok(files)
}

/// The JSON lines predict printed, checked: one object per line with a known class that is
/// the most probable of all ten, whose probabilities sum to 1.
fn json_predictions(stdout: &str) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for line in stdout.lines() {
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line:?}"))?;
        let probs = v["probabilities"].as_object().with_context(|| format!("no probabilities: {line}"))?;
        ensure!(probs.len() == CLASS_NAMES.len(), "{} probabilities: {line}", probs.len());
        let sum: f64 = probs.values().filter_map(serde_json::Value::as_f64).sum();
        ensure!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}: {line}");
        let class = v["class"].as_str().with_context(|| format!("no class: {line}"))?;
        let top = probs.iter().filter_map(|(k, p)| p.as_f64().map(|p| (k, p))).max_by(|a, b| a.1.total_cmp(&b.1));
        ensure!(top.map(|t| t.0.as_str()) == Some(class), "class {class} is not the most probable: {line}");
        out.push(v);
    }
    Ok(out)
}

#[test]
fn predict_reads_folders_of_common_formats_and_prints_json_lines() -> Result<()> {
    let t = Trained::new()?;
    let (weights, data) = (t.file("best.safetensors")?, t.data()?);
    // A folder tree: every fixture format in a subfolder, test image 0 as a PNG at the top,
    // and a file that is not an image (skipped inside folders).
    let photos = t.dir.path().join("photos");
    let nested = photos.join("formats");
    std::fs::create_dir_all(&nested)?;
    for f in luma_fixtures()? {
        std::fs::copy(&f, nested.join(f.file_name().context("file name")?))?;
    }
    write_png(&photos.join("a_test0.png"), 28, 28, png::ColorType::Grayscale, t.test.image(0))?;
    std::fs::write(photos.join("README.txt"), b"not an image")?;
    let photos_s = path_str(&photos)?;
    let run = ok(&[
        "predict",
        "--weights",
        &weights,
        photos_s,
        "--index",
        "0",
        "--data-dir",
        data,
        "--device",
        "cpu",
        "--json",
    ])?;
    let records = json_predictions(&run.stdout)?;
    let paths: Vec<&str> = records.iter().filter_map(|r| r["path"].as_str()).collect();
    let mut expected: Vec<String> = vec![path_str(&photos.join("a_test0.png"))?.to_string()];
    for f in luma_fixtures()? {
        expected.push(path_str(&nested.join(f.file_name().context("file name")?))?.to_string());
    }
    ensure!(paths == expected, "paths not the folder's images in sorted order:\n{paths:#?}\nvs\n{expected:#?}");
    let test0 = records.last().context("no record for --index 0")?;
    ensure!(test0["index"] == 0 && test0["true_class"] == CLASS_NAMES[t.test.labels[0] as usize], "{test0}");
    // The PNG of test image 0 gets exactly test[0]'s probabilities.
    ensure!(records[0]["probabilities"] == test0["probabilities"], "{} vs {}", records[0], test0);
    // Text output of one JPEG names it.
    let jpg = nested.join("rgb.jpg");
    let text = ok(&["predict", "--weights", &weights, path_str(&jpg)?, "--device", "cpu", "--top", "3"])?;
    predictions(&text.stdout, path_str(&jpg)?)?;
    // A broken image inside a folder stops the command, naming it.
    std::fs::write(nested.join("broken.webp"), b"RIFF\x10\0\0\0WEBPVP8 garbage")?;
    fails(&["predict", "--weights", &weights, photos_s, "--device", "cpu"], &["broken.webp"])?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// train --init-weights

#[test]
fn train_starts_from_given_weights_and_refuses_misfits_before_writing() -> Result<()> {
    let t = Trained::new()?;
    let best = t.file("best.safetensors")?;
    let next = t.dir.path().join("next");
    let mut args = train_args(t.data()?, path_str(&next)?);
    let e = args.iter().position(|a| *a == "--epochs").context("--epochs")?;
    args[e + 1] = "1";
    args.extend(["--init-weights", best.as_str()]);
    ok(&args)?;
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(next.join("config.json"))?)?;
    ensure!(cfg["init_weights"] == best.as_str(), "config.json does not record the weights: {cfg}");

    // Width 8 from width-4 weights: refused, naming the tensor, with no run directory.
    let wide = t.dir.path().join("wide");
    let mut args = train_args(t.data()?, path_str(&wide)?);
    let w = args.iter().position(|a| *a == "--width").context("--width")?;
    args[w + 1] = "8";
    args.extend(["--init-weights", best.as_str()]);
    fails(&args, &["best.safetensors", "`0.0.weight` has shape [4, 1, 7, 7], the model needs [8, 1, 7, 7]"])?;
    ensure!(!wide.exists(), "a run directory was created for weights that do not fit");
    // --resume keeps its own weights.
    fails(
        &["train", "--resume", path_str(&t.run)?, "--init-weights", best.as_str(), "--device", "cpu"],
        &["--init-weights"],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// report

/// `src` and `href` attribute values in `html`.
fn links(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["src=\"", "href=\"", "src='", "href='", "url("] {
        for (i, _) in html.match_indices(attr) {
            let rest = &html[i + attr.len()..];
            let end = rest.find(['"', '\'', ')']).unwrap_or(rest.len());
            out.push(rest[..end].to_string());
        }
    }
    out
}

/// Checks the page: every figure present as an inline PNG, nothing to fetch, one table row per
/// run; returns the page.
fn check_report(dir: &Path, runs: &[&Path]) -> Result<String> {
    let html = std::fs::read_to_string(dir.join("index.html"))?;
    ensure!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"), "not a whole page");
    for id in ["runs", "curves", "confusion", "per-class", "per-class-table", "mistakes"] {
        ensure!(html.contains(&format!("id=\"{id}\"")), "no element with id {id}");
    }
    for name in ["curves.png", "confusion.png", "per_class.png", "mistakes.png"] {
        let bytes = std::fs::read(dir.join(name)).with_context(|| format!("{name} missing"))?;
        ensure!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{name} is not a PNG");
    }
    let links = links(&html);
    ensure!(links.len() == 4, "expected 4 inline figures, found links {links:?}");
    for l in &links {
        ensure!(l.starts_with("data:image/png;base64,iVBORw0KGgo"), "a link that is not an inline PNG: {:.80}", l);
    }
    let lower = html.to_lowercase();
    ensure!(!lower.contains("http://") && !lower.contains("https://"), "the page names a web address");
    ensure!(!lower.contains("<script") && !lower.contains("<link"), "the page loads scripts or style sheets");
    let rows = html.split("<table id=\"runs\">").nth(1).and_then(|t| t.split("</table>").next()).unwrap_or("");
    ensure!(rows.matches("<tr>").count() == runs.len() + 1, "runs table:\n{rows}");
    for run in runs {
        ensure!(html.contains(path_str(run)?), "{} not in the page", run.display());
    }
    for class in CLASS_NAMES {
        ensure!(html.contains(&format!("<td>{}</td>", class.replace('&', "&amp;"))), "no per-class row for {class}");
    }
    Ok(html)
}

#[test]
fn report_of_one_and_of_two_runs_is_a_self_contained_page() -> Result<()> {
    let t = Trained::new()?;
    let run = ok(&["report", path_str(&t.run)?, "--data-dir", t.data()?, "--device", "cpu"])?;
    let default_out = t.run.join("report");
    ensure!(run.stdout.lines().next() == Some(path_str(&default_out.join("index.html"))?), "{}", run.stdout);
    let one = check_report(&default_out, &[&t.run])?;
    ensure!(one.contains(&format!("on {TEST_LEN} test images")), "the page does not say what was evaluated");

    // A second run with another learning rate, stopped early according to its metrics.
    let other = t.dir.path().join("other");
    let mut args = train_args(t.data()?, path_str(&other)?);
    args.extend(["--lr", "0.05"]);
    ok(&args)?;
    let metrics = other.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics)?;
    text.push_str("{\"kind\":\"early_stop\",\"epoch\":2,\"best_epoch\":1,\"patience\":1}\n");
    std::fs::write(&metrics, text)?;
    let out = t.dir.path().join("cmp");
    ok(&[
        "report",
        path_str(&t.run)?,
        path_str(&other)?,
        "--out",
        path_str(&out)?,
        "--data-dir",
        t.data()?,
        "--device",
        "cpu",
    ])?;
    let two = check_report(&out, &[&t.run, &other])?;
    ensure!(two.contains("after epoch 2"), "the early stop is not shown");
    ensure!(!one.contains("after epoch"), "a run without early stopping shows one");
    ensure!(
        std::fs::read(out.join("curves.png"))? != std::fs::read(default_out.join("curves.png"))?,
        "two runs drew the same curves as one"
    );

    // Bad input: not a run directory, a run without best weights, missing data.
    fails(
        &["report", path_str(&t.dir.path().join("nope"))?, "--data-dir", t.data()?],
        &["nope", "not a run directory"],
    )?;
    let empty = t.dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    fails(&["report", path_str(&empty)?, "--data-dir", t.data()?], &["metrics.jsonl"])?;
    Ok(())
}

/// Renders the report in headless Chromium and checks the screenshot shows the page, not a
/// blank window. Ignored, with the reason, where chromium is missing, except under `CI=true`
/// (see `build.rs`), where CI's set-up must have installed it.
#[test]
#[cfg_attr(chromium_missing, ignore = "chromium is not installed (apt-get install chromium); CI installs it")]
fn report_renders_in_headless_chromium() -> Result<()> {
    let t = Trained::new()?;
    let out = t.dir.path().join("report");
    ok(&["report", path_str(&t.run)?, "--out", path_str(&out)?, "--data-dir", t.data()?, "--device", "cpu"])?;
    let shot = t.dir.path().join("shot.png");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".into());
    let profile = t.dir.path().join("chromium-profile");
    let mut child = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", path_str(&profile)?),
            &format!("--screenshot={}", path_str(&shot)?),
            "--window-size=1100,2400",
            &format!("file://{}", path_str(&out.join("index.html"))?),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {chromium} (apt-get install chromium)"))?;
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(120) {
            child.kill()?;
            anyhow::bail!("chromium did not finish the screenshot within 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    ensure!(status.success() && shot.is_file(), "chromium failed ({status}), no screenshot");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf)?;
    let channels = frame.color_type.samples();
    ensure!(channels >= 3, "unexpected screenshot colour type {:?}", frame.color_type);
    let pixels: Vec<&[u8]> = buf[..frame.buffer_size()].chunks_exact(channels).collect();
    let non_white = pixels.iter().filter(|p| p[..3].iter().any(|&c| c < 240)).count();
    let colours: std::collections::HashSet<[u8; 3]> = pixels.iter().map(|p| [p[0], p[1], p[2]]).collect();
    let share = non_white as f64 / pixels.len() as f64;
    // Text, curves, the heat map and the image grid: several per cent of the window, hundreds of colours.
    ensure!(
        share > 0.03 && colours.len() > 200,
        "blank-looking screenshot: {share:.4} non-white, {} colours",
        colours.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// completions and help

#[test]
fn completions_parse_and_name_every_subcommand() -> Result<()> {
    let subcommands = ["train", "eval", "predict", "summary", "report", "completions"];
    let bash = ok(&["completions", "bash"])?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("resnet-cli.bash");
    std::fs::write(&script, &bash.stdout)?;
    let check = Command::new("bash").arg("-n").arg(&script).output().context("running bash -n")?;
    ensure!(check.status.success(), "bash -n rejects the script: {}", String::from_utf8_lossy(&check.stderr));
    // Sourcing defines the completion function and registers it.
    let source = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p resnet-cli", path_str(&script)?))
        .output()?;
    ensure!(source.status.success(), "sourcing failed: {}", String::from_utf8_lossy(&source.stderr));
    for (shell, marker) in
        [("bash", "complete -F _resnet__cli"), ("zsh", "#compdef resnet-cli"), ("fish", "complete -c resnet-cli")]
    {
        let run = if shell == "bash" { bash.stdout.clone() } else { ok(&["completions", shell])?.stdout };
        ensure!(run.contains(marker), "{shell} script lacks {marker:?}");
        for sub in subcommands {
            ensure!(run.contains(sub), "{shell} script lacks the subcommand {sub}");
        }
        ensure!(run.contains("init-weights") && run.contains("mistakes"), "{shell} script lacks new flags");
    }
    fails(&["completions", "tcsh"], &["tcsh"])?;
    Ok(())
}

#[test]
fn every_subcommand_s_help_shows_examples() -> Result<()> {
    for sub in ["train", "eval", "predict", "summary", "report", "completions"] {
        let help = ok(&[sub, "--help"])?.stdout;
        ensure!(help.contains("Examples:") && help.contains(&format!("resnet-cli {sub}")), "{sub} --help:\n{help}");
    }
    ensure!(ok(&["predict", "--help"])?.stdout.contains("JSON lines"), "predict --help does not say JSON lines");
    Ok(())
}

/// `--erase` and `--tta-hflip` reach config.json; the weights files record the flip TTA, so
/// `eval` reproduces the run's accuracy by default, and `--no-tta-hflip` turns it off.
#[test]
fn ema_flag_reaches_the_run_and_eval_scores_the_average() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_data(&data)?;
    let mut args = train_args(path_str(&data)?, path_str(&out)?);
    args.extend_from_slice(&["--ema", "0.9"]);
    ok(&args)?;
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json"))?)?;
    ensure!(config["ema_decay"] == 0.9, "config.json {config}");
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let last = text.lines().rfind(|l| l.contains("\"kind\":\"epoch\"")).context("no epoch record")?;
    let printed = f64_field(&serde_json::from_str(last)?, "test_acc")?;
    let weights = out.join("checkpoint.safetensors");
    let eval = ["eval", "--weights", path_str(&weights)?, "--data-dir", path_str(&data)?, "--device", "cpu", "--json"];
    let scored: serde_json::Value = serde_json::from_str(&ok(&eval)?.stdout)?;
    ensure!(f64_field(&scored, "test_acc")? == printed, "eval {scored} vs printed {printed}");
    // Averaging changes nothing in training, so the same run without it ends on the --ema run's
    // last weights: --last-weights must give that run's probabilities exactly, and the average
    // (the default) different ones.
    let plain_out = dir.path().join("plain");
    ok(&train_args(path_str(&data)?, path_str(&plain_out)?))?;
    let probabilities = |file: &Path, extra: &[&str]| -> Result<String> {
        let mut a = vec!["predict", "--weights", path_str(file)?, "--data-dir", path_str(&data)?, "--device", "cpu"];
        a.extend_from_slice(&["--index", "0", "--index", "1", "--index", "2", "--json"]);
        a.extend_from_slice(extra);
        Ok(ok(&a)?.stdout)
    };
    let plain = probabilities(&plain_out.join("checkpoint.safetensors"), &[])?;
    let last_weights = probabilities(&weights, &["--last-weights"])?;
    ensure!(last_weights == plain, "predict --last-weights:\n{last_weights}\nthe run without --ema:\n{plain}");
    let average = probabilities(&weights, &[])?;
    ensure!(average != plain, "the average predicts exactly as the last weights:\n{average}");
    let mut last_eval = eval.to_vec();
    last_eval.push("--last-weights");
    let last_scored: serde_json::Value = serde_json::from_str(&ok(&last_eval)?.stdout)?;
    ensure!(last_scored["last_weights"] == true, "eval --last-weights {last_scored}");
    // Files without an average have no "last weights" to choose.
    for other in [out.join("best.safetensors"), plain_out.join("checkpoint.safetensors")] {
        let args = [
            "eval",
            "--weights",
            path_str(&other)?,
            "--data-dir",
            path_str(&data)?,
            "--device",
            "cpu",
            "--last-weights",
        ];
        fails(&args, &["--last-weights", "no weight average"])?;
    }
    let bad_out = dir.path().join("bad");
    let mut bad = train_args(path_str(&data)?, path_str(&bad_out)?);
    bad.extend_from_slice(&["--ema", "1.5"]);
    fails(&bad, &["--ema", "(0, 1)"])?;
    Ok(())
}

#[test]
fn erasing_and_flip_tta_flags_reach_the_run_and_eval_follows_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (data, out) = (dir.path().join("data"), dir.path().join("run"));
    write_data(&data)?;
    let mut args = train_args(path_str(&data)?, path_str(&out)?);
    args.extend_from_slice(&["--erase", "--crop-padding", "2", "--tta-hflip"]);
    ok(&args)?;
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json"))?)?;
    ensure!(config["augment"]["erase"] == true && config["augment"]["crop_padding"] == 2, "config.json {config}");
    ensure!(config["tta_hflip"] == true, "config.json {config}");
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let last = text.lines().rfind(|l| l.contains("\"kind\":\"epoch\"")).context("no epoch record")?;
    let printed = f64_field(&serde_json::from_str(last)?, "test_acc")?;
    let (weights, data_s) = (out.join("checkpoint.safetensors"), path_str(&data)?);
    let eval = |extra: &[&str]| -> Result<serde_json::Value> {
        let mut a = vec!["eval", "--weights", path_str(&weights)?, "--data-dir", data_s, "--device", "cpu", "--json"];
        a.extend_from_slice(extra);
        Ok(serde_json::from_str(&ok(&a)?.stdout)?)
    };
    let with = eval(&[])?;
    ensure!(with["tta_hflip"] == true && f64_field(&with, "test_acc")? == printed, "eval {with} vs printed {printed}");
    let without = eval(&["--no-tta-hflip"])?;
    ensure!(without["tta_hflip"] == false, "eval --no-tta-hflip {without}");
    Ok(())
}
