//! Reordering convolution weights between PyTorch's stored `(out, in, kh, kw)`, the kernels'
//! `(out, kh, kw, in)` and its transpose `(kh, kw, in, out)`.

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
    swap_inner_into(w, a, b, &mut t);
    std::borrow::Cow::Owned(t)
}

/// [`swap_inner`] into `dst` (as long as `w`), every element written.
pub(crate) fn swap_inner_into<T: WithDType>(w: &[T], a: usize, b: usize, dst: &mut [T]) {
    assert_eq!(dst.len(), w.len(), "swap_inner: destination of {} for {} elements", dst.len(), w.len());
    dst.par_chunks_mut(a * b).zip(w.par_chunks(a * b)).for_each(|(dst, src)| {
        for (i, row) in src.chunks_exact(b).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                dst[j * a + i] = v;
            }
        }
    });
}

/// The `selected` taps of `(out, in, kh, kw)` as `(taps, in, out)` into `dst`, every element
/// written: all taps in order give `(kh, kw, in, out)`, the transpose of the kernels'
/// `(out, kh · kw · in)`, made in one pass. In parallel over blocks of input channels; each
/// task copies a block of output rows' runs into a small buffer and writes every selected tap's
/// rows from it a block of output channels at a time, so each write fills whole cache lines
/// (one element per row at a time, the rows `out` apart, fell into a few cache sets).
pub(crate) fn oihw_to_hwio_into<T: WithDType>(
    w: &[T],
    (out, cin, taps): (usize, usize, usize),
    selected: &[usize],
    dst: &mut [T],
) {
    const CHANNELS: usize = 16;
    const OUTS: usize = 16;
    assert_eq!(w.len(), out * cin * taps, "oihw_to_hwio: {} elements for ({out}, {cin}, {taps})", w.len());
    assert_eq!(dst.len(), selected.len() * cin * out, "oihw_to_hwio: destination of {} elements", dst.len());
    assert!(selected.iter().all(|&t| t < taps), "oihw_to_hwio: taps {selected:?} of {taps}");
    if dst.is_empty() {
        return;
    }
    // Each task's rows: the same block of channels in every selected tap's `(in, out)` matrix.
    let blocks = cin.div_ceil(CHANNELS);
    let mut tasks: Vec<Vec<&mut [T]>> = (0..blocks).map(|_| Vec::with_capacity(selected.len())).collect();
    for tap_rows in dst.chunks_mut(cin * out) {
        for (task, rows) in tasks.iter_mut().zip(tap_rows.chunks_mut(CHANNELS * out)) {
            task.push(rows);
        }
    }
    tasks.into_par_iter().enumerate().for_each(|(block, mut rows)| {
        let c0 = block * CHANNELS;
        let width = rows[0].len() / out;
        let run = width * taps;
        // `buf[k]`: output row `o0 + k`'s runs of the block's channels, `(width, taps)`.
        let mut buf = vec![T::zero(); OUTS * run];
        for o0 in (0..out).step_by(OUTS) {
            let outs = OUTS.min(out - o0);
            for (k, line) in buf.chunks_exact_mut(run).take(outs).enumerate() {
                let at = ((o0 + k) * cin + c0) * taps;
                line.copy_from_slice(&w[at..at + run]);
            }
            for (dst, &tap) in rows.iter_mut().zip(selected) {
                for i in 0..width {
                    let line = &mut dst[i * out + o0..i * out + o0 + outs];
                    for (k, d) in line.iter_mut().enumerate() {
                        *d = buf[k * run + i * taps + tap];
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwio_is_the_transpose_of_the_kernels_layout_for_any_taps() {
        // Channel counts below, at and across the block of 16.
        // Every tap, and a selection out of order.
        for &(out, cin, taps) in &[(1, 1, 1), (3, 5, 9), (7, 16, 9), (5, 33, 4), (2, 40, 1)] {
            let w: Vec<f32> = (0..out * cin * taps).map(|i| i as f32).collect();
            let all: Vec<usize> = (0..taps).collect();
            let some: Vec<usize> = (0..taps).rev().step_by(2).collect();
            for selected in [all, some] {
                let mut got = vec![-1.0; selected.len() * cin * out];
                oihw_to_hwio_into(&w, (out, cin, taps), &selected, &mut got);
                for o in 0..out {
                    for i in 0..cin {
                        for (s, &t) in selected.iter().enumerate() {
                            let want = w[(o * cin + i) * taps + t];
                            assert_eq!(
                                got[(s * cin + i) * out + o],
                                want,
                                "({out}, {cin}, {taps}) {selected:?} at ({o}, {i}, {t})"
                            );
                        }
                    }
                }
            }
        }
    }
}
