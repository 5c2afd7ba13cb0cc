//! One virtqueue's ring as its poller drives it: chains taken from the avail ring (requests
//! to run again first), walked and checked, recorded in the inflight region, handed to the
//! device's [`RequestHandler`], and their completions published to the used ring. The round
//! is generic over the handler and over the ring's layout ([`Layout`]: split or packed), so
//! a device's per-request calls are direct (inlined) calls and nothing is matched on the
//! layout per request; the poller makes one dynamic call per queue per loop, picked by one
//! match on the layout (`QueueRing::round`).

use std::sync::Arc;

use crate::chain::{ChainCursor, ChainSource};
use crate::device::{Finished, QueueHandler, RequestHandler, Taken};
use crate::dirty_log::DirtyLog;
use crate::guest_errors::GuestErrors;
use crate::inflight::{InflightMap, InflightQueue};
use crate::inflight_packed::InflightPackedQueue;
use crate::memory::GuestMemory;
use crate::packed::{PackedChain, PackedQueue};
use crate::virtq::DeviceQueue;

/// A ring's layout as the protocol hands it to a poller: split (virtio 1.1 §2.6) or packed
/// (§2.7).
pub enum RingQueue {
    /// A split ring.
    Split(DeviceQueue),
    /// A packed ring (it keeps a migration's dirty log only with an inflight region, whose
    /// copies of the chains in flight say what the device wrote; without one, a ring asked
    /// to log stops).
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
    /// What GET_VRING_BASE returns: the next avail index of a split ring, both positions
    /// and wrap counters of a packed one ([`PackedQueue::base`]).
    pub fn base(&self) -> u32 {
        match self {
            Self::Split(q) => q.base(),
            Self::Packed(q) => q.base(),
        }
    }
}

/// A ring layout's queue, as [`Ring`] runs it: one implementation per layout, each compiled
/// into its own round.
pub trait Layout: Sized + Send + 'static {
    /// The inflight region's queue in this layout's format.
    type Inflight: Send;
    /// A chain as the ring takes it: a split ring's head, a packed ring's chain.
    type Taken: Copy;
    /// Where a taken chain's descriptors are.
    type Source<'a>: ChainSource;

    /// Queue size.
    fn size(&self) -> u16;
    /// Whether the driver offers a chain not taken yet.
    fn has_avail(&self) -> bool;
    /// What GET_VRING_BASE returns.
    fn base(&self) -> u32;
    /// Asks the driver not to kick, or to kick again; the offset in the used ring (or the
    /// device event area) of the word written.
    fn set_kicks(&mut self, wanted: bool) -> u64;
    /// The next chain the driver offers.
    fn pop(&mut self) -> crate::Result<Option<Self::Taken>>;
    /// The head the chain is known by (a packed chain's buffer id).
    fn head(taken: Self::Taken) -> u16;
    /// Records a chain just taken in the inflight region; false if the region cannot hold
    /// it.
    fn record(region: &mut Self::Inflight, queue: &Self, taken: Self::Taken) -> bool;
    /// The chain for the handler to walk.
    fn chain<'a>(
        &'a self,
        mem: &'a GuestMemory,
        taken: Self::Taken,
    ) -> ChainCursor<'a, Self::Source<'a>>;
    /// Runs `head` again (inflight recovery) on `handler`.
    fn run_again<H: RequestHandler + ?Sized>(ring: &mut Ring<Self>, handler: &mut H, head: u16);
    /// Whether a ring just built can run: its resubmissions known, its dirty log kept.
    fn fits(ring: &mut Ring<Self>) -> bool;
    /// Whether the ring can keep a migration's dirty log as it is set up now.
    fn can_log(ring: &Ring<Self>) -> bool;
    /// Marks all of what the device writes when it publishes (a split ring's used ring, a
    /// packed ring's descriptors and device event area): logging starts, and the driver on
    /// the destination reads words that may have been written while it was off.
    fn mark_published_areas(&self, log: &RingLog);
    /// Publishes the finished batch (memory checked already); returns whether the driver
    /// asked to be told.
    fn publish(ring: &mut Ring<Self>) -> bool;
}

/// A migration's dirty log as one ring writes into it.
#[derive(Debug, Clone)]
pub struct RingLog {
    /// The log.
    pub log: Arc<DirtyLog>,
    /// Guest-physical address of the used ring (the frontend's `log_guest_addr`; a packed
    /// ring's device event area).
    pub used_gpa: u64,
    /// Guest-physical address of a packed ring's descriptors, where its used descriptors
    /// are written (unused for a split ring).
    pub desc_gpa: u64,
}

