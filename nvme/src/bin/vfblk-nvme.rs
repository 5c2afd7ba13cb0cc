//! `vfblk-nvme`: an nvme-cli-like tool over our VFIO driver: find controllers, hand them to
//! vfio-pci and back, probe, identify, read/write LBA ranges, flush, write zeroes,
//! deallocate, and a data-integrity exercise.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vfblk_nvme::controller::{Controller, Options};
use vfblk_nvme::pci::{PciAddress, SysfsPciDevice, CLASS_NVME};
use vfblk_nvme::perf::{self, PerfOptions, Workload};
use vfblk_nvme::prp::Segment;
use vfblk_nvme::verify::{self, VerifyOptions};
use vfblk_nvme::{probe, sync_io, Error, Result};

const USAGE: &str = "usage: vfblk-nvme <command> [options]

commands:
  Commands that bring the controller up use shadow doorbells when it offers them;
  --mmio-doorbells always writes the doorbell registers instead.

  list [--json]                     NVMe controllers with their driver and IOMMU group
  bind-vfio ADDR                    bind to vfio-pci (driver_override, unbind, probe)
  bind-kernel ADDR                  give the controller back to the kernel's nvme driver
  probe ADDR [--json]               open through VFIO, read CAP/VS/CSTS, map a DMA buffer
  identify ADDR [--json]            bring the controller up, Identify it and its namespaces
  read ADDR --lba N --blocks N --out FILE [--nsid N] [--external-iova IOVA]
  write ADDR --lba N --in FILE [--nsid N] [--external-iova IOVA]
                                    (FILE size: a multiple of the block size; with
                                    --external-iova the buffer is separate memory mapped at
                                    that IOVA, as guest RAM is)
  flush ADDR [--nsid N]
  write-zeroes ADDR --lba N --blocks N [--nsid N]
  deallocate ADDR --lba N --blocks N [--nsid N]
  verify ADDR [--seed N] [--queues N] [--ops N] [--region-blocks N] [--nsid N]
         [--reset-after-ops N] [--json]
                                    random writes + read-backs on several queues/threads,
                                    then every block of the area written with its pattern
  perf ADDR [--rw randread|randwrite|randrw] [--read-percent N] [--bs BYTES] [--qd N]
           [--queues N] [--seconds N] [--warmup-ms N] [--nsid N] [--json]
                                    keep QD commands in flight per queue pair (one thread
                                    each); IOPS, MB/s, latency percentiles, heap allocations
  check-pattern PATH --blocks N --block-size N [--seed N] [--first-lba N] [--skip N] [--json]
                                    check a device or file (read with ordinary I/O) holds
                                    the patterns `verify` wrote for LBAs from first-lba,
                                    starting `skip` blocks into PATH (default: first-lba)
";

/// Counts heap allocations, so `perf` can show the I/O loop makes none.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only adds a counter.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Positional words and `--name value` options; `--json` is a flag.
struct Cli {
    words: Vec<String>,
    options: HashMap<String, String>,
    json: bool,
    /// `--mmio-doorbells`: do not use shadow doorbells even if the controller offers them.
    mmio_doorbells: bool,
}

impl Cli {
    fn parse() -> Result<Self> {
        let mut cli = Cli {
            words: Vec::new(),
            options: HashMap::new(),
            json: false,
            mmio_doorbells: false,
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if arg == "--json" {
                cli.json = true;
            } else if arg == "--mmio-doorbells" {
                cli.mmio_doorbells = true;
            } else if let Some(name) = arg.strip_prefix("--") {
                let value = args
                    .next()
                    .ok_or_else(|| Error::BadArgument(format!("--{name} needs a value")))?;
                cli.options.insert(name.to_string(), value);
            } else {
                cli.words.push(arg);
            }
        }
        Ok(cli)
    }

    fn num(&self, name: &str, default: Option<u64>) -> Result<u64> {
        match self.options.get(name) {
            Some(v) => {
                let parsed = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                parsed.map_err(|_| Error::BadArgument(format!("--{name}: {v:?} is not a number")))
            }
            None => default.ok_or_else(|| Error::BadArgument(format!("--{name} is required"))),
        }
    }

    fn path(&self, name: &str) -> Result<&str> {
        self.options
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Error::BadArgument(format!("--{name} is required")))
    }

    fn address(&self) -> Result<PciAddress> {
        self.words
            .get(1)
            .ok_or_else(|| Error::BadArgument("a PCI address is required".into()))?
            .parse()
    }
}

