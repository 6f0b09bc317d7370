//! Parity with d2l's PyTorch ResNet-18, without Python: fixtures written once by
//! `scripts/make_parity_fixture.py` (a narrow, width-4 d2l ResNet-18 `state_dict` and what
//! PyTorch computes with it) are loaded into the Rust model, which must reproduce PyTorch's
//! evaluation logits, training-mode loss, every parameter gradient and the BatchNorm running
//! statistics, and must export a file with PyTorch's keys, dtypes and values.
//!
//! Regenerate the fixtures with `python scripts/make_parity_fixture.py` (torch, safetensors).
//!
//! Tolerances. The reference values were computed by PyTorch in float64 from float32 weights and
//! input, then stored in float32, so they are exact up to a relative 6e-8. Errors are measured
//! against each tensor's scale: `max |ours - reference| / max |reference|`.
//! - float64 runs differ from PyTorch only by summation order and that storage rounding, so they
//!   are held to 1e-6: any real difference in the algorithm (a missing bias, biased instead of
//!   unbiased variance, a wrong padding or stride) shows up orders of magnitude above that.
//! - float32 runs add float32 rounding, which the training-mode BatchNorms amplify (the last
//!   stage normalises over 4 values per channel). PyTorch's own float32 run is within 3e-6 of
//!   the reference for logits and 1e-5 for gradients (the script checks this and prints it), and
//!   ours within 1e-5 and 3e-5; the bounds are 1e-4 for logits, loss and running statistics and
//!   1e-3 for gradients, ten times and more above that. `--nocapture` prints the worst errors.
//! - A convolution bias that feeds a BatchNorm cancels in training mode (the batch mean is
//!   subtracted), so its true gradient is exactly zero and what either side computes is rounding
//!   noise; those are measured against their convolution's weight gradient instead.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use resnet_core::{checkpoint, BlockKind, ConvAlgorithm, Depth, ResNet, ResNetConfig, TensorRole};
use safetensors::SafeTensors;

const WEIGHTS: &str = "pytorch_parity_weights.safetensors";
const REFERENCE: &str = "pytorch_parity_reference.safetensors";
const REGENERATE: &str = "regenerate with `python scripts/make_parity_fixture.py`";

/// Scale-relative error bounds for one floating-point type.
#[derive(Debug, Clone, Copy)]
struct Tolerance {
    /// Logits, the loss and the running statistics.
    values: f64,
    /// Parameter gradients.
    grads: f64,
}

const F64_TOL: Tolerance = Tolerance { values: 1e-6, grads: 1e-6 };
const F32_TOL: Tolerance = Tolerance { values: 1e-4, grads: 1e-3 };

/// Every combination the model can run in: both float types and all three convolution algorithms.
const RUNS: [(DType, ConvAlgorithm, Tolerance); 6] = [
    (DType::F64, ConvAlgorithm::Winograd, F64_TOL),
    (DType::F64, ConvAlgorithm::Im2col, F64_TOL),
    (DType::F64, ConvAlgorithm::Candle, F64_TOL),
    (DType::F32, ConvAlgorithm::Winograd, F32_TOL),
    (DType::F32, ConvAlgorithm::Im2col, F32_TOL),
    (DType::F32, ConvAlgorithm::Candle, F32_TOL),
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// The tensors PyTorch computed, by name.
struct Reference(HashMap<String, Tensor>);

impl Reference {
    fn load() -> Result<Self> {
        let path = fixture(REFERENCE);
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu)
            .with_context(|| format!("reading {}; {REGENERATE}", path.display()))?;
        Ok(Self(tensors))
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.0.get(name).with_context(|| format!("the reference fixture has no `{name}`; {REGENERATE}"))
    }
}

/// The d2l export loaded into a fresh Rust model of the architecture the file implies.
fn load_model(dtype: DType, algorithm: ConvAlgorithm) -> Result<ResNet> {
    let path = fixture(WEIGHTS);
    let cfg = checkpoint::read_config(&path).with_context(|| format!("inferring the config of {}", path.display()))?;
    let want = ResNetConfig {
        in_channels: 1,
        num_classes: 10,
        depth: Depth::R18,
        base_width: 4,
        block: BlockKind::PostActivation,
    };
    ensure!(cfg == want, "{} was inferred as {cfg:?}, expected {want:?}", path.display());
    let vars = VarMap::new();
    let mut model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, dtype, &Device::Cpu))?;
    model.set_conv_algorithm(algorithm);
    checkpoint::load_into(&model, &path).with_context(|| format!("loading {}", path.display()))?;
    Ok(model)
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.abs()?.max_all()?.to_scalar::<f64>()?)
}

