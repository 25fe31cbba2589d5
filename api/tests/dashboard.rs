//! The ops dashboard through a real socket, on both stores: pages render from the queue
//! tables, actions need the page's CSRF token and land in the job's timeline and the audit
//! log, and with API keys on only admins get in (bearer key or login session cookie).

mod common;

use claas_api::auth::Auth;
use claas_api::AppState;
use claas_core::queue::{FailOutcome, RetryPolicy};
use claas_core::testing::{job, lora, TestDb, TEST_BASE_MODEL};
use claas_core::types::{JobError, JobStatus, Phase};
use reqwest::redirect::Policy;
use reqwest::{Client, StatusCode};

claas_core::both_stores!(
    pages_show_the_queue_and_actions_need_the_csrf_token,
    retry_and_delete_are_recorded,
    with_keys_on_only_admins_get_in,
    failed_logins_are_throttled_per_address,
    a_trained_jobs_page_shows_what_the_teacher_scored,
);

fn client() -> Client {
    Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

/// The `name=value` part of the response's `Set-Cookie` for `name`, with its attributes.
fn set_cookie(resp: &reqwest::Response, name: &str) -> Option<(String, String)> {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| {
            let (pair, attrs) = v.split_once(';').unwrap_or((v, ""));
            (pair.to_owned(), attrs.to_owned())
        })
}

/// The value of the first `name="csrf"` hidden input.
fn csrf(html: &str) -> String {
    let at = html.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    html[at..at + 64].to_owned()
}

/// GETs a page; returns its status, body and the CSRF cookie it set, if any.
async fn page(
    http: &Client,
    url: &str,
    cookie: Option<&str>,
) -> (StatusCode, String, Option<String>) {
    let mut req = http.get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let r = req.send().await.expect("page");
    let set = set_cookie(&r, "claas_csrf").map(|c| c.0);
    (r.status(), r.text().await.expect("body"), set)
}

async fn post_form(
    http: &Client,
    url: &str,
    cookie: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    http.post(url)
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .expect("post")
}

async fn fail_next(db: &TestDb) -> uuid::Uuid {
    let c = common::claim_one(&db.store, TEST_BASE_MODEL).await;
    let err = JobError {
        code: "invalid_input".into(),
        message: "response is empty".into(),
        phase: Some(Phase::Distill),
    };
    let out = db
        .store
        .fail(&c.lease(), &err, false, RetryPolicy::default())
        .await
        .expect("fail");
    assert_eq!(out, FailOutcome::Failed);
    c.job.id
}

