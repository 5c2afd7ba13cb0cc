//! Split virtqueues (virtio 1.1 §2.6), the device side: what a poller runs (the driver side
//! is [`crate::driver`]). Ring indexes shared with the other side are read and
//! written as atomics (acquire/release); descriptors and ring entries with volatile accesses.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use crate::memory::GuestMemory;
use crate::{Error, Result};

/// Descriptor flag: the buffer continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of indirect descriptors.
pub const DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device asks not to be notified (without EVENT_IDX).
pub const USED_F_NO_NOTIFY: u16 = 1;
/// Avail ring flag: the driver asks not to be interrupted (without EVENT_IDX).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Largest queue size virtio allows for split rings.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// A descriptor (16 bytes) as the guest wrote it: untrusted.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Flags.
    pub flags: u16,
    /// Next descriptor index.
    pub next: u16,
}

const _: () = assert!(std::mem::size_of::<Descriptor>() == 16);

impl Descriptor {
    /// A descriptor with these fields.
    pub const fn new(addr: u64, len: u32, flags: u16, next: u16) -> Self {
        Self {
            addr,
            len,
            flags,
            next,
        }
    }

    /// The 16 little-endian bytes a driver writes into a table.
    pub fn to_le_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// Bytes of each ring part for `size` entries (with the event-index words).
pub fn ring_sizes(size: u16) -> (usize, usize, usize) {
    let n = usize::from(size);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

/// virtio's `vring_need_event`: whether moving an index from `old` to `new` passes `event`.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The device side of a split virtqueue.
pub struct DeviceQueue {
    size: u16,
    desc: *const Descriptor,
    avail: *mut u8,
    used: *mut u8,
    /// Next avail ring position to take.
    pub next_avail: u16,
    /// Next used ring position to fill (published by `publish_used`).
    pub next_used: u16,
    /// Used index when the driver was last notified.
    signalled_used: Option<u16>,
    event_idx: bool,
}

// SAFETY: the pointers address guest memory mapped for the connection's lifetime; the queue
// is owned by one poller thread at a time.
unsafe impl Send for DeviceQueue {}

impl DeviceQueue {
    /// A queue of `size` entries whose rings sit at the given frontend virtual addresses.
    pub fn new(
        mem: &GuestMemory,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        event_idx: bool,
    ) -> Result<Self> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::QueueSize(size));
        }
        let (dl, al, ul) = ring_sizes(size);
        if desc % 16 != 0 || avail % 2 != 0 || used % 4 != 0 {
            return Err(Error::MisalignedRings { desc, avail, used });
        }
        let t = |addr: u64, len: usize, ring: &'static str| {
            mem.translate_frontend(addr, len as u64)
                .ok_or(Error::RingOutsideMemory { ring, addr, len })
        };
        let (desc_host, avail_host, used_host) = (
            t(desc, dl, "descriptor")?,
            t(avail, al, "avail")?,
            t(used, ul, "used")?,
        );
        // The frontend's addresses were aligned, but a region whose frontend address is odd
        // maps them to misaligned host addresses: atomics there are undefined behaviour.
        if desc_host as usize % 16 != 0
            || avail_host as usize % 2 != 0
            || used_host as usize % 4 != 0
        {
            return Err(Error::MisalignedRings { desc, avail, used });
        }
        Ok(Self {
            size,
            desc: desc_host.cast(),
            avail: avail_host,
            used: used_host,
            next_avail: 0,
            next_used: 0,
            signalled_used: None,
            event_idx,
        })
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: offset 2 of the avail ring, 2-aligned, inside the translated range.
        unsafe { &*(self.avail.add(2) as *const AtomicU16) }
    }

    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: offset 2 of the used ring, 2-aligned, inside the translated range.
        unsafe { &*(self.used.add(2) as *const AtomicU16) }
    }

    /// The driver's avail index (acquire: ring entries before it are visible).
    #[inline]
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx_atomic().load(Ordering::Acquire)
    }

    /// The used index as published in guest memory.
    pub fn used_idx(&self) -> u16 {
        self.used_idx_atomic().load(Ordering::Acquire)
    }

    /// Whether the driver has made buffers available that we have not taken.
    #[inline]
    pub fn has_avail(&self) -> bool {
        self.avail_idx() != self.next_avail
    }

    /// Takes the next available head. `Err` for a driver that claims more buffers than the
    /// ring holds or names a head outside the table.
    #[inline]
    pub fn pop(&mut self) -> Result<Option<u16>> {
        let avail = self.avail_idx();
        if avail == self.next_avail {
            return Ok(None);
        }
        if avail.wrapping_sub(self.next_avail) > self.size {
            return Err(Error::AvailIndexAhead {
                avail,
                next: self.next_avail,
                size: self.size,
            });
        }
        // The size is a power of two (checked at set-up): a mask, not a division.
        let slot = usize::from(self.next_avail & (self.size - 1));
        // SAFETY: ring[slot] at offset 4 + 2*slot, inside the avail ring.
        let head = unsafe { (self.avail.add(4 + 2 * slot) as *const u16).read_volatile() };
        self.next_avail = self.next_avail.wrapping_add(1);
        if head >= self.size {
            return Err(Error::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        Ok(Some(head))
    }

    /// Reads descriptor `index` of the main table (`index < size`, checked by callers).
    #[inline]
    pub fn descriptor(&self, index: u16) -> Descriptor {
        debug_assert!(index < self.size);
        // SAFETY: index < size: inside the descriptor table.
        // (The mask keeps even a wrong index inside the table: the size is a power of two.)
        unsafe {
            self.desc
                .add(usize::from(index & (self.size - 1)))
                .read_volatile()
        }
    }

    /// Writes a used element (not yet visible to the driver: see `publish_used`).
    #[inline]
    pub fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.next_used & (self.size - 1));
        // SAFETY: ring[slot] at offset 4 + 8*slot, inside the used ring.
        unsafe {
            let elem = self.used.add(4 + 8 * slot) as *mut u32;
            elem.write_volatile(u32::from(head));
            elem.add(1).write_volatile(len);
        }
        self.next_used = self.next_used.wrapping_add(1);
    }

    /// Makes the used elements pushed so far visible (release: the elements and the data
    /// written into the buffers come first).
    #[inline]
    pub fn publish_used(&mut self) {
        self.used_idx_atomic()
            .store(self.next_used, Ordering::Release);
    }

    /// Whether the driver wants an interrupt for what was published since the last one.
    pub fn needs_notification(&mut self) -> bool {
        // The used index store must be visible before we read the driver's event index.
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let notify = if self.event_idx {
            // SAFETY: used_event sits after the avail ring entries, inside the avail ring.
            let used_event = unsafe {
                (self.avail.add(4 + 2 * usize::from(self.size)) as *const u16).read_volatile()
            };
            match self.signalled_used {
                Some(old) => need_event(used_event, new, old),
                None => true,
            }
        } else {
            // SAFETY: the avail flags word at offset 0.
            let flags = unsafe { (self.avail as *const u16).read_volatile() };
            flags & AVAIL_F_NO_INTERRUPT == 0
        };
        if notify {
            self.signalled_used = Some(new);
        }
        notify
    }

    /// Asks the driver not to kick (we poll), or to kick again (before sleeping). Returns
    /// the offset in the used ring of the 2-byte word written.
    pub fn set_kicks(&mut self, wanted: bool) -> u64 {
        if self.event_idx {
            // Kicked when the driver's avail index passes avail_event: at the next buffer, or
            // (suppressed) only after a full wrap.
            let event = if wanted {
                self.next_avail
            } else {
                self.next_avail.wrapping_sub(1)
            };
            let offset = 4 + 8 * usize::from(self.size);
            // SAFETY: avail_event sits after the used ring entries, inside the used ring.
            unsafe { (self.used.add(offset) as *mut u16).write_volatile(event) };
            fence(Ordering::SeqCst);
            offset as u64
        } else {
            // SAFETY: the used flags word at offset 0.
            unsafe {
                (self.used as *mut u16).write_volatile(if wanted { 0 } else { USED_F_NO_NOTIFY })
            };
            fence(Ordering::SeqCst);
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{DriverBuffer, DriverQueue};
    use crate::memory::tests::memfd;

    #[test]
    fn driver_and_device_exchange_buffers() {
        let size = 8u16;
        let file = memfd(1 << 20);
        let mem =
            GuestMemory::from_table(&[(0x10000, 1 << 20, 0x5000_0000, 0)], vec![file]).unwrap();
        let host = mem.translate(0x10000, 1 << 20).unwrap();
        // SAFETY: the region is 1 MiB, enough for the rings.
        let mut drv = unsafe { DriverQueue::new(host, 0x10000, size) };
        let fva = |gpa: u64| gpa - 0x10000 + 0x5000_0000;
        let mut dev = DeviceQueue::new(
            &mem,
            size,
            fva(drv.gpas.0),
            fva(drv.gpas.1),
            fva(drv.gpas.2),
            true,
        )
        .unwrap();
        assert_eq!(dev.pop().unwrap(), None);
        let h1 = drv
            .add(&[
                DriverBuffer {
                    gpa: 0x20000,
                    len: 16,
                    write: false,
                },
                DriverBuffer {
                    gpa: 0x21000,
                    len: 1,
                    write: true,
                },
            ])
            .unwrap();
        let h2 = drv
            .add(&[DriverBuffer {
                gpa: 0x22000,
                len: 16,
                write: false,
            }])
            .unwrap();
        assert_eq!(drv.free_descriptors(), 5);
        assert_eq!(dev.pop().unwrap(), Some(h1));
        let d = dev.descriptor(h1);
        assert_eq!(
            (d.addr, d.len, d.flags & DESC_F_NEXT),
            (0x20000, 16, DESC_F_NEXT)
        );
        assert_eq!(dev.descriptor(d.next).flags, DESC_F_WRITE);
        assert_eq!(dev.pop().unwrap(), Some(h2));
        // Out of order completion.
        dev.push_used(h2, 0);
        dev.push_used(h1, 1);
        assert_eq!(drv.pop_used().unwrap(), None, "not published yet");
        dev.publish_used();
        assert!(dev.needs_notification());
        assert_eq!(drv.pop_used().unwrap(), Some((h2, 0)));
        assert_eq!(drv.pop_used().unwrap(), Some((h1, 1)));
        assert_eq!(drv.free_descriptors(), 8);
    }

    #[test]
    fn hostile_rings_are_errors_not_panics() {
        let file = memfd(1 << 20);
        let mem = GuestMemory::from_table(&[(0, 1 << 20, 0, 0)], vec![file]).unwrap();
        let host = mem.translate(0, 1 << 20).unwrap();
        // SAFETY: the mapped test region holds the rings and outlives the queue.
        let mut drv = unsafe { DriverQueue::new(host, 0, 4) };
        let mut dev = DeviceQueue::new(&mem, 4, drv.gpas.0, drv.gpas.1, drv.gpas.2, false).unwrap();
        drv.add_raw(&[], 9); // head out of range
        assert!(dev.pop().is_err());
        // An avail index far ahead of what the ring can hold.
        let (_, avail, _) = drv.raw();
        // SAFETY: the avail index word lies inside the rings of the test region.
        unsafe { (avail.add(2) as *mut u16).write(1000) };
        assert!(dev.pop().is_err());
        // Rings outside memory, misaligned, bad sizes.
        assert!(DeviceQueue::new(&mem, 4, (1 << 20) - 16, 0x1000, 0x2000, false).is_err());
        assert!(DeviceQueue::new(&mem, 4, 8, 0x1000, 0x2000, false).is_err());
        assert!(DeviceQueue::new(&mem, 3, 0, 0x1000, 0x2000, false).is_err());
        assert!(DeviceQueue::new(&mem, 0, 0, 0x1000, 0x2000, false).is_err());
        // A region whose frontend address is odd: aligned ring addresses land on misaligned
        // host addresses.
        let odd =
            GuestMemory::from_table(&[(0, 1 << 20, 0x1001, 0)], vec![memfd(1 << 20)]).unwrap();
        assert!(matches!(
            DeviceQueue::new(&odd, 4, 0x2000, 0x3000, 0x4000, false),
            Err(Error::MisalignedRings { .. })
        ));
    }

    #[test]
    fn event_index_suppresses_and_requests_notifications() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 3, 1));
        assert!(need_event(0xffff, 1, 0xfffe));
    }
}
