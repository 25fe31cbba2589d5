//! One-pass CPU kernels for the cached (inference) forward, split over the thread pool where
//! candle's own ops run on one thread: RMSNorm, SiLU·up, the per-head norm with RoPE, the
//! residual add and the head transposes; and the 2-D transpose that holds the projections
//! `(in, out)` at load. None has a backward, so no training graph contains them; each falls
//! back to candle's ops off the CPU or outside f32.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};

/// `silu(gate) · up` (inference only: no backward). On the CPU in f32 it is one pass over
/// both, split across the thread pool, instead of candle's one-thread SiLU and a second
/// pass for the product.
pub(super) fn swiglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    let op = Zip2("silu-mul", super::simd::silu_mul);
    zip2(gate, up, &op).unwrap_or_else(|| gate.silu()? * up)
}

/// `a + b` for tensors of one shape (the residual adds), split over the thread pool on the
/// CPU in f32 (candle's binary ops run on one thread). Inference only (no backward).
pub(super) fn add(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let op = Zip2("parallel-add", |o: &mut [f32], a: &[f32], b: &[f32]| {
        for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
            *o = a + b;
        }
    });
    zip2(a, b, &op).unwrap_or_else(|| a + b)
}

/// `op` applied element by element to two f32 CPU tensors of one shape, in one pass split
/// over the thread pool; `None` where that does not apply (the caller uses candle's ops).
fn zip2<F: Fn(&mut [f32], &[f32], &[f32]) + Send + Sync>(
    a: &Tensor,
    b: &Tensor,
    op: &Zip2<F>,
) -> Option<candle_core::Result<Tensor>> {
    let applies = a.device().is_cpu()
        && a.dtype() == DType::F32
        && b.dtype() == DType::F32
        && a.shape() == b.shape();
    applies.then(|| a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, op))
}

/// An element-wise binary op: its name and what it does to a chunk (`out`, `a`, `b`, all of
/// one length).
struct Zip2<F>(&'static str, F);

impl<F: Fn(&mut [f32], &[f32], &[f32]) + Send + Sync> candle_core::CustomOp2 for Zip2<F> {
    fn name(&self) -> &'static str {
        self.0
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        al: &Layout,
        b: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (CpuStorage::F32(a), CpuStorage::F32(b)) = (a, b) else {
            candle_core::bail!("{}: f32 only", self.0);
        };
        let (Some((a0, a1)), Some((b0, b1))) = (al.contiguous_offsets(), bl.contiguous_offsets())
        else {
            candle_core::bail!("{}: contiguous inputs only", self.0);
        };
        let (a, b) = (&a[a0..a1], &b[b0..b1]);
        let mut out = vec![0f32; a.len()];
        // Chunks big enough to amortise the pool's scheduling, small enough to share.
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| (self.1)(o, a, b));
        Ok((CpuStorage::F32(out), al.shape().clone()))
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

/// Per-head RMSNorm, the move from `(1, n, heads, head_dim)` to `(1, heads, n, head_dim)`,
/// and RoPE (Hugging Face's rotate-half layout, `cos`/`sin` of shape `(n, head_dim / 2)`), in
/// one pass split over the thread pool on the CPU in f32; elsewhere candle-nn's kernels one
/// after the other. Inference only (no backward).
pub(super) fn norm_heads_rope(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    let fused = x.device().is_cpu()
        && [x, weight, cos, sin]
            .iter()
            .all(|t| t.dtype() == DType::F32);
    if !fused {
        let x = fused_rms_norm(x, weight, eps)?
            .transpose(1, 2)?
            .contiguous()?;
        return candle_nn::rotary_emb::rope(&x, &cos.contiguous()?, &sin.contiguous()?);
    }
    let (_, n, _, d) = x.dims4()?;
    if cos.dims2()? != (n, d / 2) || sin.dims2()? != (n, d / 2) || weight.dims1()? != d {
        candle_core::bail!(
            "norm-heads-rope: cos/sin must be ({n}, {}), weight ({d})",
            d / 2
        );
    }
    let op = NormHeadsRope {
        weight: weight.to_vec1()?,
        cos: cos.flatten_all()?.to_vec1()?,
        sin: sin.flatten_all()?.to_vec1()?,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

struct NormHeadsRope {
    weight: Vec<f32>,
    /// `(n, head_dim / 2)`, row-major.
    cos: Vec<f32>,
    sin: Vec<f32>,
    eps: f32,
}

impl candle_core::CustomOp1 for NormHeadsRope {
    fn name(&self) -> &'static str {
        "norm-heads-rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let CpuStorage::F32(x) = x else {
            candle_core::bail!("norm-heads-rope: f32 only");
        };
        let Some((x0, x1)) = l.contiguous_offsets() else {
            candle_core::bail!("norm-heads-rope: contiguous input only");
        };
        let (b, n, heads, d) = l.shape().dims4()?;
        let (x, half) = (&x[x0..x1], d / 2);
        let mut out = vec![0f32; x.len()];
        // One output row per (batch, head, position); its input row is at (batch, position, head).
        out.par_chunks_mut(d)
            .with_min_len(64)
            .enumerate()
            .for_each(|(row, o)| {
                let (bh, i) = (row / n, row % n);
                let (bi, h) = (bh / heads, bh % heads);
                let src = &x[((bi * n + i) * heads + h) * d..][..d];
                pulp::Arch::new().dispatch(NormRopeRow {
                    src,
                    weight: &self.weight,
                    cos: &self.cos[i * half..][..half],
                    sin: &self.sin[i * half..][..half],
                    eps: self.eps,
                    out: o,
                });
            });
        Ok((CpuStorage::F32(out), Shape::from((b, heads, n, d))))
    }
}

/// One row of [`NormHeadsRope`]: RMSNorm with `weight`, then RoPE by `cos`/`sin` (`half`
/// long each), into `out`.
struct NormRopeRow<'a> {
    src: &'a [f32],
    weight: &'a [f32],
    cos: &'a [f32],
    sin: &'a [f32],
    eps: f32,
    out: &'a mut [f32],
}

