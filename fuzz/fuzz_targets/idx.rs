//! Fuzzes IDX parsing: any input, raw or gzipped, must give `Ok` or `Err`, never a panic, a hang
//! or an allocation beyond what the input can justify.
//!
//! Run with `cargo +nightly fuzz run idx` from the repository root.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.idx");
    if let Ok(images) = resnet_data::parse_images(data, path) {
        // Whatever parses must describe its own buffer exactly and re-encode to a valid file.
        assert_eq!(
            images.pixels.len(),
            images.count * images.rows * images.cols
        );
        let again = resnet_data::parse_images(&resnet_data::encode_images(&images), path);
        assert_eq!(again.ok().as_ref(), Some(&images));
    }
    if let Ok(labels) = resnet_data::parse_labels(data, path) {
        let again = resnet_data::parse_labels(&resnet_data::encode_labels(&labels), path);
        assert_eq!(again.ok().as_ref(), Some(&labels));
    }
});
