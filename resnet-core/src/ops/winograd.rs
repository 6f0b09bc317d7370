//! Winograd's minimal filtering F(2×2, 3×3) for the 3×3, stride-1, padding-1 convolutions that
//! make up three quarters of ResNet-18's arithmetic (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016).
//!
//! Each 2×2 output tile is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for the 4×4 input tile `d` around it and
//! the 3×3 filter `g`. Over a batch this becomes: transform every input tile (`V`, 16 matrices
//! of tiles × in-channels), transform every filter (`U`, 16 matrices of in × out channels), 16
//! matrix products `M_e = V_e · U_e`, and transform every product tile back. The products do
//! 16 multiplies per output tile and channel pair where direct convolution does 36: 2.25× fewer.
//! The input gradient of such a convolution is again one (with the filters flipped and their
//! channel axes swapped), so the backward uses the same routine.

use candle_core::WithDType;
use rayon::prelude::*;

use super::matmul::{matmul_general, matmul_strided};
use super::simd::with_fma;

/// Tiles per parallel task in the transforms.
const TILES_PER_TASK: usize = 64;

/// Whether a convolution of this shape runs through Winograd: 3×3, stride 1, padding 1, and an
/// image large enough that the 2×2 tiles are mostly inside it (below 4×4 im2col wastes less).
pub fn applies(kernel: usize, stride: usize, pad: usize, h: usize, w: usize) -> bool {
    kernel == 3 && stride == 1 && pad == 1 && h >= 4 && w >= 4
}

/// Filters `(out, 3, 3, in)` row-major → `U`: 16 matrices of `(in, out)`.
fn transform_filters<T: WithDType>(w: &[T], cin: usize, cout: usize) -> Vec<T> {
    let half = T::from_f64(0.5);
    let mut u = vec![T::zero(); 16 * cin * cout];
    for k in 0..cout {
        for c in 0..cin {
            let g = |i: usize, j: usize| w[((k * 3 + i) * 3 + j) * cin + c];
            // t = G g (4×3), then u = t Gᵀ (4×4).
            let col = |j: usize| {
                let (g0, g1, g2) = (g(0, j), g(1, j), g(2, j));
                [g0, (g0 + g1 + g2) * half, (g0 - g1 + g2) * half, g2]
            };
            let cols = [col(0), col(1), col(2)];
            let t: [[T; 3]; 4] = std::array::from_fn(|i| [cols[0][i], cols[1][i], cols[2][i]]);
            for (i, row) in t.iter().enumerate() {
                let [t0, t1, t2] = *row;
                let vals = [t0, (t0 + t1 + t2) * half, (t0 - t1 + t2) * half, t2];
                for (j, v) in vals.into_iter().enumerate() {
                    u[((i * 4 + j) * cin + c) * cout + k] = v;
                }
            }
        }
    }
    u
}

/// `V = Bᵀ d B` for every 4×4 input tile `d` (zero outside the image), tile-major: entry `e`
/// of tile `t`, channel `c` at `(t·16 + e)·cin + c`.
fn input_transform<T: WithDType>(x: &[T], (batch, h, w, cin): (usize, usize, usize, usize)) -> Vec<T> {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = batch * th * tw;
    let mut v = vec![T::zero(); tiles * 16 * cin];
    v.par_chunks_mut(TILES_PER_TASK * 16 * cin).enumerate().for_each(|(task, block)| {
        with_fma(|| {
            let mut d = vec![T::zero(); 16 * cin];
            for (local, vt) in block.chunks_exact_mut(16 * cin).enumerate() {
                let t = task * TILES_PER_TASK + local;
                let (n, rest) = (t / (th * tw), t % (th * tw));
                let (ty, tx) = (rest / tw, rest % tw);
                // Gather the 4×4 input tile (zero outside the image) for all channels.
                for i in 0..4 {
                    let y = (2 * ty + i) as isize - 1;
                    for j in 0..4 {
                        let xx = (2 * tx + j) as isize - 1;
                        let dst = &mut d[(i * 4 + j) * cin..(i * 4 + j + 1) * cin];
                        if y < 0 || y >= h as isize || xx < 0 || xx >= w as isize {
                            dst.fill(T::zero());
                        } else {
                            let src = ((n * h + y as usize) * w + xx as usize) * cin;
                            dst.copy_from_slice(&x[src..src + cin]);
                        }
                    }
                }
                // r = Bᵀ d (rows), then Bᵀ d B (columns), each a pass vectorised over channels.
                let row = |i: usize, j: usize| (i * 4 + j) * cin;
                let mut r = vec![T::zero(); 16 * cin];
                for j in 0..4 {
                    for c in 0..cin {
                        let (d0, d1, d2, d3) = (d[row(0, j) + c], d[row(1, j) + c], d[row(2, j) + c], d[row(3, j) + c]);
                        r[row(0, j) + c] = d0 - d2;
                        r[row(1, j) + c] = d1 + d2;
                        r[row(2, j) + c] = d2 - d1;
                        r[row(3, j) + c] = d1 - d3;
                    }
                }
                for i in 0..4 {
                    for c in 0..cin {
                        let (r0, r1, r2, r3) = (r[row(i, 0) + c], r[row(i, 1) + c], r[row(i, 2) + c], r[row(i, 3) + c]);
                        vt[row(i, 0) + c] = r0 - r2;
                        vt[row(i, 1) + c] = r1 + r2;
                        vt[row(i, 2) + c] = r2 - r1;
                        vt[row(i, 3) + c] = r1 - r3;
                    }
                }
            }
        })
    });
    v
}

