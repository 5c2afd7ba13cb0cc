//! A polled submission/completion queue pair, owned by one thread.
//!
//! Commands are written into the SQ ring in DMA memory; the SQ tail doorbell is rung once per
//! batch ([`QueuePair::ring`]). [`QueuePair::poll`] reads completions by phase tag and rings
//! the CQ head doorbell once per call. The command id indexes a preallocated slot that holds
//! the caller's token and a PRP list page, so nothing is allocated per I/O.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vfblk_hugepages::DmaChunk;

use crate::prp::{self, DmaSegment, PrpError};
use crate::sgl;
use crate::spec::{nvm, Command, Completion, DsmRange, Status, PSDT_SGL};
use crate::vfio::VfioPci;

/// Why a command was not queued. Cheap to return on the hot path; the queue is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// Every slot is in flight: poll, then submit again (back-pressure).
    QueueFull,
    /// The transfer exceeds the controller's MDTS.
    TooLarge {
        /// Bytes requested.
        len: u64,
        /// Bytes allowed.
        max: u64,
    },
    /// The buffer cannot be described with PRPs.
    Prp(PrpError),
    /// The buffer length does not match the block count.
    LengthMismatch {
        /// Bytes in the buffer.
        buffer: u64,
        /// Bytes the blocks need.
        blocks: u64,
    },
    /// Block count 0 or above 65536, or too many DSM ranges.
    BadCount,
    /// The controller was reset and this queue could not be created again.
    QueueLost,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubmitError::QueueFull => f.write_str("queue full"),
            SubmitError::TooLarge { len, max } => {
                write!(
                    f,
                    "transfer of {len} bytes exceeds the controller's maximum of {max}"
                )
            }
            SubmitError::Prp(e) => write!(f, "{e}"),
            SubmitError::LengthMismatch { buffer, blocks } => {
                write!(
                    f,
                    "buffer holds {buffer} bytes but the blocks need {blocks}"
                )
            }
            SubmitError::BadCount => f.write_str("block or range count out of bounds"),
            SubmitError::QueueLost => f.write_str("queue lost in a controller reset"),
        }
    }
}

/// A finished command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoCompletion {
    /// The caller's token from submission.
    pub token: u64,
    /// The command id the command ran under.
    pub cid: u16,
    /// Its status.
    pub status: Status,
    /// Command-specific result (dword 0).
    pub result: u32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    token: u64,
    opcode: u8,
    busy: bool,
    /// The queue's tick count when the command was submitted.
    tick: u32,
}

/// A command that has been in flight for long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StuckCommand {
    /// Command id.
    pub cid: u16,
    /// The caller's token.
    pub token: u64,
    /// Opcode.
    pub opcode: u8,
    /// Ticks since submission.
    pub age: u32,
}

/// The busy slot submitted the most ticks ago, and its age.
fn oldest(slots: &[Slot], now: u32) -> Option<(usize, u32)> {
    slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.busy)
        .map(|(i, s)| (i, now.wrapping_sub(s.tick)))
        .max_by_key(|&(_, age)| age)
}

/// A queue's entries in the shadow doorbell and event index buffers (Doorbell Buffer Config):
/// the driver writes the new tail/head to the shadow buffer and writes the MMIO doorbell
/// only when the controller's event index says it is not polling them already.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ShadowDoorbells {
    pub sq: *mut u32,
    pub cq: *mut u32,
    pub sq_event: *const u32,
    pub cq_event: *const u32,
}

/// Whether moving a doorbell from `old` to `new` passes the controller's event index (the
/// `vring_need_event` rule NVMe borrowed from virtio).
pub(crate) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Layout of a queue pair's DMA memory: SQ ring, CQ ring, then the per-slot PRP list pages.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub entries: u16,
    pub page: usize,
    pub list_pages: usize,
    pub cq_offset: usize,
    pub lists_offset: usize,
    pub total: usize,
}

impl Layout {
    pub fn new(entries: u16, page: usize, max_transfer: usize) -> Self {
        let round = |n: usize| n.div_ceil(page) * page;
        let sq = round(usize::from(entries) * 64);
        let cq = round(usize::from(entries) * 16);
        // Entries for a max-size transfer starting mid-page, plus chain links.
        let per_page = page / 8;
        let entries_needed = max_transfer / page + 1;
        let list_pages = entries_needed.div_ceil(per_page - 1).max(1);
        let slots = usize::from(entries) - 1;
        Self {
            entries,
            page,
            list_pages,
            cq_offset: sq,
            lists_offset: sq + cq,
            total: sq + cq + slots * list_pages * page,
        }
    }
}

