//! The HTTP side: routes, handlers, state and the status-callback sender.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use serde::Serialize;
use time::format_description::well_known::Rfc2822;
use time::{Date, OffsetDateTime};
use tokio::sync::Semaphore;

use crate::{form, signature, MockConfig, SentMessage, Stats};

const API_VERSION: &str = "2010-04-01";
/// Status callbacks being sent at once, all messages together.
const CALLBACK_CONCURRENCY: usize = 64;
/// Retries of a failed status callback (so 1 + this many attempts).
const CALLBACK_RETRIES: u32 = 3;
const CALLBACK_BACKOFF: Duration = Duration::from_millis(50);
const CALLBACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Twilio's error for a message that could not be delivered (30003:
/// "Unreachable destination handset").
const UNDELIVERED_ERROR_CODE: u32 = 30003;
const MAX_BODY_CHARS: usize = 1600;
const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 1000;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/2010-04-01/Accounts/{account_sid}/Messages.json",
            get(list_messages).post(create_message),
        )
        .route(
            "/2010-04-01/Accounts/{account_sid}/Messages/{message}",
            get(fetch_message),
        )
        .route("/mock/messages", get(mock_messages))
        .route("/mock/stats", get(mock_stats))
        .fallback(not_found)
        .with_state(shared)
}

/// State shared by the handlers, the callback tasks and [`crate::MockSms`].
pub(crate) struct Shared {
    cfg: Mutex<Arc<MockConfig>>,
    store: Mutex<Store>,
    in_flight: AtomicUsize,
    closed: AtomicBool,
    counters: Counters,
    http: reqwest::Client,
    callback_permits: Arc<Semaphore>,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    rejected_429: AtomicU64,
    rejected_400: AtomicU64,
    rejected_401: AtomicU64,
    rejected_404: AtomicU64,
    transient_503: AtomicU64,
    max_in_flight_seen: AtomicU64,
    callbacks_ok: AtomicU64,
    callbacks_failed: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[derive(Default)]
struct Store {
    /// In acceptance order.
    messages: Vec<Message>,
    by_sid: HashMap<String, usize>,
    /// 503s already answered per `To` number (see `MockConfig::transient`).
    transient_given: HashMap<String, u32>,
}

#[derive(Clone)]
struct Message {
    sid: String,
    account_sid: String,
    to: String,
    from: Option<String>,
    messaging_service_sid: Option<String>,
    body: String,
    status_callback: Option<String>,
    num_segments: u32,
    created: OffsetDateTime,
    updated: OffsetDateTime,
    status: String,
    error_code: Option<u32>,
}

impl Message {
    fn created_ms(&self) -> i64 {
        i64::try_from(self.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
    }

    fn sent(&self) -> SentMessage {
        SentMessage {
            sid: self.sid.clone(),
            to: self.to.clone(),
            from: self.from.clone().unwrap_or_default(),
            body: self.body.clone(),
            status_callback: self.status_callback.clone(),
            created_ms: self.created_ms(),
            status: self.status.clone(),
        }
    }

    fn resource(&self) -> MessageResource<'_> {
        let error_message = self.error_code.map(|code| match code {
            UNDELIVERED_ERROR_CODE => "Unreachable destination handset",
            _ => "Unknown error",
        });
        MessageResource {
            account_sid: &self.account_sid,
            api_version: API_VERSION,
            body: &self.body,
            date_created: rfc2822(self.created),
            date_sent: rfc2822(self.created),
            date_updated: rfc2822(self.updated),
            direction: "outbound-api",
            error_code: self.error_code,
            error_message,
            from: self.from.as_deref(),
            messaging_service_sid: self.messaging_service_sid.as_deref(),
            num_media: "0",
            num_segments: self.num_segments.to_string(),
            price: None,
            price_unit: "USD",
            sid: &self.sid,
            status: &self.status,
            subresource_uris: SubresourceUris {
                media: format!(
                    "/{API_VERSION}/Accounts/{}/Messages/{}/Media.json",
                    self.account_sid, self.sid
                ),
            },
            to: &self.to,
            uri: format!(
                "/{API_VERSION}/Accounts/{}/Messages/{}.json",
                self.account_sid, self.sid
            ),
        }
    }
}

/// Twilio's Message resource JSON.
#[derive(Serialize)]
struct MessageResource<'a> {
    account_sid: &'a str,
    api_version: &'static str,
    body: &'a str,
    date_created: String,
    date_sent: String,
    date_updated: String,
    direction: &'static str,
    error_code: Option<u32>,
    error_message: Option<&'static str>,
    from: Option<&'a str>,
    messaging_service_sid: Option<&'a str>,
    num_media: &'static str,
    num_segments: String,
    price: Option<&'static str>,
    price_unit: &'static str,
    sid: &'a str,
    status: &'a str,
    subresource_uris: SubresourceUris,
    to: &'a str,
    uri: String,
}

