//! Notification campaigns against a real SMTP server (aiosmtpd writing a
//! Maildir, `tests/smtp/server.py`) and an SMS provider that behaves like
//! Twilio's API (`clinflow-sms-mock`: 201 with a sid, 429 past its
//! concurrency, 503s, signed status callbacks). Each test uses recipients
//! of its own (unique addresses and numbers), so tests share the SMTP
//! server; each has an SMS provider of its own.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use clinflow_sms_mock::{MockConfig, MockSms};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::helpers::{run_test_with, workspace_root, Engine, TestApp};

const DEADLINE: Duration = Duration::from_secs(120);
const SMS_FROM: &str = "+15005550006";

/// The SMTP server shared by the test binary.
struct Smtp {
    port: u16,
    maildir: PathBuf,
    _child: std::sync::Mutex<std::process::Child>,
}

fn smtp() -> &'static Smtp {
    static SMTP: OnceLock<Smtp> = OnceLock::new();
    SMTP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("clinflow-maildir-{}", uuid::Uuid::new_v4()));
        let python = std::env::var("CLINFLOW_TEST_PYTHON").unwrap_or_else(|_| {
            panic!(
                "CLINFLOW_TEST_PYTHON is not set: it must name a python with aiosmtpd \
                 (scripts/test.sh makes one in target/test-venv)"
            )
        });
        let mut child = std::process::Command::new(python)
            .arg(workspace_root().join("tests/smtp/server.py"))
            .arg("--maildir")
            .arg(&dir)
            .arg("--exit-on-eof")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("CLINFLOW_TEST_PYTHON runs tests/smtp/server.py");
        let out = child.stdout.take().expect("its stdout");
        let mut line = String::new();
        std::io::BufReader::new(out)
            .read_line(&mut line)
            .expect("the SMTP server says where it listens");
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the SMTP server did not start: {line:?}"));
        Smtp {
            port,
            maildir: dir,
            _child: std::sync::Mutex::new(child),
        }
    })
}

/// A message in the Maildir: its headers (lower-case names, unfolded).
#[derive(Debug, Clone)]
struct Mail {
    headers: HashMap<String, String>,
}

/// Every message delivered so far to one of `to`.
fn mails_to(to: &[String]) -> Vec<Mail> {
    let wanted: std::collections::HashSet<String> = to.iter().map(|a| a.to_lowercase()).collect();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(smtp().maildir.join("new")) else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let head = text
            .split("\n\n")
            .next()
            .unwrap_or("")
            .replace("\r\n", "\n");
        let mut headers = HashMap::new();
        let mut last: Option<String> = None;
        for line in head.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some(k) = &last {
                    let v: &mut String = headers.entry(k.clone()).or_default();
                    v.push(' ');
                    v.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_lowercase();
                headers.insert(k.clone(), v.trim().to_string());
                last = Some(k);
            }
        }
        let rcpt = headers
            .get("to")
            .map(|t| t.trim_matches(['<', '>']).to_lowercase())
            .unwrap_or_default();
        if wanted.contains(&rcpt) {
            out.push(Mail { headers });
        }
    }
    out
}

/// Practitioners of one test: unique addresses and numbers.
struct Doctors {
    ids: Vec<String>,
    emails: Vec<String>,
    phones: Vec<String>,
    csv: String,
}

fn doctors(n: usize, email_prefix: impl Fn(usize) -> &'static str) -> Doctors {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let digits: String = tag
        .bytes()
        .filter(u8::is_ascii_digit)
        .chain(std::iter::repeat(b'7'))
        .take(5)
        .map(char::from)
        .collect();
    let mut d = Doctors {
        ids: Vec::new(),
        emails: Vec::new(),
        phones: Vec::new(),
        csv: "id,family,given,email,phone,site,specialty\n".into(),
    };
    for i in 0..n {
        let id = format!("dr-{}-{i}", &tag[..8]);
        let email = format!("{}dr{i}.{}@example.org", email_prefix(i), &tag[..8]);
        let phone = format!("+4479{digits}{i:04}");
        let site = ["site-001", "site-002", "site-003"][i % 3];
        let specialty = if i % 2 == 0 {
            "cardiology"
        } else {
            "nephrology"
        };
        d.csv.push_str(&format!(
            "{id},Family{i},Given,{email},{phone},{site},{specialty}\n"
        ));
        d.ids.push(id);
        d.emails.push(email);
        d.phones.push(phone);
    }
    d
}

