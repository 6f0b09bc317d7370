//! The installed Fashion-MNIST (`$RESNET_DATA_DIR` or the Debian package's directory): sizes and
//! class balance. Skips, saying so, where the data is not installed.
#![allow(clippy::print_stdout)] // A skipped test says so plainly.

use std::path::PathBuf;
use std::sync::Arc;

use resnet_data::{batches, has_dataset, FashionMnist, LoaderConfig, DATA_DIR_ENV, DEBIAN_DIR, NUM_CLASSES};

fn data_dir() -> Option<PathBuf> {
    let env = std::env::var_os(DATA_DIR_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    env.into_iter().chain([PathBuf::from(DEBIAN_DIR)]).find(|d| has_dataset(d))
}

#[test]
fn real_fashion_mnist_has_the_published_shape() -> Result<(), Box<dyn std::error::Error>> {
    let Some(dir) = data_dir() else {
        println!("SKIPPED: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)");
        return Ok(());
    };
    let data = FashionMnist::load(&dir)?;
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
