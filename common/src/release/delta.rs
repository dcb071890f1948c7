//! Manifest downloads as a patch against a manifest the client already holds (RFC 3229
//! delta encoding, with an instance manipulation of our own, `aether-patch`). A one-file
//! save's manifest of a 40,000-file tree is 6 MB, all but a few hundred bytes of it those
//! of the manifest before; every pod downloading all of it on every save is most of a
//! save's bytes and of the store's work.
//!
//! The client asks with `A-IM: aether-patch` and `If-None-Match: "sha256:<held>"` (the
//! digest of the manifest it holds). A store that has the held manifest may answer
//! `226 IM Used` with `IM: aether-patch`, `Delta-Base: "sha256:<held>"` and a patch as
//! the body; any other answer is a whole manifest, as from any server that knows nothing
//! of this. The client checks the digest over the bytes it rebuilt, exactly as over
//! downloaded ones: a wrong patch is a manifest that does not verify, never a wrong
//! release.
//!
//! A patch is a sequence of steps that write the manifest from start to end:
//! `copy <offset> <len>\n` (bytes of the held manifest) and `insert <len>\n` followed by
//! that many bytes. Numbers are decimal. [`encode`] makes few: a save changes `seq`,
//! `created_at` and a few entries, so each of the three parts of a canonical manifest
//! (what comes before its entries, the entries, what comes after) is patched as the
//! bytes it shares with the held part at either end, and between them entry by entry.

use std::collections::HashMap;
use std::ops::Range;

use super::against::{ENTRIES_CLOSE, ENTRIES_OPEN, ENTRY_START, common_prefix, common_suffix};
use crate::Digest;

/// The instance manipulation (`A-IM` and `IM` headers).
pub const IM: &str = "aether-patch";
/// RFC 3229's headers, lowercase as `http::HeaderName` wants them.
pub const A_IM_HEADER: &str = "a-im";
pub const IM_HEADER: &str = "im";
pub const DELTA_BASE_HEADER: &str = "delta-base";

/// Largest patch sent or taken: the client holds it beside the manifest it patches and
/// the one it writes. A save that changes more than this much of a manifest (a quarter of
/// the largest one) is as well downloaded whole.
pub const MAX_PATCH_BYTES: u64 = super::MAX_MANIFEST_BYTES / 4;

/// Longest step line (`copy` and two 20-digit numbers).
const MAX_LINE: usize = 64;

/// Whether a patch of `patch` bytes is worth sending instead of a `whole`-byte manifest.
pub fn worth_sending(patch: usize, whole: usize) -> bool {
    patch < whole && patch as u64 <= MAX_PATCH_BYTES
}

/// Why a patch cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchError {
    #[error("malformed patch: {0}")]
    Malformed(&'static str),
    #[error("malformed patch: a step line longer than {MAX_LINE} bytes")]
    LongLine,
    #[error("patch copies bytes {offset}..+{len} of a {held}-byte manifest")]
    OutOfRange { offset: u64, len: u64, held: usize },
    #[error("patched manifest exceeds {0} bytes")]
    TooLarge(u64),
}

/// The patch that writes `target` from `held`.
pub fn encode(held: &[u8], target: &[u8]) -> Vec<u8> {
    let mut steps = Steps::default();
    for (h, t) in parts(held).into_iter().zip(parts(target)) {
        let (hb, tb) = (&held[h.clone()], &target[t.clone()]);
        let head = common_prefix(hb, tb);
        let tail = common_suffix(&hb[head..], &tb[head..]);
        steps.copy(h.start, head);
        let between = h.start + head..h.end - tail;
        patch_between(&mut steps, held, between, &tb[head..tb.len() - tail]);
        steps.copy(h.end - tail, tail);
    }
    steps.finish()
}

/// Writes `target` (what lies between two shared ends) from the held bytes `between` the
/// same ends: entry by entry where an entry of `target` is one of those held (a save of
/// several files far apart, a file removed and another added), else as bytes.
fn patch_between(steps: &mut Steps, held: &[u8], between: Range<usize>, target: &[u8]) {
    let known: HashMap<&[u8], usize> = pieces(&held[between.clone()])
        .map(|piece| {
            (
                &held[between.start + piece.start..between.start + piece.end],
                between.start + piece.start,
            )
        })
        .collect();
    for piece in pieces(target) {
        let bytes = &target[piece];
        match known.get(bytes) {
            Some(&offset) => steps.copy(offset, bytes.len()),
            None => steps.insert(bytes),
        }
    }
}

/// `bytes` cut before every entry start: whole entries (each with the comma after it),
/// and whatever lies before the first one.
fn pieces(bytes: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut starts = (1..bytes.len())
        .filter(|&i| bytes[i..].starts_with(ENTRY_START))
        .chain([bytes.len()]);
    let mut at = 0;
    std::iter::from_fn(move || {
        let end = starts.next()?;
        let piece = at..end;
        at = end;
        Some(piece)
    })
    .filter(|p| !p.is_empty())
}

