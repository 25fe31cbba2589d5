//! One behaviour for both completion caches: in process and Redis (`REDIS_URL`, default
//! redis://127.0.0.1:6379; each test in a namespace of its own).

use std::sync::Arc;
use std::time::Duration;

use claas_api::cache::{Bounds, CachedCompletion, CompletionCache, MemoryCache, RedisCache};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn caches(bounds: Bounds, ttl: Duration) -> Vec<Arc<dyn CompletionCache>> {
    let ns = format!("claas-test:{}", uuid::Uuid::now_v7());
    let redis = RedisCache::connect(&redis_url(), &ns, bounds, ttl)
        .await
        .unwrap_or_else(|e| panic!("tests need Redis at {}: {e}", redis_url()));
    vec![Arc::new(MemoryCache::new(bounds, ttl)), Arc::new(redis)]
}

/// One bound for every caller together and each alone.
fn at_most(n: usize) -> Bounds {
    Bounds::new(n, n)
}

fn entry(model: &str, n: u32) -> CachedCompletion {
    CachedCompletion {
        model: model.into(),
        response: format!("answer {n}"),
        prompt_token_ids: vec![1, 2, n],
        response_token_ids: vec![n, 151645],
        response_logprobs: Some(vec![-0.5, -0.01]),
        system_prompt: "sys".into(),
        token_source: "server".into(),
        created_at: 0,
    }
}

#[tokio::test]
async fn entries_are_scoped_by_model_and_a_rewrite_replaces() {
    for c in caches(at_most(10), Duration::from_secs(60)).await {
        let b = c.backend();
        c.put("k", "lora-a", "h1", &entry("lora-a", 1))
            .await
            .expect("put");
        c.put("k", "lora-b", "h1", &entry("lora-b", 2))
            .await
            .expect("put");
        assert_eq!(
            c.get("k", "lora-a", "h1").await.expect("get"),
            Some(entry("lora-a", 1)),
            "{b}"
        );
        assert_eq!(
            c.get("k", "lora-b", "h1").await.expect("get"),
            Some(entry("lora-b", 2)),
            "{b}"
        );
        assert_eq!(c.get("k", "lora-c", "h1").await.expect("get"), None, "{b}");
        c.put("k", "lora-a", "h1", &entry("lora-a", 3))
            .await
            .expect("put");
        assert_eq!(
            c.get("k", "lora-a", "h1").await.expect("get"),
            Some(entry("lora-a", 3)),
            "{b}"
        );
        c.ping().await.expect("ping");
    }
}

#[tokio::test]
async fn the_size_bound_evicts_the_oldest_write_first() {
    for c in caches(at_most(3), Duration::from_secs(60)).await {
        let b = c.backend();
        for n in 0..3 {
            c.put("k", "m", &format!("h{n}"), &entry("m", n))
                .await
                .expect("put");
            // Redis orders by write time in milliseconds.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        // Rewriting h0 makes it the newest, so h1 is the oldest now.
        c.put("k", "m", "h0", &entry("m", 10)).await.expect("put");
        tokio::time::sleep(Duration::from_millis(3)).await;
        c.put("k", "m", "h3", &entry("m", 3)).await.expect("put");
        assert_eq!(
            c.get("k", "m", "h1").await.expect("get"),
            None,
            "{b}: oldest evicted"
        );
        for h in ["h0", "h2", "h3"] {
            assert!(
                c.get("k", "m", h).await.expect("get").is_some(),
                "{b}: {h} kept"
            );
        }
    }
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    for c in caches(at_most(10), Duration::from_secs(1)).await {
        c.put("k", "m", "h", &entry("m", 1)).await.expect("put");
        assert!(c.get("k", "m", "h").await.expect("get").is_some());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(
            c.get("k", "m", "h").await.expect("get"),
            None,
            "{}",
            c.backend()
        );
    }
}

#[tokio::test]
async fn concurrent_writers_never_exceed_the_bound_in_redis() {
    let ns = format!("claas-test:{}", uuid::Uuid::now_v7());
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(Arc::new(
            RedisCache::connect(&redis_url(), &ns, at_most(50), Duration::from_secs(60))
                .await
                .expect("redis"),
        ));
    }
    let mut tasks = Vec::new();
    for (r, cache) in replicas.iter().enumerate() {
        let cache = cache.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..100u32 {
                cache
                    .put("k", "m", &format!("r{r}-{n}"), &entry("m", n))
                    .await
                    .expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    assert_eq!(replicas[0].count().await.expect("count"), 50);
}

#[tokio::test]
async fn one_callers_answers_are_invisible_to_another() {
    for c in caches(at_most(10), Duration::from_secs(60)).await {
        let b = c.backend();
        c.put("key_alice", "base", "h", &entry("base", 1))
            .await
            .expect("put");
        assert_eq!(
            c.get("key_bob", "base", "h").await.expect("get"),
            None,
            "{b}"
        );
        // Bob answering the same text keeps his own entry; Alice's is untouched.
        c.put("key_bob", "base", "h", &entry("base", 2))
            .await
            .expect("put");
        assert_eq!(
            c.get("key_alice", "base", "h").await.expect("get"),
            Some(entry("base", 1)),
            "{b}"
        );
        assert_eq!(
            c.get("key_bob", "base", "h").await.expect("get"),
            Some(entry("base", 2)),
            "{b}"
        );
    }
}

#[tokio::test]
async fn one_callers_many_answers_evict_only_its_own() {
    for c in caches(Bounds::new(3, 100), Duration::from_secs(60)).await {
        let b = c.backend();
        c.put("key_bob", "m", "bob", &entry("m", 0))
            .await
            .expect("put");
        for n in 0..50 {
            c.put("key_mallory", "m", &format!("h{n}"), &entry("m", n))
                .await
                .expect("put");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            c.get("key_bob", "m", "bob").await.expect("get").is_some(),
            "{b}: bob's rollout kept"
        );
        assert_eq!(
            c.get("key_mallory", "m", "h46").await.expect("get"),
            None,
            "{b}"
        );
        for n in 47..50 {
            let h = format!("h{n}");
            assert!(
                c.get("key_mallory", "m", &h).await.expect("get").is_some(),
                "{b}: {h}"
            );
        }
    }
}

#[tokio::test]
async fn the_total_bound_holds_across_callers() {
    let ns = format!("claas-test:{}", uuid::Uuid::now_v7());
    let bounds = Bounds::new(5, 12);
    let redis = RedisCache::connect(&redis_url(), &ns, bounds, Duration::from_secs(60))
        .await
        .expect("redis");
    let memory = MemoryCache::new(bounds, Duration::from_secs(60));
    for owner in 0..6 {
        for n in 0..5 {
            let (o, h) = (format!("key_{owner}"), format!("h{n}"));
            redis.put(&o, "m", &h, &entry("m", n)).await.expect("put");
            memory.put(&o, "m", &h, &entry("m", n)).await.expect("put");
            // Redis orders writes by their millisecond.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    assert_eq!(redis.count().await.expect("count"), 12);
    assert_eq!(memory.len(), 12);
    // The newest writes are the ones kept.
    assert!(redis.get("key_5", "m", "h4").await.expect("get").is_some());
    assert!(memory.get("key_5", "m", "h4").await.expect("get").is_some());
    assert_eq!(memory.get("key_0", "m", "h0").await.expect("get"), None);
}
