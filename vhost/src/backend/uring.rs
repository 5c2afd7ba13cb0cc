//! A minimal io_uring over raw system calls: one ring per backend queue, SQEs filled in place,
//! one `io_uring_enter` per batch, completions reaped from the shared CQ ring.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{Error, Result};

const SYS_IO_URING_SETUP: libc::c_long = 425;
const SYS_IO_URING_ENTER: libc::c_long = 426;
const IORING_OFF_SQ_RING: libc::off_t = 0;
const IORING_OFF_CQ_RING: libc::off_t = 0x800_0000;
const IORING_OFF_SQES: libc::off_t = 0x1000_0000;

/// Opcodes we use.
pub const OP_READV: u8 = 1;
/// Write from iovecs.
pub const OP_WRITEV: u8 = 2;
/// fsync.
pub const OP_FSYNC: u8 = 3;
/// fallocate (addr = length, len = mode).
pub const OP_FALLOCATE: u8 = 17;

#[repr(C)]
#[derive(Default)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}

const _: () = assert!(std::mem::size_of::<Params>() == 120);

/// A submission queue entry.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct Sqe {
    /// Opcode.
    pub opcode: u8,
    /// Flags.
    pub flags: u8,
    /// Priority.
    pub ioprio: u16,
    /// File descriptor.
    pub fd: i32,
    /// File offset.
    pub off: u64,
    /// Buffer / iovec address (fallocate: length).
    pub addr: u64,
    /// Length / iovec count (fallocate: mode).
    pub len: u32,
    /// Op flags.
    pub op_flags: u32,
    /// Returned in the completion.
    pub user_data: u64,
    pub(crate) pad: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<Sqe>() == 64);

#[repr(C)]
struct Cqe {
    user_data: u64,
    res: i32,
    flags: u32,
}

struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One io_uring instance.
pub struct Uring {
    fd: RawFd,
    sq_head: *const AtomicU32,
    sq_tail: *const AtomicU32,
    sq_mask: u32,
    sq_array: *mut u32,
    sqes: *mut Sqe,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const Cqe,
    entries: u32,
    local_tail: u32,
    unsubmitted: u32,
    _maps: Vec<Map>,
}

// SAFETY: the ring memory is owned by this value; one thread uses it.
unsafe impl Send for Uring {}

fn map(fd: RawFd, len: usize, offset: libc::off_t) -> Result<Map> {
    // SAFETY: mapping the ring fd at the offsets the kernel defines; checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            fd,
            offset,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(Error::Io {
            what: "mmap of io_uring rings".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Map {
        ptr: ptr.cast(),
        len,
    })
}

impl Uring {
    /// A ring with `entries` submission entries.
    pub fn new(entries: u32) -> Result<Self> {
        let mut p = Params::default();
        // SAFETY: io_uring_setup with a valid params struct; checked.
        let fd =
            unsafe { libc::syscall(SYS_IO_URING_SETUP, entries, &mut p as *mut Params) } as RawFd;
        if fd < 0 {
            return Err(Error::Io {
                what: "io_uring_setup".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * std::mem::size_of::<Cqe>();
        let sq = map(fd, sq_len.max(cq_len), IORING_OFF_SQ_RING)?;
        let cq = map(fd, cq_len, IORING_OFF_CQ_RING)?;
        let sqes = map(fd, p.sq_entries as usize * 64, IORING_OFF_SQES)?;
        // SAFETY: offsets come from the kernel and lie within the mappings.
        unsafe {
            let u32_at = |m: &Map, off: u32| m.ptr.add(off as usize) as *const u32;
            Ok(Self {
                fd,
                sq_head: u32_at(&sq, p.sq_off.head).cast(),
                sq_tail: u32_at(&sq, p.sq_off.tail).cast(),
                sq_mask: *u32_at(&sq, p.sq_off.ring_mask),
                sq_array: sq.ptr.add(p.sq_off.array as usize).cast(),
                sqes: sqes.ptr.cast(),
                cq_head: u32_at(&cq, p.cq_off.head).cast(),
                cq_tail: u32_at(&cq, p.cq_off.tail).cast(),
                cq_mask: *u32_at(&cq, p.cq_off.ring_mask),
                cqes: cq.ptr.add(p.cq_off.cqes as usize).cast(),
                entries: p.sq_entries,
                local_tail: (*u32_at(&sq, p.sq_off.tail)),
                unsubmitted: 0,
                _maps: vec![sq, cq, sqes],
            })
        }
    }

    /// Free submission entries.
    pub fn space(&self) -> u32 {
        // SAFETY: kernel-shared head counter.
        let head = unsafe { &*self.sq_head }.load(Ordering::Acquire);
        self.entries - self.local_tail.wrapping_sub(head)
    }

    /// Queues an SQE (visible to the kernel at the next `submit`). False when full.
    pub fn push(&mut self, sqe: Sqe) -> bool {
        if self.space() == 0 {
            return false;
        }
        let idx = self.local_tail & self.sq_mask;
        // SAFETY: idx <= mask: inside the SQE array and the index array.
        unsafe {
            self.sqes.add(idx as usize).write(sqe);
            self.sq_array.add(idx as usize).write(idx);
        }
        self.local_tail = self.local_tail.wrapping_add(1);
        self.unsubmitted += 1;
        true
    }

    /// Publishes queued SQEs and tells the kernel (one system call for the batch).
    pub fn submit(&mut self) -> Result<()> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        // SAFETY: kernel-shared tail counter; release makes the SQEs visible first.
        unsafe { &*self.sq_tail }.store(self.local_tail, Ordering::Release);
        // SAFETY: io_uring_enter on our ring; checked.
        let rc = unsafe {
            libc::syscall(
                SYS_IO_URING_ENTER,
                self.fd,
                self.unsubmitted,
                0u32,
                0u32,
                std::ptr::null::<u8>(),
                0usize,
            )
        };
        if rc < 0 {
            return Err(Error::Io {
                what: "io_uring_enter".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        self.unsubmitted -= (rc as u32).min(self.unsubmitted);
        Ok(())
    }

    /// Reaps completions as (user_data, result).
    pub fn reap(&mut self, each: &mut dyn FnMut(u64, i32)) -> usize {
        // SAFETY: kernel-shared counters and CQE ring.
        unsafe {
            let mut head = (*self.cq_head).load(Ordering::Relaxed);
            let tail = (*self.cq_tail).load(Ordering::Acquire);
            let mut n = 0;
            while head != tail {
                let cqe = &*self.cqes.add((head & self.cq_mask) as usize);
                each(cqe.user_data, cqe.res);
                head = head.wrapping_add(1);
                n += 1;
            }
            (*self.cq_head).store(head, Ordering::Release);
            n
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // SAFETY: our fd.
        unsafe { libc::close(self.fd) };
    }
}