/// The 3×3 convolution (stride 1, padding 1) of channels-last `x` `(batch, h, w, cin)` with
/// filters `(cout, 3, 3, cin)`, plus `bias` when given; returns `(batch, h, w, cout)`.
pub fn conv3x3<T: WithDType>(
    x: &[T],
    filters: &[T],
    bias: Option<&[T]>,
    (batch, h, w, cin): (usize, usize, usize, usize),
    cout: usize,
) -> Vec<T> {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = batch * th * tw;
    let u = transform_filters(filters, cin, cout);

    let v = input_transform(x, (batch, h, w, cin));

    // M_e = V_e · U_e: 16 products of (tiles × cin) · (cin × cout), side by side on the
    // threads, reading V tile-major (row stride 16·cin) and writing M entry-major.
    let mut m = vec![T::zero(); 16 * tiles * cout];
    m.par_chunks_mut(tiles * cout).enumerate().for_each(|(e, me)| {
        let ue = &u[e * cin * cout..(e + 1) * cin * cout];
        matmul_strided((tiles, cout, cin), &v[e * cin..], 16 * cin, ue, cout, me, cout);
    });
    drop(v);

    // Y = Aᵀ M A per tile (+ bias), written into the image.
    let mut y = vec![T::zero(); batch * h * w * cout];
    let img = h * w * cout;
    y.par_chunks_mut(img).enumerate().for_each(|(n, out)| {
        with_fma(|| {
            let mut s = vec![T::zero(); 8 * cout];
            for ty in 0..th {
                for tx in 0..tw {
                    let t = (n * th + ty) * tw + tx;
                    let mt = &m[t * cout..];
                    let at = |e: usize| e * tiles * cout;
                    // s = Aᵀ M (2×4), vectorised over output channels.
                    for j in 0..4 {
                        for k in 0..cout {
                            let (m0, m1, m2, m3) =
                                (mt[at(j) + k], mt[at(4 + j) + k], mt[at(8 + j) + k], mt[at(12 + j) + k]);
                            s[j * cout + k] = m0 + m1 + m2;
                            s[(4 + j) * cout + k] = m1 - m2 - m3;
                        }
                    }
                    // Aᵀ M A (2×2) + bias, straight into the image.
                    for i in 0..2 {
                        let yy = 2 * ty + i;
                        if yy >= h {
                            continue;
                        }
                        for j in 0..2 {
                            let xx = 2 * tx + j;
                            if xx >= w {
                                continue;
                            }
                            let dst = &mut out[(yy * w + xx) * cout..(yy * w + xx + 1) * cout];
                            let si = |q: usize| &s[(i * 4 + q) * cout..(i * 4 + q + 1) * cout];
                            let (s0, s1, s2, s3) = (si(0), si(1), si(2), si(3));
                            for k in 0..cout {
                                let b = bias.map_or(T::zero(), |b| b[k]);
                                dst[k] = if j == 0 { s0[k] + s1[k] + s2[k] + b } else { s1[k] - s2[k] - s3[k] + b };
                            }
                        }
                    }
                }
            }
        })
    });
    y
}

