//! The lab's NVMe path over vhost-user: in one lab guest, the same emulated NVMe controller
//! served as a vhost-user-blk disk four ways, each driven by the same client
//! (`vfblk-loadgen --polled`) on the other vCPU:
//!
//! - our bridge's `nvme` backend (our VFIO driver, polled);
//! - qemu-storage-daemon's `driver=nvme` (QEMU's own userspace VFIO NVMe driver);
//! - qemu-storage-daemon's `host_device` on the guest kernel's nvme driver (io_uring,
//!   O_DIRECT);
//! - our bridge's `file` backend on the same kernel block device (io_uring).
//!
//! Everything runs under TCG: the emulated CPU is the limit of every row (see
//! `../shared/notes/vm-lab.md`), so the figures compare costs per I/O on that CPU, not what
//! an SSD would do.

use std::time::Duration;

use serde_json::{json, Value};
use vfblk_lab::scenario::{Contents, Lab};
use vfblk_lab::vm::Echo;

use crate::{Error, Result};

/// A backend of the lab's NVMe path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvmeBackend {
    /// vfblk-bridge `--backend nvme:ADDR`.
    Ours,
    /// qemu-storage-daemon `driver=nvme`.
    QsdNvme,
    /// qemu-storage-daemon `host_device` on /dev/nvme0n1.
    QsdKernel,
    /// vfblk-bridge `--backend file:/dev/nvme0n1`.
    OursKernel,
}

impl NvmeBackend {
    /// Every backend, in table order.
    pub const ALL: [NvmeBackend; 4] = [
        NvmeBackend::Ours,
        NvmeBackend::QsdNvme,
        NvmeBackend::QsdKernel,
        NvmeBackend::OursKernel,
    ];

    /// Short name (JSON, the guest's records).
    pub fn id(self) -> &'static str {
        match self {
            NvmeBackend::Ours => "vfblk-nvme",
            NvmeBackend::QsdNvme => "qsd-nvme",
            NvmeBackend::QsdKernel => "qsd-kernel-nvme",
            NvmeBackend::OursKernel => "vfblk-file-kernel-nvme",
        }
    }

    /// What it is, for tables.
    pub fn describe(self) -> &'static str {
        match self {
            NvmeBackend::Ours => "vfblk-bridge nvme (our VFIO driver, polled)",
            NvmeBackend::QsdNvme => "qemu-storage-daemon driver=nvme (QEMU's VFIO driver)",
            NvmeBackend::QsdKernel => {
                "qemu-storage-daemon host_device (kernel nvme driver, io_uring, O_DIRECT)"
            }
            NvmeBackend::OursKernel => "vfblk-bridge file (kernel nvme driver, io_uring)",
        }
    }

    /// The backend's command in the guest (`$bdf` is the controller's PCI address).
    fn command(self) -> String {
        let export = "--export type=vhost-user-blk,id=e0,node-name=d0,addr.type=unix,addr.path=/tmp/nv.sock,writable=on,num-queues=1";
        match self {
            NvmeBackend::Ours => "vfblk-bridge --socket /tmp/nv.sock --backend nvme:$bdf --poll".into(),
            NvmeBackend::QsdNvme => format!(
                "qemu-storage-daemon --blockdev driver=nvme,node-name=d0,device=$bdf,namespace=1 {export}"
            ),
            NvmeBackend::QsdKernel => format!(
                "qemu-storage-daemon --blockdev driver=host_device,node-name=d0,filename=/dev/nvme0n1,aio=io_uring,cache.direct=on {export}"
            ),
            NvmeBackend::OursKernel => {
                "vfblk-bridge --socket /tmp/nv.sock --backend file:/dev/nvme0n1 --poll".into()
            }
        }
    }

    /// Whether the controller is bound to the kernel's driver (else to vfio-pci).
    fn on_kernel_driver(self) -> bool {
        matches!(self, NvmeBackend::QsdKernel | NvmeBackend::OursKernel)
    }
}

/// A workload of the lab's NVMe path: (id, random read or write, queue depth).
pub const NVME_WORKLOADS: [(&str, &str, u32); 3] = [
    ("randread-4k-qd1", "read", 1),
    ("randread-4k-qd32", "read", 32),
    ("randwrite-4k-qd32", "write", 32),
];

/// One measurement in the lab guest.
#[derive(Debug, Clone)]
pub struct NvmeRow {
    /// The backend.
    pub backend: NvmeBackend,
    /// The workload's id.
    pub workload: String,
    /// The client's report, or why there is none.
    pub report: std::result::Result<Value, String>,
    /// The backend's CPU time per I/O (ns), from its /proc stat in the guest.
    pub backend_cpu_ns_per_io: Option<f64>,
}

