//! A backend that moves no data, like SPDK's null bdev: every request succeeds at once,
//! reads leave the guest's buffers as they are and writes go nowhere. It measures the path
//! itself (rings, parsing, inflight records, completions), which a RAM disk's copy hides;
//! nothing a guest writes can be read back, so it is for benchmarks only.

use super::{Backend, BackendInfo, ExecuteNow, FinishedAtSubmit, Queue};
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

    fn open_queue(&self, _poller: u64) -> Result<Queue> {
        Ok(FinishedAtSubmit::new(Nothing).into())
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
