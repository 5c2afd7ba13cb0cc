//! Fuzz targets: one function per parser that faces a guest or a frontend, taking arbitrary
//! bytes. Each must return (never panic, hang or touch memory outside what it was given) and
//! checks the invariants its parser promises. libFuzzer drives them through the harnesses in
//! `fuzzers/` (`cargo fuzz`, see docs/fuzzing.md); `tests/replay.rs` runs the stored corpus in
//! the test command.

#![deny(missing_docs)]

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use vfblk_bridge::backend::MemBackend;
use vfblk_bridge::device::BlkDevice;
use vfblk_bridge::request::{self, Limits, Request, Verdict};
use vfblk_bridge::virtio_blk::ID_BYTES;
use vfblk_vhost::chain::{self, Chain, ChainCursor, Segment};
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::inflight::{region_size, InflightQueue};
use vfblk_vhost::inflight_packed::{self, InflightPackedQueue};
use vfblk_vhost::memory::{memfd, GuestMemory};
use vfblk_vhost::mock::MockGuest;
use vfblk_vhost::packed::{PackedQueue, Position};
use vfblk_vhost::poller::{PollMode, Poller};
use vfblk_vhost::protocol::{Connection, DeviceConfig};

/// Guest memory of the chain target: rings, tables and buffers all come from the input.
const GUEST_BYTES: u64 = 64 << 10;
/// Queue size of the chain target.
const QUEUE: u16 = 16;

/// A fuzz target: arbitrary bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets, by name (the corpus directories are named after them).
pub const TARGETS: &[(&str, Target)] = &[
    ("chain_and_request", chain_and_request),
    ("inflight_recovery", inflight_recovery),
    ("memory_table", memory_table),
    ("message_sequence", message_sequence),
    ("packed_chain_and_request", packed_chain_and_request),
    ("packed_inflight_recovery", packed_inflight_recovery),
];

fn in_guest(mem: &GuestMemory, host: *mut u8, len: u64) -> bool {
    mem.regions().iter().any(|r| {
        let Some(start) = mem.translate(r.guest_phys, 1) else {
            return false;
        };
        let (s, h) = (start as usize, host as usize);
        h >= s && (h - s) as u64 + len <= r.size
    })
}

/// Rings, descriptor tables, indirect tables and request bytes are all the input, laid over
/// guest memory from address 0; the avail ring's first head is walked and parsed as a
/// virtio-blk request, or, when the walk fails, answered at its last byte if it has one.
pub fn chain_and_request(data: &[u8]) {
    let guest = MockGuest::new(GUEST_BYTES, QUEUE);
    let n = data.len().min(GUEST_BYTES as usize);
    guest.write(0, &data[..n]);
    let mem = guest.memory();
    let event_idx = data.first().is_some_and(|b| b & 1 == 1);
    let mut vq = guest.device_queue(event_idx);
    // The device's limit on buffers, as the device walks into its request.
    let mut chain = Chain::new(request::MAX_SEGMENTS);
    let mut request = Box::<Request>::default();
    // At most a queue's worth of heads: the avail index itself is input.
    for _ in 0..QUEUE {
        let head = match vq.pop() {
            Ok(Some(head)) => head,
            Ok(None) | Err(_) => return,
        };
        assert!(head < QUEUE, "pop returns heads inside the table");
        match chain.walk(&vq, &mem, head) {
            Ok(()) => check_request(&mem, chain.segments(), &mut request),
            Err(_) => {
                if let Some(last) = chain::last_byte(&vq, &mem, head) {
                    assert!(
                        in_guest(&mem, last.host, 1),
                        "the answer lands in guest memory"
                    );
                }
            }
        }
        vq.push_used(head, 1);
        vq.publish_used();
        let _ = vq.needs_notification();
    }
}

/// Where the packed targets put the ring in guest memory: the descriptor ring at 0, the
/// driver and device event structures after it; everything else (indirect tables,
/// request headers, buffers) is wherever the input's descriptors point.
const PACKED_DRIVER_EVENT: u64 = 16 * QUEUE as u64;
const PACKED_DEVICE_EVENT: u64 = PACKED_DRIVER_EVENT + 4;

/// The packed ring of the packed targets, where [`PACKED_DRIVER_EVENT`] says.
fn packed_queue(guest: &MockGuest, mem: &GuestMemory, event_idx: bool) -> PackedQueue {
    let base = guest.frontend_base();
    PackedQueue::new(
        mem,
        QUEUE,
        base,
        base + PACKED_DRIVER_EVENT,
        base + PACKED_DEVICE_EVENT,
        event_idx,
    )
    .expect("the rings lie in guest memory and are aligned")
}

