//! The phases of one job, one function each: make room on the GPU (drain, sleep, VRAM),
//! train and publish (or resume after an earlier attempt published), reload, wake. Every
//! phase is entered through [`Worker::step`], which records it (fenced by the lease) and
//! abandons it when the lease is lost; cancellation is honoured between phases.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use claas_core::queue::{Claimed, Lease};
use claas_core::types::{NewVersion, Phase, Sample, WorkerState};
use serde_json::Value;

use super::{LeaseWatch, PhaseClock, Stop};
use crate::executor::{JobContext, ServedVersion};
use crate::runtime::Worker;

/// One walk through a job's phases. Its state is held here (not returned) so a failed walk
/// still reports how far it got: `slept` for the wake-up, `clock` and `trained` for the
/// feedback log.
pub(super) struct Walk<'a> {
    pub(super) claimed: &'a Claimed,
    pub(super) ctx: &'a JobContext,
    pub(super) lease: &'a Lease,
    pub(super) watch: &'a LeaseWatch,
    /// Set once vLLM is put to sleep, cleared once it is woken.
    pub(super) slept: &'a AtomicBool,
    pub(super) clock: &'a mut PhaseClock,
    /// The samples trained on, once the distill phase has run.
    pub(super) trained: &'a mut Vec<Sample>,
}

