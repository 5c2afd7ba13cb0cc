//! What a device type plugs into the plumbing: its feature bits and config space
//! ([`Device`]), and per virtqueue a [`RequestHandler`] that is handed each walked chain and
//! reports completions. The plumbing owns rings, chains, inflight tracking and interrupts; the
//! handler owns what a request means.

use std::sync::Arc;

use crate::chain::{ChainCursor, ChainError, ChainSource};
use crate::guest_errors::GuestErrors;
use crate::memory::GuestMemory;
use crate::packed::PackedQueue;
use crate::ring::Ring;
use crate::virtq::DeviceQueue;

/// A virtio device type served over vhost-user.
pub trait Device: Send + Sync {
    /// The device type's own virtio feature bits (the plumbing adds VERSION_1,
    /// INDIRECT_DESC, EVENT_IDX and PROTOCOL_FEATURES). A device that wants packed rings
    /// offers [`crate::packed::VIRTIO_F_RING_PACKED`] here (a packed ring keeps a
    /// migration's dirty log only with an inflight region: without one, the frontend's or
    /// the target's own, a ring asked to log stops).
    fn features(&self) -> u64;
    /// Feature bits a frontend may have acked: [`Device::features`] and any the device
    /// offered under settings that can change while a frontend is connected (a connection
    /// keeps what it negotiated; handed over or resumed, it must still be accepted).
    fn accepted_features(&self) -> u64 {
        self.features()
    }
    /// The device's config space as the guest reads it.
    fn config_space(&self) -> Vec<u8>;
    /// The driver writes `data` at `offset` of the config space; `Err` for anything not
    /// writable.
    fn set_config(&self, offset: u32, data: &[u8]) -> crate::Result<()> {
        let _ = data;
        Err(crate::Error::ReadOnlyConfig { offset })
    }
    /// A handler for one virtqueue, run by one poller thread.
    fn open_queue(&self, setup: &QueueSetup) -> crate::Result<Box<dyn QueueHandler>>;
    /// The guest's memory table changed (`None`: the frontend went away). Called while no
    /// queue runs; a device that DMAs into guest memory maps it here.
    fn guest_memory_changed(&self, _memory: Option<&GuestMemory>) -> crate::Result<()> {
        Ok(())
    }
    /// Queue `index` starts by running `count` requests again that a previous connection or
    /// process had taken and not finished (inflight recovery); for the device's counters.
    fn requests_recovered(&self, index: u16, count: usize) {
        let _ = (index, count);
    }
    /// A migration's switch-over stopped a ring (everything taken is done): make the data
    /// written so far visible to the destination's process, which serves the same storage.
    fn sync_for_migration(&self) -> crate::Result<()> {
        Ok(())
    }
}

/// What a queue handler is told when its queue starts.
#[derive(Debug, Clone)]
pub struct QueueSetup {
    /// Queue index within the device.
    pub index: u16,
    /// Ring size (heads are below it).
    pub size: u16,
    /// Negotiated virtio features.
    pub features: u64,
    /// Where guest-triggered errors are reported (rate-limited, per device).
    pub errors: Arc<GuestErrors>,
    /// The poller that will run the queue ([`crate::poller::Poller::id`]): resources a
    /// device shares between the queues of one poller are keyed by it.
    pub poller: u64,
}

/// What a handler did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Finished at once: return the chain with this many bytes written into it.
    Done(u32),
    /// Started: the head comes back through [`RequestHandler::poll`].
    Pending,
    /// The chain could not be walked (a bad index, a loop, a buffer outside guest memory,
    /// more buffers than the device takes): the plumbing answers it through
    /// [`RequestHandler::refuse`], or stops the queue if there is no place to answer.
    Unwalkable(ChainError),
    /// The chain cannot be answered (no place for a status): returning it would read as
    /// success to some drivers, so the queue stops until the device is reset.
    Unanswerable,
}

