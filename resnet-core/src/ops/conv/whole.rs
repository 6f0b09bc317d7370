//! Convolution of images so small that every output pixel's window covers the whole image (a 3×3
//! kernel with padding 1 on a 2×2 or 1×1 image, or with stride 2 on a 2×2 one): each image's
//! `h · w · c` values then map to its `oh · ow · out` outputs through one dense matrix, made of
//! one `(c, out)` block per pair of input and output pixels, every block a kernel tap. The
//! forward and both gradients are then one matrix product over the batch each, with the
//! multiplies of the in-bounds taps and no more, reading the images and writing the outputs in
//! place; where [`taps`](super::taps) would run one product per output pixel and part of a
//! kernel row (four pixels × two rows at 2×2), each a fraction of the size.

use candle_core::WithDType;
use rayon::prelude::*;

use crate::ops::plumbing::geometry::Window;
use crate::ops::plumbing::matmul::gemm_strided;
use crate::ops::plumbing::scratch;
use crate::ops::plumbing::weight_layout;

/// Whether every output pixel's window covers the whole image: along each axis, the first
/// output's window reaches the last input row (`k − pad ≥ n`) and the last output's window
/// starts before the first (`(o − 1) · stride ≤ pad`).
pub fn applies(win: &Window) -> bool {
    let covers = |n: usize, k: usize, o: usize| o > 0 && k >= n + win.pad && (o - 1) * win.stride <= win.pad;
    covers(win.h, win.kh, win.oh()) && covers(win.w, win.kw, win.ow())
}

/// The dense map's shape: input pixels, output pixels, and the tap joining each pair
/// (`tap(i, q)` for input pixel `i` and output pixel `q`, row-major over the image and output).
struct Map {
    pixels: usize,
    outputs: usize,
    taps: Vec<usize>,
}

impl Map {
    fn new(win: &Window) -> Self {
        let (pixels, outputs) = (win.h * win.w, win.oh() * win.ow());
        let mut taps = Vec::with_capacity(pixels * outputs);
        for i in 0..pixels {
            let (iy, ix) = (i / win.w, i % win.w);
            for q in 0..outputs {
                let (oy, ox) = (q / win.ow(), q % win.ow());
                let ky = iy + win.pad - oy * win.stride;
                let kx = ix + win.pad - ox * win.stride;
                taps.push(ky * win.kw + kx);
            }
        }
        Self { pixels, outputs, taps }
    }

    fn tap(&self, i: usize, q: usize) -> usize {
        self.taps[i * self.outputs + q]
    }
}

/// `y (batch, oh, ow, out) = conv(x, w) + bias` with `x` `(batch, h, w, c)` and `w`
/// `(out, c, kh, kw)`, for a window where [`applies`] holds: `Y (batch, Q·out) = X (batch, P·c)
/// · M`, with `M`'s block `(i, q)` the `(c, out)` transpose of tap `tap(i, q)`.
pub fn conv<T: WithDType>(x: &[T], w: &[T], bias: &[T], win: &Window) -> Vec<T> {
    let (c, out, taps) = (win.c, bias.len(), win.kh * win.kw);
    let map = Map::new(win);
    let (rows, cols) = (map.pixels * c, map.outputs * out);
    // The taps that join some pair, as `(taps, c, out)`: each block of M is a run of rows of it.
    let mut used: Vec<usize> = map.taps.clone();
    used.sort_unstable();
    used.dedup();
    let mut hwio = scratch::take(used.len() * c * out);
    weight_layout::oihw_to_hwio_into(w, (out, c, taps), &used, &mut hwio);
    let mut m = scratch::take(rows * cols);
    m.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let (i, ch) = (r / c, r % c);
        for (q, block) in row.chunks_exact_mut(out).enumerate() {
            let slot = used.binary_search(&map.tap(i, q)).expect("every pair's tap is in `used`");
            let at = (slot * c + ch) * out;
            block.copy_from_slice(&hwio[at..at + out]);
        }
    });
    scratch::give(hwio);
    let mut y = scratch::take(win.batch * cols);
    y.par_chunks_mut(out).for_each(|row| row.copy_from_slice(bias));
    gemm_strided((win.batch, cols, rows), x, (rows, 1), &m, (cols, 1), &mut y, cols, true, true);
    scratch::give(m);
    y
}

