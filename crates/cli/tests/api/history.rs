//! The patient history gateway against real gRPC services in their own
//! processes (`clinflow records serve`, `clinflow billing serve`) on the
//! test's database, the gateway being a second node configured with their
//! URLs.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::helpers::{clinflow_bin, sample, spawn_node_with, TestApp};

/// A history service process; killed when dropped.
struct ServiceProc {
    child: Child,
    addr: SocketAddr,
}

impl ServiceProc {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn metrics(&self, client: &reqwest::Client) -> String {
        let r = client
            .get(format!("http://{}/metrics", self.addr))
            .bearer_auth(TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("the service's /metrics answers");
        assert_eq!(r.status(), 200);
        r.text().await.expect("a body")
    }

    async fn kill(&mut self) {
        self.child.kill().await.expect("the service is killed");
    }
}

const TOKEN: &str = "service-token-for-tests";

/// Starts `clinflow KIND serve` on `listen` with `latency_ms` of injected
/// latency; waits for the line that gives its address.
async fn service(app: &TestApp, kind: &str, latency_ms: u64, listen: &str) -> ServiceProc {
    let mut child = Command::new(clinflow_bin())
        .args([kind, "serve", "--listen", listen, "--fault-latency"])
        .arg(latency_ms.to_string())
        .arg("--database")
        .arg(&app.db_url)
        .env("CLINFLOW_SERVICE_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the clinflow binary starts");
    let stdout = child.stdout.take().expect("its stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the service starts within a minute")
        .expect("its stdout is readable")
        .expect("it prints its address");
    let addr = line
        .rsplit("http://")
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    drain(lines);
    ServiceProc { child, addr }
}

/// Keeps reading a child's stdout so that it never blocks on a full pipe.
fn drain(mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) {
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
}

/// The reference trial and a small demo data set (with billing).
async fn load_data(app: &TestApp) {
    clinflow_server::demo::load_demo(
        &app.state,
        crate::helpers::PROTOCOL_YAML,
        crate::helpers::SUBJECTS_CSV,
        11,
        clinflow_server::demo::DemoSize {
            subjects: 3,
            recent_days: 3,
        },
    )
    .await
    .expect("the demo data loads");
}

/// A patient with records and bills: the subject of the first Invoice.
async fn billed_patient(app: &TestApp) -> String {
    let b = app.search(&app.admin, "Invoice", "_count=1").await;
    b["entry"][0]["resource"]["subject"]["reference"]
        .as_str()
        .and_then(|r| r.strip_prefix("Patient/"))
        .expect("a billed patient")
        .to_string()
}

async fn gateway(app: &TestApp, records: &ServiceProc, billing: &ServiceProc) -> TestApp {
    gateway_with(app, records, billing, |_| {}).await
}

async fn gateway_with(
    app: &TestApp,
    records: &ServiceProc,
    billing: &ServiceProc,
    more: impl FnOnce(&mut clinflow_server::history::HistoryConfig),
) -> TestApp {
    let (r, b) = (records.url(), billing.url());
    spawn_node_with(app, move |c| {
        c.history.records_url = Some(r);
        c.history.billing_url = Some(b);
        c.history.service_token = Some(TOKEN.into());
        more(&mut c.history);
    })
    .await
}

async fn history(
    app: &TestApp,
    patient: &str,
    query: &str,
    timeout_ms: Option<u64>,
) -> crate::helpers::Resp {
    let mut req = app
        .client
        .get(format!("{}/patients/{patient}/history{query}", app.base))
        .bearer_auth(&app.admin);
    if let Some(ms) = timeout_ms {
        req = req.header("X-Request-Timeout", ms.to_string());
    }
    app.send(req).await
}

/// The patient's current `rtype` resources, as the FHIR API lists them.
async fn of_patient(app: &TestApp, rtype: &str, patient: &str) -> Vec<Value> {
    crate::helpers::entries(
        &app.search(
            &app.admin,
            rtype,
            &format!("subject=Patient/{patient}&_count=1000"),
        )
        .await,
    )
}

/// Cents of a FHIR decimal written with at most 2 fraction digits.
fn cents(v: &Value) -> i64 {
    let text = v.to_string();
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let c = int.parse::<i64>().expect("an integer part") * 100
        + format!("{frac:0<2}").parse::<i64>().expect("cents");
    if neg {
        -c
    } else {
        c
    }
}

/// What an invoice adds to a bill: its gross total (else net), unless it
/// is a draft, cancelled or entered in error.
fn billed_cents(invoice: &Value) -> i64 {
    if ["draft", "cancelled", "entered-in-error"]
        .contains(&invoice["status"].as_str().unwrap_or(""))
    {
        return 0;
    }
    let total = if invoice["totalGross"].is_object() {
        &invoice["totalGross"]
    } else {
        &invoice["totalNet"]
    };
    if total.is_object() {
        cents(&total["value"])
    } else {
        0
    }
}

/// Polls a service's metrics (no sleep: each poll is a request) until `f`
/// holds, for at most 10 s.
async fn wait_for_metrics(
    svc: &ServiceProc,
    client: &reqwest::Client,
    what: &str,
    f: impl Fn(&str) -> bool,
) -> String {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = svc.metrics(client).await;
        if f(&m) {
            return m;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "{what} never happened:\n{m}"
        );
        tokio::task::yield_now().await;
    }
}

