//! The ResNet itself: d2l's stem `b1`, stages `b2..b5`, global average pooling and the classifier.

use candle_core::{DType, Module, Tensor};
use candle_nn::{ModuleT, VarBuilder};

use crate::block::{Stage, StageConfig};
use crate::config::{BlockKind, ResNetConfig};
use crate::error::{CoreError, Result};
use crate::layout::to_channels_last;
use crate::ops::plumbing::geometry::Window;
use crate::ops::{
    conv_bn_pool, conv_bn_pool_inference, global_avg_pool, tape, BatchNorm, Conv2d, Conv2dConfig, ConvAlgorithm,
    GpuOps, MaxPool2d,
};
use crate::tensors::{CollectTensors, NamedTensor, TensorRole};

/// d2l's ResNet, laid out as its `nn.Sequential(b1, b2, b3, b4, b5, AdaptiveAvgPool2d, Flatten,
/// Linear)`, so tensor names equal the PyTorch `state_dict` keys (`0.0.weight`, `1.0.conv1.weight`,
/// `7.weight`, ...).
///
/// Inputs and outputs are PyTorch-shaped (`(batch, channels, height, width)` in, logits out); the
/// network runs channels-last inside, where its convolutions are single matrix products.
///
/// [`ModuleT::forward_t`] is the training (and evaluation-with-graph) forward; [`ResNet::infer`]
/// is evaluation without a backward graph. How convolutions are computed is a runtime setting,
/// [`ResNet::set_conv_algorithm`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{ModuleT, VarBuilder, VarMap};
/// use resnet_core::{ConvAlgorithm, ResNet, ResNetConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg = ResNetConfig { base_width: 4, ..ResNetConfig::d2l_resnet18() };
/// let vars = VarMap::new();
/// let mut model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
/// let xs = Tensor::rand(0f32, 1., (2, 1, 28, 28), &Device::Cpu)?;
/// let logits = model.forward_t(&xs, true)?; // training mode: batch statistics, with a graph
/// assert_eq!(logits.dims(), &[2, 10]);
///
/// model.set_conv_algorithm(ConvAlgorithm::Im2col);
/// let a = model.infer(&xs)?;
/// model.set_conv_algorithm(ConvAlgorithm::Winograd);
/// let b = model.infer(&xs)?;
/// let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-4, "the algorithms agree to rounding: {diff}");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ResNet {
    cfg: ResNetConfig,
    stem_conv: Conv2d,
    stem_bn: BatchNorm,
    pool: MaxPool2d,
    stages: Vec<Stage>,
    final_bn: Option<BatchNorm>,
    fc: candle_nn::Linear,
    compute_dtype: Option<DType>,
    conv_algorithm: ConvAlgorithm,
    gpu_ops: GpuOps,
}

/// One line of the seed's shape trace: a top-level layer and its output shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageShape {
    /// The layer's name here (`b1`..`b5`, `avgpool`, `flatten`, `linear`).
    pub name: &'static str,
    /// The PyTorch class d2l prints for it (`Sequential`, `AdaptiveAvgPool2d`, `Flatten`, `Linear`).
    pub torch_class: &'static str,
    /// Output shape in PyTorch order (`(batch, channels, height, width)` or `(batch, features)`).
    pub shape: Vec<usize>,
}

const STAGE_NAMES: [&str; 4] = ["b2", "b3", "b4", "b5"];

