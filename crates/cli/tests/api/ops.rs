//! Operations: `/healthz`, authentication on every other endpoint,
//! `/metrics`, and graceful shutdown (in the library and in the binary on
//! SIGTERM).
//!
//! Shutdown is made deterministic without sleeps: a request is sent with
//! `Expect: 100-continue` and only its head; the server answers
//! `100 Continue` once the handler starts reading the body, so the request
//! is provably in flight. Shutdown is then signalled, and the test waits
//! until the server refuses new connections (it has stopped accepting)
//! before sending the body. The response must still come, complete.

use std::net::SocketAddr;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{open_store, sample, Engine, TestApp, FHIR_JSON};

engine_tests!(
    healthz_needs_no_token_and_checks_the_database,
    every_other_endpoint_needs_a_valid_token,
    metrics_render_prometheus_text,
    shutdown_finishes_the_request_in_flight_and_commits_queued_audit,
    the_binary_shuts_down_gracefully_on_sigterm,
    requests_past_the_in_flight_limit_get_503_with_retry_after with |c| c.max_in_flight = 1,
    logs_carry_no_patient_identifiers,
    a_request_past_its_deadline_gets_503 with |c| c.request_timeout = std::time::Duration::from_millis(200),
);

async fn healthz_needs_no_token_and_checks_the_database(app: TestApp) {
    let r = app.send(app.client.get(app.url("/healthz"))).await;
    r.expect(200);
    let h = r.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["database"]["status"], "ok");
    let engine = match app.engine {
        Engine::Sqlite => "sqlite",
        Engine::Postgres => "postgres",
    };
    assert_eq!(h["database"]["engine"], engine);
    // A token, even a bad one, does not get in the way.
    let r = app
        .send(app.client.get(app.url("/healthz")).bearer_auth("nonsense"))
        .await;
    r.expect(200);
}

async fn every_other_endpoint_needs_a_valid_token(app: TestApp) {
    let patient = app
        .create(&app.admin, &json!({"resourceType": "Patient"}))
        .await;
    let endpoints: Vec<(Method, String)> = vec![
        (Method::GET, "/fhir/metadata".into()),
        (Method::GET, "/fhir/Patient".into()),
        (Method::POST, "/fhir/Patient".into()),
        (Method::POST, "/fhir/Patient/_search".into()),
        (Method::GET, format!("/fhir/Patient/{patient}")),
        (Method::PUT, format!("/fhir/Patient/{patient}")),
        (Method::DELETE, format!("/fhir/Patient/{patient}")),
        (Method::GET, format!("/fhir/Patient/{patient}/_history")),
        (Method::GET, format!("/fhir/Patient/{patient}/_history/1")),
        (Method::POST, "/fhir".into()),
        (Method::GET, "/fhir/AuditEvent".into()),
        (Method::GET, "/fhir/AuditEvent/1".into()),
        (Method::GET, "/trials".into()),
        (Method::POST, "/trials".into()),
        (Method::GET, "/trials/CARDIO-01".into()),
        (Method::POST, "/trials/CARDIO-01/subjects".into()),
        (Method::GET, "/audit/export".into()),
        (Method::GET, "/audit/verify".into()),
        (Method::GET, "/metrics".into()),
        (Method::POST, "/ingest/hl7v2".into()),
        (Method::POST, "/ingest/wearable".into()),
        (Method::POST, "/ingest/diary".into()),
        (Method::POST, "/ingest/fhir".into()),
        (Method::GET, "/ingest/batches/b".into()),
        (Method::POST, "/ingest/batches/b/retry".into()),
        (Method::GET, "/queries".into()),
        (Method::POST, "/queries/q/answer".into()),
        (Method::POST, "/queries/q/close".into()),
        (Method::POST, "/ingest/items/b.0/retry".into()),
        (Method::GET, "/sites".into()),
        (Method::POST, "/sites".into()),
        (Method::GET, "/sites/site-001".into()),
        (Method::PUT, "/sites/site-001".into()),
        (Method::DELETE, "/sites/site-001".into()),
        (Method::GET, "/trials/CARDIO-01/dashboard".into()),
        (
            Method::GET,
            "/trials/CARDIO-01/subjects/CARDIO-01-0001".into(),
        ),
        // Deny by default: a path no route serves needs a token too.
        (Method::GET, "/no-such-endpoint".into()),
    ];
    let bad_tokens: [Option<&str>; 4] = [
        None,
        Some("Bearer "),
        Some("Bearer cf_0000000000000000000000000000000000000000000000000000000000000000"),
        Some("Basic YWRtaW46YWRtaW4="),
    ];
    for (method, path) in &endpoints {
        for auth in bad_tokens {
            let mut req = app
                .client
                .request(method.clone(), app.url(path))
                .header("content-type", FHIR_JSON)
                .body(json!({"resourceType": "Patient", "id": patient}).to_string());
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = app.send(req).await;
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.text);
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer"),
                "{method} {path}"
            );
            let body = r.json();
            if path.starts_with("/fhir") {
                assert_eq!(body["resourceType"], "OperationOutcome", "{method} {path}");
            } else {
                assert_eq!(r.header("content-type"), Some("application/problem+json"));
                assert_eq!(body["status"], 401);
            }
        }
    }
    // Nothing happened to the Patient.
    let r = app
        .get(&format!("/fhir/Patient/{patient}"), &app.admin)
        .await;
    assert_eq!(r.header("etag"), Some("W/\"1\""));
}

