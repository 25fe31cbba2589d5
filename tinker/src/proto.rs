//! The protobuf messages of package `tinker_public` this client writes and reads (§3.4): a
//! `ForwardBackwardRequest` out; `ForwardBackwardOutput` and `SampleResponse` back. Field
//! numbers are the SDK's descriptor's (`tinker/proto/tinker_public_pb2.py`); arrays travel as
//! packed little-endian bytes, as numpy writes them. Fields CLaaS never sets or reads (images,
//! provenance spans, prompt top-k) are left out: prost skips them when decoding.

use std::collections::HashMap;

pub(crate) const DTYPE_FLOAT32: i32 = 1;
pub(crate) const DTYPE_INT64: i32 = 2;
pub(crate) const DTYPE_INT32: i32 = 3;
pub(crate) const DTYPE_BFLOAT16: i32 = 4;

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

/// `Chunk { oneof chunk { EncodedTextChunk encoded_text = 1; … } }`.
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

/// `Tensor { oneof encoding { bytes dense = 1; … } DType dtype = 3; repeated int64 shape = 4; }`;
/// `shape` stays empty, as the SDK leaves it for a TensorData without one (1-D).
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
    /// int64 *byte* offsets into `data`, one per datum plus one.
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
    /// float32, one per prompt token; NaN where none was computed.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub prompt_logprobs: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct SampledSequence {
    /// `STOP_REASON_STOP = 0`, `STOP_REASON_LENGTH = 1`.
    #[prost(int32, tag = "1")]
    pub stop_reason: i32,
    /// int32 token ids.
    #[prost(bytes = "vec", tag = "2")]
    pub tokens: Vec<u8>,
    /// float32, one per token; empty or absent means none.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub logprobs: Option<Vec<u8>>,
    /// With `topk_sample_logprobs`: the most likely tokens at each position.
    #[prost(message, optional, tag = "4")]
    pub topk_sampled_logprobs: Option<TopkLogprobs>,
}

/// `(length, k)` matrices, row-major: int32 token ids and float32 log-probs; a row is padded
/// with the sentinel (token 0, log-prob -99999) (`tinker/types/topk_logprobs.py`).
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

/// Little-endian packed values of one fixed width, read from `bytes` (whose length must be a
/// multiple of `N`).
pub(crate) fn unpack<const N: usize, T>(
    bytes: &[u8],
    from: fn([u8; N]) -> T,
) -> Result<Vec<T>, String> {
    if !bytes.len().is_multiple_of(N) {
        return Err(format!(
            "{} bytes is not a whole number of {N}-byte values",
            bytes.len()
        ));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            from(a)
        })
        .collect())
}

pub(crate) fn pack_i32(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn pack_i64(values: &[i64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) fn pack_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
