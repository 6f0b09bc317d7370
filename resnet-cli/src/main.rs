//! `resnet-cli`: train, evaluate, predict with and inspect d2l's ResNet on Fashion-MNIST.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod args;
mod commands;
mod device;
mod image;
mod model_size;
mod progress;
mod weights;

use std::process::ExitCode;

use clap::Parser;

/// Exit status after Ctrl-C, as shells report a SIGINT death.
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    restore_sigpipe();
    resnet_train::tune_process();
    let cli = args::Cli::parse();
    init_tracing();
    if let Some(threads) = cli.threads {
        // Before any thread pool exists: rayon and candle both read this variable.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let outcome = match cli.command {
        args::Command::Train(a) => commands::train::run(*a),
        args::Command::Eval(a) => commands::eval::run(a),
        args::Command::Predict(a) => commands::predict::run(a),
        args::Command::Summary(a) => commands::summary::run(a),
        args::Command::Report(a) => commands::report::run(a),
        args::Command::Completions(a) => commands::completions::run(a),
        args::Command::DeviceCheck(a) => commands::device_check::run(a),
    };
    match outcome {
        Ok(commands::Outcome::Done) => ExitCode::SUCCESS,
        Ok(commands::Outcome::Interrupted) => ExitCode::from(EXIT_INTERRUPTED),
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `resnet-cli eval | head` should end quietly when `head` does, as Unix tools do, rather than
/// panic on the broken pipe (Rust ignores SIGPIPE by default).
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
