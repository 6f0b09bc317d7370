//! What `fetch-data` installs: the files, the checksums of their content, and where to find them.

/// Base URLs that serve the four Fashion-MNIST `.gz` files, tried in this order.
///
/// The first is Zalando's own S3 website bucket (the one torchvision uses), the second is
/// Keras's copy (byte-identical files), the third is the zalandoresearch/fashion-mnist repository.
pub const FASHION_MNIST_MIRRORS: [&str; 3] = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
];

/// Where Debian's `dataset-fashion-mnist` package installs the four `.gz` files.
pub const DEBIAN_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The Debian package that provides [`DEBIAN_DATA_DIR`].
pub const DEBIAN_PACKAGE: &str = "dataset-fashion-mnist";

/// One file to install, identified by its *decompressed* content.
///
/// Checking the content rather than the `.gz` bytes lets a re-compressed copy (Debian re-gzips
/// its files) pass, while a corrupt or truncated one never does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Name under which the gzipped file is installed and served, e.g. `train-labels-idx1-ubyte.gz`.
    pub name: String,
    /// Size of the decompressed content in bytes.
    pub size: u64,
    /// SHA-256 of the decompressed content, as lowercase hex.
    pub sha256: String,
}

/// The set of files `fetch-data` installs into one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub files: Vec<FileSpec>,
}

impl FileSpec {
    pub fn new(name: &str, size: u64, sha256: &str) -> Self {
        Self { name: name.to_owned(), size, sha256: sha256.to_ascii_lowercase() }
    }

    /// The name of the uncompressed file, which `--from` accepts as well.
    pub fn raw_name(&self) -> &str {
        self.name.strip_suffix(".gz").unwrap_or(&self.name)
    }

    /// The most bytes a server may send for this file before we give up on it.
    ///
    /// Deflate never grows incompressible data by more than a few bytes per 16 KiB block, so
    /// 1/64 of the content plus 64 KiB for headers covers any honest gzip (or a raw copy).
    pub fn max_download_bytes(&self) -> u64 {
        self.size + self.size / 64 + 64 * 1024
    }
}

impl Manifest {
    /// The four Fashion-MNIST files.
    ///
    /// Sizes and SHA-256s are of the decompressed IDX files, computed from Debian's
    /// `dataset-fashion-mnist` 0.0~git20200523.55506a9-1; the label files equal the decompressed
    /// files of the zalandoresearch/fashion-mnist repository (see "Fashion-MNIST files" in
    /// REFERENCE.md). Upstream's `.gz` MD5s (8d4fb7e6…, 25c81989…, bef4ecab…, bb300cfd…) are not
    /// used because they reject Debian's re-gzipped copies of the same content.
    pub fn fashion_mnist() -> Self {
        Self {
            files: vec![
                FileSpec::new(
                    "train-images-idx3-ubyte.gz",
                    47_040_016,
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                ),
                FileSpec::new(
                    "train-labels-idx1-ubyte.gz",
                    60_008,
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                ),
                FileSpec::new(
                    "t10k-images-idx3-ubyte.gz",
                    7_840_016,
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                ),
                FileSpec::new(
                    "t10k-labels-idx1-ubyte.gz",
                    10_008,
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fashion_mnist_manifest_is_well_formed() {
        let manifest = Manifest::fashion_mnist();
        assert_eq!(manifest.files.len(), 4);
        for spec in &manifest.files {
            assert!(spec.name.ends_with("-ubyte.gz"), "{}", spec.name);
            assert!(!spec.raw_name().ends_with(".gz"));
            assert_eq!(spec.sha256.len(), 64);
            assert!(spec.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn mirrors_end_with_a_slash() {
        assert!(FASHION_MNIST_MIRRORS.iter().all(|m| m.ends_with('/')));
    }
}
