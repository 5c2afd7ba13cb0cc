//! What the suite measures and what it found: its backends, clients and workloads, and the
//! result the suite writes as JSON and markdown and `plot` draws (both use this module, so
//! neither depends on the other for these types).

use serde_json::Value;

use crate::system::nvme_vhost::NvmeLabResult;
use crate::system::target::ScaleResult;

/// A backend of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// vfblk-bridge, `null` backend, polling.
    OursNull,
    /// vfblk-bridge, `mem` backend (RAM disk in /dev/shm), polling.
    OursMem,
    /// vfblk-bridge, `mem` backend on hugetlbfs (2 MiB pages, as SPDK's malloc bdev has).
    OursMemHuge,
    /// vfblk-bridge, `file` backend (io_uring) on /dev/shm, polling.
    OursFile,
    /// qemu-storage-daemon, `null-co`.
    QsdNull,
    /// qemu-storage-daemon, file on /dev/shm with io_uring.
    QsdFile,
    /// SPDK vhost, null bdev.
    SpdkNull,
    /// SPDK vhost, malloc bdev.
    SpdkMalloc,
    /// cloud-hypervisor's vhost_user_block, raw file on /dev/shm.
    ChFile,
    /// vfblk-bridge, `rbd` backend (librbd) on the suite's Ceph cluster, polling.
    OursRbd,
    /// The same without `--poll`: its poller yields its core now and then while it waits
    /// (and sleeps when nothing is in flight), so librbd's threads on that core run sooner.
    OursRbdSleep,
    /// The same with only its poller pinned to the backend core (`--cpus`), the process
    /// not: librbd's threads may run on either core instead of waiting behind the poller,
    /// which spins while requests are in librbd.
    OursRbdCpus,
    /// qemu-storage-daemon, `driver=rbd` on the same cluster (librbd's cache off, as ours).
    QsdRbd,
}

impl Backend {
    /// Every backend, in table order.
    pub const ALL: [Backend; 13] = [
        Backend::OursNull,
        Backend::SpdkNull,
        Backend::QsdNull,
        Backend::OursMem,
        Backend::OursMemHuge,
        Backend::SpdkMalloc,
        Backend::OursFile,
        Backend::QsdFile,
        Backend::ChFile,
        Backend::OursRbd,
        Backend::OursRbdSleep,
        Backend::OursRbdCpus,
        Backend::QsdRbd,
    ];

    /// Short name (command line, JSON).
    pub fn id(self) -> &'static str {
        match self {
            Backend::OursNull => "vfblk-null",
            Backend::OursMem => "vfblk-mem",
            Backend::OursMemHuge => "vfblk-mem-huge",
            Backend::OursFile => "vfblk-file",
            Backend::QsdNull => "qsd-null",
            Backend::QsdFile => "qsd-file",
            Backend::SpdkNull => "spdk-null",
            Backend::SpdkMalloc => "spdk-malloc",
            Backend::ChFile => "ch-file",
            Backend::OursRbd => "vfblk-rbd",
            Backend::OursRbdSleep => "vfblk-rbd-sleep",
            Backend::OursRbdCpus => "vfblk-rbd-cpus",
            Backend::QsdRbd => "qsd-rbd",
        }
    }

    /// What it is, for tables.
    pub fn describe(self) -> &'static str {
        match self {
            Backend::OursNull => "vfblk-bridge null",
            Backend::OursMem => "vfblk-bridge mem (RAM, 4 KiB pages)",
            Backend::OursMemHuge => "vfblk-bridge mem (RAM, 2 MiB pages)",
            Backend::OursFile => "vfblk-bridge file (io_uring, /dev/shm)",
            Backend::QsdNull => "qemu-storage-daemon null-co",
            Backend::QsdFile => "qemu-storage-daemon file (io_uring, /dev/shm)",
            Backend::SpdkNull => "SPDK vhost null bdev",
            Backend::SpdkMalloc => "SPDK vhost malloc bdev (RAM)",
            Backend::ChFile => "cloud-hypervisor vhost_user_block (/dev/shm)",
            Backend::OursRbd => "vfblk-bridge rbd (librbd)",
            Backend::OursRbdSleep => "vfblk-bridge rbd, no --poll",
            Backend::OursRbdCpus => "vfblk-bridge rbd, only the poller pinned (--cpus)",
            Backend::QsdRbd => "qemu-storage-daemon rbd (librbd)",
        }
    }

    /// What it moves: `null`, `ram`, `file` or `rbd`.
    pub fn kind(self) -> &'static str {
        match self {
            Backend::OursNull | Backend::QsdNull | Backend::SpdkNull => "null",
            Backend::OursMem | Backend::OursMemHuge | Backend::SpdkMalloc => "ram",
            Backend::OursFile | Backend::QsdFile | Backend::ChFile => "file",
            Backend::OursRbd | Backend::OursRbdSleep | Backend::OursRbdCpus | Backend::QsdRbd => {
                "rbd"
            }
        }
    }

    /// Whether a run without `--backends` measures it: every backend but the `rbd` kinds,
    /// which start a Ceph cluster (its OSD takes hundreds of megabytes and shares the
    /// cores) and are measured only when named.
    pub fn in_default(self) -> bool {
        self.kind() != "rbd"
    }

    pub(crate) fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.id() == id)
    }

    /// Whether it is our `vfblk-bridge`.
    pub fn ours(self) -> bool {
        matches!(
            self,
            Backend::OursNull
                | Backend::OursMem
                | Backend::OursMemHuge
                | Backend::OursFile
                | Backend::OursRbd
                | Backend::OursRbdSleep
                | Backend::OursRbdCpus
        )
    }
}

