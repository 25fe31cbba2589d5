//! `claas eval [key=value ...]`: the eval harness against a running claas (see
//! `configs/eval.yaml`), with a progress bar per preference.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use claas_eval::config::EvalConfig;
use claas_eval::run::{self, Progress, StepResult};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Overrides, Hydra-style: `num_steps=2 preferences=[no_emoji] training.learning_rate=1e-4`.
    #[arg(value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// The eval config (default: configs/eval.yaml when it exists, else the built-in defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Preference files that add to or override the built-in ones (CLaaS's no_emoji, concise,
    /// identity) by name (default: configs/preferences when it exists).
    #[arg(long, value_name = "DIR")]
    preferences_dir: Option<PathBuf>,
}

/// One bar per preference: steps done, with the last loss and compliance.
#[derive(Default)]
struct Bars {
    bar: std::sync::Mutex<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn start(&self, preference: &str, done: u32, total: u32) {
        let bar = ProgressBar::new(u64::from(total)).with_position(u64::from(done));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} steps {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(preference.to_owned());
        *self.bar.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar);
    }

    fn step(&self, r: &StepResult) {
        if let Some(bar) = &*self.bar.lock().unwrap_or_else(|e| e.into_inner()) {
            let loss = r.sdpo_metrics["total_loss"]
                .as_f64()
                .map_or("-".into(), |l| format!("{l:.4}"));
            let compliance = r
                .eval
                .preference_compliance
                .map_or("-".into(), |c| format!("{c:.2}"));
            bar.set_message(format!("loss {loss} compliance {compliance}"));
            bar.inc(1);
        }
    }

    fn finish(&self, _preference: &str) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish();
        }
    }
}

pub async fn run(args: EvalArgs) -> Result<()> {
    let file = args.config.or_else(|| {
        let default = PathBuf::from("configs/eval.yaml");
        default.is_file().then_some(default)
    });
    let cfg = EvalConfig::load(file.as_deref(), &args.overrides)?;
    let (_, unknown) = cfg.metric_names();
    for m in unknown {
        tracing::warn!("metric '{m}' is not known and is skipped (logprob, compliance, general, collapse, all, quick)");
    }
    // CLaaS's preferences are built in; a directory adds or overrides (the default one
    // only when it exists, so `claas eval` runs from anywhere).
    let dir = match args.preferences_dir {
        Some(dir) => Some(dir),
        None => Some(PathBuf::from("configs/preferences")).filter(|d| d.is_dir()),
    };
    let all = claas_eval::preferences::with_builtin(dir.as_deref())?;
    let prefs = claas_eval::preferences::select(&all, &cfg.preferences)?;
    let out = run::output_dir(&cfg);
    let summary = run::run(&cfg, &prefs, &out, &Bars::default())
        .await
        .with_context(|| format!("eval run in {}", out.display()))?;
    if summary.is_empty() {
        bail!("no preference ran");
    }
    println!("{}", out.join("summary.json").display());
    Ok(())
}
