//! Live migration in the lab: a lab guest whose disk is a vhost-user-blk device moves from
//! one QEMU process to another and back, each QEMU served by a vhost-user target process of
//! its own, all of them on one shared disk file (two hosts sharing storage, on one machine).
//!
//! The guest (TCG, no NVMe, no IOMMU: QEMU's emulated NVMe cannot migrate) runs two things
//! at once on its one disk: fio randrw with crc32c verify on the first half, and
//! `vfblk-readcheck` on the second, which reads stamped regions into one buffer that only
//! the device writes and checks every word of it (see `lab/src/bin/vfblk-readcheck.rs`): a
//! migration that stops the VM between a read and its check makes the destination check
//! what the source's device wrote, which arrives only if the source's target logged that
//! DMA in the vhost-user dirty log.
//!
//! The host drives QEMU over QMP: the source's RAM goes at a capped bandwidth for a slow
//! phase (so that the migration lasts long enough for things to happen during it), then
//! the cap is lifted and the migration converges. The guest's console continues on the
//! destination: the serial output of every QEMU of the run feeds one console, in order, so
//! the guest's lines are read wherever it runs. Every process has a deadline and is killed
//! (by its pid, only ours) on every way out; sockets are removed.
//!
//! The same harness runs inside the lab guest ([`run_nvme_migration`], `vfblk-lab
//! nested-migrate`): there the NVMe backend serves the disk, on two controllers of one
//! NVM subsystem sharing a namespace, each owned by a bridge of its own, and the migrating
//! guest is a second-level guest under the lab guest's KVM.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::initramfs::Initramfs;
use crate::initramfs::MARK;
use crate::qemu::Qemu;
use crate::scenario::Lab;
use crate::vm::{VhostUserBlk, VmSpec};
use crate::{LabError, Result};

/// The shared disk's size (MiB): fio uses the first half, `vfblk-readcheck` the second.
pub const DISK_MIB: u32 = 256;
/// Where fio's range ends (MiB).
pub const FIO_MIB: u32 = 128;
/// Where `vfblk-readcheck`'s regions start (MiB).
pub const READCHECK_OFFSET_MIB: u32 = 128;
// fio and the readcheck never touch the same block.
const _: () = assert!(READCHECK_OFFSET_MIB >= FIO_MIB);
/// The guest's step when fio and `vfblk-readcheck` run.
pub const WORKLOAD_STEP: &str = "workload running";
/// fio's latency log window (ms): each entry is the longest completion in it.
pub const CLAT_WINDOW_MS: u64 = 250;

/// Which vhost-user target serves the disk on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// qemu-storage-daemon's vhost-user-blk export (libvhost-user logs its writes): the
    /// harness's reference.
    Qsd,
    /// `vfblk-bridge --backend file:` (io_uring, O_DIRECT into guest RAM).
    Bridge,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// The QEMU of every side.
    pub qemu: Qemu,
    /// The targets.
    pub target: TargetKind,
    /// The source targets of both migrations (A1 and B) run with `--test-skip-dirty-log`
    /// (a bridge built with the `test-delay` feature: it takes the log and never marks the
    /// data it writes into guest buffers, only rings and status bytes, so the guest's
    /// kernel survives to read stale data): the negative control, with two chances to be
    /// caught.
    pub sources_skip_dirty_log: bool,
    /// The first source target runs under `vfblk-keeper`, and is upgraded by hand-over
    /// (`vfblk-rpc upgrade`) and then killed with SIGKILL while the first migration runs.
    pub keeper_events: bool,
    /// The migration's bandwidth cap (bytes/s) during its slow phase.
    pub slow_bandwidth: u64,
    /// How long each migration runs under the cap before it is lifted.
    pub slow_phase: Duration,
    /// How long fio and `vfblk-readcheck` run in the guest (both migrations must fit).
    pub workload_s: u32,
    /// The disk is this RBD image (a `vfblk-bridge` backend spec, `rbd:POOL/IMAGE,...`, of
    /// [`DISK_MIB`]) instead of the shared file: both sides' targets open it, and the
    /// image's exclusive lock follows the writes (librbd hands it over from the live source
    /// at the destination's first write).
    pub rbd: Option<String>,
    /// Guest RAM (MiB).
    pub memory_mib: u64,
    /// `vfblk-readcheck` regions.
    pub regions: u32,
    /// MiB per region.
    pub region_mib: u32,
    /// `vfblk-readcheck verify --hold-ms`: the pause between a read and its check.
    pub hold_ms: u32,
    /// `vfblk-readcheck verify --below-mib`: its buffer in the lower part of guest RAM,
    /// which the migration's first pass sends well before the VM stops.
    pub buffer_below_mib: u64,
    /// Seconds from the workload's start to the first migration, and from the end of the
    /// first to the start of the second.
    pub settle_s: u64,
    /// fio runs beside `vfblk-readcheck` (off: the readcheck alone, for a small nested
    /// guest).
    pub fio: bool,
}

impl MigrationOptions {
    /// The standard run: 8 MiB/s for 8 s per migration, 1 GiB of guest RAM, 8 regions of
    /// 8 MiB, a 34 s workload (both migrations end within about 26 s of its start).
    pub fn new(qemu: Qemu, target: TargetKind) -> Self {
        Self {
            qemu,
            target,
            sources_skip_dirty_log: false,
            keeper_events: false,
            slow_bandwidth: 8 << 20,
            slow_phase: Duration::from_secs(8),
            workload_s: 34,
            rbd: None,
            memory_mib: 1024,
            regions: 8,
            region_mib: 8,
            hold_ms: 100,
            buffer_below_mib: 512,
            settle_s: 2,
            fio: true,
        }
    }

    /// The nested run of [`run_nvme_migration`]: a second-level guest of 256 MiB under the
    /// lab guest's KVM runs `vfblk-readcheck` alone (4 regions of 4 MiB, its buffer below
    /// 128 MiB), migrated at 8 MiB/s for 5 s, then uncapped.
    pub fn nested() -> Self {
        Self {
            slow_phase: Duration::from_secs(5),
            workload_s: 40,
            memory_mib: 256,
            regions: 4,
            region_mib: 4,
            hold_ms: 200,
            buffer_below_mib: 128,
            settle_s: 3,
            fio: false,
            ..Self::new(Qemu::system(), TargetKind::Bridge)
        }
    }
}

/// The guest's test script: the regions stamped, then fio and `vfblk-readcheck` together
/// for `workload_s`, then their results as records (fio's latency log as the longest
/// completion per [`CLAT_WINDOW_MS`] window since fio began: `fio_clat_windows`).
pub fn guest_script(opts: &MigrationOptions) -> String {
    let t = opts.workload_s;
    let (regions, mib, hold) = (opts.regions, opts.region_mib, opts.hold_ms);
    let below = opts.buffer_below_mib;
    let end = READCHECK_OFFSET_MIB + regions * mib;
    let start = format!(
        r#". /lab/lib.sh
modprobe virtio_pci && modprobe virtio_blk || fail "modprobe virtio"
for i in $(seq 1 50); do [ -b /dev/vda ] && break; sleep 0.1; done
[ -b /dev/vda ] || fail "no vhost-user-blk disk (/dev/vda)"
seed=$(( $(date +%s) % 1000000 + 1 ))
layout="--device /dev/vda --offset-mib {READCHECK_OFFSET_MIB} --regions {regions} --region-mib {mib} --seed $seed"
step "readcheck: stamping {regions} regions of {mib} MiB from {READCHECK_OFFSET_MIB} MiB"
vfblk-readcheck write $layout || fail "vfblk-readcheck write"
"#
    );
    let readcheck = format!(
        r#"vfblk-readcheck verify $layout --seconds {t} --hold-ms {hold} --below-mib {below} --json > /tmp/readcheck.json 2>/tmp/readcheck.err
rc=$?
step "readcheck finished with exit status $rc"
record "{{\"readcheck_exit\": $rc}}"
[ -s /tmp/readcheck.json ] && record "{{\"readcheck\": $(cat /tmp/readcheck.json)}}"
"#
    );
    let readcheck_failed = r#"[ $rc = 0 ] || { cat /tmp/readcheck.json /tmp/readcheck.err; fail "vfblk-readcheck verify exited with $rc"; }
"#;
    if !opts.fio {
        return format!(
            "{start}step \"{WORKLOAD_STEP}: readcheck on {READCHECK_OFFSET_MIB}-{end} MiB, {t} s\"\n{readcheck}{readcheck_failed}"
        );
    }
    format!(
        r#"{start}step "{WORKLOAD_STEP}: fio randrw 4 KiB crc32c verify on 0-{FIO_MIB} MiB, readcheck on {READCHECK_OFFSET_MIB}-{end} MiB, {t} s"
fio --name=verify --filename=/dev/vda --offset=0 --size={FIO_MIB}M --ioengine=libaio --direct=1 --rw=randrw --bs=4k --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_backlog=256 --time_based --runtime={t} --write_lat_log=/tmp/lat --log_avg_msec={CLAT_WINDOW_MS} --log_max_value=1 --output-format=json > /tmp/fio.json 2>/tmp/fio.err &
fio_pid=$!
{readcheck}wait $fio_pid
frc=$?
step "fio finished with exit status $frc"
record "{{\"fio_exit\": $frc}}"
[ -s /tmp/fio.json ] && record "{{\"fio\": $(tr -d '\n' < /tmp/fio.json)}}"
clat=$(awk -F', *' '{{ t = int($1 / {CLAT_WINDOW_MS}) * {CLAT_WINDOW_MS}; if ($2 > m[t]) m[t] = $2 }} END {{ s = ""; for (t in m) s = s (s == "" ? "" : ",") "[" t "," sprintf("%.0f", m[t]) "]"; print "[" s "]" }}' /tmp/lat_clat.1.log 2>/dev/null)
record "{{\"fio_clat_windows\": ${{clat:-[]}}}}"
{readcheck_failed}[ $frc = 0 ] || {{ cat /tmp/fio.err; fail "fio exited with $frc"; }}
"#
    )
}

