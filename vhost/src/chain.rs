//! Walking a descriptor chain from its head, trusting nothing: indexes, loops, indirect
//! tables, direction order, and every buffer against the memory table. The result lives in a
//! buffer the caller owns (a device's request, sized by the device's limit), so walking
//! allocates nothing and stores each buffer once.

use crate::inflight_packed::{InflightPackedQueue, RecoveredChain};
use crate::memory::GuestMemory;
use crate::packed::{PackedChain, PackedDescriptor, PackedQueue};
use crate::virtq::{Descriptor, DeviceQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// One buffer of a chain, translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub gpa: u64,
    /// Host address.
    pub host: *mut u8,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Default for Segment {
    fn default() -> Self {
        Self {
            gpa: 0,
            host: std::ptr::null_mut(),
            len: 0,
            write: false,
        }
    }
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainError {
    /// A `next` or indirect index outside its table.
    BadIndex,
    /// More descriptors than the table has: a loop.
    Loop,
    /// An indirect table with a bad length, inside another, or combined with NEXT.
    BadIndirect,
    /// A buffer outside guest memory.
    OutOfMemory,
    /// A device-readable buffer after a device-writable one.
    BadOrder,
    /// More buffers than we accept.
    TooLong,
}

impl std::fmt::Display for ChainError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChainError::BadIndex => "descriptor index outside the table",
            ChainError::Loop => "descriptor chain loops",
            ChainError::BadIndirect => "malformed indirect descriptor table",
            ChainError::OutOfMemory => "buffer outside guest memory",
            ChainError::BadOrder => "device-readable buffer after a writable one",
            ChainError::TooLong => "chain has too many buffers",
        })
    }
}

/// A chain the ring offers a device, not walked yet: the device walks it into a buffer of
/// its own ([`ChainCursor::walk_into`]), whose length is the device's limit on buffers per
/// request, so each buffer is checked and stored once, where the device keeps it. Split and
/// packed rings differ only in where the chain's descriptors are (`S`, a [`ChainSource`]);
/// every descriptor is checked by the same visitors. Generic rather than an enum, so that
/// each layout's walk is compiled on its own: nothing is matched per request or per
/// descriptor, and a split ring's walk is the one it had before packed rings.
#[derive(Clone, Copy)]
pub struct ChainCursor<'a, S = Split<'a>> {
    source: S,
    mem: &'a GuestMemory,
    head: u16,
}

/// Where a chain's descriptors are: a split ring's table ([`Split`]), a packed ring
/// ([`Packed`]), or the inflight region's copies of a packed chain ([`Recovered`]). Sealed:
/// the walker's checks are these three.
pub trait ChainSource: Copy + sealed::Follow {}

mod sealed {
    use super::{ChainError, Descriptor, GuestMemory};

    /// What a walk does with each descriptor it reaches; a [`Follow`] checks the chain's
    /// shape.
    pub trait Visit {
        /// Whether an indirect descriptor must be exactly as the spec says (no NEXT beside
        /// it, a whole number of entries). A walk that only looks for the last byte to
        /// answer at accepts a sloppy one, so that such a chain is still answered rather
        /// than stopping the queue.
        const STRICT: bool;
        fn descriptor(&mut self, mem: &GuestMemory, d: &Descriptor) -> Result<(), ChainError>;
    }

    /// Follows a chain from its head, handing each descriptor to a visitor.
    pub trait Follow {
        fn follow<V: Visit>(
            &self,
            mem: &GuestMemory,
            head: u16,
            visit: &mut V,
        ) -> Result<(), ChainError>;
    }
}

use sealed::{Follow, Visit};

/// A split ring's chain: through its descriptor table from the head.
#[derive(Clone, Copy)]
pub struct Split<'a>(&'a DeviceQueue);

/// A chain taken from a packed ring: its consecutive ring descriptors.
#[derive(Clone, Copy)]
pub struct Packed<'a>(&'a PackedQueue, PackedChain);

/// A packed chain run again after a restart, from the inflight region's copies (the ring
/// may hold used descriptors in its place by now).
#[derive(Clone, Copy)]
pub struct Recovered<'a>(&'a InflightPackedQueue, RecoveredChain);

impl ChainSource for Split<'_> {}
impl ChainSource for Packed<'_> {}
impl ChainSource for Recovered<'_> {}

