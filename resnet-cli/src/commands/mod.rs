//! One module per subcommand.

pub mod completions;
pub mod eval;
pub mod predict;
pub mod report;
pub mod summary;
pub mod train;

/// How a command ended without error.
pub enum Outcome {
    /// Finished.
    Done,
    /// Stopped by Ctrl-C after writing a checkpoint.
    Interrupted,
}

/// `--depth/--variant/--width` applied to a model configuration.
pub fn apply_model_args(cfg: &mut resnet_core::ResNetConfig, m: &crate::args::ModelArgs) -> anyhow::Result<()> {
    use crate::args::VariantArg;
    if let Some(d) = &m.depth {
        let layers: usize = d.parse()?;
        cfg.depth =
            resnet_core::Depth::from_layers(layers).ok_or_else(|| anyhow::anyhow!("--depth {d}: expected 18 or 34"))?;
    }
    if let Some(v) = m.variant {
        cfg.block = match v {
            VariantArg::Post => resnet_core::BlockKind::PostActivation,
            VariantArg::Pre => resnet_core::BlockKind::PreActivation,
        };
    }
    if let Some(w) = m.width {
        cfg.base_width = w as usize;
    }
    Ok(())
}
