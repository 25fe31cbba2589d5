//! Failed dashboard logins, counted per client address: after [`MAX_FAILURES`] within
//! [`WINDOW`], the address gets 429 until the window has passed, so a stolen-looking form
//! cannot be used to guess admin keys at line rate. Per process (each replica counts its
//! own), bounded to [`MAX_TRACKED`] addresses. Behind a reverse proxy every client shares
//! the proxy's address; the window is short so a lock-out there passes quickly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed logins one address may make within [`WINDOW`].
pub const MAX_FAILURES: u32 = 10;
/// How long failures are remembered, and how long a blocked address waits.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most; past it the oldest windows are forgotten first.
const MAX_TRACKED: usize = 10_000;

/// Failures per address: how many, and when the first of the current window was.
#[derive(Default)]
pub struct LoginThrottle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds until `ip` may try again, when it has failed too often.
    pub fn blocked_for(&self, ip: IpAddr) -> Option<u64> {
        let (count, since) = *self.lock().get(&ip)?;
        let left = WINDOW.checked_sub(since.elapsed())?;
        (count >= MAX_FAILURES).then(|| left.as_secs().max(1))
    }

    /// Records a failed login from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let mut m = self.lock();
        if m.len() >= MAX_TRACKED && !m.contains_key(&ip) {
            m.retain(|_, (_, since)| since.elapsed() < WINDOW);
            if m.len() >= MAX_TRACKED {
                if let Some(oldest) = m.iter().min_by_key(|(_, (_, s))| *s).map(|(k, _)| *k) {
                    m.remove(&oldest);
                }
            }
        }
        let entry = m.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= WINDOW {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    /// A successful login clears the address's failures.
    pub fn succeeded(&self, ip: IpAddr) {
        self.lock().remove(&ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_blocked_after_too_many_failures_and_others_are_not() {
        let t = LoginThrottle::default();
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        for _ in 0..MAX_FAILURES - 1 {
            t.failed(a);
        }
        assert_eq!(t.blocked_for(a), None, "under the limit");
        t.failed(a);
        let wait = t.blocked_for(a).expect("blocked at the limit");
        assert!(wait > 0 && wait <= WINDOW.as_secs(), "{wait}");
        assert_eq!(t.blocked_for(b), None, "another address is not");
        t.succeeded(a);
        assert_eq!(t.blocked_for(a), None);
    }
}
