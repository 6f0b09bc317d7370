//! Seeded initialisation as d2l's `train_ch6` applies it: Xavier-uniform conv and linear weights,
//! PyTorch's default biases, BatchNorm at identity.

use candle_core::{Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{CoreError, Result};
use crate::resnet::ResNet;
use crate::tensors::NamedTensor;

/// Initialises every tensor of `model` from `seed`; the same seed gives the same weights on
/// every machine, independent of tensor order.
///
/// Conv and linear weights get Xavier-uniform (`U(±√(6 / (fan_in + fan_out)))`), their biases
/// PyTorch's default `U(±1/√fan_in)`; BatchNorm gets γ = 1, β = 0, mean 0, variance 1.
/// The model must have been built from a `VarMap` (its tensors must be variables).
pub fn d2l_init(model: &ResNet, seed: u64) -> Result<()> {
    let tensors = model.named_tensors();
    for t in &tensors {
        let is_bn = |leaf: &str| {
            let prefix = t.name.strip_suffix(leaf).unwrap_or_default();
            tensors.iter().any(|o| o.name == format!("{prefix}running_mean"))
        };
        let dims = t.tensor.dims().to_vec();
        let values = if t.name.ends_with(".weight") && is_bn("weight") {
            constant(&dims, 1.0)
        } else if (t.name.ends_with(".bias") && is_bn("bias"))
            || t.name.ends_with("running_mean")
            || t.name.ends_with("num_batches_tracked")
        {
            constant(&dims, 0.0)
        } else if t.name.ends_with("running_var") {
            constant(&dims, 1.0)
        } else if t.name.ends_with(".weight") {
            let (fan_in, fan_out) = fans(&dims);
            uniform(&dims, (6.0 / (fan_in + fan_out) as f64).sqrt(), seed, &t.name)
        } else {
            // A bias: PyTorch's default bound uses its weight's fan-in.
            let weight_name = format!("{}weight", t.name.strip_suffix("bias").unwrap_or_default());
            let fan_in = tensors.iter().find(|o| o.name == weight_name).map(|w| fans(w.tensor.dims()).0).unwrap_or(1);
            uniform(&dims, 1.0 / (fan_in as f64).sqrt(), seed, &t.name)
        };
        set(t, Tensor::from_vec(values, dims, t.tensor.device())?.to_dtype(t.tensor.dtype())?)?;
    }
    Ok(())
}

/// Overwrites a model tensor in place.
pub(crate) fn set(t: &NamedTensor, value: Tensor) -> Result<()> {
    if !t.tensor.is_variable() {
        return Err(CoreError::InvalidConfig(format!(
            "tensor {} is not a variable; build the model from a candle_nn::VarMap to initialise or load it",
            t.name
        )));
    }
    Ok(Var::from_tensor(&t.tensor)?.set(&value)?)
}

/// `(fan_in, fan_out)` as PyTorch computes them for linear `(out, in)` and conv `(out, in, k, k)`.
fn fans(dims: &[usize]) -> (usize, usize) {
    match dims {
        [out, inp, rest @ ..] => {
            let field: usize = rest.iter().product();
            (inp * field, out * field)
        }
        [n] => (*n, *n),
        _ => (1, 1),
    }
}

fn constant(dims: &[usize], v: f32) -> Vec<f32> {
    vec![v; dims.iter().product()]
}

fn uniform(dims: &[usize], bound: f64, seed: u64, name: &str) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name));
    let bound = bound as f32;
    (0..dims.iter().product::<usize>()).map(|_| rng.random_range(-bound..=bound)).collect()
}

/// FNV-1a: a stable per-tensor stream id, so initialisation does not depend on tensor order.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ResNetConfig;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn model() -> Result<ResNet> {
        let map = VarMap::new();
        let cfg = ResNetConfig { base_width: 8, ..ResNetConfig::d2l_resnet18() };
        ResNet::new(&cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))
    }

    #[test]
    fn xavier_bounds_and_determinism() -> Result<()> {
        let (a, b) = (model()?, model()?);
        d2l_init(&a, 7)?;
        d2l_init(&b, 7)?;
        for (x, y) in a.named_tensors().iter().zip(b.named_tensors()) {
            let diff = (&x.tensor - &y.tensor)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{} differs between equal seeds", x.name);
        }
        let find = |n: &str| a.named_tensors().into_iter().find(|t| t.name == n).expect("present").tensor;
        // Stem conv (8, 1, 7, 7): fan_in 49, fan_out 392.
        let w = find("0.0.weight");
        let bound = (6.0f32 / (49.0 + 392.0)).sqrt();
        let max = w.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(max <= bound && max > 0.9 * bound, "max {max}, bound {bound}");
        let std = w.flatten_all()?.var(0)?.to_scalar::<f32>()?.sqrt();
        assert!((std - bound / 3f32.sqrt()).abs() < 0.1 * bound, "std {std}");
        assert_eq!(find("0.1.weight").min_all()?.to_scalar::<f32>()?, 1.0);
        assert_eq!(find("0.1.running_var").min_all()?.to_scalar::<f32>()?, 1.0);
        let fc_bias = find("7.bias").abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(fc_bias <= 1.0 / 64f32.sqrt(), "fc bias {fc_bias}");
        d2l_init(&b, 8)?;
        let diff = (find("7.weight")
            - &b.named_tensors().into_iter().find(|t| t.name == "7.weight").expect("p").tensor)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff > 0.0, "different seeds must give different weights");
        Ok(())
    }
}
