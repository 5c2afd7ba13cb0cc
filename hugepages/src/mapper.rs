//! Mapping memory into a device's IOMMU domain.

use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use std::os::fd::RawFd;

use crate::{DmaError, DmaMemory, IovaAllocator, Result};

/// Something that maps host memory at an IOVA for device DMA: a VFIO container today, an
/// iommufd IOAS later.
pub trait DmaMapper: Send + Sync {
    /// Maps `len` bytes at `vaddr` to `iova`, readable and writable by the device.
    ///
    /// # Safety
    /// `vaddr..vaddr+len` must stay mapped in this process until [`DmaMapper::unmap`] is
    /// called for the same range, and must be accessed only through raw pointers while mapped.
    unsafe fn map(&self, iova: u64, len: usize, vaddr: *mut u8) -> Result<()>;

    /// Removes a mapping made by [`DmaMapper::map`].
    fn unmap(&self, iova: u64, len: usize) -> Result<()>;
}

/// A [`DmaMapper`] over a VFIO type1 container, by its fd: the container may have been
/// opened by this process or handed over by the process it replaces.
pub struct VfioDmaMapper {
    container: RawFd,
    // The container's fd, and its mappings (they vanish when its last group detaches, when
    // the device closes), live as long as this: every mapper, and every buffer through it,
    // keeps the device open.
    _owner: Arc<dyn std::any::Any + Send + Sync>,
}