impl ResNet {
    /// Builds the network under `vb` (use a fresh `VarMap` to train, or safetensors to load),
    /// computing convolutions with [`ConvAlgorithm::default`].
    /// Call [`crate::d2l_init`] afterwards for d2l's seeded Xavier initialisation.
    pub fn new(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let [c1, c2, c3, c4] = cfg.stage_channels();
        let stem =
            Conv2dConfig { in_channels: cfg.in_channels, out_channels: c1, kernel_size: 7, stride: 2, padding: 3 };
        let stem_conv = Conv2d::new(stem, vb.pp("0").pp("0"))?;
        let stem_bn = BatchNorm::new(c1, vb.pp("0").pp("1"))?;
        let widths = [(c1, c1), (c1, c2), (c2, c3), (c3, c4)];
        let stages = widths
            .iter()
            .zip(cfg.depth.blocks_per_stage())
            .enumerate()
            .map(|(i, (&(in_channels, out_channels), num_residuals))| {
                let stage =
                    StageConfig { in_channels, out_channels, num_residuals, downsample: i > 0, kind: cfg.block };
                Stage::new(stage, vb.pp(i + 1))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_bn = match cfg.block {
            BlockKind::PostActivation => None,
            BlockKind::PreActivation => Some(BatchNorm::new(c4, vb.pp("final_bn"))?),
        };
        let fc = candle_nn::linear(c4, cfg.num_classes, vb.pp("7"))?;
        Ok(Self {
            cfg: cfg.clone(),
            stem_conv,
            stem_bn,
            pool: MaxPool2d::d2l_stem(),
            stages,
            final_bn,
            fc,
            compute_dtype: None,
            conv_algorithm: ConvAlgorithm::default(),
            gpu_ops: GpuOps::default(),
        })
    }

    /// Chooses how every convolution is computed from now on (for example after loading or
    /// resuming). The weights and the results (to float rounding) do not depend on it.
    pub fn set_conv_algorithm(&mut self, algorithm: ConvAlgorithm) {
        self.stem_conv.set_algorithm(algorithm);
        for s in &mut self.stages {
            s.set_conv_algorithm(algorithm);
        }
        self.conv_algorithm = algorithm;
    }

    /// Chooses the kernels convolutions, training-mode BatchNorms and the stem's max-pool use on
    /// a CUDA device from now on; the CPU ignores it. Results agree to float rounding.
    pub fn set_gpu_ops(&mut self, ops: GpuOps) {
        self.stem_conv.set_gpu_ops(ops);
        self.stem_bn.set_gpu_ops(ops);
        for s in &mut self.stages {
            s.set_gpu_ops(ops);
        }
        if let Some(bn) = &mut self.final_bn {
            bn.set_gpu_ops(ops);
        }
        self.gpu_ops = ops;
    }

    /// The kernels set by [`ResNet::set_gpu_ops`].
    pub fn gpu_ops(&self) -> GpuOps {
        self.gpu_ops
    }

    /// The algorithm set by [`ResNet::set_conv_algorithm`].
    pub fn conv_algorithm(&self) -> ConvAlgorithm {
        self.conv_algorithm
    }

    /// Runs the convolutions, pooling and residual adds in `dtype` (bf16 or f16 for mixed
    /// precision) while the parameters stay in their own dtype (f32 master weights, which receive
    /// f32 gradients through the casts). BatchNorm statistics and the classifier stay in f32, and
    /// logits come out in the parameters' dtype. `None` computes in the input's dtype.
    pub fn set_compute_dtype(&mut self, dtype: Option<DType>) -> Result<()> {
        if let Some(d) = dtype {
            if !d.is_float() {
                return Err(CoreError::InvalidConfig(format!("compute dtype must be a float type, got {d:?}")));
            }
        }
        self.compute_dtype = dtype;
        Ok(())
    }

    /// The dtype set by [`ResNet::set_compute_dtype`].
    pub fn compute_dtype(&self) -> Option<DType> {
        self.compute_dtype
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Evaluation-mode logits without a backward graph, as PyTorch's `model.eval()` under
    /// `torch.no_grad()`: the same values as `forward_t(xs, false)`, but every block's output is
    /// detached, so a block's activations are freed once the next block has read them instead of
    /// staying alive (held by the graph that the parameters start) until the logits are dropped.
    /// For prediction and evaluation; use [`ModuleT::forward_t`] where gradients are wanted.
    ///
    /// # Shapes
    /// - `xs`: `(batch, in_channels, height, width)`
    /// - returns `(batch, num_classes)`
    pub fn infer(&self, xs: &Tensor) -> Result<Tensor> {
        Self::stage_shapes(&self.cfg, xs.dims())?;
        let mut ys = to_channels_last(&xs.detach())?;
        if let Some(dtype) = self.compute_dtype {
            ys = ys.to_dtype(dtype)?;
        }
        ys = match conv_bn_pool_inference(&self.stem_conv, &self.stem_bn, self.pool, &ys)? {
            Some(pooled) => pooled,
            None => self.run_stage(0, &ys, false)?.detach(),
        };
        for stage in &self.stages {
            for block in stage.blocks() {
                ys = block.infer_channels_last(&ys)?.detach();
            }
        }
        Ok(self.head(&ys, false)?.detach())
    }

    /// Runs the network stage by stage and reports each top-level layer's output shape, as the
    /// seed's `for layer in net: X = layer(X); print(...)` loop does. Uses evaluation mode.
    pub fn trace(&self, xs: &Tensor) -> Result<Vec<StageShape>> {
        Self::stage_shapes(&self.cfg, xs.dims())?;
        let mut out = Vec::new();
        let mut ys = to_channels_last(xs)?;
        for stage in 0..5 {
            ys = self.run_stage(stage, &ys, false)?;
            let (b, h, w, c) = ys.dims4()?;
            out.push(StageShape { name: stage_name(stage), torch_class: "Sequential", shape: vec![b, c, h, w] });
        }
        let ys = match &self.final_bn {
            Some(bn) => bn.forward_relu_t(&ys, false)?,
            None => ys,
        };
        let pooled = global_avg_pool(&ys)?;
        let (b, c) = pooled.dims2()?;
        out.push(StageShape { name: "avgpool", torch_class: "AdaptiveAvgPool2d", shape: vec![b, c, 1, 1] });
        out.push(StageShape { name: "flatten", torch_class: "Flatten", shape: vec![b, c] });
        let logits = self.fc.forward(&pooled)?;
        out.push(StageShape { name: "linear", torch_class: "Linear", shape: logits.dims().to_vec() });
        Ok(out)
    }

    /// The output shape of every top-level layer for an input of `input` = `(batch, channels,
    /// height, width)`, without running anything; an input that does not fit is an error naming
    /// the stage where it stops fitting.
    pub fn stage_shapes(cfg: &ResNetConfig, input: &[usize]) -> Result<Vec<StageShape>> {
        let shape_err = |stage: &str, reason: String| CoreError::InputShape {
            input: input.to_vec(),
            stage: stage.to_string(),
            reason,
        };
        let &[b, c, h, w] = input else {
            return Err(shape_err("input", "expected 4 dimensions (batch, channels, height, width)".into()));
        };
        if b == 0 {
            return Err(shape_err("input", "the batch is empty".into()));
        }
        if c != cfg.in_channels {
            return Err(shape_err("b1", format!("the model takes {} input channel(s), got {c}", cfg.in_channels)));
        }
        let step = |stage: &str, what: &str, (h, w): (usize, usize), k, s, p| match (
            Window::out_len(h, k, s, p),
            Window::out_len(w, k, s, p),
        ) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => Err(shape_err(stage, format!("{what} ({k}x{k}, stride {s}, padding {p}) does not fit {h}x{w}"))),
        };
        let chans = cfg.stage_channels();
        let mut hw = step("b1", "the 7x7 stem convolution", (h, w), 7, 2, 3)?;
        hw = step("b1", "the 3x3 max-pool", hw, 3, 2, 1)?;
        let mut out = vec![StageShape { name: "b1", torch_class: "Sequential", shape: vec![b, chans[0], hw.0, hw.1] }];
        for (i, name) in STAGE_NAMES.iter().enumerate() {
            if i > 0 {
                hw = step(name, "the stride-2 3x3 convolution", hw, 3, 2, 1)?;
            }
            out.push(StageShape { name, torch_class: "Sequential", shape: vec![b, chans[i], hw.0, hw.1] });
        }
        out.push(StageShape { name: "avgpool", torch_class: "AdaptiveAvgPool2d", shape: vec![b, chans[3], 1, 1] });
        out.push(StageShape { name: "flatten", torch_class: "Flatten", shape: vec![b, chans[3]] });
        out.push(StageShape { name: "linear", torch_class: "Linear", shape: vec![b, cfg.num_classes] });
        Ok(out)
    }

    /// Floating-point operations (2 × multiply-accumulates of every convolution and the linear
    /// layer) of one forward pass of one `height × width` example; a training step is about 3×.
    pub fn forward_flops(cfg: &ResNetConfig, height: usize, width: usize) -> Result<u64> {
        let shapes = Self::stage_shapes(cfg, &[1, cfg.in_channels, height, width])?;
        let hw = |i: usize| (shapes[i].shape[2] * shapes[i].shape[3]) as u64;
        let [c1, ..] = cfg.stage_channels();
        // The stem convolution's output is twice the pooled side (before the stride-2 pool).
        let stem_hw =
            (Window::out_len(height, 7, 2, 3).unwrap_or(0) * Window::out_len(width, 7, 2, 3).unwrap_or(0)) as u64;
        let mut macs = stem_hw * (49 * cfg.in_channels * c1) as u64;
        let chans = cfg.stage_channels();
        for (stage, &blocks) in cfg.depth.blocks_per_stage().iter().enumerate() {
            let out_hw = hw(stage + 1);
            let cout = chans[stage] as u64;
            let cin = if stage == 0 { chans[0] } else { chans[stage - 1] } as u64;
            for b in 0..blocks {
                let first_in = if b == 0 { cin } else { cout };
                macs += out_hw * 9 * first_in * cout + out_hw * 9 * cout * cout;
                if b == 0 && first_in != cout {
                    macs += out_hw * first_in * cout;
                }
            }
        }
        macs += (chans[3] * cfg.num_classes) as u64;
        Ok(2 * macs)
    }

    /// Every tensor with its d2l `state_dict` name, parameters and buffers, in a stable order.
    pub fn named_tensors(&self) -> Vec<NamedTensor> {
        let mut out = Vec::new();
        self.stem_conv.collect_tensors("0.0", &mut out);
        self.stem_bn.collect_tensors("0.1", &mut out);
        for (i, s) in self.stages.iter().enumerate() {
            s.collect_tensors(&(i + 1).to_string(), &mut out);
        }
        if let Some(bn) = &self.final_bn {
            bn.collect_tensors("final_bn", &mut out);
        }
        self.fc.collect_tensors("7", &mut out);
        out
    }

    /// The trainable parameters, in the order of [`Self::named_tensors`].
    pub fn parameters(&self) -> Vec<NamedTensor> {
        self.named_tensors().into_iter().filter(|t| t.role == TensorRole::Parameter).collect()
    }

    /// Number of trainable scalars (11,178,378 for d2l's ResNet-18).
    pub fn num_parameters(&self) -> usize {
        self.parameters().iter().map(|t| t.tensor.elem_count()).sum()
    }

    fn run_stage(&self, stage: usize, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if stage == 0 {
            return conv_bn_pool(&self.stem_conv, &self.stem_bn, self.pool, xs, train, self.gpu_ops);
        }
        self.stages[stage - 1].forward_channels_last(xs, train)
    }

    fn head(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.classify(&self.final_activation(xs, train)?)
    }

    /// The pre-activation network's last BatchNorm and ReLU; the features as they are otherwise.
    fn final_activation(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.final_bn {
            Some(bn) => bn.forward_relu_t(xs, train),
            None => Ok(xs.clone()),
        }
    }

    /// Pooling and the classifier, in the parameters' precision.
    fn classify(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        let xs = features.to_dtype(self.fc.weight().dtype())?;
        self.fc.forward(&global_avg_pool(&xs)?)
    }

    /// Training-mode logits, the same values as `forward_t(xs, true)` (BatchNorm's batch
    /// statistics, running statistics updated), whose backward is the network's own instead of
    /// candle's: every layer up to the pooling runs as a recorded op, and the gradients come
    /// from the ops' backwards in reverse order, kept as each op returns them instead of each
    /// starting as a zero tensor that candle's backprop adds to, and each op's saved tensors
    /// released as soon as its backward has run. The gradients are the same as candle's.
    ///
    /// Get them with [`crate::backward`]: `loss.backward()` on a loss built from these logits is
    /// an error that says so. Where the recording does not apply (another device than the CPU,
    /// a compute dtype or input dtype other than the parameters' f32 or f64,
    /// [`ConvAlgorithm::Candle`], parameters that are not variables) this is
    /// `forward_t(xs, true)`, whose gradients both give.
    ///
    /// ```
    /// # fn main() -> candle_core::Result<()> {
    /// use candle_core::{DType, Device, Tensor};
    /// use candle_nn::{loss, VarBuilder, VarMap};
    /// use resnet_core::{ResNet, ResNetConfig};
    ///
    /// let vars = VarMap::new();
    /// let cfg = ResNetConfig { base_width: 4, ..ResNetConfig::d2l_resnet18() };
    /// let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))
    ///     .map_err(candle_core::Error::wrap)?;
    /// let xs = Tensor::rand(0f32, 1., (2, 1, 28, 28), &Device::Cpu)?;
    /// let ys = Tensor::new(&[3u32, 7], &Device::Cpu)?;
    /// let loss = loss::cross_entropy(&model.forward_train(&xs)?, &ys)?;
    /// let grads = resnet_core::backward(&loss)?;
    /// assert!(model.parameters().iter().all(|p| grads.get(&p.tensor).is_some()));
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Shapes
    /// - `xs`: `(batch, in_channels, height, width)`
    /// - returns `(batch, num_classes)`
    pub fn forward_train(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if !self.records(xs) {
            return self.forward_t(xs, true);
        }
        Self::stage_shapes(&self.cfg, xs.dims()).map_err(candle_core::Error::wrap)?;
        let images = to_channels_last(xs)?;
        let features = tape::record(self.stem_conv.weight(), || {
            let mut ys = images;
            for stage in 0..5 {
                ys = self.run_stage(stage, &ys, true)?;
            }
            self.final_activation(&ys, true)
        })?;
        self.classify(&features)
    }

    /// Whether [`Self::forward_train`] records its ops for `xs`.
    fn records(&self, xs: &Tensor) -> bool {
        let dtype = self.fc.weight().dtype();
        xs.device().is_cpu()
            && matches!(dtype, DType::F32 | DType::F64)
            && xs.dtype() == dtype
            && self.compute_dtype.is_none()
            && matches!(self.conv_algorithm, ConvAlgorithm::Im2col | ConvAlgorithm::Winograd)
            && self.parameters().iter().all(|p| p.tensor.is_variable() && p.tensor.dtype() == dtype)
    }
}

impl ModuleT for ResNet {
    /// Logits for a batch; `train` selects BatchNorm's batch statistics (and updates the running
    /// ones). An input that does not fit the network is an error naming the stage where it stops
    /// fitting (a [`CoreError::InputShape`] wrapped in candle's error).
    ///
    /// # Shapes
    /// - `xs`: `(batch, in_channels, height, width)`
    /// - returns `(batch, num_classes)`
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Self::stage_shapes(&self.cfg, xs.dims()).map_err(candle_core::Error::wrap)?;
        let mut ys = to_channels_last(xs)?;
        if let Some(dtype) = self.compute_dtype {
            ys = ys.to_dtype(dtype)?;
        }
        for stage in 0..5 {
            ys = self.run_stage(stage, &ys, train)?;
        }
        self.head(&ys, train)
    }
}

fn stage_name(stage: usize) -> &'static str {
    ["b1", "b2", "b3", "b4", "b5"][stage]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Depth;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn build(cfg: &ResNetConfig) -> Result<ResNet> {
        let map = VarMap::new();
        ResNet::new(cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))
    }

    #[test]
    fn d2l_resnet18_has_the_books_parameter_count() -> Result<()> {
        assert_eq!(build(&ResNetConfig::d2l_resnet18())?.num_parameters(), 11_178_378);
        Ok(())
    }

    /// `infer` gives exactly `forward_t(…, false)`'s logits, for both block orderings, and no
    /// graph: its logits carry none, and a loss built on them has no parameter gradients.
    #[test]
    fn inference_matches_evaluation_mode_without_a_graph() -> Result<()> {
        for block in [BlockKind::PostActivation, BlockKind::PreActivation] {
            let cfg = ResNetConfig { block, ..ResNetConfig::d2l_resnet18() };
            let model = build(&cfg)?;
            let xs = Tensor::randn(0f32, 1., (2, 1, 28, 28), &Device::Cpu)?;
            let eval = model.forward_t(&xs, false)?;
            let infer = model.infer(&xs)?;
            assert!(eval.track_op(), "the evaluation-mode forward should build a graph");
            assert!(!infer.track_op(), "infer's logits carry a graph");
            let (a, b): (Vec<f32>, Vec<f32>) = (eval.flatten_all()?.to_vec1()?, infer.flatten_all()?.to_vec1()?);
            assert_eq!(a, b, "{block:?}");
            let grads = infer.sqr()?.sum_all()?.backward()?;
            for p in model.parameters() {
                assert!(grads.get(&p.tensor).is_none(), "{} got a gradient through infer", p.name);
            }
        }
        Ok(())
    }

    #[test]
    fn seed_shapes_at_224() -> Result<()> {
        let shapes = ResNet::stage_shapes(&ResNetConfig::d2l_resnet18(), &[1, 1, 224, 224])?;
        let got: Vec<Vec<usize>> = shapes.iter().map(|s| s.shape.clone()).collect();
        let want: Vec<Vec<usize>> = vec![
            vec![1, 64, 56, 56],
            vec![1, 64, 56, 56],
            vec![1, 128, 28, 28],
            vec![1, 256, 14, 14],
            vec![1, 512, 7, 7],
            vec![1, 512, 1, 1],
            vec![1, 512],
            vec![1, 10],
        ];
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn trace_agrees_with_the_computed_shapes_for_every_variant() -> Result<()> {
        for (depth, block, side) in [
            (Depth::R18, BlockKind::PostActivation, 28),
            (Depth::R34, BlockKind::PreActivation, 13),
            (Depth::R18, BlockKind::PreActivation, 1),
        ] {
            let cfg = ResNetConfig { depth, block, base_width: 4, ..ResNetConfig::d2l_resnet18() };
            let net = build(&cfg)?;
            let x = Tensor::randn(0f32, 1., (2, 1, side, side), &Device::Cpu)?;
            assert_eq!(net.trace(&x)?, ResNet::stage_shapes(&cfg, x.dims())?);
            assert_eq!(net.forward_t(&x, true)?.dims(), &[2, 10]);
        }
        Ok(())
    }

    #[test]
    fn forward_flops_match_the_reference_figures() -> Result<()> {
        // REFERENCE.md: 66 M at 28 px, 637 M at 96, 3,470 M at 224.
        let cfg = ResNetConfig::d2l_resnet18();
        for (side, mflops) in [(28, 66), (96, 637), (224, 3470)] {
            let f = ResNet::forward_flops(&cfg, side, side)? as f64 / 1e6;
            assert!((f - mflops as f64).abs() / (mflops as f64) < 0.01, "{side} px: {f} MFLOP vs {mflops}");
        }
        Ok(())
    }

    #[test]
    fn a_bad_input_is_an_error_naming_the_stage() -> Result<()> {
        let cfg = ResNetConfig::d2l_resnet18();
        let err = ResNet::stage_shapes(&cfg, &[1, 3, 96, 96]).expect_err("3 channels");
        assert!(matches!(&err, CoreError::InputShape { stage, .. } if stage == "b1"), "{err}");
        let err = ResNet::stage_shapes(&cfg, &[1, 1, 0, 96]).expect_err("zero height");
        assert!(err.to_string().contains("stem"), "{err}");
        let err = ResNet::stage_shapes(&cfg, &[1, 96, 96]).expect_err("rank 3");
        assert!(err.to_string().contains("4 dimensions"), "{err}");
        Ok(())
    }

    /// Mixed precision: the f16 network (the CPU stand-in for bf16 on CUDA) against the f32
    /// one with the same weights: logits within f16 rounding, f32 gradients on the f32 master
    /// weights that agree in direction, and the portable ops all the way through.
    #[test]
    fn half_precision_compute_tracks_f32_with_f32_gradients() -> Result<()> {
        use crate::init::d2l_init;
        let cfg = ResNetConfig { base_width: 8, ..ResNetConfig::d2l_resnet18() };
        let map = VarMap::new();
        let mut net = ResNet::new(&cfg, VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu))?;
        d2l_init(&net, 3)?;
        // Deterministic, noise-like inputs (candle's CPU generator is not seeded): fractional
        // parts of a golden-ratio sequence.
        let noise = |n: u32, step: f64| -> candle_core::Result<Tensor> {
            let v: Vec<f32> = (0..n).map(|i| ((i as f64 * step).fract()) as f32).collect();
            Tensor::from_vec(v, n as usize, &Device::Cpu)
        };
        let x = noise(4 * 32 * 32, 0.618_033_988_7)?.reshape((4, 1, 32, 32))?;
        // Scaled as loss scaling would: f16 gradients of a unit-scale loss underflow.
        let probe = ((noise(40, 0.754_877_666)? - 0.5)? * 128.0)?.reshape((4, 10))?;
        let full = net.forward_t(&x, true)?;
        let g_full = (&full * &probe)?.sum_all()?.backward()?;
        assert!(net.set_compute_dtype(Some(DType::U8)).is_err(), "an integer compute dtype is refused");
        net.set_compute_dtype(Some(DType::F16))?;
        let half = net.forward_t(&x, true)?;
        assert_eq!(half.dtype(), DType::F32, "logits come out in the parameters' dtype");
        let scale = full.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        let diff = (&half - &full)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        assert!(diff < 0.05, "f16 logits differ from f32 by {diff} (relative to the largest)");
        let g_half = (&half * &probe)?.sum_all()?.backward()?;
        // Over all parameters at once (single tensors with heavy cancellation, like the stem's
        // weight on smooth inputs, are noisier): the f16 gradient points the same way.
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for p in net.parameters() {
            let (name, t) = (&p.name, &p.tensor);
            let (a, b) = (g_full.get(t).expect("f32 grad"), g_half.get(t).expect("f16 grad"));
            assert_eq!(b.dtype(), DType::F32, "{name}: master-weight gradient must be f32");
            // A convolution bias right before BatchNorm has a true gradient of zero (BN removes
            // the mean), so both values are rounding noise: leave those out.
            if name.ends_with(".bias") && (name == "0.0.bias" || name.contains(".conv")) {
                continue;
            }
            dot += (a * b)?.sum_all()?.to_scalar::<f32>()? as f64;
            na += a.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            nb += b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let cos = dot / (na.sqrt() * nb.sqrt());
        // f16 rounding through 17 convolutions and BatchNorm over as few as 4 rows keeps the
        // cosine below 1; a gradient that missed a layer or a cast would be far below 0.9.
        assert!(cos > 0.9, "f16 gradient cosine {cos} against f32");
        Ok(())
    }
}
