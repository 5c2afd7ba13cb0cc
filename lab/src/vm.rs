//! Starting a QEMU guest, reading its serial console, and stopping it.
//!
//! The same runner starts the first-level guest on the host (TCG) and a second-level guest
//! inside it (KVM on the first guest's emulated SVM). Every run has a boot deadline and an
//! overall deadline; on either, the runner kills the QEMU process it started (by its pid,
//! nothing else) and says which deadline passed, so callers can retry a stalled boot but
//! never a failed test.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::initramfs::MARK;
use crate::{LabError, Result};

/// How the guest's CPU is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// QEMU's multi-threaded TCG emulator with `-cpu max` (which includes SVM, so the guest
    /// can run KVM itself).
    Tcg,
    /// KVM, with the host's CPU model.
    Kvm,
}

impl Accel {
    /// A short human-readable name.
    pub fn describe(self) -> &'static str {
        match self {
            Accel::Tcg => "TCG (software emulation, multi-threaded, -cpu max with SVM)",
            Accel::Kvm => "KVM (-cpu host)",
        }
    }
}

/// An emulated NVMe controller backed by a raw image.
#[derive(Debug, Clone)]
pub struct NvmeDisk {
    /// Raw image file of namespace 1.
    pub image: PathBuf,
    /// The serial number the controller reports in Identify.
    pub serial: String,
    /// Raw image files of namespaces 2, 3, ... of the same controller.
    pub more_namespaces: Vec<PathBuf>,
    /// Controllers that reach these namespaces, as the ports of a dual-ported SSD do: more
    /// than one makes an NVM subsystem whose controllers (one PCI device each, one IOMMU
    /// group each, the same serial) all have every namespace attached (`shared=on`).
    pub controllers: u32,
}

/// A vhost-user-blk device whose backend listens on a unix socket.
#[derive(Debug, Clone)]
pub struct VhostUserBlk {
    /// The backend's socket; QEMU connects and reconnects every second.
    pub socket: PathBuf,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Entries per virtqueue the device offers (`queue-size`; QEMU's default when `None`).
    /// Firmware may still use fewer (SeaBIOS: 256).
    pub queue_size: Option<u16>,
    /// Offer packed virtqueues (`packed=on`; the guest's driver takes them when the backend
    /// offers them too).
    pub packed: bool,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Name used in logs and errors.
    pub name: String,
    /// The QEMU that runs it.
    pub qemu: crate::qemu::Qemu,
    /// CPU acceleration.
    pub accel: Accel,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB (a shared memfd, so vhost-user backends can map it).
    pub memory_mib: u64,
    /// Kernel image (a PVH `vmlinux` or a bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Appended to the kernel command line.
    pub cmdline: String,
    /// A virtual Intel IOMMU (with interrupt remapping), required for VFIO in the guest.
    pub iommu: bool,
    /// Emulated NVMe controllers.
    pub nvme: Vec<NvmeDisk>,
    /// virtio-blk disks backed by raw images.
    pub virtio_disks: Vec<PathBuf>,
    /// A raw image the guest's root file system sits on, the first virtio-blk disk
    /// (`/dev/vda`), never written: the guest's writes go to a temporary overlay QEMU drops
    /// at exit (`snapshot=on`), so one cached image serves every run.
    pub root_disk: Option<PathBuf>,
    /// vhost-user-blk devices.
    pub vhost_user_blk: Vec<VhostUserBlk>,
    /// Boot from the first vhost-user-blk disk through the firmware (`bootindex`), not from
    /// `kernel` and `initrd` (unused then; the disk's boot loader has the command line).
    pub boot_from_disk: bool,
    /// Guests that must start a step together: see [`StartGate`].
    pub start_gate: Option<StartGate>,
    /// Whether [`run_retrying_stalls`] may run the guest again after its test script began
    /// (when it wedged or its emulator crashed). Not for a guest whose run must overlap
    /// events outside it (a target restarted under it): a second run would miss them.
    pub retry_started: bool,
}

/// What a guest prints (as a `@@VFBLK-STEP`) when it waits at its start gate; it then reads
/// one line from its serial console: `go` when every party arrived, `alone` when the wait
/// ran out.
pub const GATE_STEP: &str = "waiting at the start gate";

/// A barrier between guests run by separate runners (separate processes even): each guest
/// that reaches [`GATE_STEP`] registers as `party` in `dir`, and all of them are let go once
/// `parties` have registered (or `wait` has passed), through their serial consoles. Two
/// nested VMs booting at different speeds then start their fio at the same moment.
#[derive(Debug, Clone)]
pub struct StartGate {
    /// Shared by the parties.
    pub dir: PathBuf,
    /// This guest's name in `dir` (a retried boot registers under the same name).
    pub party: String,
    /// How many must arrive.
    pub parties: usize,
    /// Longest wait for the others.
    pub wait: Duration,
}

impl StartGate {
    /// Registers, waits for the others (up to `wait`), then answers the guest: `go` or
    /// `alone`.
    fn open(&self, mut console: impl Write) -> std::io::Result<&'static str> {
        std::fs::create_dir_all(&self.dir)?;
        File::create(self.dir.join(&self.party))?;
        let deadline = Instant::now() + self.wait;
        let answer = loop {
            let arrived = std::fs::read_dir(&self.dir)?.count();
            if arrived >= self.parties {
                break "go";
            }
            if Instant::now() >= deadline {
                break "alone";
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        console.write_all(format!("{answer}\n").as_bytes())?;
        console.flush()?;
        Ok(answer)
    }
}

impl VmSpec {
    /// A spec with the lab's defaults and no devices.
    pub fn new(name: &str, accel: Accel, kernel: &Path, initrd: &Path) -> Self {
        Self {
            name: name.to_string(),
            qemu: crate::qemu::Qemu::system(),
            accel,
            cpus: 2,
            memory_mib: 2048,
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            cmdline: String::new(),
            iommu: false,
            nvme: Vec::new(),
            virtio_disks: Vec::new(),
            root_disk: None,
            vhost_user_blk: Vec::new(),
            boot_from_disk: false,
            start_gate: None,
            retry_started: true,
        }
    }

