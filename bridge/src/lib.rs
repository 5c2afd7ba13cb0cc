//! The host binary's wiring: an NVMe controller bound to a PCI address (`vfblk-nvme`),
//! served to VMs as vhost-user-blk (`vfblk-vhost`).
//!
//! Not built yet: the binary arrives with the vhost-user device (issue 4) and its NVMe
//! backend. It is a workspace member now so the layout is fixed from the start.

#![deny(missing_docs)]
