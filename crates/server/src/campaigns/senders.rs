//! The two providers: e-mail over SMTP (lettre's message builder and
//! connection, our pool: `smtp.rs`) and
//! SMS through an HTTP API with Twilio's shape. Each send is one call,
//! bounded by the channel's send timeout, and its failure is classified
//! (transient: retry; permanent: give up; ambiguous: the provider may have
//! accepted it, so look before sending again).

use std::time::{Duration, SystemTime};

use clinflow_store::DeliveryRecord;
use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::Message;

use super::smtp::{SmtpFailure, SmtpPool, SmtpTarget};

/// Why a send did not succeed.
#[derive(Debug, Clone, PartialEq)]
pub enum SendError {
    /// Not sent; sending again later may work.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Not sent: the provider asks for fewer requests (HTTP 429). Retried
    /// like a transient failure, and the channel sends fewer at once.
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Not sent; it never will be (a bad address, a refusal).
    Permanent { reason: String },
    /// The provider may have accepted it (a timeout after the request was
    /// out): find out before sending again.
    Ambiguous { reason: String },
}

impl From<clinflow_notify::classify::Failure> for SendError {
    fn from(f: clinflow_notify::classify::Failure) -> SendError {
        match f {
            clinflow_notify::classify::Failure::Transient {
                reason,
                retry_after,
            } => SendError::Transient {
                reason,
                retry_after,
            },
            clinflow_notify::classify::Failure::Permanent { reason } => {
                SendError::Permanent { reason }
            }
        }
    }
}

/// How the e-mail sender is set up.
#[derive(Debug, Clone)]
pub struct EmailSettings {
    /// `smtp://host:port` (plain), `smtp://host:port?tls=required`
    /// (STARTTLS), `smtps://user:pass@host:port` (implicit TLS).
    pub url: String,
    pub from: String,
    /// Connections kept open at most (the channel's concurrency).
    pub connections: u32,
    pub timeout: Duration,
}

/// E-mail over SMTP.
pub struct EmailSender {
    pool: SmtpPool,
    from: Mailbox,
    /// The right-hand side of every `Message-ID`.
    domain: String,
    timeout: Duration,
}

impl EmailSender {
    pub fn new(s: &EmailSettings) -> anyhow::Result<EmailSender> {
        let from: Mailbox = s
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("--smtp-from {:?}: {e}", s.from))?;
        let domain = from.email.domain().to_string();
        let target = SmtpTarget::parse(&s.url).map_err(|e| anyhow::anyhow!("--smtp-url: {e}"))?;
        let pool = SmtpPool::new(target, s.connections.max(1) as usize)
            .map_err(|e| anyhow::anyhow!("--smtp-url: {e}"))?;
        Ok(EmailSender {
            pool,
            from,
            domain,
            timeout: s.timeout,
        })
    }

    /// The `Message-ID` of a delivery: the same for every attempt, so a
    /// receiver can drop a duplicate.
    pub fn message_id(&self, delivery: &str) -> String {
        format!("<{delivery}@{}>", self.domain)
    }

    /// Sends the delivery's message; `unsubscribe` is its opt-out link.
    /// A failure before the server could take the message is transient or
    /// permanent by its reply code; one after the whole message was
    /// written without an answer is [`SendError::Ambiguous`].
    pub async fn send(&self, d: &DeliveryRecord, unsubscribe: &str) -> Result<(), SendError> {
        let to: Mailbox = d.address.parse().map_err(|e| SendError::Permanent {
            reason: format!("invalid e-mail address: {e}"),
        })?;
        let builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(d.subject.clone().unwrap_or_default())
            .message_id(Some(self.message_id(&d.id)));
        let text = SinglePart::builder()
            .header(ContentType::TEXT_PLAIN)
            .body(d.body.clone());
        let message = match &d.html {
            Some(html) => builder.multipart(
                MultiPart::alternative().singlepart(text).singlepart(
                    SinglePart::builder()
                        .header(ContentType::TEXT_HTML)
                        .body(html.clone()),
                ),
            ),
            None => builder.singlepart(text),
        };
        let mut message = message.map_err(|e| SendError::Permanent {
            reason: format!("the message cannot be built: {e}"),
        })?;
        let headers = message.headers_mut();
        headers.insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str("List-Unsubscribe"),
            format!("<{unsubscribe}>"),
        ));
        headers.insert_raw(HeaderValue::new(
            HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
            "List-Unsubscribe=One-Click".into(),
        ));
        let bytes = message.formatted();
        match self
            .pool
            .send(message.envelope(), &bytes, self.timeout)
            .await
        {
            Ok(()) => Ok(()),
            Err(SmtpFailure::NotSent {
                code: Some(code),
                reason,
            }) => Err(clinflow_notify::classify::smtp_code(code, &reason).into()),
            Err(SmtpFailure::NotSent { code: None, reason }) => Err(SendError::Transient {
                reason,
                retry_after: None,
            }),
            Err(SmtpFailure::Unknown { reason }) => Err(SendError::Ambiguous { reason }),
        }
    }
}

