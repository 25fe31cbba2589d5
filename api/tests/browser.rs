//! The dashboard in a real browser (Debian's headless chromium through chromedriver, given
//! by `CLAAS_TEST_CHROMEDRIVER`; `make test` installs both): an admin logs in with the
//! form, opens a queued job, clicks Cancel, and the job's row and its new timeline entry
//! are checked in the database; the same POST without the CSRF token gets 403. Saves
//! screenshots under `target/dashboard-*.png`.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use claas_api::auth::Auth;
use claas_api::AppState;
use claas_core::testing::{job, lora, TestDb};
use claas_core::types::JobStatus;
use fantoccini::{ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts chromedriver on a free port; `None` when the tests were not given one.
async fn chromedriver() -> Option<(Driver, String)> {
    let Ok(path) = std::env::var("CLAAS_TEST_CHROMEDRIVER") else {
        eprintln!("CLAAS_TEST_CHROMEDRIVER is not set (make test sets it): browser test skipped");
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver(child);
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if reqwest::get(format!("{url}/status")).await.is_ok() {
            return Some((driver, url));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not answer on {url}");
}

fn screenshot_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(format!("dashboard-{name}.png"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_cancels_a_job_in_a_real_browser() {
    let dir = claas_testutil::tempdir("browser");
    let Some((_driver, webdriver)) = chromedriver().await else {
        return;
    };
    let db = TestDb::postgres().await;
    db.store
        .create_lora(&lora("team/assistant"))
        .await
        .expect("lora");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let j = job("team/assistant", 2);
        db.store.enqueue(&j).await.expect("enqueue");
        ids.push(j.id);
    }
    let target = ids[1];
    let admin = "claas_browser_test_admin_key";
    let state = AppState::new(db.store.clone(), common::options(&dir))
        .with_auth(Auth::new(Some(admin.into()), None, 0))
        .with_session_secret(Some("browser test"));
    let base = common::serve(state).await;

    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1280,900"]}),
    );
    let browser = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&webdriver)
        .await
        .expect("a chromium session");

    // Not logged in: the dashboard sends the browser to the login form.
    browser
        .goto(&format!("{base}/v1/dashboard"))
        .await
        .expect("goto");
    assert_eq!(
        browser.current_url().await.expect("url").path(),
        "/v1/dashboard/login"
    );
    let key_field = browser
        .find(Locator::Css("input[name=key]"))
        .await
        .expect("key field");
    key_field.send_keys(admin).await.expect("type");
    browser
        .find(Locator::Css("form[action='/v1/dashboard/login'] button"))
        .await
        .expect("log in button")
        .click()
        .await
        .expect("submit");
    browser
        .wait()
        .for_element(Locator::Id("queued"))
        .await
        .expect("the overview after login");
    let queued = browser
        .find(Locator::Id("queued"))
        .await
        .expect("count")
        .text()
        .await
        .expect("text");
    assert_eq!(queued, "3");
    std::fs::write(
        screenshot_path("overview"),
        browser.screenshot().await.expect("shot"),
    )
    .expect("save screenshot");

    // The jobs page lists the job; its page has the Cancel button.
    browser
        .goto(&format!("{base}/v1/dashboard/jobs?status=queued"))
        .await
        .expect("goto");
    let link = browser
        .find(Locator::Css(&format!(
            "a[href='/v1/dashboard/jobs/{target}']"
        )))
        .await
        .expect("the job's row");
    link.click().await.expect("open the job");
    browser
        .wait()
        .for_element(Locator::Id("cancel"))
        .await
        .expect("cancel button")
        .click()
        .await
        .expect("click cancel");
    // The POST redirects back to the job's page, which now says cancelled.
    let mut shown = String::new();
    for _ in 0..50 {
        if let Ok(e) = browser.find(Locator::Id("status")).await {
            shown = e.text().await.unwrap_or_default();
            if shown.starts_with("cancelled") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(shown.starts_with("cancelled"), "the page shows {shown:?}");
    std::fs::write(
        screenshot_path("job"),
        browser.screenshot().await.expect("shot"),
    )
    .expect("save screenshot");

    let row = db.store.get_job(target).await.expect("get").expect("job");
    assert_eq!(row.status, JobStatus::Cancelled);
    let events = db.store.job_events(target).await.expect("events");
    assert_eq!(
        events.last().map(|e| e.message.as_str()),
        Some("cancel by bootstrap from the dashboard")
    );
    let others = [ids[0], ids[2]];
    for id in others {
        let j = db.store.get_job(id).await.expect("get").expect("job");
        assert_eq!(
            j.status,
            JobStatus::Queued,
            "only the clicked job is cancelled"
        );
    }

    // The same POST, from the same logged-in browser, without the CSRF token: 403.
    let status = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch(arguments[0], {method: 'POST', body: new URLSearchParams()})
               .then(r => done(r.status), e => done(String(e)));",
            vec![json!(format!("/v1/dashboard/jobs/{}/cancel", ids[0]))],
        )
        .await
        .expect("fetch");
    assert_eq!(status, json!(403));
    let j = db.store.get_job(ids[0]).await.expect("get").expect("job");
    assert_eq!(j.status, JobStatus::Queued);

    browser.close().await.expect("close");
    db.cleanup().await;
}
