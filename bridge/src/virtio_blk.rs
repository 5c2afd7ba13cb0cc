//! virtio-blk spec types (virtio 1.2 §5.2): request types, status values, the request header,
//! discard/write-zeroes ranges and the config space, as `#[repr(C)]` little-endian layouts
//! with their sizes asserted at compile time.

/// Request types (`type` of the header).
pub mod req {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// Get device id.
    pub const GET_ID: u32 = 8;
    /// Discard.
    pub const DISCARD: u32 = 11;
    /// Write zeroes.
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Sector size of the virtio-blk protocol (independent of the device's block size).
pub const SECTOR: u64 = 512;
/// Write-zeroes range flag: the device may deallocate.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The request header the driver puts first in every chain (`struct virtio_blk_outhdr`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// Request type ([`req`]).
    pub kind: u32,
    /// Priority (unused by virtio 1.x devices).
    pub ioprio: u32,
    /// First 512-byte sector.
    pub sector: u64,
}

const _: () = assert!(std::mem::size_of::<RequestHeader>() == 16);

impl RequestHeader {
    /// Decodes the 16 little-endian bytes of a header.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            kind: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ioprio: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            sector: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    /// The header's 16 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// One range of a discard or write-zeroes request
/// (`struct virtio_blk_discard_write_zeroes`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub num_sectors: u32,
    /// Flags ([`WRITE_ZEROES_FLAG_UNMAP`]).
    pub flags: u32,
}

const _: () = assert!(std::mem::size_of::<Range>() == 16);

impl Range {
    /// Decodes 16 little-endian bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        Self {
            sector: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            num_sectors: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// The range's 16 little-endian bytes.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// The device's config space up to the write-zeroes fields (`struct virtio_blk_config`),
/// fields little-endian as the guest reads them.
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest segment (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Geometry: cylinders.
    pub cylinders: u16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors.
    pub sectors: u8,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Topology: physical block exponent.
    pub physical_block_exp: u8,
    /// Topology: alignment offset.
    pub alignment_offset: u8,
    /// Topology: minimum I/O size.
    pub min_io_size: u16,
    /// Topology: optimal I/O size.
    pub opt_io_size: u32,
    /// Writeback cache mode (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Padding.
    pub unused0: u8,
    /// Queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Most sectors per discard range.
    pub max_discard_sectors: u32,
    /// Most discard ranges per request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Most sectors per write-zeroes range.
    pub max_write_zeroes_sectors: u32,
    /// Most write-zeroes ranges per request.
    pub max_write_zeroes_seg: u32,
    /// Write zeroes may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Padding.
    pub unused1: [u8; 3],
}

/// Bytes of [`Config`].
pub const CONFIG_BYTES: usize = 60;
const _: () = assert!(std::mem::size_of::<Config>() == CONFIG_BYTES);

impl Config {
    /// The config space as the guest reads it (little-endian).
    pub fn to_bytes(&self) -> [u8; CONFIG_BYTES] {
        let c = *self;
        let mut b = [0u8; CONFIG_BYTES];
        let mut at = 0usize;
        let mut put = |bytes: &[u8]| {
            b[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&{ c.capacity }.to_le_bytes());
        put(&{ c.size_max }.to_le_bytes());
        put(&{ c.seg_max }.to_le_bytes());
        put(&{ c.cylinders }.to_le_bytes());
        put(&[c.heads, c.sectors]);
        put(&{ c.blk_size }.to_le_bytes());
        put(&[c.physical_block_exp, c.alignment_offset]);
        put(&{ c.min_io_size }.to_le_bytes());
        put(&{ c.opt_io_size }.to_le_bytes());
        put(&[c.writeback, c.unused0]);
        put(&{ c.num_queues }.to_le_bytes());
        put(&{ c.max_discard_sectors }.to_le_bytes());
        put(&{ c.max_discard_seg }.to_le_bytes());
        put(&{ c.discard_sector_alignment }.to_le_bytes());
        put(&{ c.max_write_zeroes_sectors }.to_le_bytes());
        put(&{ c.max_write_zeroes_seg }.to_le_bytes());
        put(&[c.write_zeroes_may_unmap]);
        put(&c.unused1);
        debug_assert_eq!(at, CONFIG_BYTES);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn config_fields_sit_where_the_spec_puts_them() {
        assert_eq!(offset_of!(Config, seg_max), 12);
        assert_eq!(offset_of!(Config, blk_size), 20);
        assert_eq!(offset_of!(Config, num_queues), 34);
        assert_eq!(offset_of!(Config, max_discard_sectors), 36);
        assert_eq!(offset_of!(Config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(Config, write_zeroes_may_unmap), 56);
        let c = Config {
            capacity: 0x0102_0304_0506_0708,
            num_queues: 4,
            write_zeroes_may_unmap: 1,
            ..Config::default()
        };
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&b[34..36], &4u16.to_le_bytes());
        assert_eq!(b[56], 1);
    }

    #[test]
    fn header_and_range_round_trip() {
        let h = RequestHeader {
            kind: req::DISCARD,
            ioprio: 0,
            sector: u64::MAX - 1,
        };
        assert_eq!(RequestHeader::from_bytes(&h.to_bytes()), h);
        let r = Range {
            sector: 7,
            num_sectors: 9,
            flags: WRITE_ZEROES_FLAG_UNMAP,
        };
        assert_eq!(Range::from_bytes(&r.to_bytes()), r);
    }
}
