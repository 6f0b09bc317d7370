//! `resnet-cli eval`: test accuracy, per-class accuracy and the confusion matrix.

use anyhow::Result;
use resnet_data::{LoaderConfig, Normalize, CLASS_NAMES};

use super::Outcome;
use crate::args::EvalArgs;
use crate::{device, weights};

/// Runs the command.
pub fn run(a: EvalArgs) -> Result<Outcome> {
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let device = device::select(&a.input.device)?;
    let loaded = weights::load(&a.input.weights, &device, a.input.resize, a.input.normalize(), a.input.pick())?;
    let (test, _) = resnet_data::load_test(a.input.data_dir.as_deref())?;
    let test = match a.limit {
        Some(0) => anyhow::bail!("--limit must be at least 1"),
        Some(n) if n < test.len() => test.limit(n),
        _ => test,
    };
    let loader = LoaderConfig {
        batch_size: a.batch_size,
        resize: loaded.resize,
        shuffle: false,
        seed: 0,
        augment: None,
        normalize: loaded.normalize.then(Normalize::fashion_mnist),
        workers: 1,
        prefetch: 4,
    };
    let tta_hflip = a.input.tta_hflip(loaded.tta_hflip);
    let confusion = resnet_train::evaluate(&loaded.model, &test, &loader, &device, tta_hflip)?;
    if a.json {
        let json = serde_json::json!({
            "weights": a.input.weights,
            "examples": confusion.total(),
            "resize": loaded.resize,
            "tta_hflip": tta_hflip,
            "last_weights": a.input.last_weights,
            "test_acc": confusion.accuracy(),
            "selected_on": loaded.selected.as_ref().map(|(on, _)| on),
            "selected_epoch": loaded.selected.as_ref().map(|(_, epoch)| epoch),
            "per_class": CLASS_NAMES.iter().zip(confusion.per_class()).map(|(n, a)| serde_json::json!({"class": n, "acc": a})).collect::<Vec<_>>(),
            "confusion": confusion.counts,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(Outcome::Done);
    }
    let tta = if tta_hflip { ", averaged with mirror images" } else { "" };
    let last = if a.input.last_weights { ", last weights (not their average)" } else { "" };
    println!("test acc {:.4} on {} images at {} px{tta}{last}", confusion.accuracy(), confusion.total(), loaded.resize);
    match &loaded.selected {
        Some((on, epoch)) if on == "test_acc" => println!(
            "(epoch {epoch}'s weights, chosen on this test accuracy: an optimistic estimate; train with --val-split for an unbiased one)"
        ),
        Some((_, epoch)) => println!("(epoch {epoch}'s weights, chosen on validation accuracy)"),
        None => {}
    }
    println!();
    println!("{:<12} {:>8}", "class", "accuracy");
    for (i, acc) in confusion.per_class().iter().enumerate() {
        let name = CLASS_NAMES.get(i).copied().unwrap_or("?");
        match acc {
            Some(a) => println!("{name:<12} {a:>8.4}"),
            None => println!("{name:<12} {:>8}", "-"),
        }
    }
    println!();
    println!("confusion matrix (rows: true class, columns: predicted)");
    print!("{:<12}", "");
    for i in 0..confusion.counts.len() {
        print!("{i:>6}");
    }
    println!();
    for (i, row) in confusion.counts.iter().enumerate() {
        print!("{:<12}", CLASS_NAMES.get(i).copied().unwrap_or("?"));
        for c in row {
            print!("{c:>6}");
        }
        println!();
    }
    Ok(Outcome::Done)
}
