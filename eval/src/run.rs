//! The run loop, as CLaaS's eval runs it: per preference, init its LoRA (or resume from
//! `steps.jsonl`), measure a baseline, then for each step generate answers to the probe
//! prompts, send them back with the preference's feedback `steps_per_batch` times (each a
//! training step), and measure again. Writes `<out>/<preference>/{metadata.json,
//! baseline.json, steps.jsonl}`, `<out>/summary.json` and, with `plots`, `<out>/plots/*.png`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::client::{Answer, Client};
use crate::config::EvalConfig;
use crate::preferences::{Message, Preference};
use crate::text::{self, CodeVerdict, Sandbox};

/// Answer used when generation failed for every probe of a step (CLaaS's fallback).
const FALLBACK_RESPONSE: &str = "I'd be happy to help you with that.";
const COLLAPSE_PROBE: &str = "Tell me something interesting about the ocean.";
const CODING_PROBE: &str = "Write a Python function called `fibonacci` that takes an integer n and returns the nth Fibonacci number. Use iterative approach, not recursive. Include a docstring.";
const IFEVAL_SENTENCES: &str = "Write exactly 3 sentences about Python.";
const IFEVAL_LIST: &str = "List 5 benefits of exercise. Use numbered list.";
const IFEVAL_WORD: &str = "Explain recursion without using the word 'function'.";

pub use crate::results::{
    CollapseMetrics, EvalMetrics, GeneralCapability, LogprobMargin, PreferenceSummary, StepResult,
};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RunError(pub String);

fn io(path: &Path, e: impl std::fmt::Display) -> RunError {
    RunError(format!("{}: {e}", path.display()))
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<(), RunError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| io(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| io(path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, RunError> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    serde_json::from_str(&text).map_err(|e| io(path, e))
}

/// Progress of a run, for a progress bar or a log.
pub trait Progress {
    /// A preference starts; `done` of `total` steps already exist (resume).
    fn start(&self, preference: &str, done: u32, total: u32);
    /// A step finished.
    fn step(&self, result: &StepResult);
    fn finish(&self, preference: &str);
}

/// Runs every preference and writes `summary.json`; returns the summary.
pub async fn run(
    cfg: &EvalConfig,
    preferences: &[Preference],
    out: &Path,
    progress: &dyn Progress,
) -> Result<Vec<PreferenceSummary>, RunError> {
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let client = Client::new(cfg);
    let mut summary = Vec::new();
    for p in preferences {
        summary.push(run_preference(cfg, &client, p, &out.join(&p.name), progress).await?);
    }
    let by_name: serde_json::Map<String, Value> = summary
        .iter()
        .map(|s| (s.preference.clone(), json!(s)))
        .collect();
    write_json(&out.join("summary.json"), &by_name)?;
    if cfg.plots {
        let runs = preferences
            .iter()
            .map(|p| {
                Ok((
                    p.name.clone(),
                    read_steps(&out.join(&p.name).join("steps.jsonl"))?,
                ))
            })
            .collect::<Result<Vec<_>, RunError>>()?;
        if let Err(why) = crate::plots::draw_all(&out.join("plots"), &runs) {
            eprintln!("plots skipped: {why}");
        }
    }
    Ok(summary)
}

/// The steps already in `steps.jsonl`.
pub fn read_steps(path: &Path) -> Result<Vec<StepResult>, RunError> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| io(path, e)))
        .collect()
}

