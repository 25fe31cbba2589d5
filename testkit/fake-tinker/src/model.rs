//! The fake's "model": every number a deterministic function of its inputs, so tests can
//! predict them (a later step replaces this with a tiny candle model).
//!
//! * *Weights* are a 64-bit fingerprint. A new LoRA adapter starts at its base model's
//!   ([`base_weights`]), as a real one does (LoRA's B matrix starts at zero, so the adapted
//!   model equals the base model until it is trained).
//! * The log-prob of `token` at `position` is a hash of (weights, token, position) mapped
//!   into [-5.05, -0.05) ([`logprob`]); position counts from the start of the sequence.
//! * `forward_backward` folds each datum into the model's pending gradient ([`accumulate`]);
//!   `optim_step` folds (gradient, step, learning rate) into the weights ([`adam_step`]).
//!   A step with learning rate 0 changes nothing, as with Adam.
//! * A sample's tokens (ids from a range, 1000..2000 unless set) and length (3..=8 tokens, or `max_tokens`) are
//!   hashes of (weights, prompt, seed, sample index).

/// FNV-1a's offset basis: the hash of nothing.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a's 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Folds `x` into `h`: FNV-1a over its bytes, then splitmix64's finaliser so that nearby
/// inputs land far apart.
pub fn mix(h: u64, x: u64) -> u64 {
    let mut h = h;
    for b in x.to_le_bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The hash of a string.
pub fn fingerprint(s: &str) -> u64 {
    s.bytes().fold(FNV_OFFSET, |h, b| mix(h, u64::from(b)))
}

/// The weights of `base_model`, and of a fresh adapter on it.
pub fn base_weights(base_model: &str) -> u64 {
    fingerprint(base_model)
}

/// A hash mapped to [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The log-prob the model with `weights` gives `token` at `position`.
pub fn logprob(weights: u64, token: i64, position: usize) -> f32 {
    let h = mix(mix(weights, token as u64), position as u64);
    -(0.05 + 5.0 * unit(h)) as f32
}

/// Log-probs of `targets`, where `targets[i]` is the token at position `i + 1` (a datum's
/// `target_tokens`: the input shifted left by one).
pub fn target_logprobs(weights: u64, targets: &[i64]) -> Vec<f32> {
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| logprob(weights, t, i + 1))
        .collect()
}

/// `compute_logprobs`: one per prompt token, NaN at position 0 (nothing precedes it).
pub fn prompt_logprobs(weights: u64, prompt: &[i32]) -> Vec<f32> {
    prompt
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if i == 0 {
                f32::NAN
            } else {
                logprob(weights, i64::from(t), i)
            }
        })
        .collect()
}

/// One sampled sequence: its tokens, their log-probs, and whether it hit `max_tokens`
/// (`true`) or stopped on its own.
pub fn sample(
    weights: u64,
    prompt: &[i32],
    seed: i64,
    index: usize,
    max_tokens: usize,
    vocab: &std::ops::Range<i32>,
) -> (Vec<i32>, Vec<f32>, bool) {
    let mut h = prompt.iter().fold(mix(weights, seed as u64), |h, &t| {
        mix(h, u64::from(t as u32))
    });
    h = mix(h, index as u64);
    let natural = 3 + (h % 6) as usize;
    let len = natural.min(max_tokens);
    let span = u64::try_from(vocab.end - vocab.start).unwrap_or(1).max(1);
    let tokens: Vec<i32> = (0..len)
        .map(|i| vocab.start + (mix(h, i as u64) % span) as i32)
        .collect();
    let logprobs = tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| logprob(weights, i64::from(t), prompt.len() + i))
        .collect();
    (tokens, logprobs, max_tokens <= natural)
}

/// The importance-sampling loss of one datum: `-Σ exp(logprob − old) · advantage`.
pub fn importance_sampling_loss(logprobs: &[f32], old: &[f32], advantages: &[f32]) -> f64 {
    logprobs
        .iter()
        .zip(old)
        .zip(advantages)
        .map(|((&lp, &o), &a)| -(f64::from(lp) - f64::from(o)).exp() * f64::from(a))
        .sum()
}

/// Folds one datum (its targets and advantages) into a pending gradient.
pub fn accumulate(grad: Option<u64>, targets: &[i64], advantages: &[f32]) -> u64 {
    let h = targets
        .iter()
        .fold(grad.unwrap_or(FNV_OFFSET), |h, &t| mix(h, t as u64));
    advantages
        .iter()
        .fold(h, |h, &a| mix(h, u64::from(a.to_bits())))
}

/// The weights after one Adam step: unchanged at learning rate 0, else a hash of the old
/// weights, the step number, the gradient (none counts as zero) and the learning rate.
pub fn adam_step(weights: u64, step: u64, grad: Option<u64>, learning_rate: f64) -> u64 {
    if learning_rate == 0.0 {
        return weights;
    }
    let h = mix(mix(weights, step), grad.unwrap_or(0));
    mix(h, learning_rate.to_bits())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_negative_and_depend_on_weights_token_and_position() {
        let w = base_weights("base");
        let lp = logprob(w, 7, 3);
        assert!((-5.05..-0.05).contains(&lp), "{lp}");
        assert_eq!(lp, logprob(w, 7, 3));
        assert_ne!(lp, logprob(w, 8, 3));
        assert_ne!(lp, logprob(w, 7, 4));
        assert_ne!(lp, logprob(adam_step(w, 1, Some(1), 1e-4), 7, 3));
    }

    #[test]
    fn a_sample_respects_max_tokens_and_matches_the_prompt_logprobs_of_its_continuation() {
        let w = base_weights("base");
        let (tokens, lps, hit_max) = sample(w, &[1, 2, 3], 0, 0, 2, &(1000..2000));
        assert_eq!((tokens.len(), lps.len(), hit_max), (2, 2, true));
        let full: Vec<i32> = [1, 2, 3].iter().chain(&tokens).copied().collect();
        assert_eq!(prompt_logprobs(w, &full)[3..], lps[..]);
    }

    #[test]
    fn a_zero_learning_rate_leaves_the_weights_alone() {
        assert_eq!(adam_step(42, 1, Some(9), 0.0), 42);
    }
}