fn cancelled(m: &str, service: &str) -> f64 {
    sample(
        m,
        &format!("clinflow_history_cancelled_total{{service=\"{service}\",reason=\"caller\"}}"),
    ) + sample(
        m,
        &format!("clinflow_history_cancelled_total{{service=\"{service}\",reason=\"deadline\"}}"),
    )
}

async fn merged_history(app: TestApp) {
    load_data(&app).await;
    let records = service(&app, "records", 0, "127.0.0.1:0").await;
    let billing = service(&app, "billing", 0, "127.0.0.1:0").await;
    let gw = gateway(&app, &records, &billing).await;
    let patient = billed_patient(&app).await;

    // A cancelled invoice is listed but not billed.
    let cancelled_invoice = serde_json::json!({
        "resourceType": "Invoice",
        "status": "cancelled",
        "cancelledReason": "entered twice",
        "subject": {"reference": format!("Patient/{patient}")},
        "date": "2026-01-05",
        "totalGross": {"value": 1000.00, "currency": "EUR"},
    });
    app.post(
        "/fhir/Invoice",
        &app.admin,
        crate::helpers::FHIR_JSON,
        &cancelled_invoice.to_string(),
    )
    .await
    .expect(201);
    let r = history(&gw, &patient, "", None).await;
    r.expect(200);
    let h = r.json();
    assert_eq!(h["complete"], true);
    assert_eq!(h["patient"]["id"], patient.as_str());
    // Every record type as the FHIR API sees it, grouped by day, newest first.
    for rtype in [
        "Observation",
        "QuestionnaireResponse",
        "Encounter",
        "Condition",
        "DiagnosticReport",
        "AdverseEvent",
    ] {
        let expected = of_patient(&app, rtype, &patient).await.len();
        let groups = h["records"][rtype].as_array().cloned().unwrap_or_default();
        let got: usize = groups
            .iter()
            .map(|g| g["resources"].as_array().expect("resources").len())
            .sum();
        assert_eq!(got, expected, "{rtype}");
        let days: Vec<&str> = groups.iter().filter_map(|g| g["date"].as_str()).collect();
        assert!(
            days.windows(2).all(|w| w[0] > w[1]),
            "{rtype} days newest first: {days:?}"
        );
    }
    // Billing: the patient's invoices, and a total that is their exact sum.
    let invoices = of_patient(&app, "Invoice", &patient).await;
    assert!(!invoices.is_empty());
    assert_eq!(
        h["billing"]["invoices"].as_array().expect("invoices").len(),
        invoices.len()
    );
    let charges = of_patient(&app, "ChargeItem", &patient).await;
    assert_eq!(
        h["billing"]["charge_items"]
            .as_array()
            .expect("charge items")
            .len(),
        charges.len()
    );
    let sum: i64 = invoices.iter().map(|e| billed_cents(&e["resource"])).sum();
    assert_eq!(cents(&h["billing"]["total"]["value"]), sum);
    assert_eq!(h["billing"]["total"]["currency"], "EUR");
    let raw_total = r
        .text
        .split("\"total\":{\"value\":")
        .nth(1)
        .expect("a total");
    assert!(
        raw_total
            .split(',')
            .next()
            .is_some_and(|v| v.split_once('.').is_some_and(|(_, f)| f.len() == 2)),
        "two decimals: {raw_total}"
    );

    // `since` narrows it.
    let newest = h["records"]["Observation"][0]["date"]
        .as_str()
        .expect("a day")
        .to_string();
    let narrowed = history(&gw, &patient, &format!("?since={newest}"), None)
        .await
        .json();
    let days: Vec<&str> = narrowed["records"]["Observation"]
        .as_array()
        .expect("observations")
        .iter()
        .filter_map(|g| g["date"].as_str())
        .collect();
    assert_eq!(days, [newest.as_str()]);

    // Who may read it: the patient, its site's users; not others.
    let own = gw.token("patient", None, Some(&patient)).await;
    gw.get(&format!("/patients/{patient}/history"), &own)
        .await
        .expect(200);
    let other = gw.token("patient", None, Some("someone-else")).await;
    gw.get(&format!("/patients/{patient}/history"), &other)
        .await
        .outcome(403);
    let site = app
        .store
        .patient_site(&patient)
        .await
        .expect("a site")
        .expect("enrolled");
    let site_user = gw.token("site-user", Some(&site), None).await;
    gw.get(&format!("/patients/{patient}/history"), &site_user)
        .await
        .expect(200);
    let elsewhere = gw.token("site-user", Some("another-site"), None).await;
    gw.get(&format!("/patients/{patient}/history"), &elsewhere)
        .await
        .outcome(404);
    let monitor = gw.token("monitor", None, None).await;
    gw.get(&format!("/patients/{patient}/history"), &monitor)
        .await
        .outcome(403);
    history(&gw, "no-such-patient", "", None).await.outcome(404);
    history(&gw, &patient, "?since=yesterday", None)
        .await
        .outcome(400);
    history(&gw, &patient, "", Some(0)).await.outcome(400);

    // Audited: one `history` record per answer, about the Patient.
    app.store.flush().await.expect("flushed");
    let audit = app
        .store
        .audit_records(clinflow_store::AuditQuery {
            entity: Some(format!("Patient/{patient}")),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("the audit trail");
    let outcomes: Vec<&str> = audit
        .iter()
        .filter(|a| a.record.action == "history")
        .map(|a| a.record.outcome.as_str())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "success").count(),
        4,
        "{outcomes:?}"
    );
    assert!(outcomes.contains(&"404"), "{outcomes:?}");

    // A deleted Patient has no history to show, to anyone (its records
    // still name it, and must not leak to other sites).
    app.delete(&format!("/fhir/Patient/{patient}"), &app.admin)
        .await;
    history(&gw, &patient, "", None).await.outcome(404);
    gw.get(&format!("/patients/{patient}/history"), &elsewhere)
        .await
        .outcome(404);
}

