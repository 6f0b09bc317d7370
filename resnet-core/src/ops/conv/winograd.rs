//! Winograd's minimal filtering F(m×m, 3×3) for the 3×3, stride-1, padding-1 convolutions that
//! make up three quarters of ResNet-18's arithmetic (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", 2016), with output tiles of m = 2, 3 or 4.
//!
//! Each m×m output tile is `Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for the α×α input tile `d` around it
//! (α = m + 2) and the 3×3 filter `g`. Over a batch this becomes: transform every input tile
//! (`V`, α² matrices of tiles × in-channels), transform every filter (`U`, α² matrices of in ×
//! out channels), α² matrix products `M_e = V_e · U_e`, and transform every product tile back;
//! each parallel task does all three for its own run of tile rows ([`Bands`]), so its
//! temporaries stay in cache. Where this crate's own kernel runs the products ([`panels`]: f32
//! at the AVX2 tier by default), the filters are packed once per convolution and each task
//! takes its tiles a block at a time ([`BLOCK_BYTES`]), so they stay in the core's own cache.
//! Per output pixel and channel pair the products do α²/m² multiplies where direct convolution
//! does 9: 4 for F(2×2) (2.25× fewer), 2.78 for F(3×3) (3.24× fewer), 2.25 for F(4×4) (4× fewer),
//! which also blows the data up less (2.25× against 4×) at the price of larger transform
//! constants, so more rounding. F(3×3) is for the images that 2- and 4-pixel tiles cover badly:
//! one 3×3 tile covers a 3×3 image, four cover a 6×6 one. The
//! input gradient of such a convolution is again one (with the filters flipped and their
//! channel axes swapped), and the weight gradient is the adjoint of the transforms. The model
//! runs its forward on F(2×2) and its gradients on the tile [`Tile::choose`] picks (see
//! `ops::conv`).

use std::mem::MaybeUninit;

use candle_core::WithDType;
use rayon::prelude::*;

use crate::ops::plumbing::matmul::{gemm_strided, matmul_strided};
use crate::ops::plumbing::panels;
use crate::ops::plumbing::scratch;
use crate::ops::plumbing::simd::with_fma;

/// Transformed tiles (inputs and products) a parallel task holds, in elements: about 4 MB of
/// `f32`, so a task's temporaries stay in the L3 cache beside the other core's and the
/// filters' instead of going out to memory and back (at 96 px the whole batch's would be 75 MB).
const TASK_ELEMENTS: usize = 1 << 20;

/// [`TASK_ELEMENTS`] for the weight gradient's tasks (inputs and output gradients transformed):
/// half, so that more of a task's tiles are still in the core's own cache when its products
/// read them, beside the group's sums that every task adds to. Faster in the 96 px and 224 px
/// training steps on the EPYC family 23 model 49, the same at 28 px (BENCHMARKS.md, round 23);
/// the forward and the input gradient keep the larger tasks.
const WEIGHT_GRAD_TASK_ELEMENTS: usize = TASK_ELEMENTS / 2;

/// Transformed tiles (inputs and products) a block of [`panels`]' products holds, in bytes:
/// half a megabyte, the L2 cache of the EPYC family 23 and 25 CPUs, so that a block's tiles are
/// still in the core's own cache when its products and the output transform read them
/// (BENCHMARKS.md, round 24, compares it with a task's 4 MB at once and with blocks of 256 KB
/// and 1 MB).
const BLOCK_BYTES: usize = 1 << 19;

/// Tiles per block of [`BLOCK_BYTES`], for tiles of α² entries of `channels` (input plus output
/// channels): a whole number of the kernel's rows.
fn block_tiles<T>(tr: &Transforms, channels: usize) -> usize {
    let tile = tr.alpha * tr.alpha * channels * std::mem::size_of::<T>();
    (BLOCK_BYTES / tile.max(1)).max(panels::ROWS) / panels::ROWS * panels::ROWS
}

/// Tasks per convolution at least, where the batch has that many tile rows: enough to keep
/// both cores busy, a multiple of [`GROUPS`].
const MIN_TASKS: usize = 8;

/// Partial sums of the weight gradient: runs of tasks, each summed into its own buffer, then
/// added in order. Fixed, so the result does not depend on the number of threads.
const GROUPS: usize = 4;

/// Whether a convolution of this shape runs through Winograd: 3×3, stride 1, padding 1, and an
/// image large enough that the tiles are mostly inside it (below 3×3 other kernels waste less).
pub fn applies(kernel: usize, stride: usize, pad: usize, h: usize, w: usize) -> bool {
    kernel == 3 && stride == 1 && pad == 1 && h >= 3 && w >= 3
}

/// The output tile size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3): 4×4 input tiles.
    F2,
    /// F(3×3, 3×3): 5×5 input tiles.
    F3,
    /// F(4×4, 3×3): 6×6 input tiles.
    F4,
}

/// A tile's transform matrices, row-major: `Bᵀ` (α×α), `G` (α×3), `Aᵀ` (m×α).
struct Transforms {
    m: usize,
    alpha: usize,
    bt: &'static [f64],
    g: &'static [f64],
    at: &'static [f64],
}

#[rustfmt::skip]
const F2: Transforms = Transforms {
    m: 2,
    alpha: 4,
    bt: &[
        1.0, 0.0, -1.0, 0.0,
        0.0, 1.0, 1.0, 0.0,
        0.0, -1.0, 1.0, 0.0,
        0.0, 1.0, 0.0, -1.0,
    ],
    g: &[
        1.0, 0.0, 0.0,
        0.5, 0.5, 0.5,
        0.5, -0.5, 0.5,
        0.0, 0.0, 1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, -1.0,
    ],
};

/// Cook–Toom's construction on the points 0, 1, −1, 2 and ∞ (F(2×2) is the one on 0, 1, −1 and ∞;
/// F(4×4) adds −2, scaled as Lavin & Gray print it). Of the fourth points 2, −2, ½ and −½, 2
/// rounds least in `f32` (`scripts/winograd_points.py`).
#[rustfmt::skip]
const F3: Transforms = Transforms {
    m: 3,
    alpha: 5,
    bt: &[
        2.0, -1.0, -2.0, 1.0, 0.0,
        0.0, -2.0, -1.0, 1.0, 0.0,
        0.0, 2.0, -3.0, 1.0, 0.0,
        0.0, -1.0, 0.0, 1.0, 0.0,
        0.0, 2.0, -1.0, -2.0, 1.0,
    ],
    g: &[
        1.0 / 2.0, 0.0, 0.0,
        -1.0 / 2.0, -1.0 / 2.0, -1.0 / 2.0,
        -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
        1.0 / 6.0, 1.0 / 3.0, 2.0 / 3.0,
        0.0, 0.0, 1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, 2.0, 0.0,
        0.0, 1.0, 1.0, 4.0, 1.0,
    ],
};

#[rustfmt::skip]
const F4: Transforms = Transforms {
    m: 4,
    alpha: 6,
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0,
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0,
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0,
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0,
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0,
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    g: &[
        1.0 / 4.0, 0.0, 0.0,
        -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0,
        -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
        1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0,
        1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0,
        0.0, 0.0, 1.0,
    ],
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0,
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0,
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
};

impl Tile {
    fn transforms(self) -> &'static Transforms {
        match self {
            Tile::F2 => &F2,
            Tile::F3 => &F3,
            Tile::F4 => &F4,
        }
    }

    /// Multiplies per channel pair in the products for an `h × w` image.
    fn products(self, h: usize, w: usize) -> usize {
        let tr = self.transforms();
        h.div_ceil(tr.m) * w.div_ceil(tr.m) * tr.alpha * tr.alpha
    }

    /// The tile with the fewest multiplies in the products for an `h × w` image (the smaller
    /// tile on a tie: smaller transforms, less rounding). 4×4 tiles pay off on images of 4, 7,
    /// 8, 12 or more pixels; 3×3 tiles on images of 3 and 6 (one 3×3 tile covers a 3×3 image in
    /// 25 multiplies, where four 2×2 tiles take 64; four cover a 6×6 one in 100, where nine 2×2
    /// or four 4×4 tiles take 144).
    pub fn choose(h: usize, w: usize) -> Tile {
        [Tile::F3, Tile::F4].into_iter().fold(
            Tile::F2,
            |best, t| {
                if t.products(h, w) < best.products(h, w) {
                    t
                } else {
                    best
                }
            },
        )
    }

    /// The tile for an evaluation-mode forward: [`Tile::choose`]'s, except F(2×2) where that is
    /// F(4×4) on images below 12 pixels a side. On the 7×7 and 4×4 images of a 28 px network
    /// F(4×4)'s larger transforms cost more than its products save (evaluation at 28 px, batch
    /// 256, see BENCHMARKS.md); on 12×12 and 24×24 it is the faster one, and F(3×3) on the 6×6
    /// and 3×3 images of a 96 px network.
    pub fn choose_for_evaluation(h: usize, w: usize) -> Tile {
        match Tile::choose(h, w) {
            Tile::F4 if h.min(w) < 12 => Tile::F2,
            tile => tile,
        }
    }
}

/// The matrix as `T`, transposed when asked.
fn matrix<T: WithDType>(m: &[f64], rows: usize, cols: usize, transpose: bool) -> Vec<T> {
    if transpose {
        (0..cols * rows).map(|i| T::from_f64(m[(i % rows) * cols + i / rows])).collect()
    } else {
        m.iter().map(|&v| T::from_f64(v)).collect()
    }
}

/// `dst (rows × cols) = mat (rows × inner) · src (inner × cols)`, every entry a vector of `c`
/// channels, source entry `e` at `src[e·stride..]`, destination entry `e` at `dst[e·dst_stride..]`;
/// zero coefficients are skipped.
#[inline(always)]
fn left<T: WithDType>(
    mat: &[T],
    dims: (usize, usize, usize),
    (src, stride): (&[T], usize),
    (dst, dst_stride): (&mut [T], usize),
    c: usize,
) {
    let (_, inner, cols) = dims;
    combine(dims, (src, stride), (dst, dst_stride), c, |i, k, j| (mat[i * inner + k], k * cols + j));
}

