//! The recovery demonstration: the bridge serves a disk to the lab guest over vhost-user-blk
//! (QEMU `vhost-user-blk-pci` with `reconnect=1`), fio in the guest writes and verifies, and
//! the host kills the bridge with SIGKILL mid-run and starts it again. fio must finish with
//! exit status 0 and no verify error.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::process::start_bridge;
use crate::scenario::{Contents, Lab, VFIO_PROBE_SCRIPT};
use crate::vm::{self, Echo, Limits, RetriedRun, VhostUserBlk};
use crate::{LabError, Result};

/// Which backend the bridge serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoBackend {
    /// A RAM disk in /dev/shm.
    Mem,
    /// A file in the run directory, through io_uring.
    File,
}

/// What to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Backend.
    pub backend: DemoBackend,
    /// SIGKILLs while fio runs.
    pub kills: u32,
    /// Also bind the NVMe controller to vfio-pci and probe it (the lab's first demo).
    pub vfio_probe: bool,
    /// MiB fio writes (then verifies).
    pub fio_mib: u32,
    /// Hold each completion up to this many ms in the bridge (`--test-delay-ms`, as a busy
    /// disk would), so that the kills land on requests the bridge has taken and the restart
    /// must run them again; 0 for the backend's own speed.
    pub hold_completions_ms: u32,
    /// The QEMU that runs the guest (and reconnects to the bridge).
    pub qemu: crate::qemu::Qemu,
}

/// What happened.
pub struct DemoOutcome {
    /// The guest run.
    pub run: RetriedRun,
    /// SIGKILLs done.
    pub kills: u32,
    /// The bridge's description of its backend.
    pub backend: String,
    /// The bridge's log.
    pub bridge_log: PathBuf,
    /// How many requests the restarted bridges ran again from the inflight region.
    pub resubmitted: u64,
}

/// The guest's part: optionally the VFIO probe, then fio on the vhost-user-blk disk.
pub fn guest_script(vfio_probe: bool, fio_mib: u32) -> String {
    let probe = if vfio_probe {
        VFIO_PROBE_SCRIPT
    } else {
        ". /lab/lib.sh\n"
    };
    format!(
        r#"{probe}
modprobe virtio_pci && modprobe virtio_blk || fail "modprobe virtio"
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no vhost-user-blk disk (/dev/vda)"
step "fio running: 4 KiB random writes with crc32c verify on /dev/vda (vhost-user-blk), {fio_mib} MiB"
fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size={fio_mib}M --verify=crc32c --verify_fatal=1 --do_verify=1 --output-format=json > /tmp/fio.json 2>/tmp/fio.err
rc=$?
step "fio finished with exit status $rc"
record "{{\"fio_exit\": $rc}}"
record "{{\"fio\": $(tr -d '\n' < /tmp/fio.json)}}"
[ $rc = 0 ] || {{ cat /tmp/fio.err; fail "fio exited with $rc"; }}
"#
    )
}

