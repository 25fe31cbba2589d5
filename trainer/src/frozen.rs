//! `x · Wᵀ` for a frozen base weight W whose backward computes only the input gradient.
//!
//! candle's matmul backward computes both operands' gradients whenever either is tracked,
//! and keeps the weight's in the gradient store until backward ends: for a frozen base model
//! that doubles backward time and holds a model-sized buffer of dead gradients. Here the
//! product is computed outside the graph and attached to `x` through a custom op whose
//! forward passes it through and whose backward returns `grad · W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

struct FrozenLinear {
    /// What the output gradient is multiplied by: `W`, of shape `(out, in)` (a view of the
    /// held `Wᵀ`, or a contiguous copy).
    weight: Tensor,
}

pub(crate) fn pass_through<S: BackendStorage>(
    y: &S,
    layout: &Layout,
) -> candle_core::Result<(S, Shape)> {
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
        Ok((Some(matmul_2d(grad, &w)?), None))
    }
}

/// `x · Wᵀ` for `x` of shape `(.., in)` and `W` of shape `(out, in)`. When `x` is part of a
/// graph the result carries only the gradient with respect to `x`.
pub fn linear(x: &Tensor, weight: &Tensor, track: bool) -> candle_core::Result<Tensor> {
    linear_held(x, &weight.t()?, Some(weight), track)
}

/// [`linear`] for a weight held transposed, `Wᵀ` of shape `(in, out)`. A contiguous `Wᵀ`
/// is the layout the CPU GEMM runs fastest on (measured with 256 rows on 2 cores: 227 vs
/// 118 GFLOP/s for a 3072→1024 projection, 252 vs 225 for 1024→3072). `weight` is `W`
/// itself where it is also held, `(out, in)` and contiguous, for the backward's `grad · W`;
/// without it the backward reads `Wᵀ` through its transpose.
pub fn linear_held(
    x: &Tensor,
    weight_t: &Tensor,
    weight: Option<&Tensor>,
    track: bool,
) -> candle_core::Result<Tensor> {
    let y = matmul_2d(&x.detach(), weight_t)?;
    if !track {
        return Ok(y);
    }
    let weight = match weight {
        Some(w) => w.clone(),
        None => weight_t.t()?,
    };
    x.apply_op2(&y, FrozenLinear { weight })
}

/// `x · m` for `x` of shape `(.., k)` and a 2-D `m` of shape `(k, n)`, computed as one 2-D
/// GEMM over the flattened leading dimensions: candle's batched path copies a transposed
/// right-hand side first (measured: 37 vs 59 GFLOP/s for 128×1024×3072 on 2 cores). One
/// untracked f32 row on the CPU (decoding) goes to [`crate::gemv::one_row`] instead.
pub fn matmul_2d(x: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let k = dims[dims.len() - 1];
    let rows = x.elem_count() / k.max(1);
    let mut out_dims = dims.to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = m.dim(1)?;
    let x = x.reshape((rows, k))?;
    if let Some(y) = crate::gemv::one_row(&x, m) {
        return y?.reshape(out_dims);
    }
    x.matmul(m)?.reshape(out_dims)
}
