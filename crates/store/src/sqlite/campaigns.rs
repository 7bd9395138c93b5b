//! Campaigns and deliveries on SQLite. Writes are custom jobs of the one
//! writer (so a claim is a plain `UPDATE ... WHERE id IN (SELECT ... LIMIT
//! n) RETURNING`: the writer holds the write lock, which is SQLite's
//! `FOR UPDATE SKIP LOCKED`: two claims never see the same pending row).

use std::sync::Mutex;

use anyhow::anyhow;
use rusqlite::{params, Connection, OptionalExtension};

use super::SqliteStore;
use crate::campaign::*;
use crate::model::AuditRecord;

/// The result a custom job hands back beside its applied flag.
struct Slot<T>(Mutex<Option<T>>);

impl<T> Slot<T> {
    fn new() -> std::sync::Arc<Slot<T>> {
        std::sync::Arc::new(Slot(Mutex::new(None)))
    }
    fn put(&self, v: T) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some(v);
        }
    }
    fn take(&self) -> Option<T> {
        self.0.lock().ok().and_then(|mut g| g.take())
    }
}

impl SqliteStore {
    /// See [`crate::Store::create_campaign`].
    pub async fn create_campaign(
        &self,
        c: NewCampaign,
        deliveries: Vec<NewDelivery>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<Created> {
        let slot = Slot::new();
        let out = slot.clone();
        self.custom(audit, move |conn| {
            if let Some(key) = &c.idempotency_key {
                let existing: Option<String> = conn
                    .query_row(
                        "SELECT id FROM campaigns WHERE created_by = ? AND idempotency_key = ?",
                        params![c.created_by, key],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(id) = existing {
                    out.put((id, false));
                    return Ok(false);
                }
            }
            conn.execute(
                "INSERT INTO campaigns (id, name, channels, spec, send_at, created_at, created_by, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                params![c.id, c.name, channels_column(&c.channels), c.spec, c.send_at, c.created_at, c.created_by, c.idempotency_key],
            )?;
            let mut st = conn.prepare_cached(
                "INSERT INTO deliveries (id, campaign, practitioner, channel, address, subject, body, html, status, last_error, next_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )?;
            for d in &deliveries {
                st.execute(params![
                    d.id,
                    c.id,
                    d.practitioner,
                    d.channel.as_str(),
                    d.address,
                    d.subject,
                    d.body,
                    d.html,
                    d.status.as_str(),
                    d.error,
                    c.send_at,
                    c.created_at
                ])?;
            }
            suppress_opted_out(conn, &c.id, c.created_at)?;
            out.put((c.id.clone(), true));
            Ok(true)
        })
        .await?;
        slot.take()
            .ok_or_else(|| anyhow!("campaign creation gave no answer"))
    }

    pub async fn campaign(&self, id: &str) -> anyhow::Result<Option<CampaignRecord>> {
        let id = id.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!("{CAMPAIGN_SELECT} WHERE id = ?"))?;
            st.query_row(params![id], campaign_row)
                .optional()?
                .transpose()
        })
        .await
    }

