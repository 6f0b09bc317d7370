//! A model's size from its configuration alone, so commands can refuse or skip work that would
//! not fit in memory before allocating anything.

use resnet_core::{BlockKind, ResNetConfig};

/// Trainable parameters of the network `cfg` describes (BatchNorm running statistics excluded),
/// counted from d2l's layer list: the 7×7 stem convolution and its BatchNorm, the four stages
/// of residual blocks, the pre-activation variant's final BatchNorm, and the classifier.
pub fn parameter_count(cfg: &ResNetConfig) -> u128 {
    let conv = |cin: u128, cout: u128, k: u128| cin * cout * k * k + cout;
    let bn = |c: u128| 2 * c;
    let [c1, c2, c3, c4] = cfg.stage_channels().map(|c| c as u128);
    let mut total = conv(cfg.in_channels as u128, c1, 7) + bn(c1);
    for (stage, ((cin, cout), n)) in
        [(c1, c1), (c1, c2), (c2, c3), (c3, c4)].into_iter().zip(cfg.depth.blocks_per_stage()).enumerate()
    {
        for i in 0..n {
            let block_in = if i == 0 { cin } else { cout };
            let shortcut = (i == 0 && stage > 0) || block_in != cout;
            let bn1 = match cfg.block {
                BlockKind::PostActivation => cout,
                BlockKind::PreActivation => block_in,
            };
            total += conv(block_in, cout, 3) + conv(cout, cout, 3) + bn(bn1) + bn(cout);
            if shortcut {
                total += conv(block_in, cout, 1);
            }
        }
    }
    if cfg.block == BlockKind::PreActivation {
        total += bn(c4);
    }
    total + c4 * cfg.num_classes as u128 + cfg.num_classes as u128
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};
    use resnet_core::{Depth, ResNet};

    #[test]
    fn counts_match_built_models() -> anyhow::Result<()> {
        assert_eq!(parameter_count(&ResNetConfig::d2l_resnet18()), 11_178_378, "the d2l chapter's count");
        for depth in [Depth::R18, Depth::R34] {
            for block in [BlockKind::PostActivation, BlockKind::PreActivation] {
                let cfg = ResNetConfig { depth, block, base_width: 4, in_channels: 3, ..ResNetConfig::d2l_resnet18() };
                let vars = VarMap::new();
                let model = ResNet::new(&cfg, VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu))?;
                assert_eq!(parameter_count(&cfg), model.num_parameters() as u128, "{depth:?} {block:?}");
            }
        }
        Ok(())
    }
}
