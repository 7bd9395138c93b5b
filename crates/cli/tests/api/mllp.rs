//! The MLLP listener (`--mllp-listen`): a real client nobody here wrote
//! (`mllp_send` from python-hl7, at `CLINFLOW_MLLP_SEND`, installed by
//! `scripts/test.sh`), then a raw TCP client for what a polite client never
//! does: several frames in one write, a frame cut across writes, garbage, an
//! unreadable message, an over-size frame, a value outside the hard range,
//! order on one connection, and the same message twice; and the bounded
//! waits: a full pipeline, a message not processed in time, an idle
//! connection.
//!
//! Expected resources and rejections come from clinflow-edc run on the same
//! message with the same trial context.

use std::net::SocketAddr;
use std::time::Duration;

use clinflow_edc::TrialContext;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::helpers::{TestApp, PROTOCOL_YAML, SUBJECTS_CSV};
use crate::ingest::LAB;

const ITEM_KEY: &str = clinflow_edc::provenance::ITEM_KEY_SYSTEM;
/// Every wait for the server in this file.
const DEADLINE: Duration = Duration::from_secs(60);
/// The listener's largest frame in these tests.
const MAX_FRAME: usize = 64 * 1024;

fn with_mllp(c: &mut clinflow_server::Config) {
    c.mllp_listen = Some("127.0.0.1:0".parse().expect("an address"));
    c.mllp_max_frame = MAX_FRAME;
}

/// No workers: accepted messages are never done.
fn with_mllp_no_workers(c: &mut clinflow_server::Config) {
    with_mllp(c);
    c.ingest_map_workers = 0;
    c.ingest_queue = 1;
    c.mllp_ack_timeout = Duration::from_millis(300);
}

fn with_mllp_short_idle(c: &mut clinflow_server::Config) {
    with_mllp(c);
    c.mllp_idle_timeout = Duration::from_millis(200);
}

engine_tests!(
    mllp_send_from_python_hl7_is_acknowledged_and_stored with super::with_mllp,
    frames_in_one_write_split_and_after_garbage_are_each_acknowledged_in_order with super::with_mllp,
    an_unreadable_message_and_an_over_size_frame_are_rejected_with_err with super::with_mllp,
    a_value_outside_the_hard_range_is_an_aa_with_an_err_warning with super::with_mllp,
    an_unknown_subject_is_an_ae_with_err with super::with_mllp,
    the_same_message_twice_is_acknowledged_twice_and_stored_once with super::with_mllp,
    many_messages_on_one_connection_are_acknowledged_in_order with super::with_mllp,
    a_full_pipeline_gets_no_ack_and_nothing_is_stored with super::with_mllp_no_workers,
    a_message_stored_but_not_done_in_time_gets_no_ack with super::with_mllp_no_workers,
    an_idle_connection_is_closed with super::with_mllp_short_idle,
    a_stop_finishes_the_message_in_flight_and_closes_the_listener with super::with_mllp,
    a_killed_server_loses_no_acknowledged_message_and_half_stores_none,
);

/// The reference trial as clinflow-edc sees it once loaded.
fn context() -> TrialContext {
    let protocol = clinflow_protocol::parse_yaml(PROTOCOL_YAML).expect("the protocol");
    let subjects =
        clinflow_protocol::parse_subjects_csv(SUBJECTS_CSV, &protocol).expect("the subjects");
    TrialContext::from_subjects(protocol, &subjects)
}

/// The sample's messages as they go on the wire: segments ended by `\r`.
fn lab_messages() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in LAB.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("MSH") || out.is_empty() {
            out.push(String::new());
        }
        let m = out.last_mut().expect("a message");
        m.push_str(line);
        m.push('\r');
    }
    out
}

/// MSH-10 of an ER7 message.
fn control_id(message: &str) -> String {
    message
        .split('\r')
        .next()
        .and_then(|msh| msh.split('|').nth(9))
        .expect("MSH-10")
        .to_string()
}

/// The first sample message with MSH-10 replaced.
fn message_with_id(id: &str) -> String {
    let m = &lab_messages()[0];
    m.replacen(&control_id(m), id, 1)
}

fn frame(message: &str) -> Vec<u8> {
    let mut v = vec![0x0B];
    v.extend_from_slice(message.as_bytes());
    v.extend_from_slice(&[0x1C, 0x0D]);
    v
}

