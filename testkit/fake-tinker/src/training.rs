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
    let model = Model {
        session: req.session_id,
        weights: model::base_weights(&req.base_model),
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

/// One decoded datum: its targets and the importance-sampling inputs.
struct Datum {
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
    let inputs: usize = d
        .model_input
        .iter()
        .map(|c| {
            c.encoded_text
                .as_ref()
                .map_or(0, |t| proto::i32s(&t.tokens).len())
        })
        .sum();
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
    let (output, grad) = run_forward_backward(m.weights, m.grad, &data);
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
    let (mut all, mut offsets, mut loss) = (Vec::new(), vec![0i64], 0.0);
    for d in data {
        let lps = model::target_logprobs(weights, &d.targets);
        loss += model::importance_sampling_loss(&lps, &d.old_logprobs, &d.advantages);
        grad = Some(model::accumulate(grad, &d.targets, &d.advantages));
        all.extend_from_slice(&lps);
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
        num_datums: data.len() as i64,
    };
    let output = ForwardBackwardOutput {
        loss_fn_output_type: "ArrayRecord".into(),
        loss_fn_outputs: vec![record],
        metrics: HashMap::from([("loss:sum".to_owned(), loss)]),
    };
    (output, grad.unwrap_or(0))
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
}

impl Default for AdamParams {
    fn default() -> Self {
        // The SDK's default (`tinker/types/optimizer.py`).
        AdamParams {
            learning_rate: 1e-4,
        }
    }
}

async fn optim_step(State(s): State<Arc<Shared>>, body: Bytes) -> Answer {
    let req: OptimStep = parse(&body)?;
    let mut world = s.world();
    let m = world.live_model(&req.model_id)?;
    m.steps += 1;
    m.weights = model::adam_step(
        m.weights,
        m.steps,
        m.grad.take(),
        req.adam_params.learning_rate,
    );
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
