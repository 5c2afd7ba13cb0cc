//! The NVMe backend: virtio-blk requests become NVMe commands on a queue pair per virtqueue,
//! with data pointers built from the guest's own buffers. Guest RAM is mapped into the
//! controller's IOMMU domain at IOVA = guest-physical address, so the SSD DMAs straight into
//! the guest: no copy. Requests above MDTS are split; buffers that break PRP rules go out as
//! SGLs when the controller has them (QueuePair decides).

use std::sync::Mutex;

use vfblk_hugepages::ExternalMapping;
use vfblk_nvme::controller::{Controller, Namespace};
use vfblk_nvme::prp::Segment;
use vfblk_nvme::queue::QueuePair;
use vfblk_vhost::memory::GuestMemory;

use super::{Backend, BackendInfo, BackendQueue};
use crate::request::{Operation, Request};
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

/// A range of 512-byte sectors as (first block, blocks) of a namespace with 2^shift-byte
/// blocks; `None` unless both ends fall on block boundaries (rounding would touch blocks the
/// guest did not name).
fn sectors_to_blocks(sector: u64, count: u32, shift: u8) -> Option<(u64, u64)> {
    let start = sector.checked_mul(SECTOR)?;
    let len = u64::from(count) * SECTOR;
    let mask = (1u64 << shift) - 1;
    (start & mask == 0 && len & mask == 0).then_some((start >> shift, len >> shift))
}

/// Most NVMe commands one virtio-blk request may become (MDTS splits, ranges).
const MAX_PARTS: usize = 8;
/// Queue entries per NVMe queue pair.
const ENTRIES: u16 = 256;

/// The `nvme` backend.
pub struct NvmeBackend {
    ctrl: Controller,
    ns: Namespace,
    info: BackendInfo,
    mappings: Mutex<Vec<ExternalMapping>>,
}

impl NvmeBackend {
    /// Serves namespace `nsid` of an opened controller.
    pub fn new(ctrl: Controller, nsid: u32) -> Result<Self> {
        let ns = ctrl
            .namespace(nsid)
            .map_err(|source| Error::Nvme {
                what: format!("namespace {nsid}"),
                source,
            })?
            .clone();
        let id = ctrl.identify();
        let info = BackendInfo {
            description: format!(
                "nvme:{} namespace {} ({} MiB, {}-byte blocks, {}, max transfer {} KiB)",
                ctrl.name(),
                nsid,
                ns.info.size_bytes() >> 20,
                ns.info.block_size(),
                id.model,
                ctrl.max_transfer() >> 10
            ),
            capacity_sectors: ns.info.size_bytes() / SECTOR,
            block_size: ns.info.block_size(),
            physical_block_size: ns.info.block_size(),
            // Requests up to MDTS go out as one command.
            optimal_io_size: ctrl.max_transfer().min(u32::MAX as usize) as u32,
            flush: id.has_volatile_write_cache(),
            discard: id.supports_dsm(),
            write_zeroes: id.supports_write_zeroes(),
        };
        Ok(Self {
            ctrl,
            ns,
            info,
            mappings: Mutex::new(Vec::new()),
        })
    }
}

