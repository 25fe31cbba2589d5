//! A differentiable Qwen3 forward with LoRA on any of its seven projections.
//!
//! candle-transformers' Qwen3 cannot train: its projections are private and its fused
//! RMSNorm, RoPE, softmax and KV cache cut the gradient without an error. This forward uses
//! only ops with a backward, and computes the base model (adapter off) with exactly the same
//! ops as the student, so a zero adapter reproduces the base log-probs bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor, Var, D};

use crate::config::{Module, Qwen3Config};
use crate::error::{checkpoint, invalid, Result};
use crate::frozen;
use crate::lora::{peft_key, LoraAdapter};

#[derive(Clone)]
struct Layer {
    /// Indexed by [`Module::index`]; each held transposed, `(in, out)` and contiguous (the
    /// checkpoint stores `(out, in)`), the layout the CPU GEMM is fastest on.
    proj: [Tensor; 7],
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
    device: Device,
    dtype: DType,
}

impl Qwen3 {
    /// Loads `config.json` and the weights (`model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`) from a checkpoint directory, in `dtype` on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let config = Qwen3Config::from_dir(dir)?;
        let mut tensors = HashMap::new();
        for file in weight_files(dir)? {
            let loaded = candle_core::safetensors::load(&file, &Device::Cpu)
                .map_err(|e| checkpoint(format!("cannot read {}: {e}", file.display())))?;
            tensors.extend(loaded);
        }
        Self::from_tensors(config, tensors, device, dtype)
    }

    /// Builds the model from named tensors (Hugging Face names).
    pub fn from_tensors(
        config: Qwen3Config,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| checkpoint(format!("checkpoint has no tensor {name}")))?;
            if t.dims() != shape {
                return Err(checkpoint(format!(
                    "{name} has shape {:?}, the config implies {shape:?}",
                    t.dims()
                )));
            }
            Ok(t.to_dtype(dtype)?.to_device(device)?)
        };
        let c = &config;
        let embed = take("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut proj = Vec::with_capacity(7);
            for m in Module::ALL {
                let (inp, out) = c.shape_of(m);
                let w = take(
                    &format!("{p}.{}.{}.weight", m.block(), m.name()),
                    &[out, inp],
                )?;
                proj.push(w.t()?.contiguous()?);
            }
            let proj: [Tensor; 7] = proj
                .try_into()
                .map_err(|_| checkpoint("seven projections per layer"))?;
            layers.push(Layer {
                proj,
                q_norm: take(&format!("{p}.self_attn.q_norm.weight"), &[c.head_dim])?,
                k_norm: take(&format!("{p}.self_attn.k_norm.weight"), &[c.head_dim])?,
                input_norm: take(&format!("{p}.input_layernorm.weight"), &[c.hidden_size])?,
                post_attention_norm: take(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[c.hidden_size],
                )?,
            });
        }
        let norm = take("model.norm.weight", &[c.hidden_size])?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            take("lm_head.weight", &[c.vocab_size, c.hidden_size])?
        };
        Ok(Qwen3 {
            config,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            dtype,
        })
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
                l.proj.iter().map(size).sum::<usize>()
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
        size(&self.embed) + layers + size(&self.norm) + head
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
        let logits = frozen::linear(&x, &self.lm_head, track)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Inference: runs `ids` (the tokens after those already in `cache`) through the model,
    /// appending their keys and values to `cache`, and returns the f32 logits `(V,)` that
    /// predict the next token. The same ops as [`Qwen3::logits`], with no graph kept.
    pub fn forward_cached(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        lora: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        if ids.is_empty() {
            return Err(invalid("forward_cached needs at least one new token"));
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
            cache.len = 0;
        }
        let c = &self.config;
        let (past, n) = (cache.len, ids.len());
        let input = Tensor::new(ids, &self.device)?;
        let mut x = self.embed.index_select(&input, 0)?.unsqueeze(0)?;
        let (cos, sin) = self.rope(past + n)?;
        let ctx = Context {
            config: c.clone(),
            dtype: self.dtype,
            rope: (cos.narrow(0, past, n)?, sin.narrow(0, past, n)?),
            mask: offset_causal_mask(past, n, &self.device, self.dtype)?,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let run = LayerRun {
                layer: layer.clone(),
                lora: Module::ALL.map(|m| {
                    lora.and_then(|a| a.pair(li, m))
                        .map(|(a, b, s)| (a.detach(), b.detach(), s))
                }),
            };
            x = run.forward_cached(&ctx, &x, &mut cache.layers[li])?;
        }
        cache.len = past + n;
        let x = x.narrow(1, n - 1, 1)?;
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        let logits = frozen::linear(&x, &self.lm_head, false)?;
        Ok(logits.to_dtype(DType::F32)?.flatten_all()?)
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

/// Keys and values of the tokens a sequence has seen, per layer, for incremental decoding.
#[derive(Clone, Default)]
pub struct KvCache {
    /// `(k, v)` per layer, each `(1, kv_heads, len, head_dim)`.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// `(n, past + n)`: query `i` (at position `past + i`) sees keys up to its own position.
fn offset_causal_mask(past: usize, n: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let data: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..past + n).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Ok(Tensor::from_vec(data, (n, past + n), device)?.to_dtype(dtype)?)
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
        let base = frozen::linear_t(h, &self.layer.proj[m.index()], track)?;
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

impl LayerRun {
    /// [`LayerRun::forward`] for new tokens after those in `kv`, which it extends.
    fn forward_cached(
        &self,
        ctx: &Context,
        x: &Tensor,
        kv: &mut Option<(Tensor, Tensor)>,
    ) -> candle_core::Result<Tensor> {
        let c = &ctx.config;
        let l = &self.layer;
        let n = x.dim(1)?;
        let h = fused_rms_norm(x, &l.input_norm, c.rms_norm_eps)?;
        let heads = |t: Tensor, k: usize| t.reshape((1, n, k, c.head_dim));
        let q = heads(self.linear(&h, Module::Q, false)?, c.num_attention_heads)?;
        let k = heads(self.linear(&h, Module::K, false)?, c.num_key_value_heads)?;
        let v = heads(self.linear(&h, Module::V, false)?, c.num_key_value_heads)?;
        // The attention's 1/sqrt(head_dim) folded into q's norm weight (RoPE is linear), so
        // the scores need no separate scaling pass.
        let scale = (c.head_dim as f64).powf(-0.5);
        let q = fused_rms_norm(&q, &(&l.q_norm * scale)?, c.rms_norm_eps)?
            .transpose(1, 2)?
            .contiguous()?;
        let k = fused_rms_norm(&k, &l.k_norm, c.rms_norm_eps)?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (cos, sin) = &ctx.rope;
        let half = c.head_dim / 2;
        let (cos, sin) = (cos.narrow(1, 0, half)?, sin.narrow(1, 0, half)?);
        let q = candle_nn::rotary_emb::rope(&q, &cos.contiguous()?, &sin.contiguous()?)?;
        let k = candle_nn::rotary_emb::rope(&k, &cos.contiguous()?, &sin.contiguous()?)?;
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        let total = k.dim(2)?;
        let (kvh, group) = (
            c.num_key_value_heads,
            c.num_attention_heads / c.num_key_value_heads,
        );
        let qg = q.contiguous()?.reshape((1, kvh, group * n, c.head_dim))?;
        let scores = qg
            .matmul(&k.t()?)?
            .reshape((1, c.num_attention_heads, n, total))?
            .broadcast_add(&ctx.mask)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(ctx.dtype)?;
        let probs = probs.reshape((1, kvh, group * n, total))?;
        let attn = probs
            .matmul(&v)?
            .reshape((1, c.num_attention_heads, n, c.head_dim))?
            .transpose(1, 2)?
            .reshape((1, n, c.num_attention_heads * c.head_dim))?;
        *kv = Some((k, v));
        let x = (x + self.linear(&attn, Module::O, false)?)?;
        let h = fused_rms_norm(&x, &l.post_attention_norm, c.rms_norm_eps)?;
        let gate = self.linear(&h, Module::Gate, false)?;
        let mlp = swiglu(&gate, &self.linear(&h, Module::Up, false)?)?;
        x + self.linear(&mlp, Module::Down, false)
    }
}

/// `silu(gate) · up` (inference only: no backward). On the CPU in f32 it is one pass over
/// both, split across the thread pool, instead of candle's one-thread SiLU and a second
/// pass for the product.
fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let fused = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape();
    if fused {
        gate.contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &SiluMul)
    } else {
        gate.silu()? * up
    }
}

