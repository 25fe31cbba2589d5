//! Gradient checkpointing per decoder layer, as the reference trainer turns on in
//! transformers (`use_reentrant=False`): the forward keeps no activations inside a layer,
//! the backward re-runs the layer from its input.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, Var};

use super::{Context, LayerRun};
use crate::config::Module;
use crate::error::Result;
use crate::frozen;
use crate::lora::{peft_key, LoraAdapter};

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
pub(super) fn checkpointed(
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
