//! Where adapter versions live: a local directory tree (`file://`), or an S3-compatible
//! object store (`s3://bucket/prefix`, through the object_store crate) with a local cache
//! directory that vLLM and the trainer read from.
//!
//! Either way a version is written as a local directory first (the trainer writes files);
//! [`AdapterStore::publish`] then makes it durable where the fleet can read it and returns
//! the URI recorded in `lora_versions`; [`AdapterStore::materialize`] turns a URI back into
//! a local directory (downloading into the cache when needed), and
//! [`AdapterStore::remove`] deletes a version (retention, LoRA deletion).
//!
//! Layout: `<root>/<lora_id>/@v<N>-<tag>/` (and the same keys under an S3 prefix). The tag
//! is unique to the attempt that wrote the files (a worker's lease token, or a random one
//! for the API's initial versions), so a published version's files are never written
//! again: a stalled writer that wakes after its lease writes beside them, never over them,
//! and its publish is refused. `@` never starts a LoRA-id segment, so the versions of LoRA
//! `x` and a LoRA `x/v1` never share a path; and a LoRA deleted and created again never
//! reuses a URI, so no node's cache serves the old incarnation's weights.
//!
//! S3 settings come from the standard environment: `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`) for a
//! non-AWS store; a plain `http://` endpoint is allowed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::error::{Error, Result};
use crate::types::local_path;

