//! The vhost-user-blk device: one value per frontend connection, implementing the vhost
//! crate's backend request handler. It negotiates features, maps guest memory and the
//! inflight region, and starts each virtqueue on a poller thread once its kick fd arrives,
//! recovering in-flight requests from the inflight region first.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult, VhostUserBackendReqHandlerMut};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::backend::Backend;
use crate::blk::{Limits, ID_BYTES};
use crate::inflight::{region_size, InflightQueue};
use crate::memory::GuestMemory;
use crate::virtq::{DeviceQueue, MAX_QUEUE_SIZE};
use crate::worker::{InflightMap, QueueStart, Worker};

/// Data buffers per request we accept (config seg_max).
pub const SEG_MAX: u32 = 126;
/// Most sectors in one discard or write-zeroes range.
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;

/// Device settings shared by every connection.
pub struct DeviceConfig {
    /// Virtqueues offered.
    pub num_queues: u16,
    /// Offer INFLIGHT_SHMFD (off only to show what goes wrong without it).
    pub inflight: bool,
    /// GET_ID answer (serial).
    pub serial: [u8; ID_BYTES],
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// Poller threads; queue i runs on worker i % len.
    pub workers: Vec<Worker>,
}

#[derive(Default)]
struct Vring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    started: bool,
}

/// One connection's device state.
pub struct BlkDevice {
    config: Arc<DeviceConfig>,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    mem: Option<Arc<GuestMemory>>,
    vrings: Vec<Vring>,
    inflight: Option<Arc<InflightMap>>,
    inflight_queue_size: u16,
}

