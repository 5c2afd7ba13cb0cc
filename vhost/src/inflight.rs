//! The vhost-user inflight region (QEMU docs/interop/vhost-user.rst, "Inflight I/O
//! tracking"), split-ring layout as libvhost-user lays it out, so a restarted process — or
//! another implementation — reads what this one wrote.
//!
//! Per queue: a 16-byte header {features u64, version u16, desc_num u16, last_batch_head u16,
//! used_idx u16} and `desc_num` entries {inflight u8, padding [u8; 5], next u16, counter u64}.

use std::fs::File;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};

/// Region version we write.
pub const VERSION: u16 = 1;

/// Bytes of one queue's region for `queue_size` descriptors (libvhost-user's rule).
pub fn region_size(queue_size: u16) -> usize {
    (16 + 16 * usize::from(queue_size)).div_ceil(64) * 64
}

/// The mapped inflight region of a connection (all its queues), shared by the protocol
/// handler and the queues' pollers.
pub struct InflightMap {
    ptr: *mut u8,
    len: usize,
    queue_size: u16,
    /// Dropped before the mapping (fields drop in order).
    contained: Option<crate::sigbus::Contained>,
    offset: u64,
    _map: memmap2::MmapRaw,
    file: File,
}

// SAFETY: shared memory used through raw pointers; each queue touches only its own region.
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// Maps `len` bytes of `file` at `offset`, laid out for queues of `queue_size`.
    pub fn map(file: File, offset: u64, len: u64, queue_size: u16) -> crate::Result<Self> {
        let sealed = crate::sigbus::seal_against_shrinking(&file);
        let map =
            crate::memory::map_shared(&file, len as usize, offset, false).map_err(|source| {
                crate::Error::Io {
                    what: format!("mapping the inflight region ({len} bytes at offset {offset})"),
                    source,
                }
            })?;
        let contained = if sealed {
            None
        } else {
            crate::sigbus::register(map.as_mut_ptr(), len as usize)
        };
        Ok(Self {
            ptr: map.as_mut_ptr(),
            len: len as usize,
            queue_size,
            contained,
            offset,
            _map: map,
            file,
        })
    }

    /// The fd, offset and length of the mapping (handed to a successor process).
    pub fn source(&self) -> (&File, u64, u64) {
        (&self.file, self.offset, self.len as u64)
    }

    /// Whether the frontend shrank the region's file under us.
    pub fn poisoned(&self) -> bool {
        self.contained.as_ref().is_some_and(|c| c.poisoned())
    }

    /// The queue size the region is laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s region, if the mapping holds it.
    ///
    /// # Safety
    /// At most one [`InflightQueue`] per index may exist at a time, and it must not outlive
    /// this mapping.
    pub unsafe fn queue(&self, index: u16) -> Option<InflightQueue> {
        let size = region_size(self.queue_size);
        let offset = usize::from(index) * size;
        if offset + size > self.len {
            return None;
        }
        // SAFETY: the region lies within the mapping (checked), 64-aligned; the caller
        // guarantees it is the only writer and that the mapping outlives it.
        Some(unsafe { InflightQueue::new(self.ptr.add(offset), self.queue_size) })
    }

    /// Queue `index`'s region laid out for a packed ring, if the mapping holds it.
    ///
    /// # Safety
    /// As [`InflightMap::queue`].
    pub unsafe fn packed_queue(
        &self,
        index: u16,
    ) -> Option<crate::inflight_packed::InflightPackedQueue> {
        let size = crate::inflight_packed::region_size(self.queue_size);
        let offset = usize::from(index) * size;
        if offset + size > self.len {
            return None;
        }
        // SAFETY: as in `queue`: inside the mapping, 64-aligned, one writer.
        Some(unsafe {
            crate::inflight_packed::InflightPackedQueue::new(self.ptr.add(offset), self.queue_size)
        })
    }
}

/// One queue's inflight region, mapped from the frontend's shared fd.
pub struct InflightQueue {
    base: *mut u8,
    desc_num: u16,
    /// Next counter value to stamp (oldest requests have the lowest).
    counter: u64,
}

// SAFETY: `base` points into the inflight mapping, which outlives every InflightQueue (the
// connection keeps it); one poller owns each queue's region.
unsafe impl Send for InflightQueue {}

/// What recovery found in a region.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The region was fresh (version 0) and has been initialised.
    pub fresh: bool,
    /// Heads of the last batch that were published but not cleared, now cleared.
    pub cleared_batch: u16,
    /// Heads still in flight, oldest first: to be resubmitted.
    pub resubmit: Vec<u16>,
}

