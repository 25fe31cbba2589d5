//! The fake's numbers from a real model ([`Options::model_dir`]): the tiny candle Qwen3 and
//! LoRA adapters trained on it, so sampling writes the model's tokens, `compute_logprobs`
//! and `forward_backward` return its log-probs, the importance-sampling loss is
//! differentiated, and `optim_step` is Adam on the adapter. Deterministic on the CPU.
//!
//! It sits beside the hash model (`model.rs`) rather than replacing it: the world still
//! names weights by a 64-bit fingerprint (a checkpoint copies the number), and this keeps
//! the adapter each fingerprint stands for. The base model's fingerprint has no adapter.
//!
//! [`Options::model_dir`]: crate::Options::model_dir

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, D};
use claas_trainer::generate::{generate, token_logprobs, Finish, Sampling};
use claas_trainer::loss::log_softmax;
use claas_trainer::{AdamW, AdapterConfig, LoraAdapter, Module, Qwen3};

pub(crate) struct Brain {
    model: Qwen3,
    /// The adapter each trained fingerprint stands for (never changed once stored).
    adapters: Mutex<HashMap<u64, Arc<LoraAdapter>>>,
    /// Each training model's adapter as it trains, its pending gradient and Adam state.
    live: Mutex<HashMap<String, Live>>,
}

struct Live {
    adapter: LoraAdapter,
    grads: Option<BTreeMap<String, Tensor>>,
    adam: AdamW,
}

/// Adam's settings from an `optim_step` request (the SDK's defaults where absent).
pub(crate) struct Adam {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

type R<T> = Result<T, String>;

fn err(e: impl std::fmt::Display) -> String {
    format!("the fake's model failed: {e}")
}

impl Brain {
    pub(crate) fn load(dir: &Path) -> R<Brain> {
        let model = Qwen3::load(dir, &Device::Cpu, DType::F32).map_err(err)?;
        Ok(Brain {
            model,
            adapters: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
        })
    }

    fn adapters(&self) -> MutexGuard<'_, HashMap<u64, Arc<LoraAdapter>>> {
        self.adapters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The adapter `weights` stands for; `None`: the base model (or an untrained LoRA).
    fn adapter(&self, weights: u64) -> Option<Arc<LoraAdapter>> {
        self.adapters().get(&weights).cloned()
    }

    /// Training model `id` starts from `weights`: a fresh adapter of `rank` (equal to the
    /// base model) when no trained adapter stands for them.
    pub(crate) fn start_model(&self, id: &str, weights: u64, rank: u32, base: &str) -> R<()> {
        let adapter = match self.adapter(weights) {
            Some(a) => a.snapshot(&self.model.config).map_err(err)?,
            None => {
                // Every projection, as Tinker's LoRA trains them all.
                let targets = Module::ALL.iter().map(|m| m.name().to_owned()).collect();
                let config = AdapterConfig::for_lora(rank as i32, f64::from(rank), targets, base);
                LoraAdapter::init(&self.model.config, config, 0).map_err(err)?
            }
        };
        let live = Live {
            adapter,
            grads: None,
            adam: AdamW::default(),
        };
        self.live().insert(id.to_owned(), live);
        Ok(())
    }

    /// Log-probs of `targets` after `inputs` under training model `id` (targets[i] follows
    /// inputs[..=i]), and the importance-sampling loss `-Σ exp(lp - old) · adv`; its
    /// gradient joins the model's pending one unless `forward_only`.
    pub(crate) fn forward_backward(
        &self,
        id: &str,
        inputs: &[i32],
        targets: &[i64],
        old: &[f32],
        advantages: &[f32],
        forward_only: bool,
    ) -> R<(Vec<f32>, f64)> {
        let mut live = self.live();
        let l = live.get_mut(id).ok_or("no such training model")?;
        let ids: Vec<u32> = inputs.iter().map(|&t| t as u32).collect();
        let dev = self.model.device();
        let n = ids.len();
        let logits = self
            .model
            .logits(&ids, 0, n, Some(&l.adapter))
            .map_err(err)?;
        let idx: Vec<u32> = targets.iter().map(|&t| t as u32).collect();
        let idx = Tensor::new(idx.as_slice(), dev).map_err(err)?;
        let lp = log_softmax(&logits)
            .and_then(|x| {
                Ok(x.squeeze(0)?
                    .gather(&idx.unsqueeze(1)?, D::Minus1)?
                    .squeeze(1)?)
            })
            .map_err(err)?;
        let old = Tensor::new(old, dev).map_err(err)?;
        let adv = Tensor::new(advantages, dev).map_err(err)?;
        let loss = (lp.clone() - old)
            .and_then(|d| d.exp())
            .and_then(|r| r * adv)
            .and_then(|x| x.sum_all())
            .and_then(|s| s.neg())
            .map_err(err)?;
        if !forward_only {
            let grads = loss.backward().map_err(err)?;
            let pending = l.grads.get_or_insert_with(BTreeMap::new);
            for (key, var) in l.adapter.params() {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let sum = match pending.remove(key) {
                        Some(prev) => (prev + g).map_err(err)?,
                        None => g.clone(),
                    };
                    pending.insert(key.clone(), sum);
                }
            }
        }
        let lps: Vec<f32> = lp.to_vec1().map_err(err)?;
        let loss: f32 = loss.to_scalar().map_err(err)?;
        Ok((lps, f64::from(loss)))
    }