fn invalid(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

fn bad_param<E: std::fmt::Display>(e: E) -> VuError {
    eprintln!("vhost-user: refused: {e}");
    VuError::InvalidParam
}

impl BlkDevice {
    /// A device for a new connection.
    pub fn new(config: Arc<DeviceConfig>) -> Self {
        let vrings = (0..config.num_queues).map(|_| Vring::default()).collect();
        Self {
            config,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            mem: None,
            vrings,
            inflight: None,
            inflight_queue_size: 0,
        }
    }

    /// Feature bits we offer.
    pub fn offered_features(config: &DeviceConfig) -> u64 {
        let info = config.backend.info();
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_MQ);
        if info.flush {
            f |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if info.discard {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if info.write_zeroes {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    /// Protocol features we offer.
    pub fn offered_protocol(config: &DeviceConfig) -> VhostUserProtocolFeatures {
        let mut p = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        if config.inflight {
            p |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        p
    }

    /// The virtio-blk config space (60 bytes).
    pub fn config_space(config: &DeviceConfig) -> [u8; 60] {
        let info = config.backend.info();
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&info.capacity_sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&info.block_size.to_le_bytes());
        c[34..36].copy_from_slice(&config.num_queues.to_le_bytes());
        if info.discard {
            c[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&(crate::blk::MAX_DISCARD_SEGMENTS as u32).to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
        }
        if info.write_zeroes {
            c[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&(crate::blk::MAX_DISCARD_SEGMENTS as u32).to_le_bytes());
            c[56] = 1;
        }
        c
    }

    fn limits(&self) -> Limits {
        let info = self.config.backend.info();
        Limits {
            capacity: info.capacity_sectors,
            flush: info.flush,
            discard: info.discard,
            write_zeroes: info.write_zeroes,
            max_range_sectors: MAX_RANGE_SECTORS,
            seg_max: SEG_MAX,
        }
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings
            .get_mut(index as usize)
            .ok_or(VuError::InvalidParam)
    }

    fn worker(&self, index: u16) -> &Worker {
        &self.config.workers[usize::from(index) % self.config.workers.len()]
    }

    /// Starts queue `index` if it has everything it needs (rings, memory, kick).
    fn try_start(&mut self, index: u16) -> VuResult<()> {
        let event_idx = self.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let limits = self.limits();
        let Some(mem) = self.mem.clone() else {
            return Ok(());
        };
        let inflight_map = self.inflight.clone();
        let inflight_size = self.inflight_queue_size;
        let v = &self.vrings[usize::from(index)];
        if v.started || v.kick.is_none() || v.size == 0 || v.desc == 0 {
            return Ok(());
        }
        let mut vq = DeviceQueue::new(&mem, v.size, v.desc, v.avail, v.used, event_idx)
            .map_err(bad_param)?;
        let used_idx = vq.used_idx();
        vq.next_used = used_idx;
        let (inflight, resubmit) = match inflight_map {
            Some(map) if inflight_size == v.size => {
                let offset = usize::from(index) * region_size(v.size);
                if offset + region_size(v.size) > map.len {
                    return Err(bad_param(format!(
                        "queue {index}: inflight region too small"
                    )));
                }
                // SAFETY: the queue's region lies within the mapping (checked); only this
                // queue's worker writes it.
                let mut q = unsafe { InflightQueue::new(map.ptr.add(offset), v.size) };
                let rec = q.recover(used_idx);
                // Requests in flight were taken from the avail ring: continue after them.
                vq.next_avail = used_idx.wrapping_add(rec.resubmit.len() as u16);
                if !rec.fresh {
                    eprintln!(
                        "queue {index}: recovered from the inflight region: used idx {used_idx}, {} request(s) to run again, {} published but not cleared",
                        rec.resubmit.len(),
                        rec.cleared_batch
                    );
                } else {
                    vq.next_avail = v.base;
                }
                (Some((q, map)), rec.resubmit)
            }
            Some(_) => {
                return Err(bad_param(format!(
                    "queue {index}: size {} differs from the inflight region's {inflight_size}",
                    v.size
                )));
            }
            None => {
                vq.next_avail = v.base;
                (None, Vec::new())
            }
        };
        let backend = self.config.backend.open_queue().map_err(bad_param)?;
        let dup = |f: &Option<File>| f.as_ref().and_then(|f| f.try_clone().ok());
        let start = QueueStart {
            index,
            mem,
            vq,
            inflight,
            backend,
            call: dup(&v.call),
            kick: dup(&v.kick),
            limits,
            id: self.config.serial,
            resubmit,
        };
        self.worker(index).start(start);
        self.vrings[usize::from(index)].started = true;
        Ok(())
    }

    fn stop_queue(&mut self, index: u16) -> u16 {
        let v = &self.vrings[usize::from(index)];
        if !v.started {
            return v.base;
        }
        let stopped = self.worker(index).stop(Some(index), true);
        self.vrings[usize::from(index)].started = false;
        let next_avail = stopped.first().map(|s| s.next_avail).unwrap_or(0);
        self.vrings[usize::from(index)].base = next_avail;
        next_avail
    }

    /// The connection is gone: stop every queue, letting the backend finish, publishing
    /// nothing more. What was in flight stays in the inflight region for the next connection.
    pub fn disconnect(&mut self) {
        for index in 0..self.vrings.len() as u16 {
            if self.vrings[usize::from(index)].started {
                for s in self.worker(index).stop(Some(index), false) {
                    if s.abandoned > 0 {
                        eprintln!(
                            "queue {}: {} request(s) still in the backend at disconnect",
                            s.index, s.abandoned
                        );
                    }
                }
                self.vrings[usize::from(index)].started = false;
            }
        }
    }

    /// Releases what the backend holds of this connection's memory (after `disconnect`).
    pub fn release_memory(&mut self) {
        if self.mem.take().is_some() {
            if let Err(e) = self.config.backend.guest_memory_changed(None) {
                eprintln!("warning: backend could not release guest memory: {e}");
            }
        }
    }

    /// Stops every queue after completing and publishing what is in flight (SIGTERM).
    pub fn drain(&mut self) {
        for index in 0..self.vrings.len() as u16 {
            self.stop_queue(index);
        }
    }
}

fn map_inflight(file: File, offset: u64, size: u64) -> VuResult<InflightMap> {
    let ptr = crate::memory::map_shared(file.as_raw_fd(), size as usize, offset, 0)
        .map_err(|e| bad_param(format!("mmap of the inflight fd: {e}")))?;
    Ok(InflightMap {
        ptr,
        len: size as usize,
        file,
    })
}

impl VhostUserBackendReqHandlerMut for BlkDevice {
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
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(Self::offered_features(&self.config))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !Self::offered_features(&self.config) != 0 {
            return Err(VuError::InvalidParam);
        }
        self.features = features;
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
        let mem = Arc::new(GuestMemory::from_table(&regions, files).map_err(bad_param)?);
        // Running queues keep their old mapping until restarted on the new one.
        let running: Vec<u16> = (0..self.vrings.len() as u16)
            .filter(|&i| self.vrings[usize::from(i)].started)
            .collect();
        for &i in &running {
            self.stop_queue(i);
        }
        self.config
            .backend
            .guest_memory_changed(Some(&mem))
            .map_err(bad_param)?;
        self.mem = Some(mem);
        for i in running {
            self.try_start(i)?;
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > u32::from(MAX_QUEUE_SIZE) || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.vring(index)?.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let v = self.vring(index)?;
        v.desc = descriptor;
        v.used = used;
        v.avail = available;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.base = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let next_avail = self.stop_queue(index as u16);
        let v = self.vring(index)?;
        v.kick = None;
        v.call = None;
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = u32::from(index);
        self.vring(i)?.kick = fd;
        self.try_start(u16::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let v = self.vring(u32::from(index))?;
        let for_worker = fd.as_ref().and_then(|f| f.try_clone().ok());
        v.call = fd;
        if v.started {
            self.worker(u16::from(index))
                .set_call(u16::from(index), for_worker);
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

    fn set_vring_enable(&mut self, index: u32, _enable: bool) -> VuResult<()> {
        // Rings start when their kick fd arrives (as libvhost-user does); enable is noted only.
        self.vring(index).map(|_| ())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let space = Self::config_space(&self.config);
        let end = offset
            .checked_add(size)
            .filter(|&e| e as usize <= space.len())
            .ok_or(VuError::InvalidParam)?;
        Ok(space[offset as usize..end as usize].to_vec())
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // Nothing in our config space is writable (no CONFIG_WCE).
        Err(invalid("config space is read-only"))
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
        if n == 0
            || n > self.config.num_queues
            || qs == 0
            || !qs.is_power_of_two()
            || qs > MAX_QUEUE_SIZE
        {
            return Err(bad_param(format!("GET_INFLIGHT_FD for {n} queues of {qs}")));
        }
        let size = u64::from(n) * region_size(qs) as u64;
        let name = std::ffi::CString::new("vfblk-inflight").expect("no NUL");
        // SAFETY: memfd creation; checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(bad_param(std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fd.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(bad_param)?;
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: n,
            queue_size: qs,
        };
        let ours = file.try_clone().map_err(bad_param)?;
        self.inflight = Some(Arc::new(map_inflight(ours, 0, size)?));
        self.inflight_queue_size = qs;
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if !self.config.inflight {
            return Err(invalid("inflight tracking is off"));
        }
        let (n, qs) = (inflight.num_queues, inflight.queue_size);
        let needed = u64::from(n) * region_size(qs) as u64;
        if n == 0
            || n > self.config.num_queues
            || qs == 0
            || !qs.is_power_of_two()
            || qs > MAX_QUEUE_SIZE
            || inflight.mmap_size < needed
        {
            return Err(bad_param(format!(
                "SET_INFLIGHT_FD: {n} queues of {qs} in {} bytes",
                inflight.mmap_size
            )));
        }
        self.inflight = Some(Arc::new(map_inflight(
            file,
            inflight.mmap_offset,
            inflight.mmap_size,
        )?));
        self.inflight_queue_size = qs;
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(invalid("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<vhost::VhostUserMemoryRegionBase>> {
        Err(invalid("CONFIGURE_MEM_SLOTS not offered"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(invalid("CONFIGURE_MEM_SLOTS not offered"))
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

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(invalid("no dirty logging"))
    }
}
