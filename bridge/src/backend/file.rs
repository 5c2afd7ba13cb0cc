//! A file or block device, with O_DIRECT where it works (and where the guest's buffers are
//! aligned for it), through io_uring: iovecs point straight into guest memory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use super::created::Creating;
use super::{check_grow, Backend, BackendInfo, BackendQueue, LiveCapacity, Queue};
use crate::image_lock::BackendImageLock;
use crate::request::MAX_SEGMENTS;
use crate::request::{Operation, Request, MAX_DISCARD_SEGMENTS};
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Requests in flight per queue.
const DEPTH: usize = 128;

/// The `file` backend.
pub struct FileBackend {
    direct: Option<Arc<File>>,
    buffered: Arc<File>,
    info: BackendInfo,
    /// FALLOC_FL_ZERO_RANGE is believed to work on this file. It is tried first; where the
    /// filesystem refuses it (tmpfs) the refused request is redone with zero buffers, as
    /// QEMU falls back to, and every queue writes zeros from then on. (Tried at the first
    /// request, not probed at open: an open sits inside a restart's pause, and an fallocate
    /// can wait on the filesystem.)
    zero_range: Arc<AtomicBool>,
    /// A regular file (a block device's size is its own, not ours to change).
    regular: bool,
    capacity: LiveCapacity,
    /// One grow at a time.
    growing: std::sync::Mutex<()>,
    /// "file backend PATH", for errors.
    name: String,
    /// The lock QEMU honours on the image.
    image_lock: Arc<BackendImageLock>,
}

/// Bytes of zeros one fallback write carries.
const ZERO_CHUNK: usize = 256 << 10;

impl FileBackend {
    /// Opens `path` (a regular file, created with `size` bytes if missing or shorter, or a
    /// block device whose size is used). On failure a file it created is removed and a file
    /// it grew is cut back.
    pub fn open(path: &Path, size: Option<u64>) -> Result<Self> {
        // Checked before the filesystem is touched: a size below one sector is no disk.
        if let Some(bytes) = size.filter(|&s| s < SECTOR) {
            return Err(Error::BadSize {
                what: format!("file backend {}", path.display()),
                bytes,
            });
        }
        let mut file = Creating::open(path, size.is_some()).map_err(io(path, "opening"))?;
        if let Some(size) = size {
            let meta = file.file().metadata().map_err(io(path, "stat of"))?;
            if !meta.file_type().is_block_device() {
                file.grow_to(size).map_err(io(path, "sizing"))?;
            }
        }
        let backend = Self::serve(file.file(), path, false)?;
        // Only now is the file the backend's: a failure above removed or cut it back.
        let _ = file.commit();
        Ok(backend)
    }

    /// Opens the existing file or block device at `path` for reading only (O_RDONLY): the
    /// disk refuses writes, discards and write zeroes, and its image lock lets other readers
    /// (a QEMU with `readonly=on`) share it.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(io(path, "opening (read-only)"))?;
        Self::serve(&file, path, true)
    }

    /// The backend over `file`, open at `path` (for writing unless `read_only`).
    fn serve(file: &File, path: &Path, read_only: bool) -> Result<Self> {
        let meta = file.metadata().map_err(io(path, "stat of"))?;
        let capacity = if meta.file_type().is_block_device() {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes a u64.
            if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) } != 0 {
                return Err(io(path, "BLKGETSIZE64 on")(std::io::Error::last_os_error()));
            }
            bytes
        } else {
            meta.len()
        };
        if capacity < SECTOR {
            return Err(Error::BadSize {
                what: format!("file backend {}", path.display()),
                bytes: capacity,
            });
        }
        let buffered = file
            .try_clone()
            .map_err(io(path, "duplicating the fd of"))?;
        // O_DIRECT fails on some filesystems (tmpfs): then every request goes buffered.
        let direct = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()
            .map(Arc::new);
        // Discard and write zeroes change the image: not for a read-only one, nor for a
        // block device (its own discard is not ours to promise).
        let changes_extents = !read_only && !meta.file_type().is_block_device();
        Ok(Self {
            info: BackendInfo {
                description: format!(
                    "file:{} ({} MiB, {}{})",
                    path.display(),
                    capacity >> 20,
                    if direct.is_some() {
                        "O_DIRECT for aligned buffers, io_uring"
                    } else {
                        "buffered, io_uring"
                    },
                    if read_only { ", read-only" } else { "" }
                ),
                capacity_sectors: capacity / SECTOR,
                block_size: 512,
                // Page-cache and O_DIRECT granularity: smaller writes read-modify-write.
                physical_block_size: 4096,
                optimal_io_size: 0,
                // Nothing is written through a read-only image, so nothing is to flush.
                flush: !read_only,
                discard: changes_extents,
                write_zeroes: changes_extents,
                read_only,
            },
            zero_range: Arc::new(AtomicBool::new(changes_extents)),
            regular: meta.file_type().is_file(),
            capacity: LiveCapacity::new(capacity / SECTOR),
            growing: std::sync::Mutex::new(()),
            name: format!("file backend {}", path.display()),
            image_lock: BackendImageLock::new(&buffered, path)?,
            direct,
            buffered: Arc::new(buffered),
        })
    }
}