/// `_IO(VFIO_TYPE, VFIO_BASE + 13)` and `+ 14` (linux/vfio.h).
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = (b';' as libc::c_ulong) << 8 | (100 + 13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = (b';' as libc::c_ulong) << 8 | (100 + 14);
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;

/// `struct vfio_iommu_type1_dma_map`.
#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

/// `struct vfio_iommu_type1_dma_unmap` (without the flexible array we never use).
#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

impl VfioDmaMapper {
    /// Wraps the fd of a container that has a group attached (so the IOMMU type is set);
    /// `owner` holds the fd open and that group attached as long as any mapping may exist.
    pub fn new(container: RawFd, owner: Arc<dyn std::any::Any + Send + Sync>) -> Self {
        Self {
            container,
            _owner: owner,
        }
    }

    /// Removes every mapping inside `iova..iova+len` (none may straddle its ends); returns
    /// the bytes unmapped. Used to drop what another process mapped in a shared container.
    pub fn unmap_within(&self, iova: u64, len: u64) -> Result<u64> {
        let mut unmap = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size: len,
        };
        // SAFETY: VFIO_IOMMU_UNMAP_DMA reads and writes exactly this struct; the fd is a
        // VFIO container kept open by `_owner`.
        let rc = unsafe { libc::ioctl(self.container, VFIO_IOMMU_UNMAP_DMA, &mut unmap) };
        if rc != 0 {
            return Err(DmaError::Map {
                iova,
                len: len as usize,
                reason: format!("VFIO_IOMMU_UNMAP_DMA: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(unmap.size)
    }
}

impl DmaMapper for VfioDmaMapper {
    unsafe fn map(&self, iova: u64, len: usize, vaddr: *mut u8) -> Result<()> {
        let map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        // SAFETY: VFIO_IOMMU_MAP_DMA only reads this struct; the caller keeps the range
        // mapped and reference-free until unmap.
        let rc = unsafe { libc::ioctl(self.container, VFIO_IOMMU_MAP_DMA, &map) };
        if rc != 0 {
            return Err(DmaError::Map {
                iova,
                len,
                reason: format!("VFIO_IOMMU_MAP_DMA: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }

    fn unmap(&self, iova: u64, len: usize) -> Result<()> {
        let unmapped = self.unmap_within(iova, len as u64)?;
        if unmapped != len as u64 {
            return Err(DmaError::Map {
                iova,
                len,
                reason: format!("VFIO_IOMMU_UNMAP_DMA removed {unmapped} bytes"),
            });
        }
        Ok(())
    }
}

/// DMA memory mapped into an IOMMU at an allocated IOVA; unmapped and its IOVA returned on drop.
pub struct DmaBuffer {
    // ManuallyDrop: if the IOMMU refuses to unmap, the memory is leaked, never freed under DMA.
    memory: ManuallyDrop<DmaMemory>,
    released: bool,
    /// For a buffer another process mapped ([`DmaBuffer::adopted`]): unmapped on drop only
    /// once this is set (until then the mapping is still that process's).
    owned: Option<Arc<std::sync::atomic::AtomicBool>>,
    iova: u64,
    mapper: Arc<dyn DmaMapper>,
    iovas: Arc<Mutex<IovaAllocator>>,
}

impl DmaBuffer {
    /// Allocates an IOVA range for `memory` (aligned to its page size) and maps it.
    pub fn map(
        memory: DmaMemory,
        mapper: Arc<dyn DmaMapper>,
        iovas: Arc<Mutex<IovaAllocator>>,
    ) -> Result<Self> {
        let len = memory.len();
        let align = memory.page_kind().size() as u64;
        let iova = iovas
            .lock()
            .map_err(|_| DmaError::Iova("allocator lock poisoned".into()))?
            .alloc(len as u64, align)?;
        // SAFETY: `memory` is owned by the returned buffer, which unmaps before dropping it,
        // and DmaMemory exposes only raw-pointer access.
        if let Err(e) = unsafe { mapper.map(iova, len, memory.as_ptr()) } {
            if let Ok(mut a) = iovas.lock() {
                let _ = a.free(iova, len as u64);
            }
            return Err(e);
        }
        Ok(Self {
            memory: ManuallyDrop::new(memory),
            released: false,
            owned: None,
            iova,
            mapper,
            iovas,
        })
    }

    /// Takes over `memory` that another process mapped at `iova` in a container this process
    /// shares (its memfd handed over and mapped here again): nothing is mapped, the IOVA
    /// range is reserved in `iovas` (it must lie inside its window and be free). Dropping
    /// it removes the mapping once `owned` is set; before that the mapping is left for the
    /// other process.
    ///
    /// # Safety
    /// The range must be mapped in the container to the same pages `memory` maps.
    pub unsafe fn adopted(
        memory: DmaMemory,
        iova: u64,
        mapper: Arc<dyn DmaMapper>,
        iovas: Arc<Mutex<IovaAllocator>>,
        owned: Arc<std::sync::atomic::AtomicBool>,
    ) -> Result<Self> {
        let len = memory.len() as u64;
        let mut a = iovas
            .lock()
            .map_err(|_| DmaError::Iova("allocator lock poisoned".into()))?;
        let (start, end) = a.window();
        if iova % memory.page_kind().size() as u64 != 0 || !a.reserve(iova, len)? {
            return Err(DmaError::Iova(format!(
                "a handed-over buffer at {iova:#x}+{len:#x} is not aligned to its pages or lies outside {start:#x}..{end:#x}"
            )));
        }
        drop(a);
        Ok(Self {
            memory: ManuallyDrop::new(memory),
            released: false,
            owned: Some(owned),
            iova,
            mapper,
            iovas,
        })
    }

    /// The IOVA the device uses for the start of the buffer.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The memory.
    pub fn memory(&self) -> &DmaMemory {
        &self.memory
    }

    /// Unmaps explicitly, reporting an IOMMU error that drop would have to ignore.
    pub fn unmap(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        if self.released {
            return Ok(());
        }
        let len = self.memory.len();
        let ours = self
            .owned
            .as_ref()
            .is_none_or(|o| o.load(std::sync::atomic::Ordering::Acquire));
        if ours {
            self.mapper.unmap(self.iova, len)?;
        }
        self.released = true;
        if let Ok(mut a) = self.iovas.lock() {
            a.free(self.iova, len as u64)?;
        }
        Ok(())
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        match self.release() {
            Ok(()) => {}
            Err(e) if !self.released => {
                tracing::error!(
                    error = &e as &dyn std::error::Error,
                    "{e}; leaking the buffer so the device cannot write freed memory"
                );
                return;
            }
            Err(e) => tracing::warn!(error = &e as &dyn std::error::Error, "{e}"),
        }
        // SAFETY: unmapped from the IOMMU above, and never used again.
        unsafe { ManuallyDrop::drop(&mut self.memory) }
    }
}

/// Memory the caller owns (guest RAM from a vhost-user memory table) mapped at a chosen IOVA,
/// unmapped on drop.
pub struct ExternalMapping {
    iova: u64,
    len: usize,
    reserved: bool,
    /// For a mapping another process made ([`ExternalMapping::adopted`]): unmapped on drop
    /// only once this is set (until then it is still that process's).
    owned: Option<Arc<std::sync::atomic::AtomicBool>>,
    mapper: Arc<dyn DmaMapper>,
    iovas: Arc<Mutex<IovaAllocator>>,
}

impl ExternalMapping {
    /// Maps `len` bytes at `vaddr` to `iova`, reserving the range in `iovas` if it falls in
    /// its window.
    ///
    /// # Safety
    /// `vaddr..vaddr+len` must stay mapped in this process until the mapping is dropped, and
    /// the process must only access it through raw pointers (the device writes it by DMA).
    pub unsafe fn new(
        mapper: Arc<dyn DmaMapper>,
        iovas: Arc<Mutex<IovaAllocator>>,
        iova: u64,
        vaddr: *mut u8,
        len: usize,
    ) -> Result<Self> {
        let reserved = iovas
            .lock()
            .map_err(|_| DmaError::Iova("allocator lock poisoned".into()))?
            .reserve(iova, len as u64)?;
        // SAFETY: forwarded from the caller.
        if let Err(e) = unsafe { mapper.map(iova, len, vaddr) } {
            if reserved {
                if let Ok(mut a) = iovas.lock() {
                    let _ = a.free(iova, len as u64);
                }
            }
            return Err(e);
        }
        Ok(Self {
            iova,
            len,
            reserved,
            owned: None,
            mapper,
            iovas,
        })
    }

    /// Takes over a mapping of `len` bytes at `iova` that another process made in a
    /// container this process shares, of memory this process maps too. Dropping it removes
    /// the mapping once `owned` is set; before that (the other process may still need it)
    /// dropping leaves it in place.
    ///
    /// # Safety
    /// The range must be mapped to memory this process keeps mapped until the mapping is
    /// dropped, and accesses only through raw pointers (the device writes it by DMA).
    pub unsafe fn adopted(
        mapper: Arc<dyn DmaMapper>,
        iovas: Arc<Mutex<IovaAllocator>>,
        iova: u64,
        len: usize,
        owned: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Self {
            iova,
            len,
            reserved: false,
            owned: Some(owned),
            mapper,
            iovas,
        }
    }

    /// The IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// The length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length mappings are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for ExternalMapping {
    fn drop(&mut self) {
        if let Some(owned) = &self.owned {
            if !owned.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
        }
        match self.mapper.unmap(self.iova, self.len) {
            Ok(()) if self.reserved => {
                if let Ok(mut a) = self.iovas.lock() {
                    let _ = a.free(self.iova, self.len as u64);
                }
            }
            Ok(()) => {}
            // The range stays reserved: the device may still reach it.
            Err(e) => tracing::error!(error = &e as &dyn std::error::Error, "{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records mappings so tests can check what the buffer asked of the IOMMU.
    #[derive(Default)]
    struct RecordingMapper {
        live: Mutex<Vec<(u64, usize, usize)>>,
        refuse: bool,
    }

    impl DmaMapper for RecordingMapper {
        unsafe fn map(&self, iova: u64, len: usize, vaddr: *mut u8) -> Result<()> {
            if self.refuse {
                return Err(DmaError::Map {
                    iova,
                    len,
                    reason: "refused".into(),
                });
            }
            self.live.lock().unwrap().push((iova, len, vaddr as usize));
            Ok(())
        }
        fn unmap(&self, iova: u64, len: usize) -> Result<()> {
            let mut live = self.live.lock().unwrap();
            let pos = live
                .iter()
                .position(|&(i, l, _)| i == iova && l == len)
                .ok_or(DmaError::Map {
                    iova,
                    len,
                    reason: "not mapped".into(),
                })?;
            live.remove(pos);
            Ok(())
        }
    }

    #[test]
    fn buffer_maps_at_allocated_iova_and_unmaps_on_drop() {
        let mapper = Arc::new(RecordingMapper::default());
        let iovas = Arc::new(Mutex::new(IovaAllocator::default()));
        let mem = DmaMemory::allocate_small("t", 8192).unwrap();
        let vaddr = mem.as_ptr() as usize;
        let buf = DmaBuffer::map(mem, mapper.clone(), iovas.clone()).unwrap();
        assert_eq!(*mapper.live.lock().unwrap(), vec![(256 << 30, 8192, vaddr)]);
        let second = DmaBuffer::map(
            DmaMemory::allocate_small("t2", 4096).unwrap(),
            mapper.clone(),
            iovas.clone(),
        )
        .unwrap();
        assert_eq!(second.iova(), (256 << 30) + 8192);
        drop(buf);
        assert_eq!(mapper.live.lock().unwrap().len(), 1);
        second.unmap().unwrap();
        assert!(mapper.live.lock().unwrap().is_empty());
        // Both IOVA ranges came back: the next buffer starts at the window again.
        let third = DmaBuffer::map(
            DmaMemory::allocate_small("t3", 4096).unwrap(),
            mapper.clone(),
            iovas,
        )
        .unwrap();
        assert_eq!(third.iova(), 256 << 30);
    }

    #[test]
    fn external_mapping_reserves_and_releases_its_range() {
        let mapper = Arc::new(RecordingMapper::default());
        let iovas = Arc::new(Mutex::new(
            IovaAllocator::with_window(0x10_0000, 0x20_0000).unwrap(),
        ));
        let mut ram = vec![0u8; 0x2000];
        // Guest RAM at GPA 0x1000: below the window, mapped, nothing reserved.
        // SAFETY: `ram` outlives the mappings; the recording mapper does no DMA.
        let low = unsafe {
            ExternalMapping::new(
                mapper.clone(),
                iovas.clone(),
                0x1000,
                ram.as_mut_ptr(),
                0x1000,
            )
        }
        .unwrap();
        // At the window's start: reserved, so allocations go around it.
        // SAFETY: as above.
        let high = unsafe {
            ExternalMapping::new(
                mapper.clone(),
                iovas.clone(),
                0x10_0000,
                ram.as_mut_ptr(),
                0x2000,
            )
        }
        .unwrap();
        assert_eq!(
            iovas.lock().unwrap().alloc(0x1000, 0x1000).unwrap(),
            0x10_2000
        );
        assert!(
            // SAFETY: as above.
            unsafe {
                ExternalMapping::new(
                    mapper.clone(),
                    iovas.clone(),
                    0x10_1000,
                    ram.as_mut_ptr(),
                    0x1000,
                )
            }
            .is_err(),
            "overlapping mapping refused"
        );
        assert_eq!(mapper.live.lock().unwrap().len(), 2);
        drop(high);
        drop(low);
        assert!(mapper.live.lock().unwrap().is_empty());
        assert_eq!(
            iovas.lock().unwrap().alloc(0x2000, 0x1000).unwrap(),
            0x10_0000
        );
    }

    #[test]
    fn refused_mapping_returns_its_iova() {
        let mapper = Arc::new(RecordingMapper {
            refuse: true,
            ..Default::default()
        });
        let iovas = Arc::new(Mutex::new(IovaAllocator::with_window(0, 8192).unwrap()));
        for _ in 0..4 {
            let mem = DmaMemory::allocate_small("t", 8192).unwrap();
            assert!(DmaBuffer::map(mem, mapper.clone(), iovas.clone()).is_err());
        }
        assert_eq!(iovas.lock().unwrap().alloc(8192, 4096).unwrap(), 0);
    }
}
