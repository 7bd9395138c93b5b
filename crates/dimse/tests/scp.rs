//! Black-box tests: the real SCP on 127.0.0.1:0, driven by dcmtk's echoscu/storescu
//! and by raw TCP clients.
//!
//! Sample files come from `CLINFLOW_DICOM_SAMPLES`, else from pydicom's test files
//! found with `$CLINFLOW_TEST_PYTHON`; without either (or without dcmtk) the tests
//! fail rather than skip.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clinflow_dimse::{
    serve, status, AssociationEnd, AssociationSummary, ScpConfig, StoreRequest, StoreSink,
    StoreStatus,
};
use dicom_ul::pdu::{
    read_pdu, write_pdu, AssociationRQ, Pdu, PresentationContextProposed, UserVariableItem,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(60);

/// Records every request; answers with a fixed status.
struct CollectingSink {
    // Why a std Mutex: held only to push/clone, never across an await.
    received: Mutex<Vec<StoreRequest>>,
    answer: StoreStatus,
    closed: mpsc::UnboundedSender<AssociationSummary>,
}

impl StoreSink for CollectingSink {
    async fn store(&self, req: StoreRequest) -> StoreStatus {
        self.received.lock().unwrap().push(req);
        self.answer.clone()
    }

    async fn association_closed(&self, summary: AssociationSummary) {
        let _ = self.closed.send(summary);
    }
}

struct App {
    addr: SocketAddr,
    sink: Arc<CollectingSink>,
    closed: mpsc::UnboundedReceiver<AssociationSummary>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl App {
    fn received(&self) -> Vec<StoreRequest> {
        self.sink.received.lock().unwrap().clone()
    }

    async fn next_closed(&mut self) -> AssociationSummary {
        timeout(WAIT, self.closed.recv())
            .await
            .expect("association_closed not called in time")
            .expect("sink dropped")
    }

    /// Signal shutdown and wait for `serve` to return.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        timeout(WAIT, self.server)
            .await
            .expect("serve did not stop in time")
            .unwrap()
            .unwrap();
    }
}

fn config() -> ScpConfig {
    ScpConfig {
        idle_timeout: Duration::from_secs(20),
        shutdown_grace: Duration::from_secs(5),
        ..ScpConfig::default()
    }
}

async fn spawn_app(cfg: ScpConfig, answer: StoreStatus) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, closed) = mpsc::unbounded_channel();
    let sink = Arc::new(CollectingSink {
        received: Mutex::new(Vec::new()),
        answer,
        closed: tx,
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, cfg, sink.clone(), async {
        let _ = stopped.await;
    }));
    App {
        addr,
        sink,
        closed,
        stop: Some(stop),
        server,
    }
}

