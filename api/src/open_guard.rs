//! What keeps an open API (no key, as `claas dev` runs) from being a browser's target.
//! Any web page a developer visits can send requests to `127.0.0.1:8080`; without keys
//! nothing but these checks tells such a request from the developer's own:
//!
//! - **DNS rebinding**: a page whose own name resolves to this address reads our answers as
//!   same-origin. Its requests carry its name in `Host`, so an open API answers only the
//!   `Host` names it was told about (localhost names, the bound address,
//!   `server.allowed_hosts`).
//! - **Cross-site writes**: a page can POST to us without reading the answer. State-changing
//!   requests whose `Origin` is another site are refused (and JSON bodies must say
//!   `application/json`, which a plain form or a `no-cors` fetch cannot send; see
//!   [`crate::error::JsonBody`]).
//!
//! Requests without `Host` or `Origin` (command-line clients, SDKs) are not browsers' and
//! pass. With keys on, a browser holds no bearer key to send, and the dashboard's cookie is
//! `SameSite=Strict` with CSRF tokens, so these checks apply to the open API only.

use axum::http::{header, HeaderMap, Method};

use crate::error::ApiError;

/// The names an open API answers to.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Vec<String>);

impl AllowedHosts {
    /// The localhost names, plus `extra` (the bound address, `server.allowed_hosts`).
    pub fn new<'a>(extra: impl IntoIterator<Item = &'a str>) -> AllowedHosts {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .chain(extra)
            .map(|h| h.trim().trim_start_matches('[').trim_end_matches(']'))
            .filter(|h| !h.is_empty() && *h != "0.0.0.0" && *h != "::")
            .map(str::to_ascii_lowercase)
            .collect();
        names.sort();
        names.dedup();
        AllowedHosts(names)
    }

    /// Whether `authority` (`name`, `name:port`, `[v6]:port`) names an allowed host.
    fn allows(&self, authority: &str) -> bool {
        let host = host_of(authority).to_ascii_lowercase();
        self.0.contains(&host)
            || host
                .strip_suffix(".localhost")
                .is_some_and(|sub| !sub.is_empty())
    }

    /// Why an open API refuses this request, if it does.
    pub fn refusal(&self, method: &Method, headers: &HeaderMap) -> Option<ApiError> {
        if let Some(host) = headers.get(header::HOST) {
            let host = host.to_str().unwrap_or("");
            if !self.allows(host) {
                return Some(ApiError::host_not_allowed(host));
            }
        }
        let writes = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        let origin = headers
            .get(header::ORIGIN)
            .map(|o| o.to_str().unwrap_or(""));
        match origin {
            Some(o) if writes && !self.allows_origin(o) => Some(ApiError::origin_not_allowed(o)),
            _ => None,
        }
    }

    /// `scheme://authority` whose authority is allowed (`null`, an opaque origin, is not).
    fn allows_origin(&self, origin: &str) -> bool {
        origin
            .split_once("://")
            .is_some_and(|(_, authority)| self.allows(authority))
    }
}

/// The host part of an authority: without the port, and without a v6 address's brackets.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    authority.split(':').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(header::HeaderName, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_local_names_and_the_configured_ones_are_answered() {
        let allowed = AllowedHosts::new(["0.0.0.0", "claas.internal"]);
        for ok in [
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "LOCALHOST",
            "claas.internal:80",
            "app.localhost:8080",
        ] {
            assert!(allowed.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "0.0.0.0:8080",
            ".localhost",
            "",
        ] {
            assert!(!allowed.allows(refused), "{refused}");
        }
    }

    #[test]
    fn writes_from_another_site_are_refused_reads_and_plain_clients_pass() {
        let allowed = AllowedHosts::new([]);
        let post = Method::POST;
        let from = |o| headers(&[(header::HOST, "127.0.0.1:8080"), (header::ORIGIN, o)]);
        assert!(allowed
            .refusal(&post, &from("https://evil.example"))
            .is_some());
        assert!(allowed.refusal(&post, &from("null")).is_some());
        assert!(allowed
            .refusal(&post, &from("http://localhost:8080"))
            .is_none());
        assert!(allowed
            .refusal(&Method::GET, &from("https://evil.example"))
            .is_none());
        assert!(allowed
            .refusal(&post, &headers(&[(header::HOST, "localhost")]))
            .is_none());
        assert!(allowed.refusal(&post, &HeaderMap::new()).is_none());
        let rebound = headers(&[(header::HOST, "evil.example:8080")]);
        assert!(allowed.refusal(&Method::GET, &rebound).is_some());
    }
}
