//! The completion cache: what the served model produced for each answer, kept so that
//! feedback on that answer trains on exactly the sampled tokens.
//!
//! Entries are keyed by the caller that asked (its API key's id; '' on an open API), the
//! model that answered (a LoRA id or the base model) and the SHA-256 of the answer's
//! normalised visible text: answers from different adapters never overwrite each other, and
//! one tenant can neither train on another's rollout nor plant one for another's feedback.
//! Two stores: in process ([`MemoryCache`], `claas dev`) and Redis ([`RedisCache`], shared
//! by every API replica), both bounded per caller by `completion_cache_size` and in all by
//! `completion_cache_total` (oldest write evicted first, so one tenant's chats cannot evict
//! another's rollouts), expiring after `completion_cache_ttl_s`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// One answer as the model produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedCompletion {
    /// The model that answered (LoRA id or base model name).
    pub model: String,
    /// The response text as generated, thinking included.
    pub response: String,
    pub prompt_token_ids: Vec<u32>,
    /// Sampled ids, the terminating stop token included when there was one.
    pub response_token_ids: Vec<u32>,
    /// One raw log-prob per response token; `None` when the server gave none that align
    /// with the tokens.
    pub response_logprobs: Option<Vec<f32>>,
    /// All system messages, joined by newlines.
    pub system_prompt: String,
    /// How the token ids were obtained: `server` (vLLM's `return_token_ids`) or
    /// `retokenized` (an older vLLM; its `/tokenize` on the text).
    pub token_source: String,
    /// Unix seconds.
    pub created_at: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("completion cache ({backend}): {message}")]
pub struct CacheError {
    pub backend: &'static str,
    pub message: String,
}

#[async_trait]
pub trait CompletionCache: Send + Sync {
    /// Stores `entry` under (`owner`, `model`, `hash`), replacing what was there. Each
    /// owner keeps at most the per-owner bound, and everyone together the total bound;
    /// the oldest writes go first.
    async fn put(
        &self,
        owner: &str,
        model: &str,
        hash: &str,
        entry: &CachedCompletion,
    ) -> Result<(), CacheError>;
    /// The live entry under (`owner`, `model`, `hash`), if any.
    async fn get(
        &self,
        owner: &str,
        model: &str,
        hash: &str,
    ) -> Result<Option<CachedCompletion>, CacheError>;
    async fn ping(&self) -> Result<(), CacheError>;
    fn backend(&self) -> &'static str;
}

/// The bounds: entries per owner (`completion_cache_size`) and in all
/// (`completion_cache_total`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub per_owner: usize,
    pub total: usize,
}

impl Bounds {
    pub fn new(per_owner: usize, total: usize) -> Bounds {
        Bounds {
            per_owner: per_owner.max(1),
            total: total.max(1),
        }
    }
}

fn key(owner: &str, model: &str, hash: &str) -> String {
    // The hash has a fixed length and an owner (an API key's id) holds no ':', so the key
    // cannot be ambiguous whatever the model name holds.
    format!("{hash}:{owner}:{model}")
}

/// In-process cache: FIFO by write (a rewrite refreshes the entry), bounded per owner and
/// in all, with a TTL.
pub struct MemoryCache {
    bounds: Bounds,
    ttl: Duration,
    inner: Mutex<MemoryInner>,
}

/// One write, as the eviction queues hold it.
type Write = (String, u64);

#[derive(Default)]
struct MemoryInner {
    /// key → (write generation, written at, owner, entry)
    entries: HashMap<String, (u64, Instant, String, CachedCompletion)>,
    /// Writes in order; stale generations are skipped when evicting.
    order: VecDeque<Write>,
    /// Each owner's writes in order, and how many of its entries are live.
    owners: HashMap<String, (VecDeque<Write>, usize)>,
    generation: u64,
}

impl MemoryInner {
    fn is_live(&self, (k, g): &Write) -> bool {
        self.entries.get(k).is_some_and(|(eg, ..)| eg == g)
    }

    /// Removes the entry a write made, if it is still that write's.
    fn evict(&mut self, w: &Write) {
        if !self.is_live(w) {
            return;
        }
        if let Some((_, _, owner, _)) = self.entries.remove(&w.0) {
            let now_empty = self.owners.get_mut(&owner).is_some_and(|(_, live)| {
                *live -= 1;
                *live == 0
            });
            if now_empty {
                self.owners.remove(&owner);
            }
        }
    }

    /// Drops stale writes from a queue grown long under rewrites of the same keys.
    fn compact(&self, queue: &VecDeque<Write>, live: usize) -> Option<VecDeque<Write>> {
        (queue.len() > 2 * live + 16)
            .then(|| queue.iter().filter(|w| self.is_live(w)).cloned().collect())
    }
}

