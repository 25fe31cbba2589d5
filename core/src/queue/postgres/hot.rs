//! Connections of the worker path, kept between statements without sqlx's release ping.
//!
//! sqlx pings every pooled connection when it goes back to the pool: one extra round trip,
//! and a backend wake-up, per statement. The worker path (claim, heartbeat, phases,
//! completion) runs a few statements per job back to back, so its connections wait here
//! instead, for at most `cap` of them; everything else uses the pool as it is. A connection
//! goes back here only after a statement succeeded on it; after an error it returns to the
//! pool, whose ping closes it if it is broken. One idle here for [`PARK_FOR`] goes back to
//! the pool (see [`HotConnections::sweep`]), and so does one that has gone from statement
//! to statement here for [`PARK_FOR`]: a caller waiting on a full pool gets a connection
//! within about that long even while the worker path keeps every connection busy.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::error::Result;

/// How long a connection stays parked here, or goes from statement to statement without
/// passing through the pool, before it goes back to the pool.
const PARK_FOR: Duration = Duration::from_millis(50);

/// A parked connection, when it was parked, and when it last came out of the pool.
type Parked = (PoolConnection<Postgres>, Instant, Instant);

pub(super) struct HotConnections {
    idle: Mutex<Vec<Parked>>,
    parked: Notify,
    cap: usize,
}

impl HotConnections {
    /// Keeps at most `cap` idle connections out of the pool; 0 turns this off.
    pub(super) fn new(cap: usize) -> Arc<Self> {
        Arc::new(HotConnections {
            idle: Mutex::new(Vec::new()),
            parked: Notify::new(),
            cap,
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        // Nothing panics while holding the lock; a poisoned vector is still consistent.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pop(&self) -> Option<Parked> {
        self.idle().pop()
    }

    /// Hands connections parked for longer than [`PARK_FOR`] back to the pool, every
    /// [`PARK_FOR`], until the task is aborted.
    pub(super) fn sweep(self: &Arc<Self>) -> JoinHandle<()> {
        let hot = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PARK_FOR);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(hot) = hot.upgrade() else { return };
                let stale: Vec<_> = {
                    let mut idle = hot.idle();
                    let keep = idle
                        .iter()
                        .filter(|(_, at, _)| at.elapsed() < PARK_FOR)
                        .count();
                    // Oldest first in the vector: the newest are at the end.
                    let n = idle.len() - keep;
                    idle.drain(..n).collect()
                };
                drop(stale);
            }
        })
    }

    /// A connection from here, or from the pool when none is idle, whichever comes first:
    /// a caller waiting on a full pool takes the next connection parked here.
    pub(super) async fn get<'a>(&'a self, pool: &PgPool) -> Result<HotConnection<'a>> {
        let (conn, from_pool) = loop {
            let parked = self.parked.notified();
            tokio::pin!(parked);
            parked.as_mut().enable();
            if let Some((conn, _, from_pool)) = self.pop() {
                break (conn, from_pool);
            }
            tokio::select! {
                conn = pool.acquire() => break (conn?, Instant::now()),
                () = parked => {}
            }
        };
        Ok(HotConnection {
            conn: Some(conn),
            from_pool,
            home: self,
        })
    }
}

/// A connection of the worker path. Dropped, it goes back to the pool (with sqlx's ping);
/// [`HotConnection::keep`] after a successful statement parks it for the next one instead.
pub(super) struct HotConnection<'a> {
    conn: Option<PoolConnection<Postgres>>,
    from_pool: Instant,
    home: &'a HotConnections,
}

impl HotConnection<'_> {
    pub(super) fn keep(mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.from_pool.elapsed() >= PARK_FOR {
            return; // back through the pool, where a waiting caller may take it
        }
        let mut idle = self.home.idle();
        if idle.len() < self.home.cap {
            idle.push((conn, Instant::now(), self.from_pool));
            drop(idle);
            self.home.parked.notify_one();
        }
    }
}

impl Deref for HotConnection<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
            .as_deref()
            .expect("taken only by keep(), which consumes self")
    }
}

impl DerefMut for HotConnection<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_deref_mut()
            .expect("taken only by keep(), which consumes self")
    }
}
