//! Per-example transforms after resizing: random crop with zero padding, horizontal flip and
//! random erasing (`Augment`), the `ToTensor` byte-to-float conversion, and `Normalize`.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Training-time augmentation of a square `u8` image, as torchvision's
/// `RandomCrop(s, padding=crop_padding)`, then `RandomHorizontalFlip(0.5)`, then (if `erase`)
/// `RandomErasing(p=0.5, scale=(0.02, 0.33), ratio=(0.3, 3.3))` filling with `ERASE_VALUE` (73).
///
/// d2l's Fashion-MNIST ResNet uses none (`Augment::none()`); these are the usual additions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Augment {
    /// Pad by this many zero pixels on every side, then crop back to the original side at a
    /// uniformly random offset. 0 disables cropping.
    pub crop_padding: usize,
    /// Mirror left-right with probability 0.5.
    pub hflip: bool,
    /// Random erasing (Zhong et al. 2020): with probability 0.5, one rectangle of 2–33 % of the
    /// image, aspect ratio 0.3–3.3, is set to `ERASE_VALUE` (73).
    #[serde(default)]
    pub erase: bool,
}

/// The byte random erasing writes: Fashion-MNIST's mean pixel (0.2860 × 255), so an erased
/// patch normalises to about 0, as torchvision's `RandomErasing(value=0)` after `Normalize`.
pub const ERASE_VALUE: u8 = 73;

/// Probability that random erasing erases anything.
const ERASE_PROBABILITY: f64 = 0.5;
/// Range of the erased area as a fraction of the image.
const ERASE_SCALE: (f64, f64) = (0.02, 0.33);
/// Range of the erased rectangle's aspect ratio (height / width), drawn uniformly in log space.
const ERASE_RATIO: (f64, f64) = (0.3, 3.3);
/// Rectangles drawn before giving up when none fits, as torchvision.
const ERASE_ATTEMPTS: usize = 10;

/// Per-channel standardisation `(x - mean) / std`, applied after [`to_tensor_value`], as
/// torchvision's `Normalize`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Subtracted first.
    pub mean: f32,
    /// Divided by next; must be positive.
    pub std: f32,
}

/// torchvision's `ToTensor` for one 8-bit pixel: `p / 255` in `f32`.
pub fn to_tensor_value(p: u8) -> f32 {
    f32::from(p) / 255.0
}

impl Augment {
    /// No augmentation (d2l's setting).
    pub const fn none() -> Self {
        Self { crop_padding: 0, hflip: false, erase: false }
    }

    /// Whether this leaves every image unchanged (and draws no random numbers).
    pub fn is_identity(&self) -> bool {
        self.crop_padding == 0 && !self.hflip && !self.erase
    }

    /// Checks the padding against the side of the images it will see.
    pub fn validate(&self, side: usize) -> Result<()> {
        if self.crop_padding > side {
            return Err(DataError::InvalidConfig(format!(
                "augment.crop_padding ({}) must not exceed the image side ({side})",
                self.crop_padding
            )));
        }
        Ok(())
    }

    /// Writes the augmented `src` into `dst`. Draws, in order: the crop's row offset and column
    /// offset (each uniform in `0..=2 * crop_padding`, only if cropping), then the flip (only if
    /// `hflip`), then the erasing (only if `erase`; see the function `erase`).
    ///
    /// # Shapes
    /// `src`, `dst`: `(side, side)`.
    pub fn apply<R: Rng + ?Sized>(&self, src: &[u8], side: usize, rng: &mut R, dst: &mut [u8]) -> Result<()> {
        let n = side * side;
        for (what, len) in [("augment source", src.len()), ("augment destination", dst.len())] {
            if len != n {
                return Err(DataError::BufferSize { what, expected: n, found: len });
            }
        }
        let p = self.crop_padding;
        if p == 0 {
            dst.copy_from_slice(src);
        } else {
            let top = rng.random_range(0..=2 * p);
            let left = rng.random_range(0..=2 * p);
            crop_padded(src, side, p, top, left, dst);
        }
        if self.hflip && rng.random_bool(0.5) {
            for row in dst.chunks_exact_mut(side) {
                row.reverse();
            }
        }
        if self.erase {
            erase(dst, side, rng);
        }
        Ok(())
    }
}