/// The request limits of the chain targets.
fn fuzz_limits() -> Limits {
    Limits {
        capacity: 1 << 20,
        flush: true,
        discard: true,
        write_zeroes: true,
        max_range_sectors: 1 << 16,
        seg_max: 126,
        size_max: 4 << 20,
        read_only: false,
    }
}

/// A walked chain's segments parsed as a virtio-blk request: every segment, the status
/// byte and the ranges inside what the guest and the disk have.
fn check_request(mem: &GuestMemory, segments: &[Segment], request: &mut Request) {
    let limits = fuzz_limits();
    for s in segments {
        assert!(s.len > 0, "empty buffers are not kept");
        assert!(
            in_guest(mem, s.host, u64::from(s.len)),
            "every segment lies in guest memory"
        );
    }
    let count = request.load(segments);
    if request::parse(count, &limits, &[7; ID_BYTES], request) == Verdict::Submit {
        assert!(
            in_guest(mem, request.status, 1),
            "the status byte lies in guest memory"
        );
        for s in request.data() {
            assert!(in_guest(mem, s.host, u64::from(s.len)));
        }
        for &(start, count) in &request.ranges[..request.range_count] {
            assert!(start + u64::from(count) <= limits.capacity);
        }
    }
}

/// A packed ring, its descriptors, indirect tables and requests all the input, laid over
/// guest memory from address 0: chains are taken (at most a queue's worth), walked and
/// parsed, or answered at their last byte when the walk fails; each is returned by its
/// buffer id, in the order taken.
pub fn packed_chain_and_request(data: &[u8]) {
    let guest = MockGuest::new(GUEST_BYTES, QUEUE);
    let n = data.len().min(GUEST_BYTES as usize);
    guest.write(0, &data[..n]);
    let mem = guest.memory();
    let event_idx = data
        .get(PACKED_DEVICE_EVENT as usize + 4)
        .is_some_and(|b| b & 1 == 1);
    let mut vq = packed_queue(&guest, &mem, event_idx);
    let mut segments = vec![Segment::default(); request::MAX_SEGMENTS];
    let mut request = Box::<Request>::default();
    let mut ids = Vec::new();
    for _ in 0..QUEUE {
        let chain = match vq.pop() {
            Ok(Some(chain)) => chain,
            Ok(None) | Err(_) => break,
        };
        assert!(chain.id < QUEUE, "buffer ids inside the queue");
        assert!((1..=QUEUE).contains(&chain.count), "a chain within one lap");
        let cursor = ChainCursor::packed(&vq, &mem, chain);
        match cursor.walk_into(&mut segments) {
            Ok(count) => check_request(&mem, &segments[..count], &mut request),
            Err(_) => {
                if let Some(last) = cursor.last_byte() {
                    assert!(
                        in_guest(&mem, last.host, 1),
                        "the answer lands in guest memory"
                    );
                }
            }
        }
        ids.push(chain.id);
    }
    for &id in &ids {
        assert!(vq.push_used(id, 1), "a taken id goes back");
        vq.publish_used();
        let _ = vq.needs_notification();
    }
    for &id in &ids {
        assert!(!vq.push_used(id, 1), "an id goes back once");
    }
}

