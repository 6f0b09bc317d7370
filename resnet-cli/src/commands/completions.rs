//! `resnet-cli completions SHELL`: a completion script for bash, zsh, fish, elvish or PowerShell.

use anyhow::Result;
use clap::CommandFactory;

use super::Outcome;
use crate::args::{Cli, CompletionsArgs};

/// Runs the command.
pub fn run(a: CompletionsArgs) -> Result<Outcome> {
    let mut cmd = Cli::command();
    clap_complete::generate(a.shell, &mut cmd, "resnet-cli", &mut std::io::stdout().lock());
    Ok(Outcome::Done)
}
