//! Imaging: DICOM instances made from pydicom's sample files
//! (`tests/dicom/prepare.py`: the PatientID set to a trial subject, fresh
//! UIDs) sent by dcmtk's `storescu` (a real client nobody here wrote) and
//! by STOW-RS; then indexed, found by QIDO-RS, retrieved by WADO-RS,
//! analysed by the worker pool, and reported as FHIR. Corrupt input is
//! refused with its reason; an unknown patient is quarantined; a failing
//! analysis is retried then dead-lettered while the others finish; a
//! worker process killed mid-task has its task delivered again and one
//! report results.
//!
//! Expected values come from the manifest `prepare.py` prints (what was
//! sent) and from the reference trial's subjects, never bare numbers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use crate::helpers::{workspace_root, TestApp, SUBJECTS_CSV};

/// Every wait for the server in this file.
const DEADLINE: Duration = Duration::from_secs(90);

fn with_dicom(c: &mut clinflow_server::Config) {
    c.imaging.dicom_listen = Some("127.0.0.1:0".parse().expect("an address"));
    c.imaging.workers = 2;
    c.imaging.settle = Duration::from_millis(200);
    c.imaging.backoff.base = Duration::from_millis(20);
    c.imaging.backoff.max = Duration::from_millis(200);
    c.imaging.max_attempts = 2;
}

fn no_workers(c: &mut clinflow_server::Config) {
    c.imaging.workers = 0;
}

/// NATS JetStream at 127.0.0.1:4222 (`CLINFLOW_TEST_NATS` overrides).
fn nats_url() -> String {
    std::env::var("CLINFLOW_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A stream of this test's own.
fn unique_stream() -> String {
    format!("T{}", uuid::Uuid::new_v4().simple()).to_uppercase()
}

fn with_dicom_on_jetstream(c: &mut clinflow_server::Config) {
    with_dicom(c);
    c.imaging.queue = clinflow_server::imaging::QueueBackend::Nats(nats_url());
    c.imaging.queue_stream = unique_stream();
    c.imaging.lease = Duration::from_secs(5);
}

engine_tests!(
    storescu_and_stow_instances_are_indexed_found_retrieved_analysed_and_reported with super::with_dicom,
    corrupt_and_conflicting_instances_are_refused_with_their_reason with super::with_dicom,
    an_unknown_patient_is_quarantined_with_its_reason_and_not_analysed with super::with_dicom,
    a_failing_analysis_is_retried_then_dead_while_the_others_finish with super::with_dicom,
    reads_are_site_scoped_and_roles_are_enforced with super::with_dicom,
    a_worker_killed_mid_task_has_it_redelivered_and_one_report_results with super::no_workers,
    on_jetstream_instances_are_analysed_and_reported with super::with_dicom_on_jetstream,
    on_jetstream_a_failing_analysis_is_retried_then_dead_while_the_others_finish with super::with_dicom_on_jetstream,
    on_jetstream_a_worker_killed_mid_task_has_it_redelivered_and_one_report_results with super::no_workers,
);

async fn on_jetstream_instances_are_analysed_and_reported(app: TestApp) {
    storescu_and_stow_instances_are_indexed_found_retrieved_analysed_and_reported(app).await
}

async fn on_jetstream_a_failing_analysis_is_retried_then_dead_while_the_others_finish(
    app: TestApp,
) {
    a_failing_analysis_is_retried_then_dead_while_the_others_finish(app).await
}

async fn on_jetstream_a_worker_killed_mid_task_has_it_redelivered_and_one_report_results(
    app: TestApp,
) {
    killed_worker(app, Some((nats_url(), unique_stream()))).await
}

/// One prepared instance, as `prepare.py` describes it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Prepared {
    pub file: PathBuf,
    pub sample: String,
    pub study: String,
    pub series: String,
    pub sop: String,
    pub modality: String,
    pub study_date: String,
}

/// The python with pydicom (`CLINFLOW_TEST_PYTHON`, made by scripts/test.sh).
fn python() -> String {
    std::env::var("CLINFLOW_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "CLINFLOW_TEST_PYTHON is not set: it must name a python with pydicom \
             (scripts/test.sh makes one in target/test-venv)"
        )
    })
}

