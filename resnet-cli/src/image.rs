//! Reading images of the common formats (PNG, JPEG, GIF, BMP, TIFF, WebP) as 8-bit grey, exactly
//! as Pillow's `Image.open(path).convert("L")`, and finding the images in folders.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::DynamicImage;

/// File extensions (lower case) searched for in folders; single files are decoded by content.
pub const EXTENSIONS: [&str; 8] = ["png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp"];

/// The largest image accepted, in pixels: far above any photo, far below what exhausts memory.
const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// A grey image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grey {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` pixels.
    pub pixels: Vec<u8>,
}

/// Decodes `path` (format guessed from the content, not the name) and converts it to grey as
/// Pillow does: colour by ITU-R 601-2 luma in Pillow's fixed point (see [`luma`]); alpha is
/// ignored, not composited; palettes by their colours' luma; 16-bit colour and grey-alpha keep
/// the high byte of each sample; 16-bit grey (Pillow's mode `I;16`) is clipped to 255.
pub fn read(path: &Path) -> Result<Grey> {
    let reader = image::io::Reader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?;
    if reader.format().is_none() {
        bail!("{}: not an image in a supported format (PNG, JPEG, GIF, BMP, TIFF or WebP)", path.display());
    }
    let mut reader = reader;
    let mut limits = image::io::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    let img = reader.decode().with_context(|| format!("{}: cannot decode the image", path.display()))?;
    to_grey(img).with_context(|| format!("converting {} to grey", path.display()))
}

/// Pillow's `convert("L")` of a decoded image.
pub fn to_grey(img: DynamicImage) -> Result<Grey> {
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 || (width as u64) * (height as u64) > MAX_PIXELS {
        bail!("unsupported image size {width}x{height}");
    }
    let pixels: Vec<u8> = match img {
        DynamicImage::ImageLuma8(b) => b.into_raw(),
        DynamicImage::ImageLumaA8(b) => b.pixels().map(|p| p.0[0]).collect(),
        DynamicImage::ImageRgb8(b) => b.pixels().map(|p| luma(p.0[0], p.0[1], p.0[2])).collect(),
        DynamicImage::ImageRgba8(b) => b.pixels().map(|p| luma(p.0[0], p.0[1], p.0[2])).collect(),
        // Pillow opens 16-bit grey as `I;16`; its conversion to L saturates instead of scaling.
        DynamicImage::ImageLuma16(b) => b.pixels().map(|p| p.0[0].min(255) as u8).collect(),
        DynamicImage::ImageLumaA16(b) => b.pixels().map(|p| high(p.0[0])).collect(),
        DynamicImage::ImageRgb16(b) => b.pixels().map(|p| luma(high(p.0[0]), high(p.0[1]), high(p.0[2]))).collect(),
        DynamicImage::ImageRgba16(b) => b.pixels().map(|p| luma(high(p.0[0]), high(p.0[1]), high(p.0[2]))).collect(),
        other => bail!("unsupported pixel format {:?}", other.color()),
    };
    Ok(Grey { width, height, pixels })
}

/// Pillow's `L24` in `Convert.c`: `(R·19595 + G·38470 + B·7471 + 0x8000) >> 16`, the 601-2
/// weights 0.299, 0.587, 0.114 scaled by 2¹⁶ (they sum to exactly 65536) and rounded half up.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Pillow unpacks 16-bit colour samples (`RGB;16B`, `LA;16B`) by their high byte.
fn high(v: u16) -> u8 {
    (v >> 8) as u8
}

