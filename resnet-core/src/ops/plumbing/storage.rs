//! Access to the raw data behind a custom op's input.

use candle_core::Layout;

/// The elements of a contiguous tensor, or an error naming the op and the input.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what} must be contiguous, got strides {:?}", layout.stride()),
    }
}
