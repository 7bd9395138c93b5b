//! The monitoring dashboard, the subject views and the web page: numbers
//! that add up to what the FHIR API and `/queries` show, site scoping, a
//! slow section that makes the answer partial but on time, and the page in
//! a real headless Chromium.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{trial_id, TestApp, PROTOCOL_YAML, SUBJECTS_CSV};

engine_tests!(
    the_dashboard_adds_up_to_what_is_stored,
    a_site_users_dashboard_counts_only_its_site,
    a_slow_section_makes_the_answer_partial_but_on_time with super::slow_visits,
    the_subject_page_shows_the_latest_values_and_marks_the_out_of_range,
    only_staff_see_dashboards,
);

fn slow_visits(c: &mut clinflow_server::Config) {
    c.dashboard_section_timeout = Duration::from_millis(300);
    c.dashboard_section_delay
        .insert("visits".into(), Duration::from_secs(60));
}

/// The demo data set, small: every section has something to count.
async fn load_demo(app: &TestApp) {
    clinflow_server::demo::load_demo(
        &app.state,
        PROTOCOL_YAML,
        SUBJECTS_CSV,
        7,
        clinflow_server::demo::DemoSize {
            subjects: 45,
            recent_days: 4,
        },
    )
    .await
    .expect("the demo data loads");
}

async fn dashboard(app: &TestApp, token: &str) -> Value {
    let r = app
        .get(&format!("/trials/{}/dashboard", trial_id()), token)
        .await;
    r.expect(200);
    r.json()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("a count, not {v}"))
}

fn sum<'a>(vs: impl IntoIterator<Item = &'a Value>) -> u64 {
    vs.into_iter().map(n).sum()
}

