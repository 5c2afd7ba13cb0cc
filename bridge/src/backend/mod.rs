//! Block backends: what a virtio-blk request is finally done with. Each virtqueue gets its own
//! [`BackendQueue`] (no sharing between poller threads); submission is asynchronous and
//! completion is polled. Requests hand the backend the guest's own buffers (host addresses of
//! guest memory), never a copy, so an NVMe backend can DMA straight into guest RAM.

mod created;
#[cfg(any(test, feature = "test-delay"))]
mod delay;
mod file;
mod mem;
mod null;
mod nvme;
pub mod rbd;

#[cfg(any(test, feature = "test-delay"))]
pub use delay::DelayBackend;
pub use file::FileBackend;
pub use mem::MemBackend;
pub use null::NullBackend;
pub use nvme::{
    IovaWindow, LentWindow, NamespaceRange, NvmeBackend, NvmeControllers, NvmeOptions,
    SharedController, TakenController,
};
pub use rbd::{ClusterOptions, ClusterSettings, RbdBackend, RbdCluster};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::request::Request;
use crate::virtio_blk::SECTOR;
use crate::{Error, Result};
use vfblk_vhost::device::Wakeup;
use vfblk_vhost::memory::GuestMemory;

/// What a backend offers; becomes the device's config space and feature bits.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// Human-readable description.
    pub description: String,
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Physical block size in bytes (what a write should cover not to be read-modified).
    pub physical_block_size: u32,
    /// Optimal request size in bytes (0: no preference).
    pub optimal_io_size: u32,
    /// Flush is meaningful (volatile cache).
    pub flush: bool,
    /// Discard supported.
    pub discard: bool,
    /// Write zeroes supported.
    pub write_zeroes: bool,
    /// Opened for reading only: every controller on it is read-only, and cannot be made
    /// writable.
    pub read_only: bool,
}

impl BackendInfo {
    /// A disk kept in memory (or nowhere): 512-byte blocks, flush, discard and write zeroes.
    pub fn in_memory(description: String, size: u64) -> Self {
        Self {
            description,
            capacity_sectors: size / crate::virtio_blk::SECTOR,
            block_size: 512,
            physical_block_size: 512,
            optimal_io_size: 0,
            flush: true,
            discard: true,
            write_zeroes: true,
            read_only: false,
        }
    }
}

/// A backend's capacity in 512-byte sectors, which a resize grows while queues run. The
/// backend makes the new sectors usable before it stores the new value (Release); whoever
/// loads it (Acquire) may use them.
#[derive(Debug, Clone)]
pub struct LiveCapacity(Arc<AtomicU64>);

impl LiveCapacity {
    /// Starting at `sectors`.
    pub fn new(sectors: u64) -> Self {
        Self(Arc::new(AtomicU64::new(sectors)))
    }

    /// Sectors now.
    pub fn sectors(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// The new sectors are usable: publishes them.
    fn set(&self, sectors: u64) {
        self.0.store(sectors, Ordering::Release);
    }
}

/// Checks a grow of `what` from `sectors` to `bytes`: `Ok(None)` when it is the size it has,
/// `Ok(Some(new sectors))` for a grow, an error for a shrink or a size that is no disk.
pub fn check_grow(what: &str, sectors: u64, bytes: u64) -> Result<Option<u64>> {
    if bytes == 0 || bytes % SECTOR != 0 {
        return Err(Error::BadSize {
            what: what.to_string(),
            bytes,
        });
    }
    let new = bytes / SECTOR;
    if new < sectors {
        return Err(Error::BadArgument(format!(
            "{what}: {bytes} bytes is smaller than its {} bytes; shrinking is refused (the guest may have data there, and a running driver cannot be told to stop using it before the cut)",
            sectors * SECTOR
        )));
    }
    Ok((new > sectors).then_some(new))
}

/// How a backend that finishes every request when it is submitted does one (RAM, null).
pub trait ExecuteNow: Send {
    /// The backend's name in errors.
    const NAME: &'static str;
    /// Does `request` (checked by [`crate::request::parse`]); its virtio status.
    fn execute(&self, request: &Request) -> u8;
    /// The backend grew (see [`BackendQueue::capacity_changed`]).
    fn capacity_changed(&mut self) {}
}

/// The queue of a backend that finishes requests at submission: their completions wait here
/// for the next poll.
pub struct FinishedAtSubmit<X> {
    executor: X,
    /// In submission order; a poll reports them all.
    done: Vec<(u16, u8)>,
}

impl<X: ExecuteNow> FinishedAtSubmit<X> {
    /// Completions held before submissions are refused.
    const DEPTH: usize = 1024;