impl Backend for NvmeBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self) -> Result<Box<dyn BackendQueue>> {
        let qp = self
            .ctrl
            .create_io_queue_pair(ENTRIES)
            .map_err(|source| Error::Nvme {
                what: "creating an I/O queue pair".into(),
                source,
            })?;
        Ok(Box::new(NvmeQueue {
            qp,
            nsid: self.ns.nsid,
            shift: self.ns.info.lba_shift,
            max_transfer: self.ctrl.max_transfer() as u64,
            parts: vec![Part::default(); usize::from(u16::MAX) + 1].into_boxed_slice(),
            in_flight: 0,
            fua: false,
            reaped: Vec::with_capacity(usize::from(ENTRIES)),
        }))
    }

    fn guest_memory_changed(&self, memory: Option<&GuestMemory>) -> Result<()> {
        let mut mappings = self
            .mappings
            .lock()
            .map_err(|_| Error::Poisoned("guest RAM mappings"))?;
        // Old mappings go first: the same guest-physical ranges come back at the same IOVAs.
        mappings.clear();
        let Some(memory) = memory else { return Ok(()) };
        for r in memory.regions() {
            let host = memory
                .translate(r.guest_phys, r.size)
                .expect("a region translates to itself");
            // SAFETY: the region stays mapped while the connection's GuestMemory lives; the
            // device releases these mappings (guest_memory_changed(None)) before it drops it,
            // and guest memory is only touched through raw pointers.
            let m = unsafe { self.ctrl.map_external(r.guest_phys, host, r.size as usize) }
                .map_err(|source| Error::Nvme {
                    what: format!("mapping guest RAM at IOVA {:#x}", r.guest_phys),
                    source,
                })?;
            mappings.push(m);
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Default)]
struct Part {
    pending: u8,
    status: u8,
}

struct NvmeQueue {
    qp: QueuePair,
    nsid: u32,
    shift: u8,
    max_transfer: u64,
    /// Per virtio token (head): NVMe commands outstanding and the worst status.
    parts: Box<[Part]>,
    in_flight: usize,
    /// The request being split is a writethrough write (Force Unit Access).
    fua: bool,
    reaped: Vec<(u16, u8)>,
}

impl NvmeQueue {
    /// Accounts a submitted request; one that sent nothing to the device completes now.
    fn accounted(&mut self, token: u16) -> Result<()> {
        let p = self.parts[usize::from(token)];
        if p.pending == 0 {
            // Nothing reached the device (refused before submission): report now.
            self.reaped.push((
                token,
                if p.status == status::OK {
                    status::IOERR
                } else {
                    p.status
                },
            ));
        }
        self.in_flight += 1;
        Ok(())
    }

    fn fail(&mut self, token: u16) {
        let p = &mut self.parts[usize::from(token)];
        p.status = status::IOERR;
    }

    fn issue(
        &mut self,
        token: u16,
        f: impl FnOnce(&mut QueuePair) -> std::result::Result<u16, vfblk_nvme::queue::SubmitError>,
    ) -> bool {
        match f(&mut self.qp) {
            Ok(_) => {
                self.parts[usize::from(token)].pending += 1;
                true
            }
            Err(e) => {
                tracing::warn!("nvme backend: head {token}: {e}");
                self.fail(token);
                false
            }
        }
    }

    fn read_write(&mut self, r: &Request, token: u16) {
        self.fua = r.durable;
        let block = 1u64 << self.shift;
        let start = r.sector * SECTOR;
        if start % block != 0 || r.data_len % block != 0 {
            self.fail(token);
            return;
        }
        let mut lba = start >> self.shift;
        let mut chunk = [Segment { iova: 0, len: 0 }; vfblk_vhost::chain::MAX_SEGMENTS];
        let mut count = 0usize;
        let mut chunk_len = 0u64;
        for s in &r.data[..r.data_count] {
            let (mut gpa, mut left) = (s.gpa, u64::from(s.len));
            while left > 0 {
                let room = self.max_transfer - chunk_len;
                let take = left.min(room);
                chunk[count] = Segment {
                    iova: gpa,
                    len: take as u32,
                };
                count += 1;
                chunk_len += take;
                gpa += take;
                left -= take;
                if chunk_len == self.max_transfer || count == chunk.len() {
                    if !self.send_chunk(r.op, token, lba, &chunk[..count], chunk_len) {
                        return;
                    }
                    lba += chunk_len >> self.shift;
                    count = 0;
                    chunk_len = 0;
                }
            }
        }
        if count > 0 {
            self.send_chunk(r.op, token, lba, &chunk[..count], chunk_len);
        }
    }