/// `dx (batch, h, w, c)` of [`conv`] from `dy` `(batch, oh, ow, out)` and `w` `(out, c, kh, kw)`:
/// `dX = dY · Mᵀ`, with `Mᵀ` made as such (its block `(q, i)` is tap `tap(i, q)` as stored per
/// output channel, `(out, c)`), so the product reads it by rows.
pub fn input_grad<T: WithDType>(dy: &[T], w: &[T], win: &Window, out: usize) -> Vec<T> {
    let (c, taps) = (win.c, win.kh * win.kw);
    let map = Map::new(win);
    let (rows, cols) = (map.outputs * out, map.pixels * c);
    // Each row gathers its blocks from one output channel's row of the stored weight (`c · kh ·
    // kw` elements, in cache while the row is made).
    let mut mt = scratch::take(rows * cols);
    mt.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let (q, o) = (r / out, r % out);
        let filter = &w[o * c * taps..(o + 1) * c * taps];
        for (i, block) in row.chunks_exact_mut(c).enumerate() {
            let tap = map.tap(i, q);
            for (ch, d) in block.iter_mut().enumerate() {
                *d = filter[ch * taps + tap];
            }
        }
    });
    let mut dx = scratch::take(win.batch * cols);
    gemm_strided((win.batch, cols, rows), dy, (rows, 1), &mt, (cols, 1), &mut dx, cols, false, true);
    scratch::give(mt);
    dx
}

