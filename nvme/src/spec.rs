//! NVMe spec structures: submission and completion queue entries, status codes, opcodes and
//! the Identify data we use (NVMe base specification 1.4). Plain `#[repr(C)]` types with
//! compile-time size checks.

use std::fmt;

/// Admin command opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set opcodes.
pub mod nvm {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Feature identifiers.
pub mod feature {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

/// A submission queue entry (64 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Fused operation and PSDT (PRP or SGL for data transfer) in bits 7:6.
    pub flags: u8,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// Reserved (command dwords 2 and 3).
    pub cdw2: [u32; 2],
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer: PRP entry 1 (or the first half of an SGL descriptor).
    pub prp1: u64,
    /// Data pointer: PRP entry 2 (or the second half of an SGL descriptor).
    pub prp2: u64,
    /// Command dwords 10..15.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}

/// A completion queue entry (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completion {
    /// Command-specific result.
    pub dw0: u32,
    /// Reserved.
    pub dw1: u32,
    /// Submission queue head pointer as the controller sees it.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status (bits 15:1).
    pub status: u16,
}

const _: () = assert!(std::mem::size_of::<Command>() == 64);
const _: () = assert!(std::mem::size_of::<Completion>() == 16);

/// PSDT value: PRPs are used.
pub const PSDT_PRP: u8 = 0;
/// PSDT value: SGLs, metadata pointer a buffer.
pub const PSDT_SGL: u8 = 1 << 6;

impl Command {
    /// An admin or I/O command with just an opcode and namespace.
    pub fn new(opcode: u8, nsid: u32) -> Self {
        Self {
            opcode,
            nsid,
            ..Default::default()
        }
    }

    /// Identify with CNS `cns`, data to the 4 KiB buffer at `prp1`.
    pub fn identify(cns: u8, nsid: u32, prp1: u64) -> Self {
        Self {
            prp1,
            cdw10: u32::from(cns),
            ..Self::new(admin::IDENTIFY, nsid)
        }
    }

    /// Set Features Number of Queues: asks for `sqs` submission and `cqs` completion queues.
    pub fn set_number_of_queues(sqs: u16, cqs: u16) -> Self {
        Self {
            cdw10: u32::from(feature::NUMBER_OF_QUEUES),
            cdw11: (u32::from(cqs - 1) << 16) | u32::from(sqs - 1),
            ..Self::new(admin::SET_FEATURES, 0)
        }
    }

    /// Create I/O Completion Queue `qid` of `entries`, physically contiguous, interrupts off
    /// (we poll).
    pub fn create_cq(qid: u16, entries: u16, iova: u64) -> Self {
        Self {
            prp1: iova,
            cdw10: (u32::from(entries - 1) << 16) | u32::from(qid),
            cdw11: 1, // PC = 1, IEN = 0
            ..Self::new(admin::CREATE_CQ, 0)
        }
    }

    /// Create I/O Submission Queue `qid` of `entries` completing to `cqid`.
    pub fn create_sq(qid: u16, entries: u16, iova: u64, cqid: u16) -> Self {
        Self {
            prp1: iova,
            cdw10: (u32::from(entries - 1) << 16) | u32::from(qid),
            cdw11: (u32::from(cqid) << 16) | 1, // PC = 1, priority ignored (round robin)
            ..Self::new(admin::CREATE_SQ, 0)
        }
    }

    /// Doorbell Buffer Config: shadow doorbells at `shadow`, event indexes at `event`
    /// (one page each).
    pub fn doorbell_buffer_config(shadow: u64, event: u64) -> Self {
        Self {
            prp1: shadow,
            prp2: event,
            ..Self::new(admin::DOORBELL_BUFFER_CONFIG, 0)
        }
    }

    /// Delete I/O Submission Queue `qid`.
    pub fn delete_sq(qid: u16) -> Self {
        Self {
            cdw10: u32::from(qid),
            ..Self::new(admin::DELETE_SQ, 0)
        }
    }

    /// Delete I/O Completion Queue `qid`.
    pub fn delete_cq(qid: u16) -> Self {
        Self {
            cdw10: u32::from(qid),
            ..Self::new(admin::DELETE_CQ, 0)
        }
    }

    /// Read or Write of `blocks` logical blocks (1..=65536) at `lba`.
    pub fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32) -> Self {
        debug_assert!((1..=65536).contains(&blocks));
        Self {
            cdw10: lba as u32,
            cdw11: (lba >> 32) as u32,
            cdw12: blocks - 1,
            ..Self::new(opcode, nsid)
        }
    }

    /// This command with Force Unit Access: the data reaches non-volatile media before the
    /// command completes (CDW12 bit 30, reads and writes).
    pub fn with_fua(mut self) -> Self {
        self.cdw12 |= 1 << 30;
        self
    }

