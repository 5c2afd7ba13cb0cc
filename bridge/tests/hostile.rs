//! A hostile frontend, a thousand times over: each round misbehaves in one way (blocking or
//! non-eventfd kick and call fds, pipes nobody reads, a memory file shrunk under the device,
//! chains that loop, garbage messages, a disconnect with requests in flight, dirty logs that
//! do not fit or shrink), then a good
//! client must be served with verified data. Across all rounds: the process lives, no bad
//! request is answered OK, nothing outside the named buffers is written, and the process's
//! fds and memory stay flat. The same again on packed rings, with what only they have: chains
//! that never end within the ring, buffer ids the ring cannot have, event structures outside
//! memory, garbage positions and wrap counters in the base, an inflight region of garbage.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{
    d, pd, start_server, start_server_reporting, Guest, PackedGuest, TestGuest, BUF, QSIZE,
};
use vfblk_bridge::virtio_blk::{req, status};
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::mock::MockGuest;
use vfblk_vhost::packed::{PackedDescriptor, Position};
use vfblk_vhost::packed_driver::PackedDriverQueue;
use vfblk_vhost::virtq::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vhost::vhost_user::message::{VhostUserVirtioFeatures, VhostUserVringAddrFlags};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const ROUNDS: usize = 1000;

/// The two suites count this process's fds and memory: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// After the rounds (and a moment for the last connections to close): this process's fds
/// and memory are where they were before them, give or take a few.
fn assert_flat(what: &str, (fds0, rss0): (usize, u64)) {
    // The device closes the last connections' fds on its own threads.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open_fds() > fds0 + 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (fds1, rss1) = (open_fds(), rss_kib());
    eprintln!("{ROUNDS} {what}: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB");
    assert!(fds1 <= fds0 + 4, "fds flat: {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 64 * 1024, "RSS flat: {rss0} -> {rss1} KiB");
}

/// A pipe's read end wrapped as the EventFd type the frontend API takes (it is not one).
fn pipe_as_eventfd() -> (EventFd, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array; checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh fds, each owned once.
    unsafe {
        (
            EventFd::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    }
}

/// Writes a canary around [gpa, gpa+len) and checks it later: nothing outside a request's
/// named buffers may be written.
fn canary(g: &Guest, gpa: u64, len: u64) -> impl Fn(&Guest) {
    let before = g.get(gpa - 64, 64);
    let after = g.get(gpa + len, 64);
    move |g: &Guest| {
        assert_eq!(
            g.get(gpa - 64, 64),
            before,
            "bytes before the buffer untouched"
        );
        assert_eq!(
            g.get(gpa + len, 64),
            after,
            "bytes after the buffer untouched"
        );
    }
}

/// A good client: writes a pattern through the device and reads it back.
fn good_client(socket: &std::path::PathBuf, round: usize) {
    let mut g = Guest::connect(socket);
    let pattern: Vec<u8> = (0..4096).map(|i| (i + round * 7) as u8).collect();
    g.put(BUF + 4096, &pattern);
    let sector = (round % 64) as u64 * 8;
    assert_eq!(
        g.request(req::OUT, sector, Some((4096, false))),
        (status::OK, 1)
    );
    g.put(BUF + 4096, &[0; 4096]);
    let check = canary(&g, BUF + 4096, 4096);
    assert_eq!(
        g.request(req::IN, sector, Some((4096, true))),
        (status::OK, 4097)
    );
    check(&g);
    assert_eq!(
        g.get(BUF + 4096, 4096),
        pattern,
        "round {round}: verified read"
    );
}

/// A memfd of `len` bytes that cannot be sealed (so it can be shrunk under a mapping).
fn unsealable_memfd(len: u64) -> std::fs::File {
    vfblk_hugepages::memfd("hostile-log", libc::MFD_CLOEXEC, len).unwrap()
}

/// Dirty logs a migration would never send: each must be refused, or contained, without a
/// stray write, a crash, or a request reported done that the log would miss.
fn hostile_log(socket: &std::path::PathBuf, i: usize) {
    let (hdr, dat, st) = (BUF, BUF + 4096, BUF + 64 * 4096);
    let mut g = Guest::connect(socket);
    // What covers the guest's memory: a bit per 4 KiB page.
    let log_bytes = (common::MEM as u64).div_ceil(4096 * 8);
    let log_all = g.features | VhostUserVirtioFeatures::LOG_ALL.bits();
    let region = |file: &std::fs::File, size: u64, offset: u64| VhostUserDirtyLogRegion {
        mmap_size: size,
        mmap_offset: offset,
        mmap_handle: file.as_raw_fd(),
    };
    match (i / 8) % 5 {
        // Too small for the memory table.
        0 => {
            let file = unsealable_memfd(4096);
            assert!(
                g.fe.set_log_base(0, Some(region(&file, log_bytes / 2, 0)))
                    .is_err(),
                "round {i}: a log smaller than guest memory needs"
            );
        }
        // Offset and size past the end of the file.
        1 => {
            let file = unsealable_memfd(log_bytes);
            assert!(
                g.fe.set_log_base(0, Some(region(&file, log_bytes, 4096)))
                    .is_err(),
                "round {i}: a log past the end of its file"
            );
        }
        // Logging on without a log: the ring waits, nothing comes back unlogged, the
        // connection stays.
        2 => {
            g.fe.set_features(log_all).unwrap();
            // A round trip: the target has taken SET_FEATURES (QEMU waits the same way).
            g.fe.get_features().unwrap();
            g.header(hdr, req::IN, 0);
            g.put(st, &[0xff]);
            g.g.add_chain(&[(hdr, 16, false), (dat, 4096, true), (st, 1, true)]);
            let _ = g.kick.write(1);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(g.g.pop_used_raw(), None, "round {i}: served without a log");
            assert_eq!(g.get(st, 1)[0], 0xff, "round {i}: status untouched");
            assert!(g.fe.get_features().is_ok(), "round {i}: still connected");
        }
        // A used ring logged at a guest address outside memory.
        3 => {
            let (d, a, u) = g.g.ring_addresses();
            let cfg = VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: VhostUserVringAddrFlags::VHOST_VRING_F_LOG.bits(),
                desc_table_addr: d,
                used_ring_addr: u,
                avail_ring_addr: a,
                log_addr: Some(1 << 40),
            };
            // Refused: the connection closes (this frontend does not ask for a reply, so
            // it learns at its next message).
            let refused = g.fe.set_vring_addr(0, &cfg).is_err() || g.fe.get_features().is_err();
            assert!(refused, "round {i}: used ring logged outside memory");
        }
        // The log's file shrunk after mapping, then a read to log: contained, and the read
        // is not reported done (its marks were lost).
        _ => {
            let file = unsealable_memfd(log_bytes);
            g.fe.set_log_base(0, Some(region(&file, log_bytes, 0)))
                .unwrap();
            g.fe.set_features(log_all).unwrap();
            g.fe.get_features().unwrap();
            file.set_len(0).unwrap();
            g.header(hdr, req::IN, 0);
            g.put(st, &[0xff]);
            g.g.add_chain(&[(hdr, 16, false), (dat, 4096, true), (st, 1, true)]);
            let _ = g.kick.write(1);
            std::thread::sleep(Duration::from_millis(5));
            if let Some((_, len)) = g.g.pop_used_raw() {
                panic!("round {i}: a read whose marks were lost came back ({len} bytes)");
            }
        }
    }
}

fn round(socket: &std::path::PathBuf, i: usize) {
    let (hdr, dat, st) = (BUF, BUF + 4096, BUF + 64 * 4096);
    match i % 8 {
        7 => hostile_log(socket, i),
        // Blocking kick and call eventfds (libblkio's kind), then leaving mid-request.
        0 => {
            let mut g = Guest::connect(socket);
            let kick = EventFd::new(0).unwrap();
            let call = EventFd::new(0).unwrap();
            g.fe.set_vring_kick(0, &kick).unwrap();
            g.fe.set_vring_call(0, &call).unwrap();
            g.header(hdr, req::IN, 0);
            g.g.add_chain(&[(hdr, 16, false), (dat, 4096, true), (st, 1, true)]);
            let _ = kick.write(1);
        }
        // A pipe nobody reads as the call fd, a pipe as the kick fd.
        1 => {
            let mut g = Guest::connect(socket);
            let (kick_read, kick_write) = pipe_as_eventfd();
            let (call_read, _call_write) = pipe_as_eventfd();
            // The device writes interrupts into the pipe's read end: refused by the kernel,
            // never waited on.
            g.fe.set_vring_call(0, &call_read).unwrap();
            g.fe.set_vring_kick(0, &kick_read).unwrap();
            g.header(hdr, req::FLUSH, 0);
            g.g.add_chain(&[(hdr, 16, false), (st, 1, true)]);
            let _ = (&kick_write).write_all(&[1; 8]);
            drop(kick_write); // the kick pipe hangs up: the device polls instead
            std::thread::sleep(Duration::from_millis(2));
        }
        // Memory shrunk under the device, then a request into the lost part.
        2 => {
            let mut g = Guest::connect_to(
                socket,
                MockGuest::new_unsealable(common::MEM as u64, QSIZE),
                None,
            );
            g.g.file().set_len(2 << 20).unwrap();
            g.header(hdr, req::IN, 0);
            g.put(st, &[0xff]);
            g.g.add_chain(&[(hdr, 16, false), (3 << 20, 4096, true), (st, 1, true)]);
            let _ = g.kick.write(1);
            std::thread::sleep(Duration::from_millis(2));
            if let Some((_, len)) = g.g.pop_used_raw() {
                panic!("round {i}: a request on lost memory came back ({len} bytes)");
            }
        }
        // A loop: no status to answer at, the queue stops.
        3 => {
            let mut g = Guest::connect(socket);
            g.put(st, &[0xff]);
            g.submit_raw(&[
                d(hdr, 16, DESC_F_NEXT, 41),
                d(dat, 512, DESC_F_WRITE | DESC_F_NEXT, 40),
            ]);
            std::thread::sleep(Duration::from_millis(1));
            assert_eq!(
                g.g.pop_used_raw(),
                None,
                "round {i}: a loop is never 'done'"
            );
        }
        // A data buffer outside memory: IOERR at the status byte, nothing else written.
        4 => {
            let mut g = Guest::connect(socket);
            g.header(hdr, req::IN, 0);
            let check = canary(&g, st, 1);
            let r = g.raw(
                &[
                    d(hdr, 16, DESC_F_NEXT, 41),
                    d(u64::MAX - 4096, 4096, DESC_F_WRITE | DESC_F_NEXT, 42),
                    d(st, 1, DESC_F_WRITE, 0),
                ],
                st,
            );
            assert_eq!(r, (status::IOERR, 40, 1), "round {i}");
            check(&g);
        }
        // Garbage on the socket.
        5 => {
            let mut raw = UnixStream::connect(socket).unwrap();
            raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = raw.write_all(&[5, 0, 0, 0, 1, 0, 0, 0, 200, 0, 0, 0, 1, 2, 3]);
            let _ = raw.shutdown(std::net::Shutdown::Write);
            let mut buf = [0u8; 16];
            let _ = std::io::Read::read(&mut raw, &mut buf);
        }
        // A frontend that vanishes with requests in flight, without GET_VRING_BASE.
        _ => {
            let mut g = Guest::connect(socket);
            for k in 0..8u64 {
                let h = hdr + 32 * k;
                g.header(h, req::IN, k);
                g.g.add_chain(&[(h, 16, false), (dat, 512, true), (h + 16, 1, true)]);
            }
            let _ = g.kick.write(1);
            drop(g.fe);
        }
    }
}

#[test]
fn a_thousand_hostile_frontends_leave_the_process_serving_with_flat_fds_and_memory() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let socket = start_server("hostile-rounds");
    // Warm up: the first rounds allocate what is kept (poller buffers, registry slots).
    for i in 0..14 {
        round(&socket, i);
    }
    good_client(&socket, 0);
    let (fds0, rss0) = (open_fds(), rss_kib());
    for i in 0..ROUNDS {
        round(&socket, i);
        if i % 50 == 49 {
            good_client(&socket, i);
        }
    }
    good_client(&socket, ROUNDS);
    assert_flat("hostile rounds", (fds0, rss0));
}

