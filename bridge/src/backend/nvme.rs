//! The NVMe backend: virtio-blk requests become NVMe commands on a queue pair per virtqueue,
//! with data pointers built from the guest's own buffers. Guest RAM is mapped into the
//! controller's IOMMU domain at IOVA = window base + guest-physical address, so the SSD DMAs
//! straight into the guest: no copy. Each backend on a controller (one VM each) has its own
//! window, so VMs whose guest-physical addresses overlap share a controller, and one VM's
//! descriptors can only produce IOVAs in its own window. Requests above MDTS are split;
//! buffers that break PRP rules go out as SGLs when the controller has them (QueuePair
//! decides).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::request::MAX_SEGMENTS;
use vfblk_hugepages::ExternalMapping;
use vfblk_nvme::controller::{Controller, Namespace};
use vfblk_nvme::prp::DmaSegment;
use vfblk_nvme::queue::{QueuePair, SubmitError};
use vfblk_nvme::spec::Status;
use vfblk_vhost::memory::GuestMemory;

use super::{Backend, BackendInfo, BackendQueue, Queue};
use crate::request::{Operation, Request, MAX_DISCARD_SEGMENTS};

mod kept;
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};
use kept::{KeptWindows, StoredController};

/// A range of 512-byte sectors as (first block, blocks) of a namespace with 2^shift-byte
/// blocks; `None` unless both ends fall on block boundaries (rounding would touch blocks the
/// guest did not name).
fn sectors_to_blocks(sector: u64, count: u32, shift: u8) -> Option<(u64, u64)> {
    let start = sector.checked_mul(SECTOR)?;
    let len = u64::from(count) * SECTOR;
    let mask = (1u64 << shift) - 1;
    (start & mask == 0 && len & mask == 0).then_some((start >> shift, len >> shift))
}

/// Queue entries per NVMe queue pair.
const ENTRIES: u16 = 256;
/// Times a command aborted by a controller reset is sent again before the request fails.
const MAX_TRIES: u8 = 4;
/// How often the timeout clock ticks (and the controller's fatal status is read).
const TICK: Duration = Duration::from_millis(100);

/// How the NVMe backend watches its commands.
#[derive(Debug, Clone)]
pub struct NvmeOptions {
    /// A command outstanding this long is lost: the controller is reset and every command
    /// in flight is sent again.
    pub command_timeout: Duration,
    /// Fault injection (tests): each queue pair loses the completion that arrives after
    /// this many others.
    pub lose_completion_after: Option<u64>,
    /// Fault injection (tests): each queue pair stops reading completions after this many.
    pub hold_completions_after: Option<u64>,
    /// Use SGLs where the controller offers them; off, scatter lists PRPs cannot describe
    /// go through bounce buffers as on a controller without SGLs.
    pub use_sgl: bool,
}

impl Default for NvmeOptions {
    fn default() -> Self {
        Self {
            command_timeout: Duration::from_secs(30),
            lose_completion_after: None,
            hold_completions_after: None,
            use_sgl: true,
        }
    }
}

/// Bytes of IOVA space each backend's guest RAM may occupy: guest-physical addresses must be
/// below this.
pub const WINDOW_SIZE: u64 = 32 << 30;
/// Windows per controller: they fill [0, 256 GiB), below the IOVAs the driver allocates for
/// its own queues and buffers (from 256 GiB up).
pub const WINDOWS: usize = 8;

/// One backend's part of a controller's IOVA space: guest-physical address `gpa` is DMA'd at
/// IOVA `base + gpa`. Returned to its controller when dropped.
pub struct IovaWindow {
    base: u64,
    slot: usize,
    slots: Arc<Mutex<[WindowOwner; WINDOWS]>>,
}

impl IovaWindow {
    /// First IOVA of the window.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The IOVA of `len` bytes at guest-physical `gpa`, if they fit the window.
    pub fn iova(&self, gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        (end <= WINDOW_SIZE).then_some(self.base + gpa)
    }
}

impl Drop for IovaWindow {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.slots.lock() {
            slots[self.slot] = WindowOwner::Free;
        }
    }
}

/// The engines (queue pairs) of one controller, by poller.
type Engines = Arc<Mutex<BTreeMap<u64, std::sync::Weak<PollerEngine>>>>;

/// A poller's engine for one controller, shared by that poller's clients with no lock (the
/// `io_channel` idea): only the poller thread ever touches the engine once a client could
/// reach it. The control plane creates it (a queue pair takes admin commands, not for a
/// poller to wait on) and hands out references; clients attach to it on the poller, at
/// their first call, and leave it there when they are dropped.
struct PollerEngine {
    engine: std::cell::UnsafeCell<NvmeEngine>,
    /// The thread that first used it (checked in debug builds).
    #[cfg(debug_assertions)]
    poller: std::sync::OnceLock<std::thread::ThreadId>,
}

// SAFETY: the engine inside is reached only through `NvmeClient::engine`, which runs on the
// engine's poller thread alone (see there); the control plane only moves the `Arc` around.
unsafe impl Sync for PollerEngine {}

impl PollerEngine {
    fn new(engine: NvmeEngine) -> Self {
        Self {
            engine: std::cell::UnsafeCell::new(engine),
            #[cfg(debug_assertions)]
            poller: std::sync::OnceLock::new(),
        }
    }
}

impl NvmeEngine {
    /// An engine with a new queue pair and no client yet.
    fn new(ctrl: &Controller, options: &NvmeOptions) -> Result<Self> {
        let mut qp = ctrl
            .create_io_queue_pair(ENTRIES)
            .map_err(|source| Error::Nvme {
                what: "creating an I/O queue pair".into(),
                source,
            })?;
        if let Some(n) = options.lose_completion_after {
            qp.inject_lost_completion(n);
        }
        if let Some(n) = options.hold_completions_after {
            qp.inject_held_completions(n);
        }
        let tick_ms = TICK.as_millis().max(1) as u64;
        Ok(Self {
            records: vec![SentCommand::default(); qp.capacity() + 1].into_boxed_slice(),
            qp: std::mem::ManuallyDrop::new(qp),
            ctrl: ctrl.clone(),
            max_transfer: ctrl.max_transfer() as u64,
            clients: Vec::new(),
            next_generation: 1,
            parts: Vec::new(),
            reaped: Vec::new(),
            backlog: Backlog {
                segs: Vec::with_capacity(MAX_SEGMENTS),
                hosts: Vec::with_capacity(MAX_SEGMENTS),
                zeroes: Vec::with_capacity(MAX_DISCARD_SEGMENTS),
                ..Backlog::default()
            },
            scratch: Box::default(),
            pieces: Vec::with_capacity(MAX_SEGMENTS),
            bounces: Vec::new(),
            bounced: false,
            timeout_ticks: (options.command_timeout.as_millis() as u64 / tick_ms).max(1) as u32,
            last_tick: Instant::now(),
            loops: 0,
        })
    }
}

/// Who holds an IOVA window.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WindowOwner {
    Free,
    /// A backend of this process.
    Used,
    /// The process this one took the controller over from, until it has let go.
    Lender,
}

/// A controller's IOVA windows and which are taken.
#[derive(Clone)]
pub struct Windows {
    slots: Arc<Mutex<[WindowOwner; WINDOWS]>>,
}

impl Default for Windows {
    fn default() -> Self {
        Self {
            slots: Arc::new(Mutex::new([WindowOwner::Free; WINDOWS])),
        }
    }
}

impl Windows {
    /// A free window (the lowest: the first backend gets IOVA = GPA), or None.
    pub fn take(&self) -> Option<IovaWindow> {
        let mut slots = self.slots.lock().ok()?;
        let slot = slots.iter().position(|s| *s == WindowOwner::Free)?;
        slots[slot] = WindowOwner::Used;
        Some(IovaWindow {
            base: slot as u64 * WINDOW_SIZE,
            slot,
            slots: self.slots.clone(),
        })
    }

    /// The lender's window at `base`, now this process's, if it is the lender's.
    fn claim_lender(&self, base: u64) -> Option<IovaWindow> {
        let mut slots = self.slots.lock().ok()?;
        let slot = (base / WINDOW_SIZE) as usize;
        (base % WINDOW_SIZE == 0 && slots.get(slot) == Some(&WindowOwner::Lender)).then(|| {
            slots[slot] = WindowOwner::Used;
            IovaWindow {
                base,
                slot,
                slots: self.slots.clone(),
            }
        })
    }

