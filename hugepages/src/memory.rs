//! Shared memfd-backed memory, preferably on 2 MiB huge pages.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

use memmap2::{MmapOptions, MmapRaw};

use crate::{DmaError, Result, HUGE_PAGE_SIZE, SMALL_PAGE_SIZE};

/// Which pages back a [`DmaMemory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugetlb pages.
    Huge2M,
    /// 4 KiB pages locked in memory (fallback when no hugepages are reserved).
    Small4K,
}

impl PageKind {
    /// The page size in bytes.
    pub fn size(self) -> usize {
        match self {
            PageKind::Huge2M => HUGE_PAGE_SIZE,
            PageKind::Small4K => SMALL_PAGE_SIZE,
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            PageKind::Huge2M => "2 MiB hugetlb",
            PageKind::Small4K => "4 KiB locked",
        }
    }
}

/// A shared mapping of a memfd, for memory a device reads and writes by DMA.
///
/// The mapping is only accessed through raw pointers (volatile or copy), never references,
/// because a device may write it at any time.
#[derive(Debug)]
pub struct DmaMemory {
    file: File,
    map: MmapRaw,
    kind: PageKind,
}

/// A new memfd named `name` (for /proc's maps) of `size` bytes, created with `flags`
/// (`MFD_*`): the one place the workspace makes memory files, DMA memory and the memory it
/// shares with a vhost-user peer alike.
pub fn memfd(name: &str, flags: libc::c_uint, size: u64) -> io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: cname is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

fn round_up(len: usize, align: usize) -> usize {
    len.div_ceil(align) * align
}

impl DmaMemory {
    /// Allocates `len` bytes (rounded up to the page size) on 2 MiB huge pages, falling back
    /// to locked 4 KiB pages with a logged warning when no huge pages are available.
    pub fn allocate(name: &str, len: usize) -> Result<Self> {
        match Self::allocate_huge(name, len) {
            Ok(mem) => Ok(mem),
            Err(huge_err) => {
                tracing::warn!(
                    "{name}: no 2 MiB hugepages for {len} bytes ({huge_err}); \
                     using locked 4 KiB pages (reserve some in /proc/sys/vm/nr_hugepages)"
                );
                Self::allocate_small(name, len)
            }
        }
    }