impl Follow for Split<'_> {
    #[inline(always)]
    fn follow<V: Visit>(
        &self,
        mem: &GuestMemory,
        head: u16,
        visit: &mut V,
    ) -> Result<(), ChainError> {
        follow(self.0, mem, head, visit)
    }
}

impl Follow for Packed<'_> {
    #[inline(always)]
    fn follow<V: Visit>(&self, mem: &GuestMemory, _: u16, visit: &mut V) -> Result<(), ChainError> {
        follow_packed(self.0, mem, self.1, visit)
    }
}

impl Follow for Recovered<'_> {
    #[inline(always)]
    fn follow<V: Visit>(&self, mem: &GuestMemory, _: u16, visit: &mut V) -> Result<(), ChainError> {
        follow_packed_descriptors(mem, self.1.count, self.0.descriptors(self.1), visit)
    }
}

impl<'a> ChainCursor<'a, Split<'a>> {
    /// The chain at `head` (already checked to be < queue size) of `queue`.
    pub fn new(queue: &'a DeviceQueue, mem: &'a GuestMemory, head: u16) -> Self {
        Self {
            source: Split(queue),
            mem,
            head,
        }
    }
}

impl<'a> ChainCursor<'a, Packed<'a>> {
    /// A chain taken from a packed ring ([`PackedQueue::pop`]); its head is its buffer id.
    pub fn packed(queue: &'a PackedQueue, mem: &'a GuestMemory, chain: PackedChain) -> Self {
        Self {
            source: Packed(queue, chain),
            mem,
            head: chain.id,
        }
    }
}

impl<'a> ChainCursor<'a, Recovered<'a>> {
    /// A packed chain recovered from the inflight region ([`InflightPackedQueue::recover`]);
    /// its head is its buffer id.
    pub fn recovered(
        region: &'a InflightPackedQueue,
        mem: &'a GuestMemory,
        chain: RecoveredChain,
    ) -> Self {
        Self {
            source: Recovered(region, chain),
            mem,
            head: chain.id,
        }
    }
}

impl<S: ChainSource> ChainCursor<'_, S> {
    /// Its head index (a packed chain's buffer id).
    #[inline]
    pub fn head(&self) -> u16 {
        self.head
    }

    #[inline(always)]
    fn follow<V: Visit>(&self, visit: &mut V) -> Result<(), ChainError> {
        self.source.follow(self.mem, self.head, visit)
    }

    /// Walks the chain, trusting nothing (indexes, loops, indirect tables, direction order,
    /// every buffer against the memory table), into `out`: the number of buffers stored.
    /// More buffers than `out` holds is [`ChainError::TooLong`].
    #[inline]
    pub fn walk_into(&self, out: &mut [Segment]) -> Result<usize, ChainError> {
        let mut buffers = Buffers {
            sink: Store { out, count: 0 },
            seen_write: false,
        };
        self.follow(&mut buffers)?;
        Ok(buffers.sink.count)
    }

    /// Marks in `log` every device-writable buffer of the chain, with the walk's checks
    /// (a migration's dirty log, after the device wrote them). For a chain too malformed to
    /// walk, the byte a device answers at ([`ChainCursor::last_byte`]).
    #[inline(never)]
    pub fn mark_writable(&self, log: &crate::dirty_log::DirtyLog) {
        let mut buffers = Buffers {
            sink: MarkWritable(log),
            seen_write: false,
        };
        if self.follow(&mut buffers).is_err() || !log.marks_data() {
            // The byte a device answers at (a status byte) is marked even when a test
            // build leaves the data unmarked.
            if let Some(last) = self.last_byte() {
                log.mark(last.gpa, u64::from(last.len));
            }
        }
    }

    /// After a failed walk: where a device answers (see [`last_byte`]). Kept out of the
    /// request path's code: only a refusal needs it.
    #[inline(never)]
    pub fn last_byte(&self) -> Option<Segment> {
        let mut last = LastDescriptor::default();
        self.follow(&mut last).ok()?;
        last.byte(self.mem)
    }
}

/// Where a walk puts the buffers it checked.
trait Sink {
    fn push(&mut self, segment: Segment) -> Result<(), ChainError>;
}

