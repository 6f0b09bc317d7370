//! Loading a weights file for `eval` and `predict`, with the input preparation it was trained with.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::{checkpoint, ResNet};
use resnet_train::checkpoint::{
    EVAL_TTA_HFLIP_KEY, INPUT_NORMALIZE_KEY, INPUT_RESIZE_KEY, SELECTED_EPOCH_KEY, SELECTED_ON_KEY,
};

use crate::model_size::parameter_count;

/// Models above this size are checked against the file's size before they are allocated.
const LARGE_MODEL_BYTES: u128 = 256 << 20;

/// A model ready for inference and how to prepare its inputs.
pub struct Loaded {
    /// The model.
    pub model: ResNet,
    /// Keeps the model's variables alive.
    pub _vars: VarMap,
    /// Side length inputs are resized to.
    pub resize: usize,
    /// Whether inputs are normalised.
    pub normalize: bool,
    /// Whether the run evaluated with flip test-time augmentation (false for d2l's files).
    pub tta_hflip: bool,
    /// For a run's `best.safetensors`: the accuracy that chose it (`val_acc` or `test_acc`) and
    /// the epoch.
    pub selected: Option<(String, String)>,
}

/// Which weights of a training checkpoint to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// What the run evaluated: the weight average when the run kept one (`--ema`), else the
    /// weights.
    Evaluated,
    /// The last weights of a run that kept an average (an error for any other file).
    Last,
}

/// Reads `path` (this project's checkpoints or a d2l PyTorch state_dict), overriding the
/// recorded input preparation with `resize` / `normalize` when given.
pub fn load(
    path: &Path,
    device: &Device,
    resize: Option<usize>,
    normalize: Option<bool>,
    pick: Pick,
) -> Result<Loaded> {
    if !path.is_file() {
        anyhow::bail!("--weights {}: no such file", path.display());
    }
    let cfg = checkpoint::read_config(path)
        .with_context(|| format!("reading the model configuration of {}", path.display()))?;
    let meta = checkpoint::read_metadata(path)?;
    // The recorded configuration decides how much the model allocates. A large model claimed by
    // a file too small to hold its values (at 2 bytes each, the smallest float) is refused before
    // allocating; small ones go on to the tensor-by-tensor check, which names every misfit.
    let params = parameter_count(&cfg);
    let file_bytes = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    if params.saturating_mul(2) > u128::from(file_bytes) && params.saturating_mul(4) > LARGE_MODEL_BYTES {
        anyhow::bail!(
            "--weights {}: its configuration describes {params} parameters, more than its {file_bytes} bytes can hold; \
             the file is corrupt or was not written by this project or PyTorch",
            path.display()
        );
    }
    let vars = VarMap::new();
    let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, device))?;
    checkpoint::load_into(&model, path)?;
    // A training checkpoint of a run that averaged its weights evaluated the average: use it
    // unless the last weights were asked for. Only training checkpoints (with a training state)
    // can hold one.
    let training_checkpoint = meta.contains_key(resnet_train::checkpoint::STATE_KEY);
    match pick {
        Pick::Evaluated => {
            if training_checkpoint {
                resnet_train::checkpoint::load_average_into(&model, path)?;
            }
        }
        Pick::Last => {
            let has_average = training_checkpoint && resnet_train::checkpoint::has_average(path)?;
            if !has_average {
                anyhow::bail!(
                    "--last-weights: {} holds no weight average, so its weights are the only ones; the flag \
                     applies to the checkpoint.safetensors of a run trained with --ema",
                    path.display()
                );
            }
        }
    }
    let recorded_resize = match meta.get(INPUT_RESIZE_KEY) {
        Some(v) => Some(
            v.parse::<usize>()
                .with_context(|| format!("{}: bad `{INPUT_RESIZE_KEY}` metadata {v:?}", path.display()))?,
        ),
        None => None,
    };
    // d2l's chapter trains at 96 px without normalisation: the right default for its exports.
    let resize = resize.or(recorded_resize).unwrap_or(96);
    if !(8..=512).contains(&resize) {
        anyhow::bail!("--resize {resize}: must be between 8 and 512");
    }
    let normalize = normalize.or_else(|| meta.get(INPUT_NORMALIZE_KEY).map(|v| v == "true")).unwrap_or(false);
    let selected = meta.get(SELECTED_ON_KEY).cloned().zip(meta.get(SELECTED_EPOCH_KEY).cloned());
    let tta_hflip = meta.get(EVAL_TTA_HFLIP_KEY).is_some_and(|v| v == "true");
    Ok(Loaded { model, _vars: vars, resize, normalize, tta_hflip, selected })
}
