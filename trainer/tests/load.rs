//! `Qwen3::load` reads each tensor straight from disk, decoding it and transposing the
//! projections in one pass; the model it builds is exactly the one `Qwen3::from_tensors`
//! builds from the same tensors, whatever dtype the file stores and the model is held in.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use claas_testutil::tempdir;
use claas_trainer::random::{write_checkpoint, Preset};
use claas_trainer::{Qwen3, Qwen3Config};

/// The tiny checkpoint's tensors (its head untied, so `lm_head` is read too),
/// with random norms: the generator writes ones, which a norm read wrong would still match.
fn tensors(dir: &Path) -> HashMap<String, Tensor> {
    write_checkpoint(Preset::Tiny, dir, 5).expect("checkpoint");
    let mut all = HashMap::new();
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            all.extend(candle_core::safetensors::load(&path, &Device::Cpu).expect("shard"));
        }
    }
    for (name, t) in all.iter_mut() {
        if name.contains("norm") {
            *t = Tensor::randn(1f32, 0.1, t.shape(), &Device::Cpu).expect("norm");
        }
    }
    all
}

fn logit_bits(model: &Qwen3, ids: &[u32]) -> Vec<u32> {
    let logits = model.logits(ids, 0, ids.len(), None).expect("logits");
    let values = logits.flatten_all().expect("flat").to_vec1::<f32>();
    values.expect("f32").iter().map(|v| v.to_bits()).collect()
}

#[test]
fn loading_from_disk_builds_the_same_model_as_from_tensors() {
    let src = tempdir("load-src");
    let base = tensors(&src);
    let config = Qwen3Config::from_dir(&src).expect("config");
    let ids: Vec<u32> = (0..12).map(|i| (i * 37 % 512) as u32).collect();
    for stored_dtype in [DType::F32, DType::BF16, DType::F16] {
        let dir = tempdir("load");
        std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("config");
        let stored: HashMap<String, Tensor> = base
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(stored_dtype).expect("dtype")))
            .collect();
        candle_core::safetensors::save(&stored, dir.join("model.safetensors")).expect("save");
        for dtype in [DType::F32, DType::BF16] {
            let loaded = Qwen3::load(&dir, &Device::Cpu, dtype).expect("load");
            let built = Qwen3::from_tensors(config.clone(), stored.clone(), &Device::Cpu, dtype)
                .expect("build");
            assert_eq!(loaded.dtype(), dtype);
            assert_eq!(loaded.weight_bytes(), built.weight_bytes());
            assert!(
                logit_bits(&loaded, &ids) == logit_bits(&built, &ids),
                "stored {stored_dtype:?}, held {dtype:?}: logits differ"
            );
        }
    }
}

#[test]
fn a_missing_or_misshapen_tensor_is_an_error() {
    let src = tempdir("load-bad");
    let mut stored = tensors(&src);
    let dir = tempdir("load-bad-out");
    std::fs::copy(src.join("config.json"), dir.join("config.json")).expect("config");
    let name = "model.layers.1.mlp.up_proj.weight";
    let up = stored.remove(name).expect("up_proj");
    candle_core::safetensors::save(&stored, dir.join("model.safetensors")).expect("save");
    let err = Qwen3::load(&dir, &Device::Cpu, DType::F32)
        .err()
        .expect("missing");
    assert!(err.to_string().contains(name), "{err}");
    stored.insert(name.into(), up.t().expect("t").contiguous().expect("c"));
    candle_core::safetensors::save(&stored, dir.join("model.safetensors")).expect("save");
    let err = Qwen3::load(&dir, &Device::Cpu, DType::F32)
        .err()
        .expect("misshapen");
    assert!(err.to_string().contains("shape"), "{err}");
}
