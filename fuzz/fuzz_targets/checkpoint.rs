//! Fuzzes loading an untrusted weights or checkpoint file: the safetensors header, the JSON model
//! configuration and training state in its metadata, and every tensor's name and shape. Any input
//! must give `Ok` or `Err`, never a panic, a hang or an allocation the input cannot justify.
//!
//! It walks the path `eval`/`predict` take (`read_config`, build the model, `load_into`) and the
//! one `train --resume` takes (`resnet_train::checkpoint::read`). The functions take a path, so
//! each input goes through a file in the temporary directory, as a user's file would.
//!
//! Run with `cargo +nightly fuzz run checkpoint` from the repository root (seed corpus: see
//! RELIABILITY.md).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use libfuzzer_sys::fuzz_target;
use resnet_core::{checkpoint, ResNet, ResNetConfig};

/// Models whose parameters exceed this are not built: a configuration that asks for a huge model
/// is valid JSON, and refusing it against the machine's memory is the loader's start check, not
/// a parser property. Building one would only measure the allocator.
const MAX_PARAMETERS: u64 = 2_000_000;

fn scratch_file() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| std::env::temp_dir().join(format!("resnet-fuzz-checkpoint-{}.safetensors", std::process::id())))
}

/// An upper bound on the parameter count of `cfg`: every convolution taken at the widest stage's
/// channels, as many of them as the deepest variant has.
fn parameter_bound(cfg: &ResNetConfig) -> u64 {
    let widest = 8 * cfg.base_width as u64;
    let convs = 2 * 16 + 8 + 1;
    let inputs = (cfg.in_channels as u64).max(widest);
    convs * inputs * widest * 49 + widest * cfg.num_classes as u64 + widest * 8
}

fuzz_target!(|data: &[u8]| {
    let path = scratch_file();
    if std::fs::write(path, data).is_err() {
        return;
    }
    // The training-state reader (`train --resume`) on its own.
    let _ = resnet_train::checkpoint::read(path, &Device::Cpu);
    let _ = checkpoint::read_metadata(path);
    // The inference loader (`eval`, `predict`): config, model, tensors.
    let Ok(cfg) = checkpoint::read_config(path) else { return };
    assert!(cfg.validate().is_ok(), "read_config returned an invalid configuration: {cfg:?}");
    if parameter_bound(&cfg) > MAX_PARAMETERS {
        return;
    }
    let vars = VarMap::new();
    let Ok(model) = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu)) else { return };
    if checkpoint::load_into(&model, path).is_ok() {
        // Whatever loads must save and load back to the same tensors.
        let bytes = checkpoint::to_bytes(&model, &Default::default()).expect("a loaded model serialises");
        std::fs::write(path, bytes).expect("scratch file");
        let vars2 = VarMap::new();
        let again = ResNet::new(&cfg, VarBuilder::from_varmap(&vars2, DType::F32, &Device::Cpu)).expect("same config");
        checkpoint::load_into(&again, path).expect("a saved model loads back");
    }
});