/// torchvision's `RandomErasing` on a `(side, side)` image: with probability 0.5, up to 10
/// attempts each draw a target area (uniform fraction of the image in 2–33 %) and a log-uniform
/// aspect ratio in 0.3–3.3, round them to a height and width, and take the first rectangle that
/// fits strictly inside the image, at a uniform position; it is filled with [`ERASE_VALUE`]. Draws,
/// in order: the coin; per attempt the area and the log-ratio; then the top and left offsets.
pub fn erase<R: Rng + ?Sized>(img: &mut [u8], side: usize, rng: &mut R) {
    if !rng.random_bool(ERASE_PROBABILITY) {
        return;
    }
    let area = (side * side) as f64;
    let (log_lo, log_hi) = (ERASE_RATIO.0.ln(), ERASE_RATIO.1.ln());
    for _ in 0..ERASE_ATTEMPTS {
        let target = area * rng.random_range(ERASE_SCALE.0..ERASE_SCALE.1);
        let ratio = rng.random_range(log_lo..log_hi).exp();
        let h = (target * ratio).sqrt().round() as usize;
        let w = (target / ratio).sqrt().round() as usize;
        if h == 0 || w == 0 || h >= side || w >= side {
            continue;
        }
        let top = rng.random_range(0..=side - h);
        let left = rng.random_range(0..=side - w);
        for row in img.chunks_exact_mut(side).skip(top).take(h) {
            row[left..left + w].fill(ERASE_VALUE);
        }
        return;
    }
}

impl Default for Augment {
    fn default() -> Self {
        Self::none()
    }
}

impl Normalize {
    /// Fashion-MNIST training-set statistics of `ToTensor` output: mean 0.2860, std 0.3530.
    pub const fn fashion_mnist() -> Self {
        Self { mean: 0.2860, std: 0.3530 }
    }

    /// Checks that both are finite and `std` is positive.
    pub fn validate(&self) -> Result<()> {
        if !self.mean.is_finite() || !self.std.is_finite() || self.std <= 0.0 {
            return Err(DataError::InvalidConfig(format!(
                "normalize needs a finite mean and a finite positive std, found mean {} std {}",
                self.mean, self.std
            )));
        }
        Ok(())
    }

    /// `(x - mean) / std`, in that order of `f32` operations (as torchvision).
    pub fn apply(&self, x: f32) -> f32 {
        (x - self.mean) / self.std
    }
}

/// The final `f32` value of every byte value: `ToTensor`, then `normalize` if given.
pub fn pixel_table(normalize: Option<&Normalize>) -> [f32; 256] {
    std::array::from_fn(|p| {
        let x = to_tensor_value(p as u8);
        normalize.map_or(x, |n| n.apply(x))
    })
}

