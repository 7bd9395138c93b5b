//! Notification campaigns: e-mail and SMS to practitioners, rate-limited,
//! retried, tracked per recipient, sent at most once.
//!
//! - `POST /campaigns` (admin, data-manager; `Idempotency-Key` honoured):
//!   checks the templates, resolves the audience, renders every (recipient,
//!   channel) message and writes the campaign with all its delivery rows in
//!   one transaction, then answers `202`.
//! - `GET /campaigns`, `GET /campaigns/{id}` (status, counts, rate,
//!   progress), `GET /campaigns/{id}/deliveries?status=&cursor=&count=`,
//!   `POST /campaigns/{id}/cancel` (admin, data-manager; monitors read).
//! - `POST /practitioners/{id}/opt-out` (`{"channel"}`; admin,
//!   data-manager), and the recipients' own `GET|POST /unsubscribe/{token}`
//!   (the `List-Unsubscribe` link: a capability URL, HMAC-signed).
//! - `POST /notifications/sms/status/{delivery}`: the SMS provider's status
//!   callback, authenticated by its `X-Twilio-Signature`.
//!
//! The two public routes carry their own proof (a MAC, a provider
//! signature) instead of a bearer token. `dispatch` sends; `senders`
//! speaks SMTP and the SMS API; `practitioners` reads the recipients;
//! `render` builds the rows.

pub mod dispatch;
pub mod practitioners;
pub mod render;
pub mod senders;
pub mod smtp;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use clinflow_fhir::datetime::format_instant;
use clinflow_store::{
    now_millis, CampaignRecord, Channel, DeliveryFilter, DeliveryRecord, DeliveryStatus,
    NewCampaign, ProviderReport, Store,
};
use hmac::{KeyInit, Mac};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::state::AppState;
use dispatch::{ChannelLimits, Provider, RetryPolicy, Worker};
use senders::{EmailSender, EmailSettings, SmsSender, SmsSettings};

/// The audit records' resource type for a campaign.
pub const AUDIT_ENTITY: &str = "Campaign";
const DEFAULT_COUNT: usize = 100;
const MAX_COUNT: usize = 1000;

/// How notifications are sent (`clinflow serve --smtp-url ...`).
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// The SMTP relay; `None`: this server sends no e-mail.
    pub smtp_url: Option<String>,
    pub smtp_from: String,
    /// The SMS API's base; `None`: this server sends no SMS.
    pub sms_base_url: Option<String>,
    pub sms_account_sid: String,
    pub sms_auth_token: String,
    pub sms_from: String,
    /// The URL recipients and the SMS provider reach this server at (the
    /// unsubscribe links, the status callbacks); default `http://LISTEN`.
    pub public_url: Option<String>,
    pub email: ChannelLimits,
    pub sms: ChannelLimits,
    pub retry: RetryPolicy,
    /// Run the delivery workers in this process.
    pub workers: bool,
    /// How often an idle worker looks for due rows.
    pub poll: Duration,
    /// Recipients of one campaign at most.
    pub max_recipients: usize,
}

impl Default for NotifyConfig {
    fn default() -> NotifyConfig {
        NotifyConfig {
            smtp_url: None,
            smtp_from: "clinflow <noreply@clinflow.invalid>".into(),
            sms_base_url: None,
            sms_account_sid: String::new(),
            sms_auth_token: String::new(),
            sms_from: String::new(),
            public_url: None,
            email: ChannelLimits {
                concurrency: 16,
                rate: 200,
                send_timeout: Duration::from_secs(30),
            },
            sms: ChannelLimits {
                concurrency: 16,
                rate: 100,
                send_timeout: Duration::from_secs(15),
            },
            retry: RetryPolicy {
                max_attempts: 8,
                base: Duration::from_secs(1),
                cap: Duration::from_secs(600),
            },
            workers: true,
            poll: Duration::from_millis(500),
            max_recipients: 100_000,
        }
    }
}

/// The links a message carries.
#[derive(Clone)]
pub struct Links {
    public_url: String,
    key: Arc<[u8]>,
    sms_callbacks: bool,
}

