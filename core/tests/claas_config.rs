//! CLaaS's configuration files load unchanged: its three profiles exactly as CLaaS ships
//! them (kfallah/CLaaS `claas/core/configs/*.yaml`, text copied here verbatim), its
//! container's `local key=value …` arguments, and `CLAAS_DISTILL_EXECUTION_MODE`.

use std::path::{Path, PathBuf};

use claas_core::config::{Config, Environment, Mode, Profile, Sources, StorageBackend};
use claas_core::Error;

const SEED_LOCAL: &str = "defaults:
  - _core_local_schema
  - _self_

mode: local
feedback_log_dir: ./data/feedback
lora_root: /loras
storage_backend: local_fs
allowed_init_base_models:
  - Qwen/Qwen3-8B
vllm_base_url: http://127.0.0.1:8000
feedback_lock_timeout_s: 120.0
feedback_wake_on_failure: true
feedback_min_free_vram_gb: 20.0
feedback_sleep_verify_timeout_s: 30.0
feedback_drain_timeout_s: 30.0
base_model_id: Qwen/Qwen3-8B
attn_implementation: flash_attention_2
completion_cache_size: 100
";

const SEED_TINKER: &str = "defaults:
  - _core_tinker_schema
  - _self_

mode: tinker
feedback_log_dir: ./data/feedback
lora_root: /loras
storage_backend: local_fs
allowed_init_base_models:
  - Qwen/Qwen3-8B
vllm_base_url: http://127.0.0.1:8000
tinker_base_model: Qwen/Qwen3-30B-A3B
tinker_state_path: /data/tinker_state.json
completion_cache_size: 100
";

const SEED_MODAL: &str = "defaults:
  - _core_modal_schema
  - _self_

mode: modal
feedback_log_dir: ./data/feedback
lora_root: /loras
storage_backend: modal_volume
allowed_init_base_models:
  - Qwen/Qwen3-8B
vllm_base_url: http://127.0.0.1:8000
feedback_lock_timeout_s: 120.0
feedback_wake_on_failure: true
feedback_min_free_vram_gb: 20.0
feedback_sleep_verify_timeout_s: 30.0
feedback_drain_timeout_s: 30.0
completion_cache_size: 100
";

/// Loads with exactly `vars` as the environment (the process's is neither read nor changed);
/// `files` are written into a fresh directory first.
fn load(
    profile: Profile,
    files: &[(&str, &str)],
    sources: impl Fn(&Path) -> (Option<&'static str>, Option<PathBuf>, Vec<String>),
    vars: &[(&str, &str)],
) -> Result<Config, Error> {
    let dir = claas_testutil::tempdir("claas-config");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write the config file");
    }
    let (name, file, overrides) = sources(&dir);
    Config::load_from(
        profile,
        &Sources {
            name,
            file: file.as_deref(),
            overrides: &overrides,
        },
        &Environment::fixed(vars),
    )
}

fn file(
    name: &'static str,
) -> impl Fn(&Path) -> (Option<&'static str>, Option<PathBuf>, Vec<String>) {
    move |dir| (None, Some(dir.join(name)), vec![])
}

#[test]
fn claas_local_yaml_loads_as_written() {
    // Over the embedded profile (no vLLM there), so every value visibly comes from the file.
    let cfg = load(
        Profile::Local,
        &[("local.yaml", SEED_LOCAL)],
        file("local.yaml"),
        &[],
    )
    .expect("CLaaS's local.yaml loads");
    assert_eq!(cfg.vllm.base_url.as_deref(), Some("http://127.0.0.1:8000"));
    assert_eq!(cfg.model.base_model_id, "Qwen/Qwen3-8B");
    assert_eq!(cfg.model.allowed_init_base_models, ["Qwen/Qwen3-8B"]);
    assert_eq!(cfg.storage.backend, StorageBackend::Local);
    assert_eq!(cfg.storage.lora_root, PathBuf::from("/loras"));
    assert_eq!(
        cfg.telemetry.feedback_log_dir,
        Some(PathBuf::from("./data/feedback"))
    );
    assert_eq!(cfg.queue.lock_timeout_s, 120.0);
    assert!(cfg.worker.feedback_wake_on_failure);
    assert_eq!(cfg.worker.feedback_min_free_vram_gb, 20.0);
    assert_eq!(cfg.worker.feedback_sleep_verify_timeout_s, 30.0);
    assert_eq!(cfg.worker.feedback_drain_timeout_s, 30.0);
    assert_eq!(cfg.cache.completion_cache_size, 100);
    let ignored = cfg.ignored.join("\n");
    assert!(
        ignored.contains("attn_implementation") && ignored.contains("defaults"),
        "{ignored}"
    );
    // The built-in copy is the same profile.
    let named = load(Profile::Local, &[], |_| (Some("LOCAL"), None, vec![]), &[])
        .expect("--config-name local");
    assert_eq!(named.vllm.base_url, cfg.vllm.base_url);
    assert_eq!(named.model.base_model_id, cfg.model.base_model_id);
    assert_eq!(named.storage.lora_root, cfg.storage.lora_root);
}

