//! Weight averaging: an exponential moving average (EMA) of the weights over optimiser steps,
//! which evaluation, `best.safetensors` and early stopping then use instead of the last step's
//! weights (Polyak averaging, as `timm`'s `ModelEmaV2` and TensorFlow's
//! `ExponentialMovingAverage` do it).
//!
//! After step `t` (0-based), every floating-point tensor of the model, parameters and BatchNorm
//! running statistics alike, moves as `avg ← d_t·avg + (1 − d_t)·w` with
//! `d_t = min(decay, (1 + t) / (10 + t))`, so that the early average is not dominated by the
//! random initialisation; BatchNorm's step counter is copied, not averaged.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use resnet_core::ResNet;

use crate::config::TrainConfig;
use crate::error::{Result, TrainError};

/// The averaged copy of a model.
pub struct WeightAverage {
    model: ResNet,
    _vars: VarMap,
    decay: f64,
}

impl std::fmt::Debug for WeightAverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightAverage").field("decay", &self.decay).finish_non_exhaustive()
    }
}

/// The decay applied after step `step` (0-based): `min(decay, (1 + step) / (10 + step))`.
pub fn decay_at(decay: f64, step: usize) -> f64 {
    decay.min((1.0 + step as f64) / (10.0 + step as f64))
}

impl WeightAverage {
    /// A second model built like `live` (architecture, computing settings of `cfg`) holding a
    /// copy of `live`'s tensors.
    pub fn new(live: &ResNet, cfg: &TrainConfig, decay: f64, device: &Device) -> Result<Self> {
        if !(decay > 0.0 && decay < 1.0) {
            return Err(TrainError::InvalidField {
                field: "ema_decay",
                what: "weight-average decay",
                reason: format!("must be in (0, 1), got {decay}"),
            });
        }
        let vars = VarMap::new();
        let mut model = ResNet::new(live.config(), VarBuilder::from_varmap(&vars, DType::F32, device))?;
        model.set_compute_dtype(cfg.precision.compute_dtype())?;
        model.set_conv_algorithm(cfg.conv_algorithm);
        model.set_gpu_ops(cfg.gpu_ops);
        let average = Self { model, _vars: vars, decay };
        average.copy_from(live)?;
        Ok(average)
    }

    /// The averaged model.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// The configured decay (the ceiling of [`decay_at`]).
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Makes the average equal to `live`'s tensors (a fresh start, e.g. after loading weights).
    pub fn copy_from(&self, live: &ResNet) -> Result<()> {
        for (avg, w) in self.model.named_tensors().iter().zip(live.named_tensors()) {
            var_of(&avg.tensor, &avg.name)?.set(&w.tensor.detach())?;
        }
        Ok(())
    }

    /// Folds `live`'s tensors after optimiser step `step` (0-based) into the average.
    pub fn update(&self, live: &ResNet, step: usize) -> Result<()> {
        let d = decay_at(self.decay, step);
        for (avg, w) in self.model.named_tensors().iter().zip(live.named_tensors()) {
            let var = var_of(&avg.tensor, &avg.name)?;
            let w = w.tensor.detach();
            if avg.name.ends_with("num_batches_tracked") || !w.dtype().is_float() {
                var.set(&w)?;
            } else {
                var.set(&((avg.tensor.detach() * d)? + (w * (1.0 - d))?)?)?;
            }
        }
        Ok(())
    }

    /// Every averaged tensor by name, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.model.named_tensors().into_iter().map(|t| (t.name, t.tensor)).collect()
    }

    /// Restores tensors saved by [`Self::state`]; every tensor of the model must be present with
    /// its shape.
    pub fn load_state(&self, state: HashMap<String, Tensor>) -> Result<()> {
        set_tensors(&self.model, state)
    }
}

/// Sets every tensor of `model` from `state` (by name, any device and float type), refusing a
/// missing, misshapen or unknown tensor before the model is left half-set.
pub(crate) fn set_tensors(model: &ResNet, mut state: HashMap<String, Tensor>) -> Result<()> {
    let mut values = Vec::new();
    for t in model.named_tensors() {
        let Some(saved) = state.remove(&t.name) else {
            return Err(TrainError::InvalidConfig(format!("the weight average lacks tensor `{}`", t.name)));
        };
        if saved.elem_count() != t.tensor.elem_count() {
            return Err(TrainError::InvalidConfig(format!(
                "the weight average's `{}` has shape {:?}, the model needs {:?}",
                t.name,
                saved.dims(),
                t.tensor.dims()
            )));
        }
        let value = saved.to_device(t.tensor.device())?.to_dtype(t.tensor.dtype())?.reshape(t.tensor.shape())?;
        values.push((var_of(&t.tensor, &t.name)?, value));
    }
    if let Some(name) = state.keys().min() {
        return Err(TrainError::InvalidConfig(format!("the weight average holds an unknown tensor `{name}`")));
    }
    for (var, value) in values {
        var.set(&value)?;
    }
    Ok(())
}

