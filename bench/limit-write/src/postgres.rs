//! The PostgreSQL limit: one multi-row insert per table per batch
//! (`INSERT ... SELECT FROM UNNEST` of arrays, prepared once per
//! connection), pipelined with `BEGIN` and `COMMIT`, so a batch costs one
//! round trip. Each writer has its own connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clinflow_fhir::IndexValue;
use futures::future::{join_all, BoxFuture};
use futures::FutureExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement};

use crate::workload::Row;

/// The driver's configuration for `url`, with clinflow's `?schema=NAME`
/// turned into the connection's `search_path`.
fn config(url: &str) -> anyhow::Result<tokio_postgres::Config> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut schema = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("schema=") {
            Some(s) => schema = Some(s),
            None => rest.push(pair),
        }
    }
    let driver_url = if rest.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", rest.join("&"))
    };
    let mut config: tokio_postgres::Config = driver_url
        .parse()
        .map_err(|e| anyhow!("the PostgreSQL URL is not valid: {e}"))?;
    if let Some(s) = schema {
        config.options(format!("-csearch_path={s}"));
    }
    Ok(config)
}

struct Stmts {
    resources: Statement,
    versions: Statement,
    token: Statement,
    string: Statement,
    date: Statement,
    reference: Statement,
    quantity: Statement,
}

async fn prepare(c: &Client) -> anyhow::Result<Stmts> {
    Ok(Stmts {
        resources: c.prepare("INSERT INTO resources (rtype, id, vid, last_updated, deleted, patient, sort_date) SELECT 'Observation', id, 1, lu, 0, p, sd FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::TEXT[], $4::BIGINT[]) AS t(id, lu, p, sd)").await?,
        versions: c.prepare("INSERT INTO resource_versions (rtype, id, vid, last_updated, deleted, body) SELECT 'Observation', id, 1, lu, 0, b FROM UNNEST($1::TEXT[], $2::BIGINT[], $3::TEXT[]) AS t(id, lu, b)").await?,
        token: c.prepare("INSERT INTO idx_token (rtype, id, param, system, code) SELECT 'Observation', * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) ON CONFLICT DO NOTHING").await?,
        string: c.prepare("INSERT INTO idx_string (rtype, id, param, value) SELECT 'Observation', * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[]) ON CONFLICT DO NOTHING").await?,
        date: c.prepare("INSERT INTO idx_date (rtype, id, param, low, high) SELECT 'Observation', * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[], $4::BIGINT[]) ON CONFLICT DO NOTHING").await?,
        reference: c.prepare("INSERT INTO idx_reference (rtype, id, param, target_type, target_id) SELECT 'Observation', * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[]) ON CONFLICT DO NOTHING").await?,
        quantity: c.prepare("INSERT INTO idx_quantity (rtype, id, param, value, system, code) SELECT 'Observation', * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::DOUBLE PRECISION[], $4::TEXT[], $5::TEXT[]) ON CONFLICT DO NOTHING").await?,
    })
}

/// The columns of one batch, borrowed from its rows.
#[derive(Default)]
struct Cols<'a> {
    id: Vec<&'a str>,
    last_updated: Vec<i64>,
    patient: Vec<Option<&'a str>>,
    sort_date: Vec<i64>,
    body: Vec<&'a str>,
    token: [Vec<&'a str>; 4],
    string: [Vec<&'a str>; 3],
    date: DateCols<'a>,
    reference: [Vec<&'a str>; 4],
    quantity: QuantityCols<'a>,
}

#[derive(Default)]
struct DateCols<'a> {
    id: Vec<&'a str>,
    param: Vec<&'a str>,
    low: Vec<i64>,
    high: Vec<i64>,
}

#[derive(Default)]
struct QuantityCols<'a> {
    id: Vec<&'a str>,
    param: Vec<&'a str>,
    value: Vec<f64>,
    system: Vec<&'a str>,
    code: Vec<&'a str>,
}

