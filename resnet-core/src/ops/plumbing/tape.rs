//! The network's own backward pass: the training forward recorded on a tape of custom ops, and
//! their backwards run from it in reverse, instead of candle's backprop over its graph.
//!
//! candle's backprop starts every gradient an op returns as a fresh zero tensor and adds the
//! gradient to it (`GradStore::or_insert`, then `add`), on the calling thread: for every
//! activation of the network a zero-filled allocation and a pass that reads two tensors and
//! writes a third, where the gradient could simply have been kept. On the tape, a gradient is
//! kept as its op returns it and added to only where a tensor feeds two ops (a residual block's
//! input; where that tensor is an add+ReLU's output, the two parts go through the ReLU's mask in
//! the same pass, [`mask_by_positive_sum`]); each op's saved tensors are released
//! as soon as its backward has run, not when the whole pass ends.
//!
//! While [`record`] runs a closure, the layers' forward helpers ([`op1`], [`op2`], [`op3`],
//! [`cat`], [`add`]) compute without candle's graph and append each op to the tape; outside it
//! they build candle's graph as usual. [`record`] returns the closure's output joined to
//! candle's graph by one node ([`TapeEnd`]) whose backward runs the tape's. The parameters'
//! gradients go to [`super::gradients::backward`]'s list ([`super::gradients::route`]), so the
//! tape's gradients are only delivered inside that pass; `loss.backward()` on a recorded output
//! is an error that says so.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor, TensorId, WithDType,
};
use rayon::prelude::*;

use super::storage::contiguous;
use super::{gradients, scratch};

/// One recorded op: what it was and its inputs.
enum Step {
    Op1(Arc<dyn CustomOp1 + Send + Sync>, Tensor),
    Op2(Arc<dyn CustomOp2 + Send + Sync>, [Tensor; 2]),
    Op3(Arc<dyn CustomOp3 + Send + Sync>, [Tensor; 3]),
    /// One-dimensional tensors joined end to end.
    Cat(Vec<Tensor>),
    Add([Tensor; 2]),
}

/// The recorded ops in the order they ran, each with its output.
#[derive(Default)]
struct Tape {
    steps: Vec<(Step, Tensor)>,
    /// The outputs of the recorded ops.
    made: HashSet<TensorId>,
}

thread_local! {
    /// The tape being recorded on this thread; `None` outside [`record`].
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

thread_local! {
    /// While a tape's backward runs on this thread, the outputs its ops recorded.
    static MADE: RefCell<Option<HashSet<TensorId>>> = const { RefCell::new(None) };
}

/// Whether an op's backward should compute the gradient of its input `x`: `x` carries candle's
/// graph, or a tape's backward is running and a recorded op made `x`. (Inputs that are neither,
/// such as the images, need none.)
pub(crate) fn wants_grad(x: &Tensor) -> bool {
    x.track_op() || MADE.with(|m| m.borrow().as_ref().is_some_and(|m| m.contains(&x.id())))
}

/// Whether a backward could want the gradient of `x`, asked as an op runs forward: `x` carries
/// candle's graph, or a recorded op on the tape being recorded made it.
pub(crate) fn may_want_grad(x: &Tensor) -> bool {
    x.track_op() || TAPE.with(|t| t.borrow().as_ref().is_some_and(|t| t.made.contains(&x.id())))
}

fn recording() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

/// Appends `step` with its output `out`. An input that carries candle's graph but is neither a
/// recorded output nor a variable would lose its gradient (the tape cannot hand a gradient back
/// to candle's graph), so it is an error.
fn push(step: Step, out: &Tensor) -> candle_core::Result<()> {
    TAPE.with(|t| {
        let mut tape = t.borrow_mut();
        let tape = tape.as_mut().expect("pushed while recording");
        let inputs: &[Tensor] = match &step {
            Step::Op1(_, x) => std::slice::from_ref(x),
            Step::Op2(_, xs) | Step::Add(xs) => xs,
            Step::Op3(_, xs) => xs,
            Step::Cat(xs) => xs,
        };
        if let Some(x) = inputs.iter().find(|x| x.track_op() && !x.is_variable() && !tape.made.contains(&x.id())) {
            candle_core::bail!(
                "the recorded training forward met a tensor {:?} made by candle's graph outside it; its gradient \
                 would be lost (run the layers through `forward_t` instead)",
                x.dims()
            )
        }
        tape.made.insert(out.id());
        tape.steps.push((step, out.clone()));
        Ok(())
    })
}

/// `op(x)`: recorded while [`record`] runs, a node of candle's graph otherwise.
pub(crate) fn op1<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, op: C) -> candle_core::Result<Tensor> {
    if !recording() {
        return x.apply_op1(op);
    }
    let op = Arc::new(op);
    let out = x.apply_op1_no_bwd(&*op)?;
    push(Step::Op1(op, x.clone()), &out)?;
    Ok(out)
}