async fn pages_show_the_queue_and_actions_need_the_csrf_token(db: &TestDb) {
    let dir = claas_testutil::tempdir("dashboard");
    db.store.create_lora(&lora("team/a")).await.expect("lora");
    let queued = job("team/a", 2);
    db.store.enqueue(&queued).await.expect("enqueue");
    let base = common::serve(AppState::new(db.store.clone(), common::options(&dir))).await;
    let http = client();

    let (status, html, nonce) = page(&http, &format!("{base}/v1/dashboard"), None).await;
    assert_eq!(status, 200);
    assert!(html.contains(r#"<b id="queued">1</b>"#), "{html}");
    let cookie = nonce.expect("the first page sets the CSRF nonce cookie");

    let (_, list, _) = page(
        &http,
        &format!("{base}/v1/dashboard/jobs?status=queued&lora_id=team/a"),
        Some(&cookie),
    )
    .await;
    assert!(list.contains(&queued.id.to_string()));
    let (_, none, _) = page(
        &http,
        &format!("{base}/v1/dashboard/jobs?status=failed"),
        Some(&cookie),
    )
    .await;
    assert!(none.contains("No job matches"));
    let (status, bad, _) = page(
        &http,
        &format!("{base}/v1/dashboard/jobs?since=yesterday"),
        Some(&cookie),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        bad.contains("since: &#x27;yesterday&#x27; is not a time"),
        "{bad}"
    );

    let job_url = format!("{base}/v1/dashboard/jobs/{}", queued.id);
    let (_, html, _) = page(&http, &job_url, Some(&cookie)).await;
    assert!(
        html.contains("feedback 1") && html.contains("Write a haiku"),
        "the samples are shown"
    );
    let token = csrf(&html);

    // Without the token, or with another browser's, nothing happens.
    let cancel = format!("{job_url}/cancel");
    let r = post_form(&http, &cancel, &cookie, &[]).await;
    assert_eq!(r.status(), 403);
    let r = post_form(
        &http,
        &cancel,
        "claas_csrf=someone-else",
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(r.status(), 403);
    let j = db
        .store
        .get_job(queued.id)
        .await
        .expect("get")
        .expect("job");
    assert_eq!(j.status, JobStatus::Queued);

    let r = post_form(&http, &cancel, &cookie, &[("csrf", &token)]).await;
    assert_eq!(r.status(), 303);
    let j = db
        .store
        .get_job(queued.id)
        .await
        .expect("get")
        .expect("job");
    assert_eq!(j.status, JobStatus::Cancelled);
    let events = db.store.job_events(queued.id).await.expect("events");
    assert_eq!(
        events.last().map(|e| e.message.as_str()),
        Some("cancel by open API from the dashboard")
    );
    let audit = db.store.recent_audit(5).await.expect("audit");
    assert_eq!(
        (audit[0].action.as_str(), audit[0].job_id),
        ("cancel", Some(queued.id))
    );

    // Cancelling again is a conflict, shown as a page.
    let r = post_form(&http, &cancel, &cookie, &[("csrf", &token)]).await;
    assert_eq!(r.status(), 409);
    assert!(r
        .text()
        .await
        .expect("body")
        .contains("can no longer be cancelled"));

    let (status, lora_page, _) = page(
        &http,
        &format!("{base}/v1/dashboard/loras/team/a"),
        Some(&cookie),
    )
    .await;
    assert_eq!(status, 200);
    // Templates escape '/' too: `team/a` is `team&#x2f;a` in the HTML.
    assert!(lora_page.contains("LoRA team&#x2f;a"), "{lora_page}");
    assert!(lora_page.contains(&queued.id.to_string()));
    let (status, _, _) = page(
        &http,
        &format!("{base}/v1/dashboard/loras/nobody"),
        Some(&cookie),
    )
    .await;
    assert_eq!(status, 404);
}

async fn retry_and_delete_are_recorded(db: &TestDb) {
    let dir = claas_testutil::tempdir("dashboard");
    db.store.create_lora(&lora("a")).await.expect("lora");
    let j = job("a", 1);
    db.store.enqueue(&j).await.expect("enqueue");
    let failed = fail_next(db).await;
    assert_eq!(failed, j.id);
    let base = common::serve(AppState::new(db.store.clone(), common::options(&dir))).await;
    let http = client();
    let url = format!("{base}/v1/dashboard/jobs/{failed}");
    let (_, html, nonce) = page(&http, &url, None).await;
    let cookie = nonce.expect("nonce");
    assert!(html.contains("invalid_input: response is empty"));
    assert!(html.contains(r#"id="retry""#) && !html.contains(r#"id="cancel""#));
    let token = csrf(&html);

    let r = post_form(&http, &format!("{url}/retry"), &cookie, &[("csrf", &token)]).await;
    assert_eq!(r.status(), 303);
    let now = db.store.get_job(failed).await.expect("get").expect("job");
    assert_eq!((now.status, now.attempt), (JobStatus::Queued, 0));
    // Deleting a queued job is refused; once it failed again, it goes.
    let r = post_form(
        &http,
        &format!("{url}/delete"),
        &cookie,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(r.status(), 409);
    assert_eq!(fail_next(db).await, failed);
    let r = post_form(
        &http,
        &format!("{url}/delete"),
        &cookie,
        &[("csrf", &token)],
    )
    .await;
    assert_eq!(r.status(), 303);
    assert!(db.store.get_job(failed).await.expect("get").is_none());
    let audit = db.store.recent_audit(5).await.expect("audit");
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(actions, ["delete", "retry"]);
    assert!(
        audit[0].detail.contains("failed job of LoRA a"),
        "{}",
        audit[0].detail
    );
    let (_, overview, _) = page(&http, &format!("{base}/v1/dashboard"), Some(&cookie)).await;
    assert!(overview.contains("deleted by open API from the dashboard"));
}

async fn with_keys_on_only_admins_get_in(db: &TestDb) {
    let dir = claas_testutil::tempdir("dashboard");
    let (_, admin) = common::create_key(db, "ops", &[], true).await;
    let (_, tenant) = common::create_key(db, "alice", &["alice"], false).await;
    let state = AppState::new(db.store.clone(), common::options(&dir))
        .with_auth(Auth::new(None, None, 0))
        .with_session_secret(Some("test secret"));
    let base = common::serve(state).await;
    let http = client();
    let dash = format!("{base}/v1/dashboard");

    // A browser without a session is sent to the login form.
    let r = http.get(&dash).send().await.expect("get");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/v1/dashboard/login");
    let r = http
        .post(format!("{dash}/jobs/{}/cancel", uuid::Uuid::now_v7()))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    // Bearer keys: an admin gets in, a tenant does not.
    let r = http
        .get(&dash)
        .bearer_auth(&admin)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let r = http
        .get(&dash)
        .bearer_auth(&tenant)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403);

    let (status, form, nonce) = page(&http, &format!("{dash}/login"), None).await;
    assert_eq!(status, 200);
    let nonce = nonce.expect("the login form sets the nonce cookie");
    let token = csrf(&form);
    let login = format!("{dash}/login");
    type Form<'a> = &'a [(&'a str, &'a str)];
    let refused: [(Form, u16, &str); 3] = [
        (&[("key", &admin)], 403, "a login needs the CSRF token too"),
        (
            &[("key", &tenant), ("csrf", &token)],
            403,
            "a tenant key is no admin",
        ),
        (
            &[("key", "claas_wrong"), ("csrf", &token)],
            401,
            "an unknown key",
        ),
    ];
    for (form, want, why) in refused {
        let r = post_form(&http, &login, &nonce, form).await;
        assert_eq!(r.status(), want, "{why}");
        assert!(
            set_cookie(&r, "claas_session").is_none(),
            "{why}: no session"
        );
    }
    let r = post_form(&http, &login, &nonce, &[("key", &admin), ("csrf", &token)]).await;
    assert_eq!(r.status(), 303);
    let (session, attrs) = set_cookie(&r, "claas_session").expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/;", "Max-Age=43200"] {
        assert!(attrs.contains(attr), "{attrs} lacks {attr}");
    }
    assert!(
        !session.contains(&admin),
        "the cookie never carries the key"
    );
    assert!(
        !session.contains(&claas_api::auth::secret_hash(&admin)),
        "nor the key's SHA-256"
    );
    let (status, html, _) = page(&http, &dash, Some(&session)).await;
    assert_eq!(status, 200);
    assert!(html.contains("ops"), "the page says who is logged in");
    // The eval runs are admin pages too, reached with the same login.
    let (status, _, _) = page(&http, &format!("{base}/v1/eval"), Some(&session)).await;
    assert_eq!(status, 200, "the session opens /v1/eval");
    let r = http
        .get(format!("{base}/v1/eval"))
        .bearer_auth(&tenant)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 403, "a tenant key reads no eval run");

    // A tampered cookie, or one signed by another secret, is no session.
    let last = if session.ends_with('0') { '1' } else { '0' };
    let tampered = format!("{}{last}", &session[..session.len() - 1]);
    let r = http
        .get(&dash)
        .header("cookie", tampered)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 303);

    // Logging out needs the page's token and ends the cookie.
    let r = post_form(
        &http,
        &format!("{dash}/logout"),
        &session,
        &[("csrf", &csrf(&html))],
    )
    .await;
    assert_eq!(r.status(), 303);
    let (_, attrs) = set_cookie(&r, "claas_session").expect("cleared");
    assert!(attrs.contains("Max-Age=0"));
}

async fn failed_logins_are_throttled_per_address(db: &TestDb) {
    let dir = claas_testutil::tempdir("dashboard");
    let (_, admin) = common::create_key(db, "ops", &[], true).await;
    let state = AppState::new(db.store.clone(), common::options(&dir))
        .with_auth(Auth::new(None, None, 0))
        .with_session_secret(Some("test secret"));
    let base = common::serve(state).await;
    let http = client();
    let login = format!("{base}/v1/dashboard/login");
    let (_, form, nonce) = page(&http, &login, None).await;
    let nonce = nonce.expect("the login form sets the nonce cookie");
    let token = csrf(&form);
    for n in 0..10 {
        let wrong = format!("claas_guess{n}");
        let r = post_form(&http, &login, &nonce, &[("key", &wrong), ("csrf", &token)]).await;
        assert_eq!(r.status(), 401, "guess {n}");
    }
    // Now even the right key waits: the guesser cannot tell which guess was right.
    let r = post_form(&http, &login, &nonce, &[("key", &admin), ("csrf", &token)]).await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!(wait > 0 && wait <= 900, "{wait}");
    // Bearer keys on the API are not login attempts and are not throttled.
    let r = http
        .get(format!("{base}/v1/dashboard"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
}

/// The job page shows the trainer's `teacher_scored_texts` (each sample's teacher prompt
/// as rendered, then its response), escaped.
async fn a_trained_jobs_page_shows_what_the_teacher_scored(db: &TestDb) {
    let dir = claas_testutil::tempdir("dashboard");
    db.store.create_lora(&lora("team/t")).await.expect("lora");
    db.store.enqueue(&job("team/t", 1)).await.expect("enqueue");
    let c = common::claim_one(&db.store, TEST_BASE_MODEL).await;
    let scored = "<|im_start|>user\nExplain recursion\n\nFeedback: too long<|im_end|>";
    let result = serde_json::json!({"version": 1, "batch_size": 1,
        "metrics": {"distill_loss": 0.5, "teacher_scored_texts": [scored]}});
    assert!(db
        .store
        .complete(&c.lease(), &result, None)
        .await
        .expect("complete"));
    let base = common::serve(AppState::new(db.store.clone(), common::options(&dir))).await;
    let url = format!("{base}/v1/dashboard/jobs/{}", c.job.id);
    let (status, html, _) = page(&client(), &url, None).await;
    assert_eq!(status, 200);
    assert!(html.contains("Teacher scored text"), "{html}");
    assert!(
        html.contains("<td>distill_loss</td><td class=\"num\">0.500000</td>"),
        "the step's metrics are shown: {html}"
    );
    assert!(
        html.contains("&lt;|im_start|&gt;user\nExplain recursion"),
        "the text, escaped: {html}"
    );
}
