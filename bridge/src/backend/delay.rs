//! A wrapper that holds each completion for a random time up to a limit and releases ripe ones
//! shuffled, so tests can force out-of-order completion (what breaks recovery without inflight
//! tracking: the set of completed requests is then not a prefix of the avail ring).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Backend, BackendInfo, BackendQueue, Queue};
use crate::request::Request;
use crate::Result;

/// Delays every completion of the inner backend by a random time in [0, `delay`] and releases
/// them in a random order within each poll.
pub struct DelayBackend {
    inner: Arc<dyn Backend>,
    delay: Duration,
    info: BackendInfo,
}

impl DelayBackend {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Backend>, delay: Duration) -> Self {
        let mut info = inner.info().clone();
        info.description = format!(
            "{} (completions held {delay:?} and shuffled)",
            info.description
        );
        Self { inner, delay, info }
    }
}

impl Backend for DelayBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn sync(&self) -> Result<()> {
        self.inner.sync()
    }

    fn live_capacity(&self) -> Option<super::LiveCapacity> {
        self.inner.live_capacity()
    }

    fn grow(&self, bytes: u64) -> Result<()> {
        self.inner.grow(bytes)
    }

    fn serves_one_frontend(&self) -> bool {
        self.inner.serves_one_frontend()
    }

    fn image_lock(&self) -> Option<&std::sync::Arc<crate::image_lock::BackendImageLock>> {
        self.inner.image_lock()
    }

    fn open_queue(&self, poller: u64) -> Result<Queue> {
        Ok(Queue::from(DelayQueue {
            inner: self.inner.open_queue(poller)?,
            delay: self.delay,
            held: Vec::with_capacity(4096),
            inner_done: Vec::with_capacity(4096),
            // Different orders in different runs; never zero (xorshift would stay at zero).
            rng: 0x2545_f491_4f6c_dd1d
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
                | 1,
        }))
    }
}

pub struct DelayQueue {
    inner: Queue,
    delay: Duration,
    held: Vec<(Instant, u16, u8)>,
    /// What the inner queue reported in this poll, before it is held.
    inner_done: Vec<(u16, u8)>,
    rng: u64,
}

impl BackendQueue for DelayQueue {
    fn can_submit(&self) -> bool {
        self.held.len() < self.held.capacity() && self.inner.can_submit()
    }

    fn submit(&mut self, request: &Request, token: u16) -> Result<()> {
        self.inner.submit(request, token)
    }

    fn flush_submissions(&mut self) {
        self.inner.flush_submissions();
    }

    fn poll(&mut self, done: &mut Vec<(u16, u8)>) -> usize {
        let now = Instant::now();
        let limit = self.delay.as_micros().max(1) as u64;
        self.inner_done.clear();
        self.inner.poll(&mut self.inner_done);
        for &(token, status) in &self.inner_done {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.held.push((
                now + Duration::from_micros(self.rng % (limit + 1)),
                token,
                status,
            ));
        }
        // Shuffle the ripe ones (xorshift), then release them.
        let mut ripe = 0;
        for i in 0..self.held.len() {
            if self.held[i].0 <= now {
                self.held.swap(ripe, i);
                ripe += 1;
            }
        }
        for i in (1..ripe).rev() {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let j = (self.rng % (i as u64 + 1)) as usize;
            self.held.swap(i, j);
        }
        done.extend(
            self.held
                .drain(..ripe)
                .map(|(_, token, status)| (token, status)),
        );
        ripe
    }

    fn in_flight(&self) -> usize {
        self.held.len() + self.inner.in_flight()
    }

    fn capacity_changed(&mut self) {
        self.inner.capacity_changed();
    }
}
