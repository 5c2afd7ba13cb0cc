//! `vfblk-blkio-load`: the benchmark workload through libblkio, a vhost-user-blk frontend
//! that is not ours, with the same report as `vfblk-loadgen`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vfblk_benches::args;
use vfblk_benches::blkio_load::{run, BlkioOptions};
use vfblk_benches::loadgen::Workload;

/// Drive a vhost-user-blk backend through libblkio (driver virtio-blk-vhost-user).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long)]
    socket: PathBuf,
    /// Queues (one client thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    queues: u16,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    qd: u16,
    /// Bytes per request (a multiple of 512).
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// read, write or mixed[:READ_PERCENT].
    #[arg(long, default_value = "read", value_parser = args::workload)]
    rw: Workload,
    /// Blocks in order instead of at random.
    #[arg(long)]
    sequential: bool,
    /// Seconds of I/O.
    #[arg(long, default_value_t = 10.0, value_parser = args::seconds)]
    seconds: f64,
    /// Seconds of I/O before latencies count.
    #[arg(long, default_value_t = 0.0, value_parser = args::seconds)]
    ramp_time: f64,
    /// Busy-poll libblkio's poll queues (default: sleep on completion fds like a guest).
    #[arg(long)]
    poll: bool,
    /// Machine-readable summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let options = BlkioOptions {
        socket: a.socket,
        queues: a.queues,
        depth: a.qd,
        block_size: a.bs,
        workload: a.rw,
        sequential: a.sequential,
        seconds: a.seconds,
        poll: a.poll,
        ramp_time: Duration::from_secs_f64(a.ramp_time),
    };
    let report = match run(&options) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vfblk-blkio-load: {}", vfblk_benches::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if report.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
