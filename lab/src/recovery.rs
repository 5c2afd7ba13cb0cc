//! The recovery demonstration: the bridge serves a disk to the lab guest over vhost-user-blk
//! (QEMU `vhost-user-blk-pci` with `reconnect=1`), fio in the guest writes and verifies, and
//! the host kills the bridge with SIGKILL mid-run and starts it again. fio must finish with
//! exit status 0 and no verify error.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::process::start_bridge;
use crate::scenario::{Contents, Lab, VFIO_PROBE_SCRIPT};
use crate::vm::{self, Echo, Limits, RetriedRun, Run, VhostUserBlk};
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
    /// Run the bridge under `vfblk-keeper` with the fd store: kills are recovered without
    /// QEMU reconnecting, and `upgrades` hand-overs happen too (before the kills, one
    /// event every 1.5 s alternating). Without it, kills go through QEMU's reconnect.
    pub keeper: bool,
    /// Upgrades by hand-over (`vfblk-rpc upgrade`) while fio runs (with `keeper`).
    pub upgrades: u32,
    /// QEMU offers packed virtqueues (`packed=on`); the guest's features record says
    /// whether they were negotiated ([`packed_negotiated`]).
    pub packed: bool,
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
    /// Upgrades done, with the pause each reported (ms).
    pub upgrade_pauses_ms: Vec<f64>,
    /// Frontend connections the bridge accepted over the whole run, when it knows (with
    /// `keeper`): 1 means QEMU never reconnected.
    pub connections: Option<u64>,
    /// Lines QEMU wrote to its stderr about the vhost-user connection (lost connections,
    /// failed messages, reconnect attempts).
    pub qemu_vhost_lines: Vec<String>,
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
record "{{\"virtio_features\": \"$(cat /sys/block/vda/device/features)\"}}"
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

/// Whether the guest's virtio-blk driver negotiated packed virtqueues
/// (`VIRTIO_F_RING_PACKED`, bit 34 of the features string the guest recorded from
/// `/sys/block/vda/device/features`); `None` without that record.
pub fn packed_negotiated(run: &vm::Run) -> Option<bool> {
    let features = run.record("virtio_features")?.as_str()?;
    features.as_bytes().get(34).map(|&b| b == b'1')
}

/// Requests the bridges of a log ran again from the inflight region (their recovery lines:
/// "queue N: recovered from the inflight region: used idx U, avail idx A, R request(s) to
/// run again, ...").
pub fn requests_run_again(bridge_log: &str) -> u64 {
    bridge_log
        .lines()
        .filter(|l| l.contains("recovered from the inflight region"))
        .filter_map(|l| {
            // The count ends its clause; a packed ring's line may end its message with it
            // (the log's fields follow).
            l.split(", ").find_map(|part| {
                part.find(" request(s) to run again")
                    .map(|end| &part[..end])
            })
        })
        .filter_map(|n| n.parse::<u64>().ok())
        .sum()
}

/// The guest's progress as the host's event thread sees it.
pub struct GuestProgress {
    fio_started: AtomicBool,
    fio_done: AtomicBool,
    finished: AtomicBool,
}

