//! The vhost-user inflight region for packed virtqueues (QEMU docs/interop/vhost-user.rst,
//! "Inflight I/O tracking", `QueueRegionPacked` and `DescStatePacked`): the split layout's
//! counterpart in [`crate::inflight`], so a restarted process — or another implementation —
//! finds what this one had taken and not returned.
//!
//! Per queue: a 32-byte header ([`RegionHeader`]) and `desc_num` 32-byte entries
//! ([`DescState`]), each holding a copy of one ring descriptor. Free entries form a list
//! through `next`; a chain takes consecutive entries of that list, its first (the head
//! entry) holding the chain's `inflight`, `num`, `last` and `counter`. Every update runs
//! forward from the committed `old_*` fields and commits by copying the current ones into
//! them, so recovery rolls back whatever was half done — unless the driver may have seen
//! it (the used descriptor at `old_used_idx` was written), in which case it commits it.
//!
//! Everything read back from the region is hostile: every index is checked against
//! `desc_num`, every list walk is bounded.

use std::mem::{offset_of, size_of};
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};

use crate::packed::{is_avail, PackedChain, PackedDescriptor, PackedQueue, Position};

/// Region version we write.
pub const VERSION: u16 = 1;

/// One entry of the region (`DescStatePacked`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescState {
    /// 1 while the chain is in flight (head entries only).
    pub inflight: u8,
    /// Padding.
    pub padding: u8,
    /// The next entry of the free list, or of the chain.
    pub next: u16,
    /// The chain's last entry (head entries only).
    pub last: u16,
    /// The chain's descriptors (head entries only).
    pub num: u16,
    /// Order in which chains were taken (head entries only).
    pub counter: u64,
    /// The descriptor's buffer id.
    pub id: u16,
    /// The descriptor's flags.
    pub flags: u16,
    /// The descriptor's length.
    pub len: u32,
    /// The descriptor's address.
    pub addr: u64,
}

/// The header of one queue's region (`QueueRegionPacked` without its entries).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegionHeader {
    /// Feature flags of the region (0).
    pub features: u64,
    /// [`VERSION`]; 0 for a region nobody has set up.
    pub version: u16,
    /// Entries (the queue size).
    pub desc_num: u16,
    /// First free entry.
    pub free_head: u16,
    /// `free_head` as last committed.
    pub old_free_head: u16,
    /// Next used index of the ring.
    pub used_idx: u16,
    /// `used_idx` as last committed.
    pub old_used_idx: u16,
    /// The used wrap counter.
    pub used_wrap_counter: u8,
    /// `used_wrap_counter` as last committed.
    pub old_used_wrap_counter: u8,
    /// Padding.
    pub padding: [u8; 7],
}

const _: () = assert!(size_of::<DescState>() == 32);
const _: () = assert!(offset_of!(DescState, counter) == 8);
const _: () = assert!(offset_of!(DescState, addr) == 24);
// 29 bytes of fields, padded to the entries' 8-byte alignment.
const _: () = assert!(offset_of!(RegionHeader, padding) == 22);
const _: () = assert!(size_of::<RegionHeader>() == 32);

/// Bytes of one queue's region for `queue_size` descriptors, rounded up to 64 as
/// libvhost-user and DPDK round theirs.
pub fn region_size(queue_size: u16) -> usize {
    (size_of::<RegionHeader>() + size_of::<DescState>() * usize::from(queue_size)).div_ceil(64) * 64
}

/// A chain found in flight at recovery, to be run again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveredChain {
    /// Its head entry.
    pub entry: u16,
    /// Its buffer id (from its last descriptor).
    pub id: u16,
    /// Its ring descriptors.
    pub count: u16,
}

/// What recovery found in a region.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The region was fresh (version 0) and has been initialised.
    pub fresh: bool,
    /// A batch of used descriptors had reached the driver before the region said so: it was
    /// committed rather than rolled back.
    pub committed_batch: bool,
    /// The used position the ring resumes at.
    pub used: Option<Position>,
    /// Chains still in flight, oldest first: to be run again.
    pub resubmit: Vec<RecoveredChain>,
    /// Entries marked in flight whose chain cannot be followed (bad links, an id out of
    /// range or twice): not run again.
    pub unusable: usize,
}

