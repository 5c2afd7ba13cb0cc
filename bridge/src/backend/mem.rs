//! A RAM disk in a named shared-memory file (e.g. under /dev/shm), so its data outlive the
//! process: what the kill-and-restart tests need.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use super::{Backend, BackendInfo, BackendQueue, ExecuteNow, FinishedAtSubmit};
use crate::request::{Operation, Request};
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

/// The `mem` backend.
pub struct MemBackend {
    map: Arc<memmap2::MmapRaw>,
    info: BackendInfo,
}

impl MemBackend {
    /// Opens (creating or growing to `size` bytes) the file at `path` and maps it shared.
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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("opening"))?;
        if file.metadata().map_err(io("stat of"))?.len() < size {
            file.set_len(size).map_err(io("sizing"))?;
        }
        let map = memmap2::MmapOptions::new()
            .len(size as usize)
            .map_raw(&file)
            .map_err(io("mmap of"))?;
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
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self, _poller: u64) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(FinishedAtSubmit::new(MemExecutor {
            map: self.map.clone(),
        })))
    }
}

/// A queue's view of the RAM disk.
struct MemExecutor {
    map: Arc<memmap2::MmapRaw>,
}

impl ExecuteNow for MemExecutor {
    const NAME: &'static str = "mem";

    fn execute(&self, r: &Request) -> u8 {
        let disk = self.map.as_mut_ptr();
        match r.op {
            Operation::Read | Operation::Write => {
                let mut off = (r.sector * SECTOR) as usize;
                for s in &r.data[..r.data_count] {
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
