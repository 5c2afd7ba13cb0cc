//! Controller bring-up and administration: reset, admin queue, Identify, queue creation and
//! deletion, shutdown.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vfblk_hugepages::{
    DmaChunk, DmaMapper, DmaPool, ExternalMapping, IovaAllocator, VfioDmaMapper,
};

use crate::pci::PciAddress;
use crate::queue::{ChunkRecord, Layout, QueueOwner, QueuePair, QueueRecord, ShadowDoorbells};
use crate::regs::{offset, Cap, Cc, Registers, ShutdownNotification, Version};
use crate::spec::{Command, IdentifyController, IdentifyNamespace};
use crate::vfio::VfioPci;
use crate::{Error, Result};

/// Controller memory page size we configure (CC.MPS = 0).
pub const PAGE_SIZE: usize = 4096;

/// Entries in the admin queues.
const ADMIN_ENTRIES: u16 = 32;

/// How long an admin command may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Transfer limit when the controller reports none (MDTS = 0).
const DEFAULT_MAX_TRANSFER: usize = 2 << 20;

/// An active namespace.
#[derive(Debug, Clone)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// Its Identify data.
    pub info: IdentifyNamespace,
}

/// Options for [`Controller::open`].
#[derive(Debug, Clone)]
pub struct Options {
    /// I/O queue pairs to ask the controller for.
    pub io_queues: u16,
    /// Use shadow doorbells (Doorbell Buffer Config) if the controller offers them.
    pub shadow_doorbells: bool,
    /// Use SGLs for scatter lists PRPs cannot describe, if the controller offers them; off,
    /// the controller is driven as one without (tests of the PRP-only path).
    pub sgl: bool,
    /// Which half of the driver's IOVA range ([`DRIVER_IOVAS`]) the queues and buffers take:
    /// a process taking a controller over uses the half the lender does not.
    pub upper_iova_half: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            io_queues: 8,
            shadow_doorbells: true,
            sgl: true,
            upper_iova_half: false,
        }
    }
}

/// The IOVAs the driver allocates its queues and buffers from: [256 GiB, 512 GiB), below the
/// 39-bit limit of an emulated Intel IOMMU, far above the MSI range, above guest RAM mapped
/// at IOVA = window base + guest-physical address. Split in two halves so that a process
/// taking a controller over maps its own memory beside the lender's.
pub const DRIVER_IOVAS: (u64, u64) = (256 << 30, 512 << 30);

fn driver_iova_half(upper: bool) -> (u64, u64) {
    let mid = (DRIVER_IOVAS.0 + DRIVER_IOVAS.1) / 2;
    if upper {
        (mid, DRIVER_IOVAS.1)
    } else {
        (DRIVER_IOVAS.0, mid)
    }
}

/// A controller lent to another process ([`Controller::lend`]): disabled, its fds duplicated.
pub struct Lending {
    /// The fds and region layout the borrower adopts.
    pub vfio: crate::vfio::SharedVfio,
    /// Whether the lender's driver IOVAs are the upper half (the borrower takes the other).
    pub upper_iova_half: bool,
}

pub(crate) struct Shared {
    pub name: String,
    /// SGLs allowed by the options (the controller must offer them too).
    pub use_sgl: bool,
    pub pci: Arc<VfioPci>,
    pub cap: Cap,
    pub version: Version,
    pub mapper: Arc<dyn DmaMapper>,
    vfio_mapper: Arc<VfioDmaMapper>,
    /// The driver's IOVA half (see [`DRIVER_IOVAS`]).
    upper_iova_half: bool,
    /// Lent to another process: the registers and queues are not ours to touch.
    lent: std::sync::atomic::AtomicBool,
    pub iovas: Arc<Mutex<IovaAllocator>>,
    pub admin: Mutex<QueuePair>,
    pub identify: IdentifyController,
    /// The Identify Controller page as read, for a process taking the controller over.
    identify_page: Box<[u8; 4096]>,
    pub namespaces: Vec<Namespace>,
    /// Each namespace's Identify page as read (same order as `namespaces`).
    namespace_pages: Vec<Box<[u8; 4096]>>,
    /// I/O queue pairs no one uses now, their queues kept on the controller (nothing in
    /// flight): handed out again before new ones are created, and handed over whole to a
    /// process taking the controller over. They hold no reference to this.
    spares: Mutex<Vec<QueuePair>>,
    /// Set once the DMA memory is this process's to unmap: at once for memory it mapped,
    /// when the lender lets go for arenas taken over from it.
    owned: Arc<std::sync::atomic::AtomicBool>,
    pub io_queues_granted: u16,
    pub max_transfer: usize,
    /// Queue ids in use (index = qid).
    pub qids: Mutex<Vec<bool>>,
    scratch: Mutex<DmaChunk>,
    pub pool: DmaPool,
    /// Bumped by every reset; queue pairs compare it with the one they were created in.
    pub generation: Arc<std::sync::atomic::AtomicU64>,
    /// CC as configured at enable, for re-enabling after a reset.
    cc: Cc,
    /// Shadow doorbell and event index pages, when Doorbell Buffer Config is in use.
    dbbuf: Option<(DmaChunk, DmaChunk)>,
    /// The record kept for a successor after a crash, once [`Controller::keep`] was called.
    keeping: Mutex<Option<Keeping>>,
}

/// An NVMe controller brought up through VFIO. I/O queue pairs created from it may be moved
/// to other threads; the controller is shut down when it and all its queue pairs are dropped.
#[derive(Clone)]
pub struct Controller {
    shared: Arc<Shared>,
}

/// The one disable sequence (open, reset, drop): clear CC.EN if the controller is enabled or
/// still ready, then wait for CSTS.RDY = 0. After it the controller does no DMA.
fn disable(regs: &Registers, name: &str, timeout: Duration) -> Result<()> {
    let cc = regs.cc();
    if cc.enabled() || regs.csts().ready() {
        regs.set_cc(cc.with_enable(false));
    }
    wait_ready(regs, name, false, timeout)
}

/// The one enable sequence (open, reset): point the controller at the admin queue, write
/// `cc` with CC.EN set, and wait for CSTS.RDY = 1.
fn enable(
    regs: &Registers,
    bar: &crate::mmio::Mmio,
    admin: &QueuePair,
    cc: Cc,
    name: &str,
    timeout: Duration,
) -> Result<()> {
    let last = u32::from(admin.entries() - 1);
    bar.write32(offset::AQA, (last << 16) | last);
    bar.write64(offset::ASQ, admin.sq_iova());
    bar.write64(offset::ACQ, admin.cq_iova());
    regs.set_cc(cc.with_enable(true));
    wait_ready(regs, name, true, timeout)
}

/// Normal shutdown (CC.SHN = 01) and its completion, bounded by `timeout`.
fn shutdown(regs: &Registers, name: &str, timeout: Duration) {
    regs.set_cc(regs.cc().with_shutdown(ShutdownNotification::Normal));
    let deadline = Instant::now() + timeout;
    while regs.csts().shutdown_status() != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    if regs.csts().shutdown_status() != 2 {
        tracing::warn!(
            "{name}: shutdown did not complete within {timeout:?} (CSTS {})",
            regs.csts()
        );
    }
}

fn wait_ready(regs: &Registers, name: &str, ready: bool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let csts = regs.csts();
        if csts.fatal() {
            return Err(Error::Device {
                device: name.into(),
                what: format!(
                    "controller fatal status while waiting for RDY={}: CSTS {csts}",
                    ready as u8
                ),
            });
        }
        if csts.ready() == ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                device: name.into(),
                what: format!(
                    "CSTS.RDY to become {} (CSTS {csts}, waited {timeout:?})",
                    ready as u8
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The ranges of `first..end` that no arena of `arenas` (sorted IOVA ranges) covers: where
/// memory another process mapped in this process's half of the driver's IOVAs lies.
fn gaps_between(first: u64, end: u64, arenas: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut gaps = Vec::new();
    let mut at = first;
    for &(iova, len) in arenas {
        if iova > at {
            gaps.push((at, iova - at));
        }
        at = at.max(iova + len);
    }
    if at < end {
        gaps.push((at, end - at));
    }
    gaps
}

/// Largest transfer per command: MDTS in units of the minimum page, capped.
fn max_transfer(cap: Cap, identify: &IdentifyController) -> usize {
    if identify.mdts > 0 {
        (cap.page_size_min() << identify.mdts).min(DEFAULT_MAX_TRANSFER)
    } else {
        DEFAULT_MAX_TRANSFER
    }
}

/// The version of [`ControllerRecord`] this driver writes and reads. Raise it whenever the
/// record, the queue memory layout or what an adopting process assumes changes meaning.
pub const QUEUE_HANDOVER_VERSION: u32 = 1;

/// How long [`Controller::hand_over_queues`] waits for every I/O queue pair to come back
/// from its poller.
const PARK_DEADLINE: Duration = Duration::from_secs(1);

/// An arena of the driver's DMA memory as handed over: its memfd travels beside the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArenaRecord {
    /// IOVA it is mapped at in the shared container.
    pub iova: u64,
    /// Bytes.
    pub len: u64,
}

/// An active namespace as handed over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NamespaceRecord {
    /// Namespace id.
    pub nsid: u32,
    /// Its Identify Namespace page, hex.
    pub identify: String,
}

