//! `vfblk-bench`: the system benchmarks, each printing a table (or JSON) with the commands
//! that produced it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vfblk_benches::system::{cost, nvme, suite, target, vhost};

/// System benchmarks of the stack.
#[derive(Parser, Debug)]
#[command(name = "vfblk-bench", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The suite: backends side by side (ours, qemu-storage-daemon, and SPDK and
    /// cloud-hypervisor when given) under two clients over a set of workloads; writes
    /// suite.json, suite.md and PNG plots into --out.
    Suite(suite::SuiteOptions),
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
    /// Software cost per I/O on the null path: instructions and allocations in the request
    /// path (valgrind's callgrind), system calls of the poller thread (strace).
    Cost {
        /// Seconds of client I/O per measurement.
        #[arg(long, default_value_t = 5.0, value_parser = vfblk_benches::args::seconds)]
        seconds: f64,
        /// Requests in flight.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=128))]
        qd: u16,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The frontend the client plays: region (QEMU-like, its own inflight region),
        /// own-region (none: the target keeps its own, under vfblk-keeper), dirty-log (a
        /// migration's source).
        #[arg(long, default_value = "region")]
        frontend: cost::CostFrontend,
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
        Command::Suite(options) => suite::bench(&options),
        Command::Vhost { seconds, qd, json } => {
            vhost::bench(&vhost::VhostBenchOptions { seconds, qd, json })
        }
        Command::Cost {
            seconds,
            qd,
            json,
            frontend,
        } => cost::bench(&cost::CostOptions {
            seconds,
            qd,
            json,
            frontend,
        }),
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