/// What an I/O queue pair needs of the controller that made it: to notice a reset, create
/// its queues again after one, and delete them when dropped. A trait, implemented by the
/// controller, so that queue pairs do not depend on the controller module that builds them.
pub(crate) trait QueueOwner: Send + Sync {
    /// Bumped by every reset; a pair compares it with the one its queues were created in.
    fn generation(&self) -> u64;
    /// Lent to another process: the registers and queues are not ours to touch.
    fn is_lent(&self) -> bool;
    /// Creates the CQ and SQ of I/O queue `qid`; returns the generation they belong to.
    fn create_io_queues(
        &self,
        qid: u16,
        entries: u16,
        cq_iova: u64,
        sq_iova: u64,
    ) -> crate::Result<u64>;
    /// Deletes the SQ and CQ of I/O queue `qid` and frees the id.
    fn delete_io_queues(&self, qid: u16) -> crate::Result<()>;
    /// Frees queue id `qid` without a command (its queues are gone already).
    fn release_qid(&self, qid: u16);
}

/// Where a chunk of DMA memory lies in its controller's pool (arena, offset, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChunkRecord {
    /// Arena index.
    pub arena: u32,
    /// Byte offset in the arena.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// A queue pair as handed over: its queue id, size, memory and ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRecord {
    /// Queue id (0: admin).
    pub qid: u16,
    /// Ring entries.
    pub entries: u16,
    /// SQ ring, CQ ring and PRP list pages.
    pub memory: ChunkRecord,
    /// Next SQ slot to write (the tail the controller was last told).
    pub sq_tail: u16,
    /// SQ head as the controller last reported it.
    pub sq_head: u16,
    /// Next CQ entry to read (the head the controller was last told).
    pub cq_head: u16,
    /// The phase tag a new completion at `cq_head` carries.
    pub phase: bool,
}

/// A submission queue and its completion queue.
pub struct QueuePair {
    qid: u16,
    entries: u16,
    sq: *mut Command,
    cq: *const Completion,
    sq_tail: u16,
    sq_head: u16,
    rung_tail: u16,
    cq_head: u16,
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
    slots: Box<[Slot]>,
    free: Vec<u16>,
    lists: *mut u8,
    lists_iova: u64,
    layout: Layout,
    max_transfer: u64,
    spurious: u64,
    /// Fault injection: completions to let through before one is lost (as if the device
    /// never posted it), if armed.
    drop_after: Option<u64>,
    /// Fault injection: completions to reap before every later one is held in the CQ
    /// unread (as a process stuck, or killed, with completions pending), if armed.
    hold_after: Option<u64>,
    /// Controller generation the queues were created in; a reset bumps the controller's.
    generation: u64,
    /// Commands in flight at a reset, reported as aborted by the next poll.
    aborted: Vec<u16>,
    lost: bool,
    /// The controller takes SGLs for I/O commands.
    sgl: bool,
    /// Commands sent with SGLs (buffers PRPs could not describe).
    sgl_commands: u64,
    /// Shadow doorbells, when the controller was given Doorbell Buffer Config.
    shadow: Option<ShadowDoorbells>,
    /// MMIO doorbell writes saved by the shadow doorbells' event indexes.
    doorbells_skipped: u64,
    /// Coarse clock for command timeouts, advanced by [`QueuePair::tick`]; submissions
    /// stamp it instead of reading a clock per I/O.
    ticks: u32,
    pci: Arc<VfioPci>,
    /// The controller, for deleting the queues on drop; `None` for the admin queue.
    owner: Option<Arc<dyn QueueOwner>>,
    /// The owner's reset count, read on every submit, ring and poll: a load, not a call.
    owner_generation: Option<Arc<std::sync::atomic::AtomicU64>>,
    // Last: the rings stay mapped until the queues are deleted; leaked if deletion fails,
    // because the device might still write them.
    memory: std::mem::ManuallyDrop<DmaChunk>,
}

// SAFETY: the raw pointers point into `memory`, which the pair owns, or into the controller's
// doorbell buffers, which `owner` keeps alive; the pair is used by one thread at a time (it
// is moved to its poller thread, not shared).
unsafe impl Send for QueuePair {}

impl QueuePair {
    pub(crate) fn new(
        qid: u16,
        layout: Layout,
        memory: DmaChunk,
        pci: Arc<VfioPci>,
        doorbell_stride: usize,
        max_transfer: u64,
    ) -> Self {
        // Zero the CQ: phase tags start at 0 and the first pass expects 1.
        memory.write_bytes(
            layout.cq_offset,
            &vec![0u8; usize::from(layout.entries) * 16],
        );
        Self::over(qid, layout, memory, pci, doorbell_stride, max_transfer)
    }

