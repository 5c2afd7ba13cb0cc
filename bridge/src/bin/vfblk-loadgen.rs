//! `vfblk-loadgen`: drive any vhost-user-blk backend like QEMU and a guest would, measure it,
//! and (with --verify) check every read against the last completed write, across backend
//! restarts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use vfblk_bridge::loadgen::{LoadGen, Options, Workload};

const USAGE: &str = "usage: vfblk-loadgen --socket PATH [options]

  --queues N          virtqueues (default 1)
  --queue-size N      entries per virtqueue (default 128)
  --qd N              requests in flight per queue (default 32)
  --bs BYTES          request size (default 4096)
  --rw read|write|mixed[:READ_PERCENT]   (default read)
  --verify            stamp writes, check reads (use with write or mixed)
  --seconds N         duration (default 10)
  --no-inflight       do not use INFLIGHT_SHMFD even if offered
  --reconnect-timeout-s N   wait this long for a vanished backend (default 30)
  --io-timeout-s N    report requests outstanding this long as lost (default 10)
  --seed N            pattern seed
  --hugepages         guest memory on 2 MiB hugepages (needs reserved hugepages)
  --json              machine-readable summary
";

fn main() -> ExitCode {
    let mut o = Options {
        socket: PathBuf::new(),
        queues: 1,
        queue_size: 128,
        depth: 32,
        block_size: 4096,
        workload: Workload::Read,
        verify: false,
        seconds: 10.0,
        inflight: true,
        reconnect_timeout: Duration::from_secs(30),
        io_timeout: Duration::from_secs(10),
        seed: 1,
        hugepages: false,
    };
    let mut json = false;
    let mut args = std::env::args().skip(1);
    let parsed: Result<(), String> = (|| {
        while let Some(a) = args.next() {
            let mut v = || args.next().ok_or_else(|| format!("{a} needs a value"));
            let num = |s: String| {
                s.parse::<u64>()
                    .map_err(|_| format!("{s:?} is not a number"))
            };
            match a.as_str() {
                "--socket" => o.socket = PathBuf::from(v()?),
                "--queues" => o.queues = num(v()?)? as u16,
                "--queue-size" => o.queue_size = num(v()?)? as u16,
                "--qd" => o.depth = num(v()?)? as u16,
                "--bs" => o.block_size = num(v()?)? as u32,
                "--rw" => {
                    let w = v()?;
                    o.workload = match w.split_once(':') {
                        None if w == "read" => Workload::Read,
                        None if w == "write" => Workload::Write,
                        None if w == "mixed" => Workload::Mixed(50),
                        Some(("mixed", p)) => Workload::Mixed(num(p.to_string())?.min(100) as u8),
                        _ => return Err(format!("--rw {w}: read, write or mixed[:N]")),
                    }
                }
                "--verify" => o.verify = true,
                "--seconds" => o.seconds = v()?.parse().map_err(|_| "--seconds takes a number")?,
                "--no-inflight" => o.inflight = false,
                "--reconnect-timeout-s" => o.reconnect_timeout = Duration::from_secs(num(v()?)?),
                "--io-timeout-s" => o.io_timeout = Duration::from_secs(num(v()?)?),
                "--seed" => o.seed = num(v()?)? as u32,
                "--json" => json = true,
                "--hugepages" => o.hugepages = true,
                "--help" | "-h" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown option {other:?}\n{USAGE}")),
            }
        }
        if o.socket.as_os_str().is_empty() {
            return Err(format!("--socket is required\n{USAGE}"));
        }
        Ok(())
    })();
    if let Err(e) = parsed {
        eprintln!("vfblk-loadgen: {e}");
        return ExitCode::from(2);
    }
    let lg = match LoadGen::new(o.clone()) {
        Ok(lg) => lg,
        Err(e) => {
            eprintln!("vfblk-loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = lg.run();
    let iops = r.ios as f64 / r.seconds.max(1e-9);
    let us = |q: f64| r.latency.quantile_ns(q) as f64 / 1000.0;
    let max_pause = r.pauses_ms.iter().cloned().fold(0.0, f64::max);
    let clean = r.verify_errors == 0
        && r.failed == 0
        && r.lost == 0
        && r.not_a_head == 0
        && r.errors.is_empty();
    if json {
        let pauses: Vec<String> = r.pauses_ms.iter().map(|p| format!("{p:.1}")).collect();
        let errors: Vec<String> = r.errors.iter().map(|e| format!("{:?}", e)).collect();
        println!(
            "{{\"ios\":{},\"reads\":{},\"seconds\":{:.3},\"iops\":{:.1},\"lat_p50_us\":{:.1},\"lat_p99_us\":{:.1},\"lat_p999_us\":{:.1},\"verify_errors\":{},\"failed\":{},\"lost\":{},\"not_a_head\":{},\"reconnects\":{},\"inflight\":{},\"pauses_ms\":[{}],\"max_pause_ms\":{:.1},\"errors\":[{}]}}",
            r.ios, r.reads, r.seconds, iops, us(0.5), us(0.99), us(0.999), r.verify_errors, r.failed, r.lost, r.not_a_head,
            r.reconnects, r.inflight, pauses.join(","), max_pause, errors.join(",")
        );
    } else {
        println!(
            "{} I/Os in {:.1} s: {:.0} IOPS; latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us",
            r.ios,
            r.seconds,
            iops,
            us(0.5),
            us(0.99),
            us(0.999)
        );
        println!(
            "verify errors {}, failed {}, lost {}, not-a-head {}; {} reconnect(s), inflight tracking {}, longest pause {:.1} ms",
            r.verify_errors, r.failed, r.lost, r.not_a_head, r.reconnects, if r.inflight { "on" } else { "off" }, max_pause
        );
        for e in &r.errors {
            println!("  error: {e}");
        }
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
