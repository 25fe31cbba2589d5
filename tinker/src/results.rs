//! What each future resolves to, decoded as the SDK decodes it
//! (`tinker/proto/response_conv.py`): `ForwardBackwardOutput` and `SampleResponse` from
//! protobuf, the rest from JSON.

use std::collections::BTreeMap;

use prost::Message;
use serde::Deserialize;

use crate::futures::{json_result, FutureResult, Polled};
use crate::proto::{self, unpack};
use crate::types::{
    ForwardBackwardOutput, OptimStepResponse, SampleResponse, SampledSequence, StopReason,
    TensorData,
};
use crate::TinkerPath;

/// `create_model`'s result.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CreateModelResponse {
    pub model_id: String,
}

/// `load_weights`' result; both fields are optional on the wire.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct LoadWeightsResponse {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub model_id: Option<String>,
}

impl FutureResult for CreateModelResponse {
    fn decode(body: Polled) -> Result<Self, String> {
        json_result(body)
    }
}

impl FutureResult for LoadWeightsResponse {
    fn decode(body: Polled) -> Result<Self, String> {
        json_result(body)
    }
}

impl FutureResult for OptimStepResponse {
    fn decode(body: Polled) -> Result<Self, String> {
        json_result(body)
    }
}

/// `save_weights` and `save_weights_for_sampler` answer `{"path": "tinker://…"}`.
impl FutureResult for TinkerPath {
    fn decode(body: Polled) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Saved {
            path: String,
        }
        let saved: Saved = json_result(body)?;
        saved.path.parse().map_err(|e: crate::Error| e.to_string())
    }
}

fn proto_body(body: Polled) -> Result<Vec<u8>, String> {
    match body {
        Polled::Proto(bytes) => Ok(bytes),
        Polled::Json(_) => Err("a JSON body where protobuf was expected".into()),
    }
}

impl FutureResult for ForwardBackwardOutput {
    const PROTO: bool = true;

    fn decode(body: Polled) -> Result<Self, String> {
        let msg = proto::ForwardBackwardOutput::decode(proto_body(body)?.as_slice())
            .map_err(|e| format!("not a ForwardBackwardOutput: {e}"))?;
        let mut outputs: Vec<BTreeMap<String, TensorData>> = Vec::new();
        for record in &msg.loss_fn_outputs {
            let start = outputs.len();
            for (name, tensor) in &record.fields {
                for (i, values) in per_datum(tensor)?.into_iter().enumerate() {
                    if outputs.len() <= start + i {
                        outputs.resize_with(start + i + 1, BTreeMap::new);
                    }
                    outputs[start + i].insert(name.clone(), values);
                }
            }
            let declared = usize::try_from(record.num_datums).unwrap_or(0);
            if outputs.len() < start + declared {
                outputs.resize_with(start + declared, BTreeMap::new);
            }
        }
        let kind = msg
            .loss_fn_output_type
            .rsplit(':')
            .next()
            .unwrap_or_default();
        Ok(ForwardBackwardOutput {
            loss_fn_output_type: if kind.is_empty() { "ArrayRecord" } else { kind }.to_owned(),
            loss_fn_outputs: outputs,
            metrics: msg.metrics.into_iter().collect(),
        })
    }
}

/// A batched tensor sliced into one flat tensor per datum by its byte offsets; int32 widens
/// to int64 and bfloat16 to float32, as the SDK does.
fn per_datum(t: &proto::BatchedTensor) -> Result<Vec<TensorData>, String> {
    let offsets = unpack::<8, i64>(&t.offsets, i64::from_le_bytes)?;
    let slice = |i: usize| -> Result<&[u8], String> {
        let (a, b) = (offsets[i], offsets[i + 1]);
        let range = usize::try_from(a).ok().zip(usize::try_from(b).ok());
        range
            .and_then(|(a, b)| t.data.get(a..b))
            .ok_or_else(|| format!("offsets {a}..{b} outside {} data bytes", t.data.len()))
    };
    (0..offsets.len().saturating_sub(1))
        .map(|i| {
            let bytes = slice(i)?;
            Ok(match t.dtype {
                proto::DTYPE_FLOAT32 => TensorData::Float32(unpack(bytes, f32::from_le_bytes)?),
                proto::DTYPE_INT64 => TensorData::Int64(unpack(bytes, i64::from_le_bytes)?),
                proto::DTYPE_INT32 => TensorData::Int64(
                    unpack(bytes, i32::from_le_bytes)?
                        .into_iter()
                        .map(i64::from)
                        .collect(),
                ),
                proto::DTYPE_BFLOAT16 => TensorData::Float32(
                    unpack(bytes, u16::from_le_bytes)?
                        .into_iter()
                        .map(|h| f32::from_bits(u32::from(h) << 16))
                        .collect(),
                ),
                other => return Err(format!("unsupported dtype {other}")),
            })
        })
        .collect()
}

impl FutureResult for SampleResponse {
    const PROTO: bool = true;

