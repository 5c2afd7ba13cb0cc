//! IOVA assignment: addresses the device uses for our memory, independent of where it sits in
//! this process.

use crate::{DmaError, Result};

/// Hands out aligned IOVA ranges from a window, lowest first, reusing freed ranges.
///
/// The default window is [256 GiB, 512 GiB): below the 39-bit limit of an emulated Intel
/// IOMMU, far above the MSI range at 0xFEE00000, and above guest RAM of up to 256 GiB mapped
/// at IOVA = guest-physical address (such mappings use [`IovaAllocator::reserve`]).
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    start: u64,
    end: u64,
    /// Sorted, non-overlapping free ranges (start, end).
    free: Vec<(u64, u64)>,
}

impl Default for IovaAllocator {
    fn default() -> Self {
        Self::with_window(256 << 30, 1 << 39).expect("valid default window")
    }
}

impl IovaAllocator {
    /// An allocator over [start, end).
    pub fn with_window(start: u64, end: u64) -> Result<Self> {
        if start >= end {
            return Err(DmaError::Iova(format!("empty window {start:#x}..{end:#x}")));
        }
        Ok(Self {
            start,
            end,
            free: vec![(start, end)],
        })
    }

    /// The window this allocator serves.
    pub fn window(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        if len == 0 || !align.is_power_of_two() {
            return Err(DmaError::Iova(format!(
                "bad request: len {len:#x}, align {align:#x}"
            )));
        }
        for i in 0..self.free.len() {
            let (fs, fe) = self.free[i];
            let base = fs.div_ceil(align) * align;
            let Some(end) = base.checked_add(len) else {
                continue;
            };
            if end > fe {
                continue;
            }
            self.free.remove(i);
            if end < fe {
                self.free.insert(i, (end, fe));
            }
            if fs < base {
                self.free.insert(i, (fs, base));
            }
            return Ok(base);
        }
        Err(DmaError::Iova(format!(
            "no free range of {len:#x} bytes aligned to {align:#x} in {:#x}..{:#x}",
            self.start, self.end
        )))
    }

    /// Takes a caller-chosen range (guest RAM at IOVA = guest-physical address) out of the
    /// window so `alloc` never hands it out. Ranges outside the window need no reservation and
    /// return `Ok(false)`; a range that overlaps allocated space is an error.
    pub fn reserve(&mut self, iova: u64, len: u64) -> Result<bool> {
        let end = iova
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or_else(|| DmaError::Iova(format!("bad range {iova:#x}+{len:#x}")))?;
        if end <= self.start || iova >= self.end {
            return Ok(false);
        }
        if iova < self.start || end > self.end {
            return Err(DmaError::Iova(format!(
                "{iova:#x}..{end:#x} straddles the allocator window {:#x}..{:#x}",
                self.start, self.end
            )));
        }
        let pos = self
            .free
            .iter()
            .position(|&(s, e)| s <= iova && end <= e)
            .ok_or_else(|| {
                DmaError::Iova(format!("{iova:#x}..{end:#x} overlaps allocated IOVAs"))
            })?;
        let (s, e) = self.free.remove(pos);
        if end < e {
            self.free.insert(pos, (end, e));
        }
        if s < iova {
            self.free.insert(pos, (s, iova));
        }
        Ok(true)
    }

    /// Returns a range from [`IovaAllocator::alloc`].
    pub fn free(&mut self, iova: u64, len: u64) -> Result<()> {
        let end = iova
            .checked_add(len)
            .filter(|&e| iova >= self.start && e <= self.end && len > 0)
            .ok_or_else(|| {
                DmaError::Iova(format!("free of {iova:#x}+{len:#x} outside the window"))
            })?;
        let pos = self.free.partition_point(|&(s, _)| s < iova);
        let overlaps_prev = pos > 0 && self.free[pos - 1].1 > iova;
        let overlaps_next = pos < self.free.len() && self.free[pos].0 < end;
        if overlaps_prev || overlaps_next {
            return Err(DmaError::Iova(format!("double free of {iova:#x}+{len:#x}")));
        }
        self.free.insert(pos, (iova, end));
        // Merge with neighbours.
        if pos + 1 < self.free.len() && self.free[pos].1 == self.free[pos + 1].0 {
            self.free[pos].1 = self.free[pos + 1].1;
            self.free.remove(pos + 1);
        }
        if pos > 0 && self.free[pos - 1].1 == self.free[pos].0 {
            self.free[pos - 1].1 = self.free[pos].1;
            self.free.remove(pos);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_lowest_first_and_bounded() {
        let mut a = IovaAllocator::with_window(0x1000, 0x10_0000).unwrap();
        let x = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(x, 0x1000);
        let y = a.alloc(0x2000, 0x10000).unwrap();
        assert_eq!(y, 0x10000);
        // The gap below the aligned block is still usable.
        let z = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(z, 0x2000);
        assert!(a.alloc(0x10_0000, 0x1000).is_err());
        assert!(a.alloc(0, 0x1000).is_err());
        assert!(a.alloc(0x1000, 3).is_err());
    }

    #[test]
    fn free_merges_and_rejects_double_free() {
        let mut a = IovaAllocator::with_window(0, 0x4000).unwrap();
        let blocks: Vec<u64> = (0..4).map(|_| a.alloc(0x1000, 0x1000).unwrap()).collect();
        assert!(a.alloc(0x1000, 0x1000).is_err());
        a.free(blocks[1], 0x1000).unwrap();
        a.free(blocks[2], 0x1000).unwrap();
        assert!(a.free(blocks[1], 0x1000).is_err());
        // Merged: a two-page block fits where the two freed pages were.
        assert_eq!(a.alloc(0x2000, 0x1000).unwrap(), 0x1000);
        assert!(a.free(0x8000, 0x1000).is_err());
    }

    #[test]
    fn reserve_carves_out_chosen_ranges() {
        let mut a = IovaAllocator::with_window(0x10000, 0x20000).unwrap();
        assert!(
            !a.reserve(0x1000, 0x1000).unwrap(),
            "below the window: nothing to track"
        );
        assert!(a.reserve(0x10000, 0x2000).unwrap());
        assert_eq!(a.alloc(0x1000, 0x1000).unwrap(), 0x12000);
        assert!(a.reserve(0x11000, 0x2000).is_err(), "overlaps");
        assert!(
            a.reserve(0xf000, 0x2000).is_err(),
            "straddles the window start"
        );
        a.free(0x10000, 0x2000).unwrap();
        assert_eq!(a.alloc(0x2000, 0x1000).unwrap(), 0x10000);
    }

    #[test]
    fn default_window_stays_below_39_bits() {
        let mut a = IovaAllocator::default();
        let (start, end) = a.window();
        assert!(start >= 256 << 30 && end <= 1 << 39);
        let x = a.alloc(2 << 20, 2 << 20).unwrap();
        assert!(x + (2 << 20) <= 1 << 39);
    }
}
