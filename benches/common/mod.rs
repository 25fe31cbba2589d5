//! What the per-job benches share: enqueue one job and wait for it to end.

use std::time::{Duration, Instant};

use claas_core::queue::SharedStore;
use claas_core::types::{Job, JobStatus, NewJob};

/// Enqueues `job`, polls until it ends (60 s at most), and returns it; an error unless it
/// succeeded.
pub async fn run_to_end(store: &SharedStore, job: &NewJob) -> anyhow::Result<Job> {
    store.enqueue(job).await?;
    let started = Instant::now();
    let done = loop {
        let cur = store
            .get_job(job.id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("job vanished"))?;
        if cur.status.is_terminal() {
            break cur;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "job {} never ended",
            job.id
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    anyhow::ensure!(
        done.status == JobStatus::Succeeded,
        "job failed: {:?}",
        done.error
    );
    Ok(done)
}
