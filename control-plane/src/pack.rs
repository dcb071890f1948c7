//! Packing a source directory into a deterministic `tar.gz`: sorted entries, fixed owner
//! and time, `.gitignore` and `.aetherignore` honoured (through the `ignore` crate), and
//! `.git/`, `target/`, `node_modules/` skipped. The same tree always gives the same digest.
//! The walk is shared with `snapshot`, so both release formats hold the same files.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aether_common::Digest;
use aether_common::archive::pack::ArchiveBuilder;
use anyhow::Context;
use flate2::Compression;

pub(crate) const ALWAYS_SKIPPED: &[&str] = &[".git", "target", "node_modules"];

/// A packed artifact.
pub struct Packed {
    pub bytes: Vec<u8>,
    pub digest: Digest,
    pub files: usize,
}

/// Packs `dir`, or reads `path` as is when it is already a `.tar.gz`/`.tgz` file.
pub fn pack(path: &Path) -> anyhow::Result<Packed> {
    if path.is_file() {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let digest = Digest::of(&bytes);
        return Ok(Packed {
            bytes,
            digest,
            files: 0,
        });
    }
    let paths = walk(path)?;
    let mut builder = ArchiveBuilder::new(Vec::new(), Compression::fast());
    let mut files = 0;
    for rel in &paths {
        if builder.append_path(path, rel)? {
            files += 1;
        }
    }
    let bytes = builder.finish()?;
    let digest = Digest::of(&bytes);
    Ok(Packed {
        bytes,
        digest,
        files,
    })
}

/// The paths of a source tree that make up its release, relative and in byte order: what is
/// not ignored (`.gitignore`, `.aetherignore`, the always-skipped directories).
pub fn walk(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = Vec::new();
    let walker = ignore::WalkBuilder::new(path)
        .hidden(false)
        .git_ignore(true)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .add_custom_ignore_filename(".aetherignore")
        .filter_entry(|e| {
            !ALWAYS_SKIPPED
                .iter()
                .any(|s| e.file_name() == *s && e.depth() > 0)
        })
        .build();
    for entry in walker {
        let entry = entry.context("walking the source directory")?;
        if entry.depth() == 0 {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(path)
            .context("path outside the source")?
            .to_path_buf();
        paths.push(rel);
    }
    // Byte order, the manifest's canonical order (a parent still comes before what is in
    // it): Path's own order compares component by component, which is several times
    // slower on a large tree and differs where a name holds a byte below `/`.
    paths.sort_unstable_by(|a, b| a.as_os_str().as_bytes().cmp(b.as_os_str().as_bytes()));
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitignored_and_default_skipped_paths_stay_out_and_output_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join(".gitignore"), "*.log\n").unwrap();
        std::fs::write(d.join(".aetherignore"), "secret.txt\n").unwrap();
        std::fs::write(d.join("app.py"), "print(1)").unwrap();
        std::fs::write(d.join("debug.log"), "x").unwrap();
        std::fs::write(d.join("secret.txt"), "x").unwrap();
        for skipped in [".git", "target", "node_modules"] {
            std::fs::create_dir(d.join(skipped)).unwrap();
            std::fs::write(d.join(skipped).join("f"), "x").unwrap();
        }
        let one = pack(d).unwrap();
        let two = pack(d).unwrap();
        assert_eq!(one.digest, two.digest);
        let out = tempfile::tempdir().unwrap();
        aether_common::archive::extract::unpack_tar_gz(
            &one.bytes[..],
            out.path(),
            &Default::default(),
        )
        .unwrap();
        let mut names: Vec<_> = std::fs::read_dir(out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".aetherignore", ".gitignore", "app.py"]);
    }

    #[test]
    fn the_walk_is_in_byte_order_with_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("lib")).unwrap();
        std::fs::write(d.join("lib/x"), "x").unwrap();
        std::fs::write(d.join("lib-a"), "a").unwrap();
        std::fs::write(d.join("lib.b"), "b").unwrap();
        let names: Vec<String> = walk(d)
            .unwrap()
            .iter()
            .map(|p| p.to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["lib", "lib-a", "lib.b", "lib/x"]);
    }
}
