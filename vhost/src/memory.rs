//! Guest memory as the frontend's SET_MEM_TABLE describes it: regions of shared fds mapped
//! into this process, with every guest address and length checked against them.

use std::fs::File;
use std::sync::Arc;

use crate::{Error, Result};

/// Maps `len` bytes of `file` at `offset`, shared and read-write (`no_reserve`: without
/// reserving swap, for guest RAM). Unmapped when the result is dropped.
///
/// A regular file (memfd, hugetlbfs, shm) must hold the whole range: the fd may come from a
/// vhost-user peer, and touching a mapping past the end of its file raises SIGBUS.
pub fn map_shared(
    file: &File,
    len: usize,
    offset: u64,
    no_reserve: bool,
) -> std::io::Result<memmap2::MmapRaw> {
    let meta = file.metadata()?;
    let end = offset.checked_add(len as u64);
    if meta.file_type().is_file() && end.is_none_or(|e| e > meta.len()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the file holds {} bytes, not {len} at offset {offset}",
                meta.len()
            ),
        ));
    }
    let mut options = memmap2::MmapOptions::new();
    options.offset(offset).len(len);
    if no_reserve {
        options.no_reserve_swap();
    }
    options.map_raw(file)
}

/// A new memfd of `size` bytes (close-on-exec, sealable), for memory this process shares
/// with a peer.
pub fn memfd(name: &str, size: u64) -> std::io::Result<File> {
    vfblk_hugepages::memfd(name, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING, size)
}

/// One mapped region.
#[derive(Debug)]
pub struct Region {
    /// Guest-physical start.
    pub guest_phys: u64,
    /// Length in bytes.
    pub size: u64,
    /// Frontend (QEMU) virtual address of the start, used in vring addresses.
    pub frontend_addr: u64,
    /// Offset of the region in its fd.
    pub mmap_offset: u64,
    host: *mut u8,
    /// Dropped before the mapping (fields drop in order).
    contained: Option<crate::sigbus::Contained>,
    _map: memmap2::MmapRaw,
    file: File,
}

impl Region {
    /// The fd the region is mapped from (handed to a successor process).
    pub fn file(&self) -> &File {
        &self.file
    }
}

// SAFETY: the mapping is process-wide shared memory accessed through raw pointers only.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

/// A host-side view of a guest buffer, inside one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSlice {
    /// Guest-physical address.
    pub guest_phys: u64,
    /// Host address.
    pub host: *mut u8,
    /// Length in bytes.
    pub len: u32,
}

/// The guest's memory table. Cloning shares the mappings (each region is unmapped when the
/// last table holding it goes), so a table can change one region at a time.
#[derive(Debug, Default, Clone)]
pub struct GuestMemory {
    regions: Vec<Arc<Region>>,
    /// The regions' guest ranges and host addresses side by side, in the same order: what
    /// every translation reads (one cache line for four regions, no pointer to follow).
    spans: Vec<Span>,
}

/// Where one region's guest-physical range lives in this process.
#[derive(Debug, Clone, Copy)]
struct Span {
    guest_phys: u64,
    size: u64,
    host: *mut u8,
}

// SAFETY: `host` points into a mapping the table's `Arc<Region>` for the same region keeps
// alive; reading through it is as safe from any thread as the region's own pointer.
unsafe impl Send for Span {}
// SAFETY: as above; a span is never written after it is made.
unsafe impl Sync for Span {}

/// Most regions a SET_MEM_TABLE message may carry (vhost-user's
/// VHOST_MEMORY_BASELINE_NREGIONS).
pub const MAX_REGIONS: usize = 8;
/// Most regions a table may reach through ADD_MEM_REG (what GET_MAX_MEM_SLOTS answers;
/// libvhost-user's long-standing limit, plenty for memory hotplug).
pub const MAX_MEM_SLOTS: usize = 32;

impl GuestMemory {
    /// Maps the regions of a SET_MEM_TABLE message. `regions` are
    /// (guest_phys, size, frontend_addr, mmap_offset) with one fd each.
    pub fn from_table(regions: &[(u64, u64, u64, u64)], files: Vec<File>) -> Result<Self> {
        if regions.len() != files.len() || regions.is_empty() || regions.len() > MAX_REGIONS {
            return Err(Error::MemoryTableShape {
                regions: regions.len(),
                fds: files.len(),
                max: MAX_REGIONS,
            });
        }
        let mut mem = GuestMemory::default();
        for (&(guest_phys, size, frontend_addr, mmap_offset), file) in regions.iter().zip(files) {
            mem.add(guest_phys, size, frontend_addr, mmap_offset, file)?;
        }
        Ok(mem)
    }