/// An ACK as read back: its segments.
#[derive(Debug)]
struct Ack {
    segments: Vec<Vec<String>>,
    text: String,
}

impl Ack {
    fn parse(payload: &[u8]) -> Ack {
        let text = String::from_utf8(payload.to_vec()).expect("an ACK in UTF-8 or ASCII");
        let segments = text
            .split('\r')
            .filter(|s| !s.is_empty())
            .map(|s| s.split('|').map(str::to_string).collect())
            .collect();
        Ack { segments, text }
    }
    fn segment(&self, id: &str) -> &[String] {
        self.segments
            .iter()
            .find(|s| s[0] == id)
            .unwrap_or_else(|| panic!("no {id} in {:?}", self.text))
    }
    /// MSA-1.
    fn code(&self) -> &str {
        &self.segment("MSA")[1]
    }
    /// MSA-2.
    fn acked(&self) -> &str {
        &self.segment("MSA")[2]
    }
    fn errs(&self) -> Vec<&[String]> {
        self.segments
            .iter()
            .filter(|s| s[0] == "ERR")
            .map(Vec::as_slice)
            .collect()
    }
    #[track_caller]
    fn expect(&self, code: &str, acked: &str) -> &Ack {
        assert_eq!(self.segment("MSH")[8], "ACK^R01^ACK", "{:?}", self.text);
        assert_eq!(
            (self.code(), self.acked()),
            (code, acked),
            "{:?}",
            self.text
        );
        self
    }
}

/// A raw MLLP client.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(app: &TestApp) -> Client {
        let addr = app.mllp_addr.expect("the MLLP listener is on");
        let stream = tokio::time::timeout(DEADLINE, TcpStream::connect(addr))
            .await
            .expect("connected in time")
            .expect("connected");
        stream.set_nodelay(true).expect("nodelay");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("written");
        self.stream.flush().await.expect("flushed");
    }

    /// The next ACK, within the deadline.
    async fn ack(&mut self) -> Ack {
        read_ack(&mut self.stream, &mut self.buf).await
    }

    /// Waits for the server to close the connection; what it sent first.
    async fn closed_by_server(mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut rest))
            .await
            .expect("the server closes the connection in time")
            .expect("read");
        self.buf.extend_from_slice(&rest);
        self.buf
    }

    /// Half-closes and checks that nothing more comes (no ACK for garbage).
    async fn nothing_more(mut self) {
        self.stream.shutdown().await.expect("shut down");
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut rest))
            .await
            .expect("the server closes in time")
            .expect("read");
        self.buf.extend_from_slice(&rest);
        assert!(self.buf.is_empty(), "unexpected bytes {:?}", self.buf);
    }
}

