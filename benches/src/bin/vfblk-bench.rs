//! `vfblk-bench`: the system benchmarks, each printing a table (or JSON) with the commands
//! that produced it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vfblk_benches::system::{nvme, target, vhost};

/// System benchmarks of the stack.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// vfblk-loadgen 4 KiB randread against vfblk-bridge (mem, file) and qemu-storage-daemon
    /// on the same data, one core each.
    Vhost {
        /// Seconds per backend.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Requests in flight.
        #[arg(long, default_value_t = 32)]
        qd: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The many-VM target on one poller: IOPS and cost per I/O with 1, 4 and 16 controllers,
    /// and CPU use with 16 idle ones.
    Target {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Requests in flight per controller.
        #[arg(long, default_value_t = 8)]
        qd: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Our driver's perf against fio (io_uring, kernel nvme driver), 4 KiB randread at QD1
    /// and QD32, same lab guest and controller.
    Nvme {
        /// Seconds per run.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    let result = match Args::parse().command {
        Command::Vhost { seconds, qd, json } => {
            vhost::bench(&vhost::VhostBenchOptions { seconds, qd, json })
        }
        Command::Nvme { seconds, json } => nvme::bench(&nvme::NvmeBenchOptions { seconds, json }),
        Command::Target { seconds, qd, json } => {
            target::bench(&target::TargetBenchOptions { seconds, qd, json })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-bench: {}", vfblk_benches::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
