//! `vfblk-nvme`: find NVMe controllers, hand them to vfio-pci and back, probe them through VFIO.

use std::process::ExitCode;

use vfblk_nvme::pci::{PciAddress, SysfsPciDevice, CLASS_NVME};
use vfblk_nvme::{probe, Result};

const USAGE: &str = "usage: vfblk-nvme <command> [options]

commands:
  list                     NVMe controllers with their driver and IOMMU group
  bind-vfio PCI_ADDRESS    unbind from its driver and bind to vfio-pci (driver_override)
  bind-kernel PCI_ADDRESS  give the controller back to the kernel's nvme driver
  probe PCI_ADDRESS [--json]
                           open through VFIO, read CAP/VS/CSTS, map a hugepage DMA buffer
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let words: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    let result = match words.as_slice() {
        ["list"] => list(json),
        ["bind-vfio", addr] => bind(addr, Some("vfio-pci")),
        ["bind-kernel", addr] => bind(addr, Some("nvme")),
        ["probe", addr] => run_probe(addr, json),
        ["--help"] | ["-h"] => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfblk-nvme: {e}");
            ExitCode::FAILURE
        }
    }
}

fn list(json: bool) -> Result<()> {
    let devices = SysfsPciDevice::find_by_class(CLASS_NVME)?;
    let mut rows = Vec::new();
    for dev in &devices {
        let group = dev
            .iommu_group()
            .map(|g| g.to_string())
            .unwrap_or_else(|_| "none".into());
        let driver = dev.driver().unwrap_or_else(|| "none".into());
        rows.push((dev.address(), driver, group));
    }
    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|(a, d, g)| {
                format!("{{\"pci_address\":\"{a}\",\"driver\":\"{d}\",\"iommu_group\":\"{g}\"}}")
            })
            .collect();
        println!("[{}]", items.join(","));
    } else if rows.is_empty() {
        println!("no NVMe controllers (PCI class {CLASS_NVME:#08x})");
    } else {
        println!("{:<14} {:<10} iommu group", "address", "driver");
        for (a, d, g) in rows {
            println!("{a:<14} {d:<10} {g}");
        }
    }
    Ok(())
}

fn bind(addr: &str, driver: Option<&str>) -> Result<()> {
    let address: PciAddress = addr.parse()?;
    let dev = SysfsPciDevice::new(address)?;
    let before = dev.driver().unwrap_or_else(|| "none".into());
    dev.bind(driver)?;
    eprintln!(
        "{address}: {before} -> {}",
        dev.driver().unwrap_or_else(|| "none".into())
    );
    Ok(())
}

fn run_probe(addr: &str, json: bool) -> Result<()> {
    let address: PciAddress = addr.parse()?;
    let report = probe::probe(address)?;
    if json {
        println!("{}", report.to_json());
        return Ok(());
    }
    let cap = report.cap;
    println!(
        "{address}: NVMe {} through VFIO (IOMMU group {})",
        report.version, report.iommu_group
    );
    println!(
        "  vendor:device  {:04x}:{:04x}, class {:#08x}, driver {}",
        report.ids.0, report.ids.1, report.class, report.driver
    );
    println!("  BAR0           {} bytes mapped", report.bar0_size);
    println!(
        "  CAP            {:#018x}: MQES {}, CQR {}, DSTRD {} B, TO {} ms, MPS {}..{}",
        cap.0,
        cap.max_queue_entries(),
        cap.contiguous_queues_required(),
        cap.doorbell_stride(),
        cap.timeout_ms(),
        cap.page_size_min(),
        cap.page_size_max()
    );
    println!("  CC / CSTS      {:#x} / {}", report.cc, report.csts);
    println!(
        "  DMA            {} bytes ({}) mapped at IOVA {:#x} and unmapped",
        report.dma_size, report.dma_page_kind, report.dma_iova
    );
    Ok(())
}
