//! `vfblk-setup`: prepare the host for the target (hugepages, NVMe controllers to vfio-pci)
//! and undo it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vfblk_control::setup::{self, SetupReport};
use vfblk_nvme::pci::PciAddress;

/// Prepare the host for vfblk-bridge: hugepages and NVMe controllers on vfio-pci.
#[derive(Parser, Debug)]
#[command(name = "vfblk-setup", version)]
struct Args {
    /// Print JSON instead of text (before or after the subcommand).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Reserve hugepages and bind NVMe controllers to vfio-pci (the default command).
    Config {
        /// MiB of 2 MiB hugepages to have reserved (never shrinks the pool).
        #[arg(long, value_name = "MIB", default_value_t = 2048)]
        hugemem: u64,
        /// Leave the hugepage pool alone.
        #[arg(long, conflicts_with = "hugemem")]
        no_hugepages: bool,
        /// Only these controllers (default: every NVMe controller not in use by the host).
        #[arg(long, value_delimiter = ',')]
        pci: Vec<PciAddress>,
    },
    /// Give controllers on vfio-pci back to the kernel's nvme driver.
    Reset {
        /// Only these controllers (default: every NVMe controller on vfio-pci).
        #[arg(long, value_delimiter = ',')]
        pci: Vec<PciAddress>,
    },
    /// Show hugepages and NVMe controllers with their drivers and IOMMU groups.
    Status,
}

fn print_report(r: &SetupReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("serializes"));
        return;
    }
    if let Some(setup::Reserved2m { before, after }) = r.hugepages_2m {
        if before == after {
            println!("hugepages: {after} x 2 MiB reserved already");
        } else {
            println!("hugepages: {before} -> {after} x 2 MiB");
        }
    }
    if r.devices.is_empty() {
        println!("no NVMe controllers");
    }
    for d in &r.devices {
        let driver = |d: &Option<String>| d.clone().unwrap_or_else(|| "none".into());
        println!(
            "{}: {} -> {} ({})",
            d.address,
            driver(&d.before),
            driver(&d.after),
            d.outcome
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let command = args.command.unwrap_or(Cmd::Config {
        hugemem: 2048,
        no_hugepages: false,
        pci: Vec::new(),
    });
    let result = match command {
        Cmd::Config {
            hugemem,
            no_hugepages,
            pci,
        } => setup::config((!no_hugepages).then_some(hugemem), &pci),
        Cmd::Reset { pci } => setup::reset(&pci),
        Cmd::Status => match setup::status() {
            Ok(s) if args.json => {
                println!("{}", serde_json::to_string_pretty(&s).expect("serializes"));
                return ExitCode::SUCCESS;
            }
            Ok(s) => {
                for p in &s.hugepages {
                    println!(
                        "hugepages {} kB: {} reserved, {} free",
                        p.page_kb, p.total, p.free
                    );
                }
                println!(
                    "vfio-pci: {}",
                    if s.vfio_loaded {
                        "loaded"
                    } else {
                        "not loaded"
                    }
                );
                println!(
                    "{:<14} {:<10} {:<10} {:<6} BLOCK DEVICES / IN USE",
                    "ADDRESS", "IDS", "DRIVER", "GROUP"
                );
                for d in &s.devices {
                    let mut tail = d.block_devices.join(",");
                    if !d.in_use.is_empty() {
                        tail.push_str(&format!(" (in use: {})", d.in_use.join(", ")));
                    }
                    println!(
                        "{:<14} {:<10} {:<10} {:<6} {}",
                        d.address,
                        d.ids,
                        d.driver.as_deref().unwrap_or("none"),
                        d.iommu_group
                            .map(|g| g.to_string())
                            .unwrap_or_else(|| "-".into()),
                        if tail.is_empty() { "-" } else { &tail }
                    );
                }
                return ExitCode::SUCCESS;
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(report) => {
            print_report(&report, args.json);
            if report.devices.iter().any(|d| d.failed()) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("vfblk-setup: {}", vfblk_vhost::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