/// An enabled controller with its queues, as a process taking it over adopts it
/// ([`Controller::take_over`]): everything it would otherwise read from the controller or
/// create on it. Checked against the controller's registers and against itself on adoption.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControllerRecord {
    /// [`QUEUE_HANDOVER_VERSION`] of the writer.
    pub version: u32,
    /// CAP as the lender read it.
    pub cap: u64,
    /// CC as the lender configured it (enabled).
    pub cc: u32,
    /// The lender's driver IOVAs are the upper half of [`DRIVER_IOVAS`].
    pub upper_iova_half: bool,
    /// The DMA arenas (queues, PRP/SGL lists, doorbell pages, bounce buffers), one memfd
    /// each, in order.
    pub arenas: Vec<ArenaRecord>,
    /// The admin queue pair.
    pub admin: QueueRecord,
    /// The page Identify data is read into.
    pub scratch: ChunkRecord,
    /// The shadow doorbell and event index pages, if Doorbell Buffer Config is in use.
    pub doorbell_buffers: Option<[ChunkRecord; 2]>,
    /// I/O queues the controller granted (Set Features Number of Queues).
    pub io_queues_granted: u16,
    /// The Identify Controller page, hex.
    pub identify: String,
    /// The active namespaces.
    pub namespaces: Vec<NamespaceRecord>,
    /// The I/O queue pairs, their queues live on the controller, nothing in flight.
    pub queues: Vec<QueueRecord>,
}

/// A controller handed over with its queues ([`Controller::hand_over_queues`]).
pub struct QueueHandover {
    /// The VFIO fds and region layout.
    pub vfio: crate::vfio::SharedVfio,
    /// The controller and its queues.
    pub record: ControllerRecord,
    /// The arenas' memfds, in the record's order.
    pub memfds: Vec<std::os::fd::OwnedFd>,
}

/// The version of [`KeptController`] this driver writes and reads. Raise it whenever the
/// record or what a recovering process assumes changes meaning.
pub const KEPT_VERSION: u32 = 1;

/// How long [`Controller::recover`] waits for the admin commands a dead process left.
const RECOVERY_ADMIN_DEADLINE: Duration = Duration::from_secs(2);

/// A controller as the process driving it keeps it for a successor after a crash
/// ([`Controller::keep`], [`Controller::recover`]), rewritten whenever it changes: under the
/// admin lock, before an admin command's doorbell rings and after its completion is read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptController {
    /// [`KEPT_VERSION`] of the writer.
    pub version: u32,
    /// Where the VFIO regions sit in the device fd.
    pub layout: crate::vfio::RegionLayout,
    /// The controller as a hand-over records it, but with no I/O queue pairs and the admin
    /// queue where it stands (commands may be outstanding).
    pub controller: ControllerRecord,
    /// Admin commands written to the submission queue whose completions were not read.
    pub admin_outstanding: u16,
    /// I/O queue ids whose queues may exist on the controller.
    pub io_queues: Vec<u16>,
    /// Each arena's memfd (`st_dev`, `st_ino`), in the arenas' order: a successor checks
    /// that the fd it was given is the memory mapped at the arena's IOVA.
    pub arena_files: Vec<(u64, u64)>,
}

/// What a successor did to take a dead process's controller over ([`Controller::recover`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// I/O queue pairs of the dead process deleted (their commands completed or aborted).
    pub queues_deleted: usize,
    /// Admin commands of the dead process completed (they were outstanding).
    pub admin_completed: u16,
    /// Bytes of the dead process's other DMA memory unmapped.
    pub unmapped_bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

struct Keeping {
    file: crate::kept::KeptFile,
    record: KeptController,
    io_queues: std::collections::BTreeSet<u16>,
}

fn hex(page: &[u8; 4096]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * page.len());
    for b in page {
        text.push(DIGITS[usize::from(b >> 4)] as char);
        text.push(DIGITS[usize::from(b & 15)] as char);
    }
    text
}

