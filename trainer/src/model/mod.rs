//! A differentiable Qwen3 forward with LoRA on any of its seven projections.
//!
//! candle-transformers' Qwen3 cannot train: its projections are private and its fused
//! RMSNorm, RoPE, softmax and KV cache cut the gradient without an error. This forward uses
//! only ops with a backward, and computes the base model (adapter off) with exactly the same
//! ops as the student, so a zero adapter reproduces the base log-probs bit for bit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor, D};

use crate::config::{Module, Qwen3Config};
use crate::error::{checkpoint, invalid, Result};
use crate::frozen;
use crate::lora::LoraAdapter;

mod attend;
mod cached;
mod checkpoint;
mod fused;
mod load;
mod simd;

pub use cached::KvCache;

use checkpoint::checkpointed;
pub use checkpoint::GradSink;
use fused::transpose_2d;

#[derive(Clone)]
struct Layer {
    /// Indexed by [`Module::index`]; each held transposed, `(in, out)` and contiguous (the
    /// checkpoint stores `(out, in)`), the layout the CPU GEMM is fastest on.
    proj: [Tensor; 7],
    /// The same projections `(out, in)` and contiguous, for the input gradient `g · W` of
    /// the backward: made by the first forward that tracks gradients on the CPU in f32,
    /// where `gemm` packs a weight read through its transpose one scalar at a time
    /// (`cargo bench -p claas-trainer --bench matmul`). Inference never makes them.
    proj_rows: Arc<OnceLock<[Tensor; 7]>>,
    q_norm: Tensor,
    k_norm: Tensor,
    input_norm: Tensor,
    post_attention_norm: Tensor,
}

/// A Qwen3 base model held in memory (read from disk once per process).
pub struct Qwen3 {
    pub config: Qwen3Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// The LM head transposed, `(hidden, vocab)` and contiguous, made by the first product
    /// of many rows on the CPU in f32 (`x · Eᵀ` then runs on the fast layout, as the
    /// projections do; decoding's one row does not need it).
    lm_head_t: Arc<OnceLock<Tensor>>,
    device: Device,
    dtype: DType,
}

/// `t` in `dtype` on `device`, transposed there when asked (a projection).
fn place(t: Tensor, device: &Device, dtype: DType, transpose: bool) -> Result<Tensor> {
    let t = t.to_dtype(dtype)?.to_device(device)?;
    Ok(if transpose { transpose_2d(&t)? } else { t })
}

