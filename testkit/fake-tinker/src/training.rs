//! Training routes (§6.3–§6.9, §6.14): LoRA models, forward_backward (protobuf both ways),
//! optim_step, saving and loading checkpoints, and deleting them.

use axum::body::Bytes;
use axum::extract::Path;
use axum::routing::delete;
use prost::Message;
use serde::Deserialize;

use crate::futures::{submit, Outcome};
use crate::proto::{self, ArrayRecord, BatchedTensor, ForwardBackwardOutput, Tensor};
use crate::*;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v1/create_model", post(create_model))
        .route("/api/v1/get_info", post(get_info))
        .route("/api/v1/forward_backward", post(forward_backward))
        .route("/api/v1/optim_step", post(optim_step))
        .route("/api/v1/save_weights", post(save_weights))
        .route(
            "/api/v1/save_weights_for_sampler",
            post(save_weights_for_sampler),
        )
        .route("/api/v1/load_weights", post(load_weights))
        .route(
            "/api/v1/training_runs/{run}/checkpoints/{kind}/{name}",
            delete(delete_checkpoint),
        )
}

#[derive(Deserialize)]
struct CreateModel {
    session_id: String,
    model_seq_id: u64,
    base_model: String,
    lora_config: LoraConfig,
}

#[derive(Deserialize)]
struct LoraConfig {
    rank: u32,
}

/// The model id the server derives, and the SDK assumes on create-via-load (§6.9).
fn model_id(session: &str, model_seq_id: u64) -> String {
    format!("{session}:train:{model_seq_id}")
}

async fn create_model(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: CreateModel = parse(&body)?;
    if !s.knows_base_model(&req.base_model) {
        let msg = format!("unknown base model {:?}", req.base_model);
        return Err(reject(StatusCode::BAD_REQUEST, msg));
    }
    if req.lora_config.rank == 0 {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "LoRA rank must be at least 1",
        ));
    }
    let mut world = s.world();
    world.live_session(&req.session_id)?;
    let id = model_id(&req.session_id, req.model_seq_id);
    let weights = model::base_weights(&req.base_model);
    if let Some(b) = &s.brain {
        b.start_model(&id, weights, req.lora_config.rank, &req.base_model)
            .map_err(|e| reject(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    }
    let model = Model {
        session: req.session_id,
        weights,
        base_model: req.base_model,
        rank: req.lora_config.rank,
        steps: 0,
        grad: None,
    };
    world.models.insert(id.clone(), model);
    let result = Outcome::Json(json!({"model_id": id, "type": "create_model"}));
    submit(&s, &mut world, result, Some(&id), None)
}

#[derive(Deserialize)]
struct ModelRef {
    model_id: String,
}

async fn get_info(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: ModelRef = parse(&body)?;
    let mut world = s.world();
    let m = world.live_model(&req.model_id)?;
    Ok(ok(json!({
        "model_id": req.model_id,
        "model_data": {"arch": "fake", "model_name": m.base_model},
        "model_name": m.base_model,
        "is_lora": true,
        "lora_rank": m.rank,
        "type": "get_info",
    })))
}

/// One decoded datum: its input tokens, targets and the importance-sampling inputs.
struct Datum {
    inputs: Vec<i32>,
    targets: Vec<i64>,
    old_logprobs: Vec<f32>,
    advantages: Vec<f32>,
}

fn dense<'a>(t: &'a Tensor, name: &str, dtype: i32) -> Result<&'a [u8], String> {
    if t.dtype != dtype {
        return Err(format!(
            "{name}: dtype {} where {dtype} was expected",
            t.dtype
        ));
    }
    t.dense
        .as_deref()
        .ok_or_else(|| format!("{name}: only dense tensors are supported"))
}

fn decode_datum(d: &proto::Datum) -> Result<Datum, String> {
    let tokens: Vec<i32> = d
        .model_input
        .iter()
        .flat_map(|c| {
            c.encoded_text
                .as_ref()
                .map_or_else(Vec::new, |t| proto::i32s(&t.tokens))
        })
        .collect();
    let inputs = tokens.len();
    let input = |name: &str| {
        d.loss_fn_inputs
            .get(name)
            .ok_or_else(|| format!("loss_fn_inputs lacks {name}"))
    };
    let targets = proto::i64s(dense(
        input("target_tokens")?,
        "target_tokens",
        proto::DTYPE_INT64,
    )?);
    let old_logprobs = proto::f32s(dense(input("logprobs")?, "logprobs", proto::DTYPE_FLOAT32)?);
    let advantages = proto::f32s(dense(
        input("advantages")?,
        "advantages",
        proto::DTYPE_FLOAT32,
    )?);
    if targets.len() != inputs || old_logprobs.len() != inputs || advantages.len() != inputs {
        return Err(format!(
            "lengths differ: {inputs} input tokens, {} targets, {} logprobs, {} advantages",
            targets.len(),
            old_logprobs.len(),
            advantages.len()
        ));
    }
    Ok(Datum {
        inputs: tokens,
        targets,
        old_logprobs,
        advantages,
    })
}

