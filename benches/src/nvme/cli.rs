//! The `vfblk-nvme` command line, an nvme-cli-like tool over our VFIO driver: find
//! controllers, hand them to vfio-pci and back, probe, identify, read/write LBA ranges, flush,
//! write zeroes, deallocate, a data-integrity exercise and a polled load generator. The binary
//! parses [`NvmeCli`] and calls [`run`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vfblk_nvme::controller::{Controller, Options};
use vfblk_nvme::pci::{PciAddress, SysfsPciDevice, CLASS_NVME};
use vfblk_nvme::prp::DmaSegment;
use vfblk_nvme::{Error, Result};

use super::perf::{self, PerfOptions, Workload};
use super::verify::{self, VerifyOptions};
use super::{probe, sync_io};
use crate::patterns::check_pattern as check_pattern_of;

/// An nvme-cli-like tool over the vfblk userspace NVMe driver.
#[derive(Parser, Debug)]
#[command(name = "vfblk-nvme", version)]
pub struct NvmeCli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: NvmeCommand,
}

/// The controller to open and how.
#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// PCI address (dddd:bb:dd.f) of a controller bound to vfio-pci.
    pub address: PciAddress,
    /// Write the doorbell registers even if the controller offers shadow doorbells.
    #[arg(long)]
    pub mmio_doorbells: bool,
}

/// `read`.
#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// First LBA.
    #[arg(long)]
    lba: u64,
    /// Blocks.
    #[arg(long)]
    blocks: u32,
    /// Where the data goes.
    #[arg(long)]
    out: PathBuf,
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Use separate memory mapped at this IOVA (as guest RAM is) instead of the pool.
    #[arg(long, value_parser = number)]
    external_iova: Option<u64>,
}

/// `write`.
#[derive(Args, Debug)]
pub struct WriteArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// First LBA.
    #[arg(long)]
    lba: u64,
    /// The data (a multiple of the block size).
    #[arg(long = "in")]
    input: PathBuf,
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Use separate memory mapped at this IOVA (as guest RAM is) instead of the pool.
    #[arg(long, value_parser = number)]
    external_iova: Option<u64>,
}

/// An LBA range of a namespace.
#[derive(Args, Debug)]
pub struct RangeArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// First LBA.
    #[arg(long)]
    lba: u64,
    /// Blocks.
    #[arg(long)]
    blocks: u32,
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
}

/// `verify`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// Pattern seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Queue pairs (one thread each).
    #[arg(long, default_value_t = 2)]
    queues: u16,
    /// Write + read-back operations per queue.
    #[arg(long, default_value_t = 200)]
    ops: u32,
    /// Blocks per queue's region.
    #[arg(long, default_value_t = 16384)]
    region_blocks: u64,
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Reset the controller after this many operations.
    #[arg(long)]
    reset_after_ops: Option<u64>,
}

/// `check-pattern`.
#[derive(Args, Debug)]
pub struct CheckPatternArgs {
    /// A device or file, read with ordinary I/O.
    path: PathBuf,
    /// Blocks to check.
    #[arg(long)]
    blocks: u64,
    /// Block size in bytes.
    #[arg(long)]
    block_size: usize,
    /// Pattern seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// LBA of the first block checked.
    #[arg(long, default_value_t = 0)]
    first_lba: u64,
    /// Blocks into PATH where that LBA's data starts (default: first-lba).
    #[arg(long)]
    skip: Option<u64>,
}

/// Access pattern of `perf`.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum PerfRw {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random reads and writes.
    Randrw,
}

impl PerfRw {
    fn name(self) -> &'static str {
        match self {
            PerfRw::Randread => "randread",
            PerfRw::Randwrite => "randwrite",
            PerfRw::Randrw => "randrw",
        }
    }
}