impl Qwen3 {
    /// Loads `config.json` and the weights (`model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`) from a checkpoint directory, in `dtype` on `device`.
    /// One tensor at a time: for an f32 model on the CPU each is read from disk straight
    /// into f32, the projections transposed in the same pass; for any other dtype or device
    /// it is read as stored and placed as [`Qwen3::from_tensors`] places it (converted,
    /// moved, then transposed where it lands). The values are exactly those of
    /// [`Qwen3::from_tensors`] on the same tensors.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = Qwen3Config::from_dir(dir)?;
        let mut ckpt = load::Checkpoint::open(weight_files(dir)?)?;
        let direct = dtype == DType::F32 && device.is_cpu();
        Self::build(config, device, dtype, |name, shape, transpose| {
            if direct {
                ckpt.read(name, shape, transpose)
            } else {
                place(ckpt.read_stored(name, shape)?, device, dtype, transpose)
            }
        })
    }

    /// Builds the model from named tensors (Hugging Face names).
    pub fn from_tensors(
        config: Qwen3Config,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::build(config, device, dtype, |name, shape, transpose| {
            let t = tensors
                .remove(name)
                .ok_or_else(|| checkpoint(format!("checkpoint has no tensor {name}")))?;
            if t.dims() != shape {
                return Err(checkpoint(format!(
                    "{name} has shape {:?}, the config implies {shape:?}",
                    t.dims()
                )));
            }
            place(t, device, dtype, transpose)
        })
    }

    /// The model from `take(name, shape, transpose)`: the tensor `name` of `shape` in the
    /// model's dtype on `device`, transposed when asked (the projections).
    fn build(
        config: Qwen3Config,
        device: &Device,
        dtype: DType,
        mut take: impl FnMut(&str, &[usize], bool) -> Result<Tensor>,
    ) -> Result<Self> {
        let c = &config;
        let embed = take(
            "model.embed_tokens.weight",
            &[c.vocab_size, c.hidden_size],
            false,
        )?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut proj = Vec::with_capacity(7);
            for m in Module::ALL {
                let (inp, out) = c.shape_of(m);
                let name = format!("{p}.{}.{}.weight", m.block(), m.name());
                proj.push(take(&name, &[out, inp], true)?);
            }
            let proj: [Tensor; 7] = proj
                .try_into()
                .map_err(|_| checkpoint("seven projections per layer"))?;
            layers.push(Layer {
                proj,
                proj_rows: Arc::default(),
                q_norm: take(
                    &format!("{p}.self_attn.q_norm.weight"),
                    &[c.head_dim],
                    false,
                )?,
                k_norm: take(
                    &format!("{p}.self_attn.k_norm.weight"),
                    &[c.head_dim],
                    false,
                )?,
                input_norm: take(
                    &format!("{p}.input_layernorm.weight"),
                    &[c.hidden_size],
                    false,
                )?,
                post_attention_norm: take(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[c.hidden_size],
                    false,
                )?,
            });
        }
        let norm = take("model.norm.weight", &[c.hidden_size], false)?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight", &[c.vocab_size, c.hidden_size], false)?
        };
        Ok(Qwen3 {
            config,
            embed,
            layers,
            norm,
            lm_head,
            lm_head_t: Arc::default(),
            device: device.clone(),
            dtype,
        })
    }

    /// [`Qwen3::lm_head_t`] for a product of `rows` rows, made on first use; `None` where
    /// the held layout serves (one row, another device or dtype).
    fn lm_head_t(&self, rows: usize) -> candle_core::Result<Option<&Tensor>> {
        if rows < 2 || !cpu_f32(&self.lm_head) {
            return Ok(None);
        }
        once(&self.lm_head_t, || transpose_2d(&self.lm_head)).map(Some)
    }

    /// A copy of the weights on `device` (the `host` residency copies a host-resident
    /// model to the GPU when a job starts).
    pub fn to_device(&self, device: &Device) -> Result<Qwen3> {
        let mv = |t: &Tensor| t.to_device(device);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let proj: Vec<Tensor> =
                    l.proj.iter().map(mv).collect::<candle_core::Result<_>>()?;
                let proj: [Tensor; 7] = proj
                    .try_into()
                    .map_err(|_| checkpoint("seven projections per layer"))?;
                Ok(Layer {
                    proj,
                    proj_rows: Arc::default(),
                    q_norm: mv(&l.q_norm)?,
                    k_norm: mv(&l.k_norm)?,
                    input_norm: mv(&l.input_norm)?,
                    post_attention_norm: mv(&l.post_attention_norm)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = mv(&self.embed)?;
        let lm_head = if self.config.tie_word_embeddings {
            embed.clone()
        } else {
            mv(&self.lm_head)?
        };
        Ok(Qwen3 {
            config: self.config.clone(),
            embed,
            layers,
            norm: mv(&self.norm)?,
            lm_head,
            lm_head_t: Arc::default(),
            device: device.clone(),
            dtype: self.dtype,
        })
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.proj
                    .iter()
                    .chain(l.proj_rows.get().into_iter().flatten())
                    .map(size)
                    .sum::<usize>()
                    + size(&l.q_norm)
                    + size(&l.k_norm)
                    + size(&l.input_norm)
                    + size(&l.post_attention_norm)
            })
            .sum();
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            size(&self.lm_head)
        };
        let head_t = self.lm_head_t.get().map_or(0, size);
        size(&self.embed) + layers + size(&self.norm) + head + head_t
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Checks token ids against the vocabulary.
    pub fn check_ids(&self, what: &str, ids: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        match ids.iter().find(|&&id| id as usize >= v) {
            Some(id) => Err(invalid(format!(
                "{what}: token id {id} is outside the vocabulary (size {v})"
            ))),
            None => Ok(()),
        }
    }

    /// Logits `(1, count, V)` in f32 predicting tokens `from + 1 ..= from + count` of `ids`,
    /// i.e. the hidden states at positions `from .. from + count`. With `lora`, the adapter
    /// is applied and the result is differentiable with respect to its tensors; without, the
    /// base model runs outside any graph.
    pub fn logits(
        &self,
        ids: &[u32],
        from: usize,
        count: usize,
        lora: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        self.logits_with(ids, from, count, lora, None)
    }

    /// [`Qwen3::logits`] with per-layer activation checkpointing when `sink` is given: each
    /// decoder layer keeps only its input, re-runs itself during backward, and adds its
    /// adapter gradients to `sink` (they do not appear in the outer gradient store).
    pub fn logits_with(
        &self,
        ids: &[u32],
        from: usize,
        count: usize,
        lora: Option<&LoraAdapter>,
        sink: Option<&GradSink>,
    ) -> Result<Tensor> {
        if ids.is_empty() || from + count > ids.len() {
            return Err(invalid(format!(
                "positions {from}..{} outside a sequence of {}",
                from + count,
                ids.len()
            )));
        }
        let track = lora.is_some();
        let c = &self.config;
        let seq = ids.len();
        let input = Tensor::new(ids, &self.device)?;
        let mut x = self.embed.index_select(&input, 0)?.unsqueeze(0)?;
        let ctx = Context {
            config: c.clone(),
            dtype: self.dtype,
            rope: self.rope(seq)?,
            mask: causal_mask(seq, &self.device, self.dtype)?,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let run = LayerRun {
                layer: layer.clone(),
                lora: Module::ALL.map(|m| {
                    lora.and_then(|a| a.pair(li, m))
                        .map(|(a, b, s)| (a.clone(), b.clone(), s))
                }),
            };
            x = match (sink, lora) {
                (Some(sink), Some(adapter)) => checkpointed(&run, &ctx, &x, adapter, li, sink)?,
                _ => run.forward(&ctx, &x, track)?,
            };
        }
        let x = x.narrow(1, from, count)?;
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        let logits = match self.lm_head_t(x.elem_count() / c.hidden_size)? {
            Some(head_t) => frozen::linear_held(&x, head_t, Some(&self.lm_head), track)?,
            None => frozen::linear(&x, &self.lm_head, track)?,
        };
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// `(cos, sin)` of shape `(seq, head_dim)`, Hugging Face's non-interleaved layout.
    fn rope(&self, seq: usize) -> Result<(Tensor, Tensor)> {
        let d = self.config.head_dim;
        let theta = self.config.rope_theta as f32;
        let inv: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / d as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, d / 2), &self.device)?;
        let pos: Vec<f32> = (0..seq).map(|p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (seq, 1), &self.device)?;
        let freqs = pos.broadcast_mul(&inv)?;
        let emb = Tensor::cat(&[&freqs, &freqs], 1)?;
        Ok((
            emb.cos()?.to_dtype(self.dtype)?,
            emb.sin()?.to_dtype(self.dtype)?,
        ))
    }
}

