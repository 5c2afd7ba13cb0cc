//! `vfblk-lab`: the VM lab's command line (see `vfblk_lab::cli`).

use std::process::ExitCode;

use clap::Parser;
use vfblk_lab::cli::{self, LabCli};

fn main() -> ExitCode {
    // Inside the lab guest this is the console the host reads: no timestamps, no colour.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .init();
    match cli::run(LabCli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-lab: {e}");
            ExitCode::FAILURE
        }
    }
}
