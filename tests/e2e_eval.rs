//! `claas eval` against `claas dev` on the tiny model, through the real binaries:
//! `claas eval num_steps=2 preferences=[no_emoji]` writes CLaaS's outputs (metadata,
//! baseline, one line per step with the training step's metrics and every eval metric,
//! summary, the five plots as PNGs that decode), and a second run with more steps
//! resumes from `steps.jsonl` on the same LoRA.

mod common;

use std::process::Command;

use common::start_dev;
use serde_json::Value;

fn read(path: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn steps(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("steps.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn eval(base: &str, out: &std::path::Path, extra: &[&str]) {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = Command::new(env!("CARGO_BIN_EXE_claas"))
        .current_dir(root)
        .arg("eval")
        .args([
            &format!("claas_url={base}"),
            &format!("output_dir={}", out.display()),
            "preferences=[no_emoji]",
            "max_tokens=24",
            "batch_size=2",
            "steps_per_batch=1",
            "collapse_steps=[0, 1]",
        ])
        .args(extra)
        .output()
        .expect("claas eval runs");
    assert!(
        output.status.success(),
        "claas eval failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claas_eval_runs_against_claas_dev_and_resumes() {
    let (_dev, base, dir) = start_dev("eval").await;
    // Where claas dev's GET /v1/eval looks: <data_dir>/evals.
    let out = dir.join("evals").join("run-1");
    tokio::task::spawn_blocking({
        let (base, out) = (base.clone(), out.clone());
        move || eval(&base, &out, &["num_steps=2"])
    })
    .await
    .expect("join");

    let pref = out.join("no_emoji");
    let meta = read(&pref.join("metadata.json"));
    assert_eq!(meta["lora_id"], "eval/no_emoji");
    assert_eq!(meta["preference"], "no_emoji");
    assert_eq!(meta["config"]["num_steps"], 2);
    let baseline = read(&pref.join("baseline.json"));
    let margin = &baseline["logprob_margin"];
    assert!(margin["margin"].is_f64(), "{baseline}");
    assert_eq!(margin["margin_delta_from_baseline"], 0.0);
    assert!(baseline["preference_compliance"].is_f64());
    assert!(baseline["general"]["ifeval_pass_rate"].is_f64());
    assert!(
        baseline["collapse"]["mean_entropy"]
            .as_f64()
            .is_some_and(|e| e > 0.0),
        "{baseline}"
    );

    let lines = steps(&pref.join("steps.jsonl"));
    assert_eq!(lines.len(), 2);
    for (i, s) in lines.iter().enumerate() {
        assert_eq!(s["step"], i as u64);
        assert_eq!(
            s["feedback_given"],
            "Don't use any emojis in your responses"
        );
        assert!(
            s["sdpo_metrics"]["total_loss"].is_f64(),
            "the step trained: {s}"
        );
        assert_eq!(s["sub_step_count"], 1);
        assert!(s["eval"]["logprob_margin"]["margin"].is_f64());
        assert!(
            s["eval"]["collapse"]["self_rouge_l"].is_f64(),
            "collapse at steps 0 and 1"
        );
    }
    for plot in [
        "logprob_margins.png",
        "learning_curves.png",
        "collapse_dashboard.png",
        "forgetting.png",
        "sdpo_diagnostics.png",
    ] {
        let img = image::open(out.join("plots").join(plot))
            .unwrap_or_else(|e| panic!("{plot} is a PNG that decodes: {e}"));
        assert!(img.width() >= 640, "{plot}");
    }
    let summary = read(&out.join("summary.json"));
    let page = reqwest::get(format!("{base}/v1/eval"))
        .await
        .expect("eval page")
        .text()
        .await
        .expect("html");
    assert!(
        page.contains("run-1") && page.contains("eval&#x2f;no_emoji"),
        "{page}"
    );
    let plot = reqwest::get(format!("{base}/v1/eval/run-1/plots/learning_curves.png"))
        .await
        .expect("plot");
    assert_eq!(plot.headers()["content-type"], "image/png");
    let png = plot.bytes().await.expect("bytes");
    image::load_from_memory(&png).expect("the served plot decodes");
    for bad in [
        "run-1/plots/steps.jsonl",
        "..%2Fevals/plots/forgetting.png",
        "nope/plots/forgetting.png",
    ] {
        let r = reqwest::get(format!("{base}/v1/eval/{bad}"))
            .await
            .expect("get");
        assert_eq!(r.status(), 404, "{bad}");
    }
    assert_eq!(summary["no_emoji"]["lora_id"], "eval/no_emoji");
    assert!(summary["no_emoji"]["logprob_margin_delta"].is_f64());
    let versions: Value = reqwest::get(format!("{base}/v1/lora/eval/no_emoji/versions"))
        .await
        .expect("versions")
        .json()
        .await
        .expect("json");
    assert_eq!(
        versions["current_version"], 2,
        "one training step per eval step"
    );

    // Resume: a third step on the same LoRA, the first two kept.
    tokio::task::spawn_blocking({
        let (base, out) = (base.clone(), out.clone());
        move || eval(&base, &out, &["num_steps=3"])
    })
    .await
    .expect("join");
    let lines = steps(&pref.join("steps.jsonl"));
    assert_eq!(
        lines.iter().map(|s| s["step"].as_u64()).collect::<Vec<_>>(),
        [Some(0), Some(1), Some(2)]
    );
    assert_eq!(
        read(&pref.join("baseline.json")),
        baseline,
        "the baseline is not measured again"
    );
    let versions: Value = reqwest::get(format!("{base}/v1/lora/eval/no_emoji/versions"))
        .await
        .expect("versions")
        .json()
        .await
        .expect("json");
    assert_eq!(versions["current_version"], 3);
}