/// `dst = crop(pad(src, p), top, left)`: pixel `(y, x)` of `dst` is `src[y + top - p][x + left - p]`
/// where that lies inside `src`, else 0. Requires `top, left <= 2 * p`.
fn crop_padded(src: &[u8], side: usize, p: usize, top: usize, left: usize, dst: &mut [u8]) {
    dst.fill(0);
    // Columns of dst that come from src, and where they start in src.
    let (dst_x0, src_x0) = if left >= p { (0, left - p) } else { (p - left, 0) };
    let width = side.saturating_sub(dst_x0.max(src_x0));
    if width == 0 {
        return;
    }
    for (y, row) in dst.chunks_exact_mut(side).enumerate() {
        let Some(sy) = (y + top).checked_sub(p).filter(|&sy| sy < side) else {
            continue;
        };
        let src_row = &src[sy * side..(sy + 1) * side];
        row[dst_x0..dst_x0 + width].copy_from_slice(&src_row[src_x0..src_x0 + width]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The slow, obvious definition: pad into a big image, then crop.
    fn reference_crop(src: &[u8], side: usize, p: usize, top: usize, left: usize) -> Vec<u8> {
        let big = side + 2 * p;
        let mut padded = vec![0u8; big * big];
        for y in 0..side {
            for x in 0..side {
                padded[(y + p) * big + x + p] = src[y * side + x];
            }
        }
        let mut out = Vec::with_capacity(side * side);
        for y in 0..side {
            out.extend_from_slice(&padded[(y + top) * big + left..(y + top) * big + left + side]);
        }
        out
    }

    #[test]
    fn crop_matches_pad_then_crop() {
        let side = 8;
        let src: Vec<u8> = (1..=64).collect();
        for p in [1, 3, 8] {
            for top in 0..=2 * p {
                for left in 0..=2 * p {
                    let mut dst = vec![0xee; side * side];
                    crop_padded(&src, side, p, top, left, &mut dst);
                    assert_eq!(dst, reference_crop(&src, side, p, top, left), "p {p} top {top} left {left}");
                }
            }
        }
    }

    #[test]
    fn identity_augment_copies_and_draws_nothing() -> Result<()> {
        let src: Vec<u8> = (0..64).collect();
        let mut dst = vec![0; 64];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        Augment::none().apply(&src, 8, &mut rng, &mut dst)?;
        assert_eq!(dst, src);
        assert_eq!(rng.random::<u64>(), ChaCha8Rng::seed_from_u64(1).random::<u64>());
        Ok(())
    }

    #[test]
    fn flip_only_mirrors_about_half_the_time() -> Result<()> {
        let src: Vec<u8> = (0..64).collect();
        let mirrored: Vec<u8> = src.chunks(8).flat_map(|r| r.iter().rev().copied()).collect();
        let aug = Augment { hflip: true, ..Augment::none() };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut flips = 0;
        let mut dst = vec![0; 64];
        for _ in 0..1000 {
            aug.apply(&src, 8, &mut rng, &mut dst)?;
            if dst == mirrored {
                flips += 1;
            } else {
                assert_eq!(dst, src);
            }
        }
        assert!((400..600).contains(&flips), "{flips} flips of 1000");
        Ok(())
    }

    #[test]
    fn crop_keeps_pixels_in_order_and_is_seeded() -> Result<()> {
        let src: Vec<u8> = (1..=64).collect();
        let aug = Augment { crop_padding: 2, hflip: true, erase: false };
        let (mut a, mut b) = (vec![0; 64], vec![0; 64]);
        aug.apply(&src, 8, &mut ChaCha8Rng::seed_from_u64(9), &mut a)?;
        aug.apply(&src, 8, &mut ChaCha8Rng::seed_from_u64(9), &mut b)?;
        assert_eq!(a, b);
        // Every non-zero output pixel is a source pixel; at least (8 - 4)^2 survive any shift.
        assert!(a.iter().filter(|&&p| p != 0).count() >= 16);
        Ok(())
    }

    /// Every erased image differs from its source in exactly one axis-aligned rectangle of
    /// ERASE_VALUE whose area and aspect ratio lie in the drawn ranges (after rounding), about
    /// half of the images are erased, and the result is a function of the seed.
    #[test]
    fn erasing_fills_one_rectangle_in_range_half_the_time() -> Result<()> {
        let side = 28;
        // No source pixel equals ERASE_VALUE, so the erased set is exactly the changed pixels.
        let src: Vec<u8> = (0..side * side).map(|i| if i % 7 == 0 { 200 } else { 10 }).collect();
        let aug = Augment { erase: true, ..Augment::none() };
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (mut erased, mut dst) = (0, vec![0; side * side]);
        for _ in 0..2000 {
            aug.apply(&src, side, &mut rng, &mut dst)?;
            let changed: Vec<(usize, usize)> =
                (0..side * side).filter(|&i| dst[i] != src[i]).map(|i| (i / side, i % side)).collect();
            if changed.is_empty() {
                continue;
            }
            erased += 1;
            assert!(changed.iter().all(|&(y, x)| dst[y * side + x] == ERASE_VALUE));
            let (y0, y1) =
                (changed.iter().map(|c| c.0).min().unwrap_or(0), changed.iter().map(|c| c.0).max().unwrap_or(0));
            let (x0, x1) =
                (changed.iter().map(|c| c.1).min().unwrap_or(0), changed.iter().map(|c| c.1).max().unwrap_or(0));
            let (h, w) = (y1 - y0 + 1, x1 - x0 + 1);
            assert_eq!(changed.len(), h * w, "not one filled rectangle");
            assert!(h < side && w < side);
            let frac = (h * w) as f64 / (side * side) as f64;
            // Rounding h and w moves the area by up to about (h + w + 1) / 2 pixels.
            let slack = (h + w + 1) as f64 / 2.0 / (side * side) as f64;
            assert!(frac >= ERASE_SCALE.0 - slack && frac <= ERASE_SCALE.1 + slack, "area {frac}");
        }
        assert!((900..1100).contains(&erased), "{erased} of 2000 erased");
        let (mut a, mut b) = (vec![0; side * side], vec![0; side * side]);
        aug.apply(&src, side, &mut ChaCha8Rng::seed_from_u64(3), &mut a)?;
        aug.apply(&src, side, &mut ChaCha8Rng::seed_from_u64(3), &mut b)?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn apply_checks_lengths_and_validate_checks_padding() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let err = Augment::none().apply(&[0; 10], 8, &mut rng, &mut [0; 64]);
        assert!(matches!(err, Err(DataError::BufferSize { expected: 64, found: 10, .. })));
        assert!(Augment { crop_padding: 9, ..Augment::none() }.validate(8).is_err());
        assert!(Augment { crop_padding: 8, ..Augment::none() }.validate(8).is_ok());
    }

    #[test]
    fn to_tensor_is_division_by_255() {
        assert_eq!(to_tensor_value(0), 0.0);
        assert_eq!(to_tensor_value(255), 1.0);
        assert_eq!(to_tensor_value(51), 0.2);
        for p in 0..=255u8 {
            assert_eq!(to_tensor_value(p), p as f32 / 255.0);
            assert!((f64::from(to_tensor_value(p)) - f64::from(p) / 255.0).abs() < 1e-7);
        }
    }

    #[test]
    fn normalize_and_table() -> Result<()> {
        let n = Normalize::fashion_mnist();
        n.validate()?;
        let table = pixel_table(Some(&n));
        assert_eq!(table[0], (0.0 - 0.2860) / 0.3530);
        assert_eq!(table[255], (1.0 - 0.2860) / 0.3530);
        assert_eq!(pixel_table(None)[128], to_tensor_value(128));
        assert!(Normalize { mean: 0.0, std: 0.0 }.validate().is_err());
        assert!(Normalize { mean: f32::NAN, std: 1.0 }.validate().is_err());
        Ok(())
    }
}
