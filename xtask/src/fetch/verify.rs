//! Checking a file against its [`FileSpec`]: size and SHA-256 of the decompressed content.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use flate2::bufread::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::manifest::FileSpec;

/// How a verified file was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Raw,
}

/// Why a file does not match its [`FileSpec`].
#[derive(Debug)]
pub enum VerifyError {
    /// The file could not be opened or read, or its gzip stream is corrupt or truncated.
    Unreadable(io::Error),
    /// The content is longer than expected (reading stopped one byte past the expected size).
    TooLarge { expected: u64 },
    /// The content ended early.
    TooSmall { expected: u64, found: u64 },
    /// The size is right but the content is not.
    Checksum { expected: String, found: String },
}

/// Checks the file at `path`, gzipped or not, against `spec`.
pub fn verify_file(path: &Path, spec: &FileSpec) -> Result<Encoding, VerifyError> {
    let file = File::open(path).map_err(VerifyError::Unreadable)?;
    verify_reader(BufReader::with_capacity(1 << 16, file), spec)
}

/// Checks a stream, gzipped (sniffed by its magic bytes) or not, against `spec`.
///
/// Never reads more than `spec.size + 1` decompressed bytes, so a gzip bomb costs no more than
/// a correct file.
pub fn verify_reader(mut reader: impl BufRead, spec: &FileSpec) -> Result<Encoding, VerifyError> {
    let is_gzip = reader.fill_buf().map_err(VerifyError::Unreadable)?.starts_with(&[0x1f, 0x8b]);
    let (encoding, found) = if is_gzip {
        (Encoding::Gzip, hash_prefix(MultiGzDecoder::new(reader), spec.size + 1)?)
    } else {
        (Encoding::Raw, hash_prefix(reader, spec.size + 1)?)
    };
    let (len, digest) = found;
    if len > spec.size {
        return Err(VerifyError::TooLarge { expected: spec.size });
    }
    if len < spec.size {
        return Err(VerifyError::TooSmall { expected: spec.size, found: len });
    }
    if digest != spec.sha256 {
        return Err(VerifyError::Checksum { expected: spec.sha256.clone(), found: digest });
    }
    Ok(encoding)
}

/// SHA-256 (lowercase hex) of `bytes`.
#[cfg(test)]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Gzip => "gzip",
            Encoding::Raw => "uncompressed",
        })
    }
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyError::Unreadable(e) => write!(f, "cannot read or decompress: {e}"),
            VerifyError::TooLarge { expected } => {
                write!(f, "content is larger than the expected {expected} bytes")
            }
            VerifyError::TooSmall { expected, found } => {
                write!(f, "content is {found} bytes, expected {expected} (truncated?)")
            }
            VerifyError::Checksum { expected, found } => {
                write!(f, "SHA-256 of the content is {found}, expected {expected}")
            }
        }
    }
}

impl std::error::Error for VerifyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VerifyError::Unreadable(e) => Some(e),
            _ => None,
        }
    }
}

/// Hashes at most `limit` bytes of `reader`; returns how many there were and their SHA-256.
fn hash_prefix(reader: impl Read, limit: u64) -> Result<(u64, String), VerifyError> {
    let mut limited = reader.take(limit);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(VerifyError::Unreadable(e)),
        };
        let chunk = buf.get(..n).expect("read returns at most the buffer's length");
        hasher.update(chunk);
        len += n as u64;
    }
    Ok((len, hex(&hasher.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
        s
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::{write::GzEncoder, Compression};

    use super::*;

    fn spec_for(content: &[u8]) -> FileSpec {
        FileSpec::new("x-idx1-ubyte.gz", content.len() as u64, &sha256_hex(content))
    }

    fn gzip(content: &[u8], level: u32) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::new(level));
        enc.write_all(content).expect("in-memory write");
        enc.finish().expect("in-memory write")
    }

    fn content() -> Vec<u8> {
        let mut bytes = vec![0, 0, 8, 1, 0, 0, 0, 200];
        bytes.extend((0..200u32).map(|i| (i * 7 % 10) as u8));
        bytes
    }

    #[test]
    fn known_sha256() {
        assert_eq!(sha256_hex(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn raw_and_differently_gzipped_copies_pass() -> Result<(), VerifyError> {
        let content = content();
        let spec = spec_for(&content);
        assert_eq!(verify_reader(&content[..], &spec)?, Encoding::Raw);
        let (fast, best) = (gzip(&content, 1), gzip(&content, 9));
        assert_eq!(verify_reader(&fast[..], &spec)?, Encoding::Gzip);
        assert_eq!(verify_reader(&best[..], &spec)?, Encoding::Gzip);
        Ok(())
    }

    #[test]
    fn a_changed_byte_fails_the_checksum() {
        let content = content();
        let spec = spec_for(&content);
        let mut bad = content.clone();
        bad[100] ^= 1;
        let result = verify_reader(&gzip(&bad, 6)[..], &spec);
        assert!(matches!(result, Err(VerifyError::Checksum { .. })), "{result:?}");
    }

    #[test]
    fn a_truncated_gzip_fails() {
        let content = content();
        let spec = spec_for(&content);
        let gz = gzip(&content, 6);
        for cut in [gz.len() - 1, gz.len() - 8, gz.len() / 2, 11] {
            let result = verify_reader(&gz[..cut], &spec);
            assert!(result.is_err(), "cut at {cut} passed");
        }
        let result = verify_reader(&content[..content.len() - 1], &spec);
        assert!(matches!(result, Err(VerifyError::TooSmall { .. })), "{result:?}");
    }

    #[test]
    fn trailing_garbage_after_the_gzip_member_fails() {
        let content = content();
        let spec = spec_for(&content);
        let mut gz = gzip(&content, 6);
        gz.extend_from_slice(b"garbage");
        assert!(verify_reader(&gz[..], &spec).is_err());
    }

    #[test]
    fn a_gzip_bomb_stops_one_byte_past_the_expected_size() {
        // 64 MiB of zeros compresses to about 64 KiB; the reader must give up after 1 KiB.
        let bomb = gzip(&vec![0u8; 64 << 20], 1);
        let spec = FileSpec::new("bomb.gz", 1024, &sha256_hex(&[0u8; 1024]));
        let result = verify_reader(&bomb[..], &spec);
        assert!(matches!(result, Err(VerifyError::TooLarge { expected: 1024 })), "{result:?}");
    }
}
