#!/usr/bin/env python3
"""Writes `resnet-data/tests/fixtures/pillow_resize.bin`, Pillow's bilinear resize of synthetic images.

How to run (from the repository root; needs Pillow and numpy, torchvision optional):

    python scripts/make_resize_fixture.py            # writes the fixture
    python scripts/make_resize_fixture.py --out FILE # writes elsewhere

The Rust test `resnet-data/tests/resize_pillow.rs` reads the file without Python and checks that
`resnet_data::resize_bilinear` reproduces every case (and reports how many pixels differ at all).
The inputs are deterministic (numpy's PCG64 with fixed seeds, plus drawn shapes), so the script
needs no dataset and re-running it only changes the file when Pillow's resampling changes.

Pillow 13 changed the order of the two resampling passes for some non-square resizes (see
`resnet-data/src/resize.rs`); the fixture records the Pillow version it was made with.

What torchvision does: d2l builds Fashion-MNIST images with `Image.fromarray(a, mode="L")` and
`transforms.Resize(n)` calls `img.resize((n, n), Image.BILINEAR)` on them; that call is what is
recorded here. If torchvision is installed, the script also checks that `Resize` agrees with it.

Format (little-endian):

    b"RSZF"  u32 version (1)
    u32 len, then `len` bytes of UTF-8: the generator's versions (provenance only)
    u32 number of cases, then per case:
        u32 src_w, u32 src_h, u32 dst_w, u32 dst_h
        src_w * src_h bytes: the source image, row-major
        dst_w * dst_h bytes: Pillow's result, row-major
    u32 256, then 256 f32: torchvision `ToTensor` of each byte value (float32(p) / 255)
"""

import argparse
import struct
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "resnet-data" / "tests" / "fixtures" / "pillow_resize.bin"
MAX_BYTES = 300_000


def source_images():
    """Named 28x28 uint8 images covering what resizing has to get right."""
    rng = np.random.default_rng(20240611)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    images = {}
    # Uniform noise: every rounding path is exercised.
    images["noise"] = rng.integers(0, 256, size=(28, 28), dtype=np.uint8)
    # A garment-like silhouette: dark background, torso with sleeves, shading and a sharp edge.
    torso = (np.abs(xx - 13.5) < 7) & (yy > 4) & (yy < 26)
    sleeves = (np.abs(xx - 13.5) < 12) & (yy > 4) & (yy < 12)
    shade = 120 + 100 * np.sin(yy / 5.0) * np.cos(xx / 7.0)
    shirt = np.where(torso | sleeves, shade + rng.normal(0, 12, size=(28, 28)), 0)
    images["shirt"] = np.clip(np.rint(shirt), 0, 255).astype(np.uint8)
    # High-frequency patterns: stripes and a checkerboard.
    images["stripes"] = np.where((xx.astype(int) // 2 + (yy.astype(int) % 3 == 0)) % 2 == 0, 250, 5).astype(np.uint8)
    images["checker"] = np.where((xx.astype(int) + yy.astype(int)) % 2 == 0, 255, 0).astype(np.uint8)
    # Smooth ramps.
    images["ramp"] = np.clip(np.rint(xx * 9 + yy * 0.5), 0, 255).astype(np.uint8)
    # Mostly background with a few saturated pixels, like Fashion-MNIST's borders.
    sparse = np.zeros((28, 28), dtype=np.uint8)
    sparse[rng.integers(0, 28, 40), rng.integers(0, 28, 40)] = 255
    images["sparse"] = sparse
    return images


def cases(images):
    """(source array, (dst_w, dst_h)) pairs."""
    rng = np.random.default_rng(7)
    out = []
    for name in images:
        for side in (8, 17, 96):
            out.append((images[name], (side, side)))
    for name in ("noise", "shirt"):
        out.append((images[name], (224, 224)))
    out.append((images["shirt"], (28, 28)))  # identity: Pillow returns a copy
    out.append((images["shirt"], (40, 24)))  # non-square, up in both axes
    out.append((images["noise"], (9, 300)))  # down in x, strongly up in y
    out.append((images["ramp"], (56, 28)))  # width only: Pillow skips the vertical pass
    out.append((images["checker"], (28, 56)))  # height only: skips the horizontal pass
    out.append((images["noise"], (500, 8)))  # near the largest target side
    wide = rng.integers(0, 256, size=(20, 30), dtype=np.uint8)  # 30 wide, 20 high
    out.append((wide, (17, 45)))
    out.append((wide, (64, 8)))
    big = rng.integers(0, 256, size=(90, 100), dtype=np.uint8)  # downscale with wide support
    out.append((big, (17, 31)))
    # Pass order: Pillow 13 goes vertical first iff the height shrinks by more than twice as
    # many pixels as the width. 40 -> 23 rows vs 20 -> 12 columns is just over; 40 -> 24 is not.
    tall = rng.integers(0, 256, size=(40, 20), dtype=np.uint8)  # 20 wide, 40 high
    out.append((tall, (12, 23)))
    out.append((tall, (12, 24)))
    out.append((tall[:, :12], (8, 10)))
    return out


def pillow_resize(src, size):
    return np.asarray(Image.fromarray(src, mode="L").resize(size, Image.BILINEAR), dtype=np.uint8)


def check_torchvision(images):
    try:
        from torchvision import transforms
    except ImportError:
        print("torchvision not installed: skipped the Resize cross-check")
        return
    for name, src in images.items():
        for side in (8, 17, 96, 224):
            img = Image.fromarray(src, mode="L")
            ours = pillow_resize(src, (side, side))
            theirs = np.asarray(transforms.Resize(side)(img), dtype=np.uint8)
            if not np.array_equal(ours, theirs):
                sys.exit(f"torchvision Resize({side}) differs from Image.resize on {name}")
    print("torchvision Resize(n) == Image.resize((n, n), BILINEAR) on every square case")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    images = source_images()
    check_torchvision(images)
    provenance = f"Pillow {PIL.__version__}, numpy {np.__version__}".encode()
    blob = bytearray(b"RSZF")
    blob += struct.pack("<II", 1, len(provenance)) + provenance
    all_cases = cases(images)
    blob += struct.pack("<I", len(all_cases))
    for src, (dst_w, dst_h) in all_cases:
        src = np.ascontiguousarray(src, dtype=np.uint8)
        src_h, src_w = src.shape
        dst = pillow_resize(src, (dst_w, dst_h))
        assert dst.shape == (dst_h, dst_w), dst.shape
        blob += struct.pack("<IIII", src_w, src_h, dst_w, dst_h)
        blob += src.tobytes() + dst.tobytes()
    to_tensor = np.arange(256, dtype=np.float32) / np.float32(255)
    blob += struct.pack("<I", 256) + to_tensor.astype("<f4").tobytes()
    if len(blob) > MAX_BYTES:
        sys.exit(f"fixture would be {len(blob)} bytes, over the {MAX_BYTES} budget")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(bytes(blob))
    print(f"wrote {args.out} ({len(blob)} bytes, {len(all_cases)} cases, {provenance.decode()})")


if __name__ == "__main__":
    main()
