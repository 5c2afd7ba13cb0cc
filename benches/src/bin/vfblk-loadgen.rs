//! `vfblk-loadgen`: drive any vhost-user-blk backend like QEMU and a guest would, measure it,
//! and (with --verify) check every read against the last completed write, across backend
//! restarts.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vfblk_benches::args;
use vfblk_benches::loadgen::{LoadGen, Options, Report};

/// Drive a vhost-user-blk backend like QEMU and a guest would.
#[derive(Parser, Debug)]
#[command(name = "vfblk-loadgen", version)]
struct Args {
    #[command(flatten)]
    job: args::JobArgs,
    /// Entries per virtqueue (a power of two).
    #[arg(long, default_value_t = 128, value_parser = args::queue_size)]
    queue_size: u16,
    /// Stamp writes and check reads (use with write or mixed).
    #[arg(long)]
    verify: bool,
    /// Check every read against this file's bytes at the same offset (a disk whose content
    /// is known, such as a read-only image); writes are not stamped nor remembered.
    #[arg(long, value_name = "FILE", conflicts_with = "verify")]
    expect_image: Option<std::path::PathBuf>,
    /// Do not use INFLIGHT_SHMFD even if offered.
    #[arg(long)]
    no_inflight: bool,
    /// Wait this long for a vanished backend.
    #[arg(long, default_value_t = 30)]
    reconnect_timeout_s: u64,
    /// Report requests outstanding this long as lost.
    #[arg(long, default_value_t = 10)]
    io_timeout_s: u64,
    /// Pattern seed.
    #[arg(long, default_value_t = 1)]
    seed: u32,
    /// Guest memory on 2 MiB hugepages (needs reserved hugepages).
    #[arg(long)]
    hugepages: bool,
    /// Negotiate EVENT_IDX and sleep on interrupts like a guest driver, counting completions
    /// the device published without interrupting.
    #[arg(long)]
    interrupts: bool,
    /// Give each data buffer as two descriptors off page boundaries (a scatter list NVMe
    /// PRPs cannot describe).
    #[arg(long)]
    unaligned: bool,
    /// Milliseconds between SET_VRING_KICK and SET_VRING_CALL when (re)connecting.
    #[arg(long, default_value_t = 0)]
    call_after_kick_ms: u64,
    /// A polling driver: ask the backend for no interrupts (VRING_AVAIL_F_NO_INTERRUPT).
    #[arg(long, conflicts_with = "interrupts")]
    polled: bool,
    /// Requests per second over all queues, evenly paced (default: as fast as --qd allows).
    #[arg(long, value_parser = args::rate)]
    rate: Option<f64>,
    /// Connect and set up the rings, then do no I/O for --seconds (an idle guest).
    #[arg(long)]
    idle: bool,
    /// List every gap between completions longer than MS, with the CLOCK_MONOTONIC time
    /// it ended (JSON `gaps`), to find the pause each upgrade or restart caused.
    #[arg(long, value_name = "MS")]
    log_gaps_over_ms: Option<f64>,
    /// Act as the source of a live migration: hand the backend a dirty log and turn logging
    /// on; at the end stop the rings and check that exactly the pages the device wrote (read
    /// data, status bytes, used rings) are marked.
    #[arg(long)]
    dirty_log: bool,
    /// Give the backend a backend request channel and take config changes on it as QEMU
    /// does (JSON `config_changes`: the capacity each one showed); a grown disk's new blocks
    /// join the workload.
    #[arg(long)]
    config_changes: bool,
    /// Negotiate VIRTIO_F_RING_PACKED and drive packed virtqueues (a backend that does not
    /// offer it is an error); split rings otherwise.
    #[arg(long)]
    packed: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    vfblk_benches::loadgen::stop_on_signals();
    let options = Options {
        socket: a.job.socket,
        queues: a.job.queues,
        queue_size: a.queue_size,
        depth: a.job.qd,
        block_size: a.job.bs,
        workload: a.job.rw,
        verify: a.verify,
        expect_image: a.expect_image,
        seconds: a.job.seconds,
        inflight: !a.no_inflight,
        reconnect_timeout: Duration::from_secs(a.reconnect_timeout_s),
        io_timeout: Duration::from_secs(a.io_timeout_s),
        seed: a.seed,
        hugepages: a.hugepages,
        interrupts: a.interrupts,
        call_after_kick: Duration::from_millis(a.call_after_kick_ms),
        unaligned: a.unaligned,
        polled: a.polled,
        rate: a.rate,
        ramp_time: Duration::from_secs_f64(a.job.ramp_time),
        sequential: a.job.sequential,
        log_gaps_over: a
            .log_gaps_over_ms
            .map(|ms| Duration::from_secs_f64(ms.max(0.0) / 1e3)),
        dirty_log: a.dirty_log,
        config_changes: a.config_changes,
        packed: a.packed,
    };
    let result = LoadGen::new(options).map(|lg| if a.idle { lg.idle() } else { lg.run() });
    Report::print_and_exit_code("vfblk-loadgen", result, a.job.json)
}
