//! The kernel's hugepage pools (`/sys/kernel/mm/hugepages`): what is reserved and free, and
//! growing the 2 MiB pool to a size (what an operator's setup step does before the target
//! starts).

use std::path::{Path, PathBuf};

use crate::{DmaError, Result};

const POOLS: &str = "/sys/kernel/mm/hugepages";

/// One hugepage size's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HugepagePool {
    /// Page size in KiB.
    pub page_kb: u64,
    /// Pages reserved.
    pub total: u64,
    /// Of which free.
    pub free: u64,
}

fn read_u64(path: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(path).map_err(|source| DmaError::Sys {
        what: format!("reading {}", path.display()),
        source,
    })?;
    text.trim().parse().map_err(|_| DmaError::Sys {
        what: format!("{} holds {:?}, not a number", path.display(), text.trim()),
        source: std::io::Error::from(std::io::ErrorKind::InvalidData),
    })
}

fn pool_dir(page_kb: u64) -> PathBuf {
    Path::new(POOLS).join(format!("hugepages-{page_kb}kB"))
}

/// Every pool the kernel has, smallest pages first.
pub fn pools() -> Result<Vec<HugepagePool>> {
    let entries = std::fs::read_dir(POOLS).map_err(|source| DmaError::Sys {
        what: format!("listing {POOLS} (no hugetlbfs support?)"),
        source,
    })?;
    let mut pools = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(kb) = name
            .strip_prefix("hugepages-")
            .and_then(|n| n.strip_suffix("kB"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        pools.push(HugepagePool {
            page_kb: kb,
            total: read_u64(&entry.path().join("nr_hugepages"))?,
            free: read_u64(&entry.path().join("free_hugepages"))?,
        });
    }
    pools.sort_by_key(|p| p.page_kb);
    Ok(pools)
}

/// What [`reserve_2m`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    /// 2 MiB pages before.
    pub before: u64,
    /// 2 MiB pages now.
    pub after: u64,
}

/// Grows the 2 MiB pool to at least `pages` (never shrinks it: pages others use or reserved
/// stay). The kernel may find fewer free contiguous pages than asked: `after` says what it
/// gave, and less than `pages` is an error.
pub fn reserve_2m(pages: u64) -> Result<Reserved> {
    let path = pool_dir(2048).join("nr_hugepages");
    let before = read_u64(&path)?;
    if before >= pages {
        return Ok(Reserved {
            before,
            after: before,
        });
    }
    std::fs::write(&path, pages.to_string()).map_err(|source| DmaError::Sys {
        what: format!("writing {pages} to {} (root needed)", path.display()),
        source,
    })?;
    let after = read_u64(&path)?;
    if after < pages {
        return Err(DmaError::Sys {
            what: format!(
                "asked for {pages} 2 MiB hugepages, the kernel reserved {after} (memory too fragmented; reserve at boot with hugepages={pages})"
            ),
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        });
    }
    Ok(Reserved { before, after })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_are_read_and_reserving_what_exists_changes_nothing() {
        let Ok(pools) = pools() else {
            return; // a kernel without hugetlbfs: nothing to read
        };
        let two_mb = pools
            .iter()
            .find(|p| p.page_kb == 2048)
            .expect("a 2 MiB pool");
        assert!(two_mb.free <= two_mb.total);
        let r = reserve_2m(two_mb.total).unwrap();
        assert_eq!(r.before, r.after);
    }
}
