//! Fashion-MNIST: class names, file names, finding the data on disk, and loading it into `Split`s.
//!
//! This module never downloads. A missing dataset is a [`DataError::NotFound`] that lists every
//! directory searched and names `cargo xtask fetch-data` and the Debian package.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{DataError, Result};
use crate::idx::{self, IdxImages, IdxLabels};

/// The ten classes, indexed by label.
pub const CLASS_NAMES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];
/// Number of classes; every label is below this.
pub const NUM_CLASSES: usize = CLASS_NAMES.len();

/// Training images file name (without `.gz`).
pub const TRAIN_IMAGES: &str = "train-images-idx3-ubyte";
/// Training labels file name (without `.gz`).
pub const TRAIN_LABELS: &str = "train-labels-idx1-ubyte";
/// Test images file name (without `.gz`).
pub const TEST_IMAGES: &str = "t10k-images-idx3-ubyte";
/// Test labels file name (without `.gz`).
pub const TEST_LABELS: &str = "t10k-labels-idx1-ubyte";
/// The four files of the dataset; each may be present as `<name>.gz` or as raw `<name>`.
pub const FILES: [&str; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];

/// Where Debian's `dataset-fashion-mnist` package installs the files.
pub const DEBIAN_DIR: &str = "/usr/share/datasets/fashion-mnist";
/// Environment variable naming a data directory, searched after an explicit one.
pub const DATA_DIR_ENV: &str = "RESNET_DATA_DIR";

/// One split (train or test): images and their labels, in file order.
///
/// # Shapes
/// `images`: `(len, rows, cols)` row-major bytes; `labels`: `(len,)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// `len * rows * cols` pixel bytes, image after image.
    pub images: Vec<u8>,
    /// One label per image, each below [`NUM_CLASSES`].
    pub labels: Vec<u8>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

/// Both splits of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FashionMnist {
    /// The 60,000 training images.
    pub train: Split,
    /// The 10,000 test images.
    pub test: Split,
}

impl Split {
    /// Builds a split, checking that the buffers agree with the dimensions and that every
    /// label is a class index.
    pub fn new(images: Vec<u8>, labels: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        let split = Self { images, labels, rows, cols };
        split.check()?;
        if let Some(index) = split.labels.iter().position(|&l| usize::from(l) >= NUM_CLASSES) {
            return Err(DataError::LabelOutOfRange {
                path: PathBuf::from("<memory>"),
                index,
                label: split.labels[index],
                num_classes: NUM_CLASSES as u8,
            });
        }
        Ok(split)
    }

    /// A deterministic, learnable stand-in for Fashion-MNIST, for tests and smoke runs: labels
    /// cycle through the classes, and an image of class `c` is noise with a bright horizontal
    /// band in the `c`-th tenth of its height.
    pub fn synthetic(len: usize, rows: usize, cols: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut images = Vec::with_capacity(len * rows * cols);
        let labels: Vec<u8> = (0..len).map(|i| (i % NUM_CLASSES) as u8).collect();
        for &label in &labels {
            for y in 0..rows {
                let band = y * NUM_CLASSES / rows.max(1) == usize::from(label);
                let base: u8 = if band { 180 } else { 20 };
                images.extend((0..cols).map(|_| base + rng.random_range(0..60u8)));
            }
        }
        Self { images, labels, rows, cols }
    }

    /// Checks that `images` holds exactly `len() * rows * cols` bytes and that images are not
    /// empty. Does not look at label values.
    pub fn check(&self) -> Result<()> {
        if self.rows == 0 || self.cols == 0 {
            return Err(DataError::BufferSize { what: "split image side (rows, cols)", expected: 1, found: 0 });
        }
        let expected = self.labels.len().checked_mul(self.pixels_per_image()).ok_or(DataError::BufferSize {
            what: "split pixels",
            expected: usize::MAX,
            found: self.images.len(),
        })?;
        if self.images.len() != expected {
            return Err(DataError::BufferSize {
                what: "split pixels (labels x rows x cols)",
                expected,
                found: self.images.len(),
            });
        }
        Ok(())
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `rows * cols`.
    pub fn pixels_per_image(&self) -> usize {
        self.rows * self.cols
    }

    /// Image `i`, `rows * cols` bytes row-major.
    ///
    /// # Panics
    /// If `i >= len()` (like slice indexing); see [`Split::get`].
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.pixels_per_image();
        &self.images[i * n..(i + 1) * n]
    }

