//! The OpenAPI document. Every route is registered through utoipa-axum's `routes!`, which
//! takes its path and method from the handler's `#[utoipa::path]`: the router and the
//! document are built from one list, so they cannot drift apart.
//!
//! LoRA ids contain `/`, which an OpenAPI path parameter cannot. The document and the router
//! name them as one segment (`/v1/lora/{lora_id}/versions`, the `/` sent as `%2F`, which is
//! what generated clients send); [`encode_lora_ids`] lets hand-written clients keep sending
//! the raw `/v1/lora/alice/x/versions` by encoding those slashes before routing.

use std::sync::OnceLock;

use axum::extract::Request;
use axum::http::Uri;
use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::OpenApi as Document;
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "claas-rs",
        description = "Continual learning as a service: chat through the proxy, send feedback, \
                       and each feedback batch becomes one SDPO training step on the LoRA. \
                       Every error is `{\"error\": {\"code\", \"message\"}}`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody)),
    tags(
        (name = "feedback", description = "Feedback in, training jobs out"),
        (name = "jobs", description = "Polling and cancelling jobs"),
        (name = "lora", description = "LoRA adapters and their versions"),
        (name = "inference", description = "OpenAI-compatible inference (vLLM or embedded)"),
        (name = "ops", description = "Health, metrics and this document"),
        (name = "admin", description = "Needs an admin key: key management, the dashboard, eval runs"),
    )
)]
struct ApiDoc;

/// Declares the `bearer` scheme the document's `security` names.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The document's frame (info, tags, security) before the routes add their paths.
pub(crate) fn base() -> Document {
    ApiDoc::openapi()
}

/// The whole document, built once.
pub fn document() -> &'static Document {
    static DOC: OnceLock<Document> = OnceLock::new();
    DOC.get_or_init(|| crate::api_routes().into_openapi())
}

/// The OpenAPI document of this API (generated from the code).
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    security((), ("bearer" = [])),
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json() -> Json<&'static Document> {
    Json(document())
}

/// Routes whose `{lora_id}` segment may arrive with raw slashes, and what follows it.
const LORA_ROUTES: [(&str, &[&str]); 2] = [
    ("/v1/lora/", &["/versions", "/rollback", "/pin"]),
    ("/v1/dashboard/loras/", &[""]),
];

/// Middleware: `/v1/lora/alice/x/versions` becomes `/v1/lora/alice%2Fx/versions` before
/// routing, so the one-segment routes serve ids with raw slashes too.
pub async fn encode_lora_ids(mut req: Request) -> Request {
    if let Some(uri) = encoded(req.uri()) {
        *req.uri_mut() = uri;
    }
    req
}

fn encoded(uri: &Uri) -> Option<Uri> {
    let path = uri.path();
    let (prefix, rest, suffix) = LORA_ROUTES.iter().find_map(|(prefix, suffixes)| {
        let rest = path.strip_prefix(prefix)?;
        suffixes.iter().find_map(|s| {
            let id = rest.strip_suffix(s)?;
            id.contains('/').then_some((*prefix, id, *s))
        })
    })?;
    let mut new = format!("{prefix}{}{suffix}", rest.replace('/', "%2F"));
    if let Some(q) = uri.query() {
        new.push('?');
        new.push_str(q);
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = new.parse().ok();
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> String {
        let uri: Uri = s.parse().expect("uri");
        encoded(&uri).map_or_else(|| s.to_owned(), |u| u.to_string())
    }

    #[test]
    fn raw_slashes_in_lora_ids_are_encoded_before_routing() {
        assert_eq!(
            enc("/v1/lora/alice/x/versions"),
            "/v1/lora/alice%2Fx/versions"
        );
        assert_eq!(enc("/v1/lora/a/b/c/pin?x=1"), "/v1/lora/a%2Fb%2Fc/pin?x=1");
        assert_eq!(enc("/v1/lora/solo/versions"), "/v1/lora/solo/versions");
        assert_eq!(enc("/v1/lora/init"), "/v1/lora/init");
        assert_eq!(
            enc("/v1/lora/export?lora_id=a/b"),
            "/v1/lora/export?lora_id=a/b"
        );
        assert_eq!(
            enc("/v1/dashboard/loras/team/a"),
            "/v1/dashboard/loras/team%2Fa"
        );
        assert_eq!(enc("/v1/jobs/x/cancel"), "/v1/jobs/x/cancel");
    }
}