fn samples_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CLINFLOW_DICOM_SAMPLES") {
        return PathBuf::from(dir);
    }
    let python = std::env::var("CLINFLOW_TEST_PYTHON").expect(
        "set CLINFLOW_DICOM_SAMPLES or CLINFLOW_TEST_PYTHON (a python with pydicom) for the sample files",
    );
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import pydicom,os;print(os.path.join(os.path.dirname(pydicom.__file__),\"data\",\"test_files\"))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(out.status.success(), "pydicom not importable with {python}");
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    assert!(dir.is_dir(), "{} is not a directory", dir.display());
    dir
}

fn sample(name: &str) -> PathBuf {
    let path = samples_dir().join(name);
    assert!(path.is_file(), "sample {} missing", path.display());
    path
}

/// What a Part 10 file's meta group says, and the bytes after it.
struct Part10 {
    sop_instance_uid: String,
    transfer_syntax: String,
    dataset: Vec<u8>,
}

/// Parse the file meta group (explicit VR little endian) by hand.
fn part10(path: &PathBuf) -> Part10 {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[128..132], b"DICM");
    let mut pos = 132;
    let mut sop_instance_uid = String::new();
    let mut transfer_syntax = String::new();
    while pos + 8 <= bytes.len() && u16::from_le_bytes([bytes[pos], bytes[pos + 1]]) == 0x0002 {
        let element = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        let vr = &bytes[pos + 4..pos + 6];
        let (len, head) = if matches!(vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT" | b"UC" | b"UR") {
            let l = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap());
            (l as usize, 12)
        } else {
            (
                u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]]) as usize,
                8,
            )
        };
        let value = &bytes[pos + head..pos + head + len];
        let text = || {
            String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_owned()
        };
        match element {
            0x0003 => sop_instance_uid = text(),
            0x0010 => transfer_syntax = text(),
            _ => {}
        }
        pos += head + len;
    }
    let mut dataset = bytes[pos..].to_vec();
    // DCMTK re-encodes the data set before sending and drops Data Set Trailing Padding
    // (FFFC,FFFC), always the last element (explicit VR: tag, "OB", 2 reserved, length).
    if let Some(at) = dataset
        .windows(6)
        .rposition(|w| w == [0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B'])
    {
        let len = u32::from_le_bytes(dataset[at + 8..at + 12].try_into().unwrap()) as usize;
        if at + 12 + len == dataset.len() {
            dataset.truncate(at);
        }
    }
    // It also writes encapsulated Pixel Data as OB where a file has OW.
    let ow_encapsulated: &[u8] = &[
        0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    if let Some(at) = dataset.windows(12).position(|w| w == ow_encapsulated) {
        dataset[at + 5] = b'B';
    }
    Part10 {
        sop_instance_uid,
        transfer_syntax,
        dataset,
    }
}

async fn dcmtk(tool: &str, args: &[String]) -> Output {
    let child = tokio::process::Command::new(tool)
        .args(args)
        .kill_on_drop(true)
        .output();
    timeout(WAIT, child)
        .await
        .unwrap_or_else(|_| panic!("{tool} did not finish in time"))
        .unwrap_or_else(|e| panic!("cannot run {tool} (is dcmtk installed?): {e}"))
}

fn net_args(addr: SocketAddr, called: &str) -> Vec<String> {
    vec![
        "-aet".into(),
        "TESTSCU".into(),
        "-aec".into(),
        called.into(),
        addr.ip().to_string(),
        addr.port().to_string(),
    ]
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The storescu option that makes it propose `ts` (it proposes one preferred network
/// transfer syntax per run, plus uncompressed fallbacks).
fn propose_flag(ts: &str) -> &'static str {
    match ts {
        "1.2.840.10008.1.2" => "-xi",
        "1.2.840.10008.1.2.1" => "-xe",
        "1.2.840.10008.1.2.2" => "-xb",
        "1.2.840.10008.1.2.1.99" => "-xd",
        "1.2.840.10008.1.2.4.50" => "-xy",
        "1.2.840.10008.1.2.4.51" => "-xx",
        "1.2.840.10008.1.2.4.70" => "-xs",
        "1.2.840.10008.1.2.4.80" => "-xt",
        "1.2.840.10008.1.2.4.81" => "-xu",
        "1.2.840.10008.1.2.4.90" => "-xv",
        "1.2.840.10008.1.2.4.91" => "-xw",
        "1.2.840.10008.1.2.5" => "-xr",
        other => panic!("no storescu option for transfer syntax {other}"),
    }
}

/// Run storescu (`-d`: its log shows statuses and error comments) on files that share
/// one transfer syntax, proposing that transfer syntax.
async fn storescu(addr: SocketAddr, files: &[PathBuf]) -> Output {
    storescu_with(addr, files, &[]).await
}

async fn storescu_with(addr: SocketAddr, files: &[PathBuf], extra: &[&str]) -> Output {
    let ts = part10(&files[0]).transfer_syntax;
    let mut args = vec![
        "-d".to_string(),
        "-R".to_string(),
        propose_flag(&ts).to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.extend(net_args(addr, "CLINFLOW"));
    args.extend(files.iter().map(|f| f.display().to_string()));
    dcmtk("storescu", &args).await
}

/// Files whose data set dcmtk sends as stored (modulo the two normalisations in
/// [`part10`]).
const BYTE_EXACT: &[&str] = &[
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
];

#[tokio::test]
async fn echoscu_succeeds() {
    let mut app = spawn_app(config(), StoreStatus::success()).await;
    let out = dcmtk("echoscu", &net_args(app.addr, "CLINFLOW")).await;
    assert!(out.status.success(), "echoscu failed: {}", text(&out));
    let summary = app.next_closed().await;
    assert_eq!(summary.calling_ae, "TESTSCU");
    assert_eq!(summary.end, AssociationEnd::Released);
    app.stop().await;
}

#[tokio::test]
async fn storescu_delivers_samples_byte_exact() {
    let mut app = spawn_app(config(), StoreStatus::success()).await;
    for name in BYTE_EXACT {
        let file = sample(name);
        let out = storescu(app.addr, std::slice::from_ref(&file)).await;
        assert!(
            out.status.success(),
            "storescu failed on {name}: {}",
            text(&out)
        );
        let summary = app.next_closed().await;
        assert_eq!(summary.end, AssociationEnd::Released, "{name}");
        assert_eq!((summary.stored, summary.failed), (1, 0), "{name}");

        let received = app.received();
        let req = received.last().expect("nothing received");
        let expected = part10(&file);
        assert_eq!(req.sop_instance_uid, expected.sop_instance_uid, "{name}");
        assert_eq!(req.transfer_syntax, expected.transfer_syntax, "{name}");
        let first_diff = req
            .dataset
            .iter()
            .zip(&expected.dataset)
            .position(|(a, b)| a != b);
        assert!(
            req.dataset == expected.dataset,
            "{name}: dataset bytes differ: {} vs {} bytes, first difference at {first_diff:?}",
            req.dataset.len(),
            expected.dataset.len()
        );
        assert_eq!(req.calling_ae, "TESTSCU");
        assert_eq!(req.called_ae, "CLINFLOW");
        assert_eq!(req.association, summary.association);
    }
    assert_eq!(app.received().len(), BYTE_EXACT.len());
    app.stop().await;
}

/// dcmtk re-encodes this file's undefined-length sequences, so only UIDs, transfer
/// syntax and a plausible size are checked.
#[tokio::test]
async fn reencoded_jpeg_lossy_arrives() {
    let mut app = spawn_app(config(), StoreStatus::success()).await;
    let file = sample("JPEG-lossy.dcm");
    let out = storescu(app.addr, std::slice::from_ref(&file)).await;
    assert!(out.status.success(), "storescu failed: {}", text(&out));
    assert_eq!(app.next_closed().await.stored, 1);
    let received = app.received();
    let expected = part10(&file);
    assert_eq!(received[0].sop_instance_uid, expected.sop_instance_uid);
    assert_eq!(received[0].transfer_syntax, "1.2.840.10008.1.2.4.51");
    assert!(received[0].dataset.len().abs_diff(expected.dataset.len()) < 1024);
    app.stop().await;
}

#[tokio::test]
async fn sink_failure_is_reported_to_storescu() {
    let answer = StoreStatus::with_comment(
        status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        "rejected by test",
    );
    let mut app = spawn_app(config(), answer).await;
    let out = storescu(app.addr, &[sample("CT_small.dcm")]).await;
    let log = text(&out);
    // dcmtk 3.6.7's storescu exits 0 after a failure status, so check its log.
    assert!(
        log.contains("0xa900: Error"),
        "storescu did not report the failure: {log}"
    );
    assert!(
        log.contains("rejected by test"),
        "error comment missing: {log}"
    );
    let summary = app.next_closed().await;
    assert_eq!((summary.stored, summary.failed), (0, 1));
    app.stop().await;
}

#[tokio::test]
async fn oversized_instance_gets_a700_and_association_stays_usable() {
    let cfg = ScpConfig {
        max_instance_bytes: 20_000,
        ..config()
    };
    let mut app = spawn_app(cfg, StoreStatus::success()).await;
    // CT_small's data set is ~39 KB, MR_small's ~10 KB: one association, the first
    // fails, the second is stored.
    let files = [sample("CT_small.dcm"), sample("MR_small.dcm")];
    let out = storescu_with(app.addr, &files, &["--no-halt"]).await;
    let log = text(&out);
    assert!(log.contains("0xa700: Refused"), "status missing: {log}");
    let summary = app.next_closed().await;
    assert_eq!(summary.end, AssociationEnd::Released);
    assert_eq!((summary.stored, summary.failed), (1, 1), "{log}");
    assert!(
        log.contains("exceeds 20000 bytes"),
        "error comment missing: {log}"
    );
    let received = app.received();
    assert_eq!(received.len(), 1);
    assert_eq!(
        received[0].sop_instance_uid,
        part10(&sample("MR_small.dcm")).sop_instance_uid
    );
    app.stop().await;
}

#[tokio::test]
async fn parallel_associations_all_succeed() {
    let mut app = spawn_app(config(), StoreStatus::success()).await;
    let files = vec![sample("CT_small.dcm"), sample("MR_small.dcm")];
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let files = files.clone();
            let addr = app.addr;
            tokio::spawn(async move { storescu(addr, &files).await })
        })
        .collect();
    for run in runs {
        let out = run.await.unwrap();
        assert!(out.status.success(), "storescu failed: {}", text(&out));
    }
    let mut ids = Vec::new();
    for _ in 0..4 {
        let summary = app.next_closed().await;
        assert_eq!((summary.stored, summary.failed), (2, 0));
        ids.push(summary.association);
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    assert_eq!(app.received().len(), 8);
    app.stop().await;
}

#[tokio::test]
async fn wrong_called_ae_is_rejected_when_strict() {
    let app = spawn_app(config(), StoreStatus::success()).await;
    let out = dcmtk("echoscu", &net_args(app.addr, "SOMEONE")).await;
    assert!(!out.status.success(), "echoscu should fail");
    assert!(
        text(&out).contains("Called AE Title Not Recognized"),
        "unexpected output: {}",
        text(&out)
    );
    app.stop().await;

    let lax = ScpConfig {
        strict_called_ae: false,
        ..config()
    };
    let app = spawn_app(lax, StoreStatus::success()).await;
    let out = dcmtk("echoscu", &net_args(app.addr, "SOMEONE")).await;
    assert!(out.status.success(), "echoscu failed: {}", text(&out));
    app.stop().await;
}

/// Read until the server closes; returns what it sent.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    timeout(WAIT, stream.read_to_end(&mut got))
        .await
        .expect("server did not close the connection")
        .unwrap_or_default();
    got
}

#[tokio::test]
async fn garbage_gets_abort_and_close() {
    let mut app = spawn_app(config(), StoreStatus::success()).await;
    let inputs: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &[0x01, 0x00, 0x00, 0x00, 0x00, 0x04, 0xde, 0xad, 0xbe, 0xef],
        &[0x04, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01],
    ];
    for input in inputs {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream.write_all(input).await.unwrap();
        let got = read_to_close(&mut stream).await;
        assert_eq!(got.first(), Some(&0x07), "expected A-ABORT, got {got:?}");
    }
    // A truncated PDU followed by silence must not hang past the idle timeout either;
    // the server is still healthy afterwards.
    let out = dcmtk("echoscu", &net_args(app.addr, "CLINFLOW")).await;
    assert!(out.status.success(), "echoscu failed: {}", text(&out));
    assert_eq!(app.next_closed().await.end, AssociationEnd::Released);
    app.stop().await;
}

#[tokio::test]
async fn idle_peer_is_aborted() {
    let cfg = ScpConfig {
        idle_timeout: Duration::from_millis(300),
        ..config()
    };
    let app = spawn_app(cfg, StoreStatus::success()).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream.write_all(&[0x01, 0x00, 0x00, 0x00]).await.unwrap();
    let _ = read_to_close(&mut stream).await;
    app.stop().await;
}

fn associate_rq() -> Vec<u8> {
    associate_rq_with(vec!["1.2.840.10008.1.2".into()])
}

fn associate_rq_with(transfer_syntaxes: Vec<String>) -> Vec<u8> {
    let rq = Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 1,
        calling_ae_title: "RAWSCU".into(),
        called_ae_title: "CLINFLOW".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: "1.2.840.10008.1.1".into(),
            transfer_syntaxes,
        }],
        user_variables: vec![UserVariableItem::MaxLength(16_384)],
    });
    let mut bytes = Vec::new();
    write_pdu(&mut bytes, &rq).unwrap();
    bytes
}

