//! The inference forward: new tokens after those a [`KvCache`] holds, no autograd graph,
//! the fused CPU kernels. The same model and adapter as the training forward in `mod.rs`,
//! whose log-probs it reproduces (`tests/generate.rs`).

use candle_core::{DType, Device, Tensor};

use super::fused::{add, fused_rms_norm, masked_softmax, norm_heads_rope, swap_axes_1_2, swiglu};
use super::{attend, rms_norm, Context, LayerRun, Qwen3};
use crate::config::Module;
use crate::error::{invalid, Result};
use crate::frozen;
use crate::lora::LoraAdapter;

impl Qwen3 {
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
            let slot = KvSlot {
                buffers: &mut cache.layers[li],
                past,
                reserve: cache.reserve,
            };
            x = run.forward_cached(&ctx, &x, slot)?;
        }
        cache.len = past + n;
        let x = x.narrow(1, n - 1, 1)?;
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps)?;
        let logits = frozen::linear(&x, &self.lm_head, false)?;
        Ok(logits.to_dtype(DType::F32)?.flatten_all()?)
    }
}

/// Keys and values of the tokens a sequence has seen, per layer, for incremental decoding.
///
/// Each layer's buffers have room to spare and are filled in place, so a decode step writes
/// its one position instead of copying the whole cache (which made a step's cost grow with
/// the context); past their room they grow by doubling. Not `Clone`: a clone would share the
/// buffers it writes into.
#[derive(Default)]
pub struct KvCache {
    /// `(k, v)` per layer, each `(1, kv_heads, capacity, head_dim)`; the first `len`
    /// positions hold data.
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    /// Positions to make room for at the first append.
    reserve: usize,
}

impl KvCache {
    pub fn new() -> KvCache {
        KvCache::default()
    }

    /// A cache that makes room for `tokens` positions at once (the prompt and the tokens
    /// expected after it), so it need not grow on the way.
    pub fn with_capacity(tokens: usize) -> KvCache {
        KvCache {
            reserve: tokens,
            ..KvCache::default()
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One layer's slot in a [`KvCache`] during a forward pass.
struct KvSlot<'a> {
    buffers: &'a mut Option<(Tensor, Tensor)>,
    /// Positions already held.
    past: usize,
    reserve: usize,
}

impl KvSlot<'_> {
    /// Writes `k` and `v` `(1, kv_heads, n, head_dim)` after the held positions and returns
    /// views of all `past + n` of them.
    fn append(self, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let need = self.past + k.dim(2)?;
        let room = |held: Option<&Tensor>, new: &Tensor| -> candle_core::Result<Tensor> {
            let capacity = held.map_or(Ok(0), |t| t.dim(2))?;
            if let Some(t) = held.filter(|_| capacity >= need) {
                return Ok(t.clone());
            }
            let mut dims = new.dims().to_vec();
            dims[2] = need.max(self.reserve).max(2 * capacity);
            let grown = Tensor::zeros(dims, new.dtype(), new.device())?;
            if let Some(t) = held.filter(|_| self.past > 0) {
                grown.slice_set(&t.narrow(2, 0, self.past)?.contiguous()?, 2, 0)?;
            }
            Ok(grown)
        };
        let held = self.buffers.take();
        let kb = room(held.as_ref().map(|(k, _)| k), k)?;
        let vb = room(held.as_ref().map(|(_, v)| v), v)?;
        drop(held);
        kb.slice_set(&k.contiguous()?, 2, self.past)?;
        vb.slice_set(&v.contiguous()?, 2, self.past)?;
        let views = (kb.narrow(2, 0, need)?, vb.narrow(2, 0, need)?);
        *self.buffers = Some((kb, vb));
        Ok(views)
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

impl LayerRun {
    /// [`LayerRun::forward`] for new tokens after those in `kv`, which it extends.
    fn forward_cached(
        &self,
        ctx: &Context,
        x: &Tensor,
        kv: KvSlot<'_>,
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
        let (cos, sin) = &ctx.rope;
        let half = c.head_dim / 2;
        let (cos, sin) = (cos.narrow(1, 0, half)?, sin.narrow(1, 0, half)?);
        let q = norm_heads_rope(&q, &(&l.q_norm * scale)?, c.rms_norm_eps, &cos, &sin)?;
        let k = norm_heads_rope(&k, &l.k_norm, c.rms_norm_eps, &cos, &sin)?;
        let v = swap_axes_1_2(&v)?;
        let (k, v) = kv.append(&k, &v)?;
        let attn = match attend::causal_attention(&q, &k, &v) {
            Some(attn) => attn?,
            None => grouped_cached_attention(ctx, &q, &k, &v)?,
        };
        let x = add(x, &self.linear(&attn, Module::O, false)?)?;
        let h = fused_rms_norm(&x, &l.post_attention_norm, c.rms_norm_eps)?;
        let gate = self.linear(&h, Module::Gate, false)?;
        let mlp = swiglu(&gate, &self.linear(&h, Module::Up, false)?)?;
        add(&x, &self.linear(&mlp, Module::Down, false)?)
    }
}

/// [`attend::causal_attention`] with candle's ops (off the CPU or outside f32): the query
/// heads that share a KV head stacked along the sequence axis, the mask added.
fn grouped_cached_attention(
    ctx: &Context,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> candle_core::Result<Tensor> {
    let c = &ctx.config;
    let n = q.dim(2)?;
    let total = k.dim(2)?;
    let (kvh, group) = (
        c.num_key_value_heads,
        c.num_attention_heads / c.num_key_value_heads,
    );
    let qg = q.contiguous()?.reshape((1, kvh, group * n, c.head_dim))?;
    let scores = qg
        .matmul(&k.t()?)?
        .reshape((1, c.num_attention_heads, n, total))?;
    let probs = masked_softmax(&scores, &ctx.mask)?;
    let probs = probs.reshape((1, kvh, group * n, total))?;
    let attn = probs
        .matmul(v)?
        .reshape((1, c.num_attention_heads, n, c.head_dim))?;
    swap_axes_1_2(&attn)?.reshape((1, n, c.num_attention_heads * c.head_dim))
}