/// `op(a, b)`, as [`op1`].
pub(crate) fn op2<C: CustomOp2 + Send + Sync + 'static>(a: &Tensor, b: &Tensor, op: C) -> candle_core::Result<Tensor> {
    if !recording() {
        return a.apply_op2(b, op);
    }
    let op = Arc::new(op);
    let out = a.apply_op2_no_bwd(b, &*op)?;
    push(Step::Op2(op, [a.clone(), b.clone()]), &out)?;
    Ok(out)
}

/// `op(a, b, c)`, as [`op1`].
pub(crate) fn op3<C: CustomOp3 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: C,
) -> candle_core::Result<Tensor> {
    if !recording() {
        return a.apply_op3(b, c, op);
    }
    let op = Arc::new(op);
    let out = a.apply_op3_no_bwd(b, c, &*op)?;
    push(Step::Op3(op, [a.clone(), b.clone(), c.clone()]), &out)?;
    Ok(out)
}

/// One-dimensional tensors joined end to end, as [`op1`].
pub(crate) fn cat(parts: &[&Tensor]) -> candle_core::Result<Tensor> {
    if !recording() {
        return Tensor::cat(parts, 0);
    }
    if let Some(p) = parts.iter().find(|p| p.rank() != 1) {
        candle_core::bail!("tape::cat joins one-dimensional tensors, got {:?}", p.dims())
    }
    let detached: Vec<Tensor> = parts.iter().map(|p| p.detach()).collect();
    let out = Tensor::cat(&detached, 0)?;
    push(Step::Cat(parts.iter().map(|&p| p.clone()).collect()), &out)?;
    Ok(out)
}

/// `a + b` (same shapes), as [`op1`].
pub(crate) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !recording() {
        return a + b;
    }
    let out = (a.detach() + b.detach())?;
    push(Step::Add([a.clone(), b.clone()]), &out)?;
    Ok(out)
}

/// Runs `forward` with its ops recorded and returns its output joined to candle's graph by one
/// node whose backward is the tape's, run by [`gradients::backward`]. `anchor` is a variable the
/// output depends on (candle's backprop visits only nodes that lead to a variable); it gets its
/// gradient from the tape like every other parameter.
pub(crate) fn record(
    anchor: &Tensor,
    forward: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    /// Ends the recording however `forward` returns.
    struct Recording;
    impl Drop for Recording {
        fn drop(&mut self) {
            TAPE.with(|t| t.borrow_mut().take());
        }
    }
    if recording() {
        candle_core::bail!("a recorded forward cannot run inside another")
    }
    if !anchor.is_variable() {
        candle_core::bail!("the tape's anchor must be a variable")
    }
    TAPE.with(|t| *t.borrow_mut() = Some(Tape::default()));
    let guard = Recording;
    let out = forward()?;
    let tape = TAPE.with(|t| t.borrow_mut().take()).expect("recording");
    drop(guard);
    out.apply_op2_arc(anchor, Arc::new(Box::new(TapeEnd { tape: Mutex::new(Some(tape)) })))
}

/// The node that joins a recorded output to candle's graph: its forward is a copy of the output,
/// its backward the tape's.
struct TapeEnd {
    /// Taken by the backward, which releases each step as it goes.
    tape: Mutex<Option<Tape>>,
}

