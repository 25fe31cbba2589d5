//! The one-row product `x · M` of decoding (one new token), split over the thread pool.
//!
//! candle hands a one-row CPU matmul to `gemm`, which runs it on one thread, so decoding
//! streams the whole model through one core. Decoding is bound by memory bandwidth, and on
//! CPUs whose single core cannot saturate it (measured on a 2-vCPU Xeon: see BENCHMARKS.md)
//! that caps tokens/s. Here the weight is cut into bands, one per task, each read once from
//! start to end:
//! - `M` contiguous `(k, n)` (the projections, held transposed): bands of rows, each task
//!   accumulating its own partial `y`, summed at the end.
//! - `M` the transpose of a contiguous `(n, k)` (the LM head, an adapter's A and B): bands of
//!   outputs, each a dot product of one weight row with `x`.
//!
//! SIMD through `pulp` (already under `gemm`): AVX-512 or AVX2+FMA picked at run time.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use pulp::{Arch, Simd, WithSimd};
use rayon::prelude::*;

/// `x · m` for a one-row f32 `x` of shape `(1, k)` and `m` of shape `(k, n)` on the CPU, when
/// `m` is contiguous or the transpose of a contiguous matrix and neither is part of a graph.
/// `None` when the product is not of that kind (the caller then uses candle's matmul).
pub(crate) fn one_row(x: &Tensor, m: &Tensor) -> Option<candle_core::Result<Tensor>> {
    let applies = x.device().is_cpu()
        && x.dtype() == DType::F32
        && m.dtype() == DType::F32
        && !x.track_op()
        && !m.track_op()
        && x.dims2().is_ok_and(|(rows, _)| rows == 1)
        && form(m.layout()).is_some();
    applies.then(|| x.contiguous()?.apply_op2_no_bwd(m, &OneRow))
}

/// How `m`'s `(k, n)` elements lie in memory.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    /// Row-major `(k, n)`: `m[i][j]` at `i * n + j`.
    Rows,
    /// The transpose of a row-major `(n, k)`: `m[i][j]` at `j * k + i`.
    Transposed,
}

fn form(layout: &Layout) -> Option<Form> {
    let (k, n) = layout.shape().dims2().ok()?;
    match layout.stride() {
        [s0, 1] if *s0 == n => Some(Form::Rows),
        [1, s1] if *s1 == k => Some(Form::Transposed),
        _ => None,
    }
}

struct OneRow;

impl candle_core::CustomOp2 for OneRow {
    fn name(&self) -> &'static str {
        "one-row-product"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        m: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(m)) = (x, m) else {
            candle_core::bail!("one-row-product: f32 only");
        };
        let Some((x0, x1)) = xl.contiguous_offsets() else {
            candle_core::bail!("one-row-product: x must be contiguous");
        };
        let (k, n) = ml.shape().dims2()?;
        if x1 - x0 != k {
            candle_core::bail!(
                "one-row-product: x has {} elements, m has {k} rows",
                x1 - x0
            );
        }
        let (x, m) = (&x[x0..x1], &m[ml.start_offset()..ml.start_offset() + k * n]);
        let y = match form(ml) {
            Some(Form::Rows) => rows_form(x, m, n),
            Some(Form::Transposed) => transposed_form(x, m, n),
            None => candle_core::bail!("one-row-product: m must be (the transpose of) contiguous"),
        };
        Ok((CpuStorage::F32(y), Shape::from((1, n))))
    }
}

