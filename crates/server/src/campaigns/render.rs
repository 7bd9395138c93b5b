//! A campaign request, checked: its channels, templates (placeholders
//! known, SMS within 10 segments), audience and start; then the delivery
//! rows, each message rendered once for its recipient.

use std::collections::HashSet;

use clinflow_notify::template::{Escape, Template};
use clinflow_store::{Channel, DeliveryStatus, NewDelivery};
use serde_json::Value;

use super::practitioners::Recipient;
use super::Links;
use crate::error::ApiError;
use crate::sites::registry::Snapshot;

/// The placeholders a template may use.
pub const PLACEHOLDERS: [&str; 10] = [
    "practitioner.id",
    "practitioner.name",
    "practitioner.given",
    "practitioner.family",
    "practitioner.specialty",
    "site.id",
    "site.name",
    "campaign.id",
    "campaign.name",
    "unsubscribe_url",
];

/// The longest SMS a campaign sends, in segments.
pub const MAX_SMS_SEGMENTS: usize = 10;

/// Who a campaign is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Audience {
    All,
    Site(String),
    Specialty(String),
    Practitioners(Vec<String>),
}

/// A checked campaign request.
#[derive(Debug)]
pub struct CampaignSpec {
    pub name: String,
    pub channels: Vec<Channel>,
    pub subject: Option<Template>,
    pub text: Option<Template>,
    pub html: Option<Template>,
    pub sms: Option<Template>,
    pub audience: Audience,
    pub send_at: Option<i64>,
}

fn unprocessable(s: String) -> ApiError {
    ApiError::Unprocessable(s)
}

impl CampaignSpec {
    /// Checks the request; `configured` are the channels this server can
    /// send.
    pub fn parse(v: &Value, configured: &[Channel]) -> Result<CampaignSpec, ApiError> {
        let name = v["name"]
            .as_str()
            .map(str::trim)
            .filter(|n| !n.is_empty() && n.len() <= 200)
            .ok_or_else(|| unprocessable("name: a text of 1 to 200 characters is needed".into()))?
            .to_string();
        let mut channels = Vec::new();
        for c in v["channels"].as_array().into_iter().flatten() {
            let ch = c
                .as_str()
                .and_then(Channel::parse)
                .ok_or_else(|| unprocessable(format!("channels: {c} is not email or sms")))?;
            if !configured.contains(&ch) {
                return Err(unprocessable(format!(
                    "channels: this server is not set up to send {} (see --{})",
                    ch.as_str(),
                    match ch {
                        Channel::Email => "smtp-url",
                        Channel::Sms => "sms-base-url",
                    }
                )));
            }
            if !channels.contains(&ch) {
                channels.push(ch);
            }
        }
        if channels.is_empty() {
            return Err(unprocessable(
                "channels: a list of \"email\" and/or \"sms\" is needed".into(),
            ));
        }
        let t = &v["templates"];
        let template = |key: &str, needed: bool| -> Result<Option<Template>, ApiError> {
            match &t[key] {
                Value::Null if needed => Err(unprocessable(format!(
                    "templates.{key} is needed for the channels asked for"
                ))),
                Value::Null => Ok(None),
                Value::String(s) => Template::parse(s, &PLACEHOLDERS)
                    .map(Some)
                    .map_err(|e| unprocessable(format!("templates.{key}: {e}"))),
                _ => Err(unprocessable(format!("templates.{key} must be a text"))),
            }
        };
        let email = channels.contains(&Channel::Email);
        let sms = channels.contains(&Channel::Sms);
        let spec = CampaignSpec {
            name,
            subject: template("subject", email)?,
            text: template("text", email)?,
            html: template("html", false)?,
            sms: template("sms", sms)?,
            audience: audience(&v["audience"])?,
            send_at: match &v["send_at"] {
                Value::Null => None,
                Value::String(s) => Some(
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                        .map_err(|_| {
                            unprocessable(format!("send_at {s:?}: an RFC 3339 instant is needed"))
                        })?,
                ),
                _ => return Err(unprocessable("send_at must be an RFC 3339 instant".into())),
            },
            channels,
        };
        Ok(spec)
    }
}

fn audience(v: &Value) -> Result<Audience, ApiError> {
    let bad = || {
        unprocessable(
            "audience: one of {\"all\": true}, {\"site\": ID}, {\"specialty\": CODE}, {\"practitioners\": [IDS]}"
                .into(),
        )
    };
    let m = v.as_object().filter(|m| m.len() == 1).ok_or_else(bad)?;
    let (k, v) = m.iter().next().ok_or_else(bad)?;
    match (k.as_str(), v) {
        ("all", Value::Bool(true)) => Ok(Audience::All),
        ("site", Value::String(s)) if !s.is_empty() => Ok(Audience::Site(s.clone())),
        ("specialty", Value::String(s)) if !s.is_empty() => Ok(Audience::Specialty(s.clone())),
        ("practitioners", Value::Array(ids)) if !ids.is_empty() => ids
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<Vec<_>, _>>()
            .map(Audience::Practitioners),
        _ => Err(bad()),
    }
}