/// Loads the reference trial (its sites) and the practitioners, through
/// `clinflow practitioners load`.
async fn load(app: &TestApp, d: &Doctors) {
    app.load_reference_trial().await;
    let file = std::env::temp_dir().join(format!("practitioners-{}.csv", uuid::Uuid::new_v4()));
    std::fs::write(&file, &d.csv).expect("a temp file");
    let out = app.cli(&["practitioners", "load", file.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(file);
}

fn notify_config(c: &mut clinflow_server::Config, sms: &str) {
    c.notify.smtp_url = Some(format!("smtp://127.0.0.1:{}", smtp().port));
    c.notify.smtp_from = "CARDIO-01 <trials@clinflow.test>".into();
    c.notify.sms_base_url = Some(sms.to_string());
    c.notify.sms_account_sid = MockConfig::default().account_sid;
    c.notify.sms_auth_token = MockConfig::default().auth_token;
    c.notify.sms_from = SMS_FROM.into();
    c.notify.retry.base = Duration::from_millis(50);
    c.notify.retry.cap = Duration::from_millis(500);
    c.notify.poll = Duration::from_millis(50);
    c.notify.email.concurrency = 8;
    c.notify.email.rate = 10_000;
    c.notify.sms.concurrency = 8;
    c.notify.sms.rate = 10_000;
}

/// A test run with an SMS provider of its own, started before the server.
async fn with_provider<F, Fut>(engine: Engine, mock: MockConfig, test: F)
where
    F: FnOnce(TestApp, MockSms) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    with_provider_tuned(engine, mock, |_| {}, test).await
}

/// [`with_provider`], with the server's configuration changed by `tune`.
async fn with_provider_tuned<F, Fut>(
    engine: Engine,
    mock: MockConfig,
    tune: impl FnOnce(&mut clinflow_server::Config),
    test: F,
) where
    F: FnOnce(TestApp, MockSms) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let sms = MockSms::start("127.0.0.1:0".parse().expect("an address"), mock)
        .await
        .expect("the SMS provider starts");
    let base = sms.base_url();
    run_test_with(
        engine,
        move |c| {
            notify_config(c, &base);
            tune(c);
        },
        |app| test(app, sms),
    )
    .await;
}

macro_rules! campaign_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Engine::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Engine::Postgres).await;
                }
            )*
        }
    };
}

campaign_tests!(
    a_campaign_reaches_every_recipient_once_per_channel,
    transient_errors_are_retried_and_permanent_ones_fail_with_their_reason,
    opted_out_recipients_are_suppressed,
    an_sms_whose_answer_is_lost_is_looked_up_not_sent_again,
    cancel_stops_what_has_not_been_sent,
    requests_are_checked_and_idempotent,
    killing_the_server_mid_campaign_finishes_it_without_duplicates,
);

fn campaign(name: &str, channels: &[&str], audience: Value) -> Value {
    json!({
        "name": name,
        "channels": channels,
        "templates": {
            "subject": "{{campaign.name}}",
            "text": "Dear {{practitioner.name}}, you are invited ({{site.name}}). Unsubscribe: {{unsubscribe_url}}",
            "html": "<p>Dear {{practitioner.name}},</p>",
            "sms": "{{campaign.name}}: dear {{practitioner.name}}, see your e-mail."
        },
        "audience": audience,
    })
}

async fn create(app: &TestApp, body: &Value) -> String {
    let r = app
        .post(
            "/campaigns",
            &app.admin,
            "application/json",
            &body.to_string(),
        )
        .await;
    r.expect(202);
    r.json()["id"].as_str().expect("an id").to_string()
}

/// Waits until the campaign has nothing pending or sending and every SMS
/// sent has had its provider's final report; its last state.
async fn finished(app: &TestApp, id: &str) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let c = app.get(&format!("/campaigns/{id}"), &app.admin).await;
        let c = c.json();
        let sms_sent = c["by_channel"]["sms"]["sent"].as_u64().unwrap_or(0);
        if matches!(c["status"].as_str(), Some("completed" | "cancelled")) && sms_sent == 0 {
            return c;
        }
        assert!(Instant::now() < deadline, "campaign not finished: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = app
            .get(
                &format!("/campaigns/{id}/deliveries?count=1000&cursor={cursor}"),
                &app.admin,
            )
            .await
            .json();
        out.extend(page["items"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(n) => cursor = n.to_string(),
            None => return out,
        }
    }
}