fn unhex(text: &str, what: &str) -> std::result::Result<Box<[u8; 4096]>, String> {
    let bytes = text.as_bytes();
    if bytes.len() != 8192 {
        return Err(format!("{what}: {} hex digits, not 8192", bytes.len()));
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(format!("{what}: not lower-case hex")),
    };
    let mut page = Box::new([0u8; 4096]);
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        page[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Ok(page)
}

impl Controller {
    /// Brings up the controller at `address` (bound to vfio-pci): disable, admin queue,
    /// enable, Identify controller and namespaces, Set Features Number of Queues.
    pub fn open(address: PciAddress, options: &Options) -> Result<Self> {
        let pci = Arc::new(VfioPci::open(address, crate::regs::BAR0_MIN)?);
        Self::bring_up(pci, options)
    }

    /// Takes over a controller another process lent ([`Controller::lend`]) and brings it
    /// up as [`Controller::open`] does, with its own admin queue and memory in the other
    /// half of the driver's IOVAs (`options.upper_iova_half` must differ from the
    /// lender's). The lender's mappings stay in the shared container until it releases them.
    pub fn adopt(
        address: PciAddress,
        vfio: crate::vfio::SharedVfio,
        options: &Options,
    ) -> Result<Self> {
        let pci = Arc::new(VfioPci::adopt(address, vfio)?);
        Self::bring_up(pci, options)
    }

    fn bring_up(pci: Arc<VfioPci>, options: &Options) -> Result<Self> {
        let name = pci.address().to_string();
        let regs = Registers::new(pci.bar0());
        let cap = regs.cap();
        let version = regs.version();
        if !cap.nvm_command_set() {
            return Err(Error::Device {
                device: name,
                what: format!("CAP {:#x}: no NVM command set", cap.0),
            });
        }
        if !(cap.page_size_min()..=cap.page_size_max()).contains(&PAGE_SIZE) {
            return Err(Error::Device {
                device: name,
                what: format!(
                    "4 KiB pages unsupported (MPS {}..{})",
                    cap.page_size_min(),
                    cap.page_size_max()
                ),
            });
        }
        // CAP.TO is in 500 ms units; a 0 would mean "no time": allow at least 500 ms.
        let timeout = Duration::from_millis(cap.timeout_ms().max(500));
        let bar = pci.bar0();
        disable(&regs, &name, timeout)?;

        let vfio_mapper = Arc::new(VfioDmaMapper::new(
            pci.container_fd().as_raw_fd(),
            pci.clone(),
        ));
        let mapper: Arc<dyn DmaMapper> = vfio_mapper.clone();
        let (first, end) = driver_iova_half(options.upper_iova_half);
        let iovas = Arc::new(Mutex::new(IovaAllocator::with_window(first, end).map_err(
            |source| Error::Dma {
                device: name.clone(),
                source,
            },
        )?));
        let pool = DmaPool::new(&format!("vfblk-{name}"), mapper.clone(), iovas.clone());
        let dma = |len: usize| -> Result<DmaChunk> {
            pool.alloc(len, PAGE_SIZE).map_err(|source| Error::Dma {
                device: name.clone(),
                source,
            })
        };

        let entries = ADMIN_ENTRIES.min(cap.max_queue_entries().min(4096) as u16);
        let layout = Layout::new(entries, PAGE_SIZE, PAGE_SIZE);
        let admin_mem = dma(layout.total)?;
        let admin = QueuePair::new(
            0,
            layout,
            admin_mem,
            pci.clone(),
            cap.doorbell_stride(),
            PAGE_SIZE as u64,
        );
        // NVM command set, 4 KiB pages, round robin, 64-byte SQEs and 16-byte CQEs.
        let cc = Cc::default()
            .with_command_set(0)
            .with_page_size(PAGE_SIZE)
            .with_arbitration(0)
            .with_sq_entry_size(6)
            .with_cq_entry_size(4);
        enable(&regs, bar, &admin, cc, &name, timeout)?;

        let scratch = dma(PAGE_SIZE)?;
        let mut shared = Shared {
            name: name.clone(),
            pci: pci.clone(),
            cap,
            version,
            mapper: mapper.clone(),
            vfio_mapper,
            upper_iova_half: options.upper_iova_half,
            lent: std::sync::atomic::AtomicBool::new(false),
            iovas: iovas.clone(),
            admin: Mutex::new(admin),
            identify: IdentifyController::parse(&[0; 4096]),
            identify_page: Box::new([0; 4096]),
            namespaces: Vec::new(),
            namespace_pages: Vec::new(),
            spares: Mutex::new(Vec::new()),
            owned: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            io_queues_granted: 0,
            max_transfer: DEFAULT_MAX_TRANSFER,
            qids: Mutex::new(Vec::new()),
            scratch: Mutex::new(scratch),
            pool: pool.clone(),
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            cc,
            dbbuf: None,
            use_sgl: options.sgl,
            keeping: Mutex::new(None),
        };
        *shared.identify_page = shared.read_identify(Command::identify(1, 0, 0))?;
        shared.identify = IdentifyController::parse(&shared.identify_page);
        shared.max_transfer = max_transfer(cap, &shared.identify);
        let list = shared.read_identify(Command::identify(2, 0, 0))?;
        for chunk in list.chunks_exact(4) {
            let nsid = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            if nsid == 0 {
                break;
            }
            let page = shared.read_identify(Command::identify(0, nsid, 0))?;
            let info = IdentifyNamespace::parse(&page);
            shared.namespaces.push(Namespace { nsid, info });
            shared.namespace_pages.push(Box::new(page));
        }
        let wanted = options.io_queues.max(1);
        let granted = shared.admin_command(
            Command::set_number_of_queues(wanted, wanted),
            "Set Features (Number of Queues)",
        )?;
        let sqs = (granted & 0xffff) as u16 + 1;
        let cqs = (granted >> 16) as u16 + 1;
        shared.io_queues_granted = sqs.min(cqs).min(wanted);
        *shared.qids.lock().expect("fresh") =
            vec![false; usize::from(shared.io_queues_granted) + 1];
        if options.shadow_doorbells && shared.identify.supports_doorbell_buffer() {
            let pages = (dma(PAGE_SIZE)?, dma(PAGE_SIZE)?);
            shared.dbbuf = Some(pages);
            if let Err(e) = shared.configure_doorbell_buffers(None) {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "{e}; using MMIO doorbells only"
                );
                shared.dbbuf = None;
            }
        }
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// PCI address as text.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Identify Controller data.
    pub fn identify(&self) -> &IdentifyController {
        &self.shared.identify
    }

    /// Active namespaces.
    pub fn namespaces(&self) -> &[Namespace] {
        &self.shared.namespaces
    }

    /// The namespace `nsid`.
    pub fn namespace(&self, nsid: u32) -> Result<&Namespace> {
        self.shared
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
            .ok_or_else(|| Error::Device {
                device: self.shared.name.clone(),
                what: format!("no active namespace {nsid}"),
            })
    }

    /// CAP.
    pub fn cap(&self) -> Cap {
        self.shared.cap
    }

    /// VS.
    pub fn version(&self) -> Version {
        self.shared.version
    }

    /// I/O queue pairs the controller granted.
    pub fn io_queues_granted(&self) -> u16 {
        self.shared.io_queues_granted
    }

    /// Resets the controller (CC.EN 1 -> 0 -> 1) and brings it back with the same settings.
    /// Commands in flight on any queue pair complete as aborted
    /// ([`crate::spec::Status::ABORTED_BY_RESET`]) and the queue pairs recreate their queues
    /// on their next submit, ring or poll; callers resubmit what was aborted.
    pub fn reset(&self) -> Result<()> {
        self.shared.reset()
    }

    /// Lends the controller to another process taking this one's place: with nothing in
    /// flight on its queues (the caller made sure), disables it, so that the borrower can
    /// bring it up with its own admin queue, and duplicates the fds the borrower adopts
    /// ([`Controller::adopt`]). From here on nothing in this process touches the registers
    /// or the queues until [`Controller::reclaim`]; memory stays mapped.
    pub fn lend(&self) -> Result<Lending> {
        let s = &self.shared;
        let _admin = s.admin.lock().map_err(|_| Error::Poisoned {
            device: s.name.clone(),
            lock: "admin",
        })?;
        let vfio = s.pci.share()?;
        let regs = Registers::new(s.pci.bar0());
        let timeout = Duration::from_millis(s.cap.timeout_ms().max(500));
        // Before the controller changes hands: this process's record stops being true.
        s.void_kept();
        disable(&regs, &s.name, timeout)?;
        s.lent.store(true, std::sync::atomic::Ordering::Release);
        Ok(Lending {
            vfio,
            upper_iova_half: s.upper_iova_half,
        })
    }

    /// Whether the controller is lent ([`Controller::lend`]): its registers are not ours.
    pub fn lent(&self) -> bool {
        self.shared.is_lent()
    }

    /// Hands the controller over with its queues to a process taking this one's place,
    /// which adopts them ([`Controller::take_over`]) without disabling the controller: with
    /// nothing in flight (the caller quiesced every user), waits (bounded) until every I/O
    /// queue pair is back from its poller, checks the controller is healthy, and records
    /// the queues, the DMA arenas and the Identify data. From then on this process touches
    /// no register or queue, as after [`Controller::lend`], until [`Controller::reclaim`].
    /// On error nothing changed: the caller may [`Controller::lend`] instead.
    pub fn hand_over_queues(&self) -> Result<QueueHandover> {
        let s = &self.shared;
        let poisoned = |lock| Error::Poisoned {
            device: s.name.clone(),
            lock,
        };
        let deadline = Instant::now() + PARK_DEADLINE;
        loop {
            let parked = s.spares.lock().map_err(|_| poisoned("spares"))?.len();
            let used = s
                .qids
                .lock()
                .map_err(|_| poisoned("qid"))?
                .iter()
                .skip(1)
                .filter(|u| **u)
                .count();
            if used == parked {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    device: s.name.clone(),
                    what: format!(
                        "{} of {used} I/O queue pair(s) to come back from their pollers (waited {PARK_DEADLINE:?})",
                        used - parked
                    ),
                });
            }
            // A poller drops its engine right after the queue stopped: usually no wait.
            std::thread::sleep(Duration::from_micros(100));
        }
        let admin = s.admin.lock().map_err(|_| poisoned("admin"))?;
        let spares = s.spares.lock().map_err(|_| poisoned("spares"))?;
        let unhealthy = |what: String| Error::Device {
            device: s.name.clone(),
            what: format!("queues not handed over: {what}"),
        };
        let regs = Registers::new(s.pci.bar0());
        let (cc, csts) = (regs.cc(), regs.csts());
        if !cc.enabled() || !csts.ready() || csts.fatal() || cc.with_enable(false).0 != s.cc.0 {
            return Err(unhealthy(format!("CC {:#x}, CSTS {csts}", cc.0)));
        }
        let used = s
            .qids
            .lock()
            .map_err(|_| poisoned("qid"))?
            .iter()
            .skip(1)
            .filter(|u| **u)
            .count();
        if used != spares.len() {
            return Err(unhealthy(format!(
                "{} I/O queue pair(s) in use again",
                used - spares.len()
            )));
        }
        let generation = s.generation.load(std::sync::atomic::Ordering::Acquire);
        let admin_record = admin.record().map_err(unhealthy)?;
        let mut queues = Vec::new();
        for qp in spares.iter() {
            // A pair whose queues a reset removed would create them again; the controller
            // does not have them now, so its id is free for the adopter.
            if qp.generation() == generation {
                queues.push(qp.record().map_err(unhealthy)?);
            }
        }
        let arenas = s.pool.arena_records().map_err(|source| Error::Dma {
            device: s.name.clone(),
            source,
        })?;
        let layout: Vec<(u64, usize)> = arenas.iter().map(|(_, iova, len)| (*iova, *len)).collect();
        let record = s.controller_record(cc, admin_record, &layout, queues)?;
        let vfio = s.pci.share()?;
        // The borrower drives the admin queue from now on: this process's record would be
        // behind it. (Taken back after a failed hand-over, the reset writes it anew.)
        s.void_kept();
        s.lent.store(true, std::sync::atomic::Ordering::Release);
        Ok(QueueHandover {
            vfio,
            record,
            memfds: arenas.into_iter().map(|(fd, _, _)| fd).collect(),
        })
    }

    /// Takes over a controller another process handed over with its queues
    /// ([`Controller::hand_over_queues`]): maps the same DMA memory (its memfds) at the same
    /// IOVAs without a VFIO mapping, adopts the admin and I/O queue pairs where they stand
    /// and the Identify data; no register is written (no disable, no identify, no queue
    /// creation). Everything the record says is checked against the controller's registers
    /// and against itself. Until [`Controller::lender_gone`] the controller and its memory
    /// are still the lender's: dropping the result then touches neither (the caller may
    /// fall back to [`Controller::adopt`]). `options.upper_iova_half` is ignored: the
    /// memory stays in the lender's half.
    pub fn take_over(
        address: PciAddress,
        vfio: crate::vfio::SharedVfio,
        record: &ControllerRecord,
        memfds: Vec<std::os::fd::OwnedFd>,
        options: &Options,
    ) -> Result<Self> {
        let taking = Taking::new(address, vfio, record, memfds, false)?;
        let name = taking.name.clone();
        let bad = |what: String| Error::Device {
            device: name.clone(),
            what: format!("handed-over queues: {what}"),
        };
        let check_positions = |q: &QueueRecord| {
            if q.sq_tail >= q.entries || q.sq_head >= q.entries || q.cq_head >= q.entries {
                Err(bad(format!(
                    "queue {}: positions outside {} entries: {q:?}",
                    q.qid, q.entries
                )))
            } else if q.sq_head != q.sq_tail {
                Err(bad(format!(
                    "queue {}: commands not consumed: {q:?}",
                    q.qid
                )))
            } else {
                Ok(())
            }
        };
        check_positions(&record.admin)?;
        let admin = taking.admin(&record.admin)?;
        if !admin.phase_consistent() {
            return Err(bad(format!(
                "admin queue: its completion ring does not match CQ head {} phase {}",
                record.admin.cq_head, record.admin.phase
            )));
        }
        let max_entries = taking.cap.max_queue_entries().min(u32::from(u16::MAX)) as u16;
        let granted = record.io_queues_granted;
        // Not ours until the lender lets go.
        let shared = Arc::new(taking.into_shared(admin, true, options));
        let pci = shared.pci.clone();
        let max_transfer = shared.max_transfer;
        let mut spares = Vec::with_capacity(record.queues.len());
        {
            let mut qids = shared.qids.lock().expect("fresh");
            for q in &record.queues {
                if q.qid == 0 || q.qid > granted || qids[usize::from(q.qid)] {
                    return Err(bad(format!(
                        "queue id {} twice or not among the {granted} granted",
                        q.qid
                    )));
                }
                if !(2..=max_entries).contains(&q.entries) {
                    return Err(bad(format!(
                        "queue {}: {} entries, not 2..={max_entries}",
                        q.qid, q.entries
                    )));
                }
                check_positions(q)?;
                let layout = Layout::new(q.entries, PAGE_SIZE, max_transfer);
                if q.memory.len != layout.total as u64 {
                    return Err(bad(format!(
                        "queue {} memory {:?}, its layout needs {} bytes",
                        q.qid, q.memory, layout.total
                    )));
                }
                let mem = shared.claim(&q.memory, "I/O queue")?;
                let mut qp = QueuePair::adopt(
                    q,
                    layout,
                    mem,
                    pci.clone(),
                    shared.cap.doorbell_stride(),
                    max_transfer as u64,
                );
                qp.set_sgl(shared.use_sgl && shared.identify.supports_sgl());
                qp.set_shadow(shared.shadow_doorbells(q.qid));
                if !qp.phase_consistent() {
                    return Err(bad(format!(
                        "queue {}: its completion ring does not match CQ head {} phase {}",
                        q.qid, q.cq_head, q.phase
                    )));
                }
                if let Some((sq, cq)) = qp.shadow_values() {
                    if (sq, cq) != (u32::from(q.sq_tail), u32::from(q.cq_head)) {
                        return Err(bad(format!(
                            "queue {}: the shadow doorbells say SQ tail {sq}, CQ head {cq}; the record {q:?}",
                            q.qid
                        )));
                    }
                }
                qids[usize::from(q.qid)] = true;
                spares.push(qp);
            }
        }
        *shared.spares.lock().expect("fresh") = spares;
        Ok(Self { shared })
    }

    /// Takes over a controller whose process died, from what it kept in the fd store
    /// ([`Controller::keep`]): its VFIO fds (so vfio-pci never reset the function and the
    /// guest RAM stays mapped), its DMA memory and the record. Only a healthy, enabled
    /// controller that matches the record is taken (else `Err`: the caller resets it, as a
    /// fresh open does). The admin queue continues where the dead process left it: a
    /// command it wrote is submitted and every completion it had not consumed is waited
    /// for. Then every I/O queue it may have created is deleted: the controller completes
    /// or aborts each command on a submission queue before the deletion completes, so no
    /// DMA of a dead process's command can land after this returns (re-running its
    /// requests is safe). Whatever else the dead process had mapped in the driver's IOVAs
    /// is removed. No CC.EN toggle, no Identify.
    ///
    /// `file` holds `kept` and goes on being written from the first admin command on, so a
    /// successor of this process, should it die too, finds the controller as it is.
    pub fn recover(
        address: PciAddress,
        vfio: crate::vfio::SharedVfio,
        kept: &KeptController,
        file: crate::kept::KeptFile,
        memfds: Vec<std::os::fd::OwnedFd>,
        options: &Options,
    ) -> Result<(Self, Recovered)> {
        let started = Instant::now();
        if kept.version != KEPT_VERSION {
            return Err(Error::Device {
                device: address.to_string(),
                what: format!(
                    "kept record version {}, this driver reads {KEPT_VERSION}",
                    kept.version
                ),
            });
        }
        let record = &kept.controller;
        let taking = Taking::new(address, vfio, record, memfds, true)?;
        let a = &record.admin;
        let outstanding = kept.admin_outstanding;
        if a.sq_tail >= a.entries || a.cq_head >= a.entries || outstanding >= a.entries {
            return Err(taking.bad(format!(
                "admin queue positions {a:?} with {outstanding} outstanding"
            )));
        }
        let mut state = *a;
        state.sq_head = (a.sq_tail + a.entries - outstanding) % a.entries;
        let mut admin = taking.admin(&state)?;
        // Before anything is rung: the CQ must agree with the record, or the record is
        // behind the controller and its SQ tail would make it run old entries.
        if let Err(why) = admin.agrees_with_cq(outstanding) {
            return Err(taking.bad(format!("admin queue: {why}")));
        }
        // The dead process may have written a command and died before ringing: ring it.
        // Not the CQ head: the controller may have been told a later one already.
        admin.ring_sq_where_left();
        let deadline = Instant::now() + RECOVERY_ADMIN_DEADLINE;
        let mut drained = 0u16;
        while drained < outstanding {
            drained += admin.poll(usize::from(outstanding - drained), |_| {}) as u16;
            if drained < outstanding && Instant::now() > deadline {
                return Err(taking.bad(format!(
                    "{} of the dead process's {outstanding} admin command(s) did not complete within {RECOVERY_ADMIN_DEADLINE:?}",
                    outstanding - drained
                )));
            }
            std::hint::spin_loop();
        }
        if !admin.phase_consistent() {
            return Err(taking.bad(format!(
                "admin queue: its completion ring does not match CQ head {} phase {} after {outstanding} outstanding completion(s)",
                admin.live_record().cq_head,
                admin.live_record().phase
            )));
        }
        let granted = record.io_queues_granted;
        if kept.io_queues.iter().any(|&q| q == 0 || q > granted) {
            return Err(taking.bad(format!(
                "I/O queue ids {:?} not among the {granted} granted",
                kept.io_queues
            )));
        }
        let upper = record.upper_iova_half;
        let arenas = taking.pool.arena_ranges();
        let shared = Arc::new(taking.into_shared(admin, false, options));
        *shared.keeping.lock().expect("fresh") = Some(Keeping {
            file,
            record: kept.clone(),
            io_queues: kept.io_queues.iter().copied().collect(),
        });
        shared.note_kept(&shared.admin.lock().expect("fresh"));
        let controller = Self { shared };
        let s = &controller.shared;
        let mut queues_deleted = 0;
        for &qid in &kept.io_queues {
            let mut existed = false;
            for (cmd, what) in [
                (Command::delete_sq(qid), "Delete I/O SQ of the dead process"),
                (Command::delete_cq(qid), "Delete I/O CQ of the dead process"),
            ] {
                match s.admin_command(cmd, what) {
                    Ok(_) => existed = true,
                    // It was never created, or deleted already.
                    Err(Error::Command { status, .. }) if status.sct() == 1 && status.sc() == 1 => {
                    }
                    Err(e) => return Err(e),
                }
            }
            s.note_io_queue(qid, false);
            queues_deleted += usize::from(existed);
        }
        // Only now, with no command of the dead process left, may its other DMA memory go:
        // the other half of the driver's IOVAs and what lies between the kept arenas.
        let (other_first, other_end) = driver_iova_half(!upper);
        let (own_first, own_end) = driver_iova_half(upper);
        let mut removed = controller.unmap_within(other_first, other_end - other_first)?;
        for (iova, len) in gaps_between(own_first, own_end, &arenas) {
            removed += controller.unmap_within(iova, len)?;
        }
        let admin = s.admin.lock().map_err(|_| Error::Poisoned {
            device: s.name.clone(),
            lock: "admin",
        })?;
        s.note_kept(&admin);
        drop(admin);
        let recovered = Recovered {
            queues_deleted,
            admin_completed: outstanding,
            unmapped_bytes: removed,
            elapsed: started.elapsed(),
        };
        Ok((controller, recovered))
    }

    /// Keeps the controller for a successor after a crash of this process: its record is
    /// written into `file` now and rewritten whenever it changes (see [`KeptController`]).
    /// The caller stores `file`, the VFIO fds and every DMA arena's memfd
    /// ([`Controller::kept_fds`], [`Controller::on_new_arena`]) in the fd store.
    pub fn keep(&self, file: crate::kept::KeptFile) -> Result<()> {
        let s = &self.shared;
        let poisoned = |lock| Error::Poisoned {
            device: s.name.clone(),
            lock,
        };
        let admin = s.admin.lock().map_err(|_| poisoned("admin"))?;
        let io_queues: std::collections::BTreeSet<u16> = s
            .qids
            .lock()
            .map_err(|_| poisoned("qid"))?
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, used)| **used)
            .map(|(qid, _)| qid as u16)
            .collect();
        let arenas: Vec<(u64, usize)> = s
            .pool
            .arena_layout()
            .into_iter()
            .map(|(iova, len, _)| (iova, len))
            .collect();
        let controller = s.controller_record(
            s.cc.with_enable(true),
            admin.live_record(),
            &arenas,
            Vec::new(),
        )?;
        *s.keeping.lock().map_err(|_| poisoned("kept record"))? = Some(Keeping {
            file,
            record: KeptController {
                version: KEPT_VERSION,
                layout: s.pci.layout(),
                controller,
                admin_outstanding: 0,
                io_queues: Vec::new(),
                arena_files: Vec::new(),
            },
            io_queues,
        });
        s.write_kept(&admin)
    }

    /// Whether the controller's record is kept ([`Controller::keep`], or taken over with it
    /// by [`Controller::recover`]).
    pub fn kept(&self) -> bool {
        self.shared.keeping.lock().is_ok_and(|k| k.is_some())
    }

    /// A duplicate of the kept record's memfd, for the store.
    pub fn kept_record_fd(&self) -> Result<std::os::fd::OwnedFd> {
        let s = &self.shared;
        let keeping = s.keeping.lock().map_err(|_| Error::Poisoned {
            device: s.name.clone(),
            lock: "kept record",
        })?;
        let k = keeping
            .as_ref()
            .ok_or_else(|| Error::BadArgument(format!("{}: not kept", s.name)))?;
        k.file
            .file()
            .try_clone()
            .map(std::os::fd::OwnedFd::from)
            .map_err(|source| Error::Io {
                what: format!("{}: duplicating the kept record's memfd", s.name),
                source,
            })
    }

    /// Duplicates of what the fd store keeps of the controller: the VFIO fds, and each DMA
    /// arena's memfd with its IOVA.
    pub fn kept_fds(&self) -> Result<(crate::vfio::SharedVfio, Vec<(u64, std::os::fd::OwnedFd)>)> {
        let s = &self.shared;
        let arenas = s.pool.arena_records().map_err(|source| Error::Dma {
            device: s.name.clone(),
            source,
        })?;
        Ok((
            s.pci.share()?,
            arenas.into_iter().map(|(fd, iova, _)| (iova, fd)).collect(),
        ))
    }

    /// Calls `hook` with every DMA arena added from now on (memfd, IOVA, length), before
    /// any record names it.
    pub fn on_new_arena(&self, hook: vfblk_hugepages::ArenaHook) {
        self.shared.pool.on_new_arena(hook);
    }

    /// The process this controller was taken over from ([`Controller::take_over`]) has let
    /// go: the registers, queues and DMA memory are this process's now.
    pub fn lender_gone(&self) {
        let s = &self.shared;
        s.owned.store(true, std::sync::atomic::Ordering::Release);
        s.lent.store(false, std::sync::atomic::Ordering::Release);
    }

    /// The driver's DMA arenas: how many, and their bytes.
    pub fn dma_arenas(&self) -> (usize, u64) {
        let ranges = self.shared.pool.arena_ranges();
        (ranges.len(), ranges.iter().map(|r| r.1).sum())
    }

    /// The IOVA of each of the driver's DMA arenas.
    pub fn arena_iovas(&self) -> Vec<u64> {
        self.shared
            .pool
            .arena_ranges()
            .into_iter()
            .map(|(iova, _)| iova)
            .collect()
    }

    /// I/O queue pairs handed out or parked (their queues live on the controller), and of
    /// them parked.
    pub fn queue_pairs(&self) -> (usize, usize) {
        let s = &self.shared;
        let used = s
            .qids
            .lock()
            .map(|q| q.iter().skip(1).filter(|u| **u).count())
            .unwrap_or(0);
        let parked = s.spares.lock().map(|p| p.len()).unwrap_or(0);
        (used, parked)
    }

    /// Takes back an I/O queue pair its user is done with: with nothing in flight it is
    /// kept, its queues on the controller, for the next [`Controller::create_io_queue_pair`]
    /// (or a hand-over); otherwise it is dropped (its queues deleted).
    pub fn park(&self, mut qp: QueuePair) {
        if qp.qid() == 0 || qp.record().is_err() {
            return;
        }
        qp.take_owner();
        match self.shared.spares.lock() {
            Ok(mut spares) => spares.push(qp),
            Err(_) => tracing::warn!(
                "{}: spares lock poisoned; a queue pair dropped",
                self.name()
            ),
        }
    }

    /// Takes a lent controller back when the borrower failed (it is gone: dead or killed):
    /// disables it, removes whatever the borrower mapped — the other half of the driver's
    /// IOVAs and the `foreign` ranges — and resets it with this process's admin queue. I/O
    /// queue pairs create their queues again when next used.
    pub fn reclaim(&self, foreign: &[(u64, u64)]) -> Result<()> {
        let s = &self.shared;
        let regs = Registers::new(s.pci.bar0());
        let timeout = Duration::from_millis(s.cap.timeout_ms().max(500));
        disable(&regs, &s.name, timeout)?;
        let (first, end) = driver_iova_half(!s.upper_iova_half);
        // A borrower that adopted the queues shares this process's half: whatever it
        // mapped there lies between this process's arenas.
        let (own_first, own_end) = driver_iova_half(s.upper_iova_half);
        let gaps = gaps_between(own_first, own_end, &s.pool.arena_ranges());
        for &(iova, len) in std::iter::once(&(first, end - first))
            .chain(foreign)
            .chain(&gaps)
        {
            let removed = self.unmap_within(iova, len)?;
            if removed > 0 {
                tracing::info!(
                    "{}: removed {removed} bytes the borrower had mapped at {iova:#x}..{:#x}",
                    s.name,
                    iova + len
                );
            }
        }
        s.lent.store(false, std::sync::atomic::Ordering::Release);
        s.reset()
    }

    /// After the borrower took over for good: removes this process's own DMA memory (its
    /// half of the driver's IOVAs) from the shared container without touching the device,
    /// which is the borrower's now; guest RAM mappings stay for the borrower. Returns the
    /// bytes removed. Nothing of this controller may be used afterwards (the process is
    /// about to exit).
    pub fn release_lent(&self) -> Result<u64> {
        let s = &self.shared;
        if !self.lent() {
            return Err(Error::BadArgument(format!("{}: not lent", s.name)));
        }
        let (first, end) = driver_iova_half(s.upper_iova_half);
        self.unmap_within(first, end - first)
    }

    /// Whether I/O queue pairs use shadow doorbells (Doorbell Buffer Config).
    pub fn shadow_doorbells_in_use(&self) -> bool {
        self.shared.dbbuf.is_some()
    }

    /// Whether the controller reports a fatal status (CSTS.CFS): only a reset helps then.
    pub fn fatal(&self) -> bool {
        Registers::new(self.shared.pci.bar0()).csts().fatal()
    }

    /// Controller resets done so far.
    pub fn resets(&self) -> u64 {
        self.shared
            .generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Largest transfer per command in bytes (MDTS, capped at 2 MiB).
    pub fn max_transfer(&self) -> usize {
        self.shared.max_transfer
    }

    /// DMA memory mapped for this controller (for I/O buffers), page aligned, from the
    /// controller's hugepage pool.
    pub fn dma_buffer(&self, len: usize) -> Result<DmaChunk> {
        self.shared
            .pool
            .alloc(len, PAGE_SIZE)
            .map_err(|source| Error::Dma {
                device: self.shared.name.clone(),
                source,
            })
    }

    /// Maps memory the caller owns (guest RAM, at IOVA = guest-physical address) into this
    /// controller's IOMMU domain, so commands can point at it directly.
    ///
    /// # Safety
    /// `vaddr..vaddr+len` must stay mapped until the returned mapping is dropped and must be
    /// accessed only through raw pointers meanwhile (the device writes it by DMA).
    pub unsafe fn map_external(
        &self,
        iova: u64,
        vaddr: *mut u8,
        len: usize,
    ) -> Result<ExternalMapping> {
        let s = &self.shared;
        // SAFETY: forwarded from the caller.
        unsafe { ExternalMapping::new(s.mapper.clone(), s.iovas.clone(), iova, vaddr, len) }
            .map_err(|source| Error::Dma {
                device: s.name.clone(),
                source,
            })
    }

    /// Takes over a mapping the lender of this controller made of memory this process maps
    /// too (guest RAM), so that it is not pinned and mapped again; see
    /// [`ExternalMapping::adopted`] for `owned`.
    ///
    /// # Safety
    /// As for [`ExternalMapping::adopted`].
    pub unsafe fn adopt_external(
        &self,
        iova: u64,
        len: usize,
        owned: Arc<std::sync::atomic::AtomicBool>,
    ) -> ExternalMapping {
        let s = &self.shared;
        // SAFETY: forwarded from the caller.
        unsafe { ExternalMapping::adopted(s.mapper.clone(), s.iovas.clone(), iova, len, owned) }
    }

    /// Removes whatever is mapped inside `iova..iova+len` (none may straddle its ends), as
    /// the container holds it, whoever mapped it: what a lender or borrower left in a shared
    /// container. Returns the bytes removed. Never for ranges this process's live buffers or
    /// mappings use.
    pub fn unmap_within(&self, iova: u64, len: u64) -> Result<u64> {
        let s = &self.shared;
        s.vfio_mapper
            .unmap_within(iova, len)
            .map_err(|source| Error::Dma {
                device: s.name.clone(),
                source,
            })
    }

    /// Creates an I/O queue pair of `entries` entries (2..=MQES).
    pub fn create_io_queue_pair(&self, entries: u16) -> Result<QueuePair> {
        let s = &self.shared;
        let max = s.cap.max_queue_entries().min(u32::from(u16::MAX)) as u16;
        if !(2..=max).contains(&entries) {
            return Err(Error::BadArgument(format!(
                "{}: queue entries {entries} not in 2..={max}",
                s.name
            )));
        }
        let spare = {
            let mut spares = s.spares.lock().map_err(|_| Error::Poisoned {
                device: self.name().to_string(),
                lock: "spares",
            })?;
            spares
                .iter()
                .position(|q| q.entries() == entries)
                .map(|i| spares.swap_remove(i))
        };
        if let Some(mut qp) = spare {
            qp.set_sgl(s.use_sgl && s.identify.supports_sgl());
            qp.set_owner(self.shared.clone(), self.shared.generation.clone());
            if qp.generation() == s.generation.load(std::sync::atomic::Ordering::Acquire) {
                // Its queues live on: where they were left. (Otherwise a reset removed them
                // and the pair creates them again at its first use.)
                qp.ring_where_left();
            }
            return Ok(qp);
        }
        let qid = {
            let mut qids = s.qids.lock().map_err(|_| Error::Poisoned {
                device: self.name().to_string(),
                lock: "qid",
            })?;
            let qid = (1..qids.len())
                .find(|&q| !qids[q])
                .ok_or_else(|| Error::Device {
                    device: s.name.clone(),
                    what: format!("all {} granted I/O queues are in use", s.io_queues_granted),
                })?;
            qids[qid] = true;
            qid as u16
        };
        let result = (|| {
            let layout = Layout::new(entries, PAGE_SIZE, s.max_transfer);
            let mem = self.dma_buffer(layout.total)?;
            let mut qp = QueuePair::new(
                qid,
                layout,
                mem,
                s.pci.clone(),
                s.cap.doorbell_stride(),
                s.max_transfer as u64,
            );
            qp.set_sgl(s.use_sgl && s.identify.supports_sgl());
            qp.set_shadow(s.shadow_doorbells(qid));
            let generation = s.create_io_queues(qid, entries, qp.cq_iova(), qp.sq_iova())?;
            qp.set_generation(generation);
            qp.set_owner(self.shared.clone(), self.shared.generation.clone());
            Ok(qp)
        })();
        if result.is_err() {
            s.release_qid(qid);
        }
        result
    }
}

