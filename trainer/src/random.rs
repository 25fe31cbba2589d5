//! Random-weight Qwen3 checkpoints of real shapes, so benchmarks and the embedded default
//! need no download: `config.json`, safetensors shards with an index, and a byte-level
//! `tokenizer.json` + `tokenizer_config.json` whose ChatML template renders plain
//! conversations exactly as Qwen3's does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{Module, Qwen3Config};
use crate::error::{invalid, Result};

/// The shapes `claas model random` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// 2 layers, hidden 64, head_dim 32: trains in milliseconds on a CPU.
    Tiny,
    /// Qwen3-0.6B: 28 layers, hidden 1024, 16×128 heads, 8 KV heads, tied embeddings.
    Qwen3_0_6B,
    /// Qwen3-8B: 36 layers, hidden 4096, 32×128 heads, 8 KV heads.
    Qwen3_8B,
}

impl std::str::FromStr for Preset {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(Preset::Tiny),
            "qwen3-0.6b" => Ok(Preset::Qwen3_0_6B),
            "qwen3-8b" => Ok(Preset::Qwen3_8B),
            other => Err(invalid(format!(
                "unknown preset {other:?}; accepted: tiny, qwen3-0.6b, qwen3-8b"
            ))),
        }
    }
}

impl Preset {
    pub fn config(self) -> Qwen3Config {
        let (vocab, hidden, inter, layers, heads, kv, head_dim, tied) = match self {
            Preset::Tiny => (512, 64, 128, 2, 4, 2, 32, false),
            Preset::Qwen3_0_6B => (151_936, 1024, 3072, 28, 16, 8, 128, true),
            Preset::Qwen3_8B => (151_936, 4096, 12_288, 36, 32, 8, 128, false),
        };
        Qwen3Config {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            tie_word_embeddings: tied,
            max_position_embeddings: 40_960,
        }
    }

    /// The dtype the weights are written in (bf16 for the 8B shape, as Qwen3 ships).
    pub fn dtype(self) -> DType {
        match self {
            Preset::Qwen3_8B => DType::BF16,
            _ => DType::F32,
        }
    }
}

/// Special tokens of the ChatML template, after the 256 byte tokens.
pub const SPECIAL_TOKENS: [&str; 5] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
];

/// ChatML as Qwen3 renders plain conversations (no tools, no reasoning content).
pub const CHAT_TEMPLATE: &str = "{%- for message in messages %}\n\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n\
{%- endfor %}\n\
{%- if add_generation_prompt %}\n\
{{- '<|im_start|>assistant\\n' }}\n\
{%- if enable_thinking is defined and enable_thinking is false %}\n\
{{- '<think>\\n\\n</think>\\n\\n' }}\n\
{%- endif %}\n\
{%- endif %}\n";

/// A small deterministic generator (splitmix64): fast enough for billions of weights.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn uniform(rng: &mut Rng, shape: &[usize], std: f32, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // Uniform on ±std·√3 has standard deviation `std`.
    let bound = std * 3f32.sqrt();
    let data: Vec<f32> = (0..n)
        .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
        .collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// Writes a complete random checkpoint of `preset` into `out`; shards hold at most about
/// 2 GB so writing the 8B shape never holds the whole model in memory.
// Long: writes every tensor of the checkpoint in the checkpoint's own order.
pub fn write_checkpoint(preset: Preset, out: &Path, seed: u64) -> Result<()> {
    let c = preset.config();
    let dtype = preset.dtype();
    std::fs::create_dir_all(out)?;
    let mut rng = Rng(seed);
    let std = 0.02;
    let mut shard: HashMap<String, Tensor> = HashMap::new();
    let mut shard_bytes = 0usize;
    let mut shards: Vec<Vec<String>> = Vec::new();
    let mut flush = |shard: &mut HashMap<String, Tensor>, bytes: &mut usize| -> Result<()> {
        if shard.is_empty() {
            return Ok(());
        }
        let i = shards.len();
        candle_core::safetensors::save(shard, out.join(format!("shard-{i:05}.safetensors")))?;
        shards.push(shard.keys().cloned().collect());
        shard.clear();
        *bytes = 0;
        Ok(())
    };
    let add = |name: String, t: Tensor, shard: &mut HashMap<String, Tensor>, bytes: &mut usize| {
        *bytes += t.elem_count() * t.dtype().size_in_bytes();
        shard.insert(name, t);
    };
    const SHARD_LIMIT: usize = 2 << 30;
    add(
        "model.embed_tokens.weight".into(),
        uniform(&mut rng, &[c.vocab_size, c.hidden_size], std, dtype)?,
        &mut shard,
        &mut shard_bytes,
    );
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for m in Module::ALL {
            let (inp, o) = c.shape_of(m);
            let t = uniform(&mut rng, &[o, inp], std, dtype)?;
            add(
                format!("{p}.{}.{}.weight", m.block(), m.name()),
                t,
                &mut shard,
                &mut shard_bytes,
            );
        }
        for (name, n) in [
            ("self_attn.q_norm", c.head_dim),
            ("self_attn.k_norm", c.head_dim),
            ("input_layernorm", c.hidden_size),
            ("post_attention_layernorm", c.hidden_size),
        ] {
            let ones = Tensor::ones(n, dtype, &Device::Cpu)?;
            add(
                format!("{p}.{name}.weight"),
                ones,
                &mut shard,
                &mut shard_bytes,
            );
        }
        if shard_bytes >= SHARD_LIMIT {
            flush(&mut shard, &mut shard_bytes)?;
        }
    }
    add(
        "model.norm.weight".into(),
        Tensor::ones(c.hidden_size, dtype, &Device::Cpu)?,
        &mut shard,
        &mut shard_bytes,
    );
    if !c.tie_word_embeddings {
        add(
            "lm_head.weight".into(),
            uniform(&mut rng, &[c.vocab_size, c.hidden_size], std, dtype)?,
            &mut shard,
            &mut shard_bytes,
        );
    }
    flush(&mut shard, &mut shard_bytes)?;
    let mut weight_map = serde_json::Map::new();
    for (i, names) in shards.iter().enumerate() {
        for n in names {
            weight_map.insert(n.clone(), format!("shard-{i:05}.safetensors").into());
        }
    }
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&serde_json::json!({"metadata": {}, "weight_map": weight_map}))?,
    )?;
    write_config(&c, dtype, out)?;
    write_tokenizer(out)
}

fn write_config(c: &Qwen3Config, dtype: DType, out: &Path) -> Result<()> {
    let im_end = 256 + 2;
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": false,
        "hidden_act": "silu",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "torch_dtype": if dtype == DType::BF16 { "bfloat16" } else { "float32" },
        "bos_token_id": 256,
        "eos_token_id": im_end,
    });
    std::fs::write(out.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// GPT-2's byte-to-character map used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// A byte-level tokenizer (one token per byte, no merges) with the ChatML special tokens.
fn write_tokenizer(out: &Path) -> Result<()> {
    let mut vocab = serde_json::Map::new();
    for (b, ch) in byte_chars().into_iter().enumerate() {
        vocab.insert(ch.to_string(), b.into());
    }
    let added: Vec<serde_json::Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 256 + i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert((*t).to_string(), (256 + i).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []},
    });
    std::fs::write(
        out.join("tokenizer.json"),
        serde_json::to_vec_pretty(&tokenizer)?,
    )?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 40960,
        "chat_template": CHAT_TEMPLATE,
    });
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_vec_pretty(&config)?,
    )?;
    Ok(())
}
