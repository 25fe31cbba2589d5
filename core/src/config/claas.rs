//! CLaaS's own configuration, read unchanged: the flat Hydra YAML of its `local`, `tinker`
//! and `modal` profiles (`mode: local`, `vllm_base_url: …`), Hydra-style `key=value`
//! arguments, and `CLAAS_DISTILL_EXECUTION_MODE`. Each CLaaS key is translated into the
//! field of this configuration that means the same; keys of this configuration pass through
//! as they are, so one file may mix both.

use figment::providers::{Format, Yaml};
use figment::value::{Dict, Value};
use figment::Figment;

use crate::error::{Error, Result};

/// CLaaS's flat key → the field here that means the same.
const FLAT: &[(&str, &str)] = &[
    ("feedback_log_dir", "telemetry.feedback_log_dir"),
    ("lora_root", "storage.lora_root"),
    ("allowed_init_base_models", "model.allowed_init_base_models"),
    ("vllm_base_url", "vllm.base_url"),
    ("feedback_lock_timeout_s", "queue.lock_timeout_s"),
    (
        "feedback_wake_on_failure",
        "worker.feedback_wake_on_failure",
    ),
    (
        "feedback_min_free_vram_gb",
        "worker.feedback_min_free_vram_gb",
    ),
    (
        "feedback_sleep_verify_timeout_s",
        "worker.feedback_sleep_verify_timeout_s",
    ),
    (
        "feedback_drain_timeout_s",
        "worker.feedback_drain_timeout_s",
    ),
    ("base_model_id", "model.base_model_id"),
    ("completion_cache_size", "cache.completion_cache_size"),
    ("tinker_base_model", "tinker.base_model"),
    ("tinker_state_path", "tinker.state_path"),
];

/// CLaaS keys that mean nothing here: accepted, each reported once with the reason.
const IGNORED: &[(&str, &str)] = &[
    (
        "defaults",
        "Hydra's schema list; every field is checked here without it",
    ),
    (
        "attn_implementation",
        "the candle trainer has one attention implementation",
    ),
    (
        "hf_secret_name",
        "a Modal secret's name; Modal is not a backend here",
    ),
];

/// CLaaS's profiles, built in for `--config-name`: the same keys and values as CLaaS's
/// `claas/core/configs/{local,tinker,modal}.yaml`.
pub const PROFILES: &[(&str, &str)] = &[
    ("local", include_str!("../../../configs/claas/local.yaml")),
    ("tinker", include_str!("../../../configs/claas/tinker.yaml")),
    ("modal", include_str!("../../../configs/claas/modal.yaml")),
];

/// The built-in CLaaS profile `name` (case-insensitive, as CLaaS reads it).
pub fn profile(name: &str) -> Result<&'static str> {
    PROFILES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, text)| *text)
        .ok_or_else(|| {
            Error::Config(format!(
                "--config-name {name}: no such profile (built in: local, tinker, modal); \
                 use --config FILE for a file of your own"
            ))
        })
}

/// The mode CLaaS's `mode` names, refusing the ones this build cannot run and saying what
/// to run instead.
pub fn check_mode(mode: &str, origin: &str) -> Result<&'static str> {
    match mode.trim().to_ascii_lowercase().as_str() {
        "local" => Ok("local"),
        "tinker" => Ok("tinker"),
        "modal" => Err(Error::Config(format!(
            "{origin}: mode modal (CLaaS's Modal backend) does not exist in claas-rs: run \
             `claas worker` on the GPU node instead, a fleet worker that claims jobs from the \
             same queue (README \"Coming from CLaaS\")"
        ))),
        other => Err(Error::Config(format!(
            "{origin}: unknown mode '{other}' (CLaaS's modes: local, tinker, modal)"
        ))),
    }
}

