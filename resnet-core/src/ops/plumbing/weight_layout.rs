//! Reordering convolution weights between PyTorch's stored `(out, in, kh, kw)` and the kernels'
//! `(out, kh, kw, in)`.

use candle_core::WithDType;
use rayon::prelude::*;

/// `(out, in, kh, kw)` (PyTorch's layout, the one stored) → `(out, kh, kw, in)` (the kernels'),
/// borrowed when there is one tap.
pub(crate) fn oihw_to_ohwi<T: WithDType>(w: &[T], out: usize, cin: usize, taps: usize) -> std::borrow::Cow<'_, [T]> {
    swap_inner(w, out, cin, taps)
}

/// `(out, kh, kw, in)` → `(out, in, kh, kw)`, the inverse of [`oihw_to_ohwi`].
pub(crate) fn ohwi_to_oihw<T: WithDType>(w: &[T], out: usize, cin: usize, taps: usize) -> std::borrow::Cow<'_, [T]> {
    swap_inner(w, out, taps, cin)
}

/// Each of the `out` blocks of `w`, an `(a, b)` matrix, transposed to `(b, a)`, in parallel
/// over the blocks; borrowed when either side is 1 (nothing moves).
pub(crate) fn swap_inner<T: WithDType>(w: &[T], out: usize, a: usize, b: usize) -> std::borrow::Cow<'_, [T]> {
    if a == 1 || b == 1 {
        return std::borrow::Cow::Borrowed(w);
    }
    let mut t = vec![T::zero(); out * a * b];
    t.par_chunks_mut(a * b).zip(w.par_chunks(a * b)).for_each(|(dst, src)| {
        for (i, row) in src.chunks_exact(b).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                dst[j * a + i] = v;
            }
        }
    });
    std::borrow::Cow::Owned(t)
}
