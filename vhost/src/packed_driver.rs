//! The driver side of a packed virtqueue: what a guest's virtio driver does with the ring,
//! on memory this process owns and shares with the device (the guest test kit's stand-in
//! for a guest; [`crate::driver`] is the split counterpart).

use std::sync::atomic::{fence, AtomicU16, Ordering};

use crate::driver::DriverBuffer;
use crate::packed::{
    avail_bits, is_used, packed_need_event, PackedDescriptor, Position, EVENT_BYTES, EVENT_F_DESC,
    EVENT_F_DISABLE, EVENT_F_ENABLE,
};
use crate::virtq::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::{Error, Result};

/// When the driver wants to hear of used buffers (its event suppression structure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupts {
    /// At every publication.
    Enable,
    /// Never (a polling driver).
    Disable,
    /// Once the device's used position passes this one (with EVENT_IDX).
    At(Position),
}

/// The driver side of a packed virtqueue.
pub struct PackedDriverQueue {
    size: u16,
    desc: *mut PackedDescriptor,
    driver_event: *mut u8,
    device_event: *mut u8,
    /// Guest-physical addresses of the descriptor ring, driver and device event structures.
    pub gpas: (u64, u64, u64),
    next_avail: Position,
    last_used: Position,
    free_slots: u16,
    free_ids: Vec<u16>,
    /// Per buffer id: ring descriptors its chain took, 0 when not in flight.
    chain_len: Vec<u16>,
}

// SAFETY: the pointers address the caller's shared mapping, which outlives the queue; one
// thread uses the queue.
unsafe impl Send for PackedDriverQueue {}

impl PackedDriverQueue {
    /// Bytes the ring and both event structures of a `size`-entry queue take.
    pub fn bytes(size: u16) -> usize {
        16 * usize::from(size) + 2 * EVENT_BYTES
    }

    /// Lays the ring out at `host` (guest-physical `gpa`, 16-aligned), then the driver and
    /// the device event structures; the area must hold [`PackedDriverQueue::bytes`] bytes,
    /// zeroed.
    ///
    /// # Safety
    /// `host` must point to that many writable bytes, 16-aligned, that stay mapped while the
    /// queue lives.
    pub unsafe fn new(host: *mut u8, gpa: u64, size: u16) -> Self {
        let ring = 16 * usize::from(size);
        Self {
            size,
            desc: host.cast(),
            // SAFETY: within the caller's area (see `bytes`).
            driver_event: unsafe { host.add(ring) },
            // SAFETY: as above.
            device_event: unsafe { host.add(ring + EVENT_BYTES) },
            gpas: (gpa, gpa + ring as u64, gpa + (ring + EVENT_BYTES) as u64),
            next_avail: Position::START,
            last_used: Position::START,
            free_slots: size,
            free_ids: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
        }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring descriptors not holding a chain in flight.
    pub fn free_slots(&self) -> u16 {
        self.free_slots
    }

    /// Where the next chain goes.
    pub fn next_avail(&self) -> Position {
        self.next_avail
    }

    /// Where the next used descriptor is expected.
    pub fn last_used(&self) -> Position {
        self.last_used
    }

    fn flags_atomic(&self, index: u16) -> &AtomicU16 {
        // SAFETY: index < size (positions always are): the flags word of a ring descriptor.
        unsafe { &*(self.desc.add(usize::from(index)).cast::<u8>().add(14) as *const AtomicU16) }
    }

    /// Writes `count` descriptors, the `i`th from `descriptor(i)` (their AVAIL/USED bits are
    /// set here), at consecutive positions and makes them available: every descriptor's
    /// flags with release, the first one's last, so the device sees the whole chain at once.
    /// Built one at a time, so a chain costs no allocation (the load generator adds one per
    /// request).
    fn publish(&mut self, count: usize, mut descriptor: impl FnMut(usize) -> PackedDescriptor) {
        let start = self.next_avail;
        let mut pos = start;
        let mut first_flags = None;
        for i in 0..count {
            let d = descriptor(i);
            let flags = (d.flags & !(avail_bits(true) | avail_bits(false))) | avail_bits(pos.wrap);
            // SAFETY: pos.index < size: inside the ring; the fields before the flags word.
            unsafe {
                let slot = self.desc.add(usize::from(pos.index));
                std::ptr::addr_of_mut!((*slot).addr).write_volatile(d.addr);
                std::ptr::addr_of_mut!((*slot).len).write_volatile(d.len);
                std::ptr::addr_of_mut!((*slot).id).write_volatile(d.id);
            }
            if i == 0 {
                first_flags = Some(flags);
            } else {
                self.flags_atomic(pos.index).store(flags, Ordering::Release);
            }
            pos = pos.advance(1, self.size);
        }
        if let Some(flags) = first_flags {
            self.flags_atomic(start.index)
                .store(flags, Ordering::Release);
        }
        self.next_avail = pos;
    }

    /// Writes a chain for `buffers` and makes it available; returns its buffer id. `None`
    /// when there are not enough free ring descriptors or ids.
    pub fn add(&mut self, buffers: &[DriverBuffer]) -> Option<u16> {
        let n = u16::try_from(buffers.len()).ok()?;
        if n == 0 || n > self.free_slots {
            return None;
        }
        let id = self.free_ids.pop()?;
        let last = buffers.len() - 1;
        self.publish(buffers.len(), |i| {
            let b = buffers[i];
            let next = if i < last { DESC_F_NEXT } else { 0 };
            let write = if b.write { DESC_F_WRITE } else { 0 };
            PackedDescriptor::new(b.gpa, b.len, id, next | write)
        });
        self.take(id, n);
        Some(id)
    }

    /// Writes `buffers` as an indirect table at `table` (guest-physical `table_gpa`) and
    /// makes one ring descriptor pointing at it available; returns its buffer id.
    ///
    /// # Safety
    /// `table` must point to `16 * buffers.len()` writable bytes, 16-aligned, that are the
    /// guest memory at `table_gpa`.
    pub unsafe fn add_indirect(
        &mut self,
        table: *mut u8,
        table_gpa: u64,
        buffers: &[DriverBuffer],
    ) -> Option<u16> {
        if buffers.is_empty() || self.free_slots == 0 {
            return None;
        }
        let id = self.free_ids.pop()?;
        for (i, b) in buffers.iter().enumerate() {
            let write = if b.write { DESC_F_WRITE } else { 0 };
            let d = PackedDescriptor::new(b.gpa, b.len, 0, write);
            // SAFETY: i < buffers.len(): inside the caller's table.
            unsafe { table.cast::<PackedDescriptor>().add(i).write_volatile(d) };
        }
        let len = u32::try_from(16 * buffers.len()).ok()?;
        self.publish(1, |_| {
            PackedDescriptor::new(table_gpa, len, id, DESC_F_INDIRECT)
        });
        self.take(id, 1);
        Some(id)
    }

    fn take(&mut self, id: u16, descriptors: u16) {
        self.chain_len[usize::from(id)] = descriptors;
        self.free_slots -= descriptors;
    }

    /// Makes `descriptors` available exactly as given (ids and flags untouched but for
    /// AVAIL/USED), tracking nothing: hostile chains for tests.
    pub fn add_raw(&mut self, descriptors: &[PackedDescriptor]) {
        self.publish(descriptors.len(), |i| descriptors[i]);
    }

    /// The next used descriptor, if the device wrote one: (buffer id, bytes written). The
    /// chain's descriptors and id are free again. An id that is not in flight is an error.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>> {
        let at = self.last_used;
        // Acquire: the device wrote the flags last.
        let flags = self.flags_atomic(at.index).load(Ordering::Acquire);
        if !is_used(flags, at.wrap) {
            return Ok(None);
        }
        // SAFETY: at.index < size: inside the ring.
        let d = unsafe { self.desc.add(usize::from(at.index)).read_volatile() };
        let count = self.chain_len.get(usize::from(d.id)).copied().unwrap_or(0);
        if count == 0 {
            return Err(Error::NotAHead(u32::from(d.id)));
        }
        self.chain_len[usize::from(d.id)] = 0;
        self.free_ids.push(d.id);
        self.free_slots += count;
        self.last_used = at.advance(count, self.size);
        Ok(Some((d.id, d.len)))
    }

