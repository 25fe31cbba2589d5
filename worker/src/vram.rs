//! Free GPU memory, read through NVIDIA's management library (NVML, `libnvidia-ml.so`,
//! loaded at run time: the binary builds and runs on machines without it). NVML rather than
//! the CUDA driver API: it needs no CUDA context, so the probe itself takes no GPU memory,
//! and it cannot pin the CUDA bindings version candle's `cuda` feature builds against.

use std::time::{Duration, Instant};

use crate::executor::{PhaseError, PhaseResult};

/// Something that can say how much GPU memory is free.
pub trait VramProbe: Send + Sync {
    /// `(free, total)` bytes of the GPU this worker trains on.
    fn free_total(&self) -> Result<(u64, u64), String>;
}

/// GPU 0 through NVML.
pub struct Nvml {
    nvml: nvml_wrapper::Nvml,
}

impl Nvml {
    /// Loads NVML; an error names why (no driver, no GPU).
    pub fn init() -> Result<Self, String> {
        nvml_wrapper::Nvml::init()
            .map(|nvml| Nvml { nvml })
            .map_err(|e| format!("cannot read GPU memory through NVML: {e}"))
    }
}

impl VramProbe for Nvml {
    fn free_total(&self) -> Result<(u64, u64), String> {
        let dev = self
            .nvml
            .device_by_index(0)
            .map_err(|e| format!("NVML device 0: {e}"))?;
        let mem = dev
            .memory_info()
            .map_err(|e| format!("NVML memory info: {e}"))?;
        Ok((mem.free, mem.total))
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Polls until at least `min_gb` GiB are free, at most `timeout`; the failure names both
/// numbers and is retryable (vLLM may free its memory late, or another process holds it).
pub async fn wait_for_free(
    probe: &dyn VramProbe,
    min_gb: f64,
    timeout: Duration,
    every: Duration,
) -> PhaseResult<()> {
    let started = Instant::now();
    loop {
        let (free, total) = probe
            .free_total()
            .map_err(|e| PhaseError::retryable("vram_unreadable", e))?;
        let free_gb = free as f64 / GIB;
        if free_gb >= min_gb {
            tracing::info!(free_gb, total_gb = total as f64 / GIB, "GPU memory free");
            return Ok(());
        }
        if started.elapsed() >= timeout {
            return Err(PhaseError::retryable(
                "vram_timeout",
                format!(
                    "only {free_gb:.1} GiB of {:.1} GiB GPU memory free after {:.0} s; \
                     training needs {min_gb} GiB (FEEDBACK_MIN_FREE_VRAM_GB)",
                    total as f64 / GIB,
                    timeout.as_secs_f64()
                ),
            ));
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Frees 4 GiB per read, from 0 up to 16 GiB of 16.
    struct Freeing(AtomicU64);

    impl VramProbe for Freeing {
        fn free_total(&self) -> Result<(u64, u64), String> {
            let gib = 1u64 << 30;
            let free = self.0.fetch_add(4 * gib, Ordering::SeqCst).min(16 * gib);
            Ok((free, 16 * gib))
        }
    }

    #[tokio::test]
    async fn waits_until_enough_memory_is_free() {
        let probe = Freeing(AtomicU64::new(0));
        wait_for_free(
            &probe,
            8.0,
            Duration::from_secs(5),
            Duration::from_millis(1),
        )
        .await
        .expect("8 GiB free after three reads");
        assert_eq!(probe.0.load(Ordering::SeqCst), 12 << 30);
    }

    #[tokio::test]
    async fn a_wait_that_times_out_fails_retryably_naming_both_numbers() {
        let probe = Freeing(AtomicU64::new(0));
        let err = wait_for_free(
            &probe,
            20.0,
            Duration::from_millis(20),
            Duration::from_millis(1),
        )
        .await
        .expect_err("never 20 GiB of 16");
        assert_eq!(err.code, "vram_timeout");
        assert!(err.retryable);
        assert!(err.message.contains("of 16.0 GiB"), "{}", err.message);
        assert!(err.message.contains("needs 20 GiB"), "{}", err.message);
    }
}