    /// Image `i`, or `None` if out of range.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let n = self.pixels_per_image();
        let start = i.checked_mul(n)?;
        self.images.get(start..start.checked_add(n)?)
    }

    /// The first `n` examples (all of them if there are fewer).
    pub fn limit(mut self, n: usize) -> Split {
        let n = n.min(self.len());
        self.images.truncate(n * self.pixels_per_image());
        self.labels.truncate(n);
        self
    }

    /// Holds out `n` examples chosen by `seed` (a seeded shuffle, independent of the epoch
    /// orders): returns `(rest, held_out)`, each in file order. `n` must leave at least two
    /// examples on each side.
    ///
    /// ```
    /// let split = resnet_data::Split::synthetic(100, 4, 4, 0);
    /// let (train, val) = split.split_off_seeded(20, 7)?;
    /// assert_eq!((train.len(), val.len()), (80, 20));
    /// assert_eq!(split.split_off_seeded(20, 7)?.1, val);
    /// # Ok::<(), resnet_data::DataError>(())
    /// ```
    pub fn split_off_seeded(&self, n: usize, seed: u64) -> Result<(Split, Split)> {
        if n < 2 || n.saturating_add(2) > self.len() {
            return Err(DataError::SizeOutOfRange {
                what: "held-out examples",
                min: 2,
                max: self.len().saturating_sub(2),
                found: n,
            });
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        // A stream of its own: the held-out set must not move when the epoch shuffles change.
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x7661_6c5f_7370_6c74));
        let mut held = vec![false; self.len()];
        for &i in order.iter().take(n) {
            held[i] = true;
        }
        let px = self.pixels_per_image();
        let (mut rest, mut out) = (Split::empty_like(self), Split::empty_like(self));
        for (i, (&label, image)) in self.labels.iter().zip(self.images.chunks_exact(px.max(1))).enumerate() {
            let side = if held[i] { &mut out } else { &mut rest };
            side.labels.push(label);
            side.images.extend_from_slice(image);
        }
        Ok((rest, out))
    }

    fn empty_like(other: &Split) -> Split {
        Split { images: Vec::new(), labels: Vec::new(), rows: other.rows, cols: other.cols }
    }

    /// How many examples each class has; labels outside the classes are not counted.
    pub fn class_counts(&self) -> [usize; NUM_CLASSES] {
        let mut counts = [0; NUM_CLASSES];
        for &label in &self.labels {
            if let Some(c) = counts.get_mut(usize::from(label)) {
                *c += 1;
            }
        }
        counts
    }

    /// Loads a split from an images file and a labels file (each gzipped or raw), checking
    /// labels and counts.
    pub fn read(images_path: &Path, labels_path: &Path) -> Result<Self> {
        let IdxImages { count, rows, cols, pixels } = idx::read_images(images_path)?;
        let labels = idx::read_labels(labels_path)?;
        labels.check_range(NUM_CLASSES as u8, labels_path)?;
        if labels.len() != count {
            return Err(DataError::CountMismatch {
                images_path: images_path.to_path_buf(),
                labels_path: labels_path.to_path_buf(),
                images: count,
                labels: labels.len(),
            });
        }
        Ok(Self { images: pixels, labels: labels.labels, rows, cols })
    }

    /// Writes the split as an IDX images file and an IDX labels file (gzipped if `compress`).
    pub fn write(&self, images_path: &Path, labels_path: &Path, compress: bool) -> Result<()> {
        let images = idx::encode_images(&IdxImages {
            count: self.len(),
            rows: self.rows,
            cols: self.cols,
            pixels: self.images.clone(),
        });
        let labels = idx::encode_labels(&IdxLabels { labels: self.labels.clone() });
        for (path, bytes) in [(images_path, images), (labels_path, labels)] {
            let bytes = if compress { idx::gzip(&bytes) } else { bytes };
            std::fs::write(path, bytes).map_err(|e| DataError::io(path, e))?;
        }
        Ok(())
    }
}

