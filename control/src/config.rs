//! The target's configuration: named backends and the vhost-user-blk controllers that use
//! them, as one JSON document. The same shapes are the RPC methods' parameters, and the file
//! is rewritten atomically after every change so that a restarted process comes back with
//! everything it served.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};
use vfblk_bridge::limits::RateLimits;
use vfblk_bridge::spec::BackendSpec;

/// Everything the target serves.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// NVMe controllers attached by name: each namespace becomes a backend `<name>n<nsid>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nvme: Vec<NvmeAttachConfig>,
    /// Ceph clusters registered by name: RBD backends name one (`cluster`) to share its
    /// client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rbd_clusters: Vec<RbdClusterConfig>,
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
    #[serde(with = "vfblk_bridge::spec::pci_string")]
    pub address: vfblk_nvme::pci::PciAddress,
}

/// A Ceph cluster registered under a name (`rbd_cluster_register`): one librados client,
/// shared by the RBD backends that name it, with its threads bounded and optionally pinned:
/// `{"name": "ceph1", "conf": "/etc/ceph/ceph.conf", "id": "vfblk",
/// "ms_async_op_threads": 1, "librados_thread_count": 1, "cpus": [3]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdClusterConfig {
    /// Its name (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// ceph.conf (default: librados's search: $CEPH_CONF, /etc/ceph/ceph.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// Client id without `client.` (default `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Keyring (default: the conf's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
    /// The messenger's worker threads (librados's `ms_async_op_threads`; default: the
    /// conf's, else Ceph's 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms_async_op_threads: Option<u32>,
    /// librados's completion and work threads (`librados_thread_count`, which librbd shares;
    /// default: the conf's, else Ceph's 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub librados_thread_count: Option<u32>,
    /// Pin every thread of the client to these CPUs (default: not pinned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpus: Vec<usize>,
}

impl RbdClusterConfig {
    /// What the bridge connects with.
    pub fn options(&self) -> vfblk_bridge::backend::ClusterOptions {
        vfblk_bridge::backend::ClusterOptions {
            settings: vfblk_bridge::backend::ClusterSettings {
                conf: self.conf.clone(),
                id: self.id.clone(),
                keyring: self.keyring.clone(),
            },
            ms_async_op_threads: self.ms_async_op_threads,
            librados_thread_count: self.librados_thread_count,
            cpus: self.cpus.clone(),
        }
    }
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
    /// The socket's owning user, a name or a uid (default: `--socket-owner`, else the
    /// target's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_owner: Option<String>,
    /// The socket's owning group, a name or a gid (default: `--socket-group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// The socket's permission bits in octal, "0660" (default: `--socket-mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<String>,
}

impl ControllerConfig {
    /// Who may connect to its socket, as configured for it.
    pub fn socket_access(&self) -> SocketAccess {
        SocketAccess {
            socket_owner: self.socket_owner.clone(),
            socket_group: self.socket_group.clone(),
            socket_mode: self.socket_mode.clone(),
        }
    }
}

/// The owner, group and mode of a controller's socket, so that a QEMU running as its own
/// user can connect: `{"socket_group": "kvm", "socket_mode": "0660"}` in a controller.
/// The same three are command-line options of `vfblk-bridge` (for every socket) and of
/// `vfblk-rpc vhost-blk-create` (for one).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct SocketAccess {
    /// Owner of the controller socket: a user name or uid.
    #[arg(long, value_name = "USER")]
    pub socket_owner: Option<String>,
    /// Group of the controller socket: a group name or gid (e.g. kvm, for a QEMU running as
    /// its own user in that group).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Mode of the controller socket in octal (e.g. 0660).
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<String>,
}

impl SocketAccess {
    /// `self`, with what it leaves out taken from `defaults`.
    pub fn or(&self, defaults: &SocketAccess) -> SocketAccess {
        SocketAccess {
            socket_owner: self.socket_owner.clone().or(defaults.socket_owner.clone()),
            socket_group: self.socket_group.clone().or(defaults.socket_group.clone()),
            socket_mode: self.socket_mode.clone().or(defaults.socket_mode.clone()),
        }
    }