impl Links {
    fn mac(&self, delivery: &str) -> String {
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        mac.update(delivery.as_bytes());
        let tag = mac.finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..16])
    }

    /// The delivery's opt-out link.
    pub fn unsubscribe(&self, delivery: &str) -> String {
        format!(
            "{}/unsubscribe/{delivery}.{}",
            self.public_url,
            self.mac(delivery)
        )
    }

    /// The delivery an unsubscribe token names, when its MAC holds.
    fn delivery_of(&self, token: &str) -> Option<String> {
        let (delivery, tag) = token.rsplit_once('.')?;
        let expected = self.mac(delivery);
        // Constant time: compare every byte.
        let same = expected.len() == tag.len()
            && expected
                .bytes()
                .zip(tag.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then(|| delivery.to_string())
    }

    /// The URL the SMS provider reports a delivery's status to.
    pub fn sms_callback(&self, delivery: &str) -> Option<String> {
        self.sms_callbacks
            .then(|| format!("{}/notifications/sms/status/{delivery}", self.public_url))
    }
}

/// The notification side of the server.
pub struct Notifier {
    workers: Vec<Arc<Worker>>,
    wake: Arc<Notify>,
    links: Links,
    channels: Vec<Channel>,
    sms_auth_token: String,
    config: NotifyConfig,
}

impl Notifier {
    /// Sets up the senders of the configured channels.
    pub async fn new(
        store: &Store,
        config: &NotifyConfig,
        listen: &str,
    ) -> anyhow::Result<Notifier> {
        let key = store
            .secret("unsubscribe")
            .await?
            .ok_or_else(|| anyhow::anyhow!("the database has no unsubscribe key"))?;
        let public_url = config
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{listen}"))
            .trim_end_matches('/')
            .to_string();
        let links = Links {
            public_url,
            key: key.into_bytes().into(),
            sms_callbacks: config.sms_base_url.is_some(),
        };
        let wake = Arc::new(Notify::new());
        let mut workers = Vec::new();
        let mut channels = Vec::new();
        let worker = |provider, limits: &ChannelLimits| {
            Arc::new(Worker {
                provider,
                limits: limits.clone(),
                retry: config.retry.clone(),
                store: store.clone(),
                links: links.clone(),
                wake: wake.clone(),
                poll: config.poll,
            })
        };
        if let Some(url) = &config.smtp_url {
            let sender = EmailSender::new(&EmailSettings {
                url: url.clone(),
                from: config.smtp_from.clone(),
                connections: config.email.concurrency as u32,
                timeout: config.email.send_timeout,
            })?;
            workers.push(worker(Provider::Email(sender), &config.email));
            channels.push(Channel::Email);
        }
        if let Some(base) = &config.sms_base_url {
            if config.sms_account_sid.is_empty() || config.sms_from.is_empty() {
                anyhow::bail!("--sms-base-url needs --sms-account-sid and --sms-from");
            }
            let sender = SmsSender::new(SmsSettings {
                base_url: base.clone(),
                account_sid: config.sms_account_sid.clone(),
                auth_token: config.sms_auth_token.clone(),
                from: config.sms_from.clone(),
                timeout: config.sms.send_timeout,
            })?;
            workers.push(worker(Provider::Sms(sender), &config.sms));
            channels.push(Channel::Sms);
        }
        Ok(Notifier {
            workers,
            wake,
            links,
            channels,
            sms_auth_token: config.sms_auth_token.clone(),
            config: config.clone(),
        })
    }

