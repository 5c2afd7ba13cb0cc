//! The device over a real vhost-user socket, driven by a minimal frontend in this test:
//! negotiation, config space, every request type, and hostile input (descriptors outside
//! memory, loops, over-long chains, wrong directions, missing status, out-of-range sectors,
//! nested indirect tables, malformed vhost-user messages). Bad input must get IOERR/UNSUPP or
//! the chain back without status, never a panic, and the device must keep serving.

mod common;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{d, device_config, start_server, Guest, TestGuest, BUF, DISK, MEM};
use vfblk_bridge::virtio_blk::{req, status};
use vfblk_vhost::virtq::{Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

#[test]
fn negotiation_and_config_space() {
    let socket = start_server("negotiation");
    let g = Guest::connect(&socket);
    for bit in [32, 28, 29, 30, 2, 6, 9, 12, 13, 14] {
        assert!(
            g.features & (1 << bit) != 0,
            "feature bit {bit} offered: {:#x}",
            g.features
        );
    }
    assert!(g.protocol.contains(
        VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
    ));
    let c = &g.config;
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        DISK / 512,
        "capacity"
    );
    assert_eq!(
        u32::from_le_bytes(c[12..16].try_into().unwrap()),
        126,
        "seg_max"
    );
    assert_eq!(
        u32::from_le_bytes(c[20..24].try_into().unwrap()),
        512,
        "blk_size"
    );
    assert_eq!(
        u16::from_le_bytes(c[34..36].try_into().unwrap()),
        2,
        "num_queues"
    );
    assert!(
        u32::from_le_bytes(c[36..40].try_into().unwrap()) > 0,
        "max_discard_sectors"
    );
    let mut fe = g.fe;
    assert_eq!(fe.get_queue_num().unwrap(), 2);
}