/// The recipients an audience names; an unknown site or practitioner, or
/// nobody at all, is a 422.
pub fn select<'a>(
    audience: &Audience,
    all: &'a [Recipient],
    sites: &Snapshot,
) -> Result<Vec<&'a Recipient>, ApiError> {
    let chosen: Vec<&Recipient> = match audience {
        Audience::All => all.iter().collect(),
        Audience::Site(s) => {
            if sites.get(s).is_none() {
                return Err(unprocessable(format!("audience.site: no site {s:?}")));
            }
            all.iter()
                .filter(|r| r.sites.iter().any(|x| x == s))
                .collect()
        }
        Audience::Specialty(c) => all
            .iter()
            .filter(|r| r.specialties.iter().any(|x| x == c))
            .collect(),
        Audience::Practitioners(ids) => {
            let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
            let chosen: Vec<&Recipient> = all
                .iter()
                .filter(|r| wanted.contains(r.id.as_str()))
                .collect();
            if chosen.len() < wanted.len() {
                let found: HashSet<&str> = chosen.iter().map(|r| r.id.as_str()).collect();
                let mut missing: Vec<&str> = wanted.difference(&found).copied().collect();
                missing.sort_unstable();
                missing.truncate(10);
                return Err(unprocessable(format!(
                    "audience.practitioners: no active practitioner {}",
                    missing.join(", ")
                )));
            }
            chosen
        }
    };
    if chosen.is_empty() {
        return Err(unprocessable(
            "the audience has no practitioner in it".into(),
        ));
    }
    Ok(chosen)
}

/// Every (recipient, channel) row, rendered. A recipient without an
/// address for a channel gets a `failed` row saying so (the campaign shows
/// whom it could not reach); an SMS over [`MAX_SMS_SEGMENTS`] is a 422.
pub fn deliveries(
    spec: &CampaignSpec,
    campaign: &str,
    recipients: &[&Recipient],
    sites: &Snapshot,
    links: &Links,
) -> Result<Vec<NewDelivery>, ApiError> {
    let mut out = Vec::with_capacity(recipients.len() * spec.channels.len());
    for r in recipients {
        let site = r.sites.first().and_then(|s| sites.get(s));
        for &channel in &spec.channels {
            let id = uuid::Uuid::now_v7().to_string();
            let unsubscribe = links.unsubscribe(&id);
            let name = r.name();
            let vars = |k: &str| -> Option<String> {
                Some(match k {
                    "practitioner.id" => r.id.clone(),
                    "practitioner.name" => name.clone(),
                    "practitioner.given" => r.given.clone(),
                    "practitioner.family" => r.family.clone(),
                    "practitioner.specialty" => r.specialties.first()?.clone(),
                    "site.id" => r.sites.first()?.clone(),
                    "site.name" => site?.site.name.clone(),
                    "campaign.id" => campaign.to_string(),
                    "campaign.name" => spec.name.clone(),
                    "unsubscribe_url" => unsubscribe.clone(),
                    _ => return None,
                })
            };
            let render = |t: &Option<Template>, e| t.as_ref().map(|t| t.render(&vars, e));
            let (address, row) = match channel {
                Channel::Email => (
                    r.email.clone(),
                    NewDelivery {
                        id,
                        practitioner: r.id.clone(),
                        channel,
                        address: String::new(),
                        subject: render(&spec.subject, Escape::None),
                        body: render(&spec.text, Escape::None).unwrap_or_default(),
                        html: render(&spec.html, Escape::Html),
                        status: DeliveryStatus::Pending,
                        error: None,
                    },
                ),
                Channel::Sms => {
                    let body = render(&spec.sms, Escape::None).unwrap_or_default();
                    let seg = clinflow_notify::sms::segments(&body);
                    if seg.segments > MAX_SMS_SEGMENTS {
                        return Err(unprocessable(format!(
                            "templates.sms: the message to practitioner {} is {} segments long; at most {MAX_SMS_SEGMENTS}",
                            r.id, seg.segments
                        )));
                    }
                    (
                        r.phone.clone(),
                        NewDelivery {
                            id,
                            practitioner: r.id.clone(),
                            channel,
                            address: String::new(),
                            subject: None,
                            body,
                            html: None,
                            status: DeliveryStatus::Pending,
                            error: None,
                        },
                    )
                }
            };
            let row = match address {
                Some(a) => match channel {
                    Channel::Sms => match clinflow_notify::phone::e164(&a) {
                        Ok(_) => NewDelivery { address: a, ..row },
                        Err(e) => NewDelivery {
                            status: DeliveryStatus::Failed,
                            error: Some(format!("invalid mobile number: {e}")),
                            address: a,
                            ..row
                        },
                    },
                    Channel::Email => NewDelivery { address: a, ..row },
                },
                None => NewDelivery {
                    status: DeliveryStatus::Failed,
                    error: Some(format!(
                        "the practitioner has no {}",
                        match channel {
                            Channel::Email => "e-mail address",
                            Channel::Sms => "mobile number",
                        }
                    )),
                    ..row
                },
            };
            out.push(row);
        }
    }
    Ok(out)
}