/// The images to predict for `inputs`: files as given, folders searched recursively for files
/// with an image extension, each folder's images sorted by path. Errors name the missing input.
pub fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).with_context(|| format!("{}: no such file or folder", input.display()))?;
        if meta.is_dir() {
            let before = out.len();
            walk(input, &mut out)?;
            out[before..].sort();
            if out.len() == before {
                bail!("{}: no images in this folder (looked for .{})", input.display(), EXTENSIONS.join(", ."));
            }
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        // `metadata` follows symbolic links, so linked files and folders count like real ones.
        let Ok(meta) = std::fs::metadata(&path) else {
            tracing::warn!("skipping {}: broken link or unreadable", path.display());
            continue;
        };
        if meta.is_dir() {
            walk(&path, out)?;
        } else if has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.iter().any(|known| known.eq_ignore_ascii_case(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_matches_pil() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
        assert_eq!(19595 + 38470 + 7471, 1 << 16);
    }

    #[test]
    fn folders_are_searched_recursively_and_sorted() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("b/inner"))?;
        std::fs::create_dir_all(d.join("a"))?;
        for name in ["b/inner/z.PNG", "b/x.jpg", "a/y.webp", "a/notes.txt", "top.gif"] {
            std::fs::write(d.join(name), b"")?;
        }
        let found = expand(&[d.to_path_buf()])?;
        let rel: Vec<String> =
            found.iter().filter_map(|p| p.strip_prefix(d).ok()).map(|p| p.display().to_string()).collect();
        assert_eq!(rel, ["a/y.webp", "b/inner/z.PNG", "b/x.jpg", "top.gif"]);
        // Files are taken as given, whatever their name; missing inputs and empty folders fail.
        assert_eq!(expand(&[d.join("a/notes.txt")])?, [d.join("a/notes.txt")]);
        let missing = expand(&[d.join("nope")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("nope"), "{missing}");
        std::fs::create_dir(d.join("empty"))?;
        let empty = expand(&[d.join("empty")]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(empty.contains("no images"), "{empty}");
        Ok(())
    }

    /// Every image `scripts/make_luma_fixture.py` wrote, against Pillow's `convert("L")` of it.
    #[test]
    fn matches_pillow_fixture() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/luma");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
        let cases = doc["cases"].as_array().context("no cases")?;
        assert!(cases.len() >= 15, "fixture has {} cases", cases.len());
        let mut formats = std::collections::BTreeSet::new();
        for case in cases {
            let file = case["file"].as_str().context("file")?;
            let want: Vec<u8> = serde_json::from_value(case["luma"].clone())?;
            let tolerance = case["tolerance"].as_u64().context("tolerance")?;
            let got = read(&dir.join(file))?;
            assert_eq!(
                (got.width as u64, got.height as u64),
                (case["width"].as_u64().context("width")?, case["height"].as_u64().context("height")?),
                "{file}"
            );
            let worst = got.pixels.iter().zip(&want).map(|(a, b)| a.abs_diff(*b) as u64).max().unwrap_or(0);
            assert!(worst <= tolerance, "{file}: differs from Pillow by up to {worst} (allowed {tolerance})");
            if tolerance == 0 {
                assert_eq!(got.pixels, want, "{file}");
            }
            formats.insert(file.rsplit('.').next().unwrap_or_default().to_string());
        }
        assert_eq!(formats.into_iter().collect::<Vec<_>>(), ["bmp", "gif", "jpg", "png", "tiff", "webp"]);
        Ok(())
    }

    #[test]
    fn unreadable_files_are_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // Content that no decoder recognises: the extension decides, if it names a format.
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, b"just some text, not an image")?;
        let err = format!("{:#}", read(&text).err().context("text decoded")?);
        assert!(err.contains("notes.txt") && err.contains("supported format"), "{err}");
        let named_png = dir.path().join("notes.png");
        std::fs::write(&named_png, b"just some text, not an image")?;
        let err = format!("{:#}", read(&named_png).err().context("text decoded")?);
        assert!(err.contains("notes.png") && err.contains("cannot decode"), "{err}");
        let truncated = dir.path().join("cut.png");
        let full = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/luma/rgb.png"))?;
        std::fs::write(&truncated, &full[..full.len() / 2])?;
        let err = format!("{:#}", read(&truncated).err().context("truncated PNG decoded")?);
        assert!(err.contains("cut.png") && err.contains("cannot decode"), "{err}");
        Ok(())
    }
}
