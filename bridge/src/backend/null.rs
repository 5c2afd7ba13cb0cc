//! A backend that moves no data, like SPDK's null bdev: every request succeeds at once,
//! reads leave the guest's buffers as they are and writes go nowhere. It measures the path
//! itself (rings, parsing, inflight records, completions), which a RAM disk's copy hides;
//! nothing a guest writes can be read back, so it is for benchmarks only.

use super::{Backend, BackendInfo, BackendQueue, Finished};
use crate::request::Request;
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

/// The `null` backend.
pub struct NullBackend {
    info: BackendInfo,
}

impl NullBackend {
    /// A disk of `size` bytes that stores nothing.
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 || size % SECTOR != 0 {
            return Err(Error::BadSize {
                what: "null backend".into(),
                bytes: size,
            });
        }
        Ok(Self {
            info: BackendInfo::in_memory(
                format!("null ({} MiB, stores nothing)", size >> 20),
                size,
            ),
        })
    }
}

impl Backend for NullBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self, _poller: u64) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(NullQueue {
            finished: Finished::new(),
        }))
    }
}

struct NullQueue {
    finished: Finished,
}

impl BackendQueue for NullQueue {
    fn can_submit(&self) -> bool {
        self.finished.has_room()
    }

    fn submit(&mut self, _request: &Request, token: u16) -> Result<()> {
        self.finished.push("null", token, status::OK)
    }

    fn poll(&mut self, done: &mut dyn FnMut(u16, u8)) -> usize {
        self.finished.poll(done)
    }

    fn in_flight(&self) -> usize {
        self.finished.len()
    }
}
