//! Backend specs as operators write them (`mem:PATH:SIZE`, `file:PATH[:SIZE]`, `:ro` for
//! either's read-only form, `nvme:PCI_ADDR[:NSID]`, `rbd:POOL/IMAGE[,OPTION...]`) and sizes with K/M/G suffixes, parsed without silent overflow.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use vfblk_nvme::pci::PciAddress;

use crate::backend::{
    Backend, FileBackend, MemBackend, NamespaceRange, NullBackend, NvmeBackend, NvmeControllers,
    NvmeOptions, RbdBackend, RbdCluster,
};
use crate::{Error, Result};

/// A size in bytes: a number with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let (num, shift) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 30),
        Some('T' | 't') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| Error::BadArgument(format!("{s:?} is not a size in bytes (K/M/G/T)")))
}

/// Which backend to serve. In JSON (config file, RPC) it is an object tagged by `kind`:
/// `{"kind": "file", "path": "/var/lib/vm1.img", "size": 1073741824}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendSpec {
    /// A RAM disk in a shared-memory file.
    Mem {
        /// The file (e.g. under /dev/shm).
        path: PathBuf,
        /// Create or grow the file to this many bytes (needed unless `readonly`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// Map the existing file for reading only (O_RDONLY, PROT_READ, a shared image
        /// lock). Controllers on it are read-only.
        #[serde(default, skip_serializing_if = "is_false")]
        readonly: bool,
    },
    /// A file or block device through io_uring.
    File {
        /// The file or device.
        path: PathBuf,
        /// Create or grow the file to this many bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// Open it for reading only (O_RDONLY, a shared image lock): a golden image, or one
        /// the operator may only read. Controllers on it are read-only.
        #[serde(default, skip_serializing_if = "is_false")]
        readonly: bool,
    },
    /// A disk that stores nothing (benchmarks of the path itself).
    Null {
        /// Bytes.
        size: u64,
    },
    /// A namespace of an NVMe controller bound to vfio-pci.
    Nvme {
        /// The controller.
        #[serde(with = "pci_string")]
        address: PciAddress,
        /// Namespace id.
        #[serde(default = "first_namespace")]
        nsid: u32,
        /// Serve only the bytes from here (a part of the namespace, for one VM of several).
        #[serde(default, skip_serializing_if = "is_zero")]
        offset: u64,
        /// ... this many of them (default: to the end).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    },
    /// A Ceph RBD image.
    Rbd {
        /// The pool.
        pool: String,
        /// The image.
        image: String,
        /// Create the image with this many bytes if it does not exist (an existing one must
        /// have this size).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        /// A registered RBD cluster (`rbd_cluster_register`) whose client serves the image;
        /// then `conf`, `id` and `keyring` are the cluster's, not given here.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster: Option<String>,
        /// ceph.conf (default: librados's search, /etc/ceph/ceph.conf).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conf: Option<PathBuf>,
        /// Client id without `client.` (default `admin`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// Keyring (default: the conf's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        keyring: Option<PathBuf>,
        /// Open the existing image for reading only (`rbd_open_read_only`: never its
        /// exclusive lock, never created). Controllers on it are read-only.
        #[serde(default, skip_serializing_if = "is_false")]
        readonly: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn first_namespace() -> u32 {
    1
}

/// PCI addresses in JSON as their usual text, "0000:00:04.0".
pub mod pci_string {
    use super::PciAddress;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes the address as text.
    pub fn serialize<S: Serializer>(a: &PciAddress, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(a)
    }

    /// Reads an address from text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PciAddress, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for BackendSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::BadArgument(format!(
                "backend {spec:?}: {why} (mem:PATH:SIZE, mem:PATH:ro, file:PATH[:SIZE], file:PATH:ro, null:SIZE, nvme:PCI_ADDR[:NSID][@OFFSET+SIZE], rbd:POOL/IMAGE[:SIZE][,conf=PATH][,id=ID][,keyring=PATH][,ro] or rbd:POOL/IMAGE[:SIZE],cluster=NAME[,ro])"
            ))
        };
        if let Some(rest) = spec.strip_prefix("nvme:") {
            // A part of the namespace: "@OFFSET+SIZE" at the end.
            let (rest, offset, size) = match rest.split_once('@') {
                Some((r, range)) => {
                    let (o, s) = range
                        .split_once('+')
                        .ok_or_else(|| bad("a part is @OFFSET+SIZE"))?;
                    (r, parse_size(o)?, Some(parse_size(s)?))
                }
                None => (rest, 0, None),
            };
            // PCI addresses contain colons: the namespace is an optional last ":N" after the
            // function ("dddd:bb:dd.f:N").
            let (addr, nsid) = match rest.rsplit_once(':') {
                Some((a, n)) if a.contains('.') => (
                    a,
                    n.parse::<u32>()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or_else(|| bad("the namespace id is not a number above 0"))?,
                ),
                _ => (rest, 1),
            };
            let address = addr
                .parse()
                .map_err(|e: vfblk_nvme::Error| bad(&e.to_string()))?;
            return Ok(BackendSpec::Nvme {
                address,
                nsid,
                offset,
                size,
            });
        }
        if let Some(rest) = spec.strip_prefix("rbd:") {
            let mut options = rest.split(',');
            let image_part = options.next().unwrap_or_default();
            let (name, size) = match image_part.split_once(':') {
                Some((n, s)) => (n, Some(parse_size(s)?)),
                None => (image_part, None),
            };
            let (pool, image) = name
                .split_once('/')
                .filter(|(p, i)| !p.is_empty() && !i.is_empty() && !i.contains('/'))
                .ok_or_else(|| bad("an RBD image is POOL/IMAGE"))?;
            let (mut conf, mut id, mut keyring, mut cluster) = (None, None, None, None);
            let mut readonly = false;
            for option in options {
                if option == "ro" {
                    readonly = true;
                    continue;
                }
                match option.split_once('=') {
                    Some(("cluster", v)) if !v.is_empty() => cluster = Some(v.to_string()),
                    Some(("conf", v)) if !v.is_empty() => conf = Some(PathBuf::from(v)),
                    Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
                    Some(("keyring", v)) if !v.is_empty() => keyring = Some(PathBuf::from(v)),
                    _ => return Err(bad(&format!("unknown RBD option {option:?}"))),
                }
            }
            if cluster.is_some() && (conf.is_some() || id.is_some() || keyring.is_some()) {
                return Err(bad(
                    "cluster= names a registered cluster, which has its own conf, id and keyring",
                ));
            }
            return Ok(BackendSpec::Rbd {
                pool: pool.into(),
                image: image.into(),
                size,
                cluster,
                conf,
                id,
                keyring,
                readonly,
            });
        }
        if let Some(size) = spec.strip_prefix("null:") {
            return Ok(BackendSpec::Null {
                size: parse_size(size)?,
            });
        }
        let parts: Vec<&str> = spec.splitn(3, ':').collect();
        match parts.as_slice() {
            ["mem", path, "ro"] if !path.is_empty() => Ok(BackendSpec::Mem {
                path: PathBuf::from(path),
                size: None,
                readonly: true,
            }),
            ["mem", path, size] if !path.is_empty() => Ok(BackendSpec::Mem {
                path: PathBuf::from(path),
                size: Some(parse_size(size)?),
                readonly: false,
            }),
            ["file", path] if !path.is_empty() => Ok(BackendSpec::File {
                path: PathBuf::from(path),
                size: None,
                readonly: false,
            }),
            ["file", path, "ro"] if !path.is_empty() => Ok(BackendSpec::File {
                path: PathBuf::from(path),
                size: None,
                readonly: true,
            }),
            ["file", path, size] if !path.is_empty() => Ok(BackendSpec::File {
                path: PathBuf::from(path),
                size: Some(parse_size(size)?),
                readonly: false,
            }),
            _ => Err(bad("unknown kind or missing fields")),
        }
    }
}