    /// The QEMU command line; `interactive` puts the console and QEMU monitor on the terminal.
    pub fn args(&self, interactive: bool) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        if interactive {
            push(&["-serial", "mon:stdio"]);
        } else {
            push(&["-serial", "stdio", "-monitor", "none"]);
        }
        match self.accel {
            Accel::Tcg => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        }
        // Named vCPU threads ("CPU <n>/TCG", "CPU <n>/KVM"), for the runner's watch on them.
        push(&["-name", "lab,debug-threads=on"]);
        let mem = format!(
            "memory-backend-memfd,id=ram,size={}M,share=on",
            self.memory_mib
        );
        let machine = if self.iommu {
            "q35,kernel-irqchip=split,memory-backend=ram"
        } else {
            "q35,memory-backend=ram"
        };
        let smp = self.cpus.to_string();
        let memsize = format!("{}M", self.memory_mib);
        push(&[
            "-machine", machine, "-object", &mem, "-m", &memsize, "-smp", &smp,
        ]);
        if self.iommu {
            // The IOMMU must exist before the devices that sit behind it.
            push(&["-device", "intel-iommu,intremap=on"]);
        }
        for (i, disk) in self.nvme.iter().enumerate() {
            let drive = format!(
                "file={},if=none,id=nvm{i},format=raw,cache=unsafe,discard=unmap",
                disk.image.display()
            );
            if disk.controllers > 1 {
                // A subsystem, its controllers, then its namespaces attached to all of them.
                let subsys = format!("nvme-subsys,id=nvmes{i},nqn=vfblk-lab-subsys-{i}");
                push(&["-device", &subsys]);
                for c in 0..disk.controllers {
                    let id = if c == 0 {
                        format!("nvmec{i}")
                    } else {
                        format!("nvmec{i}p{c}")
                    };
                    let dev = format!("nvme,id={id},serial={},subsys=nvmes{i}", disk.serial);
                    push(&["-device", &dev]);
                }
                let dev = format!("nvme-ns,drive=nvm{i},bus=nvmec{i},nsid=1,shared=on");
                push(&["-drive", &drive, "-device", &dev]);
            } else {
                let dev = format!("nvme,id=nvmec{i},serial={},drive=nvm{i}", disk.serial);
                push(&["-drive", &drive, "-device", &dev]);
            }
            for (k, image) in disk.more_namespaces.iter().enumerate() {
                let nsid = k + 2;
                let drive = format!(
                    "file={},if=none,id=nvm{i}n{nsid},format=raw,cache=unsafe,discard=unmap",
                    image.display()
                );
                let shared = if disk.controllers > 1 {
                    ",shared=on"
                } else {
                    ""
                };
                let dev = format!("nvme-ns,drive=nvm{i}n{nsid},bus=nvmec{i},nsid={nsid}{shared}");
                push(&["-drive", &drive, "-device", &dev]);
            }
        }
        if let Some(root) = &self.root_disk {
            let drive = format!(
                "file={},if=none,id=root,format=raw,snapshot=on",
                root.display()
            );
            push(&["-drive", &drive, "-device", "virtio-blk-pci,drive=root"]);
        }
        for (i, disk) in self.virtio_disks.iter().enumerate() {
            let drive = format!(
                "file={},if=none,id=vd{i},format=raw,cache=unsafe",
                disk.display()
            );
            let dev = format!("virtio-blk-pci,drive=vd{i}");
            push(&["-drive", &drive, "-device", &dev]);
        }
        for (i, blk) in self.vhost_user_blk.iter().enumerate() {
            let reconnect = match self.qemu.reconnect_ms {
                Some(ms) => format!("reconnect-ms={ms}"),
                None => "reconnect=1".to_string(),
            };
            let chardev = format!("socket,id=vub{i},path={},{reconnect}", blk.socket.display());
            let mut dev = format!(
                "vhost-user-blk-pci,chardev=vub{i},num-queues={}",
                blk.num_queues
            );
            if let Some(n) = blk.queue_size {
                dev.push_str(&format!(",queue-size={n}"));
            }
            if blk.packed {
                dev.push_str(",packed=on");
            }
            if self.boot_from_disk && i == 0 {
                dev.push_str(",bootindex=0");
            }
            push(&["-chardev", &chardev, "-device", &dev]);
        }
        let mut cmdline = String::from("console=ttyS0 panic=-1 loglevel=4");
        if self.iommu {
            cmdline.push_str(" intel_iommu=on");
        }
        if interactive {
            cmdline.push_str(" vfblk.shell");
        }
        if !self.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.cmdline);
        }
        if !self.boot_from_disk {
            let kernel = self.kernel.display().to_string();
            let initrd = self.initrd.display().to_string();
            push(&["-kernel", &kernel, "-initrd", &initrd, "-append", &cmdline]);
        }
        a
    }
}

/// Deadlines of one run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From start until `/init` reports it is running.
    pub boot: Duration,
    /// From start until QEMU exits.
    pub total: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The test script finished with this exit status and the guest powered off.
    Finished(i32),
    /// `/init` did not report in time: the boot stalled (safe to retry).
    BootStalled,
    /// The guest booted but did not finish in time.
    TimedOut,
    /// The guest's kernel reported a CPU stuck for at least [`WEDGED_AFTER`], a task blocked
    /// for at least [`HUNG_AFTER`], or panicked (the line is kept), or one of the guest's
    /// vCPUs was not scheduled for [`VCPU_ASLEEP_AFTER`] (what is kept says which): under
    /// nested virtualisation inside TCG this is the emulator breaking the guest's kernel
    /// (the code under test runs in user space), so the run is stopped early and is safe to
    /// retry.
    Wedged(String),
    /// QEMU exited before the test script finished (how, and its stderr tail).
    QemuExited(String),
    /// The booted guest reset itself before its test script finished: QEMU exited with
    /// status 0 and nothing on stderr, which under `-no-reboot` is a guest reset (a triple
    /// fault prints nothing): the emulator broke the guest's kernel.
    GuestReset,
    /// QEMU itself crashed (killed by this signal, which we did not send) before the test
    /// script finished: the emulator broke, not the code under test in the guest (QEMU 7.2's
    /// emulated NVMe segfaults now and then in `nvme_rw_complete_cb` after a controller
    /// reset), so the run is safe to retry. The stderr tail is kept.
    EmulatorCrashed(i32, String),
}

/// How long a guest kernel may report a CPU stuck before the run counts as wedged. Loaded
/// TCG guests report 20-45 s stalls that pass; wedged ones go on for many minutes.
pub const WEDGED_AFTER: Duration = Duration::from_secs(120);

impl Ending {
    /// Whether the emulators ended the run rather than the code under test: the guest's
    /// kernel wedged or a vCPU stopped, QEMU crashed, or the booted guest reset itself.
    pub fn emulator_fault(&self) -> bool {
        matches!(
            self,
            Ending::Wedged(_) | Ending::EmulatorCrashed(..) | Ending::GuestReset
        )
    }
}