/// An I/O error's context: what was done to which file.
fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let what = format!("{what} {}", path.display());
    move |source| Error::Io { what, source }
}

impl FileBackend {
    /// Whether write zeroes uses FALLOC_FL_ZERO_RANGE (false: it writes zero buffers).
    pub fn zero_range(&self) -> bool {
        self.zero_range.load(Ordering::Relaxed)
    }
}

impl Backend for FileBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn image_lock(&self) -> Option<&Arc<BackendImageLock>> {
        Some(&self.image_lock)
    }

    /// Writes through the page cache (unaligned buffers, filesystems without O_DIRECT) sit
    /// in this host's memory until written back: fdatasync, which also flushes the device's
    /// write cache for the O_DIRECT ones.
    fn sync(&self) -> Result<()> {
        self.buffered.sync_data().map_err(|source| Error::Io {
            what: "fdatasync of the backing file".into(),
            source,
        })
    }

    fn live_capacity(&self) -> Option<LiveCapacity> {
        Some(self.capacity.clone())
    }

    /// Lengthens the file (sparse: nothing is written); queues need nothing new, their
    /// requests go by offset. A failed ftruncate changes nothing.
    fn grow(&self, bytes: u64) -> Result<()> {
        let _one = self.growing.lock().unwrap_or_else(|e| e.into_inner());
        let what = &self.name;
        if self.info.read_only {
            return Err(Error::BadArgument(format!(
                "{what}: opened read-only; a read-only image is not resized"
            )));
        }
        if !self.regular {
            return Err(Error::BadArgument(format!(
                "{what}: not a regular file; a block device's size is its own (resize the device, then recreate the backend)"
            )));
        }
        let Some(sectors) = check_grow(what, self.capacity.sectors(), bytes)? else {
            return Ok(());
        };
        let len = self.buffered.metadata().map_err(|source| Error::Io {
            what: format!("stat ({what})"),
            source,
        })?;
        if len.len() < bytes {
            self.buffered.set_len(bytes).map_err(|source| Error::Io {
                what: format!("lengthening the file to {bytes} bytes ({what})"),
                source,
            })?;
        }
        self.capacity.set(sectors);
        Ok(())
    }

    fn open_queue(&self, _poller: u64) -> Result<Queue> {
        let entries = DEPTH as u32 * 2;
        let ring = IoUring::new(entries).map_err(|source| Error::Io {
            what: format!("io_uring_setup with {entries} entries"),
            source,
        })?;
        Ok(Queue::from(FileQueue {
            ring,
            direct: self.direct.clone(),
            buffered: self.buffered.clone(),
            slots: (0..DEPTH).map(|_| FileIo::default()).collect(),
            free: (0..DEPTH).rev().collect(),
            in_flight: 0,
            zero_range: self.zero_range.clone(),
            // Allocated now: the fallback may be needed at any request.
            zeros: vec![0u8; ZERO_CHUNK],
            zero_work: std::collections::VecDeque::with_capacity(DEPTH),
        }))
    }
}

