//! PCI devices in sysfs: addresses, identity, IOMMU group, and driver binding.

use std::fmt;
use std::fs;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A PCI address `dddd:bb:dd.f`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI segment (domain).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device (0..32).
    pub device: u8,
    /// Function (0..8).
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddress {
    type Err = Error;

    /// Parses `dddd:bb:dd.f` or `bb:dd.f` (domain 0).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::BadArgument(format!("{s:?} is not a PCI address (dddd:bb:dd.f)"));
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, v] => (*d, *b, *v),
            [b, v] => ("0", *b, *v),
            _ => return Err(bad()),
        };
        let addr = PciAddress {
            domain: u16::from_str_radix(domain, 16).map_err(|_| bad())?,
            bus: u8::from_str_radix(bus, 16).map_err(|_| bad())?,
            device: u8::from_str_radix(device, 16).map_err(|_| bad())?,
            function: u8::from_str_radix(function, 16).map_err(|_| bad())?,
        };
        if addr.device >= 32 || addr.function >= 8 {
            return Err(bad());
        }
        Ok(addr)
    }
}

/// PCI class code of an NVM Express controller (mass storage, NVM, NVMe); the low byte is the
/// programming interface.
pub const CLASS_NVME: u32 = 0x010802;

/// A PCI device as sysfs shows it.
#[derive(Debug, Clone)]
pub struct SysfsPciDevice {
    address: PciAddress,
}

impl SysfsPciDevice {
    /// The device at `address`; fails if sysfs does not have it.
    pub fn new(address: PciAddress) -> Result<Self> {
        let dev = Self { address };
        if !dev.path().exists() {
            return Err(Error::Device {
                device: address.to_string(),
                what: "no such PCI device in /sys/bus/pci/devices".into(),
            });
        }
        Ok(dev)
    }

    /// Every PCI device whose class (with programming interface) is `class`.
    pub fn find_by_class(class: u32) -> Result<Vec<Self>> {
        let mut found = Vec::new();
        let entries = fs::read_dir("/sys/bus/pci/devices").map_err(|e| Error::Io {
            what: "listing /sys/bus/pci/devices".into(),
            source: e,
        })?;
        for entry in entries.flatten() {
            let Ok(address) = entry.file_name().to_string_lossy().parse::<PciAddress>() else {
                continue;
            };
            let dev = Self { address };
            if dev.class().ok() == Some(class) {
                found.push(dev);
            }
        }
        found.sort_by_key(|d| d.address);
        Ok(found)
    }

    /// The address.
    pub fn address(&self) -> PciAddress {
        self.address
    }

