//! Deterministic `tar.gz` packing: the same tree always gives the same bytes, so the same
//! source gives the same digest and an unchanged tree never causes a refresh.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::write::GzEncoder;

/// Builds a `tar.gz` from explicit entries, with fixed owner, group and time.
pub struct ArchiveBuilder<W: Write> {
    tar: tar::Builder<GzEncoder<W>>,
    mtime: u64,
}

impl ArchiveBuilder<Vec<u8>> {
    /// An in-memory archive.
    pub fn in_memory() -> Self {
        Self::new(Vec::new(), Compression::default())
    }
}

impl<W: Write> ArchiveBuilder<W> {
    pub fn new(out: W, level: Compression) -> Self {
        let mut tar = tar::Builder::new(GzEncoder::new(out, level));
        tar.mode(tar::HeaderMode::Deterministic);
        Self { tar, mtime: 0 }
    }

    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, contents: &[u8], mode: u32) -> io::Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Regular, mode, contents.len() as u64);
        self.tar.append_data(&mut h, path, contents)?;
        Ok(self)
    }

    /// Adds a regular file whose bytes come from a reader of known length.
    pub fn file_from<R: io::Read>(
        &mut self,
        path: &str,
        size: u64,
        mode: u32,
        contents: R,
    ) -> io::Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Regular, mode, size);
        self.tar.append_data(&mut h, path, contents)?;
        Ok(self)
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str) -> io::Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Directory, 0o755, 0);
        self.tar.append_data(&mut h, path, io::empty())?;
        Ok(self)
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<&mut Self> {
        let mut h = self.header(tar::EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut h, path, target)?;
        Ok(self)
    }

    /// Adds `root/rel` from disk under the name `rel`: a symlink as a link, a directory, or a
    /// regular file with mode 0755 when any execute bit is set and 0644 otherwise (other
    /// kinds are skipped). Returns whether a regular file was added.
    pub fn append_path(&mut self, root: &Path, rel: &Path) -> io::Result<bool> {
        let not_utf8 = |what: &Path| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not UTF-8", what.display()),
            )
        };
        let with_path = |full: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("reading {}: {e}", full.display()))
        };
        let name = rel.to_str().ok_or_else(|| not_utf8(rel))?;
        let full = root.join(rel);
        let meta = fs::symlink_metadata(&full).map_err(|e| with_path(&full, e))?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&full).map_err(|e| with_path(&full, e))?;
            let target = target.to_str().ok_or_else(|| not_utf8(&target))?;
            self.symlink(name, target)?;
        } else if meta.is_dir() {
            self.dir(name)?;
        } else if meta.is_file() {
            let mode = if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            };
            let file = fs::File::open(&full).map_err(|e| with_path(&full, e))?;
            self.file_from(name, meta.len(), mode, file)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes the end-of-archive marker and the gzip trailer, returning the output.
    pub fn finish(self) -> io::Result<W> {
        self.tar.into_inner()?.finish()
    }
}

/// Packs every file, directory and symlink below `dir` (sorted by path, so the output is
/// reproducible), skipping any path for which `skip` returns true. Paths in the archive are
/// relative to `dir`.
pub fn pack_dir<W: Write>(
    dir: &Path,
    out: W,
    level: Compression,
    skip: &dyn Fn(&Path) -> bool,
) -> io::Result<W> {
    let mut builder = ArchiveBuilder::new(out, level);
    let mut paths = Vec::new();
    collect(dir, Path::new(""), skip, &mut paths)?;
    paths.sort();
    for rel in paths {
        builder.append_path(dir, &rel)?;
    }
    builder.finish()
}

fn collect(
    root: &Path,
    rel: &Path,
    skip: &dyn Fn(&Path) -> bool,
    out: &mut Vec<PathBuf>,
) -> io::Result<()> {
    for entry in fs::read_dir(root.join(rel))? {
        let entry = entry?;
        let child = rel.join(entry.file_name());
        if skip(&child) {
            continue;
        }
        let kind = entry.file_type()?;
        out.push(child.clone());
        if kind.is_dir() {
            collect(root, &child, skip, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_the_same_tree_twice_gives_identical_bytes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b.txt"), "b").unwrap();
        fs::write(dir.path().join("a.txt"), "a").unwrap();
        let one = pack_dir(dir.path(), Vec::new(), Compression::fast(), &|_| false).unwrap();
        let two = pack_dir(dir.path(), Vec::new(), Compression::fast(), &|_| false).unwrap();
        assert_eq!(one, two);
    }

    #[test]
    fn packed_tree_extracts_to_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/b.txt"), "bee").unwrap();
        fs::write(dir.path().join("skip.me"), "x").unwrap();
        std::os::unix::fs::symlink("sub/b.txt", dir.path().join("link")).unwrap();
        let bytes = pack_dir(dir.path(), Vec::new(), Compression::fast(), &|p| {
            p == Path::new("skip.me")
        })
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        crate::archive::extract::unpack_tar_gz(&bytes[..], out.path(), &Default::default())
            .unwrap();
        assert_eq!(
            fs::read_to_string(out.path().join("sub/b.txt")).unwrap(),
            "bee"
        );
        assert_eq!(fs::read_to_string(out.path().join("link")).unwrap(), "bee");
        assert!(!out.path().join("skip.me").exists());
    }
}