impl pulp::WithSimd for NormRopeRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let NormRopeRow {
            src,
            weight,
            cos,
            sin,
            eps,
            out,
        } = self;
        let half = cos.len();
        let (head, tail) = S::as_simd_f32s(src);
        let mut acc = simd.splat_f32s(0.0);
        for v in head {
            acc = simd.mul_add_e_f32s(*v, *v, acc);
        }
        let sum = simd.reduce_sum_f32s(acc) + tail.iter().map(|v| v * v).sum::<f32>();
        let inv = 1.0 / (sum / src.len() as f32 + eps).sqrt();
        let (lo, hi) = src.split_at(half);
        let (wlo, whi) = weight.split_at(half);
        let (olo, ohi) = out.split_at_mut(half);
        let inv_v = simd.splat_f32s(inv);
        let ((lo_v, lo_t), (hi_v, hi_t)) = (S::as_simd_f32s(lo), S::as_simd_f32s(&hi[..half]));
        let ((wl_v, wl_t), (wh_v, wh_t)) = (S::as_simd_f32s(wlo), S::as_simd_f32s(&whi[..half]));
        let ((c_v, c_t), (s_v, s_t)) = (S::as_simd_f32s(cos), S::as_simd_f32s(sin));
        let (ol_v, ol_t) = S::as_mut_simd_f32s(&mut olo[..half]);
        let (oh_v, oh_t) = S::as_mut_simd_f32s(&mut ohi[..half]);
        let lanes = lo_v
            .iter()
            .zip(hi_v)
            .zip(wl_v.iter().zip(wh_v))
            .zip(c_v.iter().zip(s_v))
            .zip(ol_v.iter_mut().zip(oh_v));
        for ((((l, h), (wl, wh)), (c, s)), (ol, oh)) in lanes {
            let a = simd.mul_f32s(simd.mul_f32s(*l, inv_v), *wl);
            let b = simd.mul_f32s(simd.mul_f32s(*h, inv_v), *wh);
            *ol = simd.sub_f32s(simd.mul_f32s(a, *c), simd.mul_f32s(b, *s));
            *oh = simd.mul_add_e_f32s(a, *s, simd.mul_f32s(b, *c));
        }
        let rest = lo_t
            .iter()
            .zip(hi_t)
            .zip(wl_t.iter().zip(wh_t))
            .zip(c_t.iter().zip(s_t))
            .zip(ol_t.iter_mut().zip(oh_t));
        for ((((l, h), (wl, wh)), (c, s)), (ol, oh)) in rest {
            let a = l * inv * wl;
            let b = h * inv * wh;
            *ol = a * c - b * s;
            *oh = a * s + b * c;
        }
    }
}

