//! Serving a LoRA that vLLM does not know yet: the proxy's answer to vLLM's "model not
//! found" for one of our LoRAs. Local versions are loaded by path; versions in object
//! storage are loaded by the worker next to that vLLM, which the API asks through the
//! store (`adapter_requests`) and then waits for.

use std::time::Duration;

use crate::error::ApiError;
use crate::upstream::Upstream;
use claas_core::queue::SharedStore;

/// How long a request waits for a node's worker to load an adapter from object storage.
const ADAPTER_REQUEST_WAIT: Duration = Duration::from_secs(30);

/// What [`reconcile_adapter`] achieved.
pub(super) enum Reconciled {
    /// vLLM serves the LoRA's current version now.
    Loaded,
    /// Not a LoRA of ours (or it cannot be loaded): vLLM's own answer stands.
    NotOurs,
    /// Its node's worker was asked to load it and has not yet.
    Pending,
}

/// Loads LoRA `lora_id`'s current version into vLLM: from its path when the versions are
/// local files this vLLM can read; otherwise (object storage) by asking the worker next
/// to that vLLM, which materialises it there, and waiting up to [`ADAPTER_REQUEST_WAIT`].
pub(super) async fn reconcile_adapter(
    store: &SharedStore,
    up: &Upstream,
    lora_id: &str,
) -> Reconciled {
    let Ok(Some(lora)) = store.get_lora(lora_id).await else {
        return Reconciled::NotOurs;
    };
    let Ok(Some(current)) = store.current_version(&lora).await else {
        return Reconciled::NotOurs;
    };
    let Some(path) = claas_core::types::local_path(&current.storage_uri) else {
        return request_from_node(store, up, lora_id).await;
    };
    match crate::upstream::load_lora(up, lora_id, &path.display().to_string(), false).await {
        Ok(()) => {
            tracing::info!(
                lora_id,
                version = current.version,
                "loaded an adapter vLLM did not know"
            );
            Reconciled::Loaded
        }
        Err(e) => {
            let e: ApiError = e.into();
            tracing::warn!(lora_id, error = %e.message, "could not load the adapter into vLLM");
            Reconciled::NotOurs
        }
    }
}

/// Asks the worker next to `up` to load `lora_id`, then waits until vLLM lists it.
async fn request_from_node(store: &SharedStore, up: &Upstream, lora_id: &str) -> Reconciled {
    if let Err(e) = store.request_adapter(up.base_url(), lora_id).await {
        tracing::warn!(lora_id, error = %e, "could not ask the node's worker for the adapter");
        return Reconciled::NotOurs;
    }
    let deadline = tokio::time::Instant::now() + ADAPTER_REQUEST_WAIT;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(adapters) = up.adapters().await else {
            continue;
        };
        if adapters.iter().any(|(name, _)| name == lora_id) {
            tracing::info!(
                lora_id,
                vllm = up.base_url(),
                "the node's worker loaded the adapter"
            );
            return Reconciled::Loaded;
        }
    }
    tracing::warn!(
        lora_id,
        vllm = up.base_url(),
        "no worker loaded the adapter in time"
    );
    Reconciled::Pending
}
