//! A record kept in shared memory for whoever drives a device after this process dies (a
//! successor started from the fd store): two slots written in turn, so that a process killed
//! while writing one leaves the other, whole and as it was before the change began.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};

use crate::{Error, Result};

/// Bytes of one slot: its length word and the text.
const SLOT_BYTES: usize = 256 * 1024;
/// The header page (which slot is current), then the two slots.
const FILE_BYTES: usize = 4096 + 2 * SLOT_BYTES;

/// A double-buffered record in a memfd the fd store holds.
pub struct KeptFile {
    file: File,
    map: memmap2::MmapRaw,
}

impl std::fmt::Debug for KeptFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptFile").finish_non_exhaustive()
    }
}

impl KeptFile {
    /// A new, empty record (its memfd sealed against shrinking).
    pub fn create(name: &str) -> Result<Self> {
        let io = |what: &str| {
            let what = format!("{what} for {name}");
            move |source| Error::Io { what, source }
        };
        let file = vfblk_hugepages::memfd(
            name,
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            FILE_BYTES as u64,
        )
        .map_err(io("a memfd"))?;
        // SAFETY: fcntl on an fd we own; the result is checked.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } != 0 {
            return Err(io("sealing the memfd")(std::io::Error::last_os_error()));
        }
        Self::map(file)
    }

    /// The record in `file` (from the store): refused if it is too small to be one.
    pub fn open(file: File) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|source| Error::Io {
                what: "the size of a kept record".into(),
                source,
            })?
            .len();
        if len < FILE_BYTES as u64 {
            return Err(Error::BadArgument(format!(
                "a kept record of {len} bytes, not {FILE_BYTES}"
            )));
        }
        Self::map(file)
    }

    fn map(file: File) -> Result<Self> {
        let map = memmap2::MmapOptions::new()
            .len(FILE_BYTES)
            .map_raw(&file)
            .map_err(|source| Error::Io {
                what: "mapping a kept record".into(),
                source,
            })?;
        Ok(Self { file, map })
    }

    /// The memfd, for the store.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn current(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page-aligned and FILE_BYTES long and lives as long as self;
        // its first 8 bytes are only ever accessed as this atomic.
        unsafe { &*self.map.as_mut_ptr().cast::<AtomicU64>() }
    }

    fn slot(&self, index: u64) -> *mut u8 {
        debug_assert!(index < 2, "slot {index}");
        // SAFETY: index is 0 or 1: the slot lies inside the mapping.
        unsafe {
            self.map
                .as_mut_ptr()
                .add(4096 + index as usize * SLOT_BYTES)
        }
    }

    /// Writes `text` into the slot not current, then makes it current: a reader never sees
    /// a slot being written.
    pub fn write(&self, text: &[u8]) -> Result<()> {
        if text.len() > SLOT_BYTES - 8 {
            return Err(Error::BadArgument(format!(
                "a kept record of {} bytes (at most {})",
                text.len(),
                SLOT_BYTES - 8
            )));
        }
        let next = match self.current().load(Ordering::Acquire) {
            1 => 1,
            _ => 0,
        };
        let slot = self.slot(next);
        // SAFETY: the slot lies inside the mapping and is not the current one, so no reader
        // trusts it while it changes; only this process writes the record while it lives.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), slot.add(8), text.len());
            std::ptr::write_volatile(slot.cast::<u64>(), text.len() as u64);
        }
        fence(Ordering::Release);
        self.current().store(next + 1, Ordering::Release);
        Ok(())
    }

    /// Makes the record read as never written: what it said is no longer true (the
    /// controller went to another process, or a change could not be written), and a
    /// successor must not trust it.
    pub fn void(&self) {
        self.current().store(0, Ordering::Release);
    }

    /// The current slot's text, or None if the record was never written (or voided).
    pub fn read(&self) -> Option<Vec<u8>> {
        let index = match self.current().load(Ordering::Acquire) {
            1 => 0,
            2 => 1,
            _ => return None,
        };
        let slot = self.slot(index);
        // SAFETY: inside the mapping; the length is checked before the text is read.
        unsafe {
            let len = std::ptr::read_volatile(slot.cast::<u64>()) as usize;
            if len > SLOT_BYTES - 8 {
                return None;
            }
            Some(std::slice::from_raw_parts(slot.add(8), len).to_vec())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_its_last_write_and_survives_a_torn_one() {
        let kept = KeptFile::create("test-kept").unwrap();
        assert_eq!(kept.read(), None, "never written");
        kept.write(b"first").unwrap();
        kept.write(b"second").unwrap();
        let again = KeptFile::open(kept.file().try_clone().unwrap()).unwrap();
        assert_eq!(again.read().as_deref(), Some(&b"second"[..]));
        // A writer killed in the middle of its third write scribbled over the other slot
        // only: the current one still reads whole.
        let other = kept.slot(0);
        // SAFETY: slot 0 is not current (the second write went to slot 1).
        unsafe { std::ptr::write_bytes(other, 0xff, 64) };
        assert_eq!(again.read().as_deref(), Some(&b"second"[..]));
        assert!(kept.write(&vec![b'x'; SLOT_BYTES]).is_err(), "too long");
        assert_eq!(again.read().as_deref(), Some(&b"second"[..]));
        kept.void();
        assert_eq!(again.read(), None, "voided");
        kept.write(b"third").unwrap();
        assert_eq!(again.read().as_deref(), Some(&b"third"[..]));
    }

    #[test]
    fn a_short_file_is_not_a_record() {
        let file = vfblk_hugepages::memfd("short", libc::MFD_CLOEXEC, 4096).unwrap();
        assert!(KeptFile::open(file).is_err());
    }
}