fn count_by<'a>(items: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for i in items {
        *m.entry(i.to_string()).or_insert(0) += 1;
    }
    m
}

async fn a_campaign_reaches_every_recipient_once_per_channel(engine: Engine) {
    let mock = MockConfig {
        latency: Duration::from_millis(2),
        ..Default::default()
    };
    with_provider(engine, mock, |app, sms| async move {
        let d = doctors(1000, |_| "");
        load(&app, &d).await;
        let id = create(
            &app,
            &campaign(
                "Investigator meeting",
                &["email", "sms"],
                json!({"all": true}),
            ),
        )
        .await;
        let c = finished(&app, &id).await;
        let n = d.ids.len() as u64;
        assert_eq!(c["by_channel"]["email"]["sent"], n, "{c}");
        assert_eq!(c["by_channel"]["sms"]["delivered"], n, "{c}");
        assert_eq!(c["total"], 2 * n);

        // Exactly one e-mail per recipient, with its delivery's Message-ID
        // and an unsubscribe link.
        let mails = mails_to(&d.emails);
        let per = count_by(mails.iter().map(|m| m.headers["to"].as_str()));
        assert_eq!(mails.len(), d.emails.len(), "{per:?}");
        assert!(per.values().all(|&k| k == 1));
        let rows = deliveries(&app, &id).await;
        let email_rows: HashMap<&str, &Value> = rows
            .iter()
            .filter(|r| r["channel"] == "email")
            .map(|r| (r["address"].as_str().unwrap_or(""), r))
            .collect();
        for m in &mails {
            let row = email_rows[m.headers["to"].trim_matches(['<', '>'])];
            assert_eq!(
                m.headers["message-id"],
                format!("<{}@clinflow.test>", row["id"].as_str().unwrap_or(""))
            );
            assert!(m.headers["list-unsubscribe"].contains("/unsubscribe/"));
            assert_eq!(
                m.headers["list-unsubscribe-post"],
                "List-Unsubscribe=One-Click"
            );
        }

        // Exactly one SMS per number, with the name rendered in.
        let texts: Vec<_> = sms
            .messages()
            .into_iter()
            .filter(|m| d.phones.contains(&m.to))
            .collect();
        let per = count_by(texts.iter().map(|m| m.to.as_str()));
        assert_eq!(texts.len(), d.phones.len());
        assert!(per.values().all(|&k| k == 1));
        assert!(texts.iter().all(|m| m
            .body
            .starts_with("Investigator meeting: dear Given Family")));
        assert!(sms.stats().max_in_flight_seen <= app.config.notify.sms.concurrency as u64);
    })
    .await;
}

