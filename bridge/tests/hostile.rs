//! A hostile frontend, a thousand times over: each round misbehaves in one way (blocking or
//! non-eventfd kick and call fds, pipes nobody reads, a memory file shrunk under the device,
//! chains that loop, garbage messages, a disconnect with requests in flight, dirty logs that
//! do not fit or shrink), then a good
//! client must be served with verified data. Across all rounds: the process lives, no bad
//! request is answered OK, nothing outside the named buffers is written, and the process's
//! fds and memory stay flat.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{d, start_server, Guest, BUF, QSIZE};
use vfblk_bridge::virtio_blk::{req, status};
use vfblk_vhost::mock::MockGuest;
use vfblk_vhost::virtq::{DESC_F_NEXT, DESC_F_WRITE};
use vhost::vhost_user::message::{VhostUserVirtioFeatures, VhostUserVringAddrFlags};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const ROUNDS: usize = 1000;

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
    std::thread::sleep(Duration::from_millis(100));
    let (fds1, rss1) = (open_fds(), rss_kib());
    eprintln!("{ROUNDS} hostile rounds: fds {fds0} -> {fds1}, RSS {rss0} -> {rss1} KiB");
    assert!(fds1 <= fds0 + 4, "fds flat: {fds0} -> {fds1}");
    assert!(rss1 <= rss0 + 64 * 1024, "RSS flat: {rss0} -> {rss1} KiB");
}