    /// Dataset Management with the deallocate attribute over `ranges` range entries in the
    /// buffer at `prp1`.
    pub fn deallocate(nsid: u32, ranges: u32, prp1: u64) -> Self {
        Self {
            prp1,
            cdw10: ranges - 1,
            cdw11: 1 << 2, // AD: attribute deallocate
            ..Self::new(nvm::DATASET_MANAGEMENT, nsid)
        }
    }
}

/// One Dataset Management range (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DsmRange {
    /// Context attributes.
    pub attributes: u32,
    /// Length in logical blocks.
    pub blocks: u32,
    /// Starting LBA.
    pub lba: u64,
}

const _: () = assert!(std::mem::size_of::<DsmRange>() == 16);

/// A decoded completion status (the status field without the phase bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16);

impl Status {
    /// Generic "Command Aborted due to SQ Deletion": what the driver reports for commands
    /// that were in flight when the controller was reset (the reset deleted their queue).
    pub const ABORTED_BY_RESET: Status = Status(0x08);

    /// From a completion's status field (which carries the phase tag in bit 0).
    pub fn from_completion(status: u16) -> Self {
        Status(status >> 1)
    }

    /// Status Code Type.
    pub fn sct(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Status Code.
    pub fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Do Not Retry.
    pub fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// Success.
    pub fn is_success(self) -> bool {
        self.sct() == 0 && self.sc() == 0
    }

    /// The spec's name for the status, where we know it.
    pub fn name(self) -> &'static str {
        match (self.sct(), self.sc()) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x05) => "Commands Aborted due to Power Loss Notification",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x0d) => "Invalid SGL Segment Descriptor",
            (0, 0x0f) => "Data SGL Length Invalid",
            (0, 0x13) => "Invalid PRP Offset",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (1, 0x00) => "Completion Queue Invalid",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x0c) => "Invalid Queue Deletion",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x86) => "Access Denied",
            (2, 0x87) => "Deallocated or Unwritten Logical Block",
            _ => "unknown status",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (SCT {:#x}, SC {:#04x}{})",
            self.name(),
            self.sct(),
            self.sc(),
            if self.dnr() { ", DNR" } else { "" }
        )
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

/// The Identify Controller fields we use (CNS 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI vendor id.
    pub vid: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page size (0 = no limit).
    pub mdts: u8,
    /// Controller id.
    pub cntlid: u16,
    /// Optional admin command support (bit 8: Doorbell Buffer Config).
    pub oacs: u16,
    /// Required and maximum SQ entry sizes (log2, low and high nibble).
    pub sqes: u8,
    /// Required and maximum CQ entry sizes.
    pub cqes: u8,
    /// Number of namespaces.
    pub nn: u32,
    /// Optional NVM command support (bit 2: DSM, bit 3: Write Zeroes).
    pub oncs: u16,
    /// Volatile write cache present (bit 0).
    pub vwc: u8,
    /// SGL support (bits 1:0 nonzero: SGLs supported for NVM commands).
    pub sgls: u32,
}

impl IdentifyController {
    /// Parses the 4096-byte Identify Controller data structure.
    pub fn parse(b: &[u8; 4096]) -> Self {
        Self {
            vid: le16(b, 0),
            serial: ascii(&b[4..24]),
            model: ascii(&b[24..64]),
            firmware: ascii(&b[64..72]),
            mdts: b[77],
            cntlid: le16(b, 78),
            oacs: le16(b, 256),
            sqes: b[512],
            cqes: b[513],
            nn: le32(b, 516),
            oncs: le16(b, 520),
            vwc: b[525],
            sgls: le32(b, 536),
        }
    }

    /// Dataset Management (deallocate) is supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    /// Write Zeroes is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }

    /// A volatile write cache is present (Flush is meaningful).
    pub fn has_volatile_write_cache(&self) -> bool {
        self.vwc & 1 != 0
    }

    /// SGLs are supported for NVM commands.
    pub fn supports_sgl(&self) -> bool {
        self.sgls & 0x3 != 0
    }

    /// Doorbell Buffer Config (shadow doorbells) is supported.
    pub fn supports_doorbell_buffer(&self) -> bool {
        self.oacs & (1 << 8) != 0
    }
}

