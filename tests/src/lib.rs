//! Integration and VM tests; the test files are in `tests/tests/`. Shared helpers live here.

use std::sync::{Mutex, MutexGuard};

/// Lab VMs are serialised: two TCG guests on a 2-core machine only slow each other down and
/// blur the timings the tests print.
pub fn lab_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