impl BackendSpec {
    /// The file a `mem` or `file` backend lives in.
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            BackendSpec::Mem { path, .. } | BackendSpec::File { path, .. } => Some(path),
            BackendSpec::Null { .. } | BackendSpec::Nvme { .. } | BackendSpec::Rbd { .. } => None,
        }
    }

    /// The same spec with its path made absolute against this process's working directory
    /// (for command lines: the target itself takes absolute paths only).
    pub fn with_absolute_path(mut self) -> std::io::Result<Self> {
        if let BackendSpec::Mem { path, .. } | BackendSpec::File { path, .. } = &mut self {
            *path = std::path::absolute(&*path)?;
        }
        if let BackendSpec::Rbd { conf, keyring, .. } = &mut self {
            for path in [conf, keyring].into_iter().flatten() {
                *path = std::path::absolute(&*path)?;
            }
        }
        Ok(self)
    }

    /// Opens the backend. An NVMe namespace uses the controller in `controllers` if another
    /// backend opened it, else opens it with `io_queues` queue pairs and `nvme`'s command
    /// watch; either way it gets an IOVA window of its own. An RBD image that names a
    /// cluster opens through the client `rbd_cluster` finds for that name.
    pub fn open(
        &self,
        controllers: &mut NvmeControllers,
        io_queues: u16,
        nvme: &NvmeOptions,
        rbd_cluster: &dyn Fn(&str) -> Result<Arc<RbdCluster>>,
    ) -> Result<Arc<dyn Backend>> {
        Ok(match self {
            BackendSpec::Mem {
                path,
                size: Some(size),
                readonly: false,
            } => Arc::new(MemBackend::open(path, *size)?),
            BackendSpec::Mem {
                path,
                size: None,
                readonly: false,
            } => {
                return Err(Error::BadArgument(format!(
                    "mem backend {}: a size is needed (or readonly, to map an existing file for reading only)",
                    path.display()
                )))
            }
            BackendSpec::Mem {
                path,
                size: None,
                readonly: true,
            } => Arc::new(MemBackend::open_read_only(path)?),
            BackendSpec::Mem {
                path,
                size: Some(_),
                readonly: true,
            } => {
                return Err(Error::BadArgument(format!(
                    "mem backend {}: a read-only image is not created or grown; leave out the size",
                    path.display()
                )))
            }
            BackendSpec::File {
                path,
                size,
                readonly: false,
            } => Arc::new(FileBackend::open(path, *size)?),
            BackendSpec::File {
                path,
                size: None,
                readonly: true,
            } => Arc::new(FileBackend::open_read_only(path)?),
            BackendSpec::File {
                path,
                size: Some(_),
                readonly: true,
            } => {
                return Err(Error::BadArgument(format!(
                "file backend {}: a read-only image is not created or grown; leave out the size",
                path.display()
            )))
            }
            BackendSpec::Null { size } => Arc::new(NullBackend::new(*size)?),
            BackendSpec::Nvme {
                address,
                nsid,
                offset,
                size,
            } => {
                let shared = controllers.get_or_open(*address, io_queues, nvme)?;
                let range = NamespaceRange {
                    offset: *offset,
                    size: *size,
                };
                let backend = NvmeBackend::new(shared, *nsid, range, nvme.clone());
                if backend.is_err() {
                    controllers.close_unused();
                }
                Arc::new(backend?)
            }
            BackendSpec::Rbd {
                pool,
                image,
                size: Some(_),
                readonly: true,
                ..
            } => {
                return Err(Error::BadArgument(format!(
                    "RBD image {pool}/{image}: a read-only image is not created or checked against a size; leave out the size"
                )))
            }
            BackendSpec::Rbd {
                pool,
                image,
                size,
                cluster: Some(name),
                conf,
                id,
                keyring,
                readonly,
            } => {
                if conf.is_some() || id.is_some() || keyring.is_some() {
                    return Err(Error::BadArgument(format!(
                        "RBD image {pool}/{image}: cluster {name} has its own conf, id and keyring; give either the cluster or them"
                    )));
                }
                let cluster = rbd_cluster(name)?;
                Arc::new(if *readonly {
                    RbdBackend::open_on_read_only(cluster, pool, image)?
                } else {
                    RbdBackend::open_on(cluster, pool, image, *size)?
                })
            }
            BackendSpec::Rbd {
                pool,
                image,
                size,
                cluster: None,
                conf,
                id,
                keyring,
                readonly,
            } => {
                let cluster = crate::backend::ClusterSettings {
                    conf: conf.clone(),
                    id: id.clone(),
                    keyring: keyring.clone(),
                };
                Arc::new(if *readonly {
                    RbdBackend::open_read_only(&cluster, pool, image)?
                } else {
                    RbdBackend::open(&cluster, pool, image, *size)?
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes_and_refuse_overflow() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("16K").unwrap(), 16 << 10);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(
            parse_size("17179869184G").is_err(),
            "2^34 GiB overflows u64: refused, not wrapped"
        );
    }

    #[test]
    fn rbd_specs_parse_with_their_cluster_options() {
        assert_eq!(
            "rbd:rbd/vm1".parse::<BackendSpec>().unwrap(),
            BackendSpec::Rbd {
                pool: "rbd".into(),
                image: "vm1".into(),
                size: None,
                cluster: None,
                conf: None,
                id: None,
                keyring: None,
                readonly: false,
            }
        );
        let spec: BackendSpec = "rbd:vms/disk-2:10G,conf=/etc/ceph/c2.conf,id=vfblk,keyring=/k"
            .parse()
            .unwrap();
        assert_eq!(
            spec,
            BackendSpec::Rbd {
                pool: "vms".into(),
                image: "disk-2".into(),
                size: Some(10 << 30),
                cluster: None,
                conf: Some("/etc/ceph/c2.conf".into()),
                id: Some("vfblk".into()),
                keyring: Some("/k".into()),
                readonly: false,
            }
        );
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["kind"], "rbd");
        assert_eq!(serde_json::from_value::<BackendSpec>(json).unwrap(), spec);
        let golden: BackendSpec = "rbd:vms/golden,conf=/c,ro".parse().unwrap();
        assert_eq!(
            golden,
            BackendSpec::Rbd {
                pool: "vms".into(),
                image: "golden".into(),
                size: None,
                cluster: None,
                conf: Some("/c".into()),
                id: None,
                keyring: None,
                readonly: true,
            }
        );
        let json = serde_json::to_value(&golden).unwrap();
        assert_eq!(json["readonly"], true, "{json}");
        assert_eq!(serde_json::from_value::<BackendSpec>(json).unwrap(), golden);
        assert!(
            serde_json::to_value(&spec)
                .unwrap()
                .get("readonly")
                .is_none(),
            "written only when set"
        );
        let named: BackendSpec = "rbd:vms/disk-3:1G,cluster=ceph-a".parse().unwrap();
        assert_eq!(
            named,
            BackendSpec::Rbd {
                pool: "vms".into(),
                image: "disk-3".into(),
                size: Some(1 << 30),
                cluster: Some("ceph-a".into()),
                conf: None,
                id: None,
                keyring: None,
                readonly: false,
            }
        );
        let json = serde_json::to_value(&named).unwrap();
        assert_eq!(json["cluster"], "ceph-a");
        assert!(json.get("conf").is_none(), "{json}");
        assert_eq!(serde_json::from_value::<BackendSpec>(json).unwrap(), named);
        for bad in [
            "rbd:p/i,cluster=",
            "rbd:p/i,cluster=c,conf=/etc/ceph/ceph.conf",
            "rbd:p/i,id=x,cluster=c",
            "rbd:",
            "rbd:vm1",
            "rbd:/vm1",
            "rbd:pool/",
            "rbd:a/b/c",
            "rbd:p/i:12X",
            "rbd:p/i,user=x",
            "rbd:p/i,conf=",
            "rbd:p/i,ro=1",
            "rbd:p/i,rw",
        ] {
            assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
        }
    }

    /// Opens `spec` where no NVMe controller nor RBD cluster may be reached.
    fn open_alone(spec: &BackendSpec) -> Result<Arc<dyn Backend>> {
        spec.open(
            &mut NvmeControllers::default(),
            1,
            &NvmeOptions::default(),
            &|name| panic!("cluster {name} looked up"),
        )
    }

    #[test]
    fn read_only_specs_refuse_a_size_and_a_mem_disk_needs_one_or_readonly() {
        let path = std::env::temp_dir().join(format!("vfblk-spec-ro-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let refusal = |spec: BackendSpec| match open_alone(&spec) {
            Ok(_) => panic!("{spec:?} opened"),
            Err(e) => e.to_string(),
        };
        // A sizeless writable mem disk parses from JSON (the size became optional with
        // read-only ones) and is refused when opened, saying what is missing.
        let sizeless: BackendSpec =
            serde_json::from_str(&format!(r#"{{"kind": "mem", "path": {path:?}}}"#)).unwrap();
        let e = refusal(sizeless);
        assert!(e.contains("a size is needed"), "{e}");
        for spec in [
            BackendSpec::Mem {
                path: path.clone(),
                size: Some(1 << 20),
                readonly: true,
            },
            BackendSpec::File {
                path: path.clone(),
                size: Some(1 << 20),
                readonly: true,
            },
        ] {
            let e = refusal(spec);
            assert!(e.contains("read-only image is not created"), "{e}");
            assert!(!path.exists(), "{e}: nothing created");
        }
        let e = refusal(BackendSpec::Rbd {
            pool: "p".into(),
            image: "golden".into(),
            size: Some(1 << 20),
            cluster: Some("c".into()),
            conf: None,
            id: None,
            keyring: None,
            readonly: true,
        });
        assert!(
            e.contains("p/golden") && e.contains("leave out the size"),
            "{e}"
        );
    }

    #[test]
    fn backend_specs_parse() {
        assert_eq!(
            "mem:/dev/shm/d0:64M".parse::<BackendSpec>().unwrap(),
            BackendSpec::Mem {
                path: "/dev/shm/d0".into(),
                size: Some(64 << 20),
                readonly: false,
            }
        );
        let golden_ram = "mem:/dev/shm/golden:ro".parse::<BackendSpec>().unwrap();
        assert_eq!(
            golden_ram,
            BackendSpec::Mem {
                path: "/dev/shm/golden".into(),
                size: None,
                readonly: true,
            }
        );
        let json = serde_json::to_value(&golden_ram).unwrap();
        assert_eq!(json["readonly"], true, "{json}");
        assert!(json.get("size").is_none(), "{json}");
        assert_eq!(
            serde_json::from_value::<BackendSpec>(json).unwrap(),
            golden_ram
        );
        // A config written before read-only mem backends existed reads as it did.
        let old: BackendSpec =
            serde_json::from_str(r#"{"kind": "mem", "path": "/dev/shm/d", "size": 4096}"#).unwrap();
        assert_eq!(
            old,
            BackendSpec::Mem {
                path: "/dev/shm/d".into(),
                size: Some(4096),
                readonly: false,
            }
        );
        assert!(
            "mem:/dev/shm/d".parse::<BackendSpec>().is_err(),
            "a size or ro"
        );
        assert_eq!(
            "file:/tmp/disk.img".parse::<BackendSpec>().unwrap(),
            BackendSpec::File {
                path: "/tmp/disk.img".into(),
                size: None,
                readonly: false,
            }
        );
        assert_eq!(
            "file:/tmp/d:1G".parse::<BackendSpec>().unwrap(),
            BackendSpec::File {
                path: "/tmp/d".into(),
                size: Some(1 << 30),
                readonly: false,
            }
        );
        let golden = "file:/srv/golden.img:ro".parse::<BackendSpec>().unwrap();
        assert_eq!(
            golden,
            BackendSpec::File {
                path: "/srv/golden.img".into(),
                size: None,
                readonly: true,
            }
        );
        let json = serde_json::to_value(&golden).unwrap();
        assert_eq!(json["readonly"], true, "{json}");
        assert_eq!(serde_json::from_value::<BackendSpec>(json).unwrap(), golden);
        let plain = serde_json::to_value(BackendSpec::File {
            path: "/x".into(),
            size: None,
            readonly: false,
        })
        .unwrap();
        assert!(
            plain.get("readonly").is_none(),
            "written only when set: {plain}"
        );
        let nvme = "nvme:0000:00:04.0".parse::<BackendSpec>().unwrap();
        assert_eq!(
            nvme,
            BackendSpec::Nvme {
                address: "0000:00:04.0".parse().unwrap(),
                nsid: 1,
                offset: 0,
                size: None
            }
        );
        assert_eq!(
            "null:1G".parse::<BackendSpec>().unwrap(),
            BackendSpec::Null { size: 1 << 30 }
        );
        let ns2 = "nvme:0000:00:04.0:2".parse::<BackendSpec>().unwrap();
        assert!(matches!(ns2, BackendSpec::Nvme { nsid: 2, .. }));
        let part = "nvme:0000:00:04.0:1@1G+512M"
            .parse::<BackendSpec>()
            .unwrap();
        assert!(matches!(
            part,
            BackendSpec::Nvme {
                nsid: 1,
                offset: 0x4000_0000,
                size: Some(0x2000_0000),
                ..
            }
        ));
        let part = "nvme:0000:00:04.0@64M+64M".parse::<BackendSpec>().unwrap();
        assert!(matches!(
            part,
            BackendSpec::Nvme {
                nsid: 1,
                offset: 0x400_0000,
                size: Some(0x400_0000),
                ..
            }
        ));
        for spec in [
            "mem:/dev/shm/d0:64M",
            "file:/tmp/d:1G",
            "file:/x",
            "nvme:0000:00:04.0:2",
        ] {
            let spec: BackendSpec = spec.parse().unwrap();
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(
                serde_json::from_str::<BackendSpec>(&json).unwrap(),
                spec,
                "{json}"
            );
        }
        let file: BackendSpec = serde_json::from_str(r#"{"kind": "file", "path": "/x"}"#).unwrap();
        assert_eq!(file, "file:/x".parse().unwrap());
        let nvme: BackendSpec =
            serde_json::from_str(r#"{"kind": "nvme", "address": "0000:00:04.0"}"#).unwrap();
        assert!(matches!(nvme, BackendSpec::Nvme { nsid: 1, .. }));
        for bad in [
            r#"{"kind": "tape", "path": "/x"}"#,
            r#"{"kind": "file", "path": "/x", "colour": "red"}"#,
            r#"{"kind": "nvme", "address": "zz"}"#,
        ] {
            assert!(serde_json::from_str::<BackendSpec>(bad).is_err(), "{bad}");
        }
        for bad in [
            "",
            "mem",
            "mem:/x",
            "mem::1M",
            "mem:/x:lots",
            "file:",
            "disk:/x",
            "nvme:zz",
            "nvme:0000:00:04.0:0",
            "nvme:0000:00:04.0:x",
            "nvme:0000:00:04.0@1G",
            "nvme:0000:00:04.0:1@x+1G",
        ] {
            assert!(bad.parse::<BackendSpec>().is_err(), "{bad:?} refused");
        }
    }
}