// Long: CLaaS's per-preference loop step for step (init or resume, baseline, steps).
async fn run_preference(
    cfg: &EvalConfig,
    client: &Client,
    pref: &Preference,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<PreferenceSummary, RunError> {
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let steps_file = dir.join("steps.jsonl");
    let mut steps = read_steps(&steps_file)?;
    let (lora_id, baseline) = if steps.is_empty() {
        let id = format!("{}/{}", cfg.lora_id_prefix, pref.name);
        let lora_id = client
            .init(&id, cfg.base_model.as_deref())
            .await
            .map_err(|e| RunError(e.0))?;
        write_json(
            &dir.join("metadata.json"),
            &json!({"config": cfg, "lora_id": lora_id, "preference": pref.name}),
        )?;
        let baseline = measure(cfg, client, pref, &lora_id, 0, None).await;
        write_json(&dir.join("baseline.json"), &baseline)?;
        (lora_id, baseline)
    } else {
        let meta: Value = read_json(&dir.join("metadata.json"))?;
        let lora_id = meta["lora_id"]
            .as_str()
            .ok_or_else(|| {
                RunError(format!(
                    "{}: no lora_id",
                    dir.join("metadata.json").display()
                ))
            })?
            .to_owned();
        (lora_id, read_json(&dir.join("baseline.json"))?)
    };
    let resume_from = steps.iter().map(|s| s.step + 1).max().unwrap_or(0);
    progress.start(&pref.name, resume_from, cfg.num_steps);
    let feedback = vec![pref.feedback_string.as_str(); cfg.feedback_repetitions as usize].join(" ");
    let probes = &pref.probe_prompts;
    // CLaaS samples the answers it gives feedback on at 0.7 on Tinker, greedily otherwise.
    let temperature = if cfg.mode == "tinker" { 0.7 } else { 0.0 };
    for step in resume_from..cfg.num_steps {
        let started = Instant::now();
        let mut items = Vec::new();
        let mut first_response = None;
        for i in 0..cfg.batch_size {
            let prompt = &probes[((step * cfg.batch_size + i) as usize) % probes.len()];
            match client
                .chat(&lora_id, prompt, temperature, cfg.max_tokens, 0)
                .await
            {
                Ok(a) => {
                    first_response.get_or_insert(a.text.clone());
                    items.push(
                        json!({"lora_id": lora_id, "prompt": prompt, "response": a.text,
                        "feedback": feedback, "training": cfg.training}),
                    );
                }
                Err(e) => eprintln!("{}: step {step}: generation failed: {e}", pref.name),
            }
        }
        let mut sdpo = Value::Null;
        let mut sub_steps = 0;
        if !items.is_empty() {
            for _ in 0..cfg.steps_per_batch {
                match client.feedback(&items).await {
                    Ok(m) => {
                        sdpo = m;
                        sub_steps += 1;
                    }
                    Err(e) => {
                        eprintln!("{}: step {step}: feedback failed: {e}", pref.name);
                        break;
                    }
                }
            }
        }
        let eval = measure(cfg, client, pref, &lora_id, step, Some(&baseline)).await;
        let result = StepResult {
            preference: pref.name.clone(),
            step,
            timestamp: chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            feedback_given: feedback.clone(),
            sdpo_metrics: sdpo,
            eval,
            prompt_used: probes[((step * cfg.batch_size) as usize) % probes.len()].clone(),
            response_text: Some(first_response.unwrap_or_else(|| FALLBACK_RESPONSE.into())),
            timing_s: started.elapsed().as_secs_f64(),
            sub_step_count: sub_steps.max(1),
        };
        let line = serde_json::to_string(&result).map_err(|e| io(&steps_file, e))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&steps_file)
            .map_err(|e| io(&steps_file, e))?;
        writeln!(f, "{line}").map_err(|e| io(&steps_file, e))?;
        progress.step(&result);
        steps.push(result);
    }
    progress.finish(&pref.name);
    let last = steps.last().map(|s| &s.eval);
    let general = |m: &EvalMetrics| m.general.as_ref().map(|g| g.general_score);
    Ok(PreferenceSummary {
        preference: pref.name.clone(),
        lora_id,
        logprob_margin_delta: last
            .and_then(|m| m.logprob_margin.as_ref())
            .map(|l| l.margin_delta_from_baseline),
        final_compliance: last.and_then(|m| m.preference_compliance),
        capability_ratio: last.and_then(general).map(|g| match general(&baseline) {
            Some(b) if b > 0.0 => g / b,
            _ => 1.0,
        }),
    })
}

/// Every enabled metric at `step` (collapse only at its steps); a failing metric is null.
async fn measure(
    cfg: &EvalConfig,
    client: &Client,
    pref: &Preference,
    lora_id: &str,
    step: u32,
    baseline: Option<&EvalMetrics>,
) -> EvalMetrics {
    let (metrics, _) = cfg.metric_names();
    let mut m = EvalMetrics::default();
    for name in metrics {
        match name {
            "logprob" => {
                m.logprob_margin = logprob_margin(client, pref, lora_id, baseline)
                    .await
                    .map_err(|e| eprintln!("{}: logprob metric failed: {e}", pref.name))
                    .ok()
            }
            "compliance" => m.preference_compliance = compliance(cfg, client, pref, lora_id).await,
            "general" => m.general = general(cfg, client, lora_id).await,
            "collapse" => {
                let at = cfg
                    .collapse_steps
                    .clone()
                    .unwrap_or_else(|| vec![0, 5, 10, 15, 19]);
                if at.contains(&step) {
                    m.collapse = collapse(cfg, client, lora_id, baseline).await;
                }
            }
            _ => {}
        }
    }
    m
}

async fn logprob_margin(
    client: &Client,
    pref: &Preference,
    lora_id: &str,
    baseline: Option<&EvalMetrics>,
) -> Result<LogprobMargin, crate::client::CallError> {
    let (mut pos, mut neg) = (0.0, 0.0);
    for pair in &pref.logprob_pairs {
        let mut messages: Vec<Message> = pair.prompt_messages.clone();
        if !messages.iter().any(|m| m.role == "system") {
            let with_system = client.messages("");
            messages.splice(0..0, with_system.into_iter().filter(|m| m.role == "system"));
        }
        pos += client
            .score(lora_id, &messages, &pair.positive_response)
            .await?;
        neg += client
            .score(lora_id, &messages, &pair.negative_response)
            .await?;
    }
    let n = pref.logprob_pairs.len().max(1) as f64;
    let (pos, neg) = (pos / n, neg / n);
    let margin = pos - neg;
    let base = baseline
        .and_then(|b| b.logprob_margin.as_ref())
        .map(|b| b.margin);
    Ok(LogprobMargin {
        positive_logprob: pos,
        negative_logprob: neg,
        margin,
        margin_delta_from_baseline: base.map_or(0.0, |b| margin - b),
    })
}