    /// Checked and resolved: (uid, gid, mode), each None when not asked for.
    pub fn resolve(&self) -> Result<(Option<u32>, Option<u32>, Option<u32>)> {
        let bad = |why: String| Error::BadArgument(why);
        let uid = self
            .socket_owner
            .as_deref()
            .map(|u| {
                lookup_id(u, false).ok_or_else(|| bad(format!("socket_owner {u:?}: no such user")))
            })
            .transpose()?;
        let gid = self
            .socket_group
            .as_deref()
            .map(|g| {
                lookup_id(g, true).ok_or_else(|| bad(format!("socket_group {g:?}: no such group")))
            })
            .transpose()?;
        let mode = self
            .socket_mode
            .as_deref()
            .map(|m| {
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|&m| m <= 0o777)
                    .ok_or_else(|| {
                        bad(format!(
                            "socket_mode {m:?}: permission bits in octal, e.g. 0660"
                        ))
                    })
            })
            .transpose()?;
        Ok((uid, gid, mode))
    }

    /// Gives the socket at `path` its owner, group and mode.
    pub fn apply(&self, path: &Path) -> Result<()> {
        let (uid, gid, mode) = self.resolve()?;
        let io = |what: &str| {
            let what = format!("{what} of {}", path.display());
            move |source| Error::Io { what, source }
        };
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(path, uid, gid).map_err(io("changing the owner"))?;
        }
        if let Some(mode) = mode {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(io("changing the mode"))?;
        }
        Ok(())
    }
}

/// A user's uid or a group's gid, by name or number.
fn lookup_id(name: &str, group: bool) -> Option<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Some(id);
    }
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    if group {
        // SAFETY: a zeroed group is a valid out-parameter; the buffer is ours and its length
        // is given; the result points into them only.
        unsafe {
            let mut entry: libc::group = std::mem::zeroed();
            let mut found: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            );
            (rc == 0 && !found.is_null()).then_some(entry.gr_gid)
        }
    } else {
        // SAFETY: as above, for a passwd entry.
        unsafe {
            let mut entry: libc::passwd = std::mem::zeroed();
            let mut found: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            );
            (rc == 0 && !found.is_null()).then_some(entry.pw_uid)
        }
    }
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

    /// Writes this configuration into the file at `path`, changing only what differs from
    /// what the file says: the file is the operator's. Entries keep their place and, when
    /// unchanged, their fields as written; an entry whose name is in `removed` (deleted
    /// since the last save) leaves the file; entries the file has and this process never
    /// knew (added by hand since it loaded the file) stay; new entries go at the end of
    /// their section. A file that says the same already is not written at all. A file that
    /// is no longer a configuration (an edit in progress) is not overwritten: the error says
    /// so. Returns whether the file was written.
    pub fn save_into(&self, path: &Path, edits: &FileEdits) -> Result<bool> {
        let before = match std::fs::read_to_string(path) {
            Ok(text) => Some(serde_json::from_str::<Value>(&text).map_err(|e| {
                Error::BadArgument(format!(
                    "{}: not valid JSON ({e}); the file is left as it is",
                    path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(Error::Io {
                    what: format!("reading {}", path.display()),
                    source,
                })
            }
        };
        let mut document = match &before {
            Some(Value::Object(o)) => o.clone(),
            Some(_) => {
                return Err(Error::BadArgument(format!(
                    "{}: not a JSON object; the file is left as it is",
                    path.display()
                )))
            }
            None => Map::new(),
        };
        for section in Section::ALL {
            let entries = match section {
                Section::Nvme => merge(&document, section, &self.nvme, edits),
                Section::RbdClusters => merge(&document, section, &self.rbd_clusters, edits),
                Section::Backends => merge(&document, section, &self.backends, edits),
                Section::Controllers => merge(&document, section, &self.controllers, edits),
            }
            .map_err(|why| Error::BadArgument(format!("{}: {why}", path.display())))?;
            // A new file spells out its (empty) sections, as an example for the operator;
            // an existing one gets a section only when it has something to hold.
            if document.contains_key(section.key())
                || !entries.is_empty()
                || (before.is_none() && section.spelled_out())
            {
                document.insert(section.key().to_string(), Value::Array(entries));
            }
        }
        let document = Value::Object(document);
        if before.as_ref() == Some(&document) {
            return Ok(false);
        }
        let mut text = serde_json::to_string_pretty(&document).expect("JSON values print");
        text.push('\n');
        write_atomically(path, text.as_bytes())?;
        Ok(true)
    }
}

/// What a save must know beyond the configuration it writes.
#[derive(Debug, Clone, Default)]
pub struct FileEdits {
    /// Entries deleted since the last save: they leave the file.
    pub removed: BTreeSet<(Section, String)>,
    /// Entries the operator changed in the file that the running target did not take
    /// (applied at the next start): the file's version stays.
    pub file_wins: BTreeSet<(Section, String)>,
}

/// The lists of a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Section {
    /// `nvme`: NVMe attachments.
    Nvme,
    /// `rbd_clusters`: named Ceph clusters.
    RbdClusters,
    /// `backends`.
    Backends,
    /// `controllers`.
    Controllers,
}

impl Section {
    /// In the order the file lists them and the target creates them.
    pub const ALL: [Section; 4] = [
        Section::Nvme,
        Section::RbdClusters,
        Section::Backends,
        Section::Controllers,
    ];

    /// Whether a new file lists it even when empty, as an example for the operator.
    fn spelled_out(self) -> bool {
        matches!(self, Section::Backends | Section::Controllers)
    }

    /// What one of its entries is, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Section::Nvme => "NVMe controller",
            Section::RbdClusters => "RBD cluster",
            Section::Backends => "backend",
            Section::Controllers => "controller",
        }
    }

    /// Its key in the file.
    pub fn key(self) -> &'static str {
        match self {
            Section::Nvme => "nvme",
            Section::RbdClusters => "rbd_clusters",
            Section::Backends => "backends",
            Section::Controllers => "controllers",
        }
    }
}