    /// Whether no backend of this process holds a window.
    pub fn unused(&self) -> bool {
        self.slots
            .lock()
            .map(|s| s.iter().all(|s| *s != WindowOwner::Used))
            .unwrap_or(false)
    }

    /// The IOVA ranges of the windows held by `whom` (or, with `not`, by anyone else).
    fn ranges(&self, whom: WindowOwner, not: bool) -> Vec<(u64, u64)> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        (0..WINDOWS)
            .filter(|&i| (slots[i] == whom) != not)
            .map(|i| (i as u64 * WINDOW_SIZE, WINDOW_SIZE))
            .collect()
    }

    /// Marks the windows at `bases` as the lender's (or, with `None`, frees the lender's).
    fn set_lender(&self, bases: Option<&[u64]>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match bases {
            Some(bases) => {
                for &b in bases {
                    if let Some(s) = slots.get_mut((b / WINDOW_SIZE) as usize) {
                        *s = WindowOwner::Lender;
                    }
                }
            }
            None => {
                for s in slots.iter_mut().filter(|s| **s == WindowOwner::Lender) {
                    *s = WindowOwner::Free;
                }
            }
        }
    }
}

/// Guest RAM as mapped in an IOVA window: which memory (the file's device and inode, and
/// the offset into it) at which guest-physical range. The file identifies the memory across
/// processes: two VMs with the same layout differ by it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct MappedRegion {
    /// `st_dev` of the region's file.
    pub dev: u64,
    /// `st_ino` of the region's file.
    pub ino: u64,
    /// Offset of the region in the file.
    pub offset: u64,
    /// Guest-physical start.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
}

impl MappedRegion {
    fn of(r: &vfblk_vhost::memory::Region) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = r.file().metadata().map_err(|source| Error::Io {
            what: format!("fstat of the guest RAM region at {:#x}", r.guest_phys),
            source,
        })?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            offset: r.mmap_offset,
            gpa: r.guest_phys,
            size: r.size,
        })
    }
}

/// A window of a lender's with the guest RAM mapped in it (regions sorted).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LentWindow {
    /// First IOVA of the window.
    pub base: u64,
    /// What is mapped there.
    pub regions: Vec<MappedRegion>,
}

/// What each window of this process holds, by window base.
type MappedWindows = Arc<Mutex<BTreeMap<u64, Vec<MappedRegion>>>>;

/// The windows of `mapped` as another process takes them over.
fn lent_windows(mapped: &BTreeMap<u64, Vec<MappedRegion>>) -> Vec<LentWindow> {
    mapped
        .iter()
        .map(|(base, regions)| LentWindow {
            base: *base,
            regions: regions.clone(),
        })
        .collect()
}

/// An opened controller, the IOVA windows its backends hold, and its queue pairs: one per
/// poller, shared by every virtqueue of its backends that the poller runs.
pub struct SharedController {
    ctrl: Controller,
    windows: Windows,
    engines: Engines,
    /// What the backends have mapped where (lent along with the controller).
    mapped: MappedWindows,
    /// The lender's windows with guest RAM a backend here may take over as it is.
    adoptable: Arc<Mutex<Vec<LentWindow>>>,
    /// Set once the lender let go: mappings taken over from it are this process's to remove.
    lender_gone: Arc<std::sync::atomic::AtomicBool>,
    /// Where `mapped` is kept for a successor after a crash, when the fd store is in use.
    kept_windows: KeptWindows,
}

/// What a process taking over needs of a controller this one lends
/// ([`NvmeControllers::lend_all`]).
pub struct LentController {
    /// Its PCI address.
    pub address: vfblk_nvme::pci::PciAddress,
    /// The fds and the lender's IOVA half.
    pub lending: vfblk_nvme::controller::Lending,
    /// The IOVA windows the lender's backends hold and the guest RAM mapped in each: the
    /// borrower's backends take those mappings over as they are.
    pub windows: Vec<LentWindow>,
    /// The controller handed over enabled with its queues and DMA memory (the borrower
    /// adopts them), or `None`: disabled, the borrower brings it up.
    pub queues: Option<(
        vfblk_nvme::controller::ControllerRecord,
        Vec<std::os::fd::OwnedFd>,
    )>,
    /// Why the queues did not go along when they were asked to.
    pub queues_not_handed: Option<String>,
}

/// How a process taking a controller over got it ([`NvmeControllers::take_over`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TakenController {
    /// PCI address.
    #[serde(with = "crate::spec::pci_string")]
    pub address: vfblk_nvme::pci::PciAddress,
    /// The queues were adopted as the previous process left them (no disable, identify or
    /// queue creation); false: the controller was brought up again.
    pub queues_adopted: bool,
    /// Why not, when they were not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

impl SharedController {
    /// A controller no backend uses yet.
    pub fn new(ctrl: Controller) -> Self {
        Self {
            ctrl,
            windows: Windows::default(),
            engines: Engines::default(),
            mapped: MappedWindows::default(),
            adoptable: Arc::default(),
            lender_gone: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            kept_windows: KeptWindows::default(),
        }
    }

    /// A controller taken over from another process whose backends hold `lender_windows`
    /// until it lets go ([`NvmeControllers::lender_gone`]); a backend here serving the same
    /// guest RAM takes its window over ([`NvmeBackend`]'s guest memory change).
    pub fn adopted(ctrl: Controller, lender_windows: &[LentWindow]) -> Self {
        let shared = Self::new(ctrl);
        let bases: Vec<u64> = lender_windows.iter().map(|w| w.base).collect();
        shared.windows.set_lender(Some(&bases));
        *shared.adoptable.lock().expect("fresh") = lender_windows.to_vec();
        shared
            .lender_gone
            .store(false, std::sync::atomic::Ordering::Release);
        shared
    }

    /// The controller.
    pub fn controller(&self) -> &Controller {
        &self.ctrl
    }

    /// A free window for a new backend.
    pub fn window(&self) -> Result<IovaWindow> {
        self.windows.take().ok_or_else(|| {
            Error::BadArgument(format!(
                "{}: all {WINDOWS} IOVA windows are in use (one per backend, and during an \
                 upgrade the previous process's too)",
                self.ctrl.name()
            ))
        })
    }

    /// Whether no backend holds a window.
    pub fn unused(&self) -> bool {
        self.windows.unused()
    }
}

/// The NVMe controllers a process has opened, by PCI address: backends on the same
/// controller share it.
#[derive(Default)]
pub struct NvmeControllers {
    open: BTreeMap<vfblk_nvme::pci::PciAddress, SharedController>,
    /// The fd store each controller is kept in for a successor after a crash, if any.
    store: Option<Arc<vfblk_vhost::fd_store::FdStore>>,
    /// Controllers a dead predecessor kept in the store, taken over when opened.
    stored: BTreeMap<vfblk_nvme::pci::PciAddress, StoredController>,
}