/// `max |got - want| / scale`, after checking the shapes agree.
fn err_against(got: &Tensor, want: &Tensor, scale: f64) -> Result<f64> {
    ensure!(got.dims() == want.dims(), "shape {:?}, PyTorch has {:?}", got.dims(), want.dims());
    let diff = (got.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?;
    Ok(max_abs(&diff)? / scale.max(f64::MIN_POSITIVE))
}

/// `max |got - want| / max |want|`.
fn scaled_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    err_against(got, want, max_abs(want)?)
}

/// True for the convolution biases that feed a BatchNorm (every conv but the `conv3` shortcut),
/// whose training-mode gradient is exactly zero.
fn bias_before_batch_norm(name: &str) -> bool {
    name.ends_with(".bias")
        && !name.starts_with("7.")
        && !name.contains(".conv3.")
        && (name == "0.0.bias" || name.contains(".conv"))
}

/// Collects `(what, error, bound)` checks and fails once, listing every one that is out of bounds.
#[derive(Default)]
struct Checks {
    rows: Vec<(String, f64, f64)>,
}

impl Checks {
    fn add(&mut self, what: impl Into<String>, err: f64, bound: f64) {
        self.rows.push((what.into(), err, bound));
    }

    /// The largest error among rows whose name contains `part`.
    fn worst(&self, part: &str) -> Option<&(String, f64, f64)> {
        self.rows.iter().filter(|r| r.0.contains(part)).max_by(|a, b| a.1.total_cmp(&b.1))
    }

    #[allow(clippy::print_stderr, reason = "observed errors go to the captured test output (`--nocapture`)")]
    fn finish(self, run: &str) -> Result<()> {
        for part in ["logits", "loss", "grad.", "after_train."] {
            if let Some((what, err, bound)) = self.worst(part) {
                eprintln!("{run}: worst {part:<12} {err:.2e} (bound {bound:.0e}) at {what}");
            }
        }
        let bad: Vec<String> = self
            .rows
            .iter()
            .filter(|(_, err, bound)| err.is_nan() || err > bound)
            .map(|(what, err, bound)| format!("{what}: {err:.3e} > {bound:.0e}"))
            .collect();
        ensure!(
            bad.is_empty(),
            "{run}: {} of {} checks out of bounds:\n{}",
            bad.len(),
            self.rows.len(),
            bad.join("\n")
        );
        Ok(())
    }
}

#[test]
fn eval_logits_match_pytorch() -> Result<()> {
    let reference = Reference::load()?;
    let loaded = candle_core::safetensors::load(fixture(WEIGHTS), &Device::Cpu)?;
    for (dtype, algorithm, tol) in RUNS {
        eval_run(&reference, &loaded, dtype, algorithm, tol)
            .with_context(|| format!("eval, {dtype:?}, {algorithm:?}"))?;
    }
    Ok(())
}

/// One evaluation-mode forward in `dtype` with `algorithm`, against PyTorch's `net.eval()` logits.
fn eval_run(
    reference: &Reference,
    loaded: &HashMap<String, Tensor>,
    dtype: DType,
    algorithm: ConvAlgorithm,
    tol: Tolerance,
) -> Result<()> {
    let model = load_model(dtype, algorithm)?;
    let xs = reference.get("input")?.to_dtype(dtype)?;
    let logits = model.forward_t(&xs, false)?;
    let mut checks = Checks::default();
    checks.add("eval_logits", scaled_err(&logits, reference.get("eval_logits")?)?, tol.values);
    // Evaluation must leave the running statistics as loaded.
    for t in model.named_tensors().iter().filter(|t| t.role == TensorRole::Buffer) {
        let want = loaded.get(&t.name).with_context(|| format!("`{}` missing from {WEIGHTS}", t.name))?;
        checks.add(format!("after_eval.{}", t.name), err_against(&t.tensor, want, 1.0)?, 0.0);
    }
    checks.finish(&format!("eval {dtype:?} {algorithm:?}"))
}

#[test]
fn training_loss_gradients_and_running_stats_match_pytorch() -> Result<()> {
    let reference = Reference::load()?;
    for (dtype, algorithm, tol) in RUNS {
        train_run(&reference, dtype, algorithm, tol).with_context(|| format!("training, {dtype:?}, {algorithm:?}"))?;
    }
    Ok(())
}

