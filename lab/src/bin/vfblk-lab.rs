//! `vfblk-lab`: boot the VM lab, run the demo, open a shell in the guest, run nested guests.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vfblk_lab::recovery::{self, DemoBackend, DemoOptions};
use vfblk_lab::scenario::{self, Contents, Lab};
use vfblk_lab::vm::{self, Accel, Echo, Ending};
use vfblk_lab::{LabError, Result};

const USAGE: &str = "usage: vfblk-lab <command> [options]

commands:
  setup                      fetch and unpack the guest kernel into the cache
  demo [--backend mem|file] [--kills N] [--json]
                             boot the lab: the NVMe controller reached through VFIO in the
                             guest, and fio verifying a vhost-user-blk disk while the host
                             kills the bridge with SIGKILL and restarts it
  run --script FILE [--fio] [--nested] [--verbose] [--json]
                             boot the lab guest and run FILE (busybox sh) in it
  shell [--fio] [--nested]   boot the lab guest with a shell on this terminal (Ctrl-A X quits)
  nested-stats [--boots N] [--json]
                             boot N second-level guests inside the lab guest, report boot times
  bench-nvme [--seconds N] [--json]
                             our driver's perf vs fio (io_uring, kernel nvme driver),
                             4 KiB randread at QD1 and QD32, same guest and controller
  bench-vhost [--seconds N] [--qd N] [--json]
                             vfblk-loadgen 4 KiB randread against vfblk-bridge (mem) and
                             against qemu-storage-daemon on the same data, one core each
  nested [--boots N] [--vhost-user SOCKET] [--verbose]
                             (inside the lab guest) boot second-level guests under KVM; with
                             --vhost-user, one whose disk is that vhost-user-blk socket, with fio
";

struct Args {
    words: Vec<String>,
}

impl Args {
    fn flag(&mut self, name: &str) -> bool {
        let before = self.words.len();
        self.words.retain(|w| w != name);
        before != self.words.len()
    }

    fn value(&mut self, name: &str) -> Result<Option<String>> {
        let Some(pos) = self.words.iter().position(|w| w == name) else {
            return Ok(None);
        };
        if pos + 1 >= self.words.len() {
            return Err(LabError::Setup(format!("{name} needs a value")));
        }
        let value = self.words.remove(pos + 1);
        self.words.remove(pos);
        Ok(Some(value))
    }

    fn number(&mut self, name: &str, default: u32) -> Result<u32> {
        match self.value(name)? {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| LabError::Setup(format!("{name} takes a number, not {v:?}"))),
        }
    }

    fn finish(self) -> Result<()> {
        if self.words.is_empty() {
            Ok(())
        } else {
            Err(LabError::Setup(format!(
                "unexpected arguments: {:?}\n{USAGE}",
                self.words
            )))
        }
    }
}

