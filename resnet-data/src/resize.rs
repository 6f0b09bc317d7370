//! Bilinear resize of 8-bit greyscale images, bit-exact with Pillow's `Image.resize(size,
//! Image.BILINEAR)`, which is what torchvision's `Resize` does to d2l's PIL images.
//!
//! Pillow (`libImaging/Resample.c`) resamples separably with an antialiasing triangle filter: for
//! each axis it computes, per output pixel, a window of input pixels and their normalised weights
//! in `f64`, turns the weights into fixed point with 22 fractional bits, and runs one pass per
//! axis into an 8-bit intermediate image (rounded and clipped), then the other pass. Every step
//! here repeats those operations in the same order and precision, so results are identical.
//! Integer accumulation is exact, which leaves us free to reorder the sums for speed.
//!
//! Pass order: Pillow 13 runs the vertical pass first when the height shrinks by more than twice
//! as many pixels as the width does, and the horizontal pass first otherwise; earlier Pillows
//! always go horizontal first. We follow Pillow 13. Both run horizontal first for square-to-square
//! resizes (every Fashion-MNIST resize); elsewhere the orders can differ by one grey level on a
//! few pixels.

use crate::error::{DataError, Result};

/// Smallest supported output side.
pub const MIN_SIDE: usize = 8;
/// Largest supported output side.
pub const MAX_SIDE: usize = 512;
/// Largest supported input side.
pub const MAX_SOURCE_SIDE: usize = 1 << 16;

/// Pillow's `PRECISION_BITS`: 32 bits minus 8 for the pixel and 2 of headroom.
const PRECISION_BITS: u32 = 32 - 8 - 2;
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes a `src_w x src_h` image to `dst_w x dst_h` exactly as Pillow's bilinear resize.
///
/// Builds a [`Resizer`] for the one call; to resize many images of one size, build a `Resizer`
/// once and reuse it.
///
/// # Shapes
/// `src`: `(src_h, src_w)` row-major; returns `(dst_h, dst_w)` row-major.
///
/// # Errors
/// If `dst_w` or `dst_h` is outside [`MIN_SIDE`]`..=`[`MAX_SIDE`], a source side is zero or above
/// [`MAX_SOURCE_SIDE`], or `src.len() != src_w * src_h`.
pub fn resize_bilinear(src: &[u8], src_w: usize, src_h: usize, dst_w: usize, dst_h: usize) -> Result<Vec<u8>> {
    Resizer::new(src_w, src_h, dst_w, dst_h)?.resize(src)
}

/// Precomputed fixed-point filter coefficients for one (source size, target size) pair.
#[derive(Debug, Clone)]
pub struct Resizer {
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
    /// `None` when the width does not change (Pillow skips that pass too).
    horizontal: Option<Axis>,
    /// `None` when the height does not change.
    vertical: Option<Axis>,
    /// Pillow 13's pass order (see the module docs).
    vertical_first: bool,
}

/// Filter windows and weights along one axis.
#[derive(Debug, Clone)]
struct Axis {
    /// Per output pixel: first input pixel and number of input pixels.
    windows: Vec<(usize, usize)>,
    /// Per output pixel, `stride` fixed-point weights (only the window's first ones are used).
    weights: Vec<i32>,
    stride: usize,
}

impl Resizer {
    /// Computes the coefficients for resizing `src_w x src_h` images to `dst_w x dst_h`.
    ///
    /// # Errors
    /// As [`resize_bilinear`], for the sizes.
    pub fn new(src_w: usize, src_h: usize, dst_w: usize, dst_h: usize) -> Result<Self> {
        for (what, value) in [("resize target width", dst_w), ("resize target height", dst_h)] {
            if !(MIN_SIDE..=MAX_SIDE).contains(&value) {
                return Err(DataError::SizeOutOfRange { what, min: MIN_SIDE, max: MAX_SIDE, found: value });
            }
        }
        for (what, value) in [("resize source width", src_w), ("resize source height", src_h)] {
            if !(1..=MAX_SOURCE_SIDE).contains(&value) {
                return Err(DataError::SizeOutOfRange { what, min: 1, max: MAX_SOURCE_SIDE, found: value });
            }
        }
        Ok(Self {
            src_w,
            src_h,
            dst_w,
            dst_h,
            horizontal: (src_w != dst_w).then(|| Axis::new(src_w, dst_w)),
            vertical: (src_h != dst_h).then(|| Axis::new(src_h, dst_h)),
            vertical_first: vertical_first(src_w, src_h, dst_w, dst_h),
        })
    }

    /// `(width, height)` of the inputs.
    pub fn src_size(&self) -> (usize, usize) {
        (self.src_w, self.src_h)
    }

    /// `(width, height)` of the outputs.
    pub fn dst_size(&self) -> (usize, usize) {
        (self.dst_w, self.dst_h)
    }