/// How long a guest's vCPU may go without being scheduled before the run counts as wedged.
/// A running Linux wakes each of its CPUs every few seconds (the soft-lockup watchdog's timer
/// fires every 4 s; the lab guest's vCPU threads were seen idle 5 s at most), so a vCPU
/// thread that slept for a minute waits for an interrupt that will not come: seen in the TCG
/// lab guest under nested SVM, a halted vCPU that lost its timer, everything queued on that
/// CPU (a second-level guest's vCPU, a target's thread) stopped for good while the other
/// CPU goes on.
pub const VCPU_ASLEEP_AFTER: Duration = Duration::from_secs(60);

/// How often the runner looks at a guest's vCPU threads.
const VCPU_LOOK_EVERY: Duration = Duration::from_secs(5);

/// Watches the vCPU threads of a QEMU process (named `CPU <n>/TCG` or `CPU <n>/KVM` under
/// `-name ...,debug-threads=on`) through their context-switch counts.
#[derive(Debug)]
struct VcpuWatch {
    pid: u32,
    asleep_after: Duration,
    /// Per thread id: its name, its switch count, and when that count last changed.
    seen: std::collections::BTreeMap<u32, (String, u64, Instant)>,
}

impl VcpuWatch {
    fn new(pid: u32, asleep_after: Duration) -> Self {
        Self {
            pid,
            asleep_after,
            seen: Default::default(),
        }
    }

    /// Takes a sample; names a vCPU thread not scheduled for `asleep_after`, if any.
    fn look(&mut self, now: Instant) -> Option<String> {
        let vcpus: Vec<_> = crate::process::threads(self.pid)
            .into_iter()
            .filter(|t| {
                t.name.starts_with("CPU ") && (t.name.ends_with("/TCG") || t.name.ends_with("/KVM"))
            })
            .collect();
        // A thread that is gone no longer counts.
        self.seen
            .retain(|tid, _| vcpus.iter().any(|t| t.tid == *tid));
        for t in vcpus {
            let Some(switches) = context_switches(&t.dir.join("status")) else {
                continue;
            };
            let entry = self
                .seen
                .entry(t.tid)
                .or_insert_with(|| (t.name.clone(), switches, now));
            if entry.1 != switches {
                entry.1 = switches;
                entry.2 = now;
            }
        }
        self.seen.values().find_map(|(name, _, since)| {
            let asleep = now.saturating_duration_since(*since);
            (asleep >= self.asleep_after).then(|| {
                format!(
                    "vCPU thread {name:?} not scheduled for {:.0} s: the emulator lost the guest CPU's wake-up",
                    asleep.as_secs_f64()
                )
            })
        })
    }
}

/// Voluntary plus involuntary context switches of a thread (its `/proc/.../status`).
fn context_switches(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    let count = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some(count("voluntary_ctxt_switches:")? + count("nonvoluntary_ctxt_switches:")?)
}

/// How long the guest's kernel may report a task blocked before the run counts as wedged: its
/// hung-task watchdog reports at 120 s and again every 120 s; a first-level kernel hung by a
/// nested VM (seen: QEMU's vCPU threads and KVM's workers blocked, RCU stalled, for good)
/// reports again, a merely slow one does not.
pub const HUNG_AFTER: Duration = Duration::from_secs(240);

/// The stall a kernel console line reports, if it is the guest's own soft-lockup watchdog
/// (`[  598.26] watchdog: BUG: soft lockup - CPU#1 stuck for 540s! [...]`). Lines a nested
/// guest's console passes through carry a prefix and do not count for this guest.
fn soft_lockup(line: &str) -> Option<Duration> {
    let rest = line.strip_prefix('[')?;
    let (_, rest) = rest.split_once("] ")?;
    let rest = rest.strip_prefix("watchdog: BUG: soft lockup - CPU#")?;
    let (_, rest) = rest.split_once(" stuck for ")?;
    let (secs, _) = rest.split_once("s!")?;
    secs.parse().ok().map(Duration::from_secs)
}

/// How long this guest's own kernel says a task has been blocked (`[ 485.0] INFO: task
/// qemu-system-x86:140 blocked for more than 241 seconds.`).
fn hung_task(line: &str) -> Option<Duration> {
    let rest = line.strip_prefix('[')?;
    let (_, rest) = rest.split_once("] ")?;
    let rest = rest.strip_prefix("INFO: task ")?;
    let (_, rest) = rest.split_once(" blocked for more than ")?;
    let (secs, _) = rest.split_once(" seconds")?;
    secs.parse().ok().map(Duration::from_secs)
}

/// Whether a console line is this guest's own kernel panicking (`[  29.82] Kernel panic -
/// not syncing: ...`); a nested guest's lines come through with a prefix.
fn own_kernel_panic(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
        .is_some_and(|(_, msg)| msg.starts_with("Kernel panic - not syncing"))
}

/// Whether a console line is the banner the guest's own kernel prints when it kills the task
/// it was running (`die()`: `[ 113.99] stack guard page: 0000 [#1] PREEMPT SMP NOPTI`,
/// `general protection fault: 0000 [#1] ...`, `invalid opcode: 0000 [#1] ...`, `Oops: 0002
/// [#1] ...`), the line before its task line. Warnings that print a task line too ("BUG:
/// scheduling while atomic", "BUG: sleeping function called from invalid context") have no
/// such banner and leave the task running.
fn own_kernel_oops(line: &str) -> bool {
    let Some((_, msg)) = line
        .strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
    else {
        return false;
    };
    let Some((_, rest)) = msg.rsplit_once(": ") else {
        return false;
    };
    let Some((code, rest)) = rest.split_once(" [#") else {
        return false;
    };
    !code.is_empty()
        && code.chars().all(|c| c.is_ascii_hexdigit())
        && rest
            .split_once(']')
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
}

/// Whether a line of an oops report names a KVM vCPU thread of a nested guest's QEMU as the
/// task it hit (`[ 113.99] CPU: 0 PID: 137 Comm: CPU 0/KVM Not tainted ...`).
fn oops_in_kvm_vcpu(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once("] "))
        .and_then(|(_, msg)| msg.split_once(" Comm: CPU "))
        .is_some_and(|(_, task)| {
            task.split_whitespace()
                .next()
                .is_some_and(|t| t.ends_with("/KVM"))
        })
}

/// Lines an oops report's task line comes within, after its banner (the next one, on 6.1).
const OOPS_TASK_LINE_WITHIN: u32 = 4;

