//! Wall-clock time per op and tensor shape, for finding where a training step goes.
//!
//! Off by default, and then a span costs one atomic load. [`enable`] turns it on for the
//! process; every custom op of this crate then records its CPU kernel's time under its name
//! and its first input's shape, and callers can add spans of their own (the trainer marks its
//! forward, backward and optimiser phases). [`report`] then sums them up; the benchmark
//! prints it after its timed windows when asked to profile.
//!
//! Every matrix product of this crate's kernels also counts its floating-point operations
//! (2·m·n·k) while recording is on, and each span is credited with those done between its start
//! and its end (on any thread: the products of an op run on rayon's workers while the op's span
//! is open on the calling thread). The report turns them into each span's product rate, which
//! set against the measured peak of the products says how much of the span's time the products
//! could explain at best; the rest is data movement and bookkeeping.
//!
//! The products are also recorded by shape (sizes, strides, threading); [`crate::replay_products`] then
//! runs each recorded shape again on its own, as many times per step as the step ran it, and
//! times it: what the step's products cost through the gemm crate with nothing else around them,
//! a floor for the step's time while the products go through that crate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::DType;

static ENABLED: AtomicBool = AtomicBool::new(false);
static FLOPS: AtomicU64 = AtomicU64::new(0);
static TIMES: Mutex<Option<HashMap<String, Totals>>> = Mutex::new(None);
static PRODUCTS: Mutex<Option<HashMap<ProductCall, u64>>> = Mutex::new(None);

/// What the spans of one key add up to.
#[derive(Debug, Default)]
struct Totals {
    seconds: f64,
    calls: u64,
    flops: u64,
}

/// Turns recording on or off for the whole process.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether spans are being recorded.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// One matrix product of a step, as the convolutions hand it to the gemm crate or run it on this
/// crate's own kernel ([`ProductKernel`]):
/// `c (m×n, rows ldc apart) = a (m×k) · b (k×n)` with the factors' element strides (row,
/// column), adding to `c` or not, split over the threads or run on one (beside others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProductCall {
    /// Element type.
    pub dtype: DType,
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// The shared dimension.
    pub k: usize,
    /// Element strides (row, column) of the left factor as `m×k`.
    pub a_strides: (usize, usize),
    /// Element strides (row, column) of the right factor as `k×n`.
    pub b_strides: (usize, usize),
    /// Row stride of the output.
    pub ldc: usize,
    /// Whether the product is added to the output.
    pub accumulate: bool,
    /// Whether the product is split over the threads (else the caller runs several side by side).
    pub parallel: bool,
    /// What runs the product.
    pub kernel: ProductKernel,
}

/// What runs a [`ProductCall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProductKernel {
    /// The gemm crate.
    Gemm,
    /// This crate's own kernel (the Winograd products at the AVX2 tier) on a right factor
    /// packed ahead of the products (`b_strides` are the matrix's before packing).
    Packed,
    /// This crate's own kernel on a right factor read in place.
    InPlace,
    /// This crate's own kernel on a packed right factor, the left factor's patches read in place
    /// from a one-channel image (replayed on a left factor of `a_strides`).
    Patches,
}

impl ProductCall {
    /// Floating-point operations of one call (2·m·n·k).
    pub fn flops(&self) -> u64 {
        2 * (self.m * self.n * self.k) as u64
    }
}

/// Counts a matrix product's floating-point operations and records its shape (nothing while
/// recording is off).
pub(crate) fn add_product(call: ProductCall) {
    if enabled() {
        FLOPS.fetch_add(call.flops(), Ordering::Relaxed);
        let mut products = PRODUCTS.lock().unwrap_or_else(|e| e.into_inner());
        *products.get_or_insert_with(HashMap::new).entry(call).or_default() += 1;
    }
}

/// A running span; its time is recorded when it is dropped.
#[derive(Debug)]
pub struct Span {
    key: String,
    start: Instant,
    flops_at_start: u64,
}

/// Starts a span named `name` for an input of shape `dims`, or nothing while recording is off.
pub fn span(name: &str, dims: &[usize]) -> Option<Span> {
    enabled().then(|| Span {
        key: format!("{name} {dims:?}"),
        start: Instant::now(),
        flops_at_start: FLOPS.load(Ordering::Relaxed),
    })
}

impl Drop for Span {
    fn drop(&mut self) {
        let secs = self.start.elapsed().as_secs_f64();
        let flops = FLOPS.load(Ordering::Relaxed).wrapping_sub(self.flops_at_start);
        let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
        let entry = times.get_or_insert_with(HashMap::new).entry(std::mem::take(&mut self.key)).or_default();
        entry.seconds += secs;
        entry.calls += 1;
        entry.flops += flops;
    }
}

/// One line of the profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Span name and input shape.
    pub key: String,
    /// Total seconds.
    pub seconds: f64,
    /// Number of spans.
    pub calls: u64,
    /// Floating-point operations of the matrix products done while the spans were open.
    pub flops: u64,
}

