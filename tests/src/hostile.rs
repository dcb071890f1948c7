//! Builders for archives a safe extractor must refuse (or, for permission bits, defuse).
//! Headers are written raw, because well-behaved builders refuse to produce these.

use std::io::Write;

use flate2::Compression;
use flate2::write::GzEncoder;

/// Every hostile kind, for table-driven tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// `/…` entry (absolute path pointing into `outside`).
    AbsolutePath,
    /// `../…` entry.
    ParentTraversal,
    /// `a/../../…` entry (traversal hidden mid-path).
    NestedTraversal,
    /// Symlink to an absolute path outside.
    SymlinkAbsolute,
    /// Symlink `../../..` out of the release.
    SymlinkRelativeEscape,
    /// A symlink inside the release, then a file written through it.
    WriteThroughSymlink,
    /// `d -> .` and `e -> d/..`: each harmless on paper, together one level up.
    SymlinkChainEscape,
    /// Hard link to a file outside.
    HardlinkEscape,
    /// Hard link to a path not extracted before it.
    HardlinkToMissing,
    /// Character device node.
    CharDevice,
    /// Block device node.
    BlockDevice,
    /// Named pipe.
    Fifo,
    /// PAX path with a NUL byte.
    NulInPath,
    /// Path longer than 4096 bytes.
    LongPath,
    /// The same file twice (an overwrite attempt).
    Duplicate,
    /// Not gzip at all.
    CorruptGzip,
    /// Valid gzip header, then truncated.
    TruncatedGzip,
    /// `l0 -> .` and `lk -> l(k-1)/l(k-1)`: each link doubles the lookups of the one before,
    /// so a resolver that bounds only the nesting depth never finishes.
    LinkDoubling,
}

impl Hostile {
    pub const ALL: [Hostile; 18] = [
        Hostile::AbsolutePath,
        Hostile::ParentTraversal,
        Hostile::NestedTraversal,
        Hostile::SymlinkAbsolute,
        Hostile::SymlinkRelativeEscape,
        Hostile::WriteThroughSymlink,
        Hostile::SymlinkChainEscape,
        Hostile::HardlinkEscape,
        Hostile::HardlinkToMissing,
        Hostile::CharDevice,
        Hostile::BlockDevice,
        Hostile::Fifo,
        Hostile::NulInPath,
        Hostile::LongPath,
        Hostile::Duplicate,
        Hostile::CorruptGzip,
        Hostile::TruncatedGzip,
        Hostile::LinkDoubling,
    ];

    /// The archive bytes (`tar.gz`). `outside` is an absolute path of a directory the
    /// archive tries to write into or link to; tests check it stays untouched.
    pub fn build(self, outside: &std::path::Path) -> Vec<u8> {
        let out = outside.to_string_lossy().into_owned();
        let mut t = RawTar::default();
        t.file("ok.txt", b"harmless first entry", 0o644);
        match self {
            Hostile::AbsolutePath => t.file(&format!("{out}/abs.txt"), b"pwned", 0o644),
            Hostile::ParentTraversal => t.file(
                "../../../../../../../../../../../../../../../tmp/aether-escape.txt",
                b"pwned",
                0o644,
            ),
            Hostile::NestedTraversal => t.file("a/../../escape.txt", b"pwned", 0o644),
            Hostile::SymlinkAbsolute => {
                t.symlink("lnk", &out);
                t.file("lnk/abs-through-link.txt", b"pwned", 0o644);
            }
            Hostile::SymlinkRelativeEscape => t.symlink("up", "../../../../.."),
            Hostile::WriteThroughSymlink => {
                t.dir("real");
                t.symlink("alias", "real");
                t.file("alias/through.txt", b"written through a link", 0o644);
            }
            Hostile::SymlinkChainEscape => {
                t.symlink("d", ".");
                t.symlink("e", "d/..");
            }
            Hostile::HardlinkEscape => t.hardlink("h", &format!("{out}/target.txt")),
            Hostile::HardlinkToMissing => t.hardlink("h", "not-extracted-yet.txt"),
            Hostile::CharDevice => t.special("null", tar::EntryType::Char),
            Hostile::BlockDevice => t.special("sda", tar::EntryType::Block),
            Hostile::Fifo => t.special("pipe", tar::EntryType::Fifo),
            Hostile::NulInPath => t.pax_path(b"nul\0name.txt", b"x"),
            Hostile::LongPath => {
                let long = "d/".repeat(2100) + "f.txt";
                t.pax_path(long.as_bytes(), b"x");
            }
            Hostile::Duplicate => t.file("ok.txt", b"overwritten", 0o644),
            Hostile::CorruptGzip => return b"this is not a gzip stream at all".to_vec(),
            Hostile::TruncatedGzip => {
                let full = t.finish();
                return full[..full.len() / 2].to_vec();
            }
            Hostile::LinkDoubling => {
                t.symlink("l0", ".");
                for k in 1..48 {
                    let prev = format!("l{}", k - 1);
                    t.symlink(&format!("l{k}"), &format!("{prev}/{prev}"));
                }
            }
        }
        t.finish()
    }
}

