//! `claas eval`'s configuration: CLaaS's `EvalConfig` fields and defaults, read from
//! `configs/eval.yaml` and overridden on the command line Hydra-style
//! (`num_steps=2 preferences=[no_emoji] training.learning_rate=1e-4`). An unknown key is an
//! error naming it; `mode` is `local` or `tinker` (the API at `claas_url` runs one or the
//! other; CLaaS's `modal` is a backend this project does not have).

use std::path::Path;

use claas_core::types::TrainingConfig;
use figment::providers::{Format, Serialized, Yaml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Every metric, in CLaaS's order; also what the preset `all` means.
pub const ALL_METRICS: [&str; 4] = ["logprob", "compliance", "general", "collapse"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// `local` or `tinker`: what the API at `claas_url` runs (with `tinker`, the answers
    /// given feedback are sampled at temperature 0.7, as CLaaS's eval does); `modal` is
    /// refused.
    pub mode: String,
    pub claas_url: String,
    /// Base model of the LoRAs the eval creates; none: the API's configured base model.
    pub base_model: Option<String>,
    /// Preference names (files `configs/preferences/<name>.yaml`).
    pub preferences: Vec<String>,
    /// Metric names, or the presets `all` and `quick`.
    pub metrics: Vec<String>,
    /// Steps the collapse metric runs at; none: `[0, 5, 10, 15, 19]`.
    pub collapse_steps: Option<Vec<u32>>,
    pub plots: bool,
    pub num_steps: u32,
    /// Probe prompts answered (and fed back) per step.
    pub batch_size: u32,
    /// Feedback requests per step (each one training step on the same samples).
    pub steps_per_batch: u32,
    /// The feedback string is repeated this many times per sample.
    pub feedback_repetitions: u32,
    pub seed: u64,
    pub lora_id_prefix: String,
    /// Where runs are written; `${now:FORMAT}` expands to the start time (UTC, strftime).
    pub output_dir: String,
    /// Generate through an OpenClaw gateway (bearer `OPENCLAW_GATEWAY_TOKEN`) instead of
    /// the CLaaS proxy.
    pub openclaw_url: Option<String>,
    /// Longest answer generated per request (CLaaS: 2048, fixed).
    pub max_tokens: u32,
    pub training: TrainingConfig,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            mode: "local".into(),
            claas_url: "http://localhost:8080".into(),
            base_model: None,
            preferences: vec!["no_emoji".into(), "concise".into(), "identity".into()],
            metrics: ALL_METRICS.iter().map(|m| m.to_string()).collect(),
            collapse_steps: Some(vec![0, 5, 10, 15, 19]),
            plots: true,
            num_steps: 20,
            batch_size: 4,
            steps_per_batch: 4,
            feedback_repetitions: 1,
            seed: 42,
            lora_id_prefix: "eval".into(),
            output_dir: "./data/evals/${now:%Y%m%d-%H%M%SZ}".into(),
            openclaw_url: None,
            max_tokens: 2048,
            training: TrainingConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(m: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(m.into())
}

impl EvalConfig {
    /// The defaults, then `file` (when given), then each `key=value` override (the value is
    /// YAML: `2`, `[a, b]`, `null`; a dotted key sets a nested field).
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<EvalConfig, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(EvalConfig::default()));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(invalid(format!("eval config {} not found", f.display())));
            }
            fig = fig.merge(Yaml::file(f));
        }
        for o in overrides {
            let (key, raw) = o.split_once('=').ok_or_else(|| {
                invalid(format!(
                    "override '{o}': expected key=value (e.g. num_steps=2)"
                ))
            })?;
            let key = key.trim();
            if key.is_empty() || key.split('.').any(str::is_empty) {
                return Err(invalid(format!("override '{o}': empty key")));
            }
            let value: serde_yaml::Value = serde_yaml::from_str(raw)
                .map_err(|e| invalid(format!("override '{o}': the value is not YAML: {e}")))?;
            fig = fig.merge(Serialized::default(key, value));
        }
        check_training_keys(&fig)?;
        let cfg: EvalConfig = fig.extract().map_err(|e| invalid(describe(&e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match self.mode.as_str() {
            "local" | "tinker" => {}
            "modal" => {
                return Err(invalid(
                    "mode: 'modal' is CLaaS's Modal backend, which claas-rs does not have; use \
                     mode=local (or tinker) against a running claas (claas dev, or claas api \
                     with workers)",
                ))
            }
            other => {
                return Err(invalid(format!(
                    "mode: '{other}' is not a mode (accepted: local, tinker)"
                )))
            }
        }
        for (name, v) in [
            ("num_steps", self.num_steps),
            ("batch_size", self.batch_size),
            ("steps_per_batch", self.steps_per_batch),
            ("feedback_repetitions", self.feedback_repetitions),
            ("max_tokens", self.max_tokens),
        ] {
            if v == 0 {
                return Err(invalid(format!("{name}: must be at least 1")));
            }
        }
        if self.preferences.is_empty() {
            return Err(invalid("preferences: name at least one"));
        }
        let bad = self.training.violations();
        if !bad.is_empty() {
            return Err(invalid(format!("training: {}", bad.join("; "))));
        }
        Ok(())
    }

    /// The metrics to run: presets expanded (`all`, `quick` = logprob), duplicates removed,
    /// in the order given. Unknown names are returned apart, to be reported.
    pub fn metric_names(&self) -> (Vec<&'static str>, Vec<String>) {
        let mut known: Vec<&'static str> = Vec::new();
        let mut unknown = Vec::new();
        for m in &self.metrics {
            let names: Vec<&'static str> = match m.as_str() {
                "all" => ALL_METRICS.to_vec(),
                "quick" => vec!["logprob"],
                other => match ALL_METRICS.iter().find(|k| **k == other) {
                    Some(k) => vec![*k],
                    None => {
                        unknown.push(other.to_owned());
                        vec![]
                    }
                },
            };
            for n in names {
                if !known.contains(&n) {
                    known.push(n);
                }
            }
        }
        (known, unknown)
    }

    /// `output_dir` with `${now:FORMAT}` expanded at `now`.
    pub fn output_dir_at(&self, now: chrono::DateTime<chrono::Utc>) -> String {
        let mut out = self.output_dir.clone();
        while let Some(start) = out.find("${now:") {
            let Some(len) = out[start..].find('}') else {
                break;
            };
            let fmt = &out[start + 6..start + len];
            let stamp = now.format(fmt).to_string();
            out.replace_range(start..start + len + 1, &stamp);
        }
        out
    }
}

