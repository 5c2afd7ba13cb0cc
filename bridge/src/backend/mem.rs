//! A RAM disk in a named shared-memory file (e.g. under /dev/shm), so its data outlive the
//! process: what the kill-and-restart tests need.

use std::path::Path;
use std::sync::Arc;

use super::created::Creating;
use super::{Backend, BackendInfo, ExecuteNow, FinishedAtSubmit, Queue};
use crate::request::{Operation, Request};
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

/// The `mem` backend.
pub struct MemBackend {
    map: Arc<memmap2::MmapRaw>,
    info: BackendInfo,
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
        // The mapping keeps the memory; the file descriptor is not needed.
        file.commit();
        Ok(Self {
            map: Arc::new(map),
            info: BackendInfo::in_memory(
                format!("mem:{} ({} MiB)", path.display(), size >> 20),
                size,
            ),
        })
    }
}

impl Backend for MemBackend {
    /// msync: the mapping's dirty pages written back to the file (nothing to write on
    /// /dev/shm, where the pages are the file).
    fn sync(&self) -> Result<()> {
        self.map.flush().map_err(|source| Error::Io {
            what: "msync of the RAM disk's mapping".into(),
            source,
        })
    }

    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self, _poller: u64) -> Result<Queue> {
        Ok(FinishedAtSubmit::new(MemExecutor {
            map: self.map.clone(),
        })
        .into())
    }
}

/// A queue's view of the RAM disk.
pub struct MemExecutor {
    map: Arc<memmap2::MmapRaw>,
}

impl ExecuteNow for MemExecutor {
    const NAME: &'static str = "mem";

    fn execute(&self, r: &Request) -> u8 {
        let disk = self.map.as_mut_ptr();
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