struct FileIo {
    token: u16,
    pending: u32,
    status: u8,
    expected: u64,
    done_bytes: u64,
    iovecs: Box<[libc::iovec; MAX_SEGMENTS]>,
    /// A write zeroes sent as FALLOC_FL_ZERO_RANGE: its ranges (byte offset, bytes), to be
    /// redone with zero writes if the filesystem refuses.
    zero_ranges: [(u64, u64); MAX_DISCARD_SEGMENTS],
    zero_count: usize,
    /// The filesystem refused one of them (EOPNOTSUPP).
    zero_refused: bool,
}

impl Default for FileIo {
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
            zero_ranges: [(0, 0); MAX_DISCARD_SEGMENTS],
            zero_count: 0,
            zero_refused: false,
        }
    }
}

// SAFETY: iovecs point into guest memory that stays mapped while requests are in flight;
// the queue is used by one thread.
unsafe impl Send for FileIo {}

pub struct FileQueue {
    ring: IoUring,
    direct: Option<Arc<File>>,
    buffered: Arc<File>,
    slots: Vec<FileIo>,
    free: Vec<usize>,
    in_flight: usize,
    zero_range: Arc<AtomicBool>,
    /// A zeroed buffer for write-zeroes fallback writes.
    zeros: Vec<u8>,
    /// Ranges still to be zeroed by writes: (slot, byte offset, bytes). Each counts once in
    /// its slot's `pending` until its last write is issued.
    zero_work: std::collections::VecDeque<(usize, u64, u64)>,
}

impl FileQueue {
    /// Issues fallback zero writes while the submission queue has room beyond what one new
    /// request needs.
    fn issue_zero_work(&mut self) {
        while let Some(&(index, offset, left)) = self.zero_work.front() {
            let mut sq = self.ring.submission();
            if sq.capacity() - sq.len() <= MAX_DISCARD_SEGMENTS {
                return;
            }
            let chunk = left.min(ZERO_CHUNK as u64);
            let sqe = opcode::Write::new(
                types::Fd(self.buffered.as_raw_fd()),
                self.zeros.as_ptr(),
                chunk as u32,
            )
            .offset(offset)
            .build()
            .user_data(index as u64);
            // SAFETY: the zero buffer lives as long as the queue, which outlives its
            // completions (stop drains them); room was checked above.
            if unsafe { sq.push(&sqe) }.is_err() {
                return;
            }
            drop(sq);
            let slot = &mut self.slots[index];
            slot.pending += 1;
            slot.expected += chunk;
            let front = self.zero_work.front_mut().expect("checked above");
            front.1 += chunk;
            front.2 -= chunk;
            if front.2 == 0 {
                self.zero_work.pop_front();
                // The range is fully issued: its own count goes; its writes still hold the slot.
                slot.pending -= 1;
            }
        }
    }
}

impl BackendQueue for FileQueue {
    fn can_submit(&self) -> bool {
        // SAFETY: `submission_shared` only reads the queue's counters; no other handle to
        // the submission queue exists while we hold `&self`.
        let sq = unsafe { self.ring.submission_shared() };
        !self.free.is_empty() && sq.capacity() - sq.len() > MAX_DISCARD_SEGMENTS
    }

