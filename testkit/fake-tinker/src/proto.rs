//! The protobuf messages of package `tinker_public` that the fake reads and writes (§3.4):
//! `ForwardBackwardRequest` in, `ForwardBackwardOutput` and `SampleResponse` out. Field
//! numbers are the SDK's descriptor's (`tinker/proto/tinker_public_pb2.py`). Arrays travel as
//! packed little-endian bytes. Written apart from `claas-tinker`'s copy on purpose: the fake is
//! checked against the real SDK, and the client against the fake.

use std::collections::HashMap;

pub(crate) const DTYPE_FLOAT32: i32 = 1;
pub(crate) const DTYPE_INT64: i32 = 2;
pub(crate) const STOP_REASON_STOP: i32 = 0;
pub(crate) const STOP_REASON_LENGTH: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ForwardBackwardRequest {
    #[prost(string, tag = "1")]
    pub model_id: String,
    #[prost(int32, tag = "2")]
    pub seq_id: i32,
    #[prost(message, repeated, tag = "3")]
    pub data: Vec<Datum>,
    #[prost(string, tag = "4")]
    pub loss_fn: String,
    #[prost(bool, tag = "6")]
    pub forward_only: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Datum {
    #[prost(message, repeated, tag = "1")]
    pub model_input: Vec<Chunk>,
    #[prost(map = "string, message", tag = "2")]
    pub loss_fn_inputs: HashMap<String, Tensor>,
}

/// `Chunk { oneof chunk { EncodedTextChunk encoded_text = 1; ... } }`; other chunk kinds
/// (images, audio) are skipped as unknown fields and leave `encoded_text` empty.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Chunk {
    #[prost(message, optional, tag = "1")]
    pub encoded_text: Option<EncodedTextChunk>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct EncodedTextChunk {
    /// int32 token ids.
    #[prost(bytes = "vec", tag = "1")]
    pub tokens: Vec<u8>,
}

/// `Tensor { oneof encoding { bytes dense = 1; SparseCsr sparse_csr = 2; } ... }`; the fake
/// reads dense tensors only (the SDK writes sparse ones only when asked to).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct Tensor {
    #[prost(bytes = "vec", optional, tag = "1")]
    pub dense: Option<Vec<u8>>,
    #[prost(int32, tag = "3")]
    pub dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub shape: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ForwardBackwardOutput {
    #[prost(string, tag = "1")]
    pub loss_fn_output_type: String,
    #[prost(message, repeated, tag = "2")]
    pub loss_fn_outputs: Vec<ArrayRecord>,
    #[prost(map = "string, double", tag = "3")]
    pub metrics: HashMap<String, f64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ArrayRecord {
    #[prost(string, tag = "1")]
    pub type_tag: String,
    #[prost(map = "string, message", tag = "2")]
    pub fields: HashMap<String, BatchedTensor>,
    #[prost(int64, tag = "3")]
    pub num_datums: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct BatchedTensor {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
    /// int64 byte offsets into `data`, one per datum plus one.
    #[prost(bytes = "vec", tag = "2")]
    pub offsets: Vec<u8>,
    #[prost(int32, tag = "3")]
    pub dtype: i32,
    #[prost(int64, repeated, tag = "4")]
    pub trailing_shape: Vec<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SampleResponse {
    #[prost(message, repeated, tag = "1")]
    pub sequences: Vec<SampledSequence>,
    /// float32, one per prompt token, NaN where none was computed.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub prompt_logprobs: Option<Vec<u8>>,
    #[prost(int32, tag = "4")]
    pub prompt_cache_hit_tokens: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SampledSequence {
    #[prost(int32, tag = "1")]
    pub stop_reason: i32,
    /// int32 token ids.
    #[prost(bytes = "vec", tag = "2")]
    pub tokens: Vec<u8>,
    /// float32, one per token; the SDK reads an empty string as "no log-probs".
    #[prost(bytes = "vec", optional, tag = "3")]
    pub logprobs: Option<Vec<u8>>,
    #[prost(message, optional, tag = "4")]
    pub topk_sampled_logprobs: Option<TopkLogprobs>,
}

/// `(length, k)` row-major matrices of int32 ids and float32 log-probs, rows padded with
/// (0, -99999) (`tinker/types/topk_logprobs.py`).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct TopkLogprobs {
    #[prost(bytes = "vec", tag = "1")]
    pub token_ids: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub logprobs: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub k: u32,
    #[prost(uint32, tag = "4")]
    pub length: u32,
}

/// Per-position `(token, log-prob)` lists as the matrices, padded to `k`.
pub(crate) fn topk(rows: &[Vec<(i32, f32)>], k: usize) -> TopkLogprobs {
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    for row in rows {
        for j in 0..k {
            let (id, lp) = row.get(j).copied().unwrap_or((0, -99999.0));
            ids.push(id);
            lps.push(lp);
        }
    }
    TopkLogprobs {
        token_ids: i32_bytes(&ids),
        logprobs: f32_bytes(&lps),
        k: k as u32,
        length: rows.len() as u32,
    }
}

pub(crate) fn i32s(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub(crate) fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

pub(crate) fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub(crate) fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn i64_bytes(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
