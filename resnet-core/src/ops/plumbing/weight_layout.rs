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

/// The `(cols, rows)` transpose of a row-major `(rows, cols)` matrix, in parallel over blocks of
/// destination rows, each filled a square block at a time so reads and writes both stay within
/// a few cache lines per row.
pub(crate) fn transpose<T: WithDType>(m: &[T], rows: usize, cols: usize) -> Vec<T> {
    const BLOCK: usize = 32;
    assert_eq!(m.len(), rows * cols, "transpose: {} elements for a {rows}×{cols} matrix", m.len());
    let mut t = vec![T::zero(); rows * cols];
    if rows == 0 {
        return t;
    }
    t.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(b, dst)| {
        let c0 = b * BLOCK;
        let width = dst.len() / rows;
        for r0 in (0..rows).step_by(BLOCK) {
            for c in c0..c0 + width {
                let out = &mut dst[(c - c0) * rows..(c - c0 + 1) * rows];
                for r in r0..(r0 + BLOCK).min(rows) {
                    out[r] = m[r * cols + c];
                }
            }
        }
    });
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_moves_every_element_across_the_diagonal() {
        // Sizes below, at and across the block: ragged last blocks both ways.
        for &(rows, cols) in &[(1, 1), (3, 5), (32, 32), (33, 70), (100, 7), (0, 4)] {
            let m: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = transpose(&m, rows, cols);
            assert_eq!(t.len(), m.len());
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], m[r * cols + c], "{rows}×{cols} at ({r}, {c})");
                }
            }
        }
    }
}
