//! The decode step's one-row products, `frozen::matmul_2d` (which sends one untracked row to
//! the split-over-threads kernel) against candle's own matmul (`gemm`), on Qwen3-0.6B's
//! shapes. Each shape is held in enough copies to exceed the caches (about 400 MB), read
//! round-robin as a decode step reads its layers; the figure is weight bytes streamed per
//! second. Thread count: `RAYON_NUM_THREADS` (default: all cores).
//!
//! `cargo bench -p claas-trainer --bench gemv`. Under `cargo test` (no `--bench` argument)
//! it runs each shape once on one copy and checks the split product against candle's.

use std::time::Instant;

use candle_core::{Device, Tensor};
use claas_trainer::frozen::matmul_2d;

fn main() -> candle_core::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    if !full {
        return smoke();
    }
    let working_set: usize = 400 << 20;
    let dev = Device::Cpu;
    println!("threads: {}", rayon::current_num_threads());
    println!(
        "{:<34} {:>12} {:>12}",
        "product (k -> n, layout)", "split GB/s", "candle GB/s"
    );
    // (k, n, held as the transpose of a contiguous (n, k)?)
    let shapes = [
        (1024, 2048, false, "q: 1024 -> 2048, (k, n)"),
        (1024, 1024, false, "k, v: 1024 -> 1024, (k, n)"),
        (2048, 1024, false, "o: 2048 -> 1024, (k, n)"),
        (1024, 3072, false, "gate, up: 1024 -> 3072, (k, n)"),
        (3072, 1024, false, "down: 3072 -> 1024, (k, n)"),
        (1024, 151_936, true, "lm head: 1024 -> 151936, (n, k)ᵀ"),
    ];
    for (k, n, transposed, label) in shapes {
        let bytes = k * n * 4;
        let copies = working_set.div_ceil(bytes).max(3);
        let mats = (0..copies)
            .map(|i| {
                let m = Tensor::rand(-1f32, 1f32, if transposed { (n, k) } else { (k, n) }, &dev)?;
                let m = (m * (1.0 + i as f64 * 1e-3))?;
                if transposed {
                    m.t()
                } else {
                    Ok(m)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let x = Tensor::rand(-1f32, 1f32, (1, k), &dev)?;
        let split = rate(&mats, bytes, |m| matmul_2d(&x, m))?;
        let candle = rate(&mats, bytes, |m| x.matmul(m))?;
        println!("{label:<34} {split:>12.1} {candle:>12.1}");
    }
    Ok(())
}

/// One product per shape and layout, split vs candle, equal within f32 rounding.
fn smoke() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for (k, n) in [(1024, 2048), (3072, 1024), (1024, 4099)] {
        let x = Tensor::rand(-1f32, 1f32, (1, k), &dev)?;
        let m = Tensor::rand(-1f32, 1f32, (k, n), &dev)?;
        for m in [m.clone(), m.t()?.contiguous()?.t()?] {
            let diff = (matmul_2d(&x, &m)? - x.matmul(&m)?)?
                .abs()?
                .max_keepdim(1)?
                .flatten_all()?
                .to_vec1::<f32>()?[0];
            if diff > 1e-3 {
                candle_core::bail!("{k}x{n}: the split product differs from candle's by {diff}");
            }
        }
    }
    println!("gemv smoke: split products match candle's");
    Ok(())
}

/// GB/s of weight read by `f` over `mats`, the best of 5 round-robin passes after one warm-up.
fn rate(
    mats: &[Tensor],
    bytes: usize,
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<f64> {
    let mut best = f64::MAX;
    for pass in 0..6 {
        let t = Instant::now();
        for m in mats {
            std::hint::black_box(f(m)?);
        }
        let s = t.elapsed().as_secs_f64();
        if pass > 0 {
            best = best.min(s);
        }
    }
    Ok((mats.len() * bytes) as f64 / best / 1e9)
}
