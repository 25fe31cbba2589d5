//! One SDPO distillation step: a batch of samples becomes one AdamW update of the adapter.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::adamw::AdamW;
use crate::error::{invalid, Error, Result};
use crate::lora::LoraAdapter;
use crate::loss::{log_softmax, sdpo_loss, LossConfig, LossInputs, LossOutput};
use crate::model::{GradSink, Qwen3};

/// One feedback sample, tokenized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSample {
    /// The student's prompt as the serving engine saw it (chat template applied).
    pub prompt_token_ids: Vec<u32>,
    /// The sampled response.
    pub response_token_ids: Vec<u32>,
    /// The serving engine's log-prob of each response token.
    pub response_logprobs: Vec<f32>,
    /// The hindsight teacher prompt (chat template applied), without the response.
    pub teacher_prompt_token_ids: Vec<u32>,
}

/// The step's hyper-parameters (the request's `training`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepConfig {
    pub learning_rate: f64,
    pub alpha: f64,
    pub is_clip: f64,
    pub max_grad_norm: f64,
    pub kl_reg_weight: f64,
    pub teacher_top_k: usize,
    /// Longest prompt + response (or teacher prompt + response) accepted.
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Per-layer activation checkpointing: keep only each layer's input and recompute the
    /// layer during backward (about a third more compute, a fraction of the memory).
    #[serde(default)]
    pub checkpoint: bool,
}

fn default_max_seq_len() -> usize {
    8192
}

/// What the reference trainer reports for a step (`DistillResponse.metadata`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub total_loss: f64,
    pub distill_loss: f64,
    pub kl_reg: f64,
    pub mean_is_ratio: f64,
    pub clip_fraction: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_processed: usize,
    pub batch_size: usize,
}

impl StepSample {
    fn check(&self, i: usize, model: &Qwen3, max_len: usize) -> Result<()> {
        let t = self.response_token_ids.len();
        if t == 0 {
            return Err(invalid(format!("sample {i}: the response is empty")));
        }
        if self.prompt_token_ids.is_empty() || self.teacher_prompt_token_ids.is_empty() {
            return Err(invalid(format!("sample {i}: the prompt is empty")));
        }
        if self.response_logprobs.len() != t {
            return Err(invalid(format!(
                "sample {i}: {} response log-probs for {t} response tokens",
                self.response_logprobs.len()
            )));
        }
        if let Some(lp) = self.response_logprobs.iter().find(|l| !l.is_finite()) {
            return Err(invalid(format!(
                "sample {i}: response log-prob {lp} is not finite"
            )));
        }
        let longest = t + self
            .prompt_token_ids
            .len()
            .max(self.teacher_prompt_token_ids.len());
        if longest > max_len {
            return Err(invalid(format!(
                "sample {i}: {longest} tokens exceed the maximum sequence length {max_len}"
            )));
        }
        model.check_ids(&format!("sample {i} prompt"), &self.prompt_token_ids)?;
        model.check_ids(&format!("sample {i} response"), &self.response_token_ids)?;
        model.check_ids(
            &format!("sample {i} teacher prompt"),
            &self.teacher_prompt_token_ids,
        )
    }
}

/// Runs one step: per sample, base log-probs (adapter off), teacher top-K from the base
/// model on the hindsight prompt, student logits (adapter on) and the SDPO loss; the mean
/// loss's gradient is accumulated sample by sample, clipped to `max_grad_norm` globally,
/// and applied with AdamW at the request's learning rate.
pub fn sdpo_step(
    model: &Qwen3,
    adapter: &LoraAdapter,
    optimizer: &mut AdamW,
    samples: &[StepSample],
    cfg: &StepConfig,
) -> Result<StepMetrics> {
    if samples.is_empty() {
        return Err(invalid("the batch has no samples"));
    }
    for (i, s) in samples.iter().enumerate() {
        s.check(i, model, cfg.max_seq_len).map_err(|e| match e {
            Error::InvalidInput(message) => Error::InvalidSample { index: i, message },
            other => other,
        })?;
    }

    let n = samples.len() as f64;
    let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut sums = [0.0f64; 5];
    let mut tokens = 0;
    let sink = cfg.checkpoint.then(GradSink::default);
    for s in samples {
        tokens += s.response_token_ids.len();
        let out = sample_loss_with(model, adapter, s, cfg, sink.as_ref())?;
        sums[0] += out.loss.to_scalar::<f32>()? as f64;
        sums[1] += out.distill_loss;
        sums[2] += out.kl_reg;
        sums[3] += out.mean_is_ratio;
        sums[4] += out.clip_fraction;
        let sample_grads = (out.loss / n)?.backward()?;
        for (key, var) in adapter.params() {
            if let Some(g) = sample_grads.get(var.as_tensor()) {
                let acc = match grads.remove(key) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                grads.insert(key.clone(), acc);
            }
        }
    }
    if let Some(sink) = &sink {
        for (key, g) in sink.take() {
            let acc = match grads.remove(&key) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(key, acc);
        }
    }
    // Every LoRA tensor is on the path to the loss; a missing gradient means the graph was
    // cut somewhere, which must fail loudly rather than train nothing.
    for key in adapter.params().keys() {
        if !grads.contains_key(key) {
            return Err(crate::error::Error::Checkpoint(format!(
                "no gradient reached {key}: the forward cut the graph"
            )));
        }
    }
    let grad_norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
    optimizer.step(adapter.params(), &grads, cfg.learning_rate)?;
    Ok(StepMetrics {
        total_loss: sums[0] / n,
        distill_loss: sums[1] / n,
        kl_reg: sums[2] / n,
        mean_is_ratio: sums[3] / n,
        clip_fraction: sums[4] / n,
        grad_norm,
        tokens_processed: tokens,
        batch_size: samples.len(),
    })
}

