//! Property tests of IDX parsing: arbitrary bytes never panic, truncation anywhere is an error,
//! and valid files round-trip (raw and gzipped).

use std::path::Path;

use proptest::prelude::*;
use resnet_data::{encode_images, encode_labels, gzip, parse_images, parse_labels, DataError, IdxImages, IdxLabels};

fn images() -> impl Strategy<Value = IdxImages> {
    (0usize..6, 1usize..7, 1usize..7).prop_flat_map(|(count, rows, cols)| {
        proptest::collection::vec(any::<u8>(), count * rows * cols).prop_map(move |pixels| IdxImages {
            count,
            rows,
            cols,
            pixels,
        })
    })
}

fn labels() -> impl Strategy<Value = IdxLabels> {
    proptest::collection::vec(0u8..10, 0..40).prop_map(|labels| IdxLabels { labels })
}

fn path() -> &'static Path {
    Path::new("prop.idx")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_images(&bytes, path());
        let _ = parse_labels(&bytes, path());
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_magic_never_panic(
        header in proptest::collection::vec(any::<u8>(), 0..24),
        images_file in any::<bool>(),
    ) {
        let mut bytes = if images_file { vec![0, 0, 8, 3] } else { vec![0, 0, 8, 1] };
        bytes.extend(header);
        let _ = parse_images(&bytes, path());
        let _ = parse_labels(&bytes, path());
        let _ = parse_images(&gzip(&bytes), path());
    }

    #[test]
    fn images_round_trip(original in images()) {
        let raw = encode_images(&original);
        prop_assert_eq!(&parse_images(&raw, path())?, &original);
        prop_assert_eq!(&parse_images(&gzip(&raw), path())?, &original);
    }

    #[test]
    fn labels_round_trip(original in labels()) {
        let raw = encode_labels(&original);
        prop_assert_eq!(&parse_labels(&raw, path())?, &original);
        prop_assert_eq!(&parse_labels(&gzip(&raw), path())?, &original);
    }

    #[test]
    fn truncated_images_error(original in images(), cut in any::<prop::sample::Index>()) {
        let raw = encode_images(&original);
        let keep = cut.index(raw.len());
        let result = parse_images(&raw[..keep], path());
        prop_assert!(matches!(result, Err(DataError::Truncated { .. })), "{:?}", result);
        // A truncated gzip stream is an error too (of whichever kind).
        let gz = gzip(&raw);
        let keep = cut.index(gz.len());
        prop_assert!(parse_images(&gz[..keep], path()).is_err());
    }

    #[test]
    fn truncated_labels_error(original in labels(), cut in any::<prop::sample::Index>()) {
        let raw = encode_labels(&original);
        let keep = cut.index(raw.len());
        let result = parse_labels(&raw[..keep], path());
        prop_assert!(matches!(result, Err(DataError::Truncated { .. })), "{:?}", result);
    }

    #[test]
    fn extended_files_error(original in labels(), extra in proptest::collection::vec(any::<u8>(), 1..8)) {
        let mut raw = encode_labels(&original);
        raw.extend(extra);
        let result = parse_labels(&raw, path());
        prop_assert!(matches!(result, Err(DataError::TrailingBytes { .. })), "{:?}", result);
    }
}
