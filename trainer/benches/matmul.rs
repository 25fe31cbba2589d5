//! The SDPO step's many-row products through `frozen::matmul_2d` on Qwen3-0.6B's shapes
//! (each projection forward, its input gradient `g · W` in the backward, the tied LM head),
//! with the right-hand side `(k, n)` held contiguous and read through the transpose of a
//! contiguous `(n, k)`: `gemm` packs the second one scalar at a time, which is why the
//! model holds a second layout of its weights for the backward and the LM head. GFLOP/s,
//! the best of 5 timed repetitions after one warm-up. Thread count: `RAYON_NUM_THREADS`
//! (default: all cores).
//!
//! `cargo bench -p claas-trainer --bench matmul`. Under `cargo test` (no `--bench` argument)
//! it checks each layout's product against a plain loop on small shapes.

use std::time::Instant;

use candle_core::{Device, Tensor};
use claas_trainer::frozen::matmul_2d;

fn main() -> candle_core::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        return smoke();
    }
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<44} {:>12} {:>12}",
        "product (rows x k -> n)", "held (k, n)", "via (n, k)ᵀ"
    );
    // What the SDPO step multiplies, and by what (GFLOP/s in each layout of the same values).
    let shapes = [
        (128, 1024, 2048, "q forward"),
        (128, 1024, 3072, "gate/up forward"),
        (128, 3072, 1024, "down forward"),
        (128, 2048, 1024, "q backward (g · W)"),
        (128, 3072, 1024, "gate/up backward (g · W)"),
        (128, 1024, 3072, "down backward (g · W)"),
        (64, 1024, 151_936, "lm head (x · Eᵀ)"),
    ];
    for (rows, k, n, label) in shapes {
        let x = Tensor::rand(-1f32, 1f32, (rows, k), &dev)?;
        let held = Tensor::rand(-1f32, 1f32, (k, n), &dev)?;
        let via = held.t()?.contiguous()?.t()?;
        let flops = 2.0 * (rows * k * n) as f64;
        let fast = best_of(5, || matmul_2d(&x, &held))?;
        let slow = best_of(5, || matmul_2d(&x, &via))?;
        let name = format!("{label}: {rows} x {k} -> {n}");
        println!(
            "{name:<44} {:>12.1} {:>12.1}",
            flops / fast / 1e9,
            flops / slow / 1e9
        );
    }
    Ok(())
}

/// Seconds of the fastest of `reps` calls after one warm-up.
fn best_of(reps: usize, f: impl Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    std::hint::black_box(f()?);
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        std::hint::black_box(f()?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Both layouts of the right-hand side, against a plain triple loop.
fn smoke() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (rows, k, n) in [(5, 7, 9), (33, 40, 70), (128, 64, 48)] {
        let x = Tensor::rand(-1f32, 1f32, (rows, k), &dev)?;
        let m = Tensor::rand(-1f32, 1f32, (k, n), &dev)?;
        let (xv, mv) = (x.to_vec2::<f32>()?, m.to_vec2::<f32>()?);
        for m in [m.clone(), m.t()?.contiguous()?.t()?] {
            let got = matmul_2d(&x, &m)?.to_vec2::<f32>()?;
            for (i, row) in got.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    let want: f32 = (0..k).map(|p| xv[i][p] * mv[p][j]).sum();
                    if (v - want).abs() > 1e-4 * (1.0 + want.abs()) {
                        candle_core::bail!("{rows}x{k}x{n} [{i}][{j}]: {v} vs {want}");
                    }
                }
            }
        }
    }
    println!("matmul smoke: both layouts match a plain loop");
    Ok(())
}
