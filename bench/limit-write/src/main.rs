//! `clinflow-bench-limit`: the peer of the write-throughput benchmark
//! (issue 2, benchmark 1).
//!
//! Writes N Observations, the same bodies `../shared/peers/txload.py` posts,
//! into a fresh database with clinflow's own schema, as exactly the rows
//! clinflow writes for them (`resources`, `resource_versions` and the index
//! rows of `clinflow_fhir::index::extract`), in batches of 100 per
//! transaction with prepared statements from 8 concurrent writers. Nothing
//! else: no HTTP, no JSON parsing or validation in the timed region, and no
//! audit rows (clinflow also writes one `audit_log` row per resource; the
//! report says so beside the figure).
//!
//! Prints one JSON line: Observations/s, batch latency p50/p99, counts.

mod postgres;
mod sqlite;
mod workload;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use clinflow_store::{DatabaseUrl, Store};

#[derive(Parser)]
#[command(
    name = "clinflow-bench-limit",
    about = "Writes Observations straight into a clinflow database: the write-throughput limit"
)]
struct Args {
    /// sqlite://PATH or postgres://USER@HOST:PORT/DB?schema=NAME; created and
    /// migrated with clinflow's schema when new. Use a fresh one each run.
    #[arg(long)]
    database: String,
    /// How many Observations to write.
    #[arg(long, default_value_t = 100_000)]
    count: usize,
    /// Observations per transaction.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent writers (connections).
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// `Observation.subject` of every resource.
    #[arg(long, default_value = "Patient/CARDIO-01-0001")]
    patient_ref: String,
    /// Extra SQLite PRAGMA (e.g. `wal_autocheckpoint=10000`), run on every
    /// writer after clinflow's own settings; repeatable. For experiments: the
    /// benchmark runs with clinflow's settings only.
    #[arg(long = "sqlite-pragma")]
    sqlite_pragmas: Vec<String>,
    /// Resource ids: time-ordered (UUIDv7 layout) as clinflow assigns them,
    /// or random v4 UUIDs (what clinflow did before: for comparison).
    #[arg(long, value_enum, default_value_t = workload::Ids::Ordered)]
    ids: workload::Ids,
    /// Seed of the values and codes drawn.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.batch > 0 && args.writers > 0,
        "--batch and --writers must be at least 1"
    );
    let url: DatabaseUrl = args
        .database
        .parse()
        .map_err(|e: String| anyhow::anyhow!(e))?;

    // Clinflow's own migrations create the schema; the store is closed
    // again before anything is timed.
    let store = Store::open(&url)
        .await
        .context("creating the database with clinflow's schema")?;
    store.flush().await?;
    drop(store);

    let t0 = Instant::now();
    let per_client = args.count.div_ceil(args.writers);
    let rows = workload::build(
        args.count,
        per_client,
        &args.patient_ref,
        args.seed,
        args.ids,
    )?;
    let prepare_s = t0.elapsed().as_secs_f64();
    let index_rows: usize = rows.iter().map(|r| r.entries.len()).sum();
    let body_bytes: usize = rows.iter().map(|r| r.body.len()).sum();

    let (engine, (mut lat, wall)) = match &url {
        DatabaseUrl::Sqlite(path) => {
            let path = path.clone();
            let (batch, writers, pragmas) = (args.batch, args.writers, args.sqlite_pragmas);
            let r = tokio::task::spawn_blocking(move || {
                sqlite::run(&path, &rows, batch, writers, &pragmas)
            })
            .await??;
            ("sqlite", r)
        }
        DatabaseUrl::Postgres(u) => (
            "postgres",
            postgres::run(u, Arc::new(rows), args.batch, args.writers).await?,
        ),
    };
    lat.sort();
    let secs = wall.as_secs_f64();
    println!(
        "{{\"engine\":\"{engine}\",\"resources_per_s\":{},\"count\":{},\"batch\":{},\"writers\":{},\"batches\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"seconds\":{:.2},\"index_rows_per_resource\":{:.2},\"body_bytes_avg\":{},\"prepare_seconds\":{:.1},\"audit_rows\":0}}",
        (args.count as f64 / secs).round(),
        args.count,
        args.batch,
        args.writers,
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        secs,
        index_rows as f64 / args.count.max(1) as f64,
        body_bytes / args.count.max(1),
        prepare_s,
    );
    Ok(())
}
