//! Causal grouped-query attention over the KV cache on the CPU in f32: `q·kᵀ` against only
//! the keys each query may see, the softmax and `p·v`, written straight into the
//! `(n, heads · head_dim)` layout the output projection reads.
//!
//! candle's batched matmuls computed every score, the masked half too, one head's GEMM at a
//! time, then the probabilities and a transpose took passes of their own: 150 ms of a 1.25 s
//! prefill of 256 tokens (28 layers, 2 threads; `q·kᵀ` ran at 107 GFLOP/s). Here a prefill
//! runs in tiles of up to [`TILE_ROWS`] query rows that share every key and value load (one
//! task per block of positions), and decoding runs one task per query row.

use candle_core::{CpuStorage, DType, Layout, Shape, Tensor};
use pulp::{Arch, Simd, WithSimd};

use crate::gemv::{Axpy, Dots};

/// Attention of `q` `(1, heads, n, head_dim)` (already scaled by `1/√head_dim`) over `k`, `v`
/// `(1, kv_heads, past + n, head_dim)`, query `i` seeing keys `0..=past + i`, as
/// `(1, n, heads · head_dim)`. `None` off the CPU or outside f32 (the caller uses candle's ops).
pub(super) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Option<candle_core::Result<Tensor>> {
    let applies = q.device().is_cpu()
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.rank() == 4);
    applies.then(|| q.contiguous()?.apply_op3_no_bwd(k, v, &CausalAttention))
}

struct CausalAttention;

/// Query rows per tile of the prefill kernel (positions × the query heads of one KV head).
const TILE_ROWS: usize = 8;

/// Keys per step of the tile's score loop: two AVX-512 vectors.
const KEY_STEP: usize = 32;

/// The attention's sizes: `n` new positions after `past`, `heads` query heads, `d` per head.
struct Geometry {
    past: usize,
    n: usize,
    heads: usize,
    d: usize,
}

/// Where one head's rows of a `(1, heads, rows, d)` operand lie: `start + h · head_stride`,
/// rows `d` apart.
fn head_rows(l: &Layout, d: usize) -> candle_core::Result<(usize, usize)> {
    match l.stride() {
        [_, hs, rs, 1] if *rs == d => Ok((l.start_offset(), *hs)),
        s => candle_core::bail!("causal-attention: rows must be contiguous, strides {s:?}"),
    }
}

impl candle_core::CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    // Long: the attention kernel: its checks, then the loops over heads, rows and key tiles.
    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (q, k, v) else {
            candle_core::bail!("causal-attention: f32 only");
        };
        let (b, heads, n, d) = ql.shape().dims4()?;
        let (kb, kv_heads, total, kd) = kl.shape().dims4()?;
        if b != 1 || kb != 1 || kd != d || vl.shape() != kl.shape() {
            candle_core::bail!(
                "causal-attention: q {:?}, k {:?}, v {:?}",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        if total < n || kv_heads == 0 || heads % kv_heads != 0 {
            candle_core::bail!("causal-attention: {heads} heads over {kv_heads}, {n} of {total}");
        }
        let Some((q0, q1)) = ql.contiguous_offsets() else {
            candle_core::bail!("causal-attention: q must be contiguous");
        };
        let q = &q[q0..q1];
        let ((k0, k_hs), (v0, v_hs)) = (head_rows(kl, d)?, head_rows(vl, d)?);
        let (past, group) = (total - n, heads / kv_heads);
        let mut out = vec![0f32; n * heads * d];
        let g = Geometry { past, n, heads, d };
        if n < TILE_ROWS {
            // Decoding: a few rows, each its own task, against keys read in place.
            out.par_chunks_mut(d)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (row, o)| {
                    let (i, h) = (row / heads, row % heads);
                    let seen = past + i + 1;
                    let kv = h / group;
                    Arch::new().dispatch(Row {
                        q: &q[(h * n + i) * d..][..d],
                        k: &k[k0 + kv * k_hs..][..seen * d],
                        v: &v[v0 + kv * v_hs..][..seen * d],
                        scratch,
                        out: o,
                    });
                });
        } else {
            // A prefill: each KV head's keys transposed once, then blocks of positions, each
            // a task, in tiles of up to TILE_ROWS query rows that share their keys and values.
            // Keys transposed in blocks of KEY_STEP: block b holds `(d, KEY_STEP)`, key
            // `b · KEY_STEP + c`'s element t at `t · KEY_STEP + c`, zeros past the keys. (One
            // `(d, keys)` matrix put rows 1 KiB apart, in a handful of L1 sets.)
            let stride = total.next_multiple_of(KEY_STEP) * d;
            let mut keys_t = vec![0f32; kv_heads * stride];
            keys_t
                .par_chunks_mut(stride)
                .enumerate()
                .for_each(|(kv, kt)| {
                    let src = &k[k0 + kv * k_hs..][..total * d];
                    for (block, keys) in kt
                        .chunks_exact_mut(d * KEY_STEP)
                        .zip(src.chunks(d * KEY_STEP))
                    {
                        for (c, key) in keys.chunks_exact(d).enumerate() {
                            for (t, x) in key.iter().enumerate() {
                                block[t * KEY_STEP + c] = *x;
                            }
                        }
                    }
                });
            let positions = (TILE_ROWS / group).max(1);
            out.par_chunks_mut(positions * heads * d)
                .enumerate()
                .for_each_init(Vec::new, |scratch, (block, o)| {
                    let first = block * positions;
                    let count = positions.min(n - first);
                    for kv in 0..kv_heads {
                        let rows: Vec<(usize, usize)> = (first..first + count)
                            .flat_map(|i| (kv * group..(kv + 1) * group).map(move |h| (i, h)))
                            .collect();
                        for tile in rows.chunks(TILE_ROWS) {
                            Arch::new().dispatch(Tile {
                                g: &g,
                                q,
                                keys_t: &keys_t[kv * stride..][..stride],
                                v: &v[v0 + kv * v_hs..][..total * d],
                                rows: tile,
                                first,
                                scratch,
                                out: o,
                            });
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((1, n, heads * d))))
    }
}

/// One query row: scores against the `seen` keys, softmax, the weighted sum of values.
struct Row<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    scratch: &'a mut Vec<f32>,
    out: &'a mut [f32],
}

impl WithSimd for Row<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Row {
            q,
            k,
            v,
            scratch,
            out,
        } = self;
        let d = q.len();
        let seen = k.len() / d;
        scratch.clear();
        scratch.resize(2 * seen, 0.0);
        let (scores, probs) = scratch.split_at_mut(seen);
        // The same products as a decode step's LM head and its projections, so the same
        // kernels: a dot product per key, then the value rows weighted and summed.
        Dots {
            y: scores,
            x: q,
            w: k,
        }
        .with_simd(simd);
        super::simd::softmax_into(simd, probs, scores);
        out.fill(0.0);
        Axpy {
            y: out,
            x: probs,
            m: v,
        }
        .with_simd(simd);
    }
}

