//! One virtqueue's ring as its poller drives it: chains taken from the avail ring (requests
//! to run again first), walked and checked, recorded in the inflight region, handed to the
//! device's [`RequestHandler`], and their completions published to the used ring. The round
//! is generic over the handler, so a device's per-request calls are direct (inlined) calls;
//! the poller makes one dynamic call per queue per loop ([`crate::device::QueueHandler::run`]).

use std::sync::Arc;

use crate::chain::ChainCursor;
use crate::device::{Finished, RequestHandler, Taken};
use crate::dirty_log::DirtyLog;
use crate::guest_errors::GuestErrors;
use crate::inflight::{InflightMap, InflightQueue};
use crate::inflight_packed::InflightPackedQueue;
use crate::memory::GuestMemory;
use crate::packed::{PackedChain, PackedQueue};
use crate::virtq::DeviceQueue;

/// A ring's layout: split (virtio 1.1 §2.6) or packed (§2.7). One match per call; the
/// request path of each stays as it was.
pub enum RingQueue {
    /// A split ring.
    Split(DeviceQueue),
    /// A packed ring (no dirty logging yet: a ring asked for it stops; VIRTIO_F_RING_PACKED
    /// is not offered to frontends).
    Packed(PackedQueue),
}

/// A ring's inflight region, in its layout's format.
pub enum RingInflight {
    /// libvhost-user's split layout.
    Split(InflightQueue),
    /// The spec's packed layout.
    Packed(InflightPackedQueue),
}

impl From<InflightQueue> for RingInflight {
    fn from(q: InflightQueue) -> Self {
        Self::Split(q)
    }
}

impl From<InflightPackedQueue> for RingInflight {
    fn from(q: InflightPackedQueue) -> Self {
        Self::Packed(q)
    }
}

impl From<DeviceQueue> for RingQueue {
    fn from(q: DeviceQueue) -> Self {
        Self::Split(q)
    }
}

impl From<PackedQueue> for RingQueue {
    fn from(q: PackedQueue) -> Self {
        Self::Packed(q)
    }
}

impl RingQueue {
    /// Queue size.
    pub fn size(&self) -> u16 {
        match self {
            Self::Split(q) => q.size(),
            Self::Packed(q) => q.size(),
        }
    }

    /// Whether the driver offers a chain not taken yet.
    #[inline]
    pub fn has_avail(&self) -> bool {
        match self {
            Self::Split(q) => q.has_avail(),
            Self::Packed(q) => q.has_avail(),
        }
    }

    /// What GET_VRING_BASE returns: the next avail index of a split ring, both positions
    /// and wrap counters of a packed one ([`PackedQueue::base`]).
    pub fn base(&self) -> u32 {
        match self {
            Self::Split(q) => u32::from(q.next_avail),
            Self::Packed(q) => q.base(),
        }
    }

    fn set_kicks(&mut self, wanted: bool) -> u64 {
        match self {
            Self::Split(q) => q.set_kicks(wanted),
            Self::Packed(q) => q.set_kicks(wanted),
        }
    }
}

/// A migration's dirty log as one ring writes into it.
#[derive(Debug, Clone)]
pub struct RingLog {
    /// The log.
    pub log: Arc<DirtyLog>,
    /// Guest-physical address of the used ring (the frontend's `log_guest_addr`).
    pub used_gpa: u64,
}

/// Chains one queue takes per loop before it lets the poller's other queues run.
pub const BUDGET: usize = 64;

/// A virtqueue's ring state, owned by the poller that runs the queue.
pub struct Ring {
    pub(crate) index: u16,
    /// Keeps guest memory mapped while the ring and the handler's buffers point into it.
    pub(crate) mem: Arc<GuestMemory>,
    pub(crate) vq: RingQueue,
    pub(crate) inflight: Option<(RingInflight, Arc<InflightMap>)>,
    pub(crate) errors: Arc<GuestErrors>,
    /// Heads to run again before any new one, popped from the end (oldest first).
    pub(crate) resubmit: Vec<u16>,
    /// Heads finished since the last publication, and the bytes written into each.
    pub(crate) completed: Finished,
    /// A chain that could not be answered, or a ring that lied: nothing more is taken until
    /// the device is reset.
    pub(crate) broken: bool,
    /// While a migration logs: where every write into guest memory is marked.
    pub(crate) log: Option<RingLog>,
}