/// Open data queries per site, as `/queries` lists them.
async fn open_queries(app: &TestApp, token: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut path = "/queries?status=open&count=500".to_string();
    loop {
        let page = app.get(&path, token).await;
        page.expect(200);
        let page = page.json();
        for q in page["items"].as_array().unwrap() {
            *out.entry(q["site"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        match page["next"].as_str() {
            Some(c) => path = format!("/queries?status=open&count=500&cursor={c}"),
            None => break,
        }
    }
    out
}

async fn the_dashboard_adds_up_to_what_is_stored(app: TestApp) {
    load_demo(&app).await;
    let monitor = app.token("monitor", None, None).await;
    let d = dashboard(&app, &monitor).await;
    assert_eq!(d["partial"], false, "{d}");
    let s = &d["sections"];
    for name in clinflow_server::dashboard::SECTIONS {
        assert_eq!(s[name]["status"], "ok", "{name}: {}", s[name]);
    }

    let e = &s["enrolment"];
    let subjects = app.count(&monitor, "ResearchSubject").await;
    assert_eq!(n(&e["total"]), subjects);
    assert_eq!(
        sum(e["by_site"].as_array().unwrap().iter().map(|x| &x["total"])),
        subjects
    );
    assert_eq!(sum(e["by_arm"].as_object().unwrap().values()), subjects);
    let weekly = e["weekly"].as_array().unwrap();
    assert_eq!(n(&weekly.last().unwrap()["cumulative"]), subjects);
    assert_eq!(sum(weekly.iter().map(|w| &w["enrolled"])), subjects);
    let trial = app
        .get(&format!("/trials/{}", trial_id()), &monitor)
        .await
        .json();
    assert_eq!(e["target"], trial["protocol"]["enrolment"]["target"]);
    assert!(e["target"].is_u64());

    let a = &s["adverse_events"];
    let events = app.count(&monitor, "AdverseEvent").await;
    assert!(events > 0);
    assert_eq!(n(&a["total"]), events);
    assert_eq!(sum(a["by_severity"].as_object().unwrap().values()), events);
    assert_eq!(
        sum(a["by_seriousness"].as_object().unwrap().values()),
        events
    );
    let limit = a["serious_report_hours"].as_f64().unwrap();
    for late in a["serious_late"].as_array().unwrap() {
        assert!(late["hours"].as_f64().unwrap() > limit, "{late}");
    }

    let v = &s["visits"];
    let visits_per_subject = crate::helpers::protocol().visits.len() as u64;
    let all_states = sum(v["by_visit"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|c| c.as_object().unwrap().values()));
    assert_eq!(all_states, subjects * visits_per_subject);
    for state in ["upcoming", "overdue", "missed"] {
        let counted = sum(v["by_visit"]
            .as_object()
            .unwrap()
            .values()
            .map(|c| &c[state]));
        assert_eq!(n(&v["totals"][state]), counted, "{state}");
    }
    let today = v["today"].as_str().unwrap();
    for u in v["upcoming"].as_array().unwrap() {
        assert!(u["due"].as_str().unwrap() >= today, "{u}");
    }
    for o in v["missed"].as_array().unwrap() {
        assert!(o["window"][1].as_str().unwrap() < today, "{o}");
    }

    let q = &s["data_quality"];
    let open = open_queries(&app, &monitor).await;
    assert_eq!(n(&q["open_queries"]), open.values().sum::<u64>());
    for site in q["open_queries_by_site"].as_array().unwrap() {
        let id = site["site"].as_str().unwrap();
        assert_eq!(n(&site["open"]), open.get(id).copied().unwrap_or(0), "{id}");
    }
    let stages: Vec<_> = s["ingest"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["stage"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(stages, ["map", "persist"]);
}

async fn a_site_users_dashboard_counts_only_its_site(app: TestApp) {
    load_demo(&app).await;
    let monitor = app.token("monitor", None, None).await;
    let site = crate::helpers::site_ids()[1].clone();
    let user = app.token("site-user", Some(&site), None).await;
    let all = dashboard(&app, &monitor).await;
    let own = dashboard(&app, &user).await;
    let (all, own) = (&all["sections"], &own["sections"]);
    let by_site = all["enrolment"]["by_site"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["site"] == site.as_str())
        .expect("the site in the monitor's view")
        .clone();
    assert_eq!(own["enrolment"]["total"], by_site["total"]);
    assert_eq!(own["enrolment"]["by_site"].as_array().unwrap().len(), 1);
    assert!(own["enrolment"]["target"].is_null());
    assert!(n(&own["enrolment"]["total"]) < n(&all["enrolment"]["total"]));
    // The site's adverse events are the ones the site user can search.
    assert_eq!(
        n(&own["adverse_events"]["total"]),
        app.count(&user, "AdverseEvent").await
    );
    for list in ["upcoming", "overdue", "missed"] {
        for v in own["visits"][list].as_array().unwrap() {
            assert_eq!(v["site"], site.as_str(), "{v}");
        }
    }
    for late in own["adverse_events"]["serious_late"].as_array().unwrap() {
        assert_eq!(late["site"], site.as_str());
    }
    let open = open_queries(&app, &monitor).await;
    assert_eq!(
        n(&own["data_quality"]["open_queries"]),
        open.get(&site).copied().unwrap_or(0)
    );
    // Its subject list is its own site's too.
    let list = app
        .get(&format!("/trials/{}/subjects", trial_id()), &user)
        .await
        .json();
    assert_eq!(list["total"], by_site["total"]);
    assert!(list["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["site"] == site.as_str()));
}

async fn a_slow_section_makes_the_answer_partial_but_on_time(app: TestApp) {
    load_demo(&app).await;
    let monitor = app.token("monitor", None, None).await;
    let started = Instant::now();
    let d = dashboard(&app, &monitor).await;
    // The visits section is held for 60 s; the answer does not wait for it.
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(d["partial"], true);
    let s = &d["sections"];
    assert_eq!(s["visits"]["status"], "unavailable");
    assert!(
        s["visits"]["reason"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{}",
        s["visits"]
    );
    for name in ["enrolment", "adverse_events", "data_quality", "ingest"] {
        assert_eq!(s[name]["status"], "ok", "{name}");
    }
    assert!(n(&s["enrolment"]["total"]) > 0);
}

async fn the_subject_page_shows_the_latest_values_and_marks_the_out_of_range(app: TestApp) {
    load_demo(&app).await;
    let monitor = app.token("monitor", None, None).await;
    let protocol = crate::helpers::protocol();
    let list = app
        .get(&format!("/trials/{}/subjects", trial_id()), &monitor)
        .await
        .json();
    let mut marked = 0;
    let mut checked = 0;
    for s in list["items"].as_array().unwrap().iter().take(25) {
        let id = s["subject"].as_str().unwrap();
        let r = app
            .get(&format!("/trials/{}/subjects/{id}", trial_id()), &monitor)
            .await;
        r.expect(200);
        let page = r.json();
        assert_eq!(page["site"], s["site"]);
        let patient = page["patient"].as_str().unwrap();
        for v in page["values"].as_array().unwrap() {
            let m = protocol
                .measurements
                .iter()
                .find(|m| m.id == v["measurement"].as_str().unwrap())
                .expect("a protocol measurement");
            // The latest value is the one the FHIR API sorts first.
            let latest = app
                .search(
                    &monitor,
                    "Observation",
                    &format!(
                        "patient={patient}&code=http://loinc.org%7C{}&_sort=-date&_count=1",
                        m.loinc
                    ),
                )
                .await;
            let fhir_value = &latest["entry"][0]["resource"]["valueQuantity"]["value"];
            assert_eq!(v["value"].as_f64(), fhir_value.as_f64(), "{id} {}", m.id);
            let value = v["value"].as_f64().unwrap();
            let expected = m.soft.is_some_and(|r| value < r.low() || value > r.high());
            assert_eq!(v["out_of_range"], expected, "{id} {}: {v}", m.id);
            marked += usize::from(expected);
            checked += 1;
        }
    }
    assert!(
        checked > 0 && marked > 0,
        "{checked} values, {marked} out of range"
    );
    app.get(&format!("/trials/{}/subjects/nobody", trial_id()), &monitor)
        .await
        .problem(404);
}

async fn only_staff_see_dashboards(app: TestApp) {
    app.load_reference_trial().await;
    let path = format!("/trials/{}/dashboard", trial_id());
    let patient = app.token("patient", None, Some("CARDIO-01-0001")).await;
    let interface = app.token("interface", None, None).await;
    app.get(&path, &patient).await.problem(403);
    app.get(&path, &interface).await.problem(403);
    app.get(&path, "nobody").await.problem(401);
    app.get("/trials/NO-SUCH/dashboard", &app.admin)
        .await
        .problem(404);
    // Patient data is not to be kept by any cache.
    let d = app.get(&path, &app.admin).await;
    d.expect(200);
    assert_eq!(d.header("cache-control"), Some("no-store"));
    // The page itself needs no token: it holds no data.
    let page = app.get("/ui/", "").await;
    page.expect(200);
    assert!(page.header("content-security-policy").is_some());
    assert!(page.text.contains("app.js"));
}

/// The web page in a real headless Chromium (tests/ui/dashboard.mjs,
/// playwright-core): signs in, checks the charts and numbers against the
/// JSON API, opens a subject, saves screenshots to target/ui-screenshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_web_page_shows_what_the_api_says() {
    crate::helpers::run_test(crate::helpers::Engine::Sqlite, |_| {}, |app: TestApp| async move {
        load_demo(&app).await;
        let monitor = app.token("monitor", None, None).await;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let modules = root.join("tests/ui/node_modules/playwright-core");
        assert!(
            modules.exists(),
            "playwright-core is not installed: run `npm ci --prefix tests/ui` (scripts/test.sh does)"
        );
        let shots = root.join("target/ui-screenshots");
        let out = tokio::process::Command::new("node")
            .arg(root.join("tests/ui/dashboard.mjs"))
            .env("CLINFLOW_URL", &app.base)
            .env("CLINFLOW_TOKEN", &monitor)
            .env("CLINFLOW_TRIAL", trial_id())
            .env("SCREENSHOT_DIR", &shots)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(180), out)
            .await
            .expect("the browser test finishes within 3 minutes")
            .expect("node runs (Node.js is needed)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "the browser test failed:\n{text}");
        assert!(shots.join("dashboard.png").exists() && shots.join("subject.png").exists());
    })
    .await;
}
