//! The completion cache: what the served model produced for each answer, kept so that
//! feedback on that answer trains on exactly the sampled tokens.
//!
//! Entries are keyed by the model that answered (a LoRA id or the base model) and the
//! SHA-256 of the answer's normalised visible text, so answers from different adapters never
//! overwrite each other. Two stores: in process ([`MemoryCache`], `claas dev`) and Redis
//! ([`RedisCache`], shared by every API replica), both bounded by `completion_cache_size`
//! (oldest write evicted first) and expiring after `completion_cache_ttl_s`.

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
    /// Stores `entry` under (`scope`, `hash`), replacing what was there.
    async fn put(
        &self,
        scope: &str,
        hash: &str,
        entry: &CachedCompletion,
    ) -> Result<(), CacheError>;
    /// The live entry under (`scope`, `hash`), if any.
    async fn get(&self, scope: &str, hash: &str) -> Result<Option<CachedCompletion>, CacheError>;
    async fn ping(&self) -> Result<(), CacheError>;
    fn backend(&self) -> &'static str;
}

fn key(scope: &str, hash: &str) -> String {
    // The hash has a fixed length, so `hash:scope` cannot be ambiguous whatever the scope holds.
    format!("{hash}:{scope}")
}

/// In-process cache: FIFO by write (a rewrite refreshes the entry), bounded, with a TTL.
pub struct MemoryCache {
    capacity: usize,
    ttl: Duration,
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    /// key → (write generation, written at, entry)
    entries: HashMap<String, (u64, Instant, CachedCompletion)>,
    /// Writes in order; stale generations are skipped when evicting.
    order: VecDeque<(String, u64)>,
    generation: u64,
}

impl MemoryCache {
    pub fn new(capacity: usize, ttl: Duration) -> MemoryCache {
        MemoryCache {
            capacity: capacity.max(1),
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
        scope: &str,
        hash: &str,
        entry: &CachedCompletion,
    ) -> Result<(), CacheError> {
        let k = key(scope, hash);
        let mut m = self.lock();
        m.generation += 1;
        let generation = m.generation;
        m.entries
            .insert(k.clone(), (generation, Instant::now(), entry.clone()));
        m.order.push_back((k, generation));
        while m.entries.len() > self.capacity {
            let Some((old, g)) = m.order.pop_front() else {
                break;
            };
            if m.entries.get(&old).is_some_and(|(eg, _, _)| *eg == g) {
                m.entries.remove(&old);
            }
        }
        // Keep the order queue from growing without bound under rewrites of one key.
        if m.order.len() > 2 * self.capacity + 16 {
            let live: Vec<(String, u64)> = m
                .order
                .iter()
                .filter(|(k, g)| m.entries.get(k).is_some_and(|(eg, _, _)| eg == g))
                .cloned()
                .collect();
            m.order = live.into();
        }
        Ok(())
    }

    async fn get(&self, scope: &str, hash: &str) -> Result<Option<CachedCompletion>, CacheError> {
        let k = key(scope, hash);
        let mut m = self.lock();
        match m.entries.get(&k) {
            Some((_, at, e)) if at.elapsed() <= self.ttl => Ok(Some(e.clone())),
            Some(_) => {
                m.entries.remove(&k);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

/// Redis cache shared by all API replicas. Each entry is a string key with the TTL; a
/// sorted set of keys by write time bounds the total, evicting the oldest writes, in one
/// server-side script so concurrent replicas never exceed the bound.
pub struct RedisCache {
    conn: redis::aio::ConnectionManager,
    namespace: String,
    capacity: usize,
    ttl: Duration,
}

const PUT_SCRIPT: &str = r"
local now = tonumber(ARGV[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[1], now, KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]) * 1000)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 1000)
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[4])
if excess > 0 then
  local victims = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
  redis.call('ZREM', KEYS[1], unpack(victims))
  redis.call('DEL', unpack(victims))
end
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
        capacity: usize,
        ttl: Duration,
    ) -> Result<RedisCache, CacheError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        let conn = redis::aio::ConnectionManager::new(client)
            .await
            .map_err(redis_err)?;
        Ok(RedisCache {
            conn,
            namespace: namespace.to_owned(),
            capacity: capacity.max(1),
            ttl,
        })
    }

    fn entry_key(&self, scope: &str, hash: &str) -> String {
        format!("{}:{}", self.namespace, key(scope, hash))
    }

    /// Entries the bound currently counts.
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
        scope: &str,
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
            .key(self.entry_key(scope, hash))
            .arg(value)
            .arg(self.ttl.as_secs().max(1))
            .arg(now_ms)
            .arg(self.capacity)
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(())
    }

    async fn get(&self, scope: &str, hash: &str) -> Result<Option<CachedCompletion>, CacheError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.entry_key(scope, hash))
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