/// A controller being taken over from another process's record, its registers and memory
/// checked: what [`Controller::take_over`] (a live lender) and [`Controller::recover`] (a
/// dead one) share. Nothing is written to the device while it is built.
struct Taking {
    name: String,
    pci: Arc<VfioPci>,
    cap: Cap,
    version: Version,
    cc: Cc,
    upper_iova_half: bool,
    mapper: Arc<dyn DmaMapper>,
    vfio_mapper: Arc<VfioDmaMapper>,
    iovas: Arc<Mutex<IovaAllocator>>,
    pool: DmaPool,
    owned: Arc<std::sync::atomic::AtomicBool>,
    identify: IdentifyController,
    identify_page: Box<[u8; 4096]>,
    namespaces: Vec<Namespace>,
    namespace_pages: Vec<Box<[u8; 4096]>>,
    scratch: DmaChunk,
    dbbuf: Option<(DmaChunk, DmaChunk)>,
    io_queues_granted: u16,
    max_transfer: usize,
    admin_memory: ChunkRecord,
}

impl Taking {
    /// Adopts the record's DMA memory (`memfds`, at the recorded IOVAs) and checks the
    /// controller against the record: CAP, CC, a ready controller without a fatal status,
    /// the admin queue where AQA/ASQ/ACQ put it. With `owned` the memory is this
    /// process's at once (its writer is dead); else once the lender lets go.
    fn new(
        address: PciAddress,
        vfio: crate::vfio::SharedVfio,
        record: &ControllerRecord,
        memfds: Vec<std::os::fd::OwnedFd>,
        owned: bool,
    ) -> Result<Self> {
        let name = address.to_string();
        let bad = |what: String| Error::Device {
            device: name.clone(),
            what: format!("handed-over queues: {what}"),
        };
        if record.version != QUEUE_HANDOVER_VERSION {
            return Err(bad(format!(
                "record version {}, this driver reads {QUEUE_HANDOVER_VERSION}",
                record.version
            )));
        }
        if memfds.len() != record.arenas.len() {
            return Err(bad(format!(
                "{} memfd(s) for {} arenas",
                memfds.len(),
                record.arenas.len()
            )));
        }
        let pci = Arc::new(VfioPci::adopt(address, vfio)?);
        let regs = Registers::new(pci.bar0());
        let bar = pci.bar0();
        let cap = regs.cap();
        let (cc, csts) = (regs.cc(), regs.csts());
        if cap.0 != record.cap {
            return Err(bad(format!(
                "CAP {:#x}, the record says {:#x}",
                cap.0, record.cap
            )));
        }
        if cc.0 != record.cc || !cc.enabled() || !csts.ready() || csts.fatal() {
            return Err(bad(format!(
                "CC {:#x} (the record says {:#x}), CSTS {csts}: not the enabled, healthy controller recorded",
                cc.0, record.cc
            )));
        }
        if cc.page_size() != PAGE_SIZE || cc.entry_sizes() != (6, 4) {
            return Err(bad(format!(
                "CC {:#x}: not the page and entry sizes this driver uses",
                cc.0
            )));
        }
        if record.io_queues_granted == 0 {
            return Err(bad("no I/O queues granted".into()));
        }
        let vfio_mapper = Arc::new(VfioDmaMapper::new(
            pci.container_fd().as_raw_fd(),
            pci.clone(),
        ));
        let mapper: Arc<dyn DmaMapper> = vfio_mapper.clone();
        let (first, end) = driver_iova_half(record.upper_iova_half);
        let dma_err = |source| Error::Dma {
            device: name.clone(),
            source,
        };
        let iovas = Arc::new(Mutex::new(
            IovaAllocator::with_window(first, end).map_err(dma_err)?,
        ));
        let owned = Arc::new(std::sync::atomic::AtomicBool::new(owned));
        let mut buffers = Vec::with_capacity(memfds.len());
        for (i, (fd, arena)) in memfds.into_iter().zip(&record.arenas).enumerate() {
            let len = usize::try_from(arena.len)
                .map_err(|_| bad(format!("arena {i}: {} bytes", arena.len)))?;
            let memory = vfblk_hugepages::DmaMemory::from_fd(std::fs::File::from(fd), len)
                .map_err(dma_err)?;
            // SAFETY: the record's writer mapped this memfd's first `len` bytes at
            // `arena.iova` in the container this process shares (the record says so; an
            // IOVA outside the writer's half or overlapping another arena is refused by the
            // reservation).
            let buffer = unsafe {
                vfblk_hugepages::DmaBuffer::adopted(
                    memory,
                    arena.iova,
                    mapper.clone(),
                    iovas.clone(),
                    owned.clone(),
                )
            }
            .map_err(dma_err)?;
            buffers.push(buffer);
        }
        let pool = DmaPool::adopt(
            &format!("vfblk-{name}"),
            mapper.clone(),
            iovas.clone(),
            buffers,
        )
        .map_err(dma_err)?;
        let identify_page = unhex(&record.identify, "Identify Controller").map_err(bad)?;
        let identify = IdentifyController::parse(&identify_page);
        let max_transfer = max_transfer(cap, &identify);
        let mut namespaces = Vec::new();
        let mut namespace_pages = Vec::new();
        for n in &record.namespaces {
            if n.nsid == 0 || namespaces.iter().any(|m: &Namespace| m.nsid == n.nsid) {
                return Err(bad(format!("namespace id {} zero or twice", n.nsid)));
            }
            let page = unhex(&n.identify, "Identify Namespace").map_err(bad)?;
            namespaces.push(Namespace {
                nsid: n.nsid,
                info: IdentifyNamespace::parse(&page),
            });
            namespace_pages.push(page);
        }
        // The admin queue: where the controller's AQA/ASQ/ACQ say it is.
        let a = &record.admin;
        let max_entries = cap.max_queue_entries().min(u32::from(u16::MAX)) as u16;
        let aqa = bar.read32(offset::AQA);
        if a.qid != 0
            || !(2..=max_entries.min(4096)).contains(&a.entries)
            || aqa != (u32::from(a.entries - 1) << 16) | u32::from(a.entries - 1)
        {
            return Err(bad(format!("admin queue {a:?} against AQA {aqa:#x}")));
        }
        let admin_layout = Layout::new(a.entries, PAGE_SIZE, PAGE_SIZE);
        if a.memory.len != admin_layout.total as u64 {
            return Err(bad(format!(
                "admin queue memory {:?}, its layout needs {} bytes",
                a.memory, admin_layout.total
            )));
        }
        let claim = |c: &ChunkRecord, what: &str| claim_chunk(&pool, &name, c, what);
        let admin_iova = claim(&a.memory, "admin queue")?;
        let (asq, acq) = (bar.read64(offset::ASQ), bar.read64(offset::ACQ));
        if asq != admin_iova.iova() || acq != admin_iova.iova() + admin_layout.cq_offset as u64 {
            return Err(bad(format!(
                "the admin queue recorded at IOVA {:#x}, the controller's is at ASQ {asq:#x}, ACQ {acq:#x}",
                admin_iova.iova()
            )));
        }
        // Given back: [`Taking::admin`] claims it again for the queue pair.
        drop(admin_iova);
        if record.scratch.len != PAGE_SIZE as u64 {
            return Err(bad(format!("scratch page {:?}", record.scratch)));
        }
        let scratch = claim(&record.scratch, "scratch page")?;
        let dbbuf = match &record.doorbell_buffers {
            Some([shadow, event]) => {
                if shadow.len != PAGE_SIZE as u64 || event.len != PAGE_SIZE as u64 {
                    return Err(bad(format!("doorbell pages {shadow:?} {event:?}")));
                }
                Some((
                    claim(shadow, "shadow doorbells")?,
                    claim(event, "event indexes")?,
                ))
            }
            None => None,
        };
        Ok(Self {
            name,
            version: regs.version(),
            pci,
            cap,
            cc,
            upper_iova_half: record.upper_iova_half,
            mapper,
            vfio_mapper,
            iovas,
            pool,
            owned,
            identify,
            identify_page,
            namespaces,
            namespace_pages,
            scratch,
            dbbuf,
            io_queues_granted: record.io_queues_granted,
            max_transfer,
            admin_memory: a.memory,
        })
    }

