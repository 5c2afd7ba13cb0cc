//! A mapped device register window (a BAR), accessed only with volatile loads and stores.

use std::ptr::NonNull;

/// A mapping of a device's MMIO region into this process.
pub struct Mmio {
    base: NonNull<u8>,
    len: usize,
    _map: memmap2::MmapRaw,
}

// SAFETY: the mapping is process-wide; volatile accesses from any thread are sound (ordering
// between threads is the caller's business, as for any device register).
unsafe impl Send for Mmio {}
// SAFETY: as above; no Rust references into the mapping are ever created.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Maps `len` bytes of `fd` at `offset` (a VFIO region) read-write and shared.
    pub fn map(fd: std::os::fd::RawFd, offset: u64, len: usize) -> std::io::Result<Self> {
        let map = memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map_raw(fd)?;
        let base = NonNull::new(map.as_mut_ptr()).ok_or(std::io::ErrorKind::AddrNotAvailable)?;
        Ok(Self {
            base,
            len,
            _map: map,
        })
    }

    /// Length of the mapping.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false for a successful mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at<T>(&self, offset: usize) -> *mut T {
        let size = std::mem::size_of::<T>();
        // Offsets come from our own register tables, never from a guest; a bad one is a bug.
        assert!(
            offset % size == 0 && offset + size <= self.len,
            "MMIO access at {offset:#x} outside the {:#x}-byte window",
            self.len
        );
        // SAFETY: in bounds per the assertion.
        unsafe { self.base.as_ptr().add(offset).cast() }
    }

    /// 32-bit register read.
    pub fn read32(&self, offset: usize) -> u32 {
        // SAFETY: aligned and in bounds (checked by `at`); device memory needs volatile access.
        unsafe { self.at::<u32>(offset).read_volatile() }
    }

    /// 64-bit register read.
    pub fn read64(&self, offset: usize) -> u64 {
        // SAFETY: aligned and in bounds (checked by `at`); device memory needs volatile access.
        unsafe { self.at::<u64>(offset).read_volatile() }
    }

    /// 32-bit register write.
    pub fn write32(&self, offset: usize, value: u32) {
        // SAFETY: aligned and in bounds (checked by `at`); device memory needs volatile access.
        unsafe { self.at::<u32>(offset).write_volatile(value) }
    }

    /// 64-bit register write.
    pub fn write64(&self, offset: usize, value: u64) {
        // SAFETY: aligned and in bounds (checked by `at`); device memory needs volatile access.
        unsafe { self.at::<u64>(offset).write_volatile(value) }
    }
}