/// Prepares instances in `dir` from `specs` (`NAME:PATIENT:STUDY[:COUNT]`).
pub fn prepare(dir: &Path, specs: &[String]) -> Vec<Prepared> {
    let out = std::process::Command::new(python())
        .arg(workspace_root().join("tests/dicom/prepare.py"))
        .arg(dir)
        .args(specs)
        .output()
        .expect("python runs tests/dicom/prepare.py");
    assert!(
        out.status.success(),
        "prepare.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("prepare.py prints its manifest")
}

/// The reference trial's subjects: (subject id, site).
fn subjects() -> Vec<(String, String)> {
    SUBJECTS_CSV
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split(',');
            (
                f.next().expect("a subject").to_string(),
                f.next().expect("a site").to_string(),
            )
        })
        .collect()
}

/// Sends files with dcmtk's storescu; its log (`-d`) for the caller to read.
pub fn storescu(addr: SocketAddr, ae: &str, files: &[&Path]) -> String {
    let out = std::process::Command::new("storescu")
        .args(["-d", "-aet", "TESTSCU", "-aec", ae])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .args(files)
        .output()
        .expect("storescu runs (Debian package dcmtk; scripts/test.sh installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A STOW-RS body of Part 10 files.
pub fn stow_body(files: &[Vec<u8>]) -> (String, Vec<u8>) {
    let boundary = format!("b{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for f in files {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/dicom\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(f);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}"),
        body,
    )
}

/// POSTs a STOW-RS request; (status, DICOM JSON answer).
pub async fn stow(app: &TestApp, token: &str, files: &[Vec<u8>]) -> (u16, Value) {
    let (ct, body) = stow_body(files);
    let r = app
        .client
        .post(app.url("/dicomweb/studies"))
        .bearer_auth(token)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .expect("the STOW-RS request is answered");
    let status = r.status().as_u16();
    let text = r.text().await.expect("a body");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("a prepared file")
}

/// The values of attribute `tag` in a DICOM JSON object.
fn values<'a>(obj: &'a Value, tag: &str) -> Vec<&'a Value> {
    obj[tag]["Value"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn first_str<'a>(obj: &'a Value, tag: &str) -> &'a str {
    values(obj, tag)
        .first()
        .and_then(|v| v.as_str())
        .unwrap_or_default()
}

/// Polls `/imaging/tasks` until `done(tasks)` holds.
async fn wait_tasks(app: &TestApp, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let r = app.get("/imaging/tasks?limit=1000", &app.admin).await;
        r.expect(200);
        let items = r.json()["items"].as_array().cloned().unwrap_or_default();
        if done(&items) {
            return items;
        }
        assert!(Instant::now() < deadline, "{what}: tasks now {items:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn task_of<'a>(tasks: &'a [Value], series: &str) -> Option<&'a Value> {
    tasks.iter().find(|t| t["series"] == series)
}

fn distinct<T: Ord + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = items.collect();
    v.sort();
    v.dedup();
    v
}

