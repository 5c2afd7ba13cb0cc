//! A mapped device register window (a BAR), accessed only with volatile loads and stores.

use std::ptr::NonNull;

/// A mapping of a device's MMIO region into this process.
pub struct Mmio {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is process-wide; volatile accesses from any thread are sound (ordering
// between threads is the caller's business, as for any device register).
unsafe impl Send for Mmio {}
// SAFETY: as above; no Rust references into the mapping are ever created.
unsafe impl Sync for Mmio {}

impl Mmio {
    /// Maps `len` bytes of `fd` at `offset` (a VFIO region) read-write and shared.
    pub fn map(fd: std::os::fd::RawFd, offset: u64, len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh mapping chosen by the kernel; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast()).ok_or(std::io::ErrorKind::AddrNotAvailable)?;
        Ok(Self { base, len })
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

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`; nothing refers into it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