    /// Whether the device wrote a used descriptor we have not taken (what a driver checks
    /// after asking for an interrupt, so one published just before is not missed).
    pub fn has_used(&self) -> bool {
        let at = self.last_used;
        is_used(self.flags_atomic(at.index).load(Ordering::Acquire), at.wrap)
    }

    /// Tells the device when to notify us (the driver event structure; the position before
    /// the flags, so a device reading DESC finds it).
    pub fn set_interrupts(&mut self, when: Interrupts) {
        let (desc, flags) = match when {
            Interrupts::Enable => (0, EVENT_F_ENABLE),
            Interrupts::Disable => (0, EVENT_F_DISABLE),
            Interrupts::At(pos) => (pos.to_event(), EVENT_F_DESC),
        };
        // SAFETY: the driver event structure: desc at 0, flags at 2, 2-aligned.
        unsafe {
            (self.driver_event as *mut u16).write_volatile(desc);
            fence(Ordering::Release);
            (self.driver_event.add(2) as *mut u16).write_volatile(flags);
        }
        fence(Ordering::SeqCst);
    }

    /// Whether the device wants a kick for the chains made available since the avail
    /// position was `old`.
    pub fn needs_kick(&self, old: Position) -> bool {
        // What we made available must be visible before the device's suppression is read.
        fence(Ordering::SeqCst);
        // SAFETY: the device event structure: desc at 0, flags at 2, 2-aligned.
        let (desc, flags) = unsafe {
            (
                (self.device_event as *const u16).read_volatile(),
                (self.device_event.add(2) as *const u16).read_volatile(),
            )
        };
        match flags & 3 {
            EVENT_F_DISABLE => false,
            EVENT_F_DESC => packed_need_event(desc, self.next_avail, old, self.size),
            _ => true,
        }
    }
}

/// Sends SET_VRING_BASE with a packed ring's 32-bit value (avail position in bits 0-15,
/// used position in bits 16-31, each with its wrap counter in the top bit) on a vhost-user
/// frontend's socket: the vhost crate's frontend takes a 16-bit base only, so test
/// frontends write this one message themselves on a clone of its socket. No reply is asked
/// for, so the frontend's next message simply follows this one.
pub fn send_packed_vring_base(
    sock: &std::os::unix::net::UnixStream,
    index: u32,
    base: u32,
) -> std::io::Result<()> {
    use std::io::Write;
    const SET_VRING_BASE: u32 = 10;
    const VERSION_1: u32 = 0x1;
    let mut msg = [0u8; 20];
    for (i, word) in [SET_VRING_BASE, VERSION_1, 8, index, base]
        .into_iter()
        .enumerate()
    {
        msg[4 * i..4 * i + 4].copy_from_slice(&word.to_le_bytes());
    }
    (&*sock).write_all(&msg)
}