/// What one run produced.
#[derive(Debug, Clone)]
pub struct Run {
    /// How it ended.
    pub ending: Ending,
    /// `@@VFBLK-RECORD` payloads, parsed as JSON.
    pub records: Vec<serde_json::Value>,
    /// `@@VFBLK-FAIL` messages.
    pub failures: Vec<String>,
    /// What the guest's kernel logged about programs that died (`@@VFBLK-KERNEL`: segfaults,
    /// fatal signals, the OOM killer), printed when the script failed.
    pub kernel: Vec<String>,
    /// Wall-clock time from QEMU's start until `/init` reported.
    pub boot_time: Option<Duration>,
    /// Wall-clock time of the whole run.
    pub elapsed: Duration,
    /// The serial console log.
    pub log: PathBuf,
    /// What QEMU's threads were doing when the run ended with QEMU still running (a deadline,
    /// a wedged guest): [`crate::process::thread_states`]. Empty when QEMU had exited.
    pub qemu_threads: Vec<String>,
}

impl Run {
    /// The first record that has the given key.
    pub fn record(&self, key: &str) -> Option<&serde_json::Value> {
        self.records.iter().find_map(|r| r.get(key))
    }

    /// An error unless the test script exited 0.
    pub fn expect_success(&self, what: &str) -> Result<()> {
        match &self.ending {
            Ending::Finished(0) if self.failures.is_empty() => Ok(()),
            ending => Err(LabError::Guest(format!(
                "{what}: {ending:?}; failures: {:?}; {}console log: {}\n{}",
                self.failures,
                if self.kernel.is_empty() {
                    String::new()
                } else {
                    format!("the guest kernel said: {:?}; ", self.kernel)
                },
                self.log.display(),
                tail(&self.log, 40)
            ))),
        }
    }
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// QEMU's complaints about the vhost-user connection in the stderr log beside the console
/// log `console`.
pub fn qemu_vhost_lines(console: &Path) -> Vec<String> {
    std::fs::read_to_string(console.with_extension("qemu-stderr"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("vhost") || l.contains("msg") || l.contains("connect")
        })
        .map(str::to_string)
        .collect()
}

/// How much of the console the runner shows while the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Nothing.
    Quiet,
    /// `@@VFBLK-STEP` progress lines.
    Steps,
    /// Every console line.
    All,
}

enum Line {
    Text(String),
    Closed,
}

/// Boots a guest, follows its console until it powers off or a deadline passes.
pub fn run(spec: &VmSpec, limits: Limits, log: &Path, echo: Echo) -> Result<Run> {
    run_watching(spec, limits, log, echo, &mut |_| {})
}

