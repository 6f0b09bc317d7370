//! The IDX container (LeCun's MNIST format): validated parsing of gzipped or raw bytes and files,
//! and encoding.
//!
//! An images file is the big-endian `u32`s `0x00000803`, count, rows, cols, followed by
//! `count * rows * cols` pixel bytes; a labels file is `0x00000801`, count, then `count` bytes.
//! Gzip is recognised by its content (`1f 8b`), never by the file name.
//!
//! Validation happens on the header, before anything is allocated for the items: a header that
//! declares more than [`MAX_DECOMPRESSED_BYTES`] is rejected outright, and the items are read
//! through a reader capped at the declared size, so neither a lying header nor a gzip bomb can
//! exhaust memory. The content must then hold exactly the declared items: short data and trailing
//! data are both errors.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::error::{DataError, Result};

/// Magic number of an IDX file of unsigned bytes in three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes in one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// The largest (decompressed) IDX content accepted: 1 GiB, twenty times Fashion-MNIST's
/// training images.
pub const MAX_DECOMPRESSED_BYTES: u64 = 1 << 30;

const IMAGES_HEADER: usize = 16;
const LABELS_HEADER: usize = 8;
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The content of an IDX images file.
///
/// # Shapes
/// `pixels`: `(count, rows, cols)` row-major, one byte per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// `count * rows * cols` pixel bytes.
    pub pixels: Vec<u8>,
}

/// The content of an IDX labels file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxLabels {
    /// One byte per item.
    pub labels: Vec<u8>,
}

/// Parses an images file held in memory, gzipped or raw. `path` only names the data in errors.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages> {
    parse_images_limited(bytes, path, MAX_DECOMPRESSED_BYTES)
}

/// Parses a labels file held in memory, gzipped or raw. `path` only names the data in errors.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<IdxLabels> {
    parse_labels_limited(bytes, path, MAX_DECOMPRESSED_BYTES)
}

/// Reads and parses an images file, gzipped or raw, streaming (the compressed file is never
/// held in memory).
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    decode(BufReader::new(file), path, Kind::Images, MAX_DECOMPRESSED_BYTES)?.into_images()
}

/// Reads and parses a labels file, gzipped or raw.
pub fn read_labels(path: &Path) -> Result<IdxLabels> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    decode(BufReader::new(file), path, Kind::Labels, MAX_DECOMPRESSED_BYTES)?.into_labels()
}

/// Encodes images as a raw IDX images file.
///
/// The header is written from `images.count`, `rows` and `cols` as they are; if they do not
/// match `pixels.len()` (or exceed `u32`) the result is a file that [`parse_images`] rejects.
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let mut out = Vec::with_capacity(IMAGES_HEADER + images.pixels.len());
    for word in [IMAGES_MAGIC, saturate(images.count), saturate(images.rows), saturate(images.cols)] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(&images.pixels);
    out
}

/// Encodes labels as a raw IDX labels file.
pub fn encode_labels(labels: &IdxLabels) -> Vec<u8> {
    let mut out = Vec::with_capacity(LABELS_HEADER + labels.labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&saturate(labels.labels.len()).to_be_bytes());
    out.extend_from_slice(&labels.labels);
    out
}

/// Gzips bytes (for writing `.gz` datasets and test fixtures).
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("writing into a Vec cannot fail");
    encoder.finish().expect("writing into a Vec cannot fail")
}

impl IdxImages {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl IdxLabels {
    /// Number of labels.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Checks that every label is below `num_classes`; `path` names the file in the error.
    pub fn check_range(&self, num_classes: u8, path: &Path) -> Result<()> {
        match self.labels.iter().position(|&l| l >= num_classes) {
            None => Ok(()),
            Some(index) => Err(DataError::LabelOutOfRange {
                path: path.to_path_buf(),
                index,
                label: self.labels[index],
                num_classes,
            }),
        }
    }
}

pub(crate) fn parse_images_limited(bytes: &[u8], path: &Path, limit: u64) -> Result<IdxImages> {
    decode(bytes, path, Kind::Images, limit)?.into_images()
}

pub(crate) fn parse_labels_limited(bytes: &[u8], path: &Path, limit: u64) -> Result<IdxLabels> {
    decode(bytes, path, Kind::Labels, limit)?.into_labels()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Images,
    Labels,
}

/// A validated IDX file: its item dimensions and data.
#[derive(Debug)]
struct Decoded {
    kind: Kind,
    count: usize,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Images => "images",
            Kind::Labels => "labels",
        }
    }

    fn magic(self) -> u32 {
        match self {
            Kind::Images => IMAGES_MAGIC,
            Kind::Labels => LABELS_MAGIC,
        }
    }

    fn header_len(self) -> usize {
        match self {
            Kind::Images => IMAGES_HEADER,
            Kind::Labels => LABELS_HEADER,
        }
    }

    fn dims(self) -> u32 {
        self.magic() & 0xff
    }
}

