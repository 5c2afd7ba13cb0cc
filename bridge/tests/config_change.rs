//! A resize told to a connected frontend on its backend request channel
//! (VHOST_USER_PROTOCOL_F_BACKEND_REQ, SET_BACKEND_REQ_FD, BACKEND_CONFIG_CHANGE_MSG), over a
//! real socket: the frontend reads the new capacity the way QEMU does (GET_CONFIG on the main
//! socket before it acknowledges), and hostile channels (not a socket, several fds, a peer
//! that never answers or closes) cost a bounded wait and never the connection.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Guest, TestGuest, DISK};
use vfblk_bridge::backend::{Backend, MemBackend};
use vfblk_bridge::device::BlkDevice;
use vfblk_bridge::virtio_blk::{req, status};
use vfblk_vhost::backend_channel::{ChannelError, Delivered};
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::poller::{PollMode, Poller};
use vfblk_vhost::protocol::DeviceConfig;
use vfblk_vhost::server::{ConfigChangeTold, SocketServer};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;

struct Served {
    socket: std::path::PathBuf,
    backend: Arc<MemBackend>,
    device: Arc<BlkDevice>,
    server: Arc<SocketServer>,
}

fn serve(name: &str) -> Served {
    let dir = std::env::temp_dir().join(format!("vfblk-cfgchange-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let backend = Arc::new(MemBackend::open(&dir.join("disk"), DISK).unwrap());
    let device = Arc::new(BlkDevice::new(backend.clone(), 2, "resize"));
    let poller = Poller::spawn(
        "test-poller".into(),
        None,
        PollMode {
            idle_before_sleep: Some(Duration::from_micros(100)),
        },
    )
    .unwrap();
    let config = Arc::new(DeviceConfig {
        num_queues: 2,
        inflight: true,
        device: device.clone(),
        pollers: vec![Arc::new(poller)],
        errors: Arc::new(GuestErrors::new("resize")),
        fd_store: None,
        dirty_log_marks: true,
    });
    let socket = dir.join("blk.sock");
    let server = Arc::new(SocketServer::start(&socket, config).unwrap());
    Served {
        socket,
        backend,
        device,
        server,
    }
}

fn capacity(fe: &mut vhost::vhost_user::Frontend) -> u64 {
    let (_, config) = fe
        .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
        .unwrap();
    u64::from_le_bytes(config[0..8].try_into().unwrap())
}

/// Tells the frontend from another thread (the test is the frontend meanwhile).
fn told(server: &Arc<SocketServer>) -> std::thread::JoinHandle<ConfigChangeTold> {
    let server = server.clone();
    std::thread::spawn(move || server.config_changed())
}

#[test]
fn a_grown_disk_is_told_on_the_backend_channel_and_read_back_before_the_ack() {
    let s = serve("qemu-like");
    assert_eq!(s.server.config_changed(), ConfigChangeTold::NotConnected);
    let mut g = Guest::connect(&s.socket);
    assert!(g.protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ));
    assert_eq!(s.server.config_changed(), ConfigChangeTold::NoChannel);
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    g.fe.set_backend_request_fd(&ours).unwrap();
    drop(ours);
    assert_eq!(capacity(&mut g.fe), DISK / 512);

    s.backend.grow(3 * DISK).unwrap();
    s.device.capacity_changed();
    let sending = told(&s.server);
    // As QEMU's vhost-user-blk: the message, then GET_CONFIG on the main socket, then the
    // acknowledgement (the server must answer GET_CONFIG while it waits for it).
    theirs
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut header = [0u8; 12];
    theirs.read_exact(&mut header).unwrap();
    assert_eq!(
        header,
        [2, 0, 0, 0, 0x9, 0, 0, 0, 0, 0, 0, 0],
        "CONFIG_CHANGE_MSG, version 1, NEED_REPLY, no payload"
    );
    assert_eq!(capacity(&mut g.fe), 3 * DISK / 512, "the new capacity");
    let mut ack = Vec::new();
    ack.extend_from_slice(&2u32.to_le_bytes());
    ack.extend_from_slice(&5u32.to_le_bytes());
    ack.extend_from_slice(&8u32.to_le_bytes());
    ack.extend_from_slice(&0u64.to_le_bytes());
    theirs.write_all(&ack).unwrap();
    assert_eq!(
        sending.join().unwrap(),
        ConfigChangeTold::Delivered(Delivered::Acknowledged)
    );
    // The grown part is served on the running queue.
    let beyond = DISK / 512 + 64;
    assert_eq!(
        g.request(req::OUT, beyond, Some((4096, false))).0,
        status::OK
    );
    assert_eq!(g.request(req::IN, beyond, Some((4096, true))).0, status::OK);
    assert_eq!(
        g.request(req::IN, 3 * DISK / 512, Some((512, true))).0,
        status::IOERR,
        "and no further"
    );
}

#[test]
fn hostile_backend_channels_cost_a_bounded_wait_and_never_the_connection() {
    let s = serve("hostile");
    let mut g = Guest::connect(&s.socket);
    // Not a stream socket: refused, the connection stays (the vhost crate's frontend asks
    // for no acknowledgement; the raw messages below do).
    let null = std::fs::File::open("/dev/null").unwrap();
    g.fe.set_backend_request_fd(&null).unwrap();
    // A round trip: the message was handled.
    capacity(&mut g.fe);
    assert_eq!(s.server.config_changed(), ConfigChangeTold::NoChannel);
    let (dgram, _other) = std::os::unix::net::UnixDatagram::pair().unwrap();
    g.fe.set_backend_request_fd(&dgram).unwrap();
    capacity(&mut g.fe);
    assert_eq!(s.server.config_changed(), ConfigChangeTold::NoChannel);
    assert_eq!(g.request(req::IN, 0, Some((512, true))).0, status::OK);

    // A peer that takes the message and never answers: the deadline, then an error.
    let (ours, theirs) = UnixStream::pair().unwrap();
    g.fe.set_backend_request_fd(&ours).unwrap();
    capacity(&mut g.fe);
    let started = Instant::now();
    match s.server.config_changed() {
        ConfigChangeTold::Failed(ChannelError::Timeout { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(g.request(req::IN, 0, Some((512, true))).0, status::OK);
    // The peer closes its end (both copies): the next change fails at once.
    drop(theirs);
    drop(ours);
    assert_eq!(
        s.server.config_changed(),
        ConfigChangeTold::Failed(ChannelError::Closed)
    );
    assert_eq!(g.request(req::IN, 0, Some((512, true))).0, status::OK);

    // A raw SET_BACKEND_REQ_FD with two fds, and one with none: refused, answered, open.
    let mut raw = UnixStream::connect(&s.socket).unwrap();
    drop(g);
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let send = |raw: &UnixStream, fds: &[i32]| {
        vmm_sys_util::sock_ctrl_msg::ScmSocket::send_with_fds(
            raw,
            &[&[21u8, 0, 0, 0, 0x9, 0, 0, 0, 0, 0, 0, 0][..]],
            fds,
        )
        .unwrap();
    };
    let message = |raw: &mut UnixStream, request: u32, payload: Option<u64>| {
        let mut m = Vec::new();
        m.extend_from_slice(&request.to_le_bytes());
        m.extend_from_slice(&1u32.to_le_bytes());
        m.extend_from_slice(&(if payload.is_some() { 8u32 } else { 0 }).to_le_bytes());
        if let Some(p) = payload {
            m.extend_from_slice(&p.to_le_bytes());
        }
        raw.write_all(&m).unwrap();
    };
    message(&mut raw, 1, None); // GET_FEATURES
    let mut reply = [0u8; 20];
    raw.read_exact(&mut reply).unwrap();
    message(&mut raw, 2, Some(1 << 30)); // SET_FEATURES: PROTOCOL_FEATURES
    let protocol =
        (VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::BACKEND_REQ).bits();
    message(&mut raw, 15, None); // GET_PROTOCOL_FEATURES
    raw.read_exact(&mut reply).unwrap();
    message(&mut raw, 16, Some(protocol)); // SET_PROTOCOL_FEATURES
    let refused = |raw: &mut UnixStream| {
        let mut r = [0u8; 20];
        raw.read_exact(&mut r).unwrap();
        (
            u32::from_le_bytes(r[0..4].try_into().unwrap()),
            u64::from_le_bytes(r[12..20].try_into().unwrap()),
        )
    };
    send(&raw, &[a.as_raw_fd(), b.as_raw_fd()]);
    assert_eq!(refused(&mut raw), (21, 1), "two fds");
    send(&raw, &[]);
    assert_eq!(refused(&mut raw), (21, 1), "no fd");
    send(&raw, &[null.as_raw_fd()]);
    assert_eq!(refused(&mut raw), (21, 1), "not a socket");
    send(&raw, &[a.as_raw_fd()]);
    assert_eq!(refused(&mut raw), (21, 0), "one socket");
    message(&mut raw, 1, None);
    raw.read_exact(&mut reply).unwrap();
    assert_eq!(
        u32::from_le_bytes(reply[0..4].try_into().unwrap()),
        1,
        "still served"
    );
}