    fn send_chunk(
        &mut self,
        op: Operation,
        token: u16,
        lba: u64,
        segs: &[Segment],
        len: u64,
    ) -> bool {
        // A chunk that ends inside a block (a segment split at the transfer limit) cannot be
        // sent: the limit is a multiple of the block size, so only odd guest buffers hit this.
        if len % (1 << self.shift) != 0 {
            self.fail(token);
            return false;
        }
        let (nsid, shift, blocks) = (self.nsid, self.shift, (len >> self.shift) as u32);
        let fua = self.fua;
        self.issue(token, |qp| match op {
            Operation::Read => qp.read(nsid, lba, blocks, shift, segs, u64::from(token)),
            // Writethrough: Force Unit Access, so the write completes only once stable.
            _ if fua => qp.write_fua(nsid, lba, blocks, shift, segs, u64::from(token)),
            _ => qp.write(nsid, lba, blocks, shift, segs, u64::from(token)),
        })
    }
}

impl BackendQueue for NvmeQueue {
    fn can_submit(&self) -> bool {
        self.qp.capacity() - self.qp.in_flight() >= MAX_PARTS
    }

    fn submit(&mut self, r: &Request, token: u16) -> Result<()> {
        self.parts[usize::from(token)] = Part {
            pending: 0,
            status: status::OK,
        };
        let nsid = self.nsid;
        match r.op {
            Operation::Read | Operation::Write => self.read_write(r, token),
            Operation::Flush => {
                self.issue(token, |qp| qp.flush(nsid, u64::from(token)));
            }
            Operation::Discard => {
                let mut ranges = [(0u64, 0u32); crate::request::MAX_DISCARD_SEGMENTS];
                for (i, &(sector, count)) in r.ranges[..r.range_count].iter().enumerate() {
                    match sectors_to_blocks(sector, count, self.shift) {
                        Some((lba, blocks)) => ranges[i] = (lba, blocks as u32),
                        None => {
                            self.fail(token);
                            return self.accounted(token);
                        }
                    }
                }
                let n = r.range_count;
                self.issue(token, |qp| {
                    qp.deallocate(nsid, &ranges[..n], u64::from(token))
                });
            }
            Operation::WriteZeroes { .. } => {
                for &(sector, count) in &r.ranges[..r.range_count] {
                    let Some((mut lba, mut left)) = sectors_to_blocks(sector, count, self.shift)
                    else {
                        self.fail(token);
                        break;
                    };
                    while left > 0 {
                        let n = left.min(65536) as u32;
                        if !self.issue(token, |qp| qp.write_zeroes(nsid, lba, n, u64::from(token)))
                        {
                            break;
                        }
                        lba += u64::from(n);
                        left -= u64::from(n);
                    }
                }
            }
        }
        self.accounted(token)
    }

    fn flush_submissions(&mut self) {
        self.qp.ring();
    }

    fn poll(&mut self, done: &mut dyn FnMut(u16, u8)) -> usize {
        let parts = &mut self.parts;
        let reaped = &mut self.reaped;
        self.qp.poll(usize::from(ENTRIES), |c| {
            let token = c.token as u16;
            let p = &mut parts[usize::from(token)];
            if !c.status.is_success() {
                p.status = status::IOERR;
            }
            p.pending = p.pending.saturating_sub(1);
            if p.pending == 0 {
                reaped.push((token, p.status));
            }
        });
        let n = self.reaped.len();
        for (token, st) in self.reaped.drain(..) {
            done(token, st);
        }
        self.in_flight -= n;
        n
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::sectors_to_blocks;

    #[test]
    fn ranges_convert_only_on_block_boundaries() {
        // 512-byte blocks: every sector range converts as is.
        assert_eq!(sectors_to_blocks(3, 5, 9), Some((3, 5)));
        // 4 KiB blocks: 8 sectors per block.
        assert_eq!(sectors_to_blocks(16, 24, 12), Some((2, 3)));
        assert_eq!(sectors_to_blocks(17, 8, 12), None, "start inside a block");
        assert_eq!(sectors_to_blocks(16, 12, 12), None, "end inside a block");
        assert_eq!(sectors_to_blocks(u64::MAX, 8, 12), None, "overflow");
    }
}