/// Softmax over the last axis of attention scores `(.., n, past + n)` with the causal mask
/// `(n, past + n)` added, in f32. The path off the CPU or outside f32; on the CPU in f32 the
/// whole attention is one kernel (`attend`).
pub(super) fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = scores.dtype();
    let masked = scores.broadcast_add(mask)?.to_dtype(DType::F32)?;
    candle_nn::ops::softmax_last_dim(&masked)?.to_dtype(dtype)
}

/// `x.transpose(1, 2)` of a 4-D tensor, made contiguous: the heads moved across the
/// positions or back. Split over the thread pool on the CPU in f32 (candle's strided copy
/// runs on one thread).
pub(super) fn swap_axes_1_2(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&SwapAxes12)
    } else {
        x.transpose(1, 2)?.contiguous()
    }
}

struct SwapAxes12;

impl candle_core::CustomOp1 for SwapAxes12 {
    fn name(&self) -> &'static str {
        "swap-axes-1-2"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let CpuStorage::F32(x) = x else {
            candle_core::bail!("swap-axes-1-2: f32 only");
        };
        let Some((x0, x1)) = l.contiguous_offsets() else {
            candle_core::bail!("swap-axes-1-2: contiguous input only");
        };
        let (b, p, q, d) = l.shape().dims4()?;
        let x = &x[x0..x1];
        let mut out = vec![0f32; x.len()];
        // Output row (bi, j, i) of `d` values is input row (bi, i, j).
        out.par_chunks_mut(d)
            .with_min_len(64)
            .enumerate()
            .for_each(|(row, o)| {
                let (bj, i) = (row / p, row % p);
                let (bi, j) = (bj / q, bj % q);
                o.copy_from_slice(&x[((bi * p + i) * q + j) * d..][..d]);
            });
        Ok((CpuStorage::F32(out), Shape::from((b, q, p, d))))
    }
}

/// The transpose of a 2-D tensor, contiguous: on the CPU in f32 in tiles split over the thread
/// pool (candle's strided copy runs on one thread, reading down columns; at load it took
/// seconds for Qwen3-0.6B's projections), elsewhere candle's copy.
pub(super) fn transpose_2d(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2 {
        x.contiguous()?.apply_op1_no_bwd(&Transpose2d)
    } else {
        x.t()?.contiguous()
    }
}

struct Transpose2d;

impl candle_core::CustomOp1 for Transpose2d {
    fn name(&self) -> &'static str {
        "transpose-2d"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = x else {
            candle_core::bail!("transpose-2d: f32 only");
        };
        let Some((x0, x1)) = l.contiguous_offsets() else {
            candle_core::bail!("transpose-2d: contiguous input only");
        };
        let (rows, cols) = l.shape().dims2()?;
        let out = super::load::transpose_with(&x[x0..x1], &[rows, cols], |v| v);
        Ok((CpuStorage::F32(out), Shape::from((cols, rows))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Shapes on and off the tile size, including one row and one column.
    #[test]
    fn transpose_matches_candles() -> candle_core::Result<()> {
        for (r, c) in [(1, 1), (1, 70), (70, 1), (64, 64), (65, 130), (200, 3)] {
            let x = Tensor::arange(0f32, (r * c) as f32, &Device::Cpu)?.reshape((r, c))?;
            let got = transpose_2d(&x)?;
            assert_eq!(got.dims(), [c, r]);
            let want = x.t()?.contiguous()?;
            assert_eq!(got.to_vec2::<f32>()?, want.to_vec2::<f32>()?, "{r}x{c}");
        }
        Ok(())
    }
}
