//! Typed, serde-serialisable model configuration with the d2l presets.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// How deep the network is: the number of residual blocks per stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Depth {
    /// ResNet-18: 2, 2, 2, 2 residuals per stage (the d2l model).
    #[serde(rename = "18")]
    R18,
    /// ResNet-34: 3, 4, 6, 3 residuals per stage.
    #[serde(rename = "34")]
    R34,
}

impl Depth {
    /// Residual blocks in each of the four stages b2..b5.
    pub fn blocks_per_stage(self) -> [usize; 4] {
        match self {
            Depth::R18 => [2, 2, 2, 2],
            Depth::R34 => [3, 4, 6, 3],
        }
    }

    /// Parses "18" or "34".
    pub fn from_layers(layers: usize) -> Option<Self> {
        match layers {
            18 => Some(Depth::R18),
            34 => Some(Depth::R34),
            _ => None,
        }
    }

    /// The conventional layer count (18 or 34).
    pub fn layers(self) -> usize {
        match self {
            Depth::R18 => 18,
            Depth::R34 => 34,
        }
    }
}

/// Where BatchNorm and ReLU sit inside a residual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockKind {
    /// d2l's block: conv → BN → ReLU → conv → BN, then relu(Y + X).
    PostActivation,
    /// He et al. 2016's pre-activation block: BN → ReLU → conv → BN → ReLU → conv, then Y + X;
    /// the network adds a final BN → ReLU before pooling.
    PreActivation,
}

/// A ResNet's architecture. Structural fields are required; `base_width` and `block` default to d2l.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    /// Channels of the input images (1 for Fashion-MNIST).
    pub in_channels: usize,
    /// Number of output classes (10 for Fashion-MNIST).
    pub num_classes: usize,
    /// Residual blocks per stage.
    pub depth: Depth,
    /// Channels of the stem and the first stage; later stages use 2×, 4× and 8× this. d2l: 64.
    #[serde(default = "default_base_width")]
    pub base_width: usize,
    /// The residual block variant.
    #[serde(default = "default_block")]
    pub block: BlockKind,
}

fn default_base_width() -> usize {
    64
}

fn default_block() -> BlockKind {
    BlockKind::PostActivation
}

impl ResNetConfig {
    /// d2l's ResNet-18 for Fashion-MNIST: 1 input channel, 10 classes, width 64, post-activation blocks.
    pub fn d2l_resnet18() -> Self {
        Self { in_channels: 1, num_classes: 10, depth: Depth::R18, base_width: 64, block: BlockKind::PostActivation }
    }

    /// ResNet-34 with d2l's stem and blocks.
    pub fn resnet34() -> Self {
        Self { depth: Depth::R34, ..Self::d2l_resnet18() }
    }

    /// Checks every field; call before building a model from untrusted input.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidConfig(m));
        if self.in_channels == 0 || self.in_channels > 4096 {
            return bad(format!("in_channels must be in 1..=4096, got {}", self.in_channels));
        }
        if self.num_classes < 2 || self.num_classes > 1_000_000 {
            return bad(format!("num_classes must be in 2..=1000000, got {}", self.num_classes));
        }
        if self.base_width == 0 || self.base_width > 1024 {
            return bad(format!("base_width must be in 1..=1024, got {}", self.base_width));
        }
        Ok(())
    }

    /// Output channels of the stem and the four stages b2..b5.
    pub fn stage_channels(&self) -> [usize; 4] {
        let w = self.base_width;
        [w, 2 * w, 4 * w, 8 * w]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_round_trip_and_defaults() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let cfg = ResNetConfig::resnet34();
        let json = serde_json::to_string(&cfg)?;
        assert!(json.contains("\"depth\":\"34\""), "{json}");
        let back: ResNetConfig = serde_json::from_str(&json)?;
        assert_eq!(back, cfg);
        let minimal: ResNetConfig = serde_json::from_str(r#"{"in_channels":1,"num_classes":10,"depth":"18"}"#)?;
        assert_eq!(minimal, ResNetConfig::d2l_resnet18());
        Ok(())
    }

    #[test]
    fn validate_rejects_nonsense() {
        let mut cfg = ResNetConfig::d2l_resnet18();
        assert!(cfg.validate().is_ok());
        cfg.num_classes = 1;
        assert!(matches!(cfg.validate(), Err(CoreError::InvalidConfig(m)) if m.contains("num_classes")));
        let mut cfg = ResNetConfig::d2l_resnet18();
        cfg.base_width = 0;
        assert!(cfg.validate().is_err());
    }
}