    fn bad(&self, what: String) -> Error {
        Error::Device {
            device: self.name.clone(),
            what: format!("handed-over queues: {what}"),
        }
    }

    /// The admin queue pair over the recorded memory at `state`'s positions.
    fn admin(&self, state: &QueueRecord) -> Result<QueuePair> {
        let memory = claim_chunk(&self.pool, &self.name, &self.admin_memory, "admin queue")?;
        Ok(QueuePair::adopt(
            state,
            Layout::new(state.entries, PAGE_SIZE, PAGE_SIZE),
            memory,
            self.pci.clone(),
            self.cap.doorbell_stride(),
            PAGE_SIZE as u64,
        ))
    }

    fn into_shared(self, admin: QueuePair, lent: bool, options: &Options) -> Shared {
        Shared {
            name: self.name,
            pci: self.pci,
            cap: self.cap,
            version: self.version,
            mapper: self.mapper,
            vfio_mapper: self.vfio_mapper,
            upper_iova_half: self.upper_iova_half,
            lent: std::sync::atomic::AtomicBool::new(lent),
            iovas: self.iovas,
            admin: Mutex::new(admin),
            identify: self.identify,
            identify_page: self.identify_page,
            namespaces: self.namespaces,
            namespace_pages: self.namespace_pages,
            spares: Mutex::new(Vec::new()),
            owned: self.owned,
            io_queues_granted: self.io_queues_granted,
            max_transfer: self.max_transfer,
            qids: Mutex::new(vec![false; usize::from(self.io_queues_granted) + 1]),
            scratch: Mutex::new(self.scratch),
            pool: self.pool,
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            cc: self.cc.with_enable(false),
            dbbuf: self.dbbuf,
            use_sgl: options.sgl,
            keeping: Mutex::new(None),
        }
    }
}

