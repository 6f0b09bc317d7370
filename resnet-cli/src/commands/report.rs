//! `resnet-cli report RUN_DIR…`: reads the runs' metrics, evaluates the chosen weights on the
//! test set and writes the self-contained HTML page with its PNG figures.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use resnet_data::{LoaderConfig, Normalize, CLASS_NAMES};
use resnet_train::report::{self, Report, ReportRun};

use super::Outcome;
use crate::args::ReportArgs;
use crate::{device, weights};

/// Runs the command.
pub fn run(a: ReportArgs) -> Result<Outcome> {
    let Some(first) = a.runs.first() else {
        bail!("give at least one RUN_DIR");
    };
    let mut runs = Vec::with_capacity(a.runs.len());
    for dir in &a.runs {
        if !dir.is_dir() {
            bail!("{}: not a run directory (pass the --out directory of `resnet-cli train`)", dir.display());
        }
        runs.push(ReportRun::read(dir).with_context(|| format!("reading run {}", dir.display()))?);
    }
    let weights_path: PathBuf = a.weights.clone().unwrap_or_else(|| first.join(resnet_train::run_dir::files::BEST));
    if a.weights.is_none() && !weights_path.is_file() {
        bail!(
            "{}: no such file; the first run has no best weights yet (finish an epoch) or pass --weights FILE",
            weights_path.display()
        );
    }
    let device = device::select(&a.device)?;
    let loaded = weights::load(&weights_path, &device, None, None, weights::Pick::Evaluated)?;
    let (test, _) = resnet_data::load_test(a.data_dir.as_deref())?;
    let loader = LoaderConfig {
        batch_size: 256,
        resize: loaded.resize,
        shuffle: false,
        seed: 0,
        augment: None,
        normalize: loaded.normalize.then(Normalize::fashion_mnist),
        workers: 1,
        prefetch: 4,
    };
    eprintln!("evaluating {} on {} test images at {} px", weights_path.display(), test.len(), loaded.resize);
    let predictions = resnet_train::predictions(&loaded.model, &test, &loader, &device, loaded.tta_hflip)?;
    let mut confusion = resnet_train::Confusion::new(loaded.model.config().num_classes);
    let labels: Vec<u32> = test.labels.iter().map(|&l| l as u32).collect();
    let predicted: Vec<u32> = predictions.iter().map(|p| p.class).collect();
    confusion.add(&labels, &predicted);
    let mistakes = report::most_confident_mistakes(&test, &predictions, a.mistakes as usize);
    let out = a.out.clone().unwrap_or_else(|| first.join("report"));
    let report = Report {
        runs,
        weights: weights_path,
        confusion,
        class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
        mistakes,
    };
    let files = report::write(&report, &out).with_context(|| format!("writing the report into {}", out.display()))?;
    println!("{}", files.html.display());
    for f in &files.figures {
        println!("{}", f.display());
    }
    Ok(Outcome::Done)
}