async fn compliance(
    cfg: &EvalConfig,
    client: &Client,
    pref: &Preference,
    lora_id: &str,
) -> Option<f64> {
    let mut scores = Vec::new();
    for prompt in pref.probe_prompts.iter().take(3) {
        match client.chat(lora_id, prompt, 0.0, cfg.max_tokens, 0).await {
            Ok(a) => scores.push(pref.verifier.check(&a.text).score),
            Err(e) => eprintln!("{}: compliance probe failed: {e}", pref.name),
        }
    }
    (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64)
}

/// One IFEval-style check of an answer's text.
type TextCheck = fn(&str) -> bool;

async fn general(cfg: &EvalConfig, client: &Client, lora_id: &str) -> Option<GeneralCapability> {
    let answer = |p: &'static str| client.chat(lora_id, p, 0.0, cfg.max_tokens, 0);
    let coding = answer(CODING_PROBE).await.ok()?;
    let code_text = claas_core::thinking::strip_thinking(&coding.text);
    let code = text::extract_code(&code_text);
    let verdict = match &code {
        Some(c) => {
            let c = c.clone();
            tokio::task::spawn_blocking(move || {
                text::check_fibonacci("python3", &c, Sandbox::default())
            })
            .await
            .unwrap_or_else(|e| CodeVerdict::Unavailable(e.to_string()))
        }
        None => CodeVerdict::Incorrect("no code in the answer".into()),
    };
    let mut passes = 0;
    let checks: [(&'static str, TextCheck); 3] = [
        (IFEVAL_SENTENCES, text::has_exactly_three_sentences),
        (IFEVAL_LIST, |t| text::numbered_items(t) >= 5),
        (IFEVAL_WORD, |t| text::avoids_word(t, "function")),
    ];
    for (prompt, check) in checks {
        if let Ok(a) = answer(prompt).await {
            if check(&claas_core::thinking::strip_thinking(&a.text)) {
                passes += 1;
            }
        }
    }
    let ifeval = passes as f64 / 3.0;
    let coding_correct = match verdict {
        CodeVerdict::Correct => Some(true),
        CodeVerdict::Incorrect(_) => Some(false),
        CodeVerdict::Unavailable(why) => {
            eprintln!("coding probe unavailable: {why}");
            None
        }
    };
    Some(GeneralCapability {
        coding_correct,
        coding_has_docstring: code.as_deref().is_some_and(text::has_docstring),
        ifeval_pass_rate: ifeval,
        general_score: match coding_correct {
            Some(c) => 0.5 * f64::from(u8::from(c)) + 0.5 * ifeval,
            None => ifeval,
        },
    })
}

async fn collapse(
    cfg: &EvalConfig,
    client: &Client,
    lora_id: &str,
    baseline: Option<&EvalMetrics>,
) -> Option<CollapseMetrics> {
    let probe: Answer = client
        .chat(lora_id, COLLAPSE_PROBE, 0.0, cfg.max_tokens, 20)
        .await
        .ok()?;
    let (mean_entropy, mean_logprob) = if probe.logprobs.is_empty() {
        (0.0, 0.0)
    } else {
        let tops: Vec<Vec<f64>> = probe.logprobs.iter().map(|(_, t)| t.clone()).collect();
        let chosen: f64 = probe.logprobs.iter().map(|(l, _)| l).sum();
        (
            text::mean_entropy(&tops),
            chosen / probe.logprobs.len() as f64,
        )
    };
    let mut samples = Vec::new();
    for _ in 0..3 {
        if let Ok(a) = client
            .chat(lora_id, COLLAPSE_PROBE, 0.7, cfg.max_tokens, 0)
            .await
        {
            samples.push(claas_core::thinking::strip_thinking(&a.text));
        }
    }
    let self_rouge_l = text::self_rouge_l(&samples);
    let base = baseline.and_then(|b| b.collapse.as_ref());
    let entropy_ratio_to_baseline = match base {
        Some(b) if b.mean_entropy > 0.0 => mean_entropy / b.mean_entropy,
        _ => 1.0,
    };
    let mean_logprob_drift = base.map_or(0.0, |b| (mean_logprob - b.mean_logprob).abs());
    Some(CollapseMetrics {
        mean_entropy,
        mean_logprob,
        entropy_ratio_to_baseline,
        self_rouge_l,
        mean_logprob_drift,
        alert: entropy_ratio_to_baseline < 0.6 || self_rouge_l > 0.85 || mean_logprob_drift > 2.0,
    })
}

/// Where a run writes: `output_dir` with its `${now:…}` expanded.
pub fn output_dir(cfg: &EvalConfig) -> PathBuf {
    PathBuf::from(cfg.output_dir_at(chrono::Utc::now()))
}
