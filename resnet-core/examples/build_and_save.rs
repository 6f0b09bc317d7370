//! Using resnet-core as a dependency: build d2l's ResNet-18, run a batch, save it, and load it
//! back the way another crate would.
//!
//! Run with `cargo run --release -p resnet-core --example build_and_save`.
#![allow(clippy::print_stdout)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::{checkpoint, d2l_init, ResNet, ResNetConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Device::Cpu;
    let cfg = ResNetConfig::d2l_resnet18();
    let vars = VarMap::new();
    let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &device))?;
    d2l_init(&model, 42)?;
    println!("ResNet-18: {} trainable parameters", model.num_parameters());

    // Four 96×96 grey images, as d2l's loader produces them: (batch, channels, height, width).
    let xs = Tensor::rand(0f32, 1., (4, 1, 96, 96), &device)?;
    // Evaluation mode without a backward graph (PyTorch: `net.eval()` under `torch.no_grad()`).
    let logits = model.infer(&xs)?;
    println!("logits {:?}", logits.dims());

    let path = std::env::temp_dir().join("resnet18-example.safetensors");
    checkpoint::save(&model, &path)?;

    // Another program: read the architecture from the file, build it, load the weights.
    let cfg2 = checkpoint::read_config(&path)?;
    let vars2 = VarMap::new();
    let reloaded = ResNet::new(&cfg2, VarBuilder::from_varmap(&vars2, DType::F32, &device))?;
    checkpoint::load_into(&reloaded, &path)?;
    let diff = (reloaded.infer(&xs)? - &logits)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!("saved to {} and reloaded; max logit difference {diff}", path.display());
    std::fs::remove_file(&path)?;
    Ok(())
}
