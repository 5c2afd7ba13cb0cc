//! Fault injection for the recovery tests (feature `test-faults`): never in a production
//! build.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Fault injection (feature `test-faults`): `VFBLK_TEST_DIE_IN_MESSAGE=N:MARKER` aborts the
/// process before handling the Nth message it reads, once (the marker file says it
/// happened), as a crash in the middle of a message would.
pub(crate) fn die_in_message_for_tests() {
    static MESSAGES: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("VFBLK_TEST_DIE_IN_MESSAGE") else {
        return;
    };
    let Some((n, marker)) = spec.split_once(':') else {
        return;
    };
    let seen = MESSAGES.fetch_add(1, Ordering::Relaxed) + 1;
    if n.parse::<u64>().ok() == Some(seen) && !Path::new(marker).exists() {
        let _ = std::fs::write(marker, b"died");
        tracing::warn!("VFBLK_TEST_DIE_IN_MESSAGE: aborting in message {seen}");
        std::process::abort();
    }
}

/// Fault injection (feature `test-faults`): once the file `VFBLK_TEST_HANG_POLLER` names
/// exists, the first poller to see it removes it and hangs for good (spinning, its queues
/// and heartbeat stopped), as a poller stuck in a backend call would. Looked at every
/// heartbeat (a system call there only in test builds).
pub(crate) fn hang_poller_for_tests() {
    let Some(marker) = std::env::var_os("VFBLK_TEST_HANG_POLLER") else {
        return;
    };
    if std::fs::remove_file(&marker).is_ok() {
        tracing::warn!("VFBLK_TEST_HANG_POLLER: this poller hangs now");
        loop {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