/// Hugging Face's RMSNorm: in f32, `x / sqrt(mean(x²) + eps)`, then times the weight.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

/// `x·cos + rotate_half(x)·sin` for `x` of shape `(1, heads, seq, d)`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Softmax over the last dimension with a detached max shift.
fn softmax(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn causal_mask(seq: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let data: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (seq, seq), device)?.to_dtype(dtype)?)
}

/// The safetensors files of a checkpoint: the index's shards, or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let doc: serde_json::Value = serde_json::from_str(&text)?;
        let map = doc
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| checkpoint(format!("{} has no weight_map", index.display())))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        Ok(vec![single])
    } else {
        Err(checkpoint(format!(
            "{} has neither model.safetensors nor model.safetensors.index.json",
            dir.display()
        )))
    }
}

/// What every layer of one forward shares.
#[derive(Clone)]
struct Context {
    config: Qwen3Config,
    dtype: DType,
    /// `(cos, sin)`, each `(seq, head_dim)`.
    rope: (Tensor, Tensor),
    mask: Tensor,
}

/// Whether `t` is on the CPU in f32 (where the second layouts pay).
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The value in `cell`, made by `make` if it is empty (two racing callers may both make
/// it; one is kept).
fn once<T>(
    cell: &OnceLock<T>,
    make: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<&T> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = make()?;
    Ok(cell.get_or_init(|| v))
}

impl Layer {
    /// [`Layer::proj_rows`], made on first use; `None` off the CPU or in another dtype.
    fn proj_rows(&self) -> candle_core::Result<Option<&[Tensor; 7]>> {
        if !cpu_f32(&self.proj[0]) {
            return Ok(None);
        }
        let make = || {
            let rows: Vec<Tensor> = self
                .proj
                .iter()
                .map(transpose_2d)
                .collect::<candle_core::Result<_>>()?;
            rows.try_into()
                .map_err(|_| candle_core::Error::Msg("seven projections per layer".into()))
        };
        once(&self.proj_rows, make).map(Some)
    }
}

/// One decoder layer with its adapter (A, B, scaling per projection), as owned handles, so
/// the checkpointing op can re-run it during backward.
#[derive(Clone)]
struct LayerRun {
    layer: Layer,
    lora: [Option<(Tensor, Tensor, f64)>; 7],
}

impl LayerRun {
    fn linear(&self, h: &Tensor, m: Module, track: bool) -> candle_core::Result<Tensor> {
        let rows = match track {
            true => self.layer.proj_rows()?.map(|r| &r[m.index()]),
            false => None,
        };
        let base = frozen::linear_held(h, &self.layer.proj[m.index()], rows, track)?;
        match &self.lora[m.index()] {
            Some((a, b, scale)) => {
                // The adapter stays in f32 (its master copy); a bf16 base gets its
                // contribution cast back after the scaling, as PEFT does.
                let h32 = h.to_dtype(a.dtype())?;
                let delta = frozen::matmul_2d(&frozen::matmul_2d(&h32, &a.t()?)?, &b.t()?)?;
                let delta = (delta * *scale)?.to_dtype(base.dtype())?;
                base + delta
            }
            None => Ok(base),
        }
    }

    /// The layer without adapter gradients: the adapter's tensors detached.
    fn detached(&self) -> LayerRun {
        LayerRun {
            layer: self.layer.clone(),
            lora: self
                .lora
                .clone()
                .map(|p| p.map(|(a, b, s)| (a.detach(), b.detach(), s))),
        }
    }

    fn forward(&self, ctx: &Context, x: &Tensor, track: bool) -> candle_core::Result<Tensor> {
        let c = &ctx.config;
        let l = &self.layer;
        let seq = x.dim(1)?;
        let h = rms_norm(x, &l.input_norm, c.rms_norm_eps)?;
        let heads = |t: Tensor, n: usize| t.reshape((1, seq, n, c.head_dim));
        let q = heads(self.linear(&h, Module::Q, track)?, c.num_attention_heads)?;
        let k = heads(self.linear(&h, Module::K, track)?, c.num_key_value_heads)?;
        let v = heads(self.linear(&h, Module::V, track)?, c.num_key_value_heads)?;
        let q = rms_norm(&q, &l.q_norm, c.rms_norm_eps)?.transpose(1, 2)?;
        let k = rms_norm(&k, &l.k_norm, c.rms_norm_eps)?.transpose(1, 2)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (cos, sin) = &ctx.rope;
        let q = rotate(&q, cos, sin)?;
        let k = rotate(&k, cos, sin)?;
        let attn = attention(ctx, &q, &k, &v, seq)?.transpose(1, 2)?.reshape((
            1,
            seq,
            c.num_attention_heads * c.head_dim,
        ))?;
        let x = (x + self.linear(&attn, Module::O, track)?)?;
        let h = rms_norm(&x, &l.post_attention_norm, c.rms_norm_eps)?;
        let gate = self.linear(&h, Module::Gate, track)?.silu()?;
        let mlp = (gate * self.linear(&h, Module::Up, track)?)?;
        x + self.linear(&mlp, Module::Down, track)?
    }
}

/// Grouped-query attention without repeating K and V: the query heads that share a KV
/// head are stacked along the sequence axis.
fn attention(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seq: usize,
) -> candle_core::Result<Tensor> {
    let c = &ctx.config;
    let (kv, group) = (
        c.num_key_value_heads,
        c.num_attention_heads / c.num_key_value_heads,
    );
    let q = q.contiguous()?.reshape((1, kv, group * seq, c.head_dim))?;
    let scores = q.matmul(&k.t()?)?;
    let scores = (scores * (c.head_dim as f64).powf(-0.5))?
        .reshape((1, c.num_attention_heads, seq, seq))?
        .broadcast_add(&ctx.mask)?;
    let probs = softmax(&scores.to_dtype(DType::F32)?)?.to_dtype(ctx.dtype)?;
    let probs = probs.reshape((1, kv, group * seq, seq))?;
    probs
        .matmul(v)?
        .reshape((1, c.num_attention_heads, seq, c.head_dim))
}