impl InflightQueue {
    /// The region at `base` for a queue of `desc_num` descriptors.
    ///
    /// # Safety
    /// `base` must point to [`region_size`]`(desc_num)` bytes of the shared inflight mapping,
    /// 8-aligned, that stay mapped while this value lives and that no one else in this
    /// process writes.
    pub unsafe fn new(base: *mut u8, desc_num: u16) -> Self {
        Self {
            base,
            desc_num,
            counter: 0,
        }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        // SAFETY: header fields at 10, 12, 14 and entry `next` fields, 2-aligned, in range.
        unsafe { &*(self.base.add(off) as *const AtomicU16) }
    }

    fn entry(&self, head: u16) -> *mut u8 {
        // SAFETY: head < desc_num (callers check); entries follow the 16-byte header.
        unsafe { self.base.add(16 + 16 * usize::from(head)) }
    }

    fn inflight_flag(&self, head: u16) -> &AtomicU8 {
        // SAFETY: byte 0 of the entry.
        unsafe { &*(self.entry(head) as *const AtomicU8) }
    }

    fn next(&self, head: u16) -> &AtomicU16 {
        // SAFETY: bytes 6..8 of the entry.
        unsafe { &*(self.entry(head).add(6) as *const AtomicU16) }
    }

    fn counter_of(&self, head: u16) -> &AtomicU64 {
        // SAFETY: bytes 8..16 of the entry, 8-aligned.
        unsafe { &*(self.entry(head).add(8) as *const AtomicU64) }
    }

    fn version(&self) -> &AtomicU16 {
        self.u16_at(8)
    }

    fn last_batch_head(&self) -> &AtomicU16 {
        self.u16_at(12)
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.u16_at(14)
    }

    /// Records that `head` was taken from the avail ring (before it is submitted).
    #[inline]
    pub fn begin(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        self.counter = self.counter.saturating_add(1);
        self.inflight_flag(head).store(1, Ordering::Release);
    }

    /// Before publishing a batch of used elements: links the batch so a crash between
    /// publishing and clearing can be undone.
    #[inline]
    pub fn prepare_batch(&mut self, heads: &[u16]) {
        for &head in heads.iter().filter(|&&h| h < self.desc_num) {
            let last = self.last_batch_head().load(Ordering::Relaxed);
            self.next(head).store(last, Ordering::Relaxed);
            self.last_batch_head().store(head, Ordering::Release);
        }
    }

    /// After publishing used index `used_idx`: clears the batch's inflight flags, then
    /// records the used index.
    #[inline]
    pub fn finish_batch(&mut self, heads: &[u16], used_idx: u16) {
        fence(Ordering::Release);
        for &head in heads.iter().filter(|&&h| h < self.desc_num) {
            self.inflight_flag(head).store(0, Ordering::Release);
        }
        self.used_idx().store(used_idx, Ordering::Release);
    }

    /// Forgets the region's contents: the next [`InflightQueue::recover`] finds it fresh.
    /// For a region of the target's own when the frontend itself set the ring up again
    /// (its base and used index are then what count).
    pub fn reset(&mut self) {
        self.version().store(0, Ordering::Release);
    }

