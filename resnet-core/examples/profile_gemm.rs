#![allow(clippy::print_stdout)]
use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    for &(m, k, n, ta) in &[(2048usize, 2048usize, 2048usize, false), (12544, 576, 64, false), (64, 12544, 576, true), (50176, 49, 64, false), (64, 50176, 49, true), (73728, 576, 64, false), (256, 4608, 512, false)] {
        let a = if ta { Tensor::randn(0f32, 1., (k, m), &dev)?.t()? } else { Tensor::randn(0f32, 1., (m, k), &dev)? };
        let b = Tensor::randn(0f32, 1., (k, n), &dev)?;
        let _ = a.matmul(&b)?;
        let t = Instant::now();
        for _ in 0..5 { let _ = a.matmul(&b)?; }
        let dt = t.elapsed().as_secs_f64() / 5.0;
        println!("{m}x{k} @ {k}x{n} (lhs transposed: {ta}): {:.2} ms, {:.0} GFLOP/s", dt * 1e3, 2.0 * (m * k * n) as f64 / dt / 1e9);
    }
    Ok(())
}
