//! The offline trainer commands as operators run them: `claas distill` replays the
//! fixture's two steps (resuming the optimizer state it wrote), builds teacher prompts from
//! text when the ids are absent, and `claas model random` writes a loadable checkpoint.

use std::path::{Path, PathBuf};
use std::process::Command;

use claas_testutil::tempdir;
use serde_json::Value;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/distill_step")
        .join(rel)
}

fn claas(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_claas"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run claas");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn close(metrics: &Value, expected: &Path) {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(expected).expect("expected")).expect("json");
    for (k, w) in want.as_object().expect("object") {
        let (g, w) = (
            metrics[k].as_f64().expect("metric"),
            w.as_f64().expect("value"),
        );
        assert!((g - w).abs() <= 1e-4 * w.abs() + 1e-7, "{k}: {g} vs {w}");
    }
}

#[test]
fn distill_replays_both_fixture_steps() {
    let (one, two) = (tempdir("step1"), tempdir("step2"));
    let model = fixture("base_model");
    let (ok, out, err) = claas(&[
        "distill",
        "--model",
        model.to_str().expect("utf8"),
        "--adapter",
        fixture("adapter_init").to_str().expect("utf8"),
        "--input",
        fixture("step1/input.json").to_str().expect("utf8"),
        "--out",
        one.to_str().expect("utf8"),
    ]);
    assert!(ok, "{err}");
    let m1: Value = serde_json::from_str(out.trim()).expect("one JSON object on stdout");
    close(&m1, &fixture("step1/expected_metrics.json"));
    assert!(one.join("optimizer_state.safetensors").is_file());
    let (ok, out, err) = claas(&[
        "distill",
        "--model",
        model.to_str().expect("utf8"),
        "--adapter",
        one.to_str().expect("utf8"),
        "--input",
        fixture("step2/input.json").to_str().expect("utf8"),
        "--out",
        two.to_str().expect("utf8"),
    ]);
    assert!(ok, "{err}");
    let m2: Value = serde_json::from_str(out.trim()).expect("json");
    close(&m2, &fixture("step2/expected_metrics.json"));
}

#[test]
fn distill_builds_the_teacher_prompt_when_ids_are_absent() {
    let model = tempdir("model");
    let (ok, _, err) = claas(&[
        "model",
        "random",
        "--preset",
        "tiny",
        "--out",
        model.to_str().expect("utf8"),
    ]);
    assert!(ok, "{err}");
    let adapter_dir = tempdir("adapter");
    // An adapter for the tiny model, from the library the init route uses.
    let cfg = claas_trainer_config(&model);
    let adapter = claas_trainer::LoraAdapter::init(
        &cfg,
        claas_trainer::AdapterConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            use_rslora: false,
            base_model_name_or_path: None,
        },
        1,
    )
    .expect("adapter");
    adapter.save(&adapter_dir).expect("save");
    let inputs = tempdir("input");
    let input = inputs.join("input.json");
    std::fs::write(
        &input,
        serde_json::json!({
            "samples": [{
                "prompt_token_ids": [257, 117, 115, 101, 114, 10, 72, 105, 258, 10, 257],
                "response_token_ids": [72, 101, 108, 108, 111],
                "response_logprobs": [-3.0, -3.0, -3.0, -3.0, -3.0],
                "system_prompt": "You are terse.",
                "user_prompt": "Hi",
                "feedback": "shorter"
            }],
            "training": {"learning_rate": 1e-3, "alpha": 0.5, "is_clip": 5.0,
                         "max_grad_norm": 1.0, "kl_reg_weight": 0.0, "teacher_top_k": 20}
        })
        .to_string(),
    )
    .expect("input");
    let out_dir = tempdir("out");
    let (ok, out, err) = claas(&[
        "distill",
        "--model",
        model.to_str().expect("utf8"),
        "--adapter",
        adapter_dir.to_str().expect("utf8"),
        "--input",
        input.to_str().expect("utf8"),
        "--out",
        out_dir.to_str().expect("utf8"),
    ]);
    assert!(ok, "{err}");
    let m: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(m["tokens_processed"], 5);
    assert!(m["total_loss"].as_f64().expect("loss").is_finite());
}

#[test]
fn bad_input_fails_with_a_message_not_a_panic() {
    let out_dir = tempdir("bad");
    let inputs = tempdir("bad-input");
    let input = inputs.join("input.json");
    std::fs::write(
        &input,
        r#"{"samples": [{"prompt_token_ids": [1, 2], "response_token_ids": [3, 999],
            "response_logprobs": [-1.0, -1.0], "teacher_prompt_token_ids": [1]}],
            "training": {"learning_rate": 1e-3, "alpha": 0.5, "is_clip": 5.0,
                         "max_grad_norm": 1.0, "kl_reg_weight": 0.0, "teacher_top_k": 5}}"#,
    )
    .expect("input");
    let (ok, _, err) = claas(&[
        "distill",
        "--model",
        fixture("base_model").to_str().expect("utf8"),
        "--adapter",
        fixture("adapter_init").to_str().expect("utf8"),
        "--input",
        input.to_str().expect("utf8"),
        "--out",
        out_dir.to_str().expect("utf8"),
    ]);
    assert!(!ok);
    assert!(
        err.contains("token id 999 is outside the vocabulary"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn claas_trainer_config(dir: &Path) -> claas_trainer::Qwen3Config {
    claas_trainer::Qwen3Config::from_dir(dir).expect("config")
}