async fn metrics_render_prometheus_text(app: TestApp) {
    let id = app
        .create(&app.admin, &json!({"resourceType": "Patient"}))
        .await;
    let reads = 3;
    for _ in 0..reads {
        app.get(&format!("/fhir/Patient/{id}"), &app.admin)
            .await
            .expect(200);
    }
    let before = app.get("/metrics", &app.admin).await;
    before.expect(200);
    let ct = before.header("content-type").unwrap_or("").to_string();
    assert!(
        ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"),
        "{ct}"
    );
    let text = &before.text;
    assert!(text.contains("clinflow_http_requests"), "{text}");
    assert!(
        text.contains("# TYPE clinflow_http_requests counter"),
        "{text}"
    );
    assert!(
        text.contains("clinflow_http_request_duration_seconds"),
        "{text}"
    );
    // Requests are labelled by route template, never by the id in the path.
    assert!(!text.contains(&id), "no resource ids in metrics");
    let read_line = text
        .lines()
        .find(|l| {
            l.starts_with("clinflow_http_requests_total{")
                && l.contains("method=\"GET\"")
                && l.contains("status=\"200\"")
                && l.contains("{id}")
        })
        .unwrap_or_else(|| panic!("a sample for the read route: {text}"));
    let counted: f64 = read_line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a value");
    assert!(counted >= f64::from(reads), "{read_line}");
    // Refused tokens are counted.
    let failures = sample(text, "clinflow_auth_failures_total");
    let bad = 2;
    for _ in 0..bad {
        app.get("/fhir/Patient", "wrong").await.expect(401);
    }
    let after = app.get("/metrics", &app.admin).await.text;
    assert_eq!(
        sample(&after, "clinflow_auth_failures_total"),
        failures + f64::from(bad)
    );
}

/// Sends the head of a transaction with `Expect: 100-continue` and waits for
/// `100 Continue`: the handler is then reading the body. Returns the
/// connection and the body still to send.
async fn start_in_flight(
    addr: SocketAddr,
    token: &str,
    patient_family: &str,
) -> (TcpStream, String) {
    let body = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0b7e1f5c-2d38-4c7a-9a57-6f0a5d1c3e11",
         "resource": {"resourceType": "Patient", "name": [{"family": patient_family}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:0b7e1f5c-2d38-4c7a-9a57-6f0a5d1c3e11"}},
         "request": {"method": "POST", "url": "Observation"}},
    ]})
    .to_string();
    let mut conn = TcpStream::connect(addr).await.expect("a connection");
    let head = format!(
        "POST /fhir HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: {FHIR_JSON}\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())
        .await
        .expect("the head is sent");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn
            .read(&mut buf)
            .await
            .expect("reading the interim response");
        assert!(
            n > 0,
            "the server closed the connection before 100 Continue"
        );
        got.extend_from_slice(&buf[..n]);
    }
    let interim = String::from_utf8_lossy(&got);
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    (conn, body)
}

/// Waits until `addr` refuses connections: the server stopped accepting.
async fn wait_until_refused(addr: SocketAddr) {
    while let Ok(c) = TcpStream::connect(addr).await {
        drop(c);
        tokio::task::yield_now().await;
    }
}

