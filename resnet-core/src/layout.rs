//! Conversions between PyTorch's `(batch, channels, height, width)`, the layout of every public
//! tensor, and the channels-last `(batch, height, width, channels)` the network runs in.

use candle_core::Tensor;

/// `(b, c, h, w)` to contiguous `(b, h, w, c)`; free of copies for one channel.
pub(crate) fn to_channels_last(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if c == 1 {
        xs.reshape((b, h, w, 1))
    } else {
        xs.permute((0, 2, 3, 1))?.contiguous()
    }
}

/// `(b, h, w, c)` to contiguous `(b, c, h, w)`; free of copies for one channel.
pub(crate) fn to_channels_first(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, w, c) = xs.dims4()?;
    if c == 1 {
        xs.reshape((b, 1, h, w))
    } else {
        xs.permute((0, 3, 1, 2))?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_trips_and_moves_the_channel_axis() -> candle_core::Result<()> {
        for c in [1, 3] {
            let xs = Tensor::arange(0f32, (2 * c * 4 * 5) as f32, &Device::Cpu)?.reshape((2, c, 4, 5))?;
            let last = to_channels_last(&xs)?;
            assert_eq!(last.dims(), &[2, 4, 5, c]);
            // Element (n, ch, y, x) lands at (n, y, x, ch).
            let a: f32 = xs.get(1)?.get(c - 1)?.get(2)?.get(3)?.to_scalar()?;
            let b: f32 = last.get(1)?.get(2)?.get(3)?.get(c - 1)?.to_scalar()?;
            assert_eq!(a, b);
            let back = to_channels_first(&last)?;
            let (x, y): (Vec<f32>, Vec<f32>) = (xs.flatten_all()?.to_vec1()?, back.flatten_all()?.to_vec1()?);
            assert_eq!(x, y);
        }
        Ok(())
    }
}
