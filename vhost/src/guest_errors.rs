//! Reporting what a guest or frontend got wrong without letting it flood the log: per device,
//! the first few errors of each interval are logged in full, the rest only counted, and a
//! summary line says how many were left out once the interval is over. Nothing is silenced
//! for good: every interval starts afresh.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Errors logged in full per interval.
pub const LINES_PER_INTERVAL: u32 = 5;
/// Length of an interval.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// One device's guest-error reporter, shared by its queues (one atomic add per error; errors
/// are the exception, so the counters are not on the hot path).
#[derive(Debug)]
pub struct GuestErrors {
    device: String,
    epoch: Instant,
    interval_start_ms: AtomicU64,
    logged: AtomicU32,
    suppressed: AtomicU64,
    total: AtomicU64,
}

impl GuestErrors {
    /// A reporter for the device named `device` (its socket, say).
    pub fn new(device: impl Into<String>) -> Self {
        Self {
            device: device.into(),
            epoch: Instant::now(),
            interval_start_ms: AtomicU64::new(0),
            logged: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Starts a new interval if the current one is over, logging the summary of the old one.
    fn roll(&self, now_ms: u64) {
        let start = self.interval_start_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(start) < INTERVAL.as_millis() as u64 {
            return;
        }
        if self
            .interval_start_ms
            .compare_exchange(start, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.logged.store(0, Ordering::Relaxed);
            let left_out = self.suppressed.swap(0, Ordering::Relaxed);
            if left_out > 0 {
                tracing::warn!(
                    device = %self.device,
                    left_out,
                    total = self.total.load(Ordering::Relaxed),
                    "{}: {left_out} more guest error(s) in the last {} s not logged one by one",
                    self.device,
                    INTERVAL.as_secs()
                );
            }
        }
    }

    /// Reports one error of queue `queue`.
    pub fn report(&self, queue: u16, what: std::fmt::Arguments) {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.roll(self.now_ms());
        if self.logged.fetch_add(1, Ordering::Relaxed) < LINES_PER_INTERVAL {
            tracing::warn!(device = %self.device, queue, "{}: queue {queue}: {what}", self.device);
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Logs the summary of a finished interval even if no new error arrives (pollers call it
    /// when they go idle, devices when a queue stops).
    pub fn flush(&self) {
        self.roll(self.now_ms());
    }

    /// Errors reported since the device was created.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Errors of the current interval not logged one by one (yet to be summarised).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_counted_not_logged_line_by_line() {
        let e = GuestErrors::new("test");
        for i in 0..1000u32 {
            e.report(0, format_args!("bad chain {i}"));
        }
        assert_eq!(e.total(), 1000);
        assert_eq!(
            e.suppressed(),
            1000 - u64::from(LINES_PER_INTERVAL),
            "only the first few of an interval are logged"
        );
        // A new interval summarises the old one and logs in full again.
        e.interval_start_ms.store(0, Ordering::Relaxed);
        let later = INTERVAL.as_millis() as u64 + 1;
        e.roll(later);
        assert_eq!(e.suppressed(), 0);
        assert_eq!(e.logged.load(Ordering::Relaxed), 0);
    }
}