    /// Runs the delivery workers until `stop`, then lets their sends in
    /// flight finish and records them.
    pub async fn run(&self, stop: CancellationToken) {
        if !self.config.workers {
            return;
        }
        let runs = self
            .workers
            .iter()
            .map(|w| dispatch::run(w.clone(), stop.clone()));
        futures::future::join_all(runs).await;
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/campaigns", get(list_campaigns).post(create_campaign))
        .route("/campaigns/{id}", get(get_campaign))
        .route("/campaigns/{id}/deliveries", get(list_deliveries))
        .route("/campaigns/{id}/cancel", post(cancel_campaign))
        .route("/practitioners/{id}/opt-out", post(opt_out))
        .route(
            "/unsubscribe/{token}",
            get(unsubscribe_page).post(unsubscribe),
        )
        .route("/notifications/sms/status/{delivery}", post(sms_status))
}

/// The routes that prove their caller without a bearer token.
pub const PUBLIC_ROUTES: [&str; 2] = [
    "/unsubscribe/{token}",
    "/notifications/sms/status/{delivery}",
];

fn may_send(caller: &Caller) -> Result<(), ApiError> {
    match caller.principal.role {
        Role::Admin | Role::DataManager => Ok(()),
        r => Err(ApiError::Forbidden(format!(
            "the {} role may not run campaigns",
            r.as_str()
        ))),
    }
}

fn may_read(caller: &Caller) -> Result<(), ApiError> {
    match caller.principal.role {
        Role::Admin | Role::DataManager | Role::Monitor => Ok(()),
        r => Err(ApiError::Forbidden(format!(
            "the {} role may not see campaigns",
            r.as_str()
        ))),
    }
}

/// `POST /campaigns`.
async fn create_campaign(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    may_send(&caller)?;
    let key = headers
        .get("idempotency-key")
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .map(str::to_string)
                .ok_or_else(|| {
                    ApiError::BadRequest("Idempotency-Key: 1 to 255 visible characters".into())
                })
        })
        .transpose()?;
    let request: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    let spec = render::CampaignSpec::parse(&request, &state.notify.channels)?;
    let recipients = practitioners::recipients(&state.store).await?;
    let audience = render::select(&spec.audience, &recipients, &state.sites.snapshot())?;
    if audience.len() > state.notify.config.max_recipients {
        return Err(ApiError::Unprocessable(format!(
            "the audience has {} recipients; at most {}",
            audience.len(),
            state.notify.config.max_recipients
        )));
    }
    let now = now_millis();
    let id = uuid::Uuid::now_v7().to_string();
    let sites = state.sites.snapshot();
    let deliveries = render::deliveries(&spec, &id, &audience, &sites, &state.notify.links)?;
    let total = deliveries.len();
    let mut rec = caller.audit("campaign-create", "success");
    rec.resource_type = Some(AUDIT_ENTITY.into());
    rec.resource_id = Some(id.clone());
    rec.detail = Some(format!(
        "{} recipients, {} deliveries ({})",
        audience.len(),
        total,
        spec.channels
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let (id, created) = state
        .store
        .create_campaign(
            NewCampaign {
                id,
                name: spec.name.clone(),
                channels: spec.channels.clone(),
                spec: request.to_string(),
                send_at: spec.send_at.unwrap_or(now).max(now),
                created_at: now,
                created_by: caller.principal.name.clone(),
                idempotency_key: key,
            },
            deliveries,
            vec![rec],
        )
        .await?;
    if created {
        state.notify.wake.notify_waiters();
    }
    let campaign =
        state.store.campaign(&id).await?.ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("a created campaign is not found"))
        })?;
    let mut resp = (
        StatusCode::ACCEPTED,
        [(axum::http::header::LOCATION, format!("/campaigns/{id}"))],
        Json(campaign_json(&state.store, &campaign).await?),
    )
        .into_response();
    if !created {
        resp.headers_mut().insert(
            "idempotent-replayed",
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(resp)
}

/// A campaign as answered: status, counts (overall and per channel),
/// progress and the current rate.
async fn campaign_json(store: &Store, c: &CampaignRecord) -> Result<Value, ApiError> {
    let now = now_millis();
    let (counts, recent) = tokio::try_join!(
        store.delivery_counts(&c.id),
        store.sent_since(&c.id, now - 10_000)
    )?;
    let zero = || {
        DeliveryStatus::ALL
            .iter()
            .map(|s| (s.as_str().to_string(), json!(0)))
            .collect::<serde_json::Map<_, _>>()
    };
    let mut all = zero();
    let mut per: serde_json::Map<String, Value> = c
        .channels
        .iter()
        .map(|ch| (ch.as_str().to_string(), Value::Object(zero())))
        .collect();
    let (mut total, mut open) = (0u64, 0u64);
    for (ch, status, n) in &counts {
        let add = |m: &mut serde_json::Map<String, Value>| {
            let e = m.entry(status.as_str()).or_insert(json!(0));
            *e = json!(e.as_u64().unwrap_or(0) + n);
        };
        add(&mut all);
        if let Some(Value::Object(m)) = per.get_mut(ch.as_str()) {
            add(m);
        }
        total += n;
        if !status.is_final() {
            open += n;
        }
    }
    let status = if c.cancelled_at.is_some() {
        if open > 0 {
            "cancelling"
        } else {
            "cancelled"
        }
    } else if open == 0 {
        "completed"
    } else if c.send_at > now {
        "scheduled"
    } else {
        "sending"
    };
    let rate: serde_json::Map<String, Value> = recent
        .iter()
        .map(|(ch, n)| (ch.as_str().to_string(), json!(*n as f64 / 10.0)))
        .collect();
    Ok(json!({
        "id": c.id,
        "name": c.name,
        "channels": c.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        "status": status,
        "send_at": format_instant(c.send_at),
        "created": {"at": format_instant(c.created_at), "by": c.created_by},
        "cancelled": c.cancelled_at.map(|at| json!({"at": format_instant(at), "by": c.cancelled_by})),
        "total": total,
        "counts": all,
        "by_channel": per,
        "progress": if total == 0 { 1.0 } else { (total - open) as f64 / total as f64 },
        "rate_per_second": rate,
    }))
}

#[derive(serde::Deserialize)]
struct Page {
    cursor: Option<String>,
    count: Option<usize>,
    status: Option<String>,
}

/// `GET /campaigns`.
async fn list_campaigns(
    State(state): State<AppState>,
    caller: Caller,
    Query(p): Query<Page>,
) -> Result<Response, ApiError> {
    may_read(&caller)?;
    let count = p.count.unwrap_or(DEFAULT_COUNT).clamp(1, MAX_COUNT);
    let mut rows = state
        .store
        .campaigns(p.cursor.filter(|c| !c.is_empty()), count + 1)
        .await?;
    let more = rows.len() > count;
    rows.truncate(count);
    let next = more.then(|| rows.last().map(|c| c.id.clone())).flatten();
    let mut items = Vec::new();
    for c in &rows {
        items.push(campaign_json(&state.store, c).await?);
    }
    Ok(Json(json!({"items": items, "next": next})).into_response())
}

async fn campaign_or_404(state: &AppState, id: &str) -> Result<CampaignRecord, ApiError> {
    state
        .store
        .campaign(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no campaign {id:?}")))
}

/// `GET /campaigns/{id}`.
async fn get_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    may_read(&caller)?;
    let c = campaign_or_404(&state, &id).await?;
    Ok(Json(campaign_json(&state.store, &c).await?).into_response())
}

/// `GET /campaigns/{id}/deliveries`.
async fn list_deliveries(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(p): Query<Page>,
) -> Result<Response, ApiError> {
    may_read(&caller)?;
    campaign_or_404(&state, &id).await?;
    let status = match p.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "status {s:?}: use one of {}",
                DeliveryStatus::ALL.map(|s| s.as_str()).join(", ")
            ))
        })?),
    };
    let count = p.count.unwrap_or(DEFAULT_COUNT).clamp(1, MAX_COUNT);
    let mut rows = state
        .store
        .deliveries(DeliveryFilter {
            campaign: id,
            status,
            after: p.cursor.filter(|c| !c.is_empty()),
            limit: count + 1,
        })
        .await?;
    let more = rows.len() > count;
    rows.truncate(count);
    let next = more.then(|| rows.last().map(|d| d.id.clone())).flatten();
    let items: Vec<Value> = rows.iter().map(delivery_json).collect();
    Ok(Json(json!({"items": items, "next": next})).into_response())
}

