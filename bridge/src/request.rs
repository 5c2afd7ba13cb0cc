//! virtio-blk requests (virtio 1.2 §5.2.6): the header, the data buffers and the status byte
//! of a walked chain, checked against the device's limits before anything reaches a backend.

use vfblk_vhost::chain::{ChainCursor, ChainError, ChainSource, Segment};

/// Most buffers a request's chain may have: seg_max data buffers plus header and status,
/// with room for a header or status split over descriptors. The device's limit: the walker
/// stores a chain into a request's buffers, and a chain with more is refused.
pub const MAX_SEGMENTS: usize = 132;

use crate::virtio_blk::{
    req, status, Range, RequestHeader, ID_BYTES, SECTOR, WRITE_ZEROES_FLAG_UNMAP,
};

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
    /// The chain's buffers as the walker stored them. Once parsed, the data buffers are a
    /// run of them ([`Request::data`]), trimmed in place where a header or the status byte
    /// shares a buffer with data: each buffer is stored once, where the backend reads it.
    buffers: [Segment; MAX_SEGMENTS],
    /// Where the data buffers start in `buffers`.
    data_start: usize,
    /// How many data buffers (Read/Write).
    pub data_count: usize,
    /// Data bytes.
    pub data_len: u64,
    /// Ranges (Discard/WriteZeroes): first sector and sectors.
    pub ranges: [(u64, u32); MAX_DISCARD_SEGMENTS],
    /// How many of `ranges` are used.
    pub range_count: usize,
    /// Where the status byte goes.
    pub status: *mut u8,
    /// A write that must be on stable storage before it completes (writethrough mode).
    pub durable: bool,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            op: Operation::Flush,
            sector: 0,
            buffers: [Segment::default(); MAX_SEGMENTS],
            data_start: 0,
            data_count: 0,
            data_len: 0,
            ranges: [(0, 0); MAX_DISCARD_SEGMENTS],
            range_count: 0,
            status: std::ptr::null_mut(),
            durable: false,
        }
    }
}

impl Request {
    /// The data buffers (Read/Write): the guest's own memory.
    #[inline]
    pub fn data(&self) -> &[Segment] {
        &self.buffers[self.data_start..self.data_start + self.data_count]
    }

    /// Walks `chain` into this request's buffers: how many it has.
    #[inline]
    pub fn walk<S: ChainSource>(&mut self, chain: ChainCursor<'_, S>) -> Result<usize, ChainError> {
        chain.walk_into(&mut self.buffers)
    }

    /// Puts buffers walked elsewhere (the fuzz targets, the parser tests) where
    /// [`Request::walk`] would have: how many. More than [`MAX_SEGMENTS`] is the caller's
    /// mistake (a device's walk refuses such a chain), not something to cut short.
    pub fn load(&mut self, segments: &[Segment]) -> usize {
        assert!(
            segments.len() <= MAX_SEGMENTS,
            "{} buffers: a walk into a request refuses more than {MAX_SEGMENTS}",
            segments.len()
        );
        self.buffers[..segments.len()].copy_from_slice(segments);
        segments.len()
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
    /// Bytes one data buffer may hold (size_max).
    pub size_max: u32,
    /// Writes fail (VIRTIO_BLK_F_RO offered).
    pub read_only: bool,
}

/// How a chain was judged.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the backend.
    Submit,
    /// Answer at once: write `status` into the status byte; `written` bytes of the chain
    /// (data and status) are then device-written (GET_ID answers OK here, having written
    /// the id).
    Complete {
        /// The status byte.
        status: u8,
        /// Bytes written into the chain, the status byte included.
        written: u32,
    },
    /// No usable status byte: return the chain with nothing written.
    Drop,
}

