//! Blobs a loop knows its store holds (the store said so, or took them), so that a save
//! asks the store only about the others: a one-file save of a 40,000-file tree asks about
//! one blob, and does not look up 40,000 hashes to find it.

use std::collections::HashSet;

use aether_common::Digest;

use crate::snapshot::Snapshot;

/// Known-stored blobs, and the snapshot they are known to cover.
#[derive(Debug, Default)]
pub struct KnownBlobs {
    stored: HashSet<Digest>,
    /// Every blob of this snapshot is in `stored`.
    covers: Option<Digest>,
}

impl KnownBlobs {
    /// Forgets everything: the next save asks about every blob.
    pub fn clear(&mut self) {
        self.stored.clear();
        self.covers = None;
    }

    pub fn is_empty(&self) -> bool {
        self.stored.is_empty()
    }

    pub fn len(&self) -> usize {
        self.stored.len()
    }

    /// The blobs of `snap` the store may lack. A patch of a covered snapshot can lack
    /// only what the patch added; otherwise every blob not known is looked up.
    pub fn unknown(&self, snap: &Snapshot) -> Vec<Digest> {
        let candidates: Box<dyn Iterator<Item = &Digest>> = match (snap.patched_from, self.covers) {
            (Some(from), Some(covered)) if from == covered => Box::new(snap.added.iter()),
            _ => Box::new(snap.blobs.keys()),
        };
        candidates
            .filter(|d| !self.stored.contains(*d))
            .copied()
            .collect()
    }

    /// The store now holds every blob of `snap`: `unknown` were asked about and the
    /// missing ones sent.
    pub fn confirm(&mut self, snap: &Snapshot, unknown: impl IntoIterator<Item = Digest>) {
        self.stored.extend(unknown);
        // Bounded by the tree: the blobs of files long since changed are let go.
        if self.stored.len() > 2 * snap.blobs.len() + 1024 {
            self.stored = snap.blobs.keys().copied().collect();
        }
        self.covers = Some(snap.digest);
    }

    /// `snap` was not sent (its tree is the one released last); it is still covered when
    /// every blob of it is known, so the next save stays a short question.
    pub fn unchanged(&mut self, snap: &Snapshot) {
        if self.covers.is_some() && self.unknown(snap).is_empty() {
            self.covers = Some(snap.digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use aether_common::release::Manifest;

    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    /// A snapshot named `name` holding the blobs `blobs`, patched from `from` with `added`.
    fn snap(name: &str, blobs: &[&str], from: Option<&str>, added: &[&str]) -> Snapshot {
        Snapshot {
            manifest: Arc::new(Manifest {
                app: "web".into(),
                blobs: "./".into(),
                created_at: "2026-12-01T00:00:00Z".into(),
                entries: Vec::new(),
                expires_at: None,
                seq: 1,
            }),
            bytes: bytes::Bytes::new(),
            digest: d(name),
            tree: d(name),
            blobs: Arc::new(
                blobs
                    .iter()
                    .map(|b| (d(b), (std::path::PathBuf::from(b), 1)))
                    .collect(),
            ),
            hashed: 0,
            walked: from.is_none(),
            patched_from: from.map(d),
            added: added.iter().map(|b| d(b)).collect(),
        }
    }

    fn sorted(mut v: Vec<Digest>) -> Vec<Digest> {
        v.sort();
        v
    }

    #[test]
    fn a_patch_of_a_confirmed_snapshot_asks_only_about_what_it_added_and_anything_else_asks_about_every_unknown_blob()
     {
        let mut known = KnownBlobs::default();
        let one = snap("one", &["a", "b"], None, &[]);
        assert_eq!(sorted(known.unknown(&one)), sorted(vec![d("a"), d("b")]));
        known.confirm(&one, known.unknown(&one));
        let two = snap("two", &["a", "b", "c"], Some("one"), &["c"]);
        assert_eq!(known.unknown(&two), vec![d("c")], "only the added blob");
        known.confirm(&two, known.unknown(&two));
        // Patched from a snapshot that was never confirmed: every blob not known.
        let other = snap("other", &["a", "c", "x", "y"], Some("one"), &["y"]);
        assert_eq!(sorted(known.unknown(&other)), sorted(vec![d("x"), d("y")]));
        // An unchanged tree keeps the chain: its patch is a short question again.
        let same = snap("same", &["a", "b", "c"], Some("two"), &[]);
        known.unchanged(&same);
        let next = snap("next", &["a", "b", "c", "z"], Some("same"), &["z"]);
        assert_eq!(known.unknown(&next), vec![d("z")]);
        known.clear();
        assert_eq!(known.unknown(&next).len(), 4, "forgotten: asks about all");
    }
}
