//! `claas`: one binary for every role. `claas dev` is the embedded default (API + worker in
//! one process on SQLite); `claas api` and `claas worker` are the fleet's processes.

mod bench;
mod eval;
mod keys;
mod serve;
mod tinker;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use claas_core::config::{Config, Profile};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "claas",
    version,
    about = "Continual learning as a service: feedback becomes LoRA updates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// A YAML file merged over the profile (environment variables still win): this
    /// project's settings, CLaaS's flat keys (its local.yaml as it is), or both.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// One of CLaaS's profiles, built in: local, tinker or modal (as `python -m claas.api
    /// --config-name`).
    #[arg(long, value_name = "NAME")]
    config_name: Option<String>,
}

/// Settings given after the command, applied last: `base_model_id=Qwen/Qwen3-8B
/// vllm_base_url=http://vllm:8000 server.port=9000` (CLaaS's flat names or this project's
/// fields). A first word without `=` names a CLaaS profile, as CLaaS's container entrypoint
/// passes it (`claas api local base_model_id=…`).
#[derive(clap::Args, Clone, Default)]
struct Overrides {
    #[arg(value_name = "KEY=VALUE")]
    settings: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// The embedded default: API and worker in one process, SQLite and files under ./data.
    Dev {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[command(flatten)]
        set: Overrides,
    },
    /// The stateless HTTP API (fleet profile).
    Api {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Do not run database migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
        #[command(flatten)]
        set: Overrides,
    },
    /// A worker: claims jobs and runs them next to this node's GPU and vLLM (fleet profile).
    Worker {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Do not run database migrations at start-up.
        #[arg(long)]
        no_migrate: bool,
        #[command(flatten)]
        set: Overrides,
    },
    /// Applies pending database migrations and exits.
    Migrate {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Use the embedded profile's database (SQLite under ./data).
        #[arg(long)]
        local: bool,
        #[command(flatten)]
        set: Overrides,
    },
    /// Benchmarks that print their figures (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The eval harness against a running claas: `claas eval num_steps=2 preferences=[no_emoji]`.
    Eval(eval::EvalArgs),
    /// Model checkpoints: `claas model random --preset tiny --out DIR`.
    #[command(subcommand)]
    Model(train::ModelCommand),
    /// Replays one SDPO step offline from a samples file; prints the metrics as JSON.
    Distill(train::DistillArgs),
    /// Tinker: `claas tinker import [FILE]` brings a CLaaS `tinker_state.json`'s LoRAs here.
    Tinker {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Use the embedded profile's database (SQLite under ./data).
        #[arg(long)]
        local: bool,
        #[command(subcommand)]
        cmd: TinkerCommand,
    },
    /// API keys: `claas keys create --name N --prefix P`, `list`, `revoke ID`.
    Keys {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Use the embedded profile's database (SQLite under ./data).
        #[arg(long)]
        local: bool,
        #[command(subcommand)]
        cmd: keys::KeysCommand,
    },
}

#[derive(Subcommand)]
enum TinkerCommand {
    /// Imports each LoRA of CLaaS's `tinker_state.json` (FILE, else `tinker.state_path` /
    /// `CLAAS_TINKER_STATE_PATH`, else `~/.claas/tinker_state.json`): version 0 is its
    /// current Tinker checkpoint. Running it again changes nothing.
    Import { file: Option<PathBuf> },
}

/// The embedded profile with `--local`, else the fleet's.
fn profile(local: bool) -> Profile {
    if local {
        Profile::Local
    } else {
        Profile::Fleet
    }
}

/// Loads the configuration and starts logging (and trace export when
/// `telemetry.otlp_endpoint` is set) as `service`.
fn load(profile: Profile, args: &ConfigArgs, service: &'static str) -> Result<Config> {
    load_with(profile, args, &Overrides::default(), service)
}

/// [`load`] with `key=value` settings after the command.
fn load_with(
    profile: Profile,
    args: &ConfigArgs,
    set: &Overrides,
    service: &'static str,
) -> Result<Config> {
    // CLaaS's entrypoint passes the profile as the first word: `local base_model_id=…`.
    let mut settings = set.settings.as_slice();
    let mut name = args.config_name.as_deref();
    if let Some(first) = settings.first().filter(|w| !w.contains('=')) {
        if name.is_some() {
            anyhow::bail!("'{first}' is not a key=value setting (--config-name is given)");
        }
        name = Some(first.as_str());
        settings = &settings[1..];
    }
    let sources = claas_core::config::Sources {
        name,
        file: args.config.as_deref(),
        overrides: settings,
    };
    let cfg = Config::load_sources(profile, &sources);
    let otlp = cfg
        .as_ref()
        .ok()
        .and_then(|c| c.telemetry.otlp_endpoint.clone());
    claas_core::telemetry::init(otlp.as_deref(), service);
    let cfg = cfg?;
    for (name, why) in Config::ignored_env() {
        tracing::warn!("{name} is set but ignored: {why}");
    }
    for note in &cfg.ignored {
        tracing::info!("setting accepted but ignored: {note}");
    }
    Ok(cfg)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let result = run(cli).await;
    claas_core::telemetry::shutdown();
    result
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dev { cfg, set } => {
            serve::dev(load_with(Profile::Local, &cfg, &set, "claas-dev")?).await
        }
        Command::Api {
            cfg,
            no_migrate,
            set,
        } => {
            let cfg = load_with(Profile::Fleet, &cfg, &set, "claas-api")?;
            serve::api(cfg, !no_migrate).await
        }
        Command::Worker {
            cfg,
            no_migrate,
            set,
        } => {
            let cfg = load_with(Profile::Fleet, &cfg, &set, "claas-worker")?;
            serve::worker(cfg, !no_migrate).await
        }
        Command::Migrate { cfg, local, set } => {
            let cfg = load_with(profile(local), &cfg, &set, "claas-migrate")?;
            let store = serve::open_store(&cfg).await?;
            store.migrate().await?;
            tracing::info!(backend = store.backend(), "migrations applied");
            Ok(())
        }
        Command::Bench(cmd) => {
            claas_core::telemetry::init(None, "claas");
            bench::run(cmd).await
        }
        Command::Eval(args) => {
            claas_core::telemetry::init(None, "claas-eval");
            eval::run(args).await
        }
        Command::Model(cmd) => {
            claas_core::telemetry::init(None, "claas");
            tokio::task::spawn_blocking(move || train::model(cmd)).await?
        }
        Command::Distill(a) => {
            claas_core::telemetry::init(None, "claas");
            tokio::task::spawn_blocking(move || train::distill(a)).await?
        }
        Command::Tinker { cfg, local, cmd } => {
            let cfg = load(profile(local), &cfg, "claas-tinker")?;
            let store = serve::open_store(&cfg).await?;
            store.migrate().await?;
            match cmd {
                TinkerCommand::Import { file } => tinker::import(&cfg, store, file).await,
            }
        }
        Command::Keys { cfg, local, cmd } => {
            let cfg = load(profile(local), &cfg, "claas-keys")?;
            let store = serve::open_store(&cfg).await?;
            store.migrate().await?;
            keys::run(store, cmd).await
        }
    }
}