/// The chunk `c` of `pool`, taken out of its free space.
fn claim_chunk(pool: &DmaPool, name: &str, c: &ChunkRecord, what: &str) -> Result<DmaChunk> {
    let (offset, len) = (usize::try_from(c.offset), usize::try_from(c.len));
    let (Ok(offset), Ok(len)) = (offset, len) else {
        return Err(Error::Device {
            device: name.to_string(),
            what: format!("handed-over queues: {what}: chunk {c:?}"),
        });
    };
    pool.claim(c.arena as usize, offset, len)
        .map_err(|source| Error::Dma {
            device: format!("{name} ({what})"),
            source,
        })
}

impl Shared {
    /// The controller as a hand-over or a kept record describes it, with the admin queue
    /// at `admin`, the arenas at `arenas` (IOVA and length, in arena order) and `queues`.
    fn controller_record(
        &self,
        cc: Cc,
        admin: QueueRecord,
        arenas: &[(u64, usize)],
        queues: Vec<QueueRecord>,
    ) -> Result<ControllerRecord> {
        let chunk = |c: &DmaChunk| {
            let (arena, offset, len) = c.location();
            ChunkRecord {
                arena: arena as u32,
                offset: offset as u64,
                len: len as u64,
            }
        };
        let scratch = chunk(&*self.scratch.lock().map_err(|_| Error::Poisoned {
            device: self.name.clone(),
            lock: "scratch",
        })?);
        Ok(ControllerRecord {
            version: QUEUE_HANDOVER_VERSION,
            cap: self.cap.0,
            cc: cc.0,
            upper_iova_half: self.upper_iova_half,
            arenas: arenas
                .iter()
                .map(|&(iova, len)| ArenaRecord {
                    iova,
                    len: len as u64,
                })
                .collect(),
            admin,
            scratch,
            doorbell_buffers: self.dbbuf.as_ref().map(|(a, b)| [chunk(a), chunk(b)]),
            io_queues_granted: self.io_queues_granted,
            identify: hex(&self.identify_page),
            namespaces: self
                .namespaces
                .iter()
                .zip(&self.namespace_pages)
                .map(|(n, page)| NamespaceRecord {
                    nsid: n.nsid,
                    identify: hex(page),
                })
                .collect(),
            queues,
        })
    }

