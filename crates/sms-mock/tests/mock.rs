//! The mock against a real HTTP client, in-process.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus, Uri};
use axum::routing::post;
use axum::{Form, Router};
use clinflow_sms_mock::{signature, MockConfig, MockSms, SentMessage, Stats};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("address")
}

async fn start(cfg: MockConfig) -> MockSms {
    MockSms::start(any_port(), cfg).await.expect("mock starts")
}

fn messages_url(mock: &MockSms, account: &str) -> String {
    format!(
        "{}/2010-04-01/Accounts/{account}/Messages.json",
        mock.base_url()
    )
}

/// POSTs a message with the mock's credentials.
async fn send(client: &Client, mock: &MockSms, params: &[(&str, &str)]) -> reqwest::Response {
    let cfg = mock.config();
    client
        .post(messages_url(mock, &cfg.account_sid))
        .basic_auth(&cfg.account_sid, Some(&cfg.auth_token))
        .form(params)
        .send()
        .await
        .expect("request")
}

async fn get_authed(client: &Client, mock: &MockSms, url: &str) -> reqwest::Response {
    let cfg = mock.config();
    client
        .get(url)
        .basic_auth(&cfg.account_sid, Some(&cfg.auth_token))
        .send()
        .await
        .expect("request")
}

async fn body_json(response: reqwest::Response) -> Value {
    response.json().await.expect("JSON body")
}

/// Polls `check` until it holds, at most [`WAIT`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn twilio_error(code: u32, message: &str, status: u16) -> Value {
    json!({
        "code": code,
        "message": message,
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status,
    })
}