/// Takes the recorded times (clearing them), slowest first.
pub fn take() -> Vec<Entry> {
    let times = TIMES.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    let mut entries: Vec<Entry> =
        times.into_iter().map(|(key, t)| Entry { key, seconds: t.seconds, calls: t.calls, flops: t.flops }).collect();
    entries.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then_with(|| a.key.cmp(&b.key)));
    entries
}

/// One recorded product shape, run again on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Replayed {
    /// The call.
    pub call: ProductCall,
    /// How many times a step made it.
    pub calls_per_step: f64,
    /// Seconds per step that those calls took on their own.
    pub seconds_per_step: f64,
}

impl Replayed {
    /// The calls' rate on their own, GFLOP/s.
    pub fn gflops(&self) -> f64 {
        self.call.flops() as f64 * self.calls_per_step / self.seconds_per_step / 1e9
    }
}

/// Takes the recorded product shapes and how often each was made (clearing them), for
/// [`crate::replay_products`].
pub(crate) fn take_products() -> HashMap<ProductCall, u64> {
    PRODUCTS.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default()
}

/// The replayed products as a table: milliseconds per step, calls per step, GFLOP per step and
/// rate of each shape, then their sum set against `step_ms` (the step's measured time).
pub fn replay_report(replayed: &[Replayed], step_ms: f64) -> String {
    let mut out = format!(
        "{:>10} {:>7} {:>10} {:>8}  product shape (m×n×k; a, b strides; ldc)\n",
        "ms/step", "calls", "GFLOP/step", "GFLOP/s"
    );
    let (mut seconds, mut flops) = (0.0, 0.0);
    for r in replayed {
        let gflop = r.call.flops() as f64 * r.calls_per_step / 1e9;
        seconds += r.seconds_per_step;
        flops += gflop;
        let c = &r.call;
        out.push_str(&format!(
            "{:>10.2} {:>7.1} {gflop:>10.3} {:>8.0}  {}×{}×{}; a {:?}, b {:?}{}; ldc {}{}{}\n",
            1e3 * r.seconds_per_step,
            r.calls_per_step,
            r.gflops(),
            c.m,
            c.n,
            c.k,
            c.a_strides,
            c.b_strides,
            match c.kernel {
                ProductKernel::Gemm => "",
                ProductKernel::Packed => ", own kernel on packed b",
                ProductKernel::InPlace => ", own kernel",
                ProductKernel::Patches => ", own kernel on packed b, patches in place",
            },
            c.ldc,
            if c.accumulate { ", accumulate" } else { "" },
            if c.parallel { ", threaded" } else { ", side by side" },
        ));
    }
    out.push_str(&format!(
        "products alone: {:.1} ms per step, {flops:.2} GFLOP at {:.0} GFLOP/s; {:.0} % of the step's {step_ms:.1} ms\n",
        1e3 * seconds,
        flops / seconds.max(f64::MIN_POSITIVE),
        100.0 * 1e3 * seconds / step_ms
    ));
    out
}

