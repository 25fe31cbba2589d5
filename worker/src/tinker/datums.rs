//! The Tinker step's arithmetic, free of I/O (CLaaS's `_build_sample_datum` and
//! `_slice_completion_logprobs`, and the averaging in `distill`; inventory §4.4): the
//! teacher−student log-prob gaps of each sample become importance-sampling advantages,
//! scaled per sample towards a mean |gap| of 0.03, and a right-shifted datum.
//! `scripts/tinker_reference.py` reimplements it in Python from CLaaS's source, and
//! `worker/tests/tinker_reference.rs` holds the two to 1e-6.

use claas_tinker::{Datum, LossFn};
use serde::Serialize;

/// The mean |teacher − student| log-prob gap the advantages are scaled towards
/// (CLaaS's `_TARGET_ADV_ABS_MEAN`, from the continualcode reference).
const TARGET_ADV_ABS_MEAN: f64 = 0.03;
/// The most that scaling may multiply `alpha` by (CLaaS's `_MAX_KL_GAIN`).
const MAX_KL_GAIN: f64 = 4.0;

/// One sample once the teacher has scored it: what the step's arithmetic reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSample {
    pub prompt_ids: Vec<i32>,
    pub response_ids: Vec<i32>,
    /// The rollout's log-probs of the response (the student's, from the cache).
    pub student_logprobs: Vec<f32>,
    /// The base model's log-probs of the response after the teacher prompt.
    pub teacher_logprobs: Vec<f32>,
}

/// One sample's numbers (CLaaS's per-sample metrics).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SampleStats {
    pub completion_len: usize,
    pub effective_kl_coef: f64,
    pub kl_gain: f64,
    pub adv_mean: f64,
    pub adv_abs_mean: f64,
    /// Mean raw delta (teacher − student).
    pub kl_mean: f64,
    pub adv_abs_mean_raw: f64,
}

/// The batch's numbers as CLaaS reports them: its size, and the samples' numbers with
/// completion lengths summed and everything else averaged over samples (each sample weighs
/// the same, whatever its length).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchStats {
    pub batch_size: usize,
    #[serde(flatten)]
    pub samples: SampleStats,
}

impl BatchStats {
    /// CLaaS's distill metadata for step `step` at learning rate `lr`, less what only the
    /// I/O knows (`teacher_scored_texts`, `tinker_fwd_metrics`).
    pub fn claas_metadata(&self, step: i32, lr: f64) -> serde_json::Map<String, serde_json::Value> {
        let mut m = match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        m.insert("step".into(), step.into());
        m.insert("lr".into(), lr.into());
        m.insert("loss_fn".into(), LossFn::ImportanceSampling.as_str().into());
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
        m.insert("timestamp".into(), now.into());
        m
    }
}

/// The completion's part of a `compute_logprobs` answer over teacher prompt + response:
/// `completion_len` values from `prompt_len`, `None` (nothing computed) as 0.0
/// (CLaaS's `_slice_completion_logprobs`). Too short an answer is an error.
pub fn completion_logprobs(
    full: &[Option<f32>],
    prompt_len: usize,
    completion_len: usize,
) -> Result<Vec<f32>, String> {
    full.get(prompt_len..prompt_len + completion_len)
        .map(|s| s.iter().map(|lp| lp.unwrap_or(0.0)).collect())
        .ok_or_else(|| {
            format!(
                "compute_logprobs answered {} log-probs for {prompt_len} prompt and \
                 {completion_len} response tokens",
                full.len()
            )
        })
}

