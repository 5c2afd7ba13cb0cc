//! A RAM disk in a named shared-memory file (e.g. under /dev/shm), so its data outlive the
//! process: what the kill-and-restart tests need.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::created::Creating;
use super::{check_grow, Backend, BackendInfo, ExecuteNow, FinishedAtSubmit, LiveCapacity, Queue};
use crate::image_lock::BackendImageLock;
use crate::request::{Operation, Request};
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

/// The `mem` backend.
pub struct MemBackend {
    /// The mapping queues opened now get. A grow maps the file again, larger, and puts the
    /// new mapping here; queues move to it at their next request after the capacity moved
    /// (both mappings share the file's pages, so what one wrote the other reads).
    map: Arc<Mutex<Arc<memmap2::MmapRaw>>>,
    /// Kept for a grow (lengthened, then mapped again).
    file: File,
    info: BackendInfo,
    capacity: LiveCapacity,
    /// "mem backend PATH", for errors.
    name: String,
    /// The lock QEMU honours on the image.
    image_lock: Arc<BackendImageLock>,
}

impl MemBackend {
    /// Opens (creating or growing to `size` bytes) the file at `path` and maps it shared. On
    /// failure a file it created is removed and a file it grew is cut back.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::BadSize {
                what: format!("mem backend {}", path.display()),
                bytes: size,
            });
        }
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| Error::Io { what, source }
        };
        let mut file = Creating::open(path, true).map_err(io("opening"))?;
        file.grow_to(size).map_err(io("sizing"))?;
        let map = memmap2::MmapOptions::new()
            .len(size as usize)
            .map_raw(file.file())
            .map_err(io("mmap of"))?;
        let image_lock = BackendImageLock::new(file.file(), path)?;
        let file = file.commit();
        Ok(Self {
            map: Arc::new(Mutex::new(Arc::new(map))),
            file,
            info: BackendInfo::in_memory(
                format!("mem:{} ({} MiB)", path.display(), size >> 20),
                size,
            ),
            capacity: LiveCapacity::new(size / SECTOR),
            name: format!("mem backend {}", path.display()),
            image_lock,
        })
    }

    /// Opens the existing file at `path` for reading only (O_RDONLY) and maps it shared and
    /// read-only (PROT_READ), at its length cut to whole sectors: the disk refuses writes,
    /// discards and write zeroes, is never resized, and its image lock lets other readers (a
    /// QEMU with `readonly=on`) share it.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| Error::Io { what, source }
        };
        let file = File::open(path).map_err(io("opening (read-only)"))?;
        let len = file.metadata().map_err(io("stat of"))?.len();
        // A tail shorter than a sector is not served, as for a read-only file backend.
        let bytes = len - len % SECTOR;
        if bytes == 0 {
            return Err(Error::BadSize {
                what: format!("mem backend {}", path.display()),
                bytes: len,
            });
        }
        let map = usize::try_from(bytes)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))
            .and_then(|len| {
                memmap2::MmapOptions::new()
                    .len(len)
                    .map_raw_read_only(&file)
            })
            .map_err(io("read-only mmap of"))?;
        let image_lock = BackendImageLock::new(&file, path)?;
        let mut info = BackendInfo::in_memory(
            format!("mem:{} ({} MiB, read-only)", path.display(), bytes >> 20),
            bytes,
        );
        // Nothing is written through a read-only image: nothing to flush, discard or zero.
        info.flush = false;
        info.discard = false;
        info.write_zeroes = false;
        info.read_only = true;
        Ok(Self {
            map: Arc::new(Mutex::new(Arc::new(map))),
            file,
            info,
            capacity: LiveCapacity::new(bytes / SECTOR),
            name: format!("mem backend {}", path.display()),
            image_lock,
        })
    }

    fn current_map(&self) -> Arc<memmap2::MmapRaw> {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Backend for MemBackend {
    /// msync: the mapping's dirty pages written back to the file (nothing to write on
    /// /dev/shm, where the pages are the file).
    fn sync(&self) -> Result<()> {
        self.current_map().flush().map_err(|source| Error::Io {
            what: "msync of the RAM disk's mapping".into(),
            source,
        })
    }

    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn image_lock(&self) -> Option<&Arc<BackendImageLock>> {
        Some(&self.image_lock)
    }

    fn open_queue(&self, _poller: u64) -> Result<Queue> {
        Ok(FinishedAtSubmit::new(MemExecutor {
            map: self.current_map(),
            current: self.map.clone(),
            writable: !self.info.read_only,
        })
        .into())
    }

    fn live_capacity(&self) -> Option<LiveCapacity> {
        Some(self.capacity.clone())
    }

    /// Lengthens the file and maps it again at the new length. A failure at either step
    /// leaves the file at its length and the old mapping in use.
    fn grow(&self, bytes: u64) -> Result<()> {
        // One grow at a time; queues only clone the mapping under this lock, briefly.
        let mut current = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let what = &self.name;
        if self.info.read_only {
            return Err(Error::BadArgument(format!(
                "{what}: opened read-only; a read-only image is not resized"
            )));
        }
        let Some(sectors) = check_grow(what, self.capacity.sectors(), bytes)? else {
            return Ok(());
        };
        let io = |doing: &str| {
            let what = format!("{doing} ({what}, to {bytes} bytes)");
            move |source| Error::Io { what, source }
        };
        let old_len = self.file.metadata().map_err(io("stat"))?.len();
        self.file
            .set_len(bytes)
            .map_err(io("lengthening the file"))?;
        let map = match usize::try_from(bytes)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))
            .and_then(|len| memmap2::MmapOptions::new().len(len).map_raw(&self.file))
        {
            Ok(map) => map,
            Err(e) => {
                // Nothing maps beyond the old length: cutting back loses nothing.
                if let Err(cut) = self.file.set_len(old_len) {
                    tracing::error!(
                        "{what}: the file could not be cut back to {old_len} bytes after a failed grow: {cut}"
                    );
                }
                return Err(io("mmap")(e));
            }
        };
        *current = Arc::new(map);
        drop(current);
        self.capacity.set(sectors);
        Ok(())
    }
}