    /// A queue pair whose queues the controller already has, taken over from another
    /// process with nothing in flight: the rings stay as they are in `memory` (not zeroed),
    /// the positions continue from `state`. The caller checked `state` against the layout.
    pub(crate) fn adopt(
        state: &QueueRecord,
        layout: Layout,
        memory: DmaChunk,
        pci: Arc<VfioPci>,
        doorbell_stride: usize,
        max_transfer: u64,
    ) -> Self {
        let mut qp = Self::over(
            state.qid,
            layout,
            memory,
            pci,
            doorbell_stride,
            max_transfer,
        );
        qp.sq_tail = state.sq_tail;
        qp.sq_head = state.sq_head;
        qp.rung_tail = state.sq_tail;
        qp.cq_head = state.cq_head;
        qp.phase = state.phase;
        qp
    }

    /// A pair over `memory` laid out as `layout`, at the positions of a fresh queue.
    fn over(
        qid: u16,
        layout: Layout,
        memory: DmaChunk,
        pci: Arc<VfioPci>,
        doorbell_stride: usize,
        max_transfer: u64,
    ) -> Self {
        let base = memory.as_ptr();
        let slots = usize::from(layout.entries) - 1;
        // SAFETY: offsets are within the buffer by construction of `layout`.
        let (cq, lists) = unsafe { (base.add(layout.cq_offset), base.add(layout.lists_offset)) };
        let q = usize::from(qid);
        Self {
            qid,
            entries: layout.entries,
            sq: base.cast(),
            cq: cq.cast(),
            sq_tail: 0,
            sq_head: 0,
            rung_tail: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: crate::regs::offset::DOORBELLS + (2 * q) * doorbell_stride,
            cq_doorbell: crate::regs::offset::DOORBELLS + (2 * q + 1) * doorbell_stride,
            slots: vec![Slot::default(); slots].into_boxed_slice(),
            // Lowest cid first, so a lightly loaded queue touches few slots.
            free: (0..slots as u16).rev().collect(),
            lists,
            lists_iova: memory.iova() + layout.lists_offset as u64,
            layout,
            max_transfer,
            spurious: 0,
            drop_after: None,
            hold_after: None,
            generation: 0,
            aborted: Vec::with_capacity(slots),
            lost: false,
            sgl: false,
            sgl_commands: 0,
            shadow: None,
            doorbells_skipped: 0,
            ticks: 0,
            pci,
            owner: None,
            owner_generation: None,
            memory: std::mem::ManuallyDrop::new(memory),
        }
    }

    /// What a process taking this pair over needs ([`QueuePair::adopt`]), or why it cannot:
    /// commands in flight, or queues lost in a reset.
    pub(crate) fn record(&self) -> Result<QueueRecord, String> {
        if self.in_flight() > 0 || !self.aborted.is_empty() || self.lost {
            return Err(format!(
                "queue {}: {} command(s) in flight, {} aborted unreported, lost {}",
                self.qid,
                self.in_flight(),
                self.aborted.len(),
                self.lost
            ));
        }
        if self.rung_tail != self.sq_tail || self.sq_head != self.sq_tail {
            return Err(format!(
                "queue {}: SQ tail {} rung {} head {}: not every command was consumed",
                self.qid, self.sq_tail, self.rung_tail, self.sq_head
            ));
        }
        Ok(self.live_record())
    }

    /// Whether the CQ ring agrees with the head and phase the pair was given: with nothing
    /// in flight, the entry at the head is not a new completion, and the one before it was
    /// written in the current pass (or, at head 0, in the previous one).
    pub(crate) fn phase_consistent(&self) -> bool {
        let phase_at = |i: u16| {
            // SAFETY: i < entries; the CQ ring is read volatile.
            let status = unsafe {
                std::ptr::addr_of!((*self.cq.add(usize::from(i))).status).read_volatile()
            };
            status & 1 == 1
        };
        let before = (self.cq_head + self.entries - 1) % self.entries;
        let expected_before = if self.cq_head == 0 {
            !self.phase
        } else {
            self.phase
        };
        phase_at(self.cq_head) != self.phase && phase_at(before) == expected_before
    }