/// The batch's datums, in sample order, and its numbers; a sample that cannot make a datum
/// is named by its index.
pub fn distill_datums(
    samples: &[ScoredSample],
    kl_coef: f64,
) -> Result<(Vec<Datum>, BatchStats), (usize, String)> {
    let (datums, stats): (Vec<Datum>, Vec<SampleStats>) = samples
        .iter()
        .enumerate()
        .map(|(i, s)| sample_datum(s, kl_coef).map_err(|m| (i, m)))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .unzip();
    let n = stats.len().max(1) as f64;
    let avg = |f: fn(&SampleStats) -> f64| stats.iter().map(f).sum::<f64>() / n;
    let batch = BatchStats {
        batch_size: stats.len(),
        samples: SampleStats {
            completion_len: stats.iter().map(|s| s.completion_len).sum(),
            effective_kl_coef: avg(|s| s.effective_kl_coef),
            kl_gain: avg(|s| s.kl_gain),
            adv_mean: avg(|s| s.adv_mean),
            adv_abs_mean: avg(|s| s.adv_abs_mean),
            kl_mean: avg(|s| s.kl_mean),
            adv_abs_mean_raw: avg(|s| s.adv_abs_mean_raw),
        },
    };
    Ok((datums, batch))
}

/// One sample's datum (CLaaS's `_build_sample_datum`). Per sample, in f64: the raw deltas
/// `d = teacher − student`; the gain `clamp(0.03 / mean|d|, 1, 4)` (1 when every delta is
/// 0); advantages `alpha · gain · d`. The datum is the full sequence shifted by one:
/// `model_input = full[..n-1]`, `target_tokens = full[1..]`, and the student's log-probs and
/// the advantages, zero over the prompt, from position 1.
pub fn sample_datum(s: &ScoredSample, kl_coef: f64) -> Result<(Datum, SampleStats), String> {
    let t = s.response_ids.len();
    if s.student_logprobs.len() != t || s.teacher_logprobs.len() != t {
        return Err(format!(
            "{t} response tokens, {} student and {} teacher log-probs",
            s.student_logprobs.len(),
            s.teacher_logprobs.len()
        ));
    }
    if s.prompt_ids.len() + t < 2 {
        return Err("a sample needs at least two tokens to make a training datum".into());
    }
    let deltas: Vec<f64> = (s.teacher_logprobs.iter().zip(&s.student_logprobs))
        .map(|(&te, &st)| f64::from(te) - f64::from(st))
        .collect();
    let mean =
        |v: &[f64], f: fn(f64) -> f64| v.iter().copied().map(f).sum::<f64>() / t.max(1) as f64;
    let adv_abs_mean_raw = mean(&deltas, f64::abs);
    let gain = if adv_abs_mean_raw > 0.0 {
        (TARGET_ADV_ABS_MEAN / adv_abs_mean_raw).clamp(1.0, MAX_KL_GAIN)
    } else {
        1.0
    };
    let coef = kl_coef * gain;
    let advantages: Vec<f64> = deltas.iter().map(|d| coef * d).collect();
    let stats = SampleStats {
        completion_len: t,
        effective_kl_coef: coef,
        kl_gain: gain,
        adv_mean: mean(&advantages, |a| a),
        adv_abs_mean: mean(&advantages, f64::abs),
        kl_mean: mean(&deltas, |d| d),
        adv_abs_mean_raw,
    };
    let p = s.prompt_ids.len();
    let full: Vec<i32> = s
        .prompt_ids
        .iter()
        .chain(&s.response_ids)
        .copied()
        .collect();
    let shifted =
        |tail: Vec<f32>| -> Vec<f32> { std::iter::repeat_n(0.0, p).chain(tail).skip(1).collect() };
    let datum = Datum::importance_sampling(
        full[..full.len() - 1].to_vec(),
        full[1..].iter().map(|&x| i64::from(x)).collect(),
        shifted(s.student_logprobs.clone()),
        shifted(advantages.iter().map(|&a| a as f32).collect()),
    );
    Ok((datum, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scored(prompt: &[i32], response: &[i32], student: &[f32], teacher: &[f32]) -> ScoredSample {
        ScoredSample {
            prompt_ids: prompt.to_vec(),
            response_ids: response.to_vec(),
            student_logprobs: student.to_vec(),
            teacher_logprobs: teacher.to_vec(),
        }
    }

    fn f32s<'a>(d: &'a Datum, key: &str) -> &'a [f32] {
        d.loss_fn_inputs
            .get(key)
            .and_then(|t| t.as_f32())
            .unwrap_or_default()
    }

    #[test]
    fn a_datum_is_the_sequence_shifted_by_one_with_zeros_over_the_prompt() {
        // Deltas 0.5 and -0.25: mean |d| 0.375 > 0.03, so the gain is 1 and coef = alpha.
        let s = scored(&[1, 2, 3], &[4, 5], &[-1.0, -0.5], &[-0.5, -0.75]);
        let (d, stats) = sample_datum(&s, 0.5).expect("datum");
        assert_eq!(d.model_input, [1, 2, 3, 4]);
        let targets = d
            .loss_fn_inputs
            .get("target_tokens")
            .and_then(|t| t.as_i64());
        assert_eq!(targets, Some(&[2i64, 3, 4, 5][..]));
        assert_eq!(f32s(&d, "logprobs"), [0.0, 0.0, -1.0, -0.5]);
        assert_eq!(f32s(&d, "advantages"), [0.0, 0.0, 0.25, -0.125]);
        assert_eq!((stats.kl_gain, stats.effective_kl_coef), (1.0, 0.5));
        assert_eq!((stats.kl_mean, stats.adv_abs_mean_raw), (0.125, 0.375));
        assert_eq!((stats.adv_mean, stats.adv_abs_mean), (0.0625, 0.1875));
    }

    #[test]
    fn small_gaps_are_scaled_up_at_most_fourfold_and_no_gap_is_left_alone() {
        // mean |d| 0.015: gain 0.03 / 0.015 = 2.
        let s = scored(&[1], &[2, 3], &[-1.0, -1.0], &[-0.985, -1.015]);
        let (_, stats) = sample_datum(&s, 1.0).expect("datum");
        assert!((stats.kl_gain - 2.0).abs() < 1e-5, "{stats:?}");
        // mean |d| 0.001: 30, capped at 4.
        let s = scored(&[1], &[2], &[-1.0], &[-0.999]);
        assert_eq!(sample_datum(&s, 0.5).expect("datum").1.kl_gain, 4.0);
        let s = scored(&[1], &[2], &[-1.0], &[-1.0]);
        let (d, stats) = sample_datum(&s, 0.5).expect("datum");
        assert_eq!((stats.kl_gain, stats.adv_abs_mean_raw), (1.0, 0.0));
        assert_eq!(f32s(&d, "advantages"), [0.0]);
    }

    #[test]
    fn the_gain_is_per_sample_and_the_batch_averages_over_samples() {
        let a = scored(&[1], &[2, 3], &[-1.0, -1.0], &[-0.5, -0.5]);
        let b = scored(&[1], &[2], &[-1.0], &[-0.999]);
        let (datums, batch) = distill_datums(&[a, b], 0.5).expect("batch");
        assert_eq!(
            (datums.len(), batch.batch_size, batch.samples.completion_len),
            (2, 2, 3)
        );
        assert!(
            (batch.samples.kl_gain - 2.5).abs() < 1e-12,
            "(1 + 4) / 2: {batch:?}"
        );
        assert!(
            (batch.samples.effective_kl_coef - 1.25).abs() < 1e-12,
            "{batch:?}"
        );
    }

    #[test]
    fn mismatched_lengths_and_one_token_samples_are_refused_by_index() {
        let ok = scored(&[1], &[2], &[-1.0], &[-1.0]);
        let short = scored(&[1], &[2, 3], &[-1.0], &[-1.0, -1.0]);
        let err = distill_datums(&[ok.clone(), short], 0.5).err();
        assert_eq!(err.map(|e| e.0), Some(1));
        let lonely = scored(&[1], &[], &[], &[]);
        assert_eq!(
            distill_datums(&[lonely, ok], 0.5).err().map(|e| e.0),
            Some(0)
        );
    }

    #[test]
    fn the_completion_is_sliced_from_the_teacher_answer_with_none_as_zero() {
        let full = [None, Some(-1.0), Some(-2.0), None, Some(-3.0)];
        assert_eq!(completion_logprobs(&full, 2, 3), Ok(vec![-2.0, 0.0, -3.0]));
        assert!(completion_logprobs(&full, 3, 3).is_err());
    }
}