async fn transient_errors_are_retried_and_permanent_ones_fail_with_their_reason(engine: Engine) {
    // Concurrency 2 at the provider against 8 here: 429s for sure.
    let mock = MockConfig {
        latency: Duration::from_millis(20),
        max_concurrent: 2,
        ..Default::default()
    };
    with_provider(engine, mock, |app, sms| async move {
        let d = doctors(30, |i| match i {
            0..=4 => "tempfail",
            5 => "reject",
            6 => "hangup-before",
            8 => "hangup-after",
            _ => "",
        });
        sms.set_config(|c| {
            c.transient.insert(d.phones[7].clone(), 2);
        });
        load(&app, &d).await;
        let id = create(
            &app,
            &campaign(
                "Retries",
                &["email", "sms"],
                json!({"practitioners": d.ids}),
            ),
        )
        .await;
        let c = finished(&app, &id).await;
        let n = d.ids.len() as u64;
        assert_eq!(c["by_channel"]["email"]["sent"], n - 2, "{c}");
        assert_eq!(c["by_channel"]["email"]["failed"], 2, "{c}");
        let rows = deliveries(&app, &id).await;
        let sms_failed: Vec<_> = rows
            .iter()
            .filter(|r| r["channel"] == "sms" && r["status"] != "delivered")
            .collect();
        assert!(sms_failed.is_empty(), "{sms_failed:?}");
        // A 429 is given back (the provider did not read the message); the
        // two 503s are attempts.
        for r in rows.iter().filter(|r| r["channel"] == "sms") {
            let want = if r["address"] == d.phones[7].as_str() {
                3
            } else {
                1
            };
            assert_eq!(r["attempts"], want, "{r}");
        }
        let stats = sms.stats();
        assert!(stats.rejected_429 > 0, "{stats:?}");
        assert_eq!(stats.transient_503, 2, "{stats:?}");

        let row_of = |address: &str| {
            rows.iter()
                .find(|r| r["address"] == address)
                .unwrap_or_else(|| panic!("a row for {address}"))
        };
        let failed: Vec<_> = rows.iter().filter(|r| r["status"] == "failed").collect();
        assert_eq!(failed.len(), 2);
        let rejected = row_of(&d.emails[5]);
        assert_eq!(rejected["status"], "failed");
        let reason = rejected["last_error"].as_str().unwrap_or("");
        assert!(reason.starts_with("SMTP 550"), "{reason}");
        assert_eq!(rejected["attempts"], 1, "a permanent error is not retried");
        // The connection dropped before the message: nothing was taken, so
        // it is sent (again, or on a fresh connection at once).
        assert_eq!(row_of(&d.emails[6])["status"], "sent");
        // Dropped after the whole message, with no reply: the server may
        // have it (this one does), so it is not sent again.
        let unknown = row_of(&d.emails[8]);
        assert_eq!(unknown["status"], "failed");
        let reason = unknown["last_error"].as_str().unwrap_or("");
        assert!(reason.starts_with("outcome unknown"), "{reason}");
        assert_eq!(unknown["attempts"], 1, "an unknown outcome is not retried");
        for i in 0..5 {
            let row = rows
                .iter()
                .find(|r| r["address"] == d.emails[i].as_str())
                .expect("a row");
            assert_eq!(row["status"], "sent");
            assert_eq!(row["attempts"], 2, "tried again after the 451: {row}");
        }
        // Still exactly once each, the retried ones and the unknown one
        // included (the rejected one not at all).
        let mails = mails_to(&d.emails);
        assert_eq!(mails.len(), d.emails.len() - 1);
        let per = count_by(mails.iter().map(|m| m.headers["to"].as_str()));
        assert!(per.values().all(|&k| k == 1), "{per:?}");
        let texts = sms
            .messages()
            .into_iter()
            .filter(|m| d.phones.contains(&m.to))
            .count();
        assert_eq!(texts, d.phones.len());
    })
    .await;
}

/// The provider takes an SMS but its answer comes after the send timeout:
/// clinflow looks it up instead of sending it again.
async fn an_sms_whose_answer_is_lost_is_looked_up_not_sent_again(engine: Engine) {
    let d = doctors(4, |_| "");
    let slow = d.phones[1].clone();
    let mut mock = MockConfig::default();
    mock.slow_answer
        .insert(slow.clone(), Duration::from_secs(3));
    let tune = |c: &mut clinflow_server::Config| {
        c.notify.sms.send_timeout = Duration::from_millis(300);
    };
    with_provider_tuned(engine, mock, tune, |app, sms| async move {
        load(&app, &d).await;
        let id = create(
            &app,
            &campaign("Lost answer", &["sms"], json!({"practitioners": d.ids})),
        )
        .await;
        let _ = finished(&app, &id).await;
        let rows = deliveries(&app, &id).await;
        let row = rows
            .iter()
            .find(|r| r["address"] == slow.as_str())
            .expect("its row");
        assert!(
            row["status"] == "sent" || row["status"] == "delivered",
            "{row}"
        );
        assert_eq!(row["attempts"], 1, "found, not sent again: {row}");
        let taken: Vec<_> = sms
            .messages()
            .into_iter()
            .filter(|m| m.to == slow)
            .collect();
        assert_eq!(taken.len(), 1, "one message at the provider");
        assert_eq!(row["provider_id"].as_str(), Some(taken[0].sid.as_str()));
    })
    .await;
}

