//! Per-device I/O counters. Each virtqueue has its own block of counters, written only by the
//! poller running that queue (relaxed load and store: no atomic read-modify-write, no shared
//! cache line between queues); readers sum the blocks.

use std::sync::atomic::{AtomicU64, Ordering};

/// Latency buckets: the upper bound of bucket i is 2^i microseconds (1 µs .. ~33 s); the
/// last one also holds everything slower.
pub const LATENCY_BUCKETS: usize = 26;

/// Upper bound of latency bucket `i`, in seconds.
pub fn bucket_bound_seconds(i: usize) -> f64 {
    (1u64 << i) as f64 / 1e6
}

/// One queue's counters.
#[derive(Default)]
#[repr(align(128))]
pub struct QueueStats {
    reads: AtomicU64,
    writes: AtomicU64,
    others: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
    latency_sum_ns: AtomicU64,
    /// Requests handed to the backend, and those it finished: the difference is in flight.
    submitted: AtomicU64,
    finished: AtomicU64,
}

/// The kinds of request counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Data read.
    Read,
    /// Data written.
    Write,
    /// Flush, discard, write zeroes, get id.
    Other,
}

fn bump(counter: &AtomicU64, by: u64) {
    // One writer per queue: a load and a store, not a locked add.
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

impl QueueStats {
    /// Counts a request handed to the backend (called by the queue's poller only).
    pub fn submitted(&self) {
        bump(&self.submitted, 1);
    }

    /// Counts a request the backend finished, after [`QueueStats::submitted`].
    pub fn finished(&self) {
        bump(&self.finished, 1);
    }

    /// Counts one answered request (called by the queue's poller only).
    pub fn record(&self, kind: IoKind, bytes: u64, ok: bool, latency_ns: u64) {
        self.count(kind, bytes, ok);
        self.latencies(latency_ns, 1);
    }

    /// Counts one answered request whose latency [`QueueStats::latencies`] adds later.
    #[inline]
    pub fn count(&self, kind: IoKind, bytes: u64, ok: bool) {
        match kind {
            IoKind::Read => {
                bump(&self.reads, 1);
                bump(&self.read_bytes, bytes);
            }
            IoKind::Write => {
                bump(&self.writes, 1);
                bump(&self.written_bytes, bytes);
            }
            IoKind::Other => bump(&self.others, 1),
        }
        if !ok {
            bump(&self.errors, 1);
        }
    }

    /// Adds `requests` answered requests that each took `latency_ns`.
    pub fn latencies(&self, latency_ns: u64, requests: u64) {
        let us = latency_ns / 1000;
        let bucket = if us <= 1 {
            0
        } else {
            (64 - (us - 1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
        };
        bump(&self.latency[bucket], requests);
        bump(&self.latency_sum_ns, latency_ns.wrapping_mul(requests));
    }
}

/// A device's counters: one block per virtqueue.
pub struct DeviceStats {
    /// Each queue's block on its own, so that a queue holds its own without an index.
    queues: Vec<std::sync::Arc<QueueStats>>,
    /// Requests run again from the inflight region after a reconnect or restart (written by
    /// the control plane).
    recovered: AtomicU64,
}

/// Counters summed over a device's queues (`stats` shows all but the latency buckets, which
/// the metrics endpoint carries).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StatsSnapshot {
    /// Reads finished.
    pub reads: u64,
    /// Writes finished.
    pub writes: u64,
    /// Other requests finished.
    pub others: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub written_bytes: u64,
    /// Requests that finished with an error status.
    pub errors: u64,
    /// Requests per latency bucket (not cumulative).
    #[serde(skip)]
    pub latency: Vec<u64>,
    /// Sum of all latencies, in seconds.
    pub latency_sum_seconds: f64,
    /// Requests in the backend now.
    pub in_flight: u64,
    /// Requests run again from the inflight region.
    pub recovered: u64,
}

impl DeviceStats {
    /// Counters for `queues` virtqueues.
    pub fn new(queues: u16) -> Self {
        Self {
            queues: (0..queues).map(|_| Default::default()).collect(),
            recovered: AtomicU64::new(0),
        }
    }

    /// Counts requests run again from the inflight region.
    pub fn recovered(&self, count: u64) {
        self.recovered.fetch_add(count, Ordering::Relaxed);
    }

    /// Queue `index`'s block (None for an index the device does not have).
    pub fn queue(&self, index: u16) -> Option<&std::sync::Arc<QueueStats>> {
        self.queues.get(usize::from(index))
    }

    /// The sums now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot {
            latency: vec![0; LATENCY_BUCKETS],
            ..Default::default()
        };
        let mut sum_ns = 0u64;
        for q in &self.queues {
            let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
            s.reads += get(&q.reads);
            s.writes += get(&q.writes);
            s.others += get(&q.others);
            s.read_bytes += get(&q.read_bytes);
            s.written_bytes += get(&q.written_bytes);
            s.errors += get(&q.errors);
            for (total, b) in s.latency.iter_mut().zip(&q.latency) {
                *total += get(b);
            }
            sum_ns = sum_ns.wrapping_add(get(&q.latency_sum_ns));
            // Read finished first: a request finishing in between is then not counted
            // below zero.
            let finished = get(&q.finished);
            s.in_flight += get(&q.submitted).saturating_sub(finished);
        }
        s.recovered = self.recovered.load(Ordering::Relaxed);
        s.latency_sum_seconds = sum_ns as f64 / 1e9;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_land_in_their_latency_bucket_and_queues_sum() {
        let stats = DeviceStats::new(2);
        let q0 = stats.queue(0).unwrap();
        let q1 = stats.queue(1).unwrap();
        q0.record(IoKind::Read, 4096, true, 500);
        q0.record(IoKind::Write, 512, false, 3_000);
        q1.record(IoKind::Read, 8192, true, 1_000_000);
        q1.record(IoKind::Other, 0, true, 100_000_000_000);
        let s = stats.snapshot();
        assert_eq!((s.reads, s.writes, s.others, s.errors), (2, 1, 1, 1));
        assert_eq!((s.read_bytes, s.written_bytes), (12288, 512));
        assert_eq!(s.latency[0], 1, "≤ 1 µs");
        assert_eq!(s.latency[2], 1, "3 µs is in (2, 4]");
        assert_eq!(s.latency[10], 1, "1000 µs is in (512, 1024]");
        assert_eq!(s.latency[LATENCY_BUCKETS - 1], 1, "100 s lands in the last");
        assert!(stats.queue(2).is_none());
        assert!((s.latency_sum_seconds - 100.001003).abs() < 1e-6);
    }
}
