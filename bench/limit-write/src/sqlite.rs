//! The SQLite limit: prepared single-row inserts, one transaction per batch.
//!
//! Each writer has its own connection, set up as clinflow's store sets up
//! its writer (WAL, `synchronous=FULL`, the same cache), and takes an
//! turn, in batch order, for its transaction. SQLite lets one writer in at a
//! time anyway; queueing in order instead of on SQLite's busy handler (which
//! sleeps 1, 2, 5, 10... ms between retries) or an unfair mutex (which lets
//! one thread starve) measures the database rather than the waiting, and is
//! what clinflow's queue to its single writer thread does.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clinflow_fhir::IndexValue;
use rusqlite::{params, Connection};

use crate::workload::Row;

fn open(path: &Path, pragmas: &[String]) -> anyhow::Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-262144; PRAGMA mmap_size=1073741824; PRAGMA temp_store=MEMORY;",
    )?;
    // As clinflow's writer connection (`WRITER_CACHE_KIB`).
    conn.execute_batch(&format!(
        "PRAGMA cache_size=-{};",
        clinflow_store::sqlite::WRITER_CACHE_KIB
    ))?;
    for p in pragmas {
        conn.execute_batch(&format!("PRAGMA {p};"))
            .with_context(|| format!("PRAGMA {p}"))?;
    }
    Ok(conn)
}

fn write_batch(conn: &mut Connection, batch: &[Row]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    {
        let mut resource = tx.prepare_cached(
            "INSERT INTO resources (rtype, id, vid, last_updated, deleted, patient, sort_date) VALUES ('Observation', ?, 1, ?, 0, ?, ?)",
        )?;
        let mut version = tx.prepare_cached(
            "INSERT INTO resource_versions (rtype, id, vid, last_updated, deleted, body) VALUES ('Observation', ?, 1, ?, 0, ?)",
        )?;
        let mut token = tx.prepare_cached(
            "INSERT OR IGNORE INTO idx_token (rtype, id, param, system, code) VALUES ('Observation', ?, ?, ?, ?)",
        )?;
        let mut string = tx.prepare_cached(
            "INSERT OR IGNORE INTO idx_string (rtype, id, param, value) VALUES ('Observation', ?, ?, ?)",
        )?;
        let mut date = tx.prepare_cached(
            "INSERT OR IGNORE INTO idx_date (rtype, id, param, low, high) VALUES ('Observation', ?, ?, ?, ?)",
        )?;
        let mut reference = tx.prepare_cached(
            "INSERT OR IGNORE INTO idx_reference (rtype, id, param, target_type, target_id) VALUES ('Observation', ?, ?, ?, ?)",
        )?;
        let mut quantity = tx.prepare_cached(
            "INSERT OR IGNORE INTO idx_quantity (rtype, id, param, value, system, code) VALUES ('Observation', ?, ?, ?, ?, ?)",
        )?;
        for r in batch {
            resource.execute(params![r.id, r.last_updated, r.patient, r.sort_date])?;
            version.execute(params![r.id, r.last_updated, r.body])?;
            for e in &r.entries {
                match &e.value {
                    IndexValue::Token { system, code } => token.execute(params![
                        r.id,
                        e.param,
                        system.as_deref().unwrap_or(""),
                        code
                    ])?,
                    IndexValue::String { value } => {
                        string.execute(params![r.id, e.param, value])?
                    }
                    IndexValue::Date { low, high } => {
                        date.execute(params![r.id, e.param, low, high])?
                    }
                    IndexValue::Reference {
                        target_type,
                        target_id,
                    } => reference.execute(params![r.id, e.param, target_type, target_id])?,
                    IndexValue::Quantity {
                        value,
                        system,
                        code,
                    } => quantity.execute(params![
                        r.id,
                        e.param,
                        value,
                        system.as_deref().unwrap_or(""),
                        code.as_deref().unwrap_or("")
                    ])?,
                };
            }
        }
    }
    tx.commit()
}

/// Writes `rows` in batches of `batch` from `writers` threads; returns the
/// latency of each batch (waiting for the lock included) and the wall time.
pub fn run(
    path: &Path,
    rows: &[Row],
    batch: usize,
    writers: usize,
    pragmas: &[String],
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let batches: Vec<&[Row]> = rows.chunks(batch).collect();
    let mut conns = (0..writers)
        .map(|_| {
            let c = open(path, pragmas)?;
            // As clinflow: WAL checkpoints run on their own connection and
            // thread (below), the writer's own only as a backstop.
            c.execute_batch("PRAGMA wal_autocheckpoint=20000;")?;
            Ok(c)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let done = std::sync::atomic::AtomicBool::new(false);
    let checkpointer = open(path, pragmas)?;
    let next = AtomicUsize::new(0);
    // The batch whose turn it is to write; batches are taken in order.
    let turn = (Mutex::new(0usize), Condvar::new());
    let start = Instant::now();
    let latencies = std::thread::scope(|s| -> anyhow::Result<Vec<Duration>> {
        let done = &done;
        s.spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let _ = checkpointer.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        });
        let handles: Vec<_> = conns
            .iter_mut()
            .map(|conn| {
                let (batches, next, turn) = (&batches, &next, &turn);
                s.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let mut lat = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(b) = batches.get(i) else {
                            return Ok(lat);
                        };
                        let t0 = Instant::now();
                        let (current, cv) = turn;
                        let mut guard = current.lock().unwrap_or_else(|p| p.into_inner());
                        while *guard != i {
                            guard = cv.wait(guard).unwrap_or_else(|p| p.into_inner());
                        }
                        let r = write_batch(conn, b);
                        // Pass the turn on even after a failure, so the
                        // other writers finish instead of waiting forever.
                        *guard += 1;
                        drop(guard);
                        cv.notify_all();
                        r.with_context(|| format!("writing batch {i}"))?;
                        lat.push(t0.elapsed());
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut failed = None;
        for h in handles {
            match h.join() {
                Ok(Ok(lat)) => all.extend(lat),
                Ok(Err(e)) => failed = Some(e),
                Err(_) => failed = Some(anyhow::anyhow!("a writer thread panicked")),
            }
        }
        done.store(true, Ordering::Relaxed);
        match failed {
            Some(e) => Err(e),
            None => Ok(all),
        }
    })?;
    Ok((latencies, start.elapsed()))
}
