//! Incremental decoding with the KV cache computes what the full forward computes, with and
//! without an adapter, and sampling is reproducible.

use candle_core::{DType, Device, Tensor};
use claas_testutil::{tempdir, TempDir};
use claas_trainer::generate::{full_logits, generate, Finish, Sampling};
use claas_trainer::random::{write_checkpoint, Preset};
use claas_trainer::{AdapterConfig, KvCache, LoraAdapter, Qwen3};

/// A tiny checkpoint in a directory of its own per call (tests run in parallel, and one
/// that found another's half-written checkpoint failed to load it), removed when the
/// returned guard drops.
fn tiny() -> (Qwen3, TempDir) {
    let dir = tempdir("gen");
    write_checkpoint(Preset::Tiny, &dir, 11).expect("checkpoint");
    (
        Qwen3::load(&dir, &Device::Cpu, DType::F32).expect("load"),
        dir,
    )
}

/// An adapter whose B is not zero, so it changes the output.
fn adapter(model: &Qwen3) -> LoraAdapter {
    let cfg = AdapterConfig {
        r: 4,
        lora_alpha: 8.0,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        use_rslora: false,
        base_model_name_or_path: None,
    };
    let a = LoraAdapter::init(&model.config, cfg, 3).expect("adapter");
    for (name, var) in a.params() {
        if name.contains("lora_B") {
            let noise = Tensor::randn(0f32, 0.05, var.shape(), &Device::Cpu).expect("noise");
            var.set(&noise).expect("set");
        }
    }
    a
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flat")
        .max(0)
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

#[test]
fn cached_decoding_matches_the_full_forward_at_every_position() {
    let (model, _dir) = tiny();
    let lora = adapter(&model);
    let ids: Vec<u32> = vec![257, 10, 72, 101, 108, 108, 111, 258, 10, 257, 97, 115, 115];
    // A cache that grows (5 → 10 → 20 positions, copying what it holds) and one with room.
    let caches = [
        (None, KvCache::new as fn() -> KvCache),
        (Some(&lora), KvCache::new),
    ]
    .into_iter()
    .chain([(None, (|| KvCache::with_capacity(64)) as fn() -> KvCache)]);
    // Chunks fed to the cache: a short prompt then one token at a time; a prompt long enough
    // for the tiled prefill kernel; a prefill after earlier positions.
    let schedules: [&[usize]; 3] = [&[5, 1, 1, 1, 1, 1, 1, 1, 1], &[9, 1, 1, 1, 1], &[3, 10]];
    for (lora, new_cache) in caches {
        let full = full_logits(&model, &ids, lora)
            .expect("full")
            .squeeze(0)
            .expect("squeeze");
        for chunks in schedules {
            let mut cache = new_cache();
            let mut at = 0;
            for &len in chunks {
                let next = model
                    .forward_cached(&ids[at..at + len], &mut cache, lora)
                    .expect("forward");
                at += len;
                let d = max_abs_diff(&next, &full.get(at - 1).expect("row"));
                assert!(
                    d < 1e-4,
                    "position {} differs by {d} (chunks {chunks:?}, adapter: {})",
                    at - 1,
                    lora.is_some()
                );
            }
            assert_eq!(cache.len(), ids.len());
        }
    }
}

#[test]
fn greedy_and_seeded_sampling_are_reproducible_and_logprobs_are_raw() {
    let (model, _dir) = tiny();
    let prompt = [257u32, 10, 72, 105, 258, 10, 257, 97, 10];
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: 12,
        seed: None,
        stop_ids: vec![],
        top_logprobs: 3,
    };
    let (a, finish) = generate(&model, None, &prompt, &greedy, |_| true).expect("gen");
    assert_eq!(finish, Finish::Length);
    assert_eq!(a.len(), 12);
    let (b, _) = generate(&model, None, &prompt, &greedy, |_| true).expect("gen");
    assert_eq!(a, b, "greedy is deterministic");
    for t in &a {
        assert_eq!(t.top.len(), 3);
        assert_eq!(t.top[0].0, t.id, "greedy picks the most likely token");
        assert!(t.logprob <= 0.0 && t.top[0].1 >= t.top[1].1);
    }
    // The reported log-prob of each token is the full forward's log-softmax there.
    let all: Vec<u32> = prompt
        .iter()
        .copied()
        .chain(a.iter().map(|t| t.id))
        .collect();
    let full = full_logits(&model, &all, None)
        .expect("full")
        .squeeze(0)
        .expect("squeeze");
    let lsm = candle_nn::ops::log_softmax(&full, 1).expect("lsm");
    for (k, t) in a.iter().enumerate() {
        let want: f32 = lsm
            .get(prompt.len() - 1 + k)
            .and_then(|r| r.get(t.id as usize))
            .and_then(|v| v.to_scalar())
            .expect("lp");
        assert!(
            (want - t.logprob).abs() < 1e-4,
            "token {k}: {want} vs {}",
            t.logprob
        );
    }

    let seeded = Sampling {
        temperature: 1.0,
        top_p: 0.9,
        seed: Some(7),
        ..greedy.clone()
    };
    let (x, _) = generate(&model, None, &prompt, &seeded, |_| true).expect("gen");
    let (y, _) = generate(&model, None, &prompt, &seeded, |_| true).expect("gen");
    assert_eq!(x, y, "same seed, same tokens");
    // A stop id ends the answer and is included; the callback can stop it too.
    let stop_at = x[2].id;
    let stopping = Sampling {
        stop_ids: vec![stop_at],
        ..seeded.clone()
    };
    let (s, finish) = generate(&model, None, &prompt, &stopping, |_| true).expect("gen");
    assert_eq!(finish, Finish::Stop);
    assert_eq!(s.last().map(|t| t.id), Some(stop_at));
    let mut seen = 0;
    let (c, finish) = generate(&model, None, &prompt, &seeded, |_| {
        seen += 1;
        seen < 2
    })
    .expect("gen");
    assert_eq!(
        (c.len(), finish),
        (2, Finish::Stop),
        "the callback stopped it"
    );
}
