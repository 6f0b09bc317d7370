//! SGD with momentum, Nesterov and weight decay, with PyTorch's update rule; candle's `SGD` has
//! none of the three.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Tensor, Var};

use crate::config::SgdConfig;
use crate::error::{Result, TrainError};

/// The optimiser: parameters by name, and one momentum buffer per parameter once stepping starts.
#[derive(Debug)]
pub struct Sgd {
    params: Vec<(String, Var)>,
    cfg: SgdConfig,
    momentum: HashMap<String, Tensor>,
}

impl Sgd {
    /// Takes the trainable parameters (which must be variables) and the hyper-parameters.
    pub fn new(params: Vec<resnet_core::NamedTensor>, cfg: SgdConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|p| {
                if !p.tensor.is_variable() {
                    return Err(TrainError::InvalidConfig(format!("parameter {} is not a variable", p.name)));
                }
                Ok((p.name, Var::from_tensor(&p.tensor)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, cfg, momentum: HashMap::new() })
    }

    /// One update at learning rate `lr`:
    /// `g = ∇ + wd·p; b = μ·b + g (b = g at first); g = g + μ·b (Nesterov) or b; p -= lr·g`.
    /// Parameters without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        for (name, var) in &self.params {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Gradients carry candle's op graph; a momentum buffer built from them would chain
            // every step's graph to the next and grow without bound.
            let mut g = grad.detach();
            if self.cfg.weight_decay != 0.0 {
                g = (g + (var.as_tensor() * self.cfg.weight_decay)?)?;
            }
            if self.cfg.momentum != 0.0 {
                let buf = match self.momentum.get(name) {
                    Some(b) => ((b * self.cfg.momentum)? + &g)?,
                    None => g.copy()?,
                };
                g = if self.cfg.nesterov { (g + (&buf * self.cfg.momentum)?)? } else { buf.clone() };
                self.momentum.insert(name.clone(), buf.detach());
            }
            var.set(&(var.as_tensor().detach() - (g * lr)?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers, for checkpointing.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<_> = self.momentum.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Restores momentum buffers saved by [`Self::state`]; every name must be a parameter with
    /// the same shape.
    pub fn load_state(&mut self, state: HashMap<String, Tensor>) -> Result<()> {
        for (name, t) in &state {
            let Some((_, var)) = self.params.iter().find(|(n, _)| n == name) else {
                return Err(TrainError::InvalidConfig(format!("optimiser state for unknown parameter {name}")));
            };
            if var.dims() != t.dims() {
                return Err(TrainError::InvalidConfig(format!(
                    "optimiser state for {name} has shape {:?}, the parameter {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
        }
        self.momentum = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use resnet_core::{NamedTensor, TensorRole};

    /// Three steps on f(p) = Σ p² against the rule written out by hand (PyTorch's `torch.optim.SGD`).
    #[test]
    fn matches_pytorch_update_rule() -> Result<()> {
        for (momentum, nesterov, wd) in [(0.0, false, 0.0), (0.9, false, 0.0), (0.9, true, 1e-2), (0.5, false, 0.1)] {
            let p = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
            let named =
                vec![NamedTensor { name: "p".into(), tensor: p.as_tensor().clone(), role: TensorRole::Parameter }];
            let mut opt = Sgd::new(named, SgdConfig { lr: 0.1, momentum, nesterov, weight_decay: wd })?;
            let mut want = [1.0f64, -2.0];
            let mut buf: Option<[f64; 2]> = None;
            for _ in 0..3 {
                let grads = p.as_tensor().sqr()?.sum_all()?.backward()?;
                opt.step(&grads, 0.1)?;
                let g: Vec<f64> = want.iter().map(|w| 2.0 * w + wd * w).collect();
                let mut d = [g[0], g[1]];
                if momentum != 0.0 {
                    let b = match buf {
                        Some(b) => [momentum * b[0] + g[0], momentum * b[1] + g[1]],
                        None => d,
                    };
                    buf = Some(b);
                    d = if nesterov { [g[0] + momentum * b[0], g[1] + momentum * b[1]] } else { b };
                }
                want = [want[0] - 0.1 * d[0], want[1] - 0.1 * d[1]];
            }
            // Momentum buffers must not keep the step's graph alive (memory would grow per step).
            assert!(opt.state().iter().all(|(_, b)| !b.track_op()), "a momentum buffer carries a graph");
            let got: Vec<f32> = p.as_tensor().to_vec1()?;
            for (a, b) in got.iter().zip(want) {
                assert!((*a as f64 - b).abs() < 1e-5, "{momentum} {nesterov} {wd}: {got:?} vs {want:?}");
            }
        }
        Ok(())
    }
}
