//! The `vfblk-lab` command line: set the lab up, run the demo, run a script in the lab guest,
//! open a shell in it, and (inside the guest) boot nested VMs. The binary parses [`LabCli`]
//! and calls [`run`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::recovery::{self, DemoBackend, DemoOptions};
use crate::scenario::{self, Contents, Lab};
use crate::vm::{self, Accel, Echo, Ending};
use crate::{LabError, Result};

/// The vfblk VM lab.
#[derive(Parser, Debug)]
#[command(name = "vfblk-lab", version)]
pub struct LabCli {
    /// What to do.
    #[command(subcommand)]
    pub command: LabCommand,
}

/// What the lab guest holds besides the project's binaries.
#[derive(Args, Debug, Clone, Copy)]
pub struct ContentsArgs {
    /// fio and its libraries.
    #[arg(long)]
    pub fio: bool,
    /// What nested (L3) guests need.
    #[arg(long)]
    pub nested: bool,
    /// With --nested: QEMU 10 from bookworm-backports too (`nested --qemu-10`).
    #[arg(long, requires = "nested")]
    pub qemu10: bool,
    /// With --nested: a disk image a nested guest boots from, at /lab/l3/boot.img
    /// (`nested --boot-from-disk`).
    #[arg(long, requires = "nested")]
    pub boot_disk: bool,
    /// qemu-storage-daemon (a peer for benchmarks in the guest).
    #[arg(long)]
    pub qsd: bool,
}

