//! Sets `cfg(fashion_mnist_installed)` for the real-data tests (see resnet-data's `build/fashion_mnist.rs`).

include!("../resnet-data/build/fashion_mnist.rs");

fn main() {
    emit_data_cfg("fashion_mnist_installed", Wanted::AnyInstall);
}