    /// Recovery when the vring starts (every connection): see the module docs and
    /// `shared/notes/vhost-user-inflight.md`. `ring_used_idx` is the used index in guest
    /// memory.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        let mut out = Recovery::default();
        if self.version().load(Ordering::Acquire) == 0 {
            // Fresh region: nothing in flight. Set used_idx from the ring, not 0 (a fresh
            // region taken as "last batch = head 0" would wrongly clear desc[0]).
            for h in 0..self.desc_num {
                self.inflight_flag(h).store(0, Ordering::Relaxed);
            }
            // SAFETY: desc_num field at offset 10.
            self.u16_at(10).store(self.desc_num, Ordering::Relaxed);
            self.used_idx().store(ring_used_idx, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            self.counter = 0;
            out.fresh = true;
            return out;
        }
        let region_used = self.used_idx().load(Ordering::Acquire);
        if region_used != ring_used_idx {
            // The last batch reached the used ring but its flags were not cleared.
            let batch = ring_used_idx.wrapping_sub(region_used);
            let mut head = self.last_batch_head().load(Ordering::Acquire);
            for _ in 0..batch.min(self.desc_num) {
                if head >= self.desc_num {
                    break;
                }
                self.inflight_flag(head).store(0, Ordering::Relaxed);
                head = self.next(head).load(Ordering::Relaxed);
            }
            self.used_idx().store(ring_used_idx, Ordering::Release);
            out.cleared_batch = batch;
        }
        let mut pending: Vec<(u64, u16)> = (0..self.desc_num)
            .filter(|&h| self.inflight_flag(h).load(Ordering::Acquire) == 1)
            .map(|h| (self.counter_of(h).load(Ordering::Relaxed), h))
            .collect();
        pending.sort_unstable();
        // The counters come from shared memory a frontend can write: never overflow on them.
        self.counter = pending
            .last()
            .map(|&(c, _)| c.saturating_add(1))
            .unwrap_or(0);
        out.resubmit = pending.into_iter().map(|(_, h)| h).collect();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(size: u16) -> Vec<u64> {
        vec![0u64; region_size(size) / 8]
    }

    #[test]
    fn layout_matches_libvhost_user() {
        assert_eq!(region_size(128), (16 + 16 * 128usize).div_ceil(64) * 64);
        assert_eq!(region_size(256), 4160);
    }

    #[test]
    fn fresh_region_is_initialised_without_touching_desc0() {
        let mut mem = region(8);
        // SAFETY: the test region is region_size(8) bytes, 8-aligned, alive for the test, one writer.
        let mut q = unsafe { InflightQueue::new(mem.as_mut_ptr().cast(), 8) };
        let r = q.recover(5);
        assert!(r.fresh && r.resubmit.is_empty());
        assert_eq!(q.used_idx().load(Ordering::Relaxed), 5);
        assert_eq!(q.version().load(Ordering::Relaxed), VERSION);
    }

    #[test]
    fn in_flight_heads_come_back_oldest_first() {
        let mut mem = region(8);
        let base: *mut u8 = mem.as_mut_ptr().cast();
        // SAFETY: the test region is region_size(8) bytes, 8-aligned, alive for the test, one writer.
        let mut q = unsafe { InflightQueue::new(base, 8) };
        q.recover(0);
        for h in [3, 1, 6, 2] {
            q.begin(h);
        }
        // Head 1 and 6 complete out of order in one batch.
        q.prepare_batch(&[6, 1]);
        q.finish_batch(&[6, 1], 2);
        // "Crash": a new process maps the same region.
        // SAFETY: the test region is region_size(8) bytes, 8-aligned, alive for the test, one writer.
        let mut q2 = unsafe { InflightQueue::new(base, 8) };
        let r = q2.recover(2);
        assert_eq!(r.resubmit, vec![3, 2]);
        assert_eq!(r.cleared_batch, 0);
        // New requests are stamped after the recovered ones.
        q2.begin(5);
        assert!(
            q2.counter_of(5).load(Ordering::Relaxed) > q2.counter_of(2).load(Ordering::Relaxed)
        );
    }

    #[test]
    fn batch_published_but_not_cleared_is_undone() {
        let mut mem = region(8);
        let base: *mut u8 = mem.as_mut_ptr().cast();
        // SAFETY: the test region is region_size(8) bytes, 8-aligned, alive for the test, one writer.
        let mut q = unsafe { InflightQueue::new(base, 8) };
        q.recover(10);
        for h in [0, 4, 7] {
            q.begin(h);
        }
        // Crash after the used ring got index 12 (heads 7 and 0) but before the flags were
        // cleared.
        q.prepare_batch(&[7, 0]);
        // SAFETY: the test region is region_size(8) bytes, 8-aligned, alive for the test, one writer.
        let mut q2 = unsafe { InflightQueue::new(base, 8) };
        let r = q2.recover(12);
        assert_eq!(r.cleared_batch, 2);
        assert_eq!(r.resubmit, vec![4]);
        assert_eq!(q2.used_idx().load(Ordering::Relaxed), 12);
    }

    #[test]
    fn hostile_region_contents_do_not_panic() {
        let mut mem = region(8);
        for w in mem.iter_mut() {
            *w = u64::MAX;
        }
        // SAFETY: the test region is region_size(8) bytes, 8-aligned, alive for the test, one writer.
        let mut q = unsafe { InflightQueue::new(mem.as_mut_ptr().cast(), 8) };
        let r = q.recover(3);
        // Every flag byte reads 0xff, not 1: nothing to resubmit, nothing out of bounds.
        assert!(r.resubmit.is_empty());
        // In-flight entries whose counters are at the top of the range: no overflow.
        for h in 0..8u16 {
            q.inflight_flag(h).store(1, Ordering::Relaxed);
        }
        let r = q.recover(3);
        assert_eq!(r.resubmit.len(), 8);
        q.begin(0);
    }
}