impl NvmeControllers {
    /// The controller at `address`, opened with `io_queues` queue pairs if it is not yet.
    pub fn get_or_open(
        &mut self,
        address: vfblk_nvme::pci::PciAddress,
        io_queues: u16,
        options: &NvmeOptions,
    ) -> Result<&SharedController> {
        use std::collections::btree_map::Entry;
        match self.open.entry(address) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(v) => {
                use vfblk_nvme::controller::Options;
                let options = Options {
                    io_queues,
                    sgl: options.use_sgl,
                    ..Options::default()
                };
                let recovered = match self.stored.remove(&address) {
                    Some(stored) => kept::recover(self.store.as_ref(), address, stored, &options),
                    None => None,
                };
                let shared = match recovered {
                    Some(shared) => shared,
                    None => {
                        let ctrl =
                            Controller::open(address, &options).map_err(|source| Error::Nvme {
                                what: format!("opening {address}"),
                                source,
                            })?;
                        let shared = SharedController::new(ctrl);
                        kept::keep(self.store.as_ref(), address, &shared, None);
                        shared
                    }
                };
                Ok(v.insert(shared))
            }
        }
    }

    /// Lends every controller to a process taking this one's place (nothing may be in
    /// flight): each is disabled and its fds duplicated. On failure the ones already lent
    /// are taken back.
    ///
    /// With `with_queues` (the borrower reads the queue record), each controller goes
    /// enabled with its queues and DMA memory for the borrower to adopt
    /// ([`Controller::hand_over_queues`]); a controller that cannot (a queue pair still in
    /// use, commands in flight, an unhealthy controller) is lent disabled as without.
    pub fn lend_all(&self, with_queues: bool) -> Result<Vec<LentController>> {
        let mut lent = Vec::new();
        for (address, c) in &self.open {
            let mut queues_not_handed = None;
            let handed = if with_queues {
                let started = Instant::now();
                match c.ctrl.hand_over_queues() {
                    Ok(h) => {
                        tracing::info!(
                            "{address}: queues handed over enabled ({} I/O queue pair(s), {} DMA arena(s)) in {:.2} ms",
                            h.record.queues.len(),
                            h.record.arenas.len(),
                            started.elapsed().as_secs_f64() * 1e3
                        );
                        Some(h)
                    }
                    Err(e) => {
                        let why = vfblk_vhost::error_chain(&e);
                        tracing::warn!(
                            "{address}: queues not handed over ({why}); lending it disabled"
                        );
                        queues_not_handed = Some(why);
                        None
                    }
                }
            } else {
                None
            };
            let lending = match handed {
                Some(h) => Ok((
                    vfblk_nvme::controller::Lending {
                        vfio: h.vfio,
                        upper_iova_half: h.record.upper_iova_half,
                    },
                    Some((h.record, h.memfds)),
                )),
                None => c.ctrl.lend().map(|l| (l, None)),
            };
            match lending {
                Ok((lending, queues)) => lent.push(LentController {
                    address: *address,
                    lending,
                    windows: lent_windows(&c.mapped.lock().unwrap_or_else(|e| e.into_inner())),
                    queues,
                    queues_not_handed,
                }),
                Err(source) => {
                    self.reclaim_all();
                    return Err(Error::Nvme {
                        what: format!("lending {address}"),
                        source,
                    });
                }
            }
        }
        Ok(lent)
    }

    /// Takes back the lent controllers after the borrower failed and is gone: whatever it
    /// mapped is removed and each controller reset with this process's queues.
    pub fn reclaim_all(&self) {
        for (address, c) in self.open.iter().filter(|(_, c)| c.ctrl.lent()) {
            // The borrower may have stored its record; the reset below makes it untrue.
            kept::forget_record(self.store.as_ref(), *address);
            match c.ctrl.reclaim(&c.windows.ranges(WindowOwner::Used, true)) {
                Ok(()) => {
                    tracing::info!("{address}: taken back after the hand-over failed");
                    // The borrower may have put its own record in the store.
                    kept::keep(self.store.as_ref(), *address, c, None);
                }
                Err(e) => tracing::error!(
                    "{address}: could not be taken back after the hand-over failed: {}",
                    vfblk_vhost::error_chain(&e)
                ),
            }
        }
    }

    /// After the borrower took over for good: removes this process's own DMA mappings
    /// from the shared containers, touching no device. Guest RAM mappings stay: the
    /// borrower took them over (and removes any it did not). Returns the bytes unmapped.
    /// Controllers in `adopted` are left alone: the borrower adopted their queues and DMA
    /// memory, which stay mapped for it.
    pub fn release_all(&self, adopted: &[vfblk_nvme::pci::PciAddress]) -> u64 {
        let mut removed = 0;
        for (address, c) in self.open.iter().filter(|(a, _)| !adopted.contains(a)) {
            kept::forget_arenas(self.store.as_ref(), *address, &c.ctrl);
            match c.ctrl.release_lent() {
                Ok(n) => removed += n,
                Err(e) => tracing::error!(
                    "{address}: mappings not released after the hand-over: {}",
                    vfblk_vhost::error_chain(&e)
                ),
            }
        }
        removed
    }

    /// Takes over the controller at `address` another process lent (its fds in `vfio`, its
    /// driver IOVAs in the `lender_upper` half, its backends' windows at `lender_windows`)
    /// and brings it up with `io_queues` queue pairs.
    pub fn adopt(
        &mut self,
        address: vfblk_nvme::pci::PciAddress,
        vfio: vfblk_nvme::vfio::SharedVfio,
        lender_upper: bool,
        lender_windows: &[LentWindow],
        io_queues: u16,
        options: &NvmeOptions,
    ) -> Result<()> {
        use vfblk_nvme::controller::Options;
        let ctrl = Controller::adopt(
            address,
            vfio,
            &Options {
                io_queues,
                sgl: options.use_sgl,
                upper_iova_half: !lender_upper,
                ..Options::default()
            },
        )
        .map_err(|source| Error::Nvme {
            what: format!("taking over {address}"),
            source,
        })?;
        let shared = SharedController::adopted(ctrl, lender_windows);
        kept::keep(self.store.as_ref(), address, &shared, None);
        self.open.insert(address, shared);
        Ok(())
    }

    /// Takes over the controller at `address` another process handed over: with its
    /// queues (`queues`: the record and the arenas' memfds) when given and adoptable, else
    /// — a record this driver does not read, or one that does not match the controller or
    /// itself — brought up as [`NvmeControllers::adopt`] does. Says which.
    #[allow(clippy::too_many_arguments)]
    pub fn take_over(
        &mut self,
        address: vfblk_nvme::pci::PciAddress,
        vfio: vfblk_nvme::vfio::SharedVfio,
        lender_upper: bool,
        lender_windows: &[LentWindow],
        queues: Option<(
            &vfblk_nvme::controller::ControllerRecord,
            Vec<std::os::fd::OwnedFd>,
        )>,
        io_queues: u16,
        options: &NvmeOptions,
        fault: Option<&dyn Fn() -> Result<()>>,
    ) -> Result<TakenController> {
        use vfblk_nvme::controller::Options;
        let why_not = match queues {
            None => "the previous process lent it disabled".to_string(),
            Some((record, memfds)) => {
                let dup = |fd: &std::os::fd::OwnedFd| {
                    fd.try_clone().map_err(|source| Error::Io {
                        what: format!("{address}: duplicating a VFIO fd for the fallback"),
                        source,
                    })
                };
                // Kept for the fallback: adopting consumes the fds it is given.
                let fallback = vfblk_nvme::vfio::SharedVfio {
                    container: dup(&vfio.container)?,
                    device: dup(&vfio.device)?,
                    layout: vfio.layout,
                };
                let started = Instant::now();
                let adopted = Controller::take_over(
                    address,
                    vfio,
                    record,
                    memfds,
                    &Options {
                        io_queues,
                        sgl: options.use_sgl,
                        upper_iova_half: lender_upper,
                        ..Options::default()
                    },
                )
                .map_err(|source| Error::Nvme {
                    what: format!("adopting the queues of {address}"),
                    source,
                })
                .and_then(|ctrl| {
                    // A test's fault: the adoption fails after everything was adopted.
                    fault.map_or(Ok(()), |f| f())?;
                    Ok(ctrl)
                });
                match adopted {
                    Ok(ctrl) => {
                        let (queue_pairs, _) = ctrl.queue_pairs();
                        let (arenas, bytes) = ctrl.dma_arenas();
                        tracing::info!(
                            "{address}: queues adopted as the previous process left them ({queue_pairs} I/O queue pair(s), {arenas} DMA arena(s) of {} KiB at the same IOVAs) in {:.2} ms: no disable, identify or queue creation",
                            bytes >> 10,
                            started.elapsed().as_secs_f64() * 1e3
                        );
                        let shared = SharedController::adopted(ctrl, lender_windows);
                        kept::keep(self.store.as_ref(), address, &shared, None);
                        self.open.insert(address, shared);
                        return Ok(TakenController {
                            address,
                            queues_adopted: true,
                            why_not: None,
                        });
                    }
                    Err(e) => {
                        let why = vfblk_vhost::error_chain(&e);
                        tracing::warn!(
                            "{address}: queues not adopted ({why}); bringing the controller up instead"
                        );
                        self.adopt(
                            address,
                            fallback,
                            lender_upper,
                            lender_windows,
                            io_queues,
                            options,
                        )?;
                        return Ok(TakenController {
                            address,
                            queues_adopted: false,
                            why_not: Some(why),
                        });
                    }
                }
            }
        };
        self.adopt(
            address,
            vfio,
            lender_upper,
            lender_windows,
            io_queues,
            options,
        )?;
        Ok(TakenController {
            address,
            queues_adopted: false,
            why_not: Some(why_not),
        })
    }

    /// The lender let go: the mappings taken over from it are this process's now, and
    /// what it left in windows nobody took over is removed.
    pub fn lender_gone(&self) {
        for (address, c) in &self.open {
            c.ctrl.lender_gone();
            c.lender_gone
                .store(true, std::sync::atomic::Ordering::Release);
            c.adoptable
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
            for (base, len) in c.windows.ranges(WindowOwner::Lender, false) {
                match c.ctrl.unmap_within(base, len) {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        "{address}: removed {n} bytes of guest RAM the previous process had mapped at IOVA {base:#x} and no backend took over"
                    ),
                    Err(e) => tracing::error!(
                        "{address}: the previous process's mappings at IOVA {base:#x}: {}",
                        vfblk_vhost::error_chain(&e)
                    ),
                }
            }
            c.windows.set_lender(None);
        }
    }

    /// Closes the controllers no backend uses any more.
    pub fn close_unused(&mut self) {
        let store = self.store.clone();
        self.open.retain(|address, c| {
            let keep = !c.unused();
            if !keep {
                tracing::info!("{address}: no backend uses it; closing it");
                kept::forget_controller(store.as_ref(), *address, &c.ctrl);
            }
            keep
        });
    }
}

