//! A short run on the real Fashion-MNIST, where it is installed (`--data-dir` is not needed:
//! `$RESNET_DATA_DIR`, the user cache and Debian's directory are searched; nothing is
//! downloaded). It must learn: a width-8 ResNet-18 with the `quick` recipe, 2 epochs on the first
//! 2,048 training images, must reach 60 % on the first 1,000 test images (chance is 10 %; it
//! gets about 70-76 %). A few seconds in the test profile. Where the data is not installed, the
//! build script compiles the test as ignored, so the runner prints `ignored, <why>`; under
//! `CI=true` it always runs and missing data fails it.
#![allow(clippy::print_stdout)] // The epoch lines, for a person reading `--nocapture` output.

use anyhow::{ensure, Result};
use candle_core::Device;
use resnet_core::ResNetConfig;
use resnet_tests::Recorder;
use resnet_train::{TrainConfig, Trainer};

#[test]
#[cfg_attr(
    not(fashion_mnist_installed),
    ignore = "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist or cargo xtask fetch-data"
)]
fn a_short_run_on_fashion_mnist_learns() -> Result<()> {
    let (data, dir) = resnet_data::load_default(None)?;
    println!("Fashion-MNIST from {}", dir.display());
    ensure!(
        data.train.len() == 60_000 && data.test.len() == 10_000,
        "{} / {} images",
        data.train.len(),
        data.test.len()
    );
    ensure!((data.train.rows, data.train.cols) == (28, 28), "{}x{} images", data.train.rows, data.train.cols);
    ensure!(data.train.class_counts() == [6_000; 10], "training classes {:?}", data.train.class_counts());

    let cfg = TrainConfig {
        model: ResNetConfig { base_width: 8, ..ResNetConfig::d2l_resnet18() },
        epochs: 2,
        // 32 steps per epoch rather than the preset's 8 at batch 256, which leave the
        // BatchNorm running statistics (and so evaluation) far behind the weights.
        batch_size: 64,
        limit_train: Some(2048),
        limit_test: Some(1000),
        ..TrainConfig::quick()
    };
    let mut trainer = Trainer::new(cfg, &Device::Cpu)?;
    let mut recorder = Recorder::default();
    let report = trainer.fit(&data, &mut recorder)?;
    for m in &recorder.epochs {
        println!(
            "epoch {}: loss {:.3}, train acc {:.3}, test acc {:.3}",
            m.epoch, m.train_loss, m.train_acc, m.test_acc
        );
    }
    ensure!(recorder.epochs.len() == 2 && recorder.epochs.iter().all(|m| m.examples == 2048), "{:?}", recorder.epochs);
    ensure!(recorder.epochs[1].train_loss < recorder.epochs[0].train_loss, "the training loss did not fall");
    let test_acc = report.last.map(|m| m.test_acc).unwrap_or_default();
    ensure!(test_acc >= 0.6, "test accuracy {test_acc:.3} after 2 epochs on 2,048 images; expected at least 0.6");
    Ok(())
}