/// A tar stream written header by header, bypassing the path checks of `tar::Builder`.
#[derive(Default)]
pub struct RawTar {
    out: Vec<u8>,
}

impl RawTar {
    fn header(kind: tar::EntryType, name: &[u8], size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(0);
        let old = h.as_old_mut();
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        h
    }

    fn push(&mut self, mut h: tar::Header, data: &[u8]) {
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
    }

    pub fn file(&mut self, name: &str, data: &[u8], mode: u32) {
        if name.len() > 100 {
            self.pax_path(name.as_bytes(), data);
            return;
        }
        let h = Self::header(
            tar::EntryType::Regular,
            name.as_bytes(),
            data.len() as u64,
            mode,
        );
        self.push(h, data);
    }

    pub fn dir(&mut self, name: &str) {
        let h = Self::header(tar::EntryType::Directory, name.as_bytes(), 0, 0o755);
        self.push(h, &[]);
    }

    fn link(&mut self, kind: tar::EntryType, name: &str, target: &str) {
        let mut h = Self::header(kind, name.as_bytes(), 0, 0o777);
        let old = h.as_old_mut();
        let n = target.len().min(old.linkname.len());
        old.linkname[..n].copy_from_slice(&target.as_bytes()[..n]);
        self.push(h, &[]);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.link(tar::EntryType::Symlink, name, target);
    }

    pub fn hardlink(&mut self, name: &str, target: &str) {
        self.link(tar::EntryType::Link, name, target);
    }

    pub fn special(&mut self, name: &str, kind: tar::EntryType) {
        let h = Self::header(kind, name.as_bytes(), 0, 0o644);
        self.push(h, &[]);
    }

    /// One PAX extension header holding `records` (`key=value` each, any bytes).
    fn pax_records(&mut self, records: &[(&str, &[u8])]) {
        let mut data = Vec::new();
        for (key, value) in records {
            // A record is `<len> key=value\n`, where `len` counts the whole record, itself
            // included.
            let body_len = 1 + key.len() + 1 + value.len() + 1;
            let mut total = body_len + 1;
            while total != body_len + total.to_string().len() {
                total = body_len + total.to_string().len();
            }
            write!(data, "{total} {key}=").ok();
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let h = Self::header(
            tar::EntryType::XHeader,
            b"PaxHeader",
            data.len() as u64,
            0o644,
        );
        self.push(h, &data);
    }

    /// A symlink whose name and target come from PAX records (any length).
    pub fn pax_symlink(&mut self, name: &str, target: &str) {
        self.pax_records(&[("path", name.as_bytes()), ("linkpath", target.as_bytes())]);
        let h = Self::header(tar::EntryType::Symlink, b"placeholder", 0, 0o777);
        self.push(h, &[]);
    }

    /// A regular file whose real path comes from a PAX `path` record (any bytes).
    pub fn pax_path(&mut self, path: &[u8], data: &[u8]) {
        self.pax_records(&[("path", path)]);
        let h = Self::header(
            tar::EntryType::Regular,
            b"placeholder",
            data.len() as u64,
            0o644,
        );
        self.push(h, data);
    }

    /// Ends the archive and compresses it.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.extend(std::iter::repeat_n(0u8, 1024));
        let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
        gz.write_all(&self.out).ok();
        gz.finish().unwrap_or_default()
    }
}

/// A gzip bomb: one file of `size` zero bytes (compresses about 1000:1).
pub fn zero_bomb(size: u64) -> Vec<u8> {
    entry_of_zeros(tar::EntryType::Regular, b"zero.bin", 0o644, size)
}