async fn storescu_and_stow_instances_are_indexed_found_retrieved_analysed_and_reported(
    app: TestApp,
) {
    app.load_reference_trial().await;
    let (subject, _site) = subjects()[0].clone();
    let dir = tempfile::tempdir().expect("a directory");
    let specs: Vec<String> = [
        format!("CT_small.dcm:{subject}:ct"),
        format!("MR_small.dcm:{subject}:mr:3"),
        format!("MR_small_RLE.dcm:{subject}:mr"),
        format!("MR_small_jp2klossless.dcm:{subject}:mr"),
    ]
    .into();
    let sent = prepare(dir.path(), &specs);
    let (by_dimse, by_stow): (Vec<&Prepared>, Vec<&Prepared>) = sent
        .iter()
        .partition(|p| p.sample == "CT_small.dcm" || p.sample == "MR_small.dcm");
    // DIMSE: CT_small and the three-instance MR series.
    let files: Vec<&Path> = by_dimse.iter().map(|p| p.file.as_path()).collect();
    let log = storescu(
        app.dicom_addr.expect("a DICOM listener"),
        "CLINFLOW",
        &files,
    );
    assert!(
        !log.contains("Store Failed") && !log.contains("E: "),
        "storescu reported a failure: {log}"
    );
    // STOW-RS: the RLE and JPEG 2000 variants, as one request.
    let bodies: Vec<Vec<u8>> = by_stow.iter().map(|p| read(&p.file)).collect();
    let (status, answer) = stow(&app, &app.admin, &bodies).await;
    assert_eq!(status, 200, "{answer}");
    let referenced = values(&answer, "00081199");
    assert_eq!(referenced.len(), by_stow.len(), "{answer}");
    for (item, p) in referenced.iter().zip(&by_stow) {
        assert_eq!(first_str(item, "00081155"), p.sop);
    }

    // QIDO-RS: the studies of the subject, by key.
    let r = app
        .get(
            &format!("/dicomweb/studies?PatientID={subject}"),
            &app.admin,
        )
        .await;
    r.expect(200);
    assert_eq!(r.header("content-type"), Some("application/dicom+json"));
    let studies = r.json();
    let studies = studies.as_array().expect("a JSON array");
    let want_studies = distinct(sent.iter().map(|p| p.study.clone()));
    let got: Vec<String> = distinct(studies.iter().map(|s| first_str(s, "0020000D").to_string()));
    assert_eq!(got, want_studies);
    for s in studies {
        let uid = first_str(s, "0020000D");
        let of_study: Vec<&Prepared> = sent.iter().filter(|p| p.study == uid).collect();
        assert_eq!(
            values(s, "00201208").first().and_then(|v| v.as_u64()),
            Some(of_study.len() as u64),
            "NumberOfStudyRelatedInstances of {s}"
        );
        let modalities: Vec<String> = values(s, "00080061")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        assert_eq!(
            modalities,
            distinct(of_study.iter().map(|p| p.modality.clone()))
        );
    }
    let ct = sent.iter().find(|p| p.modality == "CT").expect("a CT");
    let r = app
        .get(
            &format!("/dicomweb/studies?PatientID={subject}&ModalitiesInStudy=CT"),
            &app.admin,
        )
        .await;
    let only_ct = r.json();
    assert_eq!(
        only_ct.as_array().map(|a| a
            .iter()
            .map(|s| first_str(s, "0020000D").to_string())
            .collect::<Vec<_>>()),
        Some(vec![ct.study.clone()])
    );
    if !ct.study_date.is_empty() {
        let r = app
            .get(
                &format!(
                    "/dicomweb/studies?StudyDate={}-{}&StudyInstanceUID={}",
                    ct.study_date, ct.study_date, ct.study
                ),
                &app.admin,
            )
            .await;
        assert_eq!(r.json().as_array().map(Vec::len), Some(1), "{}", r.text);
        let r = app
            .get(
                &format!(
                    "/dicomweb/studies?StudyDate=-19000101&StudyInstanceUID={}",
                    ct.study
                ),
                &app.admin,
            )
            .await;
        assert_eq!(r.json().as_array().map(Vec::len), Some(0), "{}", r.text);
    }
    let r = app
        .get("/dicomweb/studies?StudyDate=yesterday", &app.admin)
        .await;
    r.expect(400);
    let mr = sent
        .iter()
        .find(|p| p.sample == "MR_small.dcm")
        .expect("an MR");
    let r = app
        .get(
            &format!("/dicomweb/studies/{}/series", mr.study),
            &app.admin,
        )
        .await;
    let series = r.json();
    let want_series = distinct(
        sent.iter()
            .filter(|p| p.study == mr.study)
            .map(|p| p.series.clone()),
    );
    assert_eq!(
        distinct(
            series
                .as_array()
                .expect("series")
                .iter()
                .map(|s| first_str(s, "0020000E").to_string())
        ),
        want_series
    );
    let r = app
        .get(
            &format!(
                "/dicomweb/studies/{}/series/{}/instances",
                mr.study, mr.series
            ),
            &app.admin,
        )
        .await;
    let instances = r.json();
    assert_eq!(
        distinct(
            instances
                .as_array()
                .expect("instances")
                .iter()
                .map(|s| first_str(s, "00080018").to_string())
        ),
        distinct(
            sent.iter()
                .filter(|p| p.series == mr.series)
                .map(|p| p.sop.clone())
        )
    );

    // WADO-RS: a STOW-RS instance comes back byte for byte.
    let stowed = by_stow[0];
    let r = app
        .client
        .get(app.url(&format!(
            "/dicomweb/studies/{}/series/{}/instances/{}",
            stowed.study, stowed.series, stowed.sop
        )))
        .bearer_auth(&app.admin)
        .header("accept", "multipart/related; type=\"application/dicom\"")
        .send()
        .await
        .expect("WADO-RS answers");
    assert_eq!(r.status(), 200);
    let ct_header = r.headers()["content-type"]
        .to_str()
        .expect("text")
        .to_string();
    assert!(ct_header.starts_with("multipart/related"), "{ct_header}");
    let body = r.bytes().await.expect("a body");
    let original = read(&stowed.file);
    assert!(
        body.windows(original.len())
            .any(|w| w == original.as_slice()),
        "the retrieved part is the stored file"
    );
    let r = app
        .get(
            &format!(
                "/dicomweb/studies/{}/series/{}/metadata",
                mr.study, mr.series
            ),
            &app.admin,
        )
        .await;
    r.expect(200);
    let meta = r.json();
    for m in meta.as_array().expect("metadata") {
        assert_eq!(first_str(m, "00100020"), subject);
        assert!(m
            .get("7FE00010")
            .is_none_or(|p| p.get("InlineBinary").is_none()));
    }

    // Analysis: every series is done, with one report each.
    let all_series = distinct(sent.iter().map(|p| p.series.clone()));
    let tasks = wait_tasks(&app, "every series analysed", |t| {
        all_series
            .iter()
            .all(|s| task_of(t, s).is_some_and(|t| t["status"] == "done"))
    })
    .await;
    for s in &all_series {
        let task = task_of(&tasks, s).expect("a task");
        let report_ref = task["report"].as_str().expect("a report reference");
        let report = app.get(&format!("/fhir/{report_ref}"), &app.admin).await;
        report.expect(200);
        let report = report.json();
        assert_eq!(report["resourceType"], "DiagnosticReport");
        assert_eq!(report["status"], "final");
        let subject_ref = report["subject"]["reference"].as_str().expect("a subject");
        app.get(&format!("/fhir/{subject_ref}"), &app.admin)
            .await
            .expect(200);
        let study_ref = report["imagingStudy"][0]["reference"]
            .as_str()
            .expect("an ImagingStudy");
        let study = app.get(&format!("/fhir/{study_ref}"), &app.admin).await;
        study.expect(200);
        let study = study.json();
        assert_eq!(study["subject"]["reference"], subject_ref);
        let results = report["result"].as_array().expect("results");
        assert!(!results.is_empty());
        for o in results {
            let o = app
                .get(
                    &format!("/fhir/{}", o["reference"].as_str().expect("a reference")),
                    &app.admin,
                )
                .await;
            o.expect(200);
            assert_eq!(o.json()["resourceType"], "Observation");
        }
        // The thumbnail is a PNG.
        let study_uid = sent
            .iter()
            .find(|p| p.series == *s)
            .expect("sent")
            .study
            .clone();
        let r = app
            .client
            .get(app.url(&format!(
                "/dicomweb/studies/{study_uid}/series/{s}/thumbnail"
            )))
            .bearer_auth(&app.admin)
            .send()
            .await
            .expect("a thumbnail");
        assert_eq!(r.status(), 200);
        let png = r.bytes().await.expect("bytes");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    }
    let r = app.get("/metrics", &app.admin).await;
    assert!(
        r.text
            .contains("clinflow_imaging_tasks_total{outcome=\"done\"}"),
        "{}",
        r.text
    );
    assert!(
        r.text.contains("clinflow_imaging_queue_depth 0"),
        "{}",
        r.text
    );
}

