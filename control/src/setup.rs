//! Host preparation before the target starts, what SPDK's `scripts/setup.sh` does for its
//! users: reserve 2 MiB hugepages, hand NVMe controllers to vfio-pci (and back to the
//! kernel's nvme driver), and show the state. Every step is idempotent, and a controller the
//! host is using (a mounted filesystem, swap) is never taken.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use vfblk_hugepages::reserve;
use vfblk_nvme::pci::{PciAddress, SysfsPciDevice, CLASS_NVME};

use crate::{Error, Result};

/// The driver that gives userspace a device.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// What happened to one controller.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceAction {
    /// Its address.
    pub address: String,
    /// Driver before.
    pub before: Option<String>,
    /// Driver after.
    pub after: Option<String>,
    /// `bound`, `already`, `skipped: ...` or `failed: ...`.
    pub outcome: String,
}

impl DeviceAction {
    /// The step failed for this controller.
    pub fn failed(&self) -> bool {
        self.outcome.starts_with("failed")
    }
}

/// The 2 MiB pool before and after.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Reserved2m {
    /// Pages before.
    pub before: u64,
    /// Pages after.
    pub after: u64,
}

/// What a `config` or `reset` did.
#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    /// 2 MiB hugepages before and after, when asked to reserve.
    pub hugepages_2m: Option<Reserved2m>,
    /// Per controller.
    pub devices: Vec<DeviceAction>,
}

/// One controller as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    /// Its address.
    pub address: String,
    /// PCI vendor:device.
    pub ids: String,
    /// The bound driver.
    pub driver: Option<String>,
    /// IOMMU group (None: no IOMMU).
    pub iommu_group: Option<u32>,
    /// The kernel's block devices of it.
    pub block_devices: Vec<String>,
    /// Where it is in use by the host.
    pub in_use: Vec<String>,
}

/// One hugepage pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// Page size in KiB.
    pub page_kb: u64,
    /// Pages reserved.
    pub total: u64,
    /// Of which free.
    pub free: u64,
}

/// The host's state.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Hugepage pools.
    pub hugepages: Vec<PoolStatus>,
    /// The vfio-pci driver is loaded.
    pub vfio_loaded: bool,
    /// NVMe controllers.
    pub devices: Vec<DeviceStatus>,
}

fn controllers(only: &[PciAddress]) -> Result<Vec<SysfsPciDevice>> {
    let nvme = |what: &'static str| {
        move |source| Error::Nvme {
            what: what.to_string(),
            source,
        }
    };
    if only.is_empty() {
        return SysfsPciDevice::find_by_class(CLASS_NVME).map_err(nvme("listing NVMe controllers"));
    }
    only.iter()
        .map(|&a| SysfsPciDevice::new(a).map_err(nvme("finding the controller")))
        .collect()
}

fn vfio_loaded() -> bool {
    Path::new("/sys/bus/pci/drivers").join(VFIO_DRIVER).exists()
}

/// Loads vfio-pci and the type-1 IOMMU backend if vfio-pci is not there (bounded: modprobe
/// gets 20 s).
fn load_vfio() -> Result<()> {
    if vfio_loaded() {
        return Ok(());
    }
    let mut child = Command::new("modprobe")
        .args(["-a", "vfio_iommu_type1", VFIO_DRIVER])
        .spawn()
        .map_err(|source| Error::Io {
            what: "running modprobe vfio-pci".into(),
            source,
        })?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() && vfio_loaded() => return Ok(()),
            Ok(Some(status)) => {
                return Err(Error::BadArgument(format!(
                    "modprobe vfio-pci: {status}; is the module available?"
                )))
            }
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::BadArgument("modprobe vfio-pci hung for 20 s".into()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(source) => {
                return Err(Error::Io {
                    what: "waiting for modprobe".into(),
                    source,
                })
            }
        }
    }
}

/// Reserves `hugemem_mib` MiB of 2 MiB hugepages (when given) and binds the NVMe controllers
/// (`only`, or every one) to vfio-pci, skipping those the host uses.
pub fn config(hugemem_mib: Option<u64>, only: &[PciAddress]) -> Result<SetupReport> {
    let hugepages_2m = match hugemem_mib {
        Some(mib) => {
            let r = reserve::reserve_2m(mib.div_ceil(2))
                .map_err(|e| Error::BadArgument(vfblk_vhost::error_chain(&e).to_string()))?;
            Some(Reserved2m {
                before: r.before,
                after: r.after,
            })
        }
        None => None,
    };
    let devices = controllers(only)?;
    if !devices.is_empty() {
        load_vfio()?;
    }
    let devices = devices
        .iter()
        .map(|dev| {
            let before = dev.driver();
            let address = dev.address().to_string();
            let outcome = if before.as_deref() == Some(VFIO_DRIVER) {
                "already".to_string()
            } else if let Err(e) = dev.iommu_group() {
                format!("failed: {e}")
            } else {
                let used = dev.in_use();
                if !used.is_empty() {
                    let list: Vec<String> =
                        used.iter().map(|(d, at)| format!("{d} on {at}")).collect();
                    format!("skipped: in use: {}", list.join(", "))
                } else {
                    match dev.bind(Some(VFIO_DRIVER)) {
                        Ok(()) => "bound".to_string(),
                        Err(e) => format!("failed: {e}"),
                    }
                }
            };
            DeviceAction {
                address,
                before,
                after: dev.driver(),
                outcome,
            }
        })
        .collect();
    Ok(SetupReport {
        hugepages_2m,
        devices,
    })
}

/// Gives the NVMe controllers bound to vfio-pci (`only`, or every one) back to the kernel.
pub fn reset(only: &[PciAddress]) -> Result<SetupReport> {
    let devices = controllers(only)?
        .iter()
        .map(|dev| {
            let before = dev.driver();
            let outcome = if before.as_deref() != Some(VFIO_DRIVER) {
                "already".to_string()
            } else {
                match dev.bind(None) {
                    Ok(()) => "bound".to_string(),
                    Err(e) => format!("failed: {e}"),
                }
            };
            DeviceAction {
                address: dev.address().to_string(),
                before,
                after: dev.driver(),
                outcome,
            }
        })
        .collect();
    Ok(SetupReport {
        hugepages_2m: None,
        devices,
    })
}

/// The hugepage pools and every NVMe controller.
pub fn status() -> Result<Status> {
    let hugepages = reserve::pools()
        .map(|pools| {
            pools
                .into_iter()
                .map(|p| PoolStatus {
                    page_kb: p.page_kb,
                    total: p.total,
                    free: p.free,
                })
                .collect()
        })
        .unwrap_or_default();
    let devices = controllers(&[])?
        .iter()
        .map(|dev| DeviceStatus {
            address: dev.address().to_string(),
            ids: dev
                .ids()
                .map(|(v, d)| format!("{v:04x}:{d:04x}"))
                .unwrap_or_else(|_| "?".into()),
            driver: dev.driver(),
            iommu_group: dev.iommu_group().ok(),
            block_devices: dev.block_devices(),
            in_use: dev
                .in_use()
                .into_iter()
                .map(|(d, at)| format!("{d} on {at}"))
                .collect(),
        })
        .collect();
    Ok(Status {
        hugepages,
        vfio_loaded: vfio_loaded(),
        devices,
    })
}
