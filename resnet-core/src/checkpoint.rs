//! Model checkpoints: safetensors files in d2l's PyTorch `state_dict` layout, with the model
//! configuration in their metadata. Loading checks every name and shape and reports all misfits.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use safetensors::SafeTensors;

use crate::config::{BlockKind, Depth, ResNetConfig};
use crate::error::{CoreError, Result};
use crate::init::set;
use crate::resnet::ResNet;

/// Metadata key holding the JSON model configuration.
pub const CONFIG_KEY: &str = "resnet_config";
/// Metadata key naming the format.
pub const FORMAT_KEY: &str = "format";
/// This crate's checkpoint format.
pub const FORMAT: &str = "resnet-fashion/weights-v1";
/// Tensors whose names start with this prefix belong to a trainer's state (optimiser buffers)
/// stored in the same file; model loading ignores them.
pub const TRAIN_STATE_PREFIX: &str = "train.";

/// Serialises the model's tensors (parameters and BatchNorm buffers, `num_batches_tracked` as
/// int64 like PyTorch) with the config and `extra` entries as metadata.
pub fn to_bytes(model: &ResNet, extra: &HashMap<String, String>) -> Result<Vec<u8>> {
    to_bytes_with(model, &[], extra)
}

/// Like [`to_bytes`], with extra tensors (named under [`TRAIN_STATE_PREFIX`]) stored beside the
/// model's, so a training checkpoint is one file written atomically.
pub fn to_bytes_with(
    model: &ResNet,
    extra_tensors: &[(String, Tensor)],
    extra: &HashMap<String, String>,
) -> Result<Vec<u8>> {
    if let Some((name, _)) = extra_tensors.iter().find(|(n, _)| !n.starts_with(TRAIN_STATE_PREFIX)) {
        return Err(CoreError::InvalidConfig(format!(
            "extra tensor `{name}` must be named under `{TRAIN_STATE_PREFIX}`"
        )));
    }
    let mut tensors: Vec<(String, Tensor)> = extra_tensors.to_vec();
    for t in model.named_tensors() {
        let tensor =
            if t.name.ends_with("num_batches_tracked") { t.tensor.to_dtype(DType::I64)? } else { t.tensor.clone() };
        tensors.push((t.name, tensor));
    }
    let mut meta = extra.clone();
    meta.insert(FORMAT_KEY.into(), FORMAT.into());
    let cfg = serde_json::to_string(model.config()).map_err(|e| CoreError::InvalidConfig(e.to_string()))?;
    meta.insert(CONFIG_KEY.into(), cfg);
    safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| CoreError::Candle(candle_core::Error::Msg(format!("serialising weights: {e}"))))
}

/// Saves the model to `path` atomically (a temporary file in the same directory, then rename).
/// The file loads in PyTorch with `safetensors.torch.load_file` + `load_state_dict`.
pub fn save(model: &ResNet, path: &Path) -> Result<()> {
    let bytes = to_bytes(model, &HashMap::new())?;
    write_atomic(path, &bytes).map_err(|source| CoreError::Io { path: path.to_path_buf(), source })
}

/// Writes `bytes` to a temporary sibling of `path`, syncs it and renames it over `path`, so a
/// crash or a full disk never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint");
    let tmp = path.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The checkpoint's own configuration, from its metadata or, for a d2l PyTorch export without
/// metadata, inferred from its tensor names and shapes.
pub fn read_config(path: &Path) -> Result<ResNetConfig> {
    let bytes = read(path)?;
    let (st, meta) = parse(path, &bytes)?;
    if let Some(json) = meta.get(CONFIG_KEY) {
        let cfg: ResNetConfig = serde_json::from_str(json).map_err(|e| CoreError::CheckpointFormat {
            path: path.to_path_buf(),
            reason: format!("metadata `{CONFIG_KEY}` is not a model configuration: {e}"),
        })?;
        cfg.validate()?;
        return Ok(cfg);
    }
    infer_config(path, &st)
}