/// Like [`run`], calling `on_step` with the text of every `@@VFBLK-STEP` line as it arrives
/// (so the host can act while the guest runs: kill a backend, restart it).
pub fn run_watching(
    spec: &VmSpec,
    limits: Limits,
    log: &Path,
    echo: Echo,
    on_step: &mut dyn FnMut(&str),
) -> Result<Run> {
    let started = Instant::now();
    let stderr_log = log.with_extension("qemu-stderr");
    let mut tries = 0;
    let mut child = loop {
        let spawned = Command::new(&spec.qemu.binary)
            .envs(spec.qemu.env.iter().map(|(k, v)| (k, v)))
            .args(&spec.qemu.args)
            .args(spec.args(false))
            .stdin(if spec.start_gate.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_log)?)
            .spawn();
        match spawned {
            // A program written a moment ago may still be open for writing in a child that
            // another thread forked meanwhile (ETXTBSY): it closes at that child's exec.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => {
                return Err(LabError::Setup(format!(
                    "{}: cannot start {}: {e}",
                    spec.name,
                    spec.qemu.binary.display()
                )))
            }
            Ok(child) => break child,
        }
    };
    let stdout = child.stdout.take().expect("piped stdout");
    // The console's input, kept for the start gate.
    let mut console_input = child.stdin.take();
    let (tx, rx) = mpsc::channel();
    let mut log_file = File::create(log)?;
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = log_file.write_all(&buf);
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    if tx.send(Line::Text(line)).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Line::Closed);
    });

    let mut out = Run {
        ending: Ending::TimedOut,
        records: Vec::new(),
        failures: Vec::new(),
        kernel: Vec::new(),
        boot_time: None,
        elapsed: Duration::ZERO,
        log: log.to_path_buf(),
        qemu_threads: Vec::new(),
    };
    let mut exit_status = None;
    let mut vcpus = VcpuWatch::new(child.id(), VCPU_ASLEEP_AFTER);
    let mut next_look = Instant::now();
    // An oops report of this guest's kernel being read: its banner, and lines left in which
    // its task line may come.
    let mut oops: Option<(String, u32)> = None;
    loop {
        let deadline = if out.boot_time.is_none() {
            limits.boot
        } else {
            limits.total
        };
        let Some(left) = deadline.checked_sub(started.elapsed()) else {
            out.ending = if out.boot_time.is_none() {
                Ending::BootStalled
            } else {
                Ending::TimedOut
            };
            break;
        };
        // From boot on (a CPU the kernel has not brought up yet sleeps by right).
        if out.boot_time.is_some() && Instant::now() >= next_look {
            next_look = Instant::now() + VCPU_LOOK_EVERY;
            if let Some(what) = vcpus.look(Instant::now()) {
                tracing::warn!("{}: guest wedged: {what}", spec.name);
                out.ending = Ending::Wedged(what);
                break;
            }
        }
        match rx.recv_timeout(left.min(VCPU_LOOK_EVERY)) {
            Ok(Line::Text(line)) => {
                if echo == Echo::All {
                    // Defang markers so a guest of a guest cannot speak for the guest.
                    tracing::info!("[{}] {}", spec.name, line.replace(MARK, "@@(nested)"));
                }
                if own_kernel_panic(&line) {
                    tracing::warn!("{}: guest kernel panicked: {line}", spec.name);
                    out.ending = Ending::Wedged(line);
                    break;
                }
                // An oops in the thread that runs a nested guest's vCPU is the nested
                // virtualisation breaking this kernel (seen: a kernel stack overflow in
                // exc_general_protection under TCG's emulated SVM); that vCPU never runs
                // again, so the nested guest only freezes until a deadline.
                if let Some((banner, lines_left)) = oops.take() {
                    if oops_in_kvm_vcpu(&line) {
                        let what = format!(
                            "kernel oops in a nested guest's vCPU thread: {banner} / {line}"
                        );
                        tracing::warn!("{}: guest kernel wedged: {what}", spec.name);
                        out.ending = Ending::Wedged(what);
                        break;
                    }
                    if lines_left > 1 {
                        oops = Some((banner, lines_left - 1));
                    }
                }
                if own_kernel_oops(&line) {
                    oops = Some((line.clone(), OOPS_TASK_LINE_WITHIN));
                }
                let stuck = soft_lockup(&line).filter(|&t| t >= WEDGED_AFTER);
                let hung = hung_task(&line).filter(|&t| t >= HUNG_AFTER);
                if stuck.or(hung).is_some() {
                    tracing::warn!("{}: guest kernel wedged: {line}", spec.name);
                    out.ending = Ending::Wedged(line);
                    break;
                }
                let Some(pos) = line.find(MARK) else { continue };
                let tagged = &line[pos + MARK.len()..];
                let (tag, rest) = tagged.split_once(' ').unwrap_or((tagged, ""));
                match tag {
                    "-BOOTED" => out.boot_time = Some(started.elapsed()),
                    "-STEP" => {
                        if echo == Echo::Steps {
                            tracing::info!(
                                "[{} {:>5.1}s] {rest}",
                                spec.name,
                                started.elapsed().as_secs_f64()
                            );
                        }
                        if rest.trim() == GATE_STEP {
                            if let (Some(gate), Some(input)) =
                                (spec.start_gate.clone(), console_input.take())
                            {
                                let name = spec.name.clone();
                                std::thread::spawn(move || match gate.open(input) {
                                    Ok(answer) => tracing::info!(
                                        "{name}: start gate {}: {answer}",
                                        gate.dir.display()
                                    ),
                                    Err(e) => tracing::warn!(
                                        "{name}: start gate {}: {e}",
                                        gate.dir.display()
                                    ),
                                });
                            }
                        }
                        on_step(rest);
                    }
                    "-RECORD" => match serde_json::from_str(rest) {
                        Ok(v) => out.records.push(v),
                        Err(e) => out
                            .failures
                            .push(format!("unparsable record {rest:?}: {e}")),
                    },
                    "-FAIL" => out.failures.push(rest.to_string()),
                    "-KERNEL" => out.kernel.push(rest.to_string()),
                    "-EXIT" => exit_status = rest.trim().parse::<i32>().ok(),
                    _ => {}
                }
            }
            Ok(Line::Closed) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                out.ending = match exit_status {
                    Some(code) => Ending::Finished(code),
                    None => {
                        let stderr = tail(&stderr_log, 5);
                        match exit_of(&mut child) {
                            Some(status) => match crash_signal(status) {
                                Some(signal) => Ending::EmulatorCrashed(signal, stderr),
                                None if status.success()
                                    && stderr.is_empty()
                                    && out.boot_time.is_some() =>
                                {
                                    Ending::GuestReset
                                }
                                None => Ending::QemuExited(format!("QEMU {status}; {stderr}")),
                            },
                            None => Ending::QemuExited(stderr),
                        }
                    }
                };
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let powered_off = matches!(
        out.ending,
        Ending::Finished(_)
            | Ending::QemuExited(_)
            | Ending::GuestReset
            | Ending::EmulatorCrashed(..)
    );
    if !powered_off && matches!(child.try_wait(), Ok(None)) {
        out.qemu_threads = crate::process::thread_states(child.id());
        tracing::warn!(
            "{}: QEMU's threads as the run ends ({:?}): {}",
            spec.name,
            out.ending,
            out.qemu_threads.join("; ")
        );
    }
    stop(&mut child, powered_off);
    let _ = reader.join();
    out.elapsed = started.elapsed();
    Ok(out)
}

/// The signal that killed QEMU if it died of a crash (segfault, abort, bus error, illegal
/// instruction, arithmetic fault).
fn crash_signal(status: std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    const CRASH_SIGNALS: [i32; 5] = [
        libc::SIGSEGV,
        libc::SIGABRT,
        libc::SIGBUS,
        libc::SIGILL,
        libc::SIGFPE,
    ];
    status.signal().filter(|s| CRASH_SIGNALS.contains(s))
}

/// How QEMU ended, waiting up to 2 s for it to exit after its console closed.
fn exit_of(child: &mut Child) -> Option<std::process::ExitStatus> {
    for _ in 0..40 {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
    None
}

/// Kills the QEMU we started, if it is still running, and reaps it.
fn stop(child: &mut Child, powered_off: bool) {
    if let Ok(None) = child.try_wait() {
        // Give a guest that already powered off a moment to let QEMU exit by itself.
        for _ in 0..if powered_off { 40 } else { 0 } {
            std::thread::sleep(Duration::from_millis(50));
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// A run that retried stalled boots.
#[derive(Debug, Clone)]
pub struct RetriedRun {
    /// The last run (the one that booted, or the last stalled one).
    pub run: Run,
    /// How many boots were tried (1 = first time).
    pub tries: u32,
    /// Time spent in runs that stalled or wedged.
    pub stalled: Vec<Duration>,
}

/// Runs a guest, starting it again (up to `max_tries` in all) only when its boot stalled or
/// died before the test script began, or its kernel wedged ([`Ending::Wedged`]). A guest whose
/// test ran and failed or timed out is never retried.
pub fn run_retrying_stalls(
    spec: &VmSpec,
    limits: Limits,
    max_tries: u32,
    log: &Path,
    echo: Echo,
) -> Result<RetriedRun> {
    let mut stalled = Vec::new();
    let mut tries = 0;
    loop {
        tries += 1;
        let run = run(spec, limits, log, echo)?;
        let started = run.boot_time.is_some();
        let retry = match &run.ending {
            Ending::BootStalled => Some("boot stalled"),
            Ending::Wedged(_) | Ending::EmulatorCrashed(..) if started && !spec.retry_started => {
                None
            }
            Ending::Wedged(_) => Some("guest kernel wedged"),
            // The guest died before its test script began (a kernel panic at boot under
            // nested virtualisation): nothing of the test ran, so a new boot is safe.
            Ending::QemuExited(_) if run.boot_time.is_none() => Some("guest died while booting"),
            Ending::EmulatorCrashed(..) => Some("QEMU crashed"),
            _ => None,
        };
        if let (Some(why), true) = (retry, tries < max_tries) {
            tracing::warn!(
                "{}: {why} after {:.0}s (try {tries} of {max_tries}); starting it again",
                spec.name,
                run.elapsed.as_secs_f64()
            );
            let _ = std::fs::rename(log, log.with_extension(format!("stalled{tries}")));
            stalled.push(run.elapsed);
            continue;
        }
        // One line per guest run in the test command's log, to see where its time goes.
        tracing::info!(
            "{} ({}): booted in {}, {:.1} s in all, {tries} tries ({:.1} s lost to retries)",
            spec.name,
            log.parent().unwrap_or(log).display(),
            run.boot_time
                .map_or("never".to_string(), |t| format!("{:.1} s", t.as_secs_f64())),
            run.elapsed.as_secs_f64(),
            stalled
                .iter()
                .map(Duration::as_secs_f64)
                .fold(0.0, |a, b| a + b)
        );
        return Ok(RetriedRun {
            run,
            tries,
            stalled,
        });
    }
}

/// Runs a guest with the console and QEMU monitor on this terminal (Ctrl-A X quits).
pub fn run_interactive(spec: &VmSpec) -> Result<()> {
    let status = Command::new(&spec.qemu.binary)
        .envs(spec.qemu.env.iter().map(|(k, v)| (k, v)))
        .args(&spec.qemu.args)
        .args(spec.args(true))
        .status()
        .map_err(|e| {
            LabError::Setup(format!("cannot start {}: {e}", spec.qemu.binary.display()))
        })?;
    if !status.success() {
        return Err(LabError::Guest(format!(
            "{} exited with {status}",
            spec.qemu.binary.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_thread_that_is_never_scheduled_is_named_and_a_waking_one_is_not() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let asleep = std::thread::Builder::new()
            .name("CPU 7/TCG".into())
            .spawn(std::thread::park)
            .unwrap();
        let stop2 = stop.clone();
        let waking = std::thread::Builder::new()
            .name("CPU 8/TCG".into())
            .spawn(move || {
                while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap();
        let mut watch = VcpuWatch::new(std::process::id(), Duration::from_millis(300));
        let start = Instant::now();
        let mut found = None;
        while start.elapsed() < Duration::from_secs(3) && found.is_none() {
            found = watch.look(Instant::now());
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        asleep.thread().unpark();
        asleep.join().unwrap();
        waking.join().unwrap();
        let found = found.expect("the parked vCPU thread was named");
        assert!(found.contains("\"CPU 7/TCG\""), "{found}");
        assert!(start.elapsed() >= Duration::from_millis(300));
        // Threads of other names are not watched.
        assert!(watch.seen.values().all(|(n, ..)| n.starts_with("CPU ")));
        assert_eq!(watch.seen.len(), 2, "{:?}", watch.seen);
    }

    #[test]
    fn a_start_gate_lets_its_parties_go_together_or_each_alone_after_the_wait() {
        let dir = std::env::temp_dir().join(format!("vfblk-gate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let gate = |party: &str, wait_ms: u64| StartGate {
            dir: dir.clone(),
            party: party.into(),
            parties: 2,
            wait: Duration::from_millis(wait_ms),
        };
        // The first waits for the second, which comes 300 ms later.
        let first = gate("a", 10_000);
        let waiting = std::thread::spawn(move || {
            let mut console = Vec::new();
            let started = Instant::now();
            let answer = first.open(&mut console).unwrap();
            (answer, console, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let mut console = Vec::new();
        assert_eq!(gate("b", 10_000).open(&mut console).unwrap(), "go");
        assert_eq!(console, b"go\n");
        let (answer, console, waited) = waiting.join().unwrap();
        assert_eq!((answer, console.as_slice()), ("go", b"go\n".as_slice()));
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        // A party alone is let go when its wait runs out.
        let _ = std::fs::remove_dir_all(&dir);
        let mut console = Vec::new();
        let started = Instant::now();
        assert_eq!(gate("c", 200).open(&mut console).unwrap(), "alone");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(console, b"alone\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_controllers_of_one_subsystem_share_its_namespace() {
        let mut spec = VmSpec::new("t", Accel::Tcg, Path::new("/k"), Path::new("/i"));
        spec.iommu = true;
        spec.nvme.push(NvmeDisk {
            image: "/d.img".into(),
            serial: "abc".into(),
            more_namespaces: Vec::new(),
            controllers: 2,
        });
        let args = spec.args(false).join(" ");
        let subsys = args.find("nvme-subsys,id=nvmes0,").unwrap();
        let first = args
            .find("nvme,id=nvmec0,serial=abc,subsys=nvmes0")
            .unwrap();
        let second = args
            .find("nvme,id=nvmec0p1,serial=abc,subsys=nvmes0")
            .unwrap();
        let ns = args
            .find("nvme-ns,drive=nvm0,bus=nvmec0,nsid=1,shared=on")
            .unwrap();
        assert!(subsys < first && first < second && second < ns, "{args}");
        assert!(
            !args.contains("serial=abc,drive="),
            "no namespace of its own: {args}"
        );
    }

    #[test]
    fn args_put_iommu_before_devices_and_share_ram() {
        let mut spec = VmSpec::new("t", Accel::Tcg, Path::new("/k"), Path::new("/i"));
        spec.iommu = true;
        spec.nvme.push(NvmeDisk {
            image: "/d.img".into(),
            serial: "abc".into(),
            more_namespaces: vec!["/n2.img".into()],
            controllers: 1,
        });
        let args = spec.args(false).join(" ");
        let iommu = args.find("intel-iommu,intremap=on").unwrap();
        let nvme = args.find("nvme,id=nvmec0,serial=abc,drive=nvm0").unwrap();
        assert!(iommu < nvme);
        let ns2 = args.find("nvme-ns,drive=nvm0n2,bus=nvmec0,nsid=2").unwrap();
        assert!(nvme < ns2 && args.contains("file=/n2.img,if=none,id=nvm0n2"));
        assert!(args.contains("share=on"));
        assert!(args.contains("kernel-irqchip=split"));
        assert!(args.contains("intel_iommu=on"));
        assert!(args.contains("tcg,thread=multi"));
    }

    #[test]
    fn a_root_disk_is_the_first_virtio_disk_and_is_never_written() {
        let mut spec = VmSpec::new("t", Accel::Tcg, Path::new("/k"), Path::new("/i"));
        spec.virtio_disks.push("/data.img".into());
        spec.root_disk = Some("/root.ext4".into());
        let args = spec.args(false).join(" ");
        let root = args
            .find("file=/root.ext4,if=none,id=root,format=raw,snapshot=on")
            .unwrap();
        let data = args.find("file=/data.img").unwrap();
        assert!(root < data, "{args}");
        assert!(args.contains("virtio-blk-pci,drive=root"), "{args}");
    }
}

#[cfg(test)]
mod runner_tests {
    //! The runner's deadline and retry policy, exercised with small shell programs standing
    //! in for QEMU (they print what a guest's console would).
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_qemu(dir: &Path, name: &str, body: &str) -> VmSpec {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut spec = VmSpec::new(name, Accel::Tcg, Path::new("/k"), Path::new("/i"));
        spec.qemu.binary = path;
        spec
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vfblk-vm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const SHORT: Limits = Limits {
        boot: Duration::from_millis(700),
        total: Duration::from_secs(5),
    };

    #[test]
    fn stalled_boot_is_retried_and_the_process_killed() {
        let dir = temp_dir("stall");
        let pids = dir.join("pids");
        let spec = fake_qemu(
            &dir,
            "stall",
            &format!("echo $$ >> {}\nexec sleep 30", pids.display()),
        );
        let retried = run_retrying_stalls(&spec, SHORT, 3, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 3);
        assert_eq!(retried.stalled.len(), 2);
        assert_eq!(retried.run.ending, Ending::BootStalled);
        let pids = std::fs::read_to_string(&pids).unwrap();
        assert_eq!(pids.lines().count(), 3);
        for pid in pids.lines() {
            let pid: i32 = pid.parse().unwrap();
            // SAFETY: signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            assert!(!alive, "stalled fake QEMU {pid} still running");
        }
    }

    #[test]
    fn failed_test_is_not_retried() {
        let dir = temp_dir("fail");
        let spec = fake_qemu(
            &dir,
            "fail",
            "echo '@@VFBLK-BOOTED 1.0'\necho '@@VFBLK-FAIL disk read back wrong'\necho '@@VFBLK-EXIT 1'",
        );
        let retried = run_retrying_stalls(&spec, SHORT, 3, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 1);
        assert_eq!(retried.run.ending, Ending::Finished(1));
        assert_eq!(
            retried.run.failures,
            vec!["disk read back wrong".to_string()]
        );
        assert!(retried.run.expect_success("t").is_err());
        // What the guest's kernel said about a program that died is in the error.
        let spec = fake_qemu(
            &dir,
            "segv",
            "echo '@@VFBLK-BOOTED 1.0'\necho '@@VFBLK-FAIL fio exited with 139'\n\
             echo '@@VFBLK-KERNEL fio[212]: segfault at 0 ip 0000 sp 0000 error 4'\n\
             echo '@@VFBLK-EXIT 1'",
        );
        let retried = run_retrying_stalls(&spec, SHORT, 3, &dir.join("log2"), Echo::Quiet).unwrap();
        assert_eq!(retried.run.kernel.len(), 1);
        let e = retried.run.expect_success("t").unwrap_err().to_string();
        assert!(e.contains("fio[212]: segfault at 0"), "{e}");
    }

    /// The oops seen in the lab (a kernel stack overflow in the thread running a nested
    /// guest's vCPU) ends the run at once as wedged, not at its deadline, and the run is
    /// tried again; the same oops in another task does not end it.
    #[test]
    fn an_oops_in_a_nested_guests_vcpu_thread_ends_the_run_as_wedged_at_once() {
        let dir = temp_dir("oops");
        let oops = |comm: &str| {
            format!(
                "echo '@@VFBLK-BOOTED 0.5'\n\
                 echo '[  113.990336] BUG: TASK stack guard page was hit at 0000000042771ac9'\n\
                 echo '[  113.990336] stack guard page: 0000 [#1] PREEMPT SMP NOPTI'\n\
                 echo '[  113.990336] CPU: 0 PID: 137 Comm: {comm} Not tainted 6.1.0-57-amd64 #1'\n\
                 exec sleep 30"
            )
        };
        let limits = Limits {
            boot: Duration::from_secs(3),
            total: Duration::from_secs(4),
        };
        let spec = fake_qemu(&dir, "oops", &oops("CPU 0/KVM"));
        let started = Instant::now();
        let wedged = run(&spec, limits, &dir.join("log"), Echo::Quiet).unwrap();
        assert!(
            matches!(&wedged.ending, Ending::Wedged(w) if w.contains("stack guard page") && w.contains("CPU 0/KVM")),
            "{:?}",
            wedged.ending
        );
        assert!(wedged.ending.emulator_fault());
        assert!(started.elapsed() < Duration::from_secs(3), "ended at once");
        let retried = run_retrying_stalls(&spec, limits, 2, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 2, "tried again");
        let other = fake_qemu(&dir, "oops-other", &oops("vfblk-bridge"));
        let timed_out = run(&other, limits, &dir.join("log2"), Echo::Quiet).unwrap();
        assert_eq!(timed_out.ending, Ending::TimedOut);
        // A warning that names the vCPU thread but kills nothing (no die banner).
        let warning = fake_qemu(
            &dir,
            "bug-warning",
            "echo '@@VFBLK-BOOTED 0.5'\n\
             echo '[   42.1] BUG: scheduling while atomic: CPU 0/KVM/137/0x00000002'\n\
             echo '[   42.1] CPU: 0 PID: 137 Comm: CPU 0/KVM Not tainted 6.1.0-57-amd64 #1'\n\
             exec sleep 30",
        );
        let not_wedged = run(&warning, limits, &dir.join("log3"), Echo::Quiet).unwrap();
        assert_eq!(not_wedged.ending, Ending::TimedOut);
    }

    #[test]
    fn records_are_parsed_and_hang_after_boot_times_out() {
        let dir = temp_dir("hang");
        let spec = fake_qemu(
            &dir,
            "hang",
            "echo 'noise @@VFBLK-BOOTED 0.5'\necho '@@VFBLK-RECORD {\"a\": 1}'\nexec sleep 30",
        );
        let limits = Limits {
            boot: Duration::from_secs(3),
            total: Duration::from_secs(1),
        };
        let run = run(&spec, limits, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(run.ending, Ending::TimedOut);
        assert!(run.boot_time.is_some());
        assert_eq!(run.record("a"), Some(&serde_json::json!(1)));
        let retried = run_retrying_stalls(&spec, limits, 3, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 1, "a guest that booted must not be retried");
    }

    #[test]
    fn soft_lockups_are_read_only_from_this_guests_kernel() {
        let own = "[  598.261772] watchdog: BUG: soft lockup - CPU#1 stuck for 540s! [qemu:103]";
        assert_eq!(soft_lockup(own), Some(Duration::from_secs(540)));
        let nested = format!(" INFO [L3] {own}");
        assert_eq!(soft_lockup(&nested), None);
        assert_eq!(
            soft_lockup("[    1.0] rcu: INFO: rcu_preempt self-detected stall"),
            None
        );
        assert!(own_kernel_panic(
            "[   29.821377] Kernel panic - not syncing: Fatal exception in interrupt"
        ));
        assert!(!own_kernel_panic(
            " INFO [L3] [   16.3] Kernel panic - not syncing: Fatal exception"
        ));
        let oops = "[  113.990336] stack guard page: 0000 [#1] PREEMPT SMP NOPTI";
        assert!(own_kernel_oops(oops));
        assert!(own_kernel_oops(
            "[   42.1] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] PREEMPT SMP NOPTI"
        ));
        assert!(own_kernel_oops(
            "[   42.1] invalid opcode: 0000 [#2] PREEMPT SMP NOPTI"
        ));
        assert!(!own_kernel_oops(&format!(" INFO [L3] {oops}")));
        assert!(!own_kernel_oops(
            "[  113.990336] BUG: TASK stack guard page was hit at 0000000042771ac9 (stack is 00000000dcb5fefe..000000006e8a2926)"
        ));
        assert!(!own_kernel_oops(
            "[   42.1] BUG: scheduling while atomic: CPU 0/KVM/137/0x00000002"
        ));
        assert!(!own_kernel_oops(
            "[  598.26] watchdog: BUG: soft lockup - CPU#1 stuck for 540s! [qemu:103]"
        ));
        let task = "[  113.990336] CPU: 0 PID: 137 Comm: CPU 0/KVM Not tainted 6.1.0-57-amd64 #1  Debian 6.1.192-3";
        assert!(oops_in_kvm_vcpu(task));
        assert!(!oops_in_kvm_vcpu(
            "[  113.99] CPU: 0 PID: 90 Comm: vfblk-bridge Not tainted 6.1.0-57-amd64 #1"
        ));
        assert!(!oops_in_kvm_vcpu(&format!(" INFO [L3] {task}")));
        let hung =
            "[  485.009067] INFO: task qemu-system-x86:140 blocked for more than 241 seconds.";
        assert_eq!(hung_task(hung), Some(Duration::from_secs(241)));
        assert_eq!(hung_task(&format!(" INFO [L3] {hung}")), None);
        assert_eq!(
            hung_task("[  364.1]       Tainted: G        W          6.1.0-56-amd64 #1"),
            None
        );
    }

    #[test]
    fn a_wedged_kernel_ends_the_run_early_and_is_retried() {
        let dir = temp_dir("wedged");
        let spec = fake_qemu(
            &dir,
            "wedged",
            "echo '@@VFBLK-BOOTED 1.0'\n\
             echo '[   30.1] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [q:1]'\n\
             echo '[  130.1] watchdog: BUG: soft lockup - CPU#1 stuck for 122s! [q:1]'\n\
             exec sleep 30",
        );
        let started = Instant::now();
        let retried = run_retrying_stalls(&spec, SHORT, 2, &dir.join("log"), Echo::Quiet).unwrap();
        assert!(started.elapsed() < SHORT.total, "not stopped early");
        assert_eq!(retried.tries, 2);
        match &retried.run.ending {
            Ending::Wedged(line) => assert!(line.contains("122s"), "{line}"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(retried.run.expect_success("t").is_err());

        // A guest whose run must overlap outside events is not run again once started.
        let mut once = spec.clone();
        once.retry_started = false;
        let retried = run_retrying_stalls(&once, SHORT, 2, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 1);
        assert!(matches!(retried.run.ending, Ending::Wedged(_)));
    }

    #[test]
    fn a_guest_that_resets_itself_silently_is_an_emulator_fault_and_other_exits_are_not() {
        let dir = temp_dir("reset");
        for (script, fault) in [
            ("echo '@@VFBLK-BOOTED 1.0'\nexit 0", true),
            (
                "echo '@@VFBLK-BOOTED 1.0'\necho 'qemu: oops' >&2\nexit 0",
                false,
            ),
            ("echo '@@VFBLK-BOOTED 1.0'\nexit 1", false),
            (
                "echo '@@VFBLK-BOOTED 1.0'\necho '@@VFBLK-EXIT 1'\nexit 0",
                false,
            ),
        ] {
            let spec = fake_qemu(&dir, "reset", script);
            let run = run(&spec, SHORT, &dir.join("log"), Echo::Quiet).unwrap();
            assert_eq!(
                run.ending.emulator_fault(),
                fault,
                "{script}: {:?}",
                run.ending
            );
        }
        assert!(Ending::Wedged("x".into()).emulator_fault());
        assert!(Ending::EmulatorCrashed(libc::SIGSEGV, String::new()).emulator_fault());
        assert!(!Ending::TimedOut.emulator_fault());
    }

    #[test]
    fn qemu_exiting_early_is_reported() {
        let dir = temp_dir("exit");
        let spec = fake_qemu(&dir, "exit", "echo 'qemu: could not open disk' >&2\nexit 1");
        let run = run(&spec, SHORT, &dir.join("log"), Echo::Quiet).unwrap();
        match run.ending {
            Ending::QemuExited(msg) => {
                assert!(msg.contains("could not open disk"), "{msg}");
                assert!(msg.contains("exit status: 1"), "{msg}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_guest_dying_before_its_test_is_retried_and_one_dying_after_is_not() {
        let dir = temp_dir("died");
        let before = fake_qemu(&dir, "before", "echo 'Kernel panic - not syncing'\nexit 0");
        let retried =
            run_retrying_stalls(&before, SHORT, 2, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 2);
        let after = fake_qemu(&dir, "after", "echo '@@VFBLK-BOOTED 1.0'\nexit 1");
        let retried = run_retrying_stalls(&after, SHORT, 2, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 1, "the test had begun: its failure stands");
        assert!(matches!(retried.run.ending, Ending::QemuExited(_)));
    }

    #[test]
    fn qemu_crashing_mid_test_is_retried_and_reported_with_its_signal() {
        let dir = temp_dir("crash");
        let crash = fake_qemu(
            &dir,
            "crash",
            "echo '@@VFBLK-BOOTED 1.0'\necho 'segfault in the emulator' >&2\nkill -SEGV $$",
        );
        let retried = run_retrying_stalls(&crash, SHORT, 2, &dir.join("log"), Echo::Quiet).unwrap();
        assert_eq!(retried.tries, 2, "a crashed emulator is retried");
        match retried.run.ending {
            Ending::EmulatorCrashed(signal, stderr) => {
                assert_eq!(signal, libc::SIGSEGV);
                assert!(stderr.contains("segfault in the emulator"), "{stderr}");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
