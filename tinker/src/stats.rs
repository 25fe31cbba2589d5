//! What a client has asked of Tinker, shared by its clones: requests now in flight, the most
//! ever in flight at once, requests sent, and the time during which at least one was in
//! flight. Benchmarks subtract that busy time from a job's to get what orchestration adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Default)]
pub(crate) struct CallStats {
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    requests: AtomicU64,
    busy: Mutex<Busy>,
}

#[derive(Debug, Default)]
struct Busy {
    /// When the in-flight count last rose from zero, while it is above zero.
    since: Option<Instant>,
    total: Duration,
}

/// A reading of [`crate::TinkerClient::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    pub in_flight: u64,
    pub max_in_flight: u64,
    /// HTTP requests sent (each retry and each future poll counts).
    pub requests: u64,
    /// Time with at least one request in flight.
    pub busy: Duration,
}

/// One request in flight, until dropped.
pub(crate) struct InFlight<'a>(&'a CallStats);

impl CallStats {
    pub(crate) fn enter(&self) -> InFlight<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if now == 1 {
            busy.since = Some(Instant::now());
        }
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(self)
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let open = busy.since.map_or(Duration::ZERO, |s| s.elapsed());
        StatsSnapshot {
            in_flight: self.in_flight.load(Ordering::SeqCst),
            max_in_flight: self.max_in_flight.load(Ordering::SeqCst),
            requests: self.requests.load(Ordering::Relaxed),
            busy: busy.total + open,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut busy = self.0.busy.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(since) = busy.since.take() {
                busy.total += since.elapsed();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_requests_count_their_union_once_and_idle_time_not_at_all() {
        let s = CallStats::default();
        let start = Instant::now();
        let a = s.enter();
        let b = s.enter();
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        std::thread::sleep(Duration::from_millis(20));
        drop(b);
        let span = start.elapsed();
        let snap = s.snapshot();
        assert_eq!(
            (snap.in_flight, snap.max_in_flight, snap.requests),
            (0, 2, 2)
        );
        assert!(
            snap.busy >= Duration::from_millis(40) && snap.busy <= span,
            "{snap:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(
            s.snapshot().busy,
            snap.busy,
            "nothing in flight: no busy time"
        );
        let _c = s.enter();
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            s.snapshot().busy > snap.busy,
            "an open request counts while it lasts"
        );
    }
}
