#!/usr/bin/env python3
"""Winograd F(m, 3) transforms from their interpolation points, and how much each set rounds.

Builds the Cook–Toom matrices Aᵀ (m × α), G (α × 3) and Bᵀ (α × α), α = m + 2, for a set of
finite points plus the point at infinity, in exact fractions; checks each set against direct
1-D correlation; and measures the float32 error of one 2-D output tile of F(m×m, 3×3) summed
over 256 channels (the median over 20 random tiles of max |Y − Y_ref| / max |Y_ref|, the
reference in float64). Prints the F(3×3) matrices for the points `resnet-core` uses
(`winograd.rs`, `const F3`). Needs numpy only:

    python3 scripts/winograd_points.py
"""

from fractions import Fraction as Q

import numpy as np

R = 3  # the kernel size


def poly_from_roots(roots):
    """Coefficients (lowest degree first) of prod (x - r)."""
    out = [Q(1)]
    for r in roots:
        nxt = [Q(0)] * (len(out) + 1)
        for i, c in enumerate(out):
            nxt[i] -= r * c
            nxt[i + 1] += c
        out = nxt
    return out


def cook_toom(points, m):
    """Aᵀ, G, Bᵀ for F(m, 3) on the finite `points` and infinity, as lists of Fractions."""
    n = len(points)
    assert n + 1 == m + R - 1, "F(m, 3) needs m + 1 finite points"
    at = [[p**i for p in points] + [Q(1) if i == m - 1 else Q(0)] for i in range(m)]
    scale = [np.prod([points[j] - points[k] for k in range(n) if k != j]) for j in range(n)]
    g = [[points[j] ** k / scale[j] for k in range(R)] for j in range(n)]
    g.append([Q(0)] * (R - 1) + [Q(1)])
    bt = [poly_from_roots([points[k] for k in range(n) if k != j]) + [Q(0)] for j in range(n)]
    bt.append(poly_from_roots(points))
    return at, g, bt


def as_float(mat, dtype=np.float64):
    return np.array([[float(x) for x in row] for row in mat], dtype=dtype)


def correlation_error(at, g, bt, m):
    """Largest gap between the transforms and direct 1-D correlation on random data."""
    rng = np.random.default_rng(0)
    d, k = rng.standard_normal(len(bt)), rng.standard_normal(R)
    y = as_float(at) @ ((as_float(g) @ k) * (as_float(bt) @ d))
    want = np.array([sum(d[i + j] * k[j] for j in range(R)) for i in range(m)])
    return np.abs(y - want).max()


def tile_error(at, g, bt, m, channels=256, trials=20):
    """Median float32 relative error of one m×m output tile summed over `channels`."""
    a32, g32, b32 = (as_float(x, np.float32) for x in (at, g, bt))
    alpha, rng, errs = len(bt), np.random.default_rng(1), []
    for _ in range(trials):
        d = rng.standard_normal((channels, alpha, alpha))
        k = rng.standard_normal((channels, R, R)) * 0.1
        ref = np.zeros((m, m))
        for i in range(m):
            for j in range(m):
                ref[i, j] = np.sum(d[:, i : i + R, j : j + R] * k)
        u = np.einsum("ij,cjk,lk->cil", g32, k.astype(np.float32), g32)
        v = np.einsum("ij,cjk,lk->cil", b32, d.astype(np.float32), b32)
        y = a32 @ np.sum(u * v, axis=0, dtype=np.float32) @ a32.T
        errs.append(np.abs(y - ref).max() / np.abs(ref).max())
    return float(np.median(errs))


CANDIDATES = {
    "F(2) {0, 1, -1}": ([Q(0), Q(1), Q(-1)], 2),
    "F(3) {0, 1, -1, 2}": ([Q(0), Q(1), Q(-1), Q(2)], 3),
    "F(3) {0, 1, -1, -2}": ([Q(0), Q(1), Q(-1), Q(-2)], 3),
    "F(3) {0, 1, -1, 1/2}": ([Q(0), Q(1), Q(-1), Q(1, 2)], 3),
    "F(3) {0, 1, -1, -1/2}": ([Q(0), Q(1), Q(-1), Q(-1, 2)], 3),
    "F(4) {0, 1, -1, 2, -2}": ([Q(0), Q(1), Q(-1), Q(2), Q(-2)], 4),
}
USED_F3 = "F(3) {0, 1, -1, 2}"


def main():
    for name, (points, m) in CANDIDATES.items():
        at, g, bt = cook_toom(points, m)
        gap = correlation_error(at, g, bt, m)
        assert gap < 1e-12, f"{name}: the transforms do not compute the correlation ({gap})"
        print(f"{name:24} f32 tile error {tile_error(at, g, bt, m):.2e}")
    at, g, bt = cook_toom(*CANDIDATES[USED_F3])
    print(f"\n{USED_F3} (winograd.rs `const F3`):")
    for name, mat in (("Bt", bt), ("G", g), ("At", at)):
        print(f"  {name}:", [[str(x) for x in row] for row in mat])


if __name__ == "__main__":
    main()
