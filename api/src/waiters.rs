//! Feedback requests waiting for their jobs. One task per API process asks the database
//! which of all the waited-on jobs are still unfinished, one statement every
//! [`POLL_EVERY`], and wakes the requests whose jobs finished. A waiting request holds no
//! database connection, no worker and no copy of its feedback: an entry in a map and a
//! oneshot channel (see BENCHMARKS.md "Waiting feedback requests").

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use claas_core::queue::SharedStore;
use tokio::sync::{oneshot, Notify};
use uuid::Uuid;

/// How often the waited-on jobs are looked at while any request waits.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Ids asked about per statement.
const BATCH: usize = 1000;

pub struct Waiters {
    store: SharedStore,
    waiting: Mutex<HashMap<Uuid, Vec<oneshot::Sender<()>>>>,
    added: Notify,
    poller: std::sync::Once,
}

impl Waiters {
    pub fn new(store: SharedStore) -> Arc<Waiters> {
        Arc::new(Waiters {
            store,
            waiting: Mutex::new(HashMap::new()),
            added: Notify::new(),
            poller: std::sync::Once::new(),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<oneshot::Sender<()>>>> {
        // Nothing panics while holding the lock; a poisoned map is still consistent.
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.map().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until job `id` has finished (or is gone), or `within` passes; true when it
    /// finished. The caller reads the job afterwards.
    pub async fn wait(self: &Arc<Self>, id: Uuid, within: Duration) -> bool {
        self.poller.call_once(|| {
            tokio::spawn(poll(Arc::downgrade(self)));
        });
        let (tx, rx) = oneshot::channel();
        self.map().entry(id).or_default().push(tx);
        self.added.notify_one();
        let finished = matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())));
        if !finished {
            let mut map = self.map();
            if let Some(senders) = map.get_mut(&id) {
                senders.retain(|s| !s.is_closed());
                if senders.is_empty() {
                    map.remove(&id);
                }
            }
        }
        finished
    }

    /// One look at the database: wakes the requests whose jobs are no longer unfinished.
    async fn poll_once(&self) {
        let ids: Vec<Uuid> = {
            let mut map = self.map();
            // Requests whose clients went away leave nothing behind.
            map.retain(|_, senders| {
                senders.retain(|s| !s.is_closed());
                !senders.is_empty()
            });
            map.keys().copied().collect()
        };
        for chunk in ids.chunks(BATCH) {
            let open: HashSet<Uuid> = match self.store.unfinished_jobs(chunk).await {
                Ok(open) => open.into_iter().collect(),
                Err(e) => {
                    // The jobs are accepted; their requests keep waiting, up to their wait.
                    tracing::warn!(error = %e, "could not look at the waited-on jobs");
                    return;
                }
            };
            let mut map = self.map();
            for id in chunk.iter().filter(|id| !open.contains(id)) {
                for tx in map.remove(id).unwrap_or_default() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

/// The poller: runs while the [`Waiters`] exist, sleeping while nobody waits.
async fn poll(waiters: Weak<Waiters>) {
    loop {
        let Some(w) = waiters.upgrade() else {
            return;
        };
        if w.map().is_empty() {
            // Until the next request (a notification sent meanwhile is kept), or a second,
            // to notice when the process's state is gone.
            let _ = tokio::time::timeout(Duration::from_secs(1), w.added.notified()).await;
            continue;
        }
        w.poll_once().await;
        drop(w);
        tokio::time::sleep(POLL_EVERY).await;
    }
}