/// The `nvme` backend.
pub struct NvmeBackend {
    ctrl: Controller,
    ns: Namespace,
    info: BackendInfo,
    /// Changes once at most: to a window the lender mapped this backend's guest RAM in.
    window: Mutex<IovaWindow>,
    windows: Windows,
    mapped: MappedWindows,
    adoptable: Arc<Mutex<Vec<LentWindow>>>,
    lender_gone: Arc<std::sync::atomic::AtomicBool>,
    kept_windows: KeptWindows,
    /// First block of the namespace this backend serves (a part of a namespace for one VM).
    first_block: u64,
    /// The controller's queue pairs by poller (shared with its other backends).
    engines: Engines,
    mappings: Mutex<Vec<ExternalMapping>>,
    options: NvmeOptions,
}

/// A byte range of a namespace: `offset` and `size` (None: to the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NamespaceRange {
    /// First byte.
    pub offset: u64,
    /// Bytes; None: the rest of the namespace.
    pub size: Option<u64>,
}

impl NvmeBackend {
    /// Serves `range` of namespace `nsid` of a controller, in a window of its IOVA space.
    pub fn new(
        shared: &SharedController,
        nsid: u32,
        range: NamespaceRange,
        options: NvmeOptions,
    ) -> Result<Self> {
        let ctrl = shared.controller().clone();
        let ns = ctrl
            .namespace(nsid)
            .map_err(|source| Error::Nvme {
                what: format!("namespace {nsid}"),
                source,
            })?
            .clone();
        let total = ns.info.size_bytes();
        let block = u64::from(ns.info.block_size());
        let size = range.size.unwrap_or(total.saturating_sub(range.offset));
        let end = range.offset.checked_add(size);
        if range.offset % block != 0
            || size % block != 0
            || size == 0
            || end.is_none_or(|e| e > total)
        {
            return Err(Error::BadArgument(format!(
                "namespace {nsid}: bytes {}+{size} are not a non-empty run of whole {block}-byte blocks inside its {total} bytes",
                range.offset
            )));
        }
        let window = shared.window()?;
        let id = ctrl.identify();
        let part = if size == total {
            String::new()
        } else {
            format!(" bytes {}..{} of", range.offset, range.offset + size)
        };
        let info = BackendInfo {
            description: format!(
                "nvme:{}{part} namespace {} ({} MiB, {}-byte blocks, {}, max transfer {} KiB)",
                ctrl.name(),
                nsid,
                size >> 20,
                ns.info.block_size(),
                id.model,
                ctrl.max_transfer() >> 10
            ),
            capacity_sectors: size / SECTOR,
            block_size: ns.info.block_size(),
            physical_block_size: ns.info.block_size(),
            // Requests up to MDTS go out as one command.
            optimal_io_size: ctrl.max_transfer().min(u32::MAX as usize) as u32,
            flush: id.has_volatile_write_cache(),
            discard: id.supports_dsm(),
            write_zeroes: id.supports_write_zeroes(),
            read_only: false,
        };
        Ok(Self {
            ctrl,
            ns,
            info,
            window: Mutex::new(window),
            windows: shared.windows.clone(),
            mapped: shared.mapped.clone(),
            adoptable: shared.adoptable.clone(),
            lender_gone: shared.lender_gone.clone(),
            kept_windows: shared.kept_windows.clone(),
            first_block: range.offset / block,
            engines: shared.engines.clone(),
            mappings: Mutex::new(Vec::new()),
            options,
        })
    }

    /// Its IOVA window's first address.
    pub fn window_base(&self) -> u64 {
        self.window.lock().unwrap_or_else(|e| e.into_inner()).base()
    }

    /// Takes over the lender's window holding exactly `regions` of this guest's RAM, if
    /// there is one: the mappings stay as they are (nothing pinned or mapped again).
    fn adopt_lent_window(
        &self,
        window: &mut IovaWindow,
        regions: &[MappedRegion],
    ) -> Option<Vec<ExternalMapping>> {
        let mut adoptable = self.adoptable.lock().unwrap_or_else(|e| e.into_inner());
        // Only a window whose regions fit it, as a mapping made here would have to: the
        // handed-over list is checked like any other input.
        let fits = |r: &MappedRegion| r.gpa.checked_add(r.size).is_some_and(|e| e <= WINDOW_SIZE);
        let i = adoptable
            .iter()
            .position(|w| w.regions == regions && w.regions.iter().all(fits))?;
        let lent = adoptable.remove(i);
        let claimed = self.windows.claim_lender(lent.base)?;
        // The window this backend had goes back (it held nothing yet).
        *window = claimed;
        Some(
            lent.regions
                .iter()
                .map(|r| {
                    // SAFETY: the lender mapped exactly this guest RAM (same file, offset,
                    // size) there, and this process maps it too for as long as the
                    // connection's GuestMemory lives; the device releases these mappings
                    // (guest_memory_changed(None)) before it drops it.
                    unsafe {
                        self.ctrl.adopt_external(
                            lent.base + r.gpa,
                            r.size as usize,
                            self.lender_gone.clone(),
                        )
                    }
                })
                .collect(),
        )
    }
}