// SAFETY: the raw pointers it holds (rings, chain buffers) point into guest memory that
// `mem` keeps mapped; one thread runs the queue at a time.
unsafe impl Send for Ring {}

impl Ring {
    /// A ring that starts by running `resubmit` (oldest first) again.
    pub(crate) fn new(
        index: u16,
        mem: Arc<GuestMemory>,
        vq: RingQueue,
        inflight: Option<(RingInflight, Arc<InflightMap>)>,
        errors: Arc<GuestErrors>,
        mut resubmit: Vec<u16>,
        log: Option<RingLog>,
    ) -> Self {
        let size = usize::from(vq.size());
        resubmit.reverse(); // popped from the end: oldest first
        let mut ring = Self {
            index,
            mem,
            vq,
            inflight,
            errors,
            resubmit,
            completed: Finished::with_capacity(size),
            broken: false,
            log,
        };
        let fits = match (&mut ring.vq, &ring.inflight) {
            (RingQueue::Split(_), None | Some((RingInflight::Split(_), _))) => true,
            (RingQueue::Packed(_), _) if ring.log.is_some() => false,
            (RingQueue::Packed(_), None) => ring.resubmit.is_empty(),
            // Chains run again are in flight: the ring must know how far each goes.
            (RingQueue::Packed(vq), Some((RingInflight::Packed(region), _))) => {
                ring.resubmit.iter().all(|&id| {
                    region
                        .recovered(id)
                        .is_some_and(|chain| vq.adopt(id, chain.count))
                })
            }
            (_, Some(_)) => false,
        };
        if !fits {
            ring.stop_unsupported();
        }
        ring
    }

    /// A ring whose parts do not fit together (an inflight region of the other layout,
    /// resubmissions the region does not hold, a packed ring asked to log dirty pages,
    /// which it cannot yet): stopped rather than run without them. Only a bug gets here:
    /// VIRTIO_F_RING_PACKED is not offered.
    #[cold]
    fn stop_unsupported(&mut self) {
        self.stop_broken(
            0,
            format_args!("the ring's layout, inflight region and dirty log do not fit together"),
        );
    }

    #[inline]
    fn complete(&mut self, head: u16, written: u32) {
        self.completed.push(head, written);
    }

    /// Hands the chain at `head` (a packed ring's `chain`) to the handler, which walks it.
    #[inline]
    fn start<H: RequestHandler + ?Sized>(
        &mut self,
        handler: &mut H,
        head: u16,
        packed: Option<PackedChain>,
    ) {
        let chain = match (&self.vq, packed, &self.inflight) {
            (RingQueue::Split(q), _, _) => ChainCursor::new(q, &self.mem, head),
            (RingQueue::Packed(q), Some(c), _) => ChainCursor::packed(q, &self.mem, c),
            // Run again: from the inflight region's copies.
            (RingQueue::Packed(_), None, Some((RingInflight::Packed(region), _))) => {
                match region.recovered(head) {
                    Some(c) => ChainCursor::recovered(region, &self.mem, c),
                    None => {
                        return self.stop_broken(
                            head,
                            format_args!("the inflight region no longer holds its chain"),
                        )
                    }
                }
            }
            (RingQueue::Packed(_), None, _) => return self.stop_unsupported(),
        };
        match handler.take(chain) {
            Taken::Done(written) => self.complete(head, written),
            Taken::Pending => {}
            Taken::Unwalkable(e) => match handler.refuse(head, chain.last_byte()) {
                Some(written) => {
                    self.errors
                        .report(self.index, format_args!("head {head}: {e}; refused"));
                    self.complete(head, written);
                }
                None => self.stop_broken(head, format_args!("{e}")),
            },
            Taken::Unanswerable => self.stop_broken(head, format_args!("no status byte")),
        }
    }

    /// A chain that cannot be answered: the queue stops until the device is reset (the way
    /// libvhost-user marks a device broken), and says so once.
    pub(crate) fn stop_broken(&mut self, head: u16, why: std::fmt::Arguments) {
        tracing::error!(
            queue = self.index,
            "queue {}: head {head}: {why}; cannot be answered, so the queue stops until the device is reset",
            self.index
        );
        self.errors.report(
            self.index,
            format_args!("head {head}: {why}; queue stopped"),
        );
        self.broken = true;
    }