    /// Whether the CQ ring agrees with positions taken from a record written by a process
    /// that may have died with `outstanding` commands out: the entries from the head on may
    /// be new for the outstanding ones only, the one after them must not be, and the last
    /// entry read must be of the current pass and, with nothing outstanding, report the SQ
    /// head at the recorded tail. A record behind the controller fails one of these (but
    /// for one exactly whole passes behind, which the tail check still catches unless the
    /// SQ wrapped too).
    pub(crate) fn agrees_with_cq(&self, outstanding: u16) -> Result<(), String> {
        let entries = self.entries;
        let status_at = |i: u16| {
            // SAFETY: i < entries; the CQ ring is read volatile.
            unsafe { std::ptr::addr_of!((*self.cq.add(usize::from(i))).status).read_volatile() }
        };
        // The phase a completion posted at `cq_head + k` carries.
        let new_phase = |k: u16| {
            if u32::from(self.cq_head) + u32::from(k) >= u32::from(entries) {
                !self.phase
            } else {
                self.phase
            }
        };
        let beyond = (self.cq_head + outstanding) % entries;
        if (status_at(beyond) & 1 == 1) == new_phase(outstanding) {
            return Err(format!(
                "a completion at CQ entry {beyond}, past the {outstanding} outstanding from head {}: the record is behind",
                self.cq_head
            ));
        }
        let last = (self.cq_head + entries - 1) % entries;
        let last_phase = if self.cq_head == 0 {
            !self.phase
        } else {
            self.phase
        };
        if (status_at(last) & 1 == 1) != last_phase {
            return Err(format!(
                "CQ entry {last}, the last one read, is not of the current pass (phase {})",
                self.phase
            ));
        }
        if outstanding == 0 {
            // SAFETY: last < entries; read volatile after its phase was seen.
            let cqe = unsafe { self.cq.add(usize::from(last)).read_volatile() };
            if cqe.sq_head % entries != self.sq_tail {
                return Err(format!(
                    "the last completion reports SQ head {}, the record's tail is {}",
                    cqe.sq_head, self.sq_tail
                ));
            }
        }
        Ok(())
    }

    /// Where the pair stands now, commands in flight or not (a kept record: see
    /// `KeptController`).
    pub(crate) fn live_record(&self) -> QueueRecord {
        let (arena, offset, len) = self.memory.location();
        QueueRecord {
            qid: self.qid,
            entries: self.entries,
            memory: ChunkRecord {
                arena: arena as u32,
                offset: offset as u64,
                len: len as u64,
            },
            sq_tail: self.sq_tail,
            sq_head: self.sq_head,
            cq_head: self.cq_head,
            phase: self.phase,
        }
    }

    /// Writes the SQ tail doorbell with the tail the pair has: a command a dead process
    /// wrote but did not ring is submitted; one it rang is not submitted twice.
    pub(crate) fn ring_sq_where_left(&mut self) {
        fence(Ordering::SeqCst);
        self.pci
            .bar0()
            .write32(self.sq_doorbell, u32::from(self.sq_tail));
        self.rung_tail = self.sq_tail;
    }

    /// The generation (controller reset count) its queues were created in.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// Takes the controller reference out (a pair parked in its controller must not keep
    /// the controller alive).
    pub(crate) fn take_owner(&mut self) {
        self.owner = None;
    }

    /// Writes the SQ tail and CQ head doorbells with the positions the pair has: where a
    /// process that handed the pair over left them (the controller has those already;
    /// this only makes sure).
    pub(crate) fn ring_where_left(&mut self) {
        if let Some(sh) = self.shadow {
            // SAFETY: this queue's entries in the controller's doorbell pages.
            unsafe {
                sh.sq.write_volatile(u32::from(self.sq_tail));
                sh.cq.write_volatile(u32::from(self.cq_head));
            }
        }
        fence(Ordering::SeqCst);
        let bar = self.pci.bar0();
        bar.write32(self.sq_doorbell, u32::from(self.sq_tail));
        bar.write32(self.cq_doorbell, u32::from(self.cq_head));
    }

    /// The shadow doorbell values the controller sees for this pair (SQ tail, CQ head), if
    /// shadow doorbells are in use.
    pub(crate) fn shadow_values(&self) -> Option<(u32, u32)> {
        let sh = self.shadow?;
        // SAFETY: this queue's entries in the controller's doorbell pages.
        Some(unsafe { (sh.sq.read_volatile(), sh.cq.read_volatile()) })
    }

    /// Empties both rings (after the controller forgot them in a reset).
    pub(crate) fn reset_rings(&mut self) {
        self.sq_tail = 0;
        self.sq_head = 0;
        self.rung_tail = 0;
        self.cq_head = 0;
        self.phase = true;
        let cq_bytes = usize::from(self.entries) * 16;
        // SAFETY: the CQ ring lies within our memory; the device does not own it now.
        unsafe { std::ptr::write_bytes(self.cq as *mut u8, 0, cq_bytes) };
        // The SQ too: no old command stays where a wrong tail could make it run again.
        // SAFETY: the SQ ring (entries commands) lies within our memory, not the device's now.
        unsafe { std::ptr::write_bytes(self.sq, 0, usize::from(self.entries)) };
    }

