//! The driver side of a split virtqueue: what a guest's virtio driver does with the rings,
//! on memory this process owns and shares with the device. The load generator is a real
//! frontend built on it; the guest test kit ([`crate::mock`]) uses it to stand in for a guest.

use std::sync::atomic::{AtomicU16, Ordering};

use crate::virtq::{ring_sizes, Descriptor, DESC_F_NEXT, DESC_F_WRITE};
use crate::{Error, Result};

/// The driver side of a split virtqueue, on memory this process owns and shares with the
/// device (the load generator, and tests standing in for a guest).
pub struct DriverQueue {
    size: u16,
    desc: *mut Descriptor,
    avail: *mut u8,
    used: *mut u8,
    /// Guest-physical addresses of the three parts.
    pub gpas: (u64, u64, u64),
    free: Vec<u16>,
    next_free_chain: Vec<u16>,
    head_in_flight: Vec<bool>,
    avail_idx: u16,
    last_used: u16,
}

// SAFETY: the pointers address the caller's shared mapping, which outlives the queue; one
// thread uses the queue.
unsafe impl Send for DriverQueue {}

/// A buffer handed to the device: guest-physical address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct DriverBuffer {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length.
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

impl DriverQueue {
    /// Lays the rings out at `host` (guest-physical `gpa`), which must hold
    /// [`DriverQueue::bytes`] bytes, zeroed.
    ///
    /// # Safety
    /// `host` must point to that many writable bytes that stay mapped while the queue lives.
    pub unsafe fn new(host: *mut u8, gpa: u64, size: u16) -> Self {
        let (dl, al, _) = ring_sizes(size);
        let avail_off = dl;
        let used_off = (dl + al).div_ceil(4096) * 4096;
        Self {
            size,
            desc: host.cast(),
            // SAFETY: within the caller's area (see `bytes`).
            avail: unsafe { host.add(avail_off) },
            // SAFETY: as above.
            used: unsafe { host.add(used_off) },
            gpas: (gpa, gpa + avail_off as u64, gpa + used_off as u64),
            free: (0..size).rev().collect(),
            next_free_chain: vec![0; usize::from(size)],
            head_in_flight: vec![false; usize::from(size)],
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// Bytes the rings of a `size`-entry queue take.
    pub fn bytes(size: u16) -> usize {
        let (dl, al, ul) = ring_sizes(size);
        (dl + al).div_ceil(4096) * 4096 + ul
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Writes a chain for `buffers` and makes it available; returns its head. `None` when
    /// there are not enough free descriptors.
    pub fn add(&mut self, buffers: &[DriverBuffer]) -> Option<u16> {
        if buffers.is_empty() || buffers.len() > self.free.len() {
            return None;
        }
        // Take each descriptor's successor before writing it, so no list of ids is needed.
        let head = self.free.pop().expect("checked");
        let mut current = head;
        for (i, b) in buffers.iter().enumerate() {
            let next = if i + 1 < buffers.len() {
                self.free.pop().expect("checked")
            } else {
                u16::MAX
            };
            let d = Descriptor {
                addr: b.gpa,
                len: b.len,
                flags: if b.write { DESC_F_WRITE } else { 0 }
                    | if next == u16::MAX { 0 } else { DESC_F_NEXT },
                next: if next == u16::MAX { 0 } else { next },
            };
            // SAFETY: ids from the free list are < size: inside the table.
            unsafe { self.desc.add(usize::from(current)).write_volatile(d) };
            // Remember the chain's members to free them when the head comes back.
            self.next_free_chain[usize::from(current)] = next;
            current = next;
        }
        self.head_in_flight[usize::from(head)] = true;
        self.publish_avail(head);
        Some(head)
    }

    /// Makes one ready-made descriptor (an indirect table, say) available as a chain of its
    /// own; returns its head. `None` when no descriptor is free.
    pub fn add_descriptor(&mut self, descriptor: Descriptor) -> Option<u16> {
        let head = self.free.pop()?;
        let d = Descriptor {
            flags: descriptor.flags & !DESC_F_NEXT,
            next: 0,
            ..descriptor
        };
        // SAFETY: ids from the free list are < size: inside the table.
        unsafe { self.desc.add(usize::from(head)).write_volatile(d) };
        self.next_free_chain[usize::from(head)] = u16::MAX;
        self.head_in_flight[usize::from(head)] = true;
        self.publish_avail(head);
        Some(head)
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn publish_avail(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: ring[slot] inside the avail ring.
        unsafe { (self.avail.add(4 + 2 * slot) as *mut u16).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: avail idx at offset 2, 2-aligned.
        unsafe { &*(self.avail.add(2) as *const AtomicU16) }
            .store(self.avail_idx, Ordering::Release);
    }

    /// Writes raw descriptors (for hostile-input tests) at the given indexes and makes `head`
    /// available. The caller owns consistency.
    pub fn add_raw(&mut self, descriptors: &[(u16, Descriptor)], head: u16) {
        for &(i, d) in descriptors {
            // SAFETY: index reduced mod size: inside the table.
            unsafe { self.desc.add(usize::from(i % self.size)).write_volatile(d) };
        }
        self.publish_avail(head);
    }

    /// The next used element, if the device published one: (head, written length). The
    /// chain's descriptors are freed. A head that is not the start of a chain we made is an
    /// error (what a guest reports as "id N is not a head").
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>> {
        // SAFETY: used idx at offset 2.
        let used = unsafe { &*(self.used.add(2) as *const AtomicU16) }.load(Ordering::Acquire);
        if used == self.last_used {
            return Ok(None);
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: ring[slot] inside the used ring.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot) as *const u32;
            (e.read_volatile(), e.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        let head = u16::try_from(id)
            .ok()
            .filter(|&h| h < self.size && self.head_in_flight[usize::from(h)]);
        let Some(head) = head else {
            return Err(Error::NotAHead(id));
        };
        self.head_in_flight[usize::from(head)] = false;
        let mut d = head;
        loop {
            self.free.push(d);
            let next = self.next_free_chain[usize::from(d)];
            if next == u16::MAX {
                break;
            }
            d = next;
        }
        Ok(Some((head, len)))
    }

    /// The next used element without checking or freeing anything (for chains written with
    /// [`DriverQueue::add_raw`]): (id, written length).
    pub fn pop_used_raw(&mut self) -> Option<(u32, u32)> {
        // SAFETY: used idx at offset 2.
        let used = unsafe { &*(self.used.add(2) as *const AtomicU16) }.load(Ordering::Acquire);
        if used == self.last_used {
            return None;
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: ring[slot] inside the used ring.
        let e = unsafe {
            let e = self.used.add(4 + 8 * slot) as *const u32;
            (e.read_volatile(), e.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some(e)
    }

    /// Asks the device for no interrupts at all (VRING_AVAIL_F_NO_INTERRUPT), as a polling
    /// driver does; without EVENT_IDX the device honours it.
    pub fn suppress_interrupts(&mut self, suppress: bool) {
        let flags = u16::from(suppress) * crate::virtq::AVAIL_F_NO_INTERRUPT;
        // SAFETY: the avail ring's flags word at offset 0.
        unsafe { (self.avail as *mut u16).write_volatile(flags) };
    }

    /// Under EVENT_IDX: asks the device to interrupt once the used index passes `idx`
    /// (the avail ring's `used_event` word).
    pub fn set_used_event(&mut self, idx: u16) {
        // SAFETY: used_event sits after the avail ring's entries, inside the avail ring.
        unsafe { (self.avail.add(4 + 2 * usize::from(self.size)) as *mut u16).write_volatile(idx) };
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Whether the device wants a kick for what was made available since the avail index was
    /// `old_avail`: under EVENT_IDX when the new entries pass its `avail_event`, otherwise
    /// unless it set VRING_USED_F_NO_NOTIFY (a polling device). A driver that kicks anyway
    /// pays a system call per batch for nothing.
    pub fn needs_kick(&self, old_avail: u16, event_idx: bool) -> bool {
        // The avail index must be visible before the device's suppression is read (the
        // device re-checks the ring after re-enabling kicks: one side sees the other).
        std::sync::atomic::fence(Ordering::SeqCst);
        if event_idx {
            // SAFETY: avail_event sits after the used ring's entries, inside the used ring.
            let event =
                unsafe { &*(self.used.add(4 + 8 * usize::from(self.size)) as *const AtomicU16) }
                    .load(Ordering::Acquire);
            let new = self.avail_idx;
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old_avail)
        } else {
            // SAFETY: the used ring's flags word at offset 0.
            let flags = unsafe { &*(self.used as *const AtomicU16) }.load(Ordering::Acquire);
            flags & crate::virtq::USED_F_NO_NOTIFY == 0
        }
    }

    /// The used index as the device last published it (what QEMU rewinds to on reconnect).
    pub fn used_idx_in_memory(&self) -> u16 {
        // SAFETY: used idx at offset 2.
        unsafe { &*(self.used.add(2) as *const AtomicU16) }.load(Ordering::Acquire)
    }

    /// Avail index written so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Used index consumed so far.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Host pointers of the rings (for tests that corrupt them).
    pub fn raw(&self) -> (*mut Descriptor, *mut u8, *mut u8) {
        (self.desc, self.avail, self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(area: &mut Vec<u64>) -> DriverQueue {
        area.resize(DriverQueue::bytes(8).div_ceil(8), 0);
        // SAFETY: `area` is zeroed, large enough, and outlives the queue in each test.
        unsafe { DriverQueue::new(area.as_mut_ptr().cast(), 0, 8) }
    }

    fn request(q: &mut DriverQueue) {
        let b = DriverBuffer {
            gpa: 0x1000,
            len: 16,
            write: false,
        };
        q.add(&[b]).expect("room");
    }

    #[test]
    fn kicks_only_when_the_device_asks_for_them() {
        let mut area = Vec::new();
        let mut q = queue(&mut area);
        let (_, _, used) = q.raw();
        let old = q.avail_idx();
        request(&mut q);
        assert!(
            q.needs_kick(old, false),
            "a device that did not say otherwise"
        );
        // SAFETY: the used ring's flags word.
        unsafe { (used as *mut u16).write_volatile(crate::virtq::USED_F_NO_NOTIFY) };
        assert!(!q.needs_kick(old, false), "a polling device set NO_NOTIFY");

        // EVENT_IDX: kick when the new entries pass the device's avail_event.
        // SAFETY: avail_event, after the used ring's 8 entries.
        let avail_event = unsafe { used.add(4 + 8 * 8) as *mut u16 };
        let old = q.avail_idx(); // 1
        request(&mut q); // avail index 2
                         // SAFETY: as above.
        unsafe { avail_event.write_volatile(1) };
        assert!(q.needs_kick(old, true), "the device waits for entry 1");
        // SAFETY: as above.
        unsafe { avail_event.write_volatile(5) };
        assert!(!q.needs_kick(old, true), "the device waits for entry 5");
        // SAFETY: as above.
        unsafe { avail_event.write_volatile(0) };
        assert!(!q.needs_kick(old, true), "entry 0 was already past");
    }
}