impl NvmeRow {
    /// IOPS, when measured.
    pub fn iops(&self) -> Option<f64> {
        self.report.as_ref().ok().and_then(|r| r["iops"].as_f64())
    }
}

/// The lab's NVMe rows with the commands that made them.
#[derive(Debug, Clone)]
pub struct NvmeLabResult {
    /// Every measurement.
    pub rows: Vec<NvmeRow>,
    /// The client's command (`RW` and `QD` stand for the workload's).
    pub client_command: String,
    /// Seconds per measurement.
    pub seconds: u32,
}

fn client_command(seconds: u32) -> String {
    format!("taskset -c 0 vfblk-loadgen --socket /tmp/nv.sock --rw RW --bs 4096 --qd QD --seconds {seconds} --polled --json")
}

/// The guest's script: every backend in turn (vfio-pci first, then the kernel's driver), the
/// workloads against each, one record per measurement.
fn script(seconds: u32) -> String {
    let mut s = String::from(vfblk_lab::scenario::NVME_BENCH_START);
    s.push_str(
        r#"ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
measure() {
    id=$1; shift
    rm -f /tmp/nv.sock
    taskset -c 1 sh -c "exec $*" > /tmp/backend.log 2>&1 &
    pid=$!
    for i in $(seq 1 600); do [ -S /tmp/nv.sock ] && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done
    if [ ! -S /tmp/nv.sock ]; then
        why=$(tail -3 /tmp/backend.log | tr -d '"\\\n')
        for w in WORKLOADS; do record "{\"nvme_vhost\": {\"backend\": \"$id\", \"workload\": \"${w%%:*}\", \"error\": \"backend did not listen: $why\"}}"; done
        kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
        return
    fi
    for w in WORKLOADS; do
        name=${w%%:*}; rest=${w#*:}; rw=${rest%%:*}; qd=${rest#*:}
        step "$id: $name, SECONDS s"
        t0=$(ticks $pid)
        taskset -c 0 vfblk-loadgen --socket /tmp/nv.sock --rw $rw --bs 4096 --qd $qd --seconds SECONDS --polled --json > /tmp/lg.json 2>/tmp/lg.err
        rc=$?
        t1=$(ticks $pid)
        if [ $rc = 0 ]; then
            record "{\"nvme_vhost\": {\"backend\": \"$id\", \"workload\": \"$name\", \"cpu_ticks\": $((t1 - t0)), \"report\": $(cat /tmp/lg.json)}}"
        else
            why=$(tail -1 /tmp/lg.err; tail -2 /tmp/backend.log)
            record "{\"nvme_vhost\": {\"backend\": \"$id\", \"workload\": \"$name\", \"error\": \"$(echo $why | tr -d '"\\')\"}}"
        fi
    done
    kill $pid; wait $pid
}
"#,
    );
    let mut bound_to_kernel = false;
    for b in NvmeBackend::ALL {
        if b.on_kernel_driver() && !bound_to_kernel {
            s.push_str(
                "vfblk-nvme bind-kernel $bdf || fail \"bind-kernel\"\nfor i in $(seq 1 40); do [ -b /dev/nvme0n1 ] && break; sleep 0.25; done\n[ -b /dev/nvme0n1 ] || fail \"no /dev/nvme0n1\"\n",
            );
            bound_to_kernel = true;
        }
        s.push_str(&format!("measure {} {}\n", b.id(), b.command()));
    }
    let workloads: Vec<String> = NVME_WORKLOADS
        .iter()
        .map(|(id, rw, qd)| format!("{id}:{rw}:{qd}"))
        .collect();
    s.replace("WORKLOADS", &workloads.join(" "))
        .replace("SECONDS", &seconds.to_string())
}

/// Boots the lab guest and measures every backend under every workload.
pub fn run(seconds: u32) -> Result<NvmeLabResult> {
    let lab = Lab::new("bench-nvme-vhost")?;
    let contents = Contents {
        qsd: true,
        ..Contents::default()
    };
    let measurements = NvmeBackend::ALL.len() * NVME_WORKLOADS.len();
    let total = Duration::from_secs(u64::from(seconds + 15) * measurements as u64 + 180);
    let retried = lab.run_l2(&script(seconds), contents, 1024, total, Echo::Steps)?;
    let run = &retried.run;
    run.expect_success("the lab's NVMe path over vhost-user")?;
    let rows: Vec<NvmeRow> = run
        .records
        .iter()
        .filter_map(|r| r.get("nvme_vhost"))
        .map(|r| {
            let backend = NvmeBackend::ALL
                .into_iter()
                .find(|b| r["backend"] == b.id())
                .ok_or_else(|| Error::Run(format!("unknown backend in {r}")))?;
            // As the suite's own measurements: a figure with failed requests is no figure.
            let clean = r["report"]["ios"].as_u64() > Some(0) && r["report"]["failed"] == 0;
            let report = match r["error"].as_str() {
                _ if clean => Ok(r["report"].clone()),
                Some(e) => Err(e.to_string()),
                None => Err(format!("no clean I/O: {r}")),
            };
            let ios = r["report"]["ios"].as_u64().unwrap_or(0);
            // /proc's ticks are USER_HZ (100 on x86).
            let cpu = r["cpu_ticks"].as_f64().map(|t| t * 1e7 / ios.max(1) as f64);
            Ok(NvmeRow {
                backend,
                workload: r["workload"].as_str().unwrap_or("").to_string(),
                report,
                backend_cpu_ns_per_io: cpu.filter(|_| ios > 0),
            })
        })
        .collect::<Result<_>>()?;
    if rows.len() != measurements {
        return Err(Error::Run(format!(
            "{} of {measurements} measurements recorded",
            rows.len()
        )));
    }
    Ok(NvmeLabResult {
        rows,
        client_command: client_command(seconds),
        seconds,
    })
}

impl NvmeLabResult {
    /// The rows as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "seconds": self.seconds,
            "client_command": self.client_command,
            "backend_commands": NvmeBackend::ALL.iter().map(|b| json!({"backend": b.id(), "command": format!("taskset -c 1 {}", b.command())})).collect::<Vec<_>>(),
            "rows": self.rows.iter().map(|r| json!({
                "backend": r.backend.id(),
                "workload": r.workload,
                "iops": r.iops(),
                "backend_cpu_ns_per_io": r.backend_cpu_ns_per_io,
                "report": r.report.as_ref().ok().map(crate::system::without_cdf),
                "error": r.report.as_ref().err(),
            })).collect::<Vec<_>>(),
        })
    }

    /// A markdown section: a row per workload, a column per backend.
    pub fn to_markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## The lab's NVMe path (TCG-bound)\n\nOne lab guest (QEMU TCG, 2 vCPUs), its emulated NVMe controller behind the virtual IOMMU served as a vhost-user-blk disk four ways, each backend on vCPU 1, the client on vCPU 0, {} s per measurement. Every figure is bound by the emulated CPU: they compare what each path costs that CPU per I/O, not what an SSD would do.\n",
            self.seconds
        );
        let _ = write!(out, "| workload |");
        for b in NvmeBackend::ALL {
            let _ = write!(out, " {} |", b.describe());
        }
        let _ = writeln!(out, "\n|---|{}", "---|".repeat(NvmeBackend::ALL.len()));
        for (id, _, _) in NVME_WORKLOADS {
            let _ = write!(out, "| {id} |");
            for b in NvmeBackend::ALL {
                let cell = self
                    .rows
                    .iter()
                    .find(|r| r.backend == b && r.workload == id)
                    .map(|r| match &r.report {
                        Ok(rep) => format!(
                            "{} ({:.0} / {:.0}; {})",
                            crate::system::thousands(rep["iops"].as_f64().unwrap_or(0.0)),
                            rep["lat_p50_us"].as_f64().unwrap_or(0.0),
                            rep["lat_p99_us"].as_f64().unwrap_or(0.0),
                            r.backend_cpu_ns_per_io
                                .map(|n| format!("{n:.0}"))
                                .unwrap_or_else(|| "?".into())
                        ),
                        Err(e) => format!("failed: {e}"),
                    })
                    .unwrap_or_else(|| "—".into());
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "\nCells: IOPS (p50 / p99 latency in µs; backend CPU ns per I/O). Commands (in the guest):\n"
        );
        for b in NvmeBackend::ALL {
            let _ = writeln!(out, "    taskset -c 1 {}", b.command());
        }
        let _ = writeln!(out, "    {}\n", self.client_command);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_measures_every_backend_on_its_driver() {
        let s = script(3);
        let vfio = s.find("measure vfblk-nvme").unwrap();
        let qsd = s.find("measure qsd-nvme").unwrap();
        let rebind = s.find("bind-kernel").unwrap();
        let kernel = s.find("measure qsd-kernel-nvme").unwrap();
        assert!(vfio < rebind && qsd < rebind && rebind < kernel, "{s}");
        assert_eq!(s.matches("bind-kernel $bdf").count(), 1);
        assert!(s.contains("--seconds 3 --polled"), "{s}");
        assert!(s.contains("randwrite-4k-qd32:write:32"), "{s}");
        assert!(!s.contains("WORKLOADS") && !s.contains("SECONDS"), "{s}");
    }
}