/// `dW (out, c, kh, kw)` of [`conv`] from `x` `(batch, h, w, c)` and `dy` `(batch, oh, ow, out)`:
/// `G = dYᵀ · X` `(Q·out, P·c)` in one product, then each tap's gradient is the sum of the
/// blocks of `G` it joins, added in a fixed order (output pixel, then input pixel). Taps that
/// join no pair (outside the image for every output) get zero.
pub fn weight_grad<T: WithDType>(x: &[T], dy: &[T], win: &Window, out: usize) -> Vec<T> {
    let (c, taps) = (win.c, win.kh * win.kw);
    let map = Map::new(win);
    let (rows, cols) = (map.outputs * out, map.pixels * c);
    let mut g = scratch::take(rows * cols);
    gemm_strided((rows, cols, win.batch), dy, (1, rows), x, (cols, 1), &mut g, cols, false, true);
    // Each output channel's row cleared and summed while it is in cache: the weight-sized
    // gradient (its unused taps zero) written in one pass, never cleared before.
    let fill = |dw: &mut [std::mem::MaybeUninit<T>]| {
        dw.par_chunks_mut(c * taps).enumerate().for_each(|(o, dst)| {
            for d in dst.iter_mut() {
                d.write(T::zero());
            }
            // SAFETY: every element was just written.
            let dst = unsafe { scratch::assume_init(dst) };
            for q in 0..map.outputs {
                let row = &g[(q * out + o) * cols..(q * out + o + 1) * cols];
                for (i, block) in row.chunks_exact(c).enumerate() {
                    let tap = map.tap(i, q);
                    for (ch, &v) in block.iter().enumerate() {
                        dst[ch * taps + tap] += v;
                    }
                }
            }
        })
    };
    // SAFETY: `fill` writes every row of `out · c · taps` elements.
    let dw = unsafe { scratch::written(out * c * taps, fill) };
    scratch::give(g);
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    fn win(h: usize, w: usize, k: usize, stride: usize, pad: usize) -> Window {
        Window { batch: 3, h, w, c: 5, kh: k, kw: k, stride, pad }
    }

    /// The shapes the path takes and those it leaves: ResNet-18's 2×2 and 1×1 stages at 28 px,
    /// the stride-2 step from 2×2 to 1×1, and not 3×3 images or windows that see padding alone.
    #[test]
    fn applies_to_windows_covering_the_image() {
        assert!(applies(&win(2, 2, 3, 1, 1)));
        assert!(applies(&win(1, 1, 3, 1, 1)));
        assert!(applies(&win(2, 2, 3, 2, 1)));
        assert!(applies(&win(1, 2, 3, 1, 1)));
        assert!(!applies(&win(3, 3, 3, 1, 1)));
        assert!(!applies(&win(3, 3, 3, 2, 1)));
        assert!(!applies(&win(4, 4, 3, 2, 1)));
        // Outer outputs of a padding wider than the kernel see no pixel at all.
        assert!(!applies(&win(1, 2, 3, 1, 3)));
    }

    /// Forward and both gradients against direct sums in f64 over every in-bounds tap (the
    /// definition), tolerance 1e-12 relative to the largest term's scale.
    #[test]
    fn matches_direct_sums() {
        for (h, w, stride, batch, c, out) in
            [(2, 2, 1, 3, 5, 4), (1, 1, 1, 2, 3, 6), (2, 2, 2, 2, 4, 3), (1, 2, 1, 3, 2, 5)]
        {
            let win = Window { batch, h, w, c, kh: 3, kw: 3, stride, pad: 1 };
            assert!(applies(&win));
            let (oh, ow) = (win.oh(), win.ow());
            let value = |i: usize, salt: usize| (((i * 7919 + salt) % 1013) as f64) / 507.0 - 1.0;
            let x: Vec<f64> = (0..batch * h * w * c).map(|i| value(i, 1)).collect();
            let wt: Vec<f64> = (0..out * c * 9).map(|i| value(i, 2)).collect();
            let bias: Vec<f64> = (0..out).map(|i| value(i, 3)).collect();
            let dy: Vec<f64> = (0..batch * oh * ow * out).map(|i| value(i, 4)).collect();
            let (mut y, mut dx, mut dw) =
                (vec![0f64; batch * oh * ow * out], vec![0f64; x.len()], vec![0f64; wt.len()]);
            for n in 0..batch {
                for (oy, ox) in (0..oh).flat_map(|a| (0..ow).map(move |b| (a, b))) {
                    let yi = ((n * oh + oy) * ow + ox) * out;
                    for o in 0..out {
                        y[yi + o] += bias[o];
                    }
                    for (ky, kx) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                        let (iy, ix) = ((oy * stride + ky) as isize - 1, (ox * stride + kx) as isize - 1);
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let xi = ((n * h + iy as usize) * w + ix as usize) * c;
                        for (o, ch) in (0..out).flat_map(|o| (0..c).map(move |ch| (o, ch))) {
                            let wi = (o * c + ch) * 9 + ky * 3 + kx;
                            y[yi + o] += x[xi + ch] * wt[wi];
                            dx[xi + ch] += dy[yi + o] * wt[wi];
                            dw[wi] += dy[yi + o] * x[xi + ch];
                        }
                    }
                }
            }
            let close = |got: &[f64], want: &[f64], what: &str| {
                assert_eq!(got.len(), want.len(), "{what}");
                for (g, e) in got.iter().zip(want) {
                    assert!((g - e).abs() <= 1e-12 * e.abs().max(1.0), "{what} at {:?}: {g} vs {e}", (h, w, stride));
                }
            };
            close(&conv(&x, &wt, &bias, &win), &y, "forward");
            close(&input_grad(&dy, &wt, &win, out), &dx, "input gradient");
            close(&weight_grad(&x, &dy, &win, out), &dw, "weight gradient");
        }
    }
}