#[derive(Serialize)]
struct SubresourceUris {
    media: String,
}

#[derive(Serialize)]
struct MessagePage<'a> {
    end: usize,
    first_page_uri: String,
    messages: Vec<MessageResource<'a>>,
    next_page_uri: Option<String>,
    page: usize,
    page_size: usize,
    previous_page_uri: Option<String>,
    start: usize,
    uri: String,
}

/// Twilio's error JSON.
#[derive(Serialize)]
struct TwilioError<'a> {
    code: u32,
    message: Cow<'a, str>,
    more_info: String,
    status: u16,
}

fn rfc2822(t: OffsetDateTime) -> String {
    t.format(&Rfc2822).unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One API request in flight; counted down when dropped.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Shared {
    pub(crate) fn new(cfg: MockConfig) -> anyhow::Result<Shared> {
        let http = reqwest::Client::builder()
            .timeout(CALLBACK_TIMEOUT)
            .user_agent("TwilioProxy/1.1")
            .build()?;
        Ok(Shared {
            cfg: Mutex::new(Arc::new(cfg)),
            store: Mutex::new(Store::default()),
            in_flight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            http,
            callback_permits: Arc::new(Semaphore::new(CALLBACK_CONCURRENCY)),
        })
    }

    pub(crate) fn config(&self) -> Arc<MockConfig> {
        lock(&self.cfg).clone()
    }

    pub(crate) fn set_config(&self, f: impl FnOnce(&mut MockConfig)) {
        let mut cfg = lock(&self.cfg);
        let mut next = MockConfig::clone(&cfg);
        f(&mut next);
        if next.transient != cfg.transient {
            lock(&self.store).transient_given.clear();
        }
        *cfg = Arc::new(next);
    }

    pub(crate) fn messages(&self) -> Vec<SentMessage> {
        lock(&self.store)
            .messages
            .iter()
            .map(Message::sent)
            .collect()
    }

    pub(crate) fn stats(&self) -> Stats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            accepted: get(&c.accepted),
            rejected_429: get(&c.rejected_429),
            rejected_400: get(&c.rejected_400),
            rejected_401: get(&c.rejected_401),
            rejected_404: get(&c.rejected_404),
            transient_503: get(&c.transient_503),
            in_flight: self.in_flight.load(Ordering::Acquire) as u64,
            max_in_flight_seen: get(&c.max_in_flight_seen),
            callbacks_ok: get(&c.callbacks_ok),
            callbacks_failed: get(&c.callbacks_failed),
        }
    }

    /// Stops status callbacks not yet sent.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.callback_permits.close();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Takes a slot among `max` in flight, or `None` when all are taken.
    fn enter(&self, max: usize) -> Option<InFlight<'_>> {
        let before = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.counters
            .max_in_flight_seen
            .fetch_max(before as u64 + 1, Ordering::Relaxed);
        Some(InFlight(&self.in_flight))
    }

    /// The start of every API request: concurrency limit, latency, basic
    /// auth, account.
    async fn admit<'a>(
        &'a self,
        cfg: &MockConfig,
        headers: &HeaderMap,
        path_account: &str,
        path: &str,
    ) -> Result<InFlight<'a>, Response> {
        let Some(slot) = self.enter(cfg.max_concurrent) else {
            bump(&self.counters.rejected_429);
            let mut response = error(StatusCode::TOO_MANY_REQUESTS, 20429, "Too Many Requests");
            if let Some(seconds) = cfg.retry_after_header {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            return Err(response);
        };
        if !cfg.latency.is_zero() {
            tokio::time::sleep(cfg.latency).await;
        }
        if !authorized(cfg, headers) {
            bump(&self.counters.rejected_401);
            let mut response = error(StatusCode::UNAUTHORIZED, 20003, "Authenticate");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"Twilio API\""),
            );
            return Err(response);
        }
        if path_account != cfg.account_sid {
            return Err(self.not_found(path));
        }
        Ok(slot)
    }

    fn not_found(&self, path: &str) -> Response {
        bump(&self.counters.rejected_404);
        resource_not_found(path)
    }

    fn bad_request(&self, code: u32, message: impl Into<Cow<'static, str>>) -> Response {
        bump(&self.counters.rejected_400);
        error(StatusCode::BAD_REQUEST, code, message)
    }
}