/// `dst (rows × cols) = src (rows × inner) · matᵀ` with `mat` `(cols × inner)`, entries as in
/// [`left`].
#[inline(always)]
fn right<T: WithDType>(
    mat: &[T],
    dims: (usize, usize, usize),
    (src, stride): (&[T], usize),
    (dst, dst_stride): (&mut [T], usize),
    c: usize,
) {
    let (_, inner, _) = dims;
    combine(dims, (src, stride), (dst, dst_stride), c, |i, k, j| (mat[j * inner + k], i * inner + k))
}

/// `dst[i·cols + j] = Σ_k coef · src[entry]` with `(coef, entry) = term(i, k, j)` over the
/// non-zero coefficients; the first term is written, the rest added (no clearing pass).
#[inline(always)]
fn combine<T: WithDType>(
    (rows, inner, cols): (usize, usize, usize),
    (src, stride): (&[T], usize),
    (dst, dst_stride): (&mut [T], usize),
    c: usize,
    term: impl Fn(usize, usize, usize) -> (T, usize),
) {
    for i in 0..rows {
        for j in 0..cols {
            let at = (i * cols + j) * dst_stride;
            let terms = (0..inner)
                .map(|k| term(i, k, j))
                .filter(|&(coef, _)| coef != T::zero())
                .map(|(coef, entry)| (coef, &src[entry * stride..entry * stride + c]));
            sum_of_terms(&mut dst[at..at + c], terms);
        }
    }
}

/// Channels a tile transform holds in registers at a time: one AVX-512 vector of `f32`.
const LANES: usize = 16;

/// Elements from one entry's matrix of transformed tiles to the next's: the `count · c` of the
/// matrix plus one [`LANES`] run, so that the α² matrices do not start a whole number of 4 KB
/// pages apart. A tile is written as one line in each of the α² matrices; had they started at
/// the same offset within a page, all of its lines would fall into one set of the L1 cache.
fn entry_stride(count: usize, c: usize) -> usize {
    count * c + LANES
}

/// Where the tile transforms ([`tiles_in_lanes`], [`tiles_by_passes`]) write: the matrix of
/// each of the α² entries, tile `t`'s `c` channels at element `t · c` of it.
trait Entries<T> {
    /// Entry `e`'s matrix, from its first tile.
    fn entry(&mut self, e: usize) -> &mut [T];
}

/// One buffer holding the entries' matrices `stride` elements apart, as a task's own
/// temporaries are laid out ([`entry_stride`]).
struct Strided<'a, T> {
    buf: &'a mut [T],
    stride: usize,
}

impl<T> Entries<T> for Strided<'_, T> {
    #[inline(always)]
    fn entry(&mut self, e: usize) -> &mut [T] {
        &mut self.buf[e * self.stride..]
    }
}

/// A task's runs of tiles within the entries' matrices of the whole batch ([`whole_tiles`]),
/// one slice per entry.
impl<T> Entries<T> for [&mut [T]] {
    #[inline(always)]
    fn entry(&mut self, e: usize) -> &mut [T] {
        self[e]
    }
}

/// Elements from one input channel's row of transformed filters to the next's: the row's
/// `α² · cout` values, plus one [`LANES`] run where the row is a whole number of 4 KB pages long
/// (F(2×2) with 64 output channels and more, 16 · cout values). The products pack a column block
/// of the rows; rows a whole number of pages apart would all fall into one set of the L1 cache.
fn filter_stride<T>(alpha: usize, cout: usize) -> usize {
    let row = alpha * alpha * cout;
    if (row * std::mem::size_of::<T>()) % 4096 == 0 {
        row + LANES
    } else {
        row
    }
}

/// `Bᵀ d` for F(2×2) on [`LANES`] channels of a column of four entries: the sums [`left`] makes
/// with `Bᵀ`, in its order (a term with coefficient −1 subtracted, which rounds the same).
#[inline(always)]
fn bt_f2<T: WithDType>(d: [[T; LANES]; 4]) -> [[T; LANES]; 4] {
    let mut o = [[T::zero(); LANES]; 4];
    for l in 0..LANES {
        o[0][l] = d[0][l] - d[2][l];
        o[1][l] = d[1][l] + d[2][l];
        o[2][l] = d[2][l] - d[1][l];
        o[3][l] = d[1][l] - d[3][l];
    }
    o
}

/// `Bᵀ d` for F(4×4) on [`LANES`] channels of a column of six entries: the sums [`left`] makes
/// with `Bᵀ`, in its order (products by the coefficients, a coefficient of 1 left out).
#[inline(always)]
fn bt_f4<T: WithDType>(d: [[T; LANES]; 6]) -> [[T; LANES]; 6] {
    let k = |v: f64| T::from_f64(v);
    let (p4, m4, m5, p2, m2, m1) = (k(4.0), k(-4.0), k(-5.0), k(2.0), k(-2.0), k(-1.0));
    let mut o = [[T::zero(); LANES]; 6];
    for l in 0..LANES {
        let [d0, d1, d2, d3, d4, d5] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]];
        o[0][l] = p4 * d0 + m5 * d2 + d4;
        o[1][l] = m4 * d1 + m4 * d2 + d3 + d4;
        o[2][l] = p4 * d1 + m4 * d2 + m1 * d3 + d4;
        o[3][l] = m2 * d1 + m1 * d2 + p2 * d3 + d4;
        o[4][l] = p2 * d1 + m1 * d2 + m2 * d3 + d4;
        o[5][l] = p4 * d1 + m5 * d3 + d5;
    }
    o
}

/// `Bᵀ d` for F(3×3) on [`LANES`] channels of a column of five entries: [`left`]'s sums with
/// `Bᵀ`, in its order.
#[inline(always)]
fn bt_f3<T: WithDType>(d: [[T; LANES]; 5]) -> [[T; LANES]; 5] {
    let k = |v: f64| T::from_f64(v);
    let (p2, m2, m3, m1) = (k(2.0), k(-2.0), k(-3.0), k(-1.0));
    let mut o = [[T::zero(); LANES]; 5];
    for l in 0..LANES {
        let [d0, d1, d2, d3, d4] = [d[0][l], d[1][l], d[2][l], d[3][l], d[4][l]];
        o[0][l] = p2 * d0 + m1 * d1 + m2 * d2 + d3;
        o[1][l] = m2 * d1 + m1 * d2 + d3;
        o[2][l] = p2 * d1 + m3 * d2 + d3;
        o[3][l] = m1 * d1 + d3;
        o[4][l] = p2 * d1 + m1 * d2 + m2 * d3 + d4;
    }
    o
}

/// `out = S d Sᵀ` for tiles `first..first + count` of channels-last `data` `(batch, h, w, c)`,
/// `c` a whole number of [`LANES`], entry-major as [`input_tiles`] lays tiles out: `d` is the
/// `K×K` window at `(step·ty − shift, step·tx − shift)` (zeros outside the image) and `side` is
/// `S` (`A×K`) applied to one column, written out per tile size so its coefficients are
/// constants. A tile's `LANES` channels stay in registers through both sides: the same sums in
/// the same order as two passes of [`left`] and [`right`], so the same bits, at a fraction of
/// the instructions (the passes spend theirs on loop control around 64-channel vectors, not on
/// arithmetic).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tiles_in_lanes<T: WithDType, const K: usize, const A: usize>(
    data: &[T],
    c: usize,
    (step, shift): (usize, usize),
    bands: &Bands,
    (first, count): (usize, usize),
    out: &mut (impl Entries<T> + ?Sized),
    side: impl Fn([[T; LANES]; K]) -> [[T; LANES]; A],
) {
    let (h, w) = (bands.h, bands.w);
    // `S d` for one tile's `LANES` channels, every element written before it is read: cleared
    // once here, not for every tile and channel group (an array this size is cleared by a
    // `memset` call).
    let mut r = [[[T::zero(); LANES]; K]; A];
    let zeros = vec![T::zero(); c];
    for t in 0..count {
        let (n, ty, tx) = bands.tile_at(first + t);
        // Each entry of the window's `c` channels: a pixel of `data`, or zeros outside the image.
        let mut px: [[&[T]; K]; K] = [[&zeros[..]; K]; K];
        for (i, row) in px.iter_mut().enumerate() {
            for (j, entry) in row.iter_mut().enumerate() {
                let (y, x) = ((step * ty + i).wrapping_sub(shift), (step * tx + j).wrapping_sub(shift));
                if y < h && x < w {
                    let at = ((n * h + y) * w + x) * c;
                    *entry = &data[at..at + c];
                }
            }
        }
        for c0 in (0..c).step_by(LANES) {
            // Plain loops and copies, not `array::from_fn` or `try_into`: the hot loop must not
            // call out of the function compiled at the detected vector width.
            // r = S d a column at a time, then S d Sᵀ = r Sᵀ a row at a time, into the entries.
            for j in 0..K {
                let mut col = [[T::zero(); LANES]; K];
                for (i, v) in col.iter_mut().enumerate() {
                    v.copy_from_slice(&px[i][j][c0..c0 + LANES]);
                }
                let col = side(col);
                for (i, value) in col.into_iter().enumerate() {
                    r[i][j] = value;
                }
            }
            for (i, row) in r.iter().enumerate() {
                for (j, entry) in side(*row).iter().enumerate() {
                    let dst = t * c + c0;
                    out.entry(i * A + j)[dst..dst + LANES].copy_from_slice(entry);
                }
            }
        }
    }
}