    /// Forgets every command in flight (admin queue after a reset: nobody waits for them).
    pub(crate) fn abandon_all(&mut self) {
        for (cid, slot) in self.slots.iter_mut().enumerate() {
            if slot.busy {
                slot.busy = false;
                self.free.push(cid as u16);
            }
        }
    }

    pub(crate) fn set_shadow(&mut self, shadow: Option<ShadowDoorbells>) {
        self.shadow = shadow;
    }

    /// MMIO doorbell writes the shadow doorbells made unnecessary.
    pub fn doorbells_skipped(&self) -> u64 {
        self.doorbells_skipped
    }

    /// Whether this pair uses shadow doorbells.
    pub fn uses_shadow_doorbells(&self) -> bool {
        self.shadow.is_some()
    }

    /// Publishes a new SQ tail or CQ head: to the shadow buffer, and to the MMIO doorbell
    /// unless the event index says the controller will find it itself.
    fn doorbell(&mut self, cq: bool, old: u16, new: u16) {
        if let Some(sh) = self.shadow {
            let (shadow, event) = if cq {
                (sh.cq, sh.cq_event)
            } else {
                (sh.sq, sh.sq_event)
            };
            // SAFETY: the pointers address this queue's entries in the controller's doorbell
            // buffers, which live as long as the controller (held through `owner`).
            unsafe { shadow.write_volatile(u32::from(new)) };
            // The shadow value must be visible before the event index is read (Linux: mb()).
            fence(Ordering::SeqCst);
            // SAFETY: as above.
            let event = unsafe { event.read_volatile() } as u16;
            if !need_event(event, new, old) {
                self.doorbells_skipped += 1;
                return;
            }
        }
        let offset = if cq {
            self.cq_doorbell
        } else {
            self.sq_doorbell
        };
        self.pci.bar0().write32(offset, u32::from(new));
    }

    pub(crate) fn set_sgl(&mut self, supported: bool) {
        self.sgl = supported;
    }

    /// Commands sent with SGLs so far.
    pub fn sgl_commands(&self) -> u64 {
        self.sgl_commands
    }

    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// The controller this I/O pair belongs to, and its reset count.
    pub(crate) fn set_owner(
        &mut self,
        owner: Arc<dyn QueueOwner>,
        generation: Arc<std::sync::atomic::AtomicU64>,
    ) {
        self.owner = Some(owner);
        self.owner_generation = Some(generation);
    }

    /// If the controller was reset since this pair's queues were created, creates them
    /// again and queues every command that was in flight for an aborted completion. One
    /// atomic load when nothing happened.
    #[inline]
    fn follow_resets(&mut self) {
        let Some(generation) = &self.owner_generation else {
            return;
        };
        if generation.load(std::sync::atomic::Ordering::Acquire) == self.generation {
            return;
        }
        self.recreate_after_reset();
    }

    #[cold]
    fn recreate_after_reset(&mut self) {
        let Some(owner) = self.owner.clone() else {
            return;
        };
        for (cid, slot) in self.slots.iter().enumerate() {
            if slot.busy && !self.aborted.contains(&(cid as u16)) {
                self.aborted.push(cid as u16);
            }
        }
        self.reset_rings();
        match owner.create_io_queues(self.qid, self.entries, self.cq_iova(), self.sq_iova()) {
            Ok(generation) => {
                self.generation = generation;
                self.lost = false;
            }
            Err(e) => {
                if !self.lost {
                    tracing::error!(
                        error = &e as &dyn std::error::Error,
                        "queue {} not recreated after reset: {e}",
                        self.qid
                    );
                }
                self.lost = true;
            }
        }
    }

    /// Queue id (0 is the admin queue).
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// IOVA of the SQ ring.
    pub(crate) fn sq_iova(&self) -> u64 {
        self.memory.iova()
    }

    /// IOVA of the CQ ring.
    pub(crate) fn cq_iova(&self) -> u64 {
        self.memory.iova() + self.layout.cq_offset as u64
    }

    /// Ring entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Commands that can be in flight at once (one ring slot always stays empty).
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Completions seen for command ids that were not in flight (a device bug; counted, ignored).
    pub fn spurious_completions(&self) -> u64 {
        self.spurious
    }