/// A client of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// `vfblk-loadgen --polled` (a polling driver: no interrupts asked).
    Loadgen,
    /// `vfblk-blkio-load --poll` (libblkio poll queues).
    Blkio,
    /// `vfblk-loadgen --interrupts` (sleeps on interrupts like a guest's driver, so its core
    /// is free between completions): by default for the `rbd` kinds only, whose cluster
    /// needs that core on a small machine.
    Interrupts,
    /// `vfblk-loadgen --polled --packed`: the polling driver on packed virtqueues, for the
    /// split-against-packed comparison (never by default; a backend that does not offer
    /// packed rings fails its cells: qemu-storage-daemon's, cloud-hypervisor's).
    Packed,
}

impl Client {
    /// Every client, in table order.
    pub const ALL: [Client; 4] = [
        Client::Loadgen,
        Client::Blkio,
        Client::Interrupts,
        Client::Packed,
    ];

    /// Short name.
    pub fn id(self) -> &'static str {
        match self {
            Client::Loadgen => "loadgen",
            Client::Blkio => "libblkio",
            Client::Interrupts => "loadgen-irq",
            Client::Packed => "loadgen-packed",
        }
    }

    /// Whether a run without `--clients` uses it for the backends other than the `rbd`
    /// kinds (those get every client).
    pub fn in_default(self) -> bool {
        matches!(self, Client::Loadgen | Client::Blkio)
    }

    pub(crate) fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.id() == id)
    }
}

/// One workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Short name.
    pub id: &'static str,
    /// Writes instead of reads.
    pub write: bool,
    /// Bytes per request.
    pub block_size: u32,
    /// Requests in flight per queue.
    pub qd: u16,
    /// Queues.
    pub queues: u16,
    /// In block order instead of at random.
    pub sequential: bool,
}

const fn workload(
    id: &'static str,
    write: bool,
    block_size: u32,
    qd: u16,
    queues: u16,
    sequential: bool,
) -> Workload {
    Workload {
        id,
        write,
        block_size,
        qd,
        queues,
        sequential,
    }
}

/// The workloads of the `rbd` kinds when `--workloads` is not given: 4 KiB random reads and
/// writes at QD1 and QD32.
pub const RBD_WORKLOADS: [&str; 4] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
];

