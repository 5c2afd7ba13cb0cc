//! Physical Region Page lists: turning a buffer's IOVA segments into PRP1/PRP2 and a list.
//!
//! Rules (NVMe 1.4 §4.3): PRP1 may carry an offset into its page (dword aligned); every later
//! entry is page aligned; so every segment but the last must end on a page boundary and every
//! segment but the first must start on one. Scatter lists that break this need SGLs.

/// A piece of a data buffer as the device addresses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaSegment {
    /// Device address (IOVA).
    pub iova: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Why a buffer cannot be described with PRPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrpError {
    /// No bytes at all.
    Empty,
    /// The first segment is not dword aligned.
    Unaligned,
    /// A segment other than the first does not start on a page boundary, or one other than
    /// the last does not end on one.
    Gap,
    /// More pages than the preallocated list holds.
    TooLong,
}

impl std::fmt::Display for PrpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrpError::Empty => "empty buffer",
            PrpError::Unaligned => "buffer not dword aligned",
            PrpError::Gap => "segments break PRP page rules (needs SGL or a bounce buffer)",
            PrpError::TooLong => "buffer spans more pages than the PRP list holds",
        })
    }
}

/// The data pointer of a command built from PRPs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prps {
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2: zero, the second page, or the list's IOVA.
    pub prp2: u64,
    /// Total bytes described.
    pub len: u64,
}

