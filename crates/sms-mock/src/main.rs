//! `sms-mock`: the Twilio Messages API mock as a standalone server.
//!
//! Prints `listening on http://ADDR` once bound, serves until SIGINT or
//! SIGTERM, then prints the stats as one JSON line.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use clinflow_sms_mock::{MockConfig, MockSms};

/// A local server that behaves like Twilio's Messages REST API.
#[derive(Debug, Parser)]
#[command(name = "sms-mock", version)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Time each API request takes before it is answered [default: 5].
    #[arg(long, value_name = "MS")]
    latency_ms: Option<u64>,
    /// API requests in flight at once before answering 429 [default: 50].
    #[arg(long, value_name = "N")]
    max_concurrent: Option<usize>,
    /// The account SID accepted [default: ACtest0000…].
    #[arg(long)]
    account_sid: Option<String>,
    /// The account's auth token (basic auth; signs callbacks) [default: test-auth-token].
    #[arg(long)]
    auth_token: Option<String>,
    /// Time from acceptance to the first status change [default: 20].
    #[arg(long, value_name = "MS")]
    callback_delay_ms: Option<u64>,
    /// Statuses after `queued`, comma-separated [default: sent,delivered].
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    callback_statuses: Option<Vec<String>>,
    /// Send `Retry-After: SECONDS` with 429 answers (Twilio sends none).
    #[arg(long, value_name = "SECONDS")]
    retry_after: Option<u64>,
    /// Answer this `To` number COUNT 503s before accepting it (repeatable).
    #[arg(long, value_name = "NUMBER=COUNT")]
    transient: Vec<String>,
    /// Accept this `To` number but end its statuses in `undelivered` (repeatable).
    #[arg(long, value_name = "NUMBER")]
    undeliverable: Vec<String>,
}

impl Args {
    fn config(self) -> anyhow::Result<MockConfig> {
        let mut cfg = MockConfig::default();
        if let Some(ms) = self.latency_ms {
            cfg.latency = Duration::from_millis(ms);
        }
        if let Some(n) = self.max_concurrent {
            cfg.max_concurrent = n;
        }
        if let Some(sid) = self.account_sid {
            cfg.account_sid = sid;
        }
        if let Some(token) = self.auth_token {
            cfg.auth_token = token;
        }
        if let Some(ms) = self.callback_delay_ms {
            cfg.callback_delay = Duration::from_millis(ms);
        }
        if let Some(statuses) = self.callback_statuses {
            cfg.callback_statuses = statuses
                .into_iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        cfg.retry_after_header = self.retry_after;
        for spec in self.transient {
            let (number, count) = spec
                .rsplit_once('=')
                .with_context(|| format!("--transient {spec}: expected NUMBER=COUNT"))?;
            let count = count
                .parse()
                .with_context(|| format!("--transient {spec}: COUNT is not a number"))?;
            cfg.transient.insert(number.to_owned(), count);
        }
        cfg.undeliverable.extend(self.undeliverable);
        Ok(cfg)
    }
}

async fn terminated() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("SIGINT handler")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("Ctrl-C handler")?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listen = args.listen;
    let mock = MockSms::start(listen, args.config()?).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{}", mock.addr())?;
        out.flush()?;
    }
    terminated().await?;
    let stats = mock.stats();
    mock.shutdown().await;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&stats)?)?;
    out.flush()?;
    Ok(())
}
