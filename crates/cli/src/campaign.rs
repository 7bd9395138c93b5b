//! `clinflow campaign send FILE.toml`: creates a campaign on a running
//! server and follows it to the end with a progress bar on stderr.
//!
//! The file holds the `POST /campaigns` body as TOML:
//!
//! ```toml
//! name = "Investigator meeting"
//! channels = ["email", "sms"]
//! audience = { site = "site-01" }
//! [templates]
//! subject = "Investigator meeting"
//! text = "Dear {{practitioner.name}}, ..."
//! sms = "CARDIO-01 meeting on 12 Jan, {{site.name}}"
//! ```
//!
//! The file's SHA-256 is the `Idempotency-Key`, so sending the same file
//! again follows the campaign it created instead of making another.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sha2::Digest;

/// Exit 0 when every delivery was sent (or suppressed), 1 when some failed
/// or the campaign was cancelled.
pub async fn send(file: &Path, server: &str, token: &str, wait: Duration) -> anyhow::Result<bool> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let value: toml::Value = toml::from_str(std::str::from_utf8(&text)?)
        .with_context(|| format!("{} is not TOML", file.display()))?;
    let body = serde_json::to_value(value)?;
    let key = hex::encode(sha2::Sha256::digest(&text));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let base = server.trim_end_matches('/');
    let resp = http
        .post(format!("{base}/campaigns"))
        .bearer_auth(token)
        .header("Idempotency-Key", key)
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let answer: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "the server refused the campaign ({status}): {}",
            answer["detail"].as_str().unwrap_or("no detail")
        );
    }
    let id = answer["id"].as_str().unwrap_or_default().to_string();
    eprintln!("campaign {id}: {} deliveries", answer["total"]);
    let deadline = tokio::time::Instant::now() + wait;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let c: serde_json::Value = http
            .get(format!("{base}/campaigns/{id}"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let progress = c["progress"].as_f64().unwrap_or(0.0);
        let n = |k: &str| c["counts"][k].as_u64().unwrap_or(0);
        let width = 30;
        let done = (progress * width as f64).round() as usize;
        eprint!(
            "\r[{}{}] {:5.1}%  sent {} delivered {} failed {} suppressed {} pending {}   ",
            "#".repeat(done.min(width)),
            " ".repeat(width - done.min(width)),
            progress * 100.0,
            n("sent"),
            n("delivered"),
            n("failed"),
            n("suppressed"),
            n("pending") + n("sending"),
        );
        let _ = std::io::stderr().flush();
        match c["status"].as_str() {
            Some("completed") => {
                eprintln!();
                println!("{}", serde_json::to_string_pretty(&c["counts"])?);
                return Ok(n("failed") == 0);
            }
            Some("cancelled") => {
                eprintln!();
                println!("cancelled: {}", serde_json::to_string_pretty(&c["counts"])?);
                return Ok(false);
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            eprintln!();
            anyhow::bail!("campaign {id} is not finished after {} s", wait.as_secs());
        }
    }
}
