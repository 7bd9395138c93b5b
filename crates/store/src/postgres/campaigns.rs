//! Campaigns and deliveries on PostgreSQL. Campaign actions (create,
//! cancel, opt-out) carry audit records and go through the writer; the
//! delivery work queue does not: a claim is one `UPDATE ... FROM (SELECT
//! ... FOR UPDATE SKIP LOCKED)` on a pooled connection, so several clinflow
//! processes claim disjoint rows, and outcomes are one `UPDATE ... FROM
//! UNNEST(...)` per group.

use tokio_postgres::{Client, Row};

use super::{db, PgStore};
use crate::campaign::*;
use crate::model::{AuditRecord, Expect, WriteError};

/// The audited campaign writes, applied by the writer in its transaction.
pub(super) enum CampaignOp {
    Create(NewCampaign, Vec<NewDelivery>),
    /// Campaign id, by, at: the number of rows cancelled.
    Cancel(String, String, i64),
    /// Practitioner, channel, source, at.
    OptOut(String, Channel, String, i64),
}

fn conflict(what: &str, id: &str) -> WriteError {
    WriteError::Conflict {
        resource_type: what.into(),
        id: id.into(),
        expected: Expect::Absent,
        found: None,
    }
}

/// Applies `op` in the writer's transaction; a `Conflict` (rolled back with
/// its audit records by the caller) when it does not apply.
pub(super) async fn apply(c: &Client, op: &CampaignOp) -> Result<u64, WriteError> {
    match op {
        CampaignOp::Create(k, deliveries) => {
            let n = c
                .execute(
                    "INSERT INTO campaigns (id, name, channels, spec, send_at, created_at, created_by, idempotency_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (created_by, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
                    &[&k.id, &k.name, &channels_column(&k.channels), &k.spec, &k.send_at, &k.created_at, &k.created_by, &k.idempotency_key],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                return Err(conflict("campaign", &k.id));
            }
            let col = |f: fn(&NewDelivery) -> Option<String>| -> Vec<Option<String>> {
                deliveries.iter().map(f).collect()
            };
            let ids = col(|d| Some(d.id.clone()));
            let practitioners = col(|d| Some(d.practitioner.clone()));
            let channels = col(|d| Some(d.channel.as_str().to_string()));
            let addresses = col(|d| Some(d.address.clone()));
            let subjects = col(|d| d.subject.clone());
            let bodies = col(|d| Some(d.body.clone()));
            let htmls = col(|d| d.html.clone());
            let statuses = col(|d| Some(d.status.as_str().to_string()));
            let errors = col(|d| d.error.clone());
            c.execute(
                "INSERT INTO deliveries (id, campaign, practitioner, channel, address, subject, body, html, status, last_error, next_at, updated_at) SELECT u.id, $1, u.p, u.ch, u.a, u.s, u.b, u.h, u.st, u.e, $2, $3 FROM UNNEST($4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[]) AS u(id, p, ch, a, s, b, h, st, e)",
                &[&k.id, &k.send_at, &k.created_at, &ids, &practitioners, &channels, &addresses, &subjects, &bodies, &htmls, &statuses, &errors],
            )
            .await
            .map_err(db)?;
            c.execute(
                "UPDATE deliveries d SET status = 'suppressed', last_error = 'opted out', updated_at = $2 FROM opt_outs o WHERE d.campaign = $1 AND d.status = 'pending' AND o.practitioner = d.practitioner AND o.channel = d.channel",
                &[&k.id, &k.created_at],
            )
            .await
            .map_err(db)?;
            Ok(deliveries.len() as u64)
        }
        CampaignOp::Cancel(id, by, at) => {
            let n = c
                .execute(
                    "UPDATE campaigns SET cancelled_at = $1, cancelled_by = $2 WHERE id = $3 AND cancelled_at IS NULL",
                    &[at, by, id],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                return Err(conflict("campaign", id));
            }
            c.execute(
                "UPDATE deliveries SET status = 'cancelled', last_error = 'campaign cancelled', updated_at = $1 WHERE campaign = $2 AND status = 'pending'",
                &[at, id],
            )
            .await
            .map_err(db)
        }
        CampaignOp::OptOut(practitioner, channel, source, at) => {
            let n = c
                .execute(
                    "INSERT INTO opt_outs (practitioner, channel, at, source) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    &[practitioner, &channel.as_str(), at, source],
                )
                .await
                .map_err(db)?;
            if n == 0 {
                return Err(conflict("opt-out", practitioner));
            }
            c.execute(
                "UPDATE deliveries SET status = 'suppressed', last_error = 'opted out', updated_at = $1 WHERE channel = $2 AND status = 'pending' AND practitioner = $3",
                &[at, &channel.as_str(), practitioner],
            )
            .await
            .map_err(db)?;
            Ok(1)
        }
    }
}