fn resource_not_found(path: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        20404,
        format!("The requested resource {path} was not found"),
    )
}

fn authorized(cfg: &MockConfig, headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return false;
    };
    let Some(encoded) = value.to_str().ok().and_then(|v| {
        v.strip_prefix("Basic ")
            .or_else(|| v.strip_prefix("basic "))
    }) else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return false;
    };
    let (user, password) = (&decoded[..colon], &decoded[colon + 1..]);
    user == cfg.account_sid.as_bytes() && password == cfg.auth_token.as_bytes()
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            )],
            bytes,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn error(status: StatusCode, code: u32, message: impl Into<Cow<'static, str>>) -> Response {
    json(
        status,
        &TwilioError {
            code,
            message: message.into(),
            more_info: format!("https://www.twilio.com/docs/errors/{code}"),
            status: status.as_u16(),
        },
    )
}

/// E.164: `+`, then 8 to 15 digits, the first not 0.
fn is_e164(number: &str) -> bool {
    let Some(digits) = number.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// GSM 03.38 basic character set (one septet each).
const GSM_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
/// GSM 03.38 extension table (two septets each).
const GSM_EXTENDED: &str = "^{}\\[~]|€\u{c}";

/// SMS segments the body takes: GSM-7 (160 septets, 153 when split) when
/// every character is in the GSM alphabet, else UCS-2 (70 code units, 67
/// when split).
fn num_segments(body: &str) -> u32 {
    let mut septets = 0usize;
    let mut gsm = true;
    for c in body.chars() {
        if c.is_ascii_alphanumeric() || c == ' ' || GSM_BASIC.contains(c) {
            septets += 1;
        } else if GSM_EXTENDED.contains(c) {
            septets += 2;
        } else {
            gsm = false;
            break;
        }
    }
    let (units, single, part) = if gsm {
        (septets, 160, 153)
    } else {
        (body.encode_utf16().count(), 70, 67)
    };
    let segments = if units <= single {
        1
    } else {
        units.div_ceil(part)
    };
    u32::try_from(segments).unwrap_or(u32::MAX)
}

fn new_message_sid() -> String {
    format!("SM{:032x}", rand::random::<u128>())
}

async fn create_message(
    State(s): State<Arc<Shared>>,
    Path(account_sid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cfg = s.config();
    let path = format!("/{API_VERSION}/Accounts/{account_sid}/Messages.json");
    let _slot = match s.admit(&cfg, &headers, &account_sid, &path).await {
        Ok(slot) => slot,
        Err(response) => return response,
    };

    let (mut to, mut from, mut text, mut service, mut callback) = (None, None, None, None, None);
    for (key, value) in form::pairs(&body) {
        let slot = match &*key {
            "To" => &mut to,
            "From" => &mut from,
            "Body" => &mut text,
            "MessagingServiceSid" => &mut service,
            "StatusCallback" => &mut callback,
            _ => continue,
        };
        *slot = Some(value.into_owned()).filter(|v| !v.is_empty());
    }
    let Some(to) = to else {
        return s.bad_request(21604, "A 'To' phone number is required.");
    };
    if from.is_none() && service.is_none() {
        return s.bad_request(21603, "A 'From' phone number is required.");
    }
    let Some(text) = text else {
        return s.bad_request(21602, "Message body is required.");
    };
    if !is_e164(&to) {
        return s.bad_request(
            21211,
            format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    let chars = text.chars().count();
    if chars > MAX_BODY_CHARS {
        return s.bad_request(
            21617,
            format!("The concatenated message body exceeds the {MAX_BODY_CHARS} character limit."),
        );
    }

    let now = OffsetDateTime::now_utc();
    let message = Message {
        sid: new_message_sid(),
        account_sid,
        num_segments: num_segments(&text),
        to,
        from,
        messaging_service_sid: service,
        body: text,
        status_callback: callback,
        created: now,
        updated: now,
        status: "queued".to_owned(),
        error_code: None,
    };
    let index = {
        let mut store = lock(&s.store);
        if let Some(&failures) = cfg.transient.get(&message.to) {
            let given = store.transient_given.entry(message.to.clone()).or_insert(0);
            if *given < failures {
                *given += 1;
                drop(store);
                bump(&s.counters.transient_503);
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    20500,
                    "Internal Server Error",
                );
            }
        }
        let index = store.messages.len();
        store.by_sid.insert(message.sid.clone(), index);
        store.messages.push(message.clone());
        index
    };
    bump(&s.counters.accepted);

    if !cfg.callback_statuses.is_empty() {
        let undeliverable = cfg.undeliverable.contains(&message.to);
        tokio::spawn(lifecycle(s.clone(), cfg.clone(), index, undeliverable));
    }
    if let Some(&wait) = cfg.slow_answer.get(&message.to) {
        tokio::time::sleep(wait).await;
    }
    json(StatusCode::CREATED, &message.resource())
}

async fn fetch_message(
    State(s): State<Arc<Shared>>,
    Path((account_sid, message)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let cfg = s.config();
    let path = format!("/{API_VERSION}/Accounts/{account_sid}/Messages/{message}");
    let _slot = match s.admit(&cfg, &headers, &account_sid, &path).await {
        Ok(slot) => slot,
        Err(response) => return response,
    };
    let found = message.strip_suffix(".json").and_then(|sid| {
        let store = lock(&s.store);
        store.by_sid.get(sid).map(|&i| store.messages[i].clone())
    });
    match found {
        Some(message) => json(StatusCode::OK, &message.resource()),
        None => s.not_found(&path),
    }
}

/// The list filters of `GET .../Messages.json`.
#[derive(Default)]
struct ListQuery {
    to: Option<String>,
    from: Option<String>,
    /// `DateSent` (that day), `DateSent>` (on or after), `DateSent<` (on or
    /// before), compared with the UTC day of creation.
    on: Option<Date>,
    after: Option<Date>,
    before: Option<Date>,
    page_size: usize,
    page: usize,
    /// The raw query without the paging parameters, to build page URIs.
    filters: Vec<String>,
}

impl ListQuery {
    fn parse(raw: &str) -> Result<ListQuery, String> {
        let day = time::macros::format_description!("[year]-[month]-[day]");
        let mut q = ListQuery {
            page_size: DEFAULT_PAGE_SIZE,
            ..ListQuery::default()
        };
        for segment in raw.split('&').filter(|s| !s.is_empty()) {
            let Some((key, value)) = form::pairs(segment.as_bytes()).next() else {
                continue;
            };
            let date = || {
                Date::parse(&value, &day)
                    .map_err(|_| format!("Invalid value '{value}' for parameter {key}"))
            };
            match &*key {
                "PageSize" => {
                    q.page_size = value
                        .parse::<usize>()
                        .map_err(|_| format!("Invalid PageSize '{value}'"))?
                        .clamp(1, MAX_PAGE_SIZE);
                    continue;
                }
                "Page" => {
                    q.page = value
                        .parse()
                        .map_err(|_| format!("Invalid Page '{value}'"))?;
                    continue;
                }
                "PageToken" => continue,
                "To" => q.to = Some(value.to_string()),
                "From" => q.from = Some(value.to_string()),
                "DateSent" => q.on = Some(date()?),
                "DateSent>" => q.after = Some(date()?),
                "DateSent<" => q.before = Some(date()?),
                _ => {}
            }
            q.filters.push(segment.to_owned());
        }
        Ok(q)
    }

    fn matches(&self, m: &Message) -> bool {
        let day = m.created.date();
        self.to.as_ref().is_none_or(|to| *to == m.to)
            && self
                .from
                .as_ref()
                .is_none_or(|from| m.from.as_ref() == Some(from))
            && self.on.is_none_or(|d| day == d)
            && self.after.is_none_or(|d| day >= d)
            && self.before.is_none_or(|d| day <= d)
    }

    fn page_uri(&self, path: &str, page: usize) -> String {
        let mut uri = format!("{path}?");
        for f in &self.filters {
            uri.push_str(f);
            uri.push('&');
        }
        uri.push_str(&format!("PageSize={}&Page={page}", self.page_size));
        uri
    }
}

async fn list_messages(
    State(s): State<Arc<Shared>>,
    Path(account_sid): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Response {
    let cfg = s.config();
    let path = format!("/{API_VERSION}/Accounts/{account_sid}/Messages.json");
    let _slot = match s.admit(&cfg, &headers, &account_sid, &path).await {
        Ok(slot) => slot,
        Err(response) => return response,
    };
    let raw = raw.unwrap_or_default();
    let query = match ListQuery::parse(&raw) {
        Ok(q) => q,
        Err(message) => return s.bad_request(20001, message),
    };
    let skip = query.page.saturating_mul(query.page_size);
    let (page, more) = {
        let store = lock(&s.store);
        let mut matching = store.messages.iter().rev().filter(|m| query.matches(m));
        let page: Vec<Message> = matching
            .by_ref()
            .skip(skip)
            .take(query.page_size)
            .cloned()
            .collect();
        let more = matching.next().is_some();
        (page, more)
    };
    let start = skip;
    let end = (start + page.len()).saturating_sub(1);
    let uri = if raw.is_empty() {
        path.clone()
    } else {
        format!("{path}?{raw}")
    };
    json(
        StatusCode::OK,
        &MessagePage {
            end,
            first_page_uri: query.page_uri(&path, 0),
            messages: page.iter().map(Message::resource).collect(),
            next_page_uri: more.then(|| query.page_uri(&path, query.page + 1)),
            page: query.page,
            page_size: query.page_size,
            previous_page_uri: (query.page > 0).then(|| query.page_uri(&path, query.page - 1)),
            start,
            uri,
        },
    )
}

async fn mock_messages(State(s): State<Arc<Shared>>) -> Response {
    json(StatusCode::OK, &s.messages())
}

async fn mock_stats(State(s): State<Arc<Shared>>) -> Response {
    json(StatusCode::OK, &s.stats())
}

async fn not_found(uri: axum::http::Uri) -> Response {
    resource_not_found(uri.path())
}

/// A message's life after acceptance: after `callback_delay`, each status in
/// turn (the last one `undelivered` for an undeliverable number), posted to
/// its status callback when it has one.
async fn lifecycle(s: Arc<Shared>, cfg: Arc<MockConfig>, index: usize, undeliverable: bool) {
    tokio::time::sleep(cfg.callback_delay).await;
    let has_callback = lock(&s.store).messages[index].status_callback.is_some();
    // Held for all of this message's callbacks, so that they stay in order.
    let _permit = if has_callback {
        match s.callback_permits.clone().acquire_owned().await {
            Ok(permit) => Some(permit),
            Err(_) => return, // closed: shutting down
        }
    } else {
        None
    };
    let last = cfg.callback_statuses.len() - 1;
    for (i, status) in cfg.callback_statuses.iter().enumerate() {
        if s.is_closed() {
            return;
        }
        let status = if undeliverable && i == last {
            "undelivered"
        } else {
            status.as_str()
        };
        let error_code =
            matches!(status, "failed" | "undelivered").then_some(UNDELIVERED_ERROR_CODE);
        let message = {
            let mut store = lock(&s.store);
            let m = &mut store.messages[index];
            m.status = status.to_owned();
            m.updated = OffsetDateTime::now_utc();
            m.error_code = error_code;
            if m.status_callback.is_none() {
                continue;
            }
            m.clone()
        };
        if let Some(url) = &message.status_callback {
            send_callback(&s, &cfg.auth_token, url, &message).await;
        }
    }
}

/// One status callback, retried on a connection error or a non-2xx answer.
async fn send_callback(s: &Shared, auth_token: &str, url: &str, m: &Message) {
    let mut params: Vec<(String, String)> = vec![
        ("AccountSid".into(), m.account_sid.clone()),
        ("ApiVersion".into(), API_VERSION.into()),
        ("MessageSid".into(), m.sid.clone()),
        ("MessageStatus".into(), m.status.clone()),
        ("SmsSid".into(), m.sid.clone()),
        ("SmsStatus".into(), m.status.clone()),
        ("To".into(), m.to.clone()),
    ];
    if let Some(from) = &m.from {
        params.push(("From".into(), from.clone()));
    }
    if let Some(service) = &m.messaging_service_sid {
        params.push(("MessagingServiceSid".into(), service.clone()));
    }
    if let Some(code) = m.error_code {
        params.push(("ErrorCode".into(), code.to_string()));
    }
    let signature = signature(auth_token, url, &params);
    for attempt in 0..=CALLBACK_RETRIES {
        if attempt > 0 {
            tokio::time::sleep(CALLBACK_BACKOFF * 2u32.pow(attempt - 1)).await;
            if s.is_closed() {
                break;
            }
        }
        let result = s
            .http
            .post(url)
            .header("X-Twilio-Signature", &signature)
            .form(&params)
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => {
                bump(&s.counters.callbacks_ok);
                return;
            }
            Ok(response) => tracing::debug!(
                "status callback {url} for {} answered {}",
                m.sid,
                response.status()
            ),
            Err(e) => tracing::debug!("status callback {url} for {}: {e}", m.sid),
        }
    }
    bump(&s.counters.callbacks_failed);
}

#[cfg(test)]
mod tests {
    use super::{is_e164, new_message_sid, num_segments, ListQuery};
    use time::macros::date;

    #[test]
    fn list_query_takes_date_sent_literally_or_encoded() {
        for raw in [
            "DateSent>=2026-12-02&PageSize=7",
            "DateSent%3E=2026-12-02&PageSize=7",
        ] {
            let q = ListQuery::parse(raw).expect(raw);
            assert_eq!(q.after, Some(date!(2026 - 12 - 02)), "{raw}");
            assert_eq!(q.page_size, 7);
            assert_eq!(q.filters, [raw.split('&').next().expect("filter")]);
        }
        let q = ListQuery::parse("DateSent<=2026-12-03&DateSent=2026-12-01&To=%2B1555&Page=2")
            .expect("parses");
        assert_eq!(q.before, Some(date!(2026 - 12 - 03)));
        assert_eq!(q.on, Some(date!(2026 - 12 - 01)));
        assert_eq!(q.to.as_deref(), Some("+1555"));
        assert_eq!((q.page, q.page_size), (2, 50));
        assert!(ListQuery::parse("DateSent>=12/02/2026").is_err());
        assert!(ListQuery::parse("PageSize=many").is_err());
    }

    #[test]
    fn e164() {
        assert!(is_e164("+15551234567"));
        assert!(is_e164("+12345678"));
        assert!(is_e164("+123456789012345"));
        assert!(!is_e164("+1234567"));
        assert!(!is_e164("+1234567890123456"));
        assert!(!is_e164("15551234567"));
        assert!(!is_e164("+05551234567"));
        assert!(!is_e164("+1555123456a"));
        assert!(!is_e164("+1 555 123 4567"));
    }

    #[test]
    fn segments() {
        assert_eq!(num_segments("hello"), 1);
        assert_eq!(num_segments(&"a".repeat(160)), 1);
        assert_eq!(num_segments(&"a".repeat(161)), 2);
        assert_eq!(num_segments(&"a".repeat(306)), 2);
        assert_eq!(num_segments(&"a".repeat(307)), 3);
        assert_eq!(num_segments(&"€".repeat(80)), 1);
        assert_eq!(num_segments(&"€".repeat(81)), 2);
        assert_eq!(num_segments(&"ł".repeat(70)), 1);
        assert_eq!(num_segments(&"ł".repeat(71)), 2);
    }

    #[test]
    fn sid_format() {
        let sid = new_message_sid();
        assert_eq!(sid.len(), 34);
        assert!(sid.starts_with("SM"));
        assert!(sid[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
}