/// Chains one queue takes per loop before it lets the poller's other queues run.
pub const BUDGET: usize = 64;

/// A virtqueue's ring state in layout `L`, owned by the poller that runs the queue.
pub struct Ring<L: Layout> {
    pub(crate) index: u16,
    /// Keeps guest memory mapped while the ring and the handler's buffers point into it.
    pub(crate) mem: Arc<GuestMemory>,
    pub(crate) vq: L,
    pub(crate) inflight: Option<(L::Inflight, Arc<InflightMap>)>,
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
unsafe impl<L: Layout> Send for Ring<L> {}

impl<L: Layout> Ring<L> {
    /// A ring that starts by running `resubmit` (oldest first) again.
    pub(crate) fn new(
        index: u16,
        mem: Arc<GuestMemory>,
        vq: L,
        inflight: Option<(L::Inflight, Arc<InflightMap>)>,
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
        if !L::fits(&mut ring) {
            ring.stop_unsupported();
        }
        ring
    }

    /// A ring whose parts do not fit together (an inflight region of the other layout,
    /// resubmissions the region does not hold, a packed ring asked to log dirty pages
    /// without an inflight region): stopped rather than run without them.
    #[cold]
    fn stop_unsupported(&mut self) {
        self.stop_broken(
            0,
            format_args!("the ring's layout, inflight region and dirty log do not fit together"),
        );
    }

    /// Hands a chain taken from the ring to the handler, which walks it. One function for
    /// new chains and a split ring's resubmissions, so the handler's `take` is inlined
    /// into one place.
    #[inline]
    fn start<H: RequestHandler + ?Sized>(&mut self, handler: &mut H, taken: L::Taken) {
        let head = L::head(taken);
        let chain = self.vq.chain(&self.mem, taken);
        match handler.take(chain) {
            Taken::Done(written) => self.completed.push(head, written),
            Taken::Pending => {}
            Taken::Unwalkable(e) => {
                let answer = handler.refuse(head, chain.last_byte());
                self.refused(head, answer, e);
            }
            Taken::Unanswerable => self.stop_broken(head, format_args!("no status byte")),
        }
    }