/// Every workload, in table order.
pub const WORKLOADS: [Workload; 8] = [
    workload("randread-4k-qd1", false, 4096, 1, 1, false),
    workload("randread-4k-qd32", false, 4096, 32, 1, false),
    workload("randread-4k-qd128", false, 4096, 128, 1, false),
    workload("randwrite-4k-qd1", true, 4096, 1, 1, false),
    workload("randwrite-4k-qd32", true, 4096, 32, 1, false),
    workload("randwrite-4k-qd128", true, 4096, 128, 1, false),
    workload("randread-4k-qd32-4queues", false, 4096, 32, 4, false),
    workload("seqread-128k-qd32", false, 128 << 10, 32, 1, true),
];

impl Workload {
    pub(crate) fn describe(&self) -> String {
        let size = if self.block_size >= 1024 {
            format!("{} KiB", self.block_size / 1024)
        } else {
            format!("{} B", self.block_size)
        };
        format!(
            "{} {} {}, QD{}{}",
            if self.sequential {
                "sequential"
            } else {
                "random"
            },
            size,
            if self.write { "write" } else { "read" },
            self.qd,
            if self.queues > 1 {
                format!(" x {} queues", self.queues)
            } else {
                String::new()
            }
        )
    }
}

/// One backend killed and started again under a verifying client.
#[derive(Debug, Clone)]
pub struct RestartRun {
    /// The backend.
    pub backend: Backend,
    /// SIGKILLs done.
    pub restarts: u32,
    /// The client's report, or why there is none.
    pub report: std::result::Result<Value, String>,
    /// The client's command line.
    pub client_command: String,
}

/// One measurement.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Backend id.
    pub backend: Backend,
    /// Client.
    pub client: Client,
    /// Workload.
    pub workload: Workload,
    /// The client's report (the load generator's JSON shape), or why there is none.
    pub report: std::result::Result<Value, String>,
    /// Backend CPU time per I/O, in nanoseconds (the whole process: librbd's threads too).
    pub backend_cpu_ns_per_io: Option<f64>,
    /// The Ceph daemons' CPU time per I/O (mon and OSD), in nanoseconds: `rbd` kinds only.
    pub cluster_cpu_ns_per_io: Option<f64>,
    /// Cores other processes kept busy on average while the client ran: the machine's busy
    /// time less the backend's, the client's and the Ceph daemons'. On a shared machine it
    /// says which figures the scheduler moved.
    pub outside_cores: Option<f64>,
    /// The OSD's own time per op in milliseconds, from its arrival to its reply (its
    /// `op_latency`): `rbd` kinds only.
    pub osd_op_ms: Option<f64>,
    /// The backend's command line.
    pub backend_command: String,
    /// The client's command line.
    pub client_command: String,
}

impl Measurement {
    pub(crate) fn iops(&self) -> Option<f64> {
        self.report.as_ref().ok().and_then(|r| r["iops"].as_f64())
    }
}

/// The whole result.
pub struct SuiteResult {
    /// Every measurement.
    pub measurements: Vec<Measurement>,
    /// Our rows measured again with the baseline binary (`--baseline`), in the same order.
    pub baseline: Vec<Measurement>,
    /// Ours and SPDK's held at one fixed rate, by busy time per I/O (unless turned off).
    pub fixed_rate: Option<crate::system::fixed_rate::FixedRateResult>,
    /// The restart runs.
    pub restarts: Vec<RestartRun>,
    /// Backends not run, and why.
    pub skipped: Vec<(Backend, String)>,
    /// The machine and versions.
    pub environment: Value,
    /// 1, 4 and 16 controllers on one poller (unless `--no-scale`), or why not.
    pub scale: Option<std::result::Result<ScaleResult, String>>,
    /// The lab's NVMe path (with `--nvme-lab`), or why not.
    pub nvme_lab: Option<std::result::Result<NvmeLabResult, String>>,
    /// The Ceph cluster of the `rbd` kinds (when one was asked for), or why it did not start.
    pub rbd: Option<std::result::Result<Value, String>>,
}

/// A client report's pauses around reconnects, in milliseconds.
pub fn pauses_ms(report: &Value) -> Vec<f64> {
    report["pauses_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_f64()).collect())
        .unwrap_or_default()
}