/// `perf`.
#[derive(Args, Debug)]
pub struct PerfArgs {
    #[command(flatten)]
    controller: ControllerArgs,
    /// Access pattern.
    #[arg(long, value_enum, default_value_t = PerfRw::Randread)]
    rw: PerfRw,
    /// Reads in percent (randrw).
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_percent: u8,
    /// Bytes per command.
    #[arg(long, default_value_t = 4096)]
    bs: u32,
    /// Commands in flight per queue pair.
    #[arg(long, default_value_t = 32)]
    qd: u16,
    /// Queue pairs (one thread each).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Unmeasured milliseconds first.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// Namespace.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum NvmeCommand {
    /// NVMe controllers with their driver and IOMMU group.
    List,
    /// Bind to vfio-pci (driver_override, unbind, probe).
    BindVfio {
        /// PCI address.
        address: PciAddress,
    },
    /// Give the controller back to the kernel's nvme driver.
    BindKernel {
        /// PCI address.
        address: PciAddress,
    },
    /// Open through VFIO, read CAP/VS/CSTS, map a DMA buffer.
    Probe {
        /// PCI address.
        address: PciAddress,
    },
    /// Bring the controller up, Identify it and its namespaces.
    Identify(ControllerArgs),
    /// Read an LBA range into a file.
    Read(ReadArgs),
    /// Write a file at an LBA.
    Write(WriteArgs),
    /// Flush a namespace.
    Flush {
        /// The controller.
        #[command(flatten)]
        controller: ControllerArgs,
        /// Namespace.
        #[arg(long, default_value_t = 1)]
        nsid: u32,
    },
    /// Write zeroes over an LBA range.
    WriteZeroes(RangeArgs),
    /// Deallocate an LBA range.
    Deallocate(RangeArgs),
    /// Random writes + read-backs on several queues/threads, then every block of the area
    /// written with its pattern.
    Verify(VerifyArgs),
    /// Check a device or file holds the patterns `verify` wrote.
    CheckPattern(CheckPatternArgs),
    /// Keep QD commands in flight per queue pair; IOPS, MB/s, latency percentiles, heap
    /// allocations while measuring.
    Perf(PerfArgs),
}

/// A number, decimal or 0x-hexadecimal.
fn number(s: &str) -> std::result::Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// Runs a command. `allocations` counts heap allocations so far (the binary's allocator),
/// so `perf` can show its measured loop makes none.
pub fn run(cli: NvmeCli, allocations: &(dyn Fn() -> u64 + Sync)) -> Result<()> {
    let json = cli.json;
    match cli.command {
        NvmeCommand::List => list(json),
        NvmeCommand::BindVfio { address } => bind(address, "vfio-pci"),
        NvmeCommand::BindKernel { address } => bind(address, "nvme"),
        NvmeCommand::Probe { address } => run_probe(address, json),
        NvmeCommand::Identify(c) => identify(&c, json),
        NvmeCommand::Read(a) => read(&a),
        NvmeCommand::Write(a) => write(&a),
        NvmeCommand::Flush { controller, nsid } => simple(&controller, nsid, Simple::Flush),
        NvmeCommand::WriteZeroes(r) => simple(
            &r.controller,
            r.nsid,
            Simple::WriteZeroes {
                lba: r.lba,
                blocks: r.blocks,
            },
        ),
        NvmeCommand::Deallocate(r) => simple(
            &r.controller,
            r.nsid,
            Simple::Deallocate {
                lba: r.lba,
                blocks: r.blocks,
            },
        ),
        NvmeCommand::Verify(a) => run_verify(&a, json),
        NvmeCommand::CheckPattern(a) => check_pattern(&a, json),
        NvmeCommand::Perf(a) => run_perf(&a, json, allocations),
    }
}