/// The filters of a [`conv3x3`] with `cin` input and `cout` output channels.
#[derive(Debug, Clone, Copy)]
pub enum Filters<'a, T> {
    /// `(cout, cin, 3, 3)`, the layout weights are stored in: the convolution's own.
    Stored(&'a [T]),
    /// `(cin, cout, 3, 3)`, the stored weights of the convolution whose input gradient this one
    /// is (its `cin` outputs from `cout` inputs): read with the kernel rotated by 180° and the
    /// channel axes swapped.
    Adjoint(&'a [T]),
}

/// `U = G g Gᵀ` for every filter → α² matrices of `(cin, cout)`, laid out as
/// [`transform_rows`] lays them out.
fn transform_filters<T: WithDType>(filters: Filters<'_, T>, cin: usize, cout: usize, tr: &Transforms) -> Vec<T> {
    match filters {
        // Output channel o's nine weights from input channel c are one run at (o · cin + c) · 9.
        Filters::Stored(w) => transform_rows(
            |c, rows| {
                for (o, run) in w.chunks_exact(cin * 9).map(|f| &f[c * 9..c * 9 + 9]).enumerate() {
                    for (tap, &v) in run.iter().enumerate() {
                        rows[tap * cout + o] = v;
                    }
                }
            },
            cin,
            cout,
            tr,
        ),
        // Input channel c is the stored filter c, `(cout, 3, 3)` in one block; tap (i, j) reads
        // its tap (2 − i, 2 − j).
        Filters::Adjoint(w) => transform_rows(
            |c, rows| {
                for (o, run) in w[c * cout * 9..(c + 1) * cout * 9].chunks_exact(9).enumerate() {
                    for (tap, &v) in run.iter().enumerate() {
                        rows[(8 - tap) * cout + o] = v;
                    }
                }
            },
            cin,
            cout,
            tr,
        ),
    }
}

/// `U = G g Gᵀ` laid out `(cin, α², cout)` (entry `e`'s `cin × cout` matrix at `e · cout`, its
/// rows [`filter_stride`] apart), `rows(c, g)` writing input channel `c`'s nine taps (row-major) into
/// `g` `(9, cout)`. Input channels in parallel: each one's nine rows (vectors over the output
/// channels) give the α × 3 rows of `G g`, and those the α² rows of `(G g) Gᵀ`, per element the
/// sums [`left`] and then [`right`] make on one filter, in their order.
fn transform_rows<T: WithDType>(
    rows: impl Fn(usize, &mut [T]) + Sync,
    cin: usize,
    cout: usize,
    tr: &Transforms,
) -> Vec<T> {
    let a = tr.alpha;
    let g: Vec<T> = matrix(tr.g, a, 3, false);
    // Every element is written: no clearing pass.
    let mut u = scratch::take(cin * filter_stride::<T>(a, cout));
    u.par_chunks_mut(filter_stride::<T>(a, cout)).enumerate().for_each_init(
        || (vec![T::zero(); 9 * cout], vec![T::zero(); 3 * a * cout]),
        |(f, t), (c, uc)| {
            rows(c, f);
            with_fma(
                #[inline(always)]
                || {
                    // t_(i, k) = Σ_r G[i, r] · g[r, k] (G g), then u_(i, j) = Σ_k G[j, k] · t_(i, k).
                    for (ik, tik) in t.chunks_exact_mut(cout).enumerate() {
                        let (i, k) = (ik / 3, ik % 3);
                        sum_of_terms(tik, (0..3).map(|r| (g[i * 3 + r], &f[(r * 3 + k) * cout..][..cout])));
                    }
                    for (e, out) in uc[..a * a * cout].chunks_exact_mut(cout).enumerate() {
                        let (i, j) = (e / a, e % a);
                        sum_of_terms(out, (0..3).map(|k| (g[j * 3 + k], &t[(i * 3 + k) * cout..][..cout])));
                    }
                },
            );
        },
    );
    u
}

/// `dst = Σ coef · src` over the terms with non-zero coefficients, the first written and the
/// rest added in order (no clearing pass); zero when there are none.
#[inline(always)]
fn sum_of_terms<'s, T: WithDType + 's>(dst: &mut [T], terms: impl Iterator<Item = (T, &'s [T])>) {
    let mut first = true;
    for (coef, s) in terms {
        if coef == T::zero() {
            continue;
        }
        if first {
            for (o, &v) in dst.iter_mut().zip(s) {
                *o = coef * v;
            }
            first = false;
        } else {
            for (o, &v) in dst.iter_mut().zip(s) {
                *o += coef * v;
            }
        }
    }
    if first {
        dst.fill(T::zero());
    }
}

/// How a batch's tiles are split into parallel tasks: runs of whole tile rows ("bands", `tw`
/// tiles covering `m` image rows), so a task's output is one contiguous run of image rows. Each
/// task transforms its tiles, runs the α² products on them and transforms them back while they
/// are in cache.
#[derive(Debug, Clone, Copy)]
struct Bands {
    m: usize,
    h: usize,
    w: usize,
    /// Tile rows and columns per image.
    th: usize,
    tw: usize,
    /// Tile rows in the batch.
    count: usize,
    /// Tile rows per task (the last task may have fewer).
    per_task: usize,
}

impl Bands {
    /// Bands for `(batch, h, w)` images whose tasks hold α² entries of `channels` (input plus
    /// output channels) per tile.
    fn new(tr: &Transforms, dims: (usize, usize, usize), channels: usize) -> Bands {
        Self::sized(tr, dims, channels, TASK_ELEMENTS)
    }

    /// [`Bands::new`] with tasks of about `elements` transformed values.
    fn sized(tr: &Transforms, (batch, h, w): (usize, usize, usize), channels: usize, elements: usize) -> Bands {
        let (th, tw) = (h.div_ceil(tr.m), w.div_ceil(tr.m));
        let count = batch * th;
        let band = tr.alpha * tr.alpha * tw * channels;
        let tasks = count.div_ceil((elements / band).max(1)).max(MIN_TASKS).next_multiple_of(GROUPS).min(count);
        Bands { m: tr.m, h, w, th, tw, count, per_task: count.div_ceil(tasks.max(1)).max(1) }
    }

    fn tasks(&self) -> usize {
        self.count.div_ceil(self.per_task)
    }

    /// The first tile and the number of tiles of a task.
    fn tiles(&self, task: usize) -> (usize, usize) {
        let first = task * self.per_task;
        let end = (first + self.per_task).min(self.count);
        (first * self.tw, (end - first) * self.tw)
    }

    /// Where band `b`'s image rows start in an image tensor of `c` channels.
    fn offset(&self, b: usize, c: usize) -> usize {
        let (n, ty) = (b / self.th, b % self.th);
        (n * self.h + self.m * ty) * self.w * c
    }

    /// A `(batch, h, w, c)` tensor cut into the tasks' runs of rows.
    fn split<'a, T>(&self, mut y: &'a mut [T], c: usize) -> Vec<&'a mut [T]> {
        let mut parts = Vec::with_capacity(self.tasks());
        for task in 0..self.tasks() {
            let end = ((task + 1) * self.per_task).min(self.count);
            let len =
                if end == self.count { y.len() } else { self.offset(end, c) - self.offset(task * self.per_task, c) };
            let (part, rest) = y.split_at_mut(len);
            parts.push(part);
            y = rest;
        }
        parts
    }

    /// Tile `t` of the batch: `(image, tile row, tile column)`.
    fn tile_at(&self, t: usize) -> (usize, usize, usize) {
        let (n, rest) = (t / (self.th * self.tw), t % (self.th * self.tw));
        (n, rest / self.tw, rest % self.tw)
    }
}

/// `V = Bᵀ d B` for the α×α input tiles `d` (zero outside the image) of tiles `first..first +
/// count`, entry-major: entry `e` of tile `t`, channel `c` at `(e·count + t)·cin + c`.
#[inline(always)]
fn input_tiles<T: WithDType>(
    x: &[T],
    cin: usize,
    tr: &Transforms,
    bands: &Bands,
    (first, count): (usize, usize),
    v: &mut [T],
) {
    let mut out = Strided { buf: v, stride: entry_stride(count, cin) };
    input_tiles_into(x, cin, tr, bands, (first, count), &mut out);
}

/// [`input_tiles`] into any layout of the entries' matrices.
#[inline(always)]
fn input_tiles_into<T: WithDType>(
    x: &[T],
    cin: usize,
    tr: &Transforms,
    bands: &Bands,
    tiles: (usize, usize),
    out: &mut (impl Entries<T> + ?Sized),
) {
    if cin % LANES == 0 {
        match tr.alpha {
            4 => return tiles_in_lanes(x, cin, (tr.m, 1), bands, tiles, out, bt_f2),
            5 => return tiles_in_lanes(x, cin, (tr.m, 1), bands, tiles, out, bt_f3),
            6 => return tiles_in_lanes(x, cin, (tr.m, 1), bands, tiles, out, bt_f4),
            _ => {}
        }
    }
    input_tiles_by_passes(x, cin, tr, bands, tiles, out);
}

/// [`input_tiles_into`] for any channel count: each tile copied out, then two passes of [`left`]
/// and [`right`] over it (the tests' reference for the path in registers).
#[inline(always)]
fn input_tiles_by_passes<T: WithDType>(
    x: &[T],
    cin: usize,
    tr: &Transforms,
    bands: &Bands,
    tiles: (usize, usize),
    out: &mut (impl Entries<T> + ?Sized),
) {
    let bt: Vec<T> = matrix(tr.bt, tr.alpha, tr.alpha, false);
    tiles_by_passes(x, cin, (tr.m, 1), (tr.alpha, &bt, tr.alpha), bands, tiles, out);
}

/// `out = S d Sᵀ` as [`tiles_in_lanes`] computes it, for any channel count: each `k×k` window
/// copied out, then two passes of [`left`] and [`right`] with `S` (`a×k`, row-major).
#[inline(always)]
fn tiles_by_passes<T: WithDType>(
    data: &[T],
    c: usize,
    (step, shift): (usize, usize),
    (k, s, a): (usize, &[T], usize),
    bands: &Bands,
    (first, count): (usize, usize),
    out: &mut (impl Entries<T> + ?Sized),
) {
    let (h, w) = (bands.h, bands.w);
    let (mut d, mut r) = (vec![T::zero(); k * k * c], vec![T::zero(); a * k * c]);
    let mut tile = vec![T::zero(); a * a * c];
    for t in 0..count {
        let (n, ty, tx) = bands.tile_at(first + t);
        for i in 0..k {
            for j in 0..k {
                let (y, x) = ((step * ty + i).wrapping_sub(shift), (step * tx + j).wrapping_sub(shift));
                let dst = &mut d[(i * k + j) * c..(i * k + j + 1) * c];
                if y < h && x < w {
                    dst.copy_from_slice(&data[((n * h + y) * w + x) * c..][..c]);
                } else {
                    dst.fill(T::zero());
                }
            }
        }
        left(s, (a, k, k), (&d, c), (&mut r, c), c);
        right(s, (a, k, a), (&r, c), (&mut tile, c), c);
        for (e, values) in tile.chunks_exact(c).enumerate() {
            out.entry(e)[t * c..(t + 1) * c].copy_from_slice(values);
        }
    }
}