/// The weight gradient of [`conv3x3`]: `dW (cout, 3, 3, cin)` from the input `x (batch, h, w,
/// cin)` and the output gradient `dy (batch, h, w, cout)`. The adjoint of the forward's
/// transforms: `dW = Gᵀ [Σ_tiles (A dY Aᵀ) ⊙ (Bᵀ d B)] G`, the sum over tiles being 16 products
/// of `(cin × tiles) · (tiles × cout)`, 2.25× fewer multiplies than im2col's `dYᵀ · cols`.
pub fn conv3x3_weight_grad<T: WithDType>(
    x: &[T],
    dy: &[T],
    (batch, h, w, cin): (usize, usize, usize, usize),
    cout: usize,
) -> Vec<T> {
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = batch * th * tw;
    let v = input_transform(x, (batch, h, w, cin));
    // dM = A dY Aᵀ per 2×2 output-gradient tile (zero outside the image), tile-major like V.
    let mut dm = vec![T::zero(); tiles * 16 * cout];
    dm.par_chunks_mut(TILES_PER_TASK * 16 * cout).enumerate().for_each(|(task, block)| {
        with_fma(|| {
            let zeros = vec![T::zero(); cout];
            for (local, mt) in block.chunks_exact_mut(16 * cout).enumerate() {
                let t = task * TILES_PER_TASK + local;
                let (n, rest) = (t / (th * tw), t % (th * tw));
                let (ty, tx) = (rest / tw, rest % tw);
                let cell = |i: usize, j: usize| -> &[T] {
                    let (y, xx) = (2 * ty + i, 2 * tx + j);
                    if y < h && xx < w {
                        let at = ((n * h + y) * w + xx) * cout;
                        &dy[at..at + cout]
                    } else {
                        &zeros
                    }
                };
                let (a, b, c, d) = (cell(0, 0), cell(0, 1), cell(1, 0), cell(1, 1));
                for k in 0..cout {
                    // r = A dY (4×2), then r Aᵀ (4×4): a row [p, q] becomes [p, p+q, p−q, −q].
                    let rows = [
                        (a[k], b[k]),
                        (a[k] + c[k], b[k] + d[k]),
                        (a[k] - c[k], b[k] - d[k]),
                        (T::zero() - c[k], T::zero() - d[k]),
                    ];
                    for (i, (p, q)) in rows.into_iter().enumerate() {
                        mt[(i * 4) * cout + k] = p;
                        mt[(i * 4 + 1) * cout + k] = p + q;
                        mt[(i * 4 + 2) * cout + k] = p - q;
                        mt[(i * 4 + 3) * cout + k] = T::zero() - q;
                    }
                }
            }
        })
    });
    // Q_e (cin × cout) = V_eᵀ · dM_e, summed over all tiles by the product.
    let mut q = vec![T::zero(); 16 * cin * cout];
    q.par_chunks_mut(cin * cout).enumerate().for_each(|(e, qe)| {
        matmul_general((cin, cout, tiles), &v[e * cin..], (1, 16 * cin), &dm[e * cout..], (16 * cout, 1), qe, cout);
    });
    // dW = Gᵀ Q G per (c, k): 4×4 → 3×3, into (cout, 3, 3, cin).
    let half = T::from_f64(0.5);
    let mut dw = vec![T::zero(); cout * 9 * cin];
    for c in 0..cin {
        for k in 0..cout {
            let qv = |i: usize, j: usize| q[((i * 4 + j) * cin + c) * cout + k];
            let gt = |r: [T; 4]| [r[0] + (r[1] + r[2]) * half, (r[1] - r[2]) * half, (r[1] + r[2]) * half + r[3]];
            // Gᵀ Q: combine rows, column by column.
            let cols: [[T; 3]; 4] = std::array::from_fn(|j| gt([qv(0, j), qv(1, j), qv(2, j), qv(3, j)]));
            for i in 0..3 {
                let out = gt([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
                for (j, val) in out.into_iter().enumerate() {
                    dw[((k * 3 + i) * 3 + j) * cin + c] = val;
                }
            }
        }
    }
    dw
}

/// Filters `(out, 3, 3, in)` → the filters of the input gradient: `(in, 3, 3, out)` with the
/// kernel rotated by 180°.
pub fn flip_filters<T: WithDType>(w: &[T], cin: usize, cout: usize) -> Vec<T> {
    let mut f = vec![T::zero(); w.len()];
    for k in 0..cout {
        for i in 0..3 {
            for j in 0..3 {
                for c in 0..cin {
                    f[((c * 3 + (2 - i)) * 3 + (2 - j)) * cout + k] = w[((k * 3 + i) * 3 + j) * cin + c];
                }
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct float64 convolution (3×3, stride 1, padding 1) of channels-last data.
    fn direct(
        x: &[f64],
        w: &[f64],
        bias: &[f64],
        (b, h, wd, cin): (usize, usize, usize, usize),
        cout: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0; b * h * wd * cout];
        for n in 0..b {
            for oy in 0..h {
                for ox in 0..wd {
                    for k in 0..cout {
                        let mut s = bias[k];
                        for i in 0..3 {
                            for j in 0..3 {
                                let (iy, ix) = (oy as isize + i as isize - 1, ox as isize + j as isize - 1);
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                for c in 0..cin {
                                    s += x[((n * h + iy as usize) * wd + ix as usize) * cin + c]
                                        * w[((k * 3 + i) * 3 + j) * cin + c];
                                }
                            }
                        }
                        y[((n * h + oy) * wd + ox) * cout + k] = s;
                    }
                }
            }
        }
        y
    }

    fn data(n: usize, seed: u64) -> Vec<f64> {
        (0..n).map(|i| (((i as u64 * 2_654_435_761 + seed * 97) % 2001) as f64 / 1000.0) - 1.0).collect()
    }

    /// Odd and even sizes (partial edge tiles), one and several channels, in f64 (exact to
    /// rounding) and f32 (1e-4 relative).
    #[test]
    fn matches_direct_convolution() {
        for &(b, h, w, cin, cout) in &[(1, 4, 4, 1, 1), (2, 5, 7, 3, 4), (1, 8, 6, 8, 5), (2, 9, 9, 2, 3)] {
            let x = data(b * h * w * cin, 1);
            let f = data(cout * 9 * cin, 2);
            let bias = data(cout, 3);
            let want = direct(&x, &f, &bias, (b, h, w, cin), cout);
            let got = conv3x3(&x, &f, Some(&bias), (b, h, w, cin), cout);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-12 * e.abs().max(1.0), "f64 {g} vs {e} at {:?}", (b, h, w, cin, cout));
            }
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let f32s: Vec<f32> = f.iter().map(|&v| v as f32).collect();
            let b32: Vec<f32> = bias.iter().map(|&v| v as f32).collect();
            let got = conv3x3(&x32, &f32s, Some(&b32), (b, h, w, cin), cout);
            for (g, e) in got.iter().zip(&want) {
                assert!(((*g as f64) - e).abs() < 1e-4 * e.abs().max(1.0), "f32 {g} vs {e}");
            }
        }
    }

    /// The weight gradient, every filter tap, against its direct float64 sum
    /// `dW[k, i, j, c] = Σ dy[n, y, x, k] · x[n, y + i − 1, x + j − 1, c]`; f32 within 1e-4.
    #[test]
    fn weight_gradient_matches_direct_sums() {
        for &(b, h, w, cin, cout) in &[(1, 4, 4, 1, 1), (2, 5, 7, 3, 4), (1, 8, 6, 8, 5)] {
            let x = data(b * h * w * cin, 7);
            let dy = data(b * h * w * cout, 8);
            let got = conv3x3_weight_grad(&x, &dy, (b, h, w, cin), cout);
            for k in 0..cout {
                for i in 0..3 {
                    for j in 0..3 {
                        for c in 0..cin {
                            let mut want = 0.0;
                            for n in 0..b {
                                for oy in 0..h {
                                    for ox in 0..w {
                                        let (iy, ix) = (oy as isize + i as isize - 1, ox as isize + j as isize - 1);
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                            continue;
                                        }
                                        want += dy[((n * h + oy) * w + ox) * cout + k]
                                            * x[((n * h + iy as usize) * w + ix as usize) * cin + c];
                                    }
                                }
                            }
                            let g = got[((k * 3 + i) * 3 + j) * cin + c];
                            assert!(
                                (g - want).abs() < 1e-10 * want.abs().max(1.0),
                                "{g} vs {want} at {:?}",
                                (k, i, j, c)
                            );
                        }
                    }
                }
            }
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let dy32: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
            let got32 = conv3x3_weight_grad(&x32, &dy32, (b, h, w, cin), cout);
            for (a, e) in got32.iter().zip(&got) {
                assert!(((*a as f64) - e).abs() < 1e-4 * e.abs().max(1.0), "f32 {a} vs {e}");
            }
        }
    }

    /// The flipped filters give the input gradient: ⟨conv(x), dy⟩ = ⟨x, conv_flip(dy)⟩.
    #[test]
    fn flipped_filters_give_the_adjoint() {
        let (b, h, w, cin, cout) = (2, 6, 5, 3, 4);
        let x = data(b * h * w * cin, 4);
        let f = data(cout * 9 * cin, 5);
        let dy = data(b * h * w * cout, 6);
        let y = conv3x3(&x, &f, None, (b, h, w, cin), cout);
        let dx = conv3x3(&dy, &flip_filters(&f, cin, cout), None, (b, h, w, cout), cin);
        let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
        let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
        assert!((lhs - rhs).abs() < 1e-10 * lhs.abs().max(1.0), "{lhs} vs {rhs}");
    }
}