/// Stores the buffers (a device's request).
struct Store<'o> {
    out: &'o mut [Segment],
    count: usize,
}

impl Sink for Store<'_> {
    #[inline(always)]
    fn push(&mut self, segment: Segment) -> Result<(), ChainError> {
        let Some(slot) = self.out.get_mut(self.count) else {
            return Err(ChainError::TooLong);
        };
        *slot = segment;
        self.count += 1;
        Ok(())
    }
}

/// Marks the writable buffers in a dirty log, however many.
struct MarkWritable<'l>(&'l crate::dirty_log::DirtyLog);

impl Sink for MarkWritable<'_> {
    fn push(&mut self, segment: Segment) -> Result<(), ChainError> {
        if segment.write {
            self.0.mark_data(segment.gpa, u64::from(segment.len));
        }
        Ok(())
    }
}

/// Every buffer checked (direction order, translated through the memory table) and handed
/// to a sink.
struct Buffers<S> {
    sink: S,
    seen_write: bool,
}

impl<S: Sink> Visit for Buffers<S> {
    const STRICT: bool = true;

    #[inline(always)]
    fn descriptor(&mut self, mem: &GuestMemory, d: &Descriptor) -> Result<(), ChainError> {
        let write = d.flags & DESC_F_WRITE != 0;
        if self.seen_write && !write {
            return Err(ChainError::BadOrder);
        }
        self.seen_write |= write;
        if d.len == 0 {
            return Ok(());
        }
        let (host, len) = mem
            .translate_prefix(d.addr, u64::from(d.len))
            .ok_or(ChainError::OutOfMemory)?;
        self.sink.push(Segment {
            gpa: d.addr,
            host,
            len: len as u32,
            write,
        })?;
        if len == u64::from(d.len) {
            return Ok(());
        }
        // A buffer may continue from one region into an adjacent one (hotplugged memory,
        // a table split by the frontend): one segment per region it touches.
        let mut gpa = d.addr.checked_add(len).ok_or(ChainError::OutOfMemory)?;
        let mut left = u64::from(d.len) - len;
        while left > 0 {
            let (host, len) = mem
                .translate_prefix(gpa, left)
                .ok_or(ChainError::OutOfMemory)?;
            self.sink.push(Segment {
                gpa,
                host,
                len: len as u32,
                write,
            })?;
            gpa = gpa.checked_add(len).ok_or(ChainError::OutOfMemory)?;
            left -= len;
        }
        Ok(())
    }
}

/// Only the chain's last descriptor, whatever the buffers before it are.
#[derive(Default)]
struct LastDescriptor(Option<Descriptor>);

impl Visit for LastDescriptor {
    const STRICT: bool = false;

    fn descriptor(&mut self, _: &GuestMemory, d: &Descriptor) -> Result<(), ChainError> {
        self.0 = Some(*d);
        Ok(())
    }
}

impl LastDescriptor {
    /// The last byte of the last buffer, if it lies in guest memory.
    fn byte(&self, mem: &GuestMemory) -> Option<Segment> {
        let d = self.0?;
        let gpa = d.addr.checked_add(u64::from(d.len.checked_sub(1)?))?;
        Some(Segment {
            gpa,
            host: mem.translate(gpa, 1)?,
            len: 1,
            write: d.flags & DESC_F_WRITE != 0,
        })
    }
}

/// Follows the chain at `head` through `queue`'s table and at most one indirect table,
/// checking its shape (indexes inside their table, no loop, indirect tables well formed and
/// inside guest memory), and hands each descriptor to `visit` in order: the one walk every
/// reader of a chain shares.
#[inline(always)]
fn follow<V: Visit>(
    queue: &DeviceQueue,
    mem: &GuestMemory,
    head: u16,
    visit: &mut V,
) -> Result<(), ChainError> {
    let size = queue.size();
    let mut index = head;
    let mut visited = 0u32;
    loop {
        if index >= size {
            return Err(ChainError::BadIndex);
        }
        visited += 1;
        if visited > u32::from(size) {
            return Err(ChainError::Loop);
        }
        let d = queue.descriptor(index);
        if d.flags & DESC_F_INDIRECT != 0 {
            if d.len < 16 || (V::STRICT && (d.flags & DESC_F_NEXT != 0 || d.len % 16 != 0)) {
                return Err(ChainError::BadIndirect);
            }
            return follow_indirect(mem, &d, visit);
        }
        visit.descriptor(mem, &d)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = d.next;
    }
}