/// `Aᵀ p` for F(2×2) on [`LANES`] channels of four entries: [`left`]'s sums with `Aᵀ`, in its
/// order.
#[inline(always)]
fn at_f2<T: WithDType>(p: [[T; LANES]; 4]) -> [[T; LANES]; 2] {
    let mut o = [[T::zero(); LANES]; 2];
    for l in 0..LANES {
        o[0][l] = p[0][l] + p[1][l] + p[2][l];
        o[1][l] = p[1][l] - p[2][l] - p[3][l];
    }
    o
}

/// `Aᵀ p` for F(3×3) on [`LANES`] channels of five entries: [`left`]'s sums with `Aᵀ`, in its
/// order.
#[inline(always)]
fn at_f3<T: WithDType>(p: [[T; LANES]; 5]) -> [[T; LANES]; 3] {
    let k = |v: f64| T::from_f64(v);
    let (m1, p2, p4) = (k(-1.0), k(2.0), k(4.0));
    let mut o = [[T::zero(); LANES]; 3];
    for l in 0..LANES {
        let [p0, p1, p2_, p3, p4_] = [p[0][l], p[1][l], p[2][l], p[3][l], p[4][l]];
        o[0][l] = p0 + p1 + p2_ + p3;
        o[1][l] = p1 + m1 * p2_ + p2 * p3;
        o[2][l] = p1 + p2_ + p4 * p3 + p4_;
    }
    o
}

/// `Aᵀ p` for F(4×4) on [`LANES`] channels of six entries: [`left`]'s sums with `Aᵀ`, in its
/// order.
#[inline(always)]
fn at_f4<T: WithDType>(p: [[T; LANES]; 6]) -> [[T; LANES]; 4] {
    let k = |v: f64| T::from_f64(v);
    let (m1, p2, m2, p4, p8, m8) = (k(-1.0), k(2.0), k(-2.0), k(4.0), k(8.0), k(-8.0));
    let mut o = [[T::zero(); LANES]; 4];
    for l in 0..LANES {
        let [p0, p1, p2_, p3, p4_, p5] = [p[0][l], p[1][l], p[2][l], p[3][l], p[4][l], p[5][l]];
        o[0][l] = p0 + p1 + p2_ + p3 + p4_;
        o[1][l] = p1 + m1 * p2_ + p2 * p3 + m2 * p4_;
        o[2][l] = p1 + p2_ + p4 * p3 + p4 * p4_;
        o[3][l] = p1 + m1 * p2_ + p8 * p3 + m8 * p4_ + p5;
    }
    o
}

/// What the output transform does to each output value before writing it: add the bias, then
/// the residual (the tensor of the output's shape that a residual block adds to its last
/// convolution), then ReLU, each where asked. The same sums, in the same order, as writing the
/// convolution's output plus bias and then adding the residual and clipping in a pass of its own.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a, T> {
    pub bias: Option<&'a [T]>,
    pub residual: Option<&'a [T]>,
    pub relu: bool,
}

impl<T> Epilogue<'_, T> {
    /// Nothing: the products as they are.
    pub fn none() -> Self {
        Epilogue { bias: None, residual: None, relu: false }
    }
}