fn list(json: bool) -> Result<()> {
    let devices = SysfsPciDevice::find_by_class(CLASS_NVME)?;
    let rows: Vec<(PciAddress, String, String)> = devices
        .iter()
        .map(|d| {
            let group = d
                .iommu_group()
                .map(|g| g.to_string())
                .unwrap_or_else(|_| "none".into());
            (
                d.address(),
                d.driver().unwrap_or_else(|| "none".into()),
                group,
            )
        })
        .collect();
    if json {
        let items: Vec<serde_json::Value> = rows
            .iter()
            .map(|(a, d, g)| {
                serde_json::json!({"pci_address": a.to_string(), "driver": d, "iommu_group": g})
            })
            .collect();
        println!("{}", serde_json::Value::Array(items));
    } else if rows.is_empty() {
        println!("no NVMe controllers (PCI class {CLASS_NVME:#08x})");
    } else {
        println!("{:<14} {:<10} iommu group", "address", "driver");
        for (a, d, g) in rows {
            println!("{a:<14} {d:<10} {g}");
        }
    }
    Ok(())
}

fn bind(address: PciAddress, driver: &str) -> Result<()> {
    let dev = SysfsPciDevice::new(address)?;
    let before = dev.driver().unwrap_or_else(|| "none".into());
    dev.bind(Some(driver))?;
    println!(
        "{address}: {before} -> {}",
        dev.driver().unwrap_or_else(|| "none".into())
    );
    Ok(())
}

fn run_probe(address: PciAddress, json: bool) -> Result<()> {
    let report = probe::probe(address)?;
    if json {
        println!("{}", report.to_json());
        return Ok(());
    }
    let cap = report.cap;
    println!(
        "{address}: NVMe {} through VFIO (IOMMU group {})",
        report.version, report.iommu_group
    );
    println!(
        "  vendor:device  {:04x}:{:04x}, class {:#08x}, driver {}",
        report.ids.0, report.ids.1, report.class, report.driver
    );
    println!("  BAR0           {} bytes mapped", report.bar0_size);
    println!(
        "  CAP            {:#018x}: MQES {}, CQR {}, DSTRD {} B, TO {} ms, MPS {}..{}",
        cap.0,
        cap.max_queue_entries(),
        cap.contiguous_queues_required(),
        cap.doorbell_stride(),
        cap.timeout_ms(),
        cap.page_size_min(),
        cap.page_size_max()
    );
    println!("  CC / CSTS      {:#x} / {}", report.cc.0, report.csts);
    println!(
        "  DMA            {} bytes ({}) mapped at IOVA {:#x} and unmapped",
        report.dma_size, report.dma_page_kind, report.dma_iova
    );
    Ok(())
}

fn open(c: &ControllerArgs, queues: u16) -> Result<Controller> {
    Controller::open(
        c.address,
        &Options {
            io_queues: queues,
            shadow_doorbells: !c.mmio_doorbells,
            sgl: true,
            ..Options::default()
        },
    )
}

/// Brings the controller up and checks it granted `queues` I/O queue pairs.
fn open_with_queues(c: &ControllerArgs, queues: u16) -> Result<Controller> {
    let ctrl = open(c, queues)?;
    if ctrl.io_queues_granted() < queues {
        return Err(Error::BadArgument(format!(
            "{}: {queues} queues asked, {} granted",
            ctrl.name(),
            ctrl.io_queues_granted()
        )));
    }
    Ok(ctrl)
}

