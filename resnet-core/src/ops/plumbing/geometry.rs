//! Sliding-window geometry shared by convolution and pooling: output sizes and the checks behind them.

/// The geometry of a 2-D sliding window over a channels-last `(batch, height, width, channels)` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Batch size.
    pub batch: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Channels.
    pub c: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero (or -inf, for pooling) padding on every side.
    pub pad: usize,
}

impl Window {
    /// `floor((n + 2p - k) / s) + 1`, or `None` when the window does not fit even once.
    pub fn out_len(n: usize, k: usize, stride: usize, pad: usize) -> Option<usize> {
        if stride == 0 {
            return None;
        }
        let padded = n + 2 * pad;
        if padded < k {
            return None;
        }
        Some((padded - k) / stride + 1)
    }

    /// Output height.
    pub fn oh(&self) -> usize {
        Self::out_len(self.h, self.kh, self.stride, self.pad).unwrap_or(0)
    }

    /// Output width.
    pub fn ow(&self) -> usize {
        Self::out_len(self.w, self.kw, self.stride, self.pad).unwrap_or(0)
    }

    /// Elements in one im2col row: `kh * kw * c`.
    pub fn patch_len(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// Checks the window fits, as a candle error so ops can use it directly.
    pub fn check(&self, op: &'static str) -> candle_core::Result<()> {
        if self.oh() == 0 || self.ow() == 0 {
            candle_core::bail!(
                "{op}: a {}x{} window with stride {} and padding {} does not fit a {}x{} input",
                self.kh,
                self.kw,
                self.stride,
                self.pad,
                self.h,
                self.w
            )
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lengths_match_the_pytorch_formula() {
        // d2l's stem at 224 px: conv 7/2/3 -> 112, pool 3/2/1 -> 56.
        assert_eq!(Window::out_len(224, 7, 2, 3), Some(112));
        assert_eq!(Window::out_len(112, 3, 2, 1), Some(56));
        assert_eq!(Window::out_len(28, 7, 2, 3), Some(14));
        assert_eq!(Window::out_len(7, 3, 2, 1), Some(4));
        assert_eq!(Window::out_len(1, 3, 2, 1), Some(1));
        assert_eq!(Window::out_len(0, 3, 2, 0), None);
        assert_eq!(Window::out_len(5, 3, 0, 0), None);
    }
}