/// An output pixel's channels `src` through the epilogue into `dst` (memory not read: the output
/// is not cleared before the transforms write it); the pixel's residual starts at `at`.
#[inline(always)]
fn epilogue<T: WithDType>(dst: &mut [MaybeUninit<T>], src: &[T], (epi, at): (&Epilogue<'_, T>, usize)) {
    let relu = epi.relu;
    let out = |t: T| if relu && t < T::zero() { T::zero() } else { t };
    let n = dst.len();
    match (epi.bias, epi.residual) {
        (Some(b), Some(r)) => {
            for ((d, &v), (&bv, &rv)) in dst.iter_mut().zip(src).zip(b.iter().zip(&r[at..at + n])) {
                d.write(out(v + bv + rv));
            }
        }
        (Some(b), None) => {
            for ((d, &v), &bv) in dst.iter_mut().zip(src).zip(b) {
                d.write(out(v + bv));
            }
        }
        (None, Some(r)) => {
            for ((d, &v), &rv) in dst.iter_mut().zip(src).zip(&r[at..at + n]) {
                d.write(out(v + rv));
            }
        }
        (None, None) => {
            for (d, &v) in dst.iter_mut().zip(src) {
                d.write(out(v));
            }
        }
    }
}

/// [`epilogue`] on the [`LANES`] channels from `c0` of one pixel, held in an array: the same
/// sums in the same order, each step a plain loop over the lanes so that it runs as vector
/// instructions (the slice form ran one element at a time).
#[inline(always)]
fn epilogue_lanes<T: WithDType>(
    dst: &mut [MaybeUninit<T>],
    px: &[T; LANES],
    (epi, c0, at): (&Epilogue<'_, T>, usize, usize),
) {
    let mut o = *px;
    if let Some(b) = epi.bias {
        let b = &b[c0..c0 + LANES];
        for l in 0..LANES {
            o[l] += b[l];
        }
    }
    if let Some(r) = epi.residual {
        let r = &r[at..at + LANES];
        for l in 0..LANES {
            o[l] += r[l];
        }
    }
    if epi.relu {
        for v in o.iter_mut() {
            if *v < T::zero() {
                *v = T::zero();
            }
        }
    }
    for (d, v) in dst[..LANES].iter_mut().zip(o) {
        d.write(v);
    }
}

/// `Y = Aᵀ M A` (+ bias, then ReLU) for tiles `first..first + count` from their products `prod`
/// (entry-major as [`input_tiles`] lays tiles out, entry `e` of the first tile at `e·estride`),
/// into `out`, the task's image rows, which start at element `base` of the batch's output.
#[inline(always)]
fn output_tiles<T: WithDType>(
    prod: (&[T], usize),
    cout: usize,
    tr: &Transforms,
    bands: &Bands,
    tiles: (usize, usize),
    epi: &Epilogue<'_, T>,
    dst: (&mut [MaybeUninit<T>], usize),
) {
    if cout % LANES == 0 {
        match tr.alpha {
            4 => return output_tiles_lanes::<T, 4, 2>(prod, cout, bands, tiles, epi, dst, at_f2),
            5 => return output_tiles_lanes::<T, 5, 3>(prod, cout, bands, tiles, epi, dst, at_f3),
            6 => return output_tiles_lanes::<T, 6, 4>(prod, cout, bands, tiles, epi, dst, at_f4),
            _ => {}
        }
    }
    output_tiles_by_passes(prod, cout, tr, bands, tiles, epi, dst);
}

/// [`output_tiles`] for any channel count: two passes of [`left`] and [`right`] per tile.
#[inline(always)]
fn output_tiles_by_passes<T: WithDType>(
    (prod, estride): (&[T], usize),
    cout: usize,
    tr: &Transforms,
    bands: &Bands,
    tiles: (usize, usize),
    epi: &Epilogue<'_, T>,
    dst: (&mut [MaybeUninit<T>], usize),
) {
    let (m, a, h, w) = (tr.m, tr.alpha, bands.h, bands.w);
    let ((first, count), (out, base)) = (tiles, dst);
    let at: Vec<T> = matrix(tr.at, m, a, false);
    let (mut s, mut o) = (vec![T::zero(); m * a * cout], vec![T::zero(); m * m * cout]);
    for t in 0..count {
        let (n, ty, tx) = bands.tile_at(first + t);
        left(&at, (m, a, a), (&prod[t * cout..], estride), (&mut s, cout), cout);
        right(&at, (m, a, m), (&s, cout), (&mut o, cout), cout);
        for i in 0..m.min(h - m * ty) {
            let row = (n * h + m * ty + i) * w * cout - base;
            for j in 0..m.min(w - m * tx) {
                let at = row + (m * tx + j) * cout;
                epilogue(&mut out[at..at + cout], &o[(i * m + j) * cout..(i * m + j + 1) * cout], (epi, base + at));
            }
        }
    }
}

/// [`output_tiles`] for channel counts that are whole [`LANES`]: a tile's `LANES` channels in
/// registers through both sides of `Aᵀ M A` (`side` is `Aᵀ` on one column of `A` entries, `M`
/// out), the same sums in the same order as the two passes.
#[inline(always)]
fn output_tiles_lanes<T: WithDType, const A: usize, const M: usize>(
    (prod, estride): (&[T], usize),
    cout: usize,
    bands: &Bands,
    (first, count): (usize, usize),
    epi: &Epilogue<'_, T>,
    (out, base): (&mut [MaybeUninit<T>], usize),
    side: impl Fn([[T; LANES]; A]) -> [[T; LANES]; M],
) {
    let (h, w) = (bands.h, bands.w);
    // `Aᵀ M` for one tile's `LANES` channels, cleared once as in `tiles_in_lanes`.
    let mut s = [[[T::zero(); LANES]; A]; M];
    for t in 0..count {
        let (n, ty, tx) = bands.tile_at(first + t);
        let (rows, cols) = (M.min(h - M * ty), M.min(w - M * tx));
        for c0 in (0..cout).step_by(LANES) {
            // Plain loops and copies, as in `tiles_in_lanes`.
            let load = |e: usize, v: &mut [T; LANES]| {
                let at = e * estride + t * cout + c0;
                v.copy_from_slice(&prod[at..at + LANES]);
            };
            // s = Aᵀ M a column at a time, then Y = s A a row at a time.
            #[allow(clippy::needless_range_loop)] // `j` is a column: it indexes the inner axis of `s`
            for j in 0..A {
                let mut col = [[T::zero(); LANES]; A];
                for (i, v) in col.iter_mut().enumerate() {
                    load(i * A + j, v);
                }
                let col = side(col);
                for (i, value) in col.into_iter().enumerate() {
                    s[i][j] = value;
                }
            }
            for (i, row) in s.iter().enumerate().take(rows) {
                let y = side(*row);
                let line = (n * h + M * ty + i) * w * cout - base;
                for (j, px) in y.iter().enumerate().take(cols) {
                    let at = line + (M * tx + j) * cout + c0;
                    epilogue_lanes(&mut out[at..at + LANES], px, (epi, c0, base + at));
                }
            }
        }
    }
}

/// Whether a convolution's products run over all of the batch's tiles at once, one product per
/// entry, rather than per task: where the tiles are few against the channels (the last stages
/// of a small batch), a task's products are a few rows against an entry's whole `cin × cout`
/// matrix, which the matrix kernels pack anew for every task, and the weight gradient's partial
/// sums of that size are added to a few rows at a time. Chosen for the weight gradient when all
/// of the batch's transformed tiles take no more room than [`GROUPS`] such matrices, and for the
/// convolution when they take less: at equality (the 14² gradients at 224 px, the 4×4×128 ones
/// at 28 px) its per-task products are the faster ones, the weight gradient's are not.
fn gathered(tiles: usize, cin: usize, cout: usize, weight_grad: bool) -> bool {
    let (room, sums) = (tiles * (cin + cout), GROUPS * cin * cout);
    room < sums || (weight_grad && room == sums)
}

/// The transforms of every tile of the batch, entry-major over all of them (entry `e`'s
/// `tiles × c` matrix at `e · entry_stride(tiles, c)`): each task transforms its own tiles
/// straight into their rows of every entry's matrix (`transform(tiles, entries)`, one slice per
/// entry).
fn whole_tiles<T: WithDType>(
    bands: &Bands,
    entries: usize,
    c: usize,
    transform: impl Fn((usize, usize), &mut [&mut [T]]) + Sync,
) -> Vec<T> {
    let stride = entry_stride(bands.count * bands.tw, c);
    // Every element a task's transform reaches is written: its tiles' rows of every entry. The
    // [`LANES`] elements past each matrix are never read.
    let mut whole = scratch::take(entries * stride);
    let mut parts: Vec<Vec<&mut [T]>> = (0..bands.tasks()).map(|_| Vec::with_capacity(entries)).collect();
    for matrix in whole.chunks_exact_mut(stride) {
        let mut rest = matrix;
        for (task, part) in parts.iter_mut().enumerate() {
            let (_, count) = bands.tiles(task);
            let (rows, tail) = rest.split_at_mut(count * c);
            part.push(rows);
            rest = tail;
        }
    }
    parts.into_par_iter().enumerate().for_each(|(task, mut part)| {
        with_fma(
            #[inline(always)]
            || transform(bands.tiles(task), &mut part),
        );
    });
    whole
}

/// [`whole_tiles`] of the input: `V` for every tile of the batch.
fn whole_input_tiles<T: WithDType>(x: &[T], cin: usize, tr: &Transforms, bands: &Bands) -> Vec<T> {
    whole_tiles(
        bands,
        tr.alpha * tr.alpha,
        cin,
        #[inline(always)]
        |tiles, out| input_tiles_into(x, cin, tr, bands, tiles, out),
    )
}

/// The 3×3 convolution (stride 1, padding 1) of channels-last `x` `(batch, h, w, cin)` with
/// `filters`, through `epi` (bias, residual, ReLU; a residual has the output's shape); returns
/// `(batch, h, w, cout)`.
pub fn conv3x3<T: WithDType>(
    x: &[T],
    filters: Filters<'_, T>,
    epi: Epilogue<'_, T>,
    dims: (usize, usize, usize, usize),
    cout: usize,
    tile: Tile,
) -> Vec<T> {
    conv3x3_in_blocks(x, filters, epi, dims, cout, (tile, None))
}

/// [`conv3x3`], its tasks' tiles taken `block` at a time where [`panels`] run the products
/// ([`block_tiles`]'s number without one).
fn conv3x3_in_blocks<T: WithDType>(
    x: &[T],
    filters: Filters<'_, T>,
    epi: Epilogue<'_, T>,
    (batch, h, w, cin): (usize, usize, usize, usize),
    cout: usize,
    (tile, block): (Tile, Option<usize>),
) -> Vec<T> {
    if let Some(r) = epi.residual {
        assert_eq!(r.len(), batch * h * w * cout, "conv3x3: a residual of another shape than the output");
    }
    let tr = tile.transforms();
    let a = tr.alpha;
    let u = transform_filters(filters, cin, cout, tr);
    let bands = Bands::new(tr, (batch, h, w), cin + cout);
    let total = bands.count * bands.tw;
    // Y = Aᵀ M A (+ bias, then ReLU) for a task's tiles into its rows `out`, from their products
    // (the first tile's entries `estride` apart).
    let output = |task: usize, out: &mut [MaybeUninit<T>], prod: (&[T], usize)| {
        let (tiles, base) = (bands.tiles(task), bands.offset(task * bands.per_task, cout));
        with_fma(
            #[inline(always)]
            || output_tiles(prod, cout, tr, &bands, tiles, &epi, (out, base)),
        );
    };
    // The filters packed once for all the tasks' products where this CPU runs our own kernel
    // (`panels`), and the tasks' tiles then taken a block at a time.
    let width = panels::width::<T>(cout, cin).filter(|_| !gathered(total, cin, cout, false));
    let packed = width.map(|width| panels::pack(&u, (filter_stride::<T>(a, cout), cout), a * a, (cin, cout), width));
    let fill = |dst: &mut [MaybeUninit<T>]| {
        if gathered(total, cin, cout, false) {
            // V for every tile, M_e = V_e · U_e as one product per entry (entries in parallel), then
            // each task's tiles transformed back from M.
            let v = whole_input_tiles(x, cin, tr, &bands);
            let (vs, ps) = (entry_stride(total, cin), entry_stride(total, cout));
            let mut prod = scratch::take(a * a * ps);
            prod.par_chunks_mut(ps).enumerate().for_each(|(e, pe)| {
                matmul_strided(
                    (total, cout, cin),
                    &v[e * vs..],
                    cin,
                    &u[e * cout..],
                    filter_stride::<T>(a, cout),
                    pe,
                    cout,
                );
            });
            scratch::give(v);
            bands.split(dst, cout).into_par_iter().enumerate().for_each(|(task, out)| {
                let first = bands.tiles(task).0;
                output(task, out, (&prod[first * cout..], ps));
            });
            scratch::give(prod);
            return;
        }
        // Each task's tiles a block at a time where this crate's kernel runs the products, else
        // the whole task as one block: V (α² × tiles × cin), the products M_e = V_e · U_e (tiles
        // × cout) for every entry e and the output transform, while the block is in cache.
        let block = match packed {
            Some(_) => block.unwrap_or_else(|| block_tiles::<T>(tr, cin + cout)),
            None => bands.per_task * bands.tw,
        }
        .max(1);
        bands.split(dst, cout).into_par_iter().enumerate().for_each(|(task, out)| {
            let (first, count) = bands.tiles(task);
            let base = bands.offset(task * bands.per_task, cout);
            let mut v = scratch::take(a * a * entry_stride(block.min(count), cin));
            let mut prod = scratch::take(a * a * entry_stride(block.min(count), cout));
            for start in (0..count).step_by(block) {
                let tiles = (first + start, block.min(count - start));
                with_fma(
                    #[inline(always)]
                    || input_tiles(x, cin, tr, &bands, tiles, &mut v),
                );
                let (vs, ps) = (entry_stride(tiles.1, cin), entry_stride(tiles.1, cout));
                for e in 0..a * a {
                    let (ve, pe) = (&v[e * vs..], &mut prod[e * ps..]);
                    match (&packed, width) {
                        (Some(p), Some(width)) => panels::product(
                            (tiles.1, cout, cin),
                            (ve, cin),
                            &p[e * cin * cout..],
                            (pe, cout),
                            (false, width),
                        ),
                        _ => matmul_strided(
                            (tiles.1, cout, cin),
                            ve,
                            cin,
                            &u[e * cout..],
                            filter_stride::<T>(a, cout),
                            pe,
                            cout,
                        ),
                    }
                }
                with_fma(
                    #[inline(always)]
                    || output_tiles((&prod, ps), cout, tr, &bands, tiles, &epi, (&mut *out, base)),
                );
            }
            scratch::give(v);
            scratch::give(prod);
        });
    };
    // SAFETY: the output transform writes every element: the tiles cover every pixel of every
    // image, and each task writes its own rows.
    let y = unsafe { scratch::written(batch * h * w * cout, fill) };
    scratch::give(u);
    if let Some(p) = packed {
        scratch::give(p);
    }
    y
}

/// `A g` for F(2×2) on [`LANES`] channels of two gradient entries (`A` = `Aᵀ` transposed,
/// 4×2): [`left`]'s sums with `A`, in its order.
#[inline(always)]
fn a_f2<T: WithDType>(g: [[T; LANES]; 2]) -> [[T; LANES]; 4] {
    let m1 = T::from_f64(-1.0);
    let mut o = [[T::zero(); LANES]; 4];
    for l in 0..LANES {
        o[0][l] = g[0][l];
        o[1][l] = g[0][l] + g[1][l];
        o[2][l] = g[0][l] - g[1][l];
        o[3][l] = m1 * g[1][l];
    }
    o
}

/// `A g` for F(3×3) on [`LANES`] channels of three gradient entries (5×3): [`left`]'s sums with
/// `A`, in its order.
#[inline(always)]
fn a_f3<T: WithDType>(g: [[T; LANES]; 3]) -> [[T; LANES]; 5] {
    let k = |v: f64| T::from_f64(v);
    let (m1, p2, p4) = (k(-1.0), k(2.0), k(4.0));
    let mut o = [[T::zero(); LANES]; 5];
    for l in 0..LANES {
        let [g0, g1, g2] = [g[0][l], g[1][l], g[2][l]];
        o[0][l] = g0;
        o[1][l] = g0 + g1 + g2;
        o[2][l] = g0 + m1 * g1 + g2;
        o[3][l] = g0 + p2 * g1 + p4 * g2;
        o[4][l] = g2;
    }
    o
}

/// `A g` for F(4×4) on [`LANES`] channels of four gradient entries (6×4): [`left`]'s sums with
/// `A`, in its order.
#[inline(always)]
fn a_f4<T: WithDType>(g: [[T; LANES]; 4]) -> [[T; LANES]; 6] {
    let k = |v: f64| T::from_f64(v);
    let (m1, p2, m2, p4, p8, m8) = (k(-1.0), k(2.0), k(-2.0), k(4.0), k(8.0), k(-8.0));
    let mut o = [[T::zero(); LANES]; 6];
    for l in 0..LANES {
        let [g0, g1, g2, g3] = [g[0][l], g[1][l], g[2][l], g[3][l]];
        o[0][l] = g0;
        o[1][l] = g0 + g1 + g2 + g3;
        o[2][l] = g0 + m1 * g1 + g2 + m1 * g3;
        o[3][l] = g0 + p2 * g1 + p4 * g2 + p8 * g3;
        o[4][l] = g0 + m2 * g1 + p4 * g2 + m8 * g3;
        o[5][l] = g3;
    }
    o
}

/// `dM = A dY Aᵀ` for the m×m output-gradient tiles `first..first + count` of `dy` `(batch, h,
/// w, cout)` (zero outside the image), entry-major as [`input_tiles`] lays tiles out.
#[inline(always)]
fn gradient_tiles<T: WithDType>(
    dy: &[T],
    cout: usize,
    tr: &Transforms,
    bands: &Bands,
    tiles: (usize, usize),
    dm: &mut [T],
) {
    let mut out = Strided { buf: dm, stride: entry_stride(tiles.1, cout) };
    gradient_tiles_into(dy, cout, tr, bands, tiles, &mut out);
}

/// [`gradient_tiles`] into any layout of the entries' matrices.
#[inline(always)]
fn gradient_tiles_into<T: WithDType>(
    dy: &[T],
    cout: usize,
    tr: &Transforms,
    bands: &Bands,
    tiles: (usize, usize),
    dm: &mut (impl Entries<T> + ?Sized),
) {
    if cout % LANES == 0 {
        match tr.alpha {
            4 => return tiles_in_lanes::<T, 2, 4>(dy, cout, (2, 0), bands, tiles, dm, a_f2),
            5 => return tiles_in_lanes::<T, 3, 5>(dy, cout, (3, 0), bands, tiles, dm, a_f3),
            6 => return tiles_in_lanes::<T, 4, 6>(dy, cout, (4, 0), bands, tiles, dm, a_f4),
            _ => {}
        }
    }
    gradient_tiles_by_passes(dy, cout, tr, bands, tiles, dm);
}

/// [`gradient_tiles_into`] for any channel count: each tile copied out, then two passes of
/// [`left`] and [`right`] (the tests' reference for the path in registers).
#[inline(always)]
fn gradient_tiles_by_passes<T: WithDType>(
    dy: &[T],
    cout: usize,
    tr: &Transforms,
    bands: &Bands,
    tiles: (usize, usize),
    dm: &mut (impl Entries<T> + ?Sized),
) {
    let a_mat: Vec<T> = matrix(tr.at, tr.m, tr.alpha, true);
    tiles_by_passes(dy, cout, (tr.m, 0), (tr.m, &a_mat, tr.alpha), bands, tiles, dm);
}

/// The weight gradient of [`conv3x3`]: `dW (cout, cin, 3, 3)` (the stored layout) from the input `x (batch, h, w,
/// cin)` and the output gradient `dy (batch, h, w, cout)`. The adjoint of the forward's
/// transforms: `dW = Gᵀ [Σ_tiles (A dY Aᵀ) ⊙ (Bᵀ d B)] G`, the sum over a task's tiles being α²
/// products of `(cout × tiles) · (tiles × cin)`, added up over the tasks of a group and then
/// over the groups in order.
pub fn conv3x3_weight_grad<T: WithDType>(
    x: &[T],
    dy: &[T],
    (batch, h, w, cin): (usize, usize, usize, usize),
    cout: usize,
    tile: Tile,
) -> Vec<T> {
    let tr = tile.transforms();
    let a = tr.alpha;
    let bands = Bands::sized(tr, (batch, h, w), cin + cout, WEIGHT_GRAD_TASK_ELEMENTS);
    let total = bands.count * bands.tw;
    let q = if gathered(total, cin, cout, true) {
        // Q_e = dM_eᵀ · V_e (cout × cin) over every tile as one product per entry, entries in
        // parallel.
        let v = whole_input_tiles(x, cin, tr, &bands);
        let dm = whole_tiles(
            &bands,
            a * a,
            cout,
            #[inline(always)]
            |tiles, out| gradient_tiles_into(dy, cout, tr, &bands, tiles, out),
        );
        let (vs, ds) = (entry_stride(total, cin), entry_stride(total, cout));
        // Every element is written: no clearing pass.
        let mut q = scratch::take(a * a * cin * cout);
        // The gemm crate's products: this crate's kernel reads `dm`'s columns in place, and
        // over a whole batch of tiles they are too long to stay in cache.
        q.par_chunks_mut(cin * cout).enumerate().for_each(|(e, qe)| {
            gemm_strided((cout, cin, total), &dm[e * ds..], (1, cout), &v[e * vs..], (cin, 1), qe, cin, false, false);
        });
        scratch::give(v);
        scratch::give(dm);
        q
    } else {
        grouped_sums(x, dy, (cin, cout), tr, &bands)
    };
    let dw = transform_weight_grad(&q, cin, cout, tr);
    scratch::give(q);
    dw
}

/// `q (cout × cin) += dmᵀ · v` over a task's `tiles` tiles of `dm` `(tiles × cout)` and `v`
/// `(tiles × cin)`: this crate's kernel where [`panels::width`] says so, else the gemm crate's.
fn add_products_over_tiles<T: WithDType>((cout, cin, tiles): (usize, usize, usize), dm: &[T], v: &[T], q: &mut [T]) {
    if let Some(width) = panels::width::<T>(cin, tiles) {
        panels::transposed_product((cout, cin, tiles), (dm, cout), (v, cin), (q, cin), (true, width));
    } else {
        gemm_strided((cout, cin, tiles), dm, (1, cout), v, (cin, 1), q, cin, true, false);
    }
}

/// `Q_e = Σ_tiles dM_eᵀ · V_e` `(cout × cin)` for every entry `e` by tasks: each group of tasks sums its tiles
/// into a buffer of its own, and the groups' buffers are added in order.
fn grouped_sums<T: WithDType>(
    x: &[T],
    dy: &[T],
    (cin, cout): (usize, usize),
    tr: &Transforms,
    bands: &Bands,
) -> Vec<T> {
    let a = tr.alpha;
    let tasks = bands.tasks();
    let per_group = tasks.div_ceil(GROUPS).max(1);
    let sums: Vec<Vec<T>> = (0..tasks.div_ceil(per_group))
        .into_par_iter()
        .map(|group| {
            let mut q = vec![T::zero(); a * a * cin * cout];
            for task in group * per_group..((group + 1) * per_group).min(tasks) {
                let (first, count) = bands.tiles(task);
                let mut v = scratch::take(a * a * entry_stride(count, cin));
                let mut dm = scratch::take(a * a * entry_stride(count, cout));
                with_fma(
                    #[inline(always)]
                    || {
                        input_tiles(x, cin, tr, bands, (first, count), &mut v);
                        gradient_tiles(dy, cout, tr, bands, (first, count), &mut dm);
                    },
                );
                // Q_e (cout × cin) += dM_eᵀ · V_e.
                for e in 0..a * a {
                    let (dme, ve) = (&dm[e * entry_stride(count, cout)..], &v[e * entry_stride(count, cin)..]);
                    add_products_over_tiles((cout, cin, count), dme, ve, &mut q[e * cin * cout..]);
                }
                scratch::give(v);
                scratch::give(dm);
            }
            q
        })
        .collect();
    // No tiles (an empty batch): no sums, a zero gradient.
    let mut q = sums.first().cloned().unwrap_or_else(|| vec![T::zero(); a * a * cin * cout]);
    q.par_chunks_mut(cout).enumerate().for_each(|(row, acc)| {
        for s in sums.iter().skip(1) {
            for (a, &v) in acc.iter_mut().zip(&s[row * cout..(row + 1) * cout]) {
                *a += v;
            }
        }
    });
    q
}

/// `dW = Gᵀ Q G` per output channel (vectors over cin): the α² sums `Q (α², cout, cin)` of the
/// transformed domain → `dW (cout, cin, 3, 3)`, each output channel's `cin × 3 × 3` weights made
/// tap-major in a buffer of its own and written in place.
fn transform_weight_grad<T: WithDType>(q: &[T], cin: usize, cout: usize, tr: &Transforms) -> Vec<T> {
    let a = tr.alpha;
    let gt: Vec<T> = matrix(tr.g, a, 3, true);
    let mut dw = scratch::take(cout * cin * 9);
    dw.par_chunks_mut(cin * 9).enumerate().for_each_init(
        || (vec![T::zero(); 3 * a * cin], vec![T::zero(); 9 * cin]),
        |(t, taps), (k, row)| {
            with_fma(
                #[inline(always)]
                || {
                    left(&gt, (3, a, a), (&q[k * cin..], cout * cin), (t, cin), cin);
                    right(&gt, (3, a, 3), (t, cin), (taps, cin), cin);
                },
            );
            for (c, weights) in row.chunks_exact_mut(9).enumerate() {
                for (tap, w) in weights.iter_mut().enumerate() {
                    *w = taps[tap * cin + c];
                }
            }
        },
    );
    dw
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

    /// The epilogue of a convolution with a bias and nothing else.
    fn with_bias<T>(bias: &[T]) -> Epilogue<'_, T> {
        Epilogue { bias: Some(bias), ..Epilogue::none() }
    }

    /// A residual added in the output transform gives the bits of the convolution plus bias
    /// written out and then added to the residual and clipped (the residual block's add+ReLU).
    #[test]
    fn a_residual_in_the_epilogue_equals_the_add_and_relu_after() {
        for tile in TILES {
            let (b, h, w, cin, cout) = (2, 7, 6, 16, 32);
            let x: Vec<f32> = data(b * h * w * cin, 1).iter().map(|&v| v as f32).collect();
            let f: Vec<f32> = data(cout * cin * 9, 2).iter().map(|&v| v as f32 * 0.1).collect();
            let bias: Vec<f32> = data(cout, 3).iter().map(|&v| v as f32).collect();
            let residual: Vec<f32> = data(b * h * w * cout, 4).iter().map(|&v| v as f32 * 5.0).collect();
            let plain = conv3x3(&x, Filters::Stored(&f), with_bias(&bias), (b, h, w, cin), cout, tile);
            let want: Vec<f32> = plain.iter().zip(&residual).map(|(&y, &r)| (y + r).max(0.0)).collect();
            let epi = Epilogue { bias: Some(&bias[..]), residual: Some(&residual[..]), relu: true };
            let got = conv3x3(&x, Filters::Stored(&f), epi, (b, h, w, cin), cout, tile);
            assert!(want.contains(&0.0) && want.iter().any(|&v| v > 0.0), "ReLU clips some, not all");
            let same = got.iter().zip(&want).all(|(g, e)| g.to_bits() == e.to_bits());
            assert!(same, "{tile:?}: the fused residual differs from the add+ReLU after");
        }
    }

    /// Filters `(cout, 3, 3, cin)`, as the references read them, in the stored layout.
    fn stored<T: WithDType>(f: &[T], cin: usize, cout: usize) -> Vec<T> {
        crate::ops::plumbing::weight_layout::ohwi_to_oihw(f, cout, cin, 9).into_owned()
    }

    const TILES: [Tile; 3] = [Tile::F2, Tile::F3, Tile::F4];
    /// Odd and even sizes: partial edge tiles for every tile size; 64 channels as in ResNet;
    /// three 9×9 images make 15 (F(2×2)), 9 (F(3×3)) or 9 (F(4×4)) tile rows, so tasks of two
    /// rows and a last task of one; the 3×3 image F(3×3) covers with one tile; few tiles against
    /// many channels (the products over all tiles at once, [`gathered`]) and many against few,
    /// for every tile.
    const SHAPES: [(usize, usize, usize, usize, usize); 9] = [
        (1, 4, 4, 1, 1),
        (2, 5, 7, 3, 4),
        (1, 8, 6, 8, 5),
        (2, 9, 9, 2, 3),
        (3, 9, 9, 2, 3),
        (1, 7, 7, 64, 4),
        (1, 12, 10, 5, 64),
        (2, 6, 6, 16, 48),
        (3, 3, 3, 24, 40),
    ];

    /// Both ways of running the products are among [`SHAPES`] for every tile, in the convolution
    /// and in the weight gradient, the gathered one with more than one task (so the tasks' blocks
    /// are put together).
    #[test]
    fn the_shapes_take_both_product_paths() {
        for (tile, weight_grad) in TILES.iter().flat_map(|&t| [(t, false), (t, true)]) {
            let tr = tile.transforms();
            let paths: Vec<(bool, usize)> = SHAPES
                .iter()
                .map(|&(b, h, w, cin, cout)| {
                    let bands = Bands::new(tr, (b, h, w), cin + cout);
                    (gathered(bands.count * bands.tw, cin, cout, weight_grad), bands.tasks())
                })
                .collect();
            let what = if weight_grad { "weight gradient" } else { "convolution" };
            assert!(paths.iter().any(|&(g, n)| g && n > 1), "{tile:?} {what}: no gathered shape with several tasks");
            assert!(paths.iter().any(|&(g, _)| !g), "{tile:?} {what}: no shape by tasks");
        }
    }

    /// At equality the weight gradient gathers its products and the convolution does not.
    #[test]
    fn only_the_weight_gradient_gathers_at_the_boundary() {
        // 256 tiles of 128 + 128 channels: 65,536 elements, as much as 4 sums of 128 × 128.
        assert!(gathered(256, 128, 128, true));
        assert!(!gathered(256, 128, 128, false));
        assert!(gathered(255, 128, 128, false) && !gathered(257, 128, 128, true));
    }

    fn data(n: usize, seed: u64) -> Vec<f64> {
        (0..n).map(|i| (((i as u64 * 2_654_435_761 + seed * 97) % 2001) as f64 / 1000.0) - 1.0).collect()
    }

    /// The signature of the tile transforms that read an image tensor: `(data, channels,
    /// transforms, bands, tiles, out)`.
    type TileTransform = fn(&[f32], usize, &Transforms, &Bands, (usize, usize), &mut [f32]);

    /// Every tile, 16 to 64 channels (the register path) and odd sizes (edge tiles, tiles
    /// reaching past the image), every task of the batch: `fast`, run at the process's vector
    /// tier as the convolutions run it, gives `passes`' bits.
    fn same_bits_as_the_passes(what: &str, fast: TileTransform, passes: TileTransform) {
        for tile in TILES {
            let tr = tile.transforms();
            for &(batch, h, w, c) in &[(2, 7, 9, 16), (1, 8, 8, 32), (3, 9, 7, 64), (2, 4, 5, 48), (2, 3, 3, 32)] {
                let x: Vec<f32> = data(batch * h * w * c, 5).iter().map(|&v| v as f32 * 3.7).collect();
                let bands = Bands::new(tr, (batch, h, w), c);
                for task in 0..bands.tasks() {
                    let tiles = bands.tiles(task);
                    let len = tr.alpha * tr.alpha * entry_stride(tiles.1, c);
                    let (mut fast_out, mut passes_out) = (vec![f32::NAN; len], vec![f32::NAN; len]);
                    with_fma(
                        #[inline(always)]
                        || fast(&x, c, tr, &bands, tiles, &mut fast_out),
                    );
                    passes(&x, c, tr, &bands, tiles, &mut passes_out);
                    let same = fast_out.iter().zip(&passes_out).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{what}, {tile:?} {batch}×{h}×{w}×{c}, task {task}: the transforms differ");
                }
            }
        }
    }

    #[test]
    fn input_transform_in_registers_equals_the_two_passes() {
        same_bits_as_the_passes("input", input_tiles, |x, c, tr, bands, tiles, v| {
            input_tiles_by_passes(x, c, tr, bands, tiles, &mut Strided { buf: v, stride: entry_stride(tiles.1, c) })
        });
    }

    #[test]
    fn gradient_transform_in_registers_equals_the_two_passes() {
        same_bits_as_the_passes("output gradient", gradient_tiles, |dy, c, tr, bands, tiles, dm| {
            gradient_tiles_by_passes(
                dy,
                c,
                tr,
                bands,
                tiles,
                &mut Strided { buf: dm, stride: entry_stride(tiles.1, c) },
            )
        });
    }

    /// The whole batch's transforms ([`whole_tiles`], each task writing its rows of every
    /// entry's matrix in place) hold each task's own transforms ([`input_tiles`],
    /// [`gradient_tiles`] into a buffer of the task's) at the task's rows, bit for bit, for
    /// channel counts in registers and not, every tile size, and several tasks per batch.
    #[test]
    fn whole_batch_transforms_are_the_tasks_own() {
        for tile in TILES {
            let tr = tile.transforms();
            let a = tr.alpha;
            for &(batch, h, w, c) in &[(9, 7, 9, 16), (4, 8, 8, 32), (3, 9, 7, 48), (12, 3, 3, 20)] {
                let x: Vec<f32> = data(batch * h * w * c, 11).iter().map(|&v| v as f32 * 1.3).collect();
                let bands = Bands::new(tr, (batch, h, w), c);
                assert!(bands.tasks() > 1, "{batch}×{h}×{w}×{c}: one task tests no splitting");
                let total = bands.count * bands.tw;
                type Own = fn(&[f32], usize, &Transforms, &Bands, (usize, usize), &mut [f32]);
                let cases: [(&str, Vec<f32>, Own); 2] = [
                    (
                        "input",
                        whole_tiles(&bands, a * a, c, |t, out| input_tiles_into(&x, c, tr, &bands, t, out)),
                        input_tiles,
                    ),
                    (
                        "gradient",
                        whole_tiles(&bands, a * a, c, |t, out| gradient_tiles_into(&x, c, tr, &bands, t, out)),
                        gradient_tiles,
                    ),
                ];
                for (what, whole, own) in cases {
                    for task in 0..bands.tasks() {
                        let (first, count) = bands.tiles(task);
                        let mut part = vec![f32::NAN; a * a * entry_stride(count, c)];
                        with_fma(
                            #[inline(always)]
                            || own(&x, c, tr, &bands, (first, count), &mut part),
                        );
                        for e in 0..a * a {
                            let mine = &part[e * entry_stride(count, c)..][..count * c];
                            let theirs = &whole[e * entry_stride(total, c) + first * c..][..count * c];
                            let same = mine.iter().zip(theirs).all(|(m, t)| m.to_bits() == t.to_bits());
                            assert!(same, "{what}, {tile:?} {batch}×{h}×{w}×{c}, task {task}, entry {e}: differs");
                        }
                    }
                }
            }
        }
    }

    /// The same for the output transform, with and without bias and ReLU: every task's rows of
    /// the output (edge tiles cut at the image's border) are the two passes' bits.
    #[test]
    fn output_transform_in_registers_equals_the_two_passes() {
        for tile in TILES {
            let tr = tile.transforms();
            for &(batch, h, w, cout) in &[(2, 7, 9, 16), (1, 8, 8, 32), (3, 9, 7, 48), (2, 3, 3, 32)] {
                let bands = Bands::new(tr, (batch, h, w), cout);
                let bias: Vec<f32> = data(cout, 3).iter().map(|&v| v as f32).collect();
                let residual: Vec<f32> = data(batch * h * w * cout, 4).iter().map(|&v| v as f32).collect();
                for (with_bias, relu, with_residual) in [
                    (false, false, false),
                    (true, false, false),
                    (false, true, true),
                    (true, true, false),
                    (true, true, true),
                ] {
                    let epi = Epilogue {
                        bias: with_bias.then_some(&bias[..]),
                        residual: with_residual.then_some(&residual[..]),
                        relu,
                    };
                    let unwritten = MaybeUninit::new(f32::NAN);
                    let (mut fast, mut passes) =
                        (vec![unwritten; batch * h * w * cout], vec![unwritten; batch * h * w * cout]);
                    let (mut parts_fast, mut parts_passes) =
                        (bands.split(&mut fast, cout), bands.split(&mut passes, cout));
                    for task in 0..bands.tasks() {
                        let (first, count) = bands.tiles(task);
                        let prod: Vec<f32> = data(tr.alpha * tr.alpha * entry_stride(count, cout), task as u64)
                            .iter()
                            .map(|&v| v as f32 * 2.3)
                            .collect();
                        let base = bands.offset(task * bands.per_task, cout);
                        let (of, op) = (&mut *parts_fast[task], &mut *parts_passes[task]);
                        let m = (&prod[..], entry_stride(count, cout));
                        with_fma(
                            #[inline(always)]
                            || output_tiles(m, cout, tr, &bands, (first, count), &epi, (of, base)),
                        );
                        output_tiles_by_passes(m, cout, tr, &bands, (first, count), &epi, (op, base));
                    }
                    drop((parts_fast, parts_passes));
                    // SAFETY: every element was initialised (to NaN) before the transforms ran.
                    let read = |v: Vec<MaybeUninit<f32>>| {
                        v.into_iter().map(|e| unsafe { e.assume_init() }).collect::<Vec<_>>()
                    };
                    let (fast, passes) = (read(fast), read(passes));
                    assert!(fast.iter().all(|v| !v.is_nan()), "{tile:?}: every output written");
                    let same = fast.iter().zip(&passes).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{tile:?} {batch}×{h}×{w}×{cout}, bias {with_bias}, relu {relu}, residual {with_residual}: the transforms differ"
                    );
                }
            }
        }
    }

    /// Odd and even sizes (partial edge tiles), one and several channels, in f64 (exact to
    /// rounding) and f32 (1e-4 relative).
    #[test]
    fn matches_direct_convolution() {
        for (tile, &(b, h, w, cin, cout)) in TILES.iter().flat_map(|t| SHAPES.iter().map(move |s| (*t, s))) {
            let x = data(b * h * w * cin, 1);
            let f = data(cout * 9 * cin, 2);
            let bias = data(cout, 3);
            let want = direct(&x, &f, &bias, (b, h, w, cin), cout);
            let got =
                conv3x3(&x, Filters::Stored(&stored(&f, cin, cout)), with_bias(&bias), (b, h, w, cin), cout, tile);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-12 * e.abs().max(1.0), "f64 {g} vs {e} at {:?}", (tile, b, h, w, cin, cout));
            }
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let f32s: Vec<f32> = f.iter().map(|&v| v as f32).collect();
            let b32: Vec<f32> = bias.iter().map(|&v| v as f32).collect();
            let got =
                conv3x3(&x32, Filters::Stored(&stored(&f32s, cin, cout)), with_bias(&b32), (b, h, w, cin), cout, tile);
            for (g, e) in got.iter().zip(&want) {
                assert!(((*g as f64) - e).abs() < 1e-4 * e.abs().max(1.0), "f32 {g} vs {e} ({tile:?})");
            }
        }
    }

    /// Where this crate's kernel runs the products (`panels`; f32 at the AVX2 tier), a task's
    /// tiles taken a few at a time (blocks of 6 and 4: whole blocks, a last partial one, a
    /// block of fewer than the kernel's six rows) give the bits of one block per task, for
    /// every tile, and stay within f32 rounding of the direct convolution.
    #[test]
    fn blocks_of_tiles_give_the_bits_of_whole_tasks() {
        let (b, h, w, cin, cout) = (1, 12, 10, 5, 64);
        let (x, f, bias) = (data(b * h * w * cin, 4), data(cout * 9 * cin, 5), data(cout, 6));
        let want = direct(&x, &f, &bias, (b, h, w, cin), cout);
        let (x, f, bias): (Vec<f32>, Vec<f32>, Vec<f32>) =
            [x, f, bias].map(|v| v.iter().map(|&e| e as f32).collect::<Vec<f32>>()).into();
        let tr = Tile::F2.transforms();
        let bands = Bands::new(tr, (b, h, w), cin + cout);
        assert!(!gathered(bands.count * bands.tw, cin, cout, false), "a gathered shape");
        assert!(block_tiles::<f32>(tr, cin + cout) >= 30, "one block per task");
        for tile in TILES {
            let run = |block| {
                let filters = Filters::Stored(&stored(&f, cin, cout));
                conv3x3_in_blocks(&x, filters, with_bias(&bias), (b, h, w, cin), cout, (tile, block))
            };
            let whole = run(None);
            for (g, e) in whole.iter().zip(&want) {
                assert!(((*g as f64) - e).abs() < 1e-4 * e.abs().max(1.0), "{tile:?}: {g} vs {e}");
            }
            for block in [6, 4] {
                let bits = |v: &[f32]| v.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&run(Some(block))), bits(&whole), "{tile:?}, blocks of {block}");
            }
        }
    }

    /// The weight gradient, every filter tap, against its direct float64 sum
    /// `dW[k, i, j, c] = Σ dy[n, y, x, k] · x[n, y + i − 1, x + j − 1, c]`; f32 within 1e-4.
    #[test]
    fn weight_gradient_matches_direct_sums() {
        for (tile, &(b, h, w, cin, cout)) in TILES.iter().flat_map(|t| SHAPES.iter().map(move |s| (*t, s))) {
            let x = data(b * h * w * cin, 7);
            let dy = data(b * h * w * cout, 8);
            let got = conv3x3_weight_grad(&x, &dy, (b, h, w, cin), cout, tile);
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
                            let g = got[((k * cin + c) * 3 + i) * 3 + j];
                            assert!(
                                (g - want).abs() < 1e-10 * want.abs().max(1.0),
                                "{g} vs {want} at {:?}",
                                (tile, k, i, j, c)
                            );
                        }
                    }
                }
            }
            let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let dy32: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
            let got32 = conv3x3_weight_grad(&x32, &dy32, (b, h, w, cin), cout, tile);
            for (a, e) in got32.iter().zip(&got) {
                assert!(((*a as f64) - e).abs() < 1e-4 * e.abs().max(1.0), "f32 {a} vs {e} ({tile:?})");
            }
        }
    }

    /// The adjoint filters give the input gradient: ⟨conv(x), dy⟩ = ⟨x, conv_adjoint(dy)⟩.
    #[test]
    fn adjoint_filters_give_the_input_gradient() {
        let (b, h, w, cin, cout) = (2, 6, 5, 3, 4);
        let x = data(b * h * w * cin, 4);
        let f = data(cout * 9 * cin, 5);
        let dy = data(b * h * w * cout, 6);
        for tile in TILES {
            let y = conv3x3(&x, Filters::Stored(&stored(&f, cin, cout)), Epilogue::none(), (b, h, w, cin), cout, tile);
            let dx =
                conv3x3(&dy, Filters::Adjoint(&stored(&f, cin, cout)), Epilogue::none(), (b, h, w, cout), cin, tile);
            let lhs: f64 = y.iter().zip(&dy).map(|(a, b)| a * b).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(a, b)| a * b).sum();
            assert!((lhs - rhs).abs() < 1e-10 * lhs.abs().max(1.0), "{lhs} vs {rhs} ({tile:?})");
        }
    }

    /// Tasks cover every tile row once, in order, and their output runs tile the tensor: with
    /// few rows (one or two per task, a short last task) and with rows limited by the cache
    /// budget (the 96 px stage: 1536 tile rows, 42 per task).
    #[test]
    fn bands_split_the_batch_into_whole_tile_rows() {
        for ((tile, (batch, h, w, channels)), elements) in [
            (Tile::F2, (3, 9, 9, 5)),
            (Tile::F3, (3, 9, 9, 5)),
            (Tile::F4, (3, 9, 9, 5)),
            (Tile::F3, (128, 6, 6, 512)),
            (Tile::F2, (128, 24, 24, 128)),
            (Tile::F4, (2, 4, 4, 8)),
            (Tile::F4, (128, 24, 24, 128)),
        ]
        .into_iter()
        .flat_map(|case| [(case, TASK_ELEMENTS), (case, WEIGHT_GRAD_TASK_ELEMENTS)])
        {
            let tr = tile.transforms();
            let bands = Bands::sized(tr, (batch, h, w), channels, elements);
            let (th, tw) = (h.div_ceil(tr.m), w.div_ceil(tr.m));
            assert!(
                bands.per_task <= (batch * th).div_ceil(MIN_TASKS),
                "{tile:?} {batch}x{h}: {} rows a task",
                bands.per_task
            );
            assert!(
                tr.alpha * tr.alpha * bands.per_task * tw * channels
                    <= elements.max(tr.alpha * tr.alpha * tw * channels)
            );
            let mut next = 0;
            for task in 0..bands.tasks() {
                let (first, count) = bands.tiles(task);
                assert_eq!(first, next, "{tile:?}: task {task} starts at tile {first}");
                assert!(count > 0 && count % tw == 0);
                next = first + count;
            }
            assert_eq!(next, batch * th * tw, "{tile:?}: tiles covered");
            let mut y: Vec<usize> = vec![0; batch * h * w * 2];
            let parts = bands.split(&mut y, 2);
            assert_eq!(parts.len(), bands.tasks());
            let mut row = 0;
            for (task, part) in parts.into_iter().enumerate() {
                let (first, count) = bands.tiles(task);
                let (n, ty, _) = bands.tile_at(first);
                assert_eq!(n * h + tr.m * ty, row, "{tile:?}: task {task}'s rows");
                assert_eq!(part.len() % (w * 2), 0);
                let rows = part.len() / (w * 2);
                let want: usize = (first / tw..(first + count) / tw).map(|b| tr.m.min(h - tr.m * (b % th))).sum();
                assert_eq!(rows, want, "{tile:?}: task {task}'s row count");
                row += rows;
            }
            assert_eq!(row, batch * h);
        }
    }

    /// An empty batch gives an empty output and a zero weight gradient, for every tile.
    #[test]
    fn an_empty_batch_has_no_tiles() {
        let f = data(4 * 9 * 3, 1);
        for tile in TILES {
            assert!(conv3x3(&[], Filters::Stored(&f), Epilogue::none(), (0, 5, 5, 3), 4, tile).is_empty());
            let dw = conv3x3_weight_grad::<f64>(&[], &[], (0, 5, 5, 3), 4, tile);
            assert_eq!(dw.len(), 4 * 9 * 3);
            assert!(dw.iter().all(|&v| v == 0.0));
        }
    }

    /// F(4×4) where it saves the most multiplies (4, 7, 12, 24 px: the 28 and 96 px stages),
    /// F(3×3) on 3, 5, 6 and 9 px (the last two stages at 96 px), F(2×2) on 2 px.
    #[test]
    fn tile_choice_follows_the_product_count() {
        for (n, want) in [
            (2, Tile::F2),
            (3, Tile::F3),
            (4, Tile::F4),
            (5, Tile::F3),
            (6, Tile::F3),
            (7, Tile::F4),
            (9, Tile::F3),
            (12, Tile::F4),
            (24, Tile::F4),
        ] {
            assert_eq!(Tile::choose(n, n), want, "{n}x{n}");
        }
    }
}