impl Backend for NvmeBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self, poller: u64) -> Result<Queue> {
        let mut engines = self
            .engines
            .lock()
            .map_err(|_| Error::Poisoned("NVMe engines"))?;
        engines.retain(|_, e| e.strong_count() > 0);
        let engine = match engines.get(&poller).and_then(std::sync::Weak::upgrade) {
            Some(engine) => engine,
            None => {
                let engine = NvmeEngine::new(&self.ctrl, &self.options)?;
                tracing::info!(
                    "{}: I/O queue pair {} for poller {poller}, shared by its queues on this controller",
                    self.ctrl.name(),
                    engine.qp.qid()
                );
                let engine = Arc::new(PollerEngine::new(engine));
                engines.insert(poller, Arc::downgrade(&engine));
                engine
            }
        };
        drop(engines);
        // Not attached here: the poller may be using the engine for its other clients now.
        Ok(Queue::from(NvmeClient {
            engine,
            cfg: ClientCfg {
                nsid: self.ns.nsid,
                shift: self.ns.info.lba_shift,
                first_block: self.first_block,
                iova_base: self.window_base(),
                generation: 0,
            },
            slot: None,
            in_flight: 0,
        }))
    }

    /// One IOVA window and one list of guest RAM mappings per backend: a second frontend's
    /// memory table would replace the first's while its commands still DMA into it.
    fn serves_one_frontend(&self) -> bool {
        true
    }

    fn guest_memory_changed(&self, memory: Option<&GuestMemory>) -> Result<()> {
        let mut mappings = self
            .mappings
            .lock()
            .map_err(|_| Error::Poisoned("guest RAM mappings"))?;
        let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let mut mapped = self.mapped.lock().unwrap_or_else(|e| e.into_inner());
        // Old mappings go first: the same guest-physical ranges come back at the same IOVAs.
        // Out of the kept record before they are unmapped, into it once mapped: a successor
        // removes whatever is mapped in a window the record does not name.
        mapped.remove(&window.base());
        self.kept_windows.write(&mapped);
        mappings.clear();
        let Some(memory) = memory else { return Ok(()) };
        let mut regions = memory
            .regions()
            .iter()
            .map(|r| MappedRegion::of(r))
            .collect::<Result<Vec<_>>>()?;
        regions.sort();
        if let Some(adopted) = self.adopt_lent_window(&mut window, &regions) {
            tracing::info!(
                "{} namespace {}: guest RAM ({} region(s)) taken over as the previous process mapped it, at IOVA {:#x}",
                self.ctrl.name(),
                self.ns.nsid,
                adopted.len(),
                window.base()
            );
            *mappings = adopted;
            mapped.insert(window.base(), regions);
            self.kept_windows.write(&mapped);
            return Ok(());
        }
        for r in memory.regions() {
            let iova = window.iova(r.guest_phys, r.size).ok_or_else(|| {
                Error::BadArgument(format!(
                    "guest RAM at {:#x}+{:#x} does not fit the {} GiB IOVA window of a VM",
                    r.guest_phys,
                    r.size,
                    WINDOW_SIZE >> 30
                ))
            })?;
            let host = memory
                .translate(r.guest_phys, r.size)
                .expect("a region translates to itself");
            // SAFETY: the region stays mapped while the connection's GuestMemory lives; the
            // device releases these mappings (guest_memory_changed(None)) before it drops it,
            // and guest memory is only touched through raw pointers.
            let m = unsafe { self.ctrl.map_external(iova, host, r.size as usize) }.map_err(
                |source| Error::Nvme {
                    what: format!("mapping guest RAM at IOVA {iova:#x}"),
                    source,
                },
            )?;
            tracing::info!(
                "{} namespace {}: guest RAM {:#x}..{:#x} mapped at IOVA {:#x}..{:#x}",
                self.ctrl.name(),
                self.ns.nsid,
                r.guest_phys,
                r.guest_phys + r.size,
                iova,
                iova + r.size
            );
            mappings.push(m);
        }
        mapped.insert(window.base(), regions);
        self.kept_windows.write(&mapped);
        Ok(())
    }
}

/// One virtio request's NVMe commands: how many are out, the worst status.
#[derive(Clone, Copy, Default)]
struct Part {
    pending: u32,
    status: u8,
}

/// An NVMe command as sent, kept under its command id so that a reset that aborts it can be
/// answered by sending it again (the guest sees nothing).
#[derive(Clone, Copy)]
struct SentCommand {
    kind: CommandKind,
    /// The request's key: its client (virtqueue) in the high half, its head in the low.
    token: u32,
    lba: u64,
    blocks: u32,
    segs: [DmaSegment; MAX_SEGMENTS],
    nsegs: usize,
    ranges: [(u64, u32); MAX_DISCARD_SEGMENTS],
    nranges: usize,
    tries: u8,
    /// The bounce buffer carrying its data, if PRPs could not describe the guest's buffers.
    bounce: u16,
}

/// No bounce buffer.
const NO_BOUNCE: u16 = u16::MAX;

/// A command's data in DMA memory of ours, for guest buffers PRPs cannot describe on a
/// controller without SGLs: written from the guest's buffers before a write, copied to them
/// after a read.
struct Bounce {
    chunk: vfblk_hugepages::DmaChunk,
    /// The guest's pieces, in order: host address and length.
    pieces: Vec<(*mut u8, u32)>,
    read: bool,
}

/// The NVMe command a record (or a backlog) sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum CommandKind {
    #[default]
    Read,
    Write,
    WriteFua,
    Flush,
    WriteZeroes,
    Deallocate,
}

impl SentCommand {
    /// Copies what is used (not the whole fixed-size arrays: this runs per command).
    fn store_into(&self, dst: &mut SentCommand) {
        dst.kind = self.kind;
        dst.token = self.token;
        dst.lba = self.lba;
        dst.blocks = self.blocks;
        dst.nsegs = self.nsegs;
        dst.segs[..self.nsegs].copy_from_slice(&self.segs[..self.nsegs]);
        dst.nranges = self.nranges;
        dst.ranges[..self.nranges].copy_from_slice(&self.ranges[..self.nranges]);
        dst.tries = self.tries;
        dst.bounce = self.bounce;
    }
}

impl Default for SentCommand {
    fn default() -> Self {
        Self {
            kind: CommandKind::Flush,
            token: 0,
            lba: 0,
            blocks: 0,
            segs: [DmaSegment { iova: 0, len: 0 }; MAX_SEGMENTS],
            nsegs: 0,
            ranges: [(0, 0); MAX_DISCARD_SEGMENTS],
            nranges: 0,
            tries: 0,
            bounce: NO_BOUNCE,
        }
    }
}

/// The rest of one request that did not fit the queue pair when it came: sent as slots free
/// up (back-pressure, not IOERR). While it exists the virtqueue takes nothing new.
#[derive(Default)]
struct Backlog {
    active: bool,
    /// Key of the request (client and head).
    token: u32,
    /// Read, Write, WriteFua or WriteZeroes.
    kind: CommandKind,
    /// Read/write: the request's buffers (device and host addresses) and where sending
    /// stands in them.
    segs: Vec<DmaSegment>,
    hosts: Vec<*mut u8>,
    seg: usize,
    offset: u64,
    lba: u64,
    /// Write zeroes: the ranges as (lba, blocks) left.
    zeroes: Vec<(u64, u64)>,
}

/// What a client (one virtqueue of one backend) sends with: its namespace, its part of it,
/// its IOVA window.
#[derive(Clone, Copy)]
struct ClientCfg {
    nsid: u32,
    shift: u8,
    /// Added to every block: where the backend's part of the namespace starts (the request
    /// parser keeps sectors below the part's capacity).
    first_block: u64,
    /// Added to every guest-physical address: the backend's IOVA window.
    iova_base: u64,
    /// Tells a client's completions from those of an earlier client in the same slot.
    generation: u32,
}

/// The NVMe queue pair of one (controller, poller), shared by every virtqueue of every
/// backend on that controller that the poller runs ("clients"): one poller thread uses it.
struct NvmeEngine {
    /// Parked in the controller when the engine goes (its queues kept for the next engine
    /// or a hand-over); `ManuallyDrop` only to move it out in `drop`.
    qp: std::mem::ManuallyDrop<QueuePair>,
    ctrl: Controller,
    max_transfer: u64,
    /// Per client slot.
    clients: Vec<Option<ClientCfg>>,
    next_generation: u32,
    /// Per client, per virtio head.
    parts: Vec<Box<[Part]>>,
    /// Per NVMe command id.
    records: Box<[SentCommand]>,
    /// Per client: finished requests not yet reported.
    reaped: Vec<Vec<(u16, u8)>>,
    backlog: Backlog,
    /// A record to build commands in (boxed: 2.7 KB, kept to avoid initialising one per chunk).
    scratch: Box<SentCommand>,
    /// The host side of the chunk being built (for a bounce).
    pieces: Vec<(*mut u8, u32)>,
    /// Bounce buffers in use, by index.
    bounces: Vec<Option<Bounce>>,
    /// Whether a request went through a bounce buffer yet (logged once).
    bounced: bool,
    timeout_ticks: u32,
    last_tick: Instant,
    loops: u32,
}

impl Drop for NvmeEngine {
    fn drop(&mut self) {
        // SAFETY: `qp` is not used again (the engine is going).
        let qp = unsafe { std::mem::ManuallyDrop::take(&mut self.qp) };
        self.ctrl.park(qp);
    }
}

