//! The vhost-user protocol handler: one [`Connection`] per frontend, implementing the vhost
//! crate's backend request handler. It negotiates features, maps guest memory and the
//! inflight region, and starts each virtqueue on a poller thread once its kick fd arrives,
//! recovering in-flight requests from the inflight region first. What the queues carry is
//! the [`Device`]'s business.

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult, VhostUserBackendReqHandlerMut};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::backend_channel::{BackendChannel, ChannelError};
use crate::device::{Device, QueueSetup};
use crate::dirty_log::DirtyLog;
use crate::error_chain;
use crate::guest_errors::GuestErrors;
use crate::handover::{ConnectionState, Fds, InflightState, LogState, RegionState, VringState};
use crate::inflight::{region_size, InflightMap};
use crate::inflight_packed::region_size as packed_region_size;
use crate::memory::{GuestMemory, MAX_MEM_SLOTS};
use crate::packed::{PackedQueue, VIRTIO_F_RING_PACKED};
use crate::poller::{Poller, QueueStart};
use crate::ring::{RingInflight, RingLog, RingQueue};
use crate::virtq::{DeviceQueue, MAX_QUEUE_SIZE};

/// Settings shared by every connection of one device.
pub struct DeviceConfig {
    /// Virtqueues offered.
    pub num_queues: u16,
    /// Offer INFLIGHT_SHMFD (off only to show what goes wrong without it).
    pub inflight: bool,
    /// The device type.
    pub device: Arc<dyn Device>,
    /// Poller threads this device's queues may run on (shared with other devices); each
    /// queue goes to the least loaded one when it starts.
    pub pollers: Vec<Arc<Poller>>,
    /// Where guest-triggered errors of this device are reported.
    pub errors: Arc<GuestErrors>,
    /// Keep each connection's fds and state in an fd store, so that a successor of a
    /// crashed process resumes it without a reconnect.
    pub fd_store: Option<crate::fd_store::DeviceStore>,
    /// Mark the data the device writes into guest buffers in a migration's dirty log (off
    /// only in tests that show what goes wrong without it: the log is offered and taken,
    /// and only the rings and status bytes are marked).
    pub dirty_log_marks: bool,
}

#[derive(Default)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// SET_VRING_ADDR arrived (address 0 is a valid frontend address).
    addresses_set: bool,
    /// SET_VRING_BASE's value: a split ring's next avail index (low 16 bits), or a packed
    /// ring's positions ([`PackedQueue::base`]).
    base: u32,
    kick: Option<File>,
    /// SET_VRING_KICK arrived, with an fd or with NOFD (then the ring is polled).
    kick_set: bool,
    call: Option<File>,
    /// The poller running it, while started.
    poller: Option<Arc<Poller>>,
    started: bool,
    /// SET_VRING_ENABLE(0): paused until enabled again.
    disabled: bool,
    /// Came with a connection resumed from a predecessor, not yet started since: a region of
    /// the target's own knows where the ring stands. Any ring message of the frontend ends it.
    resumed: bool,
    /// The used ring's guest-physical address, when SET_VRING_ADDR asked for used-ring
    /// logging (VHOST_VRING_F_LOG).
    log_guest_addr: Option<u64>,
}

/// One connection's state.
pub struct Connection {
    /// Unique in the process: names this connection's queues on shared pollers.
    id: u64,
    config: Arc<DeviceConfig>,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    mem: Option<Arc<GuestMemory>>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightMap>>,
    /// `inflight` is the target's own region (the frontend gave none), kept in the fd store
    /// so that a successor after a crash finds the requests taken and unfinished.
    own_inflight: bool,
    /// The virtio device status (SET_STATUS / GET_STATUS).
    status: u8,
    /// A migration's dirty log (SET_LOG_BASE); written while VHOST_F_LOG_ALL is set.
    log: Option<Arc<DirtyLog>>,
    /// The backend request channel (SET_BACKEND_REQ_FD), where config changes are told.
    backend_channel: Option<Arc<BackendChannel>>,
    /// Set when a queue could not start because another user holds the storage: the
    /// serving thread closes the connection ([`Connection::take_storage_busy`]).
    storage_busy: Option<String>,
}

/// A queue size virtio allows: a power of two, 1 to [`MAX_QUEUE_SIZE`].
fn valid_queue_size(size: u32) -> bool {
    size != 0 && size <= u32::from(MAX_QUEUE_SIZE) && size.is_power_of_two()
}