fn main() -> ExitCode {
    let mut words: Vec<String> = std::env::args().skip(1).collect();
    if words.is_empty() || words[0] == "--help" || words[0] == "-h" {
        print!("{USAGE}");
        return if words.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    let command = words.remove(0);
    let args = Args { words };
    let result = match command.as_str() {
        "setup" => setup(args),
        "demo" => demo(args),
        "run" => run_script(args),
        "shell" => shell(args),
        "nested" => nested(args),
        "nested-stats" => nested_stats(args),
        "bench-nvme" => bench_nvme(args),
        "bench-vhost" => bench_vhost(args),
        other => Err(LabError::Setup(format!(
            "unknown command {other:?}\n{USAGE}"
        ))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-lab {command}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn setup(args: Args) -> Result<()> {
    args.finish()?;
    let kernel = vfblk_lab::kernel::ensure_kernel()?;
    println!(
        "guest kernel {} ready: {}",
        kernel.release,
        kernel.vmlinux.display()
    );
    Ok(())
}

fn demo(mut args: Args) -> Result<()> {
    let json = args.flag("--json");
    let backend = match args.value("--backend")?.as_deref() {
        None | Some("mem") => DemoBackend::Mem,
        Some("file") => DemoBackend::File,
        Some(other) => return Err(LabError::Setup(format!("--backend {other}: mem or file"))),
    };
    let kills = args.number("--kills", 2)?;
    args.finish()?;
    let started = Instant::now();
    eprintln!("lab: preparing guest kernel and project binaries");
    let lab = Lab::new("demo")?;
    eprintln!("lab: booting the guest (TCG) with the emulated NVMe behind a virtual IOMMU and a vhost-user-blk disk served by vfblk-bridge");
    let opts = DemoOptions {
        backend,
        kills,
        vfio_probe: true,
        fio_mib: 32,
    };
    let outcome = recovery::run_demo(&lab, &opts)?;
    let run = &outcome.run.run;
    run.expect_success("lab demo")?;
    let probe = run
        .record("probe")
        .ok_or_else(|| LabError::Guest("the guest reported no probe result".into()))?;
    let guest = run.record("guest").cloned().unwrap_or_default();
    let fio = run.record("fio").cloned().unwrap_or_default();
    let (writes, reads, max_pause_ms, fio_errors) = recovery::fio_summary(&fio);
    if json {
        let out = serde_json::json!({
            "accel": "tcg",
            "boot_s": run.boot_time.map(|d| d.as_secs_f64()),
            "total_s": started.elapsed().as_secs_f64(),
            "guest": guest,
            "probe": probe,
            "recovery": {
                "backend": outcome.backend,
                "kills": outcome.kills,
                "resubmitted": outcome.resubmitted,
                "fio_exit": run.record("fio_exit"),
                "fio_writes": writes,
                "fio_verified_reads": reads,
                "fio_errors": fio_errors,
                "longest_io_pause_ms": max_pause_ms,
            },
        });
        println!("{out}");
        return Ok(());
    }
    let g = |k: &str| probe[k].clone();
    let cap = &probe["cap"];
    println!();
    println!("vfblk lab demo");
    println!("  acceleration     {}", Accel::Tcg.describe());
    println!(
        "  guest            Linux {}, {} vCPUs, {} x 2 MiB hugepages, SVM {}; booted in {:.1} s",
        guest["kernel"].as_str().unwrap_or("?"),
        guest["cpus"],
        guest["hugepages"],
        if guest["svm"] == true {
            "available (nested KVM possible)"
        } else {
            "absent"
        },
        run.boot_time.unwrap_or_default().as_secs_f64(),
    );
    println!("NVMe through VFIO (inside the guest)");
    println!(
        "  controller       {} (class {}, vendor:device {}), driver {}",
        g("pci_address").as_str().unwrap_or("?"),
        g("class").as_str().unwrap_or("?"),
        g("vendor_device").as_str().unwrap_or("?"),
        g("driver").as_str().unwrap_or("?")
    );
    println!(
        "  IOMMU group      {} (/dev/vfio/{}); BAR0 {} bytes mapped",
        g("iommu_group"),
        g("iommu_group"),
        g("bar0_size")
    );
    println!(
        "  VS / CAP         NVMe {} / {}",
        g("version").as_str().unwrap_or("?"),
        cap["raw"].as_str().unwrap_or("?")
    );
    println!(
        "                   MQES {}, DSTRD {} B, TO {} ms, CQR {}, MPS {}..{} bytes",
        cap["max_queue_entries"],
        cap["doorbell_stride_bytes"],
        cap["timeout_ms"],
        cap["contiguous_queues_required"],
        cap["page_size_min"],
        cap["page_size_max"]
    );
    let dma = &probe["dma"];
    println!(
        "  DMA buffer       {} bytes of {} pages mapped at IOVA {}",
        dma["size"],
        dma["page_kind"].as_str().unwrap_or("?"),
        dma["iova"].as_str().unwrap_or("?")
    );
    println!("vhost-user-blk with live recovery (host bridge, guest fio)");
    println!("  backend          {}", outcome.backend);
    println!("  bridge restarts  {} x SIGKILL mid-run, restarted 0.5 s later; {} request(s) run again from the inflight region", outcome.kills, outcome.resubmitted);
    println!(
        "  fio in the guest exit status {}, {} writes then {} verified reads (crc32c), {} errors",
        run.record("fio_exit").cloned().unwrap_or_default(),
        writes,
        reads,
        fio_errors
    );
    println!(
        "  longest I/O pause seen by the guest: {:.0} ms (fio's maximum completion latency)",
        max_pause_ms
    );
    println!(
        "  total            {:.1} s; console log {}; bridge log {}",
        started.elapsed().as_secs_f64(),
        run.log.display(),
        outcome.bridge_log.display()
    );
    Ok(())
}

fn contents(args: &mut Args) -> Contents {
    Contents {
        fio: args.flag("--fio"),
        nested: args.flag("--nested"),
    }
}

fn run_script(mut args: Args) -> Result<()> {
    let json = args.flag("--json");
    let verbose = args.flag("--verbose");
    let contents = contents(&mut args);
    let script = args
        .value("--script")?
        .ok_or_else(|| LabError::Setup("run needs --script FILE".into()))?;
    args.finish()?;
    let script = std::fs::read_to_string(PathBuf::from(&script))?;
    let lab = Lab::new("run")?;
    let echo = if verbose { Echo::All } else { Echo::Steps };
    let retried = lab.run_l2(&script, contents, 1024, Duration::from_secs(1800), echo)?;
    let run = &retried.run;
    if json {
        for r in &run.records {
            println!("{r}");
        }
    } else {
        for r in &run.records {
            println!("record: {r}");
        }
        println!(
            "ending: {:?}, boot {:.1} s (try {}), {:.1} s in all; console log {}",
            run.ending,
            run.boot_time.unwrap_or_default().as_secs_f64(),
            retried.tries,
            run.elapsed.as_secs_f64(),
            run.log.display()
        );
    }
    run.expect_success("script")
}

fn shell(mut args: Args) -> Result<()> {
    let contents = contents(&mut args);
    args.finish()?;
    let lab = Lab::new("shell")?;
    let initrd = lab.l2_image(scenario::VFIO_PROBE_SCRIPT, contents)?;
    let disk = lab.disk("nvme.img", 1024)?;
    let spec = lab.l2_spec(&initrd, &disk);
    vm::run_interactive(&spec)
}

fn nested(mut args: Args) -> Result<()> {
    let boots = args.number("--boots", 1)?;
    let vhost = args.value("--vhost-user")?;
    let echo = if args.flag("--verbose") {
        Echo::All
    } else {
        Echo::Quiet
    };
    args.finish()?;
    match vhost {
        Some(socket) => scenario::run_nested_vhost(std::path::Path::new(&socket), echo),
        None => scenario::run_nested(boots, echo),
    }
}

fn nested_stats(mut args: Args) -> Result<()> {
    let boots = args.number("--boots", 10)?;
    let json = args.flag("--json");
    args.finish()?;
    let lab = Lab::new("nested-stats")?;
    let per_boot = scenario::L3_LIMITS.total * scenario::L3_TRIES;
    let contents = Contents {
        fio: false,
        nested: true,
    };
    let total = per_boot * boots + Duration::from_secs(120);
    let retried = lab.run_l2(
        &scenario::nested_script(boots),
        contents,
        64,
        total,
        Echo::Steps,
    )?;
    let run = &retried.run;
    let boots_seen: Vec<&serde_json::Value> =
        run.records.iter().filter_map(|r| r.get("nested")).collect();
    if json {
        println!(
            "{}",
            serde_json::json!({"l2_tries": retried.tries, "boots": boots_seen, "ending": format!("{:?}", run.ending)})
        );
    } else {
        println!("second-level guests under KVM inside the TCG lab guest:");
        println!("  boot  tries  boot time  total   result");
        for b in &boots_seen {
            println!(
                "  {:>4}  {:>5}  {:>8.1}s  {:>5.1}s  {}",
                b["boot"].as_u64().unwrap_or(0),
                b["tries"].as_u64().unwrap_or(0),
                b["boot_s"].as_f64().unwrap_or(f64::NAN),
                b["total_s"].as_f64().unwrap_or(f64::NAN),
                if b["ok"] == true {
                    "ok".to_string()
                } else {
                    format!("FAILED {}", b["problems"])
                }
            );
        }
        let boot_times: Vec<f64> = boots_seen
            .iter()
            .filter_map(|b| b["boot_s"].as_f64())
            .collect();
        if !boot_times.is_empty() {
            let min = boot_times.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = boot_times.iter().cloned().fold(0.0, f64::max);
            let mean = boot_times.iter().sum::<f64>() / boot_times.len() as f64;
            println!("  boot time: min {min:.1} s, mean {mean:.1} s, max {max:.1} s");
        }
        let first_try = boots_seen.iter().filter(|b| b["tries"] == 1).count();
        let ok = boots_seen.iter().filter(|b| b["ok"] == true).count();
        println!(
            "  {ok}/{} runs passed; {first_try}/{} booted at the first try",
            boots_seen.len(),
            boots_seen.len()
        );
    }
    if run.ending != Ending::Finished(0) || boots_seen.len() != boots as usize {
        return Err(LabError::Guest(format!(
            "nested runs did not all finish: {:?}, {} of {boots} reported; log {}",
            run.ending,
            boots_seen.len(),
            run.log.display()
        )));
    }
    Ok(())
}

/// fio's figures for one queue depth: IOPS, p50, p99, p99.9 (µs).
type FioFigures = (f64, f64, f64, f64);

fn bench_nvme(mut args: Args) -> Result<()> {
    let seconds = args.number("--seconds", 10)?;
    let json = args.flag("--json");
    args.finish()?;
    let lab = Lab::new("bench-nvme")?;
    let contents = Contents {
        fio: true,
        nested: false,
    };
    let total = Duration::from_secs(u64::from(seconds) * 6 + 180);
    let retried = lab.run_l2(
        &scenario::nvme_bench_script(seconds),
        contents,
        1024,
        total,
        Echo::Steps,
    )?;
    let run = &retried.run;
    run.expect_success("NVMe benchmark")?;
    let ours = |qd: u32| {
        run.record(&format!("ours_qd{qd}"))
            .cloned()
            .unwrap_or_default()
    };
    let fio = |qd: u32| {
        let job = run
            .record(&format!("fio_qd{qd}"))
            .map(|f| f["jobs"][0]["read"].clone())
            .unwrap_or_default();
        let pct = |p: &str| job["clat_ns"]["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1000.0;
        (
            job["iops"].as_f64().unwrap_or(f64::NAN),
            pct("50.000000"),
            pct("99.000000"),
            pct("99.900000"),
        )
    };
    let rows: Vec<(u32, serde_json::Value, FioFigures)> =
        [1, 32].iter().map(|&qd| (qd, ours(qd), fio(qd))).collect();
    if json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(qd, o, f)| serde_json::json!({"qd": qd, "ours": o, "fio_io_uring": {"iops": f.0, "p50_us": f.1, "p99_us": f.2, "p999_us": f.3}}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"seconds": seconds, "rows": out, "fio_command": run.record("fio_command")})
        );
        return Ok(());
    }
    println!("4 KiB random read, {seconds} s each, one thread/job, same TCG guest (2 vCPUs) and emulated controller:");
    println!(
        "  QD  {:<28} {:>9} {:>9} {:>9} {:>9}  ratio",
        "", "IOPS", "p50 us", "p99 us", "p99.9 us"
    );
    for (qd, o, f) in &rows {
        let oi = o["iops"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {qd:>2}  {:<28} {:>9.0} {:>9.1} {:>9.1} {:>9.1}",
            "vfblk-nvme perf (VFIO, polled)",
            oi,
            o["lat_p50_us"].as_f64().unwrap_or(f64::NAN),
            o["lat_p99_us"].as_f64().unwrap_or(f64::NAN),
            o["lat_p999_us"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  {qd:>2}  {:<28} {:>9.0} {:>9.1} {:>9.1} {:>9.1}  {:.2}x",
            "fio io_uring (kernel nvme)",
            f.0,
            f.1,
            f.2,
            f.3,
            oi / f.0
        );
        println!(
            "      heap allocations while measuring (ours): {}",
            o["allocations"]
        );
    }
    Ok(())
}

fn bench_vhost(mut args: Args) -> Result<()> {
    let seconds = args.number("--seconds", 10)?;
    let qd = args.number("--qd", 32)?;
    let json = args.flag("--json");
    args.finish()?;
    let bin_dir = vfblk_lab::project_bin_dir()?;
    let dir = vfblk_lab::run_dir("bench-vhost")?;
    let data = std::path::PathBuf::from(format!("/dev/shm/vfblk-bench-{}", std::process::id()));
    let (secs, depth) = (seconds.to_string(), qd.to_string());
    let loadgen = [
        "--rw",
        "read",
        "--bs",
        "4096",
        "--qd",
        depth.as_str(),
        "--queues",
        "1",
        "--seconds",
        secs.as_str(),
    ];
    let rows = vfblk_lab::bench::run(&bin_dir, &dir, &data, 256, &loadgen);
    let _ = std::fs::remove_file(&data);
    let rows = rows?;
    let loadgen_cmd = format!(
        "taskset -c 0 vfblk-loadgen --socket SOCKET {} --json",
        loadgen.join(" ")
    );
    if json {
        let out: Vec<serde_json::Value> = rows.iter().map(|r| serde_json::json!({"name": r.name, "backend_command": r.backend_command, "report": r.report})).collect();
        println!(
            "{}",
            serde_json::json!({"loadgen_command": loadgen_cmd, "rows": out})
        );
        return Ok(());
    }
    println!("4 KiB random read, QD{qd}, 1 queue, {seconds} s, on a 256 MiB file in /dev/shm; backend pinned to CPU 1, load generator to CPU 0:");
    println!(
        "  {:<44} {:>10} {:>9} {:>9} {:>9}",
        "backend", "IOPS", "p50 us", "p99 us", "p99.9 us"
    );
    for r in &rows {
        let f = |k: &str| r.report[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:<44} {:>10.0} {:>9.1} {:>9.1} {:>9.1}",
            r.name,
            f("iops"),
            f("lat_p50_us"),
            f("lat_p99_us"),
            f("lat_p999_us")
        );
    }
    if let [ours, qsd, ours_file] = rows.as_slice() {
        let iops = |r: &vfblk_lab::bench::BenchRow| r.report["iops"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  ratio mem backend / qemu-storage-daemon: {:.2}x",
            iops(ours) / iops(qsd)
        );
        println!(
            "  ratio file backend / qemu-storage-daemon: {:.2}x",
            iops(ours_file) / iops(qsd)
        );
    }
    println!("  load generator: {loadgen_cmd}");
    for r in &rows {
        println!("  backend: {}", r.backend_command);
    }
    Ok(())
}
