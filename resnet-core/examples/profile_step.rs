#![allow(clippy::print_stdout)]
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::{d2l_init, ConvKernel, ResNet, ResNetConfig};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let side: usize = args.get(1).map(|s| s.parse().unwrap()).unwrap_or(28);
    let batch: usize = args.get(2).map(|s| s.parse().unwrap()).unwrap_or(256);
    let kernel = if args.get(3).map(|s| s == "candle").unwrap_or(false) { ConvKernel::Candle } else { ConvKernel::Im2col };
    let steps: usize = args.get(4).map(|s| s.parse().unwrap()).unwrap_or(3);
    let dev = Device::Cpu;
    let cfg = ResNetConfig { conv_kernel: kernel, ..ResNetConfig::d2l_resnet18() };
    let vars = VarMap::new();
    let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
    d2l_init(&model, 0)?;
    let params: Vec<Var> = model.parameters().iter().map(|p| Var::from_tensor(&p.tensor).unwrap()).collect();
    let xs = Tensor::rand(0f32, 1., (batch, 1, side, side), &dev)?;
    let ys = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &dev)?;
    for i in 0..steps + 1 {
        let t0 = Instant::now();
        let logits = model.forward_t(&xs, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &ys)?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        for p in &params {
            if let Some(g) = grads.get(p.as_tensor()) {
                p.set(&(p.as_tensor() - (g * 0.05)?)?)?;
            }
        }
        let _ = logits.argmax(D::Minus1)?;
        let t3 = Instant::now();
        let tot = (t3 - t0).as_secs_f64();
        println!("step {i}: fwd {:.3}s bwd {:.3}s upd {:.3}s total {:.3}s => {:.1} ex/s loss {:.4}",
            (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64(), tot, batch as f64 / tot, loss.to_scalar::<f32>()?);
    }
    let t0 = Instant::now();
    let _ = model.forward_t(&xs, false)?.argmax(D::Minus1)?.to_vec1::<u32>()?;
    println!("eval: {:.1} ex/s", batch as f64 / t0.elapsed().as_secs_f64());
    Ok(())
}
