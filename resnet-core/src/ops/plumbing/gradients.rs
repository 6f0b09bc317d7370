//! [`backward`]: candle's backward pass with the convolution weights' gradients handed over
//! directly.
//!
//! candle's backprop stores every gradient an op returns as a fresh zero tensor plus that
//! gradient (`GradStore::or_insert`, then `add`), on the calling thread. For activations that
//! sum is needed where a tensor feeds several ops, but a convolution weight is used once per
//! forward, and the zero-plus-add then costs a memset and an add over every weight (11 M values
//! for ResNet-18) per step. Under [`backward`], the convolution ops hand the gradient of a weight
//! that is a variable to a per-thread list instead of returning it ([`route`]), and the list
//! goes into the gradient store after candle's pass, added to any gradient already there. The
//! backward of a recorded forward ([`super::tape`]) hands every parameter's gradient to the same
//! list.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::Tensor;

thread_local! {
    /// The weights' gradients routed during a [`backward`] on this thread; `None` outside one.
    static ROUTED: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// The gradients of `loss` with respect to every variable it depends on, as
/// `loss.backward()` gives them (the same values; a gradient element that is `-0.0` stays so
/// instead of becoming `0.0`), with less work for the convolution weights. Use it in place of
/// `loss.backward()`, e.g. before `Optimizer::step`. A loss built on
/// [`crate::ResNet::forward_train`]'s logits needs it: the network's own backward (from the tape
/// of ops its forward recorded) runs inside it, its variables' gradients delivered here.
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    /// Ends the routing however candle's pass returns.
    struct Routing;
    impl Drop for Routing {
        fn drop(&mut self) {
            ROUTED.with(|r| r.borrow_mut().take());
        }
    }
    ROUTED.with(|r| *r.borrow_mut() = Some(Vec::new()));
    let routing = Routing;
    let mut grads = loss.backward()?;
    let routed = ROUTED.with(|r| r.borrow_mut().take()).unwrap_or_default();
    drop(routing);
    for (weight, grad) in routed {
        let grad = match grads.remove(&weight) {
            Some(earlier) => (earlier + grad)?,
            None => grad,
        };
        grads.insert(&weight, grad);
    }
    Ok(grads)
}

/// Whether a [`backward`] is running on this thread (so routed gradients are delivered).
pub(crate) fn routing() -> bool {
    ROUTED.with(|r| r.borrow().is_some())
}

/// Hands `grad`, the gradient of the variable `var`, to the running [`backward`]'s list (added
/// to any gradient `var` gets elsewhere); outside a [`backward`] it is dropped, so call it only
/// where [`routing`] holds.
pub(crate) fn route_variable(var: &Tensor, grad: Tensor) {
    ROUTED.with(|r| {
        if let Some(routed) = r.borrow_mut().as_mut() {
            routed.push((var.clone(), grad));
        }
    })
}

/// A convolution op's weight gradient `dw` for `weight`: taken over (`None` returned) inside a
/// [`backward`] when the weight is a variable, so candle's pass does not add it to a zero
/// tensor; returned as it is otherwise (a weight computed from variables needs candle's pass to
/// carry its gradient on).
pub(crate) fn route(weight: &Tensor, dw: Option<Tensor>) -> Option<Tensor> {
    let dw = dw?;
    if !weight.is_variable() {
        return Some(dw);
    }
    ROUTED.with(|r| match r.borrow_mut().as_mut() {
        Some(routed) => {
            routed.push((weight.clone(), dw));
            None
        }
        None => Some(dw),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{loss, ModuleT, VarBuilder, VarMap};

    use super::*;
    use crate::ops::conv::dispatch::Im2colConv;
    use crate::{d2l_init, ResNet, ResNetConfig};

    /// Every parameter's gradient from [`backward`] equals candle's `loss.backward()`, exactly,
    /// for a loss that uses each weight once and one that uses each twice (two forwards summed);
    /// and the routing ends with the pass.
    #[test]
    fn gives_the_gradients_of_candles_backward() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let cfg = ResNetConfig { base_width: 4, ..ResNetConfig::d2l_resnet18() };
        let xs = Tensor::rand(0f32, 1., (4, 1, 28, 28), &dev)?;
        let ys = Tensor::new(&[0u32, 3, 7, 9], &dev)?;
        for twice in [false, true] {
            let vars = VarMap::new();
            let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &dev)).expect("model");
            d2l_init(&model, 7).expect("init");
            let mut l = loss::cross_entropy(&model.forward_t(&xs, true)?, &ys)?;
            if twice {
                l = (l + loss::cross_entropy(&model.forward_t(&xs.flip(&[3])?, true)?, &ys)?)?;
            }
            let (ours, candles) = (backward(&l)?, l.backward()?);
            assert!(ROUTED.with(|r| r.borrow().is_none()), "routing left on");
            let mut convs = 0;
            for p in model.parameters() {
                let (Some(a), Some(b)) = (ours.get(&p.tensor), candles.get(&p.tensor)) else {
                    panic!("{}: a gradient missing", p.name)
                };
                let (a, b) = (a.flatten_all()?.to_vec1::<f32>()?, b.flatten_all()?.to_vec1::<f32>()?);
                assert_eq!(a, b, "{} (twice: {twice})", p.name);
                convs += usize::from(p.tensor.rank() == 4);
            }
            assert!(convs >= 17, "only {convs} convolution weights compared");
        }
        Ok(())
    }

    /// A weight computed from a variable is not routed: candle's pass carries its gradient on to
    /// the variable, as without [`backward`].
    #[test]
    fn a_computed_weight_passes_its_gradient_on() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let w = Var::randn(0f32, 1., (3, 2, 3, 3), &dev)?;
        let b = Var::randn(0f32, 1., 3, &dev)?;
        let x = Tensor::randn(0f32, 1., (2, 5, 5, 2), &dev)?;
        for scale in [None, Some(2.0)] {
            let weight = match scale {
                Some(s) => (w.as_tensor() * s)?,
                None => w.as_tensor().clone(),
            };
            let y = x.apply_op3(&weight, b.as_tensor(), Im2colConv::new((3, 1, 1), true))?;
            let l = y.sqr()?.sum_all()?;
            let (ours, candles) = (backward(&l)?, l.backward()?);
            for t in [w.as_tensor(), b.as_tensor()] {
                let (Some(a), Some(c)) = (ours.get(t), candles.get(t)) else {
                    panic!("a gradient missing ({scale:?})")
                };
                assert_eq!(a.flatten_all()?.to_vec1::<f32>()?, c.flatten_all()?.to_vec1::<f32>()?, "{scale:?}");
            }
        }
        Ok(())
    }
}