/// Sends the rest of the request and reads the response to the end.
async fn finish_in_flight(mut conn: TcpStream, body: String) -> (String, Value) {
    conn.write_all(body.as_bytes())
        .await
        .expect("the body is sent");
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .await
        .expect("the response is read");
    let raw = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("a complete response, not {raw:?}"));
    let status = head.lines().next().expect("a status line").to_string();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {raw}"));
    (status, json)
}

async fn shutdown_finishes_the_request_in_flight_and_commits_queued_audit(mut app: TestApp) {
    // Reads whose audit records are queued (group-committed, not awaited).
    let id = app
        .create(&app.admin, &json!({"resourceType": "Patient"}))
        .await;
    let reason = crate::helpers::unique("read-before-shutdown");
    let reads = 3;
    for _ in 0..reads {
        app.send(
            app.request(Method::GET, &format!("/fhir/Patient/{id}"), &app.admin)
                .header("x-reason", reason.clone()),
        )
        .await
        .expect(200);
    }
    let family = crate::helpers::unique("InFlight");
    let (conn, body) = start_in_flight(app.addr, &app.admin, &family).await;
    app.signal_shutdown();
    wait_until_refused(app.addr).await;
    let (status, resp) = finish_in_flight(conn, body).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}: {resp}");
    assert_eq!(resp["type"], "transaction-response");
    app.stopped().await.expect("the server stops cleanly");

    // What the in-flight request wrote, and the queued read audits, are in
    // the database, seen through a store opened afresh.
    let store = open_store(&app.db_url).await;
    for e in resp["entry"].as_array().expect("entries") {
        let loc = e["response"]["location"].as_str().expect("a location");
        let mut parts = loc.split('/');
        let (t, i) = (parts.next().expect("a type"), parts.next().expect("an id"));
        let r = store.read_current(t, i).await.expect("readable");
        assert!(r.is_some_and(|r| !r.deleted), "{loc} was committed");
    }
    let audit = store
        .audit_records(clinflow_store::AuditQuery {
            entity: Some(format!("Patient/{id}")),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("the trail is readable");
    let committed = audit
        .iter()
        .filter(|a| {
            a.record.action == "read" && a.record.reason.as_deref() == Some(reason.as_str())
        })
        .count();
    assert_eq!(committed, reads, "every queued read audit was committed");
    assert!(store.verify_audit().await.expect("readable").is_ok());
}

/// Reads lines of a child's stdout until one says where it listens.
fn listening_addr(stdout: std::process::ChildStdout) -> SocketAddr {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("the server printed where it listens before exiting")
            .expect("UTF-8");
        if let Some(rest) = line.strip_prefix("clinflow listening on http://") {
            return rest
                .split_whitespace()
                .next()
                .and_then(|a| a.parse().ok())
                .expect("an address");
        }
    }
}

async fn the_binary_shuts_down_gracefully_on_sigterm(app: TestApp) {
    let secret = crate::helpers::unique("env-admin");
    let mut child = std::process::Command::new(crate::helpers::clinflow_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            &app.db_url,
        ])
        .env("CLINFLOW_ADMIN_TOKEN", &secret)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("clinflow serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || listening_addr(stdout))
        .await
        .expect("reading stdout");
    let family = crate::helpers::unique("Sigterm");
    let (conn, body) = start_in_flight(addr, &secret, &family).await;
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    wait_until_refused(addr).await;
    let (status, resp) = finish_in_flight(conn, body).await;
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("waiting")
        .expect("an exit status");
    assert!(status.starts_with("HTTP/1.1 200"), "{status}: {resp}");
    assert!(
        exit.success(),
        "clinflow serve exits 0 after SIGTERM: {exit}"
    );
    // The test app, on the same database, serves what was written.
    let found = app
        .search_ids(&app.admin, "Patient", &format!("family={family}"))
        .await;
    assert_eq!(found.len(), 1, "{found:?}");
}

/// Reads one response (head and `Content-Length` body) from a kept-alive
/// connection.
async fn read_response(conn: &mut TcpStream) -> (String, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut buf).await.expect("reading a response");
        assert!(n > 0, "the connection closed mid-response");
        got.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while got.len() < head_end + len {
        let n = conn.read(&mut buf).await.expect("reading a body");
        assert!(n > 0, "the connection closed mid-body");
        got.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&got[head_end..head_end + len]).to_string();
    (head, body)
}

