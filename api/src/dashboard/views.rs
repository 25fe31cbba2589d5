//! What the dashboard pages show, shaped from store rows: percentiles, ages, metric lists
//! and the loss chart.

use std::collections::BTreeMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use claas_core::types::{Job, LoraVersion, WorkerRow};
use serde::Serialize;

/// A worker counts as stale when it has not heartbeated for this long.
pub const STALE_AFTER_S: i64 = crate::routes::health::WORKER_ALIVE_S;

/// p50/p95/p99 of one phase's durations.
#[derive(Debug, Serialize, PartialEq)]
pub struct PhaseLatency {
    pub phase: String,
    pub count: usize,
    pub p50_ms: u64,
    pub p95_ms: u64,
    pub p99_ms: u64,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Per-phase percentiles over jobs' timings, in phase order of first appearance.
pub fn phase_latencies(timings: &[BTreeMap<String, u64>]) -> Vec<PhaseLatency> {
    let mut by_phase: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for t in timings {
        for (phase, ms) in t {
            by_phase.entry(phase.as_str()).or_default().push(*ms);
        }
    }
    let order = [
        "drain", "sleep", "vram", "distill", "publish", "reload", "wake",
    ];
    let rank = |p: &str| order.iter().position(|o| *o == p).unwrap_or(order.len());
    let mut out: Vec<PhaseLatency> = by_phase
        .into_iter()
        .map(|(phase, mut v)| {
            v.sort_unstable();
            PhaseLatency {
                phase: phase.to_owned(),
                count: v.len(),
                p50_ms: percentile(&v, 0.50),
                p95_ms: percentile(&v, 0.95),
                p99_ms: percentile(&v, 0.99),
            }
        })
        .collect();
    out.sort_by_key(|p| (rank(&p.phase), p.phase.clone()));
    out
}

/// A worker row as the overview lists it.
#[derive(Debug, Serialize)]
pub struct WorkerView {
    pub id: String,
    pub hostname: String,
    pub gpu: String,
    pub state: String,
    pub current_job: Option<String>,
    pub heartbeat_age_s: i64,
    pub stale: bool,
}

impl WorkerView {
    pub fn new(w: &WorkerRow, now: DateTime<Utc>) -> WorkerView {
        let age = (now - w.heartbeat_at).num_seconds().max(0);
        WorkerView {
            id: w.id.clone(),
            hostname: w.hostname.clone(),
            gpu: w.gpu.clone().unwrap_or_else(|| "-".into()),
            state: w.state.clone(),
            current_job: w.current_job.map(|j| j.to_string()),
            heartbeat_age_s: age,
            stale: w.state != "stopped" && age >= STALE_AFTER_S,
        }
    }
}

/// A job row in a listing.
#[derive(Debug, Serialize)]
pub struct JobRow {
    pub id: String,
    pub lora_id: String,
    pub status: &'static str,
    pub phase: &'static str,
    pub attempt: i32,
    pub max_attempts: i32,
    pub worker: String,
    pub samples: i32,
    pub created: String,
    pub duration_s: Option<f64>,
    pub error: Option<String>,
}

impl JobRow {
    pub fn new(j: &Job) -> JobRow {
        JobRow {
            id: j.id.to_string(),
            lora_id: j.lora_id.clone(),
            status: j.status.as_str(),
            phase: j.phase.as_str(),
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            worker: j.worker_id.clone().unwrap_or_default(),
            samples: j.sample_count,
            created: time(j.created_at),
            duration_s: match (j.started_at, j.finished_at) {
                (Some(s), Some(f)) => Some((f - s).num_milliseconds() as f64 / 1000.0),
                _ => None,
            },
            error: j.error.as_ref().map(|e| e.message.clone()),
        }
    }
}

/// A timestamp as the pages print it (UTC, to the second).
pub fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

/// A time filter: `2026-12-02T10:30` (a datetime-local input, UTC), a date, or RFC 3339.
pub fn parse_time(raw: &str) -> Option<DateTime<Utc>> {
    let raw = raw.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(raw) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(raw, fmt) {
            return Some(t.and_utc());
        }
    }
    chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The smallest UUIDv7 of a moment: ids at or above it were made at or after it.
pub fn uuid_floor(t: DateTime<Utc>) -> uuid::Uuid {
    let ms = u64::try_from(t.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(ms, &[0; 10]).into_uuid()
}

/// Numeric entries of a metrics object (a version's metrics or a job result's
/// `metadata`), in key order.
pub fn numbers(v: Option<&serde_json::Value>) -> Vec<(String, String)> {
    let Some(obj) = v
        .and_then(|v| v.get("metadata").or(Some(v)))
        .and_then(|v| v.as_object())
    else {
        return Vec::new();
    };
    obj.iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Number(n) => Some((
                k.clone(),
                n.as_f64()
                    .map(|f| {
                        if f.fract() == 0.0 && f.abs() < 1e15 {
                            format!("{f:.0}")
                        } else {
                            format!("{f:.6}")
                        }
                    })
                    .unwrap_or_else(|| n.to_string()),
            )),
            serde_json::Value::Bool(b) => Some((k.clone(), b.to_string())),
            _ => None,
        })
        .collect()
}