fn identify(c: &ControllerArgs, json: bool) -> Result<()> {
    let ctrl = open(c, 4)?;
    let id = ctrl.identify();
    if json {
        let ns: Vec<serde_json::Value> = ctrl
            .namespaces()
            .iter()
            .map(|n| {
                serde_json::json!({
                    "nsid": n.nsid,
                    "blocks": n.info.nsze,
                    "block_size": n.info.block_size(),
                    "size_bytes": n.info.size_bytes(),
                    "deallocated_reads_zeroes": n.info.deallocated_reads_zeroes(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "pci_address": ctrl.name(),
                "version": ctrl.version().to_string(),
                "serial": id.serial,
                "model": id.model,
                "firmware": id.firmware,
                "mdts": id.mdts,
                "max_transfer": ctrl.max_transfer(),
                "io_queues": ctrl.io_queues_granted(),
                "dsm": id.supports_dsm(),
                "write_zeroes": id.supports_write_zeroes(),
                "volatile_write_cache": id.has_volatile_write_cache(),
                "sgl": id.supports_sgl(),
                "doorbell_buffer": id.supports_doorbell_buffer(),
                "shadow_doorbells_in_use": ctrl.shadow_doorbells_in_use(),
                "namespaces": ns,
            })
        );
        return Ok(());
    }
    println!(
        "{}: {} (serial {}, firmware {}), NVMe {}",
        ctrl.name(),
        id.model,
        id.serial,
        id.firmware,
        ctrl.version()
    );
    println!(
        "  max transfer {} bytes (MDTS {}), {} I/O queue pairs granted",
        ctrl.max_transfer(),
        id.mdts,
        ctrl.io_queues_granted()
    );
    println!(
        "  optional: DSM {}, Write Zeroes {}, volatile write cache {}, SGL {}, shadow doorbells {}",
        id.supports_dsm(),
        id.supports_write_zeroes(),
        id.has_volatile_write_cache(),
        id.supports_sgl(),
        id.supports_doorbell_buffer()
    );
    for n in ctrl.namespaces() {
        println!(
            "  namespace {}: {} blocks of {} bytes ({} bytes)",
            n.nsid,
            n.info.nsze,
            n.info.block_size(),
            n.info.size_bytes()
        );
    }
    Ok(())
}

/// The data buffer of a `read` or `write`: a chunk of the driver's pool, or (with
/// `--external-iova`) separate memory mapped at a chosen IOVA, the way guest RAM is.
struct IoBuffer {
    iova: u64,
    ptr: *mut u8,
    _keep: Box<dyn std::any::Any>,
}

fn io_buffer(external_iova: Option<u64>, ctrl: &Controller, len: usize) -> Result<IoBuffer> {
    if let Some(iova) = external_iova {
        let memory = vfblk_hugepages::DmaMemory::allocate_small("vfblk-external", len).map_err(
            |source| Error::Dma {
                device: ctrl.name().to_string(),
                source,
            },
        )?;
        // SAFETY: `memory` outlives the mapping (both kept in the IoBuffer, mapping dropped
        // first) and is only accessed through raw copies.
        let mapping = unsafe { ctrl.map_external(iova, memory.as_ptr(), memory.len())? };
        let ptr = memory.as_ptr();
        return Ok(IoBuffer {
            iova,
            ptr,
            _keep: Box::new((mapping, memory)),
        });
    }
    let chunk = ctrl.dma_buffer(len)?;
    Ok(IoBuffer {
        iova: chunk.iova(),
        ptr: chunk.as_ptr(),
        _keep: Box::new(chunk),
    })
}

fn read(a: &ReadArgs) -> Result<()> {
    let ctrl = open(&a.controller, 4)?;
    let (nsid, lba, blocks) = (a.nsid, a.lba, a.blocks);
    let shift = ctrl.namespace(nsid).map(|n| n.info.lba_shift).unwrap_or(9);
    let len = (u64::from(blocks) << shift) as usize;
    let buf = io_buffer(a.external_iova, &ctrl, len.max(1))?;
    let mut qp = ctrl.create_io_queue_pair(8)?;
    let what = format!("read of {blocks} blocks at LBA {lba}, namespace {nsid}");
    sync_io::run(ctrl.name(), &mut qp, &what, |qp| {
        qp.read(
            nsid,
            lba,
            blocks,
            shift,
            &[DmaSegment {
                iova: buf.iova,
                len: len as u32,
            }],
            0,
        )
    })?;
    let mut data = vec![0u8; len];
    // SAFETY: the buffer holds at least `len` bytes; the device is done with it.
    unsafe { std::ptr::copy_nonoverlapping(buf.ptr, data.as_mut_ptr(), len) };
    let out = &a.out;
    std::fs::write(out, &data).map_err(|e| Error::Io {
        what: format!("writing {}", out.display()),
        source: e,
    })?;
    println!(
        "read {len} bytes from LBA {lba} into {} (buffer at IOVA {:#x})",
        out.display(),
        buf.iova
    );
    Ok(())
}

fn write(a: &WriteArgs) -> Result<()> {
    let ctrl = open(&a.controller, 4)?;
    let (nsid, lba) = (a.nsid, a.lba);
    let shift = ctrl.namespace(nsid).map(|n| n.info.lba_shift).unwrap_or(9);
    let input = a.input.display();
    let data = std::fs::read(&a.input).map_err(|e| Error::Io {
        what: format!("reading {input}"),
        source: e,
    })?;
    if data.is_empty() || data.len() % (1 << shift) != 0 {
        return Err(Error::BadArgument(format!(
            "{input}: {} bytes is not a positive multiple of the {}-byte block",
            data.len(),
            1 << shift
        )));
    }
    let blocks = (data.len() >> shift) as u32;
    let buf = io_buffer(a.external_iova, &ctrl, data.len())?;
    // SAFETY: the buffer holds at least `data.len()` bytes and the device is not using it.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.ptr, data.len()) };
    let mut qp = ctrl.create_io_queue_pair(8)?;
    let what = format!("write of {blocks} blocks at LBA {lba}, namespace {nsid}");
    sync_io::run(ctrl.name(), &mut qp, &what, |qp| {
        qp.write(
            nsid,
            lba,
            blocks,
            shift,
            &[DmaSegment {
                iova: buf.iova,
                len: data.len() as u32,
            }],
            0,
        )
    })?;
    println!(
        "wrote {} bytes from {input} at LBA {lba} (buffer at IOVA {:#x})",
        data.len(),
        buf.iova
    );
    Ok(())
}

/// A command without data: flush, write zeroes or deallocate.
enum Simple {
    Flush,
    WriteZeroes { lba: u64, blocks: u32 },
    Deallocate { lba: u64, blocks: u32 },
}

fn simple(c: &ControllerArgs, nsid: u32, command: Simple) -> Result<()> {
    let ctrl = open(c, 4)?;
    let mut qp = ctrl.create_io_queue_pair(8)?;
    let name = ctrl.name().to_string();
    let what = match command {
        Simple::Flush => {
            sync_io::run(&name, &mut qp, "flush", |qp| qp.flush(nsid, 0))?;
            "flush".to_string()
        }
        Simple::WriteZeroes { lba, blocks } => {
            let what = format!("write zeroes of {blocks} blocks at LBA {lba}");
            sync_io::run(&name, &mut qp, &what, |qp| {
                qp.write_zeroes(nsid, lba, blocks, 0)
            })?;
            what
        }
        Simple::Deallocate { lba, blocks } => {
            let what = format!("deallocate of {blocks} blocks at LBA {lba}");
            sync_io::run(&name, &mut qp, &what, |qp| {
                qp.deallocate(nsid, &[(lba, blocks)], 0)
            })?;
            what
        }
    };
    println!("{what}: success");
    Ok(())
}

fn run_verify(a: &VerifyArgs, json: bool) -> Result<()> {
    let opts = VerifyOptions {
        nsid: a.nsid,
        seed: a.seed,
        queues: a.queues,
        ops: a.ops,
        region_blocks: a.region_blocks,
        entries: 64,
        reset_after_ops: a.reset_after_ops,
    };
    let ctrl = open_with_queues(&a.controller, opts.queues)?;
    let started = std::time::Instant::now();
    let r = verify::verify(&ctrl, &opts)?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "ops": r.ops,
                "bytes": r.bytes,
                "unaligned_ops": r.unaligned_ops,
                "scattered_ops": r.scattered_ops,
                "sgl_commands": r.sgl_commands,
                "largest": r.largest,
                "queues": r.queues,
                "first_lba": r.area.0,
                "blocks": r.area.1,
                "block_size": r.block_size,
                "seed": opts.seed,
                "resets": r.resets,
                "ops_after_reset": r.ops_after_reset,
                "seconds": secs,
            })
        );
    } else {
        println!(
            "verified {} write+read-back ops ({} bytes, {} with unaligned buffers, largest {} bytes) on {} queues in {secs:.1} s; blocks {}..{} hold seed {}'s pattern",
            r.ops, r.bytes, r.unaligned_ops, r.largest, r.queues, r.area.0, r.area.0 + r.area.1, opts.seed
        );
    }
    Ok(())
}