/// Loads `path` into `model`, checking the configuration (when the file records one) and every
/// tensor's name and shape; all misfits are reported together and nothing is changed on error.
/// The report lists a configuration difference first, then tensors in the model's order (so the
/// first one named is the first mismatched tensor), then tensors the model does not have.
pub fn load_into(model: &ResNet, path: &Path) -> Result<()> {
    let bytes = read(path)?;
    let (st, meta) = parse(path, &bytes)?;
    let mismatch = |problem: String| CoreError::CheckpointMismatch { path: path.to_path_buf(), problem };
    let mut header = None;
    if let Some(json) = meta.get(CONFIG_KEY) {
        let theirs: ResNetConfig =
            serde_json::from_str(json).map_err(|e| mismatch(format!("unreadable `{CONFIG_KEY}` metadata: {e}")))?;
        if theirs != *model.config() {
            header =
                Some(format!("it was saved from {} but the model is {}", describe(&theirs), describe(model.config())));
        }
    }
    let expected = model.named_tensors();
    let mut problems = Vec::new();
    let mut values = Vec::with_capacity(expected.len());
    for t in &expected {
        match st.tensor(&t.name) {
            Err(_) if t.name.ends_with("num_batches_tracked") => {}
            Err(_) => problems.push(format!("missing tensor `{}` (shape {:?})", t.name, t.tensor.dims())),
            Ok(view) => {
                let found = view.shape().to_vec();
                let scalar_ok = t.tensor.rank() == 0 && found.iter().product::<usize>() == 1;
                if found != t.tensor.dims() && !scalar_ok {
                    problems.push(format!("`{}` has shape {found:?}, the model needs {:?}", t.name, t.tensor.dims()));
                    continue;
                }
                if header.is_some() || !problems.is_empty() {
                    // Nothing will be loaded: skip the copy, keep checking names and shapes.
                    continue;
                }
                let loaded = candle_core::safetensors::Load::load(&view, t.tensor.device())?
                    .to_dtype(t.tensor.dtype())?
                    .reshape(t.tensor.shape())?;
                values.push((t, loaded));
            }
        }
    }
    let known: BTreeSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    let mut unexpected: Vec<&str> =
        st.names().into_iter().filter(|n| !known.contains(n) && !n.starts_with(TRAIN_STATE_PREFIX)).collect();
    unexpected.sort();
    problems.extend(unexpected.into_iter().map(|name| format!("unexpected tensor `{name}`")));
    if header.is_some() || !problems.is_empty() {
        let total = problems.len();
        let mut text = problems.into_iter().take(12).collect::<Vec<_>>().join("; ");
        if total > 12 {
            text.push_str(&format!("; and {} more", total - 12));
        }
        let tensors = format!("{total} tensor problem(s){}{text}", if total > 0 { ": " } else { "" });
        return Err(mismatch(match header {
            Some(h) => format!("{h}; {tensors}"),
            None => tensors,
        }));
    }
    for (t, v) in values {
        set(t, v)?;
    }
    Ok(())
}

/// The metadata of a checkpoint (empty for files saved without any).
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = read(path)?;
    Ok(parse(path, &bytes)?.1)
}

