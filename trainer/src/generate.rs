//! Sampling from the model with a KV cache: what the embedded inference engine serves when
//! no vLLM is configured. Log-probs are vLLM's default "raw" ones (log-softmax of the
//! logits, before temperature and top-p), so a rollout trains the same either way.

use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{invalid, Result};
use crate::lora::LoraAdapter;
use crate::model::{KvCache, Qwen3};

/// How to pick tokens.
#[derive(Debug, Clone)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    pub max_tokens: usize,
    /// Same seed, same prompt, same adapter: same tokens.
    pub seed: Option<u64>,
    /// Token ids that end the answer (included in the output, as vLLM reports them).
    pub stop_ids: Vec<u32>,
    /// Alternatives reported per position (at most 20).
    pub top_logprobs: usize,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub id: u32,
    /// Raw log-prob of `id`.
    pub logprob: f32,
    /// The most likely tokens at this position with their raw log-probs, best first.
    pub top: Vec<(u32, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (or the caller) ended it.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

/// Generates after `prompt`. `on_token` sees each token as it is sampled and returns false
/// to stop there (a stop string); the answer then ends with [`Finish::Stop`].
pub fn generate(
    model: &Qwen3,
    lora: Option<&LoraAdapter>,
    prompt: &[u32],
    sampling: &Sampling,
    mut on_token: impl FnMut(&Token) -> bool,
) -> Result<(Vec<Token>, Finish)> {
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty"));
    }
    model.check_ids("prompt", prompt)?;
    let mut rng = match sampling.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_entropy(),
    };
    // Room for the prompt and the answer up front (within reason: a long `max_tokens` that
    // is never reached should not allocate; past this the cache grows by doubling).
    let mut cache = KvCache::with_capacity(prompt.len() + sampling.max_tokens.min(1024));
    let mut logits = model.forward_cached(prompt, &mut cache, lora)?;
    let mut out = Vec::new();
    while out.len() < sampling.max_tokens {
        let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let lp: Vec<f32> = logprobs.to_dtype(DType::F32)?.to_vec1()?;
        let id = pick(&lp, sampling, &mut rng);
        let token = Token {
            id,
            logprob: lp[id as usize],
            top: top_k(&lp, sampling.top_logprobs.min(20)),
        };
        let keep_going = on_token(&token);
        out.push(token);
        if sampling.stop_ids.contains(&id) || !keep_going {
            return Ok((out, Finish::Stop));
        }
        if out.len() < sampling.max_tokens {
            logits = model.forward_cached(&[id], &mut cache, lora)?;
        }
    }
    Ok((out, Finish::Length))
}

fn pick(lp: &[f32], s: &Sampling, rng: &mut StdRng) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(lp);
    }
    // Temperature on the logits = on the log-probs (they differ by a constant).
    let t = s.temperature;
    let max = lp.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = lp
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u32, ((l - max) / t).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    if s.top_p < 1.0 {
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (k, p) in probs.iter().enumerate() {
            mass += p.1 / total;
            if mass >= s.top_p {
                keep = k + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.gen::<f32>() * total;
    for (id, p) in &probs {
        if r < *p {
            return *id;
        }
        r -= p;
    }
    probs.last().map_or(0, |p| p.0)
}

fn argmax(lp: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in lp.iter().enumerate() {
        if *l > lp[best] {
            best = i;
        }
    }
    best as u32
}

fn top_k(lp: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<u32> = (0..lp.len() as u32).collect();
    let k = k.min(idx.len());
    idx.select_nth_unstable_by(k - 1, |a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
    idx.truncate(k);
    idx.sort_by(|a, b| lp[*b as usize].total_cmp(&lp[*a as usize]));
    idx.into_iter().map(|i| (i, lp[i as usize])).collect()
}

/// The raw log-prob of each token of `ids` from position `from` on, given those before it.
pub fn token_logprobs(
    model: &Qwen3,
    ids: &[u32],
    from: usize,
    lora: Option<&LoraAdapter>,
) -> Result<Vec<f32>> {
    if from == 0 || from >= ids.len() {
        return Err(invalid(format!(
            "scoring from position {from} of a sequence of {}",
            ids.len()
        )));
    }
    model.check_ids("sequence", ids)?;
    let logits = model.logits(ids, from - 1, ids.len() - from, lora)?;
    let lsm = candle_nn::ops::log_softmax(&logits.squeeze(0)?, D::Minus1)?;
    let rows: Vec<Vec<f32>> = lsm.to_vec2()?;
    Ok(rows
        .iter()
        .zip(&ids[from..])
        .map(|(r, id)| r[*id as usize])
        .collect())
}

/// The logits of a whole sequence at once, for tests that check the cached path.
pub fn full_logits(model: &Qwen3, ids: &[u32], lora: Option<&LoraAdapter>) -> Result<Tensor> {
    model.logits(ids, 0, ids.len(), lora)
}