    /// Maps and adds one region; overlapping or wrapping regions are refused.
    pub fn add(
        &mut self,
        guest_phys: u64,
        size: u64,
        frontend_addr: u64,
        mmap_offset: u64,
        file: File,
    ) -> Result<()> {
        let gend = guest_phys.checked_add(size);
        let fend = frontend_addr.checked_add(size);
        if size == 0 || gend.is_none() || fend.is_none() || mmap_offset.checked_add(size).is_none()
        {
            return Err(Error::BadRegion {
                guest_phys,
                size,
                why: "empty or wrapping around",
            });
        }
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(Error::BadRegion {
                guest_phys,
                size,
                why: "the table already holds the most regions accepted",
            });
        }
        for r in &self.regions {
            if guest_phys < r.guest_phys + r.size && r.guest_phys < guest_phys + size {
                return Err(Error::BadRegion {
                    guest_phys,
                    size,
                    why: "overlaps another region",
                });
            }
        }
        // A sealed memfd cannot shrink under us; anything else is contained instead.
        let sealed = crate::sigbus::seal_against_shrinking(&file);
        let map =
            map_shared(&file, size as usize, mmap_offset, true).map_err(|source| Error::Io {
                what: format!("mmap of guest region gpa {guest_phys:#x} ({size} bytes)"),
                source,
            })?;
        let contained = if sealed {
            None
        } else {
            crate::sigbus::register(map.as_mut_ptr(), size as usize)
        };
        self.spans.push(Span {
            guest_phys,
            size,
            host: map.as_mut_ptr(),
        });
        self.regions.push(Arc::new(Region {
            guest_phys,
            size,
            frontend_addr,
            mmap_offset,
            host: map.as_mut_ptr(),
            contained,
            _map: map,
            file,
        }));
        Ok(())
    }

    /// Removes the region at `guest_phys` of `size` bytes (REM_MEM_REG).
    pub fn remove(&mut self, guest_phys: u64, size: u64) -> Result<()> {
        let pos = self
            .regions
            .iter()
            .position(|r| r.guest_phys == guest_phys && r.size == size)
            .ok_or(Error::NoSuchRegion { guest_phys, size })?;
        self.regions.remove(pos);
        self.spans.remove(pos);
        Ok(())
    }

    /// Whether `other` describes the same memory: the same regions at the same guest and
    /// frontend addresses, backed by the same files at the same offsets. A frontend that
    /// sends the same table again (QEMU does, around device start) need not cost a drain and
    /// a remap.
    pub fn same_as(&self, other: &GuestMemory) -> bool {
        fn identity(r: &Region) -> Option<(u64, u64, u64, u64, u64, u64)> {
            use std::os::unix::fs::MetadataExt;
            let meta = r.file.metadata().ok()?;
            Some((
                r.guest_phys,
                r.size,
                r.frontend_addr,
                r.mmap_offset,
                meta.dev(),
                meta.ino(),
            ))
        }
        self.regions.len() == other.regions.len()
            && self.regions.iter().all(|r| {
                let Some(mine) = identity(r) else {
                    return false;
                };
                other
                    .regions
                    .iter()
                    .any(|o| identity(o).is_some_and(|theirs| theirs == mine))
            })
    }

    /// Whether the frontend shrank a region's file under us (see [`crate::sigbus`]): what
    /// was done on that memory since cannot be trusted.
    pub fn poisoned(&self) -> bool {
        self.regions
            .iter()
            .any(|r| r.contained.as_ref().is_some_and(|c| c.poisoned()))
    }

    /// The end of the highest region (exclusive guest-physical address); 0 without regions.
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.guest_phys.saturating_add(r.size))
            .max()
            .unwrap_or(0)
    }

    /// The regions.
    pub fn regions(&self) -> &[Arc<Region>] {
        &self.regions
    }

    /// Host address of the start of `len` bytes at guest-physical `gpa`, and how many of
    /// them lie in the region holding `gpa` (a buffer may continue in an adjacent region).
    #[inline]
    pub fn translate_prefix(&self, gpa: u64, len: u64) -> Option<(*mut u8, u64)> {
        for r in &self.spans {
            let off = gpa.wrapping_sub(r.guest_phys);
            if gpa >= r.guest_phys && off < r.size {
                // SAFETY: off < size: inside the mapping.
                return Some((unsafe { r.host.add(off as usize) }, len.min(r.size - off)));
            }
        }
        None
    }

    /// Host address of `len` bytes at guest-physical `gpa`, if they lie in one region.
    #[inline]
    pub fn translate(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.spans {
            let off = gpa.wrapping_sub(r.guest_phys);
            if gpa >= r.guest_phys && off <= r.size && len <= r.size - off {
                // SAFETY: off + len <= size: inside the mapping.
                return Some(unsafe { r.host.add(off as usize) });
            }
        }
        None
    }

    /// Host address of `len` bytes at a frontend virtual address (vring addresses).
    pub fn translate_frontend(&self, addr: u64, len: u64) -> Option<*mut u8> {
        for r in &self.regions {
            let off = addr.wrapping_sub(r.frontend_addr);
            if addr >= r.frontend_addr && off <= r.size && len <= r.size - off {
                // SAFETY: inside the mapping, as above.
                return Some(unsafe { r.host.add(off as usize) });
            }
        }
        None
    }

    /// Guest-physical address of a frontend virtual address.
    pub fn frontend_to_guest(&self, addr: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = addr.wrapping_sub(r.frontend_addr);
            // Lazily: for an address below the region, `off` wrapped and the sum would too.
            (addr >= r.frontend_addr && off < r.size).then(|| r.guest_phys + off)
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A memfd of `size` bytes for tests that play the frontend.
    pub fn memfd(size: u64) -> File {
        super::memfd("vfblk-test-guest", size).unwrap()
    }

    #[test]
    fn translation_is_bounded_by_regions() {
        let f1 = memfd(0x10000);
        let f2 = memfd(0x10000);
        let mem = GuestMemory::from_table(
            &[
                (0, 0x10000, 0x7000_0000, 0),
                (0x10_0000, 0x8000, 0x7100_0000, 0x8000),
            ],
            vec![f1, f2],
        )
        .unwrap();
        assert!(mem.translate(0, 0x10000).is_some());
        assert!(mem.translate(0xffff, 1).is_some());
        assert!(
            mem.translate(0xffff, 2).is_none(),
            "crosses the end of region 0"
        );
        assert!(mem.translate(0x10000, 1).is_none(), "in the hole");
        assert!(mem.translate(0x10_7fff, 1).is_some());
        assert!(mem.translate(0x10_8000, 1).is_none());
        assert!(mem.translate(u64::MAX, 2).is_none(), "wrapping");
        assert!(mem.translate(0x10_0000, u64::MAX).is_none());
        assert_eq!(mem.frontend_to_guest(0x7100_0010), Some(0x10_0010));
        // Below a region whose guest address is high: no overflow (found by fuzzing).
        let high = GuestMemory::from_table(
            &[(u64::MAX - 0x1_0000, 0x1000, 0x5000, 0)],
            vec![memfd(0x1000)],
        )
        .unwrap();
        assert_eq!(high.frontend_to_guest(0x10), None);
        assert!(mem.translate_frontend(0x7000_fff0, 0x20).is_none());
        let p0 = mem.translate(0x100, 4).unwrap();
        let p1 = mem.translate_frontend(0x7000_0100, 4).unwrap();
        assert_eq!(p0, p1);
    }

    #[test]
    fn the_same_table_again_is_recognised() {
        let f = memfd(0x4000);
        let dup = || f.try_clone().unwrap();
        let a = GuestMemory::from_table(&[(0, 0x4000, 0x7000, 0)], vec![dup()]).unwrap();
        let b = GuestMemory::from_table(&[(0, 0x4000, 0x7000, 0)], vec![dup()]).unwrap();
        assert!(a.same_as(&b), "same file, same layout (fds differ)");
        let moved =
            GuestMemory::from_table(&[(0x1000, 0x3000, 0x7000, 0x1000)], vec![dup()]).unwrap();
        assert!(!a.same_as(&moved));
        let other =
            GuestMemory::from_table(&[(0, 0x4000, 0x7000, 0)], vec![memfd(0x4000)]).unwrap();
        assert!(!a.same_as(&other), "another file");
    }

    #[test]
    fn regions_longer_than_their_file_are_refused() {
        // Mapping would succeed, and the first touch past the file's end would be SIGBUS.
        assert!(GuestMemory::from_table(&[(0, 0x2000, 0, 0)], vec![memfd(0x1000)]).is_err());
        assert!(GuestMemory::from_table(&[(0, 0x1000, 0, 0x1000)], vec![memfd(0x1000)]).is_err());
        assert!(GuestMemory::from_table(&[(0, 0x1000, 0, 0x1000)], vec![memfd(0x2000)]).is_ok());
    }

    #[test]
    fn bad_tables_are_refused() {
        assert!(GuestMemory::from_table(&[], vec![]).is_err());
        assert!(GuestMemory::from_table(&[(0, 0x1000, 0, 0)], vec![]).is_err());
        let overlapping = GuestMemory::from_table(
            &[(0, 0x2000, 0, 0), (0x1000, 0x2000, 0x10000, 0)],
            vec![memfd(0x2000), memfd(0x3000)],
        );
        assert!(overlapping.is_err());
        assert!(
            GuestMemory::from_table(&[(u64::MAX - 10, 0x1000, 0, 0)], vec![memfd(0x1000)]).is_err()
        );
        assert!(GuestMemory::from_table(&[(0, 0, 0, 0)], vec![memfd(0x1000)]).is_err());
    }
}