impl FashionMnist {
    /// Loads all four files from `dir`, each as `<name>.gz` or raw `<name>`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = |name: &str| {
            find_file(dir, name).ok_or_else(|| DataError::NotFound { files: &FILES, searched: vec![dir.to_path_buf()] })
        };
        let (train_images, test_images) = (path(TRAIN_IMAGES)?, path(TEST_IMAGES)?);
        let train = Split::read(&train_images, &path(TRAIN_LABELS)?)?;
        let test = Split::read(&test_images, &path(TEST_LABELS)?)?;
        if (test.rows, test.cols) != (train.rows, train.cols) {
            return Err(DataError::BadDims {
                path: test_images,
                expected: format!("{}x{} images, like {}", train.rows, train.cols, train_images.display()),
                found: format!("{}x{}", test.rows, test.cols),
            });
        }
        tracing::info!(
            dir = %dir.display(),
            train = train.len(),
            test = test.len(),
            rows = train.rows,
            cols = train.cols,
            "loaded Fashion-MNIST"
        );
        Ok(Self { train, test })
    }

    /// Writes the dataset into `dir` (created if needed) under the standard file names, gzipped
    /// (`<name>.gz`) if `compress`; [`FashionMnist::load`] reads it back.
    pub fn save(&self, dir: &Path, compress: bool) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let file = |name: &str| dir.join(if compress { format!("{name}.gz") } else { name.to_owned() });
        self.train.write(&file(TRAIN_IMAGES), &file(TRAIN_LABELS), compress)?;
        self.test.write(&file(TEST_IMAGES), &file(TEST_LABELS), compress)
    }
}

/// The path of `<name>.gz` in `dir` if it is a file, else of `<name>` if that is, else `None`.
pub fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(format!("{name}.gz")), dir.join(name)].into_iter().find(|p| p.is_file())
}

/// Whether `dir` holds all four files (each gzipped or raw).
pub fn has_dataset(dir: &Path) -> bool {
    FILES.iter().all(|name| find_file(dir, name).is_some())
}

/// Where `cargo xtask fetch-data` stores the data by default:
/// `$XDG_CACHE_HOME/resnet-fashion/fashion-mnist`, or `$HOME/.cache/resnet-fashion/fashion-mnist`
/// when `XDG_CACHE_HOME` is unset or not absolute. `None` when neither variable is usable.
pub fn default_cache_dir() -> Option<PathBuf> {
    cache_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// Finds the data directory. Searched in order: `explicit`; `$RESNET_DATA_DIR`;
/// [`default_cache_dir`]; [`DEBIAN_DIR`]. The first directory holding all four files wins.
///
/// An explicit directory is not a hint: if it lacks the files, the error names it and nothing
/// else is searched. Otherwise [`DataError::NotFound`] lists every place searched.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf> {
    let env_dir = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    locate_in(explicit, env_dir, default_cache_dir(), Path::new(DEBIAN_DIR))
}

/// [`locate`], then [`FashionMnist::load`]; returns the directory used too.
pub fn load_default(explicit: Option<&Path>) -> Result<(FashionMnist, PathBuf)> {
    let dir = locate(explicit)?;
    Ok((FashionMnist::load(&dir)?, dir))
}

/// [`locate`], then only the test split: evaluation and prediction need no training data.
pub fn load_test(explicit: Option<&Path>) -> Result<(Split, PathBuf)> {
    let dir = locate(explicit)?;
    match (find_file(&dir, TEST_IMAGES), find_file(&dir, TEST_LABELS)) {
        (Some(images), Some(labels)) => Ok((Split::read(&images, &labels)?, dir)),
        _ => Err(DataError::NotFound { files: &FILES, searched: vec![dir] }),
    }
}

fn cache_dir_from(xdg_cache_home: Option<std::ffi::OsString>, home: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let base = xdg_cache_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home.filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("resnet-fashion").join("fashion-mnist"))
}

