//! Packed virtqueues (virtio 1.1 §2.7), the device side, beside the split [`crate::virtq`]
//! (the driver side is [`crate::packed_driver`]). One ring of descriptors serves both
//! directions: the driver marks a descriptor available by setting its AVAIL flag to its wrap
//! counter and USED to the opposite; the device returns a buffer by writing a used
//! descriptor (its id, the bytes written, AVAIL and USED both equal to the device's wrap
//! counter) at its own used position. The flags word is the handshake: read with acquire
//! before the rest of a descriptor, written last with release.
//!
//! Every chain's buffer id must be below the queue size and not already in flight: the
//! device keeps, per id, how many ring descriptors its chain took (the used position
//! advances by that many when it is returned), so a driver lying about ids is refused at
//! [`PackedQueue::pop`] instead of desynchronising the ring.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use crate::memory::GuestMemory;
use crate::virtq::{DESC_F_NEXT, DESC_F_WRITE, MAX_QUEUE_SIZE};
use crate::{Error, Result};

/// Descriptor flag: available, when equal to the driver's wrap counter.
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag: used, when equal to the device's wrap counter.
pub const DESC_F_USED: u16 = 1 << 15;

/// Event suppression flags: notify at every event.
pub const EVENT_F_ENABLE: u16 = 0;
/// Event suppression flags: never notify.
pub const EVENT_F_DISABLE: u16 = 1;
/// Event suppression flags: notify when the position in `desc` is reached (only with
/// VIRTIO_F_RING_EVENT_IDX).
pub const EVENT_F_DESC: u16 = 2;

/// Feature bit of packed virtqueues (virtio 1.1 §6): offered only by a device that asks for
/// it in [`crate::device::Device::features`].
pub const VIRTIO_F_RING_PACKED: u32 = 34;

/// Bytes of an event suppression structure: `desc` (offset in bits 0-14, wrap counter in
/// bit 15) then `flags`, both little-endian u16.
pub const EVENT_BYTES: usize = 4;

/// A packed descriptor (16 bytes) as the guest wrote it: untrusted.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PackedDescriptor {
    /// Guest-physical address (unused in a used descriptor).
    pub addr: u64,
    /// Buffer length; in a used descriptor, the bytes the device wrote.
    pub len: u32,
    /// Buffer id (meaningful in a chain's last descriptor and in used descriptors).
    pub id: u16,
    /// Flags: NEXT, WRITE, INDIRECT, AVAIL, USED.
    pub flags: u16,
}

const _: () = assert!(std::mem::size_of::<PackedDescriptor>() == 16);

impl PackedDescriptor {
    /// A descriptor with these fields.
    pub const fn new(addr: u64, len: u32, id: u16, flags: u16) -> Self {
        Self {
            addr,
            len,
            id,
            flags,
        }
    }
}

/// The AVAIL/USED bits of a descriptor the driver made available in the lap of `wrap`.
#[inline]
pub const fn avail_bits(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// The AVAIL/USED bits of a descriptor the device used in the lap of `wrap`.
#[inline]
pub const fn used_bits(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL | DESC_F_USED
    } else {
        0
    }
}

/// Whether `flags` mark a descriptor available in the lap of `wrap`.
#[inline]
pub const fn is_avail(flags: u16, wrap: bool) -> bool {
    flags & (DESC_F_AVAIL | DESC_F_USED) == avail_bits(wrap)
}

/// Whether `flags` mark a descriptor used in the lap of `wrap`.
#[inline]
pub const fn is_used(flags: u16, wrap: bool) -> bool {
    flags & (DESC_F_AVAIL | DESC_F_USED) == used_bits(wrap)
}

/// A ring position: an index below the queue size and the wrap counter of its lap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Index in the ring.
    pub index: u16,
    /// Wrap counter (starts at 1, flips each time the index passes the end).
    pub wrap: bool,
}

impl Position {
    /// Where both sides start.
    pub const START: Self = Self {
        index: 0,
        wrap: true,
    };

    /// `n` descriptors further along a ring of `size`.
    #[inline]
    pub fn advance(self, n: u16, size: u16) -> Self {
        let next = u32::from(self.index) + u32::from(n);
        if next >= u32::from(size) {
            Self {
                index: (next - u32::from(size)) as u16,
                wrap: !self.wrap,
            }
        } else {
            Self {
                index: next as u16,
                wrap: self.wrap,
            }
        }
    }

    /// The event suppression encoding: index in bits 0-14, wrap counter in bit 15.
    pub fn to_event(self) -> u16 {
        self.index | (u16::from(self.wrap) << 15)
    }

    /// The position a [`Position::to_event`] value encodes.
    pub fn from_event(event: u16) -> Self {
        Self {
            index: event & 0x7fff,
            wrap: event & 0x8000 != 0,
        }
    }