/// Steps being written; consecutive copies of consecutive bytes are one.
#[derive(Default)]
struct Steps {
    out: Vec<u8>,
    copy: Option<(usize, usize)>,
}

impl Steps {
    fn copy(&mut self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        match &mut self.copy {
            Some((at, n)) if *at + *n == offset => *n += len,
            _ => {
                self.flush();
                self.copy = Some((offset, len));
            }
        }
    }

    fn insert(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.flush();
        self.out
            .extend_from_slice(format!("insert {}\n", bytes.len()).as_bytes());
        self.out.extend_from_slice(bytes);
    }

    fn flush(&mut self) {
        if let Some((offset, len)) = self.copy.take() {
            self.out
                .extend_from_slice(format!("copy {offset} {len}\n").as_bytes());
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.flush();
        self.out
    }
}

/// A canonical manifest's three parts: up to its entries, its entries, after them (all of
/// it the middle part when it is not of that shape).
fn parts(bytes: &[u8]) -> [Range<usize>; 3] {
    let open = bytes
        .windows(ENTRIES_OPEN.len())
        .position(|w| w == ENTRIES_OPEN)
        .map(|at| at + ENTRIES_OPEN.len());
    let close = bytes
        .windows(ENTRIES_CLOSE.len())
        .rposition(|w| w == ENTRIES_CLOSE);
    match (open, close) {
        (Some(open), Some(close)) if open <= close => [0..open, open..close, close..bytes.len()],
        _ => [0..0, 0..bytes.len(), bytes.len()..bytes.len()],
    }
}

/// Writes the manifest `patch` describes from `held`, at most `max` bytes; every step is
/// checked before it is followed.
pub fn apply(held: &[u8], mut patch: &[u8], max: u64) -> Result<Vec<u8>, PatchError> {
    let mut out = Vec::new();
    while !patch.is_empty() {
        let end = match patch.iter().take(MAX_LINE).position(|&b| b == b'\n') {
            Some(end) => end,
            None if patch.len() >= MAX_LINE => return Err(PatchError::LongLine),
            None => return Err(PatchError::Malformed("a step line without its end")),
        };
        let line = std::str::from_utf8(&patch[..end])
            .map_err(|_| PatchError::Malformed("a step line that is not text"))?;
        patch = &patch[end + 1..];
        let mut words = line.split(' ');
        let (step, args) = (words.next(), words.collect::<Vec<_>>());
        let piece = match (step, args.as_slice()) {
            (Some("copy"), [offset, len]) => {
                let (offset, len) = (number(offset)?, number(len)?);
                let range = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(len).ok())
                    .and_then(|(o, l)| Some(o..o.checked_add(l)?))
                    .filter(|r| r.end <= held.len())
                    .ok_or(PatchError::OutOfRange {
                        offset,
                        len,
                        held: held.len(),
                    })?;
                &held[range]
            }
            (Some("insert"), [len]) => {
                let len = usize::try_from(number(len)?)
                    .ok()
                    .filter(|&l| l <= patch.len())
                    .ok_or(PatchError::Malformed("an insert longer than the patch"))?;
                let (bytes, rest) = patch.split_at(len);
                patch = rest;
                bytes
            }
            _ => return Err(PatchError::Malformed("an unknown step")),
        };
        if (out.len() + piece.len()) as u64 > max {
            return Err(PatchError::TooLarge(max));
        }
        out.extend_from_slice(piece);
    }
    Ok(out)
}

/// A step's number: decimal digits only.
fn number(s: &str) -> Result<u64, PatchError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PatchError::Malformed("a step number that is not decimal"));
    }
    s.parse()
        .map_err(|_| PatchError::Malformed("a step number too large"))
}

/// Whether an `A-IM` request header asks for `aether-patch`: a comma-separated list of
/// instance manipulations, case-insensitive, each with optional parameters (`q=0` is a
/// refusal).
pub fn accepted(a_im: &str) -> bool {
    a_im.split(',').any(|im| {
        let mut words = im.split(';').map(str::trim);
        let name = words.next().unwrap_or_default();
        let refused = words.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        name.eq_ignore_ascii_case(IM) && !refused
    })
}

/// Whether an `IM` response header says the body is an `aether-patch` (and only that).
pub fn used(im: &str) -> bool {
    im.trim().eq_ignore_ascii_case(IM)
}

/// The entity tag of a stored object: its digest, quoted (a strong tag).
pub fn etag(digest: &Digest) -> String {
    format!("\"{digest}\"")
}

