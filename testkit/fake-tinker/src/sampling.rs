//! Sampling routes (§6.10, §6.11, §6.13): sampling sessions on a base model or a
//! `sampler_weights` checkpoint, and `asample`, whose result is a protobuf `SampleResponse`
//! (a `compute_logprobs` is an `asample` with `prompt_logprobs: true`).

use axum::body::Bytes;
use axum::extract::Path;
use prost::Message;
use serde::Deserialize;

use crate::futures::{submit, Outcome};
use crate::proto::{self, SampleResponse, SampledSequence};
use crate::*;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/api/v1/create_sampling_session",
            post(create_sampling_session),
        )
        .route("/api/v1/samplers/{id}", get(get_sampler))
        .route("/api/v1/asample", post(asample))
}

#[derive(Deserialize)]
struct CreateSamplingSession {
    session_id: String,
    sampling_session_seq_id: u64,
    base_model: Option<String>,
    model_path: Option<String>,
}

/// What a sampler samples from: a checkpoint's weights, or a base model's.
fn resolve(
    s: &Shared,
    world: &World,
    base_model: Option<&str>,
    model_path: Option<&str>,
) -> Result<(String, u64), Reject> {
    if let Some(path) = model_path {
        let c = world.checkpoints.get(path).ok_or_else(|| {
            reject(
                StatusCode::NOT_FOUND,
                format!("checkpoint {path} not found"),
            )
        })?;
        return Ok((c.base_model.clone(), c.weights));
    }
    match base_model {
        Some(b) if s.knows_base_model(b) => Ok((b.to_owned(), model::base_weights(b))),
        Some(b) => Err(reject(
            StatusCode::BAD_REQUEST,
            format!("unknown base model {b:?}"),
        )),
        None => Err(reject(
            StatusCode::BAD_REQUEST,
            "give base_model or model_path",
        )),
    }
}

async fn create_sampling_session(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: CreateSamplingSession = parse(&body)?;
    let mut world = s.world();
    world.live_session(&req.session_id)?;
    let (base_model, weights) = resolve(
        &s,
        &world,
        req.base_model.as_deref(),
        req.model_path.as_deref(),
    )?;
    let id = format!("{}:sample:{}", req.session_id, req.sampling_session_seq_id);
    let sampler = Sampler {
        session: req.session_id,
        base_model,
        model_path: req.model_path,
        weights,
    };
    world.samplers.insert(id.clone(), sampler);
    Ok(ok(
        json!({"sampling_session_id": id, "type": "create_sampling_session"}),
    ))
}

async fn get_sampler(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.world().samplers.get(&id) {
        None => detail(StatusCode::NOT_FOUND, &format!("sampler {id} not found")),
        Some(sampler) => {
            let mut body = json!({"sampler_id": id, "base_model": sampler.base_model});
            if let Some(path) = &sampler.model_path {
                body["model_path"] = json!(path);
            }
            ok(body)
        }
    }
}