    fn new(executor: X) -> Self {
        Self {
            executor,
            done: Vec::with_capacity(Self::DEPTH),
        }
    }
}

impl<X: ExecuteNow> BackendQueue for FinishedAtSubmit<X> {
    fn can_submit(&self) -> bool {
        self.done.len() < Self::DEPTH
    }

    fn submit(&mut self, request: &Request, token: u16) -> Result<()> {
        // Refused before it is done: a request done but not reported would be lost.
        if !self.can_submit() {
            return Err(crate::Error::QueueFull(X::NAME));
        }
        let status = self.executor.execute(request);
        self.done.push((token, status));
        Ok(())
    }

    fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize {
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn capacity_changed(&mut self) {
        self.executor.capacity_changed();
    }
}

/// A backend: a source of per-virtqueue queues.
pub trait Backend: Send + Sync {
    /// What it offers.
    fn info(&self) -> &BackendInfo;
    /// A queue for one virtqueue, used by poller `poller` (a [`vfblk_vhost::poller::Poller`]
    /// id) only: a backend may share resources between the queues of one poller.
    fn open_queue(&self, poller: u64) -> Result<Queue>;

    /// The guest's memory table changed (`None`: the frontend went away). A backend that
    /// DMAs into guest memory maps it here; called while no queue is running.
    fn guest_memory_changed(&self, _memory: Option<&GuestMemory>) -> Result<()> {
        Ok(())
    }
    /// Makes every write completed so far visible to another process or host that opens the
    /// same storage (a migration's destination): called with no queue running. Backends
    /// whose writes reach the storage directly have nothing to do.
    fn sync(&self) -> Result<()> {
        Ok(())
    }

    /// Whether the backend can serve one frontend only: it maps that frontend's guest
    /// memory for its device's DMA ([`Backend::guest_memory_changed`] replaces the mapping),
    /// so a second controller on it would have the first's memory swapped out under it.
    fn serves_one_frontend(&self) -> bool {
        false
    }

    /// The lock QEMU honours on the image a backend serves ([`crate::image_lock`]), held
    /// while queues of controllers on it run; `None` for storage that is not a file of this
    /// host's.
    fn image_lock(&self) -> Option<&Arc<crate::image_lock::BackendImageLock>> {
        None
    }