async fn opted_out_recipients_are_suppressed(engine: Engine) {
    with_provider(engine, MockConfig::default(), |app, sms| async move {
        let d = doctors(6, |_| "");
        load(&app, &d).await;
        // An opt-out through the API, of one channel only.
        app.post(
            &format!("/practitioners/{}/opt-out", d.ids[0]),
            &app.admin,
            "application/json",
            r#"{"channel": "sms"}"#,
        )
        .await
        .expect(200);
        let id = create(
            &app,
            &campaign("First", &["email", "sms"], json!({"practitioners": d.ids})),
        )
        .await;
        let c = finished(&app, &id).await;
        assert_eq!(c["by_channel"]["sms"]["suppressed"], 1, "{c}");
        assert_eq!(c["by_channel"]["email"]["sent"], d.ids.len() as u64, "{c}");
        assert!(!sms.messages().iter().any(|m| m.to == d.phones[0]));

        // The recipient's own link (RFC 8058 one-click POST), no token.
        let mail = mails_to(&d.emails[1..2]).pop().expect("a mail");
        let link = mail.headers["list-unsubscribe"]
            .trim_matches(['<', '>'])
            .to_string();
        let page = app.client.get(&link).send().await.expect("GET");
        assert_eq!(page.status(), 200, "GET shows the button, changes nothing");
        let r = app.client.post(&link).send().await.expect("POST");
        assert_eq!(r.status(), 200);
        let forged = format!("{}x", link);
        assert_eq!(
            app.client
                .post(&forged)
                .send()
                .await
                .expect("POST")
                .status(),
            404
        );

        let id = create(
            &app,
            &campaign("Second", &["email"], json!({"practitioners": d.ids})),
        )
        .await;
        let c = finished(&app, &id).await;
        assert_eq!(c["by_channel"]["email"]["suppressed"], 1, "{c}");
        assert_eq!(
            mails_to(&d.emails[1..2]).len(),
            1,
            "no second e-mail after the opt-out"
        );

        // Audited.
        let audit = app
            .store
            .audit_records(clinflow_store::AuditQuery {
                limit: 100_000,
                ..Default::default()
            })
            .await
            .expect("audit");
        let actions = count_by(audit.iter().map(|a| a.record.action.as_str()));
        assert_eq!(actions.get("opt-out"), Some(&2));
        assert_eq!(actions.get("campaign-create"), Some(&2));
    })
    .await;
}

async fn cancel_stops_what_has_not_been_sent(engine: Engine) {
    with_provider(engine, MockConfig::default(), |app, _sms| async move {
        let d = doctors(40, |_| "");
        load(&app, &d).await;
        // 1,000 a second is too fast to cancel in time; the app's limit is
        // the config's, so this campaign is paced by `send_at`: nothing is
        // due yet when it is cancelled.
        let mut body = campaign("Later", &["email", "sms"], json!({"all": true}));
        body["send_at"] = json!("2099-01-01T00:00:00Z");
        let id = create(&app, &body).await;
        let c = app
            .get(&format!("/campaigns/{id}"), &app.admin)
            .await
            .json();
        assert_eq!(c["status"], "scheduled");
        let r = app
            .post(
                &format!("/campaigns/{id}/cancel"),
                &app.admin,
                "application/json",
                "",
            )
            .await;
        r.expect(200);
        let c = finished(&app, &id).await;
        assert_eq!(c["status"], "cancelled");
        assert_eq!(c["counts"]["cancelled"], 2 * d.ids.len() as u64, "{c}");
        app.post(
            &format!("/campaigns/{id}/cancel"),
            &app.admin,
            "application/json",
            "",
        )
        .await
        .expect(409);
        assert!(mails_to(&d.emails).is_empty());
    })
    .await;
}