/// One queue's packed inflight region, mapped from the frontend's shared fd.
pub struct InflightPackedQueue {
    base: *mut u8,
    desc_num: u16,
    /// Next counter value to stamp (oldest chains have the lowest).
    counter: u64,
    /// Per buffer id: the head entry of its chain, `u16::MAX` when not in flight.
    head_of_id: Box<[u16]>,
}

// SAFETY: `base` points into the inflight mapping, which outlives the queue; one poller owns
// each queue's region.
unsafe impl Send for InflightPackedQueue {}

const NONE: u16 = u16::MAX;

impl InflightPackedQueue {
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
            head_of_id: vec![NONE; usize::from(desc_num)].into_boxed_slice(),
        }
    }

    fn header_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: a u16 field of the header (offsets from offset_of!), 2-aligned, in range.
        unsafe { &*(self.base.add(offset) as *const AtomicU16) }
    }

    fn header_u8(&self, offset: usize) -> &AtomicU8 {
        // SAFETY: a u8 field of the header, in range.
        unsafe { &*(self.base.add(offset) as *const AtomicU8) }
    }

    fn entry(&self, i: u16) -> *mut u8 {
        debug_assert!(i < self.desc_num);
        // SAFETY: i < desc_num (callers check): entries follow the 32-byte header.
        unsafe {
            self.base
                .add(size_of::<RegionHeader>() + size_of::<DescState>() * usize::from(i))
        }
    }

    fn entry_u16(&self, i: u16, offset: usize) -> &AtomicU16 {
        // SAFETY: a u16 field of entry i, 2-aligned.
        unsafe { &*(self.entry(i).add(offset) as *const AtomicU16) }
    }

    fn inflight(&self, i: u16) -> &AtomicU8 {
        // SAFETY: byte 0 of entry i.
        unsafe { &*(self.entry(i) as *const AtomicU8) }
    }

    fn counter_of(&self, i: u16) -> &AtomicU64 {
        // SAFETY: the counter of entry i, 8-aligned (entries are 32 bytes from an 8-aligned
        // base).
        unsafe { &*(self.entry(i).add(offset_of!(DescState, counter)) as *const AtomicU64) }
    }

    fn next(&self, i: u16) -> &AtomicU16 {
        self.entry_u16(i, offset_of!(DescState, next))
    }

    fn last(&self, i: u16) -> &AtomicU16 {
        self.entry_u16(i, offset_of!(DescState, last))
    }

    fn num(&self, i: u16) -> &AtomicU16 {
        self.entry_u16(i, offset_of!(DescState, num))
    }

    fn version(&self) -> &AtomicU16 {
        self.header_u16(offset_of!(RegionHeader, version))
    }

    fn free_head(&self) -> &AtomicU16 {
        self.header_u16(offset_of!(RegionHeader, free_head))
    }

    fn old_free_head(&self) -> &AtomicU16 {
        self.header_u16(offset_of!(RegionHeader, old_free_head))
    }

    fn used_idx(&self) -> &AtomicU16 {
        self.header_u16(offset_of!(RegionHeader, used_idx))
    }

    fn old_used_idx(&self) -> &AtomicU16 {
        self.header_u16(offset_of!(RegionHeader, old_used_idx))
    }

    fn used_wrap(&self) -> &AtomicU8 {
        self.header_u8(offset_of!(RegionHeader, used_wrap_counter))
    }

    fn old_used_wrap(&self) -> &AtomicU8 {
        self.header_u8(offset_of!(RegionHeader, old_used_wrap_counter))
    }

    /// A copy of entry `i` (`< desc_num`).
    pub fn state(&self, i: u16) -> Option<DescState> {
        // SAFETY: i < desc_num: inside the region, 8-aligned. A volatile copy: the frontend
        // may write the region.
        (i < self.desc_num).then(|| unsafe { (self.entry(i) as *const DescState).read_volatile() })
    }

    fn write_descriptor(&self, i: u16, d: &PackedDescriptor) {
        // SAFETY: i < desc_num (callers check): the id, flags, len and addr of entry i.
        unsafe {
            let e = self.entry(i);
            (e.add(offset_of!(DescState, id)) as *mut u16).write_volatile(d.id);
            (e.add(offset_of!(DescState, flags)) as *mut u16).write_volatile(d.flags);
            (e.add(offset_of!(DescState, len)) as *mut u32).write_volatile(d.len);
            (e.add(offset_of!(DescState, addr)) as *mut u64).write_volatile(d.addr);
        }
    }

    /// Records `chain`, just taken from `ring`, before it is submitted: its descriptors are
    /// copied into entries taken from the free list, and the take is committed
    /// (`old_free_head`) only once all of it is written. `false` when the region's free list
    /// is broken (nothing committed).
    pub fn begin(&mut self, ring: &PackedQueue, chain: PackedChain) -> bool {
        let head = self.old_free_head().load(Ordering::Relaxed);
        let mut free = self.free_head().load(Ordering::Relaxed);
        if head >= self.desc_num || chain.id >= self.desc_num {
            return false;
        }
        self.num(head).store(0, Ordering::Relaxed);
        self.counter_of(head).store(self.counter, Ordering::Relaxed);
        self.counter = self.counter.saturating_add(1);
        self.inflight(head).store(1, Ordering::Relaxed);
        let mut index = chain.start;
        for n in 1..=chain.count {
            if free >= self.desc_num {
                // Uncommitted: the head entry is still first on the free list.
                self.free_head().store(head, Ordering::Relaxed);
                return false;
            }
            if n == chain.count {
                self.last(head).store(free, Ordering::Relaxed);
            }
            self.num(head).store(n, Ordering::Relaxed);
            self.write_descriptor(free, &ring.descriptor(index));
            free = self.next(free).load(Ordering::Relaxed);
            self.free_head().store(free, Ordering::Relaxed);
            index = if index + 1 == ring.size() {
                0
            } else {
                index + 1
            };
        }
        // Release: the entries before the commit.
        self.old_free_head().store(free, Ordering::Release);
        self.head_of_id[usize::from(chain.id)] = head;
        true
    }

    /// Before the used descriptors of `ids` are published: their entries go back to the
    /// free list and the region records the used position after them (`used`), all
    /// uncommitted until [`InflightPackedQueue::finish_batch`].
    pub fn prepare_batch(&mut self, ids: &[u16], used: Position) {
        for &id in ids {
            let Some(&head) = self.head_of_id.get(usize::from(id)) else {
                continue;
            };
            if head >= self.desc_num {
                continue;
            }
            let last = self.last(head).load(Ordering::Relaxed);
            if last >= self.desc_num {
                continue;
            }
            let free = self.free_head().load(Ordering::Relaxed);
            self.next(last).store(free, Ordering::Relaxed);
            self.free_head().store(head, Ordering::Relaxed);
        }
        self.used_idx().store(used.index, Ordering::Relaxed);
        self.used_wrap()
            .store(u8::from(used.wrap), Ordering::Release);
    }

    /// After the batch is published (the first used descriptor's flags written): its chains
    /// are no longer in flight, and the batch is committed.
    pub fn finish_batch(&mut self, ids: &[u16]) {
        fence(Ordering::Release);
        for &id in ids {
            let Some(head) = self.head_of_id.get_mut(usize::from(id)) else {
                continue;
            };
            let entry = std::mem::replace(head, NONE);
            if entry < self.desc_num {
                self.inflight(entry).store(0, Ordering::Release);
            }
        }
        self.commit();
    }

    fn commit(&self) {
        let free = self.free_head().load(Ordering::Relaxed);
        let used = self.used_idx().load(Ordering::Relaxed);
        let wrap = self.used_wrap().load(Ordering::Relaxed);
        self.old_free_head().store(free, Ordering::Relaxed);
        self.old_used_idx().store(used, Ordering::Relaxed);
        self.old_used_wrap().store(wrap, Ordering::Release);
    }

    /// Forgets the region's contents: the next [`InflightPackedQueue::recover`] finds it
    /// fresh.
    pub fn reset(&mut self) {
        self.version().store(0, Ordering::Release);
    }

    /// Recovery when the ring starts. `ring` is the queue whose descriptors tell whether an
    /// uncommitted batch reached the driver; `used` is where its used position stands when
    /// the region is fresh. Rolls back what was half done, commits a batch the driver may
    /// have seen, clears the free entries' flags, and lists the chains in flight oldest
    /// first.
    pub fn recover(&mut self, ring: &PackedQueue, used: Position) -> Recovery {
        let mut out = Recovery::default();
        self.head_of_id.fill(NONE);
        let n = self.desc_num;
        if self.version().load(Ordering::Acquire) == 0 {
            for i in 0..n {
                self.inflight(i).store(0, Ordering::Relaxed);
                self.next(i).store(i + 1, Ordering::Relaxed);
            }
            self.header_u16(offset_of!(RegionHeader, desc_num))
                .store(n, Ordering::Relaxed);
            self.free_head().store(0, Ordering::Relaxed);
            self.used_idx().store(used.index, Ordering::Relaxed);
            self.used_wrap()
                .store(u8::from(used.wrap), Ordering::Relaxed);
            self.commit();
            self.version().store(VERSION, Ordering::Release);
            self.counter = 0;
            out.fresh = true;
            out.used = Some(used);
            return out;
        }
        let current = (
            self.used_idx().load(Ordering::Acquire),
            self.used_wrap().load(Ordering::Acquire),
        );
        let old = (
            self.old_used_idx().load(Ordering::Acquire),
            self.old_used_wrap().load(Ordering::Acquire),
        );
        // The spec compares the indexes only; a batch of a whole ring leaves them equal and
        // the wrap counters different, so both are compared.
        if current != old && old.0 < ring.size() {
            // Until the batch is published, the descriptor at its first position is still
            // the one the driver made available in that lap; anything else (used by us, or
            // already made available again by a driver that saw it) means the driver may
            // have seen the batch: commit it.
            let flags = ring.descriptor(old.0).flags;
            if !is_avail(flags, old.1 != 0) {
                self.commit();
                out.committed_batch = true;
            }
        }
        // Roll back whatever is not committed.
        self.free_head().store(
            self.old_free_head().load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.used_idx().store(
            self.old_used_idx().load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.used_wrap().store(
            self.old_used_wrap().load(Ordering::Relaxed),
            Ordering::Release,
        );
        // Free entries hold no chain: clear what a half-done take or an uncleared batch left.
        let mut free = self.free_head().load(Ordering::Relaxed);
        for _ in 0..n {
            if free >= n {
                break;
            }
            self.inflight(free).store(0, Ordering::Relaxed);
            free = self.next(free).load(Ordering::Relaxed);
        }
        let (index, wrap) = (
            self.used_idx().load(Ordering::Relaxed),
            self.used_wrap().load(Ordering::Relaxed),
        );
        out.used = (index < ring.size()).then_some(Position {
            index,
            wrap: wrap != 0,
        });
        let mut pending: Vec<(u64, RecoveredChain)> = Vec::new();
        for head in 0..n {
            if self.inflight(head).load(Ordering::Acquire) != 1 {
                continue;
            }
            match self.follow(head) {
                Some(chain) if self.head_of_id[usize::from(chain.id)] == NONE => {
                    self.head_of_id[usize::from(chain.id)] = head;
                    pending.push((self.counter_of(head).load(Ordering::Relaxed), chain));
                }
                _ => out.unusable += 1,
            }
        }
        pending.sort_unstable_by_key(|&(counter, chain)| (counter, chain.entry));
        // The counters come from shared memory a frontend can write: never overflow on them.
        self.counter = pending
            .last()
            .map(|&(c, _)| c.saturating_add(1))
            .unwrap_or(0);
        out.resubmit = pending.into_iter().map(|(_, c)| c).collect();
        out
    }

    /// The recovered chain of buffer `id` (listed by the last [`InflightPackedQueue::recover`]
    /// and not finished since), its links checked again: the region is the frontend's too.
    pub fn recovered(&self, id: u16) -> Option<RecoveredChain> {
        let head = *self.head_of_id.get(usize::from(id))?;
        if head >= self.desc_num {
            return None;
        }
        self.follow(head).filter(|c| c.id == id)
    }

    /// The chain whose head entry is `head`, if its links hold: `num` entries through
    /// `next`, ending at `last`, with a buffer id in range.
    fn follow(&self, head: u16) -> Option<RecoveredChain> {
        let num = self.num(head).load(Ordering::Relaxed);
        if num == 0 || num > self.desc_num {
            return None;
        }
        let mut entry = head;
        for _ in 1..num {
            entry = self.next(entry).load(Ordering::Relaxed);
            if entry >= self.desc_num {
                return None;
            }
        }
        if entry != self.last(head).load(Ordering::Relaxed) {
            return None;
        }
        let id = self.state(entry)?.id;
        (id < self.desc_num).then_some(RecoveredChain {
            entry: head,
            id,
            count: num,
        })
    }

    /// The descriptors of a recovered chain, as they were when it was taken (the ring may
    /// hold used descriptors in their place by now).
    pub fn descriptors(
        &self,
        chain: RecoveredChain,
    ) -> impl Iterator<Item = PackedDescriptor> + '_ {
        let mut entry = Some(chain.entry);
        (0..chain.count).map_while(move |_| {
            let i = entry?;
            let s = self.state(i)?;
            entry = Some(s.next);
            Some(PackedDescriptor::new(s.addr, s.len, s.id, s.flags))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::tests::{buf, guest, Guest, BUFS};

    fn region(size: u16) -> Vec<u64> {
        vec![0u64; region_size(size) / 8]
    }

    /// A queue over the test region (a second one over the same base is a restarted
    /// process).
    fn open(mem: &mut [u64], size: u16) -> InflightPackedQueue {
        // SAFETY: the test region is region_size(size) bytes, 8-aligned, alive for the
        // test; the tests use one queue at a time.
        unsafe { InflightPackedQueue::new(mem.as_mut_ptr().cast(), size) }
    }

    /// Takes the next chain from the ring and records it.
    fn take(g: &mut Guest, q: &mut InflightPackedQueue) -> PackedChain {
        let chain = g.dev.pop().unwrap().expect("a chain");
        assert!(q.begin(&g.dev, chain));
        chain
    }

    /// Pushes `ids` as one batch and publishes it, stopping after `steps` of the three steps
    /// (prepare, publish, finish): a crash in between.
    fn complete(g: &mut Guest, q: &mut InflightPackedQueue, ids: &[u16], steps: usize) {
        for &id in ids {
            assert!(g.dev.push_used(id, 1));
        }
        if steps >= 1 {
            q.prepare_batch(ids, g.dev.next_used());
        }
        if steps >= 2 {
            g.dev.publish_used();
        }
        if steps >= 3 {
            q.finish_batch(ids);
        }
    }

    #[test]
    fn layout_matches_the_spec_and_its_implementations() {
        assert_eq!(region_size(128), 4160);
        for n in [1u16, 2, 3, 128, 256, 1024] {
            // DPDK's rule: 32 bytes per entry, 29 bytes of header fields, rounded to 64.
            assert_eq!(region_size(n), (32 * usize::from(n) + 29).div_ceil(64) * 64);
        }
    }

    #[test]
    fn a_taken_chain_is_copied_into_the_region_and_its_head_entry_describes_it() {
        let mut g = guest(8, false);
        let mut mem = region(8);
        let mut q = open(&mut mem, 8);
        assert!(q.recover(&g.dev, g.dev.next_used()).fresh);
        let a = [buf(BUFS, 16, false), buf(BUFS + 16, 1, true)];
        let b = [buf(BUFS + 32, 512, true)];
        g.drv.add(&a).unwrap();
        let id_b = g.drv.add(&b).unwrap();
        take(&mut g, &mut q);
        take(&mut g, &mut q);
        // Chain a took entries 0 and 1, b entry 2.
        let head_a = q.state(0).unwrap();
        assert_eq!((head_a.inflight, head_a.num, head_a.last), (1, 2, 1));
        assert_eq!(q.state(1).unwrap().addr, BUFS + 16);
        let head_b = q.state(2).unwrap();
        assert_eq!(
            (head_b.inflight, head_b.num, head_b.last, head_b.id),
            (1, 1, 2, id_b)
        );
        assert!(head_b.counter > head_a.counter);
        assert_eq!(q.old_free_head().load(Ordering::Relaxed), 3);
        // Completed: its entry heads the free list again, no longer in flight.
        complete(&mut g, &mut q, &[id_b], 3);
        assert_eq!(q.state(2).unwrap().inflight, 0);
        assert_eq!(q.free_head().load(Ordering::Relaxed), 2);
        assert_eq!(q.old_free_head().load(Ordering::Relaxed), 2);
        assert_eq!(q.old_used_idx().load(Ordering::Relaxed), 1);
    }

    #[test]
    fn chains_in_flight_come_back_oldest_first_with_their_descriptors() {
        let mut g = guest(8, false);
        let mut mem = region(8);
        let mut q = open(&mut mem, 8);
        q.recover(&g.dev, g.dev.next_used());
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
        for _ in 0..3 {
            take(&mut g, &mut q);
        }
        complete(&mut g, &mut q, &[b], 3);
        // A new chain reuses b's entry; taken after c, it comes back after c.
        let d = g.drv.add(&[buf(BUFS + 128, 4, true)]).unwrap();
        take(&mut g, &mut q);
        let mut q2 = open(&mut mem, 8);
        let r = q2.recover(&g.dev, Position::START);
        assert!(!r.fresh && !r.committed_batch);
        assert_eq!(r.used, Some(g.dev.next_used()));
        let ids: Vec<u16> = r.resubmit.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![a, c, d]);
        let c_descs: Vec<(u64, u32)> = q2
            .descriptors(r.resubmit[1])
            .map(|d| (d.addr, d.len))
            .collect();
        assert_eq!(c_descs, vec![(BUFS, 16), (BUFS + 64, 512), (BUFS + 16, 1)]);
        assert_eq!(r.resubmit[1].count, 3);
        // The recovered chains complete through the region like any other.
        complete(&mut g, &mut q2, &[c], 3);
        let r = open(&mut mem, 8).recover(&g.dev, Position::START);
        assert_eq!(
            r.resubmit.iter().map(|c| c.id).collect::<Vec<_>>(),
            vec![a, d]
        );
    }

    #[test]
    fn a_crash_inside_a_take_rolls_it_back() {
        let mut g = guest(8, false);
        let mut mem = region(8);
        let mut q = open(&mut mem, 8);
        q.recover(&g.dev, g.dev.next_used());
        let a = g.drv.add(&[buf(BUFS, 16, false)]).unwrap();
        g.drv
            .add(&[buf(BUFS, 16, false), buf(BUFS + 16, 1, true)])
            .unwrap();
        take(&mut g, &mut q);
        // The second take writes its entries but dies before committing old_free_head.
        let committed = q.old_free_head().load(Ordering::Relaxed);
        take(&mut g, &mut q);
        q.old_free_head().store(committed, Ordering::Relaxed);
        let r = open(&mut mem, 8).recover(&g.dev, Position::START);
        assert_eq!(r.resubmit.iter().map(|c| c.id).collect::<Vec<_>>(), vec![a]);
        assert_eq!(r.unusable, 0);
    }

    #[test]
    fn a_crash_before_the_batch_is_published_rolls_it_back_and_after_commits_it() {
        for (steps, published) in [(1, false), (2, true)] {
            let mut g = guest(8, false);
            let mut mem = region(8);
            let mut q = open(&mut mem, 8);
            q.recover(&g.dev, g.dev.next_used());
            let a = g
                .drv
                .add(&[buf(BUFS, 16, false), buf(BUFS + 16, 1, true)])
                .unwrap();
            let b = g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
            let c = g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
            for _ in 0..3 {
                take(&mut g, &mut q);
            }
            let before = g.dev.next_used();
            complete(&mut g, &mut q, &[c, a], steps);
            let after = g.dev.next_used();
            let r = open(&mut mem, 8).recover(&g.dev, Position::START);
            let ids: Vec<u16> = r.resubmit.iter().map(|c| c.id).collect();
            if published {
                assert!(r.committed_batch);
                assert_eq!(ids, vec![b]);
                assert_eq!(r.used, Some(after));
            } else {
                assert!(!r.committed_batch);
                assert_eq!(ids, vec![a, b, c]);
                assert_eq!(r.used, Some(before));
            }
        }
    }

    #[test]
    fn a_published_batch_of_a_whole_ring_is_committed() {
        // Four chains of a 4-entry ring in one batch: the used index comes back to where it
        // was, only its wrap counter differs.
        let mut g = guest(4, false);
        let mut mem = region(4);
        let mut q = open(&mut mem, 4);
        q.recover(&g.dev, g.dev.next_used());
        let ids: Vec<u16> = (0..4)
            .map(|_| g.drv.add(&[buf(BUFS, 1, true)]).unwrap())
            .collect();
        for _ in 0..4 {
            take(&mut g, &mut q);
        }
        complete(&mut g, &mut q, &ids, 2);
        let r = open(&mut mem, 4).recover(&g.dev, Position::START);
        assert!(r.committed_batch);
        assert!(r.resubmit.is_empty());
        assert_eq!(
            r.used,
            Some(Position {
                index: 0,
                wrap: false
            })
        );
    }

    #[test]
    fn hostile_region_contents_do_not_panic() {
        let g = guest(8, false);
        let mut mem = region(8);
        mem.fill(u64::MAX);
        let mut q = open(&mut mem, 8);
        // Every flag byte reads 0xff, not 1; every index is out of range.
        let r = q.recover(&g.dev, Position::START);
        assert!(r.resubmit.is_empty());
        assert_eq!(r.used, None, "a used index outside the ring");
        // Entries in flight with links going nowhere, and two claiming the same id.
        for i in 0..8 {
            q.inflight(i).store(1, Ordering::Relaxed);
        }
        q.old_free_head().store(u16::MAX, Ordering::Relaxed);
        let r = q.recover(&g.dev, Position::START);
        assert_eq!(r.unusable, 8);
        for i in 0..8 {
            q.num(i).store(1, Ordering::Relaxed);
            q.last(i).store(i, Ordering::Relaxed);
            (q.entry_u16(i, offset_of!(DescState, id))).store(3, Ordering::Relaxed);
        }
        let r = q.recover(&g.dev, Position::START);
        assert_eq!((r.resubmit.len(), r.unusable), (1, 7));
    }

    #[test]
    fn a_broken_free_list_refuses_a_take_without_committing_it() {
        let mut g = guest(8, false);
        let mut mem = region(8);
        let mut q = open(&mut mem, 8);
        q.recover(&g.dev, g.dev.next_used());
        q.next(0).store(u16::MAX, Ordering::Relaxed);
        g.drv
            .add(&[buf(BUFS, 16, false), buf(BUFS + 16, 1, true)])
            .unwrap();
        let chain = g.dev.pop().unwrap().unwrap();
        assert!(!q.begin(&g.dev, chain));
        assert_eq!(q.old_free_head().load(Ordering::Relaxed), 0);
        assert_eq!(q.free_head().load(Ordering::Relaxed), 0);
    }
}