async fn forward_backward(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let bad = |msg: String| reject(StatusCode::BAD_REQUEST, msg);
    let req = proto::ForwardBackwardRequest::decode(body.as_ref())
        .map_err(|e| bad(format!("not a ForwardBackwardRequest: {e}")))?;
    if req.loss_fn != "importance_sampling" {
        return Err(bad(format!(
            "the fake supports loss_fn importance_sampling, not {:?}",
            req.loss_fn
        )));
    }
    let data = req
        .data
        .iter()
        .map(decode_datum)
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    let mut world = s.world();
    let m = world.live_model(&req.model_id)?;
    let (output, grad) = match &s.brain {
        Some(b) => brain_forward_backward(b, &req.model_id, m.grad, &data, req.forward_only)
            .map_err(|e| reject(StatusCode::INTERNAL_SERVER_ERROR, e))?,
        None => run_forward_backward(m.weights, m.grad, &data),
    };
    if !req.forward_only {
        m.grad = Some(grad);
    }
    let result = Outcome::Proto(output.encode_to_vec());
    submit(&s, &mut world, result, Some(&req.model_id), None)
}

/// The output (per-datum target log-probs, `loss:sum`) and the gradient after these datums.
fn run_forward_backward(
    weights: u64,
    grad: Option<u64>,
    data: &[Datum],
) -> (ForwardBackwardOutput, u64) {
    let mut grad = grad;
    let mut per_datum = Vec::new();
    let mut loss = 0.0;
    for d in data {
        let lps = model::target_logprobs(weights, &d.targets);
        loss += model::importance_sampling_loss(&lps, &d.old_logprobs, &d.advantages);
        grad = Some(model::accumulate(grad, &d.targets, &d.advantages));
        per_datum.push(lps);
    }
    (output_of(&per_datum, loss), grad.unwrap_or(0))
}

/// [`run_forward_backward`] on the model ([`crate::brain`]): real log-probs, loss and
/// gradient; the fingerprint still folds in the datums, so the next weights are named.
fn brain_forward_backward(
    b: &crate::brain::Brain,
    model_id: &str,
    grad: Option<u64>,
    data: &[Datum],
    forward_only: bool,
) -> Result<(ForwardBackwardOutput, u64), String> {
    let mut grad = grad;
    let mut per_datum = Vec::new();
    let mut loss = 0.0;
    for d in data {
        let (lps, l) = b.forward_backward(
            model_id,
            &d.inputs,
            &d.targets,
            &d.old_logprobs,
            &d.advantages,
            forward_only,
        )?;
        loss += l;
        grad = Some(model::accumulate(grad, &d.targets, &d.advantages));
        per_datum.push(lps);
    }
    Ok((output_of(&per_datum, loss), grad.unwrap_or(0)))
}

/// forward_backward's answer: each datum's target log-probs, and `loss:sum`.
fn output_of(per_datum: &[Vec<f32>], loss: f64) -> ForwardBackwardOutput {
    let (mut all, mut offsets) = (Vec::new(), vec![0i64]);
    for lps in per_datum {
        all.extend_from_slice(lps);
        offsets.push(4 * all.len() as i64);
    }
    let logprobs = BatchedTensor {
        data: proto::f32_bytes(&all),
        offsets: proto::i64_bytes(&offsets),
        dtype: proto::DTYPE_FLOAT32,
        trailing_shape: Vec::new(),
    };
    let record = ArrayRecord {
        type_tag: "ArrayRecord".into(),
        fields: HashMap::from([("logprobs".to_owned(), logprobs)]),
        num_datums: per_datum.len() as i64,
    };
    ForwardBackwardOutput {
        loss_fn_output_type: "ArrayRecord".into(),
        loss_fn_outputs: vec![record],
        metrics: HashMap::from([("loss:sum".to_owned(), loss)]),
    }
}

#[derive(Deserialize)]
struct OptimStep {
    model_id: String,
    #[serde(default)]
    adam_params: AdamParams,
}

