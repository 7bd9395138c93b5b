//! `clinflow ingest`: sends files (or stdin) to a running server's
//! `/ingest/*` endpoints, waits until each batch is processed, draws a
//! progress bar on stderr and prints a summary (and every rejection with
//! its location) on stdout.
//!
//! Each file is one batch. Sends are bounded (`--concurrency`); a server
//! that is full (429/503) is retried after its `Retry-After`, a bounded
//! number of times; every request has a timeout, and waiting for a batch
//! has a deadline. Nothing is retried after a 202: the batch is durable
//! then, and sending the same content again would only be a duplicate.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::ValueEnum;
use serde_json::Value;
use tokio::sync::Semaphore;

/// The input formats, one per `/ingest/*` endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// HL7 v2 messages (ORU^R01), one or more per file.
    Hl7v2,
    /// Wearable readings as CSV (`subject,device,time,metric,value,unit`).
    Wearable,
    /// ePRO diaries: a JSON object or array, or NDJSON.
    Diary,
    /// FHIR R4: a Bundle (JSON) or NDJSON of resources.
    Fhir,
}

impl Format {
    fn path(self) -> &'static str {
        match self {
            Format::Hl7v2 => "/ingest/hl7v2",
            Format::Wearable => "/ingest/wearable",
            Format::Diary => "/ingest/diary",
            Format::Fhir => "/ingest/fhir",
        }
    }

    /// The Content-Type for this body: JSON formats are NDJSON unless the
    /// body is one JSON document (starts with `{` or `[` and parses).
    fn content_type(self, body: &[u8]) -> &'static str {
        let one_document = || serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
        match self {
            Format::Hl7v2 => "application/hl7-v2",
            Format::Wearable => "text/csv",
            Format::Diary if one_document() => "application/json",
            Format::Diary => "application/x-ndjson",
            Format::Fhir if one_document() => "application/fhir+json",
            Format::Fhir => "application/fhir+ndjson",
        }
    }
}

/// What `clinflow ingest` was asked to do.
pub struct Options {
    pub format: Format,
    pub inputs: Vec<PathBuf>,
    pub server: String,
    pub token: String,
    pub concurrency: usize,
    pub request_timeout: Duration,
    pub wait_timeout: Duration,
    pub max_retries: u32,
}

/// One input: a file, or stdin (`-`).
struct Input {
    name: String,
    body: Vec<u8>,
}

/// The result of one input.
#[derive(Debug, Default)]
struct Outcome {
    name: String,
    /// Why the input was not accepted or not seen through.
    error: Option<String>,
    received: u64,
    stored: u64,
    rejected: u64,
    duplicates: u64,
    queries_opened: u64,
    rejections: Vec<Value>,
}

/// Sends every input and waits for its batch; returns 0 when all were
/// stored without a rejection, 1 otherwise.
pub async fn run(opts: Options) -> anyhow::Result<u8> {
    if opts.token.is_empty() {
        bail!("no token: set CLINFLOW_TOKEN (or pass --token)");
    }
    let inputs = collect(&opts.inputs)?;
    if inputs.is_empty() {
        bail!("no input files found in {:?}", opts.inputs);
    }
    let client = reqwest::Client::builder()
        .timeout(opts.request_timeout)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("building the HTTP client")?;
    let base = opts.server.trim_end_matches('/').to_string();
    let progress = Arc::new(Progress::new(inputs.len()));
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let opts = Arc::new(opts);
    let mut tasks = Vec::with_capacity(inputs.len());
    for input in inputs {
        let (client, base, opts, progress, permits) = (
            client.clone(),
            base.clone(),
            opts.clone(),
            progress.clone(),
            permits.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let outcome = one(&client, &base, &opts, input).await;
            progress.done(&outcome);
            outcome
        }));
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.context("an ingest task failed")?);
    }
    progress.finish();
    Ok(report(&outcomes))
}

