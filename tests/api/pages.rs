//! Every public page Rapport shows a customer (survey before and after scoring, unsubscribe and
//! back, expired and tampered links) in each of the five languages: valid HTML, in the
//! reader's language, under the company's name, with no English left in a translation, no
//! placeholder left unfilled, every control labelled, and nothing loaded from elsewhere.

use crate::common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{Resp, TestApp, TestTenant};
use rapport::domain::TenantId;
use rapport::http::pages::words;
use rapport::signing::{Claims, Purpose};
use scraper::{Html, Selector};
use serde_json::json;

const LOCALES: [&str; 5] = ["en", "hr", "sl", "hu", "pl"];

/// One page as a customer meets it.
struct Shown {
    name: &'static str,
    path: String,
    resp: Resp,
}

fn get(path: &str, locale: &str) -> Request<Body> {
    Request::get(path)
        .header("accept-language", format!("{locale};q=0.9,en;q=0.1"))
        .body(Body::empty())
        .unwrap()
}

fn post(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body.to_owned()))
        .unwrap()
}

/// Walks through every page, in `locale`, for a contact who speaks it.
async fn every_page(app: &TestApp, t: &TestTenant, locale: &'static str) -> Vec<Shown> {
    let who = format!("c-{locale}");
    app.contact(
        t,
        &who,
        json!({"first_name": "Ana", "email": format!("{who}@example.com"), "locale": locale,
               "consents": {"email": {"marketing": "opted_in"}}}),
    )
    .await;
    let tk = app
        .post(
            "/v1/tickets",
            &t.key,
            json!({"contact": {"external_id": who}, "channel": "email",
                   "subject": "Kartica 4471 <b>blokirana</b>", "body": "x"}),
        )
        .await;
    assert_eq!(tk.status, StatusCode::CREATED, "{}", tk.text);
    let tenant = TenantId(t.id.parse().unwrap());
    let ticket = tk.body["id"].as_str().unwrap().parse().unwrap();
    let signer = app.app.state.links.get(&app.pool).await.unwrap();
    let survey = rapport::messages::links::survey_url(signer, "", tenant, ticket);
    let expired = format!(
        "/s/{}",
        signer.token(Claims {
            expires: 1,
            ..Claims::new(Purpose::Survey, tenant.0, ticket, 0)
        })
    );
    let mut tampered = survey.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });

    let offer = app
        .post(
            "/v1/messages",
            &t.key,
            json!({"contact": {"external_id": who}, "template": "offer"}),
        )
        .await;
    assert_eq!(offer.body["status"], "queued", "{}", offer.text);
    let message = offer.body["id"].as_str().unwrap().parse().unwrap();
    let unsubscribe =
        rapport::messages::links::Links::new(signer, "", tenant, message).unsubscribe();

    let mut shown = Vec::new();
    let steps: Vec<(&'static str, Request<Body>)> = vec![
        ("survey", get(&survey, locale)),
        ("survey without a score", post(&survey, "comment=Sporo")),
        ("thanks, asking for a comment", post(&survey, "score=4")),
        ("already rated", get(&survey, locale)),
        ("thanks for the comment", post(&survey, "comment=Hvala")),
        ("a second score", post(&survey, "score=5")),
        ("expired survey", get(&expired, locale)),
        ("tampered survey", get(&tampered, locale)),
        ("unsubscribe", get(&unsubscribe, locale)),
        ("unsubscribed", post(&unsubscribe, "action=unsubscribe")),
        ("already unsubscribed", get(&unsubscribe, locale)),
        ("resubscribed", post(&unsubscribe, "action=resubscribe")),
        ("tampered unsubscribe", get("/u/garbage", locale)),
    ];
    for (name, request) in steps {
        let path = request.uri().path().to_owned();
        let resp = app.send(request).await;
        shown.push(Shown { name, path, resp });
    }
    shown
}

