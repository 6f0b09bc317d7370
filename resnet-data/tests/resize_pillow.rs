//! `resize_bilinear` and `ToTensor` against Pillow/torchvision outputs recorded by
//! `scripts/make_resize_fixture.py` in `tests/fixtures/pillow_resize.bin`.
#![allow(clippy::print_stdout)] // The test reports how many pixels differ, as asked of it.

use std::error::Error;

use resnet_data::{resize_bilinear, to_tensor_value, Resizer};

type TestResult = Result<(), Box<dyn Error>>;

const FIXTURE: &[u8] = include_bytes!("fixtures/pillow_resize.bin");

struct Case {
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
    src: Vec<u8>,
    want: Vec<u8>,
}

struct Fixture {
    provenance: String,
    cases: Vec<Case>,
    to_tensor: Vec<f32>,
}

/// A bounds-checked little-endian reader over the fixture.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Box<dyn Error>> {
        if n > self.bytes.len() {
            return Err(format!("fixture truncated: wanted {n} bytes, {} left", self.bytes.len()).into());
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u32(&mut self) -> Result<usize, Box<dyn Error>> {
        let b: [u8; 4] = self.take(4)?.try_into()?;
        Ok(usize::try_from(u32::from_le_bytes(b))?)
    }
}

fn load() -> Result<Fixture, Box<dyn Error>> {
    let mut r = Reader { bytes: FIXTURE };
    if r.take(4)? != b"RSZF" || r.u32()? != 1 {
        return Err("not a version-1 RSZF fixture".into());
    }
    let len = r.u32()?;
    let provenance = String::from_utf8(r.take(len)?.to_vec())?;
    let n = r.u32()?;
    let mut cases = Vec::with_capacity(n);
    for _ in 0..n {
        let (src_w, src_h, dst_w, dst_h) = (r.u32()?, r.u32()?, r.u32()?, r.u32()?);
        let src = r.take(src_w * src_h)?.to_vec();
        let want = r.take(dst_w * dst_h)?.to_vec();
        cases.push(Case { src_w, src_h, dst_w, dst_h, src, want });
    }
    if r.u32()? != 256 {
        return Err("expected 256 ToTensor values".into());
    }
    let to_tensor = r.take(256 * 4)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if !r.bytes.is_empty() {
        return Err(format!("{} trailing bytes in fixture", r.bytes.len()).into());
    }
    Ok(Fixture { provenance, cases, to_tensor })
}

#[test]
fn resize_matches_pillow() -> TestResult {
    let fixture = load()?;
    assert!(fixture.cases.len() >= 20, "only {} cases", fixture.cases.len());
    let (mut pixels, mut differ, mut max_diff) = (0usize, 0usize, 0u8);
    for case in &fixture.cases {
        let got = resize_bilinear(&case.src, case.src_w, case.src_h, case.dst_w, case.dst_h)?;
        assert_eq!(got.len(), case.want.len());
        let case_differ = got.iter().zip(&case.want).filter(|(g, w)| g != w).count();
        let case_max = got.iter().zip(&case.want).map(|(g, w)| g.abs_diff(*w)).max().unwrap_or(0);
        // Square-to-square resizes (all Fashion-MNIST ever needs) must be bit-exact, whatever
        // Pillow version made the fixture; other shapes depend on Pillow's pass order.
        if case.src_w == case.src_h && case.dst_w == case.dst_h {
            assert_eq!(case_differ, 0, "{}x{} -> {}x{}", case.src_w, case.src_h, case.dst_w, case.dst_h);
        }
        if case_differ > 0 {
            println!(
                "{}x{} -> {}x{}: {case_differ} pixels differ, by at most {case_max}",
                case.src_w, case.src_h, case.dst_w, case.dst_h
            );
        }
        // A reused Resizer (as in the loader) must give the same answer.
        let resizer = Resizer::new(case.src_w, case.src_h, case.dst_w, case.dst_h)?;
        let mut again = vec![0; got.len()];
        let mut scratch = vec![9; 3];
        resizer.resize_into(&case.src, &mut again, &mut scratch)?;
        resizer.resize_into(&case.src, &mut again, &mut scratch)?;
        assert_eq!(again, got);
        pixels += got.len();
        differ += case_differ;
        max_diff = max_diff.max(case_max);
    }
    println!(
        "Pillow parity ({}): {differ} of {pixels} pixels differ over {} cases, max |diff| {max_diff}",
        fixture.provenance,
        fixture.cases.len()
    );
    assert!(max_diff <= 1, "max |diff| {max_diff} > 1");
    Ok(())
}

#[test]
fn to_tensor_matches_torchvision() -> TestResult {
    let fixture = load()?;
    for (p, &want) in fixture.to_tensor.iter().enumerate() {
        let got = to_tensor_value(u8::try_from(p)?);
        assert_eq!(got.to_bits(), want.to_bits(), "pixel {p}: {got} vs {want}");
    }
    Ok(())
}