#[derive(Deserialize)]
#[serde(default)]
struct AdamParams {
    learning_rate: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Default for AdamParams {
    fn default() -> Self {
        // The SDK's defaults (`tinker/types/optimizer.py`).
        AdamParams {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-12,
        }
    }
}

async fn optim_step(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: OptimStep = parse(&body)?;
    let mut world = s.world();
    let m = world.live_model(&req.model_id)?;
    m.steps += 1;
    let a = &req.adam_params;
    let before = m.weights;
    m.weights = model::adam_step(m.weights, m.steps, m.grad.take(), a.learning_rate);
    if let Some(b) = s.brain.as_ref().filter(|_| m.weights != before) {
        let adam = crate::brain::Adam {
            learning_rate: a.learning_rate,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
        };
        b.optim_step(&req.model_id, &adam, m.weights)
            .map_err(|e| reject(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    }
    let result = Outcome::Json(json!({"metrics": {"step:max": m.steps as f64}}));
    submit(&s, &mut world, result, Some(&req.model_id), None)
}

#[derive(Deserialize)]
struct SaveWeights {
    model_id: String,
    /// The checkpoint's name, not a URI.
    path: Option<String>,
    #[serde(default)]
    overwrite: bool,
}

async fn save_weights(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    save(s, body, "weights").await
}

async fn save_weights_for_sampler(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    save(s, body, "sampler_weights").await
}

/// `save_weights` (`kind` "weights") and `save_weights_for_sampler` ("sampler_weights"): the
/// result is `{"path": "tinker://<model_id>/<kind>/<name>"}`. The nameless sampler save
/// answers a sampling session instead (§6.8).
async fn save(s: Arc<Shared>, body: Bytes, kind: &str) -> Answer {
    let req: SaveWeights = parse(&body)?;
    let mut world = s.world();
    let m = world.live_model(&req.model_id)?.clone();
    let Some(name) = req.path else {
        if kind == "weights" {
            let name = format!("ckpt-{}", world.fresh_id());
            return store_checkpoint(&s, &mut world, &req.model_id, &m, kind, &name, false);
        }
        let id = format!("{}:sample:{}", m.session, world.fresh_id());
        let sampler = Sampler {
            session: m.session.clone(),
            base_model: m.base_model.clone(),
            model_path: None,
            weights: m.weights,
        };
        world.samplers.insert(id.clone(), sampler);
        let result = Outcome::Json(json!({"sampling_session_id": id}));
        return submit(&s, &mut world, result, Some(&req.model_id), None);
    };
    if name.is_empty() || name.contains('/') {
        let msg = format!("checkpoint name {name:?} must be non-empty and have no '/'");
        return Err(reject(StatusCode::BAD_REQUEST, msg));
    }
    store_checkpoint(
        &s,
        &mut world,
        &req.model_id,
        &m,
        kind,
        &name,
        req.overwrite,
    )
}

fn store_checkpoint(
    s: &Shared,
    world: &mut World,
    model_id: &str,
    m: &Model,
    kind: &str,
    name: &str,
    overwrite: bool,
) -> Answer {
    let path = format!("tinker://{model_id}/{kind}/{name}");
    let result = if world.checkpoints.contains_key(&path) && !overwrite {
        Outcome::Failed {
            error: format!("checkpoint {path} already exists"),
            category: "user",
        }
    } else {
        let checkpoint = Checkpoint {
            base_model: m.base_model.clone(),
            rank: m.rank,
            weights: m.weights,
        };
        world.checkpoints.insert(path.clone(), checkpoint);
        let kind = if kind == "weights" {
            "save_weights"
        } else {
            "save_weights_for_sampler"
        };
        Outcome::Json(json!({"path": path, "type": kind}))
    };
    submit(s, world, result, Some(model_id), None)
}

#[derive(Deserialize)]
struct LoadWeights {
    path: String,
    session_id: Option<String>,
    model_seq_id: Option<u64>,
    model_id: Option<String>,
}

/// Both addressing modes (§6.9): create-via-load (`session_id` + `model_seq_id`) makes a new
/// model from a `weights` checkpoint; the legacy form (`model_id`) overwrites one. Adam state
/// is not modelled, so `optimizer: true` loads the same thing. An unknown path is a
/// RequestFailed result, as §11.6 asks.
async fn load_weights(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: LoadWeights = parse(&body)?;
    let mut world = s.world();
    let id = match (&req.session_id, req.model_seq_id, &req.model_id) {
        (Some(session), Some(seq), _) => {
            world.live_session(session)?;
            model_id(session, seq)
        }
        (_, _, Some(id)) => {
            world.live_model(id)?;
            id.clone()
        }
        _ => {
            let msg = "load_weights needs session_id and model_seq_id, or model_id";
            return Err(reject(StatusCode::UNPROCESSABLE_ENTITY, msg));
        }
    };
    let found = world
        .checkpoints
        .get(&req.path)
        .filter(|_| req.path.contains("/weights/"))
        .cloned();
    let Some(c) = found else {
        let result = Outcome::Failed {
            error: format!("training checkpoint {} not found", req.path),
            category: "user",
        };
        return submit(&s, &mut world, result, Some(&id), None);
    };
    let session = id.split(":train:").next().unwrap_or_default().to_owned();
    if let Some(b) = &s.brain {
        b.start_model(&id, c.weights, c.rank, &c.base_model)
            .map_err(|e| reject(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    }
    let model = Model {
        session,
        base_model: c.base_model,
        rank: c.rank,
        weights: c.weights,
        steps: 0,
        grad: None,
    };
    world.models.insert(id.clone(), model);
    let result = Outcome::Json(json!({"path": req.path, "model_id": id, "type": "load_weights"}));
    submit(&s, &mut world, result, Some(&id), None)
}

/// `DELETE /api/v1/training_runs/{run}/checkpoints/{kind}/{name}`: the checkpoint id holds a
/// slash, which the SDK does not encode (§6.14).
async fn delete_checkpoint(
    State(s): State<Arc<Shared>>,
    Path((run, kind, name)): Path<(String, String, String)>,
) -> Response {
    let path = format!("tinker://{run}/{kind}/{name}");
    match s.world().checkpoints.remove(&path) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => detail(
            StatusCode::NOT_FOUND,
            &format!("checkpoint {path} not found"),
        ),
    }
}
