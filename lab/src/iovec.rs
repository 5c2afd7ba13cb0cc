//! A guest-side check that fio cannot do: O_DIRECT writes and reads whose iovecs are 512-byte
//! pieces scattered over pages at sub-page offsets. The guest kernel hands them to
//! virtio-blk as separate descriptors, so the backend gets scatter lists that NVMe PRPs
//! cannot describe (a piece ending mid-page followed by another): the NVMe backend must use
//! SGLs, split, or bounce. Every byte is verified.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::{LabError, Result};

/// Bytes per piece: the smallest O_DIRECT unit of a 512-byte-sector disk.
const PIECE: usize = 512;
const PAGE: usize = 4096;
/// Pages the pieces are scattered over.
const POOL_PAGES: usize = 64;

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct IovecReport {
    /// Write and read requests issued.
    pub requests: u64,
    /// Bytes written (each read back).
    pub bytes: u64,
    /// Pieces read back with other contents than written.
    pub mismatches: u64,
}

/// Page-aligned memory for O_DIRECT pieces.
struct Pool {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl IovecReport {
    /// As JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests,
            "bytes": self.bytes,
            "mismatches": self.mismatches,
        })
    }
}

impl Pool {
    fn new() -> Self {
        let layout = std::alloc::Layout::from_size_align(POOL_PAGES * PAGE, PAGE)
            .expect("valid pool layout");
        // SAFETY: non-zero size; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocating {} bytes", layout.size());
        Self { ptr, layout }
    }

    /// The piece at `slot` (0..POOL_PAGES * PAGE / PIECE).
    fn piece(&self, slot: usize) -> *mut u8 {
        // SAFETY: slot * PIECE + PIECE <= the pool's size for every slot callers use.
        unsafe { self.ptr.add(slot * PIECE) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The pool slots of request `n`'s `pieces` pieces: each in another page, at an offset
/// inside it that varies with the piece, never two pieces in one slot.
fn slots(n: u64, pieces: usize, salt: u64) -> Vec<usize> {
    let per_page = PAGE / PIECE;
    (0..pieces)
        .map(|k| {
            let page = (n as usize * 7 + k * 5 + salt as usize) % POOL_PAGES;
            let within = (k * 3 + n as usize + 1 + salt as usize) % per_page;
            (page, within)
        })
        .scan(std::collections::HashSet::new(), |used, (page, within)| {
            // Distinct pages per request (pieces <= POOL_PAGES): probe forward on a clash.
            let mut page = page;
            while !used.insert(page) {
                page = (page + 1) % POOL_PAGES;
            }
            Some(page * per_page + within)
        })
        .collect()
}

/// The byte at `i` of piece `k` of request `n` in pass `pass`.
fn pattern(n: u64, k: usize, pass: u64, i: usize) -> u8 {
    (n.wrapping_mul(31) ^ (k as u64).wrapping_mul(131) ^ pass.wrapping_mul(7) ^ i as u64) as u8
}

/// Writes and verifies the first `mib` MiB of `device` in requests of 1 to 32 pieces.
pub fn run(device: &Path, mib: u64) -> Result<IovecReport> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
        .map_err(|e| LabError::Setup(format!("opening {} with O_DIRECT: {e}", device.display())))?;
    let fd = file.as_raw_fd();
    let pool = Pool::new();
    let mut report = IovecReport::default();
    let total = mib << 20;
    for pass in 0..2u64 {
        let mut offset = 0u64;
        let mut n = 0u64;
        while offset < total {
            let pieces = (1 + (n as usize * 13 + pass as usize) % 32).min(POOL_PAGES);
            let len = (pieces * PIECE) as u64;
            if offset + len > total {
                break;
            }
            let io = |salt: u64, write: bool| -> Result<()> {
                let iov: Vec<libc::iovec> = slots(n, pieces, salt)
                    .into_iter()
                    .map(|s| libc::iovec {
                        iov_base: pool.piece(s).cast(),
                        iov_len: PIECE,
                    })
                    .collect();
                // SAFETY: every iovec points at a 512-byte piece of our pool.
                let done = unsafe {
                    if write {
                        libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, offset as i64)
                    } else {
                        libc::preadv(fd, iov.as_ptr(), iov.len() as i32, offset as i64)
                    }
                };
                if done != len as isize {
                    return Err(LabError::Guest(format!(
                        "{} of {len} bytes at {offset} in {pieces} pieces: {done} ({})",
                        if write { "pwritev" } else { "preadv" },
                        std::io::Error::last_os_error()
                    )));
                }
                Ok(())
            };
            // Write through one scatter of the pool, read back through another.
            for (k, s) in slots(n, pieces, 0).into_iter().enumerate() {
                let p = pool.piece(s);
                for i in 0..PIECE {
                    // SAFETY: inside the piece.
                    unsafe { p.add(i).write(pattern(n, k, pass, i)) };
                }
            }
            io(0, true)?;
            let read_slots = slots(n, pieces, 1);
            for &s in &read_slots {
                // SAFETY: the piece is ours; poisoned so that a read that does not land
                // shows.
                unsafe { pool.piece(s).write_bytes(0xa5, PIECE) };
            }
            io(1, false)?;
            for (k, s) in read_slots.into_iter().enumerate() {
                let p = pool.piece(s);
                // SAFETY: inside the piece.
                if (0..PIECE).any(|i| unsafe { p.add(i).read() } != pattern(n, k, pass, i)) {
                    report.mismatches += 1;
                }
            }
            report.requests += 2;
            report.bytes += len;
            offset += len;
            n += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_of_a_request_never_share_a_slot_and_sit_at_sub_page_offsets() {
        for n in 0..200 {
            for pieces in [1, 2, 8, 32] {
                for salt in [0, 1] {
                    let s = slots(n, pieces, salt);
                    let distinct: std::collections::HashSet<_> = s.iter().collect();
                    assert_eq!(distinct.len(), pieces);
                    assert!(s.iter().all(|&x| x < POOL_PAGES * PAGE / PIECE));
                }
            }
        }
        // Most pieces start inside a page, not at its start: what PRPs cannot describe.
        let s = slots(3, 32, 0);
        assert!(s.iter().filter(|&&x| x % (PAGE / PIECE) != 0).count() > 16);
    }

    #[test]
    fn a_file_round_trips_through_scattered_pieces() {
        // tmpfs (often /tmp) refuses O_DIRECT; the crate's directory is on a disk.
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let path = dir.join(format!(".iovec-test-{}", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 20).unwrap();
        drop(f);
        match run(&path, 1) {
            Ok(r) => {
                assert_eq!(r.mismatches, 0);
                assert!(r.requests > 100 && r.bytes > 0, "{r:?}");
            }
            Err(e) if e.to_string().contains("O_DIRECT") => {
                eprintln!("skipped: {e} (no O_DIRECT on {})", dir.display());
            }
            Err(e) => panic!("{e}"),
        }
        let _ = std::fs::remove_file(&path);
    }
}