impl<'a> Cols<'a> {
    fn of(rows: &'a [Row]) -> Cols<'a> {
        let mut c = Cols::default();
        for r in rows {
            c.id.push(&r.id);
            c.last_updated.push(r.last_updated);
            c.patient.push(r.patient.as_deref());
            c.sort_date.push(r.sort_date);
            c.body.push(&r.body);
            for e in &r.entries {
                match &e.value {
                    IndexValue::Token { system, code } => {
                        let [id, param, sys, cd] = &mut c.token;
                        id.push(&r.id);
                        param.push(e.param);
                        sys.push(system.as_deref().unwrap_or(""));
                        cd.push(code);
                    }
                    IndexValue::String { value } => {
                        let [id, param, v] = &mut c.string;
                        id.push(&r.id);
                        param.push(e.param);
                        v.push(value);
                    }
                    IndexValue::Date { low, high } => {
                        c.date.id.push(&r.id);
                        c.date.param.push(e.param);
                        c.date.low.push(*low);
                        c.date.high.push(*high);
                    }
                    IndexValue::Reference {
                        target_type,
                        target_id,
                    } => {
                        let [id, param, t, tid] = &mut c.reference;
                        id.push(&r.id);
                        param.push(e.param);
                        t.push(target_type);
                        tid.push(target_id);
                    }
                    IndexValue::Quantity {
                        value,
                        system,
                        code,
                    } => {
                        c.quantity.id.push(&r.id);
                        c.quantity.param.push(e.param);
                        c.quantity.value.push(*value);
                        c.quantity.system.push(system.as_deref().unwrap_or(""));
                        c.quantity.code.push(code.as_deref().unwrap_or(""));
                    }
                }
            }
        }
        c
    }
}

type Step<'a> = BoxFuture<'a, Result<(), tokio_postgres::Error>>;

fn exec<'a>(c: &'a Client, s: &Statement, params: Vec<&'a (dyn ToSql + Sync)>) -> Step<'a> {
    let s = s.clone();
    async move { c.execute(&s, &params).await.map(|_| ()) }.boxed()
}

/// Writes one batch: `BEGIN`, the inserts and `COMMIT`, sent together.
async fn write_batch(c: &Client, st: &Stmts, rows: &[Row]) -> anyhow::Result<()> {
    let cols = Cols::of(rows);
    let exec = |s: &Statement, p| exec(c, s, p);
    let mut steps: Vec<Step<'_>> = vec![c.batch_execute("BEGIN").boxed()];
    steps.push(exec(
        &st.resources,
        vec![&cols.id, &cols.last_updated, &cols.patient, &cols.sort_date],
    ));
    steps.push(exec(
        &st.versions,
        vec![&cols.id, &cols.last_updated, &cols.body],
    ));
    let [a, b, s, d] = &cols.token;
    if !a.is_empty() {
        steps.push(exec(&st.token, vec![a, b, s, d]));
    }
    let [a, b, v] = &cols.string;
    if !a.is_empty() {
        steps.push(exec(&st.string, vec![a, b, v]));
    }
    let d = &cols.date;
    if !d.id.is_empty() {
        steps.push(exec(&st.date, vec![&d.id, &d.param, &d.low, &d.high]));
    }
    let [a, b, t, tid] = &cols.reference;
    if !a.is_empty() {
        steps.push(exec(&st.reference, vec![a, b, t, tid]));
    }
    let q = &cols.quantity;
    if !q.id.is_empty() {
        steps.push(exec(
            &st.quantity,
            vec![&q.id, &q.param, &q.value, &q.system, &q.code],
        ));
    }
    // COMMIT of a transaction that failed rolls it back; the failing
    // statement's error is reported below.
    steps.push(c.batch_execute("COMMIT").boxed());
    for r in join_all(steps).await {
        r?;
    }
    Ok(())
}

/// Writes `rows` in batches of `batch` over `writers` connections; returns
/// the latency of each batch and the wall time.
pub async fn run(
    url: &str,
    rows: Arc<Vec<Row>>,
    batch: usize,
    writers: usize,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let config = config(url)?;
    let mut clients = Vec::with_capacity(writers);
    for _ in 0..writers {
        let (client, conn) = config
            .connect(NoTls)
            .await
            .context("connecting to PostgreSQL")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("a PostgreSQL connection ended with an error: {e}");
            }
        });
        let st = prepare(&client).await?;
        clients.push((client, st));
    }
    let nbatches = rows.len().div_ceil(batch);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(client, st)| {
            let (rows, next) = (rows.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= nbatches {
                        return anyhow::Ok(lat);
                    }
                    let b = &rows[i * batch..((i + 1) * batch).min(rows.len())];
                    let t0 = Instant::now();
                    write_batch(&client, &st, b)
                        .await
                        .with_context(|| format!("writing batch {i}"))?;
                    lat.push(t0.elapsed());
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(nbatches);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all, start.elapsed()))
}
