//! What the socket-level tests share: a mem-backed device served on a socket in this
//! process, and a guest (the test kit's MockGuest) connected to it like QEMU.

#![allow(dead_code)] // each test file uses part of it

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfblk_bridge::backend::MemBackend;
use vfblk_bridge::device::BlkDevice;
use vfblk_bridge::virtio_blk::RequestHeader;
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::mock::MockGuest;
use vfblk_vhost::poller::{PollMode, Poller};
use vfblk_vhost::protocol::DeviceConfig;
use vfblk_vhost::virtq::Descriptor;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const MEM: usize = 4 << 20;
pub const DISK: u64 = 16 << 20;
pub const QSIZE: u16 = 64;
pub const BUF: u64 = 1 << 20; // buffers live above 1 MiB

/// What this test frontend acks of what the device offers: everything but dirty logging
/// (only a migration turns it on) and packed rings (it drives split rings, as QEMU does
/// unless `packed=on`).
pub fn acked(offered: u64) -> u64 {
    offered
        & !VhostUserVirtioFeatures::LOG_ALL.bits()
        & !(1 << vfblk_vhost::packed::VIRTIO_F_RING_PACKED)
}

/// A mem-backed device with `queues` queues on one test poller; GET_ID answers "test-disk".
pub fn device_config(dir: &std::path::Path, queues: u16) -> Arc<DeviceConfig> {
    let backend = Arc::new(MemBackend::open(&dir.join("disk"), DISK).unwrap());
    let pollers = vec![Arc::new(
        Poller::spawn(
            "test-poller".into(),
            None,
            PollMode {
                idle_before_sleep: Some(Duration::from_micros(100)),
            },
        )
        .unwrap(),
    )];
    Arc::new(DeviceConfig {
        num_queues: queues,
        inflight: true,
        device: Arc::new(BlkDevice::new(backend, queues, "test-disk")),
        pollers,
        errors: Arc::new(GuestErrors::new("test-device")),
        fd_store: None,
        dirty_log_marks: true,
    })
}

pub fn start_server(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vfblk-devtest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let config = device_config(&dir, 2);
    // Serves until the test process ends.
    std::mem::forget(vfblk_vhost::server::SocketServer::start(&socket, config).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    socket
}

pub struct Guest {
    pub fe: Frontend,
    pub g: MockGuest,
    pub kick: EventFd,
    pub _call: EventFd,
    pub features: u64,
    pub config: Vec<u8>,
    pub protocol: VhostUserProtocolFeatures,
}

impl Guest {
    pub fn connect(socket: &PathBuf) -> Guest {
        Self::connect_with_inflight(socket, None)
    }

    pub fn connect_unsealable(socket: &PathBuf) -> Guest {
        Self::connect_to(socket, MockGuest::new_unsealable(MEM as u64, QSIZE), None)
    }

    /// Connects like QEMU; with `Some(n)`, asks for an inflight region laid out for queues of
    /// `n` entries (QEMU sizes it from `queue-size`) before starting the ring.
    pub fn connect_with_inflight(socket: &PathBuf, inflight_queue_size: Option<u16>) -> Guest {
        Self::connect_to(
            socket,
            MockGuest::new(MEM as u64, QSIZE),
            inflight_queue_size,
        )
    }

    pub fn connect_to(socket: &PathBuf, g: MockGuest, inflight_queue_size: Option<u16>) -> Guest {
        let mut fe = Frontend::from_stream(UnixStream::connect(socket).unwrap(), 2);
        fe.set_owner().unwrap();
        // Everything offered but dirty logging, which only a migration turns on.
        let features = acked(fe.get_features().unwrap());
        fe.set_features(features).unwrap();
        let protocol = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(protocol).unwrap();
        let (_, config) = fe
            .get_config(0, 60, VhostUserConfigFlags::empty(), &[0u8; 60])
            .unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: g.frontend_base(),
            mmap_offset: 0,
            mmap_handle: g.file().as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        if let Some(queue_size) = inflight_queue_size {
            let ask = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: 2,
                queue_size,
            };
            let (info, fd) = fe.get_inflight_fd(&ask).unwrap();
            fe.set_inflight_fd(&info, fd.as_raw_fd()).unwrap();
        }
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_base(0, 0).unwrap();
        let (d, a, u) = g.ring_addresses();
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: d,
            used_ring_addr: u,
            avail_ring_addr: a,
            log_addr: None,
        };
        fe.set_vring_addr(0, &cfg).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        Guest {
            fe,
            g,
            kick,
            _call: call,
            features,
            config: config.to_vec(),
            protocol,
        }
    }

    pub fn put(&self, gpa: u64, data: &[u8]) {
        self.g.write(gpa, data);
    }

    pub fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.g.read(gpa, len)
    }

    pub fn header(&self, gpa: u64, kind: u32, sector: u64) {
        let h = RequestHeader {
            kind,
            ioprio: 0,
            sector,
        };
        self.put(gpa, &h.to_bytes());
    }

    pub fn wait_used(&mut self) -> (u16, u32) {
        let _ = self.kick.write(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = self.g.pop_used() {
                return u;
            }
            assert!(Instant::now() < deadline, "no completion within 5 s");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// A well-formed request: header, optional data, status. Returns (status, used len).
    pub fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        let (hdr, dat, st) = (BUF, BUF + 4096, BUF + 64 * 4096);
        self.header(hdr, kind, sector);
        self.put(st, &[0xff]);
        let mut chain = vec![(hdr, 16, false)];
        if let Some((len, write)) = data {
            chain.push((dat, len, write));
        }
        chain.push((st, 1, true));
        self.g.add_chain(&chain);
        let (_, len) = self.wait_used();
        (self.get(st, 1)[0], len)
    }

    /// Raw descriptors at indexes 40.. (head 40); returns (status byte, used id, used len).
    /// Writes raw descriptors at indexes 40.. (head 40), makes them available and kicks.
    pub fn submit_raw(&mut self, descs: &[Descriptor]) {
        let list: Vec<(u16, Descriptor)> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| (i as u16 + 40, *d))
            .collect();
        self.g.add_raw(&list, 40);
        let _ = self.kick.write(1);
    }

    pub fn raw(&mut self, descs: &[Descriptor], status_gpa: u64) -> (u8, u32, u32) {
        self.put(status_gpa, &[0xff]);
        self.submit_raw(descs);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some((id, len)) = self.g.pop_used_raw() {
                return (self.get(status_gpa, 1)[0], id, len);
            }
            assert!(
                Instant::now() < deadline,
                "no completion for a hostile chain within 5 s"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

pub fn d(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, next)
}
