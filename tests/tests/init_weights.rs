//! `TrainConfig::init_weights`: a run starts from the weights of an earlier run or from d2l's
//! PyTorch `state_dict`, exactly, and a file that does not fit the model is refused with the
//! first mismatched tensor named, before any run directory exists.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::{checkpoint, ResNet, ResNetConfig};
use resnet_tests::{ensure_identical, synthetic_data, tiny_config};
use resnet_train::run_dir::files;
use resnet_train::{RunDir, Silent, TrainConfig, TrainError, Trainer};

const CPU: Device = Device::Cpu;

fn parity_weights() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/pytorch_parity_weights.safetensors")
}

/// A model of `cfg` holding the weights of `path`, loaded by resnet-core directly.
fn loaded(cfg: &ResNetConfig, path: &Path) -> Result<(ResNet, VarMap)> {
    let vars = VarMap::new();
    let model = ResNet::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &CPU))?;
    checkpoint::load_into(&model, path)?;
    Ok((model, vars))
}

fn one_epoch() -> TrainConfig {
    TrainConfig { epochs: 1, augment: None, ..tiny_config() }
}

#[test]
fn a_run_starts_from_an_earlier_run_s_best_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let first = dir.path().join("first");
    let mut trainer = Trainer::new(one_epoch(), &CPU)?.with_run_dir(RunDir::create(&first)?)?;
    trainer.fit(&synthetic_data(), &mut Silent)?;
    let best = first.join(files::BEST);
    // Another seed, so the seeded initialisation alone would give different weights.
    let cfg = TrainConfig { seed: 99, init_weights: Some(best.clone()), ..one_epoch() };
    let second = dir.path().join("second");
    let started = Trainer::new(cfg.clone(), &CPU)?.with_run_dir(RunDir::create(&second)?)?;
    let (reference, _vars) = loaded(&cfg.model, &best)?;
    ensure_identical(started.model(), &reference, "initialised from best.safetensors")?;
    let fresh = Trainer::new(TrainConfig { init_weights: None, ..cfg.clone() }, &CPU)?;
    ensure!(
        ensure_identical(fresh.model(), &reference, "seeded").is_err(),
        "the seeded initialisation alone already equals the loaded weights: the check above proves nothing"
    );
    // The choice is recorded with the run, and a checkpoint (with optimiser state) works too.
    let recorded: TrainConfig = serde_json::from_slice(&std::fs::read(second.join(files::CONFIG))?)?;
    ensure!(recorded.init_weights.as_deref() == Some(best.as_path()), "config.json: {:?}", recorded.init_weights);
    let from_checkpoint =
        Trainer::new(TrainConfig { init_weights: Some(first.join(files::CHECKPOINT)), ..cfg.clone() }, &CPU)?;
    let (last, _vars) = loaded(&cfg.model, &first.join(files::CHECKPOINT))?;
    ensure_identical(from_checkpoint.model(), &last, "initialised from checkpoint.safetensors")?;
    Ok(())
}

#[test]
fn a_run_starts_from_d2l_s_pytorch_state_dict() -> Result<()> {
    // The parity fixture is a width-4 d2l ResNet-18 `state_dict` saved by PyTorch's safetensors.
    let cfg = TrainConfig { init_weights: Some(parity_weights()), ..one_epoch() };
    let mut trainer = Trainer::new(cfg.clone(), &CPU)?;
    let (reference, _vars) = loaded(&cfg.model, &parity_weights())?;
    ensure_identical(trainer.model(), &reference, "initialised from the PyTorch state_dict")?;
    // And it trains from there.
    let report = trainer.fit(&synthetic_data(), &mut Silent)?;
    ensure!(report.last.as_ref().is_some_and(|m| m.train_loss.is_finite()), "{report:?}");
    Ok(())
}

#[test]
fn weights_of_another_width_are_refused_naming_the_first_tensor() -> Result<()> {
    let cfg = TrainConfig {
        model: ResNetConfig { base_width: 8, ..tiny_config().model },
        init_weights: Some(parity_weights()),
        ..one_epoch()
    };
    let message = match Trainer::new(cfg, &CPU) {
        Ok(_) => bail!("width-4 weights loaded into a width-8 model"),
        Err(e @ TrainError::InitWeights { .. }) => e.to_string(),
        Err(other) => bail!("wrong error kind: {other}"),
    };
    for needle in [
        "init_weights",
        "pytorch_parity_weights.safetensors",
        // The stem's convolution comes first in the model's order.
        "`0.0.weight` has shape [4, 1, 7, 7], the model needs [8, 1, 7, 7]",
    ] {
        ensure!(message.contains(needle), "message lacks {needle:?}: {message}");
    }
    ensure!(
        message.find("0.0.weight") < message.find("0.0.bias"),
        "the first mismatched tensor is not named first: {message}"
    );

    // A project file records its configuration: the message says that too.
    let dir = tempfile::tempdir()?;
    let mut trainer = Trainer::new(one_epoch(), &CPU)?.with_run_dir(RunDir::create(&dir.path().join("run"))?)?;
    trainer.fit(&synthetic_data(), &mut Silent)?;
    let best = dir.path().join("run").join(files::BEST);
    let cfg = TrainConfig {
        model: ResNetConfig { base_width: 8, ..tiny_config().model },
        init_weights: Some(best),
        ..one_epoch()
    };
    let message = Trainer::new(cfg, &CPU).err().map(|e| e.to_string()).unwrap_or_default();
    for needle in ["width 4", "width 8", "`0.0.weight` has shape [4, 1, 7, 7], the model needs [8, 1, 7, 7]"] {
        ensure!(message.contains(needle), "message lacks {needle:?}: {message}");
    }

    let missing = TrainConfig { init_weights: Some(dir.path().join("absent.safetensors")), ..one_epoch() };
    let message = Trainer::new(missing, &CPU).err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(message.contains("absent.safetensors") && message.contains("no such file"), "{message}");
    Ok(())
}
