//! Open-loop load at a fixed rate: request `i` is due at `start + i/rate`
//! and its latency is counted from then, not from when it was sent, so a
//! slow answer cannot hide the requests queued behind it (no coordinated
//! omission). Prints one JSON object: the latency percentiles (ms), the
//! status counts and, with `--rss-pid`, that process's resident memory
//! sampled every `--rss-every` requests.
//!
//! Targets: `http URL` (GET, bearer token, optional `X-Request-Timeout`)
//! or `records|billing URL` (the service alone over gRPC: the limit).

use std::time::Duration;

use clap::Parser;
use clinflow_history::client::{self, Call, DownstreamConfig};
use clinflow_history::pb;
use tokio::time::Instant;

#[derive(Parser)]
struct Args {
    /// `http`, `records` or `billing`.
    target: String,
    /// The URL: the history URL with `{patient}` in it, or the service's.
    url: String,
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Patient ids, comma-separated, used in turn.
    #[arg(long)]
    patients: String,
    #[arg(long, default_value = "")]
    token: String,
    /// `X-Request-Timeout` (HTTP) or the call's deadline (gRPC), ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Requests not counted at the start (connections, caches).
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    #[arg(long)]
    rss_pid: Option<u32>,
    #[arg(long, default_value_t = 1000)]
    rss_every: usize,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let patients: Vec<String> = args.patients.split(',').map(str::to_string).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(60))
        .build()?;
    let cfg = DownstreamConfig {
        url: args.url.clone(),
        token: args.token.clone(),
        breaker_window: Duration::ZERO,
        max_retries: 0,
    };
    let records = client::records(&cfg)?;
    let billing = client::billing(&cfg)?;
    let total = args.warmup + args.requests;
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(total);
    let mut rss = Vec::new();
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / args.rate);
        tokio::time::sleep_until(due).await;
        if let Some(pid) = args.rss_pid {
            if i % args.rss_every == 0 {
                rss.push(serde_json::json!({"after": i, "rss_kib": rss_kib(pid)}));
            }
        }
        let patient = patients[i % patients.len()].clone();
        let (http, records, billing) = (http.clone(), records.clone(), billing.clone());
        let (target, url, token, timeout) = (
            args.target.clone(),
            args.url.clone(),
            args.token.clone(),
            Duration::from_millis(args.timeout_ms),
        );
        tasks.push(tokio::spawn(async move {
            let status: String = match target.as_str() {
                "http" => {
                    match http
                        .get(url.replace("{patient}", &patient))
                        .bearer_auth(&token)
                        .header("X-Request-Timeout", timeout.as_millis().to_string())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let s = r.status().as_u16().to_string();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(e) => format!("error: {e}"),
                    }
                }
                other => {
                    let call = Call {
                        request: pb::HistoryRequest {
                            patient_id: patient,
                            since_ms: None,
                        },
                        deadline: Instant::now() + timeout,
                    };
                    let r = if other == "records" {
                        client::call(&records, call).await.map(|_| ())
                    } else {
                        client::call(&billing, call).await.map(|_| ())
                    };
                    match r {
                        Ok(()) => "ok".into(),
                        Err(e) => e.kind().into(),
                    }
                }
            };
            (i, due.elapsed().as_secs_f64() * 1000.0, status)
        }));
    }
    let mut lat = Vec::with_capacity(args.requests);
    let mut statuses = std::collections::BTreeMap::<String, u64>::new();
    for t in tasks {
        let (i, ms, status) = t.await?;
        if i >= args.warmup {
            lat.push(ms);
            *statuses.entry(status).or_default() += 1;
        }
    }
    if let Some(pid) = args.rss_pid {
        rss.push(serde_json::json!({"after": total, "rss_kib": rss_kib(pid)}));
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let out = serde_json::json!({
        "target": args.target,
        "requests": lat.len(),
        "rate": args.rate,
        "p50_ms": percentile(&lat, 50.0),
        "p90_ms": percentile(&lat, 90.0),
        "p99_ms": percentile(&lat, 99.0),
        "max_ms": lat.last().copied().unwrap_or(f64::NAN),
        "min_ms": lat.first().copied().unwrap_or(f64::NAN),
        "statuses": statuses,
        "rss": rss,
    });
    println!("{out}");
    Ok(())
}
