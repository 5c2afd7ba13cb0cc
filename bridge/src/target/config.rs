//! The target's configuration: named backends and the vhost-user-blk controllers that use
//! them, as one JSON document. The same shapes are the RPC methods' parameters, and the file
//! is rewritten atomically after every change so that a restarted process comes back with
//! everything it served.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::RateLimits;
use crate::spec::BackendSpec;
use crate::{Error, Result};

/// Everything the target serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// NVMe controllers attached by name: each namespace becomes a backend `<name>n<nsid>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvme: Vec<NvmeAttachConfig>,
    /// Backends, by name.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    /// Controllers, by name; each uses one backend.
    #[serde(default)]
    pub controllers: Vec<ControllerConfig>,
}

/// An NVMe controller attached under a name: `{"name": "nvme0", "address": "0000:5e:00.0"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmeAttachConfig {
    /// Its name; its namespaces' backends are `<name>n<nsid>`.
    pub name: String,
    /// Its PCI address (bound to vfio-pci).
    #[serde(with = "crate::spec::pci_string")]
    pub address: vfblk_nvme::pci::PciAddress,
}

/// A named backend: `{"name": "d0", "kind": "file", "path": "/var/lib/d0.img"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    /// Its name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// What it is.
    #[serde(flatten)]
    pub spec: BackendSpec,
}

/// A vhost-user-blk controller: one socket, one frontend at a time, one backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// Its name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The vhost-user socket it listens on.
    pub socket: PathBuf,
    /// The backend it serves.
    pub backend: String,
    /// Virtqueues offered.
    #[serde(default = "one_queue")]
    pub queues: u16,
    /// Run its queues only on the pollers pinned to these CPUs (empty: any poller; each
    /// queue goes to the least loaded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<usize>,
    /// Offer the disk read-only.
    #[serde(default, skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// GET_ID answer (at most 20 bytes; default: the controller's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// IOPS and bandwidth limits (default: none).
    #[serde(default, skip_serializing_if = "RateLimits::is_unlimited")]
    pub limits: RateLimits,
}

fn one_queue() -> u16 {
    1
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Refuses names that would not read well in logs, metrics labels and file names.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::BadArgument(format!(
            "{what} name {name:?}: 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

impl TargetConfig {
    /// Reads a config file; a missing file is an empty configuration.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(Error::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })
            }
        };
        serde_json::from_str(&text).map_err(|e| {
            Error::BadArgument(format!(
                "{}: not a target configuration: {e}",
                path.display()
            ))
        })
    }

    /// Writes the file so that a crash at any moment leaves either the old or the new
    /// content: a temporary file beside it, fsync, rename over, fsync of the directory.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |what: String| move |source| Error::Io { what, source };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .ok_or_else(|| Error::BadArgument(format!("{}: not a file name", path.display())))?;
        let temp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
        let mut text = serde_json::to_string_pretty(self).expect("a config always serializes");
        text.push('\n');
        let mut file =
            std::fs::File::create(&temp).map_err(io(format!("creating {}", temp.display())))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(format!("writing {}", temp.display())))?;
        drop(file);
        std::fs::rename(&temp, path).map_err(io(format!(
            "renaming {} to {}",
            temp.display(),
            path.display()
        )))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(format!("syncing directory {}", dir.display())))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_reads_back_what_was_saved_and_refuses_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("vfblk-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("target.json");
        let _ = std::fs::remove_file(&path);
        assert_eq!(TargetConfig::load(&path).unwrap(), TargetConfig::default());
        let config: TargetConfig = serde_json::from_str(
            r#"{"backends": [{"name": "d0", "kind": "mem", "path": "/dev/shm/d0", "size": 1048576}],
                "controllers": [{"name": "vm1", "socket": "/run/vm1.sock", "backend": "d0"}]}"#,
        )
        .unwrap();
        assert_eq!(config.controllers[0].queues, 1);
        assert!(!config.controllers[0].readonly);
        config.save(&path).unwrap();
        assert_eq!(TargetConfig::load(&path).unwrap(), config);
        assert!(!dir.join(".target.json.tmp").exists());
        for bad in [
            r#"{"controllers": [{"name": "a", "socket": "/s", "backend": "b", "colour": 1}]}"#,
            r#"{"backends": [{"name": "d0", "kind": "tape"}]}"#,
            r#"{"backends": [{"name": "d0", "kind": "file", "path": "/x", "colour": 1}]}"#,
            r#"{"pollers": 3}"#,
            r#"{"controllers": [{"name": "a", "socket": "/s", "backend": "b", "queues": "two"}]}"#,
        ] {
            assert!(serde_json::from_str::<TargetConfig>(bad).is_err(), "{bad}");
        }
        std::fs::write(&path, "{not json").unwrap();
        assert!(TargetConfig::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_are_checked() {
        for good in ["vm1", "disk-0", "a.b_c"] {
            check_name("backend", good).unwrap();
        }
        for bad in ["", "a b", "../x", "x/y", "é", &"n".repeat(65)] {
            assert!(check_name("backend", bad).is_err(), "{bad:?}");
        }
    }
}
