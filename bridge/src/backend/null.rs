//! A backend that moves no data, like SPDK's null bdev: every request succeeds at once,
//! reads leave the guest's buffers as they are and writes go nowhere. It measures the path
//! itself (rings, parsing, inflight records, completions), which a RAM disk's copy hides;
//! nothing a guest writes can be read back, so it is for benchmarks only.

use super::{check_grow, Backend, BackendInfo, ExecuteNow, FinishedAtSubmit, LiveCapacity, Queue};
use crate::request::Request;
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

/// The `null` backend.
pub struct NullBackend {
    info: BackendInfo,
    capacity: LiveCapacity,
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
            capacity: LiveCapacity::new(size / SECTOR),
        })
    }
}

impl Backend for NullBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self, _poller: u64) -> Result<Queue> {
        Ok(FinishedAtSubmit::new(Nothing).into())
    }

    fn live_capacity(&self) -> Option<LiveCapacity> {
        Some(self.capacity.clone())
    }

    /// Nothing is stored: only the number changes.
    fn grow(&self, bytes: u64) -> Result<()> {
        if let Some(sectors) = check_grow("null backend", self.capacity.sectors(), bytes)? {
            self.capacity.set(sectors);
        }
        Ok(())
    }
}

/// What a null queue does with a request: nothing, successfully.
pub struct Nothing;

impl ExecuteNow for Nothing {
    const NAME: &'static str = "null";

    fn execute(&self, _request: &Request) -> u8 {
        status::OK
    }
}