fn var_of(t: &Tensor, name: &str) -> Result<Var> {
    if !t.is_variable() {
        return Err(TrainError::InvalidConfig(format!("tensor {name} of the averaged model is not a variable")));
    }
    Ok(Var::from_tensor(t)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use resnet_core::ResNetConfig;

    fn tiny(device: &Device, seed: u64) -> Result<(ResNet, VarMap)> {
        let vars = VarMap::new();
        let cfg = ResNetConfig { base_width: 2, ..ResNetConfig::d2l_resnet18() };
        let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, device))?;
        resnet_core::d2l_init(&model, seed)?;
        Ok((model, vars))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    }

    #[test]
    fn decay_warms_up_to_its_ceiling() {
        assert_eq!(decay_at(0.999, 0), 0.1);
        assert_eq!(decay_at(0.999, 8), 0.5);
        assert_eq!(decay_at(0.5, 1000), 0.5);
        assert!((decay_at(0.999, 100_000) - 0.999).abs() < 1e-12);
    }

    #[test]
    fn update_follows_the_formula_and_copies_the_counter() -> Result<()> {
        let device = Device::Cpu;
        let (a, _va) = tiny(&device, 1)?;
        let (b, _vb) = tiny(&device, 2)?;
        let avg = WeightAverage::new(&a, &TrainConfig::quick(), 0.9, &device)?;
        for (x, y) in avg.model().named_tensors().iter().zip(a.named_tensors()) {
            assert_eq!(max_diff(&x.tensor, &y.tensor)?, 0.0, "{} starts as a copy", x.name);
        }
        // Mark the counter so copying it can be told from averaging it.
        for t in b.named_tensors().iter().filter(|t| t.name.ends_with("num_batches_tracked")) {
            Var::from_tensor(&t.tensor)?.set(&Tensor::new(5f32, &device)?)?;
        }
        let step = 50;
        let d = decay_at(0.9, step);
        avg.update(&b, step)?;
        let mut averaged = 0;
        for ((x, w0), w1) in avg.model().named_tensors().iter().zip(a.named_tensors()).zip(b.named_tensors()) {
            let expected = if x.name.ends_with("num_batches_tracked") {
                w1.tensor.clone()
            } else {
                averaged += 1;
                ((&w0.tensor * d)? + (&w1.tensor * (1.0 - d))?)?
            };
            assert!(max_diff(&x.tensor, &expected)? <= 1e-6, "{}", x.name);
        }
        assert!(averaged > 50, "parameters and running statistics are averaged");
        // The average is a separate copy: the live models are untouched.
        let (a2, _v) = tiny(&device, 1)?;
        for (x, y) in a.named_tensors().iter().zip(a2.named_tensors()) {
            assert_eq!(max_diff(&x.tensor, &y.tensor)?, 0.0, "{}", x.name);
        }
        Ok(())
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() -> Result<()> {
        let device = Device::Cpu;
        let (a, _va) = tiny(&device, 1)?;
        let (b, _vb) = tiny(&device, 2)?;
        let cfg = TrainConfig::quick();
        let saved = WeightAverage::new(&a, &cfg, 0.99, &device)?;
        saved.update(&b, 3)?;
        let restored = WeightAverage::new(&b, &cfg, 0.99, &device)?;
        restored.load_state(saved.state().into_iter().collect())?;
        for (x, y) in saved.model().named_tensors().iter().zip(restored.model().named_tensors()) {
            assert_eq!(max_diff(&x.tensor, &y.tensor)?, 0.0, "{}", x.name);
        }
        let mut missing: HashMap<_, _> = saved.state().into_iter().collect();
        missing.remove("7.weight");
        let err = restored.load_state(missing).expect_err("a missing tensor");
        assert!(err.to_string().contains("7.weight"), "{err}");
        assert!(WeightAverage::new(&a, &cfg, 1.0, &device).is_err(), "decay 1 never moves");
        Ok(())
    }
}
