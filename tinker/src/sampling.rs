//! Sampling calls (§6.10, §6.11, §6.13): sampling sessions, `asample`, and
//! `compute_logprobs`, which is an `asample` asking for the prompt's log-probs.

use serde::Deserialize;
use serde_json::json;

use crate::futures::Pending;
use crate::types::{SampleResponse, SamplerSource, SamplingParams};
use crate::{Error, Result, TinkerClient};

/// What an `asample` asks for besides samples.
#[derive(Debug, Default, Clone, Copy)]
struct Extra {
    /// The prompt's log-probs (`compute_logprobs`).
    prompt_logprobs: bool,
    /// The most likely tokens at each sampled position.
    topk_sample_logprobs: u32,
}

impl TinkerClient {
    /// `create_sampling_session`: a sampler on a base model or a `sampler_weights`
    /// checkpoint. `seq_id` counts the session's sampling sessions from 0.
    pub async fn create_sampling_session(
        &self,
        session_id: &str,
        seq_id: u64,
        source: &SamplerSource,
    ) -> Result<String> {
        #[derive(Deserialize)]
        struct Created {
            sampling_session_id: String,
        }
        let mut body = json!({
            "session_id": session_id, "sampling_session_seq_id": seq_id,
            "type": "create_sampling_session",
        });
        match source {
            SamplerSource::BaseModel(m) => body["base_model"] = json!(m),
            SamplerSource::ModelPath(p) => body["model_path"] = json!(p.to_string()),
        }
        let call = "create_sampling_session";
        let created: Created = self.post_json(call, call, body).await?;
        Ok(created.sampling_session_id)
    }

    /// Submits `asample`: `num_samples` continuations of `prompt`. `seq_id` counts the
    /// sampler's requests from 0.
    pub async fn asample(
        &self,
        sampling_session_id: &str,
        seq_id: u64,
        prompt: &[i32],
        num_samples: u32,
        params: &SamplingParams,
    ) -> Result<Pending<SampleResponse>> {
        self.submit_sample(
            sampling_session_id,
            seq_id,
            prompt,
            num_samples,
            params,
            Extra::default(),
        )
        .await
    }

    /// [`Self::sample`] that also asks for the `topk` most likely tokens at each sampled
    /// position ([`crate::SampledSequence::top`]).
    pub async fn sample_with_topk(
        &self,
        sampling_session_id: &str,
        seq_id: u64,
        prompt: &[i32],
        params: &SamplingParams,
        topk: u32,
    ) -> Result<SampleResponse> {
        let extra = Extra {
            topk_sample_logprobs: topk,
            ..Extra::default()
        };
        let pending = self
            .submit_sample(sampling_session_id, seq_id, prompt, 1, params, extra)
            .await?;
        self.wait(&pending).await
    }

    /// [`Self::asample`], then its result.
    pub async fn sample(
        &self,
        sampling_session_id: &str,
        seq_id: u64,
        prompt: &[i32],
        num_samples: u32,
        params: &SamplingParams,
    ) -> Result<SampleResponse> {
        let pending = self
            .asample(sampling_session_id, seq_id, prompt, num_samples, params)
            .await?;
        self.wait(&pending).await
    }

    /// `compute_logprobs`: the log-prob of each prompt token given those before it, `None`
    /// where none was computed (the first). The SDK's form: one sample of one token.
    pub async fn compute_logprobs(
        &self,
        sampling_session_id: &str,
        seq_id: u64,
        prompt: &[i32],
    ) -> Result<Vec<Option<f32>>> {
        let params = SamplingParams {
            max_tokens: Some(1),
            ..SamplingParams::default()
        };
        let extra = Extra {
            prompt_logprobs: true,
            ..Extra::default()
        };
        let pending = self
            .submit_sample(sampling_session_id, seq_id, prompt, 1, &params, extra)
            .await?;
        let call = "compute_logprobs";
        self.wait(&pending)
            .await?
            .prompt_logprobs
            .ok_or_else(|| Error::Decode {
                call,
                message: "the result has no prompt_logprobs".into(),
            })
    }

    async fn submit_sample(
        &self,
        sampling_session_id: &str,
        seq_id: u64,
        prompt: &[i32],
        num_samples: u32,
        params: &SamplingParams,
        extra: Extra,
    ) -> Result<Pending<SampleResponse>> {
        let Extra {
            prompt_logprobs,
            topk_sample_logprobs,
        } = extra;
        let body = json!({
            "num_samples": num_samples,
            "prompt": {"chunks": [{"tokens": prompt, "type": "encoded_text"}]},
            "sampling_params": params,
            "sampling_session_id": sampling_session_id,
            "seq_id": seq_id,
            "prompt_logprobs": prompt_logprobs,
            "topk_prompt_logprobs": 0,
            "topk_sample_logprobs": topk_sample_logprobs,
            "prompt_alt_tokens_k": 0,
            "type": "sample",
        });
        let call = if prompt_logprobs {
            "compute_logprobs"
        } else {
            "asample"
        };
        let pending: Pending<SampleResponse> =
            self.submit_to(call, "asample", "Sample", body).await?;
        if pending.sample_sequence_ids.len() != num_samples as usize {
            let message = format!(
                "{} sample_sequence_ids for {num_samples} samples",
                pending.sample_sequence_ids.len()
            );
            return Err(Error::Decode { call, message });
        }
        Ok(pending)
    }
}