/// A queue's view of the RAM disk.
pub struct MemExecutor {
    map: Arc<memmap2::MmapRaw>,
    /// The backend's mapping now (a grow replaces it).
    current: Arc<Mutex<Arc<memmap2::MmapRaw>>>,
    /// False for a read-only backend, whose mapping is PROT_READ: a store into it would
    /// kill the whole target (SIGSEGV), so a write that got past the device's read-only
    /// check is failed here rather than trusted never to come.
    writable: bool,
}

impl ExecuteNow for MemExecutor {
    const NAME: &'static str = "mem";

    fn capacity_changed(&mut self) {
        self.map = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
    }

    fn execute(&self, r: &Request) -> u8 {
        let disk = self.map.as_mut_ptr();
        if !self.writable
            && matches!(
                r.op,
                Operation::Write | Operation::Discard | Operation::WriteZeroes { .. }
            )
        {
            return status::IOERR;
        }
        match r.op {
            Operation::Read | Operation::Write => {
                let mut off = (r.sector * SECTOR) as usize;
                for s in r.data() {
                    let len = s.len as usize;
                    // Bounds were checked against the capacity by request::parse.
                    // SAFETY: off + len <= capacity bytes = the mapping; `s` is guest memory
                    // translated for `len` bytes.
                    unsafe {
                        if r.op == Operation::Read {
                            std::ptr::copy_nonoverlapping(disk.add(off), s.host, len);
                        } else {
                            std::ptr::copy_nonoverlapping(s.host, disk.add(off), len);
                        }
                    }
                    off += len;
                }
                status::OK
            }
            Operation::Flush => status::OK,
            Operation::Discard | Operation::WriteZeroes { .. } => {
                for &(sector, count) in &r.ranges[..r.range_count] {
                    // SAFETY: ranges were checked against the capacity by request::parse.
                    unsafe {
                        std::ptr::write_bytes(
                            disk.add((sector * SECTOR) as usize),
                            0,
                            count as usize * SECTOR as usize,
                        )
                    };
                }
                status::OK
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::created::Scratch;

    /// 256 TiB: a length tmpfs takes (sparse) but no mmap can place, as it is the whole of a
    /// 48-bit user address space (x86-64's is 128 TiB); 64 TiB mapped fine on a 24 GiB host.
    const UNMAPPABLE: u64 = 1 << 48;

    #[test]
    fn a_failed_open_removes_the_file_it_created() {
        let disk = Scratch::new("mem-unmappable");
        let err = MemBackend::open(&disk.0, UNMAPPABLE)
            .err()
            .expect("no 256 TiB mapping");
        // The error keeps what was done to which file, and the OS cause.
        assert!(
            matches!(&err, Error::Io { what, .. } if what.contains(&*disk.0.to_string_lossy()))
        );
        assert!(std::error::Error::source(&err).is_some());
        assert!(!disk.0.exists(), "{err}: the file it created is gone");
    }

    #[test]
    fn a_failed_open_leaves_a_shorter_existing_file_as_it_was() {
        let disk = Scratch::new("mem-existing");
        let content: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        std::fs::write(&disk.0, &content).unwrap();
        assert!(MemBackend::open(&disk.0, UNMAPPABLE).is_err());
        disk.assert_holds(&content, "neither removed nor left grown");
    }

    #[test]
    fn a_grow_maps_the_new_length_and_a_failed_one_changes_nothing() {
        let disk = Scratch::new("mem-grow");
        let backend = MemBackend::open(&disk.0, 1 << 20).unwrap();
        let mut queue = MemExecutor {
            map: backend.current_map(),
            current: backend.map.clone(),
            writable: true,
        };
        // SAFETY: inside the 1 MiB mapping.
        unsafe { queue.map.as_mut_ptr().add(4096).write(0x5a) };
        assert!(backend.grow(512 * 3).is_err(), "a shrink is refused");
        assert!(backend.grow((2 << 20) + 1).is_err(), "not whole sectors");
        let before = std::fs::read(&disk.0).unwrap();
        let err = backend.grow(UNMAPPABLE).unwrap_err();
        assert!(err.to_string().contains("mmap"), "{err}");
        disk.assert_holds(&before, "a failed grow leaves the file as it was");
        assert_eq!(backend.capacity_sectors(), (1 << 20) / 512);
        backend.grow(1 << 20).unwrap();
        assert_eq!(
            backend.capacity_sectors(),
            (1 << 20) / 512,
            "the same size: no change"
        );
        backend.grow(4 << 20).unwrap();
        assert_eq!(backend.capacity_sectors(), (4 << 20) / 512);
        assert_eq!(std::fs::metadata(&disk.0).unwrap().len(), 4 << 20);
        // The queue moves to the new mapping; what it wrote before is there.
        queue.capacity_changed();
        assert!(queue.map.len() >= 4 << 20);
        // SAFETY: inside the 4 MiB mapping.
        unsafe {
            assert_eq!(queue.map.as_ptr().add(4096).read(), 0x5a);
            queue.map.as_mut_ptr().add((4 << 20) - 1).write(7);
        }
        let data = std::fs::read(&disk.0).unwrap();
        assert_eq!((data[4096], data[(4 << 20) - 1]), (0x5a, 7));
    }

    /// A request on `buffer`, from sector `sector` (a discard: its sectors as one range).
    fn request(op: Operation, sector: u64, buffer: &mut [u8]) -> Request {
        let mut r = Request::default();
        r.op = op;
        r.sector = sector;
        r.data_count = 1;
        r.data_len = buffer.len() as u64;
        r.load(&[vfblk_vhost::chain::Segment {
            gpa: 0,
            host: buffer.as_mut_ptr(),
            len: buffer.len() as u32,
            write: op == Operation::Read,
        }]);
        if op == Operation::Discard {
            r.ranges[0] = (sector, (buffer.len() as u64 / SECTOR) as u32);
            r.range_count = 1;
        }
        r
    }

    #[test]
    fn a_read_only_open_reads_the_file_and_never_writes_it() {
        let disk = Scratch::new("mem-ro");
        // 1 MiB and a 100-byte tail, which is not served.
        let content: Vec<u8> = (0..(1u32 << 20) + 100).map(|i| (i % 251) as u8).collect();
        std::fs::write(&disk.0, &content).unwrap();
        let backend = MemBackend::open_read_only(&disk.0).unwrap();
        let info = backend.info();
        assert!(info.read_only && !info.flush && !info.discard && !info.write_zeroes);
        assert_eq!(backend.capacity_sectors(), (1 << 20) / SECTOR);
        // SAFETY: F_GETFL on the backend's own open fd.
        let flags = unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&backend.file),
                libc::F_GETFL,
            )
        };
        assert_eq!(flags & libc::O_ACCMODE, libc::O_RDONLY, "{flags:o}");
        let map = backend.current_map();
        let start = format!("{:x}-", map.as_ptr() as usize);
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.starts_with(&start))
            .expect("the mapping");
        assert!(line.split_whitespace().nth(1) == Some("r--s"), "{line}");
        let err = backend.grow(2 << 20).unwrap_err();
        assert!(err.to_string().contains("not resized"), "{err}");
        assert_eq!(backend.capacity_sectors(), (1 << 20) / SECTOR);