impl PgStore {
    /// See [`crate::Store::create_campaign`].
    pub async fn create_campaign(
        &self,
        c: NewCampaign,
        deliveries: Vec<NewDelivery>,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<Created> {
        let (id, by, key) = (
            c.id.clone(),
            c.created_by.clone(),
            c.idempotency_key.clone(),
        );
        if self
            .op_applied(
                super::Op::Campaign(CampaignOp::Create(c, deliveries)),
                audit,
            )
            .await?
        {
            return Ok((id, true));
        }
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id FROM campaigns WHERE created_by = $1 AND idempotency_key = $2",
                &[&by, &key],
            )
            .await?
            .ok_or_else(|| {
                anyhow::anyhow!("campaign {id} conflicted but no campaign has its key")
            })?;
        Ok((row.try_get(0)?, false))
    }

    pub async fn campaign(&self, id: &str) -> anyhow::Result<Option<CampaignRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("{CAMPAIGN_SELECT} WHERE id = $1"))
            .await?;
        c.query_opt(&st, &[&id])
            .await?
            .as_ref()
            .map(campaign_row)
            .transpose()
    }

    pub async fn campaigns(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> anyhow::Result<Vec<CampaignRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "{CAMPAIGN_SELECT} WHERE id > $1 ORDER BY id LIMIT $2"
            ))
            .await?;
        c.query(&st, &[&after.unwrap_or_default(), &(limit as i64)])
            .await?
            .iter()
            .map(campaign_row)
            .collect()
    }

    pub async fn delivery_counts(&self, campaign: &str) -> anyhow::Result<DeliveryCounts> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT channel, status, COUNT(*) FROM deliveries WHERE campaign = $1 GROUP BY channel, status",
            )
            .await?;
        c.query(&st, &[&campaign])
            .await?
            .iter()
            .map(|r| {
                Ok((
                    channel_of(r.try_get(0)?)?,
                    status_of(r.try_get(1)?)?,
                    r.try_get::<_, i64>(2)? as u64,
                ))
            })
            .collect()
    }

    pub async fn sent_since(
        &self,
        campaign: &str,
        since: i64,
    ) -> anyhow::Result<Vec<(Channel, u64)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "SELECT channel, COUNT(*) FROM deliveries WHERE campaign = $1 AND status IN ('sent', 'delivered', 'failed') AND sent_at >= $2 GROUP BY channel",
            )
            .await?;
        c.query(&st, &[&campaign, &since])
            .await?
            .iter()
            .map(|r| Ok((channel_of(r.try_get(0)?)?, r.try_get::<_, i64>(1)? as u64)))
            .collect()
    }

    pub async fn deliveries(&self, f: DeliveryFilter) -> anyhow::Result<Vec<DeliveryRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "{DELIVERY_SELECT} WHERE campaign = $1 AND ($2::TEXT IS NULL OR status = $2) AND id > $3 ORDER BY id LIMIT $4"
            ))
            .await?;
        c.query(
            &st,
            &[
                &f.campaign,
                &f.status.map(DeliveryStatus::as_str),
                &f.after.unwrap_or_default(),
                &(f.limit as i64),
            ],
        )
        .await?
        .iter()
        .map(delivery_row)
        .collect()
    }

    pub async fn delivery(&self, id: &str) -> anyhow::Result<Option<DeliveryRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!("{DELIVERY_SELECT} WHERE id = $1"))
            .await?;
        c.query_opt(&st, &[&id])
            .await?
            .as_ref()
            .map(delivery_row)
            .transpose()
    }

    pub async fn cancel_campaign(
        &self,
        id: &str,
        by: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<Option<u64>> {
        match self
            .op(
                super::Op::Campaign(CampaignOp::Cancel(id.to_string(), by.to_string(), at)),
                audit,
            )
            .await
        {
            Ok(n) => Ok(Some(n)),
            Err(e) if matches!(e.downcast_ref(), Some(WriteError::Conflict { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn claim_deliveries(
        &self,
        channel: Channel,
        now: i64,
        limit: usize,
        claim: &str,
        lease_ms: i64,
    ) -> anyhow::Result<Vec<DeliveryRecord>> {
        let c = self.client().await?;
        let cols = DELIVERY_SELECT
            .trim_start_matches("SELECT ")
            .trim_end_matches(" FROM deliveries")
            .split(", ")
            .map(|c| format!("d.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let st = c
            .prepare_cached(&format!(
                "UPDATE deliveries d SET status = 'sending', claim = $1, claimed_at = $2, lease_until = $3, attempts = d.attempts + 1, updated_at = $2 FROM (SELECT id FROM deliveries WHERE channel = $4 AND status = 'pending' AND next_at <= $2 ORDER BY next_at, id LIMIT $5 FOR UPDATE SKIP LOCKED) s WHERE d.id = s.id RETURNING {cols}"
            ))
            .await?;
        c.query(
            &st,
            &[
                &claim,
                &now,
                &(now + lease_ms),
                &channel.as_str(),
                &(limit as i64),
            ],
        )
        .await?
        .iter()
        .map(delivery_row)
        .collect()
    }

    pub async fn record_deliveries(&self, updates: Vec<DeliveryUpdate>) -> anyhow::Result<u64> {
        if updates.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(updates.len());
        let mut claims = Vec::with_capacity(updates.len());
        let mut statuses = Vec::with_capacity(updates.len());
        let mut providers: Vec<Option<String>> = Vec::with_capacity(updates.len());
        let mut sent_at: Vec<Option<i64>> = Vec::with_capacity(updates.len());
        let mut next_at: Vec<Option<i64>> = Vec::with_capacity(updates.len());
        let mut errors: Vec<Option<String>> = Vec::with_capacity(updates.len());
        let mut at = Vec::with_capacity(updates.len());
        let mut refunds: Vec<i64> = Vec::with_capacity(updates.len());
        for u in updates {
            let mut refund = 0;
            let (status, provider, sent, next, error) = match u.outcome {
                DeliveryOutcome::Sent {
                    provider_id,
                    delivered,
                } => (
                    if delivered { "delivered" } else { "sent" },
                    provider_id,
                    Some(u.at),
                    None,
                    None,
                ),
                DeliveryOutcome::Retry {
                    error,
                    next_at,
                    refund: r,
                } => {
                    refund = r as i64;
                    ("pending", None, None, Some(next_at), Some(error))
                }
                DeliveryOutcome::Failed { error } => ("failed", None, None, None, Some(error)),
            };
            ids.push(u.id);
            claims.push(u.claim);
            statuses.push(status);
            providers.push(provider);
            sent_at.push(sent);
            next_at.push(next);
            errors.push(error);
            at.push(u.at);
            refunds.push(refund);
        }
        let c = self.client().await?;
        let st = c
            .prepare_cached(
                "UPDATE deliveries d SET status = u.status, provider_id = COALESCE(u.provider, d.provider_id), sent_at = COALESCE(u.sent_at, d.sent_at), next_at = COALESCE(u.next_at, d.next_at), last_error = u.error, updated_at = u.at, attempts = GREATEST(d.attempts - u.refund, 0) FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[], $7::TEXT[], $8::BIGINT[], $9::BIGINT[]) AS u(id, claim, status, provider, sent_at, next_at, error, at, refund) WHERE d.id = u.id AND d.claim = u.claim AND (d.status = 'sending' OR (d.status = 'failed' AND d.last_error LIKE 'outcome unknown%'))",
            )
            .await?;
        Ok(c.execute(
            &st,
            &[
                &ids, &claims, &statuses, &providers, &sent_at, &next_at, &errors, &at, &refunds,
            ],
        )
        .await?)
    }

    pub async fn stale_deliveries(
        &self,
        channel: Channel,
        now: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<DeliveryRecord>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "{DELIVERY_SELECT} WHERE channel = $1 AND status = 'sending' AND lease_until < $2 ORDER BY next_at, id LIMIT $3"
            ))
            .await?;
        c.query(&st, &[&channel.as_str(), &now, &(limit as i64)])
            .await?
            .iter()
            .map(delivery_row)
            .collect()
    }

    pub async fn provider_report(
        &self,
        delivery: &str,
        provider_id: &str,
        report: ProviderReport,
        error: Option<String>,
        at: i64,
    ) -> anyhow::Result<bool> {
        let (to, from) = report_transition(report);
        let c = self.client().await?;
        let st = c
            .prepare_cached(&format!(
                "UPDATE deliveries SET status = $1, provider_id = COALESCE(provider_id, $2), last_error = COALESCE($3, last_error), sent_at = COALESCE(sent_at, $4), updated_at = $4 WHERE id = $5 AND channel = 'sms' AND (provider_id IS NULL OR provider_id = $2) AND status IN ({from})"
            ))
            .await?;
        Ok(c.execute(&st, &[&to, &provider_id, &error, &at, &delivery])
            .await?
            > 0)
    }

    pub async fn opt_out(
        &self,
        practitioner: &str,
        channel: Channel,
        source: &str,
        at: i64,
        audit: Vec<AuditRecord>,
    ) -> anyhow::Result<bool> {
        self.op_applied(
            super::Op::Campaign(CampaignOp::OptOut(
                practitioner.to_string(),
                channel,
                source.to_string(),
                at,
            )),
            audit,
        )
        .await
    }

    pub async fn opt_outs(&self) -> anyhow::Result<Vec<(String, Channel)>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT practitioner, channel FROM opt_outs")
            .await?;
        c.query(&st, &[])
            .await?
            .iter()
            .map(|r| Ok((r.try_get(0)?, channel_of(r.try_get(1)?)?)))
            .collect()
    }

    pub async fn secret(&self, name: &str) -> anyhow::Result<Option<String>> {
        let c = self.client().await?;
        let st = c
            .prepare_cached("SELECT value FROM secrets WHERE name = $1")
            .await?;
        Ok(match c.query_opt(&st, &[&name]).await? {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }
}

fn campaign_row(r: &Row) -> anyhow::Result<CampaignRecord> {
    Ok(CampaignRecord {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        channels: parse_channels(r.try_get(2)?)?,
        spec: r.try_get(3)?,
        send_at: r.try_get(4)?,
        created_at: r.try_get(5)?,
        created_by: r.try_get(6)?,
        idempotency_key: r.try_get(7)?,
        cancelled_at: r.try_get(8)?,
        cancelled_by: r.try_get(9)?,
    })
}

fn delivery_row(r: &Row) -> anyhow::Result<DeliveryRecord> {
    Ok(DeliveryRecord {
        id: r.try_get(0)?,
        campaign: r.try_get(1)?,
        practitioner: r.try_get(2)?,
        channel: channel_of(r.try_get(3)?)?,
        address: r.try_get(4)?,
        subject: r.try_get(5)?,
        body: r.try_get(6)?,
        html: r.try_get(7)?,
        status: status_of(r.try_get(8)?)?,
        attempts: u32::try_from(r.try_get::<_, i64>(9)?)?,
        next_at: r.try_get(10)?,
        claim: r.try_get(11)?,
        claimed_at: r.try_get(12)?,
        lease_until: r.try_get(13)?,
        provider_id: r.try_get(14)?,
        last_error: r.try_get(15)?,
        sent_at: r.try_get(16)?,
        updated_at: r.try_get(17)?,
    })
}
