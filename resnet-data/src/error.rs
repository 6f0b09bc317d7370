//! `DataError`, the one error type of this crate, and its `Result` alias.

use std::path::{Path, PathBuf};

/// Everything that can go wrong while finding, reading, validating or batching data.
///
/// Variants about a file carry its path together with what was expected and what was found, so
/// that the message alone tells the user which file is at fault and how.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The first four bytes are not the IDX magic number of the expected kind of file.
    #[error("{}: not an IDX {kind} file: magic number {found:#010x}, expected {expected:#010x}", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// `"images"` or `"labels"`.
        kind: &'static str,
        /// The magic number of that kind of file.
        expected: u32,
        /// The number in the file.
        found: u32,
    },

    /// The header declares dimensions that this kind of file cannot have (wrong number of
    /// dimensions, an image side of zero, train and test images of different sizes).
    #[error("{}: bad dimensions: expected {expected}, found {found}", path.display())]
    BadDims {
        /// The file.
        path: PathBuf,
        /// What the dimensions should be.
        expected: String,
        /// What the header says.
        found: String,
    },

    /// The (decompressed) content ends before the header's item count is reached.
    #[error("{}: truncated: the header promises {expected_bytes} bytes, the data holds only {found_bytes}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Header plus items, as declared by the header.
        expected_bytes: u64,
        /// What is actually there.
        found_bytes: u64,
    },

    /// The (decompressed) content continues after the last declared item.
    #[error("{}: trailing data: the header promises exactly {expected_bytes} bytes, the data holds {found_bytes}", path.display())]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// Header plus items, as declared by the header.
        expected_bytes: u64,
        /// What is actually there (counted up to the decompression limit).
        found_bytes: u64,
    },

    /// The header declares more data than the reader accepts. Raised from the header alone,
    /// before anything is allocated for the items.
    #[error("{}: the header declares {claimed_bytes} bytes, more than the limit of {limit_bytes}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Header plus items as declared (saturated at `u64::MAX`).
        claimed_bytes: u64,
        /// The largest content accepted.
        limit_bytes: u64,
    },

    /// A label is not a valid class index.
    #[error("{}: label {label} at index {index} is out of range: expected 0..{num_classes}", path.display())]
    LabelOutOfRange {
        /// The labels file.
        path: PathBuf,
        /// Position of the label in the file.
        index: usize,
        /// The offending value.
        label: u8,
        /// Labels must be below this.
        num_classes: u8,
    },

    /// An images file and its labels file disagree on the number of items.
    #[error("{} holds {images} images but {} holds {labels} labels", images_path.display(), labels_path.display())]
    CountMismatch {
        /// The images file.
        images_path: PathBuf,
        /// The labels file.
        labels_path: PathBuf,
        /// Items in the images file.
        images: usize,
        /// Items in the labels file.
        labels: usize,
    },

    /// Reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A file starts like gzip but does not decompress.
    #[error("{}: corrupt gzip stream: {source}", path.display())]
    Gzip {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        source: std::io::Error,
    },

    /// No directory holding all four Fashion-MNIST files was found.
    #[error(
        "Fashion-MNIST not found: looked for {} (each gzipped or raw) in {}. \
         To get the data, run `cargo xtask fetch-data`, or `apt-get install dataset-fashion-mnist`",
        .files.join(", "),
        join_paths(.searched)
    )]
    NotFound {
        /// The file names looked for (each gzipped or raw).
        files: &'static [&'static str],
        /// Every directory that was searched, in order.
        searched: Vec<PathBuf>,
    },

    /// A configuration value is out of its documented range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A size argument is outside the supported range.
    #[error("{what} must be in {min}..={max}, found {found}")]
    SizeOutOfRange {
        /// Which size.
        what: &'static str,
        /// Smallest accepted value.
        min: usize,
        /// Largest accepted value.
        max: usize,
        /// The value given.
        found: usize,
    },

    /// A buffer does not have the length its dimensions require.
    #[error("{what}: expected {expected} elements, found {found}")]
    BufferSize {
        /// Which buffer.
        what: &'static str,
        /// Length implied by the dimensions.
        expected: usize,
        /// Actual length.
        found: usize,
    },

    /// A background batch worker stopped without delivering a batch (it panicked).
    #[error("batch worker stopped before delivering batch {batch}")]
    WorkerFailed {
        /// The batch that never arrived.
        batch: usize,
    },

    /// Building a tensor failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// `Result` with [`DataError`].
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}

fn join_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no directory (none configured)".to_owned();
    }
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_places_and_remedies() {
        let err = DataError::NotFound {
            files: &["train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
            searched: vec![PathBuf::from("/a/b"), PathBuf::from("/c")],
        };
        let msg = err.to_string();
        for needle in
            ["/a/b", "/c", "cargo xtask fetch-data", "apt-get install dataset-fashion-mnist", "train-images-idx3-ubyte"]
        {
            assert!(msg.contains(needle), "message lacks {needle:?}: {msg}");
        }
    }

    #[test]
    fn bad_magic_shows_hex() {
        let err = DataError::BadMagic { path: PathBuf::from("x"), kind: "images", expected: 2051, found: 7 };
        let msg = err.to_string();
        assert!(msg.contains("0x00000803") && msg.contains("0x00000007"), "{msg}");
    }
}