/// The metadata and the [`TRAIN_STATE_PREFIX`] tensors of a checkpoint (prefix kept in the names).
pub fn read_train_state(
    path: &Path,
    device: &candle_core::Device,
) -> Result<(HashMap<String, String>, HashMap<String, Tensor>)> {
    let bytes = read(path)?;
    let (st, meta) = parse(path, &bytes)?;
    let mut tensors = HashMap::new();
    for name in st.names() {
        if name.starts_with(TRAIN_STATE_PREFIX) {
            let view = st.tensor(name).map_err(|e| CoreError::CheckpointFormat {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}`: {e}"),
            })?;
            tensors.insert(name.to_string(), candle_core::safetensors::Load::load(&view, device)?);
        }
    }
    Ok((meta, tensors))
}

fn describe(cfg: &ResNetConfig) -> String {
    format!(
        "ResNet-{} ({:?}, width {}, {} input channel(s), {} classes)",
        cfg.depth.layers(),
        cfg.block,
        cfg.base_width,
        cfg.in_channels,
        cfg.num_classes
    )
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| CoreError::Io { path: path.to_path_buf(), source })
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    let format_err = |reason: String| CoreError::CheckpointFormat {
        path: PathBuf::from(path),
        reason: format!("{reason} (the file is truncated, corrupt, or not a safetensors checkpoint)"),
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format_err(e.to_string()))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| format_err(e.to_string()))?;
    Ok((st, header.metadata().clone().unwrap_or_default()))
}

/// Reads the architecture off d2l's key layout: widths from `0.0.weight` and `7.weight`, depth from
/// the number of residuals per stage, the block variant from `final_bn`.
fn infer_config(path: &Path, st: &SafeTensors) -> Result<ResNetConfig> {
    let fail = |reason: String| CoreError::CheckpointFormat {
        path: path.to_path_buf(),
        reason: format!("no `{CONFIG_KEY}` metadata and {reason}; is this a d2l ResNet state_dict?"),
    };
    let shape =
        |name: &str| st.tensor(name).map(|v| v.shape().to_vec()).map_err(|_| fail(format!("no `{name}` tensor")));
    let stem = shape("0.0.weight")?;
    let fc = shape("7.weight")?;
    let (&[base_width, in_channels, 7, 7], &[num_classes, _]) = (stem.as_slice(), fc.as_slice()) else {
        return Err(fail(format!("`0.0.weight` {stem:?} / `7.weight` {fc:?} are not a ResNet stem and classifier")));
    };
    let names = st.names();
    let per_stage: Vec<usize> = (1..=4)
        .map(|s| {
            let blocks: BTreeSet<&str> = names
                .iter()
                .filter_map(|n| n.strip_prefix(&format!("{s}.")))
                .filter_map(|rest| rest.split('.').next())
                .collect();
            blocks.len()
        })
        .collect();
    let depth = [Depth::R18, Depth::R34]
        .into_iter()
        .find(|d| d.blocks_per_stage().as_slice() == per_stage.as_slice())
        .ok_or_else(|| fail(format!("residuals per stage {per_stage:?} match neither ResNet-18 nor ResNet-34")))?;
    let block = if names.iter().any(|n| n.starts_with("final_bn.")) {
        BlockKind::PreActivation
    } else {
        BlockKind::PostActivation
    };
    let cfg = ResNetConfig { in_channels, num_classes, depth, base_width, block };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::d2l_init;
    use candle_core::Device;
    use candle_nn::{ModuleT, VarBuilder, VarMap};

    fn model(cfg: &ResNetConfig, seed: u64) -> Result<ResNet> {
        let map = VarMap::new();
        let m = ResNet::new(cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
        d2l_init(&m, seed)?;
        Ok(m)
    }

    #[test]
    fn round_trip_restores_every_tensor_and_the_config() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("resnet-core-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("m.safetensors");
        let cfg = ResNetConfig { base_width: 4, block: BlockKind::PreActivation, ..ResNetConfig::resnet34() };
        let a = model(&cfg, 1)?;
        // Move the running statistics off their initial values.
        a.forward_t(&Tensor::randn(0f32, 1., (3, 1, 20, 20), &Device::Cpu)?, true)?;
        save(&a, &path)?;
        assert_eq!(read_config(&path)?, cfg);
        let b = model(&cfg, 2)?;
        load_into(&b, &path)?;
        for (x, y) in a.named_tensors().iter().zip(b.named_tensors()) {
            let d = (&x.tensor - &y.tensor)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{}", x.name);
        }
        // A different architecture is refused, naming both.
        let other = model(&ResNetConfig { base_width: 4, ..ResNetConfig::d2l_resnet18() }, 3)?;
        let err = load_into(&other, &path).expect_err("different depth");
        assert!(err.to_string().contains("ResNet-34") && err.to_string().contains("ResNet-18"), "{err}");
        // Garbage is a format error, not a panic.
        std::fs::write(&path, b"not a safetensors file")?;
        assert!(matches!(load_into(&b, &path), Err(CoreError::CheckpointFormat { .. })));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