fn invalid(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

fn bad_param<E: std::error::Error>(e: E) -> VuError {
    tracing::warn!("vhost-user: refused: {}", error_chain(&e));
    VuError::InvalidParam
}

/// A ring about to start: its layout, its inflight region, and the heads to run again.
type StartingRing = (
    RingQueue,
    Option<(RingInflight, Arc<InflightMap>)>,
    Vec<u16>,
);

impl Connection {
    /// A device for a new connection.
    pub fn new(config: Arc<DeviceConfig>) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let vrings = (0..config.num_queues).map(|_| Vring::default()).collect();
        Self {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            config,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            mem: None,
            vrings,
            inflight: None,
            own_inflight: false,
            status: 0,
            log: None,
            backend_channel: None,
            storage_busy: None,
        }
    }

    /// Feature bits we offer: the ring features and the device type's.
    pub fn offered_features(config: &DeviceConfig) -> u64 {
        ((1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | config.device.features())
            & Self::servable(config)
    }

    /// Feature bits a frontend may have acked ([`Device::accepted_features`]): checked at
    /// SET_FEATURES and when a connection is handed over or resumed.
    pub fn accepted_features(config: &DeviceConfig) -> u64 {
        (Self::offered_features(config) | config.device.accepted_features())
            & Self::servable(config)
    }

    /// The feature bits this configuration can serve, whatever the device offers: a packed
    /// ring is resumed (after a reconnect) and logged (for a migration) only from an
    /// inflight region (its used descriptors overwrite the slots of chains still in flight,
    /// so a base alone cannot say what to run again), so without inflight tracking it is
    /// neither offered nor accepted.
    fn servable(config: &DeviceConfig) -> u64 {
        if config.inflight {
            !0
        } else {
            !(1 << VIRTIO_F_RING_PACKED)
        }
    }

    /// Protocol features we offer.
    pub fn offered_protocol(config: &DeviceConfig) -> VhostUserProtocolFeatures {
        let mut p = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::STATUS
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ;
        if config.inflight {
            p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        p
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    /// Whether the rings are packed (VIRTIO_F_RING_PACKED negotiated).
    fn packed(&self) -> bool {
        self.features & (1 << VIRTIO_F_RING_PACKED) != 0
    }

    /// Bytes of one queue's inflight region for `queue_size` entries, in the layout of the
    /// negotiated rings.
    fn inflight_region_size(&self, queue_size: u16) -> usize {
        if self.packed() {
            packed_region_size(queue_size)
        } else {
            region_size(queue_size)
        }
    }

    /// Bytes of the area a frontend's `log_guest_addr` names: a split ring's used ring, a
    /// packed ring's device event area.
    fn used_area_len(&self, size: u16) -> u64 {
        if self.packed() {
            crate::packed::EVENT_BYTES as u64
        } else {
            crate::virtq::ring_sizes(size).2 as u64
        }
    }

    /// Whether the frontend asked for logging (VHOST_F_LOG_ALL).
    fn log_all(&self) -> bool {
        self.features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0
    }

    /// How queue `index` logs now: `Ok(None)` when no migration logs. The used ring's address
    /// is the frontend's `log_guest_addr`, or, without one, the used ring's own, and its
    /// whole ring must lie in guest memory: the log is only written where the guest has RAM.
    fn ring_log(&self, index: u16) -> crate::Result<Option<RingLog>> {
        let (Some(log), true) = (&self.log, self.log_all()) else {
            return Ok(None);
        };
        let v = &self.vrings[usize::from(index)];
        let Some(mem) = &self.mem else {
            return Ok(None);
        };
        let used_len = self.used_area_len(v.size);
        let used_gpa = match v.log_guest_addr {
            Some(gpa) => gpa,
            None => mem
                .frontend_to_guest(v.used)
                .ok_or(crate::Error::RingOutsideMemory {
                    ring: "used",
                    addr: v.used,
                    len: used_len as usize,
                })?,
        };
        if mem.translate(used_gpa, used_len).is_none() {
            return Err(crate::Error::RingOutsideMemory {
                ring: "logged used",
                addr: used_gpa,
                len: used_len as usize,
            });
        }
        // A packed ring's used descriptors are written into its descriptor ring.
        let desc_gpa = if self.packed() {
            let len = 16 * u64::from(v.size);
            mem.frontend_to_guest(v.desc)
                .filter(|&gpa| mem.translate(gpa, len).is_some())
                .ok_or(crate::Error::RingOutsideMemory {
                    ring: "logged descriptor",
                    addr: v.desc,
                    len: len as usize,
                })?
        } else {
            0
        };
        Ok(Some(RingLog {
            log: log.clone(),
            used_gpa,
            desc_gpa,
        }))
    }

    /// Logging is asked for and there is no log to write: rings must not run, since
    /// whatever they wrote would be missing from the migration.
    fn log_missing(&self) -> bool {
        self.log_all() && self.log.is_none()
    }

    /// Tells every running queue how to log now, and returns once each does (the frontend
    /// reads the log, or frees an old one, after our reply).
    fn apply_log(&mut self) -> VuResult<()> {
        for index in 0..self.vrings.len() as u16 {
            let v = &self.vrings[usize::from(index)];
            let (true, Some(poller)) = (v.started, v.poller.clone()) else {
                continue;
            };
            let log = self.ring_log(index).map_err(bad_param)?;
            if let Err(e) = poller.set_log(self.id, index, log) {
                tracing::error!("queue {index}: {e}; aborting so that a restart recovers it");
                std::process::abort();
            }
        }
        Ok(())
    }

    /// Starts queue `index` if it has everything it needs (rings, memory, kick).
    fn try_start(&mut self, index: u16) -> VuResult<()> {
        let features = self.features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let v = &self.vrings[usize::from(index)];
        if v.started || v.disabled || !v.kick_set || v.size == 0 || !v.addresses_set {
            return Ok(());
        }
        if self.log_missing() {
            tracing::warn!(
                queue = index,
                "queue {index} waits: the frontend asked for dirty logging (LOG_ALL) and gave no log yet"
            );
            return Ok(());
        }
        let log = self.ring_log(index).map_err(bad_param)?;
        if self.inflight.is_none() && self.config.inflight && self.config.fd_store.is_some() {
            self.create_own_inflight()?;
        }
        let inflight_map = self.inflight.clone();
        let (vq, inflight, resubmit) = if self.packed() {
            self.packed_ring(index, &mem, event_idx, inflight_map)?
        } else {
            self.split_ring(index, &mem, event_idx, inflight_map)?
        };
        let v = &self.vrings[usize::from(index)];
        let poller = Poller::claim_least_loaded(&self.config.pollers)
            .expect("a device has at least one poller");
        let setup = QueueSetup {
            index,
            size: v.size,
            features,
            errors: self.config.errors.clone(),
            poller: poller.id(),
        };
        let handler = match self.config.device.open_queue(&setup) {
            Ok(handler) => handler,
            Err(e) => {
                poller.unclaim();
                if let crate::Error::StorageBusy(_) = e {
                    let why = error_chain(&e);
                    tracing::warn!(queue = index, "queue {index} cannot start: {why}");
                    self.storage_busy = Some(why);
                    return Err(VuError::InvalidParam);
                }
                return Err(bad_param(e));
            }
        };
        if !resubmit.is_empty() {
            self.config.device.requests_recovered(index, resubmit.len());
        }
        let dup = |f: &Option<File>| f.as_ref().and_then(|f| f.try_clone().ok());
        let start = QueueStart {
            owner: self.id,
            index,
            mem,
            vq,
            inflight,
            handler,
            call: dup(&v.call),
            kick: dup(&v.kick),
            errors: self.config.errors.clone(),
            resubmit,
            log,
        };
        let size = v.size;
        poller.start(start);
        tracing::info!(
            queue = index,
            size,
            "queue {index} started with {size} entries on {}",
            poller.name()
        );
        let v = &mut self.vrings[usize::from(index)];
        v.started = true;
        v.resumed = false;
        v.poller = Some(poller);
        Ok(())
    }

    /// Queue `index`'s split ring, recovered from the inflight region when there is one:
    /// the ring, its region, and the heads to run again.
    fn split_ring(
        &self,
        index: u16,
        mem: &GuestMemory,
        event_idx: bool,
        inflight_map: Option<Arc<InflightMap>>,
    ) -> VuResult<StartingRing> {
        let v = &self.vrings[usize::from(index)];
        let mut vq =
            DeviceQueue::new(mem, v.size, v.desc, v.avail, v.used, event_idx).map_err(bad_param)?;
        let used_idx = vq.used_idx();
        vq.next_used = used_idx;
        let (inflight, resubmit) = match inflight_map {
            // The region is laid out for the frontend's configured queue size; firmware may
            // drive the same queue with a smaller ring (SeaBIOS uses 256 whatever
            // `queue-size` says): its heads are a subset of the region's entries.
            Some(map) if v.size <= map.queue_size() => {
                // SAFETY: one InflightQueue per started queue (a queue is started once until
                // stopped); the poller keeps `map` alive beside it.
                let Some(mut q) = (unsafe { map.queue(index) }) else {
                    return Err(bad_param(crate::Error::BadInflight {
                        num_queues: index + 1,
                        queue_size: v.size,
                        mmap_size: 0,
                    }));
                };
                if self.own_inflight && !v.resumed {
                    // Our own region knows better than the frontend only across our own
                    // crash or hand-over; a ring the frontend set up afresh starts from its
                    // base.
                    q.reset();
                }
                let mut rec = q.recover(used_idx);
                let before = rec.resubmit.len();
                rec.resubmit.retain(|&h| h < v.size);
                if rec.resubmit.len() != before {
                    tracing::warn!(
                        "queue {index}: {} in-flight head(s) of a larger ring than the current {}-entry one dropped",
                        before - rec.resubmit.len(),
                        v.size
                    );
                }
                // Requests in flight were taken from the avail ring: continue after them.
                vq.next_avail = used_idx.wrapping_add(rec.resubmit.len() as u16);
                if !rec.fresh {
                    // The driver's avail index beside ours tells a waiting driver (equal) from
                    // a ring with requests not yet taken.
                    let avail_idx = vq.avail_idx();
                    tracing::info!(
                        queue = index,
                        used_idx,
                        avail_idx,
                        resubmit = rec.resubmit.len(),
                        "queue {index}: recovered from the inflight region: used idx {used_idx}, avail idx {avail_idx}, {} request(s) to run again, {} published but not cleared",
                        rec.resubmit.len(),
                        rec.cleared_batch
                    );
                } else {
                    vq.next_avail = v.base as u16;
                }
                (Some((q.into(), map)), rec.resubmit)
            }
            Some(map) => {
                return Err(bad_param(crate::Error::InflightQueueSize {
                    queue: index,
                    size: v.size,
                    inflight: map.queue_size(),
                }));
            }
            None => {
                vq.next_avail = v.base as u16;
                (None, Vec::new())
            }
        };
        Ok((vq.into(), inflight, resubmit))
    }

    /// Queue `index`'s packed ring: SET_VRING_ADDR's three addresses are the descriptor
    /// ring, the driver event area and the device event area, and SET_VRING_BASE's value
    /// holds both positions. With an inflight region (the spec's packed layout), the ring
    /// resumes where the region says: QEMU keeps no packed position of its own to send
    /// after a crash, so the region's used position wins over the frontend's base, and the
    /// chains in flight, which sit between the used and the avail positions (a used
    /// descriptor moves the used position past its whole chain), are run again.
    fn packed_ring(
        &self,
        index: u16,
        mem: &GuestMemory,
        event_idx: bool,
        inflight_map: Option<Arc<InflightMap>>,
    ) -> VuResult<StartingRing> {
        let v = &self.vrings[usize::from(index)];
        let mut vq =
            PackedQueue::new(mem, v.size, v.desc, v.avail, v.used, event_idx).map_err(bad_param)?;
        vq.set_base(v.base).map_err(bad_param)?;
        let Some(map) = inflight_map else {
            return Ok((vq.into(), None, Vec::new()));
        };
        if v.size > map.queue_size() {
            return Err(bad_param(crate::Error::InflightQueueSize {
                queue: index,
                size: v.size,
                inflight: map.queue_size(),
            }));
        }
        // SAFETY: one region queue per started queue (a queue is started once until
        // stopped); the poller keeps `map` alive beside it.
        let Some(mut q) = (unsafe { map.packed_queue(index) }) else {
            return Err(bad_param(crate::Error::BadInflight {
                num_queues: index + 1,
                queue_size: v.size,
                mmap_size: 0,
            }));
        };
        if self.own_inflight && !v.resumed {
            // As for a split ring: a ring the frontend set up afresh starts from its base.
            q.reset();
        }
        let rec = q.recover(&vq, vq.next_used());
        if rec.fresh {
            return Ok((vq.into(), Some((q.into(), map)), Vec::new()));
        }
        // The region is the frontend's too: a used position outside the ring, an id this
        // ring cannot have, or more descriptors in flight than it holds, and it is not
        // this ring's; the queue stays stopped rather than run from a made-up position.
        let taken: u32 = rec.resubmit.iter().map(|c| u32::from(c.count)).sum();
        let fits = rec.resubmit.iter().all(|c| c.id < v.size) && taken <= u32::from(v.size);
        let (Some(used), true) = (rec.used, fits) else {
            return Err(bad_param(crate::Error::BadInflight {
                num_queues: index + 1,
                queue_size: v.size,
                mmap_size: map.source().2,
            }));
        };
        let avail = used.advance(taken as u16, v.size);
        vq.set_base(u32::from(avail.to_event()) | u32::from(used.to_event()) << 16)
            .map_err(bad_param)?;
        if rec.unusable > 0 {
            tracing::warn!(
                queue = index,
                "queue {index}: {} in-flight entr(y/ies) of the inflight region cannot be followed; not run again",
                rec.unusable
            );
        }
        tracing::info!(
            queue = index,
            resubmit = rec.resubmit.len(),
            "queue {index}: packed ring recovered from the inflight region: used at {}, avail at {}, {} request(s) to run again{}",
            used.to_event(),
            avail.to_event(),
            rec.resubmit.len(),
            if rec.committed_batch { ", a published batch committed" } else { "" }
        );
        let ids = rec.resubmit.iter().map(|c| c.id).collect();
        Ok((vq.into(), Some((q.into(), map)), ids))
    }

    /// A region of our own for a frontend that gave none (libblkio, QEMU's libblkio-based
    /// driver): laid out as the spec's (so recovery is the same code), as large as the
    /// largest ring allowed, and kept in the fd store and the hand-over with the
    /// connection's other fds. Costs a sparse memfd; a plain restart closes the connection
    /// as before (nobody kept the region).
    fn create_own_inflight(&mut self) -> VuResult<()> {
        let (n, qs) = (self.config.num_queues, MAX_QUEUE_SIZE);
        let size = u64::from(n) * self.inflight_region_size(qs) as u64;
        let file = crate::memory::memfd("vfblk-own-inflight", size).map_err(|source| {
            bad_param(crate::Error::Io {
                what: format!("memfd for an inflight region of our own ({size} bytes)"),
                source,
            })
        })?;
        self.inflight = Some(Arc::new(
            InflightMap::map(file, 0, size, qs).map_err(bad_param)?,
        ));
        self.own_inflight = true;
        tracing::info!(
            "the frontend gave no inflight region: requests are recorded in one of our own, kept with the connection"
        );
        Ok(())
    }

    /// Stops queue `index` on its poller. A poller that does not answer in time is stuck with
    /// guest memory mapped and requests of unknown fate: nothing in this process can repair
    /// that safely, so the process ends and its supervisor's restart recovers the requests
    /// from the inflight region.
    fn stop_on_poller(&mut self, index: u16, publish: bool) -> Vec<crate::poller::QueueStopped> {
        let Some(poller) = self.vrings[usize::from(index)].poller.take() else {
            return Vec::new();
        };
        match poller.stop(self.id, Some(index), publish) {
            Ok(stopped) => stopped,
            Err(e) => {
                tracing::error!("queue {index}: {e}; aborting so that a restart recovers it");
                std::process::abort();
            }
        }
    }

    fn stop_queue(&mut self, index: u16) -> u32 {
        self.stop_queue_counting(index).0
    }

    /// Stops queue `index` after completing and publishing what is in flight; returns the
    /// ring's base (GET_VRING_BASE's value) and how many requests the backend did not
    /// finish in time.
    fn stop_queue_counting(&mut self, index: u16) -> (u32, usize) {
        let v = &self.vrings[usize::from(index)];
        if !v.started {
            return (v.base, 0);
        }
        let stopped = self.stop_on_poller(index, true);
        self.vrings[usize::from(index)].started = false;
        let base = stopped.first().map(|s| s.base).unwrap_or(0);
        self.vrings[usize::from(index)].base = base;
        (base, stopped.iter().map(|s| s.abandoned).sum())
    }

    /// Switches to a new memory table: running queues stop (publishing what completes), the
    /// device sees the new table, and the queues start again on it.
    fn replace_memory(&mut self, mem: GuestMemory) -> VuResult<()> {
        if let (Some(log), true) = (&self.log, self.log_all()) {
            // QEMU grows its log before it grows the memory table.
            if !log.covers(mem.end()) {
                let (_, offset, size) = log.source();
                return Err(bad_param(crate::Error::BadLog {
                    size,
                    offset,
                    why: format!("too small for the new memory table up to {:#x}", mem.end()),
                }));
            }
        }
        if self.mem.as_deref().is_some_and(|old| old.same_as(&mem)) {
            tracing::debug!("the same memory table again: queues keep running");
            return Ok(());
        }
        let running: Vec<u16> = (0..self.vrings.len() as u16)
            .filter(|&i| self.vrings[usize::from(i)].started)
            .collect();
        for &i in &running {
            self.stop_queue(i);
        }
        let mem = Arc::new(mem);
        self.config
            .device
            .guest_memory_changed(Some(&mem))
            .map_err(bad_param)?;
        self.mem = Some(mem);
        for i in running {
            self.start_or_refuse(i);
        }
        Ok(())
    }

    /// Starts queue `index` if it can be; if it cannot, says so once and leaves it stopped
    /// while the connection stays up. Failing the message instead would close the
    /// connection, and a reconnecting frontend would meet the same failure again, forever.
    fn start_or_refuse(&mut self, index: u16) {
        if let Err(e) = self.try_start(index) {
            if self.storage_busy.is_some() {
                // Said already; the serving thread closes the connection.
                return;
            }
            tracing::error!(
                queue = index,
                "queue {index} cannot start ({e}); it stays stopped and the connection stays open"
            );
        }
    }

    /// The connection is gone: stop every queue, letting the device finish, publishing
    /// nothing more. What was in flight stays in the inflight region for the next connection.
    pub fn disconnect(&mut self) {
        for index in 0..self.vrings.len() as u16 {
            if self.vrings[usize::from(index)].started {
                for s in self.stop_on_poller(index, false) {
                    if s.abandoned > 0 {
                        tracing::warn!(
                            "queue {}: {} request(s) still in the device at disconnect",
                            s.index,
                            s.abandoned
                        );
                    }
                }
                self.vrings[usize::from(index)].started = false;
            }
        }
    }

    /// Releases what the device holds of this connection's memory (after `disconnect`).
    pub fn release_memory(&mut self) {
        if self.mem.take().is_some() {
            if let Err(e) = self.config.device.guest_memory_changed(None) {
                tracing::warn!("device could not release guest memory: {}", error_chain(&e));
            }
        }
    }

    /// Stops every queue after completing and publishing what is in flight (SIGTERM).
    pub fn drain(&mut self) {
        for index in 0..self.vrings.len() as u16 {
            self.stop_queue(index);
        }
    }

    /// Quiesces the connection for a hand-over: every running queue stops once its requests
    /// are complete and published, and the state a successor needs is returned with its fds
    /// duplicated into `fds`. On error, and when the hand-over is called off,
    /// [`Connection::start_queues`] puts it back to work.
    pub fn suspend(&mut self, socket: &impl AsFd, fds: &mut Fds) -> crate::Result<ConnectionState> {
        for index in 0..self.vrings.len() as u16 {
            let (_, abandoned) = self.stop_queue_counting(index);
            if abandoned > 0 {
                // Those requests may still finish into guest memory here: a successor
                // must not run them again meanwhile.
                return Err(crate::Error::RequestsStillInFlight {
                    queue: index,
                    count: abandoned,
                });
            }
        }
        self.snapshot(socket, fds)
    }

    /// The connection's state as a successor would need it, its fds duplicated into `fds`,
    /// without stopping anything (`base` is then stale for running queues: a successor
    /// takes their position from the inflight region).
    pub fn snapshot(&self, socket: &impl AsFd, fds: &mut Fds) -> crate::Result<ConnectionState> {
        let memory = match &self.mem {
            Some(mem) => mem
                .regions()
                .iter()
                .map(|r| {
                    Ok(RegionState {
                        guest_phys: r.guest_phys,
                        size: r.size,
                        frontend_addr: r.frontend_addr,
                        mmap_offset: r.mmap_offset,
                        fd: fds.add(r.file())?,
                    })
                })
                .collect::<crate::Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        let inflight = match &self.inflight {
            Some(map) => {
                let (file, offset, size) = map.source();
                Some(InflightState {
                    fd: fds.add(file)?,
                    offset,
                    size,
                    queue_size: map.queue_size(),
                    own: self.own_inflight,
                })
            }
            None => None,
        };
        let mut vrings = Vec::with_capacity(self.vrings.len());
        for v in &self.vrings {
            vrings.push(VringState {
                size: v.size,
                desc: v.desc,
                avail: v.avail,
                used: v.used,
                addresses_set: v.addresses_set,
                base: v.base,
                kick: v.kick.as_ref().map(|f| fds.add(f)).transpose()?,
                kick_set: v.kick_set,
                call: v.call.as_ref().map(|f| fds.add(f)).transpose()?,
                disabled: v.disabled,
                log_guest_addr: v.log_guest_addr,
            });
        }
        let log = match &self.log {
            Some(log) => {
                let (file, offset, size) = log.source();
                Some(LogState {
                    fd: fds.add(file)?,
                    offset,
                    size,
                })
            }
            None => None,
        };
        let backend_channel = self
            .backend_channel
            .as_deref()
            .map(|c| fds.add(c))
            .transpose()?;
        Ok(ConnectionState {
            socket: fds.add(socket)?,
            features: self.features,
            protocol: self.protocol.bits(),
            memory,
            vrings,
            inflight,
            status: self.status,
            log,
            backend_channel,
        })
    }

    /// SET_STATUS: the virtio device status the driver reached (the vhost crate does not
    /// dispatch STATUS messages; the server answers them with this). Only the low byte is
    /// a status; a driver resetting the device writes 0.
    pub fn set_status(&mut self, status: u64) -> crate::Result<()> {
        let status = u8::try_from(status).map_err(|_| {
            crate::Error::HandoverMessage(format!("SET_STATUS {status:#x}: not a status byte"))
        })?;
        if status != self.status {
            // Rare (a driver's start, stop or reset): worth a line.
            tracing::info!(
                "vhost-user: device status {:#04x} -> {status:#04x}",
                self.status
            );
        }
        self.status = status;
        Ok(())
    }

    /// GET_STATUS.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The fds the connection holds now, by slot (memory regions, inflight, kick and call
    /// per vring): a new fd anywhere changes it, since a new fd arrives while the one it
    /// replaces is still open.
    pub fn fd_signature(&self) -> Vec<i32> {
        use std::os::fd::AsRawFd;
        let mut sig = Vec::new();
        if let Some(mem) = &self.mem {
            sig.extend(mem.regions().iter().map(|r| r.file().as_raw_fd()));
        }
        sig.push(-2);
        if let Some(map) = &self.inflight {
            sig.push(map.source().0.as_raw_fd());
        }
        sig.push(-3);
        if let Some(log) = &self.log {
            sig.push(log.source().0.as_raw_fd());
        }
        for v in &self.vrings {
            sig.push(v.kick.as_ref().map_or(-1, |f| f.as_raw_fd()));
            sig.push(v.call.as_ref().map_or(-1, |f| f.as_raw_fd()));
        }
        sig.push(-4);
        if let Some(c) = &self.backend_channel {
            sig.push(c.as_fd().as_raw_fd());
        }
        sig
    }

    /// SET_BACKEND_REQ_FD: the frontend's backend request channel (the vhost crate's
    /// handler never sees this message: its channel could not be handed over). Refused
    /// unless BACKEND_REQ was negotiated and `fd` is a unix stream socket; a refusal keeps
    /// the channel there was, if any.
    pub fn set_backend_channel(&mut self, fd: std::os::fd::OwnedFd) -> Result<(), ChannelError> {
        if !self
            .protocol
            .contains(VhostUserProtocolFeatures::BACKEND_REQ)
        {
            return Err(ChannelError::NotAStreamSocket(
                "BACKEND_REQ was not negotiated".into(),
            ));
        }
        let reply_ack = self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
        let channel = BackendChannel::new(fd, reply_ack)?;
        tracing::info!(
            "backend request channel set (config changes are told{})",
            if reply_ack { ", acknowledged" } else { "" }
        );
        self.backend_channel = Some(Arc::new(channel));
        Ok(())
    }

    /// The backend request channel, if the frontend gave one.
    pub fn backend_channel(&self) -> Option<Arc<BackendChannel>> {
        self.backend_channel.clone()
    }

    /// Why the connection is to be closed, once: a queue could not start because another
    /// user holds the storage ([`crate::Error::StorageBusy`]); a frontend that reconnects
    /// tries again.
    pub fn take_storage_busy(&mut self) -> Option<String> {
        self.storage_busy.take()
    }

    /// The negotiated virtio and protocol features.
    pub fn negotiated(&self) -> (u64, u64) {
        (self.features, self.protocol.bits())
    }

    /// Starts every queue that has what it needs (after [`Connection::resume`], or when a
    /// hand-over is called off after [`Connection::suspend`]).
    pub fn start_queues(&mut self) {
        for index in 0..self.vrings.len() as u16 {
            self.start_or_refuse(index);
        }
    }

    /// A connection taken over from a predecessor process, with no queue started yet
    /// ([`Connection::start_queues`] does that once the predecessor has let go). Fails when
    /// the state does not fit this device (features it does not offer, another queue count)
    /// or its memory cannot be mapped.
    pub fn resume(
        config: Arc<DeviceConfig>,
        state: &ConnectionState,
        fds: &mut Fds,
    ) -> crate::Result<Self> {
        let mut c = Connection::new(config);
        let offered = Self::accepted_features(&c.config);
        if state.features & !offered != 0 {
            return Err(crate::Error::HandoverIncompatible(format!(
                "the frontend negotiated features {:#x}, of which {:#x} are not offered here",
                state.features,
                state.features & !offered
            )));
        }
        let protocol = VhostUserProtocolFeatures::from_bits(state.protocol)
            .filter(|p| Self::offered_protocol(&c.config).contains(*p))
            .ok_or_else(|| {
                crate::Error::HandoverIncompatible(format!(
                    "the frontend negotiated protocol features {:#x}, not all offered here",
                    state.protocol
                ))
            })?;
        if state.vrings.len() != c.vrings.len() {
            return Err(crate::Error::HandoverIncompatible(format!(
                "{} vrings handed over to a device with {}",
                state.vrings.len(),
                c.vrings.len()
            )));
        }
        c.features = state.features;
        c.protocol = protocol;
        c.status = state.status;
        if !state.memory.is_empty() {
            let mut mem = GuestMemory::default();
            for r in &state.memory {
                let file = fds.take_file(r.fd)?;
                mem.add(r.guest_phys, r.size, r.frontend_addr, r.mmap_offset, file)?;
            }
            let mem = Arc::new(mem);
            c.config.device.guest_memory_changed(Some(&mem))?;
            c.mem = Some(mem);
        }
        if let Some(i) = &state.inflight {
            if !valid_queue_size(u32::from(i.queue_size)) {
                return Err(crate::Error::HandoverMessage(format!(
                    "inflight queue size {}",
                    i.queue_size
                )));
            }
            let file = fds.take_file(i.fd)?;
            c.inflight = Some(Arc::new(InflightMap::map(
                file,
                i.offset,
                i.size,
                i.queue_size,
            )?));
            c.own_inflight = i.own;
        }
        for (v, s) in c.vrings.iter_mut().zip(&state.vrings) {
            // 0: never set.
            if s.size != 0 && !valid_queue_size(u32::from(s.size)) {
                return Err(crate::Error::HandoverMessage(format!(
                    "vring size {}",
                    s.size
                )));
            }
            v.size = s.size;
            v.desc = s.desc;
            v.avail = s.avail;
            v.used = s.used;
            v.addresses_set = s.addresses_set;
            v.base = s.base;
            v.kick = s.kick.map(|i| fds.take_file(i)).transpose()?;
            v.kick_set = s.kick_set;
            v.call = s.call.map(|i| fds.take_file(i)).transpose()?;
            v.disabled = s.disabled;
            v.log_guest_addr = s.log_guest_addr;
            v.resumed = true;
        }
        if let Some(l) = &state.log {
            let file = fds.take_file(l.fd)?;
            let log = DirtyLog::map(file, l.offset, l.size, c.config.dirty_log_marks)?;
            if c.log_all() {
                tracing::info!("dirty logging continues into the log of {} bytes", l.size);
            }
            c.log = Some(Arc::new(log));
        }
        if let Some(index) = state.backend_channel {
            let reply_ack = protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
            let channel = BackendChannel::new(fds.take(index)?, reply_ack)
                .map_err(|e| crate::Error::HandoverMessage(e.to_string()))?;
            c.backend_channel = Some(Arc::new(channel));
        }
        Ok(c)
    }
}

impl VhostUserBackendReqHandlerMut for Connection {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.drain();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.drain();
        self.features = 0;
        self.status = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(Self::offered_features(&self.config))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !Self::accepted_features(&self.config) != 0 {
            return Err(VuError::InvalidParam);
        }
        // A running ring's layout is fixed (its base, its addresses, its inflight region).
        let layout_changes = (features ^ self.features) & (1 << VIRTIO_F_RING_PACKED) != 0;
        if layout_changes && self.vrings.iter().any(|v| v.started) {
            return Err(invalid("the ring layout cannot change while rings run"));
        }
        let was_logging = self.log_all();
        self.features = features;
        if self.log_all() == was_logging {
            return Ok(());
        }
        if self.log_missing() {
            // QEMU sends LOG_ALL before the log when a device starts during a migration:
            // rings wait for it rather than write anything the log would miss.
            tracing::warn!(
                "dirty logging asked for (LOG_ALL) before a log was given: running queues pause until SET_LOG_BASE"
            );
            for index in 0..self.vrings.len() as u16 {
                self.stop_queue(index);
            }
            return Ok(());
        }
        tracing::info!(
            "dirty logging {} (LOG_ALL {})",
            if self.log_all() { "on" } else { "off" },
            if self.log_all() { "set" } else { "cleared" }
        );
        // The frontend waits for our reply before it relies on the log being written.
        self.apply_log()?;
        // Queues that waited for a log while LOG_ALL was set without one.
        self.start_queues();
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        let regions: Vec<(u64, u64, u64, u64)> = ctx
            .iter()
            .map(|r| (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset))
            .collect();
        let mem = GuestMemory::from_table(&regions, files).map_err(bad_param)?;
        self.replace_memory(mem)?;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if !valid_queue_size(num) {
            return Err(VuError::InvalidParam);
        }
        let v = self.vring(index)?;
        v.size = num as u16;
        v.resumed = false;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        log: u64,
    ) -> VuResult<()> {
        let log_guest_addr = flags
            .contains(VhostUserVringAddrFlags::VHOST_VRING_F_LOG)
            .then_some(log);
        let mem = self.mem.clone();
        let size = self.vrings.get(index as usize).map_or(1, |v| v.size.max(1));
        let len = self.used_area_len(size);
        let v = self.vring(index)?;
        if let (Some(gpa), Some(mem)) = (log_guest_addr, &mem) {
            // The used ring is logged at its guest-physical address: it must be guest RAM.
            if mem.translate(gpa, len).is_none() {
                return Err(bad_param(crate::Error::RingOutsideMemory {
                    ring: "logged used",
                    addr: gpa,
                    len: len as usize,
                }));
            }
        }
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        v.addresses_set = true;
        v.log_guest_addr = log_guest_addr;
        // QEMU sends the running rings' addresses again to switch used-ring logging on or
        // off, and waits for our reply.
        if v.started {
            return self.apply_log();
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let packed = self.packed();
        let v = self.vring(index)?;
        if packed {
            // Both positions (bits 0-14 and 16-30) must lie inside the ring; a size set
            // later is checked when the ring starts.
            let outside = |half: u32| half & 0x7fff >= u32::from(v.size);
            if v.size != 0 && (outside(base) || outside(base >> 16)) {
                return Err(bad_param(crate::Error::PackedBase { base, size: v.size }));
            }
            v.base = base;
        } else {
            // A split ring's base is its low 16 bits; the rest is reserved.
            v.base = base & 0xffff;
        }
        v.resumed = false;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let (base, abandoned) = self.stop_queue_counting(index as u16);
        if self.log_all() {
            // A migration's switch-over: the destination serves the same storage next, and
            // must read what this ring's requests wrote.
            if abandoned > 0 {
                tracing::error!(
                    queue = index,
                    "migration switch-over: {abandoned} request(s) of queue {index} did not finish in time; the destination will not see them complete"
                );
            }
            let started = std::time::Instant::now();
            match self.config.device.sync_for_migration() {
                Ok(()) => tracing::info!(
                    queue = index,
                    "migration switch-over: queue {index} stopped at base {base:#x}, data synced in {:?}",
                    started.elapsed()
                ),
                Err(e) => tracing::error!(
                    queue = index,
                    "migration switch-over: syncing the data for the destination failed: {}",
                    error_chain(&e)
                ),
            }
        }
        let v = self.vring(index)?;
        v.kick = None;
        v.kick_set = false;
        v.call = None;
        Ok(VhostUserVringState::new(index, base))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let id = self.id;
        let v = self.vring(u32::from(index))?;
        let for_poller = fd.as_ref().and_then(|f| f.try_clone().ok());
        v.kick = fd;
        v.kick_set = true;
        if let (true, Some(poller)) = (v.started, &v.poller) {
            // A running queue takes the new fd (the old one may be gone with its frontend).
            tracing::debug!(queue = index, "queue {index}: new kick fd while running");
            poller.set_kick(id, u16::from(index), for_poller);
            return Ok(());
        }
        self.start_or_refuse(u16::from(index));
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let id = self.id;
        let v = self.vring(u32::from(index))?;
        let for_poller = fd.as_ref().and_then(|f| f.try_clone().ok());
        v.call = fd;
        if let (true, Some(poller)) = (v.started, &v.poller) {
            // Frontends swap call fds on a running ring when the guest masks or unmasks its
            // interrupt vector.
            tracing::debug!(queue = index, "queue {index}: new call fd while running");
            poller.set_call(id, u16::from(index), for_poller);
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index)).map(|_| ())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(Self::offered_protocol(&self.config))
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = Self::offered_protocol(&self.config);
        let asked = VhostUserProtocolFeatures::from_bits(features).ok_or(VuError::InvalidParam)?;
        if !offered.contains(asked) {
            return Err(VuError::InvalidParam);
        }
        self.protocol = asked;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.config.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        // Rings start when their kick fd arrives (as libvhost-user does, and as frontends that
        // never send SET_VRING_ENABLE expect); a disable pauses a ring (what completes is
        // published) until it is enabled again.
        let v = self.vring(index)?;
        v.disabled = !enable;
        let index = index as u16;
        if enable {
            self.start_or_refuse(index);
        } else {
            self.stop_queue(index);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let space = self.config.device.config_space();
        let end = offset
            .checked_add(size)
            .filter(|&e| e as usize <= space.len())
            .ok_or(VuError::InvalidParam)?;
        Ok(space[offset as usize..end as usize].to_vec())
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        self.config
            .device
            .set_config(offset, buf)
            .map_err(bad_param)
    }

    fn set_gpu_socket(&mut self, _gpu: vhost::vhost_user::GpuBackend) -> VuResult<()> {
        Err(invalid("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        if !self.config.inflight {
            return Err(invalid("inflight tracking is off"));
        }
        let (n, qs) = (inflight.num_queues, inflight.queue_size);
        if n == 0 || n > self.config.num_queues || !valid_queue_size(u32::from(qs)) {
            return Err(bad_param(crate::Error::BadInflight {
                num_queues: n,
                queue_size: qs,
                mmap_size: 0,
            }));
        }
        // The negotiated layout's region (QEMU sets the features before it asks).
        let size = u64::from(n) * self.inflight_region_size(qs) as u64;
        let file = crate::memory::memfd("vfblk-inflight", size).map_err(|source| {
            bad_param(crate::Error::Io {
                what: format!("memfd for an inflight region of {size} bytes"),
                source,
            })
        })?;
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: n,
            queue_size: qs,
        };
        let ours = file.try_clone().map_err(|source| {
            bad_param(crate::Error::Io {
                what: "duplicating the inflight fd".into(),
                source,
            })
        })?;
        self.inflight = Some(Arc::new(
            InflightMap::map(ours, 0, size, qs).map_err(bad_param)?,
        ));
        self.own_inflight = false;
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if !self.config.inflight {
            return Err(invalid("inflight tracking is off"));
        }
        let (n, qs) = (inflight.num_queues, inflight.queue_size);
        let needed = u64::from(n) * self.inflight_region_size(qs) as u64;
        if n == 0
            || n > self.config.num_queues
            || !valid_queue_size(u32::from(qs))
            || inflight.mmap_size < needed
        {
            return Err(bad_param(crate::Error::BadInflight {
                num_queues: n,
                queue_size: qs,
                mmap_size: inflight.mmap_size,
            }));
        }
        self.inflight = Some(Arc::new(
            InflightMap::map(file, inflight.mmap_offset, inflight.mmap_size, qs)
                .map_err(bad_param)?,
        ));
        self.own_inflight = false;
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<vhost::VhostUserMemoryRegionBase>> {
        let mut mem = self.mem.as_deref().cloned().unwrap_or_default();
        mem.add(
            region.guest_phys_addr,
            region.memory_size,
            region.user_addr,
            region.mmap_offset,
            fd,
        )
        .map_err(bad_param)?;
        self.replace_memory(mem)?;
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let mut mem = self.mem.as_deref().cloned().unwrap_or_default();
        mem.remove(region.guest_phys_addr, region.memory_size)
            .map_err(bad_param)?;
        self.replace_memory(mem)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("no device state transfer"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("no device state transfer"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        let (size, offset) = (log.mmap_size, log.mmap_offset);
        let map =
            DirtyLog::map(file, offset, size, self.config.dirty_log_marks).map_err(bad_param)?;
        if let Some(end) = self.mem.as_deref().map(GuestMemory::end) {
            if !map.covers(end) {
                return Err(bad_param(crate::Error::BadLog {
                    size,
                    offset,
                    why: format!("too small for guest memory up to {end:#x}"),
                }));
            }
        }
        tracing::info!("dirty log of {size} bytes set");
        self.log = Some(Arc::new(map));
        // Running queues move to the new log before we reply: the frontend then reads and
        // frees the old one.
        self.apply_log()?;
        // Queues that waited for a log start now.
        self.start_queues();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The protocol with a packed ring, driven in-process as a frontend would: negotiation,
    //! the packed base both ways (and hostile ones), the inflight region's packed layout,
    //! and a restart that resumes from the region rather than from a stale base.
    use super::*;
    use crate::chain::{ChainCursor, ChainSource, Segment};
    use crate::device::{Finished, QueueHandler, RequestHandler, Taken};
    use crate::memory::tests::memfd;
    use crate::packed::tests::buf;
    use crate::packed_driver::PackedDriverQueue;
    use crate::poller::PollMode;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    const GPA: u64 = 0x10000;
    const MEM: u64 = 1 << 20;
    const FRONTEND: u64 = 0x5000_0000;
    const BUFS: u64 = 0x20000;
    const SIZE: u16 = 8;
    const FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_PACKED);

    /// Finishes every chain at once or, while `hold` is set, keeps them for good (as a
    /// process that dies with them would); counts the chains it was handed.
    struct TestDevice {
        features: u64,
        hold: AtomicBool,
        taken: Arc<AtomicUsize>,
    }

    impl Device for TestDevice {
        fn features(&self) -> u64 {
            self.features
        }
        fn config_space(&self) -> Vec<u8> {
            Vec::new()
        }
        fn open_queue(&self, _: &QueueSetup) -> crate::Result<Box<dyn QueueHandler>> {
            Ok(Box::new(TestQueue {
                hold: self.hold.load(Ordering::SeqCst),
                taken: self.taken.clone(),
            }))
        }
    }

    struct TestQueue {
        hold: bool,
        taken: Arc<AtomicUsize>,
    }

    impl RequestHandler for TestQueue {
        fn can_take(&self) -> bool {
            true
        }
        fn take<S: ChainSource>(&mut self, chain: ChainCursor<'_, S>) -> Taken {
            let mut out = [Segment::default(); 4];
            let walked = chain.walk_into(&mut out);
            self.taken.fetch_add(1, Ordering::SeqCst);
            match walked {
                Err(e) => Taken::Unwalkable(e),
                Ok(_) if self.hold => Taken::Pending,
                Ok(_) => Taken::Done(1),
            }
        }
        fn refuse(&mut self, _: u16, _: Option<Segment>) -> Option<u32> {
            None
        }
        fn poll(&mut self, _: &mut Finished) -> usize {
            0
        }
        fn in_flight(&self) -> usize {
            0 // held chains are forgotten, not drained
        }
    }

    fn config(features: u64, hold: bool) -> (Arc<DeviceConfig>, Arc<TestDevice>) {
        let device = Arc::new(TestDevice {
            features,
            hold: AtomicBool::new(hold),
            taken: Arc::new(AtomicUsize::new(0)),
        });
        let mode = PollMode {
            idle_before_sleep: Some(Duration::from_millis(1)),
        };
        let poller = Arc::new(Poller::spawn("packed-test".into(), None, mode).unwrap());
        let config = Arc::new(DeviceConfig {
            num_queues: 1,
            inflight: true,
            device: device.clone(),
            pollers: vec![poller],
            errors: Arc::new(GuestErrors::new("packed-test")),
            fd_store: None,
            dirty_log_marks: true,
        });
        (config, device)
    }

    /// A guest's memory (the test's own mapping of the file it gives the connection) and
    /// the driver side of a packed ring at its start.
    struct Guest {
        file: File,
        _mem: GuestMemory,
        drv: PackedDriverQueue,
    }

    fn guest() -> Guest {
        let file = memfd(MEM);
        let mem =
            GuestMemory::from_table(&[(GPA, MEM, FRONTEND, 0)], vec![file.try_clone().unwrap()])
                .unwrap();
        let host = mem.translate(GPA, MEM).unwrap();
        // SAFETY: the region is 1 MiB, zeroed, page-aligned, mapped while `_mem` lives.
        let drv = unsafe { PackedDriverQueue::new(host, GPA, SIZE) };
        Guest {
            file,
            _mem: mem,
            drv,
        }
    }

    impl Guest {
        /// The frontend's messages up to the base (features and memory before).
        fn set_up(&self, c: &mut Connection) {
            c.set_features(FEATURES).unwrap();
            let region = VhostUserMemoryRegion::new(GPA, MEM, FRONTEND, 0);
            c.set_mem_table(&[region], vec![self.file.try_clone().unwrap()], None)
                .unwrap();
            c.set_vring_num(0, u32::from(SIZE)).unwrap();
        }

        /// The rest: the three areas, and the kick (none: polled), which starts the ring.
        fn start(&self, c: &mut Connection) {
            let f = |gpa: u64| gpa - GPA + FRONTEND;
            let (desc, driver, device) = self.drv.gpas;
            // The vhost crate's order: descriptor, used (device area), avail (driver area).
            c.set_vring_addr(
                0,
                VhostUserVringAddrFlags::empty(),
                f(desc),
                f(device),
                f(driver),
                0,
            )
            .unwrap();
            c.set_vring_kick(0, None).unwrap();
        }

        /// The next used buffer, waited for.
        fn used(&mut self) -> (u16, u32) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(used) = self.drv.pop_used().unwrap() {
                    return used;
                }
                assert!(Instant::now() < deadline, "no used buffer within 5 s");
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        /// The packed base the driver's positions make when nothing is in flight.
        fn idle_base(&self) -> u32 {
            let p = u32::from(self.drv.next_avail().to_event());
            p | p << 16
        }
    }

    /// GET_VRING_BASE's value (copied out of the packed message struct).
    fn stop(c: &mut Connection) -> u32 {
        c.get_vring_base(0).unwrap().num
    }

    fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "{what}: not within 5 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn packed_rings_are_offered_only_to_a_device_that_asks() {
        let (plain, _) = config(0, false);
        assert_eq!(
            Connection::offered_features(&plain) & (1 << VIRTIO_F_RING_PACKED),
            0
        );
        let mut c = Connection::new(plain);
        assert!(c.set_features(FEATURES).is_err(), "not offered: refused");
        let (packed, _) = config(1 << VIRTIO_F_RING_PACKED, false);
        assert_ne!(
            Connection::offered_features(&packed) & (1 << VIRTIO_F_RING_PACKED),
            0
        );
    }

    /// Without inflight tracking a packed ring could be neither resumed nor logged: not
    /// offered, and a frontend that acks it anyway is refused.
    #[test]
    fn packed_rings_are_not_offered_without_inflight_tracking() {
        let (with, device) = config(1 << VIRTIO_F_RING_PACKED, false);
        let without = Arc::new(DeviceConfig {
            num_queues: with.num_queues,
            inflight: false,
            device,
            pollers: with.pollers.clone(),
            errors: with.errors.clone(),
            fd_store: None,
            dirty_log_marks: true,
        });
        assert_eq!(
            Connection::offered_features(&without) & (1 << VIRTIO_F_RING_PACKED),
            0
        );
        assert_eq!(
            Connection::accepted_features(&without) & (1 << VIRTIO_F_RING_PACKED),
            0
        );
        let mut c = Connection::new(without);
        assert!(
            c.set_features(FEATURES).is_err(),
            "a fresh negotiation cannot ack what was not offered"
        );
    }

    #[test]
    fn a_packed_ring_is_served_and_stopped_and_started_again_at_its_packed_base() {
        let (config, _) = config(1 << VIRTIO_F_RING_PACKED, false);
        let mut g = guest();
        let mut c = Connection::new(config);
        g.set_up(&mut c);
        // The inflight region comes in the packed layout.
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: SIZE,
        };
        let (reply, _fd) = c.get_inflight_fd(&ask).unwrap();
        assert_eq!(reply.mmap_size, packed_region_size(SIZE) as u64);
        assert_ne!(packed_region_size(SIZE), region_size(SIZE));
        // Either position outside the 8-entry ring is refused, whatever its wrap bit.
        for hostile in [0x0000_0008, 0x0008_0000, 0x8000_800f, 0x7fff_7fff, u32::MAX] {
            assert!(c.set_vring_base(0, hostile).is_err(), "{hostile:#x}");
        }
        c.set_vring_base(0, 0x8000_8000).unwrap(); // both at 0, wrap counters 1
        g.start(&mut c);
        // A running ring keeps its layout.
        assert!(c.set_features(1 << VIRTIO_F_VERSION_1).is_err());
        let (hdr, status) = (buf(BUFS, 16, false), buf(BUFS + 16, 1, true));
        // 1 + 2 + 1 descriptors a round: three rounds wrap the ring.
        for round in 0..3 {
            let ids = [
                g.drv.add(&[status]).unwrap(),
                g.drv.add(&[hdr, status]).unwrap(),
                g.drv.add(&[status]).unwrap(),
            ];
            for id in ids {
                assert_eq!(g.used(), (id, 1), "round {round}");
            }
        }
        // GET_VRING_BASE stops the ring and says where both positions stand.
        let base = stop(&mut c);
        assert_eq!(base, g.idle_base());
        assert_eq!(
            base, 0x0004_0004,
            "12 descriptors: index 4, wrap counters 0"
        );
        // Started again there, it takes the next chain from where it stopped.
        c.set_vring_base(0, base).unwrap();
        g.start(&mut c);
        let id = g.drv.add(&[hdr, status]).unwrap();
        assert_eq!(g.used(), (id, 1));
        assert_eq!(stop(&mut c), g.idle_base());
    }

    #[test]
    fn a_hostile_packed_base_sent_before_the_ring_size_keeps_the_ring_stopped() {
        let (config, device) = config(1 << VIRTIO_F_RING_PACKED, false);
        let mut g = guest();
        let mut c = Connection::new(config);
        c.set_features(FEATURES).unwrap();
        // No size yet: the base is taken, and checked when the ring starts.
        c.set_vring_base(0, 0x0009_0009).unwrap();
        g.set_up(&mut c);
        g.start(&mut c); // refused at start; the connection stays up
        g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(device.taken.load(Ordering::SeqCst), 0, "nothing taken");
        assert_eq!(stop(&mut c), 0x0009_0009);
        // A good base, and it runs.
        c.set_vring_base(0, 0x8000_8000).unwrap();
        g.start(&mut c);
        assert_eq!(g.used().1, 1);
    }

    #[test]
    fn a_region_in_flight_with_a_buffer_id_the_ring_cannot_have_keeps_the_ring_stopped() {
        use crate::inflight_packed::{DescState, RegionHeader};
        use std::mem::{offset_of, size_of};
        use std::os::unix::fs::FileExt;
        let (config, device) = config(1 << VIRTIO_F_RING_PACKED, false);
        let mut g = guest();
        let mut c = Connection::new(config);
        g.set_up(&mut c);
        // A region for 16 entries (a larger ring's), written by a hostile frontend: buffer 9
        // in flight, which the 8-entry ring cannot have handed out.
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 16,
        };
        let (_, fd) = c.get_inflight_fd(&ask).unwrap();
        let put = |offset: usize, bytes: &[u8]| fd.write_all_at(bytes, offset as u64).unwrap();
        let header = |field: usize, value: u16| put(field, &value.to_le_bytes());
        header(offset_of!(RegionHeader, version), 1);
        header(offset_of!(RegionHeader, desc_num), 16);
        header(offset_of!(RegionHeader, free_head), 1);
        header(offset_of!(RegionHeader, old_free_head), 1);
        put(offset_of!(RegionHeader, used_wrap_counter), &[1, 1]);
        let entry =
            |i: usize, field: usize| size_of::<RegionHeader>() + i * size_of::<DescState>() + field;
        for i in 1..16u16 {
            put(
                entry(usize::from(i), offset_of!(DescState, next)),
                &(i + 1).to_le_bytes(),
            );
        }
        put(entry(0, offset_of!(DescState, inflight)), &[1]);
        put(entry(0, offset_of!(DescState, num)), &1u16.to_le_bytes());
        put(entry(0, offset_of!(DescState, id)), &9u16.to_le_bytes());
        c.set_vring_base(0, 0x8000_8000).unwrap();
        g.start(&mut c); // refused at start; the connection stays up
        g.drv.add(&[buf(BUFS, 1, true)]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(device.taken.load(Ordering::SeqCst), 0, "nothing run");
        assert_eq!(g.drv.pop_used().unwrap(), None);
        assert_eq!(stop(&mut c), 0x8000_8000);
    }

    #[test]
    fn a_packed_ring_restarted_with_a_stale_base_resumes_from_its_inflight_region() {
        let (config, device) = config(1 << VIRTIO_F_RING_PACKED, true);
        let mut g = guest();
        let mut first = Connection::new(config.clone());
        g.set_up(&mut first);
        let ask = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: SIZE,
        };
        let (region, fd) = first.get_inflight_fd(&ask).unwrap();
        first.set_vring_base(0, 0x8000_8000).unwrap();
        g.start(&mut first);
        let (hdr, status) = (buf(BUFS, 16, false), buf(BUFS + 16, 1, true));
        let a = g.drv.add(&[hdr, status]).unwrap();
        let b = g.drv.add(&[status]).unwrap();
        wait_for("both taken", || device.taken.load(Ordering::SeqCst) == 2);
        // The process dies with both in flight: nothing published.
        first.disconnect();
        drop(first);
        assert_eq!(g.drv.pop_used().unwrap(), None);

        // The frontend reconnects with the base it sent at the start (QEMU keeps no packed
        // position to restore) and the same region.
        device.hold.store(false, Ordering::SeqCst);
        let mut second = Connection::new(config);
        second.set_features(FEATURES).unwrap();
        second.set_inflight_fd(&region, fd).unwrap();
        g.set_up(&mut second);
        second.set_vring_base(0, 0x8000_8000).unwrap();
        g.start(&mut second);
        // Both run again, oldest first, and are not taken a second time from the ring.
        assert_eq!(g.used(), (a, 1));
        assert_eq!(g.used(), (b, 1));
        assert_eq!(device.taken.load(Ordering::SeqCst), 4);
        let c = g.drv.add(&[status]).unwrap();
        assert_eq!(g.used(), (c, 1));
        assert_eq!(device.taken.load(Ordering::SeqCst), 5);
        assert_eq!(stop(&mut second), g.idle_base());
    }
}