/// Requests the bridges of a log ran again from the inflight region (their recovery lines:
/// "queue N: recovered from the inflight region: used idx U, R request(s) to run again, ...").
pub fn requests_run_again(bridge_log: &str) -> u64 {
    bridge_log
        .lines()
        .filter_map(|l| l.split(", ").nth(1))
        .filter_map(|part| part.strip_suffix(" request(s) to run again"))
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// Runs the demonstration.
pub fn run_demo(lab: &Lab, opts: &DemoOptions) -> Result<DemoOutcome> {
    let socket = lab.dir.join("blk.sock");
    let log = lab.dir.join("bridge.log");
    let spec = match opts.backend {
        DemoBackend::Mem => format!("mem:/dev/shm/vfblk-lab-demo-{}:256M", std::process::id()),
        DemoBackend::File => format!("file:{}:256M", lab.dir.join("vhost-disk.img").display()),
    };
    let contents = Contents {
        fio: true,
        nested: false,
    };
    let initrd = lab.l2_image(&guest_script(opts.vfio_probe, opts.fio_mib), contents)?;
    let disk = lab.disk("nvme.img", 256)?;
    let mut spec_vm = lab.l2_spec(&initrd, &disk);
    spec_vm.qemu = opts.qemu.clone();
    spec_vm.vhost_user_blk.push(VhostUserBlk {
        socket: socket.clone(),
        num_queues: 1,
        queue_size: None,
    });

    let hold = opts.hold_completions_ms.to_string();
    let mut bridge_args = vec!["--backend", spec.as_str()];
    if opts.hold_completions_ms > 0 {
        bridge_args.extend(["--test-delay-ms", hold.as_str()]);
    }
    let bridge = Mutex::new(start_bridge(&lab.bin_dir, &socket, &bridge_args, &log)?);
    let fio_started = AtomicBool::new(false);
    let finished = AtomicBool::new(false);
    let kills = AtomicU32::new(0);
    let run = std::thread::scope(|scope| -> Result<RetriedRun> {
        let killer = scope.spawn(|| -> Result<()> {
            while !fio_started.load(Ordering::Acquire) {
                if finished.load(Ordering::Acquire) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            for _ in 0..opts.kills {
                std::thread::sleep(Duration::from_millis(1500));
                if finished.load(Ordering::Acquire) {
                    break;
                }
                let mut child = bridge.lock().unwrap_or_else(|e| e.into_inner());
                child.kill()?;
                child.wait()?;
                kills.fetch_add(1, Ordering::AcqRel);
                tracing::info!(
                    "[host] bridge killed with SIGKILL ({} so far); starting it again in 0.5 s",
                    kills.load(Ordering::Acquire)
                );
                std::thread::sleep(Duration::from_millis(500));
                *child = start_bridge(&lab.bin_dir, &socket, &bridge_args, &log)?;
            }
            Ok(())
        });
        let limits = Limits {
            boot: Duration::from_secs(90),
            total: Duration::from_secs(600),
        };
        let mut on_step = |step: &str| {
            if step.starts_with("fio running") {
                fio_started.store(true, Ordering::Release);
            }
        };
        let result = vm::run_watching(
            &spec_vm,
            limits,
            &lab.dir.join("console.log"),
            Echo::Steps,
            &mut on_step,
        );
        finished.store(true, Ordering::Release);
        killer
            .join()
            .map_err(|_| LabError::Setup("killer thread panicked".into()))??;
        result.map(|run| RetriedRun {
            run,
            tries: 1,
            stalled: Vec::new(),
        })
    })?;
    {
        let mut child = bridge.lock().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
    if let DemoBackend::Mem = opts.backend {
        let _ = std::fs::remove_file(spec.trim_start_matches("mem:").trim_end_matches(":256M"));
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let resubmitted = requests_run_again(&log_text);
    let backend = log_text
        .lines()
        .find_map(|l| l.split_once("serving ").map(|(_, rest)| rest))
        .map(|l| l.split(" on ").next().unwrap_or(l).to_string())
        .unwrap_or(spec);
    Ok(DemoOutcome {
        run,
        kills: kills.load(Ordering::Acquire),
        backend,
        bridge_log: log,
        resubmitted,
    })
}

/// fio's figures from its JSON: (writes, reads, longest completion latency in ms, errors).
pub fn fio_summary(fio: &serde_json::Value) -> (u64, u64, f64, u64) {
    let job = &fio["jobs"][0];
    let ios = |dir: &str| job[dir]["total_ios"].as_u64().unwrap_or(0);
    let max_ms = |dir: &str| job[dir]["clat_ns"]["max"].as_f64().unwrap_or(0.0) / 1e6;
    (
        ios("write"),
        ios("read"),
        max_ms("write").max(max_ms("read")),
        job["error"].as_u64().unwrap_or(0),
    )
}
