//! Adapter storage on a real S3-compatible server (moto's, from PyPI, started here; needs
//! `CLAAS_TEST_PYTHON` with `moto[server]`, which `make test` provides) and on local files.

use std::path::Path;

use claas_core::adapter_store::AdapterStore;
use claas_core::testing::S3Server;
use claas_testutil::tempdir;

fn write_version(dir: &Path, marker: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::write(
        dir.join("adapter_config.json"),
        format!("{{\"r\": 4, \"m\": \"{marker}\"}}"),
    )
    .expect("config");
    std::fs::write(dir.join("adapter_model.safetensors"), vec![7u8; 4096]).expect("weights");
}

#[tokio::test]
async fn s3_versions_publish_materialize_elsewhere_remove_and_find_orphans() {
    let Some(server) = S3Server::start() else {
        eprintln!("skipped: CLAAS_TEST_PYTHON is not set (make test sets it)");
        return;
    };
    let bucket = server.bucket();
    let url = format!("s3://{bucket}/adapters");

    // Node A trains version 1 and publishes it.
    let a_cache = tempdir("a");
    let a = AdapterStore::s3(&url, &a_cache).expect("store");
    assert!(a.is_remote());
    write_version(&a.local_dir("u/a", "v1"), "one");
    let uri = a.publish("u/a", "v1").await.expect("publish");
    assert_eq!(uri, format!("s3://{bucket}/adapters/u/a/v1"));

    // Node B, with an empty cache, reads the same files.
    let b_cache = tempdir("b");
    let b = AdapterStore::s3(&url, &b_cache).expect("store");
    let dir = b.materialize(&uri).await.expect("materialize");
    assert_eq!(dir, b.local_dir("u/a", "v1"));
    let config = std::fs::read_to_string(dir.join("adapter_config.json")).expect("config");
    assert!(config.contains("\"one\""));
    assert_eq!(
        std::fs::read(dir.join("adapter_model.safetensors"))
            .expect("weights")
            .len(),
        4096
    );
    // Cached: a second materialize reads nothing remote.
    assert_eq!(b.materialize(&uri).await.expect("again"), dir);

    // An initial version nobody wrote yet: its (empty) cache directory.
    let v0 = b
        .materialize(&format!("s3://{bucket}/adapters/u/a/v0"))
        .await
        .expect("empty");
    assert!(v0.is_dir() && !v0.join("adapter_config.json").exists());

    // Removing deletes the objects and the cached copy.
    b.remove(&uri).await.expect("remove");
    assert!(!dir.exists());
    let c_cache = tempdir("c");
    let c = AdapterStore::s3(&url, &c_cache).expect("store");
    let gone = c.materialize(&uri).await.expect("materialize");
    assert!(
        !gone.join("adapter_config.json").exists(),
        "the objects are gone"
    );

    // URIs outside the bucket or escaping the cache are refused.
    for bad in [
        "s3://other-bucket/adapters/u/a/v1".to_string(),
        format!("s3://{bucket}/adapters/../../etc"),
    ] {
        assert!(b.materialize(&bad).await.is_err(), "{bad}");
    }

    // Orphans, on the same server (one per test binary: the AWS environment is global).
    let url = format!("s3://{}/adapters", server.bucket());
    let orphans_s3_cache = tempdir("orphans-s3");
    let s = AdapterStore::s3(&url, &orphans_s3_cache).expect("store");
    orphans_are_unrecorded_writes_of_that_lora_only(&s).await;
}

#[tokio::test]
async fn local_versions_are_their_own_directories() {
    let root = tempdir("local");
    let s = AdapterStore::local(&root);
    write_version(&s.local_dir("u/a", "v2"), "two");
    let uri = s.publish("u/a", "v2").await.expect("publish");
    assert_eq!(uri, format!("file://{}", root.join("u/a/v2").display()));
    assert_eq!(
        s.materialize(&uri).await.expect("path"),
        root.join("u/a/v2")
    );
    s.remove(&uri).await.expect("remove");
    assert!(!root.join("u/a/v2").exists());
    s.remove(&uri).await.expect("removing twice is fine");
}

/// What `orphans` finds under a LoRA, wherever versions are stored: unrecorded writes of its
/// own, once old enough; never a recorded version, nor a LoRA nested under its id.
async fn orphans_are_unrecorded_writes_of_that_lora_only(s: &AdapterStore) {
    let name = |v, tag| AdapterStore::version_name(v, tag);
    for (lora, n) in [
        ("x", name(1, "kept")),
        ("x", name(1, "stray")),
        ("x/v1", name(0, "own")),
    ] {
        write_version(&s.local_dir(lora, &n), lora);
    }
    let kept = s.publish("x", &name(1, "kept")).await.expect("publish");
    let stray = s.publish("x", &name(1, "stray")).await.expect("publish");
    let nested = s.publish("x/v1", &name(0, "own")).await.expect("publish");
    let hour = std::time::Duration::from_secs(3600);
    let zero = std::time::Duration::ZERO;
    let recorded = std::slice::from_ref(&kept);
    assert_eq!(
        s.orphans("x", recorded, hour).await.expect("orphans"),
        Vec::<String>::new(),
        "a write younger than the grace may still be publishing"
    );
    assert_eq!(
        s.orphans("x", recorded, zero).await.expect("orphans"),
        std::slice::from_ref(&stray)
    );
    s.remove(&stray).await.expect("remove");
    assert!(s
        .orphans("x", recorded, zero)
        .await
        .expect("orphans")
        .is_empty());
    let kept_dir = s.materialize(&kept).await.expect("kept");
    assert!(kept_dir.join("adapter_config.json").is_file());
    let nested_dir = s.materialize(&nested).await.expect("nested");
    assert!(nested_dir.join("adapter_config.json").is_file());
    assert_ne!(kept_dir, nested_dir);
}

#[tokio::test]
async fn local_orphans_are_unrecorded_writes_of_that_lora_only() {
    let root = tempdir("orphans");
    orphans_are_unrecorded_writes_of_that_lora_only(&AdapterStore::local(&root)).await;
}