    /// Position on a line of two laps (`0..2 * size`), where distances are plain modular
    /// differences: a lap with wrap counter 1 first, then one with 0.
    #[inline]
    fn linear(self, size: u16) -> u32 {
        u32::from(self.index) + if self.wrap { 0 } else { u32::from(size) }
    }
}

/// Whether publishing from `old` to `new` passes the driver's event position `event`
/// (`vring_need_event` on the two-lap line of a packed ring: the event lies in
/// `[old, new)`).
pub fn packed_need_event(event: u16, new: Position, old: Position, size: u16) -> bool {
    let laps = 2 * u32::from(size);
    let event = Position::from_event(event).linear(size) % laps;
    let (new, old) = (new.linear(size), old.linear(size));
    let dist = |a: u32, b: u32| (a + laps - b) % laps;
    dist(new, event).wrapping_sub(1) < dist(new, old)
}

/// A chain taken from the ring, not walked yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedChain {
    /// Ring index of its first descriptor.
    pub start: u16,
    /// Ring descriptors it takes (1 for an indirect table).
    pub count: u16,
    /// Its buffer id (from its last descriptor), below the queue size.
    pub id: u16,
}

/// The device side of a packed virtqueue.
pub struct PackedQueue {
    size: u16,
    desc: *mut PackedDescriptor,
    /// Written by the driver: when it wants to be notified of used buffers.
    driver_event: *const u8,
    /// Written by us: when we want to be kicked.
    device_event: *mut u8,
    next_avail: Position,
    next_used: Position,
    /// Per buffer id: ring descriptors its chain took, 0 when not in flight.
    chain_len: Box<[u16]>,
    /// The first used descriptor of the batch being pushed and its flags, written last (in
    /// `publish_used`) so the driver sees the batch at once.
    batch_head: Option<(u16, u16)>,
    /// Used position at the last notification check.
    signalled_used: Position,
    event_idx: bool,
}

// SAFETY: the pointers address guest memory mapped for the connection's lifetime; the queue
// is owned by one poller thread at a time.
unsafe impl Send for PackedQueue {}