impl CustomOp2 for TapeEnd {
    fn name(&self) -> &'static str {
        "tape-end"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        fn copy<T: Copy>(v: &[T], l: &Layout) -> candle_core::Result<Vec<T>> {
            Ok(super::storage::contiguous(v, l, "the recorded output")?.to_vec())
        }
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(copy(v, l1)?),
            CpuStorage::F64(v) => CpuStorage::F64(copy(v, l1)?),
            _ => candle_core::bail!("the tape records f32 or f64 tensors"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        out: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !gradients::routing() {
            candle_core::bail!(
                "these logits come from ResNet::forward_train, whose backward is the network's own: get the \
                 gradients with resnet_core::backward(&loss), not loss.backward()"
            )
        }
        let tape = self.tape.lock().map_err(|_| candle_core::Error::Msg("tape lock poisoned".into()))?.take();
        let Some(tape) = tape else { candle_core::bail!("the recorded forward's backward ran twice") };
        tape.backward(out, grad.clone())?;
        Ok((None, None))
    }
}

/// The name of the add+ReLU op (`elementwise::add_relu`), by which the backward knows it.
pub(crate) const ADD_RELU: &str = "add-relu";

/// Elements per parallel chunk of [`mask_by_positive_sum`].
const CHUNK: usize = 64 * 1024;

/// `a + b` where `ys > 0`, else 0, in one pass: the gradient through the ReLU of
/// [`super::elementwise::add_relu`] (output `ys`) when its output's gradient arrives in two parts, as the tape's
/// backward has it where a block's output feeds the next block twice (the add is the one
/// [`super::elementwise::add_relu`]'s backward would otherwise take first, so the same values).
pub(crate) fn mask_by_positive_sum(ys: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    ys.contiguous()?.apply_op3_no_bwd(&a.contiguous()?, &b.contiguous()?, &MaskByPositiveSum)
}

/// `(ys, a, b) -> a + b where ys > 0, else 0`: [`mask_by_positive_sum`].
struct MaskByPositiveSum;

impl CustomOp3 for MaskByPositiveSum {
    fn name(&self) -> &'static str {
        "relu-backward-sum"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _span = crate::profile::span(self.name(), l1.dims());
        if l2.shape() != l1.shape() || l3.shape() != l1.shape() {
            candle_core::bail!(
                "relu-backward-sum: shapes {:?}, {:?} and {:?} differ",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        fn run<T: WithDType>(y: &[T], a: &[T], b: &[T]) -> Vec<T> {
            let fill = |out: &mut [MaybeUninit<T>]| {
                out.par_chunks_mut(CHUNK)
                    .zip(y.par_chunks(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))))
                    .for_each(|(o, (y, (a, b)))| {
                        for (((o, &y), &a), &b) in o.iter_mut().zip(y).zip(a).zip(b) {
                            o.write(if y > T::zero() { a + b } else { T::zero() });
                        }
                    })
            };
            // SAFETY: the three operands have one shape (checked above), so each chunk of the
            // output is zipped with chunks of its own length: every element is written.
            unsafe { scratch::written(y.len(), fill) }
        }
        let what = "relu-backward-sum";
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(y), CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(run(contiguous(y, l1, what)?, contiguous(a, l2, what)?, contiguous(b, l3, what)?))
            }
            (CpuStorage::F64(y), CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(run(contiguous(y, l1, what)?, contiguous(a, l2, what)?, contiguous(b, l3, what)?))
            }
            (y, _, _) => candle_core::bail!("{what} supports matching f32 or f64 tensors, got {:?}", y.dtype()),
        };
        Ok((out, l1.shape().clone()))
    }
}