    /// Adam on training model `id` with its pending gradient; the trained adapter is kept
    /// under `new_weights`, the fingerprint the world gives the result.
    pub(crate) fn optim_step(&self, id: &str, adam: &Adam, new_weights: u64) -> R<()> {
        let mut live = self.live();
        let l = live.get_mut(id).ok_or("no such training model")?;
        let Some(grads) = l.grads.take() else {
            return Ok(());
        };
        l.adam.beta1 = adam.beta1;
        l.adam.beta2 = adam.beta2;
        l.adam.eps = adam.eps;
        l.adam.weight_decay = 0.0;
        (l.adam)
            .step(l.adapter.params(), &grads, adam.learning_rate)
            .map_err(err)?;
        let snapshot = l.adapter.snapshot(&self.model.config).map_err(err)?;
        self.adapters().insert(new_weights, Arc::new(snapshot));
        Ok(())
    }

    /// `compute_logprobs`: NaN at position 0, then each token's log-prob after those
    /// before it.
    pub(crate) fn prompt_logprobs(&self, weights: u64, prompt: &[i32]) -> R<Vec<f32>> {
        let ids: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
        let mut out = vec![f32::NAN];
        if ids.len() > 1 {
            let adapter = self.adapter(weights);
            let lps = token_logprobs(&self.model, &ids, 1, adapter.as_deref()).map_err(err)?;
            out.extend(lps);
        }
        Ok(out)
    }

    /// One sampled continuation: tokens, their log-probs, whether it hit `max_tokens`, and
    /// the `params.topk` likeliest tokens at each position.
    pub(crate) fn sample(
        &self,
        weights: u64,
        prompt: &[i32],
        params: &SampleParams,
        index: usize,
    ) -> R<Sampled> {
        let ids: Vec<u32> = prompt.iter().map(|&t| t as u32).collect();
        let adapter = self.adapter(weights);
        let sampling = Sampling {
            temperature: params.temperature as f32,
            top_p: params.top_p as f32,
            max_tokens: params.max_tokens,
            seed: Some(params.seed.wrapping_add(index as u64)),
            stop_ids: params.stop_ids.clone(),
            top_logprobs: params.topk,
        };
        let (tokens, finish) =
            generate(&self.model, adapter.as_deref(), &ids, &sampling, |_| true).map_err(err)?;
        let ids = tokens.iter().map(|t| t.id as i32).collect();
        let lps = tokens.iter().map(|t| t.logprob).collect();
        let top = tokens
            .iter()
            .map(|t| t.top.iter().map(|&(id, lp)| (id as i32, lp)).collect())
            .collect();
        Ok((ids, lps, finish == Finish::Length, top))
    }
}

/// A sample: tokens, log-probs, whether it hit `max_tokens`, each position's top-k.
pub(crate) type Sampled = (Vec<i32>, Vec<f32>, bool, Vec<Vec<(i32, f32)>>);

/// The sampling settings of an `asample` request.
pub(crate) struct SampleParams {
    pub temperature: f64,
    pub top_p: f64,
    pub max_tokens: usize,
    pub seed: u64,
    pub stop_ids: Vec<u32>,
    /// `topk_sample_logprobs` (at most 20).
    pub topk: usize,
}