/// A delivery as listed: never its text.
fn delivery_json(d: &DeliveryRecord) -> Value {
    json!({
        "id": d.id,
        "practitioner": d.practitioner,
        "channel": d.channel.as_str(),
        "address": d.address,
        "status": d.status.as_str(),
        "attempts": d.attempts,
        "last_error": d.last_error,
        "provider_id": d.provider_id,
        "sent_at": d.sent_at.map(format_instant),
        "updated_at": format_instant(d.updated_at),
    })
}

/// `POST /campaigns/{id}/cancel`.
async fn cancel_campaign(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    may_send(&caller)?;
    let c = campaign_or_404(&state, &id).await?;
    let mut rec = caller.audit("campaign-cancel", "success");
    rec.resource_type = Some(AUDIT_ENTITY.into());
    rec.resource_id = Some(id.clone());
    let at = rec.time;
    match state
        .store
        .cancel_campaign(&id, &caller.principal.name, at, vec![rec])
        .await?
    {
        Some(_) => {}
        None => {
            return Err(ApiError::Conflict(format!(
                "campaign {:?} is already cancelled",
                c.id
            )))
        }
    }
    let c = campaign_or_404(&state, &id).await?;
    Ok(Json(campaign_json(&state.store, &c).await?).into_response())
}

#[derive(serde::Deserialize)]
struct OptOutBody {
    channel: String,
}