    /// Rewrites the kept record, if there is one, with the admin queue where `admin` stands
    /// (called under the admin lock).
    /// On failure the record is voided: a successor resets the controller rather than
    /// trust a record that is behind.
    fn write_kept(&self, admin: &QueuePair) -> Result<()> {
        // A panic elsewhere leaves the record as consistent as before it.
        let mut keeping = self.keeping.lock().unwrap_or_else(|e| e.into_inner());
        let Some(k) = keeping.as_mut() else {
            return Ok(());
        };
        k.record.controller.admin = admin.live_record();
        k.record.admin_outstanding = admin.in_flight() as u16;
        let layout = self.pool.arena_layout();
        k.record.controller.arenas = layout
            .iter()
            .map(|&(iova, len, _)| ArenaRecord {
                iova,
                len: len as u64,
            })
            .collect();
        k.record.arena_files = layout.iter().map(|&(_, _, id)| id).collect();
        k.record.io_queues = k.io_queues.iter().copied().collect();
        let written = serde_json::to_vec(&k.record)
            .map_err(|e| Error::Device {
                device: self.name.clone(),
                what: format!("encoding the kept record: {e}"),
            })
            .and_then(|text| k.file.write(&text));
        if written.is_err() {
            k.file.void();
        }
        written
    }

    /// Voids the kept record, if there is one: the controller is going to another process,
    /// whose own record replaces this one's in the store.
    fn void_kept(&self) {
        let keeping = self.keeping.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keeping.as_ref() {
            k.file.void();
        }
    }

