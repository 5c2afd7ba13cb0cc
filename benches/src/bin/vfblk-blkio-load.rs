//! `vfblk-blkio-load`: the benchmark workload through libblkio, a vhost-user-blk frontend
//! that is not ours, with the same report as `vfblk-loadgen`.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vfblk_benches::args;
use vfblk_benches::blkio_load::{check_request_types, run, BlkioOptions};
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
    /// Instead of the workload: every request type once (write, flush, read, write zeroes,
    /// discard) in the first 64 KiB of the disk, which it overwrites; exits 1 when one fails.
    #[arg(long, conflicts_with = "verify")]
    request_types: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    vfblk_benches::loadgen::stop_on_signals();
    let job = a.job;
    if a.request_types {
        return request_types(&job.socket, job.json);
    }
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

fn request_types(socket: &std::path::Path, json: bool) -> ExitCode {
    let steps = match check_request_types(socket) {
        Ok(steps) => steps,
        Err(e) => {
            eprintln!("vfblk-blkio-load: {e}");
            return ExitCode::from(2);
        }
    };
    let ok = steps.iter().all(|s| s.ok);
    if json {
        let steps: Vec<_> = steps
            .iter()
            .map(|s| serde_json::json!({"step": s.what, "ok": s.ok, "detail": s.detail}))
            .collect();
        println!("{}", serde_json::json!({"ok": ok, "steps": steps}));
    } else {
        for s in &steps {
            let mark = if s.ok { "ok" } else { "FAILED" };
            println!("{:<40} {mark:<6} {}", s.what, s.detail);
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
