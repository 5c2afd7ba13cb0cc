//! A writer for the `newc` cpio format, the format the kernel unpacks as an initramfs.
//!
//! Archives are written uncompressed: under TCG the kernel unpacks an uncompressed archive
//! faster than it decompresses a gzip one, and concatenated archives are unpacked in order,
//! so a per-test archive can be appended to a shared base.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Where an archive file's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    Bytes(Vec<u8>),
    File(PathBuf),
}

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { source: Source, mode: u32 },
    Symlink { target: String },
}

/// An archive being assembled; paths are archive paths without the leading `/`.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

fn normalize(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let path = normalize(path);
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.entries.entry(prefix.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent_dirs(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    /// Adds a file with the given contents.
    pub fn bytes(&mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) {
        let path = normalize(path);
        self.parent_dirs(&path);
        self.entries.insert(
            path,
            Entry::File {
                source: Source::Bytes(data.into()),
                mode,
            },
        );
    }

    /// Adds a file copied from the host when the archive is written; symlinks on the host are
    /// followed so the archive holds the real bytes.
    pub fn file(&mut self, path: &str, host_path: &Path, mode: u32) {
        let path = normalize(path);
        self.parent_dirs(&path);
        self.entries.insert(
            path,
            Entry::File {
                source: Source::File(host_path.to_path_buf()),
                mode,
            },
        );
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        let path = normalize(path);
        self.parent_dirs(&path);
        self.entries.insert(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        );
    }

    /// Whether the archive already has this path.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&normalize(path))
    }

    /// Adds every file below `host_dir` under `path`, following symlinks.
    pub fn tree(&mut self, path: &str, host_dir: &Path) -> io::Result<()> {
        self.dir(path);
        for entry in fs::read_dir(host_dir)? {
            let entry = entry?;
            let host = entry.path();
            let name = entry.file_name();
            let dest = format!("{}/{}", normalize(path), name.to_string_lossy());
            let meta = fs::metadata(&host)?;
            if meta.is_dir() {
                self.tree(&dest, &host)?;
            } else if meta.is_file() {
                self.file(&dest, &host, 0o644 | (meta_mode(&meta) & 0o111));
            }
        }
        Ok(())
    }

    /// Writes the archive in newc format, ending with the trailer.
    pub fn write_to(&self, out: &mut impl Write) -> io::Result<u64> {
        let mut writer = NewcWriter {
            out,
            offset: 0,
            ino: 1,
        };
        for (path, entry) in &self.entries {
            match entry {
                Entry::Dir => writer.entry(path, 0o040755, &[])?,
                Entry::Symlink { target } => writer.entry(path, 0o120777, target.as_bytes())?,
                Entry::File { source, mode } => {
                    let data = match source {
                        Source::Bytes(b) => b.clone(),
                        Source::File(p) => fs::read(p).map_err(|e| {
                            io::Error::new(e.kind(), format!("reading {}: {e}", p.display()))
                        })?,
                    };
                    writer.entry(path, 0o100000 | (mode & 0o7777), &data)?
                }
            }
        }
        writer.entry("TRAILER!!!", 0, &[])?;
        Ok(writer.offset)
    }

    /// Writes the archive to a file.
    pub fn write_file(&self, path: &Path) -> io::Result<u64> {
        let mut out = io::BufWriter::new(fs::File::create(path)?);
        let size = self.write_to(&mut out)?;
        out.flush()?;
        Ok(size)
    }
}

fn meta_mode(meta: &fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode()
}

struct NewcWriter<'a, W: Write> {
    out: &'a mut W,
    offset: u64,
    ino: u32,
}

impl<W: Write> NewcWriter<'_, W> {
    fn put(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.put(&[0u8; 3][..pad])
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so identical inputs give identical archives
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        let mut header = String::from("070701");
        for f in fields {
            header.push_str(&format!("{f:08x}"));
        }
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad4()?;
        self.put(data)?;
        self.pad4()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_has_trailer() {
        let mut a = Archive::new();
        a.bytes("/etc/hello", b"hi\n".to_vec(), 0o644);
        a.symlink("bin/sh", "busybox");
        let mut out = Vec::new();
        let len = a.write_to(&mut out).unwrap();
        assert_eq!(len as usize, out.len());
        assert_eq!(out.len() % 4, 0);
        let text = String::from_utf8_lossy(&out);
        // Parents were created before their children (sorted order), trailer last.
        let etc = text.find("etc\0").unwrap();
        let hello = text.find("etc/hello\0").unwrap();
        assert!(etc < hello);
        assert!(text.trim_end_matches('\0').ends_with("TRAILER!!!"));
        assert_eq!(&out[..6], b"070701");
    }

    #[test]
    fn unpacks_with_system_cpio() {
        let dir = std::env::temp_dir().join(format!("vfblk-cpio-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let mut a = Archive::new();
        a.bytes("a/b/c.txt", b"payload".to_vec(), 0o600);
        a.symlink("a/link", "b/c.txt");
        let archive = dir.join("x.cpio");
        a.write_file(&archive).unwrap();
        let Ok(status) = std::process::Command::new("cpio")
            .args(["-idm", "--quiet", "-F"])
            .arg(&archive)
            .current_dir(&dir)
            .status()
        else {
            panic!("cpio(1) is needed for this test: run scripts/setup.sh");
        };
        assert!(status.success());
        assert_eq!(fs::read(dir.join("a/link")).unwrap(), b"payload");
        fs::remove_dir_all(&dir).unwrap();
    }
}