/// Answers at once with `status` and nothing written but the status byte.
fn answer(status: u8) -> Verdict {
    Verdict::Complete { status, written: 1 }
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

/// Checks the chain whose `count` buffers [`Request::walk`] stored in `request`, and fills
/// the rest of `request`. `id` is what GET_ID answers.
#[inline]
pub fn parse(count: usize, limits: &Limits, id: &[u8; ID_BYTES], request: &mut Request) -> Verdict {
    match parse_read_or_write(count, limits, request) {
        Some(verdict) => verdict,
        None => parse_any(count, limits, id, request),
    }
}

/// The shape nearly every request has, judged in one pass: the 16-byte header alone in a
/// device-readable first buffer, the status byte alone in the last, data buffers between,
/// a read or a write. `None` for anything else, which [`parse_any`] judges. Both give the
/// same verdict and request for every chain (a test compares them on many thousands).
/// Always inlined: it is most of a request's parse, and the handler's `take`, generic over
/// the ring's layout, no longer pulls it in by itself.
#[inline(always)]
fn parse_read_or_write(count: usize, limits: &Limits, request: &mut Request) -> Option<Verdict> {
    let [header, body @ .., last] = &request.buffers[..count] else {
        return None;
    };
    if header.write || header.len != 16 || !last.write || last.len != 1 || body.is_empty() {
        return None;
    }
    // SAFETY: the first buffer was translated for its 16 bytes; read once, as a copy.
    let bytes = unsafe { (header.host as *const [u8; 16]).read_unaligned() };
    let RequestHeader { kind, sector, .. } = RequestHeader::from_bytes(&bytes);
    let writes_guest = match kind {
        req::IN => true,
        req::OUT => false,
        _ => return None,
    };
    let (status, body_len) = (last.host, body.len());
    let mut data_len = 0u64;
    let mut fits = true;
    // The data buffers stay where the walker put them.
    for s in body {
        data_len += u64::from(s.len);
        fits &= s.write == writes_guest && s.len <= limits.size_max;
    }
    request.status = status;
    request.sector = sector;
    request.range_count = 0;
    request.data_start = 1;
    request.data_count = body_len;
    request.data_len = data_len;
    if !fits
        || body_len as u32 > limits.seg_max
        || data_len % SECTOR != 0
        || sector
            .checked_add(data_len / SECTOR)
            .is_none_or(|end| end > limits.capacity)
        || (!writes_guest && limits.read_only)
    {
        return Some(answer(status::IOERR));
    }
    // Buffers are never empty (the walker drops empty ones), so neither is the data.
    request.op = if writes_guest {
        Operation::Read
    } else {
        Operation::Write
    };
    Some(Verdict::Submit)
}

/// Any chain: the header and the status byte wherever the buffers put them.
fn parse_any(count: usize, limits: &Limits, id: &[u8; ID_BYTES], request: &mut Request) -> Verdict {
    let segments = &request.buffers[..count];
    // The status byte: last byte of the last buffer, which must be device-writable.
    let Some(last) = segments.last().copied().filter(|s| s.write) else {
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
        return answer(status::IOERR);
    }
    let RequestHeader { kind, sector, .. } = RequestHeader::from_bytes(&header);
    let total: usize = segments.iter().map(|s| s.len as usize).sum();
    request.sector = sector;
    request.data_start = 0;
    request.data_count = 0;
    request.data_len = 0;
    request.range_count = 0;

    // Data: the bytes after the header and before the status byte.
    let body_start = 16usize;
    let body_end = total - 1;
    let mut offset = 0usize;
    let mut body_write: Option<bool> = None;
    let mut mixed = false;
    // Trimmed in place: buffer i gives at most data buffer i (data_count <= i), so each is
    // read before anything is written over it.
    for i in 0..count {
        let s = request.buffers[i];
        let (start, end) = (offset, offset + s.len as usize);
        offset = end;
        let (from, to) = (start.max(body_start), end.min(body_end));
        if from >= to {
            continue;
        }
        if *body_write.get_or_insert(s.write) != s.write {
            mixed = true;
        }
        request.buffers[request.data_count] = Segment {
            gpa: s.gpa + (from - start) as u64,
            // SAFETY: from - start < len: inside the translated buffer.
            host: unsafe { s.host.add(from - start) },
            len: (to - from) as u32,
            write: s.write,
        };
        request.data_count += 1;
        request.data_len += (to - from) as u64;
    }
    let data = request.data();

    match kind {
        req::IN | req::OUT => {
            let writes_guest = kind == req::IN;
            if mixed || data.iter().any(|s| s.write != writes_guest) {
                return answer(status::IOERR);
            }
            if request.data_count as u32 > limits.seg_max
                || request.data_len % SECTOR != 0
                || data.iter().any(|s| s.len > limits.size_max)
            {
                return answer(status::IOERR);
            }
            let end = sector.checked_add(request.data_len / SECTOR);
            if end.is_none_or(|e| e > limits.capacity) {
                return answer(status::IOERR);
            }
            if !writes_guest && limits.read_only {
                return answer(status::IOERR);
            }
            if request.data_len == 0 {
                return answer(status::OK);
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
                return answer(status::UNSUPP);
            }
            request.op = Operation::Flush;
            Verdict::Submit
        }
        req::GET_ID => {
            if mixed || data.iter().any(|s| !s.write) || request.data_len == 0 {
                return answer(status::IOERR);
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
            Verdict::Complete {
                status: status::OK,
                written: written as u32 + 1,
            }
        }
        req::DISCARD | req::WRITE_ZEROES => {
            let supported = if kind == req::DISCARD {
                limits.discard
            } else {
                limits.write_zeroes
            };
            if !supported {
                return answer(status::UNSUPP);
            }
            if mixed
                || data.iter().any(|s| s.write)
                || request.data_len == 0
                || request.data_len % 16 != 0
            {
                return answer(status::IOERR);
            }
            let count = (request.data_len / 16) as usize;
            if count > MAX_DISCARD_SEGMENTS {
                return answer(status::IOERR);
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
            for (i, bytes) in raw.chunks_exact(16).take(count).enumerate() {
                let Range {
                    sector: start,
                    num_sectors: sectors,
                    flags,
                } = Range::from_bytes(bytes.try_into().expect("16-byte chunks"));
                // Only write zeroes has a flag (unmap); anything else is unsupported.
                let allowed = if kind == req::WRITE_ZEROES {
                    WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if flags & !allowed != 0 {
                    return answer(status::UNSUPP);
                }
                unmap |= flags & WRITE_ZEROES_FLAG_UNMAP != 0;
                let end = start.checked_add(u64::from(sectors));
                if sectors == 0
                    || sectors > limits.max_range_sectors
                    || end.is_none_or(|e| e > limits.capacity)
                {
                    return answer(status::IOERR);
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
        _ => answer(status::UNSUPP),
    }
}

#[cfg(test)]
mod tests {
    //! Every hostile request a guest can write, parsed in-process from chains a mock guest
    //! built (the chain-level cases are the walker's tests in `vfblk-vhost`).
    use super::*;
    use vfblk_vhost::mock::MockGuest;

    const CAPACITY: u64 = 2048; // sectors (1 MiB)
    const ID: &[u8; ID_BYTES] = b"test-disk\0\0\0\0\0\0\0\0\0\0\0";

    fn limits() -> Limits {
        Limits {
            capacity: CAPACITY,
            flush: true,
            discard: true,
            write_zeroes: true,
            max_range_sectors: 256,
            seg_max: 4,
            size_max: 64 << 10,
            read_only: false,
        }
    }

    struct Case {
        guest: MockGuest,
        request: Box<Request>,
    }

    impl Case {
        fn new() -> Self {
            Self {
                guest: MockGuest::new(1 << 20, 256),
                request: Box::default(),
            }
        }

        fn header(&mut self, kind: u32, sector: u64) -> u64 {
            let gpa = self.guest.alloc(16);
            let h = RequestHeader {
                kind,
                ioprio: 0,
                sector,
            };
            self.guest.write(gpa, &h.to_bytes());
            gpa
        }

        fn ranges(&mut self, ranges: &[Range]) -> u64 {
            let gpa = self.guest.alloc(16 * ranges.len() as u64);
            for (i, r) in ranges.iter().enumerate() {
                self.guest.write(gpa + 16 * i as u64, &r.to_bytes());
            }
            gpa
        }

        /// Parses a chain of (gpa, len, writable) buffers with `limits`.
        fn parse_with(&mut self, buffers: &[(u64, u32, bool)], limits: &Limits) -> Verdict {
            self.guest.add_chain(buffers);
            // Walked into the request as the device walks it.
            let (vq, head) = self.guest.newest();
            let mem = self.guest.memory();
            let count = self
                .request
                .walk(ChainCursor::new(&vq, &mem, head))
                .expect("the chain walks");
            parse(count, limits, ID, &mut self.request)
        }

        fn parse(&mut self, buffers: &[(u64, u32, bool)]) -> Verdict {
            self.parse_with(buffers, &limits())
        }

        /// A request: header, optional data buffer (len, writable), status byte.
        fn simple(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> Verdict {
            let hdr = self.header(kind, sector);
            let mut chain = vec![(hdr, 16, false)];
            if let Some((len, write)) = data {
                chain.push((self.guest.alloc(u64::from(len)), len, write));
            }
            chain.push((self.guest.alloc(1), 1, true));
            self.parse(&chain)
        }
    }

    fn ioerr() -> Verdict {
        Verdict::Complete {
            status: status::IOERR,
            written: 1,
        }
    }

    fn unsupp() -> Verdict {
        Verdict::Complete {
            status: status::UNSUPP,
            written: 1,
        }
    }

    /// The one-pass parser and the general one agree on every chain: thousands of random
    /// chains of buffers of assorted lengths and directions, headers of every type and of
    /// sectors near the end, read-only or not.
    #[test]
    fn the_fast_path_judges_every_chain_as_the_general_parser_does() {
        let mut memory = vec![0u8; 1 << 20];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let lens = [
            1u32,
            2,
            15,
            16,
            17,
            512,
            513,
            4096,
            8192,
            65536,
            65536 + 512,
        ];
        let kinds = [req::IN, req::OUT, req::FLUSH, req::GET_ID, req::DISCARD, 77];
        let (mut fast, mut submitted) = (0, 0);
        for _ in 0..20_000 {
            let header = RequestHeader {
                kind: kinds[next(kinds.len() as u64) as usize],
                ioprio: 0,
                // Inside, at and past the end, and overflowing.
                sector: if next(50) == 0 {
                    u64::MAX - next(4)
                } else {
                    next(CAPACITY + 8)
                },
            };
            let count = 1 + next(6) as usize;
            let mut segments = Vec::new();
            let mut offset = 0usize;
            for i in 0..count {
                let (first, last) = (i == 0, i == count - 1);
                // Mostly the common shape; sometimes anything.
                let len = match next(4) {
                    0..=2 if first => 16,
                    0..=2 if last => 1,
                    0..=2 => [512, 4096, 8192][next(3) as usize],
                    _ => lens[next(lens.len() as u64) as usize],
                };
                let write = match next(5) {
                    0..=3 if first => false,
                    0..=3 if last => true,
                    0..=3 => header.kind == req::IN,
                    _ => next(2) == 0,
                };
                if offset + len as usize > memory.len() {
                    break;
                }
                segments.push(Segment {
                    gpa: offset as u64,
                    host: memory[offset..].as_mut_ptr(),
                    len,
                    write,
                });
                offset += len as usize;
            }
            memory[..16].copy_from_slice(&header.to_bytes());
            let mut limits = limits();
            limits.read_only = next(4) == 0;
            let (mut a, mut b) = (Box::<Request>::default(), Box::<Request>::default());
            let count = a.load(&segments);
            b.load(&segments);
            let took_fast = parse_read_or_write(count, &limits, &mut a);
            let general = parse_any(count, &limits, ID, &mut b);
            let Some(verdict) = took_fast else {
                continue;
            };
            fast += 1;
            assert_eq!(verdict, general, "{segments:?} {header:?}");
            if verdict == Verdict::Submit {
                submitted += 1;
                assert_eq!(a.op, b.op);
                assert_eq!(a.sector, b.sector);
                assert_eq!(a.status, b.status);
                assert_eq!(a.data_len, b.data_len);
                assert_eq!(a.data(), b.data());
            }
        }
        // Both outcomes of the fast path were exercised, many times.
        assert!(
            fast > 2_000 && submitted > 500,
            "{fast} fast, {submitted} submitted"
        );
    }

    #[test]
    fn a_read_only_device_fails_writes_and_serves_reads() {
        let mut c = Case::new();
        let ro = Limits {
            read_only: true,
            ..limits()
        };
        let hdr = c.header(req::OUT, 0);
        let data = c.guest.alloc(512);
        let st = c.guest.alloc(1);
        assert_eq!(
            c.parse_with(&[(hdr, 16, false), (data, 512, false), (st, 1, true)], &ro),
            ioerr()
        );
        let hdr = c.header(req::IN, 0);
        assert_eq!(
            c.parse_with(&[(hdr, 16, false), (data, 512, true), (st, 1, true)], &ro),
            Verdict::Submit
        );
        let hdr = c.header(req::FLUSH, 0);
        assert_eq!(
            c.parse_with(&[(hdr, 16, false), (st, 1, true)], &ro),
            Verdict::Submit
        );
    }

    #[test]
    fn a_read_and_a_write_are_submitted_with_their_buffers() {
        let mut c = Case::new();
        assert_eq!(c.simple(req::IN, 8, Some((4096, true))), Verdict::Submit);
        assert_eq!(c.request.op, Operation::Read);
        assert_eq!((c.request.sector, c.request.data_len), (8, 4096));
        assert_eq!(c.request.data_count, 1);
        assert_eq!(c.simple(req::OUT, 0, Some((512, false))), Verdict::Submit);
        assert_eq!(c.request.op, Operation::Write);
        // The last sectors of the disk are reachable.
        assert_eq!(
            c.simple(req::IN, CAPACITY - 1, Some((512, true))),
            Verdict::Submit
        );
    }

    #[test]
    fn header_data_and_status_may_share_or_split_descriptors() {
        let mut c = Case::new();
        // Header split over two descriptors, data and status in one writable buffer.
        let hdr = c.header(req::IN, 4);
        let buf = c.guest.alloc(513);
        assert_eq!(
            c.parse(&[(hdr, 10, false), (hdr + 10, 6, false), (buf, 513, true)]),
            Verdict::Submit
        );
        assert_eq!((c.request.data_len, c.request.data()[0].gpa), (512, buf));
        // The status byte is the last byte of the last buffer.
        let last = c.guest.memory().translate(buf + 512, 1).unwrap();
        assert_eq!(c.request.status, last);
    }

    #[test]
    fn a_chain_without_a_writable_last_buffer_has_no_status_and_is_dropped() {
        let mut c = Case::new();
        let hdr = c.header(req::OUT, 0);
        let data = c.guest.alloc(512);
        assert_eq!(
            c.parse(&[(hdr, 16, false), (data, 512, false)]),
            Verdict::Drop
        );
        assert_eq!(c.parse(&[(hdr, 16, false)]), Verdict::Drop, "header only");
    }

    #[test]
    fn a_short_header_is_an_io_error() {
        let mut c = Case::new();
        let hdr = c.header(req::IN, 0);
        let st = c.guest.alloc(1);
        assert_eq!(c.parse(&[(hdr, 8, false), (st, 1, true)]), ioerr());
        assert_eq!(c.parse(&[(st, 1, true)]), ioerr(), "no header at all");
    }

    #[test]
    fn an_unknown_type_is_unsupported() {
        let mut c = Case::new();
        assert_eq!(c.simple(99, 0, None), unsupp());
        assert_eq!(c.simple(u32::MAX, 0, Some((512, true))), unsupp());
    }

    #[test]
    fn data_buffers_in_the_wrong_direction_are_io_errors() {
        let mut c = Case::new();
        assert_eq!(
            c.simple(req::IN, 0, Some((512, false))),
            ioerr(),
            "read into read-only"
        );
        assert_eq!(
            c.simple(req::OUT, 0, Some((512, true))),
            ioerr(),
            "write from writable"
        );
        // Mixed: a readable and a writable data buffer in one read.
        let hdr = c.header(req::IN, 0);
        let (a, b, st) = (c.guest.alloc(512), c.guest.alloc(512), c.guest.alloc(1));
        assert_eq!(
            c.parse(&[
                (hdr, 16, false),
                (a, 512, false),
                (b, 512, true),
                (st, 1, true)
            ]),
            ioerr()
        );
    }

    #[test]
    fn sector_ranges_beyond_the_capacity_or_overflowing_are_io_errors() {
        let mut c = Case::new();
        assert_eq!(c.simple(req::IN, CAPACITY - 1, Some((1024, true))), ioerr());
        assert_eq!(c.simple(req::IN, CAPACITY, Some((512, true))), ioerr());
        assert_eq!(c.simple(req::OUT, u64::MAX, Some((512, false))), ioerr());
        assert_eq!(
            c.simple(req::OUT, u64::MAX - 1, Some((1024, false))),
            ioerr()
        );
    }

    #[test]
    fn lengths_that_are_not_whole_sectors_are_io_errors() {
        let mut c = Case::new();
        assert_eq!(c.simple(req::IN, 0, Some((100, true))), ioerr());
        assert_eq!(c.simple(req::OUT, 0, Some((513, false))), ioerr());
    }

    #[test]
    fn more_data_buffers_than_seg_max_are_io_errors() {
        let mut c = Case::new();
        let hdr = c.header(req::IN, 0);
        let mut chain = vec![(hdr, 16, false)];
        for _ in 0..5 {
            chain.push((c.guest.alloc(512), 512, true));
        }
        chain.push((c.guest.alloc(1), 1, true));
        assert_eq!(c.parse(&chain), ioerr(), "5 data buffers, seg_max 4");
        chain.remove(1);
        assert_eq!(c.parse(&chain), Verdict::Submit, "4 are fine");
    }

    #[test]
    fn a_data_buffer_larger_than_size_max_is_an_io_error() {
        let mut c = Case::new();
        assert_eq!(
            c.simple(req::IN, 0, Some((64 << 10, true))),
            Verdict::Submit
        );
        assert_eq!(
            c.simple(req::IN, 0, Some(((64 << 10) + 512, true))),
            ioerr()
        );
    }

    #[test]
    fn an_empty_read_completes_at_once() {
        let mut c = Case::new();
        assert_eq!(
            c.simple(req::IN, 0, None),
            Verdict::Complete {
                status: status::OK,
                written: 1
            }
        );
    }

    #[test]
    fn flush_is_submitted_or_unsupported() {
        let mut c = Case::new();
        assert_eq!(c.simple(req::FLUSH, 0, None), Verdict::Submit);
        assert_eq!(c.request.op, Operation::Flush);
        let no_flush = Limits {
            flush: false,
            ..limits()
        };
        let hdr = c.header(req::FLUSH, 0);
        let st = c.guest.alloc(1);
        assert_eq!(
            c.parse_with(&[(hdr, 16, false), (st, 1, true)], &no_flush),
            unsupp()
        );
    }

    #[test]
    fn get_id_writes_the_serial_and_reports_what_it_wrote() {
        let mut c = Case::new();
        let hdr = c.header(req::GET_ID, 0);
        let (buf, st) = (c.guest.alloc(20), c.guest.alloc(1));
        assert_eq!(
            c.parse(&[(hdr, 16, false), (buf, 20, true), (st, 1, true)]),
            Verdict::Complete {
                status: status::OK,
                written: 21
            }
        );
        assert_eq!(&c.guest.read(buf, 9), b"test-disk");
        // A short buffer gets what fits.
        let hdr = c.header(req::GET_ID, 0);
        let (buf, st) = (c.guest.alloc(8), c.guest.alloc(1));
        assert_eq!(
            c.parse(&[(hdr, 16, false), (buf, 8, true), (st, 1, true)]),
            Verdict::Complete {
                status: status::OK,
                written: 9
            }
        );
        // No buffer, or a readable one: IOERR.
        assert_eq!(c.simple(req::GET_ID, 0, None), ioerr());
        assert_eq!(c.simple(req::GET_ID, 0, Some((20, false))), ioerr());
    }

    fn range(sector: u64, num_sectors: u32, flags: u32) -> Range {
        Range {
            sector,
            num_sectors,
            flags,
        }
    }

    fn ranged(c: &mut Case, kind: u32, ranges: &[Range], limits: &Limits) -> Verdict {
        let hdr = c.header(kind, 0);
        let r = c.ranges(ranges);
        let st = c.guest.alloc(1);
        c.parse_with(
            &[
                (hdr, 16, false),
                (r, 16 * ranges.len() as u32, false),
                (st, 1, true),
            ],
            limits,
        )
    }

    #[test]
    fn discard_and_write_zeroes_ranges_are_checked() {
        let mut c = Case::new();
        let l = limits();
        assert_eq!(
            ranged(
                &mut c,
                req::DISCARD,
                &[range(8, 8, 0), range(100, 1, 0)],
                &l
            ),
            Verdict::Submit
        );
        assert_eq!(c.request.op, Operation::Discard);
        assert_eq!(
            &c.request.ranges[..c.request.range_count],
            &[(8, 8), (100, 1)]
        );
        assert_eq!(
            ranged(
                &mut c,
                req::WRITE_ZEROES,
                &[range(0, 4, WRITE_ZEROES_FLAG_UNMAP)],
                &l
            ),
            Verdict::Submit
        );
        assert_eq!(c.request.op, Operation::WriteZeroes { unmap: true });
        // Past the end, overflowing, empty, larger than a range may be.
        assert_eq!(
            ranged(&mut c, req::DISCARD, &[range(CAPACITY - 1, 8, 0)], &l),
            ioerr()
        );
        assert_eq!(
            ranged(&mut c, req::DISCARD, &[range(u64::MAX, 1, 0)], &l),
            ioerr()
        );
        assert_eq!(ranged(&mut c, req::DISCARD, &[range(0, 0, 0)], &l), ioerr());
        assert_eq!(
            ranged(&mut c, req::WRITE_ZEROES, &[range(0, 257, 0)], &l),
            ioerr()
        );
        // Flags a discard may not have, unknown write-zeroes flags.
        assert_eq!(
            ranged(&mut c, req::DISCARD, &[range(0, 1, 1)], &l),
            unsupp()
        );
        assert_eq!(
            ranged(&mut c, req::WRITE_ZEROES, &[range(0, 1, 2)], &l),
            unsupp()
        );
        // More ranges than accepted.
        let many = vec![range(0, 1, 0); MAX_DISCARD_SEGMENTS + 1];
        assert_eq!(ranged(&mut c, req::DISCARD, &many, &l), ioerr());
        // Not offered.
        let off = Limits {
            discard: false,
            write_zeroes: false,
            ..l
        };
        assert_eq!(
            ranged(&mut c, req::DISCARD, &[range(0, 1, 0)], &off),
            unsupp()
        );
        assert_eq!(
            ranged(&mut c, req::WRITE_ZEROES, &[range(0, 1, 0)], &off),
            unsupp()
        );
    }

    #[test]
    fn malformed_range_payloads_are_io_errors() {
        let mut c = Case::new();
        // A payload that is not a whole number of ranges, none at all, or device-writable.
        let hdr = c.header(req::DISCARD, 0);
        let (r, st) = (c.ranges(&[range(0, 1, 0)]), c.guest.alloc(1));
        assert_eq!(
            c.parse(&[(hdr, 16, false), (r, 12, false), (st, 1, true)]),
            ioerr()
        );
        assert_eq!(c.simple(req::DISCARD, 0, None), ioerr());
        assert_eq!(
            c.parse(&[(hdr, 16, false), (r, 16, true), (st, 1, true)]),
            ioerr()
        );
    }
}