impl MemoryCache {
    pub fn new(bounds: Bounds, ttl: Duration) -> MemoryCache {
        MemoryCache {
            bounds,
            ttl,
            inner: Mutex::new(MemoryInner::default()),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl CompletionCache for MemoryCache {
    async fn put(
        &self,
        owner: &str,
        model: &str,
        hash: &str,
        entry: &CachedCompletion,
    ) -> Result<(), CacheError> {
        let k = key(owner, model, hash);
        let mut m = self.lock();
        m.generation += 1;
        let write = (k.clone(), m.generation);
        let entry = (write.1, Instant::now(), owner.to_owned(), entry.clone());
        let new = m.entries.insert(k, entry).is_none();
        m.order.push_back(write.clone());
        let (queue, live) = m.owners.entry(owner.to_owned()).or_default();
        queue.push_back(write);
        *live += usize::from(new);
        // This owner's oldest writes first, then everyone's.
        while m
            .owners
            .get(owner)
            .is_some_and(|(_, live)| *live > self.bounds.per_owner)
        {
            let Some(w) = m.owners.get_mut(owner).and_then(|(q, _)| q.pop_front()) else {
                break;
            };
            m.evict(&w);
        }
        while m.entries.len() > self.bounds.total {
            let Some(w) = m.order.pop_front() else {
                break;
            };
            m.evict(&w);
        }
        if let Some(order) = m.compact(&m.order, m.entries.len()) {
            m.order = order;
        }
        if let Some((queue, live)) = m.owners.get(owner) {
            if let Some(q) = m.compact(queue, *live) {
                if let Some(slot) = m.owners.get_mut(owner) {
                    slot.0 = q;
                }
            }
        }
        Ok(())
    }

    async fn get(
        &self,
        owner: &str,
        model: &str,
        hash: &str,
    ) -> Result<Option<CachedCompletion>, CacheError> {
        let k = key(owner, model, hash);
        let m = self.lock();
        Ok(match m.entries.get(&k) {
            // An expired entry is a miss; the bounds evict it in time.
            Some((_, at, _, e)) if at.elapsed() <= self.ttl => Some(e.clone()),
            _ => None,
        })
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

/// Redis cache shared by all API replicas. Each entry is a string key with the TTL; sorted
/// sets of keys by write time (one per owner, one for everyone) bound the entries, evicting
/// the oldest writes, in one server-side script so concurrent replicas never exceed a bound.
pub struct RedisCache {
    conn: redis::aio::ConnectionManager,
    namespace: String,
    bounds: Bounds,
    ttl: Duration,
}

/// KEYS: the global index, the owner's index, the entry. ARGV: the value, the TTL (s), now
/// (ms), the per-owner bound, the total bound. A write evicted by the total bound may stay
/// listed in its owner's index: it is that owner's oldest, so the owner's own trimming
/// removes it first and the owner's live entries never exceed its bound.
const PUT_SCRIPT: &str = r"
local now = tonumber(ARGV[3])
local ttl_ms = tonumber(ARGV[2]) * 1000
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], now, KEYS[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - ttl_ms)
  redis.call('PEXPIRE', KEYS[i], ttl_ms)
end
local function trim(index, bound)
  local excess = redis.call('ZCARD', index) - bound
  if excess > 0 then
    local victims = redis.call('ZRANGE', index, 0, excess - 1)
    redis.call('ZREM', KEYS[1], unpack(victims))
    redis.call('ZREM', KEYS[2], unpack(victims))
    redis.call('DEL', unpack(victims))
  end
end
trim(KEYS[2], tonumber(ARGV[4]))
trim(KEYS[1], tonumber(ARGV[5]))
return 0
";

fn redis_err(e: redis::RedisError) -> CacheError {
    CacheError {
        backend: "redis",
        message: e.to_string(),
    }
}

impl RedisCache {
    /// Connects to `url`; keys live under `namespace` (`claas:completions` in production,
    /// one per test).
    pub async fn connect(
        url: &str,
        namespace: &str,
        bounds: Bounds,
        ttl: Duration,
    ) -> Result<RedisCache, CacheError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(redis_err)?;
        Ok(RedisCache {
            conn,
            namespace: namespace.to_owned(),
            bounds,
            ttl,
        })
    }

    fn entry_key(&self, owner: &str, model: &str, hash: &str) -> String {
        format!("{}:{}", self.namespace, key(owner, model, hash))
    }

    /// Entries the total bound currently counts.
    pub async fn count(&self) -> Result<usize, CacheError> {
        let mut c = self.conn.clone();
        redis::cmd("ZCARD")
            .arg(format!("{}:index", self.namespace))
            .query_async(&mut c)
            .await
            .map_err(redis_err)
    }
}

#[async_trait]
impl CompletionCache for RedisCache {
    async fn put(
        &self,
        owner: &str,
        model: &str,
        hash: &str,
        entry: &CachedCompletion,
    ) -> Result<(), CacheError> {
        let value = serde_json::to_string(entry).map_err(|e| CacheError {
            backend: "redis",
            message: e.to_string(),
        })?;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut c = self.conn.clone();
        redis::Script::new(PUT_SCRIPT)
            .key(format!("{}:index", self.namespace))
            .key(format!("{}:owner:{owner}", self.namespace))
            .key(self.entry_key(owner, model, hash))
            .arg(value)
            .arg(self.ttl.as_secs().max(1))
            .arg(now_ms)
            .arg(self.bounds.per_owner)
            .arg(self.bounds.total)
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn get(
        &self,
        owner: &str,
        model: &str,
        hash: &str,
    ) -> Result<Option<CachedCompletion>, CacheError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.entry_key(owner, model, hash))
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        match raw {
            None => Ok(None),
            // An entry this version cannot read (written by another release) is a miss.
            Some(s) => Ok(serde_json::from_str(&s).ok()),
        }
    }

    async fn ping(&self) -> Result<(), CacheError> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
            .map_err(redis_err)
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}
