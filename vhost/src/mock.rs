//! The guest test kit: a guest in a memfd that builds chains on a driver-side virtqueue (direct
//! and indirect descriptors, or raw descriptors for hostile cases), so the device side — ring,
//! chain walker, inflight recovery, a device type's request parsing and backends — is tested
//! in-process, without a socket or a VM. Enabled by the `test-utils` feature.

use std::sync::Arc;

use crate::chain::{Chain, ChainError};
use crate::driver::{DriverBuffer, DriverQueue};
use crate::memory::{memfd, GuestMemory};
use crate::virtq::{Descriptor, DeviceQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

/// Where the frontend (the VMM) "maps" guest memory: distinct from guest-physical addresses
/// so that code mixing the two up fails.
pub const FRONTEND_BASE: u64 = 0x7f00_0000_0000;

/// A guest: one memory region at guest-physical 0 and one virtqueue whose rings sit at the
/// start of it; buffers are handed out above the rings.
pub struct MockGuest {
    file: std::fs::File,
    frontend_base: u64,
    mem: Arc<GuestMemory>,
    host: *mut u8,
    len: u64,
    queue: DriverQueue,
    next_free: u64,
    first_free: u64,
}

impl MockGuest {
    /// A guest with `mem_bytes` of memory and a `queue_size`-entry queue.
    ///
    /// Panics when the memfd cannot be made or the rings do not fit: a test set-up error.
    pub fn new(mem_bytes: u64, queue_size: u16) -> Self {
        let file = memfd("vfblk-mock-guest", mem_bytes).expect("memfd for the mock guest");
        Self::with_file(file, mem_bytes, queue_size)
    }

    /// A guest whose memory is a memfd that cannot be sealed (as a frontend that did not ask
    /// for MFD_ALLOW_SEALING hands over): the device cannot stop it from shrinking.
    pub fn new_unsealable(mem_bytes: u64, queue_size: u16) -> Self {
        let file =
            vfblk_hugepages::memfd("vfblk-mock-guest-unsealable", libc::MFD_CLOEXEC, mem_bytes)
                .expect("memfd for the mock guest");
        Self::with_file(file, mem_bytes, queue_size)
    }

    fn with_file(file: std::fs::File, mem_bytes: u64, queue_size: u16) -> Self {
        Self::with_file_at(file, mem_bytes, queue_size, FRONTEND_BASE)
    }

    /// A guest whose memory the frontend "maps" at `frontend_base` (0 puts the descriptor
    /// table at frontend address 0, which is valid).
    pub fn new_at(mem_bytes: u64, queue_size: u16, frontend_base: u64) -> Self {
        let file = memfd("vfblk-mock-guest", mem_bytes).expect("memfd for the mock guest");
        Self::with_file_at(file, mem_bytes, queue_size, frontend_base)
    }

    fn with_file_at(
        file: std::fs::File,
        mem_bytes: u64,
        queue_size: u16,
        frontend_base: u64,
    ) -> Self {
        let shared = file
            .try_clone()
            .expect("a second fd for the guest's memory");
        let mem = GuestMemory::from_table(&[(0, mem_bytes, frontend_base, 0)], vec![shared])
            .expect("mapping the mock guest's memory");
        let host = mem.translate(0, mem_bytes).expect("the whole region");
        let rings = DriverQueue::bytes(queue_size) as u64;
        assert!(rings < mem_bytes, "the rings fit guest memory");
        // SAFETY: the region holds the rings' bytes, zeroed (fresh memfd), mapped while
        // `mem` lives, which the guest keeps.
        let queue = unsafe { DriverQueue::new(host, 0, queue_size) };
        let first_free = rings.div_ceil(4096) * 4096;
        Self {
            file,
            frontend_base,
            mem: Arc::new(mem),
            host,
            len: mem_bytes,
            queue,
            next_free: first_free,
            first_free,
        }
    }

    /// The memfd holding guest memory (what a frontend sends in SET_MEM_TABLE, with
    /// [`MockGuest::frontend_base`] as its userspace address).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Where the frontend "maps" guest memory (the region's userspace address).
    pub fn frontend_base(&self) -> u64 {
        self.frontend_base
    }

    /// The guest's memory as the device sees it.
    pub fn memory(&self) -> Arc<GuestMemory> {
        self.mem.clone()
    }

    /// Frontend addresses of the descriptor table, avail ring and used ring (what
    /// SET_VRING_ADDR carries).
    pub fn ring_addresses(&self) -> (u64, u64, u64) {
        let (d, a, u) = self.queue.gpas;
        let base = self.frontend_base;
        (base + d, base + a, base + u)
    }

    /// The device side of the guest's queue.
    pub fn device_queue(&self, event_idx: bool) -> DeviceQueue {
        let (d, a, u) = self.ring_addresses();
        DeviceQueue::new(&self.mem, self.queue.size(), d, a, u, event_idx)
            .expect("the mock guest's rings are valid")
    }

    /// The driver-side queue (to inspect or corrupt it).
    pub fn driver(&mut self) -> &mut DriverQueue {
        &mut self.queue
    }

    /// Bytes of guest memory.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the guest has no memory (never: a guest has at least its rings).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A 16-byte aligned buffer of `len` bytes, zeroed; returns its guest-physical address.
    /// Allocation wraps around to the first free byte when memory runs out.
    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.next_free + len > self.len {
            self.next_free = self.first_free;
        }
        let gpa = self.next_free;
        assert!(
            gpa + len <= self.len,
            "buffer of {len} bytes fits guest memory"
        );
        self.next_free = (gpa + len).div_ceil(16) * 16;
        self.fill(gpa, len, 0);
        gpa
    }

    fn at(&self, gpa: u64, len: u64) -> *mut u8 {
        assert!(
            gpa.checked_add(len).is_some_and(|e| e <= self.len),
            "{len} bytes at {gpa:#x} lie in guest memory"
        );
        // SAFETY: inside the mapping (checked above).
        unsafe { self.host.add(gpa as usize) }
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.at(gpa, data.len() as u64);
        // SAFETY: `at` checked the range; the test owns guest memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.at(gpa, len as u64);
        let mut out = vec![0u8; len];
        // SAFETY: `at` checked the range.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        out
    }

    /// Sets `len` bytes at `gpa` to `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) {
        let p = self.at(gpa, len);
        // SAFETY: `at` checked the range.
        unsafe { std::ptr::write_bytes(p, byte, len as usize) };
    }

    /// Makes a chain of direct descriptors for (gpa, len, device-writable) buffers
    /// available; returns its head.
    pub fn add_chain(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let list: Vec<DriverBuffer> = buffers
            .iter()
            .map(|&(gpa, len, write)| DriverBuffer { gpa, len, write })
            .collect();
        self.queue
            .add(&list)
            .expect("free descriptors for the chain")
    }

    /// Writes `descriptors` as a table in guest memory; returns its address.
    pub fn write_table(&mut self, descriptors: &[Descriptor]) -> u64 {
        let gpa = self.alloc(16 * descriptors.len() as u64);
        for (i, d) in descriptors.iter().enumerate() {
            self.write(gpa + 16 * i as u64, &d.to_le_bytes());
        }
        gpa
    }

    /// Makes a chain available whose buffers are in an indirect table (one main-table
    /// descriptor); returns its head.
    pub fn add_indirect(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let n = buffers.len();
        let table: Vec<Descriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| Descriptor {
                addr,
                len,
                flags: if write { DESC_F_WRITE } else { 0 }
                    | if i + 1 < n { DESC_F_NEXT } else { 0 },
                next: if i + 1 < n { i as u16 + 1 } else { 0 },
            })
            .collect();
        let gpa = self.write_table(&table);
        self.queue
            .add_descriptor(Descriptor {
                addr: gpa,
                len: 16 * n as u32,
                flags: DESC_F_INDIRECT,
                next: 0,
            })
            .expect("a free descriptor for the indirect table")
    }

    /// Writes raw descriptors at the given main-table indexes and makes `head` available.
    /// Nothing is checked: for hostile chains (read the answer with [`Self::pop_used_raw`]).
    pub fn add_raw(&mut self, descriptors: &[(u16, Descriptor)], head: u16) {
        self.queue.add_raw(descriptors, head);
    }

    /// The device's view of the ring and the head of the chain made available last (nothing
    /// is taken from the ring for good): a [`crate::chain::ChainCursor`] walks it.
    pub fn newest(&self) -> (DeviceQueue, u16) {
        let mut vq = self.device_queue(false);
        vq.next_avail = vq.avail_idx().wrapping_sub(1);
        let head = vq
            .pop()
            .expect("a well-formed avail ring")
            .expect("a chain was made available");
        (vq, head)
    }

    /// Walks the chain made available last, as the device would (the test then owns the
    /// walked buffers; nothing is returned to the used ring).
    pub fn walk_newest(&self) -> Result<Chain, ChainError> {
        let (vq, head) = self.newest();
        let mut chain = Chain::default();
        chain.walk(&vq, &self.mem, head)?;
        Ok(chain)
    }

    /// Sets the avail index as a misbehaving driver would.
    pub fn set_avail_idx(&mut self, idx: u16) {
        let (_, avail, _) = self.queue.raw();
        // SAFETY: the avail index word at offset 2 of the avail ring, inside guest memory.
        unsafe { (avail.add(2) as *mut u16).write_volatile(idx) };
    }

    /// The next used element of a chain made with `add_chain`/`add_indirect`: (head,
    /// written). Panics when the device returns something that is not a head in flight.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        self.queue
            .pop_used()
            .expect("the device returned a head in flight")
    }

    /// The next used element, unchecked: (id, written).
    pub fn pop_used_raw(&mut self) -> Option<(u32, u32)> {
        self.queue.pop_used_raw()
    }
}
