//! `resnet-cli summary`: the seed's per-stage shape table and the parameter count.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use resnet_core::{ResNet, ResNetConfig};

use super::Outcome;
use crate::args::SummaryArgs;
use crate::model_size::parameter_count;

const GIB: u128 = 1 << 30;
/// Above this, `summary` computes the shapes instead of running the network on them.
const TRACE_BUDGET_BYTES: u128 = 2 * GIB;

/// Runs the command.
pub fn run(a: SummaryArgs) -> Result<Outcome> {
    if !(1..=512).contains(&a.resize) {
        bail!("--resize {}: must be between 1 and 512", a.resize);
    }
    if !(1..=64).contains(&a.batch) {
        bail!("--batch {}: must be between 1 and 64", a.batch);
    }
    let mut cfg = ResNetConfig::d2l_resnet18();
    a.model.apply(&mut cfg);
    let input = [a.batch, cfg.in_channels, a.resize, a.resize];
    let expected = ResNet::stage_shapes(&cfg, &input)?;
    let params = parameter_count(&cfg);
    // Parameters plus a few activations of the largest stage: what tracing the network costs.
    let activations: u128 = expected.iter().map(|s| s.shape.iter().product::<usize>() as u128).sum();
    let bytes = 4 * (params + 4 * activations);
    println!("ResNet-{} ({:?}, width {}), input {}", cfg.depth.layers(), cfg.block, cfg.base_width, fmt_shape(&input));
    let shapes = if bytes <= TRACE_BUDGET_BYTES {
        let vars = VarMap::new();
        let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
        // Run the real network, as the seed's loop does, and check it against the computed shapes.
        let traced = model.trace(&Tensor::zeros(&input, DType::F32, &Device::Cpu)?)?;
        if traced != expected {
            bail!("internal error: traced shapes {traced:?} differ from computed {expected:?}");
        }
        if model.num_parameters() as u128 != params {
            bail!("internal error: the model has {} parameters, {params} computed", model.num_parameters());
        }
        traced
    } else {
        eprintln!(
            "computed without running the network: tracing it would take about {:.1} GiB (more than {} GiB)",
            bytes as f64 / GIB as f64,
            TRACE_BUDGET_BYTES / GIB
        );
        expected
    };
    for s in &shapes {
        println!("{:<18} output shape:\t{}", s.torch_class, fmt_shape(&s.shape));
    }
    println!("Trainable parameters: {}", with_commas(params));
    Ok(Outcome::Done)
}

fn fmt_shape(s: &[usize]) -> String {
    format!("({})", s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "))
}

fn with_commas(n: u128) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