/// A config entry: something named.
pub trait Entry: Serialize + DeserializeOwned + PartialEq {
    /// Its name, unique in its section.
    fn name(&self) -> &str;
}

impl Entry for NvmeAttachConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Entry for RbdClusterConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Entry for BackendConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

impl Entry for ControllerConfig {
    fn name(&self) -> &str {
        &self.name
    }
}

/// One section of the file with `wanted` written into it (see [`TargetConfig::save_into`]).
fn merge<T: Entry>(
    document: &Map<String, Value>,
    section: Section,
    wanted: &[T],
    edits: &FileEdits,
) -> std::result::Result<Vec<Value>, String> {
    let existing: &[Value] = match document.get(section.key()) {
        None => &[],
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(format!(
                "\"{}\" is not a list; the file is left as it is",
                section.key()
            ))
        }
    };
    let mut written = BTreeSet::new();
    let mut entries = Vec::with_capacity(existing.len() + wanted.len());
    for value in existing {
        let name = value.get("name").and_then(Value::as_str);
        let Some(name) = name.filter(|n| !written.contains(*n)) else {
            // Nameless, or a second entry of a name: the operator's to mend, kept as it is.
            entries.push(value.clone());
            continue;
        };
        let key = (section, name.to_string());
        match wanted.iter().find(|w| w.name() == name) {
            Some(_) if edits.file_wins.contains(&key) => {
                entries.push(value.clone());
                written.insert(name.to_string());
            }
            Some(w) => {
                let unchanged = serde_json::from_value::<T>(value.clone()).is_ok_and(|v| v == *w);
                entries.push(if unchanged {
                    value.clone()
                } else {
                    serde_json::to_value(w).expect("a config entry always serializes")
                });
                written.insert(name.to_string());
            }
            None if edits.removed.contains(&key) => {}
            None => entries.push(value.clone()),
        }
    }
    for w in wanted.iter().filter(|w| !written.contains(w.name())) {
        entries.push(serde_json::to_value(w).expect("a config entry always serializes"));
    }
    Ok(entries)
}