// SAFETY: the host pointers it keeps (for bounce copies) point into guest memory that stays
// mapped while requests are in flight; one poller thread uses the engine (see
// `NvmeClient::engine`).
unsafe impl std::marker::Send for NvmeEngine {}

/// Client slot and head of a request key.
fn split_key(key: u32) -> (usize, usize) {
    ((key >> 16) as usize, (key & 0xffff) as usize)
}

impl NvmeEngine {
    fn part(&mut self, key: u32) -> &mut Part {
        let (client, head) = split_key(key);
        &mut self.parts[client][head]
    }

    fn cfg(&self, key: u32) -> ClientCfg {
        let (client, _) = split_key(key);
        self.clients[client].expect("a request of a client that left")
    }

    fn fail(&mut self, token: u32) {
        self.part(token).status = status::IOERR;
    }

    /// A new client: its slot.
    fn add_client(&mut self, cfg: ClientCfg) -> u16 {
        let cfg = ClientCfg {
            generation: self.next_generation,
            ..cfg
        };
        self.next_generation = self.next_generation.wrapping_add(1);
        let slot = match self.clients.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.clients.push(None);
                self.parts
                    .push(vec![Part::default(); usize::from(u16::MAX) + 1].into_boxed_slice());
                self.reaped.push(Vec::with_capacity(usize::from(ENTRIES)));
                self.clients.len() - 1
            }
        };
        self.clients[slot] = Some(cfg);
        self.reaped[slot].clear();
        slot as u16
    }

    /// A client leaves; completions of its commands still out are dropped when they come.
    fn remove_client(&mut self, slot: u16) {
        let slot = usize::from(slot);
        self.clients[slot] = None;
        self.reaped[slot].clear();
        if self.backlog.active && split_key(self.backlog.token).0 == slot {
            self.backlog.active = false;
        }
    }

    /// Sends `rec` (its command id decides where it is kept). False when the queue pair has
    /// no slot (try later) or refused it (the request is failed).
    fn send(&mut self, rec: &SentCommand) -> Send {
        let cfg = self.cfg(rec.token);
        let (nsid, shift) = (cfg.nsid, cfg.shift);
        let token = u64::from(cfg.generation) << 32 | u64::from(rec.token);
        let segs = &rec.segs[..rec.nsegs];
        let r = match rec.kind {
            CommandKind::Read => self.qp.read(nsid, rec.lba, rec.blocks, shift, segs, token),
            CommandKind::Write => self.qp.write(nsid, rec.lba, rec.blocks, shift, segs, token),
            // Writethrough: Force Unit Access, so the write completes only once stable.
            CommandKind::WriteFua => self
                .qp
                .write_fua(nsid, rec.lba, rec.blocks, shift, segs, token),
            CommandKind::Flush => self.qp.flush(nsid, token),
            CommandKind::WriteZeroes => self.qp.write_zeroes(nsid, rec.lba, rec.blocks, token),
            CommandKind::Deallocate => self.qp.deallocate(nsid, &rec.ranges[..rec.nranges], token),
        };
        match r {
            Ok(cid) => {
                if let Some(slot) = self.records.get_mut(usize::from(cid)) {
                    rec.store_into(slot);
                }
                self.part(rec.token).pending += 1;
                Send::Sent
            }
            Err(SubmitError::QueueFull) => Send::Full,
            Err(SubmitError::Prp(_))
                if matches!(
                    rec.kind,
                    CommandKind::Read | CommandKind::Write | CommandKind::WriteFua
                ) && rec.bounce == NO_BOUNCE =>
            {
                Send::NeedsBounce
            }
            Err(e) => {
                tracing::warn!("nvme backend: head {}: {e}", rec.token);
                self.fail(rec.token);
                Send::Refused
            }
        }
    }

    /// Sends `rec` (whose buffers are `self.pieces`, `len` bytes) through a bounce buffer.
    fn send_bounced(&mut self, rec: &mut SentCommand, len: u64) -> Send {
        if !self.bounced {
            // Once per queue pair: the slow path is in use (no SGLs, PRP-unfriendly lists).
            tracing::info!(
                "{}: queue {}: scatter lists PRPs cannot describe go through bounce buffers (first: head {}, {} pieces)",
                self.ctrl.name(),
                self.qp.qid(),
                rec.token,
                self.pieces.len()
            );
            self.bounced = true;
        }
        let chunk = match self.ctrl.dma_buffer(len as usize) {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "nvme backend: head {}: no bounce buffer: {e}",
                    rec.token
                );
                self.fail(rec.token);
                return Send::Refused;
            }
        };
        let read = rec.kind == CommandKind::Read;
        if !read {
            let mut at = 0usize;
            for &(host, n) in &self.pieces {
                // SAFETY: the piece lies in guest memory the chain walk translated; the
                // chunk holds `len` bytes, the sum of the pieces.
                unsafe { std::ptr::copy_nonoverlapping(host, chunk.as_ptr().add(at), n as usize) };
                at += n as usize;
            }
        }
        let index = match self.bounces.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.bounces.push(None);
                self.bounces.len() - 1
            }
        };
        rec.segs[0] = DmaSegment {
            iova: chunk.iova(),
            len: len as u32,
        };
        rec.nsegs = 1;
        rec.bounce = index as u16;
        self.bounces[index] = Some(Bounce {
            chunk,
            pieces: self.pieces.clone(),
            read,
        });
        match self.send(rec) {
            Send::Sent => Send::Sent,
            other => {
                self.bounces[index] = None;
                other
            }
        }
    }

    /// A bounced command is done: a read's data goes to the guest's buffers (if it
    /// succeeded), and the bounce buffer is freed.
    fn end_bounce(bounces: &mut [Option<Bounce>], index: u16, success: bool) {
        let Some(b) = bounces.get_mut(usize::from(index)).and_then(Option::take) else {
            return;
        };
        if b.read && success {
            let mut at = 0usize;
            for &(host, n) in &b.pieces {
                // SAFETY: as in send_bounced; the guest owns the buffer until we complete.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.chunk.as_ptr().add(at), host, n as usize)
                };
                at += n as usize;
            }
        }
    }

    /// Sends what the backlog still holds, as far as slots allow.
    fn pump(&mut self) {
        if !self.backlog.active {
            return;
        }
        let mut rec = std::mem::take(&mut self.scratch);
        self.pump_with(&mut rec);
        self.scratch = rec;
    }

    fn pump_with(&mut self, rec: &mut SentCommand) {
        let shift = if self.backlog.active {
            self.cfg(self.backlog.token).shift
        } else {
            0
        };
        while self.backlog.active {
            let token = self.backlog.token;
            rec.token = token;
            rec.nsegs = 0;
            rec.nranges = 0;
            rec.tries = 0;
            let b = &mut self.backlog;
            match b.kind {
                CommandKind::WriteZeroes => {
                    let Some(&(lba, left)) = b.zeroes.last() else {
                        b.active = false;
                        break;
                    };
                    let n = left.min(65536);
                    rec.kind = CommandKind::WriteZeroes;
                    rec.lba = lba;
                    rec.blocks = n as u32;
                    match self.send(rec) {
                        Send::Sent => {
                            let b = &mut self.backlog;
                            let last = b.zeroes.last_mut().expect("checked");
                            last.0 += n;
                            last.1 -= n;
                            if last.1 == 0 {
                                b.zeroes.pop();
                            }
                        }
                        Send::Full => return,
                        Send::Refused | Send::NeedsBounce => self.backlog.active = false,
                    }
                }
                kind => {
                    // The next chunk: up to MDTS bytes of the remaining buffers.
                    let mut len = 0u64;
                    let (mut seg, mut offset) = (b.seg, b.offset);
                    self.pieces.clear();
                    while seg < b.segs.len() && len < self.max_transfer && rec.nsegs < MAX_SEGMENTS
                    {
                        let s = b.segs[seg];
                        let take = (u64::from(s.len) - offset).min(self.max_transfer - len);
                        rec.segs[rec.nsegs] = DmaSegment {
                            iova: s.iova + offset,
                            len: take as u32,
                        };
                        // SAFETY: offset < s.len: inside the guest buffer the chain walk
                        // translated.
                        self.pieces
                            .push((unsafe { b.hosts[seg].add(offset as usize) }, take as u32));
                        rec.nsegs += 1;
                        len += take;
                        offset += take;
                        if offset == u64::from(s.len) {
                            seg += 1;
                            offset = 0;
                        }
                    }
                    if len == 0 {
                        b.active = false;
                        break;
                    }
                    // A chunk that ends inside a block (a segment split at the transfer
                    // limit) cannot be sent: only odd guest buffers hit this.
                    if len % (1 << shift) != 0 {
                        b.active = false;
                        self.fail(token);
                        break;
                    }
                    rec.kind = kind;
                    rec.lba = b.lba;
                    rec.blocks = (len >> shift) as u32;
                    rec.bounce = NO_BOUNCE;
                    let mut sent = self.send(rec);
                    if let Send::NeedsBounce = sent {
                        sent = self.send_bounced(rec, len);
                    }
                    match sent {
                        Send::Sent => {
                            let b = &mut self.backlog;
                            b.seg = seg;
                            b.offset = offset;
                            b.lba += len >> shift;
                        }
                        Send::Full => return,
                        Send::Refused | Send::NeedsBounce => self.backlog.active = false,
                    }
                }
            }
        }
        // Everything sent (or given up): a request with nothing left out is done now.
        let token = self.backlog.token;
        let client_here = self.clients[split_key(token).0].is_some();
        if client_here && !self.backlog.active && self.part(token).pending == 0 && self.owes(token)
        {
            self.finish(token);
        }
    }

    /// Whether `token`'s completion has not been reported yet.
    fn owes(&mut self, token: u32) -> bool {
        self.part(token).status != DONE
    }

    fn finish(&mut self, token: u32) {
        let p = self.part(token);
        let st = if p.status == status::OK || p.status == status::IOERR {
            p.status
        } else {
            status::IOERR
        };
        p.status = DONE;
        let (client, head) = split_key(token);
        self.reaped[client].push((head as u16, st));
    }

    /// Every TICK: the timeout clock and the controller's fatal status. A lost command or a
    /// fatal controller is answered with a reset; the commands it aborts are sent again.
    fn watch(&mut self) {
        self.loops = self.loops.wrapping_add(1);
        if self.loops % 256 != 0 || self.last_tick.elapsed() < TICK || self.ctrl.lent() {
            return;
        }
        self.last_tick = Instant::now();
        let stuck = self.qp.tick(self.timeout_ticks);
        let fatal = self.ctrl.fatal();
        if stuck.is_none() && !fatal {
            return;
        }
        if let Some(s) = stuck {
            tracing::warn!(
                "{}: command {} (opcode {:#04x}, head {}) outstanding {} ms: resetting the controller",
                self.ctrl.name(),
                s.cid,
                s.opcode,
                s.token,
                u64::from(s.age) * TICK.as_millis() as u64
            );
        } else {
            tracing::warn!(
                "{}: controller fatal status: resetting it",
                self.ctrl.name()
            );
        }
        match self.ctrl.reset() {
            Ok(()) => tracing::info!(
                "{}: controller reset; commands in flight are sent again",
                self.ctrl.name()
            ),
            Err(e) => tracing::error!(
                error = &e as &dyn std::error::Error,
                "{}: controller reset failed: {e}",
                self.ctrl.name()
            ),
        }
    }
}