    fn submit(&mut self, r: &Request, token: u16) -> Result<()> {
        let index = self.free.pop().ok_or(Error::QueueFull("file"))?;
        let slot = &mut self.slots[index];
        slot.token = token;
        slot.status = status::OK;
        slot.done_bytes = 0;
        slot.expected = 0;
        slot.zero_count = 0;
        slot.zero_refused = false;
        let index_tag = index as u64;
        let mut sqes: [Option<squeue::Entry>; MAX_DISCARD_SEGMENTS] =
            [const { None }; MAX_DISCARD_SEGMENTS];
        let mut n = 0;
        match r.op {
            Operation::Read | Operation::Write => {
                let mut aligned = true;
                for (i, s) in r.data().iter().enumerate() {
                    aligned &= (s.host as usize) % 512 == 0 && s.len % 512 == 0;
                    slot.iovecs[i] = libc::iovec {
                        iov_base: s.host.cast(),
                        iov_len: s.len as usize,
                    };
                }
                let fd = types::Fd(match (&self.direct, aligned) {
                    (Some(d), true) => d.as_raw_fd(),
                    _ => self.buffered.as_raw_fd(),
                });
                slot.expected = r.data_len;
                let (iovecs, count, offset) =
                    (slot.iovecs.as_ptr(), r.data_count as u32, r.sector * SECTOR);
                sqes[0] = Some(if r.op == Operation::Read {
                    opcode::Readv::new(fd, iovecs, count).offset(offset).build()
                } else {
                    // Writethrough: RWF_DSYNC makes the write complete only once stable.
                    opcode::Writev::new(fd, iovecs, count)
                        .offset(offset)
                        .rw_flags(if r.durable { libc::RWF_DSYNC } else { 0 })
                        .build()
                });
                n = 1;
            }
            Operation::Flush => {
                sqes[0] = Some(opcode::Fsync::new(types::Fd(self.buffered.as_raw_fd())).build());
                n = 1;
            }
            Operation::WriteZeroes { unmap: false } if !self.zero_range.load(Ordering::Relaxed) => {
                for &(sector, count) in &r.ranges[..r.range_count] {
                    self.zero_work
                        .push_back((index, sector * SECTOR, u64::from(count) * SECTOR));
                }
                slot.pending = r.range_count as u32;
                self.in_flight += 1;
                return Ok(());
            }
            Operation::Discard | Operation::WriteZeroes { .. } => {
                let mode = match r.op {
                    Operation::WriteZeroes { unmap: false } => {
                        FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                    }
                    _ => FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                };
                let zeroing = matches!(r.op, Operation::WriteZeroes { unmap: false });
                for &(sector, count) in &r.ranges[..r.range_count] {
                    if zeroing {
                        slot.zero_ranges[slot.zero_count] =
                            (sector * SECTOR, u64::from(count) * SECTOR);
                        slot.zero_count += 1;
                    }
                    sqes[n] = Some(
                        opcode::Fallocate::new(
                            types::Fd(self.buffered.as_raw_fd()),
                            u64::from(count) * SECTOR,
                        )
                        .offset(sector * SECTOR)
                        .mode(mode)
                        .build(),
                    );
                    n += 1;
                }
            }
        }
        slot.pending = n as u32;
        let mut sq = self.ring.submission();
        for sqe in sqes[..n].iter_mut().filter_map(Option::take) {
            // SAFETY: the iovecs live in the slot and the buffers in guest memory, both until
            // the completion is reaped; the fds are kept open by the queue.
            if unsafe { sq.push(&sqe.user_data(index_tag)) }.is_err() {
                // can_submit reserved room for the largest request; this is a logic error.
                return Err(Error::QueueFull("io_uring submission"));
            }
        }
        drop(sq);
        self.in_flight += 1;
        Ok(())
    }