/// `y = x · m`, `m` row-major `(k, n)`: the rows cut into one band per thread, each band's
/// partial sum kept apart, then added up.
fn rows_form(x: &[f32], m: &[f32], n: usize) -> Vec<f32> {
    let k = x.len();
    if k == 0 || n == 0 {
        return vec![0f32; n];
    }
    let bands = rayon::current_num_threads().clamp(1, k.max(1));
    let band = k.div_ceil(bands).max(1);
    let partials: Vec<Vec<f32>> = x
        .par_chunks(band)
        .zip(m.par_chunks(band * n))
        .map(|(x, m)| {
            let mut y = vec![0f32; n];
            Arch::new().dispatch(Axpy { y: &mut y, x, m });
            y
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut y = parts.next().unwrap_or_else(|| vec![0f32; n]);
    for p in parts {
        for (a, b) in y.iter_mut().zip(&p) {
            *a += b;
        }
    }
    y
}

/// `y = x · m`, `m` the transpose of a row-major `(n, k)` `w`: `y[j] = w[j] · x`, the outputs
/// cut into bands shared over the pool.
fn transposed_form(x: &[f32], w: &[f32], n: usize) -> Vec<f32> {
    let k = x.len();
    let mut y = vec![0f32; n];
    if k == 0 {
        return y;
    }
    // Bands of about 4 MiB of weight: enough tasks to balance, few enough to schedule.
    let band = ((1 << 20) / k).clamp(4, n.max(4));
    y.par_chunks_mut(band)
        .zip(w.par_chunks(band * k))
        .for_each(|(y, w)| Arch::new().dispatch(Dots { y, x, w }));
    y
}

/// `y += Σᵢ x[i] · m[i]` over the rows of `m` (row-major, `y.len()` columns), four rows per
/// pass over `y`.
pub(crate) struct Axpy<'a> {
    pub(crate) y: &'a mut [f32],
    pub(crate) x: &'a [f32],
    pub(crate) m: &'a [f32],
}

impl WithSimd for Axpy<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Axpy { y, x, m } = self;
        let n = y.len();
        let mut m_groups = m.chunks_exact(4 * n);
        let mut x_groups = x.chunks_exact(4);
        for (mg, xg) in m_groups.by_ref().zip(x_groups.by_ref()) {
            let (r0, rest) = mg.split_at(n);
            let (r1, rest) = rest.split_at(n);
            let (r2, r3) = rest.split_at(n);
            let [h0, h1, h2, h3] = [r0, r1, r2, r3].map(|r| S::as_simd_f32s(r).0);
            let [c0, c1, c2, c3] = [xg[0], xg[1], xg[2], xg[3]].map(|s| simd.splat_f32s(s));
            let (y_head, y_tail) = S::as_mut_simd_f32s(y);
            for ((((yv, a), b), c), d) in y_head.iter_mut().zip(h0).zip(h1).zip(h2).zip(h3) {
                let acc = simd.mul_add_e_f32s(*a, c0, *yv);
                let acc = simd.mul_add_e_f32s(*b, c1, acc);
                let acc = simd.mul_add_e_f32s(*c, c2, acc);
                *yv = simd.mul_add_e_f32s(*d, c3, acc);
            }
            let off = n - y_tail.len();
            for (j, yv) in y_tail.iter_mut().enumerate() {
                let i = off + j;
                *yv += xg[0] * r0[i] + xg[1] * r1[i] + xg[2] * r2[i] + xg[3] * r3[i];
            }
        }
        for (r, s) in m_groups
            .remainder()
            .chunks_exact(n)
            .zip(x_groups.remainder())
        {
            for (yv, w) in y.iter_mut().zip(r) {
                *yv += s * w;
            }
        }
    }
}

/// `y[j] = w[j] · x` for the rows of `w` (row-major, `x.len()` columns), four rows at a time
/// so each load of `x` serves four.
pub(crate) struct Dots<'a> {
    pub(crate) y: &'a mut [f32],
    pub(crate) x: &'a [f32],
    pub(crate) w: &'a [f32],
}