/// Takes the recorded times as a table, each divided by `steps` (milliseconds per step), with
/// the GFLOP of matrix products per step and their rate over the span's time (blank for spans
/// without products).
pub fn report(steps: usize) -> String {
    let steps = steps.max(1) as f64;
    let mut out =
        format!("{:>10} {:>7} {:>10} {:>8}  op [first input's shape]\n", "ms/step", "calls", "GFLOP/step", "GFLOP/s");
    for e in take() {
        let (gflop, rate) = if e.flops > 0 && e.seconds > 0.0 {
            let gflop = e.flops as f64 / 1e9;
            (format!("{:.2}", gflop / steps), format!("{:.0}", gflop / e.seconds))
        } else {
            (String::new(), String::new())
        };
        out.push_str(&format!(
            "{:>10.2} {:>7.1} {gflop:>10} {rate:>8}  {}\n",
            1e3 * e.seconds / steps,
            e.calls as f64 / steps,
            e.key
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder is one per process: its tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn spans_record_only_while_enabled() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        drop(span("profile-test-off", &[1]));
        enable(true);
        drop(span("profile-test-on", &[2, 3]));
        drop(span("profile-test-on", &[2, 3]));
        enable(false);
        let entries = take();
        assert!(entries.iter().all(|e| !e.key.starts_with("profile-test-off")));
        let on = entries.iter().find(|e| e.key == "profile-test-on [2, 3]").expect("recorded");
        assert_eq!(on.calls, 2);
        assert!(on.seconds >= 0.0);
    }

    #[test]
    fn spans_are_credited_with_the_products_done_while_open() {
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        enable(true);
        let outer = span("profile-test-outer", &[1]);
        let inner = span("profile-test-inner", &[1]);
        let (m, n, k) = (3, 5, 7);
        let a = vec![1f32; m * k];
        let b = vec![1f32; k * n];
        let mut c = vec![0f32; m * n];
        crate::ops::plumbing::matmul::matmul_into((m, n, k), &a, false, &b, false, &mut c, false);
        drop(inner);
        crate::ops::plumbing::matmul::matmul_into((m, n, k), &a, false, &b, false, &mut c, false);
        drop(outer);
        enable(false);
        let entries = take();
        let flops = |key: &str| entries.iter().find(|e| e.key == key).expect("recorded").flops;
        // Other tests' products may run while these spans are open (tests share the counter), so
        // each span holds at least its own products.
        assert!(flops("profile-test-inner [1]") >= 2 * (m * n * k) as u64);
        assert!(flops("profile-test-outer [1]") >= 4 * (m * n * k) as u64);
        assert!(c.iter().all(|&v| v == k as f32));
    }

    #[test]
    fn products_are_recorded_by_shape_and_replayed_per_step() {
        use crate::ops::plumbing::matmul::{matmul_into, matmul_strided, replay_products};
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // Shapes no other test of this crate multiplies, so other tests' products (the recorder
        // is shared) do not land on them.
        let (m, n, k) = (37, 41, 43);
        let a = vec![1f32; m * k];
        let b = vec![1f32; k * n];
        let mut c = vec![0f32; m * n];
        enable(true);
        // Two "steps": a threaded product three times and a single-threaded one with strides
        // once per step.
        for _ in 0..2 {
            for _ in 0..3 {
                matmul_into((m, n, k), &a, true, &b, false, &mut c, false);
            }
            matmul_strided((m - 1, n - 1, k - 1), &a, k, &b, n, &mut c, n);
        }
        enable(false);
        let replayed = replay_products(2);
        let find = |mnk: (usize, usize, usize), parallel: bool| {
            replayed
                .iter()
                .find(|r| (r.call.m, r.call.n, r.call.k) == mnk && r.call.parallel == parallel)
                .unwrap_or_else(|| panic!("{mnk:?} not replayed: {replayed:?}"))
        };
        let threaded = find((m, n, k), true);
        assert_eq!(threaded.call.a_strides, (1, m), "a transposed: column-major m×k");
        assert_eq!((threaded.call.b_strides, threaded.call.ldc), ((n, 1), n));
        assert_eq!((threaded.call.dtype, threaded.call.accumulate), (DType::F32, false));
        assert_eq!(threaded.calls_per_step, 3.0);
        let single = find((m - 1, n - 1, k - 1), false);
        assert_eq!((single.call.a_strides, single.call.b_strides, single.call.ldc), ((k, 1), (n, 1), n));
        assert_eq!(single.calls_per_step, 1.0);
        for r in [threaded, single] {
            assert!(r.seconds_per_step > 0.0 && r.gflops().is_finite(), "{r:?}");
        }
        // Taken: a second replay has nothing of these.
        assert!(replay_products(2).iter().all(|r| (r.call.m, r.call.n, r.call.k) != (m, n, k)));
        let table = replay_report(std::slice::from_ref(threaded), 1.0);
        assert!(table.contains("37×41×43; a (1, 37), b (41, 1); ldc 41, threaded"), "{table}");
        assert!(table.contains("products alone:"), "{table}");
    }

    #[test]
    fn convolution_forwards_are_named_by_the_algorithm_that_ran() -> candle_core::Result<()> {
        use crate::ops::layers::{Conv2d, Conv2dConfig};
        use candle_core::{DType, Device, Module, Tensor};
        use candle_nn::{VarBuilder, VarMap};
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dev = Device::Cpu;
        // (height, stride, the forward's name): 3×3 / stride 1 / padding 1 on 8×8 images is
        // Winograd's, on 2×2 images (mostly padding) the in-bounds taps', stride 2 on 32×32
        // images (little padding) im2col's.
        // Seven input channels keep the keys apart from other tests' convolutions.
        let cases = [(8, 1, "conv2d-winograd-nhwc"), (2, 1, "conv2d-taps-nhwc"), (32, 2, "conv2d-im2col-nhwc")];
        enable(true);
        for &(h, stride, _) in &cases {
            let cfg = Conv2dConfig { in_channels: 7, out_channels: 4, kernel_size: 3, stride, padding: 1 };
            let conv = Conv2d::new(cfg, VarBuilder::from_varmap(&VarMap::new(), DType::F32, &dev))?;
            conv.forward(&Tensor::ones((2, h, h, 7), DType::F32, &dev)?)?;
        }
        enable(false);
        let keys: Vec<String> = take().into_iter().map(|e| e.key).collect();
        for (h, _, name) in cases {
            let key = format!("{name} [2, {h}, {h}, 7]");
            assert!(keys.contains(&key), "{key} not among {keys:?}");
        }
        Ok(())
    }
}