/// `POST /practitioners/{id}/opt-out`.
async fn opt_out(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    may_send(&caller)?;
    let body: OptOutBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadRequest("the body must be {\"channel\": \"email\"|\"sms\"}".into())
    })?;
    let channel = Channel::parse(&body.channel).ok_or_else(|| {
        ApiError::Unprocessable(format!("channel {:?}: email or sms", body.channel))
    })?;
    let mut rec = caller.audit("opt-out", "success");
    rec.resource_type = Some("Practitioner".into());
    rec.resource_id = Some(id.clone());
    rec.detail = Some(channel.as_str().into());
    let at = rec.time;
    let new = state
        .store
        .opt_out(&id, channel, "api", at, vec![rec])
        .await?;
    Ok(Json(
        json!({"practitioner": id, "channel": channel.as_str(), "opted_out": true, "new": new}),
    )
    .into_response())
}

/// `GET /unsubscribe/{token}`: a page with the button (a GET changes
/// nothing: mail scanners follow links).
async fn unsubscribe_page(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    state
        .notify
        .links
        .delivery_of(&token)
        .ok_or_else(|| ApiError::NotFound("this unsubscribe link is not valid".into()))?;
    Ok(Html(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Unsubscribe</title></head><body><h1>Stop these e-mails?</h1><form method=\"post\"><button type=\"submit\">Unsubscribe</button></form></body></html>",
    )
    .into_response())
}

/// `POST /unsubscribe/{token}` (RFC 8058 one-click, or the page's button):
/// records the recipient's opt-out of e-mail.
async fn unsubscribe(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let delivery = state
        .notify
        .links
        .delivery_of(&token)
        .ok_or_else(|| ApiError::NotFound("this unsubscribe link is not valid".into()))?;
    let d = state
        .store
        .delivery(&delivery)
        .await?
        .ok_or_else(|| ApiError::NotFound("this unsubscribe link is not valid".into()))?;
    let rec = clinflow_store::AuditRecord {
        time: now_millis(),
        actor: format!("Practitioner/{}", d.practitioner),
        role: "recipient".into(),
        action: "opt-out".into(),
        resource_type: Some("Practitioner".into()),
        resource_id: Some(d.practitioner.clone()),
        outcome: "success".into(),
        detail: Some(format!(
            "{} via the link of delivery {}",
            d.channel.as_str(),
            d.id
        )),
        ..Default::default()
    };
    state
        .store
        .opt_out(
            &d.practitioner,
            d.channel,
            "unsubscribe-link",
            rec.time,
            vec![rec],
        )
        .await?;
    Ok(Html(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Unsubscribed</title></head><body><h1>You are unsubscribed.</h1></body></html>",
    )
    .into_response())
}

/// `POST /notifications/sms/status/{delivery}`: the provider's report,
/// trusted only with a valid `X-Twilio-Signature` over this URL and the
/// form.
async fn sms_status(
    State(state): State<AppState>,
    Path(delivery): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let params: Vec<(String, String)> = form_urlencoded_pairs(&body);
    let url = state
        .notify
        .links
        .sms_callback(&delivery)
        .ok_or_else(|| ApiError::NotFound("this server sends no SMS".into()))?;
    let signature = headers
        .get("x-twilio-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !clinflow_notify::twilio::verify(&state.notify.sms_auth_token, &url, &params, signature) {
        return Err(ApiError::Forbidden(
            "the status callback's signature does not verify".into(),
        ));
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let sid = get("MessageSid").unwrap_or_default();
    let report = match get("MessageStatus")
        .or(get("SmsStatus"))
        .unwrap_or_default()
    {
        "sent" => Some(ProviderReport::Sent),
        "delivered" => Some(ProviderReport::Delivered),
        "failed" | "undelivered" => Some(ProviderReport::Failed),
        _ => None,
    };
    if let Some(report) = report {
        let error = (report == ProviderReport::Failed).then(|| {
            format!(
                "provider reports {} (error {})",
                get("MessageStatus").unwrap_or("failed"),
                get("ErrorCode").unwrap_or("none")
            )
        });
        state
            .store
            .provider_report(&delivery, sid, report, error, now_millis())
            .await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn form_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}
