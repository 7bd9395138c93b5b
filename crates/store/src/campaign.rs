//! Notification campaigns: what the store keeps of them.
//!
//! A campaign is one row; each (recipient, channel) is a delivery row,
//! written with the campaign in one transaction and rendered once (the text
//! that is sent is the text that is stored). A delivery moves
//!
//! ```text
//! pending ──claim──> sending ──> sent ──(provider callback)──> delivered | failed
//!    ^                  │
//!    └──(transient)─────┤──> failed (permanent, attempts used up, outcome unknown)
//! suppressed (opted out)   cancelled (campaign cancelled while pending)
//! ```
//!
//! A claim writes `sending` with a fresh claim token and a lease before the
//! send; the outcome is written only by the holder of that token
//! ([`DeliveryUpdate`]), so a row is sent at most once per claim and a
//! stale claim (its process died) is resolved, never simply re-sent.

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    Email,
    Sms,
}

impl Channel {
    pub const ALL: [Channel; 2] = [Channel::Email, Channel::Sms];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        match s {
            "email" => Some(Channel::Email),
            "sms" => Some(Channel::Sms),
            _ => None,
        }
    }
}

/// Where a delivery is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeliveryStatus {
    Pending,
    Sending,
    Sent,
    Delivered,
    Failed,
    Suppressed,
    Cancelled,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 7] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Sending,
        DeliveryStatus::Sent,
        DeliveryStatus::Delivered,
        DeliveryStatus::Failed,
        DeliveryStatus::Suppressed,
        DeliveryStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Sending => "sending",
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Suppressed => "suppressed",
            DeliveryStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<DeliveryStatus> {
        DeliveryStatus::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Whether nothing more will happen to the row (`sent` still waits for
    /// a provider callback on SMS, but nothing more is sent).
    pub fn is_final(self) -> bool {
        !matches!(self, DeliveryStatus::Pending | DeliveryStatus::Sending)
    }
}

/// A campaign to create.
#[derive(Debug, Clone)]
pub struct NewCampaign {
    /// UUIDv7.
    pub id: String,
    pub name: String,
    pub channels: Vec<Channel>,
    /// The request as accepted (templates, audience), JSON.
    pub spec: String,
    pub send_at: i64,
    pub created_at: i64,
    pub created_by: String,
    /// The `Idempotency-Key` it was created with, unique per creator.
    pub idempotency_key: Option<String>,
}

/// A delivery row to create with its campaign.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    /// UUIDv7.
    pub id: String,
    pub practitioner: String,
    pub channel: Channel,
    /// E-mail address or E.164 number ("" when the practitioner has none).
    pub address: String,
    /// E-mail subject.
    pub subject: Option<String>,
    /// The text (e-mail plain text or SMS body).
    pub body: String,
    /// E-mail HTML alternative.
    pub html: Option<String>,
    /// `Pending`, or already final (`Suppressed`, `Failed`) with `error`.
    pub status: DeliveryStatus,
    pub error: Option<String>,
}

/// A stored campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignRecord {
    pub id: String,
    pub name: String,
    pub channels: Vec<Channel>,
    pub spec: String,
    pub send_at: i64,
    pub created_at: i64,
    pub created_by: String,
    pub idempotency_key: Option<String>,
    pub cancelled_at: Option<i64>,
    pub cancelled_by: Option<String>,
}

/// A stored delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRecord {
    pub id: String,
    pub campaign: String,
    pub practitioner: String,
    pub channel: Channel,
    pub address: String,
    pub subject: Option<String>,
    pub body: String,
    pub html: Option<String>,
    pub status: DeliveryStatus,
    /// Claims so far (each is at most one send).
    pub attempts: u32,
    /// Not claimed before (ms).
    pub next_at: i64,
    /// The current claim's token.
    pub claim: Option<String>,
    pub claimed_at: Option<i64>,
    pub lease_until: Option<i64>,
    /// The provider's id (SMS message sid).
    pub provider_id: Option<String>,
    pub last_error: Option<String>,
    pub sent_at: Option<i64>,
    pub updated_at: i64,
}

/// What became of a claimed delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// Accepted by the provider (or found there after a crash); with
    /// `delivered` the provider already reported it delivered.
    Sent {
        provider_id: Option<String>,
        delivered: bool,
    },
    /// Not sent: claim again from `next_at`. With `refund` the claim's
    /// attempt is given back: the provider turned the request away unread
    /// (HTTP 429, slow down), so it says nothing about the message and must
    /// not use up its attempts.
    Retry {
        error: String,
        next_at: i64,
        refund: bool,
    },
    /// Given up: a permanent error, attempts used up, or an outcome that
    /// cannot be known without risking a second send.
    Failed { error: String },
}

/// An outcome written by the holder of a claim: applies only while the row
/// is still `sending` under that claim.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryUpdate {
    pub id: String,
    pub claim: String,
    pub at: i64,
    pub outcome: DeliveryOutcome,
}

/// A provider's report on a sent message (SMS status callback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderReport {
    Sent,
    Delivered,
    Failed,
}

/// Rows per (channel, status) of a campaign.
pub type DeliveryCounts = Vec<(Channel, DeliveryStatus, u64)>;

/// A page of a campaign's deliveries.
#[derive(Debug, Clone)]
pub struct DeliveryFilter {
    pub campaign: String,
    pub status: Option<DeliveryStatus>,
    pub after: Option<String>,
    pub limit: usize,
}

/// `true` when the creation wrote the campaign, `false` when the creator's
/// `Idempotency-Key` already named one (whose id is answered).
pub type Created = (String, bool);

/// The status a report moves a delivery to, and the statuses it may move
/// it from (never backwards: a late `sent` after `delivered` is ignored).
pub(crate) fn report_transition(r: ProviderReport) -> (&'static str, &'static str) {
    match r {
        ProviderReport::Sent => ("sent", "'sending'"),
        ProviderReport::Delivered => ("delivered", "'sending', 'sent'"),
        ProviderReport::Failed => ("failed", "'sending', 'sent'"),
    }
}

/// The error text that marks an e-mail whose send was interrupted: the
/// holder of its claim may still write the real outcome.
pub const OUTCOME_UNKNOWN: &str = "outcome unknown";

pub(crate) fn channels_column(channels: &[Channel]) -> String {
    channels
        .iter()
        .map(|c| c.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn parse_channels(s: &str) -> anyhow::Result<Vec<Channel>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| Channel::parse(p).ok_or_else(|| anyhow::anyhow!("bad channel {p:?}")))
        .collect()
}

pub(crate) fn channel_of(s: &str) -> anyhow::Result<Channel> {
    Channel::parse(s).ok_or_else(|| anyhow::anyhow!("bad channel {s:?}"))
}

pub(crate) fn status_of(s: &str) -> anyhow::Result<DeliveryStatus> {
    DeliveryStatus::parse(s).ok_or_else(|| anyhow::anyhow!("bad delivery status {s:?}"))
}

/// The columns every delivery query selects, in [`DeliveryRecord`] order.
pub(crate) const DELIVERY_SELECT: &str = "SELECT id, campaign, practitioner, channel, address, subject, body, html, status, attempts, next_at, claim, claimed_at, lease_until, provider_id, last_error, sent_at, updated_at FROM deliveries";

pub(crate) const CAMPAIGN_SELECT: &str = "SELECT id, name, channels, spec, send_at, created_at, created_by, idempotency_key, cancelled_at, cancelled_by FROM campaigns";