async fn requests_are_checked_and_idempotent(engine: Engine) {
    with_provider(engine, MockConfig::default(), |app, _sms| async move {
        let d = doctors(3, |_| "");
        load(&app, &d).await;
        let post = |body: Value| {
            let app = &app;
            async move {
                app.post(
                    "/campaigns",
                    &app.admin,
                    "application/json",
                    &body.to_string(),
                )
                .await
            }
        };
        let mut bad = campaign("x", &["email"], json!({"all": true}));
        bad["templates"]["text"] = json!("Hello {{patient.name}}");
        let p = post(bad).await.problem(422);
        assert!(
            p["detail"].as_str().unwrap_or("").contains("patient.name"),
            "{p}"
        );
        let mut long = campaign("x", &["sms"], json!({"all": true}));
        long["templates"]["sms"] = json!("x".repeat(153 * 10 + 1));
        let p = post(long).await.problem(422);
        assert!(
            p["detail"].as_str().unwrap_or("").contains("segments"),
            "{p}"
        );
        let mut no_subject = campaign("x", &["email"], json!({"all": true}));
        no_subject["templates"]
            .as_object_mut()
            .map(|t| t.remove("subject"));
        let p = post(no_subject).await.problem(422);
        assert!(
            p["detail"].as_str().unwrap_or("").contains("subject"),
            "{p}"
        );
        post(campaign("x", &["email"], json!({"site": "site-999"})))
            .await
            .problem(422);
        post(campaign("x", &["fax"], json!({"all": true})))
            .await
            .problem(422);

        // Roles: a monitor reads, does not send.
        let monitor = app.token("monitor", None, None).await;
        app.post(
            "/campaigns",
            &monitor,
            "application/json",
            &campaign("x", &["email"], json!({"all": true})).to_string(),
        )
        .await
        .expect(403);

        // The same Idempotency-Key answers the same campaign, writing nothing.
        let body = campaign("Once", &["email"], json!({"specialty": "cardiology"})).to_string();
        let send = || {
            app.send(
                app.request(reqwest::Method::POST, "/campaigns", &app.admin)
                    .header("content-type", "application/json")
                    .header("idempotency-key", "k-1")
                    .body(body.clone()),
            )
        };
        let first = send().await;
        first.expect(202);
        let second = send().await;
        second.expect(202);
        assert_eq!(first.json()["id"], second.json()["id"]);
        assert_eq!(second.header("idempotent-replayed"), Some("true"));
        let cardiologists = (0..d.ids.len()).filter(|i| i % 2 == 0).count() as u64;
        assert_eq!(second.json()["total"], cardiologists);
        let id = first.json()["id"].as_str().unwrap_or("").to_string();
        app.get(&format!("/campaigns/{id}"), &monitor)
            .await
            .expect(200);
        let list = app.get("/campaigns", &monitor).await.json();
        assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
        let _ = finished(&app, &id).await;
    })
    .await;
}