    /// [`Shared::write_kept`], a failure logged: the controller works on, and a successor
    /// after a crash resets it (the record is void).
    fn note_kept(&self, admin: &QueuePair) {
        if let Err(e) = self.write_kept(admin) {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                "{}: the kept record was not updated ({e}); after a crash the controller would be reset",
                self.name
            );
        }
    }

    /// Marks I/O queue `qid` as possibly existing on the controller (or not) in the kept
    /// record; written with the next admin command.
    fn note_io_queue(&self, qid: u16, exists: bool) {
        let mut keeping = self.keeping.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = keeping.as_mut() {
            if exists {
                k.io_queues.insert(qid);
            } else {
                k.io_queues.remove(&qid);
            }
        }
    }

    fn claim(&self, c: &ChunkRecord, what: &str) -> Result<DmaChunk> {
        claim_chunk(&self.pool, &self.name, c, what)
    }

    /// Runs one admin command to completion; returns its dword 0.
    pub fn admin_command(&self, cmd: Command, what: &str) -> Result<u32> {
        let mut admin = self.admin.lock().map_err(|_| Error::Poisoned {
            device: self.name.clone(),
            lock: "admin",
        })?;
        self.admin_command_locked(&mut admin, cmd, what)
    }

    fn admin_command_locked(&self, admin: &mut QueuePair, cmd: Command, what: &str) -> Result<u32> {
        let cid = admin.submit(cmd, 0).map_err(|e| Error::Device {
            device: self.name.clone(),
            what: format!("admin {what}: {e}"),
        })?;
        // Kept before the doorbell: a successor rings a command written but not rung.
        self.note_kept(admin);
        admin.ring();
        let result = self.await_admin(admin, cid, cmd, what);
        self.note_kept(admin);
        result
    }

    /// Waits (bounded) for the completion of admin command `cid`.
    fn await_admin(
        &self,
        admin: &mut QueuePair,
        cid: u16,
        cmd: Command,
        what: &str,
    ) -> Result<u32> {
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        let mut done = None;
        while done.is_none() {
            // Only our command's completion ends the wait: a late completion of an earlier
            // command that timed out must not be taken for this one's.
            admin.poll(1, |c| {
                if c.cid == cid {
                    done = Some(c);
                } else {
                    tracing::warn!(
                        "{}: a late admin completion (cid {}, status {}) while waiting for {what} (cid {cid}); ignored",
                        self.name,
                        c.cid,
                        c.status
                    );
                }
            });
            if done.is_none() {
                if Instant::now() > deadline {
                    return Err(Error::Timeout {
                        device: self.name.clone(),
                        what: format!("admin {what} (opcode {:#04x}, cid {cid})", cmd.opcode),
                    });
                }
                std::hint::spin_loop();
            }
        }
        let c = done.expect("loop ends with a completion");
        if !c.status.is_success() {
            return Err(Error::Command {
                device: self.name.clone(),
                queue: 0,
                cid: c.cid,
                opcode: cmd.opcode,
                what: what.to_string(),
                status: c.status,
            });
        }
        Ok(c.result)
    }

    /// Disables and re-enables the controller with a fresh admin queue, and asks for the
    /// same number of I/O queues, all under the admin lock. I/O queue pairs notice (the
    /// generation) and recreate their queues themselves, reporting what was in flight as
    /// aborted.
    pub fn reset(&self) -> Result<()> {
        let mut admin = self.admin.lock().map_err(|_| Error::Poisoned {
            device: self.name.clone(),
            lock: "admin",
        })?;
        let regs = Registers::new(self.pci.bar0());
        let bar = self.pci.bar0();
        let timeout = Duration::from_millis(self.cap.timeout_ms().max(500));
        // Disabled first: only then has the device stopped writing the queues' memory, so
        // only then may the queue pairs (which watch the generation) recycle it.
        disable(&regs, &self.name, timeout)?;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        admin.reset_rings();
        admin.abandon_all();
        // Before CC.EN: a successor must never take the old positions for the new queue.
        if let Some(k) = self
            .keeping
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            k.io_queues.clear();
        }
        self.note_kept(&admin);
        enable(&regs, bar, &admin, self.cc, &self.name, timeout)?;
        let wanted = self.io_queues_granted.max(1);
        self.admin_command_locked(
            &mut admin,
            Command::set_number_of_queues(wanted, wanted),
            "Set Features (Number of Queues) after reset",
        )?;
        if self.dbbuf.is_some() {
            self.configure_doorbell_buffers(Some(&mut admin))?;
        }
        Ok(())
    }

    /// Zeroes the doorbell pages and sends Doorbell Buffer Config (with the admin queue
    /// already locked by the caller, or locking it).
    fn configure_doorbell_buffers(&self, admin: Option<&mut QueuePair>) -> Result<()> {
        let Some((shadow, event)) = &self.dbbuf else {
            return Ok(());
        };
        shadow.fill(0, PAGE_SIZE, 0);
        event.fill(0, PAGE_SIZE, 0);
        let cmd = Command::doorbell_buffer_config(shadow.iova(), event.iova());
        let what = "Doorbell Buffer Config";
        match admin {
            Some(admin) => self.admin_command_locked(admin, cmd, what)?,
            None => self.admin_command(cmd, what)?,
        };
        Ok(())
    }

    /// Queue `qid`'s entries in the doorbell pages, if shadow doorbells are in use and the
    /// entries fit the page.
    pub(crate) fn shadow_doorbells(&self, qid: u16) -> Option<ShadowDoorbells> {
        let (shadow, event) = self.dbbuf.as_ref()?;
        let stride = self.cap.doorbell_stride();
        let sq = 2 * usize::from(qid) * stride;
        let cq = sq + stride;
        if qid == 0 || cq + 4 > PAGE_SIZE {
            return None;
        }
        // SAFETY: both offsets are within the one-page chunks (checked above).
        unsafe {
            Some(ShadowDoorbells {
                sq: shadow.as_ptr().add(sq).cast(),
                cq: shadow.as_ptr().add(cq).cast(),
                sq_event: event.as_ptr().add(sq).cast(),
                cq_event: event.as_ptr().add(cq).cast(),
            })
        }
    }

    fn read_identify(&self, mut cmd: Command) -> Result<[u8; 4096]> {
        let scratch = self.scratch.lock().map_err(|_| Error::Poisoned {
            device: self.name.clone(),
            lock: "scratch",
        })?;
        cmd.prp1 = scratch.iova();
        self.admin_command(
            cmd,
            &format!("Identify (CNS {}, NSID {})", cmd.cdw10, cmd.nsid),
        )?;
        let mut page = [0u8; 4096];
        scratch.read_bytes(0, &mut page);
        Ok(page)
    }
}

impl QueueOwner for Shared {
    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn is_lent(&self) -> bool {
        self.lent.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Creates the CQ and SQ of I/O queue `qid`; returns the controller generation they
    /// belong to (read under the admin lock, so a reset cannot slip in between).
    fn create_io_queues(&self, qid: u16, entries: u16, cq_iova: u64, sq_iova: u64) -> Result<u64> {
        let mut admin = self.admin.lock().map_err(|_| Error::Poisoned {
            device: self.name.clone(),
            lock: "admin",
        })?;
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        // A new queue starts at tail/head 0; stale shadow values from an earlier queue with
        // this id would make the controller run old entries.
        if let Some(sh) = self.shadow_doorbells(qid) {
            for p in [
                sh.sq,
                sh.cq,
                sh.sq_event as *mut u32,
                sh.cq_event as *mut u32,
            ] {
                // SAFETY: the entries lie in our doorbell pages; the queue does not exist yet.
                unsafe { p.write_volatile(0) };
            }
        }
        self.note_io_queue(qid, true);
        self.admin_command_locked(
            &mut admin,
            Command::create_cq(qid, entries, cq_iova),
            "Create I/O CQ",
        )?;
        if let Err(e) = self.admin_command_locked(
            &mut admin,
            Command::create_sq(qid, entries, sq_iova, qid),
            "Create I/O SQ",
        ) {
            let _ = self.admin_command_locked(&mut admin, Command::delete_cq(qid), "Delete I/O CQ");
            return Err(e);
        }
        Ok(generation)
    }

    fn delete_io_queues(&self, qid: u16) -> Result<()> {
        self.admin_command(Command::delete_sq(qid), "Delete I/O SQ")?;
        self.admin_command(Command::delete_cq(qid), "Delete I/O CQ")?;
        self.note_io_queue(qid, false);
        self.release_qid(qid);
        Ok(())
    }

    fn release_qid(&self, qid: u16) {
        if let Ok(mut qids) = self.qids.lock() {
            if let Some(q) = qids.get_mut(usize::from(qid)) {
                *q = false;
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.is_lent() {
            // The device is another process's now (or will be reclaimed): hands off.
            return;
        }
        // Normal shutdown, then disable, so the device stops all DMA before the admin
        // rings are unmapped.
        let regs = Registers::new(self.pci.bar0());
        shutdown(&regs, &self.name, Duration::from_secs(5));
        let timeout = Duration::from_millis(self.cap.timeout_ms().max(500));
        if let Err(e) = disable(&regs, &self.name, timeout) {
            tracing::warn!(error = &e as &dyn std::error::Error, "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_pages_travel_as_hex_and_bad_text_is_refused() {
        let mut page = [0u8; 4096];
        for (i, b) in page.iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        let text = hex(&page);
        assert_eq!(*unhex(&text, "page").unwrap(), page);
        assert!(unhex(&text[2..], "page").is_err(), "short");
        let mut bad = text.clone();
        bad.replace_range(10..12, "zz");
        assert!(unhex(&bad, "page").is_err(), "not hex");
    }

    #[test]
    fn gaps_are_what_the_arenas_leave_of_a_half() {
        let arenas = [(0x1000, 0x1000), (0x4000, 0x2000)];
        assert_eq!(
            gaps_between(0x1000, 0x8000, &arenas),
            [(0x2000, 0x2000), (0x6000, 0x2000)]
        );
        assert_eq!(gaps_between(0, 0x1000, &[]), [(0, 0x1000)]);
        assert!(gaps_between(0x1000, 0x2000, &[(0x1000, 0x1000)]).is_empty());
    }

    #[test]
    fn the_driver_halves_split_its_iova_range() {
        let (lo, hi) = (driver_iova_half(false), driver_iova_half(true));
        assert_eq!(lo.0, DRIVER_IOVAS.0);
        assert_eq!(lo.1, hi.0);
        assert_eq!(hi.1, DRIVER_IOVAS.1);
    }
}
