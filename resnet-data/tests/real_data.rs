//! The installed Fashion-MNIST (`$RESNET_DATA_DIR`, the user cache or Debian's directory): sizes
//! and class balance. Where the data is not installed, the build script compiles the test as
//! ignored, so the runner prints `ignored, Fashion-MNIST not installed: ...`; under `CI=true` it
//! always runs and missing data fails it.

use std::sync::Arc;

use resnet_data::{batches, load_default, LoaderConfig, NUM_CLASSES};

#[test]
#[cfg_attr(
    not(fashion_mnist_installed),
    ignore = "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist or cargo xtask fetch-data"
)]
fn real_fashion_mnist_has_the_published_shape() -> Result<(), Box<dyn std::error::Error>> {
    let (data, _dir) = load_default(None)?;
    for (name, split, len) in [("train", &data.train, 60_000), ("test", &data.test, 10_000)] {
        assert_eq!(split.len(), len, "{name} size");
        assert_eq!((split.rows, split.cols), (28, 28), "{name} image size");
        assert_eq!(split.images.len(), len * 28 * 28, "{name} pixels");
        assert_eq!(split.class_counts(), [len / NUM_CLASSES; NUM_CLASSES], "{name} class balance");
    }

    // One d2l-style batch at 96 px from the real data: shapes and the ToTensor range.
    let cfg = LoaderConfig { workers: 1, prefetch: 1, ..LoaderConfig::d2l_test(128, 96) };
    let test = Arc::new(data.test.limit(300));
    let batch = batches(test, &cfg, 0)?.next().ok_or("no batch")??;
    assert_eq!(batch.images.dims(), &[128, 1, 96, 96]);
    let (min, max) = (batch.images.min_all()?.to_scalar::<f32>()?, batch.images.max_all()?.to_scalar::<f32>()?);
    assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max) && max > 0.5, "{min} {max}");
    Ok(())
}