async fn read_one_pdu(stream: &mut TcpStream) -> Pdu {
    let mut header = [0u8; 6];
    timeout(WAIT, stream.read_exact(&mut header))
        .await
        .unwrap()
        .unwrap();
    let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut buf = header.to_vec();
    buf.resize(6 + len, 0);
    timeout(WAIT, stream.read_exact(&mut buf[6..]))
        .await
        .unwrap()
        .unwrap();
    read_pdu(&buf[..], 1 << 20, false).unwrap().unwrap()
}

#[tokio::test]
async fn associations_beyond_the_limit_are_rejected_transiently() {
    let cfg = ScpConfig {
        max_associations: 1,
        ..config()
    };
    let mut app = spawn_app(cfg, StoreStatus::success()).await;
    let mut held = TcpStream::connect(app.addr).await.unwrap();
    held.write_all(&associate_rq()).await.unwrap();
    assert!(matches!(
        read_one_pdu(&mut held).await,
        Pdu::AssociationAC(_)
    ));

    let out = dcmtk("echoscu", &net_args(app.addr, "CLINFLOW")).await;
    assert!(!out.status.success(), "echoscu should be rejected");
    assert!(
        text(&out).contains("Transient"),
        "unexpected output: {}",
        text(&out)
    );

    // Release the held association; then a new one is accepted.
    let mut release = Vec::new();
    write_pdu(&mut release, &Pdu::ReleaseRQ).unwrap();
    held.write_all(&release).await.unwrap();
    assert!(matches!(read_one_pdu(&mut held).await, Pdu::ReleaseRP));
    let summary = app.next_closed().await;
    assert_eq!(summary.calling_ae, "RAWSCU");
    assert_eq!(summary.end, AssociationEnd::Released);

    let out = dcmtk("echoscu", &net_args(app.addr, "CLINFLOW")).await;
    assert!(out.status.success(), "echoscu failed: {}", text(&out));
    app.stop().await;
}

#[tokio::test]
async fn explicit_little_endian_is_chosen_over_implicit() {
    let app = spawn_app(config(), StoreStatus::success()).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let proposed = vec!["1.2.840.10008.1.2".into(), "1.2.840.10008.1.2.1".into()];
    stream
        .write_all(&associate_rq_with(proposed))
        .await
        .unwrap();
    match read_one_pdu(&mut stream).await {
        Pdu::AssociationAC(ac) => {
            assert_eq!(ac.presentation_contexts.len(), 1);
            assert_eq!(
                ac.presentation_contexts[0].transfer_syntax,
                "1.2.840.10008.1.2.1"
            );
        }
        other => panic!("expected A-ASSOCIATE-AC, got {other:?}"),
    }
    drop(stream);
    app.stop().await;
}
