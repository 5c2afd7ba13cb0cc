//! The service manager's watchdog (systemd's `WatchdogSec=`, or `vfblk-keeper
//! --watchdog-sec`): `WATCHDOG=1` is sent only while every poller shows progress (its
//! heartbeat moved since the last look), so a poller stuck in a backend call or a loop stops
//! the pings and the supervisor restarts the target, whose successor recovers the stuck
//! queues' requests from the inflight region. A thread that pinged on a timer would say yes
//! whatever the pollers did.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfblk_vhost::poller::Poller;

/// The shortest watchdog period honoured: a poller's heartbeat moves at least every 100 ms.
const SHORTEST: Duration = Duration::from_millis(500);

/// The watchdog period the service manager asks for (`WATCHDOG_USEC`), unless it is meant
/// for another process (`WATCHDOG_PID`).
pub fn period() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        if pid.to_str().and_then(|p| p.parse::<u32>().ok()) != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Starts pinging the service manager every half `period` while every poller of `pollers`
/// makes progress.
pub fn start(period: Duration, pollers: Vec<Arc<Poller>>) {
    let period = period.max(SHORTEST);
    tracing::info!(
        "watchdog: WATCHDOG=1 every {:?} while all {} poller(s) make progress",
        period / 2,
        pollers.len()
    );
    let spawned = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || watch(period / 2, &pollers));
    if let Err(e) = spawned {
        tracing::error!("watchdog: no thread ({e}); the service manager will restart us");
    }
}

fn watch(every: Duration, pollers: &[Arc<Poller>]) {
    let mut last: Vec<u64> = pollers.iter().map(|w| w.heartbeat()).collect();
    // Since when each poller has shown no progress.
    let mut stuck_since: Vec<Option<Instant>> = vec![None; pollers.len()];
    crate::notify("WATCHDOG=1");
    loop {
        std::thread::sleep(every);
        let mut all_alive = true;
        for (i, w) in pollers.iter().enumerate() {
            let now = w.heartbeat();
            if now != last[i] {
                if let Some(since) = stuck_since[i].take() {
                    tracing::warn!(
                        "watchdog: poller {} moves again after {:?}",
                        w.name(),
                        since.elapsed()
                    );
                }
                last[i] = now;
                continue;
            }
            all_alive = false;
            if stuck_since[i].is_none() {
                stuck_since[i] = Some(Instant::now() - every);
                tracing::error!(
                    "watchdog: poller {} made no progress in {every:?}; WATCHDOG=1 withheld, so the service manager restarts the target if it stays so",
                    w.name()
                );
                crate::notify(&format!("STATUS=poller {} stuck", w.name()));
            }
        }
        if all_alive {
            crate::notify("WATCHDOG=1");
        }
    }
}