impl WithSimd for Dots<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Dots { y, x, w } = self;
        let k = x.len();
        let (x_head, x_tail) = S::as_simd_f32s(x);
        let off = k - x_tail.len();
        let dot_tail = |r: &[f32]| -> f32 { r[off..].iter().zip(x_tail).map(|(a, b)| a * b).sum() };
        let mut y_groups = y.chunks_exact_mut(4);
        let mut w_groups = w.chunks_exact(4 * k);
        for (yg, wg) in y_groups.by_ref().zip(w_groups.by_ref()) {
            let (r0, rest) = wg.split_at(k);
            let (r1, rest) = rest.split_at(k);
            let (r2, r3) = rest.split_at(k);
            let [h0, h1, h2, h3] = [r0, r1, r2, r3].map(|r| S::as_simd_f32s(r).0);
            let zero = simd.splat_f32s(0.0);
            let (mut a0, mut a1, mut a2, mut a3) = (zero, zero, zero, zero);
            for ((((xv, v0), v1), v2), v3) in x_head.iter().zip(h0).zip(h1).zip(h2).zip(h3) {
                a0 = simd.mul_add_e_f32s(*v0, *xv, a0);
                a1 = simd.mul_add_e_f32s(*v1, *xv, a1);
                a2 = simd.mul_add_e_f32s(*v2, *xv, a2);
                a3 = simd.mul_add_e_f32s(*v3, *xv, a3);
            }
            yg[0] = simd.reduce_sum_f32s(a0) + dot_tail(r0);
            yg[1] = simd.reduce_sum_f32s(a1) + dot_tail(r1);
            yg[2] = simd.reduce_sum_f32s(a2) + dot_tail(r2);
            yg[3] = simd.reduce_sum_f32s(a3) + dot_tail(r3);
        }
        for (yv, r) in y_groups
            .into_remainder()
            .iter_mut()
            .zip(w_groups.remainder().chunks_exact(k))
        {
            let (h, _) = S::as_simd_f32s(r);
            let mut acc = simd.splat_f32s(0.0);
            for (xv, v) in x_head.iter().zip(h) {
                acc = simd.mul_add_e_f32s(*v, *xv, acc);
            }
            *yv = simd.reduce_sum_f32s(acc) + dot_tail(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;
    use candle_core::Device;

    fn reference(x: &[f32], m: &[f32], k: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|j| {
                (0..k)
                    .map(|i| x[i] as f64 * m[i * n + j] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// Both layouts, on sizes that are and are not multiples of the vector width and of the
    /// four-row groups, match a double-precision reference.
    #[test]
    fn matches_the_reference_in_both_layouts() -> candle_core::Result<()> {
        for (k, n) in [
            (1, 1),
            (3, 5),
            (7, 33),
            (64, 48),
            (130, 77),
            (1024, 257),
            (5, 1030),
        ] {
            let x = values(k, k as u32);
            let m = values(k * n, (k * n) as u32 + 1);
            let want = reference(&x, &m, k, n);
            let xt = Tensor::from_vec(x, (1, k), &Device::Cpu)?;
            let mt = Tensor::from_vec(m, (k, n), &Device::Cpu)?;
            // The same matrix held as the transpose of its contiguous transpose.
            let mt_t = mt.t()?.contiguous()?.t()?;
            for (what, m) in [("rows", &mt), ("transposed", &mt_t)] {
                let got = one_row(&xt, m).expect("a one-row f32 product applies")?;
                assert_eq!(got.dims(), [1, n], "{what} {k}x{n}");
                for (j, (g, w)) in got
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .zip(&want)
                    .enumerate()
                {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{what} {k}x{n} [{j}]: {g} vs {w}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn declines_what_it_does_not_cover() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let two_rows = Tensor::zeros((2, 4), DType::F32, &dev)?;
        let m = Tensor::zeros((4, 3), DType::F32, &dev)?;
        assert!(one_row(&two_rows, &m).is_none());
        let strided = Tensor::zeros((4, 6), DType::F32, &dev)?.narrow(1, 0, 3)?;
        assert!(one_row(&Tensor::zeros((1, 4), DType::F32, &dev)?, &strided).is_none());
        let half = Tensor::zeros((1, 4), DType::F16, &dev)?;
        assert!(one_row(&half, &m.to_dtype(DType::F16)?).is_none());
        Ok(())
    }
}
