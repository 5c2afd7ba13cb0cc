//! NVMe controller registers (BAR0) and their fields, NVMe base specification 1.4 §3.1.

/// Bytes of BAR0 the driver needs mapped: registers plus doorbells for a few queues.
pub const BAR0_MIN: usize = 0x2000;

use crate::mmio::Mmio;

/// Register offsets in BAR0.
pub mod offset {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0c;
    /// Interrupt Mask Clear.
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1c;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue base address (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue base address (64-bit).
    pub const ACQ: usize = 0x30;
    /// First doorbell (admin SQ tail).
    pub const DOORBELLS: usize = 0x1000;
}

/// Controller Capabilities, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    fn bits(self, lo: u32, width: u32) -> u64 {
        (self.0 >> lo) & ((1u64 << width) - 1)
    }

    /// Maximum queue entries supported (MQES is 0-based; this is the count).
    pub fn max_queue_entries(self) -> u32 {
        self.bits(0, 16) as u32 + 1
    }

    /// Contiguous Queues Required.
    pub fn contiguous_queues_required(self) -> bool {
        self.bits(16, 1) == 1
    }

    /// Worst-case time for CSTS.RDY to change after CC.EN changes, in milliseconds.
    pub fn timeout_ms(self) -> u64 {
        self.bits(24, 8) * 500
    }

    /// Doorbell stride code: doorbells are `4 << DSTRD` bytes apart.
    pub fn doorbell_stride_code(self) -> u32 {
        self.bits(32, 4) as u32
    }

    /// Distance between doorbell registers in bytes.
    pub fn doorbell_stride(self) -> usize {
        4 << self.doorbell_stride_code()
    }

    /// Whether the NVM command set is supported (CSS bit 0).
    pub fn nvm_command_set(self) -> bool {
        self.bits(37, 8) & 1 == 1
    }

    /// Smallest memory page size the controller supports, in bytes.
    pub fn page_size_min(self) -> usize {
        1 << (12 + self.bits(48, 4))
    }

    /// Largest memory page size the controller supports, in bytes.
    pub fn page_size_max(self) -> usize {
        1 << (12 + self.bits(52, 4))
    }
}

/// The Version register: major, minor, tertiary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version(pub u32);

impl Version {
    /// Major version.
    pub fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Minor version.
    pub fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }
    /// Tertiary version.
    pub fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// Controller Status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Csts(pub u32);

impl Csts {
    /// Ready.
    pub fn ready(self) -> bool {
        self.0 & 1 == 1
    }
    /// Controller Fatal Status.
    pub fn fatal(self) -> bool {
        self.0 & 2 == 2
    }
    /// Shutdown status: 0 normal, 1 in progress, 2 complete.
    pub fn shutdown_status(self) -> u32 {
        (self.0 >> 2) & 3
    }
}

impl std::fmt::Display for Csts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shst = [
            "normal",
            "shutdown in progress",
            "shutdown complete",
            "reserved",
        ];
        write!(
            f,
            "{:#x} (RDY {}, CFS {}, SHST {})",
            self.0,
            self.ready() as u8,
            self.fatal() as u8,
            shst[self.shutdown_status() as usize]
        )
    }
}

/// Shutdown notification (CC.SHN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownNotification {
    /// No notification.
    None = 0,
    /// Normal shutdown: the controller completes outstanding work first.
    Normal = 1,
    /// Abrupt shutdown.
    Abrupt = 2,
}

/// Controller Configuration (NVMe 1.4 §3.1.5), built and read by named fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cc(pub u32);

impl Cc {
    const EN: u32 = 1;
    const CSS_SHIFT: u32 = 4;
    const MPS_SHIFT: u32 = 7;
    const AMS_SHIFT: u32 = 11;
    const SHN_SHIFT: u32 = 14;
    const IOSQES_SHIFT: u32 = 16;
    const IOCQES_SHIFT: u32 = 20;

    fn with_field(self, shift: u32, width: u32, value: u32) -> Self {
        let mask = ((1u32 << width) - 1) << shift;
        Cc((self.0 & !mask) | ((value << shift) & mask))
    }

    fn field(self, shift: u32, width: u32) -> u32 {
        (self.0 >> shift) & ((1 << width) - 1)
    }

    /// CC.EN set or cleared.
    pub fn with_enable(self, enable: bool) -> Self {
        self.with_field(0, 1, u32::from(enable))
    }

    /// CC.EN.
    pub fn enabled(self) -> bool {
        self.0 & Self::EN != 0
    }

