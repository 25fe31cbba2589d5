//! Dashboard sessions and CSRF tokens, both HMAC-SHA256 under one secret.
//!
//! A session cookie is `<expiry>.<key hash>.<signature>`: the signed expiry (unix seconds)
//! and the SHA-256 of the admin key that logged in, so revoking the key ends its sessions
//! at once (the hash is looked up on every request, as a bearer key would be). A CSRF token
//! is the signature of the session cookie, or, before login and when the API is open, of
//! a random nonce kept in its own cookie: a form posted from another site carries neither.

use axum::http::{header, HeaderMap, HeaderValue};
use chrono::Utc;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "claas_session";
/// The CSRF nonce cookie's name (used when there is no session).
pub const NONCE_COOKIE: &str = "claas_csrf";
/// How long a login lasts.
pub const SESSION_TTL_S: i64 = 12 * 3600;
/// The cookies' path: the whole site, so the eval pages (`/v1/eval`) see the session too,
/// and so the `__Host-` prefix (which requires `Path=/`) can be used over TLS. The API's
/// other routes ignore the cookies: they authenticate by bearer key only.
const COOKIE_PATH: &str = "/";
/// Over TLS the cookies' names carry this prefix: browsers then accept them only when set
/// by this exact host over HTTPS, so a sibling subdomain or a plain-HTTP hop cannot plant
/// one.
const HOST_PREFIX: &str = "__Host-";

type HmacSha256 = Hmac<Sha256>;

/// The signing secret.
pub struct Sessions {
    secret: Vec<u8>,
}

impl Sessions {
    /// Sessions signed with `secret`; a random one when none is configured (then a session
    /// holds only on this process).
    pub fn new(secret: Option<&str>) -> Sessions {
        let secret = match secret.filter(|s| !s.is_empty()) {
            Some(s) => s.as_bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        Sessions { secret }
    }

    fn sign(&self, purpose: &str, data: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"|");
        mac.update(data.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn verify(&self, purpose: &str, data: &str, signature: &str) -> bool {
        let Ok(sig) = hex::decode(signature) else {
            return false;
        };
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("HMAC takes any key length");
        mac.update(purpose.as_bytes());
        mac.update(b"|");
        mac.update(data.as_bytes());
        mac.verify_slice(&sig).is_ok()
    }

    /// A session cookie value for key `key_id`, whose secret hashes to `key_hash`: the
    /// expiry, the key's id and an HMAC over both and the hash. The hash itself never
    /// leaves the server.
    pub fn issue(&self, key_id: &str, key_hash: &str) -> String {
        let data = format!("{}.{key_id}", Utc::now().timestamp() + SESSION_TTL_S);
        let sig = self.sign("session", &format!("{data}.{key_hash}"));
        format!("{data}.{sig}")
    }

    /// The key id a session cookie names, when it has not expired; the signature is checked
    /// by [`Sessions::holds`] once the key's hash is looked up.
    pub fn key_id<'a>(&self, cookie: &'a str) -> Option<&'a str> {
        let (data, _) = cookie.rsplit_once('.')?;
        let (expiry, id) = data.split_once('.')?;
        let expiry: i64 = expiry.parse().ok()?;
        (expiry > Utc::now().timestamp()).then_some(id)
    }

    /// Whether `cookie` was issued by [`Sessions::issue`] for the key whose hash is
    /// `key_hash` (and has not expired).
    pub fn holds(&self, cookie: &str, key_hash: &str) -> bool {
        let Some((data, sig)) = cookie.rsplit_once('.') else {
            return false;
        };
        self.key_id(cookie).is_some() && self.verify("session", &format!("{data}.{key_hash}"), sig)
    }

    /// The CSRF token for a page whose forms are bound to `binding` (the session cookie or
    /// the nonce cookie).
    pub fn csrf_token(&self, binding: &str) -> String {
        self.sign("csrf", binding)
    }

    /// Whether `token` is the CSRF token of `binding`.
    pub fn csrf_ok(&self, binding: &str, token: &str) -> bool {
        !binding.is_empty() && self.verify("csrf", binding, token)
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (its `__Host-` name when
/// the request came over HTTPS).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let name = &wire_name(headers, name);
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// Whether the client reached us over HTTPS (directly or through a proxy that says so):
/// the cookies are then marked `Secure`.
fn is_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// A cookie's name on the wire: `__Host-<name>` over HTTPS, else `name`.
fn wire_name(headers: &HeaderMap, name: &str) -> String {
    if is_https(headers) {
        format!("{HOST_PREFIX}{name}")
    } else {
        name.to_owned()
    }
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, `Secure` and `__Host-` over HTTPS.
pub fn set_cookie(headers: &HeaderMap, name: &str, value: &str, max_age_s: i64) -> HeaderValue {
    let secure = if is_https(headers) { "; Secure" } else { "" };
    let name = wire_name(headers, name);
    let v = format!(
        "{name}={value}; Path={COOKIE_PATH}; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{secure}"
    );
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// A new random CSRF nonce.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_names_its_key_holds_for_its_hash_and_never_carries_the_hash() {
        let s = Sessions::new(Some("secret"));
        let hash = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let cookie = s.issue("key_abc", hash);
        assert!(
            !cookie.contains(hash),
            "the key's SHA-256 stays on the server: {cookie}"
        );
        assert_eq!(s.key_id(&cookie), Some("key_abc"));
        assert!(s.holds(&cookie, hash));
        assert!(!s.holds(&cookie, "another key's hash"));
        assert!(!Sessions::new(Some("other")).holds(&cookie, hash));
        let forged = cookie.replace("key_abc", "key_abd");
        assert!(!s.holds(&forged, hash));
        let data = format!("{}.key_abc", Utc::now().timestamp() - 1);
        let expired = format!("{data}.{}", s.sign("session", &format!("{data}.{hash}")));
        assert!(!s.holds(&expired, hash));
        assert_eq!(s.key_id(&expired), None);
        assert!(!s.holds("garbage", hash));
    }

    #[test]
    fn csrf_tokens_are_bound_to_their_cookie() {
        let s = Sessions::new(None);
        let token = s.csrf_token("nonce-1");
        assert!(s.csrf_ok("nonce-1", &token));
        assert!(!s.csrf_ok("nonce-2", &token));
        assert!(!s.csrf_ok("", &s.csrf_token("")));
        assert!(!s.csrf_ok("nonce-1", "not hex"));
    }

    #[test]
    fn cookies_are_read_from_every_cookie_header() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; claas_csrf=n"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("claas_session=s"));
        assert_eq!(cookie(&h, NONCE_COOKIE), Some("n"));
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("s"));
        assert_eq!(cookie(&h, "b"), None);
    }

    #[test]
    fn over_tls_cookies_are_host_prefixed_site_wide() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let set = set_cookie(&h, SESSION_COOKIE, "v", 60);
        let set = set.to_str().expect("ascii");
        assert!(set.starts_with("__Host-claas_session=v; Path=/;"), "{set}");
        assert!(set.contains("; Secure"), "{set}");
        // Over TLS an unprefixed cookie (which a sibling host could plant) is not read.
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("claas_session=planted"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), None);
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("__Host-claas_session=v"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("v"));
        let plain = set_cookie(&HeaderMap::new(), SESSION_COOKIE, "v", 60);
        assert!(plain
            .to_str()
            .expect("ascii")
            .starts_with("claas_session=v; Path=/;"));
    }
}