    /// One round with `handler`: resubmissions, new chains (when `take_new`), completions.
    /// Returns the work done; what finished waits in the ring for [`Ring::publish`].
    #[inline]
    pub fn run<H: RequestHandler + ?Sized>(&mut self, handler: &mut H, take_new: bool) -> usize {
        if self.broken {
            return 0;
        }
        // An idle queue costs one look at its avail index: with many queues on a poller,
        // the empty ones must not tax the busy ones.
        if self.resubmit.is_empty()
            && handler.in_flight() == 0
            && self.completed.is_empty()
            && !(take_new && self.vq.has_avail())
        {
            return 0;
        }
        self.run_busy(handler, take_new)
    }

    /// The round of a queue with work. Never inlined: with [`Ring::publish_batch`] it is the
    /// request path the cost benchmark measures (callgrind's toggle needs a function to
    /// find), without the rounds that found nothing, whose share per I/O only says how
    /// often the poller looked.
    #[inline(never)]
    fn run_busy<H: RequestHandler + ?Sized>(&mut self, handler: &mut H, take_new: bool) -> usize {
        // This loop has work: its start time (for busy time and the requests it takes).
        crate::poller::loop_now();
        let mut work = 0;
        while handler.can_take() && !self.broken {
            let Some(head) = self.resubmit.pop() else {
                break;
            };
            self.start(handler, head, None);
            work += 1;
        }
        while take_new
            && !self.broken
            && self.resubmit.is_empty()
            && work < BUDGET
            && handler.can_take()
        {
            let popped = match &mut self.vq {
                RingQueue::Split(q) => q.pop().map(|h| h.map(|h| (h, None))),
                RingQueue::Packed(q) => q.pop().map(|c| c.map(|c| (c.id, Some(c)))),
            };
            match popped {
                Ok(Some((head, packed))) => {
                    let recorded = match (&mut self.inflight, &self.vq, packed) {
                        (Some((RingInflight::Split(region), _)), _, _) => {
                            region.begin(head);
                            true
                        }
                        (
                            Some((RingInflight::Packed(region), _)),
                            RingQueue::Packed(q),
                            Some(c),
                        ) => region.begin(q, c),
                        _ => true,
                    };
                    if !recorded {
                        // The frontend broke the region's free list: the chain runs, but a
                        // restart would not find it.
                        self.errors.report(
                            self.index,
                            format_args!(
                                "buffer {head}: the inflight region's free list is broken; not recorded"
                            ),
                        );
                    }
                    self.start(handler, head, packed);
                    work += 1;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(
                        queue = self.index,
                        "queue {}: {e}; the queue stops until the device is reset",
                        self.index
                    );
                    self.errors
                        .report(self.index, format_args!("{e}; queue stopped"));
                    self.broken = true;
                    break;
                }
            }
        }
        handler.flush();
        // Lost memory is noticed before completions are collected: nothing done on it is
        // published (a request finished at submission may have written its status byte
        // already, which a driver reads only once the chain is returned).
        if self.memory_lost() {
            self.stop_broken(
                self.completed.heads().first().copied().unwrap_or(0),
                format_args!("the frontend shrank a shared memory file under the device"),
            );
            return work;
        }
        // Finish every completion the handler reports, however many.
        work += handler.poll(&mut self.completed);
        work
    }

    /// Whether the frontend shrank guest memory, the inflight region or the dirty log under
    /// us.
    fn memory_lost(&self) -> bool {
        self.mem.poisoned()
            || self
                .inflight
                .as_ref()
                .is_some_and(|(_, map)| map.poisoned())
            || self.log.as_ref().is_some_and(|l| l.log.poisoned())
    }

    /// Publishes what finished to the used ring (and the inflight region); returns whether
    /// the driver asked to be told.
    #[inline]
    pub(crate) fn publish(&mut self) -> bool {
        if self.completed.is_empty() {
            return false;
        }
        self.publish_batch()
    }

