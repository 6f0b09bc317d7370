#!/usr/bin/env python3
"""Writes `resnet-cli/tests/fixtures/luma/`: small images in many formats and Pillow's `convert("L")` of each.

How to run (from the repository root; needs Pillow and numpy):

    /work/venv/bin/python scripts/make_luma_fixture.py           # writes the fixture
    /work/venv/bin/python scripts/make_luma_fixture.py --out DIR # writes elsewhere

The Rust test `matches_pillow_fixture` in `resnet-cli/src/image.rs` decodes every image with
`resnet-cli`'s reader and compares its grey pixels with what Pillow produced here: `Image.open(path).convert("L")`, the call
d2l-style Python code makes on a photo before `transforms.Resize`. Lossless formats must match on
every pixel; JPEG decoders may differ by rounding in the inverse DCT, so `expected.json` gives each
case the largest difference allowed (0 for all lossless files).

The inputs are deterministic (numpy's PCG64 with fixed seeds), so re-running the script only
changes the files when Pillow's encoders or conversions change. `expected.json` records the
Pillow version, and per case: file, Pillow's mode after `open`, width, height, tolerance and the
grey pixels row-major.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

W, H = 9, 7


def rng(seed):
    return np.random.Generator(np.random.PCG64(seed))


def rgb(seed):
    a = rng(seed).integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    # Pure extremes too, where the rounding of the fixed-point weights shows.
    a[0, :3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    a[0, 3:6] = [[255, 255, 255], [0, 0, 0], [1, 1, 1]]
    return a


def cases(out):
    """Yields (file name, tolerance) after writing each file into `out`."""
    grey = rng(1).integers(0, 256, size=(H, W), dtype=np.uint8)
    Image.fromarray(grey, "L").save(out / "grey8.png")
    yield "grey8.png", 0

    # 16-bit grey: Pillow opens it as "I;16" and clips to 255 when converting to L.
    g16 = rng(2).integers(0, 65536, size=(H, W), dtype=np.uint16)
    g16[0, :4] = [0, 255, 256, 65535]
    Image.fromarray(g16).save(out / "grey16.png")
    yield "grey16.png", 0

    for bits, name in [(1, "grey1.png"), (2, "grey2.png"), (4, "grey4.png")]:
        levels = rng(3 + bits).integers(0, 1 << bits, size=(H, W))
        img = Image.fromarray((levels * (255 // ((1 << bits) - 1))).astype(np.uint8), "L")
        img.save(out / name, bits=bits) if bits > 1 else img.convert("1").save(out / name)
        yield name, 0

    la = np.dstack([grey, rng(6).integers(0, 256, size=(H, W), dtype=np.uint8)])
    Image.fromarray(la, "LA").save(out / "grey_alpha.png")
    yield "grey_alpha.png", 0

    Image.fromarray(rgb(7), "RGB").save(out / "rgb.png")
    yield "rgb.png", 0

    rgba = np.dstack([rgb(8), rng(9).integers(0, 256, size=(H, W), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(out / "rgba.png")
    yield "rgba.png", 0

    pal = Image.fromarray(rgb(10), "RGB").quantize(colors=16, dither=Image.Dither.NONE)
    pal.save(out / "palette.png")
    yield "palette.png", 0
    pal.save(out / "palette_trns.png", transparency=3)
    yield "palette_trns.png", 0

    Image.fromarray(rgb(11), "RGB").save(out / "rgb.bmp")
    yield "rgb.bmp", 0
    Image.fromarray(rgb(12), "RGB").save(out / "rgb.tiff")
    yield "rgb.tiff", 0
    Image.fromarray(rgb(13), "RGB").quantize(colors=32, dither=Image.Dither.NONE).save(out / "palette.gif")
    yield "palette.gif", 0
    Image.fromarray(rgb(14), "RGB").save(out / "rgb_lossless.webp", lossless=True)
    yield "rgb_lossless.webp", 0
    Image.fromarray(rgba, "RGBA").save(out / "rgba_lossless.webp", lossless=True)
    yield "rgba_lossless.webp", 0

    # A smooth picture, so the lossy decoders' rounding differences stay small.
    y, x = np.mgrid[0:H, 0:W]
    smooth = np.dstack([x * 28, y * 36, (x + y) * 16]).astype(np.uint8)
    Image.fromarray(smooth, "RGB").save(out / "rgb.jpg", quality=95)
    yield "rgb.jpg", 3
    Image.fromarray(smooth[:, :, 0], "L").save(out / "grey.jpg", quality=95)
    yield "grey.jpg", 3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("resnet-cli/tests/fixtures/luma"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for name, tolerance in cases(args.out):
        with Image.open(args.out / name) as img:
            mode = img.mode
            grey = np.asarray(img.convert("L"))
        records.append(
            {
                "file": name,
                "pillow_mode": mode,
                "width": int(grey.shape[1]),
                "height": int(grey.shape[0]),
                "tolerance": tolerance,
                "luma": grey.reshape(-1).tolist(),
            }
        )
    doc = {"pillow": PIL.__version__, "numpy": np.__version__, "cases": records}
    (args.out / "expected.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(records)} cases to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
