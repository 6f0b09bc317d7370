//! `resnet-cli predict`: the top classes, by name, for image files, folders of images or
//! test-set indices; as text or as JSON lines.

use std::io::Write;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use resnet_data::{resize_bilinear, Normalize, CLASS_NAMES};

use super::Outcome;
use crate::args::PredictArgs;
use crate::{device, image, weights};

/// Images per forward pass: bounds memory for folders of thousands of images.
const CHUNK: usize = 64;

/// Where one prediction's input came from.
enum Source {
    /// An image file.
    File(String),
    /// A test-set image and its true class.
    Test { index: usize, truth: &'static str },
}

/// Runs the command.
pub fn run(a: PredictArgs) -> Result<Outcome> {
    if a.images.is_empty() && a.indices.is_empty() {
        bail!("nothing to predict: give image files or folders and/or --index N");
    }
    let files = image::expand(&a.images)?;
    let device = device::select(&a.input.device)?;
    let loaded = weights::load(&a.input.weights, &device, a.input.resize, a.input.normalize(), a.input.pick())?;
    let side = loaded.resize;
    let mut inputs: Vec<(Source, Vec<u8>)> = Vec::new();
    for path in &files {
        let img = image::read(path)?;
        let mut px = resize_bilinear(&img.pixels, img.width, img.height, side, side)
            .with_context(|| format!("resizing {}", path.display()))?;
        if a.invert {
            px.iter_mut().for_each(|p| *p = 255 - *p);
        }
        inputs.push((Source::File(path.display().to_string()), px));
    }
    if !a.indices.is_empty() {
        let (test, _) = resnet_data::load_test(a.input.data_dir.as_deref())?;
        if test.is_empty() {
            bail!("--index: the test set holds no images");
        }
        for &i in &a.indices {
            if i >= test.len() {
                bail!("--index {i}: the test set has {} images (0..={})", test.len(), test.len().saturating_sub(1));
            }
            let px = resize_bilinear(test.image(i), test.cols, test.rows, side, side)?;
            let truth = test.labels.get(i).and_then(|&l| CLASS_NAMES.get(l as usize)).copied().unwrap_or("?");
            inputs.push((Source::Test { index: i, truth }, px));
        }
    }
    let norm = loaded.normalize.then(Normalize::fashion_mnist);
    let tta_hflip = a.input.tta_hflip(loaded.tta_hflip);
    let mut out = std::io::stdout().lock();
    for chunk in inputs.chunks(CHUNK) {
        let mut values = Vec::with_capacity(chunk.len() * side * side);
        for (_, px) in chunk {
            values.extend(px.iter().map(|&p| {
                let v = p as f32 / 255.0;
                norm.map_or(v, |n| (v - n.mean) / n.std)
            }));
        }
        let xs = Tensor::from_vec(values, (chunk.len(), 1, side, side), &device)?;
        let probs = resnet_train::class_probabilities(&loaded.model, &xs, tta_hflip)?;
        let probs: Vec<Vec<f32>> = probs.to_device(&Device::Cpu)?.to_vec2()?;
        for ((source, _), p) in chunk.iter().zip(probs) {
            let line = if a.json { json_line(source, &p)? } else { text_line(source, p, a.top as usize) };
            writeln!(out, "{line}")?;
        }
    }
    Ok(Outcome::Done)
}

fn class_name(c: usize) -> &'static str {
    CLASS_NAMES.get(c).copied().unwrap_or("?")
}

/// `name: Class p, Class p, ...` with the `top` most probable classes.
fn text_line(source: &Source, p: Vec<f32>, top: usize) -> String {
    let name = match source {
        Source::File(path) => path.clone(),
        Source::Test { index, truth } => format!("test[{index}] (true: {truth})"),
    };
    let mut ranked: Vec<(usize, f32)> = p.into_iter().enumerate().collect();
    ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
    let top: Vec<String> = ranked.iter().take(top).map(|(c, pr)| format!("{} {:.3}", class_name(*c), pr)).collect();
    format!("{name}: {}", top.join(", "))
}

/// One JSON object: the input, the most probable class and every class's probability.
fn json_line(source: &Source, p: &[f32]) -> Result<String> {
    let best = p.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|(c, _)| c).unwrap_or(0);
    let probabilities: serde_json::Map<String, serde_json::Value> =
        p.iter().enumerate().map(|(c, &v)| (class_name(c).to_string(), serde_json::json!(v))).collect();
    let mut obj = serde_json::json!({
        "class": class_name(best),
        "class_index": best,
        "probabilities": probabilities,
    });
    match source {
        Source::File(path) => obj["path"] = serde_json::json!(path),
        Source::Test { index, truth } => {
            obj["index"] = serde_json::json!(index);
            obj["true_class"] = serde_json::json!(truth);
        }
    }
    Ok(serde_json::to_string(&obj)?)
}