/// Inlined into its one caller: out of line, the walk's state would live in memory for
/// every descriptor of every chain.
#[inline(always)]
fn follow_indirect<V: Visit>(
    mem: &GuestMemory,
    table: &Descriptor,
    visit: &mut V,
) -> Result<(), ChainError> {
    let (base, entries) = indirect_table::<Descriptor>(mem, table)?;
    let mut index = 0u32;
    let mut visited = 0u32;
    loop {
        if index >= entries {
            return Err(ChainError::BadIndex);
        }
        visited += 1;
        if visited > entries {
            return Err(ChainError::Loop);
        }
        // SAFETY: index < entries: inside the translated, aligned table. Read once, then
        // only the copy is checked and used.
        let d = unsafe { base.add(index as usize).read_volatile() };
        if d.flags & DESC_F_INDIRECT != 0 {
            return Err(ChainError::BadIndirect);
        }
        visit.descriptor(mem, &d)?;
        if d.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = u32::from(d.next);
    }
}

/// Follows a packed ring's chain: its `count` consecutive ring descriptors (wrapping at the
/// ring's end), with the checks of [`follow_packed_descriptors`] (the chain's extent was
/// bounded by the ring when it was taken).
#[inline(always)]
fn follow_packed<V: Visit>(
    queue: &PackedQueue,
    mem: &GuestMemory,
    chain: PackedChain,
    visit: &mut V,
) -> Result<(), ChainError> {
    let size = queue.size();
    if chain.count > size || chain.start >= size {
        return Err(ChainError::BadIndex);
    }
    let mut index = chain.start;
    let descriptors = (0..chain.count).map(|_| {
        let d = queue.descriptor(index);
        index = if index + 1 == size { 0 } else { index + 1 };
        d
    });
    follow_packed_descriptors(mem, chain.count, descriptors, visit)
}

/// Follows a packed chain of `count` descriptors, the last of which may be an indirect
/// table, with the shape checks of [`follow`] that apply to a packed ring. Fewer
/// descriptors than `count` (a recovered chain whose links broke) is a bad index.
#[inline(always)]
fn follow_packed_descriptors<V: Visit>(
    mem: &GuestMemory,
    count: u16,
    descriptors: impl Iterator<Item = PackedDescriptor>,
    visit: &mut V,
) -> Result<(), ChainError> {
    let mut seen = 0u16;
    for d in descriptors.take(usize::from(count)) {
        seen += 1;
        let d = split_view(d);
        if d.flags & DESC_F_INDIRECT != 0 {
            // An indirect table is a chain's only buffer list from there on: with NEXT (more
            // ring descriptors after it), it is malformed.
            if d.len < 16 || (V::STRICT && (seen != count || d.len % 16 != 0)) {
                return Err(ChainError::BadIndirect);
            }
            return follow_packed_indirect(mem, &d, visit);
        }
        visit.descriptor(mem, &d)?;
    }
    if seen == 0 || seen != count {
        return Err(ChainError::BadIndex);
    }
    Ok(())
}

/// An indirect table's entries (16 bytes each, split or packed) in guest memory, and how
/// many: at most a queue's worth, 16-byte aligned like the main table (so entries can be
/// read volatile), all of it inside the memory table.
#[inline(always)]
fn indirect_table<T>(mem: &GuestMemory, table: &Descriptor) -> Result<(*const T, u32), ChainError> {
    let entries = table.len / 16;
    if entries > u32::from(crate::virtq::MAX_QUEUE_SIZE) || table.addr % 16 != 0 {
        return Err(ChainError::BadIndirect);
    }
    let base = mem
        .translate(table.addr, u64::from(table.len))
        .ok_or(ChainError::OutOfMemory)? as *const T;
    Ok((base, entries))
}

