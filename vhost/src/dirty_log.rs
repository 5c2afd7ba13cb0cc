//! The dirty log of a live migration (vhost-user spec, "Migration"): a bitmap the frontend
//! shares (SET_LOG_BASE, with LOG_SHMFD), one bit per 4 KiB page of guest-physical memory,
//! bit `page % 8` of byte `page / 8`. While the frontend has VHOST_F_LOG_ALL set, every
//! write the device makes into guest memory (data into device-writable buffers, status
//! bytes, used ring entries and index, the event word) marks its pages here, after the
//! write, so that the frontend sends those pages again. The frontend clears bits as it sends
//! pages (an atomic exchange per 64-bit word); we only ever set them, with atomic ORs.

use std::fs::File;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Bytes of guest memory one bit stands for.
pub const LOG_PAGE: u64 = 4096;

/// A mapped dirty log.
pub struct DirtyLog {
    ptr: *mut u8,
    len: usize,
    offset: u64,
    /// Marks that fell past the end of the log (a frontend whose log does not cover its
    /// memory): dropped, counted, reported once.
    beyond_end: AtomicU64,
    /// Off only in a test build, to show that a migration without the marks of the data
    /// written into the guest's buffers corrupts that data (the rings and status bytes stay
    /// marked, so the guest's kernel stays whole to see it).
    marks_data: bool,
    contained: Option<crate::sigbus::Contained>,
    _map: memmap2::MmapRaw,
    file: File,
}

// SAFETY: the mapping lives as long as the value; every access to it is an atomic OR.
unsafe impl Send for DirtyLog {}
// SAFETY: as above: concurrent pollers only OR bits in atomically.
unsafe impl Sync for DirtyLog {}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("len", &self.len)
            .field("offset", &self.offset)
            .field("marks_data", &self.marks_data)
            .finish()
    }
}

/// Log bytes needed to cover guest-physical memory up to `end` (exclusive).
pub fn log_bytes_for(end: u64) -> u64 {
    end.div_ceil(LOG_PAGE).div_ceil(8)
}

impl DirtyLog {
    /// Maps `len` bytes of `file` at `offset` (checked against the file). The file is sealed
    /// against shrinking where it can be, and otherwise contained like guest memory (a
    /// truncation poisons the log instead of killing the process).
    pub fn map(file: File, offset: u64, len: u64, marks_data: bool) -> crate::Result<Self> {
        let bad = |why: String| crate::Error::BadLog {
            size: len,
            offset,
            why,
        };
        if len == 0 {
            return Err(bad("an empty log".into()));
        }
        let len_usize = usize::try_from(len).map_err(|_| bad("larger than memory".into()))?;
        let sealed = crate::sigbus::seal_against_shrinking(&file);
        let map = crate::memory::map_shared(&file, len_usize, offset, false)
            .map_err(|e| bad(format!("cannot be mapped: {e}")))?;
        let contained = if sealed {
            None
        } else {
            crate::sigbus::register(map.as_mut_ptr(), len_usize)
        };
        Ok(Self {
            ptr: map.as_mut_ptr(),
            len: len_usize,
            offset,
            beyond_end: AtomicU64::new(0),
            marks_data,
            contained,
            _map: map,
            file,
        })
    }

    /// The fd, offset and length of the mapping (handed to a successor process).
    pub fn source(&self) -> (&File, u64, u64) {
        (&self.file, self.offset, self.len as u64)
    }

    /// Whether the log covers guest-physical memory up to `end` (exclusive).
    pub fn covers(&self, end: u64) -> bool {
        log_bytes_for(end) <= self.len as u64
    }

    /// Whether the frontend shrank the log's file under us: marks since may be lost.
    pub fn poisoned(&self) -> bool {
        self.contained.as_ref().is_some_and(|c| c.poisoned())
    }

    /// Marks dropped because they fell past the end of the log.
    pub fn beyond_end(&self) -> u64 {
        self.beyond_end.load(Ordering::Relaxed)
    }

    /// [`DirtyLog::mark`] for data the device wrote into a guest's buffer (not a ring, not
    /// a status byte): skipped only by a test build's switch.
    #[inline]
    pub fn mark_data(&self, gpa: u64, len: u64) {
        if self.marks_data {
            self.mark(gpa, len);
        }
    }

    /// Whether data writes are marked (see [`DirtyLog::mark_data`]).
    pub fn marks_data(&self) -> bool {
        self.marks_data
    }

