//! Per-controller IOPS and bandwidth limits (a noisy neighbour gets its share, no more).
//! Each virtqueue gets an equal part of the controller's limits and its own token buckets,
//! so the queues' pollers never share state; a queue out of tokens stops taking requests
//! (they wait in the avail ring) until the buckets refill.

use std::cell::Cell;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A controller's limits; absent fields are unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Requests per second (reads, writes, flushes, discards: every request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    /// Bytes read and written per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
}

impl RateLimits {
    /// No limit at all.
    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bytes_per_second.is_none()
    }
}

/// How much a bucket holds: a tenth of a second of its rate, so that bursts stay short.
const BURST: Duration = Duration::from_millis(100);

/// A token bucket that may go into debt: a request is let through while the bucket holds
/// anything, and its whole cost is taken, so a large request is never starved.
struct Bucket {
    per_second: u64,
    capacity: i64,
    tokens: Cell<i64>,
    /// Earned fractions of a token, in token-nanoseconds (below 10^9): frequent refills
    /// lose nothing to rounding.
    remainder: Cell<u64>,
}

impl Bucket {
    fn new(per_second: u64) -> Self {
        let capacity = ((u128::from(per_second) * BURST.as_nanos() / 1_000_000_000) as i64).max(1);
        Self {
            per_second,
            capacity,
            tokens: Cell::new(capacity),
            remainder: Cell::new(0),
        }
    }

    fn add(&self, elapsed: Duration) {
        let total =
            u128::from(self.per_second) * elapsed.as_nanos() + u128::from(self.remainder.get());
        self.remainder.set((total % 1_000_000_000) as u64);
        let earned = (total / 1_000_000_000).min(self.capacity as u128 * 2) as i64;
        self.tokens
            .set((self.tokens.get() + earned).min(self.capacity));
    }
}

/// One queue's share of a controller's limits.
pub struct Limiter {
    ios: Option<Bucket>,
    bytes: Option<Bucket>,
    last: Cell<Instant>,
}

impl Limiter {
    /// The share of one of `queues` queues (None when unlimited).
    pub fn for_queue(limits: &RateLimits, queues: u16) -> Option<Self> {
        if limits.is_unlimited() {
            return None;
        }
        let share = |rate: u64| rate.div_ceil(u64::from(queues.max(1))).max(1);
        Some(Self {
            ios: limits.iops.map(|r| Bucket::new(share(r))),
            bytes: limits.bytes_per_second.map(|r| Bucket::new(share(r))),
            last: Cell::new(Instant::now()),
        })
    }

    /// Whether a request may start at `now`.
    pub fn ready_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last.get());
        if !elapsed.is_zero() {
            for b in [&self.ios, &self.bytes].into_iter().flatten() {
                b.add(elapsed);
            }
            self.last.set(now);
        }
        [&self.ios, &self.bytes]
            .into_iter()
            .flatten()
            .all(|b| b.tokens.get() > 0)
    }

    /// Whether a request may start now.
    pub fn ready(&self) -> bool {
        self.ready_at(Instant::now())
    }

    /// Takes a request of `bytes` from the buckets.
    pub fn charge(&self, bytes: u64) {
        if let Some(b) = &self.ios {
            b.tokens.set(b.tokens.get() - 1);
        }
        if let Some(b) = &self.bytes {
            b.tokens.set(
                b.tokens
                    .get()
                    .saturating_sub(bytes.min(i64::MAX as u64) as i64),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests of `bytes` a limiter lets through over `seconds`, checked every 10 µs.
    fn admitted(limits: RateLimits, queues: u16, bytes: u64, seconds: u64) -> u64 {
        let l = Limiter::for_queue(&limits, queues).unwrap();
        let start = Instant::now();
        l.last.set(start);
        let mut n = 0;
        let steps = seconds * 100_000;
        for i in 0..steps {
            let now = start + Duration::from_micros(10 * i);
            while l.ready_at(now) {
                l.charge(bytes);
                n += 1;
            }
        }
        n
    }

    #[test]
    fn iops_are_held_to_the_rate_after_one_burst() {
        let limits = RateLimits {
            iops: Some(1000),
            bytes_per_second: None,
        };
        // 10 s at 1000/s, plus the first 100 ms burst.
        let n = admitted(limits, 1, 4096, 10);
        assert!((10_000..=10_101).contains(&n), "{n}");
        // Two queues: half each.
        let n = admitted(limits, 2, 4096, 10);
        assert!((5_000..=5_051).contains(&n), "{n}");
    }

    #[test]
    fn bandwidth_counts_bytes_and_lets_a_large_request_through_on_credit() {
        let limits = RateLimits {
            iops: None,
            bytes_per_second: Some(1 << 20),
        };
        // 1 MiB/s of 256 KiB requests: 4 per second, plus the burst.
        let n = admitted(limits, 1, 256 << 10, 10);
        assert!((40..=42).contains(&n), "{n}");
        // A request larger than the bucket still passes (then pays for it).
        let n = admitted(limits, 1, 4 << 20, 10);
        assert!((2..=4).contains(&n), "{n}");
    }

    #[test]
    fn both_limits_apply_and_no_limits_means_no_limiter() {
        let limits = RateLimits {
            iops: Some(100),
            bytes_per_second: Some(1 << 30),
        };
        let n = admitted(limits, 1, 512, 5);
        assert!((500..=511).contains(&n), "{n}");
        assert!(Limiter::for_queue(&RateLimits::default(), 4).is_none());
    }
}

/// A controller's limits as its queues follow them while running: a change is seen by each
/// queue at its next round (one relaxed load per round, not per request; the lock only when
/// the generation moved).
#[derive(Default)]
pub struct LiveLimits {
    generation: std::sync::atomic::AtomicU64,
    limits: std::sync::Mutex<RateLimits>,
}

impl LiveLimits {
    /// Limits starting at `limits`.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            generation: Default::default(),
            limits: std::sync::Mutex::new(limits),
        }
    }

    /// The limits now.
    pub fn get(&self) -> RateLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the limits; every queue takes its new share at its next round.
    pub fn set(&self, limits: RateLimits) {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner()) = limits;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The change count (a queue compares it with the one its limiter was built at).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }
}