struct SiluMul;

impl candle_core::CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gl: &Layout,
        up: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (CpuStorage::F32(g), CpuStorage::F32(u)) = (gate, up) else {
            candle_core::bail!("silu-mul: f32 only");
        };
        let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: contiguous inputs only");
        };
        let (g, u) = (&g[g0..g1], &u[u0..u1]);
        let mut out = vec![0f32; g.len()];
        // Chunks big enough to amortise the pool's scheduling, small enough to share.
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((CpuStorage::F32(out), gl.shape().clone()))
    }
}

/// [`rms_norm`] in one pass per row (candle-nn's kernel; no backward, so inference only).
/// A half-precision input is normalised in f32, as Hugging Face does.
fn fused_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps as f32);
    }
    // Normalise in f32, cast, then scale in the model's dtype (the order PEFT's base uses).
    let ones = Tensor::ones(weight.dims1()?, DType::F32, x.device())?;
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    candle_nn::ops::rms_norm(&x32, &ones, eps as f32)?
        .to_dtype(dtype)?
        .broadcast_mul(weight)
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

/// Adapter gradients collected by checkpointed layers during backward, by PEFT key.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<BTreeMap<String, Tensor>>>);

impl GradSink {
    fn add(&self, key: &str, grad: &Tensor) -> candle_core::Result<()> {
        let mut map = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("gradient sink poisoned".into()))?;
        let sum = match map.remove(key) {
            Some(prev) => (prev + grad)?,
            None => grad.clone(),
        };
        map.insert(key.to_string(), sum);
        Ok(())
    }

    /// Takes the collected gradients, leaving the sink empty.
    pub fn take(&self) -> BTreeMap<String, Tensor> {
        self.0
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }
}