    /// Whether sizes are equal, so that resizing is a copy.
    pub fn is_identity(&self) -> bool {
        self.horizontal.is_none() && self.vertical.is_none()
    }

    /// Resizes one image into a new buffer.
    ///
    /// # Shapes
    /// `src`: `(src_h, src_w)`; returns `(dst_h, dst_w)`.
    pub fn resize(&self, src: &[u8]) -> Result<Vec<u8>> {
        let mut dst = vec![0; self.dst_w * self.dst_h];
        self.resize_into(src, &mut dst, &mut Vec::new())?;
        Ok(dst)
    }

    /// Resizes one image into `dst`, using `scratch` for the intermediate image (reuse it across
    /// calls to avoid allocating).
    ///
    /// # Shapes
    /// `src`: `(src_h, src_w)`; `dst`: `(dst_h, dst_w)`.
    pub fn resize_into(&self, src: &[u8], dst: &mut [u8], scratch: &mut Vec<u8>) -> Result<()> {
        check_len("resize source", self.src_w * self.src_h, src.len())?;
        check_len("resize destination", self.dst_w * self.dst_h, dst.len())?;
        match (&self.horizontal, &self.vertical) {
            (None, None) => dst.copy_from_slice(src),
            (Some(h), None) => h.horizontal(src, self.src_w, dst, self.dst_w),
            (None, Some(v)) => v.vertical(src, dst, self.dst_w),
            (Some(h), Some(v)) if self.vertical_first => {
                scratch.clear();
                scratch.resize(self.src_w * self.dst_h, 0);
                v.vertical(src, scratch, self.src_w);
                h.horizontal(scratch, self.src_w, dst, self.dst_w);
            }
            (Some(h), Some(v)) => {
                // Every source row is used by some output row (see `Axis::new`), so unlike
                // Pillow we need not crop the intermediate image to the rows in use.
                scratch.clear();
                scratch.resize(self.dst_w * self.src_h, 0);
                h.horizontal(src, self.src_w, scratch, self.dst_w);
                v.vertical(scratch, dst, self.dst_w);
            }
        }
        Ok(())
    }
}

impl Axis {
    /// Pillow's `precompute_coeffs` for the bilinear filter (support 1) over the whole input,
    /// followed by `normalize_coeffs_8bpc`.
    fn new(in_size: usize, out_size: usize) -> Self {
        const SUPPORT: f64 = 1.0;
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = SUPPORT * filterscale;
        let stride = support.ceil() as usize * 2 + 1;
        let ss = 1.0 / filterscale;
        let mut windows = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * stride];
        let mut k = vec![0f64; stride];
        for (xx, fixed) in weights.chunks_exact_mut(stride).enumerate() {
            let center = (xx as f64 + 0.5) * scale;
            // C's `(int)` conversion truncates toward zero, as does `as`.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let len = (xmax - xmin).clamp(0, stride as i64) as usize;
            let xmin = xmin as usize;
            let mut ww = 0.0;
            for (x, w) in k.iter_mut().enumerate().take(len) {
                *w = bilinear_filter(((x + xmin) as f64 - center + 0.5) * ss);
                ww += *w;
            }
            for (w, f) in k.iter().zip(fixed.iter_mut()).take(len) {
                let w = if ww != 0.0 { w / ww } else { *w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                *f = if w < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
            }
            windows.push((xmin, len));
        }
        Self { windows, weights, stride }
    }

    fn taps(&self, out: usize) -> (usize, &[i32]) {
        let (start, len) = self.windows[out];
        (start, &self.weights[out * self.stride..out * self.stride + len])
    }

    /// Resamples each row of `src` (`src_w` wide) into the matching row of `dst` (`dst_w` wide).
    fn horizontal(&self, src: &[u8], src_w: usize, dst: &mut [u8], dst_w: usize) {
        for (src_row, dst_row) in src.chunks_exact(src_w).zip(dst.chunks_exact_mut(dst_w)) {
            for (xx, out) in dst_row.iter_mut().enumerate() {
                let (start, taps) = self.taps(xx);
                let acc = src_row[start..start + taps.len()]
                    .iter()
                    .zip(taps)
                    .fold(HALF, |acc, (&p, &k)| acc + i32::from(p) * k);
                *out = clip8(acc);
            }
        }
    }

    /// Resamples the columns of `src` (rows of `width` pixels) into the rows of `dst`.
    fn vertical(&self, src: &[u8], dst: &mut [u8], width: usize) {
        let mut acc = vec![0i32; width];
        for (yy, dst_row) in dst.chunks_exact_mut(width).enumerate() {
            let (start, taps) = self.taps(yy);
            acc.fill(HALF);
            for (y, &k) in taps.iter().enumerate() {
                let row = &src[(start + y) * width..(start + y + 1) * width];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += i32::from(p) * k;
                }
            }
            for (out, &a) in dst_row.iter_mut().zip(&acc) {
                *out = clip8(a);
            }
        }
    }
}