/// Writes `path` so that a crash at any moment leaves either the old or the new content: a
/// temporary file beside it (with the old file's permissions, else 0600: it names the
/// host's disks), fsync, rename over, fsync of the directory.
fn write_atomically(path: &Path, content: &[u8]) -> Result<()> {
    let io = |what: String| move |source| Error::Io { what, source };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::BadArgument(format!("{}: not a file name", path.display())))?;
    let temp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io(format!("creating {}", temp.display())))?;
    if let Ok(old) = std::fs::metadata(path) {
        file.set_permissions(old.permissions())
            .map_err(io(format!("setting the permissions of {}", temp.display())))?;
    }
    file.write_all(content)
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
        assert!(config.save_into(&path, &FileEdits::default()).unwrap());
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

    fn temp_file(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vfblk-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("target.json")
    }

    /// An operator's file: their order, their key order, their spelling of defaults, and
    /// their own layout.
    const OPERATORS_FILE: &str = r#"{ "controllers": [
  {"socket": "/run/z.sock", "name": "z", "backend": "dz", "queues": 1},
  {"socket": "/run/a.sock", "name": "a", "backend": "da"}
],
"backends": [
  {"name": "dz", "kind": "file", "path": "/srv/dz.img"},
  {"kind": "mem", "name": "da", "size": 1048576, "path": "/dev/shm/da"}
] }
"#;

    #[test]
    fn saving_what_the_file_says_leaves_it_untouched() {
        let path = temp_file("same");
        std::fs::write(&path, OPERATORS_FILE).unwrap();
        let config = TargetConfig::load(&path).unwrap();
        // The target lists entries in its own order; the file's order is what counts.
        let mut shuffled = config.clone();
        shuffled.controllers.reverse();
        shuffled.backends.reverse();
        assert!(!shuffled.save_into(&path, &FileEdits::default()).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), OPERATORS_FILE);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_change_touches_its_own_entry_and_nothing_else() {
        let path = temp_file("change");
        std::fs::write(&path, OPERATORS_FILE).unwrap();
        let mut config = TargetConfig::load(&path).unwrap();
        // One entry changed, one removed, one added.
        config.controllers.retain(|c| c.name != "a");
        config.backends[1].spec = BackendSpec::Mem {
            path: "/dev/shm/da".into(),
            size: Some(2 << 20),
            readonly: false,
        };
        config.backends.push(BackendConfig {
            name: "new".into(),
            spec: BackendSpec::Null { size: 1 << 20 },
        });
        let edits = FileEdits {
            removed: BTreeSet::from([(Section::Controllers, "a".to_string())]),
            ..FileEdits::default()
        };
        assert!(config.save_into(&path, &edits).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let value: Value = serde_json::from_str(&text).unwrap();
        // The operator's section order and an untouched entry's keys, in their order.
        let sections: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(sections, ["controllers", "backends"]);
        let z: Vec<&str> = value["controllers"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(z, ["socket", "name", "backend", "queues"], "{text}");
        assert_eq!(value["controllers"].as_array().unwrap().len(), 1, "{text}");
        let names: Vec<&str> = value["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["dz", "da", "new"], "{text}");
        assert_eq!(value["backends"][1]["size"], 2 << 20);
        assert_eq!(TargetConfig::load(&path).unwrap().backends.len(), 3);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn entries_added_by_hand_stay_and_a_broken_file_is_not_overwritten() {
        let path = temp_file("hand");
        std::fs::write(&path, OPERATORS_FILE).unwrap();
        let config = TargetConfig::load(&path).unwrap();
        // The operator adds a disk by hand while the target runs; the target, which never
        // loaded it, saves a change of its own.
        let mut edited: Value = serde_json::from_str(OPERATORS_FILE).unwrap();
        edited["backends"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "byhand", "kind": "null", "size": 4096}));
        std::fs::write(&path, edited.to_string()).unwrap();
        let mut changed = config.clone();
        changed.backends.push(BackendConfig {
            name: "rpc".into(),
            spec: BackendSpec::Null { size: 4096 },
        });
        assert!(changed.save_into(&path, &FileEdits::default()).unwrap());
        let names: Vec<String> = TargetConfig::load(&path)
            .unwrap()
            .backends
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert_eq!(names, ["dz", "da", "byhand", "rpc"]);
        // Half an edit on disk: nothing is written over it.
        std::fs::write(&path, "{\"backends\": [").unwrap();
        let e = changed.save_into(&path, &FileEdits::default()).unwrap_err();
        assert!(e.to_string().contains("left as it is"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"backends\": [");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_new_file_is_private_and_an_old_one_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let path = temp_file("mode");
        let config: TargetConfig = serde_json::from_str(OPERATORS_FILE).unwrap();
        assert!(config.save_into(&path, &FileEdits::default()).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut changed = config.clone();
        changed.controllers.pop();
        let edits = FileEdits {
            removed: BTreeSet::from([(Section::Controllers, "a".to_string())]),
            ..FileEdits::default()
        };
        assert!(changed.save_into(&path, &edits).unwrap());
        assert_eq!(mode(&path), 0o640);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn rbd_clusters_are_a_section_of_their_own() {
        let path = temp_file("rbd");
        // A file without clusters gets no (empty) section for them.
        let mut config: TargetConfig = serde_json::from_str(OPERATORS_FILE).unwrap();
        assert!(config.save_into(&path, &FileEdits::default()).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("rbd_clusters"), "{text}");
        let cluster: RbdClusterConfig = serde_json::from_str(
            r#"{"name": "ceph1", "conf": "/etc/ceph/ceph.conf", "id": "vfblk",
                "ms_async_op_threads": 1, "librados_thread_count": 2, "cpus": [1]}"#,
        )
        .unwrap();
        config.rbd_clusters.push(cluster.clone());
        config.backends.push(BackendConfig {
            name: "img".into(),
            spec: "rbd:vms/img,cluster=ceph1".parse().unwrap(),
        });
        assert!(config.save_into(&path, &FileEdits::default()).unwrap());
        let loaded = TargetConfig::load(&path).unwrap();
        assert_eq!(loaded, config);
        assert_eq!(loaded.rbd_clusters, [cluster]);
        // Unregistered: the entry leaves the file.
        config.rbd_clusters.clear();
        let edits = FileEdits {
            removed: BTreeSet::from([(Section::RbdClusters, "ceph1".to_string())]),
            ..FileEdits::default()
        };
        assert!(config.save_into(&path, &edits).unwrap());
        assert!(TargetConfig::load(&path).unwrap().rbd_clusters.is_empty());
        for bad in [
            r#"{"rbd_clusters": [{"name": "c", "threads": 1}]}"#,
            r#"{"rbd_clusters": [{"name": "c", "cpus": "1"}]}"#,
            r#"{"rbd_clusters": [{"conf": "/x"}]}"#,
        ] {
            assert!(serde_json::from_str::<TargetConfig>(bad).is_err(), "{bad}");
        }
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn socket_access_is_checked_and_resolved() {
        let access = |owner: Option<&str>, group: Option<&str>, mode: Option<&str>| SocketAccess {
            socket_owner: owner.map(str::to_string),
            socket_group: group.map(str::to_string),
            socket_mode: mode.map(str::to_string),
        };
        assert_eq!(
            access(Some("root"), Some("0"), Some("0660"))
                .resolve()
                .unwrap(),
            (Some(0), Some(0), Some(0o660))
        );
        assert_eq!(
            access(None, None, Some("0o600")).resolve().unwrap(),
            (None, None, Some(0o600))
        );
        assert_eq!(
            access(None, None, None).resolve().unwrap(),
            (None, None, None)
        );
        for bad in [
            access(Some("no-such-user-vfblk"), None, None),
            access(None, Some("no-such-group-vfblk"), None),
            access(None, None, Some("rw-rw----")),
            access(None, None, Some("1777")),
            access(None, None, Some("8")),
        ] {
            assert!(bad.resolve().is_err(), "{bad:?}");
        }
        // A controller's own settings win over the target's.
        let defaults = access(Some("root"), Some("root"), Some("0660"));
        assert_eq!(
            access(None, None, Some("0600")).or(&defaults),
            access(Some("root"), Some("root"), Some("0600"))
        );
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