impl Tape {
    /// The recorded ops' backwards in reverse order from `grad`, the gradient of `out`; the
    /// variables' gradients go to [`gradients::route`]'s list.
    fn backward(mut self, out: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        /// Ends the backward's set of recorded outputs however it returns.
        struct Made;
        impl Drop for Made {
            fn drop(&mut self) {
                MADE.with(|m| m.borrow_mut().take());
            }
        }
        MADE.with(|m| *m.borrow_mut() = Some(std::mem::take(&mut self.made)));
        let _made = Made;
        // Each recorded output's gradient, in the parts its users' backwards returned (in the
        // order they came); a variable's goes to the list.
        let mut parts: HashMap<TensorId, Vec<Tensor>> = HashMap::new();
        parts.insert(out.id(), vec![grad]);
        let give = |parts: &mut HashMap<TensorId, Vec<Tensor>>, x: &Tensor, g: Option<Tensor>| {
            let Some(g) = g else { return };
            if MADE.with(|m| m.borrow().as_ref().is_some_and(|m| m.contains(&x.id()))) {
                parts.entry(x.id()).or_default().push(g);
            } else if x.is_variable() {
                gradients::route_variable(x, g);
            }
        };
        while let Some((step, y)) = self.steps.pop() {
            // An output no later op used (and not the end) has no gradient.
            let Some(mut ps) = parts.remove(&y.id()) else { continue };
            // A block's output that feeds the next block twice: its two parts go through the
            // add+ReLU's backward in one pass instead of being added first.
            if let (Step::Op2(op, [a, b]), 2) = (&step, ps.len()) {
                if op.name() == ADD_RELU {
                    let g = mask_by_positive_sum(&y, &ps[0], &ps[1])?;
                    give(&mut parts, a, Some(g.clone()));
                    give(&mut parts, b, Some(g));
                    continue;
                }
            }
            let mut g = ps.remove(0);
            for p in ps {
                let _span = crate::profile::span("gradient-sum", p.dims());
                g = (g + p)?;
            }
            match step {
                Step::Op1(op, x) => give(&mut parts, &x, op.bwd(&x, &y, &g)?),
                Step::Op2(op, [a, b]) => {
                    let (ga, gb) = op.bwd(&a, &b, &y, &g)?;
                    give(&mut parts, &a, ga);
                    give(&mut parts, &b, gb);
                }
                Step::Op3(op, [a, b, c]) => {
                    let (ga, gb, gc) = op.bwd(&a, &b, &c, &y, &g)?;
                    give(&mut parts, &a, ga);
                    give(&mut parts, &b, gb);
                    give(&mut parts, &c, gc);
                }
                Step::Cat(cat) => {
                    let mut start = 0;
                    for p in &cat {
                        let len = p.dim(0)?;
                        give(&mut parts, p, Some(g.narrow(0, start, len)?.copy()?));
                        start += len;
                    }
                }
                Step::Add([a, b]) => {
                    give(&mut parts, &a, Some(g.clone()));
                    give(&mut parts, &b, Some(g));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::{loss, ModuleT, VarBuilder, VarMap};

    use super::*;
    use crate::ops::plumbing::elementwise::add_relu;
    use crate::{backward, d2l_init, BlockKind, ConvAlgorithm, ResNet, ResNetConfig};

    /// A small ResNet-18 (4 channels in the first stage) of either block kind, initialised.
    fn model(block: BlockKind, dtype: DType, algorithm: ConvAlgorithm) -> (VarMap, ResNet) {
        let vars = VarMap::new();
        let cfg = ResNetConfig { base_width: 4, block, ..ResNetConfig::d2l_resnet18() };
        let mut m = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, dtype, &Device::Cpu)).expect("model");
        m.set_conv_algorithm(algorithm);
        d2l_init(&m, 11).expect("init");
        (vars, m)
    }

    fn values(t: &Tensor) -> Vec<f64> {
        t.flatten_all().and_then(|t| t.to_dtype(DType::F64)).and_then(|t| t.to_vec1()).expect("values")
    }

    /// The recorded forward's logits, every parameter's gradient and the running statistics it
    /// leaves equal candle's (`forward_t(xs, true)` and `loss.backward()`) exactly, for both
    /// block kinds, f32 and f64, Winograd and im2col; the parameters are all reached.
    #[test]
    fn gives_candles_gradients() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (block, dtype, algorithm) in [
            (BlockKind::PostActivation, DType::F32, ConvAlgorithm::Winograd),
            (BlockKind::PostActivation, DType::F64, ConvAlgorithm::Im2col),
            (BlockKind::PreActivation, DType::F32, ConvAlgorithm::Winograd),
            (BlockKind::PreActivation, DType::F64, ConvAlgorithm::Im2col),
        ] {
            let case = format!("{block:?} {dtype:?} {algorithm:?}");
            let xs = Tensor::rand(0f32, 1., (3, 1, 28, 28), &dev)?.to_dtype(dtype)?;
            let ys = Tensor::new(&[1u32, 4, 9], &dev)?;
            let (_, candles) = model(block, dtype, algorithm);
            let (_, ours) = model(block, dtype, algorithm);
            let l1 = loss::cross_entropy(&candles.forward_t(&xs, true)?, &ys)?;
            let l2 = loss::cross_entropy(&ours.forward_train(&xs)?, &ys)?;
            assert_eq!(values(&l1), values(&l2), "{case}: losses");
            let (g1, g2) = (l1.backward()?, backward(&l2)?);
            let (p1, p2) = (candles.parameters(), ours.parameters());
            assert!(p2.len() >= 60, "{case}: {} parameters", p2.len());
            for (a, b) in p1.iter().zip(&p2) {
                let (Some(ga), Some(gb)) = (g1.get(&a.tensor), g2.get(&b.tensor)) else {
                    panic!("{case}: {}: a gradient missing", a.name)
                };
                assert_eq!(values(ga), values(gb), "{case}: {}", a.name);
            }
            for (a, b) in candles.named_tensors().iter().zip(ours.named_tensors()) {
                assert_eq!(values(&a.tensor), values(&b.tensor), "{case}: {} after the step", a.name);
            }
        }
        Ok(())
    }

    /// Where the recording does not apply (the Candle algorithm, weights that are not
    /// variables) `forward_train` is `forward_t(xs, true)`, and `loss.backward()` works on it.
    #[test]
    fn falls_back_to_candles_graph() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::rand(0f32, 1., (2, 1, 28, 28), &dev)?;
        let ys = Tensor::new(&[2u32, 5], &dev)?;
        let (vars, m) = model(BlockKind::PostActivation, DType::F32, ConvAlgorithm::Candle);
        let grads = loss::cross_entropy(&m.forward_train(&xs)?, &ys)?.backward()?;
        for p in m.parameters() {
            assert!(grads.get(&p.tensor).is_some(), "{}: no gradient", p.name);
        }
        let frozen = VarBuilder::from_tensors(
            vars.data().lock().expect("vars").iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect(),
            DType::F32,
            &dev,
        );
        let cfg = ResNetConfig { base_width: 4, ..ResNetConfig::d2l_resnet18() };
        let m = ResNet::new(&cfg, frozen).expect("model");
        let logits = m.forward_train(&xs)?;
        assert!(!logits.track_op(), "a model of constants recorded a graph");
        Ok(())
    }

