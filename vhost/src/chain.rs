//! Walking a descriptor chain from its head, trusting nothing: indexes, loops, indirect
//! tables, direction order, and every buffer against the memory table. The result lives in a
//! preallocated buffer, so walking allocates nothing.

use crate::memory::GuestMemory;
use crate::virtq::{Descriptor, DeviceQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// Most buffers a chain may have: seg_max data segments plus header and status, with room
/// for header or status split over descriptors.
pub const MAX_SEGMENTS: usize = 132;

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

/// A walked chain: its buffers in order.
pub struct Chain {
    /// Head index.
    pub head: u16,
    segments: Box<[Segment; MAX_SEGMENTS]>,
    count: usize,
}

impl Default for Chain {
    fn default() -> Self {
        Self {
            head: 0,
            segments: Box::new([Segment::default(); MAX_SEGMENTS]),
            count: 0,
        }
    }
}

impl Chain {
    /// The buffers.
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.count]
    }

    fn push(
        &mut self,
        mem: &GuestMemory,
        d: &Descriptor,
        seen_write: &mut bool,
    ) -> Result<(), ChainError> {
        let write = d.flags & DESC_F_WRITE != 0;
        if *seen_write && !write {
            return Err(ChainError::BadOrder);
        }
        *seen_write |= write;
        if d.len == 0 {
            return Ok(());
        }
        let host = mem
            .translate(d.addr, u64::from(d.len))
            .ok_or(ChainError::OutOfMemory)?;
        if self.count == MAX_SEGMENTS {
            return Err(ChainError::TooLong);
        }
        self.segments[self.count] = Segment {
            gpa: d.addr,
            host,
            len: d.len,
            write,
        };
        self.count += 1;
        Ok(())
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
        let size = queue.size();
        let mut seen_write = false;
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
                if d.flags & DESC_F_NEXT != 0 || d.len == 0 || d.len % 16 != 0 {
                    return Err(ChainError::BadIndirect);
                }
                return self.walk_indirect(mem, &d, &mut seen_write);
            }
            self.push(mem, &d, &mut seen_write)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = d.next;
        }
    }

    fn walk_indirect(
        &mut self,
        mem: &GuestMemory,
        table: &Descriptor,
        seen_write: &mut bool,
    ) -> Result<(), ChainError> {
        let entries = table.len / 16;
        // Tables are 16-byte aligned like the main table (so entries can be read volatile).
        if entries > u32::from(crate::virtq::MAX_QUEUE_SIZE) || table.addr % 16 != 0 {
            return Err(ChainError::BadIndirect);
        }
        let base = mem
            .translate(table.addr, u64::from(table.len))
            .ok_or(ChainError::OutOfMemory)? as *const Descriptor;
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
            self.push(mem, &d, seen_write)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = u32::from(d.next);
        }
    }
}
