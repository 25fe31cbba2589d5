//! The structured feedback log: one JSON file per finished feedback job, in CLaaS's
//! `FeedbackLogRecord` shape (`telemetry.feedback_log_dir`, `FEEDBACK_LOG_DIR`), written by
//! the worker that finished the job, on its own disk. A file appears whole or not at all
//! (written beside its final name, then renamed).

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use claas_core::types::{Orchestration, Phase, Sample, TrainingConfig};
use serde_json::{json, Value};
use uuid::Uuid;

/// What one finished job leaves in the log.
pub struct Record<'a> {
    pub job_id: Uuid,
    pub lora_id: &'a str,
    pub finished_at: DateTime<Utc>,
    /// `None` when it succeeded; else the failed phase and the error message.
    pub error: Option<(Phase, &'a str)>,
    /// The last phase the job reached.
    pub phase: Phase,
    pub samples: &'a [Sample],
    pub training: &'a TrainingConfig,
    pub orchestration: &'a Orchestration,
    /// The job's result as recorded (`version`, `metrics`, `vllm`, `batch_size`), if any.
    pub result: Option<&'a Value>,
    /// Milliseconds per phase, in the order they ran.
    pub phase_ms: &'a [(Phase, u64)],
}

impl Record<'_> {
    /// The file's name: `<YYYYmmddTHHMMSS>-<job id without dashes>.json`, as CLaaS names it.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}.json",
            self.finished_at.format("%Y%m%dT%H%M%S"),
            self.job_id.simple()
        )
    }

    /// The record, with CLaaS's fields.
    pub fn to_json(&self) -> Value {
        let ms = |phases: &[Phase]| -> u64 {
            self.phase_ms
                .iter()
                .filter(|(p, _)| phases.contains(p))
                .map(|(_, ms)| ms)
                .sum()
        };
        let requests: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!({
                    "lora_id": self.lora_id,
                    "prompt": s.prompt,
                    "response": s.response,
                    "feedback": s.feedback,
                    "training": self.training,
                    "orchestration": self.orchestration,
                })
            })
            .collect();
        let batch_samples: Vec<Value> = self
            .samples
            .iter()
            .map(|s| {
                json!({
                    "prompt": s.prompt,
                    "response": s.response,
                    "feedback": s.feedback,
                    "system_prompt": s.rollout.system_prompt,
                    "prompt_token_ids": s.rollout.prompt_token_ids,
                    "response_token_ids": s.rollout.response_token_ids,
                    "response_logprobs": s.rollout.response_logprobs,
                })
            })
            .collect();
        let result = self.result;
        let distill_result = result
            .filter(|_| self.error.is_none())
            .map(|r| json!({"lora_id": self.lora_id, "metadata": r.get("metrics")}));
        json!({
            "request_id": self.job_id.simple().to_string(),
            "job_id": self.job_id,
            "timestamp_utc": self.finished_at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "status": if self.error.is_none() { "ok" } else { "error" },
            "phase": self.error.map_or(self.phase, |(p, _)| p).as_str(),
            "lora_id": self.lora_id,
            "version": result.and_then(|r| r.get("version")),
            "requests": requests,
            "vllm": result
                .and_then(|r| r.get("vllm"))
                .cloned()
                .unwrap_or(json!({"slept": false, "woke": false})),
            "timing_ms": {
                "sleep": ms(&[Phase::Drain, Phase::Sleep, Phase::Vram]),
                "distill": ms(&[Phase::Distill]),
                "save": ms(&[Phase::Publish]),
                "wake": ms(&[Phase::Wake]),
                "logprobs": 0,
                "total": self.phase_ms.iter().map(|(_, ms)| ms).sum::<u64>(),
            },
            "batch_samples": batch_samples,
            "distill_result": distill_result,
            "error": self.error.map(|(_, message)| message),
        })
    }
}

/// Writes `record` into `dir` (created if missing) off the async threads and returns the
/// file's path; a record that cannot be written costs a warning, never the job.
pub async fn write(dir: PathBuf, record: &Record<'_>) -> Option<PathBuf> {
    let (name, value) = (record.file_name(), record.to_json());
    match tokio::task::spawn_blocking(move || write_json(&dir, &name, &value)).await {
        Ok(Ok(path)) => Some(path),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not write the feedback log record");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "the feedback log writer stopped");
            None
        }
    }
}

/// Writes `value` as `dir/name` (pretty, keys sorted), atomically.
fn write_json(dir: &Path, name: &str, value: &Value) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", Uuid::new_v4().simple()));
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use claas_core::types::Rollout;

    #[tokio::test]
    async fn a_record_has_claas_fields_and_lands_whole() {
        let samples = vec![Sample {
            prompt: "p".into(),
            response: "r".into(),
            feedback: "shorter".into(),
            rollout: Rollout {
                prompt_token_ids: vec![1, 2],
                response_token_ids: vec![3],
                response_logprobs: vec![-0.5],
                system_prompt: "s".into(),
            },
        }];
        let training = TrainingConfig::default();
        let orchestration = Orchestration::default();
        let result =
            json!({"version": 2, "metrics": {"loss": 0.1}, "vllm": {"slept": true, "woke": true}});
        let record = Record {
            job_id: Uuid::new_v4(),
            lora_id: "a/b",
            finished_at: Utc::now(),
            error: None,
            phase: Phase::Wake,
            samples: &samples,
            training: &training,
            orchestration: &orchestration,
            result: Some(&result),
            phase_ms: &[(Phase::Drain, 5), (Phase::Sleep, 7), (Phase::Distill, 100)],
        };
        let dir = claas_testutil::tempdir("flog");
        let path = write(dir.to_path_buf(), &record).await.expect("written");
        let read: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(read["status"], "ok");
        assert_eq!(read["phase"], "wake");
        assert_eq!(read["timing_ms"]["sleep"], 12);
        assert_eq!(read["timing_ms"]["total"], 112);
        assert_eq!(read["distill_result"]["metadata"]["loss"], 0.1);
        assert_eq!(read["batch_samples"][0]["response_logprobs"][0], -0.5);
        assert_eq!(read["requests"][0]["feedback"], "shorter");
        assert_eq!(read["vllm"]["slept"], true);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
    }
}