/// The Identify Namespace fields we use (CNS 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace size in logical blocks.
    pub nsze: u64,
    /// Namespace capacity in logical blocks.
    pub ncap: u64,
    /// Namespace features (bit 0: thin provisioning; bit 3: deallocated blocks read zeroes via DLFEAT).
    pub nsfeat: u8,
    /// Index of the LBA format in use (FLBAS bits 3:0).
    pub lba_format: u8,
    /// log2 of the logical block size of the format in use.
    pub lba_shift: u8,
    /// Metadata bytes per block of the format in use.
    pub metadata_size: u16,
    /// Deallocate logical block features (bits 2:0 = 1: deallocated blocks read as zeros).
    pub dlfeat: u8,
}

impl IdentifyNamespace {
    /// Parses the 4096-byte Identify Namespace data structure.
    pub fn parse(b: &[u8; 4096]) -> Self {
        let lba_format = b[26] & 0xf;
        let lbaf = le32(b, 128 + 4 * usize::from(lba_format));
        Self {
            nsze: le64(b, 0),
            ncap: le64(b, 8),
            nsfeat: b[24],
            lba_format,
            lba_shift: (lbaf >> 16) as u8,
            metadata_size: lbaf as u16,
            dlfeat: b[33],
        }
    }

    /// Logical block size in bytes.
    pub fn block_size(&self) -> u32 {
        1 << self.lba_shift
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.nsze << self.lba_shift
    }

    /// Deallocated blocks read back as zeros.
    pub fn deallocated_reads_zeroes(&self) -> bool {
        self.dlfeat & 0x7 == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_decodes_phase_shifted_field() {
        // LBA Out of Range with DNR, phase bit set: status field = ((1<<14)|0x80) << 1 | 1.
        let s = Status::from_completion((((1 << 14) | 0x80) << 1) | 1);
        assert_eq!((s.sct(), s.sc(), s.dnr()), (0, 0x80, true));
        assert_eq!(s.to_string(), "LBA Out of Range (SCT 0x0, SC 0x80, DNR)");
        let ns = Status::from_completion(0x0b << 1);
        assert_eq!(ns.name(), "Invalid Namespace or Format");
        assert!(Status::from_completion(1).is_success());
        let media = Status::from_completion((2 << 8 | 0x81) << 1);
        assert_eq!(media.name(), "Unrecovered Read Error");
    }

    #[test]
    fn commands_pack_fields_where_the_spec_puts_them() {
        let c = Command::rw(nvm::READ, 1, 0x1_2345_6789, 8);
        assert_eq!((c.cdw10, c.cdw11, c.cdw12), (0x2345_6789, 1, 7));
        assert_eq!(c.with_fua().cdw12, 7 | 1 << 30, "FUA is bit 30 of CDW12");
        let q = Command::create_sq(3, 256, 0x1000, 3);
        assert_eq!((q.cdw10, q.cdw11), ((255 << 16) | 3, (3 << 16) | 1));
        let n = Command::set_number_of_queues(4, 4);
        assert_eq!(n.cdw11, (3 << 16) | 3);
        // The byte layout is the spec's: opcode at 0, CID at 2, NSID at 4, PRP1 at 24.
        let mut id = Command::identify(1, 0, 0xdead_0000);
        id.cid = 0x1234;
        // SAFETY: Command is repr(C), 64 bytes, plain integers.
        let bytes: [u8; 64] = unsafe { std::mem::transmute(id) };
        assert_eq!(bytes[0], admin::IDENTIFY);
        assert_eq!(&bytes[2..4], &0x1234u16.to_le_bytes());
        assert_eq!(&bytes[24..32], &0xdead_0000u64.to_le_bytes());
        assert_eq!(&bytes[40..44], &1u32.to_le_bytes());
    }

    #[test]
    fn identify_parsers_read_spec_offsets() {
        let mut c = [0u8; 4096];
        c[4..13].copy_from_slice(b"vfblk0001");
        c[13..24].fill(b' ');
        c[24..38].copy_from_slice(b"QEMU NVMe Ctrl");
        c[38..64].fill(b' ');
        c[77] = 7;
        c[520] = 0b1100;
        c[525] = 1;
        c[536] = 1;
        let id = IdentifyController::parse(&c);
        assert_eq!(id.serial, "vfblk0001");
        assert_eq!(id.model, "QEMU NVMe Ctrl");
        assert_eq!(id.mdts, 7);
        assert!(id.supports_dsm() && id.supports_write_zeroes() && id.supports_sgl());
        assert!(id.has_volatile_write_cache());

        let mut n = [0u8; 4096];
        n[0..8].copy_from_slice(&262144u64.to_le_bytes());
        n[26] = 1; // format 1 in use
        n[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        n[33] = 1;
        let ns = IdentifyNamespace::parse(&n);
        assert_eq!(ns.block_size(), 4096);
        assert_eq!(ns.size_bytes(), 1 << 30);
        assert!(ns.deallocated_reads_zeroes());
    }
}