    /// `/sys/bus/pci/devices/<address>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/sys/bus/pci/devices/{}", self.address))
    }

    fn attr(&self, name: &str) -> Result<String> {
        let path = self.path().join(name);
        fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|e| Error::Io {
                what: format!("reading {}", path.display()),
                source: e,
            })
    }

    fn attr_hex(&self, name: &str) -> Result<u32> {
        let text = self.attr(name)?;
        u32::from_str_radix(text.trim_start_matches("0x"), 16).map_err(|_| Error::Device {
            device: self.address.to_string(),
            what: format!("sysfs {name} is {text:?}, not hex"),
        })
    }

    /// Class code with programming interface (e.g. 0x010802).
    pub fn class(&self) -> Result<u32> {
        self.attr_hex("class")
    }

    /// Vendor and device id.
    pub fn ids(&self) -> Result<(u16, u16)> {
        Ok((
            self.attr_hex("vendor")? as u16,
            self.attr_hex("device")? as u16,
        ))
    }

    /// The bound driver's name, if any.
    pub fn driver(&self) -> Option<String> {
        fs::read_link(self.path().join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Block devices the kernel's nvme driver made of this controller's namespaces
    /// (`nvme0n1`, ...); empty when another driver has it.
    pub fn block_devices(&self) -> Vec<String> {
        let mut found = Vec::new();
        let Ok(controllers) = fs::read_dir(self.path().join("nvme")) else {
            return found;
        };
        for ctrl in controllers.flatten() {
            let Ok(entries) = fs::read_dir(ctrl.path()) else {
                continue;
            };
            let prefix = ctrl.file_name().to_string_lossy().into_owned();
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && name[prefix.len()..].starts_with('n') {
                    found.push(name);
                }
            }
        }
        found.sort();
        found
    }

    /// Mounts and swap areas on this controller's block devices and their partitions, as
    /// (device, where): a device in use must not be taken from the kernel.
    pub fn in_use(&self) -> Vec<(String, String)> {
        let disks = self.block_devices();
        if disks.is_empty() {
            return Vec::new();
        }
        let ours = |dev: &str| {
            let name = dev.trim_start_matches("/dev/");
            disks.iter().any(|d| {
                name == d || (name.starts_with(d.as_str()) && name[d.len()..].starts_with('p'))
            })
        };
        let mut used = Vec::new();
        for line in fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
        {
            let mut f = line.split_whitespace();
            if let (Some(dev), Some(at)) = (f.next(), f.next()) {
                if ours(dev) {
                    used.push((dev.to_string(), at.to_string()));
                }
            }
        }
        for line in fs::read_to_string("/proc/swaps")
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            if let Some(dev) = line.split_whitespace().next() {
                if ours(dev) {
                    used.push((dev.to_string(), "swap".to_string()));
                }
            }
        }
        used
    }

    /// The IOMMU group number; a device without one cannot be used through VFIO (the
    /// platform has no IOMMU, or it is off: add `intel_iommu=on`).
    pub fn iommu_group(&self) -> Result<u32> {
        let link = fs::read_link(self.path().join("iommu_group")).map_err(|e| Error::Device {
            device: self.address.to_string(),
            what: format!("no IOMMU group ({e}); is the IOMMU enabled (intel_iommu=on)?"),
        })?;
        link.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::Device {
                device: self.address.to_string(),
                what: format!("unexpected iommu_group link {}", link.display()),
            })
    }

    fn write_sysfs(&self, path: PathBuf, value: &str) -> Result<()> {
        fs::write(&path, value).map_err(|e| Error::Io {
            what: format!("writing {value:?} to {}", path.display()),
            source: e,
        })
    }

    /// Binds the device to `driver` (e.g. `vfio-pci` or `nvme`): sets driver_override,
    /// unbinds the current driver, asks the kernel to probe, and waits (bounded) for the bind.
    /// Passing `None` clears the override and lets the kernel choose.
    pub fn bind(&self, driver: Option<&str>) -> Result<()> {
        let want = driver.unwrap_or("");
        if driver.is_some() && self.driver().as_deref() == driver {
            return Ok(());
        }
        self.write_sysfs(
            self.path().join("driver_override"),
            if want.is_empty() { "\n" } else { want },
        )?;
        if self.driver().is_some() {
            self.write_sysfs(self.path().join("driver/unbind"), &self.address.to_string())?;
        }
        // drivers_probe fails with an error when no driver takes the device; the wait below
        // reports that with the device's name.
        let _ = fs::write("/sys/bus/pci/drivers_probe", self.address.to_string());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.driver();
            let done = match driver {
                Some(d) => now.as_deref() == Some(d),
                None => now.is_some(),
            };
            if done {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Device {
                    device: self.address.to_string(),
                    what: format!(
                        "did not bind to {} within 5 s (driver now: {}); is the module loaded?",
                        driver.unwrap_or("a kernel driver"),
                        now.as_deref().unwrap_or("none")
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_addresses() {
        let a: PciAddress = "0000:00:03.0".parse().unwrap();
        assert_eq!(a.to_string(), "0000:00:03.0");
        let b: PciAddress = "3a:1f.7".parse().unwrap();
        assert_eq!(
            b,
            PciAddress {
                domain: 0,
                bus: 0x3a,
                device: 0x1f,
                function: 7
            }
        );
        for bad in [
            "",
            "00:03",
            "0000:00:20.0",
            "0000:00:03.8",
            "x:00:03.0",
            "0:0:0:0.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?} parsed");
        }
    }
}