async fn setup(app: &TestApp) -> TestTenant {
    let t = app.tenant("acme").await;
    app.put(
        "/v1/templates/offer",
        &t.key,
        json!({"purpose": "marketing", "email": {"en": {"subject": "Offer", "text": "{{ unsubscribe_url }}"}}}),
    )
    .await;
    t
}

fn text_of(doc: &Html) -> String {
    let body = Selector::parse("body").unwrap();
    doc.select(&body)
        .flat_map(|b| b.text())
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn every_page_in_every_language_is_valid_complete_and_self_contained() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let expected_status = [
        ("survey", 200),
        ("survey without a score", 422),
        ("thanks, asking for a comment", 200),
        ("already rated", 200),
        ("thanks for the comment", 200),
        ("a second score", 409),
        ("expired survey", 410),
        ("tampered survey", 404),
        ("unsubscribe", 200),
        ("unsubscribed", 200),
        ("already unsubscribed", 200),
        ("resubscribed", 200),
        ("tampered unsubscribe", 404),
    ];
    let english = words::EN.sentences();
    // The parser does report what a browser would have to repair.
    assert!(
        !Html::parse_document("<!DOCTYPE html><p><b>x</p></i>")
            .errors
            .is_empty()
    );
    for locale in LOCALES {
        let ours = rapport::http::pages::for_locale(locale);
        for page in every_page(&app, &t, locale).await {
            let what = format!("{} ({locale}, {})", page.name, page.path);
            let r = &page.resp;
            let status = expected_status
                .iter()
                .find(|(n, _)| *n == page.name)
                .unwrap()
                .1;
            assert_eq!(r.status.as_u16(), status, "{what}: {}", r.text);
            assert_eq!(r.content_type(), "text/html; charset=utf-8", "{what}");
            let csp = r.headers["content-security-policy"].to_str().unwrap();
            assert!(csp.starts_with("default-src 'none';"), "{what}: {csp}");
            assert!(csp.contains("img-src 'none'"), "{what}: no logo, no image");
            assert_eq!(r.headers["referrer-policy"], "no-referrer", "{what}");

            let doc = Html::parse_document(&r.text);
            assert!(
                doc.errors.is_empty(),
                "{what}: {:?}\n{}",
                doc.errors,
                r.text
            );
            let html = doc.root_element();
            assert_eq!(html.value().attr("lang"), Some(locale), "{what}");
            let title = Selector::parse("title").unwrap();
            let h1 = Selector::parse("h1").unwrap();
            assert!(
                doc.select(&title).next().is_some_and(|t| !t
                    .text()
                    .collect::<String>()
                    .trim()
                    .is_empty()),
                "{what}"
            );
            assert_eq!(doc.select(&h1).count(), 1, "{what}");

            let text = text_of(&doc);
            assert!(
                !text.contains('{') && !text.contains('}'),
                "{what}: a placeholder is left: {text}"
            );
            assert!(!r.text.contains("<b>"), "{what}: the subject is escaped");
            if locale != "en" {
                for s in &english {
                    assert!(!text.contains(s), "{what}: English left: {s:?}");
                }
            }
            let branded = !page.name.starts_with("tampered");
            assert_eq!(text.contains("Tenant acme"), branded, "{what}: {text}");
            if page.name.starts_with("survey") || page.name == "already rated" {
                assert!(text.contains("#"), "{what}: the ticket's number");
                assert!(
                    text.contains("Kartica 4471"),
                    "{what}: the ticket's subject"
                );
            }
            if page.name == "survey" {
                // The question, and what 1 and 5 mean, in words.
                assert!(text.contains(ours.question), "{what}");
                assert!(text.contains(ours.scores[0]), "{what}");
                assert!(text.contains(ours.scores[4]), "{what}");
            }
            if page.name == "survey without a score" {
                let kept = Selector::parse("textarea#comment").unwrap();
                let comment: String = doc.select(&kept).flat_map(|e| e.text()).collect();
                assert_eq!(comment, "Sporo", "{what}: the comment typed first is kept");
                assert!(text.contains(ours.choose), "{what}");
            }

            // Every control has a label a screen reader reads out.
            let controls = Selector::parse("input:not([type=hidden]), textarea").unwrap();
            for control in doc.select(&controls) {
                let in_label = control
                    .ancestors()
                    .filter_map(scraper::ElementRef::wrap)
                    .any(|a| a.value().name() == "label");
                let by_for = control.value().id().is_some_and(|id| {
                    let s = Selector::parse(&format!("label[for={id}]")).unwrap();
                    doc.select(&s).next().is_some()
                });
                assert!(in_label || by_for, "{what}: an unlabelled control");
            }
            // Nothing is fetched from anywhere: no script, no stylesheet link, no image.
            let external = Selector::parse("script, link, img, iframe, object, embed").unwrap();
            assert_eq!(doc.select(&external).count(), 0, "{what}");
        }
    }
}