    /// Publishes a batch (see [`Ring::publish`]); never inlined, for the cost benchmark.
    #[inline(never)]
    fn publish_batch(&mut self) -> bool {
        // What was done on lost memory must not be reported as done: stop instead.
        if self.memory_lost() {
            self.abandon_batch(format_args!(
                "the frontend shrank a shared memory file under the device"
            ));
            return false;
        }
        let vq = match &mut self.vq {
            RingQueue::Split(vq) => vq,
            RingQueue::Packed(vq) => {
                for (id, written) in self.completed.iter() {
                    let known = vq.push_used(id, written);
                    debug_assert!(known, "the handler returned id {id}, not in flight");
                }
                // The spec's order: the region takes the entries back and records the used
                // position, the batch is published (its first flags), then committed.
                if let Some((RingInflight::Packed(region), _)) = &mut self.inflight {
                    region.prepare_batch(self.completed.heads(), vq.next_used());
                }
                vq.publish_used();
                if let Some((RingInflight::Packed(region), _)) = &mut self.inflight {
                    region.finish_batch(self.completed.heads());
                }
                self.completed.clear();
                return vq.needs_notification();
            }
        };
        let log_lost = match &self.log {
            Some(log) => {
                // The device's writes are done: marked before the driver can see them done.
                for &head in self.completed.heads() {
                    ChainCursor::new(vq, &self.mem, head).mark_writable(&log.log);
                }
                log.log.poisoned()
            }
            None => false,
        };
        if log_lost {
            // Marks went to a page the frontend cut from the log: the migration would miss
            // these writes, so they are not reported done.
            self.abandon_batch(format_args!(
                "the frontend shrank the dirty log's file under the device"
            ));
            return false;
        }
        if let Some((RingInflight::Split(inflight), _)) = &mut self.inflight {
            inflight.prepare_batch(self.completed.heads());
        }
        let first_used = vq.next_used;
        for (head, written) in self.completed.iter() {
            vq.push_used(head, written);
        }
        vq.publish_used();
        if let Some(log) = &self.log {
            log_used(vq, log, first_used);
        }
        if let Some((RingInflight::Split(inflight), _)) = &mut self.inflight {
            inflight.finish_batch(self.completed.heads(), vq.next_used);
        }
        self.completed.clear();
        vq.needs_notification()
    }

    /// Drops the finished batch unpublished and stops the queue: what it did cannot be
    /// reported as done (the inflight region keeps the heads for a later connection).
    fn abandon_batch(&mut self, why: std::fmt::Arguments) {
        let head = self.completed.heads()[0];
        self.completed.clear();
        self.stop_broken(head, why);
    }

    /// Asks the driver not to kick (we poll), or to kick again (before sleeping), logging the
    /// word written.
    pub(crate) fn set_kicks(&mut self, wanted: bool) {
        let offset = self.vq.set_kicks(wanted);
        if let Some(log) = &self.log {
            log.log.mark(log.used_gpa.wrapping_add(offset), 2);
        }
    }

    /// Starts or stops logging; marks the words of the used ring a migration must not miss
    /// (the driver reads them on the destination).
    pub(crate) fn set_log(&mut self, log: Option<RingLog>) {
        self.log = log;
        if matches!(self.vq, RingQueue::Packed(_)) && self.log.is_some() {
            self.stop_unsupported();
            return;
        }
        if let Some(log) = &self.log {
            let size = self.vq.size();
            log.log
                .mark(log.used_gpa, crate::virtq::ring_sizes(size).2 as u64);
        }
    }

    /// Whether there is anything for the poller to do: chains offered or to run again.
    pub(crate) fn has_work(&self) -> bool {
        self.vq.has_avail() || !self.resubmit.is_empty()
    }

    /// What finished since the last publication (the handler adds to it).
    pub(crate) fn finished(&mut self) -> &mut Finished {
        &mut self.completed
    }
}

/// Marks the used elements of a split ring from `first` to its next used index, and the
/// index.
#[cold]
fn log_used(vq: &DeviceQueue, log: &RingLog, first: u16) {
    let size = vq.size();
    let mut slot = first;
    while slot != vq.next_used {
        let offset = 4 + 8 * u64::from(slot % size);
        log.log.mark(log.used_gpa.wrapping_add(offset), 8);
        slot = slot.wrapping_add(1);
    }
    log.log.mark(log.used_gpa.wrapping_add(2), 2);
}
