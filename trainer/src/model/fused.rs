//! One-pass CPU kernels for the cached (inference) forward: candle-nn's RMSNorm, and
//! SiLU·up split over the thread pool. None has a backward, so training never uses them.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

/// `silu(gate) · up` (inference only: no backward). On the CPU in f32 it is one pass over
/// both, split across the thread pool, instead of candle's one-thread SiLU and a second
/// pass for the product.
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
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
pub(super) fn fused_rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
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