/// Pillow 13's choice: vertical pass first iff the height shrinks by more than twice as many
/// pixels as the width.
fn vertical_first(src_w: usize, src_h: usize, dst_w: usize, dst_h: usize) -> bool {
    let shrink_h = src_h as i64 - dst_h as i64;
    let shrink_w = src_w as i64 - dst_w as i64;
    shrink_h > 0 && shrink_h > 2 * shrink_w
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `clip8`: drop the fraction bits (arithmetic shift) and clamp to a byte.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

fn check_len(what: &'static str, expected: usize, found: usize) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(DataError::BufferSize { what, expected, found })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_sizes_copy() -> Result<()> {
        let src: Vec<u8> = (0..=255).cycle().take(28 * 28).collect();
        assert_eq!(resize_bilinear(&src, 28, 28, 28, 28)?, src);
        assert!(Resizer::new(28, 28, 28, 28)?.is_identity());
        Ok(())
    }

    #[test]
    fn target_size_range() {
        let src = vec![0u8; 28 * 28];
        for bad in [0, 7, 513] {
            let err = resize_bilinear(&src, 28, 28, bad, 28);
            assert!(matches!(err, Err(DataError::SizeOutOfRange { found, .. }) if found == bad));
            let err = resize_bilinear(&src, 28, 28, 28, bad);
            assert!(matches!(err, Err(DataError::SizeOutOfRange { found, .. }) if found == bad));
        }
        for good in [8, 512] {
            assert!(resize_bilinear(&src, 28, 28, good, good).is_ok());
        }
    }

    #[test]
    fn wrong_buffer_length_is_an_error() {
        let err = resize_bilinear(&[0u8; 10], 28, 28, 56, 56);
        assert!(matches!(err, Err(DataError::BufferSize { expected: 784, found: 10, .. })));
    }

    #[test]
    fn constant_images_stay_constant() -> Result<()> {
        for value in [0u8, 1, 77, 254, 255] {
            let src = vec![value; 28 * 28];
            for (w, h) in [(8, 8), (17, 17), (96, 96), (224, 224), (40, 13)] {
                let out = resize_bilinear(&src, 28, 28, w, h)?;
                assert!(out.iter().all(|&p| p == value), "value {value} to {w}x{h}");
            }
        }
        Ok(())
    }

    #[test]
    fn upscaling_hand_computed() -> Result<()> {
        // 2 -> 4 pixels: scale 0.5, support 1, output centres 0.25, 0.75, 1.25, 1.75.
        // Output 0: window [trunc(-0.25), trunc(1.75)) = [0, 1), a single weight.
        // Output 1: window [0, 2), weights 1 - |0 - 0.75 + 0.5| = 0.75 and 1 - |1 - 0.75 + 0.5|
        // = 0.25. Output 2 mirrors output 1, output 3 mirrors output 0.
        let axis = Axis::new(2, 4);
        assert_eq!(axis.windows, vec![(0, 1), (0, 2), (0, 2), (1, 1)]);
        let q = 1 << PRECISION_BITS;
        assert_eq!(axis.taps(0).1, &[q]);
        assert_eq!(axis.taps(1).1, &[3 * q / 4, q / 4]);
        assert_eq!(axis.taps(2).1, &[q / 4, 3 * q / 4]);
        assert_eq!(axis.taps(3).1, &[q]);

        // 2 -> 8 pixels of the row [0, 100]: centres (i + 0.5) / 4; weights of the second pixel
        // 0, 0, 1/8, 3/8, 5/8, 7/8, then single-pixel windows. Halves round up: 12.5 -> 13.
        let mut src = vec![0u8; 2 * 8];
        src[1] = 100;
        let out = Resizer::new(2, 8, 8, 8)?.resize(&src)?;
        assert_eq!(&out[..8], &[0, 0, 13, 38, 63, 88, 100, 100]);
        Ok(())
    }

    #[test]
    fn pass_order_follows_pillow_13() {
        assert!(!vertical_first(28, 28, 8, 8)); // square: horizontal first
        assert!(!vertical_first(28, 28, 96, 96));
        assert!(vertical_first(28, 28, 40, 24)); // height shrinks, width grows
        assert!(!vertical_first(28, 28, 12, 3)); // 25 rows vs 2 * 16 columns
        assert!(vertical_first(12, 28, 8, 3)); // 25 rows vs 2 * 4 columns
    }

    #[test]
    fn downscale_weights_sum_to_one() {
        let q = 1i64 << PRECISION_BITS;
        for (inp, out) in [(28, 8), (28, 17), (28, 96), (28, 224), (100, 9)] {
            let axis = Axis::new(inp, out);
            for o in 0..out {
                let sum: i64 = axis.taps(o).1.iter().map(|&k| i64::from(k)).sum();
                assert!((sum - q).abs() <= 2, "{inp}->{out} at {o}: {sum}");
            }
        }
    }
}
