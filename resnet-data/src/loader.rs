//! Shuffled, prefetching mini-batches: `LoaderConfig`, `epoch_order`, `batches` and `BatchIter`.
//!
//! Like d2l's `DataLoader`: each epoch visits a permutation of the split (or file order), cuts it
//! into batches of `batch_size` (the last one may be smaller), and turns each example into
//! `resize x resize` floats (Pillow-exact bilinear resize, optional augmentation, `ToTensor`,
//! optional normalisation). Worker threads prepare batches ahead of the consumer and hand them
//! over in order through bounded channels, so at most about `prefetch + workers` batches exist at
//! once; the resized split is never materialised.
//!
//! Determinism: the order depends only on `(seed, epoch)`, and the augmentation of the example at
//! position `pos` of the epoch only on `(seed, epoch, pos)`, so results do not depend on the
//! number of workers or on thread scheduling.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::{pixel_table, Augment, Normalize};
use crate::error::{DataError, Result};
use crate::fashion_mnist::Split;
use crate::resize::{Resizer, MAX_SIDE, MIN_SIDE};

/// Most worker threads accepted by [`LoaderConfig::validate`].
pub const MAX_WORKERS: usize = 256;

/// How to turn a [`Split`] into batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoaderConfig {
    /// Examples per batch (the last batch of an epoch may be smaller); at least 1.
    pub batch_size: usize,
    /// Side of the square images produced, in [`MIN_SIDE`]`..=`[`MAX_SIDE`]. Equal to the
    /// source side (28 for Fashion-MNIST) means no resizing.
    pub resize: usize,
    /// Visit a fresh permutation every epoch (else file order).
    pub shuffle: bool,
    /// Seeds the permutations and the augmentation.
    pub seed: u64,
    /// Training-time augmentation, applied after resizing.
    pub augment: Option<Augment>,
    /// Normalisation, applied after `ToTensor`.
    pub normalize: Option<Normalize>,
    /// Background threads preparing batches; at least 1.
    pub workers: usize,
    /// Batches buffered ahead of the consumer (bounds memory); at least 1.
    pub prefetch: usize,
}

/// One mini-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `f32` pixels on the CPU.
    ///
    /// # Shapes
    /// `(batch, 1, resize, resize)`.
    pub images: Tensor,
    /// `u32` class indices on the CPU.
    ///
    /// # Shapes
    /// `(batch,)`.
    pub labels: Tensor,
    /// Index in the split of each example, in batch order.
    pub indices: Vec<usize>,
}

/// The batches of one epoch, prepared in the background and yielded in order.
///
/// Dropping it early stops and joins the workers. After an `Err` the iterator is finished.
pub struct BatchIter {
    receivers: Vec<Receiver<Result<Batch>>>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    next: usize,
    num_batches: usize,
    failed: bool,
}

impl LoaderConfig {
    /// d2l's training loader: shuffled, no augmentation or normalisation, 4 workers.
    pub fn d2l_train(batch_size: usize, resize: usize) -> Self {
        Self { batch_size, resize, shuffle: true, seed: 0, augment: None, normalize: None, workers: 4, prefetch: 8 }
    }

    /// d2l's test loader: as [`LoaderConfig::d2l_train`] but in file order.
    pub fn d2l_test(batch_size: usize, resize: usize) -> Self {
        Self { shuffle: false, ..Self::d2l_train(batch_size, resize) }
    }

    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<()> {
        let invalid = |msg: String| Err(DataError::InvalidConfig(msg));
        if self.batch_size == 0 {
            return invalid("batch_size must be at least 1".into());
        }
        if !(MIN_SIDE..=MAX_SIDE).contains(&self.resize) {
            return invalid(format!("resize must be in {MIN_SIDE}..={MAX_SIDE}, found {}", self.resize));
        }
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return invalid(format!("workers must be in 1..={MAX_WORKERS}, found {}", self.workers));
        }
        if self.prefetch == 0 {
            return invalid("prefetch must be at least 1".into());
        }
        if let Some(augment) = &self.augment {
            augment.validate(self.resize)?;
        }
        if let Some(normalize) = &self.normalize {
            normalize.validate()?;
        }
        Ok(())
    }

    /// Number of batches in an epoch over `len` examples (the last may be partial).
    pub fn num_batches(&self, len: usize) -> usize {
        len.div_ceil(self.batch_size.max(1))
    }
}

/// The order in which epoch `epoch` visits `len` examples: `0..len` unshuffled, else a
/// permutation that depends only on `(seed, epoch)` (ChaCha8, Fisher-Yates).
pub fn epoch_order(len: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if shuffle {
        order.shuffle(&mut stream_rng(seed, epoch, u64::MAX, ORDER_STREAM));
    }
    order
}

