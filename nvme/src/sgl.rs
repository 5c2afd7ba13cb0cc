//! Scatter-gather lists (NVMe 1.4 §4.4) for buffers PRPs cannot describe: segments that
//! start or end inside a page. One segment goes in the command as a Data Block descriptor;
//! more go to a list of Data Block descriptors that a Last Segment descriptor points at.

use crate::prp::{DmaSegment, PrpError};

/// SGL descriptor type: Data Block.
pub const TYPE_DATA_BLOCK: u8 = 0x0;
/// SGL descriptor type: Last Segment.
pub const TYPE_LAST_SEGMENT: u8 = 0x3;

/// An SGL descriptor (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Address.
    pub address: u64,
    /// Length in bytes.
    pub length: u32,
    /// Reserved.
    pub reserved: [u8; 3],
    /// Type (bits 7:4) and subtype (bits 3:0).
    pub identifier: u8,
}

const _: () = assert!(std::mem::size_of::<Descriptor>() == 16);

impl Descriptor {
    fn new(address: u64, length: u32, kind: u8) -> Self {
        Self {
            address,
            length,
            reserved: [0; 3],
            identifier: kind << 4,
        }
    }

    /// The descriptor as the two dwords pairs of a command's data pointer (PRP1, PRP2 slots).
    pub fn as_dptr(&self) -> (u64, u64) {
        (
            self.address,
            u64::from(self.length) | (u64::from(self.identifier) << 56),
        )
    }
}

/// Builds the data pointer for `segments`: returns (DPTR low, DPTR high, total bytes). The
/// descriptor list (when more than one segment) goes to `list` at `list_iova`, which holds
/// `capacity` descriptors.
///
/// # Safety
/// `list` must point to `capacity` writable descriptors that only the device reads.
pub unsafe fn build(
    segments: &[DmaSegment],
    list: *mut Descriptor,
    list_iova: u64,
    capacity: usize,
) -> Result<(u64, u64, u64), PrpError> {
    if segments.is_empty() || segments.iter().any(|s| s.len == 0) {
        return Err(PrpError::Empty);
    }
    let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    if let [only] = segments {
        let (lo, hi) = Descriptor::new(only.iova, only.len, TYPE_DATA_BLOCK).as_dptr();
        return Ok((lo, hi, total));
    }
    if segments.len() > capacity {
        return Err(PrpError::TooLong);
    }
    for (i, s) in segments.iter().enumerate() {
        // SAFETY: i < segments.len() <= capacity.
        unsafe {
            list.add(i)
                .write(Descriptor::new(s.iova, s.len, TYPE_DATA_BLOCK))
        };
    }
    let bytes = (segments.len() * 16) as u32;
    let (lo, hi) = Descriptor::new(list_iova, bytes, TYPE_LAST_SEGMENT).as_dptr();
    Ok((lo, hi, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_segment_is_inline_data_block() {
        let mut list = [Descriptor::default(); 4];
        let segs = [DmaSegment {
            iova: 0x1234_5601,
            len: 777,
        }];
        // SAFETY: the list array holds the capacity passed.
        let (lo, hi, total) = unsafe { build(&segs, list.as_mut_ptr(), 0x9000, 4) }.unwrap();
        assert_eq!((lo, hi, total), (0x1234_5601, 777, 777));
        assert_eq!(list[0], Descriptor::default(), "no list for one segment");
    }

    #[test]
    fn several_segments_go_through_a_last_segment_list() {
        let mut list = [Descriptor::default(); 4];
        let segs = [
            DmaSegment {
                iova: 0x1000_0100,
                len: 300,
            },
            DmaSegment {
                iova: 0x2000_0ff0,
                len: 4000,
            },
            DmaSegment {
                iova: 0x3000_0004,
                len: 820,
            },
        ];
        // SAFETY: the list array holds the capacity passed.
        let (lo, hi, total) = unsafe { build(&segs, list.as_mut_ptr(), 0x9000, 4) }.unwrap();
        assert_eq!(total, 5120);
        assert_eq!(lo, 0x9000);
        assert_eq!(hi, 48 | (0x30u64 << 56), "length 3 * 16, type Last Segment");
        assert_eq!(
            list[1],
            Descriptor {
                address: 0x2000_0ff0,
                length: 4000,
                reserved: [0; 3],
                identifier: 0
            }
        );
        // Byte layout of a descriptor as the spec has it.
        // SAFETY: Descriptor is repr(C), 16 bytes of plain integers.
        let bytes: [u8; 16] =
            unsafe { std::mem::transmute(Descriptor::new(0x1122, 0x10, TYPE_LAST_SEGMENT)) };
        assert_eq!(&bytes[0..8], &0x1122u64.to_le_bytes());
        assert_eq!(&bytes[8..12], &0x10u32.to_le_bytes());
        assert_eq!(bytes[15], 0x30);
        assert_eq!(
            // SAFETY: the list array holds the capacity passed.
            unsafe { build(&segs, list.as_mut_ptr(), 0x9000, 2) },
            Err(PrpError::TooLong)
        );
        assert_eq!(
            // SAFETY: the list array holds the capacity passed.
            unsafe { build(&[], list.as_mut_ptr(), 0x9000, 2) },
            Err(PrpError::Empty)
        );
    }
}