    /// Marks the pages of `len` bytes at guest-physical `gpa` as written. Call it after the
    /// write (release: the frontend that sees the bit sees the data).
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.len as u64 {
                if self.beyond_end.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "dirty log: page at {:#x} lies past the {}-byte log; marks there are dropped",
                        page * LOG_PAGE,
                        self.len
                    );
                }
                return;
            }
            // SAFETY: byte < len: inside the mapping; u8 atomics need no alignment.
            let cell = unsafe { &*(self.ptr.add(byte as usize) as *const AtomicU8) };
            let bit = 1u8 << (page % 8);
            // Always the OR, never a load first to skip set bits: a store of ours could still
            // wait in this CPU's store buffer while the frontend clears the bit we saw and
            // sends the page without it. The locked OR orders our writes before it.
            cell.fetch_or(bit, Ordering::Release);
        }
    }

    /// Whether the page holding `gpa` is marked (tests and tools).
    pub fn is_marked(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        let byte = page / 8;
        if byte >= self.len as u64 {
            return false;
        }
        // SAFETY: inside the mapping, as in `mark`.
        let cell = unsafe { &*(self.ptr.add(byte as usize) as *const AtomicU8) };
        cell.load(Ordering::Acquire) & (1 << (page % 8)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::memfd;
    use std::sync::Arc;

    fn log(bytes: u64) -> (DirtyLog, File) {
        let file = memfd(bytes);
        let peer = file.try_clone().unwrap();
        (DirtyLog::map(file, 0, bytes, true).unwrap(), peer)
    }

    /// The log as the frontend reads it: 64-bit little-endian words, bit n of word w is
    /// page 64 * w + n.
    fn pages_marked(file: &File, bytes: u64) -> Vec<u64> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; bytes as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        let mut pages = Vec::new();
        for (w, chunk) in buf.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            let word = u64::from_le_bytes(word);
            for bit in 0..64 {
                if word & (1 << bit) != 0 {
                    pages.push(64 * w as u64 + bit);
                }
            }
        }
        pages
    }

    #[test]
    fn bits_sit_where_the_frontend_reads_them() {
        let (log, peer) = log(64);
        log.mark(0, 1);
        log.mark(LOG_PAGE * 9 + 4095, 1);
        // 4 KiB starting mid-page: two pages.
        log.mark(LOG_PAGE * 70 + 2048, 4096);
        // A write ending exactly at a page boundary marks no page beyond.
        log.mark(LOG_PAGE * 100, LOG_PAGE);
        log.mark(LOG_PAGE * 200, 0);
        assert_eq!(pages_marked(&peer, 64), vec![0, 9, 70, 71, 100]);
        assert!(log.is_marked(LOG_PAGE * 71 + 5));
        assert!(!log.is_marked(LOG_PAGE * 72));
    }

    #[test]
    fn marks_past_the_end_are_dropped_and_counted() {
        let (log, peer) = log(8); // 64 pages: 256 KiB
        assert!(log.covers(64 * LOG_PAGE));
        assert!(!log.covers(64 * LOG_PAGE + 1));
        log.mark(63 * LOG_PAGE, 2 * LOG_PAGE);
        log.mark(u64::MAX - 10, 100);
        assert_eq!(pages_marked(&peer, 8), vec![63]);
        assert_eq!(log.beyond_end(), 2);
        assert_eq!(log_bytes_for(0), 0);
        assert_eq!(log_bytes_for(1), 1);
        assert_eq!(log_bytes_for(8 * LOG_PAGE), 1);
        assert_eq!(log_bytes_for(8 * LOG_PAGE + 1), 2);
    }

    #[test]
    fn logs_that_do_not_fit_their_file_are_refused() {
        let file = memfd(4096);
        assert!(DirtyLog::map(file.try_clone().unwrap(), 4096, 1, true).is_err());
        assert!(DirtyLog::map(file.try_clone().unwrap(), 0, 8192, true).is_err());
        assert!(DirtyLog::map(file.try_clone().unwrap(), 0, 0, true).is_err());
        assert!(DirtyLog::map(file, 1024, 3072, true).is_ok());
    }

    #[test]
    fn two_pollers_marking_neighbouring_pages_lose_no_bit() {
        let (log, peer) = log(1024);
        let log = Arc::new(log);
        let threads: Vec<_> = (0..2u64)
            .map(|t| {
                let log = log.clone();
                // Thread 0 marks even pages, thread 1 odd ones: they share every byte.
                std::thread::spawn(move || {
                    for round in 0..50 {
                        for page in (t..8192).step_by(2) {
                            if round % 2 == 0 || page % 3 == 0 {
                                log.mark(page * LOG_PAGE, 1);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pages_marked(&peer, 1024), (0..8192).collect::<Vec<_>>());
    }

    #[test]
    fn a_test_build_switch_turns_the_marks_of_data_off_and_no_other() {
        let file = memfd(64);
        let peer = file.try_clone().unwrap();
        let log = DirtyLog::map(file, 0, 64, false).unwrap();
        log.mark_data(0, 1 << 20);
        assert!(pages_marked(&peer, 64).is_empty());
        log.mark(8 << 12, 1);
        assert_eq!(pages_marked(&peer, 64), [8]);
    }
}