/// The eval's `training` keys are checked strictly: the API ignores unknown training fields
/// (as CLaaS does, for clients newer than it), but a typo on this command line is the user's
/// own and should say so.
fn check_training_keys(fig: &Figment) -> Result<(), ConfigError> {
    let Ok(figment::value::Value::Dict(_, given)) = fig.find_value("training") else {
        return Ok(());
    };
    let known = serde_json::to_value(TrainingConfig::default()).unwrap_or_default();
    match given.keys().find(|k| known.get(k.as_str()).is_none()) {
        Some(k) => Err(invalid(format!(
            "unknown key 'training.{k}' (see configs/eval.yaml for every key)"
        ))),
        None => Ok(()),
    }
}

/// A figment error as one line that names the key.
fn describe(e: &figment::Error) -> String {
    let key = e.path.join(".");
    let what = match &e.kind {
        // The path already ends with the unknown field.
        figment::error::Kind::UnknownField(field, _) => {
            let at = if key.is_empty() { field } else { &key };
            return format!("unknown key '{at}' (see configs/eval.yaml for every key)");
        }
        kind => kind.to_string(),
    };
    if key.is_empty() {
        what
    } else {
        format!("{key}: {what}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(overrides: &[&str]) -> Result<EvalConfig, ConfigError> {
        let o: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        EvalConfig::load(None, &o)
    }

    #[test]
    fn overrides_set_scalars_lists_and_nested_fields() {
        let c = load(&[
            "num_steps=2",
            "preferences=[no_emoji]",
            "training.learning_rate=1e-4",
            "openclaw_url=null",
            "base_model=tiny",
        ])
        .expect("valid");
        assert_eq!(c.num_steps, 2);
        assert_eq!(c.preferences, ["no_emoji"]);
        assert_eq!(c.training.learning_rate, 1e-4);
        assert_eq!(
            c.training.alpha, 0.5,
            "the other training fields keep their defaults"
        );
        assert_eq!(c.base_model.as_deref(), Some("tiny"));
        assert_eq!(c.batch_size, 4);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_that_name_the_key() {
        let e = load(&["num_stepz=2"]).expect_err("unknown");
        assert_eq!(
            e.to_string(),
            "unknown key 'num_stepz' (see configs/eval.yaml for every key)"
        );
        let e = load(&["training.lr=1"]).expect_err("unknown nested");
        assert!(e.to_string().contains("'training.lr'"), "{e}");
        let e = load(&["num_steps=many"]).expect_err("type");
        assert!(e.to_string().starts_with("num_steps: "), "{e}");
        let e = load(&["training=5"]).expect_err("scalar for a section");
        assert!(e.to_string().starts_with("training: "), "{e}");
        let e = load(&["num_steps"]).expect_err("no =");
        assert!(e.to_string().contains("expected key=value"), "{e}");
        let e = load(&["num_steps=0"]).expect_err("zero");
        assert_eq!(e.to_string(), "num_steps: must be at least 1");
        let e = load(&["training.alpha=7"]).expect_err("range");
        assert!(e.to_string().starts_with("training: "), "{e}");
    }

    #[test]
    fn local_and_tinker_run_and_modal_is_refused() {
        assert!(load(&["mode=local"]).is_ok());
        assert!(load(&["mode=tinker"]).is_ok());
        let e = load(&["mode=modal"]).expect_err("refused");
        assert!(e.to_string().contains("does not have"), "{e}");
        assert!(load(&["mode=cloud"]).is_err());
    }

    #[test]
    fn metric_presets_expand_without_duplicates() {
        let mut c = EvalConfig {
            metrics: vec![
                "quick".into(),
                "compliance".into(),
                "logprob".into(),
                "bogus".into(),
            ],
            ..EvalConfig::default()
        };
        assert_eq!(
            c.metric_names(),
            (vec!["logprob", "compliance"], vec!["bogus".to_string()])
        );
        c.metrics = vec!["all".into()];
        assert_eq!(c.metric_names().0, ALL_METRICS);
    }

    #[test]
    fn output_dir_expands_the_start_time() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-02T10:30:05Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(
            EvalConfig::default().output_dir_at(now),
            "./data/evals/20261202-103005Z"
        );
    }

    #[test]
    fn the_shipped_config_is_the_default() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/eval.yaml");
        let c = EvalConfig::load(Some(&file), &[]).expect("configs/eval.yaml loads");
        assert_eq!(c, EvalConfig::default());
    }
}