#[test]
fn claas_containers_arguments_override_the_profile_and_the_environment() {
    // CLaaS's compose runs `local base_model_id=${MODEL} vllm_base_url=http://vllm:8000`.
    let cfg = load(
        Profile::Fleet,
        &[],
        |_| {
            (
                Some("local"),
                None,
                vec![
                    "base_model_id=Qwen/Qwen3-0.6B".into(),
                    "vllm_base_url=http://vllm:8000".into(),
                    "feedback_lock_timeout_s=45".into(),
                    "allowed_init_base_models=[Qwen/Qwen3-0.6B, Qwen/Qwen3-8B]".into(),
                    "server.port=9000".into(),
                ],
            )
        },
        &[
            ("CLAAS_BASE_MODEL_ID", "from/env"),
            ("CLAAS_API_PORT", "7000"),
        ],
    )
    .expect("loads");
    assert_eq!(cfg.model.base_model_id, "Qwen/Qwen3-0.6B");
    assert_eq!(cfg.worker.base_models, ["Qwen/Qwen3-0.6B"]);
    assert_eq!(cfg.vllm.base_url.as_deref(), Some("http://vllm:8000"));
    assert_eq!(cfg.queue.lock_timeout_s, 45.0);
    assert_eq!(
        cfg.model.allowed_init_base_models,
        ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-8B"]
    );
    assert_eq!(cfg.server.port, 9000);

    let err = load(
        Profile::Fleet,
        &[],
        |_| (None, None, vec!["no_such_setting=1".into()]),
        &[],
    )
    .expect_err("an unknown setting is refused");
    assert!(err.to_string().contains("no_such_setting"), "{err}");
}

#[test]
fn claas_modal_profile_stops_start_up_saying_what_to_run() {
    let err = load(
        Profile::Fleet,
        &[("modal.yaml", SEED_MODAL)],
        file("modal.yaml"),
        &[],
    )
    .expect_err("modal is refused");
    assert!(err.to_string().contains("claas worker"), "{err}");
    let err = load(Profile::Fleet, &[], |_| (Some("modal"), None, vec![]), &[])
        .expect_err("--config-name modal");
    assert!(err.to_string().contains("claas worker"), "{err}");
    let err = load(
        Profile::Fleet,
        &[],
        |_| (None, None, vec!["storage_backend=modal_volume".into()]),
        &[],
    )
    .expect_err("modal_volume");
    assert!(err.to_string().contains("local_fs"), "{err}");
}

#[test]
fn claas_tinker_profile_selects_tinker_with_its_model_key_and_state_file() {
    let cfg = load(
        Profile::Fleet,
        &[("tinker.yaml", SEED_TINKER)],
        file("tinker.yaml"),
        &[("TINKER_API_KEY", "tml-abc")],
    )
    .expect("CLaaS's tinker profile loads");
    assert_eq!(cfg.mode, Mode::Tinker);
    assert_eq!(cfg.tinker.base_model, "Qwen/Qwen3-30B-A3B");
    assert_eq!(cfg.tinker.api_key.as_deref(), Some("tml-abc"));
    assert_eq!(
        cfg.tinker.state_path.as_deref(),
        Some(Path::new("/data/tinker_state.json"))
    );
    // LoRAs are made on, and workers train, the one model Tinker serves.
    assert_eq!(cfg.model.base_model_id, "Qwen/Qwen3-30B-A3B");
    assert_eq!(cfg.model.allowed_init_base_models, ["Qwen/Qwen3-30B-A3B"]);
    assert_eq!(cfg.worker.base_models, ["Qwen/Qwen3-30B-A3B"]);
    let cfg = load(
        Profile::Fleet,
        &[],
        |_| {
            (
                Some("tinker"),
                None,
                vec!["storage_backend=tinker_json".into()],
            )
        },
        &[
            ("CLAAS_TINKER_API_KEY", "tml-claas"),
            ("TINKER_BASE_URL", "http://127.0.0.1:9"),
        ],
    )
    .expect("--config-name tinker with tinker_json");
    assert_eq!(cfg.mode, Mode::Tinker);
    assert_eq!(cfg.tinker.api_key.as_deref(), Some("tml-claas"));
    assert_eq!(cfg.tinker.base_url.as_deref(), Some("http://127.0.0.1:9"));
    assert!(
        cfg.ignored.iter().any(|i| i.starts_with("storage_backend")),
        "{:?}",
        cfg.ignored
    );
}

#[test]
fn claas_distill_execution_mode_is_read_as_mode() {
    load(
        Profile::Fleet,
        &[],
        |_| (None, None, vec![]),
        &[("CLAAS_DISTILL_EXECUTION_MODE", "local")],
    )
    .expect("local is this build's mode");
    let cfg = load(
        Profile::Fleet,
        &[],
        |_| (None, None, vec![]),
        &[("CLAAS_DISTILL_EXECUTION_MODE", "Tinker")],
    )
    .expect("tinker");
    assert_eq!(cfg.mode, Mode::Tinker);
    let err = load(
        Profile::Fleet,
        &[],
        |_| (None, None, vec![]),
        &[("CLAAS_DISTILL_EXECUTION_MODE", "modal")],
    )
    .expect_err("modal");
    assert!(
        err.to_string().contains("CLAAS_DISTILL_EXECUTION_MODE"),
        "{err}"
    );
}