impl Decoded {
    fn into_images(self) -> Result<IdxImages> {
        debug_assert_eq!(self.kind, Kind::Images);
        Ok(IdxImages { count: self.count, rows: self.rows, cols: self.cols, pixels: self.data })
    }

    fn into_labels(self) -> Result<IdxLabels> {
        debug_assert_eq!(self.kind, Kind::Labels);
        Ok(IdxLabels { labels: self.data })
    }
}

/// Sniffs gzip from the first two bytes and decodes the (decompressed) stream.
fn decode<R: Read>(mut reader: R, path: &Path, kind: Kind, limit: u64) -> Result<Decoded> {
    let mut sniff = [0u8; 2];
    let n = read_up_to(&mut reader, &mut sniff).map_err(|e| DataError::io(path, e))?;
    let prefix = &sniff[..n];
    let stream = prefix.chain(reader);
    if prefix == GZIP_MAGIC {
        let wrap = |e| DataError::Gzip { path: path.to_path_buf(), source: e };
        decode_stream(MultiGzDecoder::new(stream), path, kind, limit, wrap)
    } else {
        decode_stream(stream, path, kind, limit, |e| DataError::io(path, e))
    }
}

/// Validates the header, then reads exactly the declared items.
fn decode_stream<R: Read>(
    mut stream: R,
    path: &Path,
    kind: Kind,
    limit: u64,
    wrap: impl Fn(io::Error) -> DataError,
) -> Result<Decoded> {
    let header_len = kind.header_len();
    let mut header = [0u8; IMAGES_HEADER];
    let header = &mut header[..header_len];
    let got = read_up_to(&mut stream, &mut header[..4]).map_err(&wrap)?;
    if got < 4 {
        return Err(truncated(path, header_len as u64, got as u64));
    }
    let magic = be_u32(header, 0);
    if magic != kind.magic() {
        // Same element type (unsigned byte) but another rank: say so, rather than "bad magic".
        if magic & 0xffff_ff00 == 0x0000_0800 {
            return Err(DataError::BadDims {
                path: path.to_path_buf(),
                expected: format!("{} dimension(s) ({} file)", kind.dims(), kind.name()),
                found: format!("{} dimension(s)", magic & 0xff),
            });
        }
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            kind: kind.name(),
            expected: kind.magic(),
            found: magic,
        });
    }
    let got = 4 + read_up_to(&mut stream, &mut header[4..]).map_err(&wrap)?;
    if got < header_len {
        return Err(truncated(path, header_len as u64, got as u64));
    }
    let count = be_u32(header, 4);
    let (rows, cols) = match kind {
        Kind::Images => (be_u32(header, 8), be_u32(header, 12)),
        Kind::Labels => (1, 1),
    };
    if rows == 0 || cols == 0 {
        return Err(DataError::BadDims {
            path: path.to_path_buf(),
            expected: "images of at least 1x1 pixel".to_owned(),
            found: format!("{rows}x{cols}"),
        });
    }
    // u32 * u32 * u32 can overflow u64: saturate, the limit check catches it.
    let body = u64::from(count).checked_mul(u64::from(rows)).and_then(|v| v.checked_mul(u64::from(cols)));
    let total = body.and_then(|b| b.checked_add(header_len as u64));
    let (body, total) = match (body, total) {
        (Some(b), Some(t)) if t <= limit => (b, t),
        _ => {
            return Err(DataError::TooLarge {
                path: path.to_path_buf(),
                claimed_bytes: total.unwrap_or(u64::MAX),
                limit_bytes: limit,
            })
        }
    };
    // Do not trust the header for the allocation: start small and let the data grow the buffer.
    let mut data = Vec::with_capacity(body.min(1 << 20) as usize);
    stream.by_ref().take(body).read_to_end(&mut data).map_err(&wrap)?;
    let found = header_len as u64 + data.len() as u64;
    if found < total {
        return Err(truncated(path, total, found));
    }
    // Count (without storing) whatever follows, up to the limit.
    let extra = io::copy(&mut stream.take(limit), &mut io::sink()).map_err(&wrap)?;
    if extra > 0 {
        return Err(DataError::TrailingBytes {
            path: path.to_path_buf(),
            expected_bytes: total,
            found_bytes: total.saturating_add(extra),
        });
    }
    // The header fields fit in u32 and the content in memory, so these conversions hold.
    let to_usize = |v: u32| usize::try_from(v).expect("u32 fits in usize on supported targets");
    Ok(Decoded { kind, count: to_usize(count), rows: to_usize(rows), cols: to_usize(cols), data })
}

