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