/// A good client on packed rings: writes a pattern and reads it back, nothing around the
/// buffer written.
fn good_packed_client(socket: &std::path::PathBuf, round: usize) {
    let mut g = PackedGuest::connect(socket);
    let pattern: Vec<u8> = (0..4096).map(|i| (i + round * 11) as u8).collect();
    g.put(BUF + 4096, &pattern);
    let sector = (round % 64) as u64 * 8 + 512;
    assert_eq!(
        g.request(req::OUT, sector, Some((4096, false))),
        (status::OK, 1)
    );
    g.put(BUF + 4096, &[0; 4096]);
    let before = (g.get(BUF + 4096 - 64, 64), g.get(BUF + 2 * 4096, 64));
    assert_eq!(
        g.request(req::IN, sector, Some((4096, true))),
        (status::OK, 4097)
    );
    let after = (g.get(BUF + 4096 - 64, 64), g.get(BUF + 2 * 4096, 64));
    assert_eq!(
        before, after,
        "round {round}: bytes around the buffer untouched"
    );
    assert_eq!(
        g.get(BUF + 4096, 4096),
        pattern,
        "round {round}: verified read on a packed ring"
    );
}

/// The `k`th pseudo-random word of round `i` (splitmix64): rounds differ, runs repeat.
fn noise(i: usize, k: u64) -> u64 {
    let mut x = (i as u64)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(k.wrapping_mul(0xd1b5_4a32_d192_ed03));
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Packed descriptors as they lie in memory (an indirect table).
fn table_bytes(table: &[PackedDescriptor]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * table.len());
    for t in table {
        out.extend_from_slice(&t.addr.to_le_bytes());
        out.extend_from_slice(&t.len.to_le_bytes());
        out.extend_from_slice(&t.id.to_le_bytes());
        out.extend_from_slice(&t.flags.to_le_bytes());
    }
    out
}