/// The next ACK framed on `r` (`buf` holds what was read past it), within
/// the deadline.
async fn read_ack<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Ack {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == [0x1C, 0x0D]) {
            let frame: Vec<u8> = buf.drain(..end + 2).collect();
            assert_eq!(
                frame.first(),
                Some(&0x0B),
                "an ACK starts with 0x0B: {frame:?}"
            );
            return Ack::parse(&frame[1..end]);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, r.read(&mut chunk))
            .await
            .expect("an ACK in time")
            .expect("read");
        assert!(n > 0, "the server closed the connection; got {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The Observations clinflow-edc makes of `message`: their item keys.
fn expected_observation_keys(message: &str) -> Vec<String> {
    clinflow_edc::ingest_hl7(&context(), message.as_bytes())
        .iter()
        .flat_map(|i| &i.stored)
        .filter(|p| p.resource.resource_type() == "Observation")
        .map(|p| p.full_url.clone())
        .collect()
}

/// A sample's value in `/metrics` (0 when absent), e.g.
/// `clinflow_mllp_acks_total{code="AR"}`.
async fn metric(app: &TestApp, sample: &str) -> f64 {
    let r = app.get("/metrics", &app.admin).await;
    r.expect(200);
    crate::helpers::sample(&r.text, sample)
}

async fn observations_with_key(app: &TestApp, key: &str) -> Vec<String> {
    app.search_ids(
        &app.admin,
        "Observation",
        &format!("identifier={ITEM_KEY}|{key}"),
    )
    .await
}

async fn mllp_send_from_python_hl7_is_acknowledged_and_stored(app: TestApp) {
    app.load_reference_trial().await;
    let bin = std::env::var("CLINFLOW_MLLP_SEND").unwrap_or_else(|_| {
        panic!(
            "CLINFLOW_MLLP_SEND is not set: it must name python-hl7's mllp_send \
             (scripts/test.sh installs it into target/test-venv)"
        )
    });
    assert!(
        std::path::Path::new(&bin).is_file(),
        "CLINFLOW_MLLP_SEND={bin} is not a file (run scripts/test.sh)"
    );
    let messages = lab_messages();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("lab-results.mllp");
    let framed: Vec<u8> = messages.iter().flat_map(|m| frame(m)).collect();
    std::fs::write(&file, framed).expect("the input file");
    let addr: SocketAddr = app.mllp_addr.expect("the MLLP listener is on");

    let mut child = std::process::Command::new(&bin)
        .arg("-p")
        .arg(addr.port().to_string())
        .arg("-f")
        .arg(&file)
        .arg(addr.ip().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {bin}: {e}"));
    let deadline = Instant::now() + DEADLINE;
    while child.try_wait().expect("waiting for mllp_send").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mllp_send did not finish in time");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = child.wait_with_output().expect("mllp_send's output");
    assert!(
        out.status.success(),
        "mllp_send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // mllp_send prints each ACK as received: framed, then a newline.
    let acks: Vec<Ack> = out
        .stdout
        .split(|b| *b == 0x0B)
        .skip(1)
        .map(|f| {
            let end = f
                .iter()
                .position(|b| *b == 0x1C)
                .expect("a whole ACK frame");
            Ack::parse(&f[..end])
        })
        .collect();
    assert_eq!(acks.len(), messages.len(), "{:?}", out.stdout);
    for (ack, m) in acks.iter().zip(&messages) {
        ack.expect("AA", &control_id(m));
        assert!(ack.errs().is_empty(), "the samples are valid: {ack:?}");
    }

    // AA means stored: every Observation is searchable now, once.
    let mut total = 0;
    for m in &messages {
        let keys = expected_observation_keys(m);
        assert!(!keys.is_empty());
        for key in keys {
            assert_eq!(observations_with_key(&app, &key).await.len(), 1, "{key}");
            total += 1;
        }
    }
    assert_eq!(app.count(&app.admin, "Observation").await, total);

    // The listener's identity is the actor of the writes.
    let id = format!(
        "Observation/{}",
        observations_with_key(&app, &expected_observation_keys(&messages[0])[0]).await[0]
    );
    let records = app
        .store
        .audit_records(clinflow_store::AuditQuery {
            entity: Some(id.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("audit records");
    let create = records
        .iter()
        .find(|r| r.record.action == "create")
        .unwrap_or_else(|| panic!("no create record of {id}: {records:?}"));
    assert!(
        create.record.actor.starts_with("mllp:127.0.0.1:"),
        "{create:?}"
    );
    assert_eq!(create.record.role, "interface");
}

async fn frames_in_one_write_split_and_after_garbage_are_each_acknowledged_in_order(app: TestApp) {
    app.load_reference_trial().await;
    let ids: Vec<String> = (1..=5).map(|i| format!("MLLP-FRAMES-{i}")).collect();
    let msgs: Vec<String> = ids.iter().map(|id| message_with_id(id)).collect();
    let mut c = Client::connect(&app).await;

    // Two frames in one write.
    let mut two = frame(&msgs[0]);
    two.extend(frame(&msgs[1]));
    c.write(&two).await;
    c.ack().await.expect("AA", &ids[0]);
    c.ack().await.expect("AA", &ids[1]);

    // One frame cut in three writes, one cut inside the trailer.
    let f = frame(&msgs[2]);
    let (a, rest) = f.split_at(1);
    let (b, rest) = rest.split_at(rest.len() / 2);
    for piece in [a, b, rest] {
        c.write(piece).await;
    }
    c.ack().await.expect("AA", &ids[2]);
    let f = frame(&msgs[3]);
    c.write(&f[..f.len() - 1]).await;
    c.write(&f[f.len() - 1..]).await;
    c.ack().await.expect("AA", &ids[3]);

    // Garbage before a frame: skipped, not acknowledged.
    let mut g = b"this is not MLLP\r\n\x1c".to_vec();
    g.extend(frame(&msgs[4]));
    c.write(&g).await;
    c.ack().await.expect("AA", &ids[4]);
    c.nothing_more().await;

    for m in &msgs {
        for key in expected_observation_keys(m) {
            assert_eq!(observations_with_key(&app, &key).await.len(), 1, "{key}");
        }
    }
}

async fn an_unreadable_message_and_an_over_size_frame_are_rejected_with_err(app: TestApp) {
    app.load_reference_trial().await;
    let mut c = Client::connect(&app).await;

    // An unsupported version: the header cannot be read, MSH-10 salvaged.
    let bad = message_with_id("MLLP-BAD-1").replacen("|2.5.1|", "|9.9|", 1);
    c.write(&frame(&bad)).await;
    let ack = c.ack().await;
    assert_eq!((ack.code(), ack.acked()), ("AR", "MLLP-BAD-1"), "{ack:?}");
    let errs = ack.errs();
    assert_eq!(errs.len(), 1, "{ack:?}");
    assert!(errs[0][3].starts_with("203^"), "{ack:?}");
    assert_eq!(errs[0][4], "E", "{ack:?}");
    assert!(!errs[0][8].is_empty(), "ERR-8 says why: {ack:?}");

    // Not HL7 at all: an AR with an empty MSA-2.
    c.write(&frame("hello, this is not a message")).await;
    let ack = c.ack().await;
    assert_eq!((ack.code(), ack.acked()), ("AR", ""), "{ack:?}");
    assert_eq!(ack.errs().len(), 1, "{ack:?}");

    // A frame over the maximum: an AR, and the connection goes on.
    let big =
        message_with_id("MLLP-BIG-1").replacen("Fasting sample", &"x".repeat(MAX_FRAME + 1), 1);
    c.write(&frame(&big)).await;
    let ack = c.ack().await;
    assert_eq!(ack.code(), "AR", "{ack:?}");
    let errs = ack.errs();
    assert_eq!(errs.len(), 1, "{ack:?}");
    assert!(errs[0][8].contains("larger than"), "{ack:?}");
    let ok = message_with_id("MLLP-AFTER-BIG");
    c.write(&frame(&ok)).await;
    c.ack().await.expect("AA", "MLLP-AFTER-BIG");
    c.nothing_more().await;

    // Counted: three ARs, the AA, one connection, an ACK latency for each
    // ACK, and the over-size frame as a framing error.
    assert_eq!(
        metric(&app, "clinflow_mllp_acks_total{code=\"AR\"}").await,
        3.0
    );
    assert_eq!(
        metric(&app, "clinflow_mllp_acks_total{code=\"AA\"}").await,
        1.0
    );
    assert_eq!(metric(&app, "clinflow_mllp_connections_total").await, 1.0);
    assert_eq!(
        metric(&app, "clinflow_mllp_ack_duration_seconds_count").await,
        4.0
    );
    assert!(metric(&app, "clinflow_mllp_frame_errors_total").await >= 1.0);

    // Nothing of the rejected ones was stored.
    // (The same sender and MSH-10 give the same item keys.)
    for id in ["MLLP-BAD-1", "MLLP-BIG-1"] {
        let key = &expected_observation_keys(&message_with_id(id))[0];
        assert!(observations_with_key(&app, key).await.is_empty(), "{key}");
    }
}

async fn a_value_outside_the_hard_range_is_an_aa_with_an_err_warning(app: TestApp) {
    app.load_reference_trial().await;
    // Glucose 112 mg/dL -> 99999 mg/dL, outside the protocol's hard range.
    let m = message_with_id("MLLP-HARD-1").replacen("||112|", "||99999|", 1);
    let expected = clinflow_edc::ingest_hl7(&context(), m.as_bytes());
    let rejections: Vec<_> = expected.iter().flat_map(|i| &i.rejections).collect();
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].reason.code(), "hard-range");
    assert_eq!(rejections[0].location, "OBX[1].5");

    let mut c = Client::connect(&app).await;
    c.write(&frame(&m)).await;
    let ack = c.ack().await;
    ack.expect("AA", "MLLP-HARD-1");
    let errs = ack.errs();
    assert_eq!(errs.len(), 1, "{ack:?}");
    assert_eq!(errs[0][2], "OBX^1^5", "{ack:?}");
    assert_eq!(errs[0][4], "W", "{ack:?}");
    assert!(
        errs[0][8].contains("outside the plausible range"),
        "{ack:?}"
    );

    // The other values are stored; the rejected one is not.
    let stored: Vec<String> = expected_observation_keys(&m);
    assert!(!stored.is_empty());
    for key in &stored {
        assert_eq!(observations_with_key(&app, key).await.len(), 1, "{key}");
    }
    assert_eq!(
        app.count(&app.admin, "Observation").await,
        stored.len() as u64
    );
}

async fn an_unknown_subject_is_an_ae_with_err(app: TestApp) {
    app.load_reference_trial().await;
    let m = message_with_id("MLLP-NOBODY-1").replacen("CARDIO-01-0003", "CARDIO-01-9999", 1);
    let mut c = Client::connect(&app).await;
    c.write(&frame(&m)).await;
    let ack = c.ack().await;
    ack.expect("AE", "MLLP-NOBODY-1");
    let errs = ack.errs();
    assert!(!errs.is_empty(), "{ack:?}");
    assert!(errs.iter().all(|e| e[4] == "E"), "{ack:?}");
    assert!(
        errs.iter().any(|e| e[8].contains("not enrolled")),
        "{ack:?}"
    );
    assert_eq!(app.count(&app.admin, "Observation").await, 0);
}

async fn the_same_message_twice_is_acknowledged_twice_and_stored_once(app: TestApp) {
    app.load_reference_trial().await;
    let m = message_with_id("MLLP-TWICE-1");
    let keys = expected_observation_keys(&m);
    // Once as is, once more on another connection, and once re-encoded
    // (another MSH-7: other bytes, the same sender and MSH-10).
    let again = m.replacen("20260302091500+0100", "20260302091501+0100", 1);
    assert_ne!(again, m);
    let mut c = Client::connect(&app).await;
    c.write(&frame(&m)).await;
    c.ack().await.expect("AA", "MLLP-TWICE-1");
    c.write(&frame(&m)).await;
    c.ack().await.expect("AA", "MLLP-TWICE-1");
    let mut d = Client::connect(&app).await;
    d.write(&frame(&again)).await;
    d.ack().await.expect("AA", "MLLP-TWICE-1");
    for key in &keys {
        assert_eq!(observations_with_key(&app, key).await.len(), 1, "{key}");
    }
    assert_eq!(
        app.count(&app.admin, "Observation").await,
        keys.len() as u64
    );
}

async fn many_messages_on_one_connection_are_acknowledged_in_order(app: TestApp) {
    app.load_reference_trial().await;
    let ids: Vec<String> = (0..40).map(|i| format!("MLLP-ORDER-{i:03}")).collect();
    let all: Vec<u8> = ids
        .iter()
        .flat_map(|id| frame(&message_with_id(id)))
        .collect();
    let c = Client::connect(&app).await;
    // Everything at once, from another task, while the ACKs are read.
    let (mut rd, mut wr) = c.stream.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&all).await.expect("written");
        wr
    });
    let mut buf = Vec::new();
    let mut acks = Vec::new();
    while acks.len() < ids.len() {
        acks.push(read_ack(&mut rd, &mut buf).await);
    }
    let got: Vec<&str> = acks.iter().map(Ack::acked).collect();
    assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(acks.iter().all(|a| a.code() == "AA"), "{acks:?}");
    let wr = writer.await.expect("the writer");
    let c = Client {
        stream: wr.reunite(rd).expect("the two halves"),
        buf,
    };
    c.nothing_more().await;
    for id in &ids {
        let key = &expected_observation_keys(&message_with_id(id))[0];
        assert_eq!(observations_with_key(&app, key).await.len(), 1, "{key}");
    }
}

async fn a_full_pipeline_gets_no_ack_and_nothing_is_stored(app: TestApp) {
    app.load_reference_trial().await;
    // No workers and one place: an HTTP batch takes it and stays there.
    let r = app
        .post(
            "/ingest/wearable",
            &app.admin,
            "text/csv",
            crate::ingest::WEARABLE,
        )
        .await;
    r.expect(202);
    let first = r.json()["batch"].as_str().expect("a batch").to_string();
    // The message waits for a place (short bounded waits, nothing read
    // further), then past mllp_ack_timeout the connection is closed
    // without an ACK: the sender resends later.
    let mut c = Client::connect(&app).await;
    c.write(&frame(&message_with_id("MLLP-FULL-1"))).await;
    let got = c.closed_by_server().await;
    assert!(
        got.is_empty(),
        "no ACK: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(app.store.unfinished_batches().await.unwrap(), vec![first]);
    assert_eq!(
        metric(
            &app,
            "clinflow_mllp_unacknowledged_total{why=\"the pipeline stayed full\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&app, "clinflow_mllp_acks_total{code=\"AA\"}").await,
        0.0
    );
}

async fn a_message_stored_but_not_done_in_time_gets_no_ack(app: TestApp) {
    app.load_reference_trial().await;
    // A place in the queue but no worker: the raw message is committed,
    // never processed; no AA is sent for what is not stored as FHIR.
    let mut c = Client::connect(&app).await;
    c.write(&frame(&message_with_id("MLLP-SLOW-1"))).await;
    let got = c.closed_by_server().await;
    assert!(
        got.is_empty(),
        "no ACK: {:?}",
        String::from_utf8_lossy(&got)
    );
    // Durable, and resumed at the next start like any unfinished batch.
    assert_eq!(app.store.unfinished_batches().await.unwrap().len(), 1);
}

async fn an_idle_connection_is_closed(app: TestApp) {
    let c = Client::connect(&app).await;
    assert!(c.closed_by_server().await.is_empty());
}

async fn a_stop_finishes_the_message_in_flight_and_closes_the_listener(mut app: TestApp) {
    app.load_reference_trial().await;
    let mut c = Client::connect(&app).await;
    let actor = format!("mllp:{}", c.stream.local_addr().expect("a local address"));
    c.write(&frame(&message_with_id("MLLP-STOP-1"))).await;
    // Once the server has taken the message (its raw input committed),
    // stop it before reading the ACK.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let records = app
            .store
            .audit_records(clinflow_store::AuditQuery {
                actor: Some(actor.clone()),
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("audit records");
        if records.iter().any(|r| r.record.action == "ingest-accept") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the message was not taken in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    app.signal_shutdown();
    c.ack().await.expect("AA", "MLLP-STOP-1");
    let key = &expected_observation_keys(&message_with_id("MLLP-STOP-1"))[0];
    tokio::time::timeout(DEADLINE, app.stopped())
        .await
        .expect("the server stops in time")
        .expect("a clean stop");
    assert!(c.closed_by_server().await.is_empty());
    let addr = app.mllp_addr.expect("the MLLP listener was on");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the MLLP listener is closed"
    );
    // Stored, as the AA said (read on the store: the HTTP server is gone).
    let found = app
        .store
        .find_by_identifier("Observation", Some(ITEM_KEY), key)
        .await
        .expect("a lookup");
    assert_eq!(found.len(), 1, "{key}");
}

/// A free local port (bound, read, released).
/// A `clinflow serve` process on `db_url`, with HTTP and MLLP listeners.
struct ServerProcess {
    child: tokio::process::Child,
    http: String,
    mllp: SocketAddr,
}

const CRASH_TOKEN: &str = "crash-test-admin-token";

async fn start_server(db_url: &str, data_dir: &std::path::Path) -> ServerProcess {
    let (http_port, mllp_port) = (crate::helpers::free_port(), crate::helpers::free_port());
    let child = tokio::process::Command::new(crate::helpers::clinflow_bin())
        .arg("--database")
        .arg(db_url)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--listen", &format!("127.0.0.1:{http_port}")])
        .args(["--mllp-listen", &format!("127.0.0.1:{mllp_port}")])
        .env("CLINFLOW_ADMIN_TOKEN", CRASH_TOKEN)
        .env("RUST_LOG", "warn")
        .env_remove("CLINFLOW_DATABASE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("clinflow serve starts");
    let server = ServerProcess {
        child,
        http: format!("http://127.0.0.1:{http_port}"),
        mllp: SocketAddr::from(([127, 0, 0, 1], mllp_port)),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let up = client
            .get(format!("{}/healthz", server.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up && TcpStream::connect(server.mllp).await.is_ok() {
            return server;
        }
        assert!(Instant::now() < deadline, "clinflow serve did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads one MLLP frame; `None` when the connection ends or fails first.
async fn next_frame(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == [0x1C, 0x0D]) {
            let frame = buf[..end].to_vec();
            buf.drain(..end + 2);
            return Some(frame);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(DEADLINE, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Sends messages over HTTP and MLLP, one after the other, until the
/// server dies; returns (sent, acknowledged) message ids.
async fn send_until_killed(
    http: String,
    mllp_addr: SocketAddr,
    round: usize,
    acked_tx: tokio::sync::mpsc::UnboundedSender<()>,
) -> (Vec<String>, Vec<String>) {
    let client = reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("a client");
    let (mut sent, mut acked) = (Vec::new(), Vec::new());
    let Ok(mut mllp) = TcpStream::connect(mllp_addr).await else {
        return (sent, acked);
    };
    let mut buf = Vec::new();
    for n in 0.. {
        let id = format!("CRASH-{round}-H{n}");
        sent.push(id.clone());
        let r = client
            .post(format!("{http}/ingest/hl7v2"))
            .bearer_auth(CRASH_TOKEN)
            .header("content-type", "application/hl7-v2")
            .body(message_with_id(&id))
            .send()
            .await;
        match r {
            Ok(r) if r.status().as_u16() == 202 => {
                acked.push(id);
                let _ = acked_tx.send(());
            }
            _ => return (sent, acked),
        }
        let id = format!("CRASH-{round}-M{n}");
        sent.push(id.clone());
        if mllp.write_all(&frame(&message_with_id(&id))).await.is_err() {
            return (sent, acked);
        }
        match next_frame(&mut mllp, &mut buf).await {
            Some(ack) if String::from_utf8_lossy(&ack).contains("MSA|AA|") => {
                acked.push(id);
                let _ = acked_tx.send(());
            }
            _ => return (sent, acked),
        }
    }
    (sent, acked)
}

/// The acceptance test of "never lose": a real `clinflow serve` under
/// continuous ingest (HTTP and MLLP) is killed with SIGKILL after a random
/// number of acknowledgements, with a message in flight, three times; after
/// a last restart every acknowledged message is stored exactly once and
/// every other message is stored whole or not at all.
async fn a_killed_server_loses_no_acknowledged_message_and_half_stores_none(mut app: TestApp) {
    app.load_reference_trial().await;
    // Only the child processes write from here on.
    app.signal_shutdown();
    app.stopped().await.expect("the in-process server stops");
    let data = tempfile::tempdir().expect("a data directory");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1);
    let mut state = u64::from(seed) | 1;
    let mut random = move |below: u64| {
        // xorshift64: the kill points differ from run to run (seed printed
        // on failure).
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let (mut sent, mut acked) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let mut server = start_server(&app.db_url, data.path()).await;
        let kill_after = 3 + random(20);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sender = send_until_killed(server.http.clone(), server.mllp, round, tx);
        tokio::pin!(sender);
        let mut count = 0;
        let (s, a) = loop {
            tokio::select! {
                done = &mut sender => break done,
                Some(()) = rx.recv() => {
                    count += 1;
                    if count == kill_after {
                        server.child.start_kill().expect("SIGKILL");
                    }
                }
            }
        };
        let _ = server.child.wait().await;
        assert!(
            a.len() as u64 >= kill_after,
            "seed {seed}: round {round} was killed after {kill_after} acknowledgements, saw {}",
            a.len()
        );
        sent.extend(s);
        acked.extend(a);
    }

    // The last start resumes what was accepted and not processed.
    let mut server = start_server(&app.db_url, data.path()).await;
    let deadline = Instant::now() + DEADLINE;
    while !app
        .store
        .unfinished_batches()
        .await
        .expect("batches")
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: batches not resumed in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.child.start_kill().expect("SIGKILL");
    let _ = server.child.wait().await;

    for id in &sent {
        let mut counts = Vec::new();
        for key in expected_observation_keys(&message_with_id(id)) {
            let found = app
                .store
                .find_by_identifier("Observation", Some(ITEM_KEY), &key)
                .await
                .expect("a lookup");
            counts.push(found.len());
        }
        assert!(!counts.is_empty(), "the message maps to Observations");
        let whole = counts.iter().all(|&n| n == counts[0]);
        assert!(
            whole && counts[0] <= 1,
            "seed {seed}: {id} is stored {counts:?}"
        );
        if acked.contains(id) {
            assert_eq!(counts[0], 1, "seed {seed}: acknowledged {id} is not stored");
        }
    }
}
