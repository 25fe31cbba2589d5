//! Feedback requests waiting for their jobs. One task per API process asks the database
//! which of all the waited-on jobs are still unfinished, one statement every
//! [`POLL_EVERY`], wakes the requests whose jobs finished and ends the waits that are past
//! their time. A waiting request holds no database connection, no worker, no timer and no
//! copy of its feedback: an entry in a map and a oneshot channel (see BENCHMARKS.md
//! "Waiting feedback requests").

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use claas_core::queue::SharedStore;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

/// How often the waited-on jobs are looked at while any request waits, and how often the
/// waits past their time are ended (apart from the database: a slow statement delays no
/// wait's end). A wait ends at most this much after its time.
const POLL_EVERY: Duration = Duration::from_millis(200);

/// Ids asked about per statement.
const BATCH: usize = 1000;

/// One waiting request: until when, and how to tell it (true: its job finished).
struct Waiter {
    until: Instant,
    tx: oneshot::Sender<bool>,
}

type WaitMap = HashMap<Uuid, Vec<Waiter>>;

/// One registered wait ([`Waiters::wait`]): true when its job finished, false when its time
/// passed. The poller answers every wait, at its time at the latest; it drops the sender
/// only with the map itself (false then too).
pub struct Finished(oneshot::Receiver<bool>);

impl Future for Finished {
    type Output = bool;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|told| told.unwrap_or(false))
    }
}

pub struct Waiters {
    store: SharedStore,
    waiting: Mutex<WaitMap>,
    added: Notify,
    /// The poller, started by the first wait and again should it ever end (a panic).
    poller: Mutex<Option<JoinHandle<()>>>,
}

impl Waiters {
    pub fn new(store: SharedStore) -> Arc<Waiters> {
        Arc::new(Waiters {
            store,
            waiting: Mutex::new(HashMap::new()),
            added: Notify::new(),
            poller: Mutex::new(None),
        })
    }

    fn map(&self) -> MutexGuard<'_, WaitMap> {
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

    /// Waits until job `id` has finished (or is gone), or `within` passes: the wait is
    /// registered now, and [`Finished`] resolves true when the job finished, false at its
    /// time. The caller reads the job afterwards.
    pub fn wait(self: &Arc<Self>, id: Uuid, within: Duration) -> Finished {
        self.start_poller();
        let (tx, rx) = oneshot::channel();
        let until = Instant::now() + within;
        // Room for one: most jobs have one waiting request (a `Vec`'s first growth would
        // make room for four).
        let waiter = Waiter { until, tx };
        (self.map().entry(id))
            .or_insert_with(|| Vec::with_capacity(1))
            .push(waiter);
        self.added.notify_one();
        Finished(rx)
    }

    fn start_poller(self: &Arc<Self>) {
        let mut poller = self
            .poller
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if poller.as_ref().is_none_or(JoinHandle::is_finished) {
            let (a, b) = (Arc::downgrade(self), Arc::downgrade(self));
            *poller = Some(tokio::spawn(async move {
                tokio::join!(poll(a), expire(b));
            }));
        }
    }

    /// Ends the waits past their time and forgets the requests whose clients went away.
    fn expire_now(&self) {
        let now = Instant::now();
        let mut ended = Vec::new();
        self.map().retain(|_, waiters| {
            waiters.retain(|w| !w.tx.is_closed());
            ended.extend(waiters.extract_if(.., |w| w.until <= now));
            !waiters.is_empty()
        });
        for w in ended {
            let _ = w.tx.send(false);
        }
    }

    /// One look at the database: wakes the requests whose jobs are no longer unfinished.
    async fn poll_once(&self) {
        let ids: Vec<Uuid> = self.map().keys().copied().collect();
        for chunk in ids.chunks(BATCH) {
            let open: HashSet<Uuid> = match self.store.unfinished_jobs(chunk).await {
                Ok(open) => open.into_iter().collect(),
                Err(e) => {
                    // The jobs are accepted; their requests keep waiting, up to their time.
                    tracing::warn!(error = %e, "could not look at the waited-on jobs");
                    return;
                }
            };
            let mut map = self.map();
            for id in chunk.iter().filter(|id| !open.contains(id)) {
                for w in map.remove(id).unwrap_or_default() {
                    let _ = w.tx.send(true);
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

/// Ends the waits past their time, every [`POLL_EVERY`], while the [`Waiters`] exist.
async fn expire(waiters: Weak<Waiters>) {
    loop {
        let Some(w) = waiters.upgrade() else {
            return;
        };
        w.expire_now();
        drop(w);
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use claas_core::testing::{job, lora, TestDb};

    use super::*;

    async fn queued_job(db: &TestDb) -> Uuid {
        db.store.create_lora(&lora("w/a")).await.expect("lora");
        let queued = db.store.enqueue(&job("w/a", 1)).await.expect("enqueue");
        queued.job.id
    }

    /// A wait ends at its time although its job never does, and leaves nothing behind.
    #[tokio::test]
    async fn a_wait_ends_at_its_time() {
        let db = TestDb::sqlite().await;
        let id = queued_job(&db).await;
        let waiters = Waiters::new(db.store.clone());
        let started = std::time::Instant::now();
        assert!(!waiters.wait(id, Duration::from_millis(300)).await);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(
            took < Duration::from_millis(300) + 3 * POLL_EVERY,
            "{took:?}"
        );
        assert!(waiters.is_empty());
        db.cleanup().await;
    }

    /// A job that finishes wakes its waits (within a poll), long before their time.
    #[tokio::test]
    async fn a_finished_job_wakes_its_waits() {
        let db = TestDb::sqlite().await;
        let id = queued_job(&db).await;
        let waiters = Waiters::new(db.store.clone());
        let waits: Vec<_> = (0..3)
            .map(|_| {
                let w = waiters.clone();
                tokio::spawn(async move { w.wait(id, Duration::from_secs(60)).await })
            })
            .collect();
        while waiters.len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let cancelled = std::time::Instant::now();
        db.store.cancel(id).await.expect("cancel");
        for w in waits {
            assert!(w.await.expect("join"), "woken as finished");
        }
        assert!(cancelled.elapsed() < Duration::from_secs(2));
        assert!(waiters.is_empty());
        db.cleanup().await;
    }

    /// A request whose client went away is forgotten at the next poll.
    #[tokio::test]
    async fn an_abandoned_wait_leaves_nothing() {
        let db = TestDb::sqlite().await;
        let id = queued_job(&db).await;
        let waiters = Waiters::new(db.store.clone());
        let w = waiters.clone();
        let wait = tokio::spawn(async move { w.wait(id, Duration::from_secs(60)).await });
        while waiters.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        wait.abort();
        tokio::time::sleep(3 * POLL_EVERY).await;
        assert!(waiters.is_empty());
        db.cleanup().await;
    }
}