/// Builds PRPs for `segments` with controller page size `page` (a power of two). List
/// entries go to `list` (raw pointer into DMA memory at IOVA `list_iova`, `list_pages` pages
/// long); lists longer than a page are chained through each page's last entry.
///
/// # Safety
/// `list` must point to `list_pages * page` writable bytes that only the device reads.
pub unsafe fn build(
    segments: &[DmaSegment],
    page: u64,
    list: *mut u64,
    list_iova: u64,
    list_pages: usize,
) -> Result<Prps, PrpError> {
    let first = segments.first().ok_or(PrpError::Empty)?;
    if first.iova & 3 != 0 {
        return Err(PrpError::Unaligned);
    }
    let mask = page - 1;
    let mut total: u64 = 0;
    for (i, s) in segments.iter().enumerate() {
        if s.len == 0 {
            return Err(PrpError::Empty);
        }
        let end = s.iova.checked_add(u64::from(s.len)).ok_or(PrpError::Gap)?;
        if (i > 0 && s.iova & mask != 0) || (i + 1 < segments.len() && end & mask != 0) {
            return Err(PrpError::Gap);
        }
        total += u64::from(s.len);
    }
    let prp1 = first.iova;
    // Pages after the first: the page-aligned addresses the transfer continues at.
    let rest = segments.iter().enumerate().flat_map(|(i, s)| {
        let start = if i == 0 {
            (s.iova & !mask) + page
        } else {
            s.iova
        };
        let end = s.iova + u64::from(s.len);
        (0..)
            .map(move |k| start + k * page)
            .take_while(move |p| *p < end)
    });
    let first_pages = (first.iova + u64::from(first.len) - (first.iova & !mask)).div_ceil(page);
    let mut count_after_first = (first_pages - 1) as usize
        + segments[1..]
            .iter()
            .map(|s| u64::from(s.len).div_ceil(page) as usize)
            .sum::<usize>();
    let mut rest = rest;
    if count_after_first == 0 {
        return Ok(Prps {
            prp1,
            prp2: 0,
            len: total,
        });
    }
    if count_after_first == 1 {
        let prp2 = rest.next().expect("one page");
        return Ok(Prps {
            prp1,
            prp2,
            len: total,
        });
    }
    let per_page = (page / 8) as usize;
    // Entries a chain of n pages holds: (per_page - 1) per page but the last, which holds per_page.
    let capacity = list_pages * (per_page - 1) + 1;
    if count_after_first > capacity {
        return Err(PrpError::TooLong);
    }
    let mut page_index = 0usize;
    let mut slot = 0usize;
    for addr in rest {
        let last_slot_of_page = slot == per_page - 1;
        if last_slot_of_page && count_after_first > 1 {
            // Chain: this slot points at the next list page.
            page_index += 1;
            // SAFETY: within the caller's list_pages pages (capacity checked above).
            unsafe {
                list.add((page_index - 1) * per_page + slot)
                    .write(list_iova + page_index as u64 * page)
            };
            slot = 0;
        }
        // SAFETY: within the caller's list_pages pages (capacity checked above).
        unsafe { list.add(page_index * per_page + slot).write(addr) };
        slot += 1;
        count_after_first -= 1;
    }
    Ok(Prps {
        prp1,
        prp2: list_iova,
        len: total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;
    const LIST_IOVA: u64 = 0x9000_0000;

    fn run(segs: &[DmaSegment], pages: usize) -> (Result<Prps, PrpError>, Vec<u64>) {
        let mut list = vec![0u64; pages * 512];
        // SAFETY: the vector holds `pages` pages of list entries.
        let r = unsafe { build(segs, PAGE, list.as_mut_ptr(), LIST_IOVA, pages) };
        (r, list)
    }

    fn seg(iova: u64, len: u32) -> DmaSegment {
        DmaSegment { iova, len }
    }

    #[test]
    fn one_and_two_pages_use_no_list() {
        let (r, _) = run(&[seg(0x10_0000, 4096)], 1);
        assert_eq!(
            r.unwrap(),
            Prps {
                prp1: 0x10_0000,
                prp2: 0,
                len: 4096
            }
        );
        // 512 bytes at an offset, inside one page.
        let (r, _) = run(&[seg(0x10_0200, 512)], 1);
        assert_eq!(r.unwrap().prp2, 0);
        // Offset buffer crossing into a second page.
        let (r, _) = run(&[seg(0x10_0800, 4096)], 1);
        assert_eq!(
            r.unwrap(),
            Prps {
                prp1: 0x10_0800,
                prp2: 0x10_1000,
                len: 4096
            }
        );
    }

    #[test]
    fn long_buffer_fills_a_list() {
        let (r, list) = run(&[seg(0x20_0000, 5 * 4096)], 1);
        let p = r.unwrap();
        assert_eq!((p.prp1, p.prp2, p.len), (0x20_0000, LIST_IOVA, 5 * 4096));
        assert_eq!(&list[..4], &[0x20_1000, 0x20_2000, 0x20_3000, 0x20_4000]);
    }

    #[test]
    fn scattered_page_aligned_segments_are_fine() {
        let segs = [seg(0x1_0800, 2048), seg(0x5_0000, 8192), seg(0x9_0000, 100)];
        let (r, list) = run(&segs, 1);
        let p = r.unwrap();
        assert_eq!(p.len, 2048 + 8192 + 100);
        assert_eq!(&list[..3], &[0x5_0000, 0x5_1000, 0x9_0000]);
    }

    #[test]
    fn rule_breaking_segments_are_refused() {
        assert_eq!(run(&[], 1).0, Err(PrpError::Empty));
        assert_eq!(run(&[seg(0x1002, 8)], 1).0, Err(PrpError::Unaligned));
        // First segment does not end on a page boundary.
        assert_eq!(
            run(&[seg(0x1000, 512), seg(0x3000, 512)], 1).0,
            Err(PrpError::Gap)
        );
        // Later segment starts mid-page.
        assert_eq!(
            run(&[seg(0x1000, 4096), seg(0x3200, 512)], 1).0,
            Err(PrpError::Gap)
        );
        assert_eq!(run(&[seg(0x1000, 0)], 1).0, Err(PrpError::Empty));
    }

    #[test]
    fn chained_lists_link_through_the_last_entry() {
        // 1 + 600 pages: 600 entries need two list pages (511 + link, then 89).
        let (r, list) = run(&[seg(0x100_0000, 601 * 4096)], 2);
        assert_eq!(r.unwrap().prp2, LIST_IOVA);
        assert_eq!(list[510], 0x100_0000 + 511 * 4096);
        assert_eq!(list[511], LIST_IOVA + 4096, "link to the second list page");
        assert_eq!(list[512], 0x100_0000 + 512 * 4096);
        assert_eq!(list[512 + 88], 0x100_0000 + 600 * 4096);
        // Exactly 512 entries fit in one page without a link.
        let (r, list) = run(&[seg(0x100_0000, 513 * 4096)], 1);
        assert!(r.is_ok());
        assert_eq!(list[511], 0x100_0000 + 512 * 4096);
        assert_eq!(
            run(&[seg(0x100_0000, 514 * 4096)], 1).0,
            Err(PrpError::TooLong)
        );
    }
}