/// A packed inflight region whose every byte is the input (the frontend writes it), beside
/// a packed ring also from the input, recovered; each chain to run again is followed
/// (checked again, as the frontend may change the region) and walked; then a few requests
/// go through the region.
pub fn packed_inflight_recovery(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let ring_bytes = (PACKED_DEVICE_EVENT + 4) as usize;
    let (ring, region_input) = rest.split_at(rest.len().min(ring_bytes));
    let guest = MockGuest::new(GUEST_BYTES, QUEUE);
    guest.write(0, ring);
    let mem = guest.memory();
    let mut vq = packed_queue(&guest, &mem, false);
    let mut region = vec![0u64; inflight_packed::region_size(QUEUE) / 8];
    // SAFETY: a u64 buffer viewed as bytes, for the input to fill.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(region.as_mut_ptr().cast::<u8>(), region.len() * 8)
    };
    let n = region_input.len().min(bytes.len());
    bytes[..n].copy_from_slice(&region_input[..n]);
    // SAFETY: the buffer is region_size(QUEUE) bytes, 8-aligned, lives through the target,
    // and nothing else writes it meanwhile.
    let mut q = unsafe { InflightPackedQueue::new(region.as_mut_ptr().cast(), QUEUE) };
    let used = Position {
        index: u16::from(choice) % QUEUE,
        wrap: choice & 0x80 != 0,
    };
    let r = q.recover(&vq, used);
    let mut seen = [false; QUEUE as usize];
    let mut segments = vec![Segment::default(); request::MAX_SEGMENTS];
    let mut request = Box::<Request>::default();
    for c in &r.resubmit {
        assert!(c.id < QUEUE && c.entry < QUEUE, "inside the queue: {c:?}");
        assert!(
            !std::mem::replace(&mut seen[usize::from(c.id)], true),
            "no buffer id twice"
        );
        let Some(chain) = q.recovered(c.id) else {
            continue;
        };
        // As a starting ring does: the recovered chain is in flight again.
        let _ = vq.adopt(chain.id, chain.count);
        if let Ok(count) = ChainCursor::recovered(&q, &mem, chain).walk_into(&mut segments) {
            check_request(&mem, &segments[..count], &mut request);
        }
    }
    // New requests after it: whatever the ring offers now.
    let mut taken = Vec::new();
    for _ in 0..4 {
        match vq.pop() {
            Ok(Some(chain)) => {
                if q.begin(&vq, chain) {
                    taken.push(chain.id);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    for &id in &taken {
        vq.push_used(id, 0);
    }
    q.prepare_batch(&taken, vq.next_used());
    vq.publish_used();
    q.finish_batch(&taken);
}

/// An inflight region whose every byte is the input (the frontend writes it), recovered
/// against a used index from the input, then used for a few requests.
pub fn inflight_recovery(data: &[u8]) {
    let Some((&sizes, rest)) = data.split_first() else {
        return;
    };
    let desc_num = 1u16 << (sizes % 9); // 1..=256
    let ring_used = u16::from_le_bytes([
        rest.first().copied().unwrap_or(0),
        rest.get(1).copied().unwrap_or(0),
    ]);
    let mut region = vec![0u64; region_size(desc_num) / 8];
    // SAFETY: a u64 buffer viewed as bytes, for the input to fill.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(region.as_mut_ptr().cast::<u8>(), region.len() * 8)
    };
    let n = rest.len().min(bytes.len());
    bytes[..n].copy_from_slice(&rest[..n]);
    // SAFETY: the buffer is region_size(desc_num) bytes, 8-aligned, lives through the target,
    // and nothing else writes it meanwhile.
    let mut q = unsafe { InflightQueue::new(region.as_mut_ptr().cast(), desc_num) };
    let r = q.recover(ring_used);
    let mut seen = vec![false; usize::from(desc_num)];
    for &h in &r.resubmit {
        assert!(h < desc_num, "resubmitted heads are inside the region");
        assert!(
            !std::mem::replace(&mut seen[usize::from(h)], true),
            "no head twice"
        );
    }
    for h in 0..desc_num.min(4) {
        q.begin(h);
    }
    let heads: Vec<u16> = (0..desc_num.min(4)).collect();
    q.prepare_batch(&heads);
    q.finish_batch(&heads, ring_used.wrapping_add(heads.len() as u16));
}

/// Up to eight regions described by the input (addresses, sizes, offsets, file sizes), then
/// translations of input addresses: a table is refused or every translation stays inside it.
pub fn memory_table(data: &[u8]) {
    let mut words = data
        .chunks(8)
        .map(|c| c.iter().rev().fold(0u64, |a, &b| (a << 8) | u64::from(b)));
    let mut next = || words.next().unwrap_or(0);
    let count = (next() % 9) as usize;
    let mut table = Vec::new();
    let mut files = Vec::new();
    for _ in 0..count {
        let (gpa, size, faddr, offset) = (next(), next() % (1 << 16), next(), next() % (1 << 14));
        let file_len = next() % (1 << 17);
        let Ok(f) = memfd("vfblk-fuzz-region", file_len) else {
            return;
        };
        table.push((gpa, size, faddr, offset));
        files.push(f);
    }
    let Ok(mem) = GuestMemory::from_table(&table, files) else {
        return;
    };
    for _ in 0..16 {
        let (gpa, len) = (next(), next() % (1 << 17));
        if let Some(host) = mem.translate(gpa, len) {
            assert!(
                in_guest(&mem, host, len),
                "translations stay inside a region"
            );
        }
        if let Some((host, n)) = mem.translate_prefix(gpa, len.max(1)) {
            assert!(n >= 1 && n <= len.max(1));
            assert!(in_guest(&mem, host, n));
        }
        let _ = mem.frontend_to_guest(gpa);
    }
}

/// The input as a vhost-user message stream from a frontend (fds attached where a message
/// carries them: see [`send_with_fds`]), against a real
/// connection of a mem-backed virtio-blk device: every message is handled or refused, and
/// the stream ends with the connection closed, never a panic or a hang.
pub fn message_sequence(data: &[u8]) {
    thread_local! {
        static CONFIG: Arc<DeviceConfig> = {
            let path = std::env::temp_dir()
                .join(format!("vfblk-fuzz-disk-{}", std::process::id()));
            let backend = Arc::new(MemBackend::open(&path, 1 << 20).expect("a 1 MiB disk"));
            let pollers = vec![Arc::new(Poller::spawn(
                "fuzz-poller".into(),
                None,
                PollMode { idle_before_sleep: Some(std::time::Duration::from_micros(10)) },
            )
            .expect("a poller"))];
            Arc::new(DeviceConfig {
                num_queues: 2,
                inflight: true,
                device: Arc::new(BlkDevice::new(backend, 2, "fuzz")),
                pollers,
                errors: Arc::new(GuestErrors::new("fuzz")),
                fd_store: None,
                dirty_log_marks: true,
            })
        };
    }
    let config = CONFIG.with(|c| c.clone());
    let Ok((frontend, backend)) = UnixStream::pair() else {
        return;
    };
    // The whole stream is written before handling starts, then the frontend stops writing:
    // a read past the end sees EOF, never a wait. Replies are read and dropped until the
    // backend closes, so that a message with a reply does not end the stream.
    send_with_fds(&frontend, data);
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    let drain = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(std::io::Read::read(&mut &frontend, &mut buf), Ok(n) if n > 0) {}
    });
    let connection = Arc::new(std::sync::Mutex::new(Connection::new(config)));
    let mut handler =
        vhost::vhost_user::BackendReqHandler::from_stream(backend, connection.clone());
    for _ in 0..1024 {
        if handler.handle_request().is_err() {
            break;
        }
    }
    drop(handler);
    let _ = drain.join();
    let mut c = connection.lock().unwrap_or_else(|e| e.into_inner());
    c.disconnect();
    c.release_memory();
}

