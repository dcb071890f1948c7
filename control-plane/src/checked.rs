//! The manifest the release route checked last for each of a few apps, with its bytes:
//! the app's next release is parsed against it (`Manifest::parse_against`). A save
//! changes a few entries of tens of thousands, and checking all of them again was most
//! of the route's time. The same pair gives the patch the app's pods will ask for
//! (`release::delta`): made here from bytes already in memory, it is ready before the
//! pods hear of the release (on this replica: with several, the others make it on the
//! first request).

use std::sync::{Arc, Mutex};

use aether_common::Digest;
use aether_common::release::{Manifest, ManifestError, delta};

/// Apps whose last manifest is kept...
const APPS: usize = 4;
/// ...within this many bytes of manifests in all (the parsed forms take about twice as
/// much again): a 40,000-file app's manifest is 6 MB. A larger one is checked in full
/// each time; the store takes manifests up to 64 MiB, and any uploader could otherwise
/// pin four of them.
const BUDGET: usize = 24 << 20;

/// A manifest and the canonical bytes it was parsed from, kept together.
struct Checked {
    app: String,
    digest: Digest,
    bytes: Vec<u8>,
    manifest: Arc<Manifest>,
}

/// A manifest checked, and the patch from the app's manifest checked before it.
#[derive(Debug)]
pub struct Parsed {
    pub manifest: Arc<Manifest>,
    /// `(base, patch)`: the patch that writes this manifest from manifest `base`.
    pub patch: Option<(Digest, Vec<u8>)>,
}

/// The last checked manifest of the apps released most recently.
#[derive(Default)]
pub struct CheckedManifests(Mutex<Vec<Arc<Checked>>>);

impl CheckedManifests {
    /// Parses and checks `bytes` as a release manifest (against `app`'s last one when
    /// there is one, and then makes the patch from that one too) and keeps it for `app`'s
    /// next release when it is that app's. A large manifest's check takes milliseconds:
    /// call it off the async threads.
    pub fn parse(
        &self,
        app: &str,
        digest: Digest,
        bytes: Vec<u8>,
    ) -> Result<Parsed, ManifestError> {
        let known = self
            .0
            .lock()
            .ok()
            .and_then(|c| c.iter().find(|c| c.app == app).cloned());
        let manifest = Arc::new(Manifest::parse_against(
            &bytes,
            known
                .as_deref()
                .map(|k| (k.manifest.as_ref(), k.bytes.as_slice())),
        )?);
        let patch = known
            .as_deref()
            .filter(|k| manifest.app == app && k.digest != digest)
            .map(|k| (k.digest, delta::encode(&k.bytes, &bytes)));
        if manifest.app == app && bytes.len() <= BUDGET {
            let checked = Arc::new(Checked {
                app: app.to_owned(),
                digest,
                bytes,
                manifest: manifest.clone(),
            });
            let evicted = self.0.lock().ok().map(|mut kept| {
                kept.retain(|c| c.app != app);
                kept.insert(0, checked);
                let mut total = 0;
                let keep = kept
                    .iter()
                    .take(APPS)
                    .take_while(|c| {
                        total += c.bytes.len();
                        total <= BUDGET
                    })
                    .count();
                kept.split_off(keep)
            });
            // Freed here, on the caller's blocking thread, with the replaced one.
            drop(evicted);
        }
        drop(known);
        Ok(Parsed { manifest, patch })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aether_common::release::{Entry, EntryType};

    fn manifest(app: &str, seq: u64, files: usize) -> Vec<u8> {
        Manifest {
            app: app.into(),
            blobs: "/v1/blobs/".into(),
            created_at: "2026-12-01T10:00:00Z".into(),
            entries: (0..files)
                .map(|i| Entry {
                    mode: 0o644,
                    path: format!("f{i:03}"),
                    sha256: Some(aether_common::Digest::of(&[seq as u8]).hex()),
                    size: Some(1),
                    target: None,
                    kind: EntryType::File,
                })
                .map(Arc::new)
                .collect(),
            expires_at: None,
            seq,
        }
        .to_canonical()
    }

    fn parse_new(
        checked: &CheckedManifests,
        app: &str,
        bytes: Vec<u8>,
    ) -> Result<Parsed, ManifestError> {
        checked.parse(app, Digest::of(&bytes), bytes)
    }

    #[test]
    fn each_app_keeps_its_last_manifest_and_only_the_most_recent_apps_are_kept() {
        let checked = CheckedManifests::default();
        for i in 0..=APPS {
            let app = format!("app{i}");
            parse_new(&checked, &app, manifest(&app, 1, 3)).unwrap();
            parse_new(&checked, &app, manifest(&app, 2, 3)).unwrap();
        }
        let kept = checked.0.lock().unwrap();
        let apps: Vec<&str> = kept.iter().map(|c| c.app.as_str()).collect();
        assert_eq!(apps, ["app4", "app3", "app2", "app1"]);
        assert!(kept.iter().all(|c| c.manifest.seq == 2));
        assert_eq!(kept[0].bytes, manifest("app4", 2, 3));
    }

    #[test]
    fn a_release_comes_with_the_patch_from_the_apps_release_before_it() {
        let checked = CheckedManifests::default();
        let v1 = manifest("shop", 1, 300);
        // The next save: one file changed.
        let mut next = Manifest::parse(&v1).unwrap();
        next.seq = 2;
        let mut changed = next.entries[150].as_ref().clone();
        changed.sha256 = Some(aether_common::Digest::of(b"edited").hex());
        next.entries[150] = Arc::new(changed);
        let v2 = next.to_canonical();
        assert!(
            parse_new(&checked, "shop", v1.clone())
                .unwrap()
                .patch
                .is_none()
        );
        let (base, patch) = parse_new(&checked, "shop", v2.clone())
            .unwrap()
            .patch
            .unwrap();
        assert_eq!(base, aether_common::Digest::of(&v1));
        assert_eq!(delta::apply(&v1, &patch, u64::MAX).unwrap(), v2);
        // Another app's manifest has no patch from this one.
        assert!(
            parse_new(&checked, "cart", manifest("cart", 3, 300))
                .unwrap()
                .patch
                .is_none()
        );
    }

    #[test]
    fn manifests_are_kept_within_a_byte_budget_the_newest_first() {
        let checked = CheckedManifests::default();
        // About 9 MB each: two fit the budget, a third pushes the oldest out.
        let files = 9_000_000 / manifest("a", 1, 1000).len() * 1000;
        for app in ["a", "b", "c"] {
            parse_new(&checked, app, manifest(app, 1, files)).unwrap();
        }
        let kept = checked.0.lock().unwrap();
        let apps: Vec<&str> = kept.iter().map(|c| c.app.as_str()).collect();
        assert_eq!(apps, ["c", "b"]);
    }

    #[test]
    fn a_refused_or_other_apps_manifest_is_not_kept_and_refusals_are_as_a_full_parse() {
        let checked = CheckedManifests::default();
        parse_new(&checked, "shop", manifest("shop", 1, 3)).unwrap();
        let mut bad = manifest("shop", 2, 3);
        bad.insert(1, b' ');
        assert_eq!(
            parse_new(&checked, "shop", bad.clone()).unwrap_err(),
            Manifest::parse(&bad).map(drop).unwrap_err()
        );
        // Another app's manifest is parsed (the route refuses it) but not kept for shop.
        parse_new(&checked, "shop", manifest("cart", 2, 3)).unwrap();
        let kept = checked.0.lock().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].manifest.seq, 1);
    }
}
