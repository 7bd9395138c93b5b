//! The SMTP server's own throughput, for `bench/campaign.sh`: N messages
//! of a campaign e-mail's shape over C connections (clinflow's own SMTP
//! pool, `campaigns/smtp.rs`, the fastest client at hand, so the figure is
//! the server's), no database, no rate limit. What clinflow's e-mail
//! channel is held to.
//!
//!     cargo run --release -p clinflow-server --example smtp_limit -- smtp://127.0.0.1:PORT 10000 32

use std::sync::Arc;
use std::time::{Duration, Instant};

use clinflow_server::campaigns::smtp::{SmtpPool, SmtpTarget};
use lettre::message::Mailbox;
use lettre::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "smtp://127.0.0.1:2525".into());
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let c: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(32);
    let target = SmtpTarget::parse(&url).map_err(anyhow::Error::msg)?;
    let transport = Arc::new(SmtpPool::new(target, c).map_err(anyhow::Error::msg)?);
    let from: Mailbox = "bench <bench@clinflow.test>".parse()?;
    let sem = Arc::new(tokio::sync::Semaphore::new(c));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await?;
        let (t, from) = (transport.clone(), from.clone());
        tasks.push(tokio::spawn(async move {
            let m = Message::builder()
                .from(from)
                .to(format!("limit{i}@example.org").parse().expect("an address"))
                .subject("Investigator meeting")
                .body("Dear Given Family, you are invited (Charite Clinical Research Center). Unsubscribe: http://127.0.0.1:1/unsubscribe/0190.abcdefabcdefabcdefabcd".to_string())
                .expect("a message");
            let r = t
                .send(m.envelope(), &m.formatted(), Duration::from_secs(30))
                .await;
            drop(permit);
            r.is_ok()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await? as usize;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"messages\": {ok}, \"seconds\": {secs:.3}, \"per_second\": {:.1}}}",
        ok as f64 / secs
    );
    Ok(())
}
