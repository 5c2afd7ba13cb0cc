//! `vfblk-blkio-load`: the benchmark workload through libblkio, a vhost-user-blk frontend
//! that is not ours, with the same report as `vfblk-loadgen`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vfblk_benches::args;
use vfblk_benches::blkio_load::{run, BlkioOptions};
use vfblk_benches::loadgen::Report;

/// Drive a vhost-user-blk backend through libblkio (driver virtio-blk-vhost-user).
#[derive(Parser, Debug)]
#[command(name = "vfblk-blkio-load", version)]
struct Args {
    #[command(flatten)]
    job: args::JobArgs,
    /// Busy-poll libblkio's poll queues (default: sleep on completion fds like a guest).
    #[arg(long)]
    poll: bool,
    /// Stamp writes and check reads (use with write or mixed).
    #[arg(long)]
    verify: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    vfblk_benches::loadgen::stop_on_signals();
    let job = a.job;
    let options = BlkioOptions {
        socket: job.socket,
        queues: job.queues,
        depth: job.qd,
        block_size: job.bs,
        workload: job.rw,
        sequential: job.sequential,
        seconds: job.seconds,
        poll: a.poll,
        ramp_time: Duration::from_secs_f64(job.ramp_time),
        verify: a.verify,
    };
    Report::print_and_exit_code("vfblk-blkio-load", run(&options), job.json)
}