    /// CC.CSS: the I/O command set (0: NVM).
    pub fn with_command_set(self, css: u32) -> Self {
        self.with_field(Self::CSS_SHIFT, 3, css)
    }

    /// CC.MPS from a memory page size of `page_size` bytes (4 KiB << MPS).
    pub fn with_page_size(self, page_size: usize) -> Self {
        let mps = (page_size.trailing_zeros()).saturating_sub(12);
        self.with_field(Self::MPS_SHIFT, 4, mps)
    }

    /// Memory page size in bytes.
    pub fn page_size(self) -> usize {
        4096 << self.field(Self::MPS_SHIFT, 4)
    }

    /// CC.AMS: arbitration (0: round robin).
    pub fn with_arbitration(self, ams: u32) -> Self {
        self.with_field(Self::AMS_SHIFT, 3, ams)
    }

    /// CC.SHN.
    pub fn with_shutdown(self, shn: ShutdownNotification) -> Self {
        self.with_field(Self::SHN_SHIFT, 2, shn as u32)
    }

    /// CC.IOSQES: I/O submission queue entry size as a power of two.
    pub fn with_sq_entry_size(self, log2: u32) -> Self {
        self.with_field(Self::IOSQES_SHIFT, 4, log2)
    }

    /// CC.IOCQES: I/O completion queue entry size as a power of two.
    pub fn with_cq_entry_size(self, log2: u32) -> Self {
        self.with_field(Self::IOCQES_SHIFT, 4, log2)
    }

    /// IOSQES and IOCQES.
    pub fn entry_sizes(self) -> (u32, u32) {
        (
            self.field(Self::IOSQES_SHIFT, 4),
            self.field(Self::IOCQES_SHIFT, 4),
        )
    }
}

/// Typed access to the controller registers in a mapped BAR0.
pub struct Registers<'a> {
    bar: &'a Mmio,
}

impl<'a> Registers<'a> {
    /// Registers of the controller whose BAR0 is `bar`.
    pub fn new(bar: &'a Mmio) -> Self {
        Self { bar }
    }

    /// CAP.
    pub fn cap(&self) -> Cap {
        Cap(self.bar.read64(offset::CAP))
    }

    /// VS.
    pub fn version(&self) -> Version {
        Version(self.bar.read32(offset::VS))
    }

    /// CC.
    pub fn cc(&self) -> Cc {
        Cc(self.bar.read32(offset::CC))
    }

    /// Writes CC.
    pub fn set_cc(&self, cc: Cc) {
        self.bar.write32(offset::CC, cc.0);
    }

    /// CSTS.
    pub fn csts(&self) -> Csts {
        Csts(self.bar.read32(offset::CSTS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cc_fields_land_where_the_spec_puts_them() {
        let cc = Cc::default()
            .with_enable(true)
            .with_command_set(0)
            .with_page_size(4096)
            .with_arbitration(0)
            .with_sq_entry_size(6)
            .with_cq_entry_size(4);
        assert_eq!(
            cc.0,
            1 | (6 << 16) | (4 << 20),
            "what the driver always wrote"
        );
        assert!(cc.enabled());
        assert_eq!(cc.page_size(), 4096);
        assert_eq!(cc.entry_sizes(), (6, 4));
        let off = cc.with_enable(false);
        assert!(!off.enabled());
        assert_eq!(off.0, 6 << 16 | 4 << 20, "disabling keeps the rest");
        let shn = cc.with_shutdown(ShutdownNotification::Normal);
        assert_eq!(shn.0 & (3 << 14), 1 << 14);
        assert_eq!(
            shn.with_shutdown(ShutdownNotification::None).0,
            cc.0,
            "the field is replaced, not or-ed"
        );
        assert_eq!(Cc::default().with_page_size(16384).0 >> 7 & 0xf, 2);
    }

    #[test]
    fn decodes_qemu_7_2_cap_and_version() {
        // Read from QEMU 7.2's emulated controller in the lab (shared/notes/vm-lab.md).
        let cap = Cap(0x004018200f0107ff);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.contiguous_queues_required());
        assert_eq!(cap.timeout_ms(), 15 * 500);
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(cap.nvm_command_set());
        assert_eq!(cap.page_size_min(), 4096);
        assert_eq!(cap.page_size_max(), 4096 << 4);
        let vs = Version(0x00010400);
        assert_eq!((vs.major(), vs.minor(), vs.tertiary()), (1, 4, 0));
        assert_eq!(vs.to_string(), "1.4.0");
        assert_eq!(
            Csts(0b1001).to_string(),
            "0x9 (RDY 1, CFS 0, SHST shutdown complete)"
        );
    }
}
