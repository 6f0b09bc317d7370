//! One module per subcommand.

pub mod completions;
pub mod device_check;
pub mod eval;
pub mod predict;
pub mod report;
pub mod summary;
pub mod train;

/// How a command ended without error.
pub enum Outcome {
    /// Finished.
    Done,
    /// Stopped by Ctrl-C after writing a checkpoint.
    Interrupted,
}