/// Waits a little for the device to answer the chain at ring index 0: what it wrote there.
fn answer_at_0(g: &PackedGuest, wait: Duration) -> Option<(u16, u32)> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Some(used) = g.used_at(0) {
            return Some(used);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A chain the device must refuse: answered IOERR at its status byte, or not at all (the
/// queue stops), never OK.
fn refused(g: &PackedGuest, st: u64, id: u16, i: usize, what: &str, errors: (&GuestErrors, u64)) {
    reported(errors.0, errors.1, i, what);
    // A chain answered where it can be gets its status byte before the report and its used
    // descriptor after: a written status means the answer is on its way.
    let answered = match g.used_at(0) {
        None if g.get(st, 1)[0] != 0xff => answer_at_0(g, Duration::from_secs(5)),
        used => used,
    };
    match answered {
        None => assert_eq!(g.get(st, 1)[0], 0xff, "round {i}: {what}: status untouched"),
        Some(used) => {
            assert_eq!(used, (id, 1), "round {i}: {what}: the status byte only");
            assert_eq!(g.get(st, 1)[0], status::IOERR, "round {i}: {what}");
        }
    }
}

/// Bytes just before and just after the ring's area, checked later: the device writes its
/// ring and the named buffers, nothing else.
fn ring_canary(g: &PackedGuest) -> impl Fn(&PackedGuest) {
    let (start, end) = (
        g.ring.gpas.0,
        g.ring.gpas.0 + PackedDriverQueue::bytes(QSIZE) as u64,
    );
    let before = g.get(start - 64, 64);
    let after = g.get(end, 64);
    move |g: &PackedGuest| {
        assert_eq!(
            g.get(start - 64, 64),
            before,
            "bytes before the ring untouched"
        );
        assert_eq!(g.get(end, 64), after, "bytes after the ring untouched");
    }
}

/// Waits up to 10 s for the device to report a guest error after `before` of them: the
/// refusal a round expects has happened (so what the round checks next is final).
fn reported(errors: &GuestErrors, before: u64, i: usize, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while errors.total() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "round {i}: {what}: not reported as the guest's error within 10 s"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The device's error count once it has stopped moving for 5 ms (at most 2 s).
fn settled(errors: &GuestErrors) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut seen = errors.total();
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let now = errors.total();
        if now == seen || std::time::Instant::now() >= deadline {
            return now;
        }
        seen = now;
    }
}

/// One hostile packed-ring frontend; round `i` picks the misbehaviour. Refusals a queue
/// makes are waited for in `errors` before what they left is checked.
fn packed_round(socket: &std::path::PathBuf, i: usize, errors: &GuestErrors) {
    // What earlier rounds' connections still report (a poller finishing their chains) must
    // not count as this round's refusal.
    let before = settled(errors);
    let (hdr, dat, st) = (BUF, BUF + 4096, BUF + 64 * 4096);
    let table = BUF + 128 * 4096;
    let start = u32::from(Position::START.to_event()) * 0x1_0001;
    match i % 10 {
        // A chain that never ends: every descriptor of the ring says NEXT.
        0 => {
            let mut g = PackedGuest::connect(socket);
            g.header(hdr, req::IN, 0);
            g.put(st, &[0xff]);
            let ring: Vec<_> = (0..QSIZE).map(|k| pd(hdr, 16, k, DESC_F_NEXT)).collect();
            g.submit_raw(&ring);
            reported(errors, before, i, "a chain without end");
            assert_eq!(
                g.used_at(0),
                None,
                "round {i}: a chain without end is never done"
            );
        }
        // Indirect tables that nest, point at themselves, or lie outside memory.
        1 => {
            let mut g = PackedGuest::connect(socket);
            g.header(hdr, req::IN, 0);
            g.put(st, &[0xff]);
            let check = ring_canary(&g);
            // Each table's middle entry would make a good 512-byte read but for its
            // INDIRECT flag (a table may not name another, nor itself).
            let nested = DESC_F_INDIRECT | DESC_F_WRITE;
            let (inner, at) = match (i / 10) % 3 {
                0 => (pd(table, 512, 0, nested), table),
                1 => (pd(dat, 512, 0, nested), table),
                _ => (pd(dat, 512, 0, DESC_F_WRITE), u64::MAX - 47),
            };
            if at == table {
                g.put(
                    table,
                    &table_bytes(&[pd(hdr, 16, 0, 0), inner, pd(st, 1, 0, DESC_F_WRITE)]),
                );
            }
            g.submit_raw(&[pd(at, 48, 9, DESC_F_INDIRECT)]);
            refused(&g, st, 9, i, "a broken indirect table", (errors, before));
            check(&g);
        }
        // A buffer id the ring cannot have: the queue stops, nothing is answered.
        2 => {
            let mut g = PackedGuest::connect(socket);
            g.header(hdr, req::FLUSH, 0);
            g.put(st, &[0xff]);
            let id = QSIZE + (noise(i, 0) % u64::from(u16::MAX - QSIZE)) as u16;
            g.submit_raw(&[pd(hdr, 16, 0, DESC_F_NEXT), pd(st, 1, id, DESC_F_WRITE)]);
            reported(errors, before, i, "a buffer id past the ring");
            assert_eq!(g.used_at(0), None, "round {i}: buffer id {id} answered");
            assert_eq!(g.get(st, 1)[0], 0xff, "round {i}: status untouched");
        }
        // Directions out of order: a device-readable buffer after a writable one.
        3 => {
            let mut g = PackedGuest::connect(socket);
            g.header(hdr, req::OUT, 0);
            g.put(st, &[0xff]);
            g.submit_raw(&[
                pd(hdr, 16, 0, DESC_F_NEXT),
                pd(st, 1, 0, DESC_F_WRITE | DESC_F_NEXT),
                pd(dat, 4096, 4, 0),
            ]);
            refused(&g, st, 4, i, "directions out of order", (errors, before));
        }
        // A data buffer outside memory: IOERR at the status byte, nothing else written.
        4 => {
            let mut g = PackedGuest::connect(socket);
            g.header(hdr, req::IN, 0);
            g.put(st, &[0xff]);
            let around = (g.get(st - 64, 64), g.get(st + 1, 64));
            g.submit_raw(&[
                pd(hdr, 16, 0, DESC_F_NEXT),
                pd(u64::MAX - 4096, 4096, 0, DESC_F_WRITE | DESC_F_NEXT),
                pd(st, 1, 7, DESC_F_WRITE),
            ]);
            let used = answer_at_0(&g, Duration::from_secs(5));
            assert_eq!(used, Some((7, 1)), "round {i}");
            assert_eq!(g.get(st, 1)[0], status::IOERR, "round {i}");
            assert_eq!((g.get(st - 64, 64), g.get(st + 1, 64)), around, "round {i}");
            reported(errors, before, i, "a buffer outside memory");
        }
        // The ring or an event structure outside memory (or across its end): the ring
        // never starts.
        5 => {
            let mut g = PackedGuest::negotiate(socket, MockGuest::new(common::MEM as u64, QSIZE));
            let (desc, driver, device) = g.ring_addresses();
            let base = g.g.frontend_base();
            let far = base + (1 << 40);
            let addrs = match (i / 10) % 4 {
                0 => (desc, far, device),
                1 => (desc, driver, far),
                2 => (far, driver, device),
                // The descriptor ring runs past the end of memory.
                _ => (base + common::MEM as u64 - 512, driver, device),
            };
            g.start_at(start, addrs);
            // A round trip: the connection has taken the kick, where the ring would start.
            let _ = g.fe.get_features();
            g.header(hdr, req::FLUSH, 0);
            g.put(st, &[0xff]);
            g.submit_raw(&[pd(hdr, 16, 0, DESC_F_NEXT), pd(st, 1, 3, DESC_F_WRITE)]);
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(
                g.used_at(0),
                None,
                "round {i}: a ring outside memory served"
            );
            assert_eq!(g.get(st, 1)[0], 0xff, "round {i}: status untouched");
        }
        // A base of garbage: positions past the ring, or wrap counters and positions the
        // driver does not have. The ring stays stopped or serves from where it was told; it
        // writes nothing outside its ring and the named buffers either way.
        6 => {
            let mut g = PackedGuest::negotiate(socket, MockGuest::new(common::MEM as u64, QSIZE));
            let check = ring_canary(&g);
            let word = noise(i, 1) as u32;
            let base = if (i / 10) % 2 == 0 {
                word
            } else {
                // Both positions inside the ring, any wrap counters.
                let q = u32::from(QSIZE);
                (word & 0x8000_8000) | ((word & 0x7fff) % q) | (((word >> 16) & 0x7fff) % q) << 16
            };
            let addrs = g.ring_addresses();
            g.start_at(base, addrs);
            g.header(hdr, req::FLUSH, 0);
            g.put(st, &[0xff]);
            g.submit_raw(&[pd(hdr, 16, 0, DESC_F_NEXT), pd(st, 1, 3, DESC_F_WRITE)]);
            std::thread::sleep(Duration::from_millis(2));
            let outside = |half: u32| half & 0x7fff >= u32::from(QSIZE);
            if outside(base) || outside(base >> 16) {
                assert_eq!(g.get(st, 1)[0], 0xff, "round {i}: base {base:#x} refused");
            }
            check(&g);
        }
        // An inflight region of garbage (with a well-formed header, or none): the ring runs
        // again what it can follow or stays stopped; no crash, no hang.
        7 => {
            use std::os::unix::fs::FileExt;
            let mut g = PackedGuest::negotiate(socket, MockGuest::new(common::MEM as u64, QSIZE));
            let len = g.inflight.metadata().unwrap().len() as usize;
            let mut garbage: Vec<u8> = (0..len.div_ceil(8) as u64)
                .flat_map(|k| noise(i, k + 2).to_le_bytes())
                .take(len)
                .collect();
            if (i / 10) % 2 == 0 {
                // Version 1 and this ring's size: the entries are believed, and checked.
                garbage[8..10].copy_from_slice(&1u16.to_le_bytes());
                garbage[10..12].copy_from_slice(&QSIZE.to_le_bytes());
            }
            g.inflight.write_all_at(&garbage, 0).unwrap();
            let addrs = g.ring_addresses();
            g.start_at(start, addrs);
            std::thread::sleep(Duration::from_millis(2));
            drop(g);
        }
        // A frontend that vanishes with requests in flight, without GET_VRING_BASE.
        8 => {
            let mut g = PackedGuest::connect(socket);
            for k in 0..8u64 {
                let h = hdr + 32 * k;
                g.header(h, req::IN, k);
                let buf = |gpa, len, write| vfblk_vhost::driver::DriverBuffer { gpa, len, write };
                g.ring
                    .add(&[buf(h, 16, false), buf(dat, 512, true), buf(h + 16, 1, true)])
                    .unwrap();
            }
            let _ = g.kick.write(1);
            drop(g.fe);
        }
        // Memory shrunk under the device, then a request into the lost part.
        _ => {
            let mut g = PackedGuest::connect_to(
                socket,
                MockGuest::new_unsealable(common::MEM as u64, QSIZE),
            );
            g.g.file().set_len(2 << 20).unwrap();
            g.header(hdr, req::IN, 0);
            g.put(st, &[0xff]);
            g.submit_raw(&[
                pd(hdr, 16, 0, DESC_F_NEXT),
                pd(3 << 20, 4096, 0, DESC_F_WRITE | DESC_F_NEXT),
                pd(st, 1, 2, DESC_F_WRITE),
            ]);
            reported(errors, before, i, "a buffer on lost memory");
            if let Some((_, len)) = g.used_at(0) {
                panic!("round {i}: a request on lost memory came back ({len} bytes)");
            }
        }
    }
}

#[test]
fn a_thousand_hostile_packed_ring_frontends_leave_the_process_serving_with_flat_fds_and_memory() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (socket, errors) = start_server_reporting("hostile-packed-rounds");
    for i in 0..20 {
        packed_round(&socket, i, &errors);
    }
    good_packed_client(&socket, 0);
    let (fds0, rss0) = (open_fds(), rss_kib());
    for i in 0..ROUNDS {
        packed_round(&socket, i, &errors);
        if i % 50 == 49 {
            good_packed_client(&socket, i);
            good_client(&socket, i);
        }
    }
    good_packed_client(&socket, ROUNDS);
    assert_flat("hostile packed rounds", (fds0, rss0));
}