/// The guest's image: busybox, the virtio modules, fio and `vfblk-readcheck`, nothing
/// else (about 35 MB instead of the standard lab image's 300: the project's other binaries
/// would only be RAM every migration has to carry).
pub fn guest_image(lab: &Lab, script: &str) -> Result<PathBuf> {
    let mut image = Initramfs::new(&lab.kernel, crate::scenario::L3_MODULES, 0)?;
    image.add_program(Path::new("/usr/bin/fio"), "usr/bin/fio")?;
    image.add_program(
        &lab.bin_dir.join("vfblk-readcheck"),
        "lab/bin/vfblk-readcheck",
    )?;
    image.set_test_script(script);
    let path = lab.dir.join("migration.cpio");
    image.write(&path)?;
    Ok(path)
}

/// One migration.
#[derive(Debug, Clone, Default)]
pub struct Leg {
    /// "A1 -> B" and the like.
    pub name: String,
    /// `completed`, `failed`, `refused` (QEMU would not start it), `timed out`, `lost`
    /// (a QEMU went away).
    pub status: String,
    /// What QEMU said when it refused or failed.
    pub error: Option<String>,
    /// QEMU's `total-time` (ms).
    pub total_time_ms: Option<u64>,
    /// QEMU's `downtime` (ms).
    pub downtime_ms: Option<u64>,
    /// QEMU's `setup-time` (ms).
    pub setup_time_ms: Option<u64>,
    /// The last `query-migrate` answer.
    pub info: Value,
    /// Seconds from the workload's start (host clock) to the `migrate` command.
    pub started_s: f64,
    /// Seconds from the workload's start to the end (completed or not).
    pub ended_s: f64,
    /// The longest fio completion in latency-log windows overlapping the migration
    /// (0.5 s before to 1 s after), in ms.
    pub fio_clat_max_ms: Option<f64>,
    /// When (s into the migration) the downtime limit was raised because QEMU had not
    /// converged [`CONVERGE_WITHIN`] after the cap was lifted.
    pub forced_at_s: Option<f64>,
    /// What the host did during the migration, with the migration's status after each.
    pub events: Vec<Value>,
    /// The destination ran the guest after the migration (`query-status`).
    pub destination_running: bool,
}

impl Leg {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "status": self.status,
            "error": self.error,
            "total_time_ms": self.total_time_ms,
            "downtime_ms": self.downtime_ms,
            "setup_time_ms": self.setup_time_ms,
            "started_s": self.started_s,
            "ended_s": self.ended_s,
            "fio_clat_max_ms": self.fio_clat_max_ms,
            "destination_running": self.destination_running,
            "forced_at_s": self.forced_at_s,
            "events": self.events,
            "ram": self.info.get("ram"),
        })
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct MigrationOutcome {
    /// The QEMU.
    pub qemu: String,
    /// The targets' description.
    pub target: String,
    /// The migrations, in order.
    pub legs: Vec<Leg>,
    /// The test script's exit status, if it finished.
    pub guest_exit: Option<i32>,
    /// `@@VFBLK-FAIL` lines.
    pub failures: Vec<String>,
    /// `@@VFBLK-RECORD` payloads.
    pub records: Vec<Value>,
    /// What went wrong in the harness (deadlines, a QEMU gone), or leftovers found after it.
    pub problems: Vec<String>,
    /// Boots tried.
    pub tries: u32,
    /// Boot time of the first QEMU (s).
    pub boot_s: Option<f64>,
    /// The whole run (s).
    pub elapsed_s: f64,
    /// When the guest said its workload ended, from the workload's start (s): (readcheck,
    /// fio).
    pub workload_ended_s: (Option<f64>, Option<f64>),
    /// The guest's steps: seconds from the workload's start (negative before it), the QEMU
    /// that printed it, the text.
    pub steps: Vec<(f64, String, String)>,
    /// The guest's console (every QEMU's serial output in order).
    pub console: PathBuf,
    /// The targets' logs.
    pub target_logs: Vec<PathBuf>,
    /// Lines the QEMUs wrote on stderr, with the QEMU's name.
    pub qemu_stderr: Vec<String>,
    /// Warnings and errors in the targets' logs.
    pub target_warnings: Vec<String>,
    /// Frontend connections the kept target counted at the end of the first migration
    /// (with `keeper_events`): 1 means QEMU never reconnected.
    pub kept_connections: Option<u64>,
}

impl MigrationOutcome {
    /// The first record that has `key`.
    pub fn record(&self, key: &str) -> Option<&Value> {
        self.records.iter().find_map(|r| r.get(key))
    }

    /// The first guest step starting with `prefix`: (seconds from the workload's start, the
    /// QEMU that printed it, its text).
    pub fn step(&self, prefix: &str) -> Option<&(f64, String, String)> {
        self.steps.iter().find(|(_, _, s)| s.starts_with(prefix))
    }

    /// fio's figures: (writes, reads, longest completion in ms, error).
    pub fn fio_summary(&self) -> Option<(u64, u64, f64, u64)> {
        self.record("fio").map(crate::scenario::fio_summary)
    }

    /// Everything as JSON (the lab's structured result).
    pub fn to_json(&self) -> Value {
        let fio = self.record("fio");
        let job = fio.map(|f| &f["jobs"][0]);
        json!({
            "qemu": self.qemu,
            "target": self.target,
            "legs": self.legs.iter().map(Leg::to_json).collect::<Vec<_>>(),
            "guest_exit": self.guest_exit,
            "failures": self.failures,
            "problems": self.problems,
            "tries": self.tries,
            "boot_s": self.boot_s,
            "elapsed_s": self.elapsed_s,
            "workload_ended_s": [self.workload_ended_s.0, self.workload_ended_s.1],
            "steps": self.steps,
            "readcheck_exit": self.record("readcheck_exit"),
            "readcheck": self.record("readcheck"),
            "fio_exit": self.record("fio_exit"),
            "fio": job.map(|j| json!({
                "error": j["error"],
                "runtime_ms": j["job_runtime"],
                "reads": j["read"]["total_ios"],
                "writes": j["write"]["total_ios"],
                "read_clat_max_ms": j["read"]["clat_ns"]["max"].as_f64().map(|n| n / 1e6),
                "write_clat_max_ms": j["write"]["clat_ns"]["max"].as_f64().map(|n| n / 1e6),
            })),
            "kept_connections": self.kept_connections,
            "console": self.console,
            "target_logs": self.target_logs,
            "qemu_stderr": self.qemu_stderr,
            "target_warnings": self.target_warnings,
        })
    }

