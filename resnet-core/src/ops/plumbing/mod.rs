//! What the layers and the convolution algorithms share: matrix products on raw buffers, SIMD
//! dispatch, the backward pass that takes the convolution weights' gradients directly, the
//! network's own backward pass from a tape of custom ops, reused scratch buffers, access to a custom op's storage, sliding-window geometry,
//! weight reordering, and the single-pass element-wise ops.

pub(crate) mod elementwise;
pub(crate) mod geometry;
pub(crate) mod gradients;
pub(crate) mod matmul;
pub(crate) mod panels;
pub(crate) mod scratch;
pub(crate) mod simd;
pub(crate) mod storage;
pub(crate) mod tape;
pub(crate) mod weight_layout;

pub(crate) use elementwise::add_relu;