fn storage_err(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

/// A version's files under its LoRA (`@v3-…`, a directory or, for the simulated
/// executor, a file), not a download in progress.
fn is_version_entry(name: &str) -> bool {
    name.starts_with("@v") && !name.ends_with(".tmp")
}

/// Hex sha256 of an adapter directory's weights (`adapter_model.safetensors`), streamed: an
/// 8B model's rank-64 weights are hundreds of MB.
pub fn weights_sha256(dir: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(
        &mut std::fs::File::open(dir.join("adapter_model.safetensors"))?,
        &mut hasher,
    )?;
    Ok(hex::encode(hasher.finalize()))
}

/// Removes a local version, a directory or a file; one already gone is fine.
pub async fn remove_local(path: &Path) -> Result<()> {
    let removed = match tokio::fs::symlink_metadata(path).await {
        Ok(m) if m.is_dir() => tokio::fs::remove_dir_all(path).await,
        Ok(_) => tokio::fs::remove_file(path).await,
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// URIs name absolute paths, whatever directory a process runs in.
fn absolute(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// Adapter version storage.
#[derive(Clone)]
pub struct AdapterStore {
    kind: Kind,
    /// Local files: the tree itself (`file://`), or the cache of downloaded versions (S3),
    /// laid out the same way: `<root>/<lora_id>/<version dir>/`.
    root: PathBuf,
}

#[derive(Clone)]
enum Kind {
    Local,
    S3 {
        store: Arc<dyn ObjectStore>,
        bucket: String,
        /// Key prefix without a trailing slash ("" for the bucket's root).
        prefix: String,
    },
}

impl std::fmt::Debug for AdapterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Kind::Local => write!(f, "AdapterStore(local {})", self.root.display()),
            Kind::S3 { bucket, prefix, .. } => write!(
                f,
                "AdapterStore(s3://{bucket}/{prefix}, cache {})",
                self.root.display()
            ),
        }
    }
}

impl AdapterStore {
    /// Versions under `root`, recorded as `file://` URIs.
    pub fn local(root: impl Into<PathBuf>) -> AdapterStore {
        AdapterStore {
            kind: Kind::Local,
            root: absolute(root.into()),
        }
    }

    /// Versions in the bucket `url` names (`s3://bucket/prefix`), cached under `cache`.
    pub fn s3(url: &str, cache: impl Into<PathBuf>) -> Result<AdapterStore> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::Config(format!("storage.url must be s3://bucket/prefix, not {url}"))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::Config(format!("storage.url {url} names no bucket")));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .ok();
        if let Some(e) = endpoint {
            builder = builder
                .with_allow_http(e.starts_with("http://"))
                .with_endpoint(e);
        }
        let store = builder.build().map_err(storage_err)?;
        Ok(AdapterStore {
            kind: Kind::S3 {
                store: Arc::new(store),
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            },
            root: absolute(cache.into()),
        })
    }

    /// As configured: `storage.backend` `local` (files under `lora_root`) or `s3`
    /// (`storage.url`, cached under `lora_root`).
    pub fn from_config(cfg: &crate::config::StorageConfig) -> Result<AdapterStore> {
        match cfg.backend {
            crate::config::StorageBackend::Local => Ok(AdapterStore::local(&cfg.lora_root)),
            crate::config::StorageBackend::S3 => {
                AdapterStore::s3(cfg.url.as_deref().unwrap_or_default(), &cfg.lora_root)
            }
        }
    }

    /// Whether `uri` names files this store reads: a local path, or an object in its bucket.
    /// A version held elsewhere (a Tinker checkpoint) or not written yet (empty) is not.
    pub fn holds(&self, uri: &str) -> bool {
        if local_path(uri).is_some() {
            return true;
        }
        match &self.kind {
            Kind::S3 { bucket, .. } => uri.starts_with(&format!("s3://{bucket}/")),
            _ => false,
        }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self.kind, Kind::S3 { .. })
    }

    /// The name of version `version`'s files as written by the attempt tagged `tag`.
    pub fn version_name(version: i32, tag: &str) -> String {
        format!("@v{version}-{tag}")
    }

    /// A fresh tag, for a writer that holds no lease (the API's initial versions).
    pub fn new_tag() -> String {
        uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
    }

    /// The local directory of `name` (`@v3-…`) of `lora_id`: where a version is written
    /// before it is published, and where a published one is materialized.
    pub fn local_dir(&self, lora_id: &str, name: &str) -> PathBuf {
        self.root.join(lora_id).join(name)
    }

    fn key(prefix: &str, lora_id: &str, name: &str) -> String {
        if prefix.is_empty() {
            format!("{lora_id}/{name}")
        } else {
            format!("{prefix}/{lora_id}/{name}")
        }
    }

    /// The URI `publish` gives version `name` of `lora_id`.
    pub fn uri_of(&self, lora_id: &str, name: &str) -> String {
        match &self.kind {
            Kind::Local => format!("file://{}", self.local_dir(lora_id, name).display()),
            Kind::S3 { bucket, prefix, .. } => {
                format!("s3://{bucket}/{}", Self::key(prefix, lora_id, name))
            }
        }
    }

    /// Makes the version written at `local_dir(lora_id, name)` durable; returns its URI.
    pub async fn publish(&self, lora_id: &str, name: &str) -> Result<String> {
        let dir = self.local_dir(lora_id, name);
        let Kind::S3 {
            store,
            bucket,
            prefix,
        } = &self.kind
        else {
            return Ok(format!("file://{}", dir.display()));
        };
        let key = Self::key(prefix, lora_id, name);
        let mut files = tokio::fs::read_dir(&dir).await?;
        while let Some(entry) = files.next_entry().await? {
            if !entry.file_type().await?.is_file() {
                continue;
            }
            let bytes = tokio::fs::read(entry.path()).await?;
            let file = entry.file_name().to_string_lossy().into_owned();
            store
                .put(
                    &ObjectPath::from(format!("{key}/{file}")),
                    PutPayload::from(bytes),
                )
                .await
                .map_err(storage_err)?;
        }
        Ok(format!("s3://{bucket}/{key}"))
    }

    /// The local directory holding the version `uri` names, downloading it into the cache
    /// first when it is remote and not cached. A remote version with no objects (an
    /// initial version nobody wrote yet) gives its cache directory, empty.
    pub async fn materialize(&self, uri: &str) -> Result<PathBuf> {
        if let Some(p) = local_path(uri) {
            return Ok(p);
        }
        let (store, key, dir) = self.remote(uri)?;
        if dir.join("adapter_config.json").is_file() {
            return Ok(dir);
        }
        let objects: Vec<_> = store
            .list(Some(&ObjectPath::from(format!("{key}/"))))
            .try_collect()
            .await
            .map_err(storage_err)?;
        if objects.is_empty() {
            tokio::fs::create_dir_all(&dir).await?;
            return Ok(dir);
        }
        // Into a sibling temp directory, then one rename: readers never see half a version.
        let tmp = dir.with_extension(format!("dl-{}.tmp", uuid::Uuid::new_v4().simple()));
        tokio::fs::create_dir_all(&tmp).await?;
        for meta in objects {
            let Some(file) = meta.location.filename().map(str::to_owned) else {
                continue;
            };
            let bytes = store
                .get(&meta.location)
                .await
                .map_err(storage_err)?
                .bytes()
                .await
                .map_err(storage_err)?;
            tokio::fs::write(tmp.join(&file), &bytes).await?;
        }
        if let Some(parent) = dir.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        match tokio::fs::rename(&tmp, &dir).await {
            Ok(()) => {}
            // Another task cached it meanwhile: keep theirs.
            Err(_) if dir.join("adapter_config.json").is_file() => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(dir)
    }

    /// Deletes the version `uri` names (and its cached copy).
    pub async fn remove(&self, uri: &str) -> Result<()> {
        let dir = match local_path(uri) {
            Some(p) => p,
            None => {
                let (store, key, dir) = self.remote(uri)?;
                let objects: Vec<_> = store
                    .list(Some(&ObjectPath::from(format!("{key}/"))))
                    .try_collect()
                    .await
                    .map_err(storage_err)?;
                for meta in objects {
                    store.delete(&meta.location).await.map_err(storage_err)?;
                }
                dir
            }
        };
        remove_local(&dir).await
    }

    /// What attempts wrote under `lora_id` and no version records (`recorded`: every
    /// version's `storage_uri`), older than `grace`: the files of a crashed attempt, or of
    /// a stalled one whose publish was refused. Returns their URIs, for [`Self::remove`].
    /// `grace` must outlive a lease, so a live attempt between writing and publishing is
    /// never among them.
    pub async fn orphans(
        &self,
        lora_id: &str,
        recorded: &[String],
        grace: Duration,
    ) -> Result<Vec<String>> {
        let recorded: HashSet<String> = recorded.iter().map(|u| self.normalize(u)).collect();
        let mut found = Vec::new();
        match &self.kind {
            Kind::Local => {
                let mut entries = match tokio::fs::read_dir(self.root.join(lora_id)).await {
                    Ok(e) => e,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
                    Err(e) => return Err(e.into()),
                };
                while let Some(entry) = entries.next_entry().await? {
                    if !is_version_entry(&entry.file_name().to_string_lossy()) {
                        continue;
                    }
                    let age = entry
                        .metadata()
                        .await?
                        .modified()
                        .ok()
                        .and_then(|m| m.elapsed().ok())
                        .unwrap_or_default();
                    let uri = format!("file://{}", entry.path().display());
                    if age >= grace && !recorded.contains(&self.normalize(&uri)) {
                        found.push(uri);
                    }
                }
            }
            Kind::S3 {
                store,
                bucket,
                prefix,
            } => {
                let dir = Self::key(prefix, lora_id, "");
                let listing = store
                    .list_with_delimiter(Some(&ObjectPath::from(dir.trim_end_matches('/'))))
                    .await
                    .map_err(storage_err)?;
                let now = chrono::Utc::now();
                for version in listing.common_prefixes {
                    if !version.filename().is_some_and(is_version_entry) {
                        continue;
                    }
                    let objects: Vec<_> = store
                        .list(Some(&version))
                        .try_collect()
                        .await
                        .map_err(storage_err)?;
                    let newest = objects.iter().map(|o| o.last_modified).max();
                    let old =
                        newest.is_none_or(|t| (now - t).to_std().unwrap_or_default() >= grace);
                    let uri = format!("s3://{bucket}/{version}");
                    if old && !recorded.contains(&self.normalize(&uri)) {
                        found.push(uri);
                    }
                }
            }
        }
        Ok(found)
    }

    /// A URI as `orphans` compares it: local ones as absolute paths, without a trailing `/`.
    fn normalize(&self, uri: &str) -> String {
        match local_path(uri) {
            Some(p) => absolute(p).display().to_string(),
            None => uri.to_owned(),
        }
        .trim_end_matches('/')
        .to_owned()
    }

    /// The store, object key and cache directory of an `s3://` URI of this bucket.
    fn remote(&self, uri: &str) -> Result<(&Arc<dyn ObjectStore>, String, PathBuf)> {
        let Kind::S3 {
            store,
            bucket,
            prefix,
        } = &self.kind
        else {
            return Err(Error::Storage(format!(
                "{uri} is remote but storage.backend is local"
            )));
        };
        let key = uri
            .strip_prefix(&format!("s3://{bucket}/"))
            .ok_or_else(|| Error::Storage(format!("{uri} is not in bucket {bucket}")))?
            .trim_end_matches('/')
            .to_owned();
        let relative = key
            .strip_prefix(prefix.as_str())
            .unwrap_or(&key)
            .trim_start_matches('/');
        if relative.split('/').any(|s| s == ".." || s.is_empty()) {
            return Err(Error::Storage(format!("{uri} is not a version key")));
        }
        Ok((store, key.clone(), self.root.join(Path::new(relative))))
    }
}
