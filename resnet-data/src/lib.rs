//! Fashion-MNIST for ResNet training: validated IDX parsing, Pillow-exact bilinear resizing,
//! augmentation, and shuffled, prefetching mini-batches as candle tensors.
//!
//! Key types:
//! - [`FashionMnist`] and [`Split`]: the dataset in memory, loaded from a directory found by
//!   [`locate`] (explicit path, `$RESNET_DATA_DIR`, [`default_cache_dir`], [`DEBIAN_DIR`]).
//! - [`IdxImages`] / [`IdxLabels`]: the IDX container, [`parse_images`], [`read_images`],
//!   [`encode_images`] and friends. Gzip is recognised by content.
//! - [`Resizer`] / [`resize_bilinear`]: bit-exact with Pillow's `Image.resize(.., BILINEAR)`, i.e.
//!   torchvision's `Resize` on d2l's PIL images.
//! - [`Augment`] (random crop, horizontal flip) and [`Normalize`].
//! - [`LoaderConfig`], [`batches`] and [`BatchIter`], yielding [`Batch`]es of
//!   `(batch, 1, resize, resize)` `f32` images and `(batch,)` `u32` labels.
//! - [`DataError`]: every failure, naming the file and what was expected and found.
//!
//! This crate never downloads: a missing dataset is an error that names `cargo xtask fetch-data`.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use resnet_data::{batches, LoaderConfig, Split};
//!
//! // Ten 28x28 images built in memory (any IDX file read with `Split::read` works the same).
//! let split = Split::new(vec![128; 10 * 28 * 28], vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 28, 28)?;
//! let cfg = LoaderConfig { workers: 2, ..LoaderConfig::d2l_train(4, 96) };
//! let mut seen = 0;
//! for batch in batches(Arc::new(split), &cfg, 0)? {
//!     let batch = batch?;
//!     assert_eq!(batch.images.dims()[1..], [1, 96, 96]);
//!     seen += batch.indices.len();
//! }
//! assert_eq!(seen, 10); // batches of 4, 4 and 2
//! # Ok::<(), resnet_data::DataError>(())
//! ```

#![deny(clippy::print_stdout, clippy::print_stderr, clippy::dbg_macro)]

mod augment;
mod error;
mod fashion_mnist;
mod idx;
mod loader;
mod resize;

pub use augment::{pixel_table, to_tensor_value, Augment, Normalize};
pub use error::{DataError, Result};
pub use fashion_mnist::{
    default_cache_dir, find_file, has_dataset, load_default, load_test, locate, FashionMnist, Split, CLASS_NAMES,
    DATA_DIR_ENV, DEBIAN_DIR, FILES, NUM_CLASSES, TEST_IMAGES, TEST_LABELS, TRAIN_IMAGES, TRAIN_LABELS,
};
pub use idx::{
    encode_images, encode_labels, gzip, parse_images, parse_labels, read_images, read_labels, IdxImages, IdxLabels,
    IMAGES_MAGIC, LABELS_MAGIC, MAX_DECOMPRESSED_BYTES,
};
pub use loader::{batches, epoch_order, example_rng, Batch, BatchIter, LoaderConfig, MAX_WORKERS};
pub use resize::{resize_bilinear, Resizer, MAX_SIDE, MAX_SOURCE_SIDE, MIN_SIDE};
