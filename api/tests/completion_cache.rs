//! One behaviour for both completion caches: in process and Redis (`REDIS_URL`, default
//! redis://127.0.0.1:6379; each test in a namespace of its own).

use std::sync::Arc;
use std::time::Duration;

use claas_api::cache::{CachedCompletion, CompletionCache, MemoryCache, RedisCache};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn caches(capacity: usize, ttl: Duration) -> Vec<Arc<dyn CompletionCache>> {
    let ns = format!("claas-test:{}", uuid::Uuid::now_v7());
    let redis = RedisCache::connect(&redis_url(), &ns, capacity, ttl)
        .await
        .unwrap_or_else(|e| panic!("tests need Redis at {}: {e}", redis_url()));
    vec![Arc::new(MemoryCache::new(capacity, ttl)), Arc::new(redis)]
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
    for c in caches(10, Duration::from_secs(60)).await {
        let b = c.backend();
        c.put("lora-a", "h1", &entry("lora-a", 1))
            .await
            .expect("put");
        c.put("lora-b", "h1", &entry("lora-b", 2))
            .await
            .expect("put");
        assert_eq!(
            c.get("lora-a", "h1").await.expect("get"),
            Some(entry("lora-a", 1)),
            "{b}"
        );
        assert_eq!(
            c.get("lora-b", "h1").await.expect("get"),
            Some(entry("lora-b", 2)),
            "{b}"
        );
        assert_eq!(c.get("lora-c", "h1").await.expect("get"), None, "{b}");
        c.put("lora-a", "h1", &entry("lora-a", 3))
            .await
            .expect("put");
        assert_eq!(
            c.get("lora-a", "h1").await.expect("get"),
            Some(entry("lora-a", 3)),
            "{b}"
        );
        c.ping().await.expect("ping");
    }
}

#[tokio::test]
async fn the_size_bound_evicts_the_oldest_write_first() {
    for c in caches(3, Duration::from_secs(60)).await {
        let b = c.backend();
        for n in 0..3 {
            c.put("m", &format!("h{n}"), &entry("m", n))
                .await
                .expect("put");
            // Redis orders by write time in milliseconds.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        // Rewriting h0 makes it the newest, so h1 is the oldest now.
        c.put("m", "h0", &entry("m", 10)).await.expect("put");
        tokio::time::sleep(Duration::from_millis(3)).await;
        c.put("m", "h3", &entry("m", 3)).await.expect("put");
        assert_eq!(
            c.get("m", "h1").await.expect("get"),
            None,
            "{b}: oldest evicted"
        );
        for h in ["h0", "h2", "h3"] {
            assert!(c.get("m", h).await.expect("get").is_some(), "{b}: {h} kept");
        }
    }
}

#[tokio::test]
async fn entries_expire_after_the_ttl() {
    for c in caches(10, Duration::from_secs(1)).await {
        c.put("m", "h", &entry("m", 1)).await.expect("put");
        assert!(c.get("m", "h").await.expect("get").is_some());
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(c.get("m", "h").await.expect("get"), None, "{}", c.backend());
    }
}

#[tokio::test]
async fn concurrent_writers_never_exceed_the_bound_in_redis() {
    let ns = format!("claas-test:{}", uuid::Uuid::now_v7());
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(Arc::new(
            RedisCache::connect(&redis_url(), &ns, 50, Duration::from_secs(60))
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
                    .put("m", &format!("r{r}-{n}"), &entry("m", n))
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