/// How the SMS sender is set up.
#[derive(Debug, Clone)]
pub struct SmsSettings {
    /// The API's base (`https://api.twilio.com`).
    pub base_url: String,
    pub account_sid: String,
    pub auth_token: String,
    /// The sending number (E.164) or a messaging service sid (`MG...`).
    pub from: String,
    pub timeout: Duration,
}

/// What the provider knows of a message found by [`SmsSender::lookup`].
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub sid: String,
    pub status: String,
}

/// SMS through a Twilio-shaped REST API.
pub struct SmsSender {
    http: reqwest::Client,
    settings: SmsSettings,
}

impl SmsSender {
    pub fn new(settings: SmsSettings) -> anyhow::Result<SmsSender> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()?;
        Ok(SmsSender { http, settings })
    }

    fn messages_url(&self) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            self.settings.base_url.trim_end_matches('/'),
            self.settings.account_sid
        )
    }

    /// Sends the delivery's text; the provider's message sid.
    pub async fn send(
        &self,
        d: &DeliveryRecord,
        status_callback: Option<&str>,
    ) -> Result<String, SendError> {
        let from_key = if self.settings.from.starts_with("MG") {
            "MessagingServiceSid"
        } else {
            "From"
        };
        let mut form = vec![
            ("To", d.address.as_str()),
            (from_key, self.settings.from.as_str()),
            ("Body", d.body.as_str()),
        ];
        if let Some(cb) = status_callback {
            form.push(("StatusCallback", cb));
        }
        let resp = self
            .http
            .post(self.messages_url())
            .basic_auth(&self.settings.account_sid, Some(&self.settings.auth_token))
            .form(&form)
            .send()
            .await
            .map_err(request_error)?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| clinflow_notify::backoff::retry_after(v, SystemTime::now()));
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        if status == 200 || status == 201 {
            return body["sid"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| SendError::Ambiguous {
                    reason: "the provider accepted it without a sid".into(),
                });
        }
        let reason = match (body["code"].as_i64(), body["message"].as_str()) {
            (Some(code), Some(m)) => format!("{code} {m}"),
            (_, Some(m)) => m.to_string(),
            _ => "no error body".into(),
        };
        let failure: SendError =
            clinflow_notify::classify::http_status(status, retry_after, &reason).into();
        match failure {
            SendError::Transient {
                reason,
                retry_after,
            } if status == 429 => Err(SendError::Throttled {
                reason,
                retry_after,
            }),
            f => Err(f),
        }
    }

    /// Looks for the delivery's message at the provider (same recipient,
    /// sender and text, created since its claim): how a row left `sending`
    /// by a stopped process is resolved without sending it twice.
    pub async fn lookup(&self, d: &DeliveryRecord) -> anyhow::Result<Option<Found>> {
        let claimed = d.claimed_at.unwrap_or(d.updated_at);
        // By recipient only: `DateSent` leaves out messages still queued
        // (no date_sent yet, the very state after a lost answer), and a
        // messaging service's messages carry the number it picked as From.
        let resp = self
            .http
            .get(self.messages_url())
            .basic_auth(&self.settings.account_sid, Some(&self.settings.auth_token))
            .query(&[("To", d.address.as_str()), ("PageSize", "1000")])
            .send()
            .await?
            .error_for_status()?;
        let body: serde_json::Value = resp.json().await?;
        let since = claimed - 5 * 60 * 1000;
        let ours = |m: &serde_json::Value| {
            let from = self.settings.from.as_str();
            m["from"].as_str() == Some(from) || m["messaging_service_sid"].as_str() == Some(from)
        };
        for m in body["messages"].as_array().into_iter().flatten() {
            let created = m["date_created"]
                .as_str()
                .and_then(httpdate_ms)
                .unwrap_or(i64::MAX);
            if m["body"].as_str() == Some(d.body.as_str()) && created >= since && ours(m) {
                if let Some(sid) = m["sid"].as_str() {
                    return Ok(Some(Found {
                        sid: sid.to_string(),
                        status: m["status"].as_str().unwrap_or("sent").to_string(),
                    }));
                }
            }
        }
        Ok(None)
    }

    /// Checks a status callback's `X-Twilio-Signature` (constant time).
    pub fn verify(&self, url: &str, params: &[(String, String)], signature: &str) -> bool {
        clinflow_notify::twilio::verify(&self.settings.auth_token, url, params, signature)
    }
}

fn request_error(e: reqwest::Error) -> SendError {
    if e.is_connect() {
        // Nothing reached the provider.
        SendError::Transient {
            reason: "SMS provider unreachable".into(),
            retry_after: None,
        }
    } else if e.is_timeout() {
        SendError::Ambiguous {
            reason: "SMS provider timeout".into(),
        }
    } else {
        SendError::Ambiguous {
            reason: "SMS provider connection lost".into(),
        }
    }
}

/// An RFC 2822 date as Twilio writes it ("Wed, 02 Dec 2026 07:45:00
/// +0000"), in ms.
fn httpdate_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc2822).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}