#[tokio::test]
async fn created_message_has_twilio_shape() {
    let mock = start(MockConfig::default()).await;
    let client = Client::new();
    let response = send(
        &client,
        &mock,
        &[
            ("To", "+15551230001"),
            ("From", "+15559870000"),
            ("Body", "Visit 3 is due on Monday"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let m = body_json(response).await;

    let sid = m["sid"].as_str().expect("sid");
    assert_eq!(sid.len(), 34, "{sid}");
    assert!(sid.starts_with("SM"));
    assert!(sid[2..]
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    let account = mock.config().account_sid;
    assert_eq!(m["account_sid"], account.as_str());
    assert_eq!(m["to"], "+15551230001");
    assert_eq!(m["from"], "+15559870000");
    assert_eq!(m["body"], "Visit 3 is due on Monday");
    assert_eq!(m["status"], "queued");
    assert_eq!(m["num_segments"], "1");
    assert_eq!(m["direction"], "outbound-api");
    assert_eq!(m["api_version"], "2010-04-01");
    for null in ["error_code", "error_message", "price"] {
        assert!(m[null].is_null(), "{null}: {}", m[null]);
    }
    for date in ["date_created", "date_updated", "date_sent"] {
        let text = m[date].as_str().expect(date);
        let parsed = OffsetDateTime::parse(text, &Rfc2822).expect(date);
        assert!(text.ends_with(" +0000"), "{date}: {text}");
        assert!((OffsetDateTime::now_utc() - parsed).whole_minutes().abs() < 5);
    }
    assert_eq!(
        m["uri"],
        format!("/2010-04-01/Accounts/{account}/Messages/{sid}.json")
    );

    let stored = mock.messages();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].sid, sid);
    assert_eq!(stored[0].to, "+15551230001");
    assert_eq!(stored[0].from, "+15559870000");
    assert_eq!(stored[0].status_callback, None);
    assert_eq!(mock.stats().accepted, 1);

    // Long bodies: GSM-7 concatenation is 153 characters a segment.
    let long = "x".repeat(400);
    let m = body_json(
        send(
            &client,
            &mock,
            &[
                ("To", "+15551230001"),
                ("From", "+15559870000"),
                ("Body", &long),
            ],
        )
        .await,
    )
    .await;
    assert_eq!(m["num_segments"], "3");
    mock.shutdown().await;
}

#[tokio::test]
async fn messaging_service_sid_stands_in_for_from() {
    let mock = start(MockConfig::default()).await;
    let client = Client::new();
    let response = send(
        &client,
        &mock,
        &[
            ("To", "+15551230001"),
            ("MessagingServiceSid", "MG00000000000000000000000000000000"),
            ("Body", "hi"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let m = body_json(response).await;
    assert!(m["from"].is_null());
    assert_eq!(
        m["messaging_service_sid"],
        "MG00000000000000000000000000000000"
    );

    let response = send(&client, &mock, &[("To", "+15551230001"), ("Body", "hi")]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        body_json(response).await,
        twilio_error(21603, "A 'From' phone number is required.", 400)
    );
    mock.shutdown().await;
}

#[tokio::test]
async fn unauthenticated_and_other_account_are_refused() {
    let mock = start(MockConfig::default()).await;
    let client = Client::new();
    let cfg = mock.config();
    let params = [
        ("To", "+15551230001"),
        ("From", "+15559870000"),
        ("Body", "hi"),
    ];

    let response = client
        .post(messages_url(&mock, &cfg.account_sid))
        .form(&params)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        body_json(response).await,
        twilio_error(20003, "Authenticate", 401)
    );

    let response = client
        .post(messages_url(&mock, &cfg.account_sid))
        .basic_auth(&cfg.account_sid, Some("wrong-token"))
        .form(&params)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(body_json(response).await["code"], 20003);

    let other = "AC11111111111111111111111111111111";
    let response = client
        .post(messages_url(&mock, other))
        .basic_auth(&cfg.account_sid, Some(&cfg.auth_token))
        .form(&params)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let error = body_json(response).await;
    assert_eq!(error["code"], 20404);
    assert_eq!(error["status"], 404);

    let stats = mock.stats();
    assert_eq!(stats.rejected_401, 2);
    assert_eq!(stats.rejected_404, 1);
    assert_eq!(stats.accepted, 0);
    assert!(mock.messages().is_empty());
    mock.shutdown().await;
}

#[tokio::test]
async fn invalid_requests_get_twilio_400s() {
    let mock = start(MockConfig::default()).await;
    let client = Client::new();
    let from = ("From", "+15559870000");

    let response = send(&client, &mock, &[("To", "5551234"), from, ("Body", "hi")]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        body_json(response).await,
        twilio_error(
            21211,
            "The 'To' number 5551234 is not a valid phone number.",
            400
        )
    );

    for bad in [
        "+0123456789",
        "+1234567",
        "+1234567890123456",
        "+1555abc4567",
    ] {
        let response = send(&client, &mock, &[("To", bad), from, ("Body", "hi")]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body_json(response).await["code"], 21211, "{bad}");
    }

    let response = send(&client, &mock, &[from, ("Body", "hi")]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        body_json(response).await,
        twilio_error(21604, "A 'To' phone number is required.", 400)
    );

    let response = send(&client, &mock, &[("To", "+15551230001"), from]).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        body_json(response).await,
        twilio_error(21602, "Message body is required.", 400)
    );

    let too_long = "é".repeat(1601);
    let response = send(
        &client,
        &mock,
        &[("To", "+15551230001"), from, ("Body", &too_long)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body_json(response).await["code"], 21617);

    // 1600 characters (not bytes) is still fine.
    let longest = "é".repeat(1600);
    let response = send(
        &client,
        &mock,
        &[("To", "+15551230001"), from, ("Body", &longest)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);

    let stats = mock.stats();
    assert_eq!(stats.rejected_400, 8);
    assert_eq!(stats.accepted, 1);
    mock.shutdown().await;
}

#[tokio::test]
async fn requests_over_the_concurrency_limit_get_429() {
    let mock = start(MockConfig {
        max_concurrent: 2,
        // Long enough that the two admitted requests are surely still in
        // flight while the three others are answered (at once).
        latency: Duration::from_secs(2),
        ..MockConfig::default()
    })
    .await;
    let client = Client::new();
    let params = [
        ("To", "+15551230001"),
        ("From", "+15559870000"),
        ("Body", "hi"),
    ];

    let admitted: Vec<_> = (0..2)
        .map(|_| {
            let (client, mock_url, cfg) = (client.clone(), mock.base_url(), mock.config());
            tokio::spawn(async move {
                client
                    .post(format!(
                        "{mock_url}/2010-04-01/Accounts/{}/Messages.json",
                        cfg.account_sid
                    ))
                    .basic_auth(&cfg.account_sid, Some(&cfg.auth_token))
                    .form(&params)
                    .send()
                    .await
                    .expect("request")
                    .status()
            })
        })
        .collect();
    wait_until("two requests in flight", || async {
        mock.stats().in_flight == 2
    })
    .await;

    let rejected = futures_join3(
        send(&client, &mock, &params),
        send(&client, &mock, &params),
        send(&client, &mock, &params),
    )
    .await;
    for response in rejected {
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(response.headers().get("retry-after").is_none());
        assert_eq!(
            body_json(response).await,
            twilio_error(20429, "Too Many Requests", 429)
        );
    }
    for task in admitted {
        assert_eq!(task.await.expect("task"), StatusCode::CREATED);
    }
    let stats = mock.stats();
    assert_eq!(stats.rejected_429, 3);
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.max_in_flight_seen, 2);
    assert_eq!(stats.in_flight, 0);

    // With the header configured (and no slot at all, to be quick).
    mock.set_config(|c| {
        c.max_concurrent = 0;
        c.retry_after_header = Some(1);
    });
    let response = send(&client, &mock, &params).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(mock.stats().rejected_429, 4);
    mock.shutdown().await;
}

/// Three futures at once (no `futures` dependency).
async fn futures_join3<A: Future>(a: A, b: A, c: A) -> [A::Output; 3] {
    let (a, b, c) = tokio::join!(a, b, c);
    [a, b, c]
}

#[tokio::test]
async fn transient_numbers_get_503s_then_are_accepted() {
    let flaky = "+15551230009";
    let mock = start(MockConfig {
        transient: HashMap::from([(flaky.to_owned(), 2)]),
        ..MockConfig::default()
    })
    .await;
    let client = Client::new();
    let params = [("To", flaky), ("From", "+15559870000"), ("Body", "hi")];

    for _ in 0..2 {
        let response = send(&client, &mock, &params).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body_json(response).await,
            twilio_error(20500, "Internal Server Error", 503)
        );
    }
    assert_eq!(
        send(&client, &mock, &params).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        send(&client, &mock, &params).await.status(),
        StatusCode::CREATED
    );
    // Other numbers are not affected.
    let other = [
        ("To", "+15551230001"),
        ("From", "+15559870000"),
        ("Body", "hi"),
    ];
    assert_eq!(
        send(&client, &mock, &other).await.status(),
        StatusCode::CREATED
    );

    let stats = mock.stats();
    assert_eq!(stats.transient_503, 2);
    assert_eq!(stats.accepted, 3);

    // A new script starts counting again.
    mock.set_config(|c| {
        c.transient.insert(flaky.to_owned(), 1);
    });
    assert_eq!(
        send(&client, &mock, &params).await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        send(&client, &mock, &params).await.status(),
        StatusCode::CREATED
    );
    mock.shutdown().await;
}

/// What the test's callback receiver got.
#[derive(Debug)]
struct Callback {
    url: String,
    signature: Option<String>,
    params: Vec<(String, String)>,
}

impl Callback {
    fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
struct Receiver {
    base: String,
    tx: mpsc::UnboundedSender<Callback>,
    answer: AxumStatus,
}

/// A status-callback receiver answering `answer`; returns its base URL.
async fn receiver(answer: AxumStatus) -> (String, mpsc::UnboundedReceiver<Callback>) {
    let listener = tokio::net::TcpListener::bind(any_port())
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Receiver {
        base: base.clone(),
        tx,
        answer,
    };
    async fn status(
        State(r): State<Receiver>,
        uri: Uri,
        headers: HeaderMap,
        Form(params): Form<Vec<(String, String)>>,
    ) -> AxumStatus {
        let _ = r.tx.send(Callback {
            url: format!("{}{uri}", r.base),
            signature: headers
                .get("x-twilio-signature")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            params,
        });
        r.answer
    }
    let app = Router::new()
        .route("/status", post(status))
        .with_state(state);
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, rx)
}

async fn next_callback(rx: &mut mpsc::UnboundedReceiver<Callback>) -> Callback {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a callback in time")
        .expect("receiver running")
}

#[tokio::test]
async fn status_callbacks_are_signed_and_in_order() {
    let (base, mut rx) = receiver(AxumStatus::NO_CONTENT).await;
    let bounced = "+15551230066";
    let mock = start(MockConfig {
        undeliverable: [bounced.to_owned()].into(),
        ..MockConfig::default()
    })
    .await;
    let client = Client::new();
    let cfg = mock.config();
    let callback_url = format!("{base}/status?campaign=7&n=1");

    let m = body_json(
        send(
            &client,
            &mock,
            &[
                ("To", "+15551230001"),
                ("From", "+15559870000"),
                ("Body", "Your visit is tomorrow"),
                ("StatusCallback", &callback_url),
            ],
        )
        .await,
    )
    .await;
    let sid = m["sid"].as_str().expect("sid").to_owned();
    assert_eq!(
        mock.messages()[0].status_callback.as_deref(),
        Some(&*callback_url)
    );

    for expected in ["sent", "delivered"] {
        let cb = next_callback(&mut rx).await;
        assert_eq!(cb.url, callback_url);
        let sig = cb.signature.as_deref().expect("X-Twilio-Signature");
        assert_eq!(sig, signature(&cfg.auth_token, &callback_url, &cb.params));
        assert_ne!(sig, signature("another-token", &callback_url, &cb.params));
        assert_eq!(cb.param("MessageStatus"), Some(expected));
        assert_eq!(cb.param("SmsStatus"), Some(expected));
        assert_eq!(cb.param("MessageSid"), Some(&*sid));
        assert_eq!(cb.param("SmsSid"), Some(&*sid));
        assert_eq!(cb.param("AccountSid"), Some(&*cfg.account_sid));
        assert_eq!(cb.param("From"), Some("+15559870000"));
        assert_eq!(cb.param("To"), Some("+15551230001"));
        assert_eq!(cb.param("ApiVersion"), Some("2010-04-01"));
        assert_eq!(cb.param("ErrorCode"), None);
    }
    wait_until("two callbacks counted", || async {
        mock.stats().callbacks_ok == 2
    })
    .await;
    let fetched = body_json(
        get_authed(
            &client,
            &mock,
            &format!(
                "{}/2010-04-01/Accounts/{}/Messages/{sid}.json",
                mock.base_url(),
                cfg.account_sid
            ),
        )
        .await,
    )
    .await;
    assert_eq!(fetched["status"], "delivered");
    assert_eq!(mock.messages()[0].status, "delivered");

    // An undeliverable number: the last status is `undelivered`, with 30003.
    send(
        &client,
        &mock,
        &[
            ("To", bounced),
            ("From", "+15559870000"),
            ("Body", "hi"),
            ("StatusCallback", &callback_url),
        ],
    )
    .await;
    let sent = next_callback(&mut rx).await;
    assert_eq!(sent.param("MessageStatus"), Some("sent"));
    assert_eq!(sent.param("ErrorCode"), None);
    let undelivered = next_callback(&mut rx).await;
    assert_eq!(undelivered.param("MessageStatus"), Some("undelivered"));
    assert_eq!(undelivered.param("ErrorCode"), Some("30003"));
    assert_eq!(
        undelivered.signature.as_deref(),
        Some(&*signature(
            &cfg.auth_token,
            &callback_url,
            &undelivered.params
        ))
    );
    wait_until("four callbacks counted", || async {
        mock.stats().callbacks_ok == 4
    })
    .await;
    let bounced_message = mock.messages().pop().expect("message");
    assert_eq!(bounced_message.status, "undelivered");
    let stats = mock.stats();
    assert_eq!(stats.callbacks_failed, 0);
    mock.shutdown().await;
}

#[tokio::test]
async fn failed_callbacks_are_retried_then_counted() {
    let (base, mut rx) = receiver(AxumStatus::INTERNAL_SERVER_ERROR).await;
    let mock = start(MockConfig {
        callback_statuses: vec!["sent".to_owned()],
        ..MockConfig::default()
    })
    .await;
    let client = Client::new();
    let url = format!("{base}/status");
    send(
        &client,
        &mock,
        &[
            ("To", "+15551230001"),
            ("From", "+15559870000"),
            ("Body", "hi"),
            ("StatusCallback", &url),
        ],
    )
    .await;
    // One attempt and three retries, all of the same callback.
    for _ in 0..4 {
        assert_eq!(
            next_callback(&mut rx).await.param("MessageStatus"),
            Some("sent")
        );
    }
    wait_until("the failure counted", || async {
        mock.stats().callbacks_failed == 1
    })
    .await;
    assert_eq!(mock.stats().callbacks_ok, 0);
    assert!(rx.try_recv().is_err(), "no fifth attempt");

    // Nobody listening at all: also a failure, not a hang.
    let closed = tokio::net::TcpListener::bind(any_port())
        .await
        .expect("bind");
    let dead = format!("http://{}/status", closed.local_addr().expect("addr"));
    drop(closed);
    send(
        &client,
        &mock,
        &[
            ("To", "+15551230002"),
            ("From", "+15559870000"),
            ("Body", "hi"),
            ("StatusCallback", &dead),
        ],
    )
    .await;
    wait_until("the second failure counted", || async {
        mock.stats().callbacks_failed == 2
    })
    .await;
    mock.shutdown().await;
}

#[tokio::test]
async fn fetch_and_list_messages() {
    let mock = start(MockConfig {
        latency: Duration::ZERO,
        ..MockConfig::default()
    })
    .await;
    let client = Client::new();
    let cfg = mock.config();
    let (a, b) = ("+15551230001", "+15551230002");
    let mut sids = Vec::new();
    for (to, body) in [(a, "first"), (b, "second"), (a, "third")] {
        let m = body_json(
            send(
                &client,
                &mock,
                &[("To", to), ("From", "+15559870000"), ("Body", body)],
            )
            .await,
        )
        .await;
        sids.push(m["sid"].as_str().expect("sid").to_owned());
    }
    let list_url = messages_url(&mock, &cfg.account_sid);
    let message_url = |sid: &str| {
        format!(
            "{}/2010-04-01/Accounts/{}/Messages/{sid}.json",
            mock.base_url(),
            cfg.account_sid
        )
    };

    // Fetch: the message, its status moving on even without a callback URL.
    let response = get_authed(&client, &mock, &message_url(&sids[1])).await;
    assert_eq!(response.status(), StatusCode::OK);
    let m = body_json(response).await;
    assert_eq!(m["sid"], sids[1].as_str());
    assert_eq!(m["to"], b);
    assert_eq!(m["body"], "second");
    wait_until("delivered without a callback", || async {
        body_json(get_authed(&client, &mock, &message_url(&sids[1])).await).await["status"]
            == "delivered"
    })
    .await;

    let response = get_authed(
        &client,
        &mock,
        &message_url("SM00000000000000000000000000000000"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(body_json(response).await["code"], 20404);
    let response = client
        .get(message_url(&sids[0]))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // List: newest first, filtered.
    let list = body_json(get_authed(&client, &mock, &list_url).await).await;
    let listed: Vec<&str> = list["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["sid"].as_str().expect("sid"))
        .collect();
    assert_eq!(listed, [&*sids[2], &*sids[1], &*sids[0]]);
    assert_eq!(list["page"], 0);
    assert_eq!(list["page_size"], 50);
    assert!(list["next_page_uri"].is_null());
    assert_eq!(
        list["uri"],
        format!("/2010-04-01/Accounts/{}/Messages.json", cfg.account_sid)
    );

    let to_a =
        body_json(get_authed(&client, &mock, &format!("{list_url}?To=%2B15551230001")).await).await;
    let bodies: Vec<&str> = to_a["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["body"].as_str().expect("body"))
        .collect();
    assert_eq!(bodies, ["third", "first"]);

    // The creation day, as the mock saw it (not "today" here, which could be
    // the next day already).
    let created = mock.messages()[0].created_ms;
    let day = OffsetDateTime::from_unix_timestamp_nanos(i128::from(created) * 1_000_000)
        .expect("time")
        .date();
    let next_day = day.next_day().expect("next day");
    let count = |v: &Value| v["messages"].as_array().map(Vec::len).expect("messages");

    // `DateSent>=DAY`, as reqwest sends it (`>` percent-encoded).
    let url = format!("{list_url}?DateSent>={day}&PageSize=2");
    let page = body_json(get_authed(&client, &mock, &url).await).await;
    assert_eq!(count(&page), 2);
    assert_eq!(page["page_size"], 2);
    assert_eq!(page["messages"][0]["sid"], sids[2].as_str());
    let next = page["next_page_uri"].as_str().expect("a next page");
    let page2 =
        body_json(get_authed(&client, &mock, &format!("{}{next}", mock.base_url())).await).await;
    assert_eq!(count(&page2), 1);
    assert_eq!(page2["page"], 1);
    assert_eq!(page2["messages"][0]["sid"], sids[0].as_str());
    assert!(page2["next_page_uri"].is_null());

    let later = format!("{list_url}?DateSent>={next_day}");
    assert_eq!(
        count(&body_json(get_authed(&client, &mock, &later).await).await),
        0
    );
    let that_day = format!("{list_url}?DateSent={day}&From=%2B15559870000&To=%2B15551230002");
    let only_b = body_json(get_authed(&client, &mock, &that_day).await).await;
    assert_eq!(count(&only_b), 1);
    assert_eq!(only_b["messages"][0]["body"], "second");

    // Written by hand: `>` percent-encoded, `=` and the date as they are.
    // (A literal `>` cannot reach the mock: hyper's URI parser answers 400
    // itself, as the WHATWG URL rules want `>` encoded in a query.)
    let auth = base64_basic(&cfg.account_sid, &cfg.auth_token);
    let raw_count = |raw: String| {
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        let json_start = raw.find("\r\n\r\n").expect("head") + 4;
        let page: Value = serde_json::from_str(&raw[json_start..]).expect("JSON");
        count(&page)
    };
    let target = |day| {
        format!(
            "/2010-04-01/Accounts/{}/Messages.json?DateSent%3E={day}&PageSize=5",
            cfg.account_sid
        )
    };
    assert_eq!(
        raw_count(raw_get(mock.addr(), &target(day), &auth).await),
        3
    );
    assert_eq!(
        raw_count(raw_get(mock.addr(), &target(next_day), &auth).await),
        0
    );

    let response = get_authed(&client, &mock, &format!("{list_url}?DateSent>=tomorrow")).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    mock.shutdown().await;
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// A GET written by hand, so that the request target is sent exactly as given.
async fn raw_get(addr: SocketAddr, target: &str, basic: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("answer in time")
        .expect("read");
    response
}

#[tokio::test]
async fn inspection_endpoints_need_no_auth() {
    let mock = start(MockConfig::default()).await;
    let client = Client::new();
    let response = send(
        &client,
        &mock,
        &[
            ("To", "+15551230001"),
            ("From", "+15559870000"),
            ("Body", "hi"),
        ],
    )
    .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    send(
        &client,
        &mock,
        &[("To", "nope"), ("From", "+15559870000"), ("Body", "hi")],
    )
    .await;

    let messages: Vec<SentMessage> = client
        .get(format!("{}/mock/messages", mock.base_url()))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON");
    assert_eq!(messages, mock.messages());
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].body, "hi");

    let stats_json: Value = client
        .get(format!("{}/mock/stats", mock.base_url()))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON");
    for key in [
        "accepted",
        "rejected_429",
        "rejected_400",
        "rejected_401",
        "transient_503",
        "max_in_flight_seen",
        "callbacks_ok",
        "callbacks_failed",
    ] {
        assert!(stats_json[key].is_u64(), "{key} in {stats_json}");
    }
    let stats: Stats = serde_json::from_value(stats_json).expect("Stats");
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.rejected_400, 1);
    assert_eq!(stats.max_in_flight_seen, 1);

    let response = client
        .get(format!("{}/2010-04-01/Nothing", mock.base_url()))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(body_json(response).await["code"], 20404);

    let addr = mock.addr();
    mock.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