/// One configuration source after translation: this configuration's fields, nested, and
/// the CLaaS keys that were accepted but mean nothing here.
#[derive(Debug, Default)]
pub struct Translated {
    pub dict: Dict,
    pub ignored: Vec<(String, &'static str)>,
}

/// Translates one source's top-level keys. `origin` names the source in errors.
pub fn translate(input: Dict, origin: &str) -> Result<Translated> {
    let mut out = Translated::default();
    for (key, value) in input {
        if key == "mode" {
            let mode = check_mode(&scalar(&value, origin, &key)?, origin)?;
            set(&mut out.dict, "mode", Value::from(mode));
        } else if key == "storage_backend" {
            let backend = match scalar(&value, origin, &key)?.as_str() {
                "local_fs" | "local" => "local",
                "s3" => "s3",
                "modal_volume" => {
                    return Err(Error::Config(format!(
                        "{origin}: storage_backend modal_volume is Modal's; use local_fs (a \
                         directory every node mounts) or s3 (storage.backend, storage.url)"
                    )))
                }
                "tinker_json" => {
                    // Versions are Tinker checkpoints recorded in the database; local files
                    // hold nothing but the feedback log.
                    out.ignored.push((
                        key,
                        "with mode: tinker, versions are Tinker checkpoints recorded in \
                         the database, not a JSON file (`claas tinker import` reads one)",
                    ));
                    continue;
                }
                other => {
                    return Err(Error::Config(format!(
                        "{origin}: storage_backend '{other}' is not known (accepted: local_fs, s3, \
                         tinker_json)"
                    )))
                }
            };
            set(&mut out.dict, "storage.backend", Value::from(backend));
        } else if let Some((_, field)) = FLAT.iter().find(|(k, _)| *k == key) {
            set(&mut out.dict, field, value);
        } else if let Some((_, why)) = IGNORED.iter().find(|(k, _)| *k == key) {
            out.ignored.push((key, why));
        } else {
            // This configuration's own key (or an unknown one, which the typed config
            // refuses by name).
            set(&mut out.dict, &key, value);
        }
    }
    Ok(out)
}

/// Reads Hydra-style `key=value` arguments: `key` is CLaaS's flat name or a field here
/// (`server.port=9000`); `value` is read as YAML (`8080`, `true`, `[a, b]`, text).
pub fn overrides(args: &[String]) -> Result<Translated> {
    let mut flat = Dict::new();
    for arg in args {
        let (key, raw) = arg
            .trim_start_matches('+')
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| {
                Error::Config(format!(
                    "'{arg}' is not a key=value setting (for example base_model_id=Qwen/Qwen3-8B)"
                ))
            })?;
        let value = Figment::from(Yaml::string(&format!("v: {raw}")))
            .extract_inner::<Value>("v")
            .unwrap_or_else(|_| Value::from(raw.to_string()));
        let key = key.trim().to_string();
        if key.contains('.') {
            // A nested field: translated keys are all top-level, so it passes through.
            let mut nested = Dict::new();
            set(&mut nested, &key, value);
            merge(&mut flat, nested);
        } else {
            flat.insert(key, value);
        }
    }
    translate(flat, "command-line setting")
}

/// The value as text, for the keys whose value selects something.
fn scalar(value: &Value, origin: &str, key: &str) -> Result<String> {
    value
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Config(format!("{origin}: {key} must be a string")))
}

/// Sets `path` (dot-separated) in `dict`, creating the tables on the way and merging with
/// what is there.
fn set(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => match (dict.get_mut(path), value) {
            (Some(Value::Dict(_, have)), Value::Dict(_, add)) => merge(have, add),
            (_, value) => {
                dict.insert(path.to_string(), value);
            }
        },
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_string())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                set(inner, rest, value);
            }
        }
    }
}

fn merge(into: &mut Dict, from: Dict) {
    for (k, v) in from {
        set(into, &k, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claas_keys_become_fields_and_ours_pass_through() {
        let mut d = Dict::new();
        d.insert("vllm_base_url".into(), Value::from("http://vllm:8000"));
        d.insert("storage_backend".into(), Value::from("local_fs"));
        d.insert("attn_implementation".into(), Value::from("sdpa"));
        let mut server = Dict::new();
        server.insert("port".into(), Value::from(9000));
        d.insert("server".into(), Value::from(server));
        let t = translate(d, "test").expect("translates");
        let vllm = t.dict.get("vllm").and_then(Value::as_dict).expect("vllm");
        assert_eq!(
            vllm.get("base_url").and_then(Value::as_str),
            Some("http://vllm:8000")
        );
        let storage = t.dict.get("storage").and_then(Value::as_dict).expect("st");
        assert_eq!(
            storage.get("backend").and_then(Value::as_str),
            Some("local")
        );
        assert!(t.dict.contains_key("server"));
        assert_eq!(t.ignored.len(), 1);
    }

    #[test]
    fn an_override_that_is_not_key_value_is_refused() {
        for bad in ["base_model_id", "=x", ""] {
            let err = overrides(&[bad.to_string()]).expect_err(bad);
            assert!(err.to_string().contains("key=value"), "{err}");
        }
    }
}
