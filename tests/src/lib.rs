//! Integration and VM tests; the test files are in `tests/tests/`. Shared helpers live here.

use std::sync::{Mutex, MutexGuard};

/// Lab VMs and kill-and-restart runs are serialised: on a 2-core machine they only slow each
/// other down, blur the timings the tests print, and stretch the windows the recovery tests
/// depend on.
pub fn lab_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