    /// Largest transfer in bytes.
    pub fn max_transfer(&self) -> u64 {
        self.max_transfer
    }

    /// Queues a command with no data (or data pointers already set); `cmd.cid` is assigned.
    pub fn submit(&mut self, mut cmd: Command, token: u64) -> Result<u16, SubmitError> {
        self.follow_resets();
        if self.lost {
            return Err(SubmitError::QueueLost);
        }
        let cid = *self.free.last().ok_or(SubmitError::QueueFull)?;
        // The ring may be full while slots are free if the device has not reported SQ head.
        let next_tail = (self.sq_tail + 1) % self.entries;
        if next_tail == self.sq_head {
            return Err(SubmitError::QueueFull);
        }
        self.free.pop();
        cmd.cid = cid;
        self.slots[usize::from(cid)] = Slot {
            token,
            opcode: cmd.opcode,
            busy: true,
            tick: self.ticks,
        };
        // SAFETY: sq_tail < entries; the SQ ring is ours to write at the tail.
        unsafe { self.sq.add(usize::from(self.sq_tail)).write_volatile(cmd) };
        self.sq_tail = next_tail;
        Ok(cid)
    }

    fn slot_list(&self, cid: u16) -> (*mut u64, u64) {
        let bytes = usize::from(cid) * self.layout.list_pages * self.layout.page;
        // SAFETY: cid < slots, so the slot's list pages lie within the lists area.
        let ptr = unsafe { self.lists.add(bytes) };
        (ptr.cast(), self.lists_iova + bytes as u64)
    }

    fn submit_data(
        &mut self,
        mut cmd: Command,
        data: &[DmaSegment],
        expected_len: u64,
        token: u64,
    ) -> Result<u16, SubmitError> {
        if expected_len > self.max_transfer {
            return Err(SubmitError::TooLarge {
                len: expected_len,
                max: self.max_transfer,
            });
        }
        let cid = *self.free.last().ok_or(SubmitError::QueueFull)?;
        let (list, list_iova) = self.slot_list(cid);
        // SAFETY: the slot's list pages are ours while the slot is free (and then in flight).
        let built = unsafe {
            prp::build(
                data,
                self.layout.page as u64,
                list,
                list_iova,
                self.layout.list_pages,
            )
        };
        let (dptr_lo, dptr_hi, len) = match built {
            Ok(prps) => (prps.prp1, prps.prp2, prps.len),
            Err(PrpError::Gap | PrpError::Unaligned) if self.sgl => {
                let capacity = self.layout.list_pages * self.layout.page / 16;
                // SAFETY: as above; the same pages hold SGL descriptors instead.
                let (lo, hi, len) = unsafe { sgl::build(data, list.cast(), list_iova, capacity) }
                    .map_err(SubmitError::Prp)?;
                cmd.flags |= PSDT_SGL;
                (lo, hi, len)
            }
            Err(e) => return Err(SubmitError::Prp(e)),
        };
        if len != expected_len {
            return Err(SubmitError::LengthMismatch {
                buffer: len,
                blocks: expected_len,
            });
        }
        cmd.prp1 = dptr_lo;
        cmd.prp2 = dptr_hi;
        let cid = self.submit(cmd, token)?;
        self.sgl_commands += u64::from(cmd.flags & PSDT_SGL != 0);
        Ok(cid)
    }

    /// Queues a Read of `blocks` blocks of `block_shift` (log2 block size) at `lba` into `data`.
    pub fn read(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        block_shift: u8,
        data: &[DmaSegment],
        token: u64,
    ) -> Result<u16, SubmitError> {
        self.rw(
            nvm::READ,
            nsid,
            lba,
            blocks,
            block_shift,
            data,
            token,
            false,
        )
    }

    /// Queues a Write of `blocks` blocks at `lba` from `data`.
    pub fn write(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        block_shift: u8,
        data: &[DmaSegment],
        token: u64,
    ) -> Result<u16, SubmitError> {
        self.rw(
            nvm::WRITE,
            nsid,
            lba,
            blocks,
            block_shift,
            data,
            token,
            false,
        )
    }

