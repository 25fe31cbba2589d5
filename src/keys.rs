//! `claas keys create|list|revoke`: API keys in the database every API replica reads.

use anyhow::{bail, Result};
use claas_core::queue::SharedStore;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Creates a key and prints its secret (shown once; only its hash is stored).
    Create {
        /// A name to recognise the key by.
        #[arg(long)]
        name: String,
        /// LoRA id prefixes the key may act on (repeatable): `alice` covers `alice` and
        /// `alice/...`; a prefix ending in `/` or `-` is a plain prefix.
        #[arg(long = "prefix")]
        prefixes: Vec<String>,
        /// Acts on every LoRA and job (the dashboard and /metrics need one).
        #[arg(long)]
        admin: bool,
    },
    /// Lists keys (never their secrets).
    List,
    /// Revokes a key by id; it stops working on every replica within seconds.
    Revoke { id: String },
}

pub async fn run(store: SharedStore, cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create {
            name,
            prefixes,
            admin,
        } => {
            let created = claas_api::routes::keys::create_key(
                &store,
                claas_api::routes::keys::NewKey {
                    name,
                    prefixes,
                    admin,
                },
            )
            .await?;
            let (id, secret) = (created.key.id, created.secret);
            eprintln!("created key {id}; its secret (shown once):");
            println!("{secret}");
            Ok(())
        }
        KeysCommand::List => {
            for k in store.list_api_keys().await? {
                let scope = if k.admin {
                    "admin".to_owned()
                } else {
                    k.prefixes.join(",")
                };
                let state = match k.revoked_at {
                    Some(t) => format!("revoked {}", t.to_rfc3339()),
                    None => "active".into(),
                };
                println!("{}\t{}\t{scope}\t{state}", k.id, k.name);
            }
            Ok(())
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke_api_key(&id).await? {
                bail!("no active key {id}");
            }
            eprintln!("revoked {id}");
            Ok(())
        }
    }
}
