//! Page-aligned sub-allocation of mapped DMA memory: queues, PRP lists and I/O buffers share
//! 2 MiB hugepage arenas instead of taking a whole hugepage (and an IOMMU mapping) each.

use std::sync::{Arc, Mutex};

use crate::{
    DmaBuffer, DmaError, DmaMapper, DmaMemory, IovaAllocator, Result, HUGE_PAGE_SIZE,
    SMALL_PAGE_SIZE,
};

struct Arena {
    buffer: DmaBuffer,
    /// Free offsets within the arena.
    free: IovaAllocator,
}

/// Told of every arena a pool adds, before any chunk of it is handed out: its memfd, IOVA
/// and length (a process keeping its DMA memory in an fd store stores it).
pub type ArenaHook = Arc<dyn Fn(std::os::fd::BorrowedFd<'_>, u64, usize) + Send + Sync>;

struct Inner {
    name: String,
    mapper: Arc<dyn DmaMapper>,
    iovas: Arc<Mutex<IovaAllocator>>,
    arenas: Vec<Arena>,
    on_arena: Option<ArenaHook>,
}

/// A growing set of mapped arenas handing out page-aligned chunks.
#[derive(Clone)]
pub struct DmaPool {
    inner: Arc<Mutex<Inner>>,
}

/// A page-aligned piece of a [`DmaPool`] arena; returned to the pool on drop.
pub struct DmaChunk {
    pool: Arc<Mutex<Inner>>,
    arena: usize,
    offset: usize,
    len: usize,
    ptr: *mut u8,
    iova: u64,
}

// SAFETY: the chunk is an exclusive range of a shared mapping that lives as long as the pool
// (the chunk holds the pool); access is through raw pointers only.
unsafe impl Send for DmaChunk {}
// SAFETY: as above; `&DmaChunk` only offers copies in and out.
unsafe impl Sync for DmaChunk {}

impl DmaPool {
    /// A pool whose arenas are mapped through `mapper` at IOVAs from `iovas`.
    pub fn new(name: &str, mapper: Arc<dyn DmaMapper>, iovas: Arc<Mutex<IovaAllocator>>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                name: name.to_string(),
                mapper,
                iovas,
                arenas: Vec::new(),
                on_arena: None,
            })),
        }
    }

    /// Allocates `len` bytes (rounded up to 4 KiB) aligned to `align` (a power of two, at
    /// least 4 KiB), adding an arena of at least 2 MiB when none has room.
    pub fn alloc(&self, len: usize, align: usize) -> Result<DmaChunk> {
        let align = align.max(SMALL_PAGE_SIZE);
        if !align.is_power_of_two() || len == 0 {
            return Err(DmaError::Iova(format!(
                "bad chunk request: {len} bytes aligned to {align}"
            )));
        }
        let len = len.div_ceil(SMALL_PAGE_SIZE) * SMALL_PAGE_SIZE;
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| DmaError::Iova("pool lock poisoned".into()))?;
        let found = inner.arenas.iter_mut().enumerate().find_map(|(i, a)| {
            a.free
                .alloc(len as u64, align as u64)
                .ok()
                .map(|off| (i, off))
        });
        let (arena, offset) = match found {
            Some(hit) => hit,
            None => {
                let size =
                    (len + align).max(HUGE_PAGE_SIZE).div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE;
                let name = format!("{}-arena{}", inner.name, inner.arenas.len());
                let memory = DmaMemory::allocate(&name, size)?;
                let size = memory.len();
                let buffer = DmaBuffer::map(memory, inner.mapper.clone(), inner.iovas.clone())?;
                let mut free = IovaAllocator::with_window(0, size as u64)?;
                let offset = free.alloc(len as u64, align as u64)?;
                if let Some(hook) = &inner.on_arena {
                    hook(buffer.memory().fd(), buffer.iova(), size);
                }
                inner.arenas.push(Arena { buffer, free });
                (inner.arenas.len() - 1, offset)
            }
        };
        let a = &inner.arenas[arena];
        // SAFETY: offset + len lies within the arena's mapping.
        let ptr = unsafe { a.buffer.memory().as_ptr().add(offset as usize) };
        Ok(DmaChunk {
            pool: self.inner.clone(),
            arena,
            offset: offset as usize,
            len,
            ptr,
            iova: a.buffer.iova() + offset,
        })
    }

    /// Arenas mapped so far.
    pub fn arenas(&self) -> usize {
        self.inner.lock().map(|i| i.arenas.len()).unwrap_or(0)
    }

    /// A pool made of arenas another process mapped and handed over
    /// ([`DmaBuffer::adopted`]), all free until chunks are claimed ([`DmaPool::claim`]);
    /// it grows as any pool does.
    pub fn adopt(
        name: &str,
        mapper: Arc<dyn DmaMapper>,
        iovas: Arc<Mutex<IovaAllocator>>,
        arenas: Vec<DmaBuffer>,
    ) -> Result<Self> {
        let arenas = arenas
            .into_iter()
            .map(|buffer| {
                let free = IovaAllocator::with_window(0, buffer.memory().len() as u64)?;
                Ok(Arena { buffer, free })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                name: name.to_string(),
                mapper,
                iovas,
                arenas,
                on_arena: None,
            })),
        })
    }

    /// Takes the chunk at `offset..offset+len` of arena `arena` out of the free space: a
    /// chunk another process used (its queues, say) and handed over. Fails unless the range
    /// is whole pages, inside the arena and free.
    pub fn claim(&self, arena: usize, offset: usize, len: usize) -> Result<DmaChunk> {
        let mut inner = self
            .inner
            .lock()
            .map_err(|_| DmaError::Iova("pool lock poisoned".into()))?;
        let count = inner.arenas.len();
        let a = inner
            .arenas
            .get_mut(arena)
            .ok_or_else(|| DmaError::Iova(format!("no arena {arena} (the pool has {count})")))?;
        let size = a.buffer.memory().len();
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= size && len > 0);
        if !inside || offset % SMALL_PAGE_SIZE != 0 || len % SMALL_PAGE_SIZE != 0 {
            return Err(DmaError::Iova(format!(
                "chunk {offset:#x}+{len:#x} is not whole pages inside arena {arena} of {size:#x} bytes"
            )));
        }
        if !a.free.reserve(offset as u64, len as u64)? {
            return Err(DmaError::Iova(format!(
                "chunk {offset:#x}+{len:#x} lies outside arena {arena}"
            )));
        }
        // SAFETY: offset + len lies within the arena's mapping (checked above).
        let ptr = unsafe { a.buffer.memory().as_ptr().add(offset) };
        Ok(DmaChunk {
            pool: self.inner.clone(),
            arena,
            offset,
            len,
            ptr,
            iova: a.buffer.iova() + offset as u64,
        })
    }

    /// Each arena's memfd (duplicated), IOVA and length, in arena order: what a process
    /// taking the pool over maps again ([`DmaPool::adopt`]).
    pub fn arena_records(&self) -> Result<Vec<(std::os::fd::OwnedFd, u64, usize)>> {
        let inner = self
            .inner
            .lock()
            .map_err(|_| DmaError::Iova("pool lock poisoned".into()))?;
        inner
            .arenas
            .iter()
            .map(|a| {
                let fd = a
                    .buffer
                    .memory()
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|source| DmaError::Alloc {
                        what: "duplicating an arena's memfd".into(),
                        len: a.buffer.memory().len(),
                        source,
                    })?;
                Ok((fd, a.buffer.iova(), a.buffer.memory().len()))
            })
            .collect()
    }

    /// Calls `hook` for every arena added from now on.
    pub fn on_new_arena(&self, hook: ArenaHook) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.on_arena = Some(hook);
        }
    }

    /// Each arena's IOVA, length and memfd identity (`st_dev`, `st_ino`), in arena order.
    pub fn arena_layout(&self) -> Vec<(u64, usize, (u64, u64))> {
        self.inner
            .lock()
            .map(|i| {
                i.arenas
                    .iter()
                    .map(|a| {
                        let memory = a.buffer.memory();
                        (a.buffer.iova(), memory.len(), file_identity(memory.fd()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The IOVA ranges (start, length) of the arenas, sorted.
    pub fn arena_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = self
            .inner
            .lock()
            .map(|i| {
                i.arenas
                    .iter()
                    .map(|a| (a.buffer.iova(), a.buffer.memory().len() as u64))
                    .collect()
            })
            .unwrap_or_default();
        ranges.sort_unstable();
        ranges
    }
}

impl DmaChunk {
    /// Where the chunk lies in its pool: arena index, offset and length in bytes (what
    /// [`DmaPool::claim`] takes).
    pub fn location(&self) -> (usize, usize, usize) {
        (self.arena, self.offset, self.len)
    }

    /// Device address of the chunk's first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Host address of the chunk's first byte (raw: the device may write it at any time).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes (a multiple of 4 KiB).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: chunks are at least a page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `data` in at `offset`.
    ///
    /// # Panics
    /// If the range is outside the chunk (a caller bug).
    pub fn write_bytes(&self, offset: usize, data: &[u8]) {
        assert!(offset
            .checked_add(data.len())
            .is_some_and(|end| end <= self.len));
        // SAFETY: bounds checked; raw copy into our own range.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) }
    }

    /// Fills `len` bytes at `offset` with `byte`.
    ///
    /// # Panics
    /// If the range is outside the chunk.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: bounds checked; raw fill of our own range.
        unsafe { std::ptr::write_bytes(self.ptr.add(offset), byte, len) }
    }

    /// Copies bytes out from `offset`.
    ///
    /// # Panics
    /// If the range is outside the chunk.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        assert!(offset
            .checked_add(out.len())
            .is_some_and(|end| end <= self.len));
        // SAFETY: bounds checked; raw copy out of our own range.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) }
    }
}

impl Drop for DmaChunk {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.pool.lock() {
            if let Some(a) = inner.arenas.get_mut(self.arena) {
                let _ = a.free.free(self.offset as u64, self.len as u64);
            }
        }
    }
}

/// The `st_dev` and `st_ino` of an open file ((0, 0) if fstat fails: no file has it).
pub fn file_identity(fd: std::os::fd::BorrowedFd<'_>) -> (u64, u64) {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a stat into the buffer it is given; the result is checked before
    // the buffer is read.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return (0, 0);
    }
    // SAFETY: fstat succeeded, so it filled the struct.
    let st = unsafe { st.assume_init() };
    (st.st_dev, st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct CountingMapper {
        maps: Mutex<Vec<(u64, usize)>>,
    }

    impl DmaMapper for CountingMapper {
        unsafe fn map(&self, iova: u64, len: usize, _vaddr: *mut u8) -> Result<()> {
            self.maps.lock().unwrap().push((iova, len));
            Ok(())
        }
        fn unmap(&self, _iova: u64, _len: usize) -> Result<()> {
            Ok(())
        }
    }

    #[test]
    fn chunks_share_arenas_and_come_back() {
        let mapper = Arc::new(CountingMapper::default());
        let iovas = Arc::new(Mutex::new(IovaAllocator::default()));
        let pool = DmaPool::new("t", mapper.clone(), iovas);
        let a = pool.alloc(100, 4096).unwrap();
        let b = pool.alloc(64 << 10, 64 << 10).unwrap();
        assert_eq!(a.len(), 4096);
        assert_eq!(pool.arenas(), 1, "both fit one arena");
        assert_eq!(b.iova() % (64 << 10), 0);
        assert_ne!(a.iova(), b.iova());
        // Chunks do not overlap and hold their own bytes.
        a.write_bytes(0, b"first");
        b.write_bytes(0, b"second");
        let mut out = [0u8; 5];
        a.read_bytes(0, &mut out);
        assert_eq!(&out, b"first");
        let a_iova = a.iova();
        drop(a);
        assert_eq!(
            pool.alloc(4096, 4096).unwrap().iova(),
            a_iova,
            "freed space is reused"
        );
        // Larger than what is left: a second arena, mapped once.
        let big = pool.alloc(3 << 20, 4096).unwrap();
        assert_eq!(big.len(), 3 << 20);
        assert_eq!(pool.arenas(), 2);
        assert_eq!(mapper.maps.lock().unwrap().len(), 2);
        assert!(pool.alloc(0, 4096).is_err());
        assert!(
            pool.alloc(4096, 12288).is_err(),
            "alignment must be a power of two"
        );
    }

    #[test]
    fn a_handed_over_pool_keeps_its_chunks_where_they_were() {
        let mapper = Arc::new(CountingMapper::default());
        let iovas = Arc::new(Mutex::new(
            IovaAllocator::with_window(1 << 30, 2 << 30).unwrap(),
        ));
        let pool = DmaPool::new("old", mapper.clone(), iovas);
        let queue = pool.alloc(16 << 10, 4096).unwrap();
        queue.write_bytes(100, b"ring");
        let (arena, offset, len) = queue.location();
        // The new process: same memfds at the same IOVAs, nothing mapped.
        let owned = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let iovas2 = Arc::new(Mutex::new(
            IovaAllocator::with_window(1 << 30, 2 << 30).unwrap(),
        ));
        let buffers = pool
            .arena_records()
            .unwrap()
            .into_iter()
            .map(|(fd, iova, len)| {
                let mem = DmaMemory::from_fd(std::fs::File::from(fd), len).unwrap();
                // SAFETY: the recording mapper does no DMA.
                unsafe {
                    DmaBuffer::adopted(mem, iova, mapper.clone(), iovas2.clone(), owned.clone())
                }
                .unwrap()
            })
            .collect();
        let maps_before = mapper.maps.lock().unwrap().len();
        let adopted = DmaPool::adopt("new", mapper.clone(), iovas2.clone(), buffers).unwrap();
        assert_eq!(
            mapper.maps.lock().unwrap().len(),
            maps_before,
            "nothing mapped"
        );
        let again = adopted.claim(arena, offset, len).unwrap();
        assert_eq!(again.iova(), queue.iova());
        let mut out = [0u8; 4];
        again.read_bytes(100, &mut out);
        assert_eq!(&out, b"ring");
        assert!(adopted.claim(arena, offset, len).is_err(), "claimed twice");
        assert!(
            adopted.claim(arena, 1 << 30, 4096).is_err(),
            "outside the arena"
        );
        assert!(adopted.claim(7, 0, 4096).is_err(), "no such arena");
        assert!(
            adopted.claim(arena, offset + len + 1, 4096).is_err(),
            "not page aligned"
        );
        // New chunks go beside the claimed one; the arena's IOVA is reserved for good.
        let next = adopted.alloc(4096, 4096).unwrap();
        assert_ne!(next.iova(), again.iova());
        assert!(iovas2.lock().unwrap().reserve(queue.iova(), 4096).is_err());
    }
}