fn truncated(path: &Path, expected_bytes: u64, found_bytes: u64) -> DataError {
    DataError::Truncated { path: path.to_path_buf(), expected_bytes, found_bytes }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_up_to<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_be_bytes(word)
}

fn saturate(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("test.idx")
    }

    fn images(count: usize, rows: usize, cols: usize) -> IdxImages {
        let pixels = (0..count * rows * cols).map(|i| (i * 7 % 256) as u8).collect();
        IdxImages { count, rows, cols, pixels }
    }

    fn header(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    #[test]
    fn images_round_trip_raw_and_gzip() -> Result<()> {
        let original = images(3, 4, 5);
        let raw = encode_images(&original);
        assert_eq!(raw.len(), 16 + 60);
        assert_eq!(parse_images(&raw, path())?, original);
        assert_eq!(parse_images(&gzip(&raw), path())?, original);
        Ok(())
    }

    #[test]
    fn labels_round_trip_raw_and_gzip() -> Result<()> {
        let original = IdxLabels { labels: vec![0, 9, 3, 3, 7] };
        let raw = encode_labels(&original);
        assert_eq!(&raw[..8], &[0, 0, 8, 1, 0, 0, 0, 5]);
        assert_eq!(parse_labels(&raw, path())?, original);
        assert_eq!(parse_labels(&gzip(&raw), path())?, original);
        Ok(())
    }

    #[test]
    fn empty_files_are_valid() -> Result<()> {
        let none = parse_images(&header(&[IMAGES_MAGIC, 0, 28, 28]), path())?;
        assert_eq!((none.count, none.rows, none.cols, none.pixels.len()), (0, 28, 28, 0));
        assert!(parse_labels(&header(&[LABELS_MAGIC, 0]), path())?.is_empty());
        Ok(())
    }

    #[test]
    fn bad_magic() {
        let bytes = header(&[0x1234_5678, 1, 1, 1]);
        let err = parse_images(&bytes, path());
        assert!(matches!(err, Err(DataError::BadMagic { expected: IMAGES_MAGIC, found: 0x1234_5678, .. })), "{err:?}");
        let err = parse_labels(&header(&[0xdead_beef, 0]), path());
        assert!(matches!(err, Err(DataError::BadMagic { found: 0xdead_beef, .. })), "{err:?}");
    }

    #[test]
    fn labels_file_read_as_images_is_bad_dims() {
        let labels = encode_labels(&IdxLabels { labels: vec![1, 2] });
        let err = parse_images(&labels, path());
        assert!(matches!(err, Err(DataError::BadDims { .. })), "{err:?}");
        let imgs = encode_images(&images(1, 2, 2));
        let err = parse_labels(&imgs, path());
        assert!(matches!(err, Err(DataError::BadDims { .. })), "{err:?}");
    }

    #[test]
    fn zero_side_is_bad_dims() {
        let err = parse_images(&header(&[IMAGES_MAGIC, 1, 0, 28]), path());
        assert!(matches!(err, Err(DataError::BadDims { .. })), "{err:?}");
    }

    #[test]
    fn short_header_is_truncated() {
        for len in 0..16 {
            let bytes = &encode_images(&images(1, 2, 2))[..len];
            let err = parse_images(bytes, path());
            let ok = match &err {
                Err(DataError::Truncated { expected_bytes: 16, found_bytes, .. }) => *found_bytes == len as u64,
                _ => false,
            };
            assert!(ok, "len {len}: {err:?}");
        }
    }

    #[test]
    fn short_body_is_truncated() {
        let bytes = encode_images(&images(2, 3, 3));
        let err = parse_images(&bytes[..bytes.len() - 1], path());
        assert!(matches!(err, Err(DataError::Truncated { expected_bytes: 34, found_bytes: 33, .. })), "{err:?}");
        let labels = encode_labels(&IdxLabels { labels: vec![1, 2, 3] });
        let err = parse_labels(&labels[..9], path());
        assert!(matches!(err, Err(DataError::Truncated { expected_bytes: 11, found_bytes: 9, .. })), "{err:?}");
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode_labels(&IdxLabels { labels: vec![1, 2, 3] });
        bytes.extend_from_slice(&[0, 0]);
        let err = parse_labels(&bytes, path());
        assert!(matches!(err, Err(DataError::TrailingBytes { expected_bytes: 11, found_bytes: 13, .. })), "{err:?}");
        let err = parse_labels(&gzip(&bytes), path());
        assert!(matches!(err, Err(DataError::TrailingBytes { .. })), "{err:?}");
    }

    #[test]
    fn huge_header_is_rejected_before_allocation() {
        // 4 billion images of 65535x65535 would overflow u64; 2^31 of 28x28 is 1.6 TB.
        for words in [[IMAGES_MAGIC, u32::MAX, u32::MAX, u32::MAX], [IMAGES_MAGIC, 1 << 31, 28, 28]] {
            let err = parse_images(&header(&words), path());
            assert!(matches!(err, Err(DataError::TooLarge { .. })), "{err:?}");
        }
        let err = parse_labels_limited(&header(&[LABELS_MAGIC, 100]), path(), 50);
        assert!(matches!(err, Err(DataError::TooLarge { claimed_bytes: 108, limit_bytes: 50, .. })), "{err:?}");
    }

    #[test]
    fn gzip_bomb_is_bounded() {
        // A valid 8-byte header declaring 8 labels, followed by 64 MiB of zeros, compresses to
        // about 64 KiB; decoding must stop counting at the limit instead of buffering it.
        let mut raw = encode_labels(&IdxLabels { labels: vec![0; 8] });
        raw.resize(raw.len() + (64 << 20), 0);
        let bomb = gzip(&raw);
        assert!(bomb.len() < 1 << 20);
        let err = parse_labels_limited(&bomb, path(), 1 << 20);
        assert!(
            matches!(err, Err(DataError::TrailingBytes { expected_bytes: 16, found_bytes, .. }) if found_bytes <= 16 + (1 << 20)),
            "{err:?}"
        );
    }

    #[test]
    fn corrupt_gzip_is_gzip_error() {
        let mut bytes = gzip(&encode_labels(&IdxLabels { labels: vec![1; 100] }));
        let mid = bytes.len() / 2;
        for b in &mut bytes[10..mid] {
            *b ^= 0x5a;
        }
        let err = parse_labels(&bytes, path());
        assert!(matches!(err, Err(DataError::Gzip { .. })), "{err:?}");
    }

    #[test]
    fn label_range_check() -> Result<()> {
        let labels = IdxLabels { labels: vec![0, 9, 10, 3] };
        let err = labels.check_range(10, path());
        assert!(matches!(err, Err(DataError::LabelOutOfRange { index: 2, label: 10, num_classes: 10, .. })), "{err:?}");
        labels.check_range(11, path())
    }

    #[test]
    fn files_are_sniffed_by_content_not_name() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| DataError::io(Path::new("tempdir"), e))?;
        let original = images(2, 3, 4);
        // A gzipped file without `.gz` and a raw file with `.gz`.
        let gz = dir.path().join("images");
        let raw = dir.path().join("images.gz");
        std::fs::write(&gz, gzip(&encode_images(&original))).map_err(|e| DataError::io(&gz, e))?;
        std::fs::write(&raw, encode_images(&original)).map_err(|e| DataError::io(&raw, e))?;
        assert_eq!(read_images(&gz)?, original);
        assert_eq!(read_images(&raw)?, original);
        let missing = dir.path().join("missing");
        assert!(matches!(read_labels(&missing), Err(DataError::Io { .. })));
        Ok(())
    }
}
