//! A PCI function owned through VFIO: container, group, device fd, config space and BAR0.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
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

/// A PCI function bound to vfio-pci, opened by this process or handed over by the process
/// it replaces.
pub struct VfioPci {
    address: PciAddress,
    iommu_group: u32,
    layout: RegionLayout,
    // Field order matters: BAR0 is unmapped before the device fd closes, and the device
    // (which releases its group from the container on drop) before the container.
    bar0: Mmio,
    handle: Handle,
}

/// Where the regions we use sit in the device fd, as VFIO reported them to the process that
/// opened the device (a process it is handed to maps the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionLayout {
    /// Offset of the config space region.
    pub config_offset: u64,
    /// Offset of BAR0.
    pub bar0_offset: u64,
    /// Bytes of BAR0 mapped (from offset 0 of the BAR).
    pub bar0_len: usize,
}

enum Handle {
    Opened {
        device: VfioDevice,
        container: Arc<VfioContainer>,
    },
    /// Duplicates of another process's fds. The device fd keeps the group (and through it
    /// the container's IOMMU domain) attached; the container fd is for DMA mappings.
    Adopted { device: OwnedFd, container: OwnedFd },
}

/// A device's fds and layout, duplicated for another process (see [`VfioPci::adopt`]).
pub struct SharedVfio {
    /// The VFIO container.
    pub container: OwnedFd,
    /// The device.
    pub device: OwnedFd,
    /// Its regions.
    pub layout: RegionLayout,
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
        // down (EBUSY), and an fd store told to drop a dead process's container and device
        // fds may not have yet (the group then cannot join a new container, nor the device
        // open): a restarted driver waits for that, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut waited = false;
        let (container, device) = loop {
            let container =
                Arc::new(VfioContainer::new(None).map_err(vfio("opening the container"))?);
            match VfioDevice::new(&sysfs.path(), container.clone() as Arc<dyn VfioOps>, false) {
                Ok(device) => break (container, device),
                Err(
                    ref e @ (vfio_ioctls::VfioError::OpenGroup(..)
                    | vfio_ioctls::VfioError::GroupSetContainer
                    | vfio_ioctls::VfioError::GroupViable
                    | vfio_ioctls::VfioError::GroupGetDeviceFD(..)),
                ) if still_held(e) && std::time::Instant::now() < deadline => {
                    if !waited {
                        tracing::info!(
                            "{dev}: still held by another process ({e}); waiting up to 10 s"
                        );
                        waited = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(vfio(&format!("opening group {iommu_group} and the device"))(e))
                }
            }
        };

        let layout = bar0_layout(&device, &dev, bar0_min)?;
        let bar0 = map_bar0(device.as_raw_fd(), &dev, &layout)?;
        let pci = Self {
            address,
            iommu_group,
            layout,
            bar0,
            handle: Handle::Opened { device, container },
        };
        pci.enable_bus_master()?;
        Ok(pci)
    }

    /// Takes the device over from the process that opened it (or adopted it before), by
    /// duplicates of its fds: nothing is reset or re-attached, the IOMMU domain and every
    /// mapping in it stay as they are.
    pub fn adopt(address: PciAddress, shared: SharedVfio) -> Result<Self> {
        let dev = address.to_string();
        let iommu_group = SysfsPciDevice::new(address)?.iommu_group()?;
        let bar0 = map_bar0(shared.device.as_raw_fd(), &dev, &shared.layout)?;
        let pci = Self {
            address,
            iommu_group,
            layout: shared.layout,
            bar0,
            handle: Handle::Adopted {
                device: shared.device,
                container: shared.container,
            },
        };
        pci.enable_bus_master()?;
        Ok(pci)
    }