    /// One line per migration, for people.
    pub fn summary(&self) -> String {
        let mut s = format!("{} with {}:", self.qemu, self.target);
        for leg in &self.legs {
            s.push_str(&format!(
                "\n  {}: {}, total {} ms, downtime {} ms, fio's longest completion around it {} ms{}",
                leg.name,
                leg.status,
                leg.total_time_ms.map_or("-".into(), |v| v.to_string()),
                leg.downtime_ms.map_or("-".into(), |v| v.to_string()),
                leg.fio_clat_max_ms
                    .map_or("-".into(), |v| format!("{v:.1}")),
                leg.error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ({e})")),
            ));
            if let Some(at) = leg.forced_at_s {
                s.push_str(&format!(
                    " [not converged by itself: downtime limit raised at {at:.1} s]"
                ));
            }
        }
        if let Some((w, r, max, err)) = self.fio_summary() {
            s.push_str(&format!(
                "\n  fio: exit {}, {w} writes + {r} reads, error {err}, longest completion {max:.1} ms",
                self.record("fio_exit").unwrap_or(&Value::Null)
            ));
        }
        if let Some(rc) = self.record("readcheck") {
            s.push_str(&format!(
                "\n  readcheck: exit {}, {} round(s), mismatch {}",
                self.record("readcheck_exit").unwrap_or(&Value::Null),
                rc["rounds"],
                rc["mismatch"]
            ));
        }
        s
    }
}

// ---------------------------------------------------------------------------------------
// The guest's console, fed by every QEMU of the run.

#[derive(Default)]
struct GuestState {
    partial: Vec<u8>,
    booted: Option<Instant>,
    /// When, on which QEMU, what.
    steps: Vec<(Instant, String, String)>,
    records: Vec<Value>,
    failures: Vec<String>,
    exit: Option<i32>,
    panic: Option<String>,
}

/// The guest's serial console. Only one QEMU runs the guest at a time (the source stops
/// before the destination starts), so their outputs, appended as they come, are the
/// guest's output in order, a line cut by a migration included.
struct Console {
    state: Mutex<GuestState>,
    log: Mutex<File>,
    started: Instant,
}

impl Console {
    fn new(log: &Path) -> Result<Self> {
        Ok(Self {
            state: Mutex::new(GuestState::default()),
            log: Mutex::new(File::create(log)?),
            started: Instant::now(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuestState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn feed(&self, vm: &str, bytes: &[u8]) {
        let _ = self
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(bytes);
        let mut state = self.lock();
        for &b in bytes {
            if b != b'\n' {
                state.partial.push(b);
                continue;
            }
            let line = String::from_utf8_lossy(&state.partial)
                .trim_end()
                .to_string();
            state.partial.clear();
            self.line(&mut state, vm, &line);
        }
    }

    fn line(&self, state: &mut GuestState, vm: &str, line: &str) {
        if line
            .strip_prefix('[')
            .and_then(|rest| rest.split_once("] "))
            .is_some_and(|(_, msg)| msg.starts_with("Kernel panic - not syncing"))
        {
            state.panic = Some(line.to_string());
        }
        let Some(pos) = line.find(MARK) else { return };
        let tagged = &line[pos + MARK.len()..];
        let (tag, rest) = tagged.split_once(' ').unwrap_or((tagged, ""));
        match tag {
            "-BOOTED" => state.booted = Some(Instant::now()),
            "-STEP" => {
                tracing::info!(
                    "[{vm} {:>5.1}s] {rest}",
                    self.started.elapsed().as_secs_f64()
                );
                state
                    .steps
                    .push((Instant::now(), vm.to_string(), rest.to_string()));
            }
            "-RECORD" => match serde_json::from_str(rest) {
                Ok(v) => state.records.push(v),
                Err(e) => state
                    .failures
                    .push(format!("unparsable record {rest:?}: {e}")),
            },
            "-FAIL" => {
                tracing::warn!("[{vm}] guest failure: {rest}");
                state.failures.push(rest.to_string());
            }
            "-EXIT" => state.exit = rest.trim().parse().ok(),
            _ => {}
        }
    }

    /// When the guest printed a step starting with `prefix`.
    fn step(&self, prefix: &str) -> Option<Instant> {
        self.lock()
            .steps
            .iter()
            .find(|(_, _, s)| s.starts_with(prefix))
            .map(|(t, _, _)| *t)
    }
}

// ---------------------------------------------------------------------------------------
// QMP.

/// A QMP connection (one command at a time; events are skipped).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> std::result::Result<Self, String> {
        let stream = UnixStream::connect(path).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> std::result::Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Runs `command`: its `return`, or QEMU's error (`desc`) or a transport error.
    fn execute(&mut self, command: &str, arguments: Value) -> std::result::Result<Value, String> {
        let mut msg = json!({ "execute": command, "arguments": arguments }).to_string();
        msg.push('\n');
        self.writer
            .write_all(msg.as_bytes())
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let v = self.read().map_err(|e| format!("QMP {command}: {e}"))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e["desc"].as_str().unwrap_or("error").to_string());
            }
            // An event: skipped.
        }
    }
}

// ---------------------------------------------------------------------------------------
// The processes: QEMUs and targets, killed (ours only, by pid) when dropped.

