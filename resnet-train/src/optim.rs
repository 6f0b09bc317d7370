//! SGD with momentum, Nesterov and weight decay, with PyTorch's update rule; candle's `SGD` has
//! none of the three.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;

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
        let update =
            |(name, var): &(String, Var)| Ok(self.update(name, var, grads, lr)?.map(|buf| (name.clone(), buf)));
        // On the CPU the parameters are updated side by side: each update is a pass over memory
        // that one thread would make while the others wait. Each parameter's arithmetic is its
        // own, so the order changes no bit.
        let buffers: Vec<Option<(String, Tensor)>> = if self.params.iter().all(|(_, v)| v.device().is_cpu()) {
            self.params.par_iter().map(update).collect::<Result<_>>()?
        } else {
            self.params.iter().map(update).collect::<Result<_>>()?
        };
        self.momentum.extend(buffers.into_iter().flatten());
        Ok(())
    }

    /// [`Sgd::step`] for one parameter; returns its new momentum buffer (with momentum).
    fn update(&self, name: &str, var: &Var, grads: &GradStore, lr: f64) -> Result<Option<Tensor>> {
        let Some(grad) = grads.get(var.as_tensor()) else {
            return Ok(None);
        };
        // Gradients carry candle's op graph; a momentum buffer built from them would chain
        // every step's graph to the next and grow without bound.
        let mut g = grad.detach();
        if self.cfg.weight_decay != 0.0 {
            g = (g + (var.as_tensor() * self.cfg.weight_decay)?)?;
        }
        // On the CPU the buffer and the parameter are updated in place, one pass each; the
        // arithmetic (and so every bit of the result) is the same as the tensor expressions.
        let in_place = var.device().is_cpu() && matches!(var.dtype(), DType::F32 | DType::F64);
        let mut buffer = None;
        if self.cfg.momentum != 0.0 {
            let buf = match self.momentum.get(name) {
                Some(b) if in_place => {
                    b.inplace_op2(&g, &ScaleAdd { scale: self.cfg.momentum, step: 1.0 })?;
                    b.clone()
                }
                Some(b) => ((b * self.cfg.momentum)? + &g)?,
                None => g.copy()?,
            };
            g = if self.cfg.nesterov { (g + (&buf * self.cfg.momentum)?)? } else { buf.clone() };
            buffer = Some(buf.detach());
        }
        if in_place {
            var.as_tensor().inplace_op2(&g, &ScaleAdd { scale: 1.0, step: -lr })?;
        } else {
            var.set(&(var.as_tensor().detach() - (g * lr)?)?)?;
        }
        Ok(buffer)
    }

    /// The momentum buffers, for checkpointing. They are updated in place by later steps on the
    /// CPU, so serialise them before the next step (or `copy` them).
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

/// `a ← a·scale + b·step` in place, with `b·step` rounded first as `b * step` would be and
/// `a·scale` skipped at 1: the same operations, in the same order, as the tensor expressions
/// `a * scale + b` (momentum) and `a - b * lr` (the update) that it replaces.
struct ScaleAdd {
    scale: f64,
    step: f64,
}

impl ScaleAdd {
    fn run<T: candle_core::WithDType>(&self, a: &mut [T], b: &[T]) {
        let (scale, step) = (T::from_f64(self.scale), T::from_f64(self.step.abs()));
        let negative = self.step < 0.0;
        for (x, &y) in a.iter_mut().zip(b) {
            let scaled = if self.scale == 1.0 { *x } else { *x * scale };
            let delta = if self.step.abs() == 1.0 { y } else { y * step };
            *x = if negative { scaled - delta } else { scaled + delta };
        }
    }
}

impl InplaceOp2 for ScaleAdd {
    fn name(&self) -> &'static str {
        "sgd-scale-add"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("{}: both operands must be contiguous", self.name())
        };
        if a1 - a0 != b1 - b0 {
            candle_core::bail!("{}: operands of {} and {} elements", self.name(), a1 - a0, b1 - b0)
        }
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => self.run(&mut a[a0..a1], &b[b0..b1]),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => self.run(&mut a[a0..a1], &b[b0..b1]),
            _ => candle_core::bail!("{}: expected two f32 or two f64 tensors", self.name()),
        }
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

    /// The in-place update gives the same bits as the tensor expressions it replaces.
    #[test]
    fn in_place_update_is_bit_identical_to_tensor_expressions() -> Result<()> {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1., 1000, &dev)?;
        let p = Var::from_tensor(&init)?;
        let named = vec![NamedTensor { name: "p".into(), tensor: p.as_tensor().clone(), role: TensorRole::Parameter }];
        let (lr, mu) = (0.05, 0.9);
        let mut opt = Sgd::new(named, SgdConfig { lr, momentum: mu, nesterov: false, weight_decay: 0.0 })?;
        let (mut want, mut buf): (Tensor, Option<Tensor>) = (init.copy()?, None);
        for _ in 0..3 {
            let grads = (p.as_tensor().sqr()?.sin()?).sum_all()?.backward()?;
            let g = grads.get(p.as_tensor()).expect("grad").detach();
            opt.step(&grads, lr)?;
            let b = match buf {
                Some(b) => ((b * mu)? + &g)?,
                None => g.copy()?,
            };
            want = (want - (&b * lr)?)?;
            buf = Some(b);
            let (got, want_v): (Vec<f32>, Vec<f32>) = (p.as_tensor().to_vec1()?, want.to_vec1()?);
            assert!(got.iter().zip(&want_v).all(|(a, b)| a.to_bits() == b.to_bits()), "update differs");
        }
        Ok(())
    }
}
