//! A PCI function owned through VFIO: container, group, device fd, config space and BAR0.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};

use crate::mmio::Mmio;
use crate::pci::{PciAddress, SysfsPciDevice};
use crate::{Error, Result};

/// PCI command register offset and bits.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// A PCI function bound to vfio-pci and opened by this process.
pub struct VfioPci {
    address: PciAddress,
    iommu_group: u32,
    // Field order matters: BAR0 is unmapped before the device fd closes, and the device
    // (which releases its group from the container on drop) before the container.
    bar0: Mmio,
    device: VfioDevice,
    container: Arc<VfioContainer>,
}

impl VfioPci {
    /// Opens the function at `address`: container, group (type1 IOMMU), device; enables memory
    /// space and bus mastering; maps BAR0 (at least `bar0_min` bytes must be mappable).
    pub fn open(address: PciAddress, bar0_min: usize) -> Result<Self> {
        let dev = address.to_string();
        let sysfs = SysfsPciDevice::new(address)?;
        let iommu_group = sysfs.iommu_group()?;
        if sysfs.driver().as_deref() != Some("vfio-pci") {
            return Err(Error::Device {
                device: dev,
                what: format!(
                    "bound to {}, not vfio-pci (run `vfblk-nvme bind-vfio {address}`)",
                    sysfs.driver().as_deref().unwrap_or("no driver")
                ),
            });
        }
        let vfio = |what: &str| {
            let (device, what) = (dev.clone(), what.to_string());
            move |source: vfio_ioctls::VfioError| Error::Vfio {
                device,
                what,
                source,
            }
        };
        // A process that was just killed may still hold the group while the kernel tears it
        // down (EBUSY): a restarted driver waits for that, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (container, device) = loop {
            let container =
                Arc::new(VfioContainer::new(None).map_err(vfio("opening the container"))?);
            match VfioDevice::new(&sysfs.path(), container.clone() as Arc<dyn VfioOps>, false) {
                Ok(device) => break (container, device),
                Err(vfio_ioctls::VfioError::OpenGroup(ref e, _))
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(vfio(&format!("opening group {iommu_group} and the device"))(e))
                }
            }
        };

        let bar0 = map_bar0(&device, &dev, bar0_min)?;
        let pci = Self {
            address,
            iommu_group,
            bar0,
            device,
            container,
        };
        pci.enable_bus_master()?;
        Ok(pci)
    }

    fn enable_bus_master(&self) -> Result<()> {
        let command = self.config_read16(PCI_COMMAND);
        let wanted = command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        self.config_write16(PCI_COMMAND, wanted);
        // vfio-ioctls only logs failed config writes: read back what we wrote.
        let now = self.config_read16(PCI_COMMAND);
        if now & wanted != wanted {
            return Err(Error::Device {
                device: self.address.to_string(),
                what: format!("PCI command register reads {now:#06x} after writing {wanted:#06x}"),
            });
        }
        Ok(())
    }

    /// Reads a 16-bit config space register.
    pub fn config_read16(&self, offset: u64) -> u16 {
        let mut buf = [0u8; 2];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut buf, offset);
        u16::from_le_bytes(buf)
    }

    /// Writes a 16-bit config space register.
    pub fn config_write16(&self, offset: u64, value: u16) {
        self.device
            .region_write(VFIO_PCI_CONFIG_REGION_INDEX, &value.to_le_bytes(), offset);
    }

    /// The PCI address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// The IOMMU group.
    pub fn iommu_group(&self) -> u32 {
        self.iommu_group
    }

    /// The mapped BAR0.
    pub fn bar0(&self) -> &Mmio {
        &self.bar0
    }

    /// The container, for DMA mappings.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }
}

/// Maps BAR0, honouring a sparse-mmap capability (regions the kernel will not let us map,
/// such as an MSI-X table on older kernels): the mappable area at offset 0 must cover
/// `min_len` bytes, enough for the registers and the doorbells we use.
fn map_bar0(device: &VfioDevice, dev: &str, min_len: usize) -> Result<Mmio> {
    let index = VFIO_PCI_BAR0_REGION_INDEX;
    let flags = device.get_region_flags(index);
    let size = device.get_region_size(index);
    let offset = device.get_region_offset(index);
    if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return Err(Error::Device {
            device: dev.to_string(),
            what: format!("BAR0 ({size} bytes) cannot be mmapped (region flags {flags:#x})"),
        });
    }
    let mut len = size;
    for cap in device.get_region_caps(index) {
        if let VfioRegionInfoCap::SparseMmap(sparse) = cap {
            len = sparse
                .areas
                .iter()
                .find(|a| a.offset == 0)
                .map(|a| a.size)
                .unwrap_or(0);
        }
    }
    if (len as usize) < min_len {
        return Err(Error::Device {
            device: dev.to_string(),
            what: format!("only {len} bytes of BAR0 ({size}) are mappable, need {min_len}"),
        });
    }
    Mmio::map(device.as_raw_fd(), offset, len as usize).map_err(|e| Error::Io {
        what: format!("{dev}: mmap of BAR0 ({len} bytes at region offset {offset:#x})"),
        source: e,
    })
}