/// One training-mode forward, cross-entropy and backward in `dtype` with `algorithm`, against
/// PyTorch's loss, gradients and updated running statistics.
fn train_run(reference: &Reference, dtype: DType, algorithm: ConvAlgorithm, tol: Tolerance) -> Result<()> {
    let labels = reference.get("labels")?;
    ensure!(labels.dtype() == DType::I64, "labels are {:?}, PyTorch's are int64", labels.dtype());
    let model = load_model(dtype, algorithm)?;
    let xs = reference.get("input")?.to_dtype(dtype)?;
    let logits = model.forward_t(&xs, true)?;
    let loss = candle_nn::loss::cross_entropy(&logits, labels)?;
    let grads = loss.backward()?;
    let mut checks = Checks::default();
    checks.add("train_logits", scaled_err(&logits, reference.get("train_logits")?)?, tol.values);
    checks.add("loss", scaled_err(&loss, reference.get("loss")?)?, tol.values);

    let params = model.parameters();
    let ours: BTreeSet<String> = params.iter().map(|p| format!("grad.{}", p.name)).collect();
    let theirs: BTreeSet<String> = reference.0.keys().filter(|k| k.starts_with("grad.")).cloned().collect();
    ensure!(
        ours == theirs,
        "parameter sets differ: only ours {:?}, only PyTorch's {:?}",
        ours.difference(&theirs).collect::<Vec<_>>(),
        theirs.difference(&ours).collect::<Vec<_>>()
    );
    for p in &params {
        let key = format!("grad.{}", p.name);
        let got = grads.get(&p.tensor).with_context(|| format!("no gradient reached `{}`", p.name))?;
        let want = reference.get(&key)?;
        let err = if bias_before_batch_norm(&p.name) {
            let weight = reference.get(&format!("{}weight", key.trim_end_matches("bias")))?;
            let scale = max_abs(weight)?;
            // The fixture itself must show the cancellation, or the premise is wrong.
            ensure!(
                max_abs(want)? <= 1e-6 * scale,
                "PyTorch's `{key}` is not ~0: is `{}` really before a BatchNorm?",
                p.name
            );
            err_against(got, want, scale)?
        } else {
            scaled_err(got, want)?
        };
        checks.add(key, err, tol.grads);
    }

    // One training forward moves the running statistics exactly as PyTorch's did.
    for t in model.named_tensors().iter().filter(|t| t.role == TensorRole::Buffer) {
        let key = format!("after_train.{}", t.name);
        let want = reference.get(&key)?;
        let bound = if t.name.ends_with("num_batches_tracked") { 0.0 } else { tol.values };
        let got = t.tensor.reshape(want.shape())?;
        let err = if bound == 0.0 { err_against(&got, want, 1.0)? } else { scaled_err(&got, want)? };
        checks.add(key, err, bound);
    }
    checks.finish(&format!("train {dtype:?} {algorithm:?}"))
}

#[test]
fn export_has_pytorchs_keys_dtypes_and_values() -> Result<()> {
    let model = load_model(DType::F32, ConvAlgorithm::Im2col)?;
    let dir = tempfile::tempdir()?;
    let saved_path = dir.path().join("exported.safetensors");
    checkpoint::save(&model, &saved_path)?;

    let original_bytes = std::fs::read(fixture(WEIGHTS)).with_context(|| format!("reading {WEIGHTS}; {REGENERATE}"))?;
    let saved_bytes = std::fs::read(&saved_path)?;
    let original = SafeTensors::deserialize(&original_bytes).with_context(|| format!("parsing {WEIGHTS}"))?;
    let saved = SafeTensors::deserialize(&saved_bytes).context("parsing the exported file")?;

    let names = |st: &SafeTensors| st.names().into_iter().map(str::to_string).collect::<BTreeSet<String>>();
    let (want, got) = (names(&original), names(&saved));
    ensure!(
        got == want,
        "exported keys differ: extra {:?}, missing {:?}",
        got.difference(&want).collect::<Vec<_>>(),
        want.difference(&got).collect::<Vec<_>>()
    );
    ensure!(want.len() == 127, "a d2l ResNet-18 state_dict has 127 entries, the fixture {}", want.len());

    let mut counters = 0;
    for name in &want {
        let (a, b) = (original.tensor(name)?, saved.tensor(name)?);
        ensure!(b.dtype() == a.dtype(), "`{name}` exported as {:?}, PyTorch has {:?}", b.dtype(), a.dtype());
        ensure!(b.shape() == a.shape(), "`{name}` exported with shape {:?}, PyTorch has {:?}", b.shape(), a.shape());
        ensure!(b.data() == a.data(), "`{name}` exported with different values");
        if name.ends_with("num_batches_tracked") {
            ensure!(a.dtype() == safetensors::Dtype::I64 && a.shape().is_empty(), "`{name}` is not an int64 scalar");
            let Ok(count) = <[u8; 8]>::try_from(a.data()) else { bail!("`{name}` does not hold 8 bytes") };
            ensure!(
                i64::from_le_bytes(count) == 2,
                "`{name}` is {}, the fixture was warmed up twice",
                i64::from_le_bytes(count)
            );
            counters += 1;
        } else {
            ensure!(a.dtype() == safetensors::Dtype::F32, "`{name}` is {:?} in the fixture", a.dtype());
        }
    }
    ensure!(counters == 17, "{counters} num_batches_tracked entries, d2l's ResNet-18 has 17 BatchNorms");

    // The export carries the configuration, so it reloads without inference (the convolution
    // algorithm is a run-time choice, not part of the file).
    let read = checkpoint::read_config(&saved_path)?;
    ensure!(read == *model.config(), "the exported config differs");
    Ok(())
}