        let queue = MemExecutor {
            map: backend.current_map(),
            current: backend.map.clone(),
            writable: false,
        };
        let mut buffer = vec![0u8; 8192];
        assert_eq!(
            queue.execute(&request(Operation::Read, 8, &mut buffer)),
            status::OK
        );
        assert_eq!(buffer, content[4096..4096 + 8192]);
        buffer.fill(0xee);
        for op in [
            Operation::Write,
            Operation::Discard,
            Operation::WriteZeroes { unmap: false },
        ] {
            assert_eq!(
                queue.execute(&request(op, 8, &mut buffer)),
                status::IOERR,
                "{op:?}"
            );
        }
        assert_eq!(
            queue.execute(&request(Operation::Flush, 0, &mut [])),
            status::OK
        );
        drop((queue, map, backend));
        disk.assert_holds(&content, "a read-only disk leaves its file as it was");

        let short = Scratch::new("mem-ro-short");
        std::fs::write(&short.0, [1u8; 511]).unwrap();
        let err = MemBackend::open_read_only(&short.0)
            .err()
            .expect("no whole sector");
        assert!(matches!(err, Error::BadSize { bytes: 511, .. }), "{err}");
        let missing = Scratch::new("mem-ro-missing");
        let err = MemBackend::open_read_only(&missing.0)
            .err()
            .expect("no file");
        assert!(err.to_string().contains("opening (read-only)"), "{err}");
        assert!(!missing.0.exists(), "a read-only open creates nothing");
    }

    #[test]
    fn an_open_keeps_what_it_created_or_grew() {
        let new = Scratch::new("mem-new");
        drop(MemBackend::open(&new.0, 1 << 20).unwrap());
        let meta = std::fs::metadata(&new.0).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "a new disk is private"
        );
        let short = Scratch::new("mem-short");
        std::fs::write(&short.0, [7u8; 512]).unwrap();
        drop(MemBackend::open(&short.0, 1 << 20).unwrap());
        let mut grown = vec![0u8; 1 << 20];
        grown[..512].fill(7);
        short.assert_holds(&grown, "grown, with its data");
    }
}