/// One virtqueue's request handling (no locks: one poller thread owns it), call by call. The
/// plumbing drives it through [`crate::ring::Ring::run`], generic over the handler, so these
/// calls are direct; every handler is a [`QueueHandler`] for the poller.
pub trait RequestHandler: Send {
    /// Whether another chain can be taken now (back-pressure: the avail ring waits).
    fn can_take(&self) -> bool;
    /// Handles the chain `chain` points at: walks it into the device's own buffer (the
    /// device's limit on buffers is that buffer's length), then acts on it; its buffers stay
    /// valid until the head is returned. [`Taken::Pending`] chains come back through
    /// [`RequestHandler::poll`]. Generic over where the chain's descriptors are (the ring's
    /// layout), so each layout's walk is compiled into the handler on its own.
    fn take<S: ChainSource>(&mut self, chain: ChainCursor<'_, S>) -> Taken;
    /// Answers a chain that could not be walked, at the last byte of its last buffer if the
    /// walk could find one ([`crate::chain::last_byte`]): `Some(bytes written)`, or `None`
    /// when the device cannot answer there (the queue then stops).
    fn refuse(&mut self, head: u16, last_byte: Option<crate::chain::Segment>) -> Option<u32>;
    /// Pushes out what was started since the last call (one system call per batch for
    /// handlers that need one).
    fn flush(&mut self) {}
    /// Adds the chains finished since the last call to `finished`; returns how many.
    fn poll(&mut self, finished: &mut Finished) -> usize;
    /// Chains started and not yet reported.
    fn in_flight(&self) -> usize;
    /// The queue stopped (drained, or given up on): let go of what a successor process or
    /// a migration's destination will want at once (an image lock), before the stop is
    /// reported. The handler itself is dropped later, off the stop's path.
    fn stopped(&mut self) {}
    /// Whether the handler can wake its sleeping poller when a request finishes
    /// ([`RequestHandler::arm_wakeup`]): then a poller with nothing to do but wait for the
    /// handler's requests sleeps instead of spinning (a network store's requests take
    /// hundreds of microseconds). A handler that cannot (it is polled: NVMe) keeps its poller
    /// polling while it has requests out.
    fn can_wake(&self) -> bool {
        false
    }
    /// The poller is about to sleep with requests of this handler in flight: arm the
    /// wake-up. [`Wakeup::Fd`]: the fd becomes readable when a request finishes (including
    /// one that finished between the poller's last poll and this call: no wake-up is lost);
    /// [`RequestHandler::disarm_wakeup`] follows when the poller wakes. [`Wakeup::Poll`]:
    /// something finished already, or the handler cannot wake the poller: do not sleep.
    fn arm_wakeup(&mut self) -> Wakeup {
        Wakeup::Poll
    }
    /// The poller woke (or did not sleep after all; `readable`: the poller saw the fd
    /// readable): the armed wake-up is spent, its fd drained so that the next sleep waits
    /// again.
    fn disarm_wakeup(&mut self, readable: bool) {
        let _ = readable;
    }
}

/// How a handler with requests in flight can wake its sleeping poller
/// ([`RequestHandler::arm_wakeup`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wakeup {
    /// Keep polling.
    Poll,
    /// Sleep on this fd (it is readable once a request finished).
    Fd(std::os::fd::RawFd),
}

/// A virtqueue's handler as its poller holds it: one dynamic call per queue per loop (the
/// poller picks the one for the ring's layout), the requests within it statically
/// dispatched. Implemented for every [`RequestHandler`].
pub trait QueueHandler: Send {
    /// One round on a split `ring`: what it offers is taken (when `take_new`) and what
    /// finished is added to it. Returns the work done.
    fn run_split(&mut self, ring: &mut Ring<DeviceQueue>, take_new: bool) -> usize;
    /// [`QueueHandler::run_split`] for a packed ring.
    fn run_packed(&mut self, ring: &mut Ring<PackedQueue>, take_new: bool) -> usize;
    /// Chains started and not yet reported.
    fn in_flight(&self) -> usize;
    /// The connection is gone: what was started is pushed out and what finished is added to
    /// `finished`, which the caller drops unpublished (the inflight region still lists it).
    fn finish_unpublished(&mut self, finished: &mut Finished);
    /// [`RequestHandler::stopped`].
    fn stopped(&mut self);
    /// [`RequestHandler::can_wake`].
    fn can_wake(&self) -> bool;
    /// [`RequestHandler::arm_wakeup`].
    fn arm_wakeup(&mut self) -> Wakeup;
    /// [`RequestHandler::disarm_wakeup`].
    fn disarm_wakeup(&mut self, readable: bool);
}

impl<H: RequestHandler> QueueHandler for H {
    fn run_split(&mut self, ring: &mut Ring<DeviceQueue>, take_new: bool) -> usize {
        ring.run(self, take_new)
    }

    fn run_packed(&mut self, ring: &mut Ring<PackedQueue>, take_new: bool) -> usize {
        ring.run(self, take_new)
    }

    fn in_flight(&self) -> usize {
        RequestHandler::in_flight(self)
    }

    fn finish_unpublished(&mut self, finished: &mut Finished) {
        self.flush();
        self.poll(finished);
    }

    fn stopped(&mut self) {
        RequestHandler::stopped(self)
    }

    fn can_wake(&self) -> bool {
        RequestHandler::can_wake(self)
    }

    fn arm_wakeup(&mut self) -> Wakeup {
        RequestHandler::arm_wakeup(self)
    }

    fn disarm_wakeup(&mut self, readable: bool) {
        RequestHandler::disarm_wakeup(self, readable)
    }
}

/// Chains a handler has finished, in the order it finished them: each head with the bytes
/// written into its buffers. The handler fills it in [`RequestHandler::poll`]; the queue
/// publishes it to the used ring. Pulled rather than called back, so that completion is a
/// store into a buffer, not a dynamic call per request.
#[derive(Debug, Default)]
pub struct Finished {
    heads: Vec<u16>,
    written: Vec<u32>,
}

impl Finished {
    /// Room for `heads` completions: a ring's size, as no more heads can be out at once, so
    /// that a push on the request path never allocates.
    pub fn with_capacity(heads: usize) -> Self {
        Self {
            heads: Vec::with_capacity(heads),
            written: Vec::with_capacity(heads),
        }
    }

    /// Chain `head` is finished with `written` bytes written into it.
    #[inline]
    pub fn push(&mut self, head: u16, written: u32) {
        self.heads.push(head);
        self.written.push(written);
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.heads.len()
    }

    /// None yet.
    pub fn is_empty(&self) -> bool {
        self.heads.is_empty()
    }

    /// The heads, in completion order.
    pub fn heads(&self) -> &[u16] {
        &self.heads
    }

    /// (head, bytes written), in completion order.
    pub fn iter(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.heads.iter().copied().zip(self.written.iter().copied())
    }

    /// Forgets them (published, or dropped with their connection).
    pub fn clear(&mut self) {
        self.heads.clear();
        self.written.clear();
    }
}