    /// `loss.backward()` on recorded logits is an error that names the function to call.
    #[test]
    fn candles_backward_on_recorded_logits_is_an_error() -> candle_core::Result<()> {
        let (_, m) = model(BlockKind::PostActivation, DType::F32, ConvAlgorithm::Winograd);
        let xs = Tensor::rand(0f32, 1., (2, 1, 28, 28), &Device::Cpu)?;
        let l = m.forward_train(&xs)?.sqr()?.sum_all()?;
        let err = l.backward().expect_err("candle's backward ran the tape").to_string();
        assert!(err.contains("resnet_core::backward"), "{err}");
        Ok(())
    }

    /// A tensor made by candle's graph outside the recording cannot enter a recorded op (its
    /// gradient would be lost), a recording does not nest, and the recording ends on error.
    #[test]
    fn refuses_what_would_lose_a_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let v = Var::new(&[1f32, -2., 3.], &dev)?;
        let graph = (v.as_tensor() * 2.)?;
        let err = record(v.as_tensor(), || add_relu(&graph, v.as_tensor())).expect_err("recorded").to_string();
        assert!(err.contains("would be lost"), "{err}");
        assert!(!recording(), "the recording outlived its error");
        let err = record(v.as_tensor(), || record(v.as_tensor(), || add_relu(v.as_tensor(), v.as_tensor())))
            .expect_err("nested")
            .to_string();
        assert!(err.contains("inside another"), "{err}");
        // Recorded: relu(v + v) through the tape, its gradient 2 where v > 0.
        let y = record(v.as_tensor(), || add_relu(v.as_tensor(), v.as_tensor()))?;
        let grads = backward(&y.sum_all()?)?;
        assert_eq!(grads.get(v.as_tensor()).expect("gradient").to_vec1::<f32>()?, [2., 0., 2.]);
        Ok(())
    }
}
