//! The manifest the release route checked last for each of a few apps, with its bytes:
//! the app's next release is parsed against it (`Manifest::parse_against`). A save
//! changes a few entries of tens of thousands, and checking all of them again was most
//! of the route's time.

use std::sync::{Arc, Mutex};

use aether_common::release::{Manifest, ManifestError};

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
    bytes: Vec<u8>,
    manifest: Arc<Manifest>,
}

/// The last checked manifest of the apps released most recently.
#[derive(Default)]
pub struct CheckedManifests(Mutex<Vec<Arc<Checked>>>);

impl CheckedManifests {
    /// Parses and checks `bytes` as a release manifest (against `app`'s last one when
    /// there is one) and keeps it for `app`'s next release when it is that app's. A
    /// large manifest's check takes milliseconds: call it off the async threads.
    pub fn parse(&self, app: &str, bytes: Vec<u8>) -> Result<Arc<Manifest>, ManifestError> {
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
        if manifest.app == app && bytes.len() <= BUDGET {
            let checked = Arc::new(Checked {
                app: app.to_owned(),
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
        Ok(manifest)
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

    #[test]
    fn each_app_keeps_its_last_manifest_and_only_the_most_recent_apps_are_kept() {
        let checked = CheckedManifests::default();
        for i in 0..=APPS {
            let app = format!("app{i}");
            checked.parse(&app, manifest(&app, 1, 3)).unwrap();
            checked.parse(&app, manifest(&app, 2, 3)).unwrap();
        }
        let kept = checked.0.lock().unwrap();
        let apps: Vec<&str> = kept.iter().map(|c| c.app.as_str()).collect();
        assert_eq!(apps, ["app4", "app3", "app2", "app1"]);
        assert!(kept.iter().all(|c| c.manifest.seq == 2));
        assert_eq!(kept[0].bytes, manifest("app4", 2, 3));
    }

    #[test]
    fn manifests_are_kept_within_a_byte_budget_the_newest_first() {
        let checked = CheckedManifests::default();
        // About 9 MB each: two fit the budget, a third pushes the oldest out.
        let files = 9_000_000 / manifest("a", 1, 1000).len() * 1000;
        for app in ["a", "b", "c"] {
            checked.parse(app, manifest(app, 1, files)).unwrap();
        }
        let kept = checked.0.lock().unwrap();
        let apps: Vec<&str> = kept.iter().map(|c| c.app.as_str()).collect();
        assert_eq!(apps, ["c", "b"]);
    }

    #[test]
    fn a_refused_or_other_apps_manifest_is_not_kept_and_refusals_are_as_a_full_parse() {
        let checked = CheckedManifests::default();
        checked.parse("shop", manifest("shop", 1, 3)).unwrap();
        let mut bad = manifest("shop", 2, 3);
        bad.insert(1, b' ');
        assert_eq!(
            checked.parse("shop", bad.clone()).unwrap_err(),
            Manifest::parse(&bad).map(Arc::new).unwrap_err()
        );
        // Another app's manifest is parsed (the route refuses it) but not kept for shop.
        checked.parse("shop", manifest("cart", 2, 3)).unwrap();
        let kept = checked.0.lock().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].manifest.seq, 1);
    }
}
