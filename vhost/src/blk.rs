//! virtio-blk requests (virtio 1.1 §5.2.6): the header, the data buffers and the status byte
//! of a walked chain, checked against the device's limits before anything reaches a backend.

use crate::chain::{Segment, MAX_SEGMENTS};

/// Request types.
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Get device id.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Sector size of the virtio-blk protocol (independent of the device's block size).
pub const SECTOR: u64 = 512;
/// Most discard / write-zeroes ranges in one request that we accept.
pub const MAX_DISCARD_SEGMENTS: usize = 32;

/// What the backend is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Read into the data buffers.
    Read,
    /// Write from the data buffers.
    Write,
    /// Make written data durable.
    Flush,
    /// Deallocate the ranges.
    Discard,
    /// Zero the ranges (`unmap`: may deallocate).
    WriteZeroes {
        /// The guest allows deallocation.
        unmap: bool,
    },
}

/// A checked request.
#[derive(Debug)]
pub struct Request {
    /// The operation.
    pub op: Operation,
    /// First sector (Read/Write).
    pub sector: u64,
    /// Data buffers (Read/Write).
    pub data: [Segment; MAX_SEGMENTS],
    /// How many of `data` are used.
    pub data_count: usize,
    /// Data bytes.
    pub data_len: u64,
    /// Ranges (Discard/WriteZeroes): first sector and sectors.
    pub ranges: [(u64, u32); MAX_DISCARD_SEGMENTS],
    /// How many of `ranges` are used.
    pub range_count: usize,
    /// Where the status byte goes.
    pub status: *mut u8,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            op: Operation::Flush,
            sector: 0,
            data: [Segment::default(); MAX_SEGMENTS],
            data_count: 0,
            data_len: 0,
            ranges: [(0, 0); MAX_DISCARD_SEGMENTS],
            range_count: 0,
            status: std::ptr::null_mut(),
        }
    }
}

/// What the device offers, for checking requests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Flush supported.
    pub flush: bool,
    /// Discard supported.
    pub discard: bool,
    /// Write zeroes supported.
    pub write_zeroes: bool,
    /// Most sectors in one discard / write-zeroes range.
    pub max_range_sectors: u32,
    /// Data buffers per request (seg_max).
    pub seg_max: u32,
}

/// How a chain was judged.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the backend.
    Submit,
    /// Answer at once with this status (GET_ID answers OK here, having written the id).
    Complete(u8),
    /// No usable status byte: return the chain with nothing written.
    Drop,
}

fn copy_out(segs: &[Segment], mut skip: usize, out: &mut [u8]) -> usize {
    let mut done = 0;
    for s in segs {
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - done);
        // SAFETY: the segment was translated for `len` bytes; skip + n <= len.
        unsafe { std::ptr::copy_nonoverlapping(s.host.add(skip), out[done..].as_mut_ptr(), n) };
        done += n;
        skip = 0;
        if done == out.len() {
            break;
        }
    }
    done
}