/// The loss-over-versions chart: an SVG polyline over versions that recorded a loss.
#[derive(Debug, Serialize, PartialEq)]
pub struct LossChart {
    pub width: u32,
    pub height: u32,
    /// `x,y x,y …` in SVG coordinates.
    pub points: String,
    pub dots: Vec<(f64, f64, i32, String)>,
    pub min: String,
    pub max: String,
    pub first_version: i32,
    pub last_version: i32,
}

pub fn loss_chart(versions: &[LoraVersion]) -> Option<LossChart> {
    let series: Vec<(i32, f64)> = versions
        .iter()
        .filter_map(|v| {
            let loss = v.metrics.as_ref()?.get("total_loss")?.as_f64()?;
            loss.is_finite().then_some((v.version, loss))
        })
        .collect();
    if series.is_empty() {
        return None;
    }
    let (w, h, pad) = (640.0, 200.0, 24.0);
    let lo = series.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = series.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let n = series.len();
    let x = |i: usize| {
        if n == 1 {
            w / 2.0
        } else {
            pad + (w - 2.0 * pad) * i as f64 / (n - 1) as f64
        }
    };
    let y = |loss: f64| h - pad - (h - 2.0 * pad) * (loss - lo) / span;
    let dots: Vec<(f64, f64, i32, String)> = series
        .iter()
        .enumerate()
        .map(|(i, (v, loss))| {
            let (px, py) = (
                (x(i) * 10.0).round() / 10.0,
                (y(*loss) * 10.0).round() / 10.0,
            );
            (px, py, *v, format!("{loss:.4}"))
        })
        .collect();
    Some(LossChart {
        width: w as u32,
        height: h as u32,
        points: dots
            .iter()
            .map(|(px, py, _, _)| format!("{px},{py}"))
            .collect::<Vec<_>>()
            .join(" "),
        dots,
        min: format!("{lo:.4}"),
        max: format!("{hi:.4}"),
        first_version: series[0].0,
        last_version: series[n - 1].0,
    })
}

/// A job result's numbers: the step's metrics (`result.metrics`), then the result's own
/// (`version`, `batch_size`).
pub fn job_numbers(result: Option<&serde_json::Value>) -> Vec<(String, String)> {
    let mut out = numbers(result.and_then(|r| r.get("metrics")));
    out.extend(numbers(result));
    out
}

/// The texts the teacher scored in the job's training step (the trainer's
/// `teacher_scored_texts`: each sample's rendered teacher prompt, then its response).
pub fn teacher_scored_texts(result: Option<&serde_json::Value>) -> Vec<String> {
    result
        .and_then(|r| r.pointer("/metrics/teacher_scored_texts"))
        .and_then(|t| t.as_array())
        .map(|texts| {
            texts
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_percentiles_are_nearest_rank_in_pipeline_order() {
        let timings: Vec<BTreeMap<String, u64>> = (1..=100)
            .map(|i| BTreeMap::from([("distill".into(), i), ("drain".into(), 2 * i)]))
            .collect();
        let p = phase_latencies(&timings);
        assert_eq!(p[0].phase, "drain");
        assert_eq!((p[0].p50_ms, p[0].p95_ms, p[0].p99_ms), (100, 190, 198));
        assert_eq!((p[1].phase.as_str(), p[1].count), ("distill", 100));
        assert_eq!((p[1].p50_ms, p[1].p99_ms), (50, 99));
        assert!(phase_latencies(&[]).is_empty());
    }

    #[test]
    fn time_filters_accept_the_browsers_and_rfc3339() {
        let t = parse_time("2026-12-02T10:30").expect("datetime-local");
        assert_eq!(t.to_rfc3339(), "2026-12-02T10:30:00+00:00");
        assert_eq!(
            parse_time("2026-12-02T12:30:00+02:00").map(|t| t.to_rfc3339()),
            Some("2026-12-02T10:30:00+00:00".into())
        );
        assert!(parse_time("2026-12-02").is_some());
        assert!(parse_time("yesterday").is_none());
        let floor = uuid_floor(t);
        assert_eq!(floor.get_version_num(), 7);
        assert!(uuid::Uuid::now_v7() > floor);
    }

    #[test]
    fn the_loss_chart_spans_the_versions_with_a_loss() {
        let v = |version: i32, loss: Option<f64>| LoraVersion {
            lora_id: "a".into(),
            version,
            storage_uri: String::new(),
            sha256: String::new(),
            job_id: None,
            metrics: loss.map(|l| serde_json::json!({"total_loss": l})),
            created_at: Utc::now(),
            pinned: false,
            pruned_at: None,
        };
        assert!(loss_chart(&[v(0, None)]).is_none());
        let c = loss_chart(&[
            v(0, None),
            v(1, Some(2.0)),
            v(2, Some(1.0)),
            v(3, Some(1.5)),
        ])
        .expect("chart");
        assert_eq!((c.first_version, c.last_version), (1, 3));
        assert_eq!(c.points, "24,24 320,176 616,100");
        assert_eq!((c.min.as_str(), c.max.as_str()), ("1.0000", "2.0000"));
    }
}
