//! The Tinker step's arithmetic against CLaaS's, reimplemented in Python from
//! `claas/training/engine/tinker/engine.py` (`scripts/tinker_reference.py`): the same
//! scored samples give the same datums and advantages, and the same metrics, to 1e-6.

use std::io::Write;
use std::process::{Command, Stdio};

use claas_tinker::Datum;
use claas_worker::tinker::{completion_logprobs, distill_datums, ScoredSample};
use serde_json::{json, Value};

/// Agreement asked of the port (the issue's): the datums' values are float32 on both sides
/// (as on the wire), the metrics float64.
const TOLERANCE: f64 = 1e-6;

/// One test sample as the reference reads it: the teacher's whole answer, `None` included.
struct Case {
    prompt: Vec<i32>,
    response: Vec<i32>,
    student: Vec<f32>,
    teacher_prompt_len: usize,
    teacher_full: Vec<Option<f32>>,
}

/// A small deterministic generator (64-bit LCG), so the cases need no crate.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 1_000_000) as f32 / 1_000_000.0
    }
}

/// Samples whose teacher−student gaps are large (gain 1), small (gain between 1 and 4),
/// tiny (gain capped at 4) and nil (gain 1, zero advantages), with `None`s in the teacher's
/// answer inside the completion and a one-token prompt.
fn cases() -> Vec<Case> {
    let mut rng = Lcg(27);
    let gaps = [1.5f32, 0.02, 0.0005, 0.0, 0.3];
    gaps.iter()
        .enumerate()
        .map(|(k, &gap)| {
            let (p, t, tp) = (1 + k * 3, 2 + k * 2, 4 + k);
            let prompt = (0..p).map(|_| (rng.next() % 5000) as i32).collect();
            let response = (0..t).map(|_| (rng.next() % 5000) as i32).collect();
            let student: Vec<f32> = (0..t).map(|_| -5.0 * rng.unit()).collect();
            let mut teacher_full: Vec<Option<f32>> =
                (0..tp).map(|_| Some(-3.0 * rng.unit())).collect();
            teacher_full[0] = None;
            for (i, s) in student.iter().enumerate() {
                let sign = if rng.next() & 1 == 0 { 1.0 } else { -1.0 };
                teacher_full.push(Some(s + sign * gap * (0.5 + rng.unit())));
                if k == 4 && i == 1 {
                    // Nothing computed here: CLaaS reads it as 0.0.
                    teacher_full[tp + i] = None;
                }
            }
            Case {
                prompt,
                response,
                student,
                teacher_prompt_len: tp,
                teacher_full,
            }
        })
        .collect()
}

fn reference(cases: &[Case], kl_coef: f64) -> Value {
    let samples: Vec<Value> = cases
        .iter()
        .map(|c| {
            json!({
                "prompt_ids": c.prompt, "response_ids": c.response,
                "student_logprobs": c.student, "teacher_prompt_len": c.teacher_prompt_len,
                "teacher_logprobs_full": c.teacher_full,
            })
        })
        .collect();
    let input = json!({"kl_coef": kl_coef, "samples": samples}).to_string();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/tinker_reference.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write the cases");
    let out = child.wait_with_output().expect("the reference finishes");
    assert!(
        out.status.success(),
        "the reference failed: {:?}",
        out.status
    );
    serde_json::from_slice(&out.stdout).expect("the reference writes JSON")
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn assert_close(what: &str, ours: &[f64], theirs: &[f64]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!((a - b).abs() <= TOLERANCE, "{what}[{i}]: {a} vs {b}");
    }
}

fn assert_datum(i: usize, ours: &Datum, theirs: &Value) {
    let ints = |v: &Value| numbers(v).into_iter().map(|x| x as i64).collect::<Vec<_>>();
    let input: Vec<i64> = ours.model_input.iter().map(|&t| i64::from(t)).collect();
    assert_eq!(
        input,
        ints(&theirs["model_input"]),
        "datum {i}: model_input"
    );
    let get = |k: &str| ours.loss_fn_inputs.get(k).expect("loss_fn input");
    let targets = get("target_tokens").as_i64().expect("int64");
    assert_eq!(
        targets,
        ints(&theirs["target_tokens"]),
        "datum {i}: target_tokens"
    );
    for key in ["logprobs", "advantages"] {
        let v: Vec<f64> = get(key)
            .as_f32()
            .expect("float32")
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert_close(&format!("datum {i} {key}"), &v, &numbers(&theirs[key]));
    }
}

#[test]
fn the_port_builds_the_datums_and_advantages_claas_builds() {
    let cases = cases();
    for kl_coef in [0.5, 1.0] {
        let scored: Vec<ScoredSample> = cases
            .iter()
            .map(|c| ScoredSample {
                prompt_ids: c.prompt.clone(),
                response_ids: c.response.clone(),
                student_logprobs: c.student.clone(),
                teacher_logprobs: completion_logprobs(
                    &c.teacher_full,
                    c.teacher_prompt_len,
                    c.response.len(),
                )
                .expect("the completion"),
            })
            .collect();
        let (datums, stats) = distill_datums(&scored, kl_coef).expect("datums");
        let theirs = reference(&cases, kl_coef);
        let their_datums = theirs["datums"].as_array().expect("datums");
        assert_eq!(datums.len(), their_datums.len());
        for (i, (d, t)) in datums.iter().zip(their_datums).enumerate() {
            assert_datum(i, d, t);
        }
        let ours = serde_json::to_value(stats).expect("stats");
        for (key, theirs) in theirs["metrics"].as_object().expect("metrics") {
            let a = ours[key].as_f64().expect("our metric");
            assert_close(key, &[a], &[theirs.as_f64().expect("their metric")]);
        }
        let gains: Vec<f64> = (0..cases.len())
            .map(|i| {
                distill_datums(&scored[i..=i], kl_coef)
                    .expect("one")
                    .1
                    .samples
                    .kl_gain
            })
            .collect();
        assert!(
            gains.contains(&1.0) && gains.contains(&4.0),
            "cases span the gain: {gains:?}"
        );
        assert!(gains.iter().any(|&g| g > 1.0 && g < 4.0), "{gains:?}");
    }
}