/// Status value marking a token whose completion was reported (not a virtio status).
const DONE: u8 = 0xff;

enum Send {
    Sent,
    Full,
    Refused,
    /// PRPs cannot describe the buffers and the controller takes no SGLs.
    NeedsBounce,
}

impl NvmeEngine {
    fn can_submit(&self) -> bool {
        // A new request needs at least one slot; a backlog takes them all first.
        !self.backlog.active && self.qp.capacity() > self.qp.in_flight()
    }

    fn submit(&mut self, client: u16, r: &Request, head: u16) -> Result<()> {
        let token = u32::from(client) << 16 | u32::from(head);
        let cfg = self.cfg(token);
        *self.part(token) = Part {
            pending: 0,
            status: status::OK,
        };
        let mut rec = SentCommand {
            token,
            ..SentCommand::default()
        };
        match r.op {
            Operation::Read | Operation::Write => {
                let block = 1u64 << cfg.shift;
                let start = r.sector * SECTOR;
                if start % block != 0 || r.data_len % block != 0 {
                    self.fail(token);
                } else {
                    let b = &mut self.backlog;
                    b.kind = match r.op {
                        Operation::Read => CommandKind::Read,
                        _ if r.durable => CommandKind::WriteFua,
                        _ => CommandKind::Write,
                    };
                    b.segs.clear();
                    b.segs.extend(r.data().iter().map(|s| DmaSegment {
                        // Inside the window: the segment was translated through the
                        // memory table, whose regions all fit it (mapping refuses others).
                        iova: cfg.iova_base + s.gpa,
                        len: s.len,
                    }));
                    b.hosts.clear();
                    b.hosts.extend(r.data().iter().map(|s| s.host));
                    b.seg = 0;
                    b.offset = 0;
                    b.lba = cfg.first_block + (start >> cfg.shift);
                    b.token = token;
                    b.active = true;
                }
            }
            Operation::Flush => {
                rec.kind = CommandKind::Flush;
                self.send(&rec);
            }
            Operation::Discard => {
                rec.kind = CommandKind::Deallocate;
                for (i, &(sector, count)) in r.ranges[..r.range_count].iter().enumerate() {
                    match sectors_to_blocks(sector, count, cfg.shift) {
                        Some((lba, blocks)) => {
                            rec.ranges[i] = (cfg.first_block + lba, blocks as u32)
                        }
                        None => {
                            self.fail(token);
                            rec.nranges = 0;
                            break;
                        }
                    }
                    rec.nranges = i + 1;
                }
                if rec.nranges > 0 {
                    self.send(&rec);
                }
            }
            Operation::WriteZeroes { .. } => {
                let b = &mut self.backlog;
                b.zeroes.clear();
                let mut bad = false;
                for &(sector, count) in r.ranges[..r.range_count].iter().rev() {
                    match sectors_to_blocks(sector, count, cfg.shift) {
                        Some((lba, blocks)) => b.zeroes.push((cfg.first_block + lba, blocks)),
                        None => bad = true,
                    }
                }
                if bad {
                    self.fail(token);
                } else {
                    b.kind = CommandKind::WriteZeroes;
                    b.token = token;
                    b.active = true;
                }
            }
        }
        if self.backlog.active && self.backlog.token == token {
            self.pump();
        } else if self.part(token).pending == 0 {
            // Nothing reached the device (refused before submission): report now.
            let p = self.part(token);
            if p.status == status::OK {
                p.status = status::IOERR;
            }
            self.finish(token);
        }
        Ok(())
    }

    fn flush_submissions(&mut self) {
        self.pump();
        self.qp.ring();
        self.watch();
    }