fn check_pattern(a: &CheckPatternArgs, json: bool) -> Result<()> {
    use std::io::Read;
    let path = &a.path.display().to_string();
    let (seed, blocks, block_size, first) = (a.seed, a.blocks, a.block_size, a.first_lba);
    // Where that LBA's data starts in the file: at the LBA on a device, anywhere in a copy.
    let skip = a.skip.unwrap_or(first);
    let mut file = std::fs::File::open(path).map_err(|e| Error::Io {
        what: format!("opening {path}"),
        source: e,
    })?;
    if skip > 0 {
        use std::io::{Seek, SeekFrom};
        file.seek(SeekFrom::Start(skip * block_size as u64))
            .map_err(|e| Error::Io {
                what: format!("seeking {path}"),
                source: e,
            })?;
    }
    let chunk_blocks = 256u64;
    let mut buf = vec![0u8; chunk_blocks as usize * block_size];
    let mut lba = first;
    while lba < first + blocks {
        let n = chunk_blocks.min(first + blocks - lba) as usize;
        file.read_exact(&mut buf[..n * block_size])
            .map_err(|e| Error::Io {
                what: format!("reading {path} at block {lba}"),
                source: e,
            })?;
        if let Some(bad) = check_pattern_of(seed, lba, block_size, &buf[..n * block_size]) {
            return Err(Error::BadArgument(format!(
                "{path}: block {bad} does not hold seed {seed}'s pattern"
            )));
        }
        lba += n as u64;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"path": path, "blocks": blocks, "first_lba": first, "ok": true})
        );
    } else {
        println!(
            "{path}: blocks {first}..{} hold seed {seed}'s pattern",
            first + blocks
        );
    }
    Ok(())
}

