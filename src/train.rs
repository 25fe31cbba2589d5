//! Offline trainer commands: `claas model random` writes a random-weight checkpoint,
//! `claas distill` replays one SDPO step from a samples file, `claas bench step` times
//! steps on a checkpoint. None of them needs a database.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use claas_trainer::adamw::STATE_FILE;
use claas_trainer::random::{write_checkpoint, Preset};
use claas_trainer::template::ChatTokenizer;
use claas_trainer::{
    sdpo_step, AdamW, AdapterConfig, LoraAdapter, Module, Qwen3, StepConfig, StepSample,
};
use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Writes a complete random-weight Qwen3 checkpoint directory of a real shape.
    Random {
        /// `tiny`, `qwen3-0.6b` or `qwen3-8b`.
        #[arg(long)]
        preset: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Prints the logits `[[f32; vocab]; len]` of a token sequence as JSON, with an
    /// optional PEFT adapter applied (to compare against other implementations).
    Logits {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',')]
        ids: Vec<u32>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

fn device(d: DeviceArg) -> Result<(Device, DType)> {
    Ok(match d {
        DeviceArg::Cpu => (Device::Cpu, DType::F32),
        DeviceArg::Cuda => (
            Device::new_cuda(0).context("--device cuda (build with --features cuda)")?,
            DType::BF16,
        ),
    })
}

#[derive(Args)]
pub struct DistillArgs {
    /// Base model checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter directory to start from (its optimizer_state.safetensors, if present,
    /// is resumed).
    #[arg(long)]
    adapter: PathBuf,
    /// Samples and training config, in the fixtures' `input.json` format.
    #[arg(long)]
    input: PathBuf,
    /// Where the new adapter and optimizer state are written.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long, default_value_t = 8192)]
    max_seq_len: usize,
    /// Per-layer activation checkpointing (less memory, ~1/3 more compute).
    #[arg(long)]
    checkpoint: bool,
}

#[derive(Deserialize)]
struct InputFile {
    samples: Vec<InputSample>,
    training: InputTraining,
}

#[derive(Deserialize)]
struct InputSample {
    prompt_token_ids: Vec<u32>,
    response_token_ids: Vec<u32>,
    response_logprobs: Vec<f32>,
    teacher_prompt_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    system_prompt: String,
    #[serde(default)]
    user_prompt: String,
    #[serde(default)]
    feedback: String,
}

#[derive(Deserialize)]
struct InputTraining {
    learning_rate: f64,
    alpha: f64,
    is_clip: f64,
    max_grad_norm: f64,
    kl_reg_weight: f64,
    teacher_top_k: usize,
}