    fn decode(body: Polled) -> Result<Self, String> {
        let msg = proto::SampleResponse::decode(proto_body(body)?.as_slice())
            .map_err(|e| format!("not a SampleResponse: {e}"))?;
        let sequences = msg
            .sequences
            .iter()
            .map(sequence)
            .collect::<Result<Vec<_>, String>>()?;
        let prompt_logprobs = match msg.prompt_logprobs.as_deref() {
            None | Some([]) => None,
            Some(bytes) => Some(
                unpack(bytes, f32::from_le_bytes)?
                    .into_iter()
                    .map(|v| (!v.is_nan()).then_some(v))
                    .collect(),
            ),
        };
        Ok(SampleResponse {
            sequences,
            prompt_logprobs,
        })
    }
}

fn sequence(s: &proto::SampledSequence) -> Result<SampledSequence, String> {
    let stop_reason = match s.stop_reason {
        0 => StopReason::Stop,
        1 => StopReason::Length,
        other => return Err(format!("unknown stop_reason {other}")),
    };
    let logprobs = match s.logprobs.as_deref() {
        None | Some([]) => None,
        Some(bytes) => Some(unpack(bytes, f32::from_le_bytes)?),
    };
    Ok(SampledSequence {
        tokens: unpack(&s.tokens, i32::from_le_bytes)?,
        logprobs,
        stop_reason,
        top: s.topk_sampled_logprobs.as_ref().map(topk).transpose()?,
    })
}

/// The SDK's sentinel for an empty top-k slot (`MASK_LOGPROB`).
const MASK_LOGPROB: f32 = -99999.0;

/// Top-k matrices as one list of pairs per position, padding dropped.
fn topk(t: &proto::TopkLogprobs) -> Result<Vec<Vec<(i32, f32)>>, String> {
    let (n, k) = (t.length as usize, t.k as usize);
    let ids = unpack(&t.token_ids, i32::from_le_bytes)?;
    let lps = unpack(&t.logprobs, f32::from_le_bytes)?;
    if ids.len() != n * k || lps.len() != n * k {
        return Err(format!(
            "top-k matrices of {} ids and {} log-probs for {n} x {k}",
            ids.len(),
            lps.len()
        ));
    }
    Ok((0..n)
        .map(|row| {
            let pairs = ids[row * k..(row + 1) * k]
                .iter()
                .zip(&lps[row * k..(row + 1) * k]);
            pairs
                .filter(|(&id, &lp)| !(id == 0 && lp == MASK_LOGPROB))
                .map(|(&id, &lp)| (id, lp))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_batched_tensor_is_sliced_per_datum_by_byte_offsets() -> Result<(), String> {
        let logprobs = proto::BatchedTensor {
            data: proto::pack_f32(&[-1.0, -2.0, -3.0]),
            offsets: proto::pack_i64(&[0, 8, 12]),
            dtype: proto::DTYPE_FLOAT32,
            trailing_shape: Vec::new(),
        };
        let msg = proto::ForwardBackwardOutput {
            loss_fn_output_type: "tinker:ArrayRecord".into(),
            loss_fn_outputs: vec![proto::ArrayRecord {
                type_tag: String::new(),
                fields: HashMap::from([("logprobs".to_owned(), logprobs)]),
                num_datums: 2,
            }],
            metrics: HashMap::from([("loss:sum".to_owned(), 1.5)]),
        };
        let out = ForwardBackwardOutput::decode(Polled::Proto(msg.encode_to_vec()))?;
        assert_eq!(out.loss_fn_output_type, "ArrayRecord");
        let lp = |i: usize| {
            out.loss_fn_outputs[i]["logprobs"]
                .as_f32()
                .map(<[f32]>::to_vec)
        };
        assert_eq!(lp(0), Some(vec![-1.0, -2.0]));
        assert_eq!(lp(1), Some(vec![-3.0]));
        assert_eq!(out.metrics["loss:sum"], 1.5);
        Ok(())
    }

    #[test]
    fn nan_prompt_logprobs_read_as_none_and_an_unknown_stop_reason_is_an_error() {
        let msg = proto::SampleResponse {
            sequences: vec![],
            prompt_logprobs: Some(proto::pack_f32(&[f32::NAN, -0.5])),
        };
        let out = SampleResponse::decode(Polled::Proto(msg.encode_to_vec()));
        assert_eq!(
            out.map(|r| r.prompt_logprobs),
            Ok(Some(vec![None, Some(-0.5)]))
        );
        let bad = proto::SampleResponse {
            sequences: vec![proto::SampledSequence {
                stop_reason: 7,
                tokens: vec![],
                logprobs: None,
                topk_sampled_logprobs: None,
            }],
            prompt_logprobs: None,
        };
        assert!(SampleResponse::decode(Polled::Proto(bad.encode_to_vec())).is_err());
    }

    #[test]
    fn top_k_rows_drop_the_sdks_padding() -> Result<(), String> {
        let matrices = proto::TopkLogprobs {
            token_ids: proto::pack_i32(&[5, 9, 7, 0]),
            logprobs: proto::pack_f32(&[-0.1, -2.0, -0.3, MASK_LOGPROB]),
            k: 2,
            length: 2,
        };
        let rows = topk(&matrices)?;
        assert_eq!(rows, vec![vec![(5, -0.1), (9, -2.0)], vec![(7, -0.3)]]);
        let short = proto::TopkLogprobs { k: 3, ..matrices };
        assert!(topk(&short).is_err(), "matrices of the wrong size");
        Ok(())
    }
}
