#![allow(clippy::print_stdout)]
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::{ops::{Conv2d, Conv2dConfig}, ConvKernel};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    // (batch, side, cin, cout, k, stride, pad)
    for &(b, side, cin, cout, k, s, p) in &[(256usize, 7usize, 64usize, 64usize, 3usize, 1usize, 1usize), (256, 4, 128, 128, 3, 1, 1), (256, 1, 512, 512, 3, 1, 1), (256, 28, 1, 64, 7, 2, 3), (128, 24, 64, 64, 3, 1, 1)] {
        let map = VarMap::new();
        let conv = Conv2d::new(Conv2dConfig { in_channels: cin, out_channels: cout, kernel: k, stride: s, padding: p }, ConvKernel::Im2col, VarBuilder::from_varmap(&map, DType::F32, &dev))?;
        let x = Var::randn(0f32, 1., (b, side, side, cin), &dev)?;
        let y = conv.forward(x.as_tensor())?;
        let probe = Tensor::randn(0f32, 1., y.shape(), &dev)?;
        let (_, oh, ow, _) = y.dims4()?;
        let flops = 2.0 * (b * oh * ow * cout * k * k * cin) as f64;
        let mut tf = 0.0; let mut tb = 0.0;
        for _ in 0..3 {
            let t = Instant::now();
            let y = conv.forward(x.as_tensor())?;
            tf += t.elapsed().as_secs_f64();
            let l = (y * &probe)?.sum_all()?;
            let t = Instant::now();
            let _g = l.backward()?;
            tb += t.elapsed().as_secs_f64();
        }
        println!("b{b} {side}px {cin}->{cout} k{k}: fwd {:.1} ms ({:.0} GF/s)  bwd {:.1} ms ({:.0} GF/s for 2x)", tf/3.0*1e3, flops/(tf/3.0)/1e9, tb/3.0*1e3, 2.0*flops/(tb/3.0)/1e9);
    }
    Ok(())
}