    /// Reaps the queue pair's completions (of every client) and adds `client`'s finished
    /// requests to `done`.
    fn poll(&mut self, client: u16, done: &mut Vec<(u16, u8)>) -> usize {
        let mut again: Vec<SentCommand> = Vec::new();
        {
            let (parts, records, reaped, bounces, clients) = (
                &mut self.parts,
                &self.records,
                &mut self.reaped,
                &mut self.bounces,
                &self.clients,
            );
            self.qp.poll(usize::from(ENTRIES), |c| {
                let key = c.token as u32;
                let (slot, head) = split_key(key);
                // By reference: a record is 2.7 KB, copied only to send it again.
                let rec = records.get(usize::from(c.cid));
                let current = clients
                    .get(slot)
                    .copied()
                    .flatten()
                    .is_some_and(|cfg| u64::from(cfg.generation) == c.token >> 32);
                if !current {
                    // Its client left (its queue stopped with it still out): nothing waits.
                    if let Some(rec) = rec.filter(|r| r.bounce != NO_BOUNCE) {
                        NvmeEngine::end_bounce(bounces, rec.bounce, false);
                    }
                    return;
                }
                let p = &mut parts[slot][head];
                p.pending = p.pending.saturating_sub(1);
                match rec {
                    // A reset aborted it: send it again (the guest never knows).
                    Some(rec) if c.status == Status::ABORTED_BY_RESET && rec.tries < MAX_TRIES => {
                        again.push(SentCommand {
                            tries: rec.tries + 1,
                            ..*rec
                        });
                        return;
                    }
                    _ => {}
                }
                if let Some(rec) = rec.filter(|r| r.bounce != NO_BOUNCE) {
                    NvmeEngine::end_bounce(bounces, rec.bounce, c.status.is_success());
                }
                if !c.status.is_success() {
                    p.status = status::IOERR;
                }
                if p.pending == 0 && p.status != DONE {
                    reaped[slot].push((head as u16, p.status));
                    p.status = DONE;
                }
            });
        }
        for rec in again {
            match self.send(&rec) {
                Send::Sent => {}
                _ => {
                    // No slot right after a reset, or refused: the request fails rather than
                    // hangs.
                    NvmeEngine::end_bounce(&mut self.bounces, rec.bounce, false);
                    let p = self.part(rec.token);
                    p.status = status::IOERR;
                    if p.pending == 0 {
                        self.finish(rec.token);
                    }
                }
            }
        }
        // A request whose backlog is still being sent is not done even at zero pending.
        let backlog = self.backlog.active.then_some(self.backlog.token);
        let slot = usize::from(client);
        let mut reported = 0;
        let mut reaped = std::mem::take(&mut self.reaped[slot]);
        for (head, st) in reaped.drain(..) {
            let key = u32::from(client) << 16 | u32::from(head);
            if Some(key) == backlog {
                // Not yet: reported when the backlog finishes (pump).
                self.parts[slot][usize::from(head)].status = st;
                continue;
            }
            done.push((head, st));
            reported += 1;
        }
        self.reaped[slot] = reaped;
        reported
    }
}

/// One virtqueue's handle on its poller's engine for the controller.
pub struct NvmeClient {
    engine: Arc<PollerEngine>,
    cfg: ClientCfg,
    /// Its slot in the engine, once attached (at its first call, on the poller).
    slot: Option<u16>,
    /// Requests taken and not yet reported: kept here, so that the poller's look at an idle
    /// queue does not touch the engine.
    in_flight: usize,
}

impl NvmeClient {
    /// The engine, and this client's slot in it (attached now if it is not yet).
    ///
    /// Every call comes from the poller that runs this client's virtqueue: a client is
    /// made by `open_queue` for the poller `QueueSetup::poller` names, moves to that poller
    /// inside its queue handler before any call, and is dropped there when the queue stops.
    /// The engine is shared only by the clients of that same poller (the map is keyed by
    /// poller), and one poller thread runs one call at a time, none of which calls out to
    /// another client: so at most one reference to the engine is ever live.
    fn engine(&mut self) -> (&mut NvmeEngine, u16) {
        #[cfg(debug_assertions)]
        {
            let here = std::thread::current().id();
            let poller = *self.engine.poller.get_or_init(|| here);
            debug_assert_eq!(poller, here, "an NVMe engine used off its poller");
        }
        // SAFETY: see above: this is the engine's poller thread and no other reference to the
        // engine is live.
        let engine = unsafe { &mut *self.engine.engine.get() };
        let slot = *self.slot.get_or_insert_with(|| engine.add_client(self.cfg));
        (engine, slot)
    }

    /// The engine to look at, without attaching (same thread rule as [`Self::engine`]).
    fn engine_ref(&self) -> &NvmeEngine {
        // SAFETY: as in `engine`: the poller's thread, no mutable reference live (every
        // `&mut` ends with the call that took it).
        unsafe { &*self.engine.engine.get() }
    }
}

impl Drop for NvmeClient {
    fn drop(&mut self) {
        // Never attached: the engine never knew it (and this may not be the poller).
        if self.slot.is_some() {
            let (engine, slot) = self.engine();
            engine.remove_client(slot);
        }
    }
}

impl BackendQueue for NvmeClient {
    fn can_submit(&self) -> bool {
        self.engine_ref().can_submit()
    }

    fn submit(&mut self, request: &Request, token: u16) -> Result<()> {
        let (engine, slot) = self.engine();
        engine.submit(slot, request, token)?;
        self.in_flight += 1;
        Ok(())
    }

    fn flush_submissions(&mut self) {
        self.engine().0.flush_submissions();
    }

    fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize {
        let (engine, slot) = self.engine();
        let reported = engine.poll(slot, done);
        self.in_flight -= reported.min(self.in_flight);
        reported
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_taking_over_maps_beside_the_lender_until_it_lets_go() {
        // The lender's backends hold windows 0 and 2.
        let windows = Windows::default();
        windows.set_lender(Some(&[0, 2 * WINDOW_SIZE, 99 * WINDOW_SIZE]));
        assert!(
            windows.unused(),
            "the lender's windows are not this process's"
        );
        let a = windows.take().unwrap();
        let b = windows.take().unwrap();
        assert_eq!((a.base(), b.base()), (WINDOW_SIZE, 3 * WINDOW_SIZE));
        // What a reclaim after a failed take-over removes: everything but the holder's own.
        assert_eq!(
            windows.ranges(WindowOwner::Used, false),
            vec![(WINDOW_SIZE, WINDOW_SIZE), (3 * WINDOW_SIZE, WINDOW_SIZE)]
        );
        let foreign = windows.ranges(WindowOwner::Used, true);
        assert_eq!(foreign.len(), WINDOWS - 2);
        assert!(
            foreign.contains(&(0, WINDOW_SIZE))
                && foreign.contains(&(2 * WINDOW_SIZE, WINDOW_SIZE))
        );
        // The lender let go: its windows serve new backends again.
        windows.set_lender(None);
        assert_eq!(windows.take().unwrap().base(), 0);
        drop((a, b));
    }

    #[test]
    fn each_backend_gets_its_own_window_and_addresses_cannot_leave_it() {
        let windows = Windows::default();
        let a = windows.take().unwrap();
        let b = windows.take().unwrap();
        assert_eq!(
            (a.base(), b.base()),
            (0, WINDOW_SIZE),
            "the first keeps IOVA = GPA"
        );
        // The same guest-physical address of two VMs: two IOVAs, each in its own window.
        let (ia, ib) = (
            a.iova(0x1000_0000, 4096).unwrap(),
            b.iova(0x1000_0000, 4096).unwrap(),
        );
        assert_ne!(ia, ib);
        assert!(ia < WINDOW_SIZE && (WINDOW_SIZE..2 * WINDOW_SIZE).contains(&ib));
        // Nothing reaches past its window: not the last byte + 1, not an overflow.
        assert_eq!(a.iova(WINDOW_SIZE - 4096, 4096), Some(WINDOW_SIZE - 4096));
        assert_eq!(a.iova(WINDOW_SIZE - 4096, 4097), None);
        assert_eq!(b.iova(WINDOW_SIZE, 1), None);
        assert_eq!(b.iova(u64::MAX - 10, 100), None);
        // Windows stay below the driver's own IOVAs (256 GiB up) and are reused when freed.
        let rest: Vec<IovaWindow> = (2..WINDOWS).map(|_| windows.take().unwrap()).collect();
        assert!(rest.iter().all(|w| w.base() + WINDOW_SIZE <= 256 << 30));
        assert!(windows.take().is_none(), "{WINDOWS} windows at most");
        drop(b);
        assert_eq!(windows.take().unwrap().base(), WINDOW_SIZE);
        drop(rest);
        assert!(!windows.unused());
        drop(a);
    }
    use super::sectors_to_blocks;

    #[test]
    fn ranges_convert_only_on_block_boundaries() {
        // 512-byte blocks: every sector range converts as is.
        assert_eq!(sectors_to_blocks(3, 5, 9), Some((3, 5)));
        // 4 KiB blocks: 8 sectors per block.
        assert_eq!(sectors_to_blocks(16, 24, 12), Some((2, 3)));
        assert_eq!(sectors_to_blocks(17, 8, 12), None, "start inside a block");
        assert_eq!(sectors_to_blocks(16, 12, 12), None, "end inside a block");
        assert_eq!(sectors_to_blocks(u64::MAX, 8, 12), None, "overflow");
    }
}
