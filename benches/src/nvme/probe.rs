//! A read-only look at a controller through VFIO: identity, IOMMU group, registers, and a
//! hugepage DMA buffer mapped into its IOMMU domain.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vfblk_hugepages::{DmaBuffer, DmaMemory, IovaAllocator, VfioDmaMapper};

use vfblk_nvme::pci::{PciAddress, SysfsPciDevice};
use vfblk_nvme::regs::{Cap, Cc, Csts, Registers, Version};
use vfblk_nvme::vfio::VfioPci;
use vfblk_nvme::{Error, Result};

/// What [`probe`] found.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// PCI address.
    pub address: PciAddress,
    /// Class code with programming interface.
    pub class: u32,
    /// Vendor and device id.
    pub ids: (u16, u16),
    /// Bound driver.
    pub driver: String,
    /// IOMMU group.
    pub iommu_group: u32,
    /// Bytes of BAR0 mapped.
    pub bar0_size: usize,
    /// CAP.
    pub cap: Cap,
    /// VS.
    pub version: Version,
    /// CC.
    pub cc: Cc,
    /// CSTS.
    pub csts: Csts,
    /// IOVA of the DMA buffer that was mapped.
    pub dma_iova: u64,
    /// Its size.
    pub dma_size: usize,
    /// Its page kind.
    pub dma_page_kind: &'static str,
}

/// Opens the controller through VFIO, reads its registers, and maps (then unmaps) a 2 MiB
/// hugepage buffer for DMA. Changes nothing on the controller but enabling bus mastering.
pub fn probe(address: PciAddress) -> Result<ProbeReport> {
    let sysfs = SysfsPciDevice::new(address)?;
    let class = sysfs.class()?;
    let ids = sysfs.ids()?;
    let pci = Arc::new(VfioPci::open(address, vfblk_nvme::regs::BAR0_MIN)?);
    let regs = Registers::new(pci.bar0());
    let (cap, version, cc, csts) = (regs.cap(), regs.version(), regs.cc(), regs.csts());
    if cap.0 == u64::MAX || version.0 == u32::MAX {
        return Err(Error::Device {
            device: address.to_string(),
            what: "registers read all ones: the device is not responding".into(),
        });
    }

    let dma_err = |source| Error::Dma {
        device: address.to_string(),
        source,
    };
    let memory =
        DmaMemory::allocate_huge(&format!("vfblk-probe-{address}"), 2 << 20).map_err(dma_err)?;
    let mapper = Arc::new(VfioDmaMapper::new(
        pci.container_fd().as_raw_fd(),
        pci.clone(),
    ));
    let iovas = Arc::new(Mutex::new(IovaAllocator::default()));
    let buffer = DmaBuffer::map(memory, mapper, iovas).map_err(dma_err)?;
    let (dma_iova, dma_size, dma_page_kind) = (
        buffer.iova(),
        buffer.memory().len(),
        buffer.memory().page_kind().name(),
    );
    buffer.unmap().map_err(dma_err)?;

    Ok(ProbeReport {
        address,
        class,
        ids,
        driver: sysfs.driver().unwrap_or_default(),
        iommu_group: pci.iommu_group(),
        bar0_size: pci.bar0().len(),
        cap,
        version,
        cc,
        csts,
        dma_iova,
        dma_size,
        dma_page_kind,
    })
}

impl ProbeReport {
    /// The report as JSON (what `vfblk-nvme probe --json` prints and the lab reads).
    pub fn to_json(&self) -> serde_json::Value {
        let cap = self.cap;
        serde_json::json!({
            "pci_address": self.address.to_string(),
            "class": format!("{:#08x}", self.class),
            "vendor_device": format!("{:04x}:{:04x}", self.ids.0, self.ids.1),
            "driver": self.driver,
            "iommu_group": self.iommu_group,
            "bar0_size": self.bar0_size,
            "version": self.version.to_string(),
            "version_raw": format!("{:#010x}", self.version.0),
            "cc": format!("{:#x}", self.cc.0),
            "csts": self.csts.to_string(),
            "cap": {
                "raw": format!("{:#018x}", cap.0),
                "max_queue_entries": cap.max_queue_entries(),
                "contiguous_queues_required": cap.contiguous_queues_required(),
                "doorbell_stride_code": cap.doorbell_stride_code(),
                "doorbell_stride_bytes": cap.doorbell_stride(),
                "timeout_ms": cap.timeout_ms(),
                "nvm_command_set": cap.nvm_command_set(),
                "page_size_min": cap.page_size_min(),
                "page_size_max": cap.page_size_max(),
            },
            "dma": {
                "iova": format!("{:#x}", self.dma_iova),
                "size": self.dma_size,
                "page_kind": self.dma_page_kind,
            },
        })
    }
}
