//! A file or block device, with O_DIRECT where it works (and where the guest's buffers are
//! aligned for it), through io_uring: iovecs point straight into guest memory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use super::uring::{Sqe, Uring, OP_FALLOCATE, OP_FSYNC, OP_READV, OP_WRITEV};
use super::{Backend, BackendInfo, BackendQueue};
use crate::blk::{status, Operation, Request, MAX_DISCARD_SEGMENTS, SECTOR};
use crate::chain::MAX_SEGMENTS;
use crate::{Error, Result};

const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Requests in flight per queue.
const DEPTH: usize = 128;

/// The `file` backend.
pub struct FileBackend {
    direct: Option<Arc<File>>,
    buffered: Arc<File>,
    info: BackendInfo,
}

impl FileBackend {
    /// Opens `path` (a regular file, created with `size` bytes if missing or shorter, or a
    /// block device whose size is used).
    pub fn open(path: &Path, size: Option<u64>) -> Result<Self> {
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| Error::Io { what, source }
        };
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .create(size.is_some())
            .truncate(false)
            .open(path)
            .map_err(io("opening"))?;
        let meta = buffered.metadata().map_err(io("stat of"))?;
        let capacity = if meta.file_type().is_block_device() {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes a u64.
            if unsafe { libc::ioctl(buffered.as_raw_fd(), BLKGETSIZE64, &mut bytes) } != 0 {
                return Err(io("BLKGETSIZE64 on")(std::io::Error::last_os_error()));
            }
            bytes
        } else {
            if let Some(size) = size.filter(|&s| s > meta.len()) {
                buffered.set_len(size).map_err(io("sizing"))?;
            }
            buffered.metadata().map_err(io("stat of"))?.len()
        };
        if capacity < SECTOR {
            return Err(Error::Backend(format!(
                "{}: {capacity} bytes is smaller than a sector",
                path.display()
            )));
        }
        // O_DIRECT fails on some filesystems (tmpfs): then every request goes buffered.
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
            .map(Arc::new);
        Ok(Self {
            info: BackendInfo {
                description: format!(
                    "file:{} ({} MiB, {})",
                    path.display(),
                    capacity >> 20,
                    if direct.is_some() {
                        "O_DIRECT for aligned buffers, io_uring"
                    } else {
                        "buffered, io_uring"
                    }
                ),
                capacity_sectors: capacity / SECTOR,
                block_size: 512,
                flush: true,
                discard: !meta.file_type().is_block_device(),
                write_zeroes: !meta.file_type().is_block_device(),
            },
            direct,
            buffered: Arc::new(buffered),
        })
    }
}

impl Backend for FileBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(FileQueue {
            ring: Uring::new(DEPTH as u32 * 2)?,
            direct: self.direct.clone(),
            buffered: self.buffered.clone(),
            slots: (0..DEPTH).map(|_| Slot::default()).collect(),
            free: (0..DEPTH).rev().collect(),
            in_flight: 0,
        }))
    }
}

struct Slot {
    token: u16,
    pending: u32,
    status: u8,
    expected: u64,
    done_bytes: u64,
    iovecs: Box<[libc::iovec; MAX_SEGMENTS]>,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            token: 0,
            pending: 0,
            status: status::OK,
            expected: 0,
            done_bytes: 0,
            iovecs: Box::new(
                [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_SEGMENTS],
            ),
        }
    }
}

// SAFETY: iovecs point into guest memory that stays mapped while requests are in flight;
// the queue is used by one thread.
unsafe impl Send for Slot {}

struct FileQueue {
    ring: Uring,
    direct: Option<Arc<File>>,
    buffered: Arc<File>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: usize,
}

impl BackendQueue for FileQueue {
    fn can_submit(&self) -> bool {
        !self.free.is_empty() && self.ring.space() as usize > MAX_DISCARD_SEGMENTS
    }

    fn submit(&mut self, r: &Request, token: u16) -> Result<()> {
        let index = self
            .free
            .pop()
            .ok_or_else(|| Error::Backend("file queue full".into()))?;
        let slot = &mut self.slots[index];
        slot.token = token;
        slot.status = status::OK;
        slot.done_bytes = 0;
        slot.expected = 0;
        let mut sqes = [Sqe::default(); MAX_DISCARD_SEGMENTS];
        let mut n = 0;
        match r.op {
            Operation::Read | Operation::Write => {
                let mut aligned = true;
                for (i, s) in r.data[..r.data_count].iter().enumerate() {
                    aligned &= (s.host as usize) % 512 == 0 && s.len % 512 == 0;
                    slot.iovecs[i] = libc::iovec {
                        iov_base: s.host.cast(),
                        iov_len: s.len as usize,
                    };
                }
                let fd = match (&self.direct, aligned) {
                    (Some(d), true) => d.as_raw_fd(),
                    _ => self.buffered.as_raw_fd(),
                };
                slot.expected = r.data_len;
                sqes[0] = Sqe {
                    opcode: if r.op == Operation::Read {
                        OP_READV
                    } else {
                        OP_WRITEV
                    },
                    fd,
                    off: r.sector * SECTOR,
                    addr: slot.iovecs.as_ptr() as u64,
                    len: r.data_count as u32,
                    user_data: index as u64,
                    ..Default::default()
                };
                n = 1;
            }
            Operation::Flush => {
                sqes[0] = Sqe {
                    opcode: OP_FSYNC,
                    fd: self.buffered.as_raw_fd(),
                    user_data: index as u64,
                    ..Default::default()
                };
                n = 1;
            }
            Operation::Discard | Operation::WriteZeroes { .. } => {
                let mode = match r.op {
                    Operation::WriteZeroes { unmap: false } => {
                        FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                    }
                    _ => FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                };
                for &(sector, count) in &r.ranges[..r.range_count] {
                    sqes[n] = Sqe {
                        opcode: OP_FALLOCATE,
                        fd: self.buffered.as_raw_fd(),
                        off: sector * SECTOR,
                        addr: u64::from(count) * SECTOR,
                        len: mode,
                        user_data: index as u64,
                        ..Default::default()
                    };
                    n += 1;
                }
            }
        }
        slot.pending = n as u32;
        for sqe in &sqes[..n] {
            if !self.ring.push(*sqe) {
                // can_submit reserved room for the largest request; this is a logic error.
                return Err(Error::Backend("io_uring submission queue overflow".into()));
            }
        }
        self.in_flight += 1;
        Ok(())
    }

    fn flush_submissions(&mut self) {
        if let Err(e) = self.ring.submit() {
            eprintln!("warning: {e}; will retry");
        }
    }

    fn poll(&mut self, done: &mut dyn FnMut(u16, u8)) -> usize {
        let slots = &mut self.slots;
        let free = &mut self.free;
        let mut finished = 0;
        self.ring.reap(&mut |user_data, res| {
            let index = user_data as usize;
            let Some(slot) = slots.get_mut(index) else {
                return;
            };
            if res < 0 {
                slot.status = if res == -libc::EOPNOTSUPP {
                    status::UNSUPP
                } else {
                    status::IOERR
                };
            } else {
                slot.done_bytes += res as u64;
            }
            slot.pending -= 1;
            if slot.pending == 0 {
                // A short read or write is an error: we do not resubmit the rest.
                if slot.status == status::OK && slot.done_bytes < slot.expected {
                    slot.status = status::IOERR;
                }
                done(slot.token, slot.status);
                free.push(index);
                finished += 1;
            }
        });
        self.in_flight -= finished;
        finished
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