#[derive(Deserialize)]
struct Asample {
    #[serde(default = "one")]
    num_samples: usize,
    prompt: ModelInput,
    sampling_params: SamplingParams,
    sampling_session_id: Option<String>,
    base_model: Option<String>,
    model_path: Option<String>,
    #[serde(default)]
    prompt_logprobs: bool,
    #[serde(default)]
    topk_sample_logprobs: usize,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
struct ModelInput {
    chunks: Vec<TextChunk>,
}

#[derive(Deserialize)]
struct TextChunk {
    tokens: Vec<i32>,
}

#[derive(Deserialize)]
struct SamplingParams {
    max_tokens: Option<usize>,
    seed: Option<i64>,
    #[serde(default = "one_f64")]
    temperature: f64,
    #[serde(default = "one_f64")]
    top_p: f64,
    /// Stop strings or token ids; the model path honours token ids.
    #[serde(default)]
    stop: Option<serde_json::Value>,
}

fn one_f64() -> f64 {
    1.0
}

/// Tokens a sample may have when the request sets no `max_tokens`.
const DEFAULT_MAX_TOKENS: usize = 16;

async fn asample(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: Asample = parse(&body)?;
    let mut world = s.world();
    let weights = sampler_weights(&s, &world, &req)?;
    let prompt: Vec<i32> = req
        .prompt
        .chunks
        .iter()
        .flat_map(|c| c.tokens.clone())
        .collect();
    if prompt.is_empty() {
        return Err(reject(StatusCode::BAD_REQUEST, "the prompt has no tokens"));
    }
    let max_tokens = req.sampling_params.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let seed = req.sampling_params.seed.unwrap_or(0);
    let (sequences, prompt_lps) = match &s.brain {
        Some(b) => brain_samples(b, weights, &prompt, &req, max_tokens)
            .map_err(|e| reject(StatusCode::INTERNAL_SERVER_ERROR, e))?,
        None => {
            let vocab = &s.opts.sample_vocab;
            let k = req.topk_sample_logprobs;
            let seqs = (0..req.num_samples)
                .map(|i| sequence(weights, &prompt, seed, i, max_tokens, vocab, k))
                .collect();
            let lps = req
                .prompt_logprobs
                .then(|| model::prompt_logprobs(weights, &prompt));
            (seqs, lps)
        }
    };
    let response = SampleResponse {
        sequences,
        prompt_logprobs: prompt_lps.map(|l| proto::f32_bytes(&l)),
        prompt_cache_hit_tokens: 0,
    };
    let result = Outcome::Proto(response.encode_to_vec());
    submit(&s, &mut world, result, None, Some(req.num_samples))
}

/// The samples (and prompt log-probs when asked) from the model ([`crate::brain`]).
fn brain_samples(
    b: &crate::brain::Brain,
    weights: u64,
    prompt: &[i32],
    req: &Asample,
    max_tokens: usize,
) -> Result<(Vec<SampledSequence>, Option<Vec<f32>>), String> {
    let sp = &req.sampling_params;
    let stop_ids = match &sp.stop {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(serde_json::Value::as_u64)
            .map(|t| t as u32)
            .collect(),
        _ => Vec::new(),
    };
    let params = crate::brain::SampleParams {
        temperature: sp.temperature,
        top_p: sp.top_p,
        max_tokens,
        seed: sp.seed.unwrap_or(0) as u64,
        stop_ids,
        topk: req.topk_sample_logprobs.min(20),
    };
    let mut sequences = Vec::new();
    for i in 0..req.num_samples {
        let (tokens, logprobs, hit_max, top) = b.sample(weights, prompt, &params, i)?;
        sequences.push(SampledSequence {
            stop_reason: if hit_max {
                proto::STOP_REASON_LENGTH
            } else {
                proto::STOP_REASON_STOP
            },
            tokens: proto::i32_bytes(&tokens),
            logprobs: Some(proto::f32_bytes(&logprobs)),
            topk_sampled_logprobs: (params.topk > 0).then(|| proto::topk(&top, params.topk)),
        });
    }
    let lps = if req.prompt_logprobs {
        Some(b.prompt_logprobs(weights, prompt)?)
    } else {
        None
    };
    Ok((sequences, lps))
}

/// Sample number `index`, with a log-prob per token (the SDK needs them non-empty).
fn sequence(
    weights: u64,
    prompt: &[i32],
    seed: i64,
    index: usize,
    max: usize,
    vocab: &std::ops::Range<i32>,
    topk: usize,
) -> SampledSequence {
    let (tokens, logprobs, hit_max) = model::sample(weights, prompt, seed, index, max, vocab);
    // The hash model's top-k at each position: the `topk` likeliest ids of the vocabulary.
    let top = (topk > 0).then(|| {
        let rows: Vec<Vec<(i32, f32)>> = (0..tokens.len())
            .map(|i| {
                let pos = prompt.len() + i;
                let mut row: Vec<(i32, f32)> = vocab
                    .clone()
                    .map(|t| (t, model::logprob(weights, i64::from(t), pos)))
                    .collect();
                row.sort_by(|a, b| b.1.total_cmp(&a.1));
                row.truncate(topk);
                row
            })
            .collect();
        proto::topk(&rows, topk)
    });
    let stop_reason = if hit_max {
        proto::STOP_REASON_LENGTH
    } else {
        proto::STOP_REASON_STOP
    };
    SampledSequence {
        stop_reason,
        tokens: proto::i32_bytes(&tokens),
        logprobs: Some(proto::f32_bytes(&logprobs)),
        topk_sampled_logprobs: top,
    }
}

/// The weights an `asample` samples from: its sampling session's (whose session must be
/// live), else its `model_path`'s or `base_model`'s.
fn sampler_weights(s: &Shared, world: &World, req: &Asample) -> Result<u64, Reject> {
    let Some(id) = &req.sampling_session_id else {
        let (base, path) = (req.base_model.as_deref(), req.model_path.as_deref());
        return resolve(s, world, base, path).map(|(_, w)| w);
    };
    let sampler = world
        .samplers
        .get(id)
        .ok_or_else(|| reject(StatusCode::NOT_FOUND, format!("sampler {id} not found")))?;
    world.live_session(&sampler.session)?;
    Ok(sampler.weights)
}