pub fn model(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Random { preset, out, seed } => {
            let preset: Preset = preset.parse()?;
            let started = Instant::now();
            write_checkpoint(preset, &out, seed)?;
            eprintln!(
                "wrote {} in {:.1} s",
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        ModelCommand::Logits {
            model,
            adapter,
            ids,
        } => {
            let m = Qwen3::load(&model, &Device::Cpu, DType::F32)?;
            m.check_ids("--ids", &ids)?;
            let lora = adapter
                .map(|d| LoraAdapter::load(&d, &m.config, &Device::Cpu))
                .transpose()?;
            let logits = m.logits(&ids, 0, ids.len(), lora.as_ref())?;
            let rows: Vec<Vec<f32>> = logits.squeeze(0)?.to_vec2()?;
            println!("{}", serde_json::to_string(&rows)?);
            Ok(())
        }
    }
}

/// One step from a samples file; prints the metrics as one JSON object on stdout.
pub fn distill(a: DistillArgs) -> Result<()> {
    let (dev, dtype) = device(a.device)?;
    let text = std::fs::read_to_string(&a.input)
        .with_context(|| format!("reading {}", a.input.display()))?;
    let input: InputFile =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", a.input.display()))?;
    let model = Qwen3::load(&a.model, &dev, dtype)?;
    let mut tokenizer = None;
    let mut samples = Vec::with_capacity(input.samples.len());
    for s in input.samples {
        let teacher = match s.teacher_prompt_token_ids {
            Some(ids) => ids,
            None => {
                if tokenizer.is_none() {
                    tokenizer = Some(ChatTokenizer::from_dir(&a.model)?);
                }
                let tok = tokenizer.as_ref().context("tokenizer")?;
                tok.teacher_prompt_ids(&s.system_prompt, &s.user_prompt, &s.feedback)?
            }
        };
        samples.push(StepSample {
            prompt_token_ids: s.prompt_token_ids,
            response_token_ids: s.response_token_ids,
            response_logprobs: s.response_logprobs,
            teacher_prompt_token_ids: teacher,
        });
    }
    let t = input.training;
    let cfg = StepConfig {
        learning_rate: t.learning_rate,
        alpha: t.alpha,
        is_clip: t.is_clip,
        max_grad_norm: t.max_grad_norm,
        kl_reg_weight: t.kl_reg_weight,
        teacher_top_k: t.teacher_top_k,
        max_seq_len: a.max_seq_len,
        checkpoint: a.checkpoint,
    };
    let adapter = LoraAdapter::load(&a.adapter, &model.config, &dev)?;
    let state = a.adapter.join(STATE_FILE);
    let mut opt = if state.is_file() {
        AdamW::load(&state, adapter.params(), &dev)?
    } else {
        AdamW::default()
    };
    let metrics = sdpo_step(&model, &adapter, &mut opt, &samples, &cfg)?;
    adapter.save(&a.out)?;
    opt.save(&a.out.join(STATE_FILE))?;
    println!("{}", serde_json::to_string(&metrics)?);
    Ok(())
}

#[derive(Args)]
pub struct StepBench {
    /// Checkpoint directory (e.g. from `claas model random`).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    #[arg(long, default_value_t = 64)]
    response: usize,
    #[arg(long, default_value_t = 96)]
    teacher_prompt: usize,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    #[arg(long, default_value_t = 64.0)]
    alpha: f64,
    #[arg(long, default_value_t = 100)]
    top_k: usize,
    /// Steps to time (the first is reported separately as warm-up).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Per-layer activation checkpointing (less memory, ~1/3 more compute).
    #[arg(long)]
    checkpoint: bool,
}

#[derive(Args)]
pub struct DecodeBench {
    /// Checkpoint directory (e.g. from `claas model random`).
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens (time to first token is measured on it).
    #[arg(long, default_value_t = 256)]
    prompt: usize,
    /// Tokens generated greedily per run (no stop token ends them early).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Timed runs after one warm-up run; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// Greedy generation with the KV cache, as embedded inference serves it: time to first
/// token (prefill + first sample) and decode tokens/s after it, medians over `runs`.
pub fn bench_decode(b: DecodeBench) -> Result<()> {
    use claas_trainer::generate::{generate, Sampling};
    if b.runs == 0 || b.prompt == 0 || b.new_tokens < 2 {
        bail!("--runs and --prompt must be > 0 and --new-tokens >= 2");
    }
    let model = Qwen3::load(&b.model, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    let vocab = model.config.vocab_size as u64;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let prompt: Vec<u32> = (0..b.prompt)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect();
    let sampling = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        max_tokens: b.new_tokens,
        seed: None,
        stop_ids: vec![],
        top_logprobs: 0,
    };
    let (mut ttft, mut tps) = (Vec::new(), Vec::new());
    for run in 0..=b.runs {
        let started = Instant::now();
        let mut first = None;
        let (tokens, _) = generate(&model, None, &prompt, &sampling, |_| {
            first.get_or_insert_with(|| started.elapsed());
            true
        })?;
        let total = started.elapsed();
        let first = first.unwrap_or(total);
        if run == 0 {
            continue; // warm-up
        }
        ttft.push(first.as_secs_f64() * 1000.0);
        tps.push((tokens.len() - 1) as f64 / (total - first).as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "candle: prompt {} tokens, {} new: time to first token {:.1} ms, decode {:.2} tokens/s \
         (medians of {} runs, {} threads)",
        b.prompt,
        b.new_tokens,
        median(&mut ttft),
        median(&mut tps),
        b.runs,
        candle_core::utils::get_num_threads()
    );
    Ok(())
}

/// Peak resident set size of this process, from /proc (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Times `steps` SDPO steps on one synthetic batch and prints the median.
// Long: a benchmark script: build the inputs, time each part, print the table.
pub fn bench_step(b: StepBench) -> Result<()> {
    if b.steps < 2 || b.batch == 0 || b.prompt == 0 || b.response == 0 {
        bail!("--steps must be >= 2 and --batch, --prompt, --response > 0");
    }
    let (dev, dtype) = device(b.device)?;
    let load = Instant::now();
    let model = Qwen3::load(&b.model, &dev, dtype)?;
    let load_s = load.elapsed().as_secs_f64();
    let vocab = model.config.vocab_size as u64;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % vocab) as u32
            })
            .collect()
    };
    let samples: Vec<StepSample> = (0..b.batch)
        .map(|_| StepSample {
            prompt_token_ids: ids(b.prompt),
            response_token_ids: ids(b.response),
            response_logprobs: vec![-2.0; b.response],
            teacher_prompt_token_ids: ids(b.teacher_prompt),
        })
        .collect();
    let adapter = LoraAdapter::init(
        &model.config,
        AdapterConfig {
            r: b.rank,
            lora_alpha: b.alpha,
            target_modules: Module::ALL.iter().map(|m| m.name().to_string()).collect(),
            use_rslora: false,
            base_model_name_or_path: None,
        },
        1,
    )?;
    let adapter = move_adapter(adapter, &model, &dev)?;
    let cfg = StepConfig {
        learning_rate: 1e-4,
        alpha: 0.5,
        is_clip: 5.0,
        max_grad_norm: 1.0,
        kl_reg_weight: 0.1,
        teacher_top_k: b.top_k,
        max_seq_len: 1 << 20,
        checkpoint: b.checkpoint,
    };
    let mut opt = AdamW::default();
    let mut times = Vec::with_capacity(b.steps);
    for i in 0..b.steps {
        let t = Instant::now();
        let m = sdpo_step(&model, &adapter, &mut opt, &samples, &cfg)?;
        let s = t.elapsed().as_secs_f64();
        eprintln!("step {i}: {s:.3} s, loss {:.5}", m.total_loss);
        times.push(s);
    }
    let mut timed = times[1..].to_vec();
    timed.sort_by(f64::total_cmp);
    let mid = timed.len() / 2;
    let median = if timed.len() % 2 == 0 {
        (timed[mid - 1] + timed[mid]) / 2.0
    } else {
        timed[mid]
    };
    let tokens = b.batch * b.response;
    let out = serde_json::json!({
        "bench": "sdpo_step",
        "model": b.model.display().to_string(),
        "device": format!("{dev:?}"),
        "dtype": format!("{dtype:?}"),
        "threads": candle_core::utils::get_num_threads(),
        "batch": b.batch, "prompt": b.prompt, "response": b.response,
        "teacher_prompt": b.teacher_prompt, "rank": b.rank, "top_k": b.top_k,
        "checkpoint": b.checkpoint,
        "load_s": load_s,
        "warmup_step_s": times[0],
        "median_step_s": median,
        "step_times_s": times,
        "response_tokens_per_s": tokens as f64 / median,
        "peak_rss_mb": peak_rss_mb(),
        "lora_params": adapter.num_params(),
    });
    println!("{out}");
    Ok(())
}

/// The initial adapter is built on the CPU; put it where the model is.
fn move_adapter(adapter: LoraAdapter, model: &Qwen3, dev: &Device) -> Result<LoraAdapter> {
    if dev.is_cpu() {
        return Ok(adapter);
    }
    let dir = std::env::temp_dir().join(format!("claas-bench-adapter-{}", std::process::id()));
    adapter.save(&dir)?;
    let moved = LoraAdapter::load(&dir, &model.config, dev)?;
    let _ = std::fs::remove_dir_all(Path::new(&dir));
    Ok(moved)
}