fn main() -> ExitCode {
    let result = Cli::parse().and_then(|cli| {
        let command = cli.words.first().cloned().unwrap_or_default();
        match command.as_str() {
            "list" => list(cli.json),
            "bind-vfio" => bind(&cli, "vfio-pci"),
            "bind-kernel" => bind(&cli, "nvme"),
            "probe" => run_probe(&cli),
            "identify" => identify(&cli),
            "read" => read(&cli),
            "write" => write(&cli),
            "flush" => simple(&cli, "flush"),
            "write-zeroes" => simple(&cli, "write-zeroes"),
            "deallocate" => simple(&cli, "deallocate"),
            "verify" => run_verify(&cli),
            "check-pattern" => check_pattern(&cli),
            "perf" => run_perf(&cli),
            "--help" | "-h" | "help" => {
                print!("{USAGE}");
                Ok(())
            }
            _ => Err(Error::BadArgument(format!(
                "unknown command {command:?}\n{USAGE}"
            ))),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-nvme: {e}");
            ExitCode::FAILURE
        }
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
        let items: Vec<String> = rows
            .iter()
            .map(|(a, d, g)| {
                format!("{{\"pci_address\":\"{a}\",\"driver\":\"{d}\",\"iommu_group\":\"{g}\"}}")
            })
            .collect();
        println!("[{}]", items.join(","));
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

fn bind(cli: &Cli, driver: &str) -> Result<()> {
    let address = cli.address()?;
    let dev = SysfsPciDevice::new(address)?;
    let before = dev.driver().unwrap_or_else(|| "none".into());
    dev.bind(Some(driver))?;
    eprintln!(
        "{address}: {before} -> {}",
        dev.driver().unwrap_or_else(|| "none".into())
    );
    Ok(())
}

fn run_probe(cli: &Cli) -> Result<()> {
    let address = cli.address()?;
    let report = probe::probe(address)?;
    if cli.json {
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
    println!("  CC / CSTS      {:#x} / {}", report.cc, report.csts);
    println!(
        "  DMA            {} bytes ({}) mapped at IOVA {:#x} and unmapped",
        report.dma_size, report.dma_page_kind, report.dma_iova
    );
    Ok(())
}

fn open(cli: &Cli) -> Result<Controller> {
    Controller::open(
        cli.address()?,
        &Options {
            io_queues: cli.num("queues", Some(4))? as u16,
            shadow_doorbells: !cli.mmio_doorbells,
        },
    )
}

/// Brings the controller up and checks it granted `queues` I/O queue pairs.
fn open_with_queues(cli: &Cli, queues: u16) -> Result<Controller> {
    let ctrl = Controller::open(
        cli.address()?,
        &Options {
            io_queues: queues,
            shadow_doorbells: !cli.mmio_doorbells,
        },
    )?;
    if ctrl.io_queues_granted() < queues {
        return Err(Error::BadArgument(format!(
            "{}: {queues} queues asked, {} granted",
            ctrl.name(),
            ctrl.io_queues_granted()
        )));
    }
    Ok(ctrl)
}

fn json_str(s: &str) -> String {
    let escaped: String = s
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if c.is_control() => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

fn identify(cli: &Cli) -> Result<()> {
    let ctrl = open(cli)?;
    let id = ctrl.identify();
    if cli.json {
        let ns: Vec<String> = ctrl
            .namespaces()
            .iter()
            .map(|n| {
                format!(
                    "{{\"nsid\":{},\"blocks\":{},\"block_size\":{},\"size_bytes\":{},\"deallocated_reads_zeroes\":{}}}",
                    n.nsid,
                    n.info.nsze,
                    n.info.block_size(),
                    n.info.size_bytes(),
                    n.info.deallocated_reads_zeroes()
                )
            })
            .collect();
        println!(
            "{{\"pci_address\":\"{}\",\"version\":\"{}\",\"serial\":{},\"model\":{},\"firmware\":{},\"mdts\":{},\"max_transfer\":{},\"io_queues\":{},\"dsm\":{},\"write_zeroes\":{},\"volatile_write_cache\":{},\"sgl\":{},\"doorbell_buffer\":{},\"shadow_doorbells_in_use\":{},\"namespaces\":[{}]}}",
            ctrl.name(),
            ctrl.version(),
            json_str(&id.serial),
            json_str(&id.model),
            json_str(&id.firmware),
            id.mdts,
            ctrl.max_transfer(),
            ctrl.io_queues_granted(),
            id.supports_dsm(),
            id.supports_write_zeroes(),
            id.has_volatile_write_cache(),
            id.supports_sgl(),
            id.supports_doorbell_buffer(),
            ctrl.shadow_doorbells_in_use(),
            ns.join(",")
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

fn io_buffer(cli: &Cli, ctrl: &Controller, len: usize) -> Result<IoBuffer> {
    if cli.options.contains_key("external-iova") {
        let iova = cli.num("external-iova", None)?;
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

fn read(cli: &Cli) -> Result<()> {
    let ctrl = open(cli)?;
    let nsid = cli.num("nsid", Some(1))? as u32;
    let shift = ctrl.namespace(nsid).map(|n| n.info.lba_shift).unwrap_or(9);
    let (lba, blocks) = (cli.num("lba", None)?, cli.num("blocks", None)?);
    let len = (blocks << shift) as usize;
    let buf = io_buffer(cli, &ctrl, len.max(1))?;
    let mut qp = ctrl.create_io_queue_pair(8)?;
    let what = format!("read of {blocks} blocks at LBA {lba}, namespace {nsid}");
    sync_io::run(ctrl.name(), &mut qp, &what, |qp| {
        qp.read(
            nsid,
            lba,
            blocks as u32,
            shift,
            &[Segment {
                iova: buf.iova,
                len: len as u32,
            }],
            0,
        )
    })?;
    let mut data = vec![0u8; len];
    // SAFETY: the buffer holds at least `len` bytes; the device is done with it.
    unsafe { std::ptr::copy_nonoverlapping(buf.ptr, data.as_mut_ptr(), len) };
    let out = cli.path("out")?;
    std::fs::write(out, &data).map_err(|e| Error::Io {
        what: format!("writing {out}"),
        source: e,
    })?;
    eprintln!(
        "read {len} bytes from LBA {lba} into {out} (buffer at IOVA {:#x})",
        buf.iova
    );
    Ok(())
}

fn write(cli: &Cli) -> Result<()> {
    let ctrl = open(cli)?;
    let nsid = cli.num("nsid", Some(1))? as u32;
    let shift = ctrl.namespace(nsid).map(|n| n.info.lba_shift).unwrap_or(9);
    let lba = cli.num("lba", None)?;
    let input = cli.path("in")?;
    let data = std::fs::read(input).map_err(|e| Error::Io {
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
    let buf = io_buffer(cli, &ctrl, data.len())?;
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
            &[Segment {
                iova: buf.iova,
                len: data.len() as u32,
            }],
            0,
        )
    })?;
    eprintln!(
        "wrote {} bytes from {input} at LBA {lba} (buffer at IOVA {:#x})",
        data.len(),
        buf.iova
    );
    Ok(())
}

fn simple(cli: &Cli, command: &str) -> Result<()> {
    let ctrl = open(cli)?;
    let nsid = cli.num("nsid", Some(1))? as u32;
    let mut qp = ctrl.create_io_queue_pair(8)?;
    let name = ctrl.name().to_string();
    match command {
        "flush" => sync_io::run(&name, &mut qp, "flush", |qp| qp.flush(nsid, 0))?,
        "write-zeroes" => {
            let (lba, blocks) = (cli.num("lba", None)?, cli.num("blocks", None)? as u32);
            let what = format!("write zeroes of {blocks} blocks at LBA {lba}");
            sync_io::run(&name, &mut qp, &what, |qp| {
                qp.write_zeroes(nsid, lba, blocks, 0)
            })?
        }
        _ => {
            let (lba, blocks) = (cli.num("lba", None)?, cli.num("blocks", None)? as u32);
            let what = format!("deallocate of {blocks} blocks at LBA {lba}");
            sync_io::run(&name, &mut qp, &what, |qp| {
                qp.deallocate(nsid, &[(lba, blocks)], 0)
            })?
        }
    };
    eprintln!("{command}: success");
    Ok(())
}

fn run_verify(cli: &Cli) -> Result<()> {
    let opts = VerifyOptions {
        nsid: cli.num("nsid", Some(1))? as u32,
        seed: cli.num("seed", Some(1))?,
        queues: cli.num("queues", Some(2))? as u16,
        ops: cli.num("ops", Some(200))? as u32,
        region_blocks: cli.num("region-blocks", Some(16384))?,
        entries: 64,
        reset_after_ops: cli
            .options
            .get("reset-after-ops")
            .map(|_| cli.num("reset-after-ops", None))
            .transpose()?,
    };
    let ctrl = open_with_queues(cli, opts.queues)?;
    let started = std::time::Instant::now();
    let r = verify::verify(&ctrl, &opts)?;
    let secs = started.elapsed().as_secs_f64();
    if cli.json {
        println!(
            "{{\"ops\":{},\"bytes\":{},\"unaligned_ops\":{},\"scattered_ops\":{},\"sgl_commands\":{},\"largest\":{},\"queues\":{},\"first_lba\":{},\"blocks\":{},\"block_size\":{},\"seed\":{},\"resets\":{},\"ops_after_reset\":{},\"seconds\":{secs:.3}}}",
            r.ops, r.bytes, r.unaligned_ops, r.scattered_ops, r.sgl_commands, r.largest, r.queues, r.area.0, r.area.1, r.block_size, opts.seed, r.resets, r.ops_after_reset
        );
    } else {
        println!(
            "verified {} write+read-back ops ({} bytes, {} with unaligned buffers, largest {} bytes) on {} queues in {secs:.1} s; blocks {}..{} hold seed {}'s pattern",
            r.ops, r.bytes, r.unaligned_ops, r.largest, r.queues, r.area.0, r.area.0 + r.area.1, opts.seed
        );
    }
    Ok(())
}

fn check_pattern(cli: &Cli) -> Result<()> {
    use std::io::Read;
    let path = cli
        .words
        .get(1)
        .ok_or_else(|| Error::BadArgument("a path is required".into()))?;
    let seed = cli.num("seed", Some(1))?;
    let blocks = cli.num("blocks", None)?;
    let block_size = cli.num("block-size", None)? as usize;
    let first = cli.num("first-lba", Some(0))?;
    // Where that LBA's data starts in the file: at the LBA on a device, anywhere in a copy.
    let skip = cli.num("skip", Some(first))?;
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
        if let Some(bad) = verify::check_pattern(seed, lba, block_size, &buf[..n * block_size]) {
            return Err(Error::BadArgument(format!(
                "{path}: block {bad} does not hold seed {seed}'s pattern"
            )));
        }
        lba += n as u64;
    }
    if cli.json {
        println!(
            "{{\"path\":{},\"blocks\":{blocks},\"first_lba\":{first},\"ok\":true}}",
            json_str(path)
        );
    } else {
        println!(
            "{path}: blocks {first}..{} hold seed {seed}'s pattern",
            first + blocks
        );
    }
    Ok(())
}

fn run_perf(cli: &Cli) -> Result<()> {
    let workload = match cli
        .options
        .get("rw")
        .map(String::as_str)
        .unwrap_or("randread")
    {
        "randread" => Workload::RandRead,
        "randwrite" => Workload::RandWrite,
        "randrw" => Workload::RandRw {
            read_percent: cli.num("read-percent", Some(70))?.min(100) as u8,
        },
        other => {
            return Err(Error::BadArgument(format!(
                "--rw {other}: randread, randwrite or randrw"
            )))
        }
    };
    let opts = PerfOptions {
        nsid: cli.num("nsid", Some(1))? as u32,
        workload,
        block_size: cli.num("bs", Some(4096))? as usize,
        queue_depth: cli.num("qd", Some(32))? as u16,
        queues: cli.num("queues", Some(1))? as u16,
        duration: Duration::from_secs(cli.num("seconds", Some(10))?),
        warmup: Duration::from_millis(cli.num("warmup-ms", Some(1000))?),
    };
    let ctrl = open_with_queues(cli, opts.queues)?;
    let counter = || ALLOCATIONS.load(Ordering::Relaxed);
    let r = perf::perf(&ctrl, &opts, &counter)?;
    let rw = cli
        .options
        .get("rw")
        .cloned()
        .unwrap_or_else(|| "randread".into());
    if cli.json {
        println!(
            "{{\"rw\":\"{rw}\",\"bs\":{},\"qd\":{},\"queues\":{},\"seconds\":{:.3},\"ios\":{},\"reads\":{},\"iops\":{:.1},\"mb_per_s\":{:.3},\"lat_mean_us\":{:.2},\"lat_p50_us\":{:.2},\"lat_p99_us\":{:.2},\"lat_p999_us\":{:.2},\"allocations\":{},\"shadow_doorbells\":{},\"doorbells_skipped\":{}}}",
            opts.block_size, opts.queue_depth, opts.queues, r.seconds, r.ios, r.reads, r.iops, r.mb_per_s, r.mean_us, r.p50_us, r.p99_us, r.p999_us, r.allocations,
            ctrl.shadow_doorbells_in_use(), r.doorbells_skipped
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