    /// A chain the handler could not walk: answered where it could be, else the queue
    /// stops.
    fn refused(&mut self, head: u16, answer: Option<u32>, e: crate::chain::ChainError) {
        match answer {
            Some(written) => {
                self.errors
                    .report(self.index, format_args!("head {head}: {e}; refused"));
                self.completed.push(head, written);
            }
            None => self.stop_broken(head, format_args!("{e}")),
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
            L::run_again(self, handler, head);
            work += 1;
        }
        while take_new
            && !self.broken
            && self.resubmit.is_empty()
            && work < BUDGET
            && handler.can_take()
        {
            match self.vq.pop() {
                Ok(Some(taken)) => {
                    let head = L::head(taken);
                    if let Some((region, _)) = &mut self.inflight {
                        if !L::record(region, &self.vq, taken) {
                            // The frontend broke the region's free list: the chain runs,
                            // but a restart would not find it.
                            self.errors.report(
                                self.index,
                                format_args!(
                                    "buffer {head}: the inflight region's free list is broken; not recorded"
                                ),
                            );
                        }
                    }
                    self.start(handler, taken);
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
        L::publish(self)
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
        if self.log.is_some() && !L::can_log(self) {
            self.stop_unsupported();
            return;
        }
        if let Some(log) = &self.log {
            self.vq.mark_published_areas(log);
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

impl Layout for DeviceQueue {
    type Inflight = InflightQueue;
    type Taken = u16;
    type Source<'a> = crate::chain::Split<'a>;

    #[inline]
    fn size(&self) -> u16 {
        DeviceQueue::size(self)
    }

    #[inline]
    fn has_avail(&self) -> bool {
        DeviceQueue::has_avail(self)
    }

    fn base(&self) -> u32 {
        u32::from(self.next_avail)
    }

    fn set_kicks(&mut self, wanted: bool) -> u64 {
        DeviceQueue::set_kicks(self, wanted)
    }

    #[inline(always)]
    fn pop(&mut self) -> crate::Result<Option<u16>> {
        DeviceQueue::pop(self)
    }

    #[inline(always)]
    fn head(taken: u16) -> u16 {
        taken
    }

    #[inline(always)]
    fn record(region: &mut InflightQueue, _: &Self, head: u16) -> bool {
        region.begin(head);
        true
    }

    #[inline(always)]
    fn chain<'a>(&'a self, mem: &'a GuestMemory, head: u16) -> ChainCursor<'a, Self::Source<'a>> {
        ChainCursor::new(self, mem, head)
    }

    #[inline]
    fn run_again<H: RequestHandler + ?Sized>(ring: &mut Ring<Self>, handler: &mut H, head: u16) {
        // The chain is still in the ring: the driver does not reuse a head it has not had
        // back.
        ring.start(handler, head);
    }

    fn fits(_: &mut Ring<Self>) -> bool {
        true
    }

    fn can_log(_: &Ring<Self>) -> bool {
        true
    }

    fn mark_published_areas(&self, log: &RingLog) {
        let len = crate::virtq::ring_sizes(self.size()).2 as u64;
        log.log.mark(log.used_gpa, len);
    }

    #[inline(always)]
    fn publish(ring: &mut Ring<Self>) -> bool {
        let log_lost = match &ring.log {
            Some(log) => {
                // The device's writes are done: marked before the driver can see them done.
                for &head in ring.completed.heads() {
                    ChainCursor::new(&ring.vq, &ring.mem, head).mark_writable(&log.log);
                }
                log.log.poisoned()
            }
            None => false,
        };
        if log_lost {
            // Marks went to a page the frontend cut from the log: the migration would miss
            // these writes, so they are not reported done.
            ring.abandon_batch(format_args!(
                "the frontend shrank the dirty log's file under the device"
            ));
            return false;
        }
        if let Some((inflight, _)) = &mut ring.inflight {
            inflight.prepare_batch(ring.completed.heads());
        }
        let vq = &mut ring.vq;
        let first_used = vq.next_used;
        for (head, written) in ring.completed.iter() {
            vq.push_used(head, written);
        }
        vq.publish_used();
        if let Some(log) = &ring.log {
            log_used(vq, log, first_used);
        }
        if let Some((inflight, _)) = &mut ring.inflight {
            inflight.finish_batch(ring.completed.heads(), vq.next_used);
        }
        ring.completed.clear();
        vq.needs_notification()
    }
}

impl Layout for PackedQueue {
    type Inflight = InflightPackedQueue;
    type Taken = PackedChain;
    type Source<'a> = crate::chain::Packed<'a>;

    #[inline]
    fn size(&self) -> u16 {
        PackedQueue::size(self)
    }

    #[inline]
    fn has_avail(&self) -> bool {
        PackedQueue::has_avail(self)
    }

    fn base(&self) -> u32 {
        PackedQueue::base(self)
    }

    fn set_kicks(&mut self, wanted: bool) -> u64 {
        PackedQueue::set_kicks(self, wanted)
    }

    #[inline(always)]
    fn pop(&mut self) -> crate::Result<Option<PackedChain>> {
        PackedQueue::pop(self)
    }

    #[inline(always)]
    fn head(taken: PackedChain) -> u16 {
        taken.id
    }

    #[inline(always)]
    fn record(region: &mut InflightPackedQueue, queue: &Self, chain: PackedChain) -> bool {
        region.begin(queue, chain)
    }

    #[inline(always)]
    fn chain<'a>(
        &'a self,
        mem: &'a GuestMemory,
        chain: PackedChain,
    ) -> ChainCursor<'a, Self::Source<'a>> {
        ChainCursor::packed(self, mem, chain)
    }

    /// From the inflight region's copies: the ring may hold used descriptors in the chain's
    /// place by now.
    fn run_again<H: RequestHandler + ?Sized>(ring: &mut Ring<Self>, handler: &mut H, head: u16) {
        let Some((region, _)) = &ring.inflight else {
            return ring.stop_unsupported();
        };
        let Some(chain) = region.recovered(head) else {
            return ring.stop_broken(
                head,
                format_args!("the inflight region no longer holds its chain"),
            );
        };
        let chain = ChainCursor::recovered(region, &ring.mem, chain);
        match handler.take(chain) {
            Taken::Done(written) => ring.completed.push(head, written),
            Taken::Pending => {}
            Taken::Unwalkable(e) => {
                let answer = handler.refuse(head, chain.last_byte());
                ring.refused(head, answer, e);
            }
            Taken::Unanswerable => ring.stop_broken(head, format_args!("no status byte")),
        }
    }

    fn fits(ring: &mut Ring<Self>) -> bool {
        if ring.log.is_some() && !Self::can_log(ring) {
            return false;
        }
        match &ring.inflight {
            None => ring.resubmit.is_empty(),
            // Chains run again are in flight: the ring must know how far each goes.
            Some((region, _)) => ring.resubmit.iter().all(|&id| {
                region
                    .recovered(id)
                    .is_some_and(|chain| ring.vq.adopt(id, chain.count))
            }),
        }
    }

    /// Only with an inflight region: a chain's descriptors in the ring may be overwritten by
    /// used descriptors of chains that finished before it (out of order), so what it asked
    /// the device to write is known at its completion only from the region's copy.
    fn can_log(ring: &Ring<Self>) -> bool {
        ring.inflight.is_some()
    }

    fn mark_published_areas(&self, log: &RingLog) {
        log.log.mark(log.desc_gpa, 16 * u64::from(self.size()));
        log.log
            .mark(log.used_gpa, crate::packed::EVENT_BYTES as u64);
    }

    fn publish(ring: &mut Ring<Self>) -> bool {
        if ring.log.is_some() && !log_packed_writes(ring) {
            // Writes a migration would miss are not reported done.
            ring.abandon_batch(format_args!(
                "what the device wrote cannot be marked in the dirty log"
            ));
            return false;
        }
        let first_used = ring.vq.next_used();
        let vq = &mut ring.vq;
        for (id, written) in ring.completed.iter() {
            let known = vq.push_used(id, written);
            debug_assert!(known, "the handler returned id {id}, not in flight");
        }
        // The spec's order: the region takes the entries back and records the used
        // position, the batch is published (its first flags), then committed.
        if let Some((region, _)) = &mut ring.inflight {
            region.prepare_batch(ring.completed.heads(), vq.next_used());
        }
        vq.publish_used();
        if let Some(log) = &ring.log {
            log_used_packed(vq, log, first_used);
        }
        if let Some((region, _)) = &mut ring.inflight {
            region.finish_batch(ring.completed.heads());
        }
        ring.completed.clear();
        vq.needs_notification()
    }
}

/// Marks the buffers the device wrote for the finished batch of a packed ring, walked from
/// the inflight region's copies of their chains (before the region takes them back); false
/// if one is not there (the frontend broke the region) or the log lost a page.
#[cold]
fn log_packed_writes(ring: &Ring<PackedQueue>) -> bool {
    let (Some(log), Some((region, _))) = (&ring.log, &ring.inflight) else {
        return false;
    };
    for &id in ring.completed.heads() {
        let Some(chain) = region.recovered(id) else {
            return false;
        };
        ChainCursor::recovered(region, &ring.mem, chain).mark_writable(&log.log);
    }
    !log.log.poisoned()
}

/// Marks the descriptor slots a packed ring's used descriptors went to since `first` (each
/// finished chain's first slot, every slot between them included: a batch never laps the
/// ring).
#[cold]
fn log_used_packed(vq: &PackedQueue, log: &RingLog, first: crate::packed::Position) {
    for (start, count) in used_slot_spans(vq.size(), first.index, vq.next_used().index) {
        if count > 0 {
            log.log.mark(
                log.desc_gpa.wrapping_add(16 * u64::from(start)),
                16 * u64::from(count),
            );
        }
    }
}

/// The descriptor slots (first slot, count) a batch of used descriptors written from slot
/// `first` up to (not including) `next` covers in a ring of `size`: one span, or two when it
/// passes the end of the ring (the second from slot 0). `first == next` is a whole lap.
fn used_slot_spans(size: u16, first: u16, next: u16) -> [(u16, u16); 2] {
    if first < next {
        [(first, next - first), (0, 0)]
    } else {
        [(first, size - first), (0, next)]
    }
}

/// A queue's ring in its layout, as its poller holds it: matched once per round.
pub enum QueueRing {
    /// A split ring.
    Split(Ring<DeviceQueue>),
    /// A packed ring.
    Packed(Ring<PackedQueue>),
}

/// `$body` with `$r` bound to the ring, whatever its layout.
macro_rules! each {
    ($ring:expr, $r:ident => $body:expr) => {
        match $ring {
            QueueRing::Split($r) => $body,
            QueueRing::Packed($r) => $body,
        }
    };
}

impl QueueRing {
    /// A ring that starts by running `resubmit` (oldest first) again. An inflight region
    /// of the other layout stops it at once (only a bug gets there).
    pub(crate) fn new(
        index: u16,
        mem: Arc<GuestMemory>,
        vq: RingQueue,
        inflight: Option<(RingInflight, Arc<InflightMap>)>,
        errors: Arc<GuestErrors>,
        resubmit: Vec<u16>,
        log: Option<RingLog>,
    ) -> Self {
        // A region of the other layout: the ring starts stopped, nothing run again.
        match vq {
            RingQueue::Split(vq) => {
                let (inflight, fits) = match inflight {
                    None => (None, true),
                    Some((RingInflight::Split(region), map)) => (Some((region, map)), true),
                    Some((RingInflight::Packed(_), _)) => (None, false),
                };
                let resubmit = if fits { resubmit } else { Vec::new() };
                let mut ring = Ring::new(index, mem, vq, inflight, errors, resubmit, log);
                if !fits {
                    ring.stop_unsupported();
                }
                Self::Split(ring)
            }
            RingQueue::Packed(vq) => {
                let (inflight, fits) = match inflight {
                    None => (None, true),
                    Some((RingInflight::Packed(region), map)) => (Some((region, map)), true),
                    Some((RingInflight::Split(_), _)) => (None, false),
                };
                let resubmit = if fits { resubmit } else { Vec::new() };
                let mut ring = Ring::new(index, mem, vq, inflight, errors, resubmit, log);
                if !fits {
                    ring.stop_unsupported();
                }
                Self::Packed(ring)
            }
        }
    }

    /// One round with `handler` (its one dynamic call), then publication: the work done,
    /// and whether the driver asked to be told.
    #[inline]
    pub(crate) fn round(
        &mut self,
        handler: &mut dyn QueueHandler,
        take_new: bool,
    ) -> (usize, bool) {
        match self {
            Self::Split(r) => (handler.run_split(r, take_new), r.publish()),
            Self::Packed(r) => (handler.run_packed(r, take_new), r.publish()),
        }
    }

    /// Queue index.
    pub(crate) fn index(&self) -> u16 {
        each!(self, r => r.index)
    }

    /// Where the queue's guest errors go.
    pub(crate) fn errors(&self) -> &Arc<GuestErrors> {
        each!(self, r => &r.errors)
    }

    /// Whether the queue stopped until the device is reset.
    #[cfg(test)]
    pub(crate) fn broken(&self) -> bool {
        each!(self, r => r.broken)
    }

    /// What GET_VRING_BASE returns ([`Layout::base`]).
    pub(crate) fn base(&self) -> u32 {
        each!(self, r => r.vq.base())
    }

    /// See [`Ring::set_kicks`].
    pub(crate) fn set_kicks(&mut self, wanted: bool) {
        each!(self, r => r.set_kicks(wanted))
    }

    /// See [`Ring::set_log`].
    pub(crate) fn set_log(&mut self, log: Option<RingLog>) {
        each!(self, r => r.set_log(log))
    }

    /// See [`Ring::has_work`].
    pub(crate) fn has_work(&self) -> bool {
        each!(self, r => r.has_work())
    }

    /// See [`Ring::finished`].
    pub(crate) fn finished(&mut self) -> &mut Finished {
        each!(self, r => r.finished())
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

#[cfg(test)]
mod used_slot_tests {
    use super::used_slot_spans;

    #[test]
    fn a_batch_of_used_descriptors_covers_its_slots_across_the_end_of_the_ring() {
        // Within the ring, to its very end, across it, and a whole lap.
        assert_eq!(used_slot_spans(512, 3, 9), [(3, 6), (0, 0)]);
        assert_eq!(used_slot_spans(512, 500, 0), [(500, 12), (0, 0)]);
        assert_eq!(used_slot_spans(512, 510, 4), [(510, 2), (0, 4)]);
        assert_eq!(used_slot_spans(512, 7, 7), [(7, 505), (0, 7)]);
        // Every slot covered once, none outside the ring, for every start and length.
        let size = 16u16;
        for first in 0..size {
            for len in 1..=size {
                let next = (first + len) % size;
                let mut covered = vec![0u32; usize::from(size)];
                for (start, count) in used_slot_spans(size, first, next) {
                    assert!(start + count <= size, "{first}+{len}: ({start}, {count})");
                    for s in start..start + count {
                        covered[usize::from(s)] += 1;
                    }
                }
                for i in 0..size {
                    let inside = (i + size - first) % size < len;
                    assert_eq!(
                        covered[usize::from(i)],
                        u32::from(inside),
                        "{first}+{len}: slot {i}"
                    );
                }
            }
        }
    }
}