    pub async fn campaigns(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> anyhow::Result<Vec<CampaignRecord>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "{CAMPAIGN_SELECT} WHERE id > ? ORDER BY id LIMIT ?"
            ))?;
            let rows = st.query_map(
                params![after.unwrap_or_default(), limit as i64],
                campaign_row,
            )?;
            rows.map(|r| r.map_err(anyhow::Error::from).and_then(|x| x))
                .collect()
        })
        .await
    }

    pub async fn delivery_counts(&self, campaign: &str) -> anyhow::Result<DeliveryCounts> {
        let campaign = campaign.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT channel, status, COUNT(*) FROM deliveries WHERE campaign = ? GROUP BY channel, status",
            )?;
            let rows = st.query_map(params![campaign], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?))
            })?;
            let mut out = Vec::new();
            for r in rows {
                let (ch, s, n) = r?;
                out.push((channel_of(&ch)?, status_of(&s)?, n as u64));
            }
            Ok(out)
        })
        .await
    }

    pub async fn sent_since(
        &self,
        campaign: &str,
        since: i64,
    ) -> anyhow::Result<Vec<(Channel, u64)>> {
        let campaign = campaign.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT channel, COUNT(*) FROM deliveries WHERE campaign = ? AND status IN ('sent', 'delivered', 'failed') AND sent_at >= ? GROUP BY channel",
            )?;
            let rows = st.query_map(params![campaign, since], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut out = Vec::new();
            for r in rows {
                let (ch, n) = r?;
                out.push((channel_of(&ch)?, n as u64));
            }
            Ok(out)
        })
        .await
    }

    pub async fn deliveries(&self, f: DeliveryFilter) -> anyhow::Result<Vec<DeliveryRecord>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "{DELIVERY_SELECT} WHERE campaign = ?1 AND (?2 IS NULL OR status = ?2) AND id > ?3 ORDER BY id LIMIT ?4"
            ))?;
            let rows = st.query_map(
                params![
                    f.campaign,
                    f.status.map(DeliveryStatus::as_str),
                    f.after.unwrap_or_default(),
                    f.limit as i64
                ],
                delivery_row,
            )?;
            rows.map(|r| r.map_err(anyhow::Error::from).and_then(|x| x))
                .collect()
        })
        .await
    }

    pub async fn delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryRecord>> {
        let id = id.to_string();
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!("{DELIVERY_SELECT} WHERE id = ?"))?;
            st.query_row(params![id], delivery_row)
                .optional()?
                .transpose()
        })
        .await
    }

    pub async fn cancel_campaign(
        &self,
        id: &str,
        by: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<Option<u64>> {
        let (id, by) = (id.to_string(), by.to_string());
        let slot = Slot::new();
        let out = slot.clone();
        let applied = self
            .custom(audit, move |c| {
                let n = c.execute(
                    "UPDATE campaigns SET cancelled_at = ?, cancelled_by = ? WHERE id = ? AND cancelled_at IS NULL",
                    params![at, by, id],
                )?;
                if n == 0 {
                    return Ok(false);
                }
                let n = c.execute(
                    "UPDATE deliveries SET status = 'cancelled', last_error = 'campaign cancelled', updated_at = ? WHERE campaign = ? AND status = 'pending'",
                    params![at, id],
                )?;
                out.put(n as u64);
                Ok(true)
            })
            .await?;
        Ok(if applied { slot.take() } else { None })
    }

    pub async fn claim_deliveries(
        &self,
        channel: Channel,
        now: i64,
        limit: usize,
        claim: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Vec<DeliveryRecord>> {
        let claim = claim.to_string();
        let slot = Slot::new();
        let out = slot.clone();
        self.custom(Vec::new(), move |c| {
            let mut st = c.prepare_cached(&format!(
                "UPDATE deliveries SET status = 'sending', claim = ?1, claimed_at = ?2, lease_until = ?3, attempts = attempts + 1, updated_at = ?2 WHERE id IN (SELECT id FROM deliveries WHERE channel = ?4 AND status = 'pending' AND next_at <= ?2 ORDER BY next_at, id LIMIT ?5) RETURNING {}",
                DELIVERY_SELECT.trim_start_matches("SELECT ").trim_end_matches(" FROM deliveries")
            ))?;
            let rows = st.query_map(
                params![claim, now, now + lease_ms, channel.as_str(), limit as i64],
                delivery_row,
            )?;
            let rows: anyhow::Result<Vec<_>> = rows
                .map(|r| r.map_err(anyhow::Error::from).and_then(|x| x))
                .collect();
            let rows = rows?;
            let applied = !rows.is_empty();
            out.put(rows);
            Ok(applied)
        })
        .await?;
        Ok(slot.take().unwrap_or_default())
    }

    pub async fn record_deliveries(&self, updates: Vec<DeliveryUpdate>) -> anyhow::Result<u64> {
        let slot = Slot::new();
        let out = slot.clone();
        self.custom(Vec::new(), move |c| {
            let mut n = 0u64;
            for u in &updates {
                n += record_one(c, u)? as u64;
            }
            out.put(n);
            Ok(true)
        })
        .await?;
        Ok(slot.take().unwrap_or(0))
    }

    pub async fn stale_deliveries(
        &self,
        channel: Channel,
        now: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<DeliveryRecord>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(&format!(
                "{DELIVERY_SELECT} WHERE channel = ? AND status = 'sending' AND lease_until < ? ORDER BY next_at, id LIMIT ?"
            ))?;
            let rows = st.query_map(params![channel.as_str(), now, limit as i64], delivery_row)?;
            rows.map(|r| r.map_err(anyhow::Error::from).and_then(|x| x))
                .collect()
        })
        .await
    }

    pub async fn provider_report(
        &self,
        delivery: &str,
        provider_id: &str,
        report: ProviderReport,
        error: Option<String>,
        at: i64,
    ) -> anyhow::Result<bool> {
        let (delivery, provider_id) = (delivery.to_string(), provider_id.to_string());
        self.custom(Vec::new(), move |c| {
            let (to, from) = report_transition(report);
            let n = c.execute(
                &format!(
                    "UPDATE deliveries SET status = ?1, provider_id = COALESCE(provider_id, ?2), last_error = COALESCE(?3, last_error), sent_at = COALESCE(sent_at, ?4), updated_at = ?4 WHERE id = ?5 AND channel = 'sms' AND (provider_id IS NULL OR provider_id = ?2) AND status IN ({from})"
                ),
                params![to, provider_id, error, at, delivery],
            )?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn opt_out(
        &self,
        practitioner: &str,
        channel: Channel,
        source: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        let (practitioner, source) = (practitioner.to_string(), source.to_string());
        self.custom(audit, move |c| {
            let n = c.execute(
                "INSERT INTO opt_outs (practitioner, channel, at, source) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                params![practitioner, channel.as_str(), at, source],
            )?;
            if n == 0 {
                return Ok(false);
            }
            c.execute(
                "UPDATE deliveries SET status = 'suppressed', last_error = 'opted out', updated_at = ? WHERE channel = ? AND status = 'pending' AND practitioner = ?",
                params![at, channel.as_str(), practitioner],
            )?;
            Ok(true)
        })
        .await
    }

    pub async fn opt_outs(&self) -> anyhow::Result<Vec<(String, Channel)>> {
        self.read(|c| {
            let mut st = c.prepare_cached("SELECT practitioner, channel FROM opt_outs")?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for r in rows {
                let (p, ch) = r?;
                out.push((p, channel_of(&ch)?));
            }
            Ok(out)
        })
        .await
    }

    pub async fn secret(&self, name: &str) -> anyhow::Result<Option<String>> {
        let name = name.to_string();
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT value FROM secrets WHERE name = ?",
                params![name],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }
}

/// Marks the campaign's pending rows of opted-out recipients suppressed.
fn suppress_opted_out(c: &Connection, campaign: &str, at: i64) -> rusqlite::Result<usize> {
    c.execute(
        "UPDATE deliveries SET status = 'suppressed', last_error = 'opted out', updated_at = ? WHERE campaign = ? AND status = 'pending' AND EXISTS (SELECT 1 FROM opt_outs o WHERE o.practitioner = deliveries.practitioner AND o.channel = deliveries.channel)",
        params![at, campaign],
    )
}

fn record_one(c: &Connection, u: &DeliveryUpdate) -> rusqlite::Result<usize> {
    // Only the holder of the claim writes, and only while the row is
    // sending (or was given up as unknown while its send was still out).
    const GUARD: &str = "id = ? AND claim = ? AND (status = 'sending' OR (status = 'failed' AND last_error LIKE 'outcome unknown%'))";
    match &u.outcome {
        DeliveryOutcome::Sent {
            provider_id,
            delivered,
        } => c
            .prepare_cached(&format!(
                "UPDATE deliveries SET status = ?, provider_id = COALESCE(?, provider_id), sent_at = ?, last_error = NULL, updated_at = ? WHERE {GUARD}"
            ))?
            .execute(params![
                if *delivered { "delivered" } else { "sent" },
                provider_id,
                u.at,
                u.at,
                u.id,
                u.claim
            ]),
        DeliveryOutcome::Retry {
            error,
            next_at,
            refund,
        } => c
            .prepare_cached(&format!(
                "UPDATE deliveries SET status = 'pending', next_at = ?, last_error = ?, updated_at = ?, attempts = MAX(attempts - ?, 0) WHERE {GUARD}"
            ))?
            .execute(params![next_at, error, u.at, *refund as i64, u.id, u.claim]),
        DeliveryOutcome::Failed { error } => c
            .prepare_cached(&format!(
                "UPDATE deliveries SET status = 'failed', last_error = ?, updated_at = ? WHERE {GUARD}"
            ))?
            .execute(params![error, u.at, u.id, u.claim]),
    }
}

fn campaign_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<anyhow::Result<CampaignRecord>> {
    let channels: String = r.get(2)?;
    let rec = CampaignRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        channels: Vec::new(),
        spec: r.get(3)?,
        send_at: r.get(4)?,
        created_at: r.get(5)?,
        created_by: r.get(6)?,
        idempotency_key: r.get(7)?,
        cancelled_at: r.get(8)?,
        cancelled_by: r.get(9)?,
    };
    Ok(parse_channels(&channels).map(|channels| CampaignRecord { channels, ..rec }))
}

fn delivery_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<anyhow::Result<DeliveryRecord>> {
    let channel: String = r.get(3)?;
    let status: String = r.get(8)?;
    let rec = (|| -> rusqlite::Result<_> {
        Ok(DeliveryRecord {
            id: r.get(0)?,
            campaign: r.get(1)?,
            practitioner: r.get(2)?,
            channel: Channel::Email,
            address: r.get(4)?,
            subject: r.get(5)?,
            body: r.get(6)?,
            html: r.get(7)?,
            status: DeliveryStatus::Pending,
            attempts: r.get::<_, i64>(9)? as u32,
            next_at: r.get(10)?,
            claim: r.get(11)?,
            claimed_at: r.get(12)?,
            lease_until: r.get(13)?,
            provider_id: r.get(14)?,
            last_error: r.get(15)?,
            sent_at: r.get(16)?,
            updated_at: r.get(17)?,
        })
    })()?;
    Ok((|| {
        Ok(DeliveryRecord {
            channel: channel_of(&channel)?,
            status: status_of(&status)?,
            ..rec
        })
    })())
}