/// One entry whose header declares `size` bytes of zeros after it, streamed into the gzip
/// so the builder itself stays small, then the end of the archive.
fn entry_of_zeros(kind: tar::EntryType, name: &[u8], mode: u32, size: u64) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    let mut h = RawTar::header(kind, name, size, mode);
    h.set_cksum();
    gz.write_all(h.as_bytes()).ok();
    write_repeated(&mut gz, 0, size);
    write_repeated(&mut gz, 0, (512 - size % 512) % 512 + 1024);
    gz.finish().unwrap_or_default()
}

/// Writes `len` copies of `byte`, a MiB at a time.
fn write_repeated(out: &mut impl Write, byte: u8, len: u64) {
    let block = vec![byte; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n]).ok();
        left -= n as u64;
    }
}

/// Which extension header [`huge_extension_header`] inflates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extension {
    /// A PAX `x` header whose one record (`comment`) is `size` bytes long.
    Pax,
    /// A GNU `L` long-name header of `size` bytes.
    GnuLongName,
}

/// An archive whose first header is an extension header of `size` bytes (a few hundred
/// MB of repeated letters gzip to well under 1 MB), followed by a small file. An extractor
/// that buffers extension headers whole runs out of memory on it. Built streaming, so the
/// test itself stays small.
pub fn huge_extension_header(kind: Extension, size: u64) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    let (entry_type, prefix) = match kind {
        Extension::Pax => {
            // One PAX record, `<len> comment=<value>\n`, where `len` is the whole record.
            (
                tar::EntryType::XHeader,
                format!("{size} comment=").into_bytes(),
            )
        }
        Extension::GnuLongName => (tar::EntryType::GNULongName, Vec::new()),
    };
    let mut h = RawTar::header(entry_type, b"././@LongLink", size, 0o644);
    h.set_cksum();
    gz.write_all(h.as_bytes()).ok();
    gz.write_all(&prefix).ok();
    write_repeated(
        &mut gz,
        b'a',
        size - prefix.len() as u64 - u64::from(kind == Extension::Pax),
    );
    if kind == Extension::Pax {
        gz.write_all(b"\n").ok();
    }
    gz.write_all(&vec![0u8; ((512 - size % 512) % 512) as usize])
        .ok();
    let mut t = RawTar::default();
    t.file("after.txt", b"after the header", 0o644);
    t.out.extend(std::iter::repeat_n(0u8, 1024));
    gz.write_all(&t.out).ok();
    gz.finish().unwrap_or_default()
}

/// `count` files, each at the end of a chain of nested directories about `path_bytes`
/// long (`x<i>/d/d/…/f`): every directory on the way is a name an extractor keeps until the
/// end, so the names add up to about `count × path_bytes² / 4` bytes from a small archive.
pub fn deep_directories(count: usize, path_bytes: usize) -> Vec<u8> {
    let mut t = RawTar::default();
    let depth = path_bytes / 2;
    for i in 0..count {
        let path = format!("x{i}/{}f", "d/".repeat(depth));
        t.file(&path, b"", 0o644);
    }
    t.finish()
}

/// A directory `a` and `count` symlinks whose targets walk `a/..` back and forth for about
/// `target_bytes` bytes: each harmless, but checking where they lead costs
/// `count × target_bytes / 2` lookups.
pub fn link_lookup_flood(count: usize, target_bytes: usize) -> Vec<u8> {
    let mut t = RawTar::default();
    t.dir("a");
    let target = format!("{}a", "a/../".repeat(target_bytes / 5));
    for i in 0..count {
        t.pax_symlink(&format!("l{i}"), &target);
    }
    t.finish()
}

/// A directory entry that declares `size` bytes of data (zeros) after its header: a reader
/// that skips the data of non-file entries reads them unseen and uncounted.
pub fn directory_with_data(size: u64) -> Vec<u8> {
    entry_of_zeros(tar::EntryType::Directory, b"dir/", 0o755, size)
}

/// An archive with `n` tiny files.
pub fn many_entries(n: usize) -> Vec<u8> {
    let mut t = RawTar::default();
    for i in 0..n {
        t.file(&format!("f{i}"), b"", 0o644);
    }
    t.finish()
}

/// A file with setuid, setgid, sticky and world-write bits (extracted, bits stripped).
pub fn special_modes() -> Vec<u8> {
    let mut t = RawTar::default();
    t.file("suid.sh", b"#!/bin/sh\n", 0o6777);
    t.file("sticky.txt", b"x", 0o1666);
    t.finish()
}