    fn flush_submissions(&mut self) {
        self.issue_zero_work();
        // One system call per batch, none when there is nothing new; entries the kernel did
        // not take stay queued for the next call.
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            tracing::warn!("io_uring_enter: {e}; will retry");
        }
    }

    fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize {
        let slots = &mut self.slots;
        let free = &mut self.free;
        let zero_work = &mut self.zero_work;
        let mut finished = 0;
        let mut redo = false;
        for cqe in self.ring.completion() {
            let (index, res) = (cqe.user_data() as usize, cqe.result());
            let Some(slot) = slots.get_mut(index) else {
                continue;
            };
            if res == -libc::EOPNOTSUPP && slot.zero_count > 0 {
                // The filesystem has no ZERO_RANGE: redo this request with zero writes.
                slot.zero_refused = true;
            } else if res < 0 {
                slot.status = if res == -libc::EOPNOTSUPP {
                    status::UNSUPP
                } else {
                    status::IOERR
                };
            } else {
                slot.done_bytes += res as u64;
            }
            slot.pending -= 1;
            if slot.pending == 0 && slot.zero_refused {
                if self.zero_range.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        "the file's filesystem refuses FALLOC_FL_ZERO_RANGE: write zeroes writes zero buffers from now on"
                    );
                }
                slot.zero_refused = false;
                slot.done_bytes = 0;
                slot.expected = 0;
                slot.pending = slot.zero_count as u32;
                for &(offset, bytes) in &slot.zero_ranges[..slot.zero_count] {
                    zero_work.push_back((index, offset, bytes));
                }
                slot.zero_count = 0;
                redo = true;
                continue;
            }
            if slot.pending == 0 {
                // A short read or write is an error: we do not resubmit the rest.
                if slot.status == status::OK && slot.done_bytes < slot.expected {
                    slot.status = status::IOERR;
                }
                done.push((slot.token, slot.status));
                free.push(index);
                finished += 1;
            }
        }
        self.in_flight -= finished;
        if redo {
            // Rare (once per file): issued at once rather than at the next batch.
            self.flush_submissions();
        }
        finished
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::created::Scratch;

    /// A length `set_len` refuses (above i64::MAX), after the file was opened.
    const UNSETTABLE: u64 = !(SECTOR - 1);

    #[test]
    fn a_grow_lengthens_the_file_and_a_failed_one_changes_nothing() {
        let disk = Scratch::new("file-grow");
        let backend = FileBackend::open(&disk.0, Some(1 << 20)).unwrap();
        std::fs::write(&disk.0, [3u8; 1 << 20]).unwrap();
        let before = std::fs::read(&disk.0).unwrap();
        let err = backend.grow(UNSETTABLE).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
        assert!(backend.grow(512).is_err(), "a shrink is refused");
        disk.assert_holds(&before, "a failed grow leaves the file as it was");
        assert_eq!(backend.capacity_sectors(), (1 << 20) / SECTOR);
        backend.grow(3 << 20).unwrap();
        assert_eq!(backend.capacity_sectors(), (3 << 20) / SECTOR);
        let mut grown = before.clone();
        grown.resize(3 << 20, 0);
        disk.assert_holds(&grown, "grown, its data kept");
    }

    #[test]
    fn a_size_of_zero_leaves_no_file() {
        let disk = Scratch::new("file-zero");
        let err = FileBackend::open(&disk.0, Some(0))
            .err()
            .expect("no 0-byte disk");
        assert!(matches!(err, Error::BadSize { bytes: 0, .. }), "{err}");
        assert!(!disk.0.exists());
    }

    #[test]
    fn a_failed_open_removes_the_file_it_created() {
        let disk = Scratch::new("file-unsettable");
        let err = FileBackend::open(&disk.0, Some(UNSETTABLE))
            .err()
            .expect("no 16 EiB file");
        assert!(matches!(&err, Error::Io { what, .. } if what.starts_with("sizing")));
        assert!(std::error::Error::source(&err).is_some());
        assert!(!disk.0.exists(), "{err}: the file it created is gone");
    }

    #[test]
    fn a_failed_open_leaves_an_existing_file_as_it_was() {
        let disk = Scratch::new("file-existing");
        let content: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        for size in [Some(400), Some(0), Some(UNSETTABLE), None] {
            std::fs::write(&disk.0, &content).unwrap();
            assert!(FileBackend::open(&disk.0, size).is_err(), "{size:?}");
            disk.assert_holds(
                &content,
                &format!("{size:?}: neither removed nor left grown"),
            );
        }
    }
}
