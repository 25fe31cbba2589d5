//! `x · Wᵀ` for a frozen base weight W whose backward computes only the input gradient.
//!
//! candle's matmul backward computes both operands' gradients whenever either is tracked,
//! and keeps the weight's in the gradient store until backward ends: for a frozen base model
//! that doubles backward time and holds a model-sized buffer of dead gradients. Here the
//! product is computed outside the graph and attached to `x` through a custom op whose
//! forward passes it through and whose backward returns `grad · W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;

struct FrozenLinear {
    /// `(out, in)`, as stored in the checkpoint.
    weight: Tensor,
}

fn pass_through<S: BackendStorage>(y: &S, layout: &Layout) -> candle_core::Result<(S, Shape)> {
    match layout.contiguous_offsets() {
        Some((0, end)) if end == layout.shape().elem_count() => {
            Ok((y.try_clone(layout)?, layout.shape().clone()))
        }
        _ => candle_core::bail!("frozen-linear: the product must be a fresh contiguous tensor"),
    }
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        pass_through(y, yl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _xl: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        pass_through(y, yl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let w = self.weight.to_dtype(grad.dtype())?;
        Ok((Some(grad.broadcast_matmul(&w)?), None))
    }
}

/// `x · Wᵀ` for `x` of shape `(.., in)` and `W` of shape `(out, in)`. When `x` is part of a
/// graph the result carries only the gradient with respect to `x`.
pub fn linear(x: &Tensor, weight: &Tensor, track: bool) -> Result<Tensor> {
    let y = x.detach().broadcast_matmul(&weight.t()?)?;
    if !track {
        return Ok(y);
    }
    Ok(x.apply_op2(
        &y,
        FrozenLinear {
            weight: weight.clone(),
        },
    )?)
}