    /// Allocates `len` bytes (rounded up to 2 MiB) on huge pages, or fails.
    pub fn allocate_huge(name: &str, len: usize) -> Result<Self> {
        let len = round_up(len.max(1), HUGE_PAGE_SIZE);
        let err = |what: &str| {
            let what = what.to_string();
            move |source| DmaError::Alloc { what, len, source }
        };
        let file = memfd(
            name,
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            len as u64,
        )
        .map_err(err("memfd_create(MFD_HUGETLB) and its ftruncate"))?;
        // populate: fault every page in now, so a shortage of hugepages shows here (ENOMEM)
        // rather than as SIGBUS on first touch.
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&file)
            .map_err(err("mmap of hugetlb memfd"))?;
        Ok(Self {
            file,
            map,
            kind: PageKind::Huge2M,
        })
    }

    /// Allocates `len` bytes (rounded up to 4 KiB) on ordinary pages, locked in memory.
    pub fn allocate_small(name: &str, len: usize) -> Result<Self> {
        let len = round_up(len.max(1), SMALL_PAGE_SIZE);
        let err = |what: &str| {
            let what = what.to_string();
            move |source| DmaError::Alloc { what, len, source }
        };
        let file = memfd(name, libc::MFD_CLOEXEC, len as u64)
            .map_err(err("memfd_create and its ftruncate"))?;
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&file)
            .map_err(err("mmap of memfd"))?;
        // SAFETY: the range is exactly our live mapping.
        let rc = unsafe { libc::mlock(map.as_mut_ptr().cast(), len) };
        if rc != 0 {
            return Err(DmaError::Alloc {
                what: "mlock (raise RLIMIT_MEMLOCK)".into(),
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            map,
            kind: PageKind::Small4K,
        })
    }

    /// Maps `len` bytes of a memfd another process allocated (and handed over) with
    /// [`DmaMemory::allocate`]: the same pages, shared, nothing new allocated. The file must
    /// hold at least `len` bytes and `len` must be a whole number of its pages (hugetlb
    /// files are recognised by their filesystem).
    pub fn from_fd(file: File, len: usize) -> Result<Self> {
        let err = |what: String| move |source| DmaError::Alloc { what, len, source };
        // SAFETY: fstat/fstatfs only write the structs we pass; the fd is open.
        let (size, magic) = unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            let mut fs: libc::statfs = std::mem::zeroed();
            if libc::fstat(file.as_raw_fd(), &mut st) != 0
                || libc::fstatfs(file.as_raw_fd(), &mut fs) != 0
            {
                return Err(err("fstat of a handed-over memfd".into())(
                    io::Error::last_os_error(),
                ));
            }
            (st.st_size as u64, fs.f_type as u64)
        };
        const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
        let kind = if magic == HUGETLBFS_MAGIC {
            PageKind::Huge2M
        } else {
            PageKind::Small4K
        };
        if len == 0 || len % kind.size() != 0 || size < len as u64 {
            return Err(err(format!(
                "a handed-over memfd of {size} bytes ({}) cannot back {len} bytes",
                kind.name()
            ))(io::ErrorKind::InvalidInput.into()));
        }
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&file)
            .map_err(err("mmap of a handed-over memfd".into()))?;
        if kind == PageKind::Small4K {
            // SAFETY: the range is exactly our live mapping.
            if unsafe { libc::mlock(map.as_mut_ptr().cast(), len) } != 0 {
                return Err(err("mlock (raise RLIMIT_MEMLOCK)".into())(
                    io::Error::last_os_error(),
                ));
            }
        }
        Ok(Self { file, map, kind })
    }

    /// Start of the mapping in this process.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false: allocations are at least one page.
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Which pages back the memory.
    pub fn page_kind(&self) -> PageKind {
        self.kind
    }

    /// The memfd, to keep across a restart or hand to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Copies `data` in at `offset`.
    ///
    /// # Panics
    /// If the range is outside the memory (a caller bug, not device or guest input).
    pub fn write_bytes(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|end| end <= self.len()));
        // SAFETY: bounds checked above; raw copy, no reference to DMA memory is created.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(offset), data.len())
        }
    }

    /// Copies bytes out from `offset`.
    ///
    /// # Panics
    /// If the range is outside the memory.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|end| end <= self.len()));
        // SAFETY: bounds checked above; raw copy out of the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.as_ptr().add(offset), out.as_mut_ptr(), out.len())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_pages_round_up_and_hold_data() {
        let mem = DmaMemory::allocate_small("test-small", 5000).unwrap();
        assert_eq!(mem.len(), 8192);
        assert_eq!(mem.page_kind(), PageKind::Small4K);
        mem.write_bytes(4090, b"across a page");
        let mut back = [0u8; 13];
        mem.read_bytes(4090, &mut back);
        assert_eq!(&back, b"across a page");
        assert_eq!(mem.as_ptr() as usize % SMALL_PAGE_SIZE, 0);
    }

    #[test]
    fn memfd_is_shared_with_a_second_mapping() {
        // What a restarted process or a vhost-user peer relies on: the fd sees the same bytes.
        let mem = DmaMemory::allocate_small("test-shared", 4096).unwrap();
        mem.write_bytes(100, b"shared");
        let dup = mem.fd().try_clone_to_owned().unwrap();
        let file = File::from(dup);
        // SAFETY: the memfd is 4 KiB and nothing truncates it while the view lives.
        let view = unsafe { MmapOptions::new().len(4096).map(&file) }.unwrap();
        assert_eq!(&view[100..106], b"shared");
    }

    #[test]
    fn handed_over_memfd_maps_the_same_pages_and_short_files_are_refused() {
        let mem = DmaMemory::allocate_small("test-handed", 8192).unwrap();
        mem.write_bytes(5000, b"queues");
        let file = File::from(mem.fd().try_clone_to_owned().unwrap());
        let again = DmaMemory::from_fd(file, 8192).unwrap();
        let mut back = [0u8; 6];
        again.read_bytes(5000, &mut back);
        assert_eq!(&back, b"queues");
        assert_eq!(again.page_kind(), PageKind::Small4K);
        let file = File::from(mem.fd().try_clone_to_owned().unwrap());
        assert!(
            DmaMemory::from_fd(file, 3 * 4096).is_err(),
            "longer than the file"
        );
        let file = File::from(mem.fd().try_clone_to_owned().unwrap());
        assert!(DmaMemory::from_fd(file, 100).is_err(), "not whole pages");
    }

    #[test]
    fn huge_pages_when_reserved() {
        // scripts/setup.sh reserves hugepages; on a machine without them this must fail
        // cleanly (ENOMEM), and allocate() must fall back.
        let free: usize = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let huge = DmaMemory::allocate_huge("test-huge", 3 << 20);
        if free >= 2 {
            let mem = huge.unwrap();
            assert_eq!(mem.len(), 4 << 20);
            assert_eq!(mem.as_ptr() as usize % HUGE_PAGE_SIZE, 0);
            mem.write_bytes((4 << 20) - 4, b"end!");
        } else {
            assert!(
                huge.is_err(),
                "hugetlb allocation succeeded with {free} free hugepages"
            );
            let mem = DmaMemory::allocate("test-fallback", 3 << 20).unwrap();
            assert_eq!(mem.page_kind(), PageKind::Small4K);
        }
    }
}
