//! `cargo xtask`: project chores that are not part of the library crates.
//!
//! `cargo xtask fetch-data` downloads and verifies Fashion-MNIST (the only network code in the
//! workspace); `cargo xtask bench` measures training and evaluation speed, optionally against
//! PyTorch; `cargo xtask build-cuda` builds the CUDA binaries without a system
//! toolkit. Each subcommand lives in its own module; this file only parses and dispatches.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod build_cuda;
mod bundle;
mod fetch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "Project chores for resnet-fashion", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Download Fashion-MNIST into the cache directory (or --dir), verified by SHA-256
    FetchData(fetch::FetchArgs),
    /// Benchmark training-step and evaluation throughput of d2l's ResNet-18 (see BENCHMARKS.md)
    Bench(bench::BenchArgs),
    /// Build resnet-cli and xtask with CUDA, using PyPI's toolkit when there is no system one; --bundle: the GPU check bundle
    BuildCuda(build_cuda::BuildCudaArgs),
    /// One benchmark configuration in this process (used by `bench`)
    #[command(hide = true)]
    BenchOne(bench::BenchOneArgs),
}

fn main() -> ExitCode {
    // Before any allocation of note: bench-one measures the training step as resnet-cli runs it.
    resnet_train::tune_process();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::FetchData(args) => fetch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::BenchOne(args) => bench::run_one(args),
        Command::BuildCuda(args) => build_cuda::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
