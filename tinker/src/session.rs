//! One long-lived Tinker session per process (wire doc §2, §6.2, §6.3, §6.10): opened on
//! first use, kept alive by a heartbeat every 10 s, opened again after Tinker ends it (a
//! 410). Training models and sampling sessions are each numbered from 0 within a session;
//! [`Sessions::reserve`] hands out those seq ids with the session they belong to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{Result, TinkerClient};

/// How often a live session is kept alive (the SDK's heartbeat period).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);

/// Which per-session counter a seq id comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seq {
    /// `create_model` and `load_weights` (`model_seq_id`).
    Model,
    /// `create_sampling_session` (`sampling_session_seq_id`).
    Sampler,
}

/// The process's session, shared by everything that calls Tinker through one client.
pub struct Sessions {
    client: TinkerClient,
    live: tokio::sync::Mutex<Option<Live>>,
}

/// A live session and the seq ids handed out in it.
struct Live {
    id: String,
    models: u64,
    samplers: u64,
    /// Set by the heartbeat when Tinker answers 410.
    expired: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl Live {
    /// Starts heartbeats for session `id`; they stop (and mark it expired) on a 410.
    fn start(client: &TinkerClient, id: String) -> Live {
        let expired = Arc::new(AtomicBool::new(false));
        let (client, sid, flag) = (client.clone(), id.clone(), expired.clone());
        let heartbeat = tokio::spawn(async move {
            let first = tokio::time::Instant::now() + HEARTBEAT_EVERY;
            let mut every = tokio::time::interval_at(first, HEARTBEAT_EVERY);
            loop {
                every.tick().await;
                match client.session_heartbeat(&sid).await {
                    Ok(()) => {}
                    Err(e) if e.is_session_expired() => {
                        tracing::warn!(session = %sid, "Tinker ended the session");
                        flag.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!(session = %sid, error = %e, "Tinker heartbeat failed"),
                }
            }
        });
        Live {
            id,
            models: 0,
            samplers: 0,
            expired,
            heartbeat,
        }
    }
}

impl Sessions {
    /// No session yet: the first [`Self::reserve`] opens one.
    pub fn new(client: TinkerClient) -> Sessions {
        Sessions {
            client,
            live: tokio::sync::Mutex::new(None),
        }
    }

    pub fn client(&self) -> &TinkerClient {
        &self.client
    }

    /// A seq id from the session's `kind` counter, and the session it belongs to (opened
    /// now when there is none, or Tinker ended the last one).
    pub async fn reserve(&self, kind: Seq) -> Result<(String, u64)> {
        let mut slot = self.live.lock().await;
        let live = match slot.take() {
            Some(s) if !s.expired.load(Ordering::SeqCst) => s,
            _ => {
                let id = self.client.create_session().await?;
                tracing::info!(session = %id, "opened a Tinker session");
                Live::start(&self.client, id)
            }
        };
        let live = slot.insert(live);
        let counter = match kind {
            Seq::Model => &mut live.models,
            Seq::Sampler => &mut live.samplers,
        };
        let seq = *counter;
        *counter += 1;
        Ok((live.id.clone(), seq))
    }

    /// Drops session `id` when it is still the live one (Tinker said it is over): the next
    /// [`Self::reserve`] opens a new one.
    pub async fn forget(&self, id: &str) {
        let mut slot = self.live.lock().await;
        if slot.as_ref().is_some_and(|s| s.id == id) {
            *slot = None;
        }
    }
}
