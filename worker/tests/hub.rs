//! Base models by Hugging Face id, against the fake Hub (testkit), which serves the tiny
//! checkpoint the way huggingface.co does: the first start downloads into the cache, the
//! second asks nothing, a gated model says to set HF_TOKEN, a missing one is named.

use std::path::Path;

use claas_fake_vllm::hub::{FakeHub, COMMIT};
use claas_testutil::{tempdir, TempDir};
use claas_worker::hub::{fetch_if_missing, Fetched, HubError, HubSettings};
use claas_worker::testing::tiny_checkpoint;

const REPO: &str = "tiny-org/tiny-qwen3";

/// The fake Hub, and the directory it serves (removed when the guard drops).
async fn start_hub(token: Option<&str>) -> (FakeHub, TempDir) {
    let dir = tempdir("hub-files");
    tiny_checkpoint(&dir, 3).await;
    (FakeHub::start(REPO, dir.to_path_buf(), token).await, dir)
}

fn settings(endpoint: &str, token: Option<&str>, cache: &TempDir) -> HubSettings {
    HubSettings {
        endpoint: endpoint.into(),
        token: token.map(String::from),
        cache_dir: cache.to_path_buf(),
        offline: false,
        progress_bar: false,
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

#[tokio::test]
async fn a_hub_id_is_downloaded_once_and_then_read_from_the_cache() {
    let cache = tempdir("cache");
    let (hub, _served) = start_hub(None).await;
    let s = settings(&hub.url, None, &cache);
    let data_dir = tempdir("data");

    let first = fetch_if_missing(REPO, &data_dir, &s)
        .await
        .expect("download");
    let Fetched::Downloaded(files) = first else {
        panic!("expected a download, got {first:?}");
    };
    assert_eq!(files.last().map(String::as_str), Some("config.json"));
    assert!(!files.iter().any(|f| f == "README.md" || f.contains('/')));

    // Laid out as huggingface_hub does, so the resolver (and vLLM) find it.
    let snapshot = claas_trainer::resolve::hf_cache_snapshot_in(&s.cache_dir, REPO)
        .expect("the snapshot is in the cache");
    assert!(snapshot.ends_with(format!("snapshots/{COMMIT}")));
    for entry in std::fs::read_dir(hub.dir()).expect("served files") {
        let name = entry.expect("entry").file_name();
        assert!(
            same_file(&hub.dir().join(&name), &snapshot.join(&name)),
            "{name:?} arrived intact"
        );
    }
    let model = tokio::task::spawn_blocking(move || {
        claas_trainer::Qwen3::load(
            &snapshot,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
    })
    .await
    .expect("join");
    assert!(model.is_ok(), "the downloaded checkpoint loads");

    let asked = hub.requests();
    assert!(asked > 0);
    let second = fetch_if_missing(REPO, &data_dir, &s).await.expect("second");
    assert_eq!(second, Fetched::Nothing);
    assert_eq!(hub.requests(), asked, "a second start makes no request");
}

#[tokio::test]
async fn a_gated_model_says_to_set_hf_token_and_downloads_with_it() {
    let cache = tempdir("cache");
    let (hub, _served) = start_hub(Some("hf_secret")).await;
    let url = hub.url.clone();
    let data_dir = tempdir("data");

    let err = fetch_if_missing(REPO, &data_dir, &settings(&url, None, &cache))
        .await
        .expect_err("no token");
    assert!(matches!(err, HubError::Unauthorized { status: 401, .. }));
    assert!(err.to_string().contains("set HF_TOKEN"), "{err}");

    let err = fetch_if_missing(REPO, &data_dir, &settings(&url, Some("hf_wrong"), &cache))
        .await
        .expect_err("wrong token");
    assert!(err.to_string().contains("HF_TOKEN is set"), "{err}");

    let got = fetch_if_missing(REPO, &data_dir, &settings(&url, Some("hf_secret"), &cache))
        .await
        .expect("with the token");
    assert!(matches!(got, Fetched::Downloaded(_)));
}

#[tokio::test]
async fn a_missing_repository_is_named() {
    let cache = tempdir("cache");
    let (hub, _served) = start_hub(None).await;
    let url = hub.url.clone();
    let err = fetch_if_missing(
        "tiny-org/no-such-model",
        &tempdir("data").to_path_buf(),
        &settings(&url, None, &cache),
    )
    .await
    .expect_err("missing");
    assert!(matches!(err, HubError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("tiny-org/no-such-model"), "{err}");
    assert_eq!(hub.requests(), 1, "one file-list request");
}

#[tokio::test]
async fn paths_presets_and_offline_mode_ask_nothing() {
    let cache = tempdir("cache");
    let (hub, _served) = start_hub(None).await;
    let url = hub.url.clone();
    let data_dir = tempdir("data");
    let mut s = settings(&url, None, &cache);
    for id in ["tiny", "/no/such/dir", "./relative", "a/b/c"] {
        assert_eq!(
            fetch_if_missing(id, &data_dir, &s).await.expect(id),
            Fetched::Nothing,
            "{id}"
        );
    }
    s.offline = true;
    assert_eq!(
        fetch_if_missing(REPO, &data_dir, &s)
            .await
            .expect("offline"),
        Fetched::Nothing
    );
    assert_eq!(hub.requests(), 0);
}
