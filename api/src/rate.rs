//! A count of recent actions per API key over a sliding window: what bounds the LoRAs one
//! key may create or overwrite per hour (`server.max_lora_inits_per_key_per_hour`). Per API
//! process, so N replicas allow up to N times the limit; memory is at most `max` instants
//! per key that acted within the window.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `max` actions per key within `window` (0: no limit).
pub struct WindowLimit {
    max: usize,
    window: Duration,
    hits: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl WindowLimit {
    pub fn new(max: usize, window: Duration) -> WindowLimit {
        WindowLimit {
            max,
            window,
            hits: Mutex::default(),
        }
    }

    /// Counts one action by `key`, or, when it already has `max` within the window, says
    /// in how many seconds the oldest of them leaves it.
    pub fn take(&self, key: &str) -> Result<(), u64> {
        if self.max == 0 {
            return Ok(());
        }
        let mut hits = self.hits.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let recent = hits.entry(key.to_owned()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.window)
        {
            recent.pop_front();
        }
        if recent.len() >= self.max {
            let oldest = recent.front().copied().unwrap_or(now);
            let wait = self.window.saturating_sub(now.duration_since(oldest));
            return Err(wait.as_secs().max(1));
        }
        recent.push_back(now);
        // Forget keys whose every action has left the window.
        if hits.len() > 1024 {
            let window = self.window;
            hits.retain(|_, r| r.back().is_some_and(|t| now.duration_since(*t) < window));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_max_actions_per_window() {
        let limit = WindowLimit::new(2, Duration::from_secs(3600));
        assert_eq!(limit.take("alice"), Ok(()));
        assert_eq!(limit.take("alice"), Ok(()));
        let wait = limit.take("alice").expect_err("third within the hour");
        assert!((3590..=3600).contains(&wait), "{wait}");
        assert_eq!(limit.take("bob"), Ok(()), "another key has its own count");
        let unlimited = WindowLimit::new(0, Duration::from_secs(3600));
        assert!((0..10).all(|_| unlimited.take("alice").is_ok()));
    }

    #[test]
    fn actions_leave_the_window() {
        let limit = WindowLimit::new(1, Duration::from_millis(30));
        assert_eq!(limit.take("k"), Ok(()));
        assert!(limit.take("k").is_err());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(limit.take("k"), Ok(()));
    }
}