/// Up to [`TILE_ROWS`] query rows `(position, head)` of one KV head: their scores against the
/// transposed keys (vectorised over keys), the softmax of each, then `p·v` (vectorised over
/// `d`), every key and value load serving all the rows.
struct Tile<'a> {
    g: &'a Geometry,
    q: &'a [f32],
    /// Blocks of `(d, KEY_STEP)`: key `b · KEY_STEP + c`'s element `t` at
    /// `b · d · KEY_STEP + t · KEY_STEP + c`, zeros past the keys.
    keys_t: &'a [f32],
    /// `(keys, d)`.
    v: &'a [f32],
    rows: &'a [(usize, usize)],
    /// The position of the task's first output row.
    first: usize,
    scratch: &'a mut Vec<f32>,
    /// The task's output rows, `(position - first, head)` at `((i - first) · heads + h) · d`.
    out: &'a mut [f32],
}

impl WithSimd for Tile<'_> {
    type Output = ();

    #[inline(always)]
    // Long: one SIMD kernel body, inlined into each instruction set.
    fn with_simd<S: Simd>(self, simd: S) {
        let Tile {
            g,
            q,
            keys_t,
            v,
            rows,
            first,
            scratch,
            out,
        } = self;
        let Geometry {
            past, n, heads, d, ..
        } = *g;
        let step = 2 * S::F32_LANES;
        let last = rows.iter().map(|r| r.0).max().unwrap_or(0);
        let keys = past + last + 1;
        let width = keys.next_multiple_of(KEY_STEP);
        // Scratch: the tile's queries packed d-major (`t · TILE_ROWS + r`), its scores
        // row-major, then its probabilities key-major (`j · TILE_ROWS + r`). Rows past the
        // tile's real ones stay zero (computed, never stored).
        scratch.clear();
        scratch.resize(TILE_ROWS * (d + 2 * width), 0.0);
        let (q_packed, rest) = scratch.split_at_mut(TILE_ROWS * d);
        let (scores, p_packed) = rest.split_at_mut(TILE_ROWS * width);
        for (r, &(i, h)) in rows.iter().enumerate() {
            for (t, x) in q[(h * n + i) * d..][..d].iter().enumerate() {
                q_packed[t * TILE_ROWS + r] = *x;
            }
        }
        let (q_packed, _) = q_packed.as_chunks::<TILE_ROWS>();
        let zero = simd.splat_f32s(0.0);
        for j0 in (0..width).step_by(step) {
            let (block, c) = (j0 / KEY_STEP, j0 % KEY_STEP);
            let block = &keys_t[block * d * KEY_STEP..][..d * KEY_STEP];
            let mut acc = [[zero; 2]; TILE_ROWS];
            for (qt, kt) in q_packed.iter().zip(block.chunks_exact(KEY_STEP)) {
                let (kt, _) = S::as_simd_f32s(&kt[c..c + step]);
                let (k0, k1) = (kt[0], kt[1]);
                for r in 0..TILE_ROWS {
                    let x = simd.splat_f32s(qt[r]);
                    acc[r][0] = simd.mul_add_e_f32s(x, k0, acc[r][0]);
                    acc[r][1] = simd.mul_add_e_f32s(x, k1, acc[r][1]);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let dst = &mut scores[r * width + j0..][..step];
                dst.copy_from_slice(pulp::bytemuck::cast_slice(a));
            }
        }
        let mut probs = vec![0f32; width];
        for (r, &(i, _)) in rows.iter().enumerate() {
            let seen = past + i + 1;
            super::simd::softmax_into(simd, &mut probs[..seen], &scores[r * width..][..seen]);
            for (j, p) in probs[..seen].iter().enumerate() {
                p_packed[j * TILE_ROWS + r] = *p;
            }
        }
        let (p_packed, _) = p_packed[..keys * TILE_ROWS].as_chunks::<TILE_ROWS>();
        // p·v, two vectors of d at a time, over the keys the tile's last row sees.
        let mut pair = [0f32; KEY_STEP];
        for c0 in (0..d).step_by(step) {
            let cw = step.min(d - c0);
            let mut acc = [[zero; 2]; TILE_ROWS];
            for (pj, val) in p_packed.iter().zip(v.chunks_exact(d)) {
                let src = &val[c0..c0 + cw];
                let (vv, _) = if cw == step {
                    S::as_simd_f32s(src)
                } else {
                    pair[..cw].copy_from_slice(src);
                    S::as_simd_f32s(&pair[..step])
                };
                let (v0, v1) = (vv[0], vv[1]);
                for r in 0..TILE_ROWS {
                    let x = simd.splat_f32s(pj[r]);
                    acc[r][0] = simd.mul_add_e_f32s(x, v0, acc[r][0]);
                    acc[r][1] = simd.mul_add_e_f32s(x, v1, acc[r][1]);
                }
            }
            for (a, &(i, h)) in acc.iter().zip(rows) {
                let sums: &[f32] = pulp::bytemuck::cast_slice(a);
                out[((i - first) * heads + h) * d + c0..][..cw].copy_from_slice(&sums[..cw]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;
    use candle_core::Device;

    /// Both kernels (a few rows; the tiled prefill) on head sizes on and off the vector
    /// width, groups of 1 to 3 query heads per KV head, with and without earlier positions,
    /// and keys read from a cache buffer with room past them, against a double-precision
    /// reference.
    #[test]
    fn matches_the_reference() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        for (heads, kv_heads, d, past, n) in [
            (2, 1, 16, 0, 1),
            (4, 2, 32, 6, 3),
            (4, 2, 128, 0, 40),
            (6, 2, 20, 5, 9),
            (3, 3, 48, 33, 17),
            (8, 8, 8, 0, 8),
        ] {
            let total = past + n;
            let room = total + 7;
            let q = values(heads * n * d, (heads * n * d) as u32);
            let kbuf = values(kv_heads * room * d, 11 + d as u32);
            let vbuf = values(kv_heads * room * d, 13 + n as u32);
            let qt = Tensor::from_vec(q.clone(), (1, heads, n, d), &dev)?;
            let kt = Tensor::from_vec(kbuf.clone(), (1, kv_heads, room, d), &dev)?
                .narrow(2, 0, total)?;
            let vt = Tensor::from_vec(vbuf.clone(), (1, kv_heads, room, d), &dev)?
                .narrow(2, 0, total)?;
            let got = causal_attention(&qt, &kt, &vt).expect("applies on the CPU in f32")?;
            assert_eq!(got.dims(), [1, n, heads * d]);
            let got = got.flatten_all()?.to_vec1::<f32>()?;
            let group = heads / kv_heads;
            for i in 0..n {
                for h in 0..heads {
                    let g = h / group;
                    let key = |j: usize, t: usize| kbuf[(g * room + j) * d + t] as f64;
                    let val = |j: usize, t: usize| vbuf[(g * room + j) * d + t] as f64;
                    let seen = past + i + 1;
                    let scores: Vec<f64> = (0..seen)
                        .map(|j| {
                            (0..d)
                                .map(|t| q[(h * n + i) * d + t] as f64 * key(j, t))
                                .sum()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for t in 0..d {
                        let want: f64 = (0..seen).map(|j| e[j] / sum * val(j, t)).sum();
                        let g = got[(i * heads + h) * d + t] as f64;
                        assert!(
                            (g - want).abs() < 1e-4,
                            "{heads}/{kv_heads} heads, d {d}, past {past}, n {n}: \
                             [{i}, {h}, {t}] {g} vs {want}"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