fn locate_in(
    explicit: Option<&Path>,
    env_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    debian_dir: &Path,
) -> Result<PathBuf> {
    if let Some(dir) = explicit {
        if has_dataset(dir) {
            return Ok(dir.to_path_buf());
        }
        return Err(DataError::NotFound { files: &FILES, searched: vec![dir.to_path_buf()] });
    }
    let mut searched = Vec::new();
    if let Some(dir) = env_dir {
        if has_dataset(&dir) {
            return Ok(dir);
        }
        tracing::warn!(dir = %dir.display(), "{DATA_DIR_ENV} does not hold Fashion-MNIST; searching on");
        searched.push(dir);
    }
    for dir in cache_dir.into_iter().chain([debian_dir.to_path_buf()]) {
        if has_dataset(&dir) {
            tracing::debug!(dir = %dir.display(), "found Fashion-MNIST");
            return Ok(dir);
        }
        searched.push(dir);
    }
    Err(DataError::NotFound { files: &FILES, searched })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| DataError::io(Path::new("tempdir"), e))
    }

    #[test]
    fn seeded_split_partitions_and_repeats() -> Result<()> {
        let split = Split::synthetic(50, 3, 2, 9);
        let (rest, held) = split.split_off_seeded(10, 1)?;
        assert_eq!((rest.len(), held.len()), (40, 10));
        let mut all: Vec<Vec<u8>> = (0..50).map(|i| split.image(i).to_vec()).collect();
        let mut parts: Vec<Vec<u8>> =
            (0..40).map(|i| rest.image(i).to_vec()).chain((0..10).map(|i| held.image(i).to_vec())).collect();
        all.sort();
        parts.sort();
        assert_eq!(all, parts, "every example lands on exactly one side");
        assert_eq!(split.split_off_seeded(10, 1)?, (rest, held.clone()));
        assert_ne!(split.split_off_seeded(10, 2)?.1, held, "another seed holds out others");
        assert!(split.split_off_seeded(49, 1).is_err() && split.split_off_seeded(1, 1).is_err());
        Ok(())
    }

    fn tiny() -> FashionMnist {
        FashionMnist { train: Split::synthetic(30, 6, 5, 1), test: Split::synthetic(10, 6, 5, 2) }
    }

    #[test]
    fn save_load_round_trip_gz_and_raw() -> Result<()> {
        for compress in [true, false] {
            let dir = tempdir()?;
            let data = tiny();
            data.save(dir.path(), compress)?;
            assert!(has_dataset(dir.path()));
            assert_eq!(FashionMnist::load(dir.path())?, data);
        }
        Ok(())
    }

    #[test]
    fn load_test_reads_only_the_test_split() -> Result<()> {
        let dir = tempdir()?;
        let data = tiny();
        data.save(dir.path(), true)?;
        // A corrupt training file does not matter to evaluation.
        std::fs::write(dir.path().join(format!("{TRAIN_IMAGES}.gz")), b"garbage")
            .map_err(|e| DataError::io(dir.path(), e))?;
        let (test, found) = load_test(Some(dir.path()))?;
        assert_eq!(test, data.test);
        assert_eq!(found, dir.path());
        assert!(FashionMnist::load(dir.path()).is_err());
        Ok(())
    }

    #[test]
    fn split_accessors() -> Result<()> {
        let split = Split::new((0..24).collect(), vec![3, 1, 3, 9], 2, 3)?;
        assert_eq!(split.len(), 4);
        assert_eq!(split.image(2), &[12, 13, 14, 15, 16, 17]);
        assert_eq!(split.get(4), None);
        let counts = split.class_counts();
        assert_eq!((counts[1], counts[3], counts[9], counts.iter().sum::<usize>()), (1, 2, 1, 4));
        let first = split.limit(2);
        assert_eq!((first.len(), first.images.len()), (2, 12));
        assert_eq!(first.clone().limit(100), first);
        Ok(())
    }

    #[test]
    fn split_new_rejects_inconsistent_buffers() {
        assert!(matches!(Split::new(vec![0; 5], vec![0], 2, 3), Err(DataError::BufferSize { .. })));
        assert!(matches!(Split::new(vec![0; 6], vec![10], 2, 3), Err(DataError::LabelOutOfRange { label: 10, .. })));
    }

    #[test]
    fn synthetic_is_balanced_and_deterministic() {
        let a = Split::synthetic(100, 28, 28, 7);
        assert_eq!(a.class_counts(), [10; 10]);
        assert_eq!(a, Split::synthetic(100, 28, 28, 7));
        assert_ne!(a.images, Split::synthetic(100, 28, 28, 8).images);
    }

    #[test]
    fn load_rejects_bad_labels_and_count_mismatch() -> Result<()> {
        let dir = tempdir()?;
        let mut data = tiny();
        data.test.labels[4] = 12;
        data.save(dir.path(), false)?;
        let err = FashionMnist::load(dir.path());
        assert!(matches!(err, Err(DataError::LabelOutOfRange { index: 4, label: 12, .. })), "{err:?}");

        tiny().save(dir.path(), false)?;
        let labels = dir.path().join(TRAIN_LABELS);
        let short = idx::encode_labels(&IdxLabels { labels: vec![1; 29] });
        std::fs::write(&labels, short).map_err(|e| DataError::io(&labels, e))?;
        let err = FashionMnist::load(dir.path());
        assert!(matches!(err, Err(DataError::CountMismatch { images: 30, labels: 29, .. })), "{err:?}");
        Ok(())
    }

    #[test]
    fn load_rejects_differing_train_test_sizes() -> Result<()> {
        let dir = tempdir()?;
        let data = FashionMnist { train: Split::synthetic(3, 6, 5, 1), test: Split::synthetic(3, 5, 6, 2) };
        data.save(dir.path(), true)?;
        let err = FashionMnist::load(dir.path());
        assert!(matches!(err, Err(DataError::BadDims { .. })), "{err:?}");
        Ok(())
    }

    #[test]
    fn gz_is_preferred_over_raw() -> Result<()> {
        let dir = tempdir()?;
        tiny().save(dir.path(), false)?;
        let raw = find_file(dir.path(), TRAIN_IMAGES);
        assert_eq!(raw, Some(dir.path().join(TRAIN_IMAGES)));
        tiny().save(dir.path(), true)?;
        assert_eq!(find_file(dir.path(), TRAIN_IMAGES), Some(dir.path().join("train-images-idx3-ubyte.gz")));
        Ok(())
    }

    #[test]
    fn locate_search_order() -> Result<()> {
        let (a, b, c, empty) = (tempdir()?, tempdir()?, tempdir()?, tempdir()?);
        for d in [&a, &b, &c] {
            tiny().save(d.path(), true)?;
        }
        let p = |d: &tempfile::TempDir| d.path().to_path_buf();
        // First qualifying directory wins, in order env, cache, debian.
        assert_eq!(locate_in(None, Some(p(&a)), Some(p(&b)), c.path())?, p(&a));
        assert_eq!(locate_in(None, Some(p(&empty)), Some(p(&b)), c.path())?, p(&b));
        assert_eq!(locate_in(None, None, Some(p(&empty)), c.path())?, p(&c));
        assert_eq!(locate_in(Some(a.path()), Some(p(&b)), None, c.path())?, p(&a));
        // An explicit directory without the data is an error naming only it.
        let err = locate_in(Some(empty.path()), Some(p(&a)), None, c.path());
        assert!(matches!(&err, Err(DataError::NotFound { searched, .. }) if searched == &[p(&empty)]), "{err:?}");
        // Nothing anywhere: every place is listed, in order.
        let cache = empty.path().join("cache");
        let err = locate_in(None, Some(p(&empty)), Some(cache.clone()), Path::new("/nonexistent"));
        let want = [p(&empty), cache, PathBuf::from("/nonexistent")];
        assert!(matches!(&err, Err(DataError::NotFound { searched, .. }) if searched == &want), "{err:?}");
        Ok(())
    }

    #[test]
    fn cache_dir_rules() {
        let some = |s: &str| Some(std::ffi::OsString::from(s));
        assert_eq!(
            cache_dir_from(some("/xdg"), some("/home/u")),
            Some(PathBuf::from("/xdg/resnet-fashion/fashion-mnist"))
        );
        assert_eq!(
            cache_dir_from(some("relative"), some("/home/u")),
            Some(PathBuf::from("/home/u/.cache/resnet-fashion/fashion-mnist"))
        );
        assert_eq!(cache_dir_from(None, None), None);
        assert_eq!(cache_dir_from(None, some("")), None);
    }

    #[test]
    fn partial_directory_does_not_qualify() -> Result<()> {
        let dir = tempdir()?;
        tiny().save(dir.path(), true)?;
        let victim = dir.path().join("t10k-labels-idx1-ubyte.gz");
        std::fs::remove_file(&victim).map_err(|e| DataError::io(&victim, e))?;
        assert!(!has_dataset(dir.path()));
        assert!(matches!(FashionMnist::load(dir.path()), Err(DataError::NotFound { .. })));
        Ok(())
    }
}