impl Walk<'_> {
    /// Between phases: stop if the lease is lost or a cancel was asked for.
    fn cancel_point(&self) -> Result<(), Stop> {
        if self.watch.lost() {
            Err(Stop::LeaseLost)
        } else if self.watch.cancel_requested() {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// What the job published (`version`) and what vLLM should serve: the same version, unless
/// a later job of the LoRA published while this one waited to resume.
struct Published {
    version: i32,
    serve: ServedVersion,
    metrics: Value,
    batch_size: i32,
}

impl Worker {
    /// Walks the job's phases; answers the job's result.
    pub(super) async fn phases(&self, w: &mut Walk<'_>) -> Result<Value, Stop> {
        let orch = &w.ctx.orchestration;
        let published = match w.claimed.job.published_version {
            Some(v) => self.resume_after_publish(w, v).await?,
            None => {
                if orch.sleep_before {
                    self.make_room(w).await?;
                }
                self.train_and_publish(w).await?
            }
        };
        self.reload_phase(w, &published.serve).await?;
        let woke = self.wake_phase(w).await?;
        let vllm = self.executor.serving.controls_vllm();
        Ok(serde_json::json!({
            "version": published.version,
            "metrics": published.metrics,
            "batch_size": published.batch_size,
            "vllm": {
                "slept": vllm && orch.sleep_before && w.claimed.job.published_version.is_none(),
                "woke": vllm && woke,
            },
        }))
    }

    /// A retry after publish: the version exists, only reload and wake remain.
    async fn resume_after_publish(&self, w: &Walk<'_>, version: i32) -> Result<Published, Stop> {
        let current = self.store.get_lora(&w.ctx.lora_id).await?;
        let serve = current.map_or(version, |l| l.current_version.max(version));
        tracing::info!(version, serve, "resuming after publish");
        let result = w.claimed.job.result.clone().unwrap_or_default();
        Ok(Published {
            version,
            serve: self.recorded(&w.ctx.lora_id, serve).await?,
            metrics: result.get("metrics").cloned().unwrap_or_default(),
            batch_size: w.claimed.job.sample_count,
        })
    }

    /// Drain, sleep and VRAM: the GPU is the trainer's once they pass.
    async fn make_room(&self, w: &mut Walk<'_>) -> Result<(), Stop> {
        let ctx = w.ctx;
        let (serving, trainer) = (&self.executor.serving, &self.executor.trainer);
        w.cancel_point()?;
        // The API stops routing chat to this node's vLLM from here on.
        self.set_state(WorkerState::Draining, ctx).await;
        let grace = if serving.controls_vllm() {
            self.opts.drain_grace
        } else {
            Duration::ZERO
        };
        let drain = async {
            tokio::time::sleep(grace).await;
            serving.drain(ctx).await
        };
        self.step(w.lease, w.watch, w.clock, Phase::Drain, drain)
            .await?;
        w.cancel_point()?;
        w.slept.store(true, Ordering::SeqCst);
        self.set_state(WorkerState::Sleeping, ctx).await;
        self.step(w.lease, w.watch, w.clock, Phase::Sleep, serving.sleep(ctx))
            .await?;
        w.cancel_point()?;
        self.step(
            w.lease,
            w.watch,
            w.clock,
            Phase::Vram,
            trainer.wait_vram(ctx),
        )
        .await?;
        Ok(())
    }

    /// Distill the batch from the current version, store the result as the next version
    /// and publish it (refused when the lease was lost or another version came first).
    async fn train_and_publish(&self, w: &mut Walk<'_>) -> Result<Published, Stop> {
        let ctx = w.ctx;
        w.cancel_point()?;
        let attached = self
            .store
            .begin_training(w.lease, w.clock.next(Phase::Distill))
            .await?
            .ok_or(Stop::LeaseLost)?;
        let from = self.adapter_source(ctx).await?;
        let (distilled, samples) = self
            .distill_batch(w.claimed, &attached, ctx, w.lease, w.watch, &from)
            .await?;
        w.cancel_point()?;
        let metrics = distilled.metrics.clone();
        // Publishing checks that `from` is still current (else: version conflict).
        let version = from.version + 1;
        let store = self.executor.trainer.store_adapter(ctx, version, distilled);
        let stored = self
            .step(w.lease, w.watch, w.clock, Phase::Publish, store)
            .await?;
        let record = NewVersion {
            version,
            storage_uri: stored.uri,
            sha256: stored.sha256,
            metrics: metrics.clone(),
        };
        if !self.store.publish(w.lease, &record).await? {
            // Nobody will read these files; a retry writes its own.
            if let Err(e) = self.remove_version(&record.storage_uri).await {
                tracing::warn!(uri = %record.storage_uri, error = %e, "could not remove an unpublished version");
            }
            return Err(self.publish_refused(w.lease, version).await);
        }
        self.prune_old_versions(&ctx.lora_id).await;
        let batch_size = i32::try_from(samples.len()).unwrap_or(i32::MAX);
        *w.trained = samples;
        Ok(Published {
            version,
            serve: ServedVersion {
                version,
                uri: record.storage_uri,
                previous_uri: Some(from.uri.clone()).filter(|u| !u.is_empty()),
            },
            metrics,
            batch_size,
        })
    }

    /// Loads the published version into vLLM (nothing to do in process). A failure here
    /// says the version is published but not served.
    async fn reload_phase(&self, w: &mut Walk<'_>, serve: &ServedVersion) -> Result<(), Stop> {
        let reload = self.executor.serving.reload(w.ctx, serve);
        self.step(w.lease, w.watch, w.clock, Phase::Reload, reload)
            .await
            .map_err(|stop| match stop {
                Stop::Failed(phase, mut e) => {
                    e.code = "reload_failed".into();
                    e.message = format!(
                        "version {} is published but not loaded into vLLM: {}",
                        serve.version, e.message
                    );
                    Stop::Failed(phase, e)
                }
                other => other,
            })
    }

    /// Wakes vLLM if this walk slept it and the job asked for it; answers whether it did.
    async fn wake_phase(&self, w: &mut Walk<'_>) -> Result<bool, Stop> {
        if !(w.slept.load(Ordering::SeqCst) && w.ctx.orchestration.wake_after) {
            return Ok(false);
        }
        let wake = self.executor.serving.wake(w.ctx);
        self.step(w.lease, w.watch, w.clock, Phase::Wake, wake)
            .await?;
        w.slept.store(false, Ordering::SeqCst);
        self.set_state(WorkerState::Training, w.ctx).await;
        Ok(true)
    }
}
