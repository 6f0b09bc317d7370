//! Using resnet-core as a dependency: build d2l's ResNet-18, train it for one step, save it, and
//! load it back the way another program would, checking that the reloaded model is the trained one.
//!
//! Run with `cargo run --release -p resnet-core --example build_and_save`.
#![allow(clippy::print_stdout)]

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{loss, ModuleT, Optimizer, VarBuilder, VarMap, SGD};
use resnet_core::{checkpoint, d2l_init, ResNet, ResNetConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let cfg = ResNetConfig::d2l_resnet18();
    let vars = VarMap::new();
    let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &device))?;
    d2l_init(&model, 42)?;
    println!("ResNet-18: {} trainable parameters", model.num_parameters());

    // A batch of four 28×28 grey images, as Fashion-MNIST's are: (batch, channels, height, width).
    let xs = Tensor::rand(0f32, 1., (4, 1, 28, 28), &device)?;
    let labels = Tensor::new(&[0u32, 3, 7, 9], &device)?;

    // One step of d2l's plain SGD (lr 0.05) on the trainable parameters; BatchNorm's running
    // statistics are buffers, updated by the training-mode forward itself.
    let params = model.parameters().iter().map(|p| Var::from_tensor(&p.tensor)).collect::<Result<Vec<_>, _>>()?;
    let mut sgd = SGD::new(params, 0.05)?;
    let loss = loss::cross_entropy(&model.forward_t(&xs, true)?, &labels)?;
    sgd.backward_step(&loss)?;
    println!("one SGD step at loss {:.4}", loss.to_scalar::<f32>()?);

    // Evaluation mode without a backward graph (PyTorch: `net.eval()` under `torch.no_grad()`).
    let logits = model.infer(&xs)?;
    let path = std::env::temp_dir().join(format!("resnet18-example-{}.safetensors", std::process::id()));
    checkpoint::save(&model, &path)?;

    // Another program: read the architecture from the file, build it, load the weights.
    let cfg2 = checkpoint::read_config(&path)?;
    let vars2 = VarMap::new();
    let reloaded = ResNet::new(&cfg2, VarBuilder::from_varmap(&vars2, DType::F32, &device))?;
    checkpoint::load_into(&reloaded, &path)?;
    std::fs::remove_file(&path)?;
    let diff = (reloaded.infer(&xs)? - &logits)?.abs()?.max_all()?.to_scalar::<f32>()?;
    if diff != 0.0 {
        return Err(format!("the reloaded model's logits differ from the trained model's by {diff}").into());
    }
    println!("saved to {} and reloaded: identical logits {:?}", path.display(), logits.dims());
    Ok(())
}
