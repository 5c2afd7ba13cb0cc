//! The virtio-blk device type: its feature bits and config space from the backend, and per
//! virtqueue a [`BlkQueue`] that parses each walked chain into a request, hands it to the
//! backend queue, and writes the status byte when the backend reports the result.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use vfblk_vhost::chain::{ChainCursor, ChainSource};
use vfblk_vhost::device::{Device, Finished, QueueSetup, RequestHandler, Taken, Wakeup};
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::memory::GuestMemory;
use vfblk_vhost::packed::VIRTIO_F_RING_PACKED;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};

use crate::backend::{Backend, BackendQueue, LiveCapacity, Queue, Submitted};
use crate::image_lock::ImageInUse;
use crate::limits::{Limiter, LiveLimits, RateLimits};
use crate::request::{self, Limits, Operation, Request, Verdict, MAX_DISCARD_SEGMENTS};
use crate::stats::{DeviceStats, IoKind, QueueStats};
use crate::virtio_blk::{status, Config, ID_BYTES};

/// Data buffers per request we accept (config seg_max).
pub const SEG_MAX: u32 = 126;
/// Most sectors in one discard or write-zeroes range.
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Bytes one data buffer may hold (config size_max).
pub const SIZE_MAX: u32 = 4 << 20;

/// A virtio-blk device over one backend.
pub struct BlkDevice {
    backend: Arc<dyn Backend>,
    num_queues: u16,
    serial: [u8; ID_BYTES],
    /// The config space's writeback field: the driver may switch a device with a volatile
    /// cache to writethrough (CONFIG_WCE), and every queue follows at its next write.
    writeback: Arc<AtomicBool>,
    /// What may change while queues run: read-only, and the capacity a resize grows.
    shape: Arc<LiveShape>,
    rate_limits: Arc<LiveLimits>,
    stats: Arc<DeviceStats>,
    /// Unique in the process: names the device among the users of its backend's image
    /// lock.
    id: u64,
}

/// The device's settings that change under running queues: each queue compares
/// `generation` with the one it follows at every request it takes (one load), and on a
/// change takes the new read-only setting and capacity before it parses the request.
pub struct LiveShape {
    generation: AtomicU64,
    read_only: AtomicBool,
    capacity: Option<LiveCapacity>,
    /// What the backend offers, for the limits a read-only setting takes away.
    discard: bool,
    write_zeroes: bool,
}