/// Reads the inputs: files, every regular file under a directory (sorted,
/// hidden ones skipped), and `-` for stdin.
fn collect(paths: &[PathBuf]) -> anyhow::Result<Vec<Input>> {
    let mut files = Vec::new();
    let mut inputs = Vec::new();
    for p in paths {
        if p.as_os_str() == "-" {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading stdin")?;
            inputs.push(Input {
                name: "<stdin>".into(),
                body,
            });
        } else if p.is_dir() {
            walk(p, &mut files)?;
        } else {
            files.push(p.clone());
        }
    }
    for f in files {
        let body = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        inputs.push(Input {
            name: f.display().to_string(),
            body,
        });
    }
    Ok(inputs)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the directory {}", dir.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading the directory {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = e.path();
        let kind = e.file_type()?;
        if kind.is_dir() {
            walk(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Sends one input and waits for its batch to be processed.
async fn one(client: &reqwest::Client, base: &str, opts: &Options, input: Input) -> Outcome {
    let mut out = Outcome {
        name: input.name,
        ..Outcome::default()
    };
    let batch = match send(client, base, opts, input.body).await {
        Ok(b) => b,
        Err(e) => {
            out.error = Some(format!("{e:#}"));
            return out;
        }
    };
    match wait(client, base, opts, &batch).await {
        Ok(status) => {
            let n = |k: &str| status.get(k).and_then(Value::as_u64).unwrap_or(0);
            out.received = n("received");
            out.stored = n("stored");
            out.rejected = n("rejected");
            out.duplicates = n("duplicates");
            out.queries_opened = n("queries_opened");
            out.rejections = status
                .get("rejections")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
        }
        Err(e) => out.error = Some(format!("accepted as batch {batch}, but {e:#}")),
    }
    out
}

/// POSTs the body; returns the batch id of the 202. Retries 429 and 503
/// after their Retry-After (at most `max_retries` times).
async fn send(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    body: Vec<u8>,
) -> anyhow::Result<String> {
    let content_type = opts.format.content_type(&body);
    let url = format!("{base}{}", opts.format.path());
    let mut attempt = 0;
    loop {
        let resp = client
            .post(&url)
            .bearer_auth(&opts.token)
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body.clone())
            .send()
            .await
            .with_context(|| format!("sending to {url}"))?;
        let status = resp.status();
        if status.as_u16() == 202 {
            let v: Value = resp.json().await.context("reading the 202 answer")?;
            return v
                .get("batch")
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("the 202 answer names no batch: {v}"));
        }
        if (status.as_u16() == 429 || status.as_u16() == 503) && attempt < opts.max_retries {
            attempt += 1;
            tokio::time::sleep(retry_after(&resp).unwrap_or(Duration::from_secs(1))).await;
            continue;
        }
        return Err(anyhow!("{}", problem(status, resp).await));
    }
}

/// Polls the batch until it is done, within `wait_timeout`.
async fn wait(
    client: &reqwest::Client,
    base: &str,
    opts: &Options,
    batch: &str,
) -> anyhow::Result<Value> {
    let url = format!("{base}/ingest/batches/{batch}");
    let deadline = Instant::now() + opts.wait_timeout;
    let mut pause = Duration::from_millis(50);
    loop {
        let resp = client
            .get(&url)
            .bearer_auth(&opts.token)
            .send()
            .await
            .with_context(|| format!("reading {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(anyhow!("{}", problem(status, resp).await));
        }
        let v: Value = resp.json().await.context("reading the batch status")?;
        if v.get("status").and_then(Value::as_str) == Some("done") {
            return Ok(v);
        }
        if Instant::now() + pause > deadline {
            bail!(
                "it was still processing after {} s (see GET /ingest/batches/{batch})",
                opts.wait_timeout.as_secs()
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let secs: u64 = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.clamp(1, 60)))
}

/// "STATUS: detail" from a problem+json (or OperationOutcome) answer.
async fn problem(status: reqwest::StatusCode, resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let detail = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("detail")
                .and_then(Value::as_str)
                .map(str::to_string)
                .or_else(|| {
                    v.pointer("/issue/0/diagnostics")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
        })
        .unwrap_or_else(|| text.chars().take(200).collect());
    format!("the server answered {status}: {detail}")
}

/// The progress bar: redrawn in place when stderr is a terminal, one line
/// per finished input otherwise.
struct Progress {
    total: usize,
    tty: bool,
    started: Instant,
    state: Mutex<(usize, u64, u64)>,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            total,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            state: Mutex::new((0, 0, 0)),
        }
    }

    fn done(&self, o: &Outcome) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += 1;
        s.1 += o.stored;
        s.2 += o.rejected;
        let (done, stored, rejected) = *s;
        let width = 30;
        let filled = done * width / self.total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(width - filled));
        let line = format!(
            "[{bar}] {done}/{} inputs, {stored} stored, {rejected} rejected, {:.1} s",
            self.total,
            self.started.elapsed().as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}");
        } else {
            let status = if o.error.is_some() { "FAILED" } else { "done" };
            let _ = writeln!(err, "{line} ({} {status})", o.name);
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if self.tty {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// Prints the summary and every rejection; the exit code.
fn report(outcomes: &[Outcome]) -> u8 {
    let mut out = std::io::stdout().lock();
    let sum = |f: fn(&Outcome) -> u64| outcomes.iter().map(f).sum::<u64>();
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_some()).collect();
    for o in outcomes {
        for r in &o.rejections {
            let field = |k: &str| match r.get(k) {
                Some(Value::String(s)) => s.clone(),
                Some(v) if !v.is_null() => v.to_string(),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "rejected: {} item {} at {}: {}",
                o.name,
                field("index"),
                field("location"),
                field("reason")
            );
        }
    }
    for o in &failed {
        let _ = writeln!(
            out,
            "failed: {}: {}",
            o.name,
            o.error.as_deref().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "{} inputs ({} failed): {} items received, {} stored, {} rejected, {} duplicates, {} data queries opened",
        outcomes.len(),
        failed.len(),
        sum(|o| o.received),
        sum(|o| o.stored),
        sum(|o| o.rejected),
        sum(|o| o.duplicates),
        sum(|o| o.queries_opened),
    );
    u8::from(!failed.is_empty() || sum(|o| o.rejected) > 0)
}