fn run_perf(a: &PerfArgs, json: bool, allocations: &(dyn Fn() -> u64 + Sync)) -> Result<()> {
    let workload = match a.rw {
        PerfRw::Randread => Workload::RandRead,
        PerfRw::Randwrite => Workload::RandWrite,
        PerfRw::Randrw => Workload::RandRw {
            read_percent: a.read_percent,
        },
    };
    let opts = PerfOptions {
        nsid: a.nsid,
        workload,
        block_size: a.bs as usize,
        queue_depth: a.qd,
        queues: a.queues,
        duration: Duration::from_secs(a.seconds),
        warmup: Duration::from_millis(a.warmup_ms),
    };
    let ctrl = open_with_queues(&a.controller, opts.queues)?;
    let r = perf::perf(&ctrl, &opts, allocations)?;
    let rw = a.rw.name();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "rw": rw,
                "bs": opts.block_size,
                "qd": opts.queue_depth,
                "queues": opts.queues,
                "seconds": r.seconds,
                "ios": r.ios,
                "reads": r.reads,
                "iops": r.iops,
                "mb_per_s": r.mb_per_s,
                "lat_mean_us": r.mean_us,
                "lat_p50_us": r.p50_us,
                "lat_p99_us": r.p99_us,
                "lat_p999_us": r.p999_us,
                "allocations": r.allocations,
                "shadow_doorbells": ctrl.shadow_doorbells_in_use(),
                "doorbells_skipped": r.doorbells_skipped,
            })
        );
    } else {
        println!(
            "{} {rw} bs={} qd={} queues={}: {:.0} IOPS, {:.1} MB/s; latency mean {:.1} us, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us; {} heap allocations while measuring; shadow doorbells {} ({} MMIO writes saved)",
            ctrl.name(), opts.block_size, opts.queue_depth, opts.queues, r.iops, r.mb_per_s, r.mean_us, r.p50_us, r.p99_us, r.p999_us, r.allocations,
            ctrl.shadow_doorbells_in_use(), r.doorbells_skipped
        );
    }
    Ok(())
}