/// The random number generator augmenting the example at position `pos` of epoch `epoch`.
pub fn example_rng(seed: u64, epoch: u64, pos: u64) -> ChaCha8Rng {
    stream_rng(seed, epoch, pos, AUGMENT_STREAM)
}

/// Starts preparing the batches of epoch `epoch` of `split`.
///
/// # Errors
/// If `cfg` is invalid or the split's buffers disagree with its dimensions. Errors while
/// building a batch are yielded by the iterator.
pub fn batches(split: Arc<Split>, cfg: &LoaderConfig, epoch: u64) -> Result<BatchIter> {
    cfg.validate()?;
    split.check()?;
    let resizer = Resizer::new(split.cols, split.rows, cfg.resize, cfg.resize)?;
    let num_batches = cfg.num_batches(split.len());
    let workers = cfg.workers.min(num_batches);
    tracing::debug!(epoch, examples = split.len(), num_batches, workers, "starting batch workers");
    let job = Arc::new(Job {
        order: epoch_order(split.len(), cfg.shuffle, cfg.seed, epoch),
        split,
        resizer: (!resizer.is_identity()).then_some(resizer),
        augment: cfg.augment.filter(|a| !a.is_identity()),
        table: pixel_table(cfg.normalize.as_ref()),
        batch_size: cfg.batch_size,
        side: cfg.resize,
        seed: cfg.seed,
        epoch,
        num_batches,
        workers,
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Worker w makes batches w, w + workers, ...; the consumer reads them round-robin.
    let capacity = cfg.prefetch.div_ceil(workers.max(1));
    let mut receivers = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let (job, stop) = (Arc::clone(&job), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name(format!("resnet-data-{w}"))
            .spawn(move || job.run_worker(w, &tx, &stop))
            .map_err(|e| DataError::InvalidConfig(format!("cannot start a batch worker thread: {e}")))?;
        receivers.push(rx);
        handles.push(handle);
    }
    Ok(BatchIter { receivers, workers: handles, stop, next: 0, num_batches, failed: false })
}

impl BatchIter {
    /// Batches in the whole epoch.
    pub fn num_batches(&self) -> usize {
        self.num_batches
    }
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next >= self.num_batches {
            return None;
        }
        let batch = self.next;
        let received = self.receivers.get(batch % self.receivers.len().max(1)).map(Receiver::recv);
        match received {
            Some(Ok(Ok(b))) => {
                self.next += 1;
                Some(Ok(b))
            }
            Some(Ok(Err(e))) => {
                self.failed = true;
                Some(Err(e))
            }
            // The worker hung up without sending this batch: it panicked.
            Some(Err(_)) | None => {
                self.failed = true;
                Some(Err(DataError::WorkerFailed { batch }))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = if self.failed { 0 } else { self.num_batches - self.next };
        (left, Some(left))
    }
}

impl ExactSizeIterator for BatchIter {}

impl Drop for BatchIter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Hanging up makes every pending or future `send` fail, which ends the workers.
        self.receivers.clear();
        for handle in self.workers.drain(..) {
            // A worker that panicked has already been reported by `next` (or never mattered).
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for BatchIter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchIter")
            .field("next", &self.next)
            .field("num_batches", &self.num_batches)
            .field("workers", &self.workers.len())
            .field("failed", &self.failed)
            .finish()
    }
}

const ORDER_STREAM: u64 = u64::from_le_bytes(*b"order\0\0\0");
const AUGMENT_STREAM: u64 = u64::from_le_bytes(*b"augment\0");

/// A ChaCha8 generator keyed by all four words, so that distinct tuples give independent
/// streams (no hashing, hence no collisions).
fn stream_rng(seed: u64, epoch: u64, pos: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (chunk, word) in key.chunks_exact_mut(8).zip([seed, epoch, pos, stream]) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// Everything a worker needs, shared read-only.
struct Job {
    split: Arc<Split>,
    order: Vec<usize>,
    /// `None` when the split already has the target size.
    resizer: Option<Resizer>,
    /// `None` when augmentation is off or an identity.
    augment: Option<Augment>,
    /// Final `f32` value of each byte value.
    table: [f32; 256],
    batch_size: usize,
    side: usize,
    seed: u64,
    epoch: u64,
    num_batches: usize,
    workers: usize,
}

/// Per-worker buffers, reused across examples.
#[derive(Default)]
struct Scratch {
    resized: Vec<u8>,
    augmented: Vec<u8>,
    intermediate: Vec<u8>,
}

impl Job {
    fn run_worker(&self, first: usize, tx: &SyncSender<Result<Batch>>, stop: &AtomicBool) {
        let mut scratch = Scratch::default();
        for batch in (first..self.num_batches).step_by(self.workers.max(1)) {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let result = self.build(batch, &mut scratch);
            let failed = result.is_err();
            if tx.send(result).is_err() || failed {
                return;
            }
        }
    }

    fn build(&self, batch: usize, scratch: &mut Scratch) -> Result<Batch> {
        let start = batch * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        let indices = self.order[start..end].to_vec();
        let plane = self.side * self.side;
        let mut pixels = vec![0f32; indices.len() * plane];
        let mut labels = Vec::with_capacity(indices.len());
        scratch.resized.resize(plane, 0);
        scratch.augmented.resize(plane, 0);
        for ((pos, &index), out) in (start..end).zip(&indices).zip(pixels.chunks_exact_mut(plane)) {
            let (image, label) = self
                .split
                .get(index)
                .zip(self.split.labels.get(index))
                .ok_or(DataError::BufferSize { what: "split", expected: index + 1, found: self.split.len() })?;
            let mut image = match &self.resizer {
                Some(r) => {
                    r.resize_into(image, &mut scratch.resized, &mut scratch.intermediate)?;
                    &scratch.resized[..]
                }
                None => image,
            };
            if let Some(augment) = &self.augment {
                let mut rng = example_rng(self.seed, self.epoch, pos as u64);
                augment.apply(image, self.side, &mut rng, &mut scratch.augmented)?;
                image = &scratch.augmented[..];
            }
            for (o, &p) in out.iter_mut().zip(image) {
                *o = self.table[usize::from(p)];
            }
            labels.push(u32::from(*label));
        }
        let n = indices.len();
        Ok(Batch {
            images: Tensor::from_vec(pixels, (n, 1, self.side, self.side), &Device::Cpu)?,
            labels: Tensor::from_vec(labels, n, &Device::Cpu)?,
            indices,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::to_tensor_value;

    fn split(len: usize) -> Arc<Split> {
        Arc::new(Split::synthetic(len, 28, 28, 3))
    }

    fn cfg(batch_size: usize, resize: usize) -> LoaderConfig {
        LoaderConfig { workers: 2, prefetch: 2, ..LoaderConfig::d2l_train(batch_size, resize) }
    }

    fn collect(split: &Arc<Split>, cfg: &LoaderConfig, epoch: u64) -> Result<Vec<Batch>> {
        batches(Arc::clone(split), cfg, epoch)?.collect()
    }

    fn images_of(batches: &[Batch]) -> Result<Vec<f32>> {
        let mut all = Vec::new();
        for b in batches {
            all.extend(b.images.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(all)
    }

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(1000, true, 42, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, true, 42, 0));
        assert_ne!(a, epoch_order(1000, true, 42, 1));
        assert_ne!(a, epoch_order(1000, true, 43, 0));
        assert_eq!(epoch_order(5, false, 42, 3), vec![0, 1, 2, 3, 4]);
        assert!(epoch_order(0, true, 1, 1).is_empty());
    }

    #[test]
    fn shapes_sizes_and_partial_last_batch() -> Result<()> {
        let data = split(103);
        let cfg = cfg(25, 32);
        let iter = batches(Arc::clone(&data), &cfg, 0)?;
        assert_eq!((iter.num_batches(), iter.len()), (5, 5));
        let all: Vec<Batch> = iter.collect::<Result<_>>()?;
        let sizes: Vec<usize> = all.iter().map(|b| b.indices.len()).collect();
        assert_eq!(sizes, vec![25, 25, 25, 25, 3]);
        assert_eq!(all[4].images.dims(), &[3, 1, 32, 32]);
        assert_eq!(all[4].labels.dims(), &[3]);
        assert_eq!(all[0].images.dtype(), candle_core::DType::F32);
        assert_eq!(all[0].labels.dtype(), candle_core::DType::U32);
        let mut seen: Vec<usize> = all.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn labels_and_pixels_match_the_split() -> Result<()> {
        let data = split(40);
        let cfg = LoaderConfig { resize: 28, ..cfg(16, 28) };
        for batch in collect(&data, &cfg, 2)? {
            let labels = batch.labels.to_vec1::<u32>()?;
            let images = batch.images.flatten_all()?.to_vec1::<f32>()?;
            for (k, &i) in batch.indices.iter().enumerate() {
                assert_eq!(labels[k], u32::from(data.labels[i]));
                let want: Vec<f32> = data.image(i).iter().map(|&p| to_tensor_value(p)).collect();
                assert_eq!(&images[k * 784..(k + 1) * 784], &want[..]);
            }
        }
        Ok(())
    }

    #[test]
    fn resized_pixels_match_resize_bilinear() -> Result<()> {
        let data = split(5);
        let cfg = LoaderConfig { shuffle: false, normalize: Some(Normalize::fashion_mnist()), ..cfg(5, 17) };
        let batch = collect(&data, &cfg, 0)?.remove(0);
        let images = batch.images.flatten_all()?.to_vec1::<f32>()?;
        let norm = Normalize::fashion_mnist();
        for i in 0..5 {
            let resized = crate::resize::resize_bilinear(data.image(i), 28, 28, 17, 17)?;
            let want: Vec<f32> = resized.iter().map(|&p| norm.apply(to_tensor_value(p))).collect();
            assert_eq!(&images[i * 289..(i + 1) * 289], &want[..]);
        }
        Ok(())
    }

    #[test]
    fn same_seed_same_batches_and_worker_count_does_not_matter() -> Result<()> {
        let data = split(70);
        let base = LoaderConfig { augment: Some(Augment { crop_padding: 3, hflip: true, erase: true }), ..cfg(8, 24) };
        let one = LoaderConfig { workers: 1, prefetch: 1, ..base.clone() };
        let three = LoaderConfig { workers: 3, prefetch: 5, ..base.clone() };
        let a = collect(&data, &one, 4)?;
        let b = collect(&data, &three, 4)?;
        let c = collect(&data, &three, 4)?;
        let idx = |v: &[Batch]| v.iter().flat_map(|b| b.indices.clone()).collect::<Vec<_>>();
        assert_eq!(idx(&a), idx(&b));
        assert_eq!(images_of(&a)?, images_of(&b)?);
        assert_eq!(images_of(&b)?, images_of(&c)?);
        // Another epoch: another order and other augmentations.
        let d = collect(&data, &three, 5)?;
        assert_ne!(idx(&a), idx(&d));
        Ok(())
    }

    #[test]
    fn augmentation_changes_pixels_but_not_labels() -> Result<()> {
        let data = split(20);
        let plain = LoaderConfig { shuffle: false, ..cfg(20, 28) };
        let aug =
            LoaderConfig { augment: Some(Augment { crop_padding: 4, hflip: true, erase: false }), ..plain.clone() };
        let (p, a) = (collect(&data, &plain, 0)?, collect(&data, &aug, 0)?);
        assert_ne!(images_of(&p)?, images_of(&a)?);
        assert_eq!(p[0].labels.to_vec1::<u32>()?, a[0].labels.to_vec1::<u32>()?);
        Ok(())
    }

    #[test]
    fn early_drop_stops_workers() -> Result<()> {
        let data = split(500);
        let cfg = LoaderConfig { workers: 3, prefetch: 1, ..cfg(4, 64) };
        let mut iter = batches(Arc::clone(&data), &cfg, 0)?;
        let first = iter.next().transpose()?;
        assert!(first.is_some());
        drop(iter);
        // Never-started iterators drop cleanly too.
        drop(batches(data, &cfg, 1)?);
        Ok(())
    }

    #[test]
    fn empty_split_yields_nothing() -> Result<()> {
        let empty = Arc::new(Split { images: vec![], labels: vec![], rows: 28, cols: 28 });
        let mut iter = batches(empty, &cfg(4, 28), 0)?;
        assert_eq!(iter.len(), 0);
        assert!(iter.next().is_none());
        Ok(())
    }

    #[test]
    fn invalid_configs_and_splits_are_rejected() {
        let data = split(4);
        for bad in [
            LoaderConfig { batch_size: 0, ..cfg(1, 28) },
            LoaderConfig { resize: 7, ..cfg(1, 28) },
            LoaderConfig { resize: 513, ..cfg(1, 28) },
            LoaderConfig { workers: 0, ..cfg(1, 28) },
            LoaderConfig { prefetch: 0, ..cfg(1, 28) },
            LoaderConfig { augment: Some(Augment { crop_padding: 29, ..Augment::none() }), ..cfg(1, 28) },
            LoaderConfig { normalize: Some(Normalize { mean: 0.0, std: -1.0 }), ..cfg(1, 28) },
        ] {
            assert!(matches!(batches(Arc::clone(&data), &bad, 0), Err(DataError::InvalidConfig(_))), "{bad:?}");
        }
        let broken = Arc::new(Split { images: vec![0; 10], labels: vec![1], rows: 28, cols: 28 });
        assert!(matches!(batches(broken, &cfg(1, 28), 0), Err(DataError::BufferSize { .. })));
    }
}