/// Has the child sent `signal` when the thread that starts it ends (a test process killed
/// by its runner's timeout included), so that nothing of a run outlives its test.
fn die_with_us(command: &mut Command, signal: i32) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own attributes.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One QEMU process of the run.
struct Vm {
    name: String,
    child: Child,
    qmp: Option<Qmp>,
    qmp_path: PathBuf,
    stderr: PathBuf,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Vm {
    /// Starts QEMU with `spec`'s command line, a QMP socket, and `-incoming defer` for a
    /// destination; its serial output feeds `console` (and its own log).
    fn start(
        name: &str,
        spec: &VmSpec,
        dir: &Path,
        incoming: bool,
        console: &Arc<Console>,
    ) -> Result<Self> {
        let qmp_path = dir.join(format!("qmp-{name}.sock"));
        let _ = std::fs::remove_file(&qmp_path);
        let stderr = dir.join(format!("{name}.qemu-stderr"));
        let mut command = Command::new(&spec.qemu.binary);
        command
            .envs(spec.qemu.env.iter().map(|(k, v)| (k, v)))
            .args(&spec.qemu.args)
            .args(spec.args(false))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        if incoming {
            command.args(["-incoming", "defer"]);
        }
        die_with_us(&mut command, libc::SIGKILL);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr)?);
        let mut child = command.spawn().map_err(|e| {
            LabError::Setup(format!(
                "{name}: cannot start {}: {e}",
                spec.qemu.binary.display()
            ))
        })?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut own_log = File::create(dir.join(format!("console-{name}.log")))?;
        let feed = Arc::clone(console);
        let vm_name = name.to_string();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = own_log.write_all(&buf[..n]);
                        feed.feed(&vm_name, &buf[..n]);
                    }
                }
            }
        });
        let mut vm = Self {
            name: name.to_string(),
            child,
            qmp: None,
            qmp_path,
            stderr,
            reader: Some(reader),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match Qmp::connect(&vm.qmp_path) {
                Ok(qmp) => {
                    vm.qmp = Some(qmp);
                    return Ok(vm);
                }
                Err(e) => {
                    if let Ok(Some(status)) = vm.child.try_wait() {
                        return Err(LabError::Setup(format!(
                            "{name}: QEMU exited ({status}) before its QMP socket answered: {}",
                            crate::vm::tail(&vm.stderr, 10)
                        )));
                    }
                    if Instant::now() > deadline {
                        return Err(LabError::Setup(format!(
                            "{name}: QMP socket {} did not answer within 20 s: {e}",
                            vm.qmp_path.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    fn qmp(&mut self, command: &str, args: Value) -> std::result::Result<Value, String> {
        match self.qmp.as_mut() {
            Some(q) => q.execute(command, args),
            None => Err(format!("{}: no QMP connection", self.name)),
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops this QEMU: `quit` over QMP, then SIGKILL after 5 s.
    fn quit(&mut self) {
        if self.running() {
            let _ = self.qmp("quit", json!({}));
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    fn kill(&mut self) {
        if self.running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        self.qmp = None;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let _ = std::fs::remove_file(&self.qmp_path);
    }

    /// What it wrote on stderr, each line with its name.
    fn stderr_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .lines()
            .map(|l| format!("{}: {l}", self.name))
            .collect()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One vhost-user target process (under `vfblk-keeper` or not).
struct Target {
    name: String,
    socket: PathBuf,
    log: PathBuf,
    child: Child,
    /// The RPC socket of a kept bridge.
    rpc: Option<PathBuf>,
    /// Pids of the kept bridge processes seen (to kill, if the keeper does not stop them).
    pids: Vec<i32>,
}

impl Target {
    fn start(
        lab: &Lab,
        kind: TargetKind,
        name: &str,
        disk: &Path,
        backend: &str,
        skip_dirty_log: bool,
        keeper: bool,
    ) -> Result<Self> {
        let socket = lab.dir.join(format!("{name}.sock"));
        let log = lab.dir.join(format!("target-{name}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let bridge = lab.bin_dir.join("vfblk-bridge");
        let mut rpc = None;
        let mut command = match kind {
            TargetKind::Qsd if backend.starts_with("rbd:") => {
                return Err(LabError::Setup(
                    "the RBD disk is vfblk-bridge's in this harness".into(),
                ))
            }
            TargetKind::Qsd => {
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--blockdev")
                    .arg(format!(
                        "driver=file,filename={},node-name=d0,locking=off",
                        disk.display()
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path={},writable=on",
                        socket.display()
                    ));
                c
            }
            TargetKind::Bridge if keeper => {
                let rpc_socket = lab.dir.join(format!("rpc-{name}.sock"));
                let mut c = Command::new(lab.bin_dir.join("vfblk-keeper"));
                c.arg("--dir")
                    .arg(lab.dir.join(format!("keep-{name}")))
                    .arg("--json")
                    .arg("--")
                    .arg(&bridge)
                    .arg("--socket")
                    .arg(&socket)
                    .arg("--backend")
                    .arg(backend)
                    .arg("--rpc")
                    .arg(&rpc_socket);
                rpc = Some(rpc_socket);
                c
            }
            TargetKind::Bridge => {
                let mut c = Command::new(&bridge);
                c.arg("--socket").arg(&socket).arg("--backend").arg(backend);
                c
            }
        };
        if skip_dirty_log {
            if kind != TargetKind::Bridge {
                return Err(LabError::Setup(
                    "--test-skip-dirty-log is vfblk-bridge's switch".into(),
                ));
            }
            command.arg("--test-skip-dirty-log");
        }
        command
            .stdin(Stdio::null())
            .stdout(File::create(lab.dir.join(format!("target-{name}.stdout")))?)
            .stderr(log_file);
        // A keeper stops its target cleanly on SIGTERM; a lone target may be killed.
        die_with_us(
            &mut command,
            if keeper { libc::SIGTERM } else { libc::SIGKILL },
        );
        let child =
            crate::process::spawn_listening(command, &socket, crate::process::LISTEN_TIMEOUT)
                .map_err(|e| {
                    LabError::Setup(format!(
                        "target {name}: {e}; its log: {}",
                        crate::vm::tail(&log, 10)
                    ))
                })?;
        Ok(Self {
            name: name.to_string(),
            socket,
            log,
            child,
            rpc,
            pids: Vec::new(),
        })
    }

    /// `vfblk-rpc` on a kept target: its JSON answer.
    fn rpc(&self, bin_dir: &Path, args: &[&str]) -> Result<Value> {
        let socket = self
            .rpc
            .as_ref()
            .ok_or_else(|| LabError::Setup(format!("target {} has no RPC socket", self.name)))?;
        let out = Command::new(bin_dir.join("vfblk-rpc"))
            .arg("--socket")
            .arg(socket)
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

    /// The kept target's pid and accepted connections, once it serves its frontend (up to
    /// 20 s).
    fn serving(&mut self, bin_dir: &Path) -> Result<(i32, u64)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(stats) = self.rpc(bin_dir, &["stats"]) {
                let pid = stats["pid"].as_i64().unwrap_or(0) as i32;
                if pid > 0 && !self.pids.contains(&pid) {
                    self.pids.push(pid);
                }
                let c = &stats["controllers"][0];
                if pid > 0 && c["connected"] == true {
                    return Ok((pid, c["connections"].as_u64().unwrap_or(0)));
                }
            }
            if Instant::now() > deadline {
                return Err(LabError::Setup(format!(
                    "target {} did not serve its frontend within 20 s",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it: SIGTERM (a keeper passes it on), SIGKILL after 10 s; bridge processes a
    /// keeper left behind are killed too (checked by their command line first).
    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: SIGTERM to the process this run started.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let socket = self.socket.display().to_string();
        for &pid in &self.pids {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("vfblk-bridge") && cmdline.contains(&socket) {
                tracing::warn!("target {}: killing pid {pid} left behind", self.name);
                // SAFETY: SIGKILL to a bridge this run's keeper started (its command line
                // names our socket).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(rpc) = &self.rpc {
            let _ = std::fs::remove_file(rpc);
        }
    }

    /// Warnings and errors in its log.
    fn warnings(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("error"))
            .map(|l| format!("{}: {l}", self.name))
            .collect()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// The run.

/// The spec every QEMU of the run shares: the lab guest without NVMe and IOMMU, one
/// vhost-user-blk disk on `socket`.
fn spec_on(base: &VmSpec, socket: &Path) -> VmSpec {
    let mut spec = base.clone();
    spec.vhost_user_blk = vec![VhostUserBlk {
        socket: socket.to_path_buf(),
        num_queues: 1,
        queue_size: None,
        packed: false,
    }];
    spec
}

/// A bandwidth QEMU takes as "no cap" (16 GiB/s).
const UNCAPPED: u64 = 16 << 30;

/// How long after the cap is lifted QEMU may take to converge on its own.
const CONVERGE_WITHIN: Duration = Duration::from_secs(10);

/// The downtime limit (ms) set when it did not.
const FORCED_DOWNTIME_MS: u64 = 5000;

/// How long a migration may take in all, slow phase included.
const LEG_DEADLINE: Duration = Duration::from_secs(60);

/// Runs one migration `from` -> `to` (a QEMU started with `-incoming defer`): capped for
/// `opts.slow_phase`, then uncapped; `during(elapsed)` is called every poll and returns
/// what it did (recorded with the migration's status right after).
fn migrate(
    from: &mut Vm,
    to: &mut Vm,
    uri_path: &Path,
    opts: &MigrationOptions,
    t0: Instant,
    during: &mut dyn FnMut(Duration) -> Result<Option<Value>>,
) -> Leg {
    let mut leg = Leg {
        name: format!("{} -> {}", from.name, to.name),
        ..Leg::default()
    };
    let _ = std::fs::remove_file(uri_path);
    let uri = format!("unix:{}", uri_path.display());
    let refused = |leg: &mut Leg, e: String| {
        leg.status = "refused".into();
        leg.error = Some(e);
        leg.ended_s = t0.elapsed().as_secs_f64();
    };
    if let Err(e) = to.qmp("migrate-incoming", json!({ "uri": uri })) {
        refused(&mut leg, format!("{}: migrate-incoming: {e}", to.name));
        return leg;
    }
    if let Err(e) = from.qmp(
        "migrate-set-parameters",
        json!({ "max-bandwidth": opts.slow_bandwidth }),
    ) {
        refused(
            &mut leg,
            format!("{}: migrate-set-parameters: {e}", from.name),
        );
        return leg;
    }
    let started = Instant::now();
    leg.started_s = t0.elapsed().as_secs_f64();
    tracing::info!(
        "[host] migrating {}: {} MiB/s for {:.0} s, then uncapped",
        leg.name,
        opts.slow_bandwidth >> 20,
        opts.slow_phase.as_secs_f64()
    );
    if let Err(e) = from.qmp("migrate", json!({ "uri": uri })) {
        tracing::warn!("[host] {}: QEMU refused to migrate: {e}", leg.name);
        refused(&mut leg, e);
        return leg;
    }
    let mut uncapped = false;
    loop {
        let info = match from.qmp("query-migrate", json!({})) {
            Ok(i) => i,
            Err(e) => {
                leg.status = "lost".into();
                leg.error = Some(format!("{}: query-migrate: {e}", from.name));
                break;
            }
        };
        let status = info["status"].as_str().unwrap_or("").to_string();
        leg.info = info.clone();
        match status.as_str() {
            "completed" => {
                leg.status = status;
                break;
            }
            "failed" | "cancelled" => {
                leg.status = status;
                leg.error = info["error-desc"].as_str().map(str::to_string);
                break;
            }
            _ => {}
        }
        let elapsed = started.elapsed();
        if !uncapped && elapsed >= opts.slow_phase {
            uncapped = true;
            tracing::info!(
                "[host] {}: {:.1} s in ({status}, {} MiB sent): cap lifted",
                leg.name,
                elapsed.as_secs_f64(),
                info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20
            );
            if let Err(e) = from.qmp(
                "migrate-set-parameters",
                json!({ "max-bandwidth": UNCAPPED }),
            ) {
                leg.status = "lost".into();
                leg.error = Some(format!("lifting the cap: {e}"));
                break;
            }
        }
        if uncapped && leg.forced_at_s.is_none() && elapsed >= opts.slow_phase + CONVERGE_WITHIN {
            // A loaded host (seen: the guest stalled for seconds, its QEMU starved) can keep
            // QEMU from converging within 300 ms of downtime; a longer downtime ends the
            // migration before the guest's workload does. (Raised, never lowered: QEMU
            // 7.2 under TCG was seen to lose guest writes with a 1 ms limit, which makes
            // it sync the dirty bitmap many times a second.)
            tracing::warn!(
                "[host] {}: not converged {:.0} s after the cap was lifted: downtime limit raised to {FORCED_DOWNTIME_MS} ms",
                leg.name,
                CONVERGE_WITHIN.as_secs_f64()
            );
            leg.forced_at_s = Some(elapsed.as_secs_f64());
            if let Err(e) = from.qmp(
                "migrate-set-parameters",
                json!({ "downtime-limit": FORCED_DOWNTIME_MS }),
            ) {
                leg.status = "lost".into();
                leg.error = Some(format!("raising the downtime limit: {e}"));
                break;
            }
        }
        match during(elapsed) {
            Ok(Some(mut event)) => {
                let after = from
                    .qmp("query-migrate", json!({}))
                    .map(|i| i["status"].clone())
                    .unwrap_or(Value::Null);
                event["at_s"] = elapsed.as_secs_f64().into();
                event["migration_status_before"] = status.clone().into();
                event["migration_status_after"] = after;
                tracing::info!("[host] {}: {event}", leg.name);
                leg.events.push(event);
            }
            Ok(None) => {}
            Err(e) => leg.events.push(json!({ "error": e.to_string() })),
        }
        if elapsed > LEG_DEADLINE {
            let _ = from.qmp("migrate_cancel", json!({}));
            leg.status = "timed out".into();
            leg.error = Some(format!("not completed within {LEG_DEADLINE:?}"));
            break;
        }
        if !to.running() {
            leg.status = "lost".into();
            leg.error = Some(format!("destination {} exited", to.name));
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    leg.ended_s = t0.elapsed().as_secs_f64();
    // QEMU 7.2 was seen answering `completed` with a total time and downtime of 0 (its
    // figures are filled in just after the status changes): asked again.
    for _ in 0..10 {
        if leg.status != "completed" || leg.info["total-time"].as_u64() != Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        match from.qmp("query-migrate", json!({})) {
            Ok(info) => leg.info = info,
            Err(_) => break,
        }
    }
    leg.total_time_ms = leg.info["total-time"].as_u64();
    leg.downtime_ms = leg.info["downtime"].as_u64();
    leg.setup_time_ms = leg.info["setup-time"].as_u64();
    if leg.status == "completed" {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let status = to.qmp("query-status", json!({}));
            if status.is_ok_and(|s| s["status"] == "running") {
                leg.destination_running = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    tracing::info!(
        "[host] {}: {} (total {:?} ms, downtime {:?} ms){}",
        leg.name,
        leg.status,
        leg.total_time_ms,
        leg.downtime_ms,
        leg.error
            .as_ref()
            .map_or(String::new(), |e| format!(": {e}"))
    );
    let _ = std::fs::remove_file(uri_path);
    leg
}

/// What fio's latency-log windows say about `[from_s, to_s]` (seconds since fio began):
/// the longest completion (ms) of the windows overlapping it.
pub fn clat_max_ms(windows: &Value, from_s: f64, to_s: f64) -> Option<f64> {
    windows
        .as_array()?
        .iter()
        .filter_map(|w| Some((w[0].as_f64()?, w[1].as_f64()?)))
        .filter(|&(end_ms, _)| {
            end_ms >= from_s * 1e3 && end_ms - CLAT_WINDOW_MS as f64 <= to_s * 1e3
        })
        .map(|(_, ns)| ns / 1e6)
        .reduce(f64::max)
}

/// The backend every bridge of the run serves: the RBD image when asked, else the shared
/// file.
fn shared_backend(opts: &MigrationOptions, disk: &Path) -> String {
    match &opts.rbd {
        Some(spec) => spec.clone(),
        None => format!("file:{}:{}M", disk.display(), DISK_MIB),
    }
}

/// Boots the guest, migrates it from side A to side B and back to a new QEMU on side A
/// while fio and `vfblk-readcheck` run, and reports. Guest and migration failures are in
/// the outcome; an error is a setup failure.
pub fn run_migration(lab: &Lab, opts: &MigrationOptions) -> Result<MigrationOutcome> {
    let started = Instant::now();
    if READCHECK_OFFSET_MIB + opts.regions * opts.region_mib > DISK_MIB {
        return Err(LabError::Setup(format!(
            "{} regions of {} MiB do not fit on the disk",
            opts.regions, opts.region_mib
        )));
    }
    let initrd = guest_image(lab, &guest_script(opts))?;
    let disk = lab.disk("shared-disk.img", u64::from(DISK_MIB))?;
    let mut base = VmSpec::new("L2", crate::vm::Accel::Tcg, &lab.kernel.vmlinux, &initrd);
    base.qemu = opts.qemu.clone();
    base.memory_mib = opts.memory_mib;
    let console_log = lab.dir.join("console.log");
    let mut out = MigrationOutcome {
        qemu: opts.qemu.description.clone(),
        target: match opts.target {
            TargetKind::Qsd => "qemu-storage-daemon (vhost-user-blk export, file)".into(),
            TargetKind::Bridge => format!(
                "vfblk-bridge --backend {}{}{}",
                shared_backend(opts, &disk),
                if opts.keeper_events {
                    ", first source under vfblk-keeper"
                } else {
                    ""
                },
                if opts.sources_skip_dirty_log {
                    ", sources A1 and B with --test-skip-dirty-log"
                } else {
                    ""
                }
            ),
        },
        console: console_log.clone(),
        ..MigrationOutcome::default()
    };
    // Everything this run starts lives here until the end, and is stopped on every way out.
    let mut targets: Vec<Target> = Vec::new();
    let mut vms: Vec<Vm> = Vec::new();
    let result = drive(
        lab,
        opts,
        &base,
        &disk,
        &console_log,
        &mut targets,
        &mut vms,
        &mut out,
    );
    for vm in vms.iter_mut() {
        vm.kill();
        out.qemu_stderr.extend(vm.stderr_lines());
    }
    for t in targets.iter_mut() {
        t.stop();
        out.target_logs.push(t.log.clone());
        out.target_warnings.extend(t.warnings());
    }
    out.problems.extend(leftovers(&vms, &targets));
    drop(vms);
    drop(targets);
    out.elapsed_s = started.elapsed().as_secs_f64();
    if let Some(windows) = out.record("fio_clat_windows").cloned() {
        for leg in &mut out.legs {
            leg.fio_clat_max_ms = clat_max_ms(&windows, leg.started_s - 0.5, leg.ended_s + 1.0);
        }
    }
    std::fs::write(
        lab.dir.join("migration.json"),
        serde_json::to_string_pretty(&out.to_json()).unwrap_or_default(),
    )?;
    result.map(|()| out)
}

/// Processes of the run still alive, or sockets left, after it stopped them.
fn leftovers(vms: &[Vm], targets: &[Target]) -> Vec<String> {
    let mut found = Vec::new();
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    for vm in vms {
        if alive(vm.child.id()) {
            found.push(format!(
                "QEMU {} (pid {}) still runs",
                vm.name,
                vm.child.id()
            ));
        }
        if vm.qmp_path.exists() {
            found.push(format!("{} left", vm.qmp_path.display()));
        }
    }
    for t in targets {
        if alive(t.child.id()) {
            found.push(format!(
                "target {} (pid {}) still runs",
                t.name,
                t.child.id()
            ));
        }
        for &pid in &t.pids {
            if alive(pid as u32) {
                found.push(format!("target {} process {pid} still runs", t.name));
            }
        }
        if t.socket.exists() {
            found.push(format!("{} left", t.socket.display()));
        }
    }
    found
}

/// How long a guest's first QEMU may take to boot it (to `/init`), how many times it is
/// started, and who says so in the warning a stalled boot logs.
struct Boot {
    deadline: Duration,
    tries: u32,
    who: &'static str,
}

/// The host run's guest.
const BOOT: Boot = Boot {
    deadline: Duration::from_secs(90),
    tries: 3,
    who: "host",
};

/// Starts the guest's first QEMU, `A1` on `socket`, and again while its boot stalls: the
/// console it booted on, or `None` (the problem recorded) once `boot.tries` stalled.
fn boot_first(
    base: &VmSpec,
    socket: &Path,
    dir: &Path,
    console_log: &Path,
    boot: &Boot,
    vms: &mut Vec<Vm>,
    out: &mut MigrationOutcome,
) -> Result<Option<Arc<Console>>> {
    loop {
        out.tries += 1;
        let console = Arc::new(Console::new(console_log)?);
        let booting = Instant::now();
        vms.push(Vm::start(
            "A1",
            &spec_on(base, socket),
            dir,
            false,
            &console,
        )?);
        let booted = wait_for(&console, &mut vms[0], boot.deadline, |s| s.booted.is_some());
        if booted {
            out.boot_s = Some(booting.elapsed().as_secs_f64());
            return Ok(Some(console));
        }
        let mut vm = vms.pop().expect("the QEMU just started");
        vm.kill();
        out.qemu_stderr.extend(vm.stderr_lines());
        if out.tries >= boot.tries {
            out.problems
                .push(format!("the guest did not boot in {} tries", out.tries));
            return Ok(None);
        }
        tracing::warn!(
            "[{}] the guest did not boot within {:?} (try {}); starting it again",
            boot.who,
            boot.deadline,
            out.tries
        );
    }
}

/// Waits up to `limit` for the guest's workload to start, then `settle_s`: when it started,
/// or `None` (the problem recorded, the guest's end taken) if it did not.
fn workload_started(
    console: &Console,
    vms: &mut [Vm],
    out: &mut MigrationOutcome,
    limit: Duration,
    settle_s: u64,
) -> Option<Instant> {
    if !wait_for(console, &mut vms[0], limit, |s| {
        s.steps.iter().any(|(_, _, t)| t.starts_with(WORKLOAD_STEP))
    }) {
        out.problems
            .push("the guest's workload did not start".into());
        finish(console, vms, out, None);
        return None;
    }
    let t0 = console.step(WORKLOAD_STEP).unwrap_or_else(Instant::now);
    std::thread::sleep(Duration::from_secs(settle_s));
    Some(t0)
}

/// Migrates the guest from `vms[from]` to `vms[to]` (`from < to`) through `uri_path` and
/// keeps the leg: whether it completed with the destination running.
fn run_leg(
    vms: &mut [Vm],
    (from, to): (usize, usize),
    uri_path: &Path,
    opts: &MigrationOptions,
    t0: Instant,
    during: &mut dyn FnMut(Duration) -> Result<Option<Value>>,
    out: &mut MigrationOutcome,
) -> bool {
    let (a, b) = vms.split_at_mut(to);
    let leg = migrate(&mut a[from], &mut b[0], uri_path, opts, t0, during);
    let completed = leg.status == "completed" && leg.destination_running;
    out.legs.push(leg);
    completed
}

#[allow(clippy::too_many_arguments)]
fn drive(
    lab: &Lab,
    opts: &MigrationOptions,
    base: &VmSpec,
    disk: &Path,
    console_log: &Path,
    targets: &mut Vec<Target>,
    vms: &mut Vec<Vm>,
    out: &mut MigrationOutcome,
) -> Result<()> {
    let bridge = opts.target;
    let backend = shared_backend(opts, disk);
    // Side A's first target, then its QEMU; retried while the boot stalls.
    targets.push(Target::start(
        lab,
        bridge,
        "A1",
        disk,
        &backend,
        opts.sources_skip_dirty_log,
        opts.keeper_events,
    )?);
    let socket = &targets[0].socket;
    let Some(console) = boot_first(base, socket, &lab.dir, console_log, &BOOT, vms, out)? else {
        return Ok(());
    };
    // Side B, ready before the workload starts.
    targets.push(Target::start(
        lab,
        bridge,
        "B",
        disk,
        &backend,
        opts.sources_skip_dirty_log,
        false,
    )?);
    vms.push(Vm::start(
        "B",
        &spec_on(base, &targets[1].socket),
        &lab.dir,
        true,
        &console,
    )?);
    let workload_deadline = BOOT.deadline + Duration::from_secs(120);
    let Some(t0) = workload_started(&console, vms, out, workload_deadline, opts.settle_s) else {
        return Ok(());
    };

    // A1 -> B, with the keeper's events if asked.
    let bin_dir = lab.bin_dir.clone();
    let mut upgraded = false;
    let mut killed = false;
    let slow = opts.slow_phase;
    let completed = {
        let target = &mut targets[0];
        let mut during = |elapsed: Duration| -> Result<Option<Value>> {
            if !opts.keeper_events {
                return Ok(None);
            }
            if !upgraded && elapsed >= slow.mul_f64(0.3) {
                upgraded = true;
                let (old, _) = target.serving(&bin_dir)?;
                let report = target.rpc(&bin_dir, &["upgrade"])?;
                let (new, connections) = target.serving(&bin_dir)?;
                return Ok(Some(json!({
                    "event": "upgrade",
                    "old_pid": old,
                    "new_pid": new,
                    "pause_ms": report["pause_ms"],
                    "connections": connections,
                })));
            }
            if !killed && elapsed >= slow.mul_f64(0.65) {
                killed = true;
                let (old, _) = target.serving(&bin_dir)?;
                // SAFETY: SIGKILL to the bridge this run's keeper started (its pid from
                // its own RPC answer).
                unsafe { libc::kill(old, libc::SIGKILL) };
                let deadline = Instant::now() + Duration::from_secs(20);
                let (new, connections) = loop {
                    let (pid, c) = target.serving(&bin_dir)?;
                    if pid != old || Instant::now() > deadline {
                        break (pid, c);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                return Ok(Some(json!({
                    "event": "SIGKILL",
                    "old_pid": old,
                    "new_pid": new,
                    "connections": connections,
                })));
            }
            Ok(None)
        };
        let mig = lab.dir.join("mig-1.sock");
        run_leg(vms, (0, 1), &mig, opts, t0, &mut during, out)
    };
    if opts.keeper_events {
        out.kept_connections = targets[0]
            .rpc(&bin_dir, &["stats"])
            .ok()
            .and_then(|s| s["controllers"][0]["connections"].as_u64());
    }
    if !completed {
        finish(&console, vms, out, Some(t0));
        return Ok(());
    }
    // The source is done: its QEMU and its target go.
    vms[0].quit();
    targets[0].stop();

    // Side A again: a new target and a new QEMU; B -> A2.
    targets.push(Target::start(
        lab, bridge, "A2", disk, &backend, false, false,
    )?);
    vms.push(Vm::start(
        "A2",
        &spec_on(base, &targets[2].socket),
        &lab.dir,
        true,
        &console,
    )?);
    std::thread::sleep(Duration::from_secs(opts.settle_s));
    let mig = lab.dir.join("mig-2.sock");
    if run_leg(vms, (1, 2), &mig, opts, t0, &mut |_| Ok(None), out) {
        vms[1].quit();
        targets[1].stop();
    }
    finish(&console, vms, out, Some(t0));
    Ok(())
}

/// Waits until `done` holds for the guest, the guest ends (exit, panic), the QEMU running
/// it exits, or `limit` passes; whether `done` held.
fn wait_for(
    console: &Console,
    vm: &mut Vm,
    limit: Duration,
    done: impl Fn(&GuestState) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        {
            let state = console.lock();
            if done(&state) {
                return true;
            }
            if state.exit.is_some() || state.panic.is_some() {
                return false;
            }
        }
        if !vm.running() || Instant::now() > deadline {
            // The last lines may still be on their way.
            std::thread::sleep(Duration::from_millis(200));
            return done(&console.lock());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the guest to finish on whichever QEMU runs it now (the last one still
/// running), up to the workload's end plus a minute, and takes its results.
fn finish(console: &Console, vms: &mut [Vm], out: &mut MigrationOutcome, t0: Option<Instant>) {
    let limit = Duration::from_secs(90 + 60);
    let idx = vms.iter_mut().rposition(|vm| {
        vm.running()
            && vm
                .qmp("query-status", json!({}))
                .is_ok_and(|s| s["status"] == "running")
    });
    if let Some(i) = idx {
        let done = wait_for(console, &mut vms[i], limit, |s| s.exit.is_some());
        if done {
            // The guest powers off: its QEMU exits by itself.
            let deadline = Instant::now() + Duration::from_secs(10);
            while vms[i].running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        } else {
            out.problems.push(format!(
                "the guest did not finish on {} within {limit:?}",
                vms[i].name
            ));
        }
    } else {
        out.problems.push("no QEMU runs the guest any more".into());
    }
    let state = console.lock();
    out.guest_exit = state.exit;
    out.failures = state.failures.clone();
    out.records = state.records.clone();
    if let Some(p) = &state.panic {
        out.problems.push(format!("guest kernel panicked: {p}"));
    }
    if let Some(t0) = t0 {
        let since = |prefix: &str| {
            state
                .steps
                .iter()
                .find(|(_, _, s)| s.starts_with(prefix))
                .map(|(t, _, _)| t.saturating_duration_since(t0).as_secs_f64())
        };
        out.workload_ended_s = (since("readcheck finished"), since("fio finished"));
    }
    let t0 = t0.unwrap_or(console.started);
    out.steps = state
        .steps
        .iter()
        .map(|(t, vm, s)| {
            let at = if *t >= t0 {
                t.duration_since(t0).as_secs_f64()
            } else {
                -t0.duration_since(*t).as_secs_f64()
            };
            (at, vm.clone(), s.clone())
        })
        .collect();
}

// ---------------------------------------------------------------------------------------
// Two controllers on one NVMe namespace: the migration inside the lab guest.

/// The second-level guest's initramfs inside the lab guest (under [`L3_DIR`]).
pub const NESTED_INITRD: &str = "initrd-readcheck.cpio";

/// Where the nested run keeps its sockets and logs inside the lab guest.
pub const NESTED_DIR: &str = "/tmp/l3";

/// The record key of the nested run's outcome.
pub const NESTED_RECORD: &str = "nested_migration";

/// A migration between two vhost-user sockets inside the lab guest (`vfblk-lab
/// nested-migrate`): the second-level guest boots on `source` under the lab guest's KVM,
/// moves to a QEMU on `destination` while `vfblk-readcheck` runs in it, and, with `back`,
/// on to a new QEMU on `source` again.
#[derive(Debug, Clone)]
pub struct NestedMigration {
    /// The first QEMU's socket (and the third's, with `back`).
    pub source: PathBuf,
    /// The second QEMU's socket.
    pub destination: PathBuf,
    /// Migrate back to a new QEMU on `source`.
    pub back: bool,
    /// The migrations' pace and the guest's RAM (its workload is baked into
    /// [`NESTED_INITRD`] on the host).
    pub opts: MigrationOptions,
}

/// The second-level guest under the lab guest's KVM (most boot in 18-30 s).
const NESTED_BOOT: Boot = Boot {
    deadline: Duration::from_secs(120),
    tries: 3,
    who: "L2",
};

/// Runs inside the lab guest: the migration(s) of `n`, then one record ([`NESTED_RECORD`])
/// with the outcome. An error is a setup failure; what the guest and the migrations did is
/// in the record (and the outcome) either way.
pub fn run_nested_migration(n: &NestedMigration) -> Result<MigrationOutcome> {
    let started = Instant::now();
    let dir = Path::new(NESTED_DIR);
    std::fs::create_dir_all(dir)?;
    let l3 = Path::new(crate::scenario::L3_DIR);
    let mut base = VmSpec::new(
        "L3",
        crate::vm::Accel::Kvm,
        &l3.join("vmlinux"),
        &l3.join(NESTED_INITRD),
    );
    base.qemu = n.opts.qemu.clone();
    base.cpus = 1;
    base.memory_mib = n.opts.memory_mib;
    let console_log = dir.join("console-migration.log");
    let mut out = MigrationOutcome {
        qemu: n.opts.qemu.description.clone(),
        target: format!(
            "vfblk-bridge NVMe backends: {} -> {}{}",
            n.source.display(),
            n.destination.display(),
            if n.back { " and back" } else { "" }
        ),
        console: console_log.clone(),
        ..MigrationOutcome::default()
    };
    let mut vms: Vec<Vm> = Vec::new();
    let result = drive_nested(n, &base, dir, &console_log, &mut vms, &mut out);
    for vm in vms.iter_mut() {
        vm.kill();
        out.qemu_stderr.extend(vm.stderr_lines());
    }
    out.problems.extend(leftovers(&vms, &[]));
    drop(vms);
    out.elapsed_s = started.elapsed().as_secs_f64();
    println!(
        "{}-RECORD {}",
        MARK,
        json!({ NESTED_RECORD: out.to_json() })
    );
    result.map(|()| out)
}

fn drive_nested(
    n: &NestedMigration,
    base: &VmSpec,
    dir: &Path,
    console_log: &Path,
    vms: &mut Vec<Vm>,
    out: &mut MigrationOutcome,
) -> Result<()> {
    let opts = &n.opts;
    let Some(console) = boot_first(base, &n.source, dir, console_log, &NESTED_BOOT, vms, out)?
    else {
        return Ok(());
    };
    vms.push(Vm::start(
        "B",
        &spec_on(base, &n.destination),
        dir,
        true,
        &console,
    )?);
    let limit = Duration::from_secs(120);
    let Some(t0) = workload_started(&console, vms, out, limit, opts.settle_s) else {
        return Ok(());
    };
    let mig = dir.join("mig-1.sock");
    if !run_leg(vms, (0, 1), &mig, opts, t0, &mut |_| Ok(None), out) {
        finish(&console, vms, out, Some(t0));
        return Ok(());
    }
    // The source QEMU goes: its controller is free for the next frontend.
    vms[0].quit();
    if n.back {
        vms.push(Vm::start(
            "A2",
            &spec_on(base, &n.source),
            dir,
            true,
            &console,
        )?);
        std::thread::sleep(Duration::from_secs(opts.settle_s));
        let mig = dir.join("mig-2.sock");
        if run_leg(vms, (1, 2), &mig, opts, t0, &mut |_| Ok(None), out) {
            vms[1].quit();
        }
    }
    finish(&console, vms, out, Some(t0));
    Ok(())
}

/// Where the lab guest of [`run_nvme_migration`] has the controllers' sockets.
const NVME_SOCKETS: (&str, &str) = ("/tmp/a.sock", "/tmp/b.sock");

/// The lab guest's script of [`run_nvme_migration`]: both controllers of the NVM
/// subsystem bound to vfio-pci, a `vfblk-bridge` on each (the first on namespace 1 through
/// the first controller, the second through the second, `--test-skip-dirty-log` when
/// `skip_log` names it: `a` or `b`), then `vfblk-lab nested-migrate`; the bridges' logs
/// are summed up in records.
pub fn nvme_migration_script(
    opts: &MigrationOptions,
    back: bool,
    skip_log: Option<char>,
) -> String {
    let (a, b) = NVME_SOCKETS;
    let skip = |side: char| {
        if skip_log == Some(side) {
            " --test-skip-dirty-log"
        } else {
            ""
        }
    };
    let (skip_a, skip_b) = (skip('a'), skip('b'));
    let back = if back { " --back" } else { "" };
    let (mem, slow_mib) = (opts.memory_mib, opts.slow_bandwidth >> 20);
    let (slow_s, settle_s) = (opts.slow_phase.as_secs(), opts.settle_s);
    format!(
        r#". /lab/lib.sh
modprobe vfio_iommu_type1 && modprobe vfio_pci || fail "modprobe vfio"
modprobe kvm_amd || fail "modprobe kvm_amd"
set --
for d in /sys/bus/pci/devices/*; do [ "$(cat $d/class)" = 0x010802 ] && set -- "$@" $(basename $d); done
[ $# = 2 ] || fail "want the subsystem's two NVMe controllers, found $#: $*"
step "two controllers of one NVM subsystem, namespace 1 shared: $1 and $2"
for bdf in $1 $2; do vfblk-nvme bind-vfio $bdf || fail "bind-vfio $bdf"; done
vfblk-bridge --socket {a} --backend nvme:$1:1{skip_a} >/dev/null 2>/tmp/bridge-a.log &
vfblk-bridge --socket {b} --backend nvme:$2:1{skip_b} >/dev/null 2>/tmp/bridge-b.log &
for i in $(seq 1 400); do [ -S {a} ] && [ -S {b} ] && break; sleep 0.05; done
[ -S {a} ] && [ -S {b} ] || {{ cat /tmp/bridge-a.log /tmp/bridge-b.log; fail "the bridges did not start"; }}
step "nested guest on {a} (through $1), migrated to {b} (through $2){back}"
vfblk-lab nested-migrate --source {a} --destination {b}{back} --memory-mib {mem} --slow-mib-s {slow_mib} --slow-s {slow_s} --settle-s {settle_s} || echo "nested-migrate exited with $?"
for side in a b; do
    log=/tmp/bridge-$side.log
    record "{{\"bridge_$side\": {{\"dirty_log_set\": $(grep -c 'dirty log of' $log), \"errors\": $(grep -c -i 'error' $log), \"warnings\": $(grep -c 'WARN' $log)}}}}"
done
"#
    )
}

/// The lab guest of [`run_nvme_migration`]: the project's bridge, NVMe tool and lab
/// binary, QEMU for second-level guests, and the second-level guest's image running
/// [`guest_script`] of `opts` (`vfblk-readcheck`, no fio).
pub fn nvme_migration_image(lab: &Lab, opts: &MigrationOptions, script: &str) -> Result<PathBuf> {
    use crate::scenario::{L2_HUGEPAGES, L2_MODULES, L3_DIR, L3_MODULES};
    let mut l3 = Initramfs::new(&lab.kernel, L3_MODULES, 0)?;
    l3.add_program(
        &lab.bin_dir.join("vfblk-readcheck"),
        "lab/bin/vfblk-readcheck",
    )?;
    l3.set_test_script(&guest_script(opts));
    let l3_path = lab.dir.join("l3-readcheck.cpio");
    l3.write(&l3_path)?;
    let mut image = Initramfs::new(&lab.kernel, L2_MODULES, L2_HUGEPAGES)?;
    for bin in ["vfblk-nvme", "vfblk-lab", "vfblk-bridge"] {
        image.add_program(&lab.bin_dir.join(bin), &format!("lab/bin/{bin}"))?;
    }
    lab.add_nested_qemu(&mut image)?;
    image.add_file(&format!("{L3_DIR}/{NESTED_INITRD}"), &l3_path, 0o644);
    image.set_test_script(script);
    let path = lab.dir.join("l2-migration.cpio");
    image.write(&path)?;
    Ok(path)
}

/// Issue 18's migration between two controllers on one NVMe namespace: the lab guest's
/// emulated NVMe is an NVM subsystem with two controllers sharing namespace 1 (a
/// dual-ported SSD's two ports: two hosts reaching one namespace); each controller is
/// owned through VFIO by a `vfblk-bridge` of its own in the lab guest, and a second-level
/// guest on the first migrates to a QEMU on the second (and back, with `back`) while
/// `vfblk-readcheck` checks in it that the device's reads into guest RAM arrived. The
/// bridge named by `skip_log` takes the dirty log and marks nothing. The nested run's
/// outcome is the lab run's [`NESTED_RECORD`] record.
pub fn run_nvme_migration(
    lab: &Lab,
    opts: &MigrationOptions,
    back: bool,
    skip_log: Option<char>,
) -> Result<crate::vm::RetriedRun> {
    let script = nvme_migration_script(opts, back, skip_log);
    let initrd = nvme_migration_image(lab, opts, &script)?;
    let disk = lab.disk("nvme.img", u64::from(DISK_MIB))?;
    let mut spec = lab.l2_spec(&initrd, &disk);
    spec.nvme[0].controllers = 2;
    let limits = crate::vm::Limits {
        boot: Duration::from_secs(90),
        total: Duration::from_secs(600),
    };
    crate::vm::run_retrying_stalls(
        &spec,
        limits,
        crate::scenario::L2_TRIES,
        &lab.dir.join("console.log"),
        crate::vm::Echo::Steps,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_completion_is_taken_from_the_windows_overlapping_the_migration() {
        let windows = json!([
            [250, 1_000_000],
            [500, 9_000_000],
            [750, 2_000_000],
            [5000, 90_000_000]
        ]);
        // [0.3, 0.4] s overlaps the window ending at 500 ms only.
        assert_eq!(clat_max_ms(&windows, 0.3, 0.4), Some(9.0));
        assert_eq!(clat_max_ms(&windows, 0.6, 0.7), Some(2.0));
        assert_eq!(clat_max_ms(&windows, 0.0, 10.0), Some(90.0));
        assert_eq!(clat_max_ms(&windows, 6.0, 7.0), None);
        assert_eq!(clat_max_ms(&json!([]), 0.0, 1.0), None);
    }

    #[test]
    fn a_line_cut_by_a_migration_is_read_whole_from_two_qemus() {
        let dir = std::env::temp_dir().join(format!("vfblk-mig-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let console = Console::new(&dir.join("console.log")).unwrap();
        console.feed("A1", b"@@VFBLK-BOOTED 1.0\n@@VFBLK-STEP work");
        console.feed("B", b"load running\n@@VFBLK-RECORD {\"a\": 1}\n");
        console.feed(
            "B",
            b"[ 9.1] Kernel panic - not syncing: x\n@@VFBLK-EXIT 0\n",
        );
        let state = console.lock();
        assert!(state.booted.is_some());
        assert_eq!(state.steps.len(), 1);
        assert_eq!(state.steps[0].1, "B", "the line ended on B");
        assert_eq!(state.steps[0].2, "workload running");
        assert_eq!(state.records, vec![json!({"a": 1})]);
        assert!(state.panic.is_some());
        assert_eq!(state.exit, Some(0));
        drop(state);
        let log = std::fs::read_to_string(dir.join("console.log")).unwrap();
        assert!(log.contains("@@VFBLK-STEP workload running\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_nested_run_checks_reads_alone_and_skips_the_log_only_where_asked() {
        let opts = MigrationOptions::nested();
        let script = guest_script(&opts);
        assert!(!script.contains("fio"), "{script}");
        assert!(script.contains("--regions 4 --region-mib 4"));
        assert!(script.contains("--hold-ms 200 --below-mib 128"));
        assert!(script.contains("step \"workload running: readcheck"));
        let l2 = nvme_migration_script(&opts, true, Some('b'));
        assert!(
            l2.contains("--socket /tmp/a.sock --backend nvme:$1:1 >"),
            "{l2}"
        );
        assert!(l2.contains("--socket /tmp/b.sock --backend nvme:$2:1 --test-skip-dirty-log >"));
        assert!(l2.contains(
            "--destination /tmp/b.sock --back --memory-mib 256 --slow-mib-s 8 --slow-s 5"
        ));
        let l2 = nvme_migration_script(&opts, false, None);
        assert!(!l2.contains("--test-skip-dirty-log") && !l2.contains("--back "));
    }

    #[test]
    fn the_guest_script_keeps_fio_and_readcheck_apart() {
        let opts = MigrationOptions::new(Qemu::system(), TargetKind::Qsd);
        let script = guest_script(&opts);
        assert!(script.contains("--offset=0 --size=128M"));
        assert!(script.contains("--offset-mib 128 --regions 8 --region-mib 8"));
        assert!(READCHECK_OFFSET_MIB + opts.regions * opts.region_mib <= DISK_MIB);
        assert!(script.contains(&format!("--runtime={}", opts.workload_s)));
    }
}
