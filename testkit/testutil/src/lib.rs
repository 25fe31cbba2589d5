//! Helpers every test suite shares. It owns nothing of the product and imports no
//! `claas-*` crate, so any crate may take it as a dev-dependency.
//!
//! - [`tempdir`]: a fresh, empty directory that is removed when the test ends, also when
//!   it panics (the guard's `Drop` runs while the panic unwinds).
//! - [`http`]: calling an axum router in process and reading its JSON answer.
//!
//! The fake vLLM and Hugging Face Hub are the crate beside this one (`claas-fake-vllm`).

#![allow(clippy::unwrap_used)]

use std::ops::Deref;
use std::path::{Path, PathBuf};

/// A directory removed with everything in it when dropped.
pub struct TempDir(tempfile::TempDir);

/// Makes `claas-<name>-<random>` under the system's temporary directory.
pub fn tempdir(name: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(&format!("claas-{name}-"))
        .tempdir()
        .expect("a temporary directory");
    TempDir(dir)
}

impl TempDir {
    /// The path, owned (for options and structs that keep a `PathBuf`).
    pub fn to_path_buf(&self) -> PathBuf {
        self.0.path().to_path_buf()
    }
}

impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl From<&TempDir> for PathBuf {
    fn from(dir: &TempDir) -> PathBuf {
        dir.to_path_buf()
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

pub mod http {
    //! Requests to an axum router (or any service shaped like one), answered in process
    //! (no socket).

    use std::convert::Infallible;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::response::Response;
    use http_body_util::BodyExt;
    use serde_json::Value;
    use tower::{Service, ServiceExt};

    /// Sends `req` and returns the status and the JSON body (`Null` when empty). A body
    /// that is not JSON fails the test: every answer of the API is JSON.
    pub async fn call<S>(app: &S, req: Request<Body>) -> (StatusCode, Value)
    where
        S: Service<Request<Body>, Response = Response, Error = Infallible> + Clone,
    {
        let resp = app.clone().oneshot(req).await.expect("the router answers");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("a body").to_bytes();
        if bytes.is_empty() {
            return (status, Value::Null);
        }
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{status}: the answer is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        (status, body)
    }

    /// `POST uri` with a JSON body.
    pub fn post(uri: &str, body: &Value) -> Request<Body> {
        post_raw(uri, body.to_string(), &[])
    }

    /// `POST uri` with any body text and extra headers (JSON content type).
    pub fn post_raw(uri: &str, body: String, headers: &[(&str, &str)]) -> Request<Body> {
        let mut b = Request::post(uri).header("content-type", "application/json");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(body)).expect("a request")
    }

    /// `GET uri`.
    pub fn get(uri: &str) -> Request<Body> {
        Request::get(uri).body(Body::empty()).expect("a request")
    }
}

#[cfg(test)]
mod tests {
    use super::tempdir;

    #[test]
    fn a_tempdir_is_removed_when_its_test_panics() {
        let kept = std::sync::Mutex::new(None);
        let outcome = std::panic::catch_unwind(|| {
            let dir = tempdir("panics");
            std::fs::write(dir.join("file"), b"x").expect("write");
            *kept.lock().expect("lock") = Some(dir.to_path_buf());
            panic!("the test fails");
        });
        assert!(outcome.is_err());
        let path = kept.lock().expect("lock").clone().expect("a path");
        assert!(!path.exists(), "{} is left behind", path.display());
    }
}
