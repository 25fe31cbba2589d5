//! The eval's HTTP calls: LoRA init, chat (through the CLaaS proxy, or an OpenClaw gateway
//! when `openclaw_url` is set), `/v1/score` and `/v1/feedback`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::config::EvalConfig;
use crate::preferences::Message;

/// The system prompt CLaaS's eval sends through its own proxy.
pub const SYSTEM_PROMPT: &str = "You are a helpful assistant.";

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CallError(pub String);

pub type CallResult<T> = Result<T, CallError>;

pub struct Client {
    http: reqwest::Client,
    claas: String,
    /// OpenClaw gateway and its bearer token.
    openclaw: Option<(String, Option<String>)>,
}

/// One generated answer.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub text: String,
    /// Per token: the chosen token's log-prob and its top alternatives' log-probs.
    pub logprobs: Vec<(f64, Vec<f64>)>,
}

async fn json_of(r: reqwest::Response, what: &str) -> CallResult<Value> {
    let status = r.status();
    let body = r
        .text()
        .await
        .map_err(|e| CallError(format!("{what}: {e}")))?;
    if !status.is_success() {
        return Err(CallError(format!("{what}: HTTP {status}: {body}")));
    }
    serde_json::from_str(&body).map_err(|e| CallError(format!("{what}: not JSON: {e}")))
}

impl Client {
    /// A client for `cfg`; an OpenClaw gateway gets the bearer `OPENCLAW_GATEWAY_TOKEN`.
    pub fn new(cfg: &EvalConfig) -> Client {
        Client::with_gateway_token(cfg, std::env::var("OPENCLAW_GATEWAY_TOKEN").ok())
    }

    /// [`Client::new`] with the gateway's token given rather than read from the environment.
    pub fn with_gateway_token(cfg: &EvalConfig, token: Option<String>) -> Client {
        Client {
            http: reqwest::Client::new(),
            claas: cfg.claas_url.trim_end_matches('/').to_owned(),
            openclaw: cfg
                .openclaw_url
                .as_ref()
                .map(|u| (u.trim_end_matches('/').to_owned(), token)),
        }
    }

    async fn post(&self, url: &str, body: &Value, timeout_s: u64, what: &str) -> CallResult<Value> {
        let r = self
            .http
            .post(url)
            .timeout(Duration::from_secs(timeout_s))
            .header("Prefer", format!("wait={timeout_s}"))
            .json(body)
            .send()
            .await
            .map_err(|e| CallError(format!("{what}: {e}")))?;
        json_of(r, what).await
    }

    /// Creates the LoRA (idempotently) and returns its id as the API names it.
    pub async fn init(&self, lora_id: &str, base_model: Option<&str>) -> CallResult<String> {
        let mut body = json!({"lora_id": lora_id});
        if let Some(b) = base_model {
            body["base_model"] = json!(b);
        }
        let v = self
            .post(
                &format!("{}/v1/lora/init", self.claas),
                &body,
                300,
                "lora init",
            )
            .await?;
        Ok(v["lora_id"].as_str().unwrap_or(lora_id).to_owned())
    }

    /// The messages a prompt is sent as: the system prompt through CLaaS's proxy, the
    /// user's message alone through OpenClaw (which adds its own).
    pub fn messages(&self, user: &str) -> Vec<Message> {
        let mut m = Vec::new();
        if self.openclaw.is_none() {
            m.push(Message {
                role: "system".into(),
                content: SYSTEM_PROMPT.into(),
            });
        }
        m.push(Message {
            role: "user".into(),
            content: user.into(),
        });
        m
    }

    /// Generates an answer from LoRA `model` (`top_logprobs` > 0 asks for log-probs).
    pub async fn chat(
        &self,
        model: &str,
        user: &str,
        temperature: f64,
        max_tokens: u32,
        top_logprobs: u32,
    ) -> CallResult<Answer> {
        let (url, model) = match &self.openclaw {
            Some((u, _)) => (format!("{u}/v1/chat/completions"), "openclaw"),
            None => (format!("{}/v1/chat/completions", self.claas), model),
        };
        let mut body = json!({"model": model, "messages": self.messages(user),
            "temperature": temperature, "max_tokens": max_tokens});
        if top_logprobs > 0 {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(top_logprobs);
        }
        let mut req = self
            .http
            .post(&url)
            .timeout(Duration::from_secs(120))
            .json(&body);
        if let Some((_, Some(token))) = &self.openclaw {
            req = req.bearer_auth(token);
        }
        let r = req
            .send()
            .await
            .map_err(|e| CallError(format!("chat: {e}")))?;
        let v = json_of(r, "chat").await?;
        let choice = &v["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .ok_or_else(|| CallError(format!("chat: no message content in {v}")))?
            .to_owned();
        let logprobs = choice["logprobs"]["content"]
            .as_array()
            .map(|tokens| {
                tokens
                    .iter()
                    .map(|t| {
                        let top = t["top_logprobs"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|x| x["logprob"].as_f64()).collect())
                            .unwrap_or_default();
                        (t["logprob"].as_f64().unwrap_or(0.0), top)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Answer { text, logprobs })
    }

    /// The summed log-prob of `completion` after `messages` under LoRA `model`.
    pub async fn score(
        &self,
        model: &str,
        messages: &[Message],
        completion: &str,
    ) -> CallResult<f64> {
        let body = json!({"model": model, "messages": messages, "completion": completion});
        let v = self
            .post(&format!("{}/v1/score", self.claas), &body, 60, "score")
            .await?;
        v["logprob_sum"]
            .as_f64()
            .ok_or_else(|| CallError(format!("score: no logprob_sum in {v}")))
    }

    /// Sends one feedback batch and waits for its training step; returns the step's
    /// metrics (`distill_result.metadata`).
    pub async fn feedback(&self, requests: &[Value]) -> CallResult<Value> {
        let body = json!({"requests": requests,
            "orchestration": {"sleep_before": false, "wake_after": false}});
        let v = self
            .post(
                &format!("{}/v1/feedback", self.claas),
                &body,
                180,
                "feedback",
            )
            .await?;
        Ok(v["distill_result"]["metadata"].clone())
    }
}
