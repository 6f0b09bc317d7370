//! `resnet-cli predict`: the top classes, by name, for PNG files or test-set indices.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use resnet_data::{resize_bilinear, Normalize, CLASS_NAMES};

use super::Outcome;
use crate::args::PredictArgs;
use crate::{device, image, weights};

/// Runs the command.
pub fn run(a: PredictArgs) -> Result<Outcome> {
    if a.images.is_empty() && a.indices.is_empty() {
        bail!("nothing to predict: give PNG files and/or --index N");
    }
    let device = device::select(&a.input.device)?;
    let loaded = weights::load(&a.input.weights, &device, a.input.resize, a.input.normalize())?;
    let side = loaded.resize;
    let mut inputs: Vec<(String, Vec<u8>)> = Vec::new();
    for path in &a.images {
        let img = image::read_png(path)?;
        let mut px = resize_bilinear(&img.pixels, img.width, img.height, side, side)
            .with_context(|| format!("resizing {}", path.display()))?;
        if a.invert {
            px.iter_mut().for_each(|p| *p = 255 - *p);
        }
        inputs.push((path.display().to_string(), px));
    }
    if !a.indices.is_empty() {
        let (test, _) = resnet_data::load_test(a.input.data_dir.as_deref())?;
        let test = &test;
        if test.is_empty() {
            bail!("--index: the test set holds no images");
        }
        for &i in &a.indices {
            if i >= test.len() {
                bail!("--index {i}: the test set has {} images (0..={})", test.len(), test.len() - 1);
            }
            let px = resize_bilinear(test.image(i), test.cols, test.rows, side, side)?;
            let truth = CLASS_NAMES.get(test.labels[i] as usize).copied().unwrap_or("?");
            inputs.push((format!("test[{i}] (true: {truth})"), px));
        }
    }
    let norm = loaded.normalize.then(Normalize::fashion_mnist);
    let mut values = Vec::with_capacity(inputs.len() * side * side);
    for (_, px) in &inputs {
        values.extend(px.iter().map(|&p| {
            let v = p as f32 / 255.0;
            norm.map_or(v, |n| (v - n.mean) / n.std)
        }));
    }
    let xs = Tensor::from_vec(values, (inputs.len(), 1, side, side), &device)?;
    let probs = candle_nn::ops::softmax(&loaded.model.infer(&xs)?, D::Minus1)?;
    let probs: Vec<Vec<f32>> = probs.to_device(&Device::Cpu)?.to_vec2()?;
    for ((name, _), p) in inputs.iter().zip(probs) {
        let mut ranked: Vec<(usize, f32)> = p.into_iter().enumerate().collect();
        ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
        let top: Vec<String> = ranked
            .iter()
            .take(a.top as usize)
            .map(|(c, pr)| format!("{} {:.3}", CLASS_NAMES.get(*c).copied().unwrap_or("?"), pr))
            .collect();
        println!("{name}: {}", top.join(", "));
    }
    Ok(Outcome::Done)
}