/// With one request allowed in flight and one held open (its body not yet
/// sent), another request is shed with 503 and `Retry-After` instead of
/// queueing; the held one still completes.
async fn requests_past_the_in_flight_limit_get_503_with_retry_after(app: TestApp) {
    let (mut conn, body) = start_in_flight(app.addr, &app.admin, "Held").await;
    let r = app.get("/fhir/metadata", &app.admin).await;
    r.expect(503);
    assert!(r.header("retry-after").is_some(), "Retry-After is set");
    let outcome = r.outcome(503);
    assert_eq!(outcome["issue"][0]["code"], "throttled");
    conn.write_all(body.as_bytes())
        .await
        .expect("the body is sent");
    let (head, _) = read_response(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The permit is back: the next request is served.
    app.get("/fhir/metadata", &app.admin).await.expect(200);
}

/// A request that outlives the per-request deadline (its body never comes)
/// is answered 503 with `Retry-After`, as an OperationOutcome under /fhir,
/// and the server goes on serving.
async fn a_request_past_its_deadline_gets_503(app: TestApp) {
    let (mut conn, _body) = start_in_flight(app.addr, &app.admin, "Stalled").await;
    let (head, body) = read_response(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    let outcome: Value = serde_json::from_str(&body).expect("an OperationOutcome");
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    app.get("/fhir/metadata", &app.admin).await.expect(200);
    // Nothing of the stalled transaction was stored.
    assert_eq!(app.count(&app.admin, "Patient").await, 0);
}

/// The server's logs, at debug level and as JSON, through reads, searches,
/// writes and errors that all carry patient data, name no subject, name,
/// e-mail, phone or birth date of the reference trial.
async fn logs_carry_no_patient_identifiers(app: TestApp) {
    app.load_reference_trial().await;
    let secret = crate::helpers::unique("log-admin");
    let mut child = std::process::Command::new(crate::helpers::clinflow_bin())
        .args([
            "--log-format",
            "json",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            &app.db_url,
        ])
        .env("CLINFLOW_ADMIN_TOKEN", &secret)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("clinflow serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || listening_addr(stdout))
        .await
        .expect("reading stdout");
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let subjects = crate::helpers::subjects();
    let first = &subjects[0].id;
    let get = |path: String| {
        client
            .get(format!("{base}{path}"))
            .bearer_auth(&secret)
            .send()
    };
    for path in [
        format!("/fhir/Patient/{first}"),
        format!("/fhir/Patient/{first}-missing"),
        "/fhir/Patient?family=Doe&given=Jane".to_string(),
        format!("/fhir/Observation?subject:identifier=https://trials.example.org/CARDIO-01/subject|{first}"),
        "/fhir/Patient?birthdate=bad-date".to_string(),
    ] {
        get(path).await.expect("a response");
    }
    let invalid = json!({"resourceType": "Observation", "status": "nonsense", "code": {"text": "x"},
        "subject": {"reference": format!("Patient/{first}")}, "note": [{"text": "Jane Doe, jane.doe@example.org"}]});
    client
        .post(format!("{base}/fhir/Observation"))
        .bearer_auth(&secret)
        .header("content-type", FHIR_JSON)
        .body(invalid.to_string())
        .send()
        .await
        .expect("a response");
    client
        .post(format!("{base}/fhir"))
        .bearer_auth(&secret)
        .header("content-type", FHIR_JSON)
        .body(crate::helpers::EVENTS_BUNDLE)
        .send()
        .await
        .expect("a response");
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("waiting")
        .expect("the output");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    // The log is real: JSON lines, one per request answered, by route.
    let answered = log
        .lines()
        .filter(|l| l.contains("request answered"))
        .count();
    assert!(
        answered >= 7,
        "expected a line per request, got {answered}:\n{log}"
    );
    assert!(
        log.contains("/fhir/{rtype}/{id}"),
        "routes are logged as templates"
    );
    let protocol_csv = include_str!("../../../../reference-trial/subjects.csv");
    let mut forbidden: Vec<String> = Vec::new();
    for line in protocol_csv.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        // subject, site, enrolled, arm, birth_date, sex, family, given, email, phone
        for i in [0, 4, 6, 7, 8, 9] {
            if let Some(v) = cols.get(i).filter(|v| !v.is_empty()) {
                forbidden.push(v.to_string());
            }
        }
    }
    for f in &forbidden {
        assert!(!log.contains(f.as_str()), "the log names {f:?}:\n{log}");
    }
}
