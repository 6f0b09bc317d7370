//! Named access to a model's tensors: trainable parameters and BatchNorm buffers.

use candle_core::Tensor;

/// Whether a tensor is trained by the optimiser or is a running statistic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole {
    /// A trainable weight or bias.
    Parameter,
    /// A BatchNorm running statistic or counter (no gradient, not counted as a parameter).
    Buffer,
}

/// One tensor of a model with its checkpoint name (d2l's PyTorch `state_dict` key).
#[derive(Debug, Clone)]
pub struct NamedTensor {
    /// The key, e.g. `1.0.conv1.weight`.
    pub name: String,
    /// The tensor itself (a candle `Var` when the model was built from a `VarMap`).
    pub tensor: Tensor,
    /// Parameter or buffer.
    pub role: TensorRole,
}

/// Implemented by every layer: list the tensors it owns under `prefix`.
pub trait CollectTensors {
    /// Appends this layer's tensors, named `{prefix}.{name}`.
    fn collect_tensors(&self, prefix: &str, out: &mut Vec<NamedTensor>);
}

pub(crate) fn push(out: &mut Vec<NamedTensor>, prefix: &str, name: &str, tensor: &Tensor, role: TensorRole) {
    let name = if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
    out.push(NamedTensor { name, tensor: tensor.clone(), role });
}

impl CollectTensors for crate::ops::Conv2d {
    fn collect_tensors(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        push(out, prefix, "weight", self.weight(), TensorRole::Parameter);
        push(out, prefix, "bias", self.bias(), TensorRole::Parameter);
    }
}

impl CollectTensors for crate::ops::BatchNorm {
    fn collect_tensors(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        push(out, prefix, "weight", self.weight(), TensorRole::Parameter);
        push(out, prefix, "bias", self.bias(), TensorRole::Parameter);
        push(out, prefix, "running_mean", self.running_mean(), TensorRole::Buffer);
        push(out, prefix, "running_var", self.running_var(), TensorRole::Buffer);
        push(out, prefix, "num_batches_tracked", self.num_batches_tracked(), TensorRole::Buffer);
    }
}

impl CollectTensors for candle_nn::Linear {
    fn collect_tensors(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        push(out, prefix, "weight", self.weight(), TensorRole::Parameter);
        if let Some(b) = self.bias() {
            push(out, prefix, "bias", b, TensorRole::Parameter);
        }
    }
}