impl GuestProgress {
    /// Waits until fio runs in the guest; false if the guest finished first.
    pub fn wait_for_fio(&self) -> bool {
        while !self.fio_started.load(Ordering::Acquire) {
            if self.finished() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The guest run has ended.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// fio still runs: an event now lands on its I/O (one after it would wait for a
    /// frontend that is shutting down).
    pub fn fio_running(&self) -> bool {
        self.fio_started.load(Ordering::Acquire)
            && !self.fio_done.load(Ordering::Acquire)
            && !self.finished()
    }
}

/// Runs the demo's guest while `events` acts on the host from a thread of its own (it
/// learns from [`GuestProgress`] when fio started and when the guest is done).
fn run_guest_with<F>(lab: &Lab, spec_vm: &vm::VmSpec, events: F) -> Result<RetriedRun>
where
    F: FnOnce(&GuestProgress) -> Result<()> + Send,
{
    let progress = GuestProgress {
        fio_started: AtomicBool::new(false),
        fio_done: AtomicBool::new(false),
        finished: AtomicBool::new(false),
    };
    std::thread::scope(|scope| -> Result<RetriedRun> {
        let host = scope.spawn(|| events(&progress));
        let limits = Limits {
            boot: Duration::from_secs(90),
            total: Duration::from_secs(600),
        };
        let mut on_step = |step: &str| {
            if step.starts_with("fio running") {
                progress.fio_started.store(true, Ordering::Release);
            }
            if step.starts_with("fio finished") {
                progress.fio_done.store(true, Ordering::Release);
            }
        };
        let result = vm::run_watching(
            spec_vm,
            limits,
            &lab.dir.join("console.log"),
            Echo::Steps,
            &mut on_step,
        );
        progress.finished.store(true, Ordering::Release);
        host.join()
            .map_err(|_| LabError::Setup("the host's event thread panicked".into()))??;
        result.map(|run| RetriedRun {
            run,
            tries: 1,
            stalled: Vec::new(),
        })
    })
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
        qemu10: false,
        boot_disk: false,
        qsd: false,
    };
    let initrd = lab.l2_image(&guest_script(opts.vfio_probe, opts.fio_mib), contents)?;
    let disk = lab.disk("nvme.img", 256)?;
    let mut spec_vm = lab.l2_spec(&initrd, &disk);
    spec_vm.qemu = opts.qemu.clone();
    spec_vm.vhost_user_blk.push(VhostUserBlk {
        socket: socket.clone(),
        num_queues: 1,
        queue_size: None,
        packed: opts.packed,
    });

    let hold = opts.hold_completions_ms.to_string();
    let mut bridge_args = vec!["--backend", spec.as_str()];
    if opts.hold_completions_ms > 0 {
        bridge_args.extend(["--test-delay-ms", hold.as_str()]);
    }
    if opts.keeper {
        return kept_demo(
            lab,
            opts,
            &spec_vm,
            &socket,
            &log,
            &bridge_args,
            spec.clone(),
        );
    }
    let _ram_disk = RemoveOnDrop(ram_disk_path(opts, &spec));
    let bridge = Mutex::new(StopOnDrop::killed(start_bridge(
        &lab.bin_dir,
        &socket,
        &bridge_args,
        &log,
    )?));
    let kills = AtomicU32::new(0);
    let run = run_guest_with(lab, &spec_vm, |progress| -> Result<()> {
        if !progress.wait_for_fio() {
            return Ok(());
        }
        for _ in 0..opts.kills {
            std::thread::sleep(Duration::from_millis(1500));
            if !progress.fio_running() {
                break;
            }
            let mut guard = bridge.lock().unwrap_or_else(|e| e.into_inner());
            let child = guard.child();
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
    })?;
    drop(bridge);
    let (backend, log_text) = demo_leftovers(opts, spec, &log);
    let resubmitted = requests_run_again(&log_text);
    Ok(DemoOutcome {
        kills: kills.load(Ordering::Acquire),
        backend,
        bridge_log: log,
        resubmitted,
        upgrade_pauses_ms: Vec::new(),
        connections: None,
        qemu_vhost_lines: vm::qemu_vhost_lines(&run.run.log),
        run,
    })
}

/// What a demo started, stopped however the demo ends (a failing run must not leave a
/// target serving or a keeper restarting it).
struct StopOnDrop {
    child: std::process::Child,
    /// SIGTERM and a bounded wait (the keeper stops its target cleanly), else SIGKILL.
    terminate: bool,
}

impl StopOnDrop {
    fn killed(child: std::process::Child) -> Self {
        Self {
            child,
            terminate: false,
        }
    }

    fn terminated(child: std::process::Child) -> Self {
        Self {
            child,
            terminate: true,
        }
    }

    fn child(&mut self) -> &mut std::process::Child {
        &mut self.child
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        if self.terminate {
            // SAFETY: SIGTERM to a child of ours that has not been reaped.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(70);
            while std::time::Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            tracing::warn!("the demo's keeper did not stop within 70 s of SIGTERM; killing it");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file removed however the demo ends.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The RAM disk's file, for the mem backend.
fn ram_disk_path(opts: &DemoOptions, spec: &str) -> Option<PathBuf> {
    matches!(opts.backend, DemoBackend::Mem)
        .then(|| PathBuf::from(spec.trim_start_matches("mem:").trim_end_matches(":256M")))
}

/// After a demo: the bridge's log, and its backend's description from it (`spec` when it
/// logged none).
fn demo_leftovers(_opts: &DemoOptions, spec: String, log: &Path) -> (String, String) {
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    let backend = log_text
        .lines()
        .find_map(|l| l.split_once("serving ").map(|(_, rest)| rest))
        .map(|l| l.split(" on ").next().unwrap_or(l).to_string())
        .unwrap_or(spec);
    (backend, log_text)
}

/// `vfblk-rpc` against the demo's target: its JSON result.
fn rpc(lab: &Lab, rpc_socket: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = std::process::Command::new(lab.bin_dir.join("vfblk-rpc"))
        .arg("--socket")
        .arg(rpc_socket)
        .arg("--json")
        .args(args)
        .output()?;
    if !out.status.success() {
        return Err(LabError::Setup(format!(
            "vfblk-rpc {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| LabError::Setup(format!("vfblk-rpc {}: not JSON: {e}", args.join(" "))))
}

/// The target's pid and its controller's accepted connections, once it answers again.
fn serving(lab: &Lab, rpc_socket: &Path) -> Result<(i32, u64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(stats) = rpc(lab, rpc_socket, &["stats"]) {
            let pid = stats["pid"].as_i64().unwrap_or(0) as i32;
            let c = &stats["controllers"][0];
            if pid > 0 && c["connected"] == true {
                return Ok((pid, c["connections"].as_u64().unwrap_or(0)));
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(LabError::Setup(
                "the target did not serve its frontend again within 20 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the target serves its frontend again after an event, unless the guest ends
/// meanwhile (its QEMU then never connects again, and there is nothing left to wait for).
fn serving_unless_done(lab: &Lab, rpc_socket: &Path, progress: &GuestProgress) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(stats) = rpc(lab, rpc_socket, &["stats"]) {
            if stats["pid"].as_i64().unwrap_or(0) > 0
                && stats["controllers"][0]["connected"] == true
            {
                return Ok(());
            }
        }
        if progress.finished() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(LabError::Setup(
                "the target did not serve its frontend again within 20 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The serving target's pid, once it reports several requests in flight (tried for up to
/// 2 s, then as it is): a kill right after lands on requests the target has taken, which
/// the demo exists to show. (Between two batches of the guest's, TCG-slow, none may be in
/// flight.) The samples go over one RPC connection, not a `vfblk-rpc` process each: a
/// process start between the sample and the kill took long enough, once, for every request
/// seen to complete.
fn serving_with_requests_in_flight(lab: &Lab, rpc_socket: &Path) -> Result<i32> {
    use std::io::{BufRead, Write};
    /// Requests in flight that make a kill worth it: a few, so that some are still out
    /// after the microseconds to the kill.
    const ENOUGH: u64 = 4;
    let (pid, _) = serving(lab, rpc_socket)?;
    let mut stream = std::os::unix::net::UnixStream::connect(rpc_socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut answers = std::io::BufReader::new(stream.try_clone()?);
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut line = String::new();
    let mut most = 0;
    while std::time::Instant::now() < deadline {
        stream.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"stats\"}\n")?;
        line.clear();
        answers.read_line(&mut line)?;
        let answer: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| LabError::Setup(format!("stats over RPC: not JSON: {e}")))?;
        let in_flight = answer["result"]["controllers"][0]["in_flight"]
            .as_u64()
            .unwrap_or(0);
        if in_flight >= ENOUGH {
            return Ok(pid);
        }
        most = most.max(in_flight);
        std::thread::sleep(Duration::from_millis(1));
    }
    tracing::warn!(
        "[host] fewer than {ENOUGH} requests in flight for 2 s (at most {most}); killing anyway"
    );
    Ok(pid)
}

/// The demo with the bridge under `vfblk-keeper`: upgrades and SIGKILLs, no reconnect.
fn kept_demo(
    lab: &Lab,
    opts: &DemoOptions,
    spec_vm: &vm::VmSpec,
    socket: &Path,
    log: &Path,
    bridge_args: &[&str],
    spec: String,
) -> Result<DemoOutcome> {
    let rpc_socket = lab.dir.join("rpc.sock");
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = std::process::Command::new(lab.bin_dir.join("vfblk-keeper"));
    command
        .arg("--dir")
        .arg(lab.dir.join("keep"))
        .arg("--json")
        .arg("--")
        .arg(lab.bin_dir.join("vfblk-bridge"))
        .arg("--socket")
        .arg(socket)
        .args(bridge_args)
        .arg("--rpc")
        .arg(&rpc_socket)
        .stdout(std::process::Stdio::piped())
        .stderr(log_file);
    let _ram_disk = RemoveOnDrop(ram_disk_path(opts, &spec));
    let keeper = StopOnDrop::terminated(crate::process::spawn_listening(
        command,
        socket,
        crate::process::LISTEN_TIMEOUT,
    )?);
    let kills = AtomicU32::new(0);
    let pauses = Mutex::new(Vec::new());
    let run = run_guest_with(lab, spec_vm, |progress| -> Result<()> {
        if !progress.wait_for_fio() {
            return Ok(());
        }
        let (mut upgrades, mut killed) = (0, 0);
        while upgrades < opts.upgrades || killed < opts.kills {
            std::thread::sleep(Duration::from_millis(1500));
            if !progress.fio_running() {
                break;
            }
            let upgrade_next =
                upgrades < opts.upgrades && (upgrades <= killed || killed >= opts.kills);
            if upgrade_next {
                let report = rpc(lab, &rpc_socket, &["upgrade"])?;
                let pause = report["pause_ms"].as_f64().unwrap_or(f64::NAN);
                tracing::info!(
                    "[host] upgraded by hand-over: pid {} -> {}, the target paused {pause:.2} ms; QEMU's connection stays open",
                    report["old_pid"],
                    report["new_pid"]
                );
                pauses.lock().unwrap_or_else(|e| e.into_inner()).push(pause);
                upgrades += 1;
            } else {
                let pid = serving_with_requests_in_flight(lab, &rpc_socket)?;
                // SAFETY: SIGKILL to the target process this demo runs.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed += 1;
                kills.store(killed, Ordering::Release);
                tracing::info!(
                    "[host] target pid {pid} killed with SIGKILL; vfblk-keeper starts it again with the connection it held"
                );
            }
            serving_unless_done(lab, &rpc_socket, progress)?;
        }
        Ok(())
    })?;
    // Accepted connections as the last process counts them: it resumed the first one (1),
    // and each reconnect would have added one.
    let connections = rpc(lab, &rpc_socket, &["stats"])
        .ok()
        .and_then(|s| s["controllers"][0]["connections"].as_u64());
    // SIGTERM: the keeper stops the target cleanly.
    drop(keeper);
    let (backend, log_text) = demo_leftovers(opts, spec, log);
    Ok(DemoOutcome {
        kills: kills.load(Ordering::Acquire),
        backend,
        bridge_log: log.to_path_buf(),
        resubmitted: requests_run_again(&log_text),
        upgrade_pauses_ms: pauses.into_inner().unwrap_or_else(|e| e.into_inner()),
        connections,
        qemu_vhost_lines: vm::qemu_vhost_lines(&run.run.log),
        run,
    })
}

/// What [`run_resize`] saw.
pub struct ResizeOutcome {
    /// The guest's run (records `size_before`, `size_after`, `tail_ok`, `dmesg`).
    pub run: RetriedRun,
    /// What `backend_resize` answered.
    pub report: serde_json::Value,
    /// Frontends the target accepted in all (1: QEMU never reconnected).
    pub connections: Option<u64>,
    /// QEMU's vhost-user lines on stderr.
    pub qemu_vhost_lines: Vec<String>,
}

/// The guest of [`run_resize`]: reports the disk's size, waits (up to 2 minutes) for it to
/// change, then writes and reads back the new last block.
fn resize_script() -> String {
    r#". /lab/lib.sh
modprobe virtio_pci && modprobe virtio_blk || fail "modprobe virtio"
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no vhost-user-blk disk (/dev/vda)"
before=$(cat /sys/block/vda/size)
record "{\"size_before\": $before}"
step "size before the resize: $before sectors"
after=$before
for i in $(seq 1 1200); do after=$(cat /sys/block/vda/size); [ "$after" != "$before" ] && break; sleep 0.1; done
record "{\"size_after\": $after}"
step "size after the resize: $after sectors"
[ "$after" != "$before" ] || fail "the disk never changed size"
last=$((after / 8 - 1))
dd if=/dev/urandom of=/tmp/tail bs=4096 count=1 2>/dev/null
dd if=/tmp/tail of=/dev/vda bs=4096 seek=$last count=1 conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; fail "writing the new last block"; }
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 skip=$last count=1 2>/tmp/dd.err || { cat /tmp/dd.err; fail "reading the new last block"; }
cmp /tmp/tail /tmp/back || fail "the new last block did not read back"
record "{\"tail_ok\": 1}"
line=$(dmesg | grep -i "new size" | tail -n 1 | tr -d '"\\')
record "{\"dmesg\": \"$line\"}"
"#
    .to_string()
}

/// Online resize as a guest sees it: the target serves a 64 MiB RAM disk to the lab guest
/// (QEMU `vhost-user-blk-pci`); once the guest has read `/sys/block/vda/size`, the host
/// grows the backend to 128 MiB by RPC, and the guest must see the new size (a virtio
/// config interrupt after QEMU got BACKEND_CONFIG_CHANGE_MSG) with no reconnect, and use
/// the new last block.
pub fn run_resize(lab: &Lab, qemu: crate::qemu::Qemu) -> Result<ResizeOutcome> {
    let socket = lab.dir.join("blk.sock");
    let rpc_socket = lab.dir.join("rpc.sock");
    let log = lab.dir.join("bridge.log");
    let disk = format!("/dev/shm/vfblk-lab-resize-{}", std::process::id());
    let spec = format!("mem:{disk}:64M");
    let contents = Contents {
        fio: false,
        nested: false,
        qemu10: false,
        boot_disk: false,
        qsd: false,
    };
    let initrd = lab.l2_image(&resize_script(), contents)?;
    let nvme = lab.disk("nvme.img", 16)?;
    let mut spec_vm = lab.l2_spec(&initrd, &nvme);
    spec_vm.qemu = qemu;
    spec_vm.vhost_user_blk.push(VhostUserBlk {
        socket: socket.clone(),
        num_queues: 1,
        queue_size: None,
        packed: false,
    });
    let rpc_arg = rpc_socket.to_string_lossy().into_owned();
    let mut bridge = start_bridge(
        &lab.bin_dir,
        &socket,
        &["--backend", spec.as_str(), "--rpc", rpc_arg.as_str()],
        &log,
    )?;
    let sized = AtomicBool::new(false);
    let finished = AtomicBool::new(false);
    let report = Mutex::new(serde_json::Value::Null);
    let run = std::thread::scope(|scope| -> Result<Run> {
        let host = scope.spawn(|| -> Result<()> {
            while !sized.load(Ordering::Acquire) {
                if finished.load(Ordering::Acquire) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let r = rpc(lab, &rpc_socket, &["backend-resize", "disk", "128M"])?;
            tracing::info!("[host] backend_resize: {r}");
            *report.lock().unwrap_or_else(|e| e.into_inner()) = r;
            Ok(())
        });
        let limits = Limits {
            boot: Duration::from_secs(90),
            total: Duration::from_secs(400),
        };
        let mut on_step = |step: &str| {
            if step.starts_with("size before the resize") {
                sized.store(true, Ordering::Release);
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
        host.join()
            .map_err(|_| LabError::Setup("the host's event thread panicked".into()))??;
        result
    });
    let connections = rpc(lab, &rpc_socket, &["stats"])
        .ok()
        .and_then(|s| s["controllers"][0]["connections"].as_u64());
    let _ = bridge.kill();
    let _ = bridge.wait();
    let _ = std::fs::remove_file(&disk);
    let run = run?;
    Ok(ResizeOutcome {
        qemu_vhost_lines: vm::qemu_vhost_lines(&run.log),
        run: RetriedRun {
            run,
            tries: 1,
            stalled: Vec::new(),
        },
        report: report.into_inner().unwrap_or_else(|e| e.into_inner()),
        connections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_run_again_are_summed_from_the_recovery_lines_only() {
        let log = "\
2026-11-24T22:17:03Z  INFO queue 0: recovered from the inflight region: used idx 5335, avail idx 5337, 2 request(s) to run again, 0 published but not cleared queue=0
2026-11-24T22:17:03Z  INFO queue 1 started with 128 entries, 7 request(s) to run again
2026-11-24T22:17:06Z  INFO queue 1: recovered from the inflight region: used idx 9, avail idx 12, 3 request(s) to run again, 1 published but not cleared queue=1
2026-12-07T14:20:01Z  INFO queue 0: packed ring recovered from the inflight region: used at 32778, avail at 32790, 4 request(s) to run again queue=0 resubmit=4
2026-12-07T14:20:02Z  INFO queue 1: packed ring recovered from the inflight region: used at 7, avail at 9, 1 request(s) to run again, a published batch committed queue=1 resubmit=1
";
        assert_eq!(requests_run_again(log), 10);
        assert_eq!(requests_run_again(""), 0);
    }
}
