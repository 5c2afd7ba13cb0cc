//! Tools that exercise the NVMe driver from outside: a polled load generator (`perf`), a
//! data-integrity exercise (`verify`), a read-only probe, and single commands run to
//! completion (`sync_io`).

pub mod cli;
pub mod perf;
pub mod probe;
pub mod sync_io;
pub mod verify;