/// A packed indirect table: `len / 16` consecutive descriptors, no `next` (only WRITE
/// counts in their flags; NEXT and the id are ignored, INDIRECT is refused).
fn follow_packed_indirect<V: Visit>(
    mem: &GuestMemory,
    table: &Descriptor,
    visit: &mut V,
) -> Result<(), ChainError> {
    let (base, entries) = indirect_table::<PackedDescriptor>(mem, table)?;
    for i in 0..entries as usize {
        // SAFETY: i < entries: inside the translated, aligned table. Read once, then only
        // the copy is checked and used.
        let d = split_view(unsafe { base.add(i).read_volatile() });
        if d.flags & DESC_F_INDIRECT != 0 {
            return Err(ChainError::BadIndirect);
        }
        visit.descriptor(mem, &d)?;
    }
    Ok(())
}

/// A packed descriptor as the visitors read descriptors: address, length, and the flags
/// they look at (WRITE, INDIRECT); a packed chain has no `next`.
#[inline(always)]
fn split_view(d: PackedDescriptor) -> Descriptor {
    Descriptor::new(
        d.addr,
        d.len,
        d.flags & (DESC_F_WRITE | DESC_F_INDIRECT | DESC_F_NEXT),
        0,
    )
}

/// A walked chain in a buffer of its own (the guest test kit's and the fuzz targets' view;
/// a device walks into its own buffer through [`ChainCursor`]).
pub struct Chain {
    /// Head index.
    pub head: u16,
    segments: Box<[Segment]>,
    count: usize,
}

impl Default for Chain {
    /// Room for as many buffers as a queue of the largest size could chain.
    fn default() -> Self {
        Self::new(usize::from(crate::virtq::MAX_QUEUE_SIZE))
    }
}

impl Chain {
    /// A chain of at most `max_segments` buffers.
    pub fn new(max_segments: usize) -> Self {
        Self {
            head: 0,
            segments: vec![Segment::default(); max_segments].into_boxed_slice(),
            count: 0,
        }
    }

    /// The buffers.
    #[inline]
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.count]
    }

    /// Walks the chain starting at `head` (already checked to be < queue size).
    pub fn walk(
        &mut self,
        queue: &DeviceQueue,
        mem: &GuestMemory,
        head: u16,
    ) -> Result<(), ChainError> {
        self.head = head;
        self.count = 0;
        self.count = ChainCursor::new(queue, mem, head).walk_into(&mut self.segments)?;
        Ok(())
    }
}

/// After a failed walk: the last byte of the chain's last buffer, if the chain can still be
/// followed to its end (its shape checked as a walk checks it, the buffers before the last
/// not looked at). A device answers a malformed request there; `None` means the ring is too
/// broken to answer anything.
pub fn last_byte(queue: &DeviceQueue, mem: &GuestMemory, head: u16) -> Option<Segment> {
    ChainCursor::new(queue, mem, head).last_byte()
}

#[cfg(test)]
mod tests {
    //! Every hostile chain a guest can write, walked in-process.
    use super::*;
    use crate::mock::MockGuest;
    use crate::virtq::MAX_QUEUE_SIZE;

    const MEM: u64 = 1 << 20;
    /// A device's limit on buffers per chain, for the length tests.
    const MAX_SEGMENTS: usize = 132;

    fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
        Descriptor::new(addr, len, flags, next)
    }

    /// Walks raw descriptors placed at indexes 4.. with head 4.
    fn walk_raw(guest: &mut MockGuest, descs: &[Descriptor]) -> Result<Vec<Segment>, ChainError> {
        let list: Vec<(u16, Descriptor)> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u16 + 4, *d))
            .collect();
        guest.add_raw(&list, 4);
        walk_head(guest, 4)
    }

    fn walk_head(guest: &mut MockGuest, head: u16) -> Result<Vec<Segment>, ChainError> {
        // Each test chain is the newest one made available, walked as a device with a limit
        // of MAX_SEGMENTS buffers would.
        let (vq, newest) = guest.newest();
        assert_eq!(newest, head);
        let mut out = vec![Segment::default(); MAX_SEGMENTS];
        let n = ChainCursor::new(&vq, &guest.memory(), head).walk_into(&mut out)?;
        out.truncate(n);
        Ok(out)
    }

    #[test]
    fn a_direct_chain_translates_every_buffer_in_order() {
        let mut g = MockGuest::new(MEM, 16);
        let (a, b, c) = (g.alloc(16), g.alloc(4096), g.alloc(1));
        let head = g.add_chain(&[(a, 16, false), (b, 4096, true), (c, 1, true)]);
        let segs = walk_head(&mut g, head).unwrap();
        let shape: Vec<(u64, u32, bool)> = segs.iter().map(|s| (s.gpa, s.len, s.write)).collect();
        assert_eq!(shape, vec![(a, 16, false), (b, 4096, true), (c, 1, true)]);
        let host = g.memory().translate(b, 4096).unwrap();
        assert_eq!(segs[1].host, host);
    }

    #[test]
    fn an_indirect_chain_walks_like_a_direct_one() {
        let mut g = MockGuest::new(MEM, 16);
        let (a, b, c) = (g.alloc(16), g.alloc(512), g.alloc(1));
        let head = g.add_indirect(&[(a, 16, false), (b, 512, true), (c, 1, true)]);
        let segs = walk_head(&mut g, head).unwrap();
        let shape: Vec<(u64, u32, bool)> = segs.iter().map(|s| (s.gpa, s.len, s.write)).collect();
        assert_eq!(shape, vec![(a, 16, false), (b, 512, true), (c, 1, true)]);
    }

    #[test]
    fn empty_buffers_are_skipped() {
        let mut g = MockGuest::new(MEM, 16);
        let (a, c) = (g.alloc(16), g.alloc(1));
        let head = g.add_chain(&[(a, 16, false), (a, 0, true), (c, 1, true)]);
        assert_eq!(walk_head(&mut g, head).unwrap().len(), 2);
    }

    #[test]
    fn a_buffer_outside_guest_memory_is_refused() {
        let mut g = MockGuest::new(MEM, 16);
        let hdr = g.alloc(16);
        let r = walk_raw(
            &mut g,
            &[
                d(hdr, 16, DESC_F_NEXT, 5),
                d(MEM - 100, 512, DESC_F_WRITE, 0),
            ],
        );
        assert_eq!(r, Err(ChainError::OutOfMemory));
        let r = walk_raw(&mut g, &[d(MEM, 1, DESC_F_WRITE, 0)]);
        assert_eq!(r, Err(ChainError::OutOfMemory), "starts at the end");
    }

    #[test]
    fn an_address_that_wraps_around_is_refused() {
        let mut g = MockGuest::new(MEM, 16);
        let r = walk_raw(&mut g, &[d(u64::MAX - 10, 512, DESC_F_WRITE, 0)]);
        assert_eq!(r, Err(ChainError::OutOfMemory));
        let r = walk_raw(&mut g, &[d(16, u32::MAX, DESC_F_WRITE, 0)]);
        assert_eq!(r, Err(ChainError::OutOfMemory), "length past the end");
    }

    #[test]
    fn a_loop_is_refused() {
        let mut g = MockGuest::new(MEM, 16);
        let b = g.alloc(512);
        // 4 -> 5 -> 6 -> 5
        let r = walk_raw(
            &mut g,
            &[
                d(b, 16, DESC_F_NEXT, 5),
                d(b, 512, DESC_F_WRITE | DESC_F_NEXT, 6),
                d(b, 512, DESC_F_WRITE | DESC_F_NEXT, 5),
            ],
        );
        assert_eq!(r, Err(ChainError::Loop));
        // A descriptor naming itself.
        let r = walk_raw(&mut g, &[d(b, 16, DESC_F_NEXT, 4)]);
        assert_eq!(r, Err(ChainError::Loop));
    }

    #[test]
    fn next_outside_the_table_is_refused() {
        let mut g = MockGuest::new(MEM, 16);
        let b = g.alloc(16);
        let r = walk_raw(&mut g, &[d(b, 16, DESC_F_NEXT, 16)]);
        assert_eq!(r, Err(ChainError::BadIndex));
        let r = walk_raw(&mut g, &[d(b, 16, DESC_F_NEXT, u16::MAX)]);
        assert_eq!(r, Err(ChainError::BadIndex));
    }

    #[test]
    fn a_chain_longer_than_accepted_is_refused() {
        let mut g = MockGuest::new(4 << 20, 256);
        let buf = g.alloc(512);
        // Direct: MAX_SEGMENTS + 1 buffers.
        let n = MAX_SEGMENTS + 1;
        let list: Vec<(u64, u32, bool)> = (0..n).map(|_| (buf, 512, true)).collect();
        let head = g.add_chain(&list);
        assert_eq!(walk_head(&mut g, head), Err(ChainError::TooLong));
        // Indirect: 200 entries.
        let mut g = MockGuest::new(4 << 20, 16);
        let buf = g.alloc(512);
        let list: Vec<(u64, u32, bool)> = (0..200).map(|_| (buf, 512, true)).collect();
        let head = g.add_indirect(&list);
        assert_eq!(walk_head(&mut g, head), Err(ChainError::TooLong));
    }

    #[test]
    fn exactly_the_most_buffers_accepted_walks() {
        let mut g = MockGuest::new(4 << 20, 256);
        let buf = g.alloc(512);
        let list: Vec<(u64, u32, bool)> = (0..MAX_SEGMENTS).map(|_| (buf, 512, true)).collect();
        let head = g.add_chain(&list);
        assert_eq!(walk_head(&mut g, head).unwrap().len(), MAX_SEGMENTS);
    }

    #[test]
    fn malformed_indirect_tables_are_refused() {
        let mut g = MockGuest::new(MEM, 16);
        let b = g.alloc(512);
        let table = g.write_table(&[d(b, 16, DESC_F_NEXT, 1), d(b, 1, DESC_F_WRITE, 0)]);
        // Outside memory.
        let r = walk_raw(&mut g, &[d(MEM - 16, 32, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::OutOfMemory), "table outside memory");
        // Nested: an indirect descriptor inside an indirect table.
        let nested = g.write_table(&[d(table, 32, DESC_F_INDIRECT, 0)]);
        let r = walk_raw(&mut g, &[d(nested, 16, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::BadIndirect), "nested table");
        // Misaligned table, a length that is not a multiple of 16, an empty table.
        let r = walk_raw(&mut g, &[d(table + 8, 32, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::BadIndirect), "misaligned table");
        let r = walk_raw(&mut g, &[d(table, 20, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::BadIndirect), "odd length");
        let r = walk_raw(&mut g, &[d(table, 0, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::BadIndirect), "empty table");
        // Combined with NEXT.
        let r = walk_raw(
            &mut g,
            &[
                d(table, 32, DESC_F_INDIRECT | DESC_F_NEXT, 5),
                d(b, 1, DESC_F_WRITE, 0),
            ],
        );
        assert_eq!(r, Err(ChainError::BadIndirect), "indirect with NEXT");
        // Larger than any queue.
        let huge = 16 * (u32::from(MAX_QUEUE_SIZE) + 1);
        let r = walk_raw(&mut g, &[d(0, huge, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::BadIndirect), "more entries than a queue");
    }

    #[test]
    fn loops_and_bad_indexes_inside_an_indirect_table_are_refused() {
        let mut g = MockGuest::new(MEM, 16);
        let b = g.alloc(512);
        let looped = g.write_table(&[d(b, 16, DESC_F_NEXT, 1), d(b, 16, DESC_F_NEXT, 0)]);
        let r = walk_raw(&mut g, &[d(looped, 32, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::Loop));
        let beyond = g.write_table(&[d(b, 16, DESC_F_NEXT, 2), d(b, 16, 0, 0)]);
        let r = walk_raw(&mut g, &[d(beyond, 32, DESC_F_INDIRECT, 0)]);
        assert_eq!(r, Err(ChainError::BadIndex));
    }

    /// The last byte the device could answer at, for the newest chain.
    fn answerable(guest: &MockGuest) -> Option<Segment> {
        let mut vq = guest.device_queue(false);
        vq.next_avail = vq.avail_idx().wrapping_sub(1);
        let head = vq.pop().unwrap().unwrap();
        last_byte(&vq, &guest.memory(), head)
    }

    #[test]
    fn a_malformed_chain_is_answered_at_its_last_byte_when_it_has_one() {
        let mut g = MockGuest::new(MEM, 16);
        let (hdr, st) = (g.alloc(16), g.alloc(4));
        // A data buffer outside memory, the status in place: found.
        walk_raw(
            &mut g,
            &[
                d(hdr, 16, DESC_F_NEXT, 5),
                d(MEM - 100, 512, DESC_F_WRITE | DESC_F_NEXT, 6),
                d(st, 4, DESC_F_WRITE, 0),
            ],
        )
        .unwrap_err();
        let last = answerable(&g).expect("the status byte is reachable");
        assert_eq!((last.gpa, last.len, last.write), (st + 3, 1, true));
        // Too long for the walker, status still at the end of an indirect table: found.
        let list: Vec<(u64, u32, bool)> = (0..200)
            .map(|i| {
                if i == 199 {
                    (st, 1, true)
                } else {
                    (hdr, 16, false)
                }
            })
            .collect();
        g.add_indirect(&list);
        assert_eq!(answerable(&g).map(|s| s.gpa), Some(st));
        // An indirect descriptor with NEXT beside it and a stray half entry: the walk refuses
        // it, the status at the end of its table is still answered.
        let table = g.write_table(&[d(hdr, 16, DESC_F_NEXT, 1), d(st, 1, DESC_F_WRITE, 0)]);
        let r = walk_raw(&mut g, &[d(table, 40, DESC_F_INDIRECT | DESC_F_NEXT, 5)]);
        assert_eq!(r, Err(ChainError::BadIndirect));
        assert_eq!(answerable(&g).map(|s| s.gpa), Some(st));
        // A loop, a next outside the table, a status outside memory: nothing to answer at.
        walk_raw(
            &mut g,
            &[d(hdr, 16, DESC_F_NEXT, 5), d(hdr, 16, DESC_F_NEXT, 4)],
        )
        .unwrap_err();
        assert_eq!(answerable(&g), None, "loop");
        walk_raw(&mut g, &[d(hdr, 16, DESC_F_NEXT, 99)]).unwrap_err();
        assert_eq!(answerable(&g), None, "next outside the table");
        walk_raw(
            &mut g,
            &[d(hdr, 16, DESC_F_NEXT, 5), d(MEM, 1, DESC_F_WRITE, 0)],
        )
        .unwrap_err();
        assert_eq!(answerable(&g), None, "status outside memory");
    }

    #[test]
    fn a_buffer_spanning_two_adjacent_regions_becomes_two_segments() {
        use crate::driver::{DriverBuffer, DriverQueue};
        use crate::memory::tests::memfd;
        const R: u64 = 1 << 20;
        // Two regions back to back in guest-physical space, from two different fds.
        let mem = GuestMemory::from_table(
            &[(0, R, 0x10_0000_0000, 0), (R, R, 0x20_0000_0000, 0)],
            vec![memfd(R), memfd(R)],
        )
        .unwrap();
        let host0 = mem.translate(0, R).unwrap();
        // SAFETY: region 0 holds the rings of a 16-entry queue and outlives the queue.
        let mut drv = unsafe { DriverQueue::new(host0, 0, 16) };
        let f = |gpa: u64| 0x10_0000_0000 + gpa;
        let vq =
            DeviceQueue::new(&mem, 16, f(drv.gpas.0), f(drv.gpas.1), f(drv.gpas.2), false).unwrap();
        let head = drv
            .add(&[DriverBuffer {
                gpa: R - 100,
                len: 512,
                write: true,
            }])
            .unwrap();
        let mut chain = Chain::default();
        chain.walk(&vq, &mem, head).unwrap();
        let segs = chain.segments();
        assert_eq!(segs.len(), 2);
        assert_eq!((segs[0].gpa, segs[0].len), (R - 100, 100));
        assert_eq!((segs[1].gpa, segs[1].len), (R, 412));
        assert_eq!(segs[1].host, mem.translate(R, 1).unwrap());
        // Past the end of the second region: refused.
        let head = drv
            .add(&[DriverBuffer {
                gpa: 2 * R - 100,
                len: 512,
                write: true,
            }])
            .unwrap();
        let mut vq = vq;
        vq.next_avail = 1;
        assert_eq!(chain.walk(&vq, &mem, head), Err(ChainError::OutOfMemory));
    }

    #[test]
    fn a_readable_buffer_after_a_writable_one_is_refused() {
        let mut g = MockGuest::new(MEM, 16);
        let (a, b, c) = (g.alloc(16), g.alloc(512), g.alloc(1));
        let head = g.add_chain(&[(a, 16, false), (b, 512, true), (c, 1, false)]);
        assert_eq!(walk_head(&mut g, head), Err(ChainError::BadOrder));
        let head = g.add_indirect(&[(a, 16, true), (b, 512, false)]);
        assert_eq!(walk_head(&mut g, head), Err(ChainError::BadOrder));
    }
}