async fn corrupt_and_conflicting_instances_are_refused_with_their_reason(app: TestApp) {
    app.load_reference_trial().await;
    let (subject, _) = subjects()[0].clone();
    let dir = tempfile::tempdir().expect("a directory");
    let sent = prepare(dir.path(), &[format!("CT_small.dcm:{subject}:a")]);
    let good = read(&sent[0].file);
    let truncated = good[..good.len() * 2 / 3].to_vec();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    let (status, answer) = stow(&app, &app.admin, &[truncated, garbage, good.clone()]).await;
    assert_eq!(status, 202, "{answer}");
    let failed = values(&answer, "00081198");
    assert_eq!(failed.len(), 2, "{answer}");
    for f in &failed {
        assert_eq!(
            values(f, "00081197").first().and_then(|v| v.as_u64()),
            Some(0xC000)
        );
        assert!(
            first_str(f, "00000902").contains("not a readable DICOM instance"),
            "{f}"
        );
    }
    assert_eq!(values(&answer, "00081199").len(), 1);
    // The same instance again is accepted (idempotent); other content under
    // its SOP Instance UID is refused as a duplicate.
    let (status, _) = stow(&app, &app.admin, std::slice::from_ref(&good)).await;
    assert_eq!(status, 200);
    let mut altered = good.clone();
    let last = altered.len() - 1;
    altered[last] ^= 0x01;
    let (status, answer) = stow(&app, &app.admin, &[altered]).await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(
        values(values(&answer, "00081198")[0], "00081197")
            .first()
            .and_then(|v| v.as_u64()),
        Some(0x0111)
    );
    // Not multipart/related of application/dicom: 415, with the reason.
    let r = app
        .post("/dicomweb/studies", &app.admin, "application/json", "{}")
        .await;
    r.expect(415);
    // The same study UID under another patient is refused (0xA900).
    let (other, _) = subjects()[1].clone();
    let dir2 = tempfile::tempdir().expect("a directory");
    let mut clash = prepare(dir2.path(), &[format!("MR_small.dcm:{other}:b")]);
    let file = clash.remove(0);
    let out = std::process::Command::new(python())
        .args(["-c", "import sys,pydicom; d=pydicom.dcmread(sys.argv[1]); d.StudyInstanceUID=sys.argv[2]; d.save_as(sys.argv[1])"])
        .arg(&file.file)
        .arg(&sent[0].study)
        .output()
        .expect("python");
    assert!(out.status.success());
    let log = storescu(app.dicom_addr.expect("DICOM"), "CLINFLOW", &[&file.file]);
    assert!(
        log.contains("0xa900") || log.contains("A900") || log.contains("a900"),
        "{log}"
    );
    let r = app
        .get(
            &format!("/dicomweb/studies/{}/instances", sent[0].study),
            &app.admin,
        )
        .await;
    assert_eq!(r.json().as_array().map(Vec::len), Some(1), "{}", r.text);
    // A called AE title that is not ours is rejected at association.
    let log = storescu(
        app.dicom_addr.expect("DICOM"),
        "NOTCLINFLOW",
        &[&sent[0].file],
    );
    assert!(log.to_lowercase().contains("reject"), "{log}");
}