impl LiveShape {
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    #[inline]
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl BlkDevice {
    /// A device with `num_queues` queues whose GET_ID answers `serial` (cut to 20 bytes).
    pub fn new(backend: Arc<dyn Backend>, num_queues: u16, serial: &str) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        let writeback = Arc::new(AtomicBool::new(backend.info().flush));
        let shape = Arc::new(LiveShape {
            generation: AtomicU64::new(0),
            read_only: AtomicBool::new(backend.info().read_only),
            capacity: backend.live_capacity(),
            discard: backend.info().discard,
            write_zeroes: backend.info().write_zeroes,
        });
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            backend,
            num_queues,
            serial: id,
            writeback,
            shape,
            rate_limits: Arc::new(LiveLimits::default()),
            stats: Arc::new(DeviceStats::new(num_queues)),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// The config space's writeback field as the driver left it.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Restores the writeback field as a predecessor process left it (a hand-over).
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// The same device offered read-only (VIRTIO_BLK_F_RO; writes, discards and write
    /// zeroes fail).
    pub fn read_only(self) -> Self {
        self.shape.read_only.store(true, Ordering::Relaxed);
        self
    }

    /// Whether the device is read-only now.
    pub fn is_read_only(&self) -> bool {
        self.shape.read_only.load(Ordering::Relaxed)
    }

    /// Makes the running device read-only or writable. Every queue follows at the next
    /// request it takes: from then on writes, discards and write zeroes fail with IOERR
    /// (on) or are served again (off). A driver already running is not told: virtio-blk
    /// says read-only only by VIRTIO_BLK_F_RO, negotiated once when the driver starts, and
    /// the config space has no field for it; the bit is offered to frontends from the next
    /// connection on.
    ///
    /// Refused (nothing changed) when queues run and the image lock cannot follow: another
    /// user of the image does not let it be written.
    pub fn set_read_only(&self, on: bool) -> crate::Result<()> {
        if !on && self.backend.info().read_only {
            return Err(crate::Error::BadArgument(format!(
                "{} is opened read-only: its controllers cannot be made writable (recreate the backend without readonly)",
                self.backend.info().description
            )));
        }
        let apply = || {
            self.shape.read_only.store(on, Ordering::Relaxed);
            self.shape.changed();
        };
        match self.backend.image_lock() {
            Some(image) => image.set_writable(self.id, !on, apply),
            None => {
                apply();
                Ok(())
            }
        }
    }

    /// Why the device's queues would be refused if they started now: another user holds
    /// its image (QEMU's image lock); `None` when nothing stops them.
    pub fn image_conflict(&self) -> Option<crate::Error> {
        self.backend
            .image_lock()
            .and_then(|image| image.conflict(!self.is_read_only()))
    }

    /// The backend grew: every queue takes the new capacity at the next request it takes
    /// (before the frontend is told, so a driver that sees the new size finds it served).
    pub fn capacity_changed(&self) {
        self.shape.changed();
    }

    /// The same device held to `limits` (each queue to its equal share).
    pub fn rate_limited(self, limits: RateLimits) -> Self {
        self.rate_limits.set(limits);
        self
    }

    /// Changes the limits of the running device: each queue takes its new share at its next
    /// round, with no reconnect.
    pub fn set_rate_limits(&self, limits: RateLimits) {
        self.rate_limits.set(limits);
    }

    /// The limits in effect.
    pub fn rate_limits(&self) -> RateLimits {
        self.rate_limits.get()
    }

    /// Its I/O counters.
    pub fn stats(&self) -> &Arc<DeviceStats> {
        &self.stats
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The config space as a struct.
    pub fn config(&self) -> Config {
        let info = self.backend.info();
        let read_only = self.is_read_only();
        let per_physical = (info.physical_block_size / info.block_size.max(1)).max(1);
        let mut c = Config {
            capacity: self.backend.capacity_sectors(),
            size_max: SIZE_MAX,
            seg_max: SEG_MAX,
            blk_size: info.block_size,
            physical_block_exp: per_physical.trailing_zeros() as u8,
            min_io_size: 1,
            opt_io_size: info.optimal_io_size / info.block_size.max(1),
            writeback: u8::from(self.writeback.load(Ordering::Relaxed)),
            num_queues: self.num_queues,
            ..Config::default()
        };
        if info.discard && !read_only {
            c.max_discard_sectors = MAX_RANGE_SECTORS;
            c.max_discard_seg = MAX_DISCARD_SEGMENTS as u32;
            c.discard_sector_alignment = 1;
        }
        if info.write_zeroes && !read_only {
            c.max_write_zeroes_sectors = MAX_RANGE_SECTORS;
            c.max_write_zeroes_seg = MAX_DISCARD_SEGMENTS as u32;
            c.write_zeroes_may_unmap = 1;
        }
        c
    }

    fn limits(&self) -> Limits {
        let info = self.backend.info();
        let read_only = self.is_read_only();
        Limits {
            capacity: self.backend.capacity_sectors(),
            flush: info.flush,
            discard: info.discard && !read_only,
            write_zeroes: info.write_zeroes && !read_only,
            max_range_sectors: MAX_RANGE_SECTORS,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            read_only,
        }
    }
}

impl BlkDevice {
    /// The virtio-blk queue [`Device::open_queue`] hands the poller.
    pub fn open_blk_queue(&self, setup: &QueueSetup) -> crate::Result<BlkQueue> {
        // The shape first: a backend queue opened after it is at least as large.
        let shape_seen = self.shape.generation();
        let limits = self.limits();
        // The image lock before the backend queue: a refused start opens nothing.
        let image = match self.backend.image_lock() {
            Some(image) => Some(image.enter(self.id, || !self.is_read_only())?),
            None => None,
        };
        let backend = self.backend.open_queue(setup.poller)?;
        let mut queue = BlkQueue::new(backend, limits, self.serial, setup);
        queue.image = image;
        queue.shape = Some((self.shape.clone(), shape_seen));
        queue.stats = self.stats.queue(setup.index).cloned();
        queue.limits_seen = self.rate_limits.generation();
        queue.limiter = Limiter::for_queue(&self.rate_limits.get(), self.num_queues);
        queue.live_limits = Some((self.rate_limits.clone(), self.num_queues));
        if self.backend.info().flush {
            queue.cache = CacheMode::negotiated(setup.features, self.writeback.clone());
        }
        Ok(queue)
    }
}

impl Device for BlkDevice {
    fn features(&self) -> u64 {
        let info = self.backend.info();
        let mut f = (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ)
            // The driver chooses (QEMU's `packed=on`, Linux since 5.0); one that does not
            // ack it gets split rings. The plumbing takes it out of the offer without
            // inflight tracking (a packed ring cannot be resumed from a base alone).
            | (1 << VIRTIO_F_RING_PACKED);
        if info.flush {
            // A volatile cache: flushes mean something, and the driver may choose
            // writethrough instead.
            f |= (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_CONFIG_WCE);
        }
        if self.is_read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            if info.discard {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if info.write_zeroes {
                f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        f
    }

    /// What a frontend may have acked under either read-only setting: a connection made
    /// before a change goes on (and is handed over, or resumed after a crash) with what it
    /// negotiated; the queues enforce the setting of now.
    fn accepted_features(&self) -> u64 {
        let info = self.backend.info();
        let mut f = self.features() | (1 << VIRTIO_BLK_F_RO);
        if info.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if info.write_zeroes {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn config_space(&self) -> Vec<u8> {
        self.config().to_bytes().to_vec()
    }

    fn set_config(&self, offset: u32, data: &[u8]) -> vfblk_vhost::Result<()> {
        // Only the writeback field is writable, and only on a device with a volatile cache.
        let writeback = std::mem::offset_of!(Config, writeback) as u32;
        match data {
            [mode @ (0 | 1)] if offset == writeback && self.backend.info().flush => {
                self.writeback.store(*mode == 1, Ordering::Relaxed);
                tracing::info!(
                    "the driver chose {} mode",
                    if *mode == 1 {
                        "writeback"
                    } else {
                        "writethrough"
                    }
                );
                Ok(())
            }
            _ => Err(vfblk_vhost::Error::ReadOnlyConfig { offset }),
        }
    }

    fn open_queue(
        &self,
        setup: &QueueSetup,
    ) -> vfblk_vhost::Result<Box<dyn vfblk_vhost::device::QueueHandler>> {
        Ok(Box::new(self.open_blk_queue(setup)?))
    }

    fn guest_memory_changed(&self, memory: Option<&GuestMemory>) -> vfblk_vhost::Result<()> {
        Ok(self.backend.guest_memory_changed(memory)?)
    }

    fn requests_recovered(&self, _index: u16, count: usize) {
        self.stats.recovered(count as u64);
    }

    fn sync_for_migration(&self) -> vfblk_vhost::Result<()> {
        self.backend
            .sync()
            .map_err(|e| vfblk_vhost::Error::Device(Box::new(e)))
    }
}

#[derive(Clone, Copy)]
struct Task {
    status: *mut u8,
    written: u32,
    kind: IoKind,
    bytes: u32,
    started: Option<u64>,
}

impl Task {
    fn answer(status: *mut u8, written: u32) -> Self {
        Self {
            status,
            written,
            kind: IoKind::Other,
            bytes: 0,
            started: None,
        }
    }
}

/// Writes a status byte the chain walk translated inside guest memory.
fn write_status(task: &Task, st: u8) {
    if !task.status.is_null() {
        // SAFETY: the status byte was translated inside guest memory when the chain was
        // walked; the guest owns the buffer until the head is published, which comes after.
        unsafe { task.status.write_volatile(st) };
    }
}

/// How a queue treats the backend's volatile cache.
#[derive(Debug, Clone)]
pub enum CacheMode {
    /// No volatile cache, or writeback: a write completes when the backend has it.
    Writeback,
    /// Every write is on stable storage before it completes.
    Writethrough,
    /// The driver negotiated CONFIG_WCE and chooses through the config space.
    DriverChoice(Arc<AtomicBool>),
}

impl CacheMode {
    /// The mode a driver's negotiated features ask for (virtio 1.2 §5.2.5: without FLUSH the
    /// device must be writethrough; with CONFIG_WCE the writeback field decides).
    pub fn negotiated(features: u64, writeback: Arc<AtomicBool>) -> Self {
        if features & (1 << VIRTIO_BLK_F_FLUSH) == 0 {
            CacheMode::Writethrough
        } else if features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0 {
            CacheMode::DriverChoice(writeback)
        } else {
            CacheMode::Writeback
        }
    }

    fn durable_writes(&self) -> bool {
        match self {
            CacheMode::Writeback => false,
            CacheMode::Writethrough => true,
            CacheMode::DriverChoice(writeback) => !writeback.load(Ordering::Relaxed),
        }
    }
}

/// One virtqueue of the virtio-blk device.
pub struct BlkQueue {
    /// What the backend's volatile cache means for writes.
    pub cache: CacheMode,
    index: u16,
    backend: Queue,
    limits: Limits,
    id: [u8; ID_BYTES],
    request: Box<Request>,
    /// Per head: where its status byte goes and how many bytes its completion writes.
    tasks: Vec<Task>,
    /// What the backend reported in this poll (room for every head).
    backend_done: Vec<(u16, u8)>,
    errors: Arc<GuestErrors>,
    /// The device's counters (None in unit tests of the queue alone).
    stats: Option<Arc<QueueStats>>,
    /// This queue's share of the device's rate limits.
    limiter: Option<Limiter>,
    /// The device's limits as they change while running, and its queue count (for the
    /// share); the generation `limiter` was built at.
    live_limits: Option<(Arc<LiveLimits>, u16)>,
    limits_seen: u64,
    /// Requests the backend finished at submission since the last poll: counted, their
    /// latency (all started with the round) added at the poll, with one clock read.
    finished_at_take: u64,
    /// The device's changing settings and the generation of them `limits` follows.
    shape: Option<(Arc<LiveShape>, u64)>,
    /// This queue's share of the image lock, let go of when the queue stops
    /// ([`RequestHandler::stopped`]).
    image: Option<ImageInUse>,
}

// SAFETY: the status pointers point into guest memory that the poller keeps mapped while
// the queue runs; one poller thread owns the queue.
unsafe impl Send for BlkQueue {}

impl BlkQueue {
    /// A queue over a backend queue.
    pub fn new(backend: Queue, limits: Limits, id: [u8; ID_BYTES], setup: &QueueSetup) -> Self {
        Self {
            cache: CacheMode::Writeback,
            index: setup.index,
            backend,
            limits,
            id,
            request: Box::default(),
            tasks: vec![Task::answer(std::ptr::null_mut(), 0); usize::from(setup.size)],
            backend_done: Vec::with_capacity(usize::from(setup.size)),
            errors: setup.errors.clone(),
            stats: None,
            limiter: None,
            live_limits: None,
            limits_seen: 0,
            finished_at_take: 0,
            shape: None,
            image: None,
        }
    }

    /// The device's read-only setting or capacity changed: the limits follow, and a backend
    /// that grew is told before the first request that may reach the new sectors.
    #[cold]
    #[inline(never)]
    fn follow_shape(&mut self) {
        let Some((shape, seen)) = &mut self.shape else {
            return;
        };
        *seen = shape.generation();
        let read_only = shape.read_only.load(Ordering::Relaxed);
        if let Some(capacity) = &shape.capacity {
            let sectors = capacity.sectors();
            if sectors != self.limits.capacity {
                self.backend.capacity_changed();
                self.limits.capacity = sectors;
            }
        }
        self.limits.read_only = read_only;
        self.limits.discard = shape.discard && !read_only;
        self.limits.write_zeroes = shape.write_zeroes && !read_only;
    }

    fn queue_stats(&self) -> Option<&QueueStats> {
        self.stats.as_deref()
    }
}

fn kind_of(op: Operation) -> IoKind {
    match op {
        Operation::Read => IoKind::Read,
        Operation::Write => IoKind::Write,
        _ => IoKind::Other,
    }
}

impl RequestHandler for BlkQueue {
    #[inline]
    fn can_take(&self) -> bool {
        self.backend.can_submit() && self.limiter.as_ref().is_none_or(Limiter::ready)
    }

    #[inline]
    fn take<S: ChainSource>(&mut self, chain: ChainCursor<'_, S>) -> Taken {
        if let Some((shape, seen)) = &self.shape {
            if shape.generation() != *seen {
                self.follow_shape();
            }
        }
        let head = chain.head();
        // Walked into the request's own buffers: where the parser and the backend read them.
        let count = match self.request.walk(chain) {
            Ok(count) => count,
            Err(e) => return Taken::Unwalkable(e),
        };
        let verdict = request::parse(count, &self.limits, &self.id, &mut self.request);
        if let Some(limiter) = &self.limiter {
            let bytes = match verdict {
                Verdict::Submit => self.request.data_len,
                _ => 0,
            };
            limiter.charge(bytes);
        }
        match verdict {
            Verdict::Submit => {
                let written = match self.request.op {
                    request::Operation::Read => self.request.data_len as u32 + 1,
                    _ => 1,
                };
                let kind = kind_of(self.request.op);
                let bytes = self.request.data_len as u32;
                // Only a write asks (the cache mode's atomic is not read for reads).
                self.request.durable = kind == IoKind::Write && self.cache.durable_writes();
                match self.backend.start(&self.request, head) {
                    Ok(Submitted::Done(st)) => {
                        write_status(&Task::answer(self.request.status, written), st);
                        if let Some(stats) = self.queue_stats() {
                            let ok = st == status::OK;
                            stats.count(kind, if ok { u64::from(bytes) } else { 0 }, ok);
                            self.finished_at_take += 1;
                        }
                        Taken::Done(written)
                    }
                    Ok(Submitted::Pending) => {
                        self.tasks[usize::from(head)] = Task {
                            status: self.request.status,
                            written,
                            kind,
                            bytes,
                            started: self.stats.as_ref().map(|_| vfblk_vhost::poller::loop_now()),
                        };
                        if let Some(stats) = self.queue_stats() {
                            stats.submitted();
                        }
                        Taken::Pending
                    }
                    Err(e) => {
                        self.errors.report(
                            self.index,
                            format_args!("head {head}: {}", vfblk_vhost::error_chain(&e)),
                        );
                        write_status(&Task::answer(self.request.status, 1), status::IOERR);
                        if let Some(stats) = self.queue_stats() {
                            stats.record(kind, 0, false, 0);
                        }
                        Taken::Done(1)
                    }
                }
            }
            Verdict::Complete {
                status: st,
                written,
            } => {
                if st != status::OK {
                    self.errors.report(
                        self.index,
                        format_args!("head {head}: request refused with status {st}"),
                    );
                }
                write_status(&Task::answer(self.request.status, written), st);
                if let Some(stats) = self.queue_stats() {
                    stats.record(IoKind::Other, 0, st == status::OK, 0);
                }
                Taken::Done(written)
            }
            Verdict::Drop => Taken::Unanswerable,
        }
    }

    fn refuse(
        &mut self,
        _head: u16,
        last_byte: Option<vfblk_vhost::chain::Segment>,
    ) -> Option<u32> {
        // A virtio-blk status byte is the last byte of a device-writable last buffer.
        let last = last_byte.filter(|s| s.write)?;
        write_status(&Task::answer(last.host, 1), status::IOERR);
        if let Some(stats) = self.queue_stats() {
            stats.record(IoKind::Other, 0, false, 0);
        }
        Some(1)
    }

    fn flush(&mut self) {
        self.backend.flush_submissions();
    }

    fn poll(&mut self, finished: &mut Finished) -> usize {
        if let Some((live, queues)) = &self.live_limits {
            let generation = live.generation();
            if generation != self.limits_seen {
                self.limits_seen = generation;
                self.limiter = Limiter::for_queue(&live.get(), *queues);
            }
        }
        if self.finished_at_take > 0 {
            if let Some(stats) = self.queue_stats() {
                let took = vfblk_vhost::poller::monotonic_ns()
                    .saturating_sub(vfblk_vhost::poller::loop_now());
                stats.latencies(took, self.finished_at_take);
            }
            self.finished_at_take = 0;
        }
        self.backend_done.clear();
        let reported = self.backend.poll(&mut self.backend_done);
        let stats = self.stats.as_deref();
        let mut now = None;
        for &(head, st) in &self.backend_done {
            let Some(task) = self.tasks.get(usize::from(head)) else {
                continue;
            };
            write_status(task, st);
            if let Some(stats) = stats {
                stats.finished();
            }
            if let (Some(stats), Some(started)) = (stats, task.started) {
                // One clock read per batch of completions.
                let now = *now.get_or_insert_with(vfblk_vhost::poller::monotonic_ns);
                let ok = st == status::OK;
                let bytes = if ok { u64::from(task.bytes) } else { 0 };
                stats.record(task.kind, bytes, ok, now.saturating_sub(started));
            }
            finished.push(head, task.written);
        }
        reported
    }

    fn in_flight(&self) -> usize {
        self.backend.in_flight()
    }

    fn can_wake(&self) -> bool {
        self.backend.can_wake()
    }

    fn arm_wakeup(&mut self) -> Wakeup {
        self.backend.arm_wakeup()
    }

    fn disarm_wakeup(&mut self, readable: bool) {
        self.backend.disarm_wakeup(readable)
    }

    /// The image lock is let go of here, not when the queue is dropped: a hand-over's
    /// successor starts its queues as soon as this one's stop is reported.
    fn stopped(&mut self) {
        self.image = None;
    }
}

#[cfg(test)]
mod tests {
    //! The device in-process: chains a mock guest made, parsed and run by each backend, with
    //! status bytes and used lengths checked as a guest would see them.
    use super::*;
    use crate::backend::{FileBackend, MemBackend};
    use crate::virtio_blk::{req, Range, RequestHeader, WRITE_ZEROES_FLAG_UNMAP};
    use std::time::{Duration, Instant};
    use vfblk_vhost::mock::MockGuest;

    const DISK: u64 = 4 << 20;

    struct Rig {
        guest: MockGuest,
        queue: BlkQueue,
        errors: Arc<GuestErrors>,
    }

    impl Rig {
        fn new(backend: Arc<dyn Backend>) -> Self {
            let device = BlkDevice::new(backend, 1, "rig");
            let errors = Arc::new(GuestErrors::new("rig"));
            let setup = QueueSetup {
                index: 0,
                size: 256,
                features: device.features(),
                errors: errors.clone(),
                poller: 0,
            };
            let backend_queue = device.backend().open_queue(0).unwrap();
            Self {
                guest: MockGuest::new(4 << 20, 256),
                queue: BlkQueue::new(backend_queue, device.limits(), device.serial, &setup),
                errors,
            }
        }

        /// A rig whose queue the device opened (it follows the device's changes).
        fn for_device(device: &BlkDevice) -> Self {
            let errors = Arc::new(GuestErrors::new("rig"));
            let setup = QueueSetup {
                index: 0,
                size: 256,
                features: device.features(),
                errors: errors.clone(),
                poller: 0,
            };
            Self {
                guest: MockGuest::new(4 << 20, 256),
                queue: device.open_blk_queue(&setup).unwrap(),
                errors,
            }
        }

        /// Runs one request to completion: (status byte, used length).
        fn run(&mut self, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> (u8, u32) {
            let hdr = self.guest.alloc(16);
            let h = RequestHeader {
                kind,
                ioprio: 0,
                sector,
            };
            self.guest.write(hdr, &h.to_bytes());
            let status = self.guest.alloc(1);
            self.guest.write(status, &[0xff]);
            let mut chain = vec![(hdr, 16, false)];
            chain.extend(data);
            chain.push((status, 1, true));
            self.guest.add_chain(&chain);
            let (vq, head) = self.guest.newest();
            let mem = self.guest.memory();
            let written = match self.queue.take(ChainCursor::new(&vq, &mem, head)) {
                Taken::Done(n) => n,
                Taken::Unwalkable(e) => panic!("a well-formed chain walks: {e}"),
                Taken::Unanswerable => panic!("a well-formed chain has a status byte"),
                Taken::Pending => {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    let mut got = None;
                    let mut finished = Finished::default();
                    while got.is_none() {
                        self.queue.flush();
                        self.queue.poll(&mut finished);
                        for (h, n) in finished.iter() {
                            assert_eq!(h, head, "the head we submitted");
                            got = Some(n);
                        }
                        finished.clear();
                        assert!(Instant::now() < deadline, "the backend completed in 5 s");
                    }
                    got.unwrap()
                }
            };
            (self.guest.read(status, 1)[0], written)
        }

        fn buffer(&mut self, bytes: &[u8]) -> u64 {
            let gpa = self.guest.alloc(bytes.len() as u64);
            self.guest.write(gpa, bytes);
            gpa
        }
    }

    fn exercise(backend: Arc<dyn Backend>) {
        let mut rig = Rig::new(backend);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        let src = rig.buffer(&pattern);
        assert_eq!(
            rig.run(req::OUT, 64, Some((src, 8192, false))),
            (status::OK, 1)
        );
        assert_eq!(rig.run(req::FLUSH, 0, None), (status::OK, 1));
        let dst = rig.guest.alloc(8192);
        assert_eq!(
            rig.run(req::IN, 64, Some((dst, 8192, true))),
            (status::OK, 8193),
            "a read reports data + status written"
        );
        assert_eq!(rig.guest.read(dst, 8192), pattern);
        // Write zeroes over the first 4 sectors, discard the next 4: both read back as zeros.
        let wz = Range {
            sector: 64,
            num_sectors: 4,
            flags: 0,
        };
        let r = rig.buffer(&wz.to_bytes());
        assert_eq!(
            rig.run(req::WRITE_ZEROES, 0, Some((r, 16, false))).0,
            status::OK
        );
        let dz = Range {
            sector: 68,
            num_sectors: 4,
            flags: 0,
        };
        let r = rig.buffer(&dz.to_bytes());
        assert_eq!(rig.run(req::DISCARD, 0, Some((r, 16, false))).0, status::OK);
        let unmap = Range {
            sector: 72,
            num_sectors: 8,
            flags: WRITE_ZEROES_FLAG_UNMAP,
        };
        let r = rig.buffer(&unmap.to_bytes());
        assert_eq!(
            rig.run(req::WRITE_ZEROES, 0, Some((r, 16, false))).0,
            status::OK
        );
        assert_eq!(rig.run(req::IN, 64, Some((dst, 8192, true))).0, status::OK);
        assert_eq!(rig.guest.read(dst, 4096), vec![0; 4096]);
        assert_eq!(rig.guest.read(dst + 8 * 512, 4096), vec![0; 4096]);
        // GET_ID reports the bytes it wrote.
        let id = rig.guest.alloc(20);
        assert_eq!(
            rig.run(req::GET_ID, 0, Some((id, 20, true))),
            (status::OK, 21)
        );
        assert_eq!(&rig.guest.read(id, 3), b"rig");
        // Refused requests: IOERR or UNSUPP in the status byte, reported to the guest-error log.
        assert_eq!(
            rig.run(req::IN, DISK / 512, Some((dst, 512, true))),
            (status::IOERR, 1)
        );
        assert_eq!(rig.run(77, 0, None), (status::UNSUPP, 1));
        assert_eq!(rig.errors.total(), 2);
        assert_eq!(rig.queue.in_flight(), 0);
    }

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("vfblk-device-test-{name}-{}", std::process::id()))
    }

    #[test]
    fn the_mem_backend_serves_every_request_type() {
        let path = temp_path("mem");
        let _ = std::fs::remove_file(&path);
        exercise(Arc::new(MemBackend::open(&path, DISK).unwrap()));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_file_backend_serves_every_request_type() {
        let path = temp_path("file");
        let _ = std::fs::remove_file(&path);
        exercise(Arc::new(FileBackend::open(&path, Some(DISK)).unwrap()));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn the_file_backend_writes_zeroes_where_fallocate_cannot() {
        // tmpfs refuses FALLOC_FL_ZERO_RANGE: write zeroes falls back to writing zeros.
        let path = std::path::PathBuf::from(format!(
            "/dev/shm/vfblk-device-test-tmpfs-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let backend = FileBackend::open(&path, Some(DISK)).unwrap();
        assert!(backend.info().write_zeroes);
        assert!(backend.zero_range(), "nothing tried at open");
        let backend = Arc::new(backend);
        let mut rig = Rig::new(backend.clone());
        // 2 MiB of ones, then write zeroes over 1.5 MiB of it (more than one fallback write).
        let ones = rig.buffer(&vec![1u8; 1 << 20]);
        for mib in 0..2u64 {
            assert_eq!(
                rig.run(req::OUT, mib * 2048, Some((ones, 1 << 20, false)))
                    .0,
                status::OK
            );
        }
        let wz = Range {
            sector: 512,
            num_sectors: 3072,
            flags: 0,
        };
        let r = rig.buffer(&wz.to_bytes());
        assert_eq!(
            rig.run(req::WRITE_ZEROES, 0, Some((r, 16, false))),
            (status::OK, 1)
        );
        assert!(
            !backend.zero_range(),
            "tmpfs refused ZERO_RANGE: the request was redone with zero writes"
        );
        let dst = rig.guest.alloc(4096);
        for (sector, byte) in [(511, 1), (512, 0), (2000, 0), (3583, 0), (3584, 1)] {
            assert_eq!(
                rig.run(req::IN, sector, Some((dst, 512, true))).0,
                status::OK
            );
            assert_eq!(rig.guest.read(dst, 512), vec![byte; 512], "sector {sector}");
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Wraps a backend and remembers whether the last request asked for durability.
    struct Recording {
        inner: Arc<dyn Backend>,
        last_durable: Arc<AtomicBool>,
    }

    struct RecordingQueue {
        inner: crate::backend::Queue,
        last_durable: Arc<AtomicBool>,
    }

    impl Backend for Recording {
        fn info(&self) -> &crate::backend::BackendInfo {
            self.inner.info()
        }
        fn open_queue(&self, poller: u64) -> crate::Result<crate::backend::Queue> {
            Ok(crate::backend::Queue::other(RecordingQueue {
                inner: self.inner.open_queue(poller)?,
                last_durable: self.last_durable.clone(),
            }))
        }
    }

    impl crate::backend::BackendQueue for RecordingQueue {
        fn can_submit(&self) -> bool {
            self.inner.can_submit()
        }
        fn submit(&mut self, request: &Request, token: u16) -> crate::Result<()> {
            self.last_durable.store(request.durable, Ordering::Relaxed);
            self.inner.submit(request, token)
        }
        fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize {
            self.inner.poll(done)
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
    }

    #[test]
    fn writethrough_writes_ask_for_durability_and_the_driver_chooses_with_config_wce() {
        let path = temp_path("wce");
        let _ = std::fs::remove_file(&path);
        let last_durable = Arc::new(AtomicBool::new(false));
        let backend = Arc::new(Recording {
            inner: Arc::new(MemBackend::open(&path, DISK).unwrap()),
            last_durable: last_durable.clone(),
        });
        let device = BlkDevice::new(backend, 1, "wce");
        let writeback_offset = std::mem::offset_of!(Config, writeback) as u32;
        assert_eq!(
            device.config().writeback,
            1,
            "a volatile cache starts in writeback"
        );
        let write_once = |features: u64| {
            let setup = QueueSetup {
                index: 0,
                size: 256,
                features,
                errors: Arc::new(GuestErrors::new("wce")),
                poller: 0,
            };
            let mut q = device.open_blk_queue(&setup).unwrap();
            let mut guest = MockGuest::new(1 << 20, 256);
            let hdr = guest.alloc(16);
            let h = RequestHeader {
                kind: req::OUT,
                ioprio: 0,
                sector: 0,
            };
            guest.write(hdr, &h.to_bytes());
            let (data, st) = (guest.alloc(512), guest.alloc(1));
            guest.add_chain(&[(hdr, 16, false), (data, 512, false), (st, 1, true)]);
            let (vq, head) = guest.newest();
            let mem = guest.memory();
            assert_eq!(q.take(ChainCursor::new(&vq, &mem, head)), Taken::Pending);
            last_durable.load(Ordering::Relaxed)
        };
        let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
        let wce = 1u64 << VIRTIO_BLK_F_CONFIG_WCE;
        assert!(
            write_once(0),
            "without FLUSH the device must be writethrough"
        );
        assert!(!write_once(flush), "FLUSH alone: writeback");
        assert!(
            !write_once(flush | wce),
            "CONFIG_WCE: the writeback field decides"
        );
        device.set_config(writeback_offset, &[0]).unwrap();
        assert_eq!(device.config().writeback, 0);
        assert!(
            write_once(flush | wce),
            "the driver switched to writethrough"
        );
        device.set_config(writeback_offset, &[1]).unwrap();
        assert!(!write_once(flush | wce));
        // Nothing else is writable, and only 0 or 1 there.
        assert!(device.set_config(writeback_offset, &[2]).is_err());
        assert!(device.set_config(0, &[0]).is_err());
        assert!(device.set_config(writeback_offset, &[0, 0]).is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_running_queue_follows_a_grow_and_a_read_only_switch_at_its_next_request() {
        for kind in ["mem", "file"] {
            let path = temp_path(&format!("live-{kind}"));
            let _ = std::fs::remove_file(&path);
            let backend: Arc<dyn Backend> = match kind {
                "mem" => Arc::new(MemBackend::open(&path, DISK).unwrap()),
                _ => Arc::new(FileBackend::open(&path, Some(DISK)).unwrap()),
            };
            let device = BlkDevice::new(backend.clone(), 1, "live");
            let mut rig = Rig::for_device(&device);
            let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
            let src = rig.buffer(&pattern);
            let dst = rig.guest.alloc(4096);
            let beyond = DISK / 512 + 8;
            assert_eq!(
                rig.run(req::OUT, beyond, Some((src, 4096, false))).0,
                status::IOERR,
                "{kind}: beyond the end"
            );
            backend.grow(2 * DISK).unwrap();
            device.capacity_changed();
            assert_eq!({ device.config().capacity }, 2 * DISK / 512);
            assert_eq!(
                rig.run(req::OUT, beyond, Some((src, 4096, false))).0,
                status::OK,
                "{kind}: the grown part is served"
            );
            assert_eq!(
                rig.run(req::IN, beyond, Some((dst, 4096, true))).0,
                status::OK
            );
            assert_eq!(rig.guest.read(dst, 4096), pattern, "{kind}");
            // Read-only while running: writes fail, reads go on; and back.
            device.set_read_only(true).unwrap();
            assert_eq!(
                rig.run(req::OUT, 0, Some((src, 4096, false))).0,
                status::IOERR,
                "{kind}: read-only"
            );
            let r = rig.buffer(
                &Range {
                    sector: 0,
                    num_sectors: 8,
                    flags: 0,
                }
                .to_bytes(),
            );
            assert_ne!(rig.run(req::DISCARD, 0, Some((r, 16, false))).0, status::OK);
            assert_eq!(
                rig.run(req::IN, beyond, Some((dst, 4096, true))).0,
                status::OK
            );
            assert!(device.features() & (1 << VIRTIO_BLK_F_RO) != 0);
            assert_eq!(
                device.accepted_features() & !device.features(),
                (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES),
                "what a connection made while writable negotiated stays acceptable"
            );
            device.set_read_only(false).unwrap();
            assert_eq!(rig.run(req::OUT, 0, Some((src, 4096, false))).0, status::OK);
            assert_eq!(
                device.accepted_features() & !device.features(),
                1 << VIRTIO_BLK_F_RO
            );
            let _ = std::fs::remove_file(&path);
        }
    }

    #[test]
    fn config_space_follows_the_backend() {
        let path = temp_path("config");
        let _ = std::fs::remove_file(&path);
        let device = BlkDevice::new(Arc::new(MemBackend::open(&path, DISK).unwrap()), 4, "x");
        let c = device.config();
        assert_eq!({ c.capacity }, DISK / 512);
        assert_eq!({ c.num_queues }, 4);
        assert_eq!({ c.seg_max }, SEG_MAX);
        assert_eq!({ c.max_discard_seg }, MAX_DISCARD_SEGMENTS as u32);
        let f = device.features();
        assert_eq!({ c.size_max }, SIZE_MAX);
        assert_eq!({ c.writeback }, 1);
        assert_eq!(({ c.physical_block_exp }, { c.min_io_size }), (0, 1));
        for bit in [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_F_RING_PACKED,
        ] {
            assert!(f & (1 << bit) != 0, "feature bit {bit}");
        }
        assert_eq!(device.config_space().len(), 60);
        let _ = std::fs::remove_file(&path);
    }
}