/// One sample's SDPO loss (with the student's graph): base log-probs with the adapter
/// off, teacher top-K from the base model on the hindsight prompt, student logits with the
/// adapter on. The sample must have passed the batch's input checks.
pub fn sample_loss(
    model: &Qwen3,
    adapter: &LoraAdapter,
    s: &StepSample,
    cfg: &StepConfig,
) -> Result<LossOutput> {
    sample_loss_with(model, adapter, s, cfg, None)
}

/// [`sample_loss`] with the student's layers checkpointed into `sink` when given.
fn sample_loss_with(
    model: &Qwen3,
    adapter: &LoraAdapter,
    s: &StepSample,
    cfg: &StepConfig,
    sink: Option<&GradSink>,
) -> Result<LossOutput> {
    let device = model.device();
    let k = cfg.teacher_top_k.clamp(1, model.config.vocab_size);
    let (p, t) = (s.prompt_token_ids.len(), s.response_token_ids.len());
    if p == 0 || t == 0 || s.teacher_prompt_token_ids.is_empty() {
        return Err(invalid(
            "a sample needs a prompt, a teacher prompt and a response",
        ));
    }
    let full: Vec<u32> = [&s.prompt_token_ids[..], &s.response_token_ids[..]].concat();
    let response = Tensor::new(&s.response_token_ids[..], device)?.unsqueeze(0)?;
    let base = log_softmax(&model.logits(&full, p - 1, t, None)?)?
        .gather(&response.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let teacher_full: Vec<u32> =
        [&s.teacher_prompt_token_ids[..], &s.response_token_ids[..]].concat();
    let pt = s.teacher_prompt_token_ids.len();
    let teacher = log_softmax(&model.logits(&teacher_full, pt - 1, t, None)?)?;
    let (teacher_lp, teacher_ix) = top_k(&teacher, k, device)?;

    let student = model.logits_with(&full, p - 1, t, Some(adapter), sink)?;
    let old = Tensor::new(&s.response_logprobs[..], device)?.unsqueeze(0)?;
    let mask = Tensor::ones((1, t), DType::F32, device)?;
    sdpo_loss(
        &LossInputs {
            student_logits: &student,
            teacher_logprobs: &teacher_lp,
            teacher_indices: &teacher_ix,
            base_logprobs: &base,
            old_logprobs: &old,
            response_ids: &response,
            response_mask: &mask,
        },
        &LossConfig {
            alpha: cfg.alpha,
            is_clip: cfg.is_clip,
            kl_reg_weight: cfg.kl_reg_weight,
        },
    )
}

/// The top `k` log-probs and their token ids along the last axis, both `(1, T, k)`,
/// largest first (as `torch.topk`). Selected on the host in O(V) per row (a full argsort
/// of a 151,936-token row costs ~8x more, and candle's CUDA argsort cannot sort it at all).
fn top_k(logprobs: &Tensor, k: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let (_, t, v) = logprobs.dims3()?;
    let rows: Vec<Vec<f32>> = logprobs.squeeze(0)?.to_device(&Device::Cpu)?.to_vec2()?;
    let k = k.min(v);
    let mut vals = Vec::with_capacity(t * k);
    let mut idx = Vec::with_capacity(t * k);
    let mut order: Vec<u32> = Vec::with_capacity(v);
    for row in &rows {
        order.clear();
        order.extend(0..v as u32);
        let desc = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]);
        if k < v {
            order.select_nth_unstable_by(k - 1, desc);
        }
        let top = &mut order[..k];
        top.sort_unstable_by(desc);
        idx.extend_from_slice(top);
        vals.extend(top.iter().map(|&i| row[i as usize]));
    }
    Ok((
        Tensor::from_vec(vals, (1, t, k), device)?,
        Tensor::from_vec(idx, (1, t, k), device)?,
    ))
}

/// torch's `clip_grad_norm_`: the global 2-norm of all gradients (returned), and every
/// gradient scaled by `min(1, max_norm / (norm + 1e-6))`.
fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.values() {
        let n = g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        total += n;
    }
    let norm = total.sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    for g in grads.values_mut() {
        *g = (&*g * coef)?;
    }
    Ok(norm)
}