/// Shared memory the message stream's fd-carrying messages bring along (guest memory, a
/// dirty log, an inflight region): 1 MiB, so that tables and logs asking for more find a
/// file too small for them.
const STREAM_FD_BYTES: u64 = 1 << 20;

/// Writes a vhost-user message stream as a frontend would: message by message (headers
/// give the sizes), each message that carries fds with them: eventfds for kick, call and
/// err, a memfd of [`STREAM_FD_BYTES`] for the rest (one per region of a memory table).
/// What follows a malformed header goes as plain bytes.
fn send_with_fds(socket: &UnixStream, data: &[u8]) {
    use std::os::fd::AsRawFd;
    let mut rest = data;
    let Ok(memory) = memfd("vfblk-fuzz-stream", STREAM_FD_BYTES) else {
        return;
    };
    while rest.len() >= 12 {
        let word = |at: usize| u32::from_le_bytes(rest[at..at + 4].try_into().expect("4 bytes"));
        let (request, size) = (word(0), word(8) as usize);
        let len = (12 + size).min(rest.len());
        let (message, tail) = rest.split_at(len);
        let mut fds: Vec<std::fs::File> = Vec::new();
        let event = || {
            // SAFETY: eventfd with flags only; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            // SAFETY: a fresh fd nobody else owns.
            (fd >= 0).then(|| unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        };
        match request {
            // SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR.
            12..=14 => fds.extend(event()),
            // SET_MEM_TABLE: one fd per region it names (at most 8).
            5 if message.len() >= 16 => {
                let regions = u32::from_le_bytes(message[12..16].try_into().expect("4 bytes"));
                for _ in 0..regions.min(8) {
                    fds.extend(memory.try_clone().ok());
                }
            }
            // SET_LOG_BASE, SET_LOG_FD, SET_INFLIGHT_FD, ADD_MEM_REG.
            6 | 7 | 32 | 37 => fds.extend(memory.try_clone().ok()),
            _ => {}
        }
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        if send_message(socket, message, &raw).is_err() {
            return;
        }
        rest = tail;
    }
    let _ = send_message(socket, rest, &[]);
}

/// One `sendmsg` of `bytes` with `fds` as SCM_RIGHTS.
fn send_message(socket: &UnixStream, bytes: &[u8], fds: &[i32]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if bytes.is_empty() {
        return Ok(());
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for 8 fds.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` <= 64 bytes we own (8 fds at most), so the
        // first header and its data fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
    }
    // SAFETY: a valid msghdr over our buffers; a plain system call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