/// A real `clinflow serve` killed with SIGKILL while it sends, then
/// restarted: the campaign finishes, nobody gets anything twice.
async fn killing_the_server_mid_campaign_finishes_it_without_duplicates(engine: Engine) {
    let mock = MockConfig {
        latency: Duration::from_millis(10),
        ..Default::default()
    };
    with_provider(engine, mock, |app, sms| async move {
        let d = doctors(300, |_| "");
        load(&app, &d).await;
        // The in-process server of the harness sends nothing here.
        let mut app = app;
        app.signal_shutdown();
        app.stopped().await.expect("the harness server stops");
        let dir = tempfile::tempdir().expect("a temp dir");
        let token = "kill-test-admin";
        let start = |port: u16| {
            tokio::process::Command::new(crate::helpers::clinflow_bin())
                .arg("--database")
                .arg(&app.db_url)
                .arg("--data-dir")
                .arg(dir.path())
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--smtp-url", &format!("smtp://127.0.0.1:{}", smtp().port)])
                .args(["--smtp-from", "CARDIO-01 <trials@clinflow.test>"])
                .args(["--sms-base-url", &sms.base_url()])
                .args(["--sms-account-sid", &MockConfig::default().account_sid])
                .args(["--sms-auth-token", &MockConfig::default().auth_token])
                .args(["--sms-from", SMS_FROM])
                .args(["--email-rate", "150", "--sms-rate", "150"])
                .args(["--email-send-timeout", "2000", "--sms-send-timeout", "2000"])
                .args(["--notify-retry-base", "50", "--notify-poll", "50"])
                .env("CLINFLOW_ADMIN_TOKEN", token)
                .env("RUST_LOG", "warn")
                .env_remove("CLINFLOW_DATABASE")
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("clinflow serve starts")
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a port")
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let up = |base: String| async move {
            let deadline = Instant::now() + DEADLINE;
            while !reqwest::get(format!("{base}/healthz"))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                assert!(Instant::now() < deadline, "clinflow serve did not come up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let client = reqwest::Client::new();
        let status = |id: String| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                client
                    .get(format!("{base}/campaigns/{id}"))
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("GET")
                    .json::<Value>()
                    .await
                    .expect("JSON")
            }
        };
        let mut child = start(port);
        up(base.clone()).await;
        let r = client
            .post(format!("{base}/campaigns"))
            .bearer_auth(token)
            .json(&campaign("Crash", &["email", "sms"], json!({"all": true})))
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status(), 202);
        let id = r.json::<Value>().await.expect("JSON")["id"]
            .as_str()
            .unwrap_or("")
            .to_string();
        // Kill it once about a fifth is out.
        let deadline = Instant::now() + DEADLINE;
        loop {
            let c = status(id.clone()).await;
            if c["progress"].as_f64().unwrap_or(0.0) >= 0.2 {
                break;
            }
            assert!(Instant::now() < deadline, "{c}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        child.kill().await.expect("SIGKILL");
        let at_kill = mails_to(&d.emails).len();
        assert!(at_kill < d.emails.len(), "killed before the end");
        // The e-mails the dead process left `sending`: claimed, and sent or
        // not, their outcome never written.
        let left_sending: std::collections::BTreeSet<String> = {
            let store = crate::helpers::open_store(&app.db_url).await;
            store
                .deliveries(clinflow_store::DeliveryFilter {
                    campaign: id.clone(),
                    status: Some(clinflow_store::DeliveryStatus::Sending),
                    after: None,
                    limit: 10_000,
                })
                .await
                .expect("deliveries")
                .into_iter()
                .filter(|r| r.channel == clinflow_store::Channel::Email)
                .map(|r| r.id)
                .collect()
        };

        let _child = start(port);
        up(base.clone()).await;
        let deadline = Instant::now() + DEADLINE;
        let c = loop {
            let c = status(id.clone()).await;
            if c["status"] == "completed" && c["by_channel"]["sms"]["sent"] == 0 {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "not finished after the restart: {c}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        // Nobody got anything twice.
        let mails = mails_to(&d.emails);
        let per = count_by(mails.iter().map(|m| m.headers["to"].as_str()));
        assert!(per.values().all(|&k| k == 1), "a duplicate e-mail: {per:?}");
        let texts: Vec<_> = sms
            .messages()
            .into_iter()
            .filter(|m| d.phones.contains(&m.to))
            .collect();
        let per_sms = count_by(texts.iter().map(|m| m.to.as_str()));
        assert!(per_sms.values().all(|&k| k == 1), "a duplicate SMS");
        // Every SMS ends delivered (an interrupted one is looked up at the
        // provider); an e-mail interrupted mid-send cannot be looked up and
        // ends failed as "outcome unknown": exactly those the dead process
        // left sending; so does one whose reply did not come within the
        // send timeout (2 s here, on a busy test machine).
        assert_eq!(
            c["by_channel"]["sms"]["delivered"],
            d.phones.len() as u64,
            "{c}"
        );
        let sent = c["by_channel"]["email"]["sent"].as_u64().unwrap_or(0);
        let failed = c["by_channel"]["email"]["failed"].as_u64().unwrap_or(0);
        assert_eq!(sent + failed, d.emails.len() as u64, "{c}");
        let rows = {
            let (client, base) = (client.clone(), base.clone());
            client
                .get(format!(
                    "{base}/campaigns/{id}/deliveries?status=failed&count=1000"
                ))
                .bearer_auth(token)
                .send()
                .await
                .expect("GET")
                .json::<Value>()
                .await
                .expect("JSON")
        };
        let mut interrupted = std::collections::BTreeSet::new();
        for r in rows["items"].as_array().into_iter().flatten() {
            let reason = r["last_error"].as_str().unwrap_or("");
            assert!(reason.starts_with("outcome unknown"), "{r}");
            if reason.contains("interrupted") {
                interrupted.insert(r["id"].as_str().unwrap_or("").to_string());
            }
        }
        assert_eq!(interrupted, left_sending);
        assert!(mails.len() as u64 >= sent && mails.len() as u64 <= sent + failed);
    })
    .await;
}
