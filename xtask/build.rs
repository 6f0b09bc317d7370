//! Sets `cfg(debian_fashion_mnist_installed)` for the fetch tests that serve Debian's files (see
//! resnet-data's `build/fashion_mnist.rs`).

include!("../resnet-data/build/fashion_mnist.rs");

fn main() {
    emit_data_cfg("debian_fashion_mnist_installed", Wanted::DebianGzip);
}