impl PackedQueue {
    /// A queue of `size` entries whose descriptor ring and driver and device event structures
    /// sit at the given frontend virtual addresses (SET_VRING_ADDR's desc, avail and used
    /// addresses).
    pub fn new(
        mem: &GuestMemory,
        size: u16,
        desc: u64,
        driver_event: u64,
        device_event: u64,
        event_idx: bool,
    ) -> Result<Self> {
        // Packed rings need not be a power of two.
        if size == 0 || size > MAX_QUEUE_SIZE {
            return Err(Error::QueueSize(size));
        }
        if desc % 16 != 0 || driver_event % 4 != 0 || device_event % 4 != 0 {
            return Err(Error::MisalignedRings {
                desc,
                avail: driver_event,
                used: device_event,
            });
        }
        let t = |addr: u64, len: usize, ring: &'static str| {
            mem.translate_frontend(addr, len as u64)
                .ok_or(Error::RingOutsideMemory { ring, addr, len })
        };
        let desc_host = t(desc, 16 * usize::from(size), "descriptor")?;
        let driver_host = t(driver_event, EVENT_BYTES, "driver event")?;
        let device_host = t(device_event, EVENT_BYTES, "device event")?;
        // Atomics on misaligned host addresses are undefined behaviour (a region whose
        // frontend address is odd).
        if desc_host as usize % 16 != 0
            || driver_host as usize % 4 != 0
            || device_host as usize % 4 != 0
        {
            return Err(Error::MisalignedRings {
                desc,
                avail: driver_event,
                used: device_event,
            });
        }
        Ok(Self {
            size,
            desc: desc_host.cast(),
            driver_event: driver_host,
            device_event: device_host,
            next_avail: Position::START,
            next_used: Position::START,
            chain_len: vec![0; usize::from(size)].into_boxed_slice(),
            batch_head: None,
            signalled_used: Position::START,
            event_idx,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Next position to take a chain from.
    pub fn next_avail(&self) -> Position {
        self.next_avail
    }

    /// Next position to write a used descriptor at.
    pub fn next_used(&self) -> Position {
        self.next_used
    }

    /// The vhost-user GET_VRING_BASE value: next avail index (bits 0-14) and wrap counter
    /// (bit 15), next used index (bits 16-30) and wrap counter (bit 31).
    pub fn base(&self) -> u32 {
        u32::from(self.next_avail.to_event()) | (u32::from(self.next_used.to_event()) << 16)
    }

    /// Sets both positions from a SET_VRING_BASE value (see [`PackedQueue::base`]); `Err`
    /// for an index outside the ring. Nothing may be in flight.
    pub fn set_base(&mut self, base: u32) -> Result<()> {
        let (avail, used) = (
            Position::from_event(base as u16),
            Position::from_event((base >> 16) as u16),
        );
        if avail.index >= self.size || used.index >= self.size {
            return Err(Error::PackedBase {
                base,
                size: self.size,
            });
        }
        self.next_avail = avail;
        self.next_used = used;
        self.signalled_used = used;
        self.chain_len.fill(0);
        Ok(())
    }

    fn flags_atomic(&self, index: u16) -> &AtomicU16 {
        debug_assert!(index < self.size);
        // SAFETY: index < size: the flags word (offset 14, 2-aligned) of a descriptor inside
        // the ring.
        unsafe { &*(self.desc.add(usize::from(index)).cast::<u8>().add(14) as *const AtomicU16) }
    }

    /// Reads ring descriptor `index` (`< size`; callers hold positions, always below it).
    #[inline]
    pub fn descriptor(&self, index: u16) -> PackedDescriptor {
        debug_assert!(index < self.size);
        // A wrong index reads descriptor 0 rather than past the ring (a compare, not the
        // division a modulo by a size that need not be a power of two costs).
        let index = if index < self.size { index } else { 0 };
        // SAFETY: index < size: inside the descriptor ring, 16-aligned (checked at set-up).
        unsafe { self.desc.add(usize::from(index)).read_volatile() }
    }

    /// Whether the driver has made a chain available that we have not taken.
    #[inline]
    pub fn has_avail(&self) -> bool {
        let flags = self
            .flags_atomic(self.next_avail.index)
            .load(Ordering::Acquire);
        is_avail(flags, self.next_avail.wrap)
    }

    /// Takes the next available chain: finds its end (the first descriptor without NEXT,
    /// within one lap of the ring) and its buffer id. `Err` for a chain that never ends or
    /// an id that is out of range or already in flight: the ring cannot be trusted further.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<PackedChain>> {
        let start = self.next_avail;
        // Acquire: the driver wrote the head's flags last, with release; the chain's other
        // descriptors are visible once they read available.
        let flags = self.flags_atomic(start.index).load(Ordering::Acquire);
        if !is_avail(flags, start.wrap) {
            return Ok(None);
        }
        let mut pos = start;
        let mut count = 0u16;
        let id = loop {
            let d = self.descriptor(pos.index);
            count += 1;
            pos = pos.advance(1, self.size);
            if d.flags & DESC_F_NEXT == 0 {
                break d.id;
            }
            if count == self.size {
                return Err(Error::PackedChainUnterminated {
                    start: start.index,
                    size: self.size,
                });
            }
        };
        if id >= self.size {
            return Err(Error::HeadOutOfRange {
                head: id,
                size: self.size,
            });
        }
        let slot = &mut self.chain_len[usize::from(id)];
        if *slot != 0 {
            return Err(Error::BufferIdInFlight { id });
        }
        *slot = count;
        self.next_avail = pos;
        Ok(Some(PackedChain {
            start: start.index,
            count,
            id,
        }))
    }

    /// Marks buffer `id` in flight with a chain of `count` ring descriptors, without taking
    /// it from the ring (a chain recovered from the inflight region). `false` for an id out
    /// of range, already in flight, or a count that is not a chain's.
    pub fn adopt(&mut self, id: u16, count: u16) -> bool {
        match self.chain_len.get_mut(usize::from(id)) {
            Some(slot) if *slot == 0 && count != 0 && count <= self.size => {
                *slot = count;
                true
            }
            _ => false,
        }
    }

    /// Writes the used descriptor for buffer `id` with `len` bytes written, and moves the
    /// used position past its chain. The first of a batch becomes visible only at
    /// [`PackedQueue::publish_used`]. `false` (nothing written) for an id not in flight.
    #[inline]
    pub fn push_used(&mut self, id: u16, len: u32) -> bool {
        let Some(slot) = self.chain_len.get_mut(usize::from(id)) else {
            return false;
        };
        let count = std::mem::replace(slot, 0);
        if count == 0 {
            return false;
        }
        let at = self.next_used;
        // WRITE says `len` is meaningful (the spec leaves it reserved otherwise).
        let flags = used_bits(at.wrap) | if len > 0 { DESC_F_WRITE } else { 0 };
        // SAFETY: at.index < size: inside the ring; the fields before the flags word.
        unsafe {
            let d = self.desc.add(usize::from(at.index));
            std::ptr::addr_of_mut!((*d).len).write_volatile(len);
            std::ptr::addr_of_mut!((*d).id).write_volatile(id);
        }
        if self.batch_head.is_none() {
            self.batch_head = Some((at.index, flags));
        } else {
            // Release: id and len before the flags. The driver looks at this one only after
            // the batch's first, which is written last.
            self.flags_atomic(at.index).store(flags, Ordering::Release);
        }
        self.next_used = at.advance(count, self.size);
        true
    }

    /// Makes the batch pushed so far visible: the first used descriptor's flags, with
    /// release (every used descriptor and the data written into the buffers come first).
    #[inline]
    pub fn publish_used(&mut self) {
        if let Some((index, flags)) = self.batch_head.take() {
            self.flags_atomic(index).store(flags, Ordering::Release);
        }
    }

    /// Whether the driver wants a notification for what was published since the last check
    /// (its event suppression structure: DISABLE, ENABLE, or with EVENT_IDX a position to
    /// pass).
    pub fn needs_notification(&mut self) -> bool {
        // The used flags must be visible before we read the driver's suppression.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let old = std::mem::replace(&mut self.signalled_used, new);
        // SAFETY: the driver event structure (4 bytes, 4-aligned): desc at 0, flags at 2.
        let (desc, flags) = unsafe {
            (
                (self.driver_event as *const u16).read_volatile(),
                (self.driver_event.add(2) as *const u16).read_volatile(),
            )
        };
        match flags & 3 {
            EVENT_F_DISABLE => false,
            EVENT_F_DESC if self.event_idx => packed_need_event(desc, new, old, self.size),
            // ENABLE, DESC without EVENT_IDX, and the reserved value: notify (a missed
            // interrupt hangs a guest; an extra one costs it a look at the ring).
            _ => true,
        }
    }

    /// Asks the driver not to kick (we poll), or to kick again (before sleeping). Returns
    /// the offset in the device event structure of the word written.
    pub fn set_kicks(&mut self, wanted: bool) -> u64 {
        let flags = if wanted {
            EVENT_F_ENABLE
        } else {
            EVENT_F_DISABLE
        };
        // SAFETY: the flags word of the device event structure, offset 2, 2-aligned.
        unsafe { (self.device_event.add(2) as *mut u16).write_volatile(flags) };
        // The driver reads it after publishing; we re-check the ring after writing it.
        fence(Ordering::SeqCst);
        2
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The device side against the driver kit, over guest memory, including every hostile
    //! chain the split walker refuses.
    use super::*;
    use crate::chain::{ChainCursor, ChainError};
    use crate::driver::DriverBuffer;
    use crate::memory::tests::memfd;
    use crate::packed_driver::{Interrupts, PackedDriverQueue};
    use crate::virtq::DESC_F_INDIRECT;

    const GPA: u64 = 0x10000;
    const MEM: u64 = 1 << 20;
    const FRONTEND: u64 = 0x5000_0000;
    /// Buffers start here, above the rings.
    pub(crate) const BUFS: u64 = 0x20000;

    pub(crate) struct Guest {
        pub(crate) mem: std::sync::Arc<GuestMemory>,
        host: *mut u8,
        pub(crate) drv: PackedDriverQueue,
        pub(crate) dev: PackedQueue,
    }

    /// The device side of the rings `drv` laid out at `GPA`.
    fn device(mem: &GuestMemory, drv: &PackedDriverQueue, event_idx: bool) -> PackedQueue {
        let f = |gpa: u64| gpa - GPA + FRONTEND;
        PackedQueue::new(
            mem,
            drv.size(),
            f(drv.gpas.0),
            f(drv.gpas.1),
            f(drv.gpas.2),
            event_idx,
        )
        .unwrap()
    }

    /// A guest with a `size`-entry packed ring at the start of its memory.
    pub(crate) fn guest(size: u16, event_idx: bool) -> Guest {
        let mem = GuestMemory::from_table(&[(GPA, MEM, FRONTEND, 0)], vec![memfd(MEM)]).unwrap();
        let host = mem.translate(GPA, MEM).unwrap();
        // SAFETY: the region is 1 MiB, zeroed, page-aligned, mapped while `mem` lives.
        let drv = unsafe { PackedDriverQueue::new(host, GPA, size) };
        let dev = device(&mem, &drv, event_idx);
        Guest {
            mem: std::sync::Arc::new(mem),
            host,
            drv,
            dev,
        }
    }

    impl Guest {
        /// Another device side of the same rings, starting where a fresh one starts.
        pub(crate) fn device_queue(&self, event_idx: bool) -> PackedQueue {
            device(&self.mem, &self.drv, event_idx)
        }

        fn walk(
            &self,
            chain: PackedChain,
        ) -> std::result::Result<Vec<(u64, u32, bool)>, ChainError> {
            let mut out = [crate::chain::Segment::default(); 8];
            let n = ChainCursor::packed(&self.dev, &self.mem, chain).walk_into(&mut out)?;
            Ok(out[..n].iter().map(|s| (s.gpa, s.len, s.write)).collect())
        }

        /// Writes an indirect table at `gpa` (16-aligned, inside memory).
        fn write_table(&self, gpa: u64, descriptors: &[PackedDescriptor]) {
            for (i, d) in descriptors.iter().enumerate() {
                // SAFETY: inside the region (tests place tables below MEM), 16-aligned.
                unsafe {
                    self.host
                        .add((gpa - GPA) as usize)
                        .cast::<PackedDescriptor>()
                        .add(i)
                        .write(*d)
                };
            }
        }

        fn table_host(&self, gpa: u64) -> *mut u8 {
            self.mem.translate(gpa, 16).unwrap()
        }

        /// Makes `descriptors` available raw, takes them and walks them.
        fn hostile(
            &mut self,
            descriptors: &[PackedDescriptor],
        ) -> std::result::Result<Vec<(u64, u32, bool)>, ChainError> {
            self.drv.add_raw(descriptors);
            let chain = self.dev.pop().unwrap().expect("a chain");
            self.walk(chain)
        }
    }

    /// A driver buffer.
    pub(crate) fn buf(gpa: u64, len: u32, write: bool) -> DriverBuffer {
        DriverBuffer { gpa, len, write }
    }

    fn d(addr: u64, len: u32, id: u16, flags: u16) -> PackedDescriptor {
        PackedDescriptor::new(addr, len, id, flags)
    }

    #[test]
    fn chains_of_every_length_go_round_a_small_ring_for_several_laps() {
        let mut g = guest(4, false);
        // 1, 2, 3, 4 descriptors in turn: chains start at every index and span the end.
        for round in 0..24u32 {
            let n = (round % 4 + 1) as usize;
            let bufs: Vec<DriverBuffer> = (0..n)
                .map(|i| buf(BUFS + 0x1000 * i as u64, 16 + round, i + 1 == n))
                .collect();
            let start = g.drv.next_avail();
            let id = g.drv.add(&bufs).expect("the ring is empty");
            let chain = g.dev.pop().unwrap().expect("made available");
            assert_eq!(
                (chain.start, chain.count, chain.id),
                (start.index, n as u16, id)
            );
            assert_eq!(g.dev.pop().unwrap(), None);
            let shape: Vec<(u64, u32, bool)> =
                bufs.iter().map(|b| (b.gpa, b.len, b.write)).collect();
            assert_eq!(g.walk(chain).unwrap(), shape, "round {round}");
            assert!(g.dev.push_used(id, round));
            assert_eq!(g.drv.pop_used().unwrap(), None, "not published yet");
            assert!(!g.drv.has_used(), "not published yet");
            g.dev.publish_used();
            assert!(
                g.drv.has_used(),
                "published: seen across the wrap, round {round}"
            );
            assert_eq!(g.drv.pop_used().unwrap(), Some((id, round)));
            assert!(!g.drv.has_used(), "taken");
            assert_eq!(g.dev.next_used(), g.drv.next_avail());
            assert_eq!(g.drv.last_used(), g.drv.next_avail());
        }
        // 60 descriptors went round a 4-entry ring: 15 laps, so the wrap counters flipped
        // 15 times.
        assert_eq!(
            g.dev.next_avail(),
            Position {
                index: 0,
                wrap: false
            }
        );
        assert_eq!(g.drv.free_slots(), 4);
    }

    #[test]
    fn buffers_complete_out_of_order_with_their_ids() {
        let mut g = guest(8, false);
        for lap in 0..4 {
            let a = g
                .drv
                .add(&[buf(BUFS, 16, false), buf(BUFS + 16, 1, true)])
                .unwrap();
            let b = g.drv.add(&[buf(BUFS + 32, 8, true)]).unwrap();
            let c = g
                .drv
                .add(&[
                    buf(BUFS, 16, false),
                    buf(BUFS + 64, 512, true),
                    buf(BUFS + 16, 1, true),
                ])
                .unwrap();
            assert_eq!(g.drv.free_slots(), 2);
            let chains: Vec<PackedChain> = (0..3).map(|_| g.dev.pop().unwrap().unwrap()).collect();
            assert_eq!(chains.iter().map(|c| c.id).collect::<Vec<_>>(), [a, b, c]);
            // Completed c, a, b: written into the ring in that order, each with its id, in
            // the slots the chains took (a used descriptor overwrites a chain's, not
            // necessarily its own).
            assert!(g.dev.push_used(c, 513));
            assert!(g.dev.push_used(a, 1));
            g.dev.publish_used();
            assert_eq!(g.drv.pop_used().unwrap(), Some((c, 513)), "lap {lap}");
            assert_eq!(g.drv.pop_used().unwrap(), Some((a, 1)));
            assert_eq!(g.drv.pop_used().unwrap(), None);
            assert!(g.dev.push_used(b, 8));
            assert!(!g.dev.push_used(b, 8), "an id no longer in flight");
            g.dev.publish_used();
            assert_eq!(g.drv.pop_used().unwrap(), Some((b, 8)));
            assert_eq!(g.drv.free_slots(), 8);
        }
    }

    #[test]
    fn an_indirect_table_takes_one_ring_descriptor() {
        let mut g = guest(4, false);
        let table = 0x30000;
        let bufs = [
            buf(BUFS, 16, false),
            buf(BUFS + 512, 512, true),
            buf(BUFS + 16, 1, true),
        ];
        for _ in 0..6 {
            // SAFETY: the table area is inside guest memory, 16-aligned.
            let id = unsafe { g.drv.add_indirect(g.table_host(table), table, &bufs) }.unwrap();
            let chain = g.dev.pop().unwrap().unwrap();
            assert_eq!((chain.count, chain.id), (1, id));
            assert_eq!(
                g.walk(chain).unwrap(),
                vec![
                    (BUFS, 16, false),
                    (BUFS + 512, 512, true),
                    (BUFS + 16, 1, true)
                ]
            );
            assert!(g.dev.push_used(id, 1));
            g.dev.publish_used();
            assert_eq!(g.drv.pop_used().unwrap(), Some((id, 1)));
        }
        assert_eq!(
            g.dev.next_used(),
            Position {
                index: 2,
                wrap: false
            }
        );
    }

    #[test]
    fn a_ring_that_lies_is_an_error_not_a_panic() {
        // A chain with NEXT on every descriptor of the ring never ends.
        let mut g = guest(4, false);
        g.drv.add_raw(&[d(BUFS, 16, 0, DESC_F_NEXT); 4]);
        assert!(matches!(
            g.dev.pop(),
            Err(Error::PackedChainUnterminated { .. })
        ));
        // A buffer id outside the ring.
        let mut g = guest(4, false);
        g.drv.add_raw(&[d(BUFS, 16, 4, 0)]);
        assert!(matches!(
            g.dev.pop(),
            Err(Error::HeadOutOfRange { head: 4, .. })
        ));
        // The same id twice while in flight.
        let mut g = guest(4, false);
        g.drv.add_raw(&[d(BUFS, 16, 2, 0)]);
        g.drv.add_raw(&[d(BUFS, 16, 2, 0)]);
        assert!(g.dev.pop().unwrap().is_some());
        assert!(matches!(
            g.dev.pop(),
            Err(Error::BufferIdInFlight { id: 2 })
        ));
        // Only the id of the chain's last descriptor counts.
        let mut g = guest(4, false);
        g.drv
            .add_raw(&[d(BUFS, 16, 9, DESC_F_NEXT), d(BUFS, 16, 3, 0)]);
        assert_eq!(g.dev.pop().unwrap().map(|c| c.id), Some(3));
    }

    #[test]
    fn set_up_refuses_bad_sizes_misalignment_and_rings_outside_memory() {
        let mem = GuestMemory::from_table(&[(0, MEM, 0, 0)], vec![memfd(MEM)]).unwrap();
        assert!(PackedQueue::new(&mem, 0, 0, 0x1000, 0x2000, false).is_err());
        assert!(PackedQueue::new(&mem, MAX_QUEUE_SIZE + 1, 0, 0x1000, 0x2000, false).is_err());
        assert!(
            PackedQueue::new(&mem, 3, 0, 0x1000, 0x2000, false).is_ok(),
            "any size"
        );
        assert!(PackedQueue::new(&mem, 4, 8, 0x1000, 0x2000, false).is_err());
        assert!(PackedQueue::new(&mem, 4, 0, 0x1002, 0x2000, false).is_err());
        assert!(PackedQueue::new(&mem, 4, MEM - 32, 0x1000, 0x2000, false).is_err());
        assert!(PackedQueue::new(&mem, 4, 0, MEM, 0x2000, false).is_err());
    }

    #[test]
    fn hostile_chains_are_refused_like_split_ones() {
        let bad = |descriptors: &[PackedDescriptor], tables: &[(u64, &[PackedDescriptor])]| {
            let mut g = guest(8, false);
            for (gpa, t) in tables {
                g.write_table(*gpa, t);
            }
            g.hostile(descriptors)
        };
        let end = GPA + MEM;
        let w = DESC_F_WRITE;
        // Buffers outside memory, or wrapping around the address space.
        assert_eq!(
            bad(&[d(end - 100, 512, 0, w)], &[]),
            Err(ChainError::OutOfMemory)
        );
        assert_eq!(
            bad(&[d(u64::MAX - 10, 512, 0, w)], &[]),
            Err(ChainError::OutOfMemory)
        );
        assert_eq!(bad(&[d(0, 16, 0, 0)], &[]), Err(ChainError::OutOfMemory));
        // Readable after writable, direct and indirect.
        let order = [d(BUFS, 16, 0, w), d(BUFS, 16, 0, 0)];
        let mut chain = order;
        chain[0].flags |= DESC_F_NEXT;
        assert_eq!(bad(&chain, &[]), Err(ChainError::BadOrder));
        let t = 0x30000;
        assert_eq!(
            bad(&[d(t, 32, 0, DESC_F_INDIRECT)], &[(t, &order)]),
            Err(ChainError::BadOrder)
        );
        // Indirect tables: nested, with NEXT, a length not a multiple of 16, empty, more
        // entries than any queue, misaligned, outside memory.
        let ok = [d(BUFS, 16, 0, 0), d(BUFS + 16, 1, 0, w)];
        let nested = [d(t, 32, 0, DESC_F_INDIRECT)];
        let t2 = 0x31000;
        assert_eq!(
            bad(&[d(t2, 16, 0, DESC_F_INDIRECT)], &[(t, &ok), (t2, &nested)]),
            Err(ChainError::BadIndirect),
            "nested"
        );
        assert_eq!(
            bad(
                &[d(t, 32, 0, DESC_F_INDIRECT | DESC_F_NEXT), d(BUFS, 1, 0, w)],
                &[(t, &ok)]
            ),
            Err(ChainError::BadIndirect),
            "indirect with NEXT"
        );
        let indirect = |len: u32, addr: u64| bad(&[d(addr, len, 0, DESC_F_INDIRECT)], &[(t, &ok)]);
        assert_eq!(indirect(20, t), Err(ChainError::BadIndirect), "odd length");
        assert_eq!(indirect(0, t), Err(ChainError::BadIndirect), "empty");
        let huge = 16 * (u32::from(MAX_QUEUE_SIZE) + 1);
        assert_eq!(indirect(huge, t), Err(ChainError::BadIndirect), "too long");
        assert_eq!(
            indirect(32, t + 8),
            Err(ChainError::BadIndirect),
            "misaligned"
        );
        assert_eq!(
            indirect(32, end - 16),
            Err(ChainError::OutOfMemory),
            "outside"
        );
        // The table's NEXT flags and ids mean nothing: its entries are consecutive.
        let sloppy = [d(BUFS, 16, 7, DESC_F_NEXT), d(BUFS + 16, 1, 9, w)];
        assert_eq!(
            bad(&[d(t, 32, 0, DESC_F_INDIRECT)], &[(t, &sloppy)]),
            Ok(vec![(BUFS, 16, false), (BUFS + 16, 1, true)])
        );
        // More buffers than the device's buffer holds (8 in these tests).
        let long = [d(BUFS, 16, 0, 0); 9];
        assert_eq!(
            bad(&[d(t, 16 * 9, 0, DESC_F_INDIRECT)], &[(t, &long)]),
            Err(ChainError::TooLong)
        );
    }

    #[test]
    fn a_malformed_chain_is_answered_at_its_last_byte_when_it_has_one() {
        let mut g = guest(8, false);
        let t = 0x30000;
        let st = BUFS + 0x100;
        g.write_table(t, &[d(BUFS, 16, 0, 0), d(st, 4, 0, DESC_F_WRITE)]);
        // Indirect with NEXT and a stray half entry: refused by the walk, answerable.
        g.drv
            .add_raw(&[d(t, 40, 0, DESC_F_INDIRECT | DESC_F_NEXT), d(BUFS, 1, 0, 0)]);
        let chain = g.dev.pop().unwrap().unwrap();
        let cursor = ChainCursor::packed(&g.dev, &g.mem, chain);
        let mut out = [crate::chain::Segment::default(); 8];
        assert_eq!(cursor.walk_into(&mut out), Err(ChainError::BadIndirect));
        let last = cursor.last_byte().expect("the status byte is reachable");
        assert_eq!((last.gpa, last.len, last.write), (st + 3, 1, true));
        // A last buffer outside memory: nothing to answer at.
        g.drv.add_raw(&[
            d(BUFS, 16, 1, DESC_F_NEXT),
            d(GPA + MEM, 1, 1, DESC_F_WRITE),
        ]);
        let chain = g.dev.pop().unwrap().unwrap();
        assert_eq!(ChainCursor::packed(&g.dev, &g.mem, chain).last_byte(), None);
    }

    #[test]
    fn disabled_interrupts_are_never_sent_and_enabled_ones_always() {
        let mut g = guest(4, true);
        g.drv.set_interrupts(Interrupts::Disable);
        for _ in 0..6 {
            let id = g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
            g.dev.pop().unwrap().unwrap();
            g.dev.push_used(id, 1);
            g.dev.publish_used();
            assert!(!g.dev.needs_notification());
            g.drv.pop_used().unwrap().unwrap();
        }
        g.drv.set_interrupts(Interrupts::Enable);
        let id = g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
        g.dev.pop().unwrap().unwrap();
        g.dev.push_used(id, 1);
        g.dev.publish_used();
        assert!(g.dev.needs_notification());
    }

    #[test]
    fn an_event_position_notifies_exactly_when_passed_across_a_wrap() {
        let mut g = guest(4, true);
        // Position 1 of the second lap: the 6th descriptor used (linear position 5).
        let event = Position {
            index: 1,
            wrap: false,
        };
        g.drv.set_interrupts(Interrupts::At(event));
        let mut notified = Vec::new();
        for n in 0..12 {
            let id = g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
            g.dev.pop().unwrap().unwrap();
            g.dev.push_used(id, 1);
            g.dev.publish_used();
            if g.dev.needs_notification() {
                notified.push(n);
            }
            g.drv.pop_used().unwrap().unwrap();
        }
        // Used descriptor 5, then again two laps (8 descriptors) later.
        assert_eq!(notified, vec![5]);
        // A batch that jumps over the position (a 3-descriptor chain across it) notifies.
        let mut g = guest(4, true);
        g.drv.set_interrupts(Interrupts::At(Position {
            index: 0,
            wrap: false,
        }));
        let bufs = [buf(BUFS, 1, false), buf(BUFS, 1, false), buf(BUFS, 1, true)];
        let a = g.drv.add(&bufs[..2]).unwrap();
        g.dev.pop().unwrap().unwrap();
        g.dev.push_used(a, 1);
        g.dev.publish_used();
        assert!(!g.dev.needs_notification(), "used 0..2, waiting for 4");
        g.drv.pop_used().unwrap().unwrap();
        let b = g.drv.add(&bufs).unwrap();
        g.dev.pop().unwrap().unwrap();
        g.dev.push_used(b, 1);
        g.dev.publish_used();
        assert!(g.dev.needs_notification(), "used 2..5 passes 4");
        // Without EVENT_IDX, DESC is not a valid request: notified every time.
        let mut g = guest(4, false);
        g.drv.set_interrupts(Interrupts::At(Position {
            index: 3,
            wrap: false,
        }));
        let id = g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
        g.dev.pop().unwrap().unwrap();
        g.dev.push_used(id, 1);
        g.dev.publish_used();
        assert!(g.dev.needs_notification());
    }

    #[test]
    fn kicks_follow_the_device_event_flags() {
        let mut g = guest(4, true);
        let old = g.drv.next_avail();
        g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
        assert!(g.drv.needs_kick(old), "a device that said nothing");
        assert_eq!(g.dev.set_kicks(false), 2);
        assert!(!g.drv.needs_kick(old));
        g.dev.set_kicks(true);
        assert!(g.drv.needs_kick(old));
        assert!(g.dev.has_avail());
    }

    #[test]
    fn need_event_on_the_two_lap_line() {
        let at = |index, wrap| Position { index, wrap };
        // Event at (1, wrap 1): passed by 0..2, not by 2..3.
        assert!(packed_need_event(
            at(1, true).to_event(),
            at(2, true),
            at(0, true),
            4
        ));
        assert!(!packed_need_event(
            at(1, true).to_event(),
            at(3, true),
            at(2, true),
            4
        ));
        // Across the end of the ring: 3 -> (1, wrap 0) passes (0, wrap 0).
        assert!(packed_need_event(
            at(0, false).to_event(),
            at(1, false),
            at(3, true),
            4
        ));
        assert!(!packed_need_event(
            at(0, true).to_event(),
            at(1, false),
            at(3, true),
            4
        ));
        // A position beyond the ring from a hostile driver: no panic.
        packed_need_event(0x7fff, at(1, false), at(3, true), 4);
    }

    #[test]
    fn the_vring_base_packs_both_positions_and_wrap_counters() {
        let mut g = guest(8, false);
        assert_eq!(g.dev.base(), 0x8000_8000, "both at 0 with wrap counters 1");
        g.dev.set_base(0x0005_8003).unwrap();
        assert_eq!(
            g.dev.next_avail(),
            Position {
                index: 3,
                wrap: true
            }
        );
        assert_eq!(
            g.dev.next_used(),
            Position {
                index: 5,
                wrap: false
            }
        );
        assert_eq!(g.dev.base(), 0x0005_8003);
        assert!(
            g.dev.set_base(0x0000_0008).is_err(),
            "avail index outside the ring"
        );
        assert!(
            g.dev.set_base(0x8008_0000).is_err(),
            "used index outside the ring"
        );
    }
}
