//! A backend that moves no data, like SPDK's null bdev: every request succeeds at once,
//! reads leave the guest's buffers as they are and writes go nowhere. It measures the path
//! itself (rings, parsing, inflight records, completions), which a RAM disk's copy hides;
//! nothing a guest writes can be read back, so it is for benchmarks only.

use std::collections::VecDeque;

use super::{Backend, BackendInfo, BackendQueue};
use crate::request::Request;
use crate::virtio_blk::{status, SECTOR};
use crate::{Error, Result};

/// Completions a queue can hold before it refuses submissions.
const QUEUE_DEPTH: usize = 1024;

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
            info: BackendInfo {
                description: format!("null ({} MiB, stores nothing)", size >> 20),
                capacity_sectors: size / SECTOR,
                block_size: 512,
                physical_block_size: 512,
                optimal_io_size: 0,
                flush: true,
                discard: true,
                write_zeroes: true,
            },
        })
    }
}

impl Backend for NullBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn open_queue(&self, _poller: u64) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(NullQueue {
            done: VecDeque::with_capacity(QUEUE_DEPTH),
        }))
    }
}

struct NullQueue {
    done: VecDeque<u16>,
}

impl BackendQueue for NullQueue {
    fn can_submit(&self) -> bool {
        self.done.len() < QUEUE_DEPTH
    }

    fn submit(&mut self, _request: &Request, token: u16) -> Result<()> {
        if !self.can_submit() {
            return Err(Error::QueueFull("null"));
        }
        self.done.push_back(token);
        Ok(())
    }

    fn poll(&mut self, done: &mut dyn FnMut(u16, u8)) -> usize {
        let n = self.done.len();
        while let Some(token) = self.done.pop_front() {
            done(token, status::OK);
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}