/// The demo's backend.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum DemoBackendArg {
    /// RAM disk in a shared-memory file.
    Mem,
    /// A file through io_uring.
    File,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Fetch and unpack the guest kernel into the cache.
    Setup,
    /// Boot the lab: the NVMe controller reached through VFIO in the guest, and fio verifying
    /// a vhost-user-blk disk while the host kills the bridge with SIGKILL and restarts it.
    Demo {
        /// The bridge's backend.
        #[arg(long, value_enum, default_value_t = DemoBackendArg::Mem)]
        backend: DemoBackendArg,
        /// SIGKILLs of the bridge.
        #[arg(long, default_value_t = 1)]
        kills: u32,
        /// Upgrades by hand-over of the bridge (not with --reconnect).
        #[arg(long, default_value_t = 1)]
        upgrades: u32,
        /// Recover the kills through QEMU's reconnect (the bridge alone, no keeper, no
        /// upgrades), as before the keeper existed.
        #[arg(long)]
        reconnect: bool,
        /// Offer the guest packed virtqueues (QEMU's `packed=on`) instead of split ones.
        #[arg(long)]
        packed: bool,
        /// The whole NVMe path instead: inside the lab guest the target drives the emulated
        /// NVMe controller through VFIO and serves it to a second-level QEMU guest (QEMU 7.2
        /// under the lab guest's KVM) running fio, across the upgrades and SIGKILLs asked
        /// for (--backend and --packed do not apply). Takes 4-6 minutes.
        #[arg(long, conflicts_with_all = ["packed", "backend"])]
        nvme: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Boot the lab guest and run FILE (busybox sh) in it.
    Run {
        /// The script.
        #[arg(long)]
        script: PathBuf,
        /// What the guest holds.
        #[command(flatten)]
        contents: ContentsArgs,
        /// Echo the whole console.
        #[arg(long)]
        verbose: bool,
        /// Print the records as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Boot the lab guest with a shell on this terminal (Ctrl-A X quits).
    Shell {
        /// What the guest holds.
        #[command(flatten)]
        contents: ContentsArgs,
    },
    /// Boot N second-level guests inside the lab guest, report boot times.
    NestedStats {
        /// Boots.
        #[arg(long, default_value_t = 10)]
        boots: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// (Inside a guest) O_DIRECT writes and reads of a block device through 512-byte iovecs
    /// at sub-page offsets, every byte verified: scatter lists NVMe PRPs cannot describe.
    IovecVerify {
        /// The block device (its first --mib MiB are overwritten).
        #[arg(long)]
        device: PathBuf,
        /// MiB to write and verify, twice.
        #[arg(long, default_value_t = 4)]
        mib: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// (Inside the lab guest) boot second-level guests under KVM; with --vhost-user, one
    /// whose disk is that vhost-user-blk socket, with fio.
    Nested {
        /// Boots.
        #[arg(long, default_value_t = 1)]
        boots: u32,
        /// A vhost-user-blk socket for the nested guest's disk.
        #[arg(long)]
        vhost_user: Option<PathBuf>,
        /// Entries per virtqueue of that disk (QEMU's `queue-size`).
        #[arg(long)]
        queue_size: Option<u16>,
        /// MiB fio writes and verifies on that disk.
        #[arg(long, default_value_t = 16)]
        fio_mib: u32,
        /// Before fio, `iovec-verify` on that disk in the nested guest.
        #[arg(long)]
        iovec_check: bool,
        /// Seconds the nested guest may take to boot before the try counts as stalled
        /// (nested guests sharing one vCPU boot at half speed).
        #[arg(long, default_value_t = 120)]
        boot_deadline: u64,
        /// A directory shared with other nested runs: fio starts once `--gate-parties` of
        /// them have booted (a barrier, so that their fio runs overlap).
        #[arg(long)]
        start_gate: Option<PathBuf>,
        /// Runs the start gate waits for.
        #[arg(long, default_value_t = 2, requires = "start_gate")]
        gate_parties: usize,
        /// Seconds the start gate waits for the others at most (then fio starts alone).
        #[arg(long, default_value_t = 420, requires = "start_gate")]
        gate_wait: u64,
        /// A nested guest that wedges (or whose QEMU crashes) after fio began is reported,
        /// not run again (for runs that must overlap events outside them, such as target
        /// restarts).
        #[arg(long)]
        no_retry_once_started: bool,
        /// Boot the nested guest from that disk (the boot disk image, served by the
        /// caller) through its firmware instead of running fio.
        #[arg(long)]
        boot_from_disk: bool,
        /// Run the nested guest with QEMU 10 (the lab guest must carry it: `--qemu10`),
        /// reconnecting every 20 ms, instead of QEMU 7.2.
        #[arg(long)]
        qemu_10: bool,
        /// Echo the nested console.
        #[arg(long)]
        verbose: bool,
    },
    /// (Inside the lab guest) live-migrate a second-level guest running `vfblk-readcheck`
    /// from a QEMU on one vhost-user-blk socket to a QEMU on another (and back), and print
    /// the outcome as one record.
    NestedMigrate {
        /// The first QEMU's socket.
        #[arg(long)]
        source: PathBuf,
        /// The destination QEMU's socket.
        #[arg(long)]
        destination: PathBuf,
        /// Then migrate back to a new QEMU on the source socket.
        #[arg(long)]
        back: bool,
        /// The second-level guest's RAM (MiB).
        #[arg(long, default_value_t = 256)]
        memory_mib: u64,
        /// Each migration's bandwidth cap (MiB/s) during its slow phase.
        #[arg(long, default_value_t = 8)]
        slow_mib_s: u64,
        /// Seconds each migration runs capped.
        #[arg(long, default_value_t = 5)]
        slow_s: u64,
        /// Seconds from the workload's start to the first migration, and between them.
        #[arg(long, default_value_t = 3)]
        settle_s: u64,
    },
}

impl From<ContentsArgs> for Contents {
    fn from(c: ContentsArgs) -> Self {
        Contents {
            fio: c.fio,
            nested: c.nested,
            qemu10: c.qemu10,
            boot_disk: c.boot_disk,
            qsd: c.qsd,
        }
    }
}

/// Runs a command.
pub fn run(cli: LabCli) -> Result<()> {
    match cli.command {
        LabCommand::Setup => setup(),
        LabCommand::Demo {
            backend,
            kills,
            upgrades,
            reconnect,
            packed,
            nvme,
            json,
        } => {
            if nvme {
                let upgrades = if reconnect { 0 } else { upgrades };
                return nvme_demo(kills, upgrades, !reconnect, json);
            }
            let backend = match backend {
                DemoBackendArg::Mem => DemoBackend::Mem,
                DemoBackendArg::File => DemoBackend::File,
            };
            let upgrades = if reconnect { 0 } else { upgrades };
            demo(backend, kills, upgrades, !reconnect, packed, json)
        }
        LabCommand::Run {
            script,
            contents,
            verbose,
            json,
        } => run_script(&script, contents.into(), verbose, json),
        LabCommand::Shell { contents } => shell(contents.into()),
        LabCommand::NestedStats { boots, json } => nested_stats(boots, json),
        LabCommand::IovecVerify { device, mib, json } => {
            let report = crate::iovec::run(&device, mib)?;
            if json {
                println!("{}", report.to_json());
            } else {
                println!(
                    "{}: {} requests, {} MiB through 512-byte iovecs at sub-page offsets, {} mismatching piece(s)",
                    device.display(),
                    report.requests,
                    report.bytes >> 20,
                    report.mismatches
                );
            }
            if report.mismatches > 0 {
                return Err(crate::LabError::Guest(format!(
                    "{} piece(s) read back differ from what was written",
                    report.mismatches
                )));
            }
            Ok(())
        }
        LabCommand::Nested {
            boots,
            vhost_user,
            queue_size,
            fio_mib,
            iovec_check,
            boot_deadline,
            start_gate,
            gate_parties,
            gate_wait,
            no_retry_once_started,
            boot_from_disk,
            qemu_10,
            verbose,
        } => {
            let qemu = if qemu_10 {
                crate::qemu::Qemu::backports_in_guest(20)
            } else {
                crate::qemu::Qemu::system()
            };
            let echo = if verbose { Echo::All } else { Echo::Quiet };
            match vhost_user {
                Some(socket) if boot_from_disk => {
                    scenario::run_nested_boot(&socket, queue_size, echo)
                }
                Some(socket) => {
                    let fio = scenario::NestedFio {
                        mib: fio_mib,
                        iovec_check,
                        limits: scenario::l3_limits_with_boot(boot_deadline),
                        gate: start_gate.map(|dir| crate::vm::StartGate {
                            party: socket
                                .file_stem()
                                .map(|s| s.to_string_lossy().into_owned())
                                .unwrap_or_else(|| std::process::id().to_string()),
                            dir,
                            parties: gate_parties,
                            wait: std::time::Duration::from_secs(gate_wait),
                        }),
                        retry_started: !no_retry_once_started,
                    };
                    scenario::run_nested_vhost(&socket, queue_size, fio, qemu, echo)
                }
                None => scenario::run_nested(boots, echo),
            }
        }
        LabCommand::NestedMigrate {
            source,
            destination,
            back,
            memory_mib,
            slow_mib_s,
            slow_s,
            settle_s,
        } => {
            let mut opts = crate::migration::MigrationOptions::nested();
            opts.memory_mib = memory_mib;
            opts.slow_bandwidth = slow_mib_s << 20;
            opts.slow_phase = Duration::from_secs(slow_s);
            opts.settle_s = settle_s;
            let n = crate::migration::NestedMigration {
                source,
                destination,
                back,
                opts,
            };
            let out = crate::migration::run_nested_migration(&n)?;
            if out.problems.is_empty() {
                Ok(())
            } else {
                Err(LabError::Guest(format!("{:?}", out.problems)))
            }
        }
    }
}

fn setup() -> Result<()> {
    let kernel = crate::kernel::ensure_kernel()?;
    println!(
        "guest kernel {} ready: {}",
        kernel.release,
        kernel.vmlinux.display()
    );
    let rootfs = crate::systemd::ensure_rootfs()?;
    println!(
        "systemd guest's root file system ready: systemd {} ({})",
        rootfs.systemd_version,
        rootfs.image.display()
    );
    let qemu = crate::qemu::Qemu::backports(20)?;
    println!(
        "second QEMU ready: {} ({})",
        qemu.description,
        qemu.binary.display()
    );
    Ok(())
}

/// The demo's bridge holds each completion up to this long (a busy disk), so that every kill
/// lands on requests it has taken: what inflight recovery exists for.
const DEMO_HOLD_MS: u32 = 10;

/// fio's size for a demo of `events` upgrades and kills, one every 1.5 s: 32 MiB, and 8 MiB
/// more per event (fio verifies some 4 MiB a second under TCG, so each event's 1.5 s is
/// covered twice over), within the 256 MiB disk.
fn demo_fio_mib(events: u32) -> u32 {
    32u32.saturating_add(events.saturating_mul(8)).min(240)
}

fn demo(
    backend: DemoBackend,
    kills: u32,
    upgrades: u32,
    keeper: bool,
    packed: bool,
    json: bool,
) -> Result<()> {
    let started = Instant::now();
    tracing::info!("preparing guest kernel and project binaries");
    let lab = Lab::new("demo")?;
    tracing::info!("booting the guest (TCG) with the emulated NVMe behind a virtual IOMMU and a vhost-user-blk disk served by vfblk-bridge");
    let opts = DemoOptions {
        backend,
        kills,
        vfio_probe: true,
        fio_mib: demo_fio_mib(kills + upgrades),
        hold_completions_ms: DEMO_HOLD_MS,
        qemu: crate::qemu::Qemu::system(),
        keeper,
        upgrades,
        packed,
    };
    let outcome = recovery::run_demo(&lab, &opts)?;
    let run = &outcome.run.run;
    run.expect_success("lab demo")?;
    let done = (outcome.upgrade_pauses_ms.len() as u32, outcome.kills);
    if done != (upgrades, kills) {
        return Err(LabError::Guest(format!(
            "fio ended after {} upgrade(s) and {} kill(s) of the {upgrades} and {kills} asked              for ({} MiB sized for them): the guest was slower than the demo expects",
            done.0, done.1, opts.fio_mib
        )));
    }
    let probe = run
        .record("probe")
        .ok_or_else(|| LabError::Guest("the guest reported no probe result".into()))?;
    let guest = run.record("guest").cloned().unwrap_or_default();
    let fio = run.record("fio").cloned().unwrap_or_default();
    let (writes, reads, max_pause_ms, fio_errors) = scenario::fio_summary(&fio);
    let ring = match recovery::packed_negotiated(run) {
        Some(true) => "packed",
        Some(false) if packed => "split (packed offered, not negotiated)",
        Some(false) => "split",
        None => "unknown (the guest recorded no features)",
    };
    if packed && ring != "packed" {
        return Err(LabError::Guest(format!(
            "--packed: the guest's virtio ring is {ring}"
        )));
    }
    if json {
        let out = serde_json::json!({
            "accel": "tcg",
            "boot_s": run.boot_time.map(|d| d.as_secs_f64()),
            "total_s": started.elapsed().as_secs_f64(),
            "guest": guest,
            "probe": probe,
            "recovery": {
                "backend": outcome.backend,
                "virtio_ring": ring,
                "kills": outcome.kills,
                "upgrades": outcome.upgrade_pauses_ms.len(),
                "upgrade_pauses_ms": outcome.upgrade_pauses_ms,
                "frontend_connections": outcome.connections,
                "qemu_reconnects": outcome.connections.map(|c| c.saturating_sub(1)),
                "qemu_vhost_log": outcome.qemu_vhost_lines,
                "resubmitted": outcome.resubmitted,
                "fio_exit": run.record("fio_exit"),
                "fio_writes": writes,
                "fio_verified_reads": reads,
                "fio_errors": fio_errors,
                "longest_io_pause_ms": max_pause_ms,
            },
        });
        println!("{out}");
        return demo_showed_recovery(&outcome);
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
    println!("  virtio ring      {ring}");
    match outcome.connections {
        Some(connections) => {
            println!(
                "  upgrades         {} by hand-over while fio ran; the target paused {}",
                outcome.upgrade_pauses_ms.len(),
                outcome
                    .upgrade_pauses_ms
                    .iter()
                    .map(|p| format!("{p:.2} ms"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!(
                "  crashes          {} x SIGKILL mid-run, started again at once by vfblk-keeper with the connection it held; {} request(s) run again from the inflight region",
                outcome.kills, outcome.resubmitted
            );
            println!(
                "  QEMU reconnects  {} ({connections} vhost-user connection(s) over the whole run); QEMU's log: {}",
                connections.saturating_sub(1),
                if outcome.qemu_vhost_lines.is_empty() {
                    "nothing about the vhost-user connection".to_string()
                } else {
                    outcome.qemu_vhost_lines.join(" | ")
                }
            );
        }
        None => println!(
            "  bridge restarts  {} x SIGKILL mid-run, restarted 0.5 s later, QEMU reconnected; {} request(s) run again from the inflight region",
            outcome.kills, outcome.resubmitted
        ),
    }
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
    demo_showed_recovery(&outcome)
}

/// What fio writes and verifies in the NVMe demo's nested guest: it must outlast the events
/// (about 2 s each; fio on the 256 MiB disk took 44-75 s with 20 of them), so a quarter
/// more disk per event past 20, up to 1 GiB.
fn nvme_demo_fio_mib(events: u32) -> u32 {
    256u32
        .saturating_add(events.saturating_sub(20).saturating_mul(13))
        .min(1024)
}

/// `vfblk-lab demo --nvme`: the NVMe path end to end ([`crate::nvme_l3`]), with the same kind
/// of summary as the default demo.
fn nvme_demo(kills: u32, upgrades: u32, kept: bool, json: bool) -> Result<()> {
    let started = Instant::now();
    let events = kills + upgrades;
    let o = crate::nvme_l3::NvmeL3 {
        qemu10: false,
        kept,
        upgrades,
        kills,
        fio_mib: nvme_demo_fio_mib(events),
    };
    tracing::info!(
        "booting the lab guest (TCG) with the emulated NVMe behind a virtual IOMMU; inside it the target drives the controller through VFIO and serves a second-level guest (QEMU 7.2, KVM) running fio on {} MiB",
        o.fio_mib
    );
    let retried = crate::nvme_l3::run_past_emulator_faults("demo-nvme", &o)?;
    let run = &retried.run;
    let l3 = run.record("l3_vhost").cloned().unwrap_or_default();
    let (reports, pauses) = crate::nvme_l3::upgrade_reports(run);
    let adopted = reports
        .iter()
        .filter(|r| {
            r["nvme"]
                .as_array()
                .is_some_and(|n| n.iter().all(|c| c["queues_adopted"] == true))
        })
        .count();
    let count = |key: &str| run.record(key).and_then(|v| v.as_u64()).unwrap_or(0);
    let qemu_lines: Vec<String> = l3["qemu_vhost_lines"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "accel": "tcg",
                "path": "lab guest (TCG): emulated NVMe behind a virtual IOMMU, vfblk-bridge's VFIO driver, vhost-user-blk; second-level guest (QEMU 7.2, KVM): fio",
                "total_s": started.elapsed().as_secs_f64(),
                "lab_guest_runs": retried.tries,
                "kept": kept,
                "upgrades": pauses.len(),
                "upgrades_adopting_queues": adopted,
                "upgrade_pauses_ms": pauses,
                "kills": kills,
                "connections_resumed": count("resumed"),
                "requests_recovered": count("recovered"),
                "events_during_fio": run.record("events_during_fio"),
                "l3": l3,
            })
        );
    } else {
        println!();
        println!("vfblk lab demo: the NVMe path");
        println!("  acceleration     {}", Accel::Tcg.describe());
        println!("  path             lab guest: emulated NVMe behind a virtual IOMMU -> vfblk-bridge (our VFIO driver) -> vhost-user-blk -> second-level guest (QEMU 7.2 under KVM) -> fio with crc32c verify");
        println!(
            "  target           {}",
            if kept {
                "under vfblk-keeper: upgraded by hand-over and SIGKILLed, QEMU never told"
            } else {
                "SIGKILLed and started again, QEMU reconnecting"
            }
        );
        println!(
            "  upgrades         {} ({} adopting the controller's queues); the target paused {}",
            pauses.len(),
            adopted,
            pauses
                .iter()
                .map(|p| format!("{p:.1} ms"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "  crashes          {kills} x SIGKILL mid-run; {} connection(s) resumed without reconnect; {} ring recovery(ies) from the inflight region",
            count("resumed"),
            count("recovered")
        );
        println!(
            "  QEMU's log       {}",
            if qemu_lines.is_empty() {
                "nothing about the vhost-user connection".to_string()
            } else {
                qemu_lines.join(" | ")
            }
        );
        println!(
            "  fio in L3        exit status {}, {} writes then {} verified reads in {} ms; longest completion {:.0} ms",
            l3["fio_exit"],
            l3["writes"],
            l3["verified_reads"],
            l3["fio_runtime_ms"],
            l3["max_latency_ms"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "  total            {:.1} s ({} lab guest run(s)); console log {}",
            started.elapsed().as_secs_f64(),
            retried.tries,
            run.log.display()
        );
    }
    run.expect_success("lab demo --nvme")?;
    if l3["fio_exit"] != 0 {
        return Err(LabError::Guest(format!("fio in the nested guest: {l3}")));
    }
    if run.record("events_during_fio") != Some(&serde_json::json!(true)) {
        return Err(LabError::Guest(format!(
            "fio ended before the last event ({} MiB sized for {events}): the guest was slower than the demo expects",
            o.fio_mib
        )));
    }
    if pauses.len() as u32 != upgrades {
        return Err(LabError::Guest(format!(
            "{} of {upgrades} upgrade(s) reported",
            pauses.len()
        )));
    }
    if kept && !qemu_lines.is_empty() {
        return Err(LabError::Guest(format!(
            "QEMU noticed the vhost-user backend change: {}",
            qemu_lines.join(" | ")
        )));
    }
    Ok(())
}

/// A demo whose kills all missed the requests in flight showed nothing about recovery.
fn demo_showed_recovery(outcome: &recovery::DemoOutcome) -> Result<()> {
    if let Some(c) = outcome.connections.filter(|&c| c != 1) {
        return Err(LabError::Guest(format!(
            "QEMU connected {c} times: the upgrades and kills were to go unnoticed"
        )));
    }
    if outcome.connections.is_some() && !outcome.qemu_vhost_lines.is_empty() {
        return Err(LabError::Guest(format!(
            "QEMU noticed the vhost-user backend change: {}",
            outcome.qemu_vhost_lines.join(" | ")
        )));
    }
    if outcome.kills > 0 && outcome.resubmitted == 0 {
        return Err(LabError::Guest(format!(
            "{} kill(s), but none landed on a request the bridge had taken: nothing was re-run \
             from the inflight region, so the demo showed nothing",
            outcome.kills
        )));
    }
    Ok(())
}

fn run_script(script: &Path, contents: Contents, verbose: bool, json: bool) -> Result<()> {
    let script = std::fs::read_to_string(script)?;
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

fn shell(contents: Contents) -> Result<()> {
    let lab = Lab::new("shell")?;
    let initrd = lab.l2_image(scenario::VFIO_PROBE_SCRIPT, contents)?;
    let disk = lab.disk("nvme.img", 1024)?;
    let spec = lab.l2_spec(&initrd, &disk);
    vm::run_interactive(&spec)
}

fn nested_stats(boots: u32, json: bool) -> Result<()> {
    let lab = Lab::new("nested-stats")?;
    let per_boot = scenario::L3_LIMITS.total * scenario::L3_TRIES;
    let contents = Contents {
        fio: false,
        nested: true,
        qemu10: false,
        boot_disk: false,
        qsd: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_sizes_fio_for_the_events_asked_within_the_disk() {
        assert_eq!(demo_fio_mib(0), 32);
        assert_eq!(demo_fio_mib(4), 64);
        assert_eq!(demo_fio_mib(20), 192);
        assert_eq!(demo_fio_mib(1000), 240);
    }
}