#[test]
fn config_reads_are_bounded() {
    use vhost::vhost_user::VhostUserBackendReqHandlerMut;
    let dir = std::env::temp_dir().join(format!("vfblk-devtest-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = device_config(&dir, 1);
    let mut dev = vfblk_vhost::protocol::Connection::new(config);
    let flags = VhostUserConfigFlags::empty();
    assert_eq!(dev.get_config(0, 60, flags).unwrap().len(), 60);
    assert_eq!(dev.get_config(8, 4, flags).unwrap().len(), 4);
    assert!(dev.get_config(40, 40, flags).is_err(), "past the end");
    assert!(
        dev.get_config(u32::MAX, 2, flags).is_err(),
        "offset overflow"
    );
    assert!(dev.set_config(0, &[1], flags).is_err(), "read-only");
    // Inflight requests with nonsense sizes are refused.
    use vhost::vhost_user::message::VhostUserInflight;
    for (n, qs) in [(0u16, 128u16), (2, 128), (1, 100), (1, 0)] {
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: n,
            queue_size: qs,
        };
        assert!(dev.get_inflight_fd(&ask).is_err(), "{n} queues of {qs}");
    }
    // An inflight fd shorter than the size the frontend claims: refused, not mapped (a
    // touch past its end would be SIGBUS).
    let short = vfblk_vhost::memory::memfd("short", 4096).unwrap();
    let claim = VhostUserInflight {
        mmap_size: 1 << 20,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 128,
    };
    assert!(
        dev.set_inflight_fd(&claim, short).is_err(),
        "short inflight fd"
    );
    assert!(dev.set_vring_num(0, 100).is_err(), "not a power of two");
    assert!(dev.set_vring_num(5, 64).is_err(), "no such queue");
    assert!(dev.set_features(1 << 63).is_err(), "feature not offered");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_request_type() {
    let socket = start_server("requests");
    let mut g = Guest::connect(&socket);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    g.put(BUF + 4096, &pattern);
    assert_eq!(
        g.request(req::OUT, 100, Some((8192, false))),
        (status::OK, 1)
    );
    g.put(BUF + 4096, &[0u8; 8192]);
    assert_eq!(
        g.request(req::IN, 100, Some((8192, true))),
        (status::OK, 8193),
        "read writes data + status"
    );
    assert_eq!(g.get(BUF + 4096, 8192), pattern);
    assert_eq!(g.request(req::FLUSH, 0, None).0, status::OK);
    let (st, len) = g.request(req::GET_ID, 0, Some((20, true)));
    assert_eq!((st, len), (status::OK, 21));
    assert_eq!(&g.get(BUF + 4096, 9), b"test-disk");
    // Write zeroes over sectors 100..104, discard 104..116: both read back as zeros.
    let mut ranges = Vec::new();
    ranges.extend_from_slice(&100u64.to_le_bytes());
    ranges.extend_from_slice(&4u32.to_le_bytes());
    ranges.extend_from_slice(&0u32.to_le_bytes());
    g.put(BUF + 4096, &ranges);
    assert_eq!(
        g.request(req::WRITE_ZEROES, 0, Some((16, false))).0,
        status::OK
    );
    let mut discard = Vec::new();
    discard.extend_from_slice(&104u64.to_le_bytes());
    discard.extend_from_slice(&12u32.to_le_bytes());
    discard.extend_from_slice(&0u32.to_le_bytes());
    g.put(BUF + 4096, &discard);
    assert_eq!(g.request(req::DISCARD, 0, Some((16, false))).0, status::OK);
    assert_eq!(g.request(req::IN, 100, Some((8192, true))).0, status::OK);
    assert!(g.get(BUF + 4096, 8192).iter().all(|&b| b == 0));
    // Anything else: UNSUPP. Discard with flags: UNSUPP.
    assert_eq!(g.request(99, 0, None).0, status::UNSUPP);
    let mut flagged = discard.clone();
    flagged[12] = 1;
    g.put(BUF + 4096, &flagged);
    assert_eq!(
        g.request(req::DISCARD, 0, Some((16, false))).0,
        status::UNSUPP
    );
}

#[test]
fn hostile_chains_are_answered_with_errors_and_the_device_keeps_serving() {
    let socket = start_server("hostile");
    let mut g = Guest::connect(&socket);
    let (hdr, dat, st) = (BUF, BUF + 4096, BUF + 64 * 4096);
    let ok_read = |g: &mut Guest| g.request(req::IN, 0, Some((512, true))).0;
    let ioerr = (status::IOERR, 40, 1);

    // Data buffer outside guest memory, status byte in place: IOERR there, not "done".
    g.header(hdr, req::IN, 0);
    let r = g.raw(
        &[
            d(hdr, 16, DESC_F_NEXT, 41),
            d(MEM as u64 - 100, 512, DESC_F_WRITE | DESC_F_NEXT, 42),
            d(st, 1, DESC_F_WRITE, 0),
        ],
        st,
    );
    assert_eq!(r, ioerr, "out-of-memory buffer");
    assert_eq!(ok_read(&mut g), status::OK);

    // Address that wraps around.
    let r = g.raw(
        &[
            d(hdr, 16, DESC_F_NEXT, 41),
            d(u64::MAX - 10, 512, DESC_F_WRITE | DESC_F_NEXT, 42),
            d(st, 1, DESC_F_WRITE, 0),
        ],
        st,
    );
    assert_eq!(r, ioerr, "wrapping address");

    // Huge chain through an indirect table of 200 entries (more than we accept); its last
    // entry is the status byte.
    let table = BUF + 128 * 4096;
    for i in 0..200u16 {
        let desc = if i == 0 {
            d(hdr, 16, DESC_F_NEXT, 1)
        } else if i == 199 {
            d(st, 1, DESC_F_WRITE, 0)
        } else {
            d(
                dat + u64::from(i) * 512,
                512,
                DESC_F_WRITE | DESC_F_NEXT,
                i + 1,
            )
        };
        g.put(table + 16 * u64::from(i), &desc.to_le_bytes());
    }
    let r = g.raw(&[d(table, 200 * 16, DESC_F_INDIRECT, 0)], st);
    assert_eq!(r, ioerr, "chain longer than the device accepts");
    assert_eq!(ok_read(&mut g), status::OK);

    // Wrong direction: a read whose data buffer is device-readable -> IOERR.
    g.header(hdr, req::IN, 0);
    let r = g.raw(
        &[
            d(hdr, 16, DESC_F_NEXT, 41),
            d(dat, 512, DESC_F_NEXT, 42),
            d(st, 1, DESC_F_WRITE, 0),
        ],
        st,
    );
    assert_eq!(r, ioerr, "read into a read-only buffer");
    // Header shorter than 16 bytes.
    let r = g.raw(&[d(hdr, 8, DESC_F_NEXT, 41), d(st, 1, DESC_F_WRITE, 0)], st);
    assert_eq!(r, ioerr, "short header");
    // Sectors beyond the capacity, and a length that is not a multiple of 512.
    assert_eq!(
        g.request(req::IN, DISK / 512 - 1, Some((1024, true))).0,
        status::IOERR
    );
    assert_eq!(
        g.request(req::OUT, u64::MAX, Some((512, false))).0,
        status::IOERR
    );
    assert_eq!(g.request(req::IN, 0, Some((100, true))).0, status::IOERR);
    // Discard range past the end.
    let mut bad = Vec::new();
    bad.extend_from_slice(&(DISK / 512 - 1).to_le_bytes());
    bad.extend_from_slice(&8u32.to_le_bytes());
    bad.extend_from_slice(&0u32.to_le_bytes());
    g.put(dat, &bad);
    assert_eq!(
        g.request(req::DISCARD, 0, Some((16, false))).0,
        status::IOERR
    );

    // After all that, the device still serves real I/O.
    g.put(dat, &[0x5a; 512]);
    assert_eq!(g.request(req::OUT, 7, Some((512, false))).0, status::OK);
    g.put(dat, &[0; 512]);
    assert_eq!(g.request(req::IN, 7, Some((512, true))).0, status::OK);
    assert_eq!(g.get(dat, 512), vec![0x5a; 512]);
}

#[test]
fn unanswerable_chains_stop_their_queue_and_the_next_frontend_is_served() {
    let socket = start_server("unanswerable");
    let (hdr, dat, st) = (BUF, BUF + 4096, BUF + 64 * 4096);
    let table = BUF + 128 * 4096;
    let cases: Vec<(&str, Vec<Descriptor>)> = vec![
        (
            "descriptor loop",
            vec![
                d(hdr, 16, DESC_F_NEXT, 41),
                d(dat, 512, DESC_F_WRITE | DESC_F_NEXT, 42),
                d(dat, 512, DESC_F_WRITE | DESC_F_NEXT, 41),
            ],
        ),
        ("next outside the table", vec![d(hdr, 16, DESC_F_NEXT, 500)]),
        (
            "nested indirect table",
            vec![d(table + 4096, 16, DESC_F_INDIRECT, 0)],
        ),
        (
            "indirect with NEXT",
            vec![
                d(table, 32, DESC_F_INDIRECT | DESC_F_NEXT, 41),
                d(st, 1, DESC_F_WRITE, 0),
            ],
        ),
        (
            "indirect table of odd length",
            vec![d(table, 20, DESC_F_INDIRECT, 0)],
        ),
        (
            "readable status after a writable buffer",
            vec![
                d(hdr, 16, DESC_F_NEXT, 41),
                d(dat, 512, DESC_F_WRITE | DESC_F_NEXT, 42),
                d(st, 1, 0, 0),
            ],
        ),
        (
            "no status byte",
            vec![d(hdr, 16, DESC_F_NEXT, 41), d(dat, 512, 0, 0)],
        ),
    ];
    for (what, descs) in cases {
        let mut g = Guest::connect(&socket);
        g.header(hdr, req::OUT, 0);
        g.put(
            table + 4096,
            &d(table, 32, DESC_F_INDIRECT, 0).to_le_bytes(),
        );
        g.put(st, &[0xff]);
        g.submit_raw(&descs);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            g.g.pop_used_raw(),
            None,
            "{what}: nothing may come back as if it were done"
        );
        assert_eq!(g.get(st, 1)[0], 0xff, "{what}: status untouched");
    }
    // A fresh frontend gets a working device.
    let mut g = Guest::connect(&socket);
    assert_eq!(g.request(req::IN, 0, Some((512, true))).0, status::OK);
}

#[test]
fn a_ring_smaller_than_the_inflight_region_is_served_and_a_larger_one_is_refused_without_closing() {
    let socket = start_server("inflight-sizes");
    // Firmware drives a 64-entry ring where the region was laid out for 1024 entries.
    let mut g = Guest::connect_with_inflight(&socket, Some(1024));
    assert_eq!(g.request(req::IN, 0, Some((512, true))), (status::OK, 513));
    drop(g);
    // A ring larger than the region cannot be tracked: the queue stays stopped, said once,
    // and the connection stays open (closing it would start a reconnect loop).
    let mut g = Guest::connect_with_inflight(&socket, Some(32));
    let hdr = BUF;
    g.header(hdr, req::IN, 0);
    g.g.add_chain(&[
        (hdr, 16, false),
        (BUF + 4096, 512, true),
        (BUF + 8192, 1, true),
    ]);
    let _ = g.kick.write(1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(g.g.pop_used_raw(), None, "the queue did not start");
    assert_eq!(
        common::acked(g.fe.get_features().unwrap()),
        g.features,
        "the connection is still served"
    );
}

#[test]
fn a_frontend_that_shrinks_its_memory_loses_its_queue_not_the_process() {
    let socket = start_server("shrink");
    // A sealable memfd is sealed by the device: the frontend can no longer shrink it.
    let g = Guest::connect(&socket);
    g.fe.get_features().unwrap(); // every message before it has been handled
    assert!(
        g.g.file().set_len(1 << 20).is_err(),
        "the device sealed the guest's memfd against shrinking"
    );
    drop(g);
    // An unsealable one can shrink: the device's touch of the lost pages is contained.
    let mut g = Guest::connect_unsealable(&socket);
    assert_eq!(g.request(req::IN, 0, Some((512, true))).0, status::OK);
    g.g.file().set_len(2 << 20).unwrap();
    let (hdr, st, lost) = (BUF, BUF + 64 * 4096, 3 << 20);
    g.header(hdr, req::IN, 0);
    g.put(st, &[0xff]);
    g.g.add_chain(&[(hdr, 16, false), (lost, 4096, true), (st, 1, true)]);
    let _ = g.kick.write(1);
    std::thread::sleep(Duration::from_millis(300));
    // The RAM backend finishes at submission and writes the status byte then; what counts is
    // that the request is never returned (a driver reads the status only after that).
    assert_eq!(
        g.g.pop_used_raw(),
        None,
        "nothing done on lost memory is reported done"
    );
    drop(g);
    // The process is alive (this test runs in it) and the next frontend is served.
    let mut g = Guest::connect(&socket);
    assert_eq!(g.request(req::IN, 0, Some((512, true))).0, status::OK);
}

#[test]
fn a_ring_at_frontend_address_zero_is_served() {
    let socket = start_server("address-zero");
    // The frontend maps guest memory at address 0: the descriptor table sits at 0.
    let guest = vfblk_vhost::mock::MockGuest::new_at(MEM as u64, common::QSIZE, 0);
    assert_eq!(guest.ring_addresses().0, 0);
    let mut g = Guest::connect_to(&socket, guest, None);
    assert_eq!(g.request(req::IN, 0, Some((512, true))), (status::OK, 513));
}

#[test]
fn a_disabled_ring_pauses_until_it_is_enabled_again() {
    let socket = start_server("enable");
    let mut g = Guest::connect(&socket);
    assert_eq!(g.request(req::FLUSH, 0, None).0, status::OK);
    g.fe.set_vring_enable(0, false).unwrap();
    // A request with a reply: messages are handled in order, so the disable is done.
    g.fe.get_features().unwrap();
    let (hdr, st) = (BUF, BUF + 64 * 4096);
    g.header(hdr, req::FLUSH, 0);
    g.put(st, &[0xff]);
    g.g.add_chain(&[(hdr, 16, false), (st, 1, true)]);
    let _ = g.kick.write(1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(g.g.pop_used_raw(), None, "a disabled ring is not processed");
    g.fe.set_vring_enable(0, true).unwrap();
    let (_, len) = g.wait_used();
    assert_eq!(
        (g.get(st, 1)[0], len),
        (status::OK, 1),
        "processed once enabled"
    );
}

#[test]
fn malformed_messages_close_the_connection_and_the_next_one_is_served() {
    let socket = start_server("messages");
    for garbage in [
        // Unknown request code, absurd size.
        [0x0f, 0x27, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f].to_vec(),
        // SET_MEM_TABLE (5) with a payload too short for its region count and no fds.
        [5, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 200, 0, 0, 0, 0, 0, 0, 0].to_vec(),
        // A truncated header.
        [1, 0, 0].to_vec(),
    ] {
        let mut raw = UnixStream::connect(&socket).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        raw.write_all(&garbage).unwrap();
        let _ = raw.shutdown(std::net::Shutdown::Write);
        let mut buf = [0u8; 64];
        // The device answers nothing useful and closes the connection.
        let _ = std::io::Read::read(&mut raw, &mut buf);
    }
    let mut g = Guest::connect(&socket);
    assert_eq!(g.request(req::FLUSH, 0, None).0, status::OK);
    let _ = g.fe.as_raw_fd();
}

/// One raw vhost-user message: header (request, flags, size) and payload.
fn raw_message(s: &mut UnixStream, request: u32, flags: u32, payload: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
}

/// A reply's request, flags and u64 payload.
fn raw_reply(s: &mut UnixStream) -> (u32, u32, u64) {
    let mut r = [0u8; 20];
    std::io::Read::read_exact(s, &mut r).unwrap();
    let word = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap());
    assert_eq!(word(8), 8, "a u64 payload");
    (
        word(0),
        word(4),
        u64::from_le_bytes(r[12..20].try_into().unwrap()),
    )
}

#[test]
fn the_device_status_is_set_and_read_back_and_a_malformed_status_closes_the_connection() {
    const SET_STATUS: u32 = 39;
    const GET_STATUS: u32 = 40;
    let socket = start_server("status");
    // Offered.
    let mut fe = vhost::vhost_user::Frontend::from_stream(UnixStream::connect(&socket).unwrap(), 2);
    fe.set_owner().unwrap();
    let features = common::acked(fe.get_features().unwrap());
    fe.set_features(features).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    assert!(
        protocol.contains(VhostUserProtocolFeatures::STATUS),
        "{protocol:?}"
    );
    drop(fe);
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw_message(&mut raw, GET_STATUS, 1, &[]);
    assert_eq!(raw_reply(&mut raw), (GET_STATUS, 5, 0), "a fresh device");
    // ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK, with a reply asked for (REPLY_ACK).
    raw_message(&mut raw, SET_STATUS, 1 | 8, &0x0fu64.to_le_bytes());
    assert_eq!(raw_reply(&mut raw), (SET_STATUS, 5, 0), "acknowledged");
    raw_message(&mut raw, GET_STATUS, 1, &[]);
    assert_eq!(raw_reply(&mut raw), (GET_STATUS, 5, 0x0f));
    // Without a reply asked for: none comes, the next answer shows it was taken.
    raw_message(&mut raw, SET_STATUS, 1, &0x07u64.to_le_bytes());
    raw_message(&mut raw, GET_STATUS, 1, &[]);
    assert_eq!(raw_reply(&mut raw), (GET_STATUS, 5, 0x07));
    // Not a status byte: the connection is closed, nothing answered.
    raw_message(&mut raw, SET_STATUS, 1 | 8, &0x100u64.to_le_bytes());
    let closed = |raw: &mut UnixStream| {
        let mut buf = [0u8; 20];
        match std::io::Read::read(raw, &mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    assert!(closed(&mut raw), "closed");
    // A payload of the wrong size, on another connection: closed too.
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    raw_message(&mut raw, GET_STATUS, 1, &[0; 4]);
    assert!(closed(&mut raw), "closed");
    // And a good client is served after them.
    let mut g = Guest::connect(&socket);
    assert_eq!(g.request(req::IN, 0, Some((512, true))).0, status::OK);
}
