//! `--device auto|cpu|cuda[:N]` to a candle device, saying which one was picked.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// Parses and opens the requested device.
pub fn select(spec: &str) -> Result<Device> {
    let spec = spec.trim().to_ascii_lowercase();
    match spec.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" => {
            if candle_core::utils::cuda_is_available() {
                match Device::new_cuda(0) {
                    Ok(d) => {
                        tracing::info!("--device auto: using cuda:0");
                        return Ok(d);
                    }
                    Err(e) => tracing::warn!("--device auto: CUDA build but no usable GPU ({e}); using the CPU"),
                }
            }
            tracing::info!("--device auto: using the CPU");
            Ok(Device::Cpu)
        }
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = match s.strip_prefix("cuda:") {
                None => 0,
                Some(n) => n.parse().with_context(|| format!("--device {s}: `{n}` is not a GPU number"))?,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this binary was built without CUDA; rebuild with `--features cuda` \
                     (see README, \"GPU\") or use --device cpu"
                );
            }
            Device::new_cuda(ordinal)
                .with_context(|| format!("--device {s}: no such GPU, or the CUDA driver is unusable"))
        }
        other => bail!("--device {other}: expected auto, cpu, cuda or cuda:N"),
    }
}

/// d2l's device label for the `examples/sec on ...` line.
pub fn label(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}