    /// Capacity in 512-byte sectors now (it changes with [`Backend::grow`]).
    fn capacity_sectors(&self) -> u64 {
        self.live_capacity()
            .map_or(self.info().capacity_sectors, |c| c.sectors())
    }
    /// The capacity as it changes, for backends that can grow (None: fixed).
    fn live_capacity(&self) -> Option<LiveCapacity> {
        None
    }
    /// Grows the disk to `bytes` (a multiple of 512, not below its size; its size again is
    /// no change). Either it is done whole (the new sectors usable, then published through
    /// [`Backend::live_capacity`]) or, on error, nothing changed: the backend and its file
    /// are as they were.
    fn grow(&self, bytes: u64) -> Result<()> {
        let _ = bytes;
        Err(Error::BadArgument(format!(
            "{}: this kind of backend cannot be resized by the target",
            self.info().description
        )))
    }
}

/// One virtqueue's path to the backend.
pub trait BackendQueue: Send {
    /// Whether another request can be submitted now.
    fn can_submit(&self) -> bool;
    /// Starts `request` (checked by [`crate::request::parse`]); `token` comes back at completion.
    /// The request's buffers stay valid until then.
    fn submit(&mut self, request: &Request, token: u16) -> Result<()>;
    /// Pushes out what was submitted since the last call (one system call per batch for
    /// backends that need one).
    fn flush_submissions(&mut self) {}
    /// Adds the requests finished since the last call to `done` as (token, virtio status);
    /// returns how many. The caller gives `done` room for every request that can be out.
    fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize;
    /// Requests submitted and not yet reported.
    fn in_flight(&self) -> usize;
    /// The backend grew: requests up to the new capacity may come from now on (called by
    /// the queue's own thread before the first of them).
    fn capacity_changed(&mut self) {}
    /// [`vfblk_vhost::device::RequestHandler::can_wake`]: whether the queue can wake a
    /// sleeping poller when a request finishes.
    fn can_wake(&self) -> bool {
        false
    }
    /// [`vfblk_vhost::device::RequestHandler::arm_wakeup`].
    fn arm_wakeup(&mut self) -> Wakeup {
        Wakeup::Poll
    }
    /// [`vfblk_vhost::device::RequestHandler::disarm_wakeup`].
    fn disarm_wakeup(&mut self, readable: bool) {
        let _ = readable;
    }
}

/// One virtqueue's backend queue. The backends are a closed set, so the request path reaches
/// each through a match the compiler inlines rather than a dynamic call per request.
pub struct Queue(QueueVariant);

enum QueueVariant {
    Null(FinishedAtSubmit<null::Nothing>),
    Mem(FinishedAtSubmit<mem::MemExecutor>),
    /// Boxed: its io_uring and slots would make every queue as large.
    File(Box<file::FileQueue>),
    Nvme(nvme::NvmeClient),
    /// Boxed: its slots and iovecs are large.
    Rbd(Box<rbd::RbdQueue>),
    #[cfg(any(test, feature = "test-delay"))]
    Delayed(Box<delay::DelayQueue>),
    /// A test's own queue (wrapping one of the above to watch it).
    #[cfg(test)]
    Other(Box<dyn BackendQueue>),
}

/// Runs `$body` with `$q` bound to whichever queue `$queue` is.
macro_rules! on_queue {
    ($queue:expr, $q:ident => $body:expr) => {
        match $queue {
            QueueVariant::Null($q) => $body,
            QueueVariant::Mem($q) => $body,
            QueueVariant::File($q) => $body,
            QueueVariant::Nvme($q) => $body,
            QueueVariant::Rbd($q) => $body,
            #[cfg(any(test, feature = "test-delay"))]
            QueueVariant::Delayed($q) => $body,
            #[cfg(test)]
            QueueVariant::Other($q) => $body,
        }
    };
}

/// What became of a request handed to [`Queue::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Under way: its status comes back through [`BackendQueue::poll`].
    Pending,
    /// Done already, with this virtio status (a backend that finishes at submission).
    Done(u8),
}

impl Queue {
    /// Starts `request` like [`BackendQueue::submit`], except that a backend that finishes
    /// requests at submission (RAM, null) answers at once rather than holding the status
    /// for the next poll: its request then costs no completion record at all.
    #[inline]
    pub fn start(&mut self, request: &Request, token: u16) -> Result<Submitted> {
        match &mut self.0 {
            QueueVariant::Null(q) => Ok(Submitted::Done(q.executor.execute(request))),
            QueueVariant::Mem(q) => Ok(Submitted::Done(q.executor.execute(request))),
            other => on_queue!(other, q => q.submit(request, token)).map(|()| Submitted::Pending),
        }
    }
}

impl From<FinishedAtSubmit<null::Nothing>> for Queue {
    fn from(q: FinishedAtSubmit<null::Nothing>) -> Self {
        Self(QueueVariant::Null(q))
    }
}

impl From<FinishedAtSubmit<mem::MemExecutor>> for Queue {
    fn from(q: FinishedAtSubmit<mem::MemExecutor>) -> Self {
        Self(QueueVariant::Mem(q))
    }
}

impl From<file::FileQueue> for Queue {
    fn from(q: file::FileQueue) -> Self {
        Self(QueueVariant::File(Box::new(q)))
    }
}

impl From<nvme::NvmeClient> for Queue {
    fn from(q: nvme::NvmeClient) -> Self {
        Self(QueueVariant::Nvme(q))
    }
}

impl From<rbd::RbdQueue> for Queue {
    fn from(q: rbd::RbdQueue) -> Self {
        Self(QueueVariant::Rbd(Box::new(q)))
    }
}

#[cfg(any(test, feature = "test-delay"))]
impl From<delay::DelayQueue> for Queue {
    fn from(q: delay::DelayQueue) -> Self {
        Self(QueueVariant::Delayed(Box::new(q)))
    }
}

#[cfg(test)]
impl Queue {
    /// A test's own queue.
    pub(crate) fn other(q: impl BackendQueue + 'static) -> Self {
        Self(QueueVariant::Other(Box::new(q)))
    }
}

impl BackendQueue for Queue {
    #[inline]
    fn can_submit(&self) -> bool {
        on_queue!(&self.0, q => q.can_submit())
    }

    #[inline]
    fn submit(&mut self, request: &Request, token: u16) -> Result<()> {
        on_queue!(&mut self.0, q => q.submit(request, token))
    }

    #[inline]
    fn flush_submissions(&mut self) {
        on_queue!(&mut self.0, q => q.flush_submissions())
    }

    #[inline]
    fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize {
        on_queue!(&mut self.0, q => q.poll(done))
    }

    #[inline]
    fn in_flight(&self) -> usize {
        on_queue!(&self.0, q => q.in_flight())
    }

    fn capacity_changed(&mut self) {
        on_queue!(&mut self.0, q => q.capacity_changed())
    }

    fn can_wake(&self) -> bool {
        on_queue!(&self.0, q => q.can_wake())
    }

    fn arm_wakeup(&mut self) -> Wakeup {
        on_queue!(&mut self.0, q => q.arm_wakeup())
    }

    fn disarm_wakeup(&mut self, readable: bool) {
        on_queue!(&mut self.0, q => q.disarm_wakeup(readable))
    }
}
