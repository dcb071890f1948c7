//! The emulator against the real clients: kube-rs (list, watch, patches, 410) and the real
//! `kubectl` binary (get, annotate, apply --server-side).

use std::time::Duration;

use aether_testkit::emulator::Emulator;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

async fn client(emu: &Emulator, dir: &std::path::Path) -> kube::Client {
    let path = emu.write_kubeconfig(dir).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&path).unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

fn pod(name: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn list_filters_by_label_and_field_selectors() {
    let emu = Emulator::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&emu, dir.path()).await, "default");
    for (n, app) in [("a", "x"), ("b", "x"), ("c", "y")] {
        pods.create(&PostParams::default(), &pod(n, app))
            .await
            .unwrap();
    }
    let names = |l: kube::core::ObjectList<Pod>| -> Vec<String> {
        l.items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect()
    };
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app=x"))
                .await
                .unwrap()
        ),
        ["a", "b"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app!=x"))
                .await
                .unwrap()
        ),
        ["c"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().labels("app in (y,z)"))
                .await
                .unwrap()
        ),
        ["c"]
    );
    assert_eq!(
        names(
            pods.list(&ListParams::default().fields("metadata.name=b"))
                .await
                .unwrap()
        ),
        ["b"]
    );
    let err = pods
        .create(&PostParams::default(), &pod("a", "x"))
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 409));
    let missing = pods.get("zzz").await.unwrap_err();
    assert!(matches!(missing, kube::Error::Api(s) if s.code == 404));
}

#[tokio::test]
async fn watch_resumes_from_a_version_and_gets_410_after_compaction() {
    let emu = Emulator::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&emu, dir.path()).await, "default");
    let created = pods
        .create(&PostParams::default(), &pod("w", "x"))
        .await
        .unwrap();
    let rv = created.metadata.resource_version.unwrap();
    pods.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"k": "1"}}})),
    )
    .await
    .unwrap();
    // Resuming from the creation version replays the patch.
    let mut stream = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.next().await.unwrap().unwrap() {
        WatchEvent::Modified(p) => {
            assert_eq!(p.metadata.annotations.unwrap()["k"], "1");
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    emu.compact();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(5), &rv)
        .await
        .unwrap()
        .boxed();
    match stream.next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn watch_sends_bookmarks_and_ends_at_its_timeout() {
    let emu = Emulator::start_with(aether_testkit::emulator::Options {
        bookmark_every: Duration::from_millis(200),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&emu, dir.path()).await, "default");
    let list = pods.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let started = std::time::Instant::now();
    let events: Vec<_> = pods
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "timeoutSeconds ends the watch"
    );
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Ok(WatchEvent::Bookmark(_)))),
        "{events:?}"
    );
}

#[tokio::test]
async fn dropping_watches_cuts_open_connections() {
    let emu = Emulator::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&emu, dir.path()).await, "default");
    let rv = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = pods
        .watch(&WatchParams::default().timeout(60), &rv)
        .await
        .unwrap()
        .boxed();
    // The watch subscribed to drops before its response headers were sent.
    emu.drop_watches();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ended");
    assert!(!matches!(next, Some(Ok(WatchEvent::Added(_)))));
}

#[tokio::test]
async fn strategic_merge_and_server_side_apply_merge_named_lists() {
    let emu = Emulator::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let deploys: Api<Deployment> = Api::namespaced(client(&emu, dir.path()).await, "default");
    let d: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {"selector": {"matchLabels": {"app": "app"}}, "template": {
            "metadata": {"labels": {"app": "app"}},
            "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}}},
    }))
    .unwrap();
    let created = deploys
        .patch("app", &PatchParams::apply("test"), &Patch::Apply(&d))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    let patched = deploys
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "b", "image": "b:2"}]}}}})),
        )
        .await
        .unwrap();
    let containers = patched.spec.template.spec.unwrap().containers;
    assert_eq!(
        containers.len(),
        2,
        "strategic merge keeps the other container"
    );
    assert_eq!(containers[1].image.as_deref(), Some("b:2"));
    assert_eq!(
        patched.metadata.generation,
        Some(2),
        "a spec change bumps the generation"
    );
    // An annotation-only patch leaves the generation (no rollout).
    let annotated = deploys
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert_eq!(annotated.metadata.generation, Some(2));
    let err = deploys
        .patch(
            "app",
            &PatchParams {
                field_manager: None,
                ..Default::default()
            },
            &Patch::Apply(&d),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(s) if s.code == 400),
        "apply needs a field manager"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_kubectl_gets_annotates_and_applies_server_side() {
    // kubectl is a blocking process; it runs off the runtime that serves the emulator.
    let emu = Emulator::start().await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let manifest = home.path().join("pod.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: k\n  labels:\n    app: demo\nspec:\n  containers:\n  - name: c\n    image: i\n",
    )
    .unwrap();
    let m = manifest.to_str().unwrap();
    let h = home.path();
    let result = tokio::task::spawn_blocking({
        let m = m.to_owned();
        let url = emu.url();
        let h = h.to_owned();
        move || {
            let run = |args: &[&str]| {
                let out = std::process::Command::new("kubectl")
                    .args(["--server", &url])
                    .args(args)
                    .env("KUBECONFIG", "/dev/null")
                    .env("HOME", &h)
                    .output()
                    .expect("kubectl is installed (apt-get install kubectl)");
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                (out.status.success(), text)
            };
            vec![
                run(&["apply", "--server-side", "-f", &m]),
                run(&["apply", "--server-side", "-f", &m]),
                run(&["get", "pods", "-l", "app=demo"]),
                run(&[
                    "annotate",
                    "pod",
                    "k",
                    "aether.dev/digest=sha256:00",
                    "--overwrite",
                ]),
                run(&[
                    "get",
                    "pod",
                    "k",
                    "-o",
                    "jsonpath={.metadata.annotations.aether\\.dev/digest}",
                ]),
            ]
        }
    })
    .await
    .unwrap();
    for (ok, text) in &result {
        assert!(ok, "kubectl failed: {text}");
    }
    assert!(
        result[0].1.contains("serverside-applied"),
        "{}",
        result[0].1
    );
    assert!(
        result[2].1.contains("k ") && result[2].1.contains("Running"),
        "{}",
        result[2].1
    );
    assert!(result[3].1.contains("annotated"), "{}", result[3].1);
    assert_eq!(result[4].1.trim(), "sha256:00");
}
