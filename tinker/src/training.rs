//! Sessions and training calls (§6.1–§6.9, §6.12, §6.14): JSON bodies exactly as the 0.38.0
//! SDK builds them (defaults and `type` literals included), forward_backward as protobuf.
//! Seq ids are the caller's: the SDK numbers a training client's requests 1, 2, … (§4.5).

use prost::Message;
use reqwest::Method;
use serde::Deserialize;
use serde_json::json;

use crate::futures::{Handle, Pending};
use crate::http::{read_json, Body};
use crate::proto;
use crate::results::{CreateModelResponse, LoadWeightsResponse};
use crate::types::{
    AdamParams, Datum, ForwardBackwardOutput, LossFn, ModelInfo, OptimStepResponse,
    ServerCapabilities,
};
use crate::{Result, TinkerClient, TinkerPath, WIRE_SDK_VERSION};

impl TinkerClient {
    /// `create_session`: a session id. Tinker ends a session whose heartbeats stop.
    pub async fn create_session(&self) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            session_id: String,
        }
        let body = json!({
            "tags": [], "user_metadata": {}, "sdk_version": WIRE_SDK_VERSION,
            "type": "create_session",
        });
        let created: Created = self
            .post_json("create_session", "create_session", body)
            .await?;
        Ok(created.session_id)
    }

    /// `session_heartbeat` (the SDK sends one every 10 s). A 410 means the session is over
    /// ([`crate::Error::is_session_expired`]).
    pub async fn session_heartbeat(&self, session_id: &str) -> Result<()> {
        let body = json!({"session_id": session_id, "type": "session_heartbeat"});
        let _: serde_json::Value = self
            .post_json("session_heartbeat", "session_heartbeat", body)
            .await?;
        Ok(())
    }

    /// `GET /api/v1/healthz`: Ok while Tinker answers `{"status": "ok"}`.
    pub async fn healthz(&self) -> Result<()> {
        let call = "healthz";
        self.send(call, Method::GET, call, Body::Empty).await?;
        Ok(())
    }

    /// `get_server_capabilities`: the base models Tinker serves.
    pub async fn server_capabilities(&self) -> Result<ServerCapabilities> {
        let call = "get_server_capabilities";
        let resp = self.send(call, Method::GET, call, Body::Empty).await?;
        read_json(call, resp).await
    }

    /// Submits `create_model`: a LoRA adapter of `rank` on `base_model`, training MLP,
    /// attention and unembedding, with AdamW. `model_seq_id` counts the session's training
    /// models from 0.
    pub async fn submit_create_model(
        &self,
        session_id: &str,
        model_seq_id: u64,
        base_model: &str,
        rank: u32,
    ) -> Result<Pending<CreateModelResponse>> {
        let body = json!({
            "session_id": session_id,
            "model_seq_id": model_seq_id,
            "base_model": base_model,
            "lora_config": {"rank": rank, "train_unembed": true, "train_mlp": true, "train_attn": true},
            "optimizer_config": {"type": "adamw"},
            "type": "create_model",
        });
        self.submit("create_model", "CreateModel", body).await
    }

    /// [`Self::submit_create_model`], then its model id.
    pub async fn create_model(
        &self,
        session_id: &str,
        model_seq_id: u64,
        base_model: &str,
        rank: u32,
    ) -> Result<String> {
        let pending = self
            .submit_create_model(session_id, model_seq_id, base_model, rank)
            .await?;
        Ok(self.wait(&pending).await?.model_id)
    }

    /// `get_info`: a model's base model, tokenizer and LoRA rank.
    pub async fn get_info(&self, model_id: &str) -> Result<ModelInfo> {
        let body = json!({"model_id": model_id, "type": "get_info"});
        self.post_json("get_info", "get_info", body).await
    }

    /// Submits `forward_backward` (protobuf, §6.5): gradients of `loss_fn` over `data`
    /// accumulate until the next `optim_step`.
    pub async fn submit_forward_backward(
        &self,
        model_id: &str,
        seq_id: i32,
        data: &[Datum],
        loss_fn: LossFn,
    ) -> Result<Pending<ForwardBackwardOutput>> {
        let msg = proto::ForwardBackwardRequest {
            model_id: model_id.to_owned(),
            seq_id,
            data: data.iter().map(Datum::to_proto).collect(),
            loss_fn: loss_fn.as_str().to_owned(),
            forward_only: false,
        };
        let call = "forward_backward";
        let body = Body::Proto(msg.encode_to_vec());
        let resp = self.send(call, Method::POST, call, body).await?;
        let handle: Handle = read_json(call, resp).await?;
        Ok(Pending::new(handle, call, "ForwardBackward"))
    }

    /// [`Self::submit_forward_backward`], then its output.
    pub async fn forward_backward(
        &self,
        model_id: &str,
        seq_id: i32,
        data: &[Datum],
        loss_fn: LossFn,
    ) -> Result<ForwardBackwardOutput> {
        let pending = self
            .submit_forward_backward(model_id, seq_id, data, loss_fn)
            .await?;
        self.wait(&pending).await
    }

    /// Submits `optim_step`: one Adam step with the accumulated gradients.
    pub async fn submit_optim_step(
        &self,
        model_id: &str,
        seq_id: i32,
        adam: AdamParams,
    ) -> Result<Pending<OptimStepResponse>> {
        let body = json!({
            "adam_params": adam, "model_id": model_id, "seq_id": seq_id, "type": "optim_step",
        });
        self.submit("optim_step", "OptimStep", body).await
    }

    /// [`Self::submit_optim_step`], then its result.
    pub async fn optim_step(
        &self,
        model_id: &str,
        seq_id: i32,
        adam: AdamParams,
    ) -> Result<OptimStepResponse> {
        let pending = self.submit_optim_step(model_id, seq_id, adam).await?;
        self.wait(&pending).await
    }

    /// `save_weights` (the SDK's `save_state`): training state as
    /// `tinker://<model_id>/weights/<name>`, loadable with [`Self::load_weights`].
    pub async fn save_weights(
        &self,
        model_id: &str,
        seq_id: i32,
        name: &str,
    ) -> Result<TinkerPath> {
        let body = json!({
            "model_id": model_id, "path": name, "seq_id": seq_id, "overwrite": false,
            "type": "save_weights",
        });
        let pending = self.submit("save_weights", "SaveWeights", body).await?;
        self.wait(&pending).await
    }

    /// `save_weights_for_sampler`: weights a sampling session can load, as
    /// `tinker://<model_id>/sampler_weights/<name>`.
    pub async fn save_weights_for_sampler(
        &self,
        model_id: &str,
        seq_id: i32,
        name: &str,
    ) -> Result<TinkerPath> {
        let body = json!({
            "model_id": model_id, "path": name, "seq_id": seq_id, "kind": "snapshot",
            "type": "save_weights_for_sampler",
        });
        let call = "save_weights_for_sampler";
        let pending = self.submit(call, "SaveWeightsForSampler", body).await?;
        self.wait(&pending).await
    }

    /// `load_weights`, create-via-load form (the SDK's `create_training_client_from_state`):
    /// a new training model `<session>:train:<model_seq_id>` holding `path`'s weights (and
    /// its Adam state when `optimizer`). Its next seq id is 1.
    pub async fn load_weights(
        &self,
        session_id: &str,
        model_seq_id: u64,
        path: &TinkerPath,
        optimizer: bool,
    ) -> Result<String> {
        let body = json!({
            "session_id": session_id, "model_seq_id": model_seq_id, "path": path.to_string(),
            "optimizer": optimizer, "type": "load_weights",
        });
        let pending = self
            .submit::<LoadWeightsResponse>("load_weights", "LoadWeights", body)
            .await?;
        let loaded = self.wait(&pending).await?;
        // The id the server derives, as the SDK assumes (§6.9).
        Ok(loaded
            .model_id
            .unwrap_or_else(|| format!("{session_id}:train:{model_seq_id}")))
    }

    /// Deletes a checkpoint (`DELETE /training_runs/{run}/checkpoints/{kind}/{name}`).
    pub async fn delete_checkpoint(&self, path: &TinkerPath) -> Result<()> {
        let route = format!(
            "training_runs/{}/checkpoints/{}",
            path.training_run_id,
            path.checkpoint_id()
        );
        self.send("delete_checkpoint", Method::DELETE, &route, Body::Empty)
            .await?;
        Ok(())
    }

    /// Deletes `state` and, when it is a training state, the sampler weights saved beside it
    /// under the same name ([`TinkerPath::sampler_twin`]); one already gone (404) counts as
    /// deleted.
    pub async fn delete_checkpoint_and_sampler_twin(&self, state: &TinkerPath) -> Result<()> {
        for path in std::iter::once(state.clone()).chain(state.sampler_twin()) {
            match self.delete_checkpoint(&path).await {
                Err(e) if e.status() == Some(404) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// POSTs a JSON submit to the route named `call` and returns its handle.
    pub(crate) async fn submit<T>(
        &self,
        call: &'static str,
        request_type: &'static str,
        body: serde_json::Value,
    ) -> Result<Pending<T>> {
        self.submit_to(call, call, request_type, body).await
    }

    /// POSTs a JSON submit for `call` to `route` and returns its handle.
    pub(crate) async fn submit_to<T>(
        &self,
        call: &'static str,
        route: &str,
        request_type: &'static str,
        body: serde_json::Value,
    ) -> Result<Pending<T>> {
        let handle: Handle = self.post_json(call, route, body).await?;
        Ok(Pending::new(handle, call, request_type))
    }
}
