//! The SDPO loss (Hübotter et al. 2026, as the reference CLaaS trainer computes it):
//! generalized Jensen-Shannon divergence between student and teacher over the teacher's
//! renormalised top-K, importance-sampling correction against the rollout's log-probs
//! (clipped above at `is_clip`), and Schulman's k3 estimate of KL to the base policy, each
//! a masked mean over response tokens.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// The loss's knobs (`TrainingConfig` in the API).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossConfig {
    /// Mixture weight of the teacher in the JSD; 1 switches to the reverse-KL surrogate.
    pub alpha: f64,
    /// Upper clip of the importance-sampling ratio.
    pub is_clip: f64,
    /// Weight of the k3 KL-to-base term.
    pub kl_reg_weight: f64,
}

/// The tensors of one loss evaluation; `B` samples of `T` response tokens over `V`.
pub struct LossInputs<'a> {
    /// `(B, T, V)`, differentiable.
    pub student_logits: &'a Tensor,
    /// `(B, T, K)` teacher log-probs of its top-K tokens (need not be normalised over K).
    pub teacher_logprobs: &'a Tensor,
    /// `(B, T, K)` u32 token ids of the teacher's top-K.
    pub teacher_indices: &'a Tensor,
    /// `(B, T)` base-policy log-probs of the response tokens.
    pub base_logprobs: &'a Tensor,
    /// `(B, T)` the rollout's log-probs (the policy that sampled the response).
    pub old_logprobs: &'a Tensor,
    /// `(B, T)` u32 response token ids.
    pub response_ids: &'a Tensor,
    /// `(B, T)` 1 for scored tokens, 0 for padding.
    pub response_mask: &'a Tensor,
}

/// The loss (a scalar with its graph) and its parts as numbers.
#[derive(Debug)]
pub struct LossOutput {
    pub loss: Tensor,
    pub distill_loss: f64,
    pub kl_reg: f64,
    pub mean_is_ratio: f64,
    pub clip_fraction: f64,
}

/// Log-probability of the teacher's top-K entry for a token that is not among them.
const MISSING_TOKEN_LOGPROB: f64 = -20.0;
/// Log-ratios are clamped to ±20 before `exp`, as the reference does.
const LOG_RATIO_CLAMP: f64 = 20.0;
/// Floor of the top-K renormalisation denominators.
const RENORM_FLOOR: f64 = 1e-8;

/// `log_softmax` over the last dimension, with the max shift kept out of the graph (its
/// gradient is zero in exact arithmetic; this keeps it zero in floating point, as torch's
/// fused kernel does).
pub fn log_softmax(xs: &Tensor) -> Result<Tensor> {
    let max = xs.max_keepdim(D::Minus1)?.detach();
    let shifted = xs.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `log(exp(a) + exp(b))` elementwise with a detached max shift; `b` may be `-inf`.
fn logaddexp(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let m = a.maximum(b)?.detach();
    let sum = (a - &m)?.exp()? + (b - &m)?.exp()?;
    Ok((sum?.log()? + m)?)
}

/// `torch.lerp(start, end, w)` with torch's two-sided formula.
fn lerp(start: &Tensor, end: &Tensor, w: f64) -> Result<Tensor> {
    let diff = (end - start)?;
    Ok(if w < 0.5 {
        (start + (diff * w)?)?
    } else {
        (end - (diff * (1.0 - w))?)?
    })
}

/// `exp(x) / max(sum_k exp(x), 1e-8)` and its log, over the last dimension.
fn renormalise(logprobs: &Tensor) -> Result<(Tensor, Tensor)> {
    let probs = logprobs.exp()?;
    let denom = probs
        .sum_keepdim(D::Minus1)?
        .clamp(RENORM_FLOOR, f64::INFINITY)?;
    let probs = probs.broadcast_div(&denom)?;
    let logs = probs.log()?;
    Ok((probs, logs))
}

/// The SDPO loss of a batch; see the module docs. All inputs are f32 on one device.
pub fn sdpo_loss(inp: &LossInputs<'_>, cfg: &LossConfig) -> Result<LossOutput> {
    let student = log_softmax(&inp.student_logits.to_dtype(DType::F32)?)?;
    let ids = inp.response_ids.unsqueeze(D::Minus1)?;
    let chosen = student.gather(&ids, D::Minus1)?.squeeze(D::Minus1)?;

    let per_token = if cfg.alpha < 1.0 {
        let student_k = student.gather(inp.teacher_indices, D::Minus1)?;
        let (p_t, log_t) = renormalise(inp.teacher_logprobs)?;
        let (p_s, log_s) = renormalise(&student_k)?;
        let log_m = logaddexp(
            &(&log_s + (1.0 - cfg.alpha).ln())?,
            &(&log_t + cfg.alpha.ln())?,
        )?;
        let kl_t = (&p_t * (&log_t - &log_m)?)?.sum(D::Minus1)?;
        let kl_s = (&p_s * (&log_s - &log_m)?)?.sum(D::Minus1)?;
        lerp(&kl_s, &kl_t, cfg.alpha)?
    } else {
        // Reverse KL as a policy-gradient surrogate: the log-ratio is a constant weight.
        let hit = inp
            .teacher_indices
            .broadcast_eq(&ids)?
            .to_dtype(DType::F32)?;
        let matched = (inp.teacher_logprobs * &hit)?.sum(D::Minus1)?;
        let has = hit.max(D::Minus1)?;
        let teacher_chosen = ((&matched * &has)? + ((1.0 - &has)? * MISSING_TOKEN_LOGPROB)?)?;
        let weight = (&chosen - &teacher_chosen)?.detach();
        (weight * &chosen)?
    };

    let neg_kl = (&chosen - inp.old_logprobs)?
        .detach()
        .clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)?;
    let ratio = neg_kl.exp()?.clamp(f64::NEG_INFINITY, cfg.is_clip)?;
    let per_token = (per_token * &ratio)?;

    let log_ratio = clamp_with_grad(&(&chosen - inp.base_logprobs)?, LOG_RATIO_CLAMP)?;
    let k3 = ((log_ratio.exp()? - 1.0)? - &log_ratio)?;

    let mask = inp.response_mask;
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let distill = ((per_token * mask)?.sum_all()? / n)?;
    let kl_reg = ((k3 * mask)?.sum_all()? / n)?;
    let loss = (&distill + (&kl_reg * cfg.kl_reg_weight)?)?;

    let mean_is_ratio = (&ratio * mask)?.sum_all()?.to_scalar::<f32>()? as f64 / n;
    let clipped = ratio.ge(cfg.is_clip)?.to_dtype(DType::F32)?;
    let clip_fraction = (clipped * mask)?.sum_all()?.to_scalar::<f32>()? as f64 / n;
    Ok(LossOutput {
        distill_loss: distill.to_scalar::<f32>()? as f64,
        kl_reg: kl_reg.to_scalar::<f32>()? as f64,
        loss,
        mean_is_ratio,
        clip_fraction,
    })
}

/// `clamp(x, -c, c)` whose gradient is 1 inside `[-c, c]` and 0 outside, as torch's.
fn clamp_with_grad(x: &Tensor, c: f64) -> Result<Tensor> {
    let clamped = x.clamp(-c, c)?.detach();
    let inside = x.ge(-c)?.mul(&x.le(c)?)?.to_dtype(x.dtype())?;
    // value: clamped; gradient: `inside` (x - x.detach() is 0 in value).
    Ok((clamped + (x - x.detach())?.mul(&inside)?)?)
}