    /// Duplicates of the fds another process needs to adopt the device.
    pub fn share(&self) -> Result<SharedVfio> {
        let dup = |fd: BorrowedFd<'_>, what: &str| {
            fd.try_clone_to_owned().map_err(|source| Error::Io {
                what: format!("{}: duplicating the VFIO {what} fd", self.address),
                source,
            })
        };
        Ok(SharedVfio {
            container: dup(self.container_fd(), "container")?,
            device: dup(self.device_fd(), "device")?,
            layout: self.layout,
        })
    }

    fn device_fd(&self) -> BorrowedFd<'_> {
        let raw = match &self.handle {
            Handle::Opened { device, .. } => device.as_raw_fd(),
            Handle::Adopted { device, .. } => return device.as_fd(),
        };
        // SAFETY: the VfioDevice owns the fd and outlives the borrow (it lives in self).
        unsafe { BorrowedFd::borrow_raw(raw) }
    }

    /// The container's fd, for DMA mappings (valid as long as this lives).
    pub fn container_fd(&self) -> BorrowedFd<'_> {
        let raw = match &self.handle {
            Handle::Opened { container, .. } => container.as_raw_fd(),
            Handle::Adopted { container, .. } => return container.as_fd(),
        };
        // SAFETY: the VfioContainer owns the fd and outlives the borrow (it lives in self).
        unsafe { BorrowedFd::borrow_raw(raw) }
    }

    fn enable_bus_master(&self) -> Result<()> {
        let command = self.config_read16(PCI_COMMAND);
        let wanted = command | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        self.config_write16(PCI_COMMAND, wanted);
        // A failed config write is only seen by reading back what we wrote.
        let now = self.config_read16(PCI_COMMAND);
        if now & wanted != wanted {
            return Err(Error::Device {
                device: self.address.to_string(),
                what: format!("PCI command register reads {now:#06x} after writing {wanted:#06x}"),
            });
        }
        Ok(())
    }

    /// Reads a 16-bit config space register (all ones if the read fails, as a missing
    /// device reads).
    pub fn config_read16(&self, offset: u64) -> u16 {
        let mut buf = [0xffu8; 2];
        // SAFETY: pread into a 2-byte buffer we own from the device fd we hold.
        let n = unsafe {
            libc::pread(
                self.device_fd().as_raw_fd(),
                buf.as_mut_ptr().cast(),
                2,
                (self.layout.config_offset + offset) as libc::off_t,
            )
        };
        if n != 2 {
            tracing::warn!(
                "{}: config space read at {offset:#x} failed: {}",
                self.address,
                std::io::Error::last_os_error()
            );
            return u16::MAX;
        }
        u16::from_le_bytes(buf)
    }

    /// Writes a 16-bit config space register (a failure is logged; read back to check).
    pub fn config_write16(&self, offset: u64, value: u16) {
        let buf = value.to_le_bytes();
        // SAFETY: pwrite of a 2-byte buffer we own to the device fd we hold.
        let n = unsafe {
            libc::pwrite(
                self.device_fd().as_raw_fd(),
                buf.as_ptr().cast(),
                2,
                (self.layout.config_offset + offset) as libc::off_t,
            )
        };
        if n != 2 {
            tracing::warn!(
                "{}: config space write at {offset:#x} failed: {}",
                self.address,
                std::io::Error::last_os_error()
            );
        }
    }

    /// The PCI address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// Where the regions sit in the device fd.
    pub fn layout(&self) -> RegionLayout {
        self.layout
    }

    /// The IOMMU group.
    pub fn iommu_group(&self) -> u32 {
        self.iommu_group
    }

    /// The mapped BAR0.
    pub fn bar0(&self) -> &Mmio {
        &self.bar0
    }
}

/// Where BAR0 and the config space are, honouring a sparse-mmap capability on BAR0 (regions
/// the kernel will not let us map, such as an MSI-X table on older kernels): the mappable
/// area at offset 0 must cover `min_len` bytes, enough for the registers and the doorbells
/// we use.
fn bar0_layout(device: &VfioDevice, dev: &str, min_len: usize) -> Result<RegionLayout> {
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
    Ok(RegionLayout {
        config_offset: device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX),
        bar0_offset: offset,
        bar0_len: len as usize,
    })
}

fn map_bar0(device: RawFd, dev: &str, layout: &RegionLayout) -> Result<Mmio> {
    let (offset, len) = (layout.bar0_offset, layout.bar0_len);
    Mmio::map(device, offset, len).map_err(|e| Error::Io {
        what: format!("{dev}: mmap of BAR0 ({len} bytes at region offset {offset:#x})"),
        source: e,
    })
}

/// Whether opening a device failed because another process (or an fd store) still holds
/// its group or the device: a wait helps.
fn still_held(e: &vfio_ioctls::VfioError) -> bool {
    match e {
        vfio_ioctls::VfioError::OpenGroup(io, _) => io.raw_os_error() == Some(libc::EBUSY),
        vfio_ioctls::VfioError::GroupGetDeviceFD(sys) => sys.errno() == libc::EBUSY,
        // Joining a container fails while the group is still in the old one.
        vfio_ioctls::VfioError::GroupSetContainer | vfio_ioctls::VfioError::GroupViable => true,
        _ => false,
    }
}