/// Checks a walked chain and fills `request`. `id` is what GET_ID answers.
pub fn parse(
    segments: &[Segment],
    limits: &Limits,
    id: &[u8; ID_BYTES],
    request: &mut Request,
) -> Verdict {
    // The status byte: last byte of the last buffer, which must be device-writable.
    let Some(last) = segments.last().filter(|s| s.write) else {
        return Verdict::Drop;
    };
    // SAFETY: the last segment has len >= 1 (empty buffers are not kept).
    request.status = unsafe { last.host.add(last.len as usize - 1) };
    let mut header = [0u8; 16];
    let readable: usize = segments
        .iter()
        .filter(|s| !s.write)
        .map(|s| s.len as usize)
        .sum();
    if readable < 16 || copy_out(segments, 0, &mut header) < 16 {
        return Verdict::Complete(status::IOERR);
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    request.sector = sector;
    request.data_count = 0;
    request.data_len = 0;
    request.range_count = 0;

    // Data: the bytes after the header and before the status byte.
    let body_start = 16usize;
    let total: usize = segments.iter().map(|s| s.len as usize).sum();
    let body_end = total - 1;
    let mut offset = 0usize;
    let mut body_write: Option<bool> = None;
    let mut mixed = false;
    for s in segments {
        let (start, end) = (offset, offset + s.len as usize);
        offset = end;
        let (from, to) = (start.max(body_start), end.min(body_end));
        if from >= to {
            continue;
        }
        if *body_write.get_or_insert(s.write) != s.write {
            mixed = true;
        }
        if request.data_count == MAX_SEGMENTS {
            return Verdict::Complete(status::IOERR);
        }
        request.data[request.data_count] = Segment {
            gpa: s.gpa + (from - start) as u64,
            // SAFETY: from - start < len: inside the translated buffer.
            host: unsafe { s.host.add(from - start) },
            len: (to - from) as u32,
            write: s.write,
        };
        request.data_count += 1;
        request.data_len += (to - from) as u64;
    }
    let data = &request.data[..request.data_count];

    match kind {
        req::IN | req::OUT => {
            let writes_guest = kind == req::IN;
            if mixed || data.iter().any(|s| s.write != writes_guest) {
                return Verdict::Complete(status::IOERR);
            }
            if request.data_count as u32 > limits.seg_max || request.data_len % SECTOR != 0 {
                return Verdict::Complete(status::IOERR);
            }
            let end = sector.checked_add(request.data_len / SECTOR);
            if end.is_none_or(|e| e > limits.capacity) {
                return Verdict::Complete(status::IOERR);
            }
            if request.data_len == 0 {
                return Verdict::Complete(status::OK);
            }
            request.op = if writes_guest {
                Operation::Read
            } else {
                Operation::Write
            };
            Verdict::Submit
        }
        req::FLUSH => {
            if !limits.flush {
                return Verdict::Complete(status::UNSUPP);
            }
            request.op = Operation::Flush;
            Verdict::Submit
        }
        req::GET_ID => {
            if mixed || data.iter().any(|s| !s.write) || request.data_len == 0 {
                return Verdict::Complete(status::IOERR);
            }
            let mut written = 0usize;
            for s in data {
                let n = (s.len as usize).min(ID_BYTES - written);
                // SAFETY: n <= s.len: inside the translated, device-writable buffer.
                unsafe { std::ptr::copy_nonoverlapping(id[written..].as_ptr(), s.host, n) };
                written += n;
                if written == ID_BYTES {
                    break;
                }
            }
            Verdict::Complete(status::OK)
        }
        req::DISCARD | req::WRITE_ZEROES => {
            let supported = if kind == req::DISCARD {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !supported {
                return Verdict::Complete(status::UNSUPP);
            }
            if mixed
                || data.iter().any(|s| s.write)
                || request.data_len == 0
                || request.data_len % 16 != 0
            {
                return Verdict::Complete(status::IOERR);
            }
            let count = (request.data_len / 16) as usize;
            if count > MAX_DISCARD_SEGMENTS {
                return Verdict::Complete(status::IOERR);
            }
            let mut raw = [0u8; 16 * MAX_DISCARD_SEGMENTS];
            let mut done = 0;
            for s in data {
                // SAFETY: the data segments were translated for their lengths.
                unsafe {
                    std::ptr::copy_nonoverlapping(s.host, raw[done..].as_mut_ptr(), s.len as usize)
                };
                done += s.len as usize;
            }
            let mut unmap = false;
            for i in 0..count {
                let r = &raw[16 * i..16 * i + 16];
                let start = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
                let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
                // Only write zeroes has a flag (bit 0: unmap); anything else is unsupported.
                let allowed = if kind == req::WRITE_ZEROES { 1 } else { 0 };
                if flags & !allowed != 0 {
                    return Verdict::Complete(status::UNSUPP);
                }
                unmap |= flags & 1 != 0;
                let end = start.checked_add(u64::from(sectors));
                if sectors == 0
                    || sectors > limits.max_range_sectors
                    || end.is_none_or(|e| e > limits.capacity)
                {
                    return Verdict::Complete(status::IOERR);
                }
                request.ranges[i] = (start, sectors);
            }
            request.range_count = count;
            request.op = if kind == req::DISCARD {
                Operation::Discard
            } else {
                Operation::WriteZeroes { unmap }
            };
            Verdict::Submit
        }
        _ => Verdict::Complete(status::UNSUPP),
    }
}
