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
use vfblk_vhost::driver::DriverBuffer;
use vfblk_vhost::guest_errors::GuestErrors;
use vfblk_vhost::mock::MockGuest;
use vfblk_vhost::packed::{PackedDescriptor, Position, DESC_F_AVAIL, DESC_F_USED};
use vfblk_vhost::packed_driver::{send_packed_vring_base, PackedDriverQueue};
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
    start_server_reporting(name).0
}

/// [`start_server`], and the device's count of what its guests got wrong.
pub fn start_server_reporting(name: &str) -> (PathBuf, Arc<GuestErrors>) {
    let dir = std::env::temp_dir().join(format!("vfblk-devtest-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let config = device_config(&dir, 2);
    let errors = config.errors.clone();
    // Serves until the test process ends.
    std::mem::forget(vfblk_vhost::server::SocketServer::start(&socket, config).unwrap());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    (socket, errors)
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

/// What a test does with a guest, whichever ring layout it drives: its memory, and whole
/// requests.
pub trait TestGuest {
    fn mock(&self) -> &MockGuest;
    fn kick(&self) -> &EventFd;
    /// The next used buffer, if the device returned one: (id, bytes written).
    fn pop_used(&mut self) -> Option<(u16, u32)>;
    /// Makes a chain of (guest address, length, device-writable) buffers available.
    fn add_chain(&mut self, buffers: &[(u64, u32, bool)]);

    /// Kicks, then waits up to 5 s for the next used buffer.
    fn wait_used(&mut self) -> (u16, u32) {
        let _ = self.kick().write(1);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(u) = self.pop_used() {
                return u;
            }
            assert!(Instant::now() < deadline, "no completion within 5 s");
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// A well-formed request: header, optional data, status. Returns (status, used len).
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u32, bool)>) -> (u8, u32) {
        let (hdr, dat, st) = (BUF, BUF + 4096, BUF + 64 * 4096);
        self.header(hdr, kind, sector);
        self.put(st, &[0xff]);
        let mut chain = vec![(hdr, 16, false)];
        if let Some((len, write)) = data {
            chain.push((dat, len, write));
        }
        chain.push((st, 1, true));
        self.add_chain(&chain);
        let (_, len) = self.wait_used();
        (self.get(st, 1)[0], len)
    }

    fn put(&self, gpa: u64, data: &[u8]) {
        self.mock().write(gpa, data);
    }

    fn get(&self, gpa: u64, len: usize) -> Vec<u8> {
        self.mock().read(gpa, len)
    }

    /// A virtio-blk request header at `gpa`.
    fn header(&self, gpa: u64, kind: u32, sector: u64) {
        let h = RequestHeader {
            kind,
            ioprio: 0,
            sector,
        };
        self.put(gpa, &h.to_bytes());
    }
}

impl TestGuest for Guest {
    fn mock(&self) -> &MockGuest {
        &self.g
    }
    fn kick(&self) -> &EventFd {
        &self.kick
    }
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        self.g.pop_used()
    }
    fn add_chain(&mut self, buffers: &[(u64, u32, bool)]) {
        self.g.add_chain(buffers);
    }
}

impl TestGuest for PackedGuest {
    fn mock(&self) -> &MockGuest {
        &self.g
    }
    fn kick(&self) -> &EventFd {
        &self.kick
    }
    fn pop_used(&mut self) -> Option<(u16, u32)> {
        self.ring
            .pop_used()
            .expect("used ids the driver handed out")
    }
    fn add_chain(&mut self, buffers: &[(u64, u32, bool)]) {
        let chain: Vec<DriverBuffer> = buffers
            .iter()
            .map(|&(gpa, len, write)| DriverBuffer { gpa, len, write })
            .collect();
        self.ring.add(&chain).expect("room in the ring");
    }
}

/// A guest driving packed rings, connected as QEMU does with `packed=on`: RING_PACKED acked,
/// an inflight region asked for (the device serves packed rings only with one), queue 0's
/// descriptor ring and event structures placed in guest memory above the split rings the
/// test kit lays out (unused here).
pub struct PackedGuest {
    pub fe: Frontend,
    /// A clone of the frontend's socket, for the messages the vhost crate cannot send (a
    /// 32-bit packed SET_VRING_BASE).
    pub sock: UnixStream,
    pub g: MockGuest,
    pub ring: PackedDriverQueue,
    pub kick: EventFd,
    pub _call: EventFd,
    /// The inflight region the device laid out (the frontend's copy).
    pub inflight: std::fs::File,
    /// Keeps the memory `ring` points into mapped, whatever becomes of `g`.
    _ring_memory: Arc<vfblk_vhost::memory::GuestMemory>,
}

impl PackedGuest {
    /// Negotiates up to the ring's size: features with RING_PACKED, memory, inflight region.
    /// The ring starts at [`PackedGuest::start`].
    pub fn negotiate(socket: &PathBuf, mut g: MockGuest) -> PackedGuest {
        let stream = UnixStream::connect(socket).unwrap();
        let sock = stream.try_clone().unwrap();
        let mut fe = Frontend::from_stream(stream, 2);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        let packed = 1u64 << vfblk_vhost::packed::VIRTIO_F_RING_PACKED;
        assert_ne!(offered & packed, 0, "the device offers packed rings");
        fe.set_features(acked(offered) | packed).unwrap();
        let protocol = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(protocol).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: g.frontend_base(),
            mmap_offset: 0,
            mmap_handle: g.file().as_raw_fd(),
        };
        fe.set_mem_table(&[region]).unwrap();
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: QSIZE,
        };
        let (info, inflight) = fe.get_inflight_fd(&ask).unwrap();
        fe.set_inflight_fd(&info, inflight.as_raw_fd()).unwrap();
        fe.set_vring_num(0, QSIZE).unwrap();
        let bytes = PackedDriverQueue::bytes(QSIZE) as u64;
        let gpa = g.alloc(bytes);
        let ring_memory = g.memory();
        let host = ring_memory.translate(gpa, bytes).unwrap();
        // SAFETY: `alloc` zeroed these bytes, 16-aligned, inside the guest's memory, which
        // `_ring_memory` keeps mapped as long as the queue lives; nothing else is placed
        // there.
        let ring = unsafe { PackedDriverQueue::new(host, gpa, QSIZE) };
        PackedGuest {
            fe,
            sock,
            g,
            ring,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            _call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            inflight,
            _ring_memory: ring_memory,
        }
    }

    /// Frontend addresses of the descriptor ring and the driver and device event structures
    /// (SET_VRING_ADDR's desc, avail and used addresses).
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        let (d, drv, dev) = self.ring.gpas;
        let base = self.g.frontend_base();
        (base + d, base + drv, base + dev)
    }

    /// Starts queue 0 from `base` (a packed SET_VRING_BASE value) with its areas at these
    /// frontend addresses; returns whether the frontend could send it all.
    pub fn start_at(&mut self, base: u32, (desc, driver, device): (u64, u64, u64)) -> bool {
        let cfg = VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: device,
            avail_ring_addr: driver,
            log_addr: None,
        };
        send_packed_vring_base(&self.sock, 0, base).is_ok()
            && self.fe.set_vring_addr(0, &cfg).is_ok()
            && self.fe.set_vring_kick(0, &self.kick).is_ok()
            && self.fe.set_vring_call(0, &self._call).is_ok()
    }

    /// Connects and starts queue 0 where both sides start.
    pub fn connect(socket: &PathBuf) -> PackedGuest {
        Self::connect_to(socket, MockGuest::new(MEM as u64, QSIZE))
    }

    pub fn connect_to(socket: &PathBuf, g: MockGuest) -> PackedGuest {
        let mut pg = Self::negotiate(socket, g);
        let start = u32::from(Position::START.to_event()) * 0x1_0001;
        let addrs = pg.ring_addresses();
        assert!(pg.start_at(start, addrs), "queue 0 started");
        pg
    }

    /// Makes `descriptors` available as given (ids and flags but AVAIL/USED untouched) and
    /// kicks.
    pub fn submit_raw(&mut self, descriptors: &[PackedDescriptor]) {
        self.ring.add_raw(descriptors);
        let _ = self.kick.write(1);
    }

    /// The used descriptor the device wrote at ring index `index` in the first lap, if it
    /// wrote one: (buffer id, bytes written). Reads the ring itself, trusting no id.
    pub fn used_at(&self, index: u16) -> Option<(u16, u32)> {
        let gpa = self.ring.gpas.0 + 16 * u64::from(index);
        let raw = self.get(gpa, 16);
        let flags = u16::from_le_bytes([raw[14], raw[15]]);
        let both = DESC_F_AVAIL | DESC_F_USED;
        (flags & both == both).then(|| {
            (
                u16::from_le_bytes([raw[12], raw[13]]),
                u32::from_le_bytes(raw[8..12].try_into().unwrap()),
            )
        })
    }
}

/// A packed descriptor (the wrap bits are the ring's business).
pub fn pd(addr: u64, len: u32, id: u16, flags: u16) -> PackedDescriptor {
    PackedDescriptor::new(addr, len, id, flags)
}