#[tokio::test]
async fn a_logo_is_the_one_thing_a_page_may_load_and_only_over_https() {
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let r = app
        .put(
            "/v1/settings",
            &t.key,
            json!({"logo_url": "http://cdn.acme.example/logo.png"}),
        )
        .await;
    r.assert_problem(422);
    assert_eq!(r.error_fields(), ["logo_url"]);
    let r = app
        .put(
            "/v1/settings",
            &t.key,
            json!({"logo_url": "https://cdn.acme.example:8443/brand/logo.png?v=2"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let pages = every_page(&app, &t, "hr").await;
    let survey = &pages[0].resp;
    let csp = survey.headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("img-src https://cdn.acme.example:8443;"),
        "{csp}"
    );
    let doc = Html::parse_document(&survey.text);
    let img = Selector::parse("header img").unwrap();
    let logo = doc.select(&img).next().expect("the logo");
    assert_eq!(
        logo.value().attr("src"),
        Some("https://cdn.acme.example:8443/brand/logo.png?v=2")
    );
    assert_eq!(
        logo.value().attr("alt"),
        Some(""),
        "the name is written beside it"
    );
}

/// The browser for the screenshot check: `RAPPORT_CHROMIUM`, else `chromium` on the PATH
/// (Debian's package, which `.ci/run` installs).
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("RAPPORT_CHROMIUM") {
        return Some(bin.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|b| dir.join(b)))
        .find(|p| p.is_file())
}

/// Opens `url` in headless Chromium at `width` x 900 with a browser in `locale`, saves the
/// screenshot to `png`, and returns every URL the page itself asked for, from Chromium's own
/// network log (the browser's background requests, which no page makes, are left out).
async fn shoot(
    bin: &std::path::Path,
    url: &str,
    width: u32,
    locale: &str,
    png: &std::path::Path,
) -> Vec<String> {
    let dir = tempfile_dir();
    let netlog = dir.join("net.json");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(90),
        tokio::process::Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-features=AutofillServerCommunication",
                "--hide-scrollbars",
                &format!("--accept-lang={locale}"),
                &format!("--user-data-dir={}", dir.join("profile").display()),
                &format!("--window-size={width},900"),
                &format!("--screenshot={}", png.display()),
                &format!("--log-net-log={}", netlog.display()),
                url,
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finishes within 90 s")
    .expect("chromium runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&netlog).unwrap()).expect("a complete net log");
    let start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].clone();
    let asked: Vec<String> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == start_job)
        // The page's own: its document, and what it (or a document it leads to) asks for.
        // The browser's features (autofill, updates) come from "not an origin".
        .filter(|e| {
            e["params"]["request_type"] == "main frame"
                || e["params"]["initiator"]
                    .as_str()
                    .is_some_and(|i| i != "not an origin")
        })
        .filter_map(|e| e["params"]["url"].as_str().map(str::to_owned))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    asked
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rapport-chromium-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The width and height a PNG says it has.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

/// Every page a customer can open from a link, in every language on a phone (390 px) and in
/// the longest-worded one (Hungarian) on a desktop (1280 px), rendered by a real browser that
/// asks for nothing but the page itself. The screenshots stay in
/// `target/page-screenshots/` to be looked at.
#[tokio::test]
async fn every_page_renders_in_headless_chromium_with_no_outside_request() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs Chromium for the page screenshots (.ci/run installs Debian's `chromium`)"
        );
        eprintln!("skipped: no chromium on the PATH (apt-get install chromium)");
        return;
    };
    let app = TestApp::new().await;
    let t = setup(&app).await;
    let (addr, stop) = app.serve().await;
    let base = format!("http://{addr}");
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/page-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let tenant = TenantId(t.id.parse().unwrap());
    let signer = app.app.state.links.get(&app.pool).await.unwrap().clone();
    for locale in LOCALES {
        let who = format!("b-{locale}");
        app.contact(
            &t,
            &who,
            json!({"email": format!("{who}@example.com"), "locale": locale,
                   "consents": {"email": {"marketing": "opted_in"}}}),
        )
        .await;
        let mut tickets = Vec::new();
        for subject in ["Kartica 4471 je blokirana nakon plaćanja", "Rata"] {
            let tk = app
                .post(
                    "/v1/tickets",
                    &t.key,
                    json!({"contact": {"external_id": who}, "channel": "email",
                           "subject": subject, "body": "x"}),
                )
                .await;
            tickets.push(tk.body["id"].as_str().unwrap().parse().unwrap());
        }
        let survey = rapport::messages::links::survey_url(&signer, "", tenant, tickets[0]);
        let rated = rapport::messages::links::survey_url(&signer, "", tenant, tickets[1]);
        assert_eq!(
            app.send(post(&rated, "score=2")).await.status,
            StatusCode::OK
        );
        let expired = format!(
            "/s/{}",
            signer.token(Claims {
                expires: 1,
                ..Claims::new(Purpose::Survey, tenant.0, tickets[0], 0)
            })
        );
        let offer = app
            .post(
                "/v1/messages",
                &t.key,
                json!({"contact": {"external_id": who}, "template": "offer"}),
            )
            .await;
        let message = offer.body["id"].as_str().unwrap().parse().unwrap();
        let unsubscribe =
            rapport::messages::links::Links::new(&signer, "", tenant, message).unsubscribe();

        let pages: [(&str, &str); 6] = [
            ("survey", &survey),
            ("survey-rated", &rated),
            ("survey-expired", &expired),
            ("link-invalid", "/s/not-a-valid-token"),
            ("unsubscribe", &unsubscribe),
            ("unsubscribed", &unsubscribe),
        ];
        for (name, path) in pages {
            if name == "unsubscribed" {
                let r = app.send(post(&unsubscribe, "action=unsubscribe")).await;
                assert_eq!(r.status, StatusCode::OK);
            }
            let widths: &[u32] = if locale == "hu" { &[390, 1280] } else { &[390] };
            for &width in widths {
                let png = shots.join(format!("{name}-{locale}-{width}.png"));
                let url = format!("{base}{path}");
                let asked = shoot(&bin, &url, width, locale, &png).await;
                assert!(asked.contains(&url), "{name} {locale}: {asked:?}");
                for u in &asked {
                    assert!(
                        u.starts_with(&base),
                        "{name} {locale} {width}: the page asked for {u}"
                    );
                }
                let bytes = std::fs::read(&png).unwrap();
                assert_eq!(png_size(&bytes), (width, 900), "{name} {locale}");
                // A blank page compresses to a few hundred bytes; text and a card do not.
                assert!(
                    bytes.len() > 6_000,
                    "{name} {locale} {width}: {} bytes, nothing drawn?",
                    bytes.len()
                );
            }
        }
    }
    stop.cancel();
}