/// The checkpointing op: forward passes the layer's output (computed outside the graph)
/// through; backward re-runs the layer from its input with the graph on, back-propagates
/// the incoming gradient through it, returns the input's gradient and hands the adapter's
/// to the sink.
struct Checkpoint {
    run: LayerRun,
    ctx: Context,
    /// `(PEFT key, tensor)` of this layer's adapter matrices.
    params: Vec<(String, Tensor)>,
    sink: GradSink,
}

impl CustomOp3 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        _a: &CpuStorage,
        _al: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen::pass_through(y, yl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        _a: &candle_core::CudaStorage,
        _al: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        frozen::pass_through(y, yl)
    }

    fn bwd(
        &self,
        x: &Tensor,
        _y: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let input = Var::from_tensor(&x.detach())?;
        let out = self.run.forward(&self.ctx, input.as_tensor(), true)?;
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        for (key, t) in &self.params {
            if let Some(g) = grads.get(t) {
                self.sink.add(key, g)?;
            }
        }
        Ok((grads.get(input.as_tensor()).cloned(), None, None))
    }
}

/// Runs layer `li` without keeping its activations; see [`Checkpoint`].
fn checkpointed(
    run: &LayerRun,
    ctx: &Context,
    x: &Tensor,
    adapter: &LoraAdapter,
    li: usize,
    sink: &GradSink,
) -> Result<Tensor> {
    let y = run.detached().forward(ctx, &x.detach(), false)?;
    let params: Vec<(String, Tensor)> = Module::ALL
        .iter()
        .filter_map(|&m| adapter.pair(li, m).map(|(a, b, _)| (m, a, b)))
        .flat_map(|(m, a, b)| {
            [
                (peft_key(li, m, 'A'), a.clone()),
                (peft_key(li, m, 'B'), b.clone()),
            ]
        })
        .collect();
    // A tracked third operand makes the op part of the graph even for the first layer,
    // whose input (the embedding) is not tracked.
    let Some((_, anchor)) = params.first().cloned() else {
        return Ok(run.forward(ctx, x, true)?);
    };
    let op = Checkpoint {
        run: run.clone(),
        ctx: ctx.clone(),
        params,
        sink: sink.clone(),
    };
    Ok(x.apply_op3(&y, &anchor, op)?)
}