/// The digest a single strong entity tag names (`"sha256:<hex>"`), if that is what the
/// value is.
pub fn etag_digest(value: &str) -> Option<Digest> {
    value
        .trim()
        .strip_prefix('"')?
        .strip_suffix('"')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(seq: u64, created: &str, files: &[(String, String)]) -> Vec<u8> {
        let entries: Vec<String> = files
            .iter()
            .map(|(p, h)| format!("{{\"mode\":420,\"path\":\"{p}\",\"sha256\":\"{h}\"}}"))
            .collect();
        format!(
            "{{\"app\":\"web\",\"blobs\":\"./\",\"created_at\":\"{created}\",\"entries\":[{}],\"seq\":{seq}}}",
            entries.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn a_save_patches_seq_created_at_and_the_changed_entry_only() {
        let files: Vec<(String, String)> = (0..500)
            .map(|i| (format!("node_modules/m{i:03}/index.js"), format!("{i:064}")))
            .collect();
        let held = manifest(9, "2026-12-07T10:00:00Z", &files);
        let mut changed = files.clone();
        changed[250].1 = "f".repeat(64);
        changed.remove(400);
        let target = manifest(10, "2026-12-07T10:00:05Z", &changed);
        let patch = encode(&held, &target);
        assert!(patch.len() < 400, "{}", String::from_utf8_lossy(&patch));
        assert_eq!(apply(&held, &patch, u64::MAX).unwrap(), target);
    }

    #[test]
    fn any_two_byte_strings_patch_into_each_other() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"abcXdef", b"abcYYdef"),
            (b"aaaa", b"aa"),
            (b"aa", b"aaaa"),
            (b"same", b"same"),
            (b"", b"new"),
            (b"old", b""),
            (b",\"entries\":[x],\"", b",\"entries\":[y],\""),
            (b"],\" before ,\"entries\":[", b"no marker"),
            (
                b"{\"app\":1,\"entries\":[{\"mode\":1}],\"seq\":1}",
                b"no marker",
            ),
            (
                b"no marker",
                b"{\"app\":1,\"entries\":[{\"mode\":1}],\"seq\":1}",
            ),
            (
                b",\"entries\":[{\"mode\":1},{\"mode\":2},{\"mode\":3}],\"",
                b",\"entries\":[{\"mode\":3},{\"mode\":1},{\"mode\":4}],\"",
            ),
        ];
        for (held, target) in cases {
            let patch = encode(held, target);
            assert_eq!(&apply(held, &patch, u64::MAX).unwrap(), target);
        }
    }

    #[test]
    fn a_hostile_patch_is_refused_before_it_writes_past_its_bounds() {
        let held = b"0123456789";
        let cases: &[(&[u8], PatchError)] = &[
            (
                b"copy 6 5\n",
                PatchError::OutOfRange {
                    offset: 6,
                    len: 5,
                    held: 10,
                },
            ),
            (
                b"copy 18446744073709551615 1\n",
                PatchError::OutOfRange {
                    offset: u64::MAX,
                    len: 1,
                    held: 10,
                },
            ),
            (
                b"insert 5\nabc",
                PatchError::Malformed("an insert longer than the patch"),
            ),
            (
                b"copy 0 1",
                PatchError::Malformed("a step line without its end"),
            ),
            (
                b"copy -1 2\n",
                PatchError::Malformed("a step number that is not decimal"),
            ),
            (b"copy 1  2\n", PatchError::Malformed("an unknown step")),
            (b"move 0 1\n", PatchError::Malformed("an unknown step")),
            (b"copy 0 1 2\n", PatchError::Malformed("an unknown step")),
            (
                b"copy 99999999999999999999999 1\n",
                PatchError::Malformed("a step number too large"),
            ),
            (b"copy 0 10\ncopy 0 10\n", PatchError::TooLarge(15)),
        ];
        for (patch, error) in cases {
            assert_eq!(
                apply(held, patch, 15).unwrap_err(),
                *error,
                "{}",
                String::from_utf8_lossy(patch)
            );
        }
        let long_line = [b"copy ".as_slice(), &[b'0'; 100], b" 1\n"].concat();
        assert_eq!(apply(held, &long_line, 15), Err(PatchError::LongLine));
    }

    #[test]
    fn a_im_lists_are_read_token_by_token() {
        assert!(accepted("aether-patch"));
        assert!(accepted("vcdiff, Aether-Patch;q=0.5"));
        assert!(!accepted("aether-patch;q=0"));
        assert!(!accepted("vcdiff"));
        assert!(used("aether-patch"));
        assert!(!used("vcdiff, aether-patch"));
        assert!(!accepted("aether-patch-2"));
        let d = Digest::of(b"x");
        assert_eq!(etag_digest(&etag(&d)), Some(d));
        assert_eq!(etag_digest(&d.to_string()), None);
        assert_eq!(etag_digest("W/\"sha256:00\""), None);
    }
}
