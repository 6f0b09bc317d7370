//! Reading a PNG of any size and colour type as an 8-bit grey image, as PIL's `convert("L")` does.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// A grey image, row-major.
pub struct Grey {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height` pixels.
    pub pixels: Vec<u8>,
}

/// Decodes `path`; colour is converted with ITU-R 601-2 luma (L = R·299/1000 + G·587/1000 +
/// B·114/1000), alpha is dropped, 16-bit samples keep their high byte.
pub fn read_png(path: &Path) -> Result<Grey> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().with_context(|| format!("{} is not a readable PNG", path.display()))?;
    let (width, height) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    if width == 0 || height == 0 || width * height > 64 * 1024 * 1024 {
        bail!("{}: unsupported image size {width}x{height}", path.display());
    }
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).with_context(|| format!("{}: corrupt PNG data", path.display()))?;
    let data = &buf[..frame.buffer_size()];
    let channels = match frame.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{}: palette PNG was not expanded", path.display()),
    };
    let stride = frame.line_size;
    let mut pixels = Vec::with_capacity(width * height);
    for y in 0..height {
        let row = &data[y * stride..y * stride + width * channels];
        for px in row.chunks_exact(channels) {
            pixels.push(match channels {
                1 | 2 => px[0],
                _ => luma(px[0], px[1], px[2]),
            });
        }
    }
    Ok(Grey { width, height, pixels })
}

/// PIL's integer luma: `(R·19595 + G·38470 + B·7471 + 0x8000) >> 16`.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
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
    }
}