    /// Queues a Write with Force Unit Access: complete only once the data is on
    /// non-volatile media (what a writethrough device needs).
    #[allow(clippy::too_many_arguments)]
    pub fn write_fua(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        block_shift: u8,
        data: &[DmaSegment],
        token: u64,
    ) -> Result<u16, SubmitError> {
        self.rw(
            nvm::WRITE,
            nsid,
            lba,
            blocks,
            block_shift,
            data,
            token,
            true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn rw(
        &mut self,
        opcode: u8,
        nsid: u32,
        lba: u64,
        blocks: u32,
        block_shift: u8,
        data: &[DmaSegment],
        token: u64,
        fua: bool,
    ) -> Result<u16, SubmitError> {
        if !(1..=65536).contains(&blocks) {
            return Err(SubmitError::BadCount);
        }
        let len = u64::from(blocks) << block_shift;
        let mut command = Command::rw(opcode, nsid, lba, blocks);
        if fua {
            command = command.with_fua();
        }
        self.submit_data(command, data, len, token)
    }

    /// Queues a Flush of the namespace's volatile write cache.
    pub fn flush(&mut self, nsid: u32, token: u64) -> Result<u16, SubmitError> {
        self.submit(Command::new(nvm::FLUSH, nsid), token)
    }

    /// Queues a Write Zeroes of `blocks` (1..=65536) blocks at `lba`.
    pub fn write_zeroes(
        &mut self,
        nsid: u32,
        lba: u64,
        blocks: u32,
        token: u64,
    ) -> Result<u16, SubmitError> {
        if !(1..=65536).contains(&blocks) {
            return Err(SubmitError::BadCount);
        }
        self.submit(Command::rw(nvm::WRITE_ZEROES, nsid, lba, blocks), token)
    }

    /// Queues a Dataset Management deallocate of up to 256 `(lba, blocks)` ranges. The range
    /// list goes to the slot's preallocated page.
    pub fn deallocate(
        &mut self,
        nsid: u32,
        ranges: &[(u64, u32)],
        token: u64,
    ) -> Result<u16, SubmitError> {
        if ranges.is_empty() || ranges.len() > 256 || ranges.len() * 16 > self.layout.page {
            return Err(SubmitError::BadCount);
        }
        let cid = *self.free.last().ok_or(SubmitError::QueueFull)?;
        let (list, list_iova) = self.slot_list(cid);
        let list: *mut DsmRange = list.cast();
        for (i, &(lba, blocks)) in ranges.iter().enumerate() {
            // SAFETY: at most 256 ranges of 16 bytes fit the slot's first list page.
            unsafe {
                list.add(i).write(DsmRange {
                    attributes: 0,
                    blocks,
                    lba,
                })
            };
        }
        self.submit(
            Command::deallocate(nsid, ranges.len() as u32, list_iova),
            token,
        )
    }

    /// Rings the SQ tail doorbell if commands were queued since the last ring.
    pub fn ring(&mut self) {
        self.follow_resets();
        if self.rung_tail == self.sq_tail || self.lost {
            return;
        }
        // Commands and PRP lists must be visible to the device before it sees the new tail.
        fence(Ordering::SeqCst);
        let (old, new) = (self.rung_tail, self.sq_tail);
        self.doorbell(false, old, new);
        self.rung_tail = new;
    }

    /// Reaps up to `max` completions, calling `each` for every one, and rings the CQ head
    /// doorbell once if any were reaped. Returns how many were reaped.
    pub fn poll(&mut self, max: usize, mut each: impl FnMut(IoCompletion)) -> usize {
        self.follow_resets();
        let mut reaped = 0;
        while reaped < max {
            let Some(cid) = self.aborted.pop() else { break };
            let slot = &mut self.slots[usize::from(cid)];
            slot.busy = false;
            self.free.push(cid);
            reaped += 1;
            each(IoCompletion {
                token: slot.token,
                cid,
                status: Status::ABORTED_BY_RESET,
                result: 0,
            });
        }
        if self.lost {
            return reaped;
        }
        let old_head = self.cq_head;
        while reaped < max {
            if self.hold_after == Some(0) {
                break;
            }
            // SAFETY: cq_head < entries; the CQ ring is written by the device, read volatile.
            let entry = unsafe { self.cq.add(usize::from(self.cq_head)) };
            // SAFETY: as above; the status word is read first and alone to test the phase.
            let status = unsafe { std::ptr::addr_of!((*entry).status).read_volatile() };
            if (status & 1 == 1) != self.phase {
                break;
            }
            // The rest of the entry may only be read after the phase tag says it is new.
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let cqe = unsafe { entry.read_volatile() };
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            self.sq_head = cqe.sq_head % self.entries;
            reaped += 1;
            if let Some(n) = self.hold_after {
                self.hold_after = Some(n - 1);
                if n == 1 {
                    tracing::warn!(
                        "queue {}: fault injection holds every completion from now on",
                        self.qid
                    );
                }
            }
            if let Some(n) = self.drop_after {
                if n == 0 {
                    // The injected fault: this command never completes as far as the caller
                    // can tell; only its timeout and a reset recover it.
                    self.drop_after = None;
                    tracing::warn!(
                        "queue {}: fault injection dropped the completion of cid {}",
                        self.qid,
                        cqe.cid
                    );
                    continue;
                }
                self.drop_after = Some(n - 1);
            }
            let cid = usize::from(cqe.cid);
            match self.slots.get_mut(cid) {
                Some(slot) if slot.busy => {
                    slot.busy = false;
                    let token = slot.token;
                    self.free.push(cqe.cid);
                    each(IoCompletion {
                        token,
                        cid: cqe.cid,
                        status: Status::from_completion(cqe.status),
                        result: cqe.dw0,
                    });
                }
                _ => self.spurious += 1,
            }
        }
        if reaped > 0 {
            self.doorbell(true, old_head, self.cq_head);
        }
        reaped
    }

    /// Advances the timeout clock by one tick (call it at a fixed period, e.g. every 100 ms)
    /// and returns the command in flight the longest if it is older than `limit` ticks.
    pub fn tick(&mut self, limit: u32) -> Option<StuckCommand> {
        self.ticks = self.ticks.wrapping_add(1);
        let (cid, age) = oldest(&self.slots, self.ticks)?;
        let slot = &self.slots[cid];
        (age > limit).then_some(StuckCommand {
            cid: cid as u16,
            token: slot.token,
            opcode: slot.opcode,
            age,
        })
    }

    /// Fault injection for tests: after `after` more completions, one is dropped as if the
    /// device had lost it (its command stays in flight until a timeout and a reset).
    pub fn inject_lost_completion(&mut self, after: u64) {
        self.drop_after = Some(after);
    }

    /// Fault injection for tests: after `after` more completions, none is read any more
    /// (the commands stay in flight, their completions in the CQ).
    pub fn inject_held_completions(&mut self, after: u64) {
        self.hold_after = Some(after);
    }

    /// Opcode of the command in flight under `cid`, if any.
    pub fn opcode_of(&self, cid: u16) -> Option<u8> {
        self.slots
            .get(usize::from(cid))
            .filter(|s| s.busy)
            .map(|s| s.opcode)
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        if let Some(owner) = self.owner.take() {
            if owner.generation() != self.generation || owner.is_lent() {
                // A reset already removed the controller's queues (and their DMA), or a
                // lend disabled the controller, which is not ours to command now.
                owner.release_qid(self.qid);
            } else if let Err(e) = owner.delete_io_queues(self.qid) {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "{e}; leaking the memory of queue {}",
                    self.qid
                );
                return;
            }
        }
        // SAFETY: the device no longer uses the rings (queues deleted, or for the admin queue
        // the controller disabled before the pair is dropped); `memory` is not used again.
        unsafe { std::mem::ManuallyDrop::drop(&mut self.memory) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_index_rule() {
        // The controller asked to be told when the tail passes 5.
        assert!(need_event(5, 6, 4), "moved from 4 to 6: passed 5");
        assert!(need_event(5, 6, 5), "moved from 5 to 6: passed 5");
        assert!(!need_event(5, 5, 4), "reached 5, not past it");
        assert!(
            !need_event(9, 6, 4),
            "the controller is already polling up to 9"
        );
        // Wraparound of the 16-bit counters.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(!need_event(3, 2, 0xfffe));
    }

    #[test]
    fn oldest_busy_slot_wins_across_wraparound() {
        let mut slots = [Slot::default(); 4];
        assert_eq!(oldest(&slots, 10), None);
        slots[1] = Slot {
            busy: true,
            tick: u32::MAX - 1,
            ..Default::default()
        };
        slots[2] = Slot {
            busy: true,
            tick: 3,
            ..Default::default()
        };
        slots[3] = Slot {
            busy: false,
            tick: 0,
            ..Default::default()
        };
        // Now = 5 after the counter wrapped: slot 1 is 7 ticks old, slot 2 is 2.
        assert_eq!(oldest(&slots, 5), Some((1, 7)));
    }

    #[test]
    fn layout_fits_rings_and_lists() {
        // QEMU: MDTS 7 with 4 KiB pages = 512 KiB transfers.
        let l = Layout::new(256, 4096, 512 << 10);
        assert_eq!(l.cq_offset, 16384);
        assert_eq!(l.lists_offset, 16384 + 4096);
        assert_eq!(l.list_pages, 1);
        assert_eq!(l.total, 16384 + 4096 + 255 * 4096);
        // 2 MiB transfers need 513 entries: two chained list pages.
        assert_eq!(Layout::new(64, 4096, 2 << 20).list_pages, 2);
    }
}
