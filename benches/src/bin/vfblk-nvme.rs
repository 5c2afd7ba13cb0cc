//! `vfblk-nvme`: an nvme-cli-like tool over our VFIO driver (see
//! `vfblk_benches::nvme::cli`). The binary only adds the allocation counter `perf` reports.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use clap::Parser;
use vfblk_benches::nvme::cli::{self, NvmeCli};

/// Counts heap allocations, so `perf` can show the I/O loop makes none.
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only adds a counter.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn main() -> ExitCode {
    let counter = || ALLOCATIONS.load(Ordering::Relaxed);
    match cli::run(NvmeCli::parse(), &counter) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-nvme: {}", vfblk_benches::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
