//! vhost-user device plumbing, knowing nothing of any device type: the protocol handler
//! (features, memory table, vrings, inflight fds, start and stop), guest memory, the device
//! side of split virtqueues (and of packed ones, [`packed`], offered only to a device type
//! that asks for VIRTIO_F_RING_PACKED), the descriptor-chain walker, the inflight region,
//! and the poller
//! threads that run queues. A device type (`vfblk-bridge` has one) plugs in
//! through [`device::Device`] and [`device::RequestHandler`].
//!
//! The data path, top to bottom: [`virtq`] (avail ring) → [`chain`] (descriptors checked
//! against [`memory`]) → [`inflight`] (recorded) → the device's [`device::RequestHandler`] →
//! completion → used ring, one round per queue per loop in [`ring`], driven by a
//! [`poller`]. [`protocol`] and [`server`] set queues
//! up from the frontend's messages; [`driver`] and [`mock`] are the guest's side.

#![deny(missing_docs)]

pub mod backend_channel;
pub mod chain;
pub mod device;
pub mod dirty_log;
pub mod driver;
#[cfg(feature = "test-faults")]
mod faults;
pub mod fd_store;
mod framing;
pub mod guest_errors;
pub mod handover;
pub mod inflight;
pub mod inflight_packed;
pub mod memory;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod packed;
pub mod packed_driver;
pub mod poller;
pub mod protocol;
pub mod ring;
pub mod server;
pub mod sigbus;
pub mod signals;
pub mod stored_connection;
pub mod virtq;

/// Errors of the vhost-user plumbing; each variant is one cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A queue size virtio does not allow.
    #[error("queue size {0} is not a power of two up to 32768")]
    QueueSize(u16),
    /// Ring addresses without the alignment virtio requires.
    #[error("misaligned rings: descriptors {desc:#x}, avail {avail:#x}, used {used:#x}")]
    MisalignedRings {
        /// Descriptor table address.
        desc: u64,
        /// Avail ring address.
        avail: u64,
        /// Used ring address.
        used: u64,
    },
    /// A ring that does not lie inside guest memory.
    #[error("{ring} ring at {addr:#x} ({len} bytes) is outside guest memory")]
    RingOutsideMemory {
        /// Which ring.
        ring: &'static str,
        /// Frontend address.
        addr: u64,
        /// Bytes it needs.
        len: usize,
    },
    /// The driver claims more available buffers than the ring holds.
    #[error("avail index {avail} is more than {size} ahead of {next}")]
    AvailIndexAhead {
        /// The driver's avail index.
        avail: u16,
        /// Our next avail position.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// The avail ring names a head outside the descriptor table.
    #[error("avail ring names head {head} of a {size}-entry table")]
    HeadOutOfRange {
        /// The head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A packed ring chain with NEXT on every descriptor of a whole lap.
    #[error("packed ring: the chain at {start} does not end within the {size}-entry ring")]
    PackedChainUnterminated {
        /// Ring index of its first descriptor.
        start: u16,
        /// Queue size.
        size: u16,
    },
    /// A packed ring chain whose buffer id is already in flight.
    #[error("packed ring: buffer id {id} made available while it is in flight")]
    BufferIdInFlight {
        /// The id.
        id: u16,
    },
    /// A packed ring base (SET_VRING_BASE) naming an index outside the ring.
    #[error("packed ring base {base:#x} names an index outside a {size}-entry ring")]
    PackedBase {
        /// The value received.
        base: u32,
        /// Queue size.
        size: u16,
    },
    /// The used ring returned an id that is not a chain head in flight (driver side).
    #[error("used ring returned id {0}, which is not a head in flight")]
    NotAHead(u32),
    /// A memory table with no region, too many, or a different number of fds.
    #[error("memory table with {regions} regions and {fds} fds (1 to {max} regions, one fd each)")]
    MemoryTableShape {
        /// Regions described.
        regions: usize,
        /// Fds received.
        fds: usize,
        /// Most regions accepted.
        max: usize,
    },
    /// A region that is empty, wraps around, or overlaps another.
    #[error("region at guest address {guest_phys:#x} of {size:#x} bytes: {why}")]
    BadRegion {
        /// Guest-physical start.
        guest_phys: u64,
        /// Length.
        size: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// REM_MEM_REG for a region we do not have.
    #[error("no region at guest address {guest_phys:#x} of {size:#x} bytes")]
    NoSuchRegion {
        /// Guest-physical start.
        guest_phys: u64,
        /// Length.
        size: u64,
    },
    /// An inflight-region request we cannot serve.
    #[error("inflight region: {num_queues} queue(s) of {queue_size} in {mmap_size} bytes")]
    BadInflight {
        /// Queues described.
        num_queues: u16,
        /// Queue size described.
        queue_size: u16,
        /// Bytes of the mapping.
        mmap_size: u64,
    },
    /// A queue whose size differs from the inflight region's.
    #[error("queue {queue}: size {size} differs from the inflight region's {inflight}")]
    InflightQueueSize {
        /// Queue index.
        queue: u16,
        /// Its vring size.
        size: u16,
        /// The inflight region's queue size.
        inflight: u16,
    },
    /// An OS call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The vhost-user transport failed (listening, accepting).
    #[error("{what}")]
    Transport {
        /// What was being done.
        what: String,
        /// What the vhost crate said.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The device type refused or failed (a backend's error, with its cause).
    #[error("device")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Another user holds the device's storage (another process writes its image): a
    /// queue cannot start now. The connection is closed rather than left with a stopped
    /// queue, so that a reconnecting frontend tries again and is served once that user
    /// lets go.
    #[error("the storage is busy")]
    StorageBusy(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A config-space write where nothing is writable.
    #[error("config space offset {offset} is not writable")]
    ReadOnlyConfig {
        /// Where the driver wrote.
        offset: u32,
    },
    /// A poller did not answer a stop within its deadline.
    #[error("a poller did not answer within {waited:?}")]
    PollerStuck {
        /// How long we waited.
        waited: std::time::Duration,
    },
    /// The other process of a hand-over sent something malformed or inconsistent.
    #[error("hand-over: {0}")]
    HandoverMessage(String),
    /// A hand-over this binary cannot continue (the state does not fit its device).
    #[error("hand-over refused: {0}")]
    HandoverIncompatible(String),
    /// A queue stopped for a hand-over with requests the backend did not finish in time.
    #[error("queue {queue}: {count} request(s) still in the backend")]
    RequestsStillInFlight {
        /// Queue index.
        queue: u16,
        /// Requests not finished.
        count: usize,
    },
    /// The other process of a hand-over did not answer in time.
    #[error("hand-over: no {waiting_for} in time")]
    HandoverTimeout {
        /// The message or event awaited.
        waiting_for: &'static str,
    },
    /// The other process of a hand-over went away.
    #[error("hand-over: the other process closed the channel before {waiting_for}")]
    HandoverClosed {
        /// The message awaited.
        waiting_for: &'static str,
    },
    /// A dirty log (SET_LOG_BASE) that cannot be used.
    #[error("dirty log of {size} bytes at offset {offset}: {why}")]
    BadLog {
        /// Bytes the frontend gave.
        size: u64,
        /// Offset in its file.
        offset: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A thread panicked while holding a lock; the state it guarded may be half-changed.
    #[error("a lock ({0}) was poisoned by a panicking thread")]
    Poisoned(&'static str),
}

/// Result of the vhost-user plumbing.
pub type Result<T> = std::result::Result<T, Error>;

/// An error with every cause in its chain, `: `-separated (for one log line).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