async fn an_unknown_patient_is_quarantined_with_its_reason_and_not_analysed(app: TestApp) {
    app.load_reference_trial().await;
    let dir = tempfile::tempdir().expect("a directory");
    let sent = prepare(dir.path(), &["CT_small.dcm:NOT-A-SUBJECT:q".to_string()]);
    let (status, answer) = stow(&app, &app.admin, &[read(&sent[0].file)]).await;
    assert_eq!(status, 200, "{answer}");
    let r = app.get("/imaging/quarantine", &app.admin).await;
    r.expect(200);
    let items = r.json()["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0]["study"], sent[0].study);
    assert!(items[0]["reason"]
        .as_str()
        .unwrap_or_default()
        .contains("not a subject"));
    // No task, no ImagingStudy; a monitor does not see it, a data manager does.
    let tasks = app.get("/imaging/tasks", &app.admin).await.json();
    assert_eq!(tasks["items"].as_array().map(Vec::len), Some(0));
    assert_eq!(app.count(&app.admin, "ImagingStudy").await, 0);
    let monitor = app.token("monitor", None, None).await;
    let r = app.get("/dicomweb/studies", &monitor).await;
    assert_eq!(r.json().as_array().map(Vec::len), Some(0));
    let dm = app.token("data-manager", None, None).await;
    let r = app.get("/dicomweb/studies", &dm).await;
    assert_eq!(r.json().as_array().map(Vec::len), Some(1));
}

async fn a_failing_analysis_is_retried_then_dead_while_the_others_finish(app: TestApp) {
    app.load_reference_trial().await;
    let (subject, _) = subjects()[0].clone();
    let dir = tempfile::tempdir().expect("a directory");
    // JPEG-LS: stored and indexed, but the analyser cannot decode it.
    let sent = prepare(
        dir.path(),
        &[
            format!("MR_small_jpeg_ls_lossless.dcm:{subject}:a"),
            format!("CT_small.dcm:{subject}:a"),
            format!("MR_small.dcm:{subject}:a"),
        ],
    );
    let bodies: Vec<Vec<u8>> = sent.iter().map(|p| read(&p.file)).collect();
    let (status, answer) = stow(&app, &app.admin, &bodies).await;
    assert_eq!(status, 200, "{answer}");
    let bad = &sent[0].series;
    let tasks = wait_tasks(&app, "the good ones done, the bad one dead", |t| {
        sent.iter().all(|p| {
            task_of(t, &p.series)
                .is_some_and(|t| t["status"] == if p.series == *bad { "dead" } else { "done" })
        })
    })
    .await;
    let dead = task_of(&tasks, bad).expect("the dead task");
    assert_eq!(dead["attempts"], dead["maxAttempts"]);
    assert!(dead["lastError"].as_str().is_some_and(|e| !e.is_empty()));
    let r = app.get("/imaging/tasks?status=dead", &app.admin).await;
    assert_eq!(r.json()["items"].as_array().map(Vec::len), Some(1));
    // An operator's retry runs it again (and it dies again).
    let id = dead["id"].as_str().expect("an id");
    let monitor = app.token("monitor", None, None).await;
    app.post(
        &format!("/imaging/tasks/{id}/retry"),
        &monitor,
        "application/json",
        "",
    )
    .await
    .expect(403);
    let r = app
        .post(
            &format!("/imaging/tasks/{id}/retry"),
            &app.admin,
            "application/json",
            "",
        )
        .await;
    r.expect(200);
    let updated = r.json()["updatedAt"].clone();
    wait_tasks(&app, "the retried task dead again", |t| {
        task_of(t, bad).is_some_and(|t| t["status"] == "dead" && t["updatedAt"] != updated)
    })
    .await;
    let r = app
        .post(
            &format!(
                "/imaging/tasks/{}/retry",
                task_of(&tasks, &sent[1].series).expect("a task")["id"]
                    .as_str()
                    .expect("id")
            ),
            &app.admin,
            "application/json",
            "",
        )
        .await;
    r.expect(409);
    let m = app.get("/metrics", &app.admin).await.text;
    assert!(m.contains("clinflow_imaging_failures_total{reason="), "{m}");
    assert!(m.contains("clinflow_imaging_dead 1"), "{m}");
}

async fn reads_are_site_scoped_and_roles_are_enforced(app: TestApp) {
    app.load_reference_trial().await;
    let subs = subjects();
    let (s1, site1) = subs[0].clone();
    let (s2, site2) = subs
        .iter()
        .find(|(_, site)| *site != site1)
        .cloned()
        .expect("a subject at another site");
    let dir = tempfile::tempdir().expect("a directory");
    let sent = prepare(
        dir.path(),
        &[
            format!("CT_small.dcm:{s1}:a"),
            format!("MR_small.dcm:{s2}:b"),
        ],
    );
    let interface = app.token("interface", None, None).await;
    let (status, answer) = stow(
        &app,
        &interface,
        &[read(&sent[0].file), read(&sent[1].file)],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    app.get("/dicomweb/studies", &interface).await.expect(403);
    let patient = app.token("patient", None, Some("x")).await;
    app.get("/dicomweb/studies", &patient).await.expect(403);
    let user1 = app.token("site-user", Some(&site1), None).await;
    let r = app.get("/dicomweb/studies", &user1).await;
    let seen: Vec<String> = r
        .json()
        .as_array()
        .expect("an array")
        .iter()
        .map(|s| first_str(s, "0020000D").to_string())
        .collect();
    assert_eq!(seen, vec![sent[0].study.clone()]);
    // Another site's study is absent for this user.
    app.get(
        &format!("/dicomweb/studies/{}/metadata", sent[1].study),
        &user1,
    )
    .await
    .expect(404);
    // A site user may not store a study of another site's subject.
    let user2 = app.token("site-user", Some(&site2), None).await;
    let dir2 = tempfile::tempdir().expect("a directory");
    let more = prepare(dir2.path(), &[format!("CT_small.dcm:{s1}:c")]);
    let (status, answer) = stow(&app, &user2, &[read(&more[0].file)]).await;
    assert_eq!(status, 409, "{answer}");
    app.get("/dicomweb/studies", "not-a-token")
        .await
        .expect(401);
}

/// A `clinflow serve` process on `db_url` with `data_dir`.
struct Worker {
    child: tokio::process::Child,
    http: String,
}

const WORKER_TOKEN: &str = "imaging-worker-test-admin-token";

async fn start_worker(
    db_url: &str,
    data_dir: &Path,
    delay_ms: u64,
    queue: &Option<(String, String)>,
) -> Worker {
    let port = crate::helpers::free_port();
    let mut cmd = tokio::process::Command::new(crate::helpers::clinflow_bin());
    if let Some((url, stream)) = queue {
        cmd.env("CLINFLOW_QUEUE", url)
            .env("CLINFLOW_QUEUE_STREAM", stream);
    } else {
        cmd.env_remove("CLINFLOW_QUEUE");
    }
    let child = cmd
        .arg("--database")
        .arg(db_url)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--imaging-workers", "1", "--imaging-lease", "2"])
        .args(["--imaging-analysis-delay-ms", &delay_ms.to_string()])
        .env("CLINFLOW_ADMIN_TOKEN", WORKER_TOKEN)
        .env("RUST_LOG", "warn")
        .env_remove("CLINFLOW_DATABASE")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("clinflow serve starts");
    let w = Worker {
        child,
        http: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let up = client
            .get(format!("{}/healthz", w.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if up {
            return w;
        }
        assert!(Instant::now() < deadline, "clinflow serve did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_worker_killed_mid_task_has_it_redelivered_and_one_report_results(app: TestApp) {
    killed_worker(app, None).await
}

/// Two `clinflow serve` processes share the queue (embedded, or JetStream
/// `(url, stream)`); the one running the task is killed with SIGKILL.
async fn killed_worker(app: TestApp, queue: Option<(String, String)>) {
    app.load_reference_trial().await;
    let (subject, _) = subjects()[0].clone();
    let dir = tempfile::tempdir().expect("a directory");
    let sent = prepare(dir.path(), &[format!("CT_small.dcm:{subject}:a")]);
    let data = tempfile::tempdir().expect("a data directory");
    // A worker whose analyses take long: killed while it holds the task.
    let mut first = start_worker(&app.db_url, data.path(), 60_000, &queue).await;
    let (ct, body) = stow_body(&[read(&sent[0].file)]);
    let r = app
        .client
        .post(format!("{}/dicomweb/studies", first.http))
        .bearer_auth(WORKER_TOKEN)
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .expect("STOW-RS to the worker process");
    assert_eq!(r.status(), 200);
    wait_tasks(&app, "the task running in the first worker", |t| {
        task_of(t, &sent[0].series).is_some_and(|t| t["status"] == "running")
    })
    .await;
    // A second worker shares the queue; it takes the task over once the
    // first is killed and its lease lapses.
    let _second = start_worker(&app.db_url, data.path(), 0, &queue).await;
    first.child.start_kill().expect("SIGKILL");
    let _ = first.child.wait().await;
    let tasks = wait_tasks(&app, "the task done by the second worker", |t| {
        task_of(t, &sent[0].series).is_some_and(|t| t["status"] == "done")
    })
    .await;
    let task = task_of(&tasks, &sent[0].series).expect("the task");
    assert!(task["attempts"].as_u64().is_some_and(|a| a >= 2), "{task}");
    assert_eq!(app.count(&app.admin, "DiagnosticReport").await, 1);
}