async fn a_slow_service_gives_504_in_time_and_is_cancelled(app: TestApp) {
    load_data(&app).await;
    let records = service(&app, "records", 0, "127.0.0.1:0").await;
    let billing = service(&app, "billing", 60_000, "127.0.0.1:0").await;
    let gw = gateway(&app, &records, &billing).await;
    let patient = billed_patient(&app).await;

    let started = std::time::Instant::now();
    let r = history(&gw, &patient, "", Some(400)).await;
    let took = started.elapsed();
    let outcome = r.outcome(504);
    assert_eq!(outcome["issue"][0]["code"], "timeout");
    let text = outcome["issue"][0]["diagnostics"]
        .as_str()
        .expect("diagnostics");
    assert!(text.contains("billing"), "names the late service: {text}");
    // Answered at its deadline, not at the slow service's pace (60 s).
    // Not before it, less the few ms the services are given less (so that
    // they end their own streams: `client::SERVICE_GRACE`, at most 5 ms).
    assert!(took >= Duration::from_millis(395), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    wait_for_metrics(
        &billing,
        &gw.client,
        "billing seeing the cancellation",
        |m| cancelled(m, "billing") >= 1.0,
    )
    .await;
    // `partial` answers what arrived, marked incomplete, never silently.
    let r = history(&gw, &patient, "?partial=true", Some(300)).await;
    r.expect(200);
    let h = r.json();
    assert_eq!(h["complete"], false);
    assert!(h["records"]["Observation"].is_array());
    assert_eq!(h["billing"], Value::Null);
    assert_eq!(h["missing"][0]["service"], "billing");
}

async fn a_disconnecting_client_cancels_both_services(app: TestApp) {
    load_data(&app).await;
    let records = service(&app, "records", 60_000, "127.0.0.1:0").await;
    let billing = service(&app, "billing", 60_000, "127.0.0.1:0").await;
    let gw = gateway(&app, &records, &billing).await;
    let patient = billed_patient(&app).await;

    let mut tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connects");
    tcp.write_all(
        format!(
            "GET /patients/{patient}/history HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            gw.admin
        )
        .as_bytes(),
    )
    .await
    .expect("the request is sent");
    for svc in [&records, &billing] {
        wait_for_metrics(svc, &gw.client, "the call arriving", |m| {
            m.lines()
                .any(|l| l.starts_with("clinflow_history_service_in_flight{") && l.ends_with(" 1"))
        })
        .await;
    }
    let closed_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64();
    drop(tcp);
    for (svc, name) in [(&records, "records"), (&billing, "billing")] {
        let m = wait_for_metrics(svc, &gw.client, "the cancellation", |m| {
            cancelled(m, name) >= 1.0
        })
        .await;
        assert_eq!(
            sample(
                &m,
                &format!(
                    "clinflow_history_cancelled_total{{service=\"{name}\",reason=\"caller\"}}"
                )
            ),
            1.0,
            "{m}"
        );
        let at = sample(
            &m,
            &format!("clinflow_history_last_cancel_timestamp_seconds{{service=\"{name}\"}}"),
        );
        let after = at - closed_at;
        assert!(
            after < 0.050,
            "{name} stopped {:.1} ms after the client went away",
            after * 1000.0
        );
    }
}

async fn a_service_down_trips_the_breaker_and_it_closes_when_back(app: TestApp) {
    load_data(&app).await;
    let records = service(&app, "records", 0, "127.0.0.1:0").await;
    let mut billing = service(&app, "billing", 0, "127.0.0.1:0").await;
    let addr = billing.addr;
    let gw = gateway_with(&app, &records, &billing, |h| {
        h.breaker_window = Duration::from_secs(1);
    })
    .await;
    let patient = billed_patient(&app).await;
    history(&gw, &patient, "", None).await.expect(200);

    billing.kill().await;
    let first = history(&gw, &patient, "", None).await.outcome(502);
    let text = first["issue"][0]["diagnostics"]
        .as_str()
        .expect("diagnostics")
        .to_string();
    assert!(
        text.contains("billing") && text.contains("unavailable"),
        "{text}"
    );
    // Failures raise the breaker's rejection rate: soon it answers
    // without trying, and says so.
    let mut opened = false;
    for _ in 0..500 {
        let o = history(&gw, &patient, "", None).await.outcome(502);
        if o["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| d.contains("billing service is failing; its circuit breaker is open"))
        {
            opened = true;
            break;
        }
    }
    assert!(opened, "the breaker never opened");
    // Only billing's: records, whose calls were dropped each time billing
    // failed first, was never judged for it.
    let m = gw.get("/metrics", &gw.admin).await.text;
    assert_eq!(
        sample(
            &m,
            "clinflow_history_downstream_calls_total{service=\"records\",outcome=\"breaker-open\"}"
        ),
        0.0,
        "{m}"
    );
    let m = gw.get("/metrics", &gw.admin).await.text;
    assert!(
        sample(
            &m,
            "clinflow_history_downstream_calls_total{service=\"billing\",outcome=\"breaker-open\"}"
        ) >= 1.0,
        "{m}"
    );

    // Back on the same port: the breaker's probes find it and it closes.
    let _billing = service(&app, "billing", 0, &addr.to_string()).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    let mut successes = 0;
    while successes < 20 {
        pace.tick().await;
        assert!(
            tokio::time::Instant::now() < until,
            "the breaker never closed"
        );
        if history(&gw, &patient, "", None).await.status == 200 {
            successes += 1;
        } else {
            successes = 0;
        }
    }
}

async fn past_the_concurrency_limit_the_gateway_sheds_load(app: TestApp) {
    load_data(&app).await;
    let records = service(&app, "records", 60_000, "127.0.0.1:0").await;
    let billing = service(&app, "billing", 60_000, "127.0.0.1:0").await;
    let gw = gateway_with(&app, &records, &billing, |h| h.max_in_flight = 1).await;
    let patient = billed_patient(&app).await;
    let held = {
        let (client, url, admin) = (
            gw.client.clone(),
            format!("{}/patients/{patient}/history", gw.base),
            gw.admin.clone(),
        );
        tokio::spawn(async move {
            client
                .get(url)
                .bearer_auth(admin)
                .header("X-Request-Timeout", "20000")
                .send()
                .await
        })
    };
    wait_for_metrics(&records, &gw.client, "the first call arriving", |m| {
        m.lines()
            .any(|l| l.starts_with("clinflow_history_service_in_flight{") && l.ends_with(" 1"))
    })
    .await;
    let r = history(&gw, &patient, "", None).await;
    r.outcome(503);
    assert!(r.header("retry-after").is_some(), "a Retry-After");
    held.abort();
}

engine_tests!(
    merged_history,
    a_slow_service_gives_504_in_time_and_is_cancelled,
    a_disconnecting_client_cancels_both_services,
    a_service_down_trips_the_breaker_and_it_closes_when_back,
    past_the_concurrency_limit_the_gateway_sheds_load,
);
