//! The ingest pipeline through `/ingest`: the reference trial's samples are
//! stored and searchable, the invalid cases are rejected (or stored with a
//! data query) with reason and location, the same content is one batch,
//! roles are enforced, a full queue answers 429, and a batch accepted but
//! not processed when the server stops is processed after a restart.
//!
//! Expected counts and rejections are computed by running clinflow-edc on
//! the same input with the same trial context, so the test checks the
//! pipeline (durability, ids, writes, counting) rather than restating the
//! edit checks; the absolute facts the README promises are asserted too.

use std::time::Duration;

use clinflow_edc::{ItemOutcome, TrialContext};
use serde_json::Value;

use crate::helpers::{open_store, sample, TestApp, PROTOCOL_YAML, SUBJECTS_CSV};
use clinflow_server::Application;

pub const LAB: &str = include_str!("../../../../reference-trial/samples/lab-results.hl7");
pub const WEARABLE: &str = include_str!("../../../../reference-trial/samples/wearable.csv");
pub const DIARY: &str = include_str!("../../../../reference-trial/samples/diary.ndjson");

const HL7: &str = "application/hl7-v2";
const CSV: &str = "text/csv";
const NDJSON: &str = "application/x-ndjson";
const ITEM_KEY: &str = clinflow_edc::provenance::ITEM_KEY_SYSTEM;

engine_tests!(
    every_sample_is_stored_and_searchable,
    invalid_wearable_rows_are_rejected_with_reason_and_location,
    an_unknown_subject_and_garbage_between_messages_are_rejected_items,
    a_diary_missing_a_required_answer_is_rejected_whole,
    the_same_body_twice_is_one_batch_stored_once,
    the_same_messages_re_encoded_are_duplicates,
    concurrent_batches_of_the_same_messages_store_them_once,
    only_ingest_roles_may_ingest,
    site_users_and_patients_ingest_only_their_own,
    bad_requests_are_problem_json,
    a_slow_stage_shows_as_its_queue_and_a_burst_as_429 with |c: &mut clinflow_server::Config| {
        c.ingest_map_workers = 1;
        c.ingest_persist_workers = 0;
        c.ingest_queue = 1;
        c.ingest_mapped_queue = 1;
    },
    // The drain's budget is the production default's business; this test
    // asserts that a stop drains, on two cores shared with the whole suite.
    a_graceful_shutdown_drains_the_stages with |c: &mut clinflow_server::Config| {
        c.ingest_drain_timeout = std::time::Duration::from_secs(300);
    },
    a_retried_item_is_stored_once_and_the_batch_counts_follow,
    a_full_pipeline_answers_429 with |c: &mut clinflow_server::Config| {
        c.ingest_map_workers = 0;
        c.ingest_queue = 1;
        c.body_limit = 64 * 1024;
    },
    an_unprocessed_batch_is_processed_after_a_restart with |c: &mut clinflow_server::Config| {
        c.ingest_map_workers = 0;
    },
    a_batch_cut_short_is_resumed_without_storing_twice,
    a_fhir_bundle_is_stored_with_references_by_identifier_resolved,
    fhir_ndjson_rejects_an_invalid_line_with_its_element_path,
    the_cli_ingests_files_directories_and_stdin,
    the_cli_says_when_the_server_is_full with |c: &mut clinflow_server::Config| {
        c.ingest_map_workers = 0;
        c.ingest_queue = 1;
    },
    the_cli_needs_a_token,
    a_retried_batch_stores_what_now_passes_and_nothing_twice,
    a_batch_still_processing_cannot_be_retried with |c: &mut clinflow_server::Config| {
        c.ingest_map_workers = 0;
    },
);

/// The reference trial as clinflow-edc sees it once loaded.
fn context() -> TrialContext {
    let protocol = clinflow_protocol::parse_yaml(PROTOCOL_YAML).expect("the protocol");
    let subjects =
        clinflow_protocol::parse_subjects_csv(SUBJECTS_CSV, &protocol).expect("the subjects");
    TrialContext::from_subjects(protocol, &subjects)
}

/// What a batch of this input must report, from clinflow-edc: `(received,
/// stored, rejected, queries_opened, rejections)` when nothing is a
/// duplicate.
struct Expected {
    items: Vec<ItemOutcome>,
}

impl Expected {
    fn of(path: &str, body: &str) -> Expected {
        let ctx = context();
        let raw = body.as_bytes();
        let items = match path {
            "/ingest/hl7v2" => clinflow_edc::ingest_hl7(&ctx, raw),
            "/ingest/wearable" => clinflow_edc::ingest_csv(&ctx, raw),
            _ => clinflow_edc::ingest_diaries_ndjson(&ctx, raw),
        };
        Expected { items }
    }

    fn stored(&self) -> u64 {
        self.items.iter().filter(|i| i.is_stored()).count() as u64
    }

    fn resources(&self, rtype: &str) -> u64 {
        self.items
            .iter()
            .flat_map(|i| &i.stored)
            .filter(|p| p.resource.resource_type() == rtype)
            .count() as u64
    }

    /// The rejections a batch `batch` of this input lists.
    fn rejections(&self, batch: &str) -> Vec<Value> {
        self.items
            .iter()
            .flat_map(|i| &i.rejections)
            .map(|r| {
                serde_json::json!({
                    "index": r.index,
                    "item": format!("{batch}.{}", r.index),
                    "reason": r.reason.to_string(),
                    "location": r.location,
                })
            })
            .collect()
    }

    /// Asserts a done batch's status against this input's outcome.
    #[track_caller]
    fn check(&self, status: &Value) {
        let n = self.items.len() as u64;
        let stored = self.stored();
        assert_eq!(status["status"], "done", "{status}");
        assert_eq!(status["received"], n, "{status}");
        assert_eq!(status["stored"], stored, "{status}");
        assert_eq!(status["rejected"], n - stored, "{status}");
        assert_eq!(status["duplicates"], 0, "{status}");
        let queries: usize = self
            .items
            .iter()
            .filter(|i| i.is_stored())
            .map(|i| i.queries.len())
            .sum();
        assert_eq!(status["queries_opened"], queries as u64, "{status}");
        let batch = status["batch"].as_str().expect("the batch id");
        assert_eq!(status["rejections"], Value::from(self.rejections(batch)));
        assert_counts_add_up(status);
    }
}

#[track_caller]
fn assert_counts_add_up(status: &Value) {
    let n = |k: &str| {
        status[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {status}"))
    };
    assert_eq!(
        n("received"),
        n("stored") + n("rejected") + n("duplicates"),
        "{status}"
    );
}

/// Posts a body; returns the batch id. Panics unless 202 with a Location.
pub(crate) async fn ingest(
    app: &TestApp,
    token: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> String {
    let r = app.post(path, token, content_type, body).await;
    r.expect(202);
    let j = r.json();
    let id = j["batch"].as_str().expect("a batch id").to_string();
    assert!(j["status"] == "processing" || j["status"] == "done", "{j}");
    assert_eq!(
        r.header("location"),
        Some(format!("/ingest/batches/{id}").as_str())
    );
    id
}

/// Polls a batch until it is done, for at most 30 s of tokio time.
pub(crate) async fn done(app: &TestApp, token: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.get(&format!("/ingest/batches/{id}"), token).await;
        r.expect(200);
        let j = r.json();
        if j["status"] == "done" {
            return j;
        }
        assert_eq!(j["status"], "processing", "{j}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "batch {id} not done in time: {j}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ingest_and_wait(app: &TestApp, path: &str, content_type: &str, body: &str) -> Value {
    let id = ingest(app, &app.admin, path, content_type, body).await;
    done(app, &app.admin, &id).await
}

/// `(system, value)` of every ingest key of a resource.
fn ingest_key(resource: &Value) -> Option<&str> {
    resource["identifier"]
        .as_array()?
        .iter()
        .find(|i| i["system"] == ITEM_KEY)?
        .get("value")?
        .as_str()
}

async fn every_sample_is_stored_and_searchable(app: TestApp) {
    app.load_reference_trial().await;
    let mut observations = 0;
    for (path, ctype, body) in [
        ("/ingest/hl7v2", HL7, LAB),
        ("/ingest/wearable", CSV, WEARABLE),
        ("/ingest/diary", NDJSON, DIARY),
    ] {
        let status = ingest_and_wait(&app, path, ctype, body).await;
        let expected = Expected::of(path, body);
        expected.check(&status);
        // Every value in the samples is valid: everything is stored.
        let lines = body.lines().filter(|l| !l.trim().is_empty());
        let items = match path {
            "/ingest/hl7v2" => lines.filter(|l| l.starts_with("MSH|")).count(),
            "/ingest/wearable" => lines.count() - 1,
            _ => lines.count(),
        } as u64;
        assert_eq!(status["received"], items, "{path}: {status}");
        assert_eq!(status["stored"], items, "{path}: {status}");
        assert_eq!(status["rejections"], Value::Array(vec![]), "{path}");
        observations += expected.resources("Observation");
    }
    assert_eq!(app.count(&app.admin, "Observation").await, observations);
    let diaries = Expected::of("/ingest/diary", DIARY).resources("QuestionnaireResponse");
    assert_eq!(
        app.count(&app.admin, "QuestionnaireResponse").await,
        diaries
    );

    // The lab report of subject 0003 groups its results, under server ids.
    let lab = Expected::of("/ingest/hl7v2", LAB);
    let first = &lab.items[0];
    let reports = app
        .search(
            &app.admin,
            "DiagnosticReport",
            "subject=Patient/CARDIO-01-0003",
        )
        .await;
    let reports = crate::helpers::entries(&reports);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = &reports[0]["resource"];
    let results = report["result"].as_array().expect("results");
    let expected_results = first
        .stored
        .iter()
        .filter(|p| p.resource.resource_type() == "Observation")
        .count();
    assert_eq!(results.len(), expected_results);
    for r in results {
        let reference = r["reference"].as_str().expect("a reference");
        assert!(
            reference.starts_with("Observation/") && !reference.contains("urn:"),
            "{reference}"
        );
        let obs = app.get(&format!("/fhir/{reference}"), &app.admin).await;
        obs.expect(200);
        let obs = obs.json();
        assert_eq!(obs["subject"]["reference"], "Patient/CARDIO-01-0003");
        assert_eq!(obs["meta"]["versionId"], "1");
        let key = ingest_key(&obs).expect("an ingest key");
        let found = app
            .search_ids(
                &app.admin,
                "Observation",
                &format!("identifier={ITEM_KEY}|{key}"),
            )
            .await;
        assert_eq!(found, vec![obs["id"].as_str().unwrap().to_string()]);
    }
    // Searchable by code and subject like any Observation.
    let hr = app
        .search_ids(
            &app.admin,
            "Observation",
            "subject=Patient/CARDIO-01-0001&code=http://loinc.org|8867-4",
        )
        .await;
    let expected_hr = WEARABLE
        .lines()
        .filter(|l| l.starts_with("CARDIO-01-0001,") && l.contains(",heart-rate,"))
        .count();
    assert_eq!(hr.len(), expected_hr);

    // Every write is audited as the submitter's, with the batch as reason.
    let id = results[0]["reference"].as_str().unwrap().to_string();
    let records = app
        .store
        .audit_records(clinflow_store::AuditQuery {
            entity: Some(id.clone()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let create = records
        .iter()
        .find(|r| r.record.action == "create")
        .unwrap_or_else(|| panic!("no create record of {id}: {records:?}"));
    assert_eq!(create.record.role, "admin");
    assert!(
        create
            .record
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("ingest batch ")),
        "{create:?}"
    );
}

async fn invalid_wearable_rows_are_rejected_with_reason_and_location(app: TestApp) {
    app.load_reference_trial().await;
    let csv = "subject,device,time,metric,value,unit\n\
        CARDIO-01-9999,watch-1,2026-03-02T08:00:00-05:00,heart-rate,71,/min\n\
        CARDIO-01-0001,watch-1,2026-03-02T08:01:00-05:00,heart-rate,400,/min\n\
        CARDIO-01-0001,watch-1,2026-03-02T08:02:00-05:00,heart-rate,150,/min\n\
        CARDIO-01-0001,watch-1,2026-03-02T08:03:00-05:00,heart-rate,71,mm[Hg]\n\
        CARDIO-01-0001,watch-1,2028-03-02T08:04:00-05:00,heart-rate,71,/min\n";
    let status = ingest_and_wait(&app, "/ingest/wearable", CSV, csv).await;
    Expected::of("/ingest/wearable", csv).check(&status);
    assert_eq!(status["received"], 5);
    assert_eq!(status["stored"], 1, "only the soft-range value: {status}");
    assert_eq!(status["rejected"], 4);
    assert_eq!(status["queries_opened"], 1);
    let rejections = status["rejections"].as_array().expect("rejections");
    let by_index = |i: u64| {
        rejections
            .iter()
            .find(|r| r["index"] == i)
            .unwrap_or_else(|| panic!("no rejection of item {i}: {status}"))
    };
    let reason = |i: u64| by_index(i)["reason"].as_str().unwrap().to_string();
    assert!(reason(0).contains("not enrolled"), "{}", reason(0));
    assert!(reason(1).contains("plausible range"), "{}", reason(1));
    assert_eq!(by_index(1)["location"], "line 3, column value");
    assert!(reason(3).contains("unit"), "{}", reason(3));
    assert!(reason(4).contains("trial period"), "{}", reason(4));
    assert!(rejections.iter().all(|r| r["index"] != 2), "{status}");
    // The soft-range value is stored and searchable.
    let stored = app
        .search(
            &app.admin,
            "Observation",
            "subject=Patient/CARDIO-01-0001&code=http://loinc.org|8867-4",
        )
        .await;
    let stored = crate::helpers::entries(&stored);
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0]["resource"]["valueQuantity"]["value"], 150);
    assert_eq!(app.count(&app.admin, "Observation").await, 1);
    // Rejections are counted by reason code; metrics name no subject. The
    // persist worker counts just after the batch is done: wait for it.
    metric_reaches(
        &app,
        "clinflow_ingest_items_total{format=\"wearable-csv\",fate=\"rejected\"}",
        4.0,
    )
    .await;
    // Every item went through both stages, and no batch waits in either.
    let received = status["received"].as_u64().unwrap() as f64;
    for stage in ["map", "persist"] {
        let at = |name: &str| format!("{name}{{stage=\"{stage}\"}}");
        metric_reaches(&app, &at("clinflow_ingest_stage_items_total"), received).await;
        metric_reaches(&app, &at("clinflow_ingest_stage_busy"), 0.0).await;
        let metrics = app.get("/metrics", &app.admin).await.text;
        assert_eq!(
            sample(&metrics, &at("clinflow_ingest_stage_queue_depth")),
            0.0
        );
        let workers = match stage {
            "map" => app.config.ingest_map_workers,
            _ => app.config.ingest_persist_workers,
        };
        assert_eq!(
            sample(&metrics, &at("clinflow_ingest_stage_workers")),
            workers as f64
        );
    }
    let metrics = app.get("/metrics", &app.admin).await.text;
    assert!(
        metrics.contains("clinflow_ingest_rejections_total{reason=\"hard-range\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("CARDIO-01"), "no subject ids in metrics");
}

async fn an_unknown_subject_and_garbage_between_messages_are_rejected_items(app: TestApp) {
    app.load_reference_trial().await;
    let second = LAB.find("\nMSH|").expect("two messages") + 1;
    let (first, rest) = LAB.split_at(second);
    let unknown = rest.replace("CARDIO-01-0001^^^", "CARDIO-01-9999^^^");
    let body = format!("{first}THIS IS NOT HL7\nNOR THIS\n{unknown}");
    let status = ingest_and_wait(&app, "/ingest/hl7v2", HL7, &body).await;
    Expected::of("/ingest/hl7v2", &body).check(&status);
    assert_eq!(status["received"], 3, "message, garbage, message: {status}");
    assert_eq!(status["stored"], 1);
    assert_eq!(status["rejected"], 2);
    let rejections = status["rejections"].as_array().expect("rejections");
    let garbage = rejections
        .iter()
        .find(|r| r["index"] == 1)
        .expect("garbage");
    assert_eq!(garbage["reason"], "not an HL7 v2 message");
    let garbage_line = first.lines().count() + 1;
    assert_eq!(garbage["location"], format!("line {garbage_line}"));
    let subject = rejections
        .iter()
        .find(|r| r["index"] == 2)
        .expect("subject");
    assert!(
        subject["reason"].as_str().unwrap().contains("not enrolled"),
        "{subject}"
    );
    assert!(
        subject["location"]
            .as_str()
            .unwrap()
            .starts_with("PID[1].3"),
        "{subject}"
    );
}

async fn a_diary_missing_a_required_answer_is_rejected_whole(app: TestApp) {
    app.load_reference_trial().await;
    let body = "{\"subject\":\"CARDIO-01-0001\",\"questionnaire\":\"daily-diary\",\"authored\":\"2026-03-03T21:10:00-05:00\",\"answers\":{\"dizziness\":false,\"dose-taken\":true}}\n\
        {\"subject\":\"CARDIO-01-0004\",\"questionnaire\":\"daily-diary\",\"authored\":\"2026-03-03T20:45:00+01:00\",\"answers\":{\"pain\":1,\"dizziness\":false,\"dose-taken\":true}}\n";
    let status = ingest_and_wait(&app, "/ingest/diary", NDJSON, body).await;
    Expected::of("/ingest/diary", body).check(&status);
    assert_eq!(status["received"], 2);
    assert_eq!(status["stored"], 1);
    assert_eq!(status["rejected"], 1);
    let r = &status["rejections"][0];
    assert_eq!(r["index"], 0);
    assert_eq!(r["reason"], "required answer \"pain\" is missing");
    assert!(
        r["location"].as_str().unwrap().contains("answers.pain"),
        "{r}"
    );
    assert_eq!(app.count(&app.admin, "QuestionnaireResponse").await, 1);
    // JSON (an array) is accepted too, as another format of the same items.
    let array = format!("[{}]", body.trim_end().replace('\n', ","));
    let status = ingest_and_wait(&app, "/ingest/diary", "application/json", &array).await;
    assert_eq!(status["received"], 2);
    assert_counts_add_up(&status);
}

async fn the_same_body_twice_is_one_batch_stored_once(app: TestApp) {
    app.load_reference_trial().await;
    let first = ingest(&app, &app.admin, "/ingest/wearable", CSV, WEARABLE).await;
    let again = ingest(&app, &app.admin, "/ingest/wearable", CSV, WEARABLE).await;
    assert_eq!(first, again, "the same content is the same batch");
    let status = done(&app, &app.admin, &first).await;
    Expected::of("/ingest/wearable", WEARABLE).check(&status);
    // Posted again after it is done: still that batch, reported done.
    let r = app
        .post("/ingest/wearable", &app.admin, CSV, WEARABLE)
        .await;
    r.expect(202);
    assert_eq!(r.json()["batch"], first.as_str());
    assert_eq!(r.json()["status"], "done");
    assert_eq!(
        app.count(&app.admin, "Observation").await,
        Expected::of("/ingest/wearable", WEARABLE).resources("Observation")
    );
}

async fn the_same_messages_re_encoded_are_duplicates(app: TestApp) {
    app.load_reference_trial().await;
    let status = ingest_and_wait(&app, "/ingest/hl7v2", HL7, LAB).await;
    let expected = Expected::of("/ingest/hl7v2", LAB);
    expected.check(&status);
    let observations = app.count(&app.admin, "Observation").await;
    // Carriage returns as on the wire: other bytes, the same messages.
    let wire = LAB.replace('\n', "\r");
    let status = ingest_and_wait(&app, "/ingest/hl7v2", HL7, &wire).await;
    assert_eq!(status["received"], expected.items.len() as u64);
    assert_eq!(
        status["duplicates"],
        expected.items.len() as u64,
        "{status}"
    );
    assert_eq!(status["stored"], 0);
    assert_counts_add_up(&status);
    assert_eq!(app.count(&app.admin, "Observation").await, observations);
}

async fn concurrent_batches_of_the_same_messages_store_them_once(app: TestApp) {
    app.load_reference_trial().await;
    // Three encodings of the same two messages, processed by two workers
    // at once: each message is stored by exactly one batch.
    let bodies = [
        LAB.to_string(),
        LAB.replace('\n', "\r"),
        LAB.replace('\n', "\r\n"),
    ];
    let ids = futures::future::join_all(
        bodies
            .iter()
            .map(|b| ingest(&app, &app.admin, "/ingest/hl7v2", HL7, b)),
    )
    .await;
    let mut stored = 0;
    let mut duplicates = 0;
    for id in &ids {
        let status = done(&app, &app.admin, id).await;
        assert_counts_add_up(&status);
        stored += status["stored"].as_u64().unwrap();
        duplicates += status["duplicates"].as_u64().unwrap();
    }
    let expected = Expected::of("/ingest/hl7v2", LAB);
    let messages = expected.items.len() as u64;
    assert_eq!(stored, messages, "each message stored once");
    assert_eq!(duplicates, messages * (bodies.len() as u64 - 1));
    assert_eq!(
        app.count(&app.admin, "Observation").await,
        expected.resources("Observation")
    );
    assert_eq!(
        app.count(&app.admin, "DiagnosticReport").await,
        expected.resources("DiagnosticReport")
    );
}

async fn only_ingest_roles_may_ingest(app: TestApp) {
    app.load_reference_trial().await;
    let id = ingest(&app, &app.admin, "/ingest/wearable", CSV, WEARABLE).await;
    let monitor = app.token("monitor", None, None).await;
    app.post("/ingest/hl7v2", &monitor, HL7, LAB)
        .await
        .problem(403);
    app.get(&format!("/ingest/batches/{id}"), &monitor)
        .await
        .problem(403);
    for role in ["interface", "data-manager"] {
        let token = app.token(role, None, None).await;
        let own = ingest(
            &app,
            &token,
            "/ingest/diary",
            NDJSON,
            &format!("{DIARY}\n{role}\n"),
        )
        .await;
        done(&app, &token, &own).await;
    }
    app.post("/ingest/hl7v2", "not-a-token", HL7, LAB)
        .await
        .problem(401);
}

async fn site_users_and_patients_ingest_only_their_own(app: TestApp) {
    app.load_reference_trial().await;
    let subjects = crate::helpers::subjects();
    let diaries: Vec<&str> = DIARY.lines().filter(|l| !l.trim().is_empty()).collect();
    let subject_of = |line: &str| -> String {
        serde_json::from_str::<Value>(line).unwrap()["subject"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let site_of = |subject: &str| -> String {
        subjects
            .iter()
            .find(|s| s.id == subject)
            .unwrap()
            .site
            .clone()
    };
    let first = subject_of(diaries[0]);
    let site = site_of(&first);
    let others = diaries
        .iter()
        .filter(|d| site_of(&subject_of(d)) != site)
        .count();
    assert!(others > 0, "the diary sample has subjects of other sites");
    let admins = ingest(&app, &app.admin, "/ingest/wearable", CSV, WEARABLE).await;

    // A site user: its site's diaries are stored, the others rejected.
    let site_user = app.token("site-user", Some(&site), None).await;
    let id = ingest(&app, &site_user, "/ingest/diary", NDJSON, DIARY).await;
    let status = done(&app, &site_user, &id).await;
    assert_eq!(status["received"], diaries.len() as u64, "{status}");
    assert_eq!(status["rejected"], others as u64, "{status}");
    assert_counts_add_up(&status);
    for r in status["rejections"].as_array().unwrap() {
        let subject = subject_of(diaries[r["index"].as_u64().unwrap() as usize]);
        assert_ne!(site_of(&subject), site, "{r}");
        assert!(r["reason"].as_str().unwrap().contains(&site), "{r}");
    }
    let metrics = app.get("/metrics", &app.admin).await.text;
    assert!(metrics.contains("reason=\"out-of-scope\""), "{metrics}");
    // It sees its own batches only.
    app.get(&format!("/ingest/batches/{admins}"), &site_user)
        .await
        .problem(404);

    // A patient: its own diary only, and diaries only.
    let patient = app.token("patient", None, Some(&first)).await;
    app.post("/ingest/hl7v2", &patient, HL7, LAB)
        .await
        .problem(403);
    app.post("/ingest/wearable", &patient, CSV, WEARABLE)
        .await
        .problem(403);
    let own = ingest(&app, &patient, "/ingest/diary", NDJSON, DIARY).await;
    // The same content as the site user's: another batch (its own scope).
    assert_ne!(own, id);
    let mine = done(&app, &patient, &own).await;
    assert_eq!(mine["received"], diaries.len() as u64, "{mine}");
    assert_eq!(mine["rejected"], diaries.len() as u64 - 1, "{mine}");
    // Its diary was stored by the site user's batch already: a duplicate.
    assert_eq!(mine["duplicates"], 1, "{mine}");
    app.get(&format!("/ingest/batches/{id}"), &patient)
        .await
        .problem(404);
    // Stored once, each diary of the site user's site.
    assert_eq!(
        app.count(&app.admin, "QuestionnaireResponse").await,
        (diaries.len() - others) as u64
    );
}

async fn bad_requests_are_problem_json(app: TestApp) {
    // No trial yet: nothing to check data against.
    app.post("/ingest/hl7v2", &app.admin, HL7, LAB)
        .await
        .problem(409);
    app.load_reference_trial().await;
    app.post("/ingest/hl7v2", &app.admin, "application/json", LAB)
        .await
        .problem(415);
    app.post("/ingest/wearable", &app.admin, HL7, WEARABLE)
        .await
        .problem(415);
    app.post("/ingest/diary", &app.admin, CSV, DIARY)
        .await
        .problem(415);
    app.post("/ingest/hl7v2", &app.admin, HL7, "")
        .await
        .problem(400);
    app.get(
        "/ingest/batches/0190aaaa-0000-7000-8000-000000000000",
        &app.admin,
    )
    .await
    .problem(404);
}

async fn a_full_pipeline_answers_429(app: TestApp) {
    app.load_reference_trial().await;
    // No workers and one place: the first batch takes it and stays there.
    let first = ingest(&app, &app.admin, "/ingest/wearable", CSV, WEARABLE).await;
    let r = app.post("/ingest/hl7v2", &app.admin, HL7, LAB).await;
    let problem = r.problem(429);
    assert!(
        problem["detail"].as_str().unwrap().contains("retry"),
        "{problem}"
    );
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    // The refused body was not stored: only the first batch exists.
    assert_eq!(app.store.unfinished_batches().await.unwrap(), vec![first]);
    // The body limit applies before anything is stored.
    let big = "x".repeat(app.config.body_limit + 1);
    app.post("/ingest/hl7v2", &app.admin, HL7, &big)
        .await
        .expect(413);
}

async fn a_retried_item_is_stored_once_and_the_batch_counts_follow(app: TestApp) {
    app.load_reference_trial().await;
    let (header, subjects) = SUBJECTS_CSV.split_once('\n').expect("a CSV header");
    let late_row = subjects.lines().last().expect("a subject");
    let late = late_row.split(',').next().expect("a subject id");
    let wearable_head = WEARABLE.lines().next().expect("a CSV header");
    let enrolled_row = WEARABLE.lines().nth(1).expect("a row");
    let mut fields: Vec<&str> = enrolled_row.split(',').collect();
    fields[0] = "CARDIO-01-9999";
    let stranger_row = fields.join(",");
    fields[0] = "CARDIO-01-LATE";
    let late_reading = fields.join(",");
    let body = format!("{wearable_head}\n{enrolled_row}\n{stranger_row}\n{late_reading}\n");
    let first = ingest_and_wait(&app, "/ingest/wearable", CSV, &body).await;
    assert_eq!(
        (first["stored"].as_u64(), first["rejected"].as_u64()),
        (Some(1), Some(2))
    );
    let id = first["batch"].as_str().unwrap().to_string();
    let item_of = |status: &Value, index: u64| -> String {
        status["rejections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["index"] == index)
            .and_then(|r| r["item"].as_str())
            .unwrap_or_else(|| panic!("no rejection of item {index}: {status}"))
            .to_string()
    };
    let (stranger, late_item) = (item_of(&first, 1), item_of(&first, 2));
    let observations = app.count(&app.admin, "Observation").await;
    let retry = |item: String| {
        let app = &app;
        async move {
            app.post(&format!("/ingest/items/{item}/retry"), &app.admin, CSV, "")
                .await
        }
    };

    // Still rejected: the counts stay, the reason is given again.
    let r = retry(late_item.clone()).await;
    r.expect(200);
    assert_eq!(r.json()["outcome"], "rejected", "{}", r.json());
    assert!(r.json()["rejections"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("not enrolled"));
    // Roles, unknown items, an item that was not rejected.
    let interface = app.token("interface", None, None).await;
    app.post(
        &format!("/ingest/items/{late_item}/retry"),
        &interface,
        CSV,
        "",
    )
    .await
    .problem(403);
    for bad in [
        format!("{id}.0"),
        format!("{id}.99"),
        "nonsense".into(),
        "x.1".into(),
    ] {
        retry(bad).await.problem(404);
    }

    // Enrolled now: stored once, counted, its rejection gone; the other
    // rejected item is untouched.
    app.post(
        &format!("/trials/{}/subjects", crate::helpers::trial_id()),
        &app.admin,
        "text/csv",
        &format!(
            "{header}\n{}\n",
            late_row.replacen(late, "CARDIO-01-LATE", 1)
        ),
    )
    .await
    .expect(200);
    let r = retry(late_item.clone()).await;
    r.expect(200);
    assert_eq!(r.json()["outcome"], "stored", "{}", r.json());
    assert_eq!(app.count(&app.admin, "Observation").await, observations + 1);
    let after = app
        .get(&format!("/ingest/batches/{id}"), &app.admin)
        .await
        .json();
    assert_eq!(
        (after["stored"].as_u64(), after["rejected"].as_u64()),
        (Some(2), Some(1)),
        "{after}"
    );
    assert_counts_add_up(&after);
    assert_eq!(item_of(&after, 1), stranger);
    assert_eq!(after["rejections"].as_array().unwrap().len(), 1, "{after}");
    // Resolved: a second retry finds nothing to do, and stores nothing.
    retry(late_item).await.problem(404);
    assert_eq!(app.count(&app.admin, "Observation").await, observations + 1);
    // Audited, with what became of the item.
    let records = app
        .store
        .audit_records(clinflow_store::AuditQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let outcomes: Vec<&str> = records
        .iter()
        .filter(|r| r.record.action == "ingest-item-retry")
        .filter_map(|r| r.record.detail.as_deref())
        .collect();
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    assert!(
        outcomes[0].contains("rejected") && outcomes[1].contains("stored"),
        "{outcomes:?}"
    );
}

/// Polls `/metrics` until `sample` of it is `value`, for at most 30 s.
async fn metric_reaches(app: &TestApp, name: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = app.get("/metrics", &app.admin).await.text;
        if sample(&metrics, name) == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {value}: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_slow_stage_shows_as_its_queue_and_a_burst_as_429(app: TestApp) {
    app.load_reference_trial().await;
    // One map worker, no persist worker, one place in each queue: the
    // persist stage is the slow one.
    let persist_queue = "clinflow_ingest_stage_queue_depth{stage=\"persist\"}";
    let map_queue = "clinflow_ingest_stage_queue_depth{stage=\"map\"}";
    let map_busy = "clinflow_ingest_stage_busy{stage=\"map\"}";
    let first = ingest(&app, &app.admin, "/ingest/wearable", CSV, WEARABLE).await;
    // Mapped and handed on: it waits for persist.
    metric_reaches(&app, persist_queue, 1.0).await;
    metric_reaches(&app, map_busy, 0.0).await;
    // The second is mapped and its worker waits to hand it on.
    let second = ingest(&app, &app.admin, "/ingest/hl7v2", HL7, LAB).await;
    metric_reaches(&app, map_queue, 0.0).await;
    metric_reaches(&app, map_busy, 1.0).await;
    // The third waits in the intake queue, and that is full: 429.
    let third_body = format!("{LAB}GARBAGE\n");
    let third = ingest(&app, &app.admin, "/ingest/hl7v2", HL7, &third_body).await;
    metric_reaches(&app, map_queue, 1.0).await;
    let r = app
        .post("/ingest/hl7v2", &app.admin, HL7, &format!("{LAB}MORE\n"))
        .await;
    r.problem(429);
    assert!(r.header("retry-after").is_some());
    let metrics = app.get("/metrics", &app.admin).await.text;
    assert_eq!(sample(&metrics, persist_queue), 1.0, "{metrics}");
    assert_eq!(
        sample(&metrics, "clinflow_ingest_stage_workers{stage=\"persist\"}"),
        0.0
    );
    // Nothing was stored; the accepted batches wait, durable.
    assert_eq!(app.count(&app.admin, "Observation").await, 0);
    let mut waiting = app.store.unfinished_batches().await.unwrap();
    let mut accepted = vec![first, second, third];
    waiting.sort();
    accepted.sort();
    assert_eq!(waiting, accepted);
}

async fn a_graceful_shutdown_drains_the_stages(mut app: TestApp) {
    app.load_reference_trial().await;
    // Batches of 200 readings each, accepted faster than two workers per
    // stage store them (each acceptance is one commit; each batch, 200).
    let batch = |b: usize| {
        let mut csv = String::from("subject,device,time,metric,value,unit\n");
        for i in 0..200 {
            csv.push_str(&format!(
                "CARDIO-01-0001,watch-{b},2026-03-{:02}T{:02}:{:02}:00-05:00,heart-rate,{},/min\n",
                2 + b % 20,
                i / 60,
                i % 60,
                60 + i % 30
            ));
        }
        csv
    };
    let bodies: Vec<String> = (0..24).map(batch).collect();
    let posts = bodies
        .iter()
        .map(|body| ingest(&app, &app.admin, "/ingest/wearable", CSV, body));
    let ids = futures::future::join_all(posts).await;
    // The precondition of this test: work is still queued at the stop.
    let waiting = app.store.unfinished_batches().await.unwrap();
    assert!(!waiting.is_empty(), "every batch was done before the stop");
    app.signal_shutdown();
    app.stopped().await.expect("a clean stop");
    // Drained: every accepted batch was finished before the server stopped.
    assert_eq!(
        app.store.unfinished_batches().await.unwrap(),
        Vec::<String>::new()
    );
    for id in &ids {
        let b = app.store.batch(id).await.unwrap().expect("the batch");
        assert_eq!(b.counts.stored, 200, "{id}");
    }
}

/// A second server on `app`'s database (the first one stopped), with
/// `workers` ingest workers; `app` now talks to it. Returns its stop
/// switch and task.
async fn restart(
    app: &mut TestApp,
    workers: usize,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let store = open_store(&app.db_url).await;
    let mut config = app.config.clone();
    config.ingest_map_workers = workers;
    let restarted = Application::with_store(config, store)
        .await
        .expect("the server builds");
    let addr = restarted.local_addr().expect("an address");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(restarted.run_until_stopped(async move {
        let _ = rx.await;
    }));
    app.base = format!("http://{addr}");
    (tx, server)
}

async fn an_unprocessed_batch_is_processed_after_a_restart(mut app: TestApp) {
    app.load_reference_trial().await;
    // No workers: the batch is accepted (durable) and left processing.
    let id = ingest(&app, &app.admin, "/ingest/hl7v2", HL7, LAB).await;
    let r = app.get(&format!("/ingest/batches/{id}"), &app.admin).await;
    assert_eq!(r.json()["status"], "processing");
    app.signal_shutdown();
    app.stopped().await.expect("a clean stop");

    // The same database, now with workers: the batch is resumed.
    let (stop, server) = restart(&mut app, 2).await;
    let status = done(&app, &app.admin, &id).await;
    Expected::of("/ingest/hl7v2", LAB).check(&status);
    assert_eq!(
        app.count(&app.admin, "Observation").await,
        Expected::of("/ingest/hl7v2", LAB).resources("Observation")
    );
    let _ = stop.send(());
    server
        .await
        .expect("no panic")
        .expect("the restarted server stops cleanly");
}

async fn a_batch_cut_short_is_resumed_without_storing_twice(mut app: TestApp) {
    app.load_reference_trial().await;
    let body = format!("{LAB}GARBAGE\n");
    let id = ingest(&app, &app.admin, "/ingest/hl7v2", HL7, &body).await;
    let first = done(&app, &app.admin, &id).await;
    let expected = Expected::of("/ingest/hl7v2", &body);
    expected.check(&first);
    let observations = app.count(&app.admin, "Observation").await;
    app.signal_shutdown();
    app.stopped().await.expect("a clean stop");
    // As if the server had died after writing the items, before the batch
    // was marked done.
    app.store
        .execute_raw(&format!(
            "DELETE FROM ingest_rejections WHERE batch = '{id}'; \
             UPDATE ingest_batches SET status = 'processing', received = 0, stored = 0, \
             rejected = 0, duplicates = 0, queries_opened = 0 WHERE id = '{id}'"
        ))
        .await
        .expect("the batch is put back");
    let (stop, server) = restart(&mut app, 2).await;
    let again = done(&app, &app.admin, &id).await;
    // The items this batch stored count as stored, not as duplicates.
    expected.check(&again);
    assert_eq!(again, first);
    assert_eq!(app.count(&app.admin, "Observation").await, observations);
    let _ = stop.send(());
    server.await.expect("no panic").expect("a clean stop");
}

async fn a_fhir_bundle_is_stored_with_references_by_identifier_resolved(app: TestApp) {
    app.load_reference_trial().await;
    let bundle = crate::helpers::EVENTS_BUNDLE;
    let entries = serde_json::from_str::<Value>(bundle).unwrap()["entry"]
        .as_array()
        .unwrap()
        .len() as u64;
    let id = ingest(
        &app,
        &app.admin,
        "/ingest/fhir",
        "application/fhir+json",
        bundle,
    )
    .await;
    let status = done(&app, &app.admin, &id).await;
    assert_eq!(status["format"], "fhir-bundle");
    assert_eq!(status["received"], entries, "{status}");
    assert_eq!(status["stored"], entries, "{status}");
    assert_eq!(status["rejected"], 0, "{status}");
    // The subject named by identifier is the enrolled Patient.
    let found = app
        .search(&app.admin, "AdverseEvent", "subject=Patient/CARDIO-01-0006")
        .await;
    let found = crate::helpers::entries(&found);
    assert_eq!(found.len(), 1, "{found:?}");
    let ae = &found[0]["resource"];
    assert_eq!(
        ae["meta"]["source"],
        format!("urn:clinflow:ingest-batch:{id}").as_str()
    );
    let provenance = ae["extension"].as_array().expect("extensions");
    assert!(
        provenance
            .iter()
            .any(|e| e["url"] == clinflow_edc::provenance::PROVENANCE_URL),
        "{ae}"
    );
    // The item key is the identifier, single-valued here.
    assert_eq!(ae["identifier"]["system"], ITEM_KEY);
    let appointments = app
        .search(&app.admin, "Appointment", "actor=Patient/CARDIO-01-0006")
        .await;
    assert_eq!(crate::helpers::entries(&appointments).len(), 1);
    // The same Bundle again is the same batch, stored once.
    let again = ingest(
        &app,
        &app.admin,
        "/ingest/fhir",
        "application/fhir+json",
        bundle,
    )
    .await;
    assert_eq!(again, id);
    assert_eq!(app.count(&app.admin, "AdverseEvent").await, 1);
    // Run again (as a resumed batch is), every entry is found by its item
    // key, the AdverseEvent (whose `identifier` R4 does not index) too.
    app.post(
        &format!("/ingest/batches/{id}/retry"),
        &app.admin,
        "text/csv",
        "",
    )
    .await
    .expect(202);
    let rerun = done(&app, &app.admin, &id).await;
    assert_eq!(rerun["rejected"], 0, "{rerun}");
    assert_eq!(app.count(&app.admin, "AdverseEvent").await, 1, "{rerun}");
    assert_eq!(app.count(&app.admin, "Appointment").await, 1, "{rerun}");
    // Only ingest roles, only FHIR media types.
    let monitor = app.token("monitor", None, None).await;
    app.post("/ingest/fhir", &monitor, "application/fhir+json", bundle)
        .await
        .problem(403);
    app.post("/ingest/fhir", &app.admin, "text/csv", bundle)
        .await
        .problem(415);
}

async fn fhir_ndjson_rejects_an_invalid_line_with_its_element_path(app: TestApp) {
    app.load_reference_trial().await;
    let good = crate::helpers::observation(
        "CARDIO-01-0001",
        "8867-4",
        "2026-03-02T08:00:00-05:00",
        "71",
        "/min",
    );
    let mut bad = good.clone();
    bad["status"] = Value::String("no-such-status".into());
    let unknown = serde_json::json!({
        "resourceType": "AdverseEvent",
        "actuality": "actual",
        "subject": {"identifier": {
            "system": "https://trials.example.org/CARDIO-01/subject",
            "value": "CARDIO-01-9999"
        }}
    });
    let body = format!("{good}\n{bad}\n\n{unknown}\n");
    let id = ingest(
        &app,
        &app.admin,
        "/ingest/fhir",
        "application/fhir+ndjson",
        &body,
    )
    .await;
    let status = done(&app, &app.admin, &id).await;
    assert_eq!(status["format"], "fhir-ndjson");
    assert_eq!(status["received"], 3, "{status}");
    assert_eq!(status["stored"], 1, "{status}");
    assert_eq!(status["rejected"], 2, "{status}");
    let rejections = status["rejections"].as_array().unwrap();
    let invalid = rejections
        .iter()
        .find(|r| r["index"] == 1)
        .expect("line 2 rejected");
    let location = invalid["location"].as_str().unwrap();
    assert!(location.starts_with("line 2"), "{invalid}");
    assert!(location.contains("status"), "the element path: {invalid}");
    assert!(
        invalid["reason"]
            .as_str()
            .unwrap()
            .contains("not valid FHIR"),
        "{invalid}"
    );
    let unresolved = rejections
        .iter()
        .find(|r| r["index"] == 2)
        .expect("line 4 rejected");
    assert_eq!(unresolved["location"], "line 4");
    assert!(
        unresolved["reason"]
            .as_str()
            .unwrap()
            .contains("no Patient has the identifier"),
        "{unresolved}"
    );
    assert_eq!(app.count(&app.admin, "Observation").await, 1);
    assert_eq!(app.count(&app.admin, "AdverseEvent").await, 0);
    // application/x-ndjson is FHIR NDJSON here too.
    let other = format!("{good}\n");
    let id = ingest(
        &app,
        &app.admin,
        "/ingest/fhir",
        "application/x-ndjson",
        &other,
    )
    .await;
    assert_eq!(done(&app, &app.admin, &id).await["stored"], 1);
}

/// Runs `clinflow ingest ARGS...` against the app with `token` (if any) in
/// CLINFLOW_TOKEN and `stdin` on its standard input, off the runtime's
/// threads; returns (exit code, stdout, stderr).
async fn ingest_cli(
    app: &TestApp,
    token: Option<&str>,
    args: &[&str],
    stdin: &str,
) -> (i32, String, String) {
    use std::io::Write;
    let mut cmd = std::process::Command::new(crate::helpers::clinflow_bin());
    cmd.arg("ingest")
        .args(args)
        .arg("--server")
        .arg(app.url(""))
        .env_remove("CLINFLOW_TOKEN")
        .env_remove("CLINFLOW_SERVER")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(t) = token {
        cmd.env("CLINFLOW_TOKEN", t);
    }
    let stdin = stdin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().expect("the clinflow binary runs");
        child
            .stdin
            .take()
            .expect("a stdin pipe")
            .write_all(stdin.as_bytes())
            .expect("writing stdin");
        child.wait_with_output().expect("clinflow ingest finishes")
    })
    .await
    .expect("the blocking task");
    (
        out.status.code().expect("an exit code, not a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The counts of the summary line `N inputs (F failed): R items received,
/// S stored, J rejected, D duplicates, Q data queries opened`.
fn summary(stdout: &str) -> Vec<u64> {
    let line = stdout
        .lines()
        .find(|l| l.contains("items received"))
        .unwrap_or_else(|| panic!("no summary in {stdout}"));
    line.split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().expect("a count"))
        .collect()
}

async fn the_cli_ingests_files_directories_and_stdin(app: TestApp) {
    app.load_reference_trial().await;
    let token = app.token("interface", None, None).await;
    let lab = Expected::of("/ingest/hl7v2", LAB);
    let dir = tempfile::tempdir().expect("a temporary directory");
    // A directory of two CSV files (and a hidden one that is skipped).
    let (head, rows) = WEARABLE.split_once('\n').expect("a CSV header");
    let rows: Vec<&str> = rows.lines().collect();
    let (first, second) = rows.split_at(rows.len() / 2);
    // The second file also has a row for a subject nobody enrolled.
    let mut fields: Vec<&str> = first[0].split(',').collect();
    fields[0] = "NOT-ENROLLED-9999";
    let stranger = fields.join(",");
    let mut second = second.to_vec();
    second.push(&stranger);
    let second = second.as_slice();
    let part = |rows: &[&str]| format!("{head}\n{}\n", rows.join("\n"));
    let csv_dir = dir.path().join("wearables");
    std::fs::create_dir(&csv_dir).unwrap();
    std::fs::write(csv_dir.join("a.csv"), part(first)).unwrap();
    std::fs::write(csv_dir.join("b.csv"), part(second)).unwrap();
    std::fs::write(csv_dir.join(".hidden.csv"), "not,a,wearable,file\n").unwrap();
    let csv = [
        Expected::of("/ingest/wearable", &part(first)),
        Expected::of("/ingest/wearable", &part(second)),
    ];

    // Lab results from stdin: every rejection is listed with its location.
    let (code, out, err) = ingest_cli(&app, Some(&token), &["--format", "hl7v2", "-"], LAB).await;
    let lab_rejected = lab.items.len() as u64 - lab.stored();
    assert_eq!(code, i32::from(lab_rejected > 0), "{out}{err}");
    assert_eq!(
        summary(&out),
        vec![
            1,
            0,
            lab.items.len() as u64,
            lab.stored(),
            lab_rejected,
            0,
            summary_queries(&lab)
        ],
        "{out}"
    );
    assert_rejections_listed(&out, "<stdin>", &lab);
    assert!(err.contains("1/1 inputs"), "no progress on stderr: {err}");

    // A directory: one batch per file, in name order.
    let (code, out, err) = ingest_cli(
        &app,
        Some(&token),
        &["--format", "wearable", csv_dir.to_str().unwrap()],
        "",
    )
    .await;
    let received: u64 = csv.iter().map(|e| e.items.len() as u64).sum();
    let stored: u64 = csv.iter().map(Expected::stored).sum();
    assert_eq!(code, i32::from(received > stored), "{out}{err}");
    assert_eq!(
        summary(&out),
        vec![
            2,
            0,
            received,
            stored,
            received - stored,
            0,
            csv.iter().map(summary_queries).sum()
        ],
        "{out}"
    );
    assert!(err.contains("2/2 inputs"), "{err}");
    assert!(
        received > stored,
        "the sample's invalid rows are part of this test"
    );
    for (file, expected) in ["a.csv", "b.csv"].iter().zip(&csv) {
        let name = csv_dir.join(file).display().to_string();
        assert_rejections_listed(&out, &name, expected);
    }

    // The same lab file again, as a file: acknowledged, stored once.
    let lab_file = dir.path().join("lab.hl7");
    std::fs::write(&lab_file, LAB).unwrap();
    let (_, out, err) = ingest_cli(
        &app,
        Some(&token),
        &["--format", "hl7v2", lab_file.to_str().unwrap()],
        "",
    )
    .await;
    let counts = summary(&out);
    assert_eq!(counts[..3], [1, 0, lab.items.len() as u64], "{out}{err}");

    // A file that does not exist fails before anything is sent.
    let (code, _, err) = ingest_cli(
        &app,
        Some(&token),
        &[
            "--format",
            "diary",
            dir.path().join("missing.ndjson").to_str().unwrap(),
        ],
        "",
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.ndjson"), "{err}");
}

/// Every rejection of `expected` is a line `rejected: NAME item I at
/// LOCATION: REASON` of the output.
#[track_caller]
fn assert_rejections_listed(out: &str, name: &str, expected: &Expected) {
    for r in expected.rejections("-") {
        let line = format!(
            "rejected: {name} item {} at {}: {}",
            r["index"],
            r["location"].as_str().unwrap_or("-"),
            r["reason"].as_str().unwrap_or_default()
        );
        assert!(out.contains(&line), "{line} missing in {out}");
    }
}

fn summary_queries(e: &Expected) -> u64 {
    e.items
        .iter()
        .filter(|i| i.is_stored())
        .map(|i| i.queries.len() as u64)
        .sum()
}

async fn the_cli_says_when_the_server_is_full(app: TestApp) {
    app.load_reference_trial().await;
    let token = app.token("interface", None, None).await;
    // No workers and room for one batch: the first is accepted (and stays
    // processing), the second is refused with 429 and, with no retries
    // allowed, reported as failed.
    let (head, rows) = WEARABLE.split_once('\n').expect("a CSV header");
    let first_row = rows.lines().next().expect("a row");
    ingest(
        &app,
        &token,
        "/ingest/wearable",
        CSV,
        &format!("{head}\n{first_row}\n"),
    )
    .await;
    let (code, out, err) = ingest_cli(
        &app,
        Some(&token),
        &["--format", "wearable", "--max-retries", "0", "-"],
        WEARABLE,
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("failed: <stdin>: the server answered 429"),
        "{out}"
    );
    assert_eq!(summary(&out)[..2], [1, 1], "{out}");
}

async fn the_cli_needs_a_token(app: TestApp) {
    let (code, _, err) = ingest_cli(&app, None, &["--format", "hl7v2", "-"], LAB).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("CLINFLOW_TOKEN"), "{err}");
    // A token the server does not know: the 401 is reported per input.
    let (code, out, _) =
        ingest_cli(&app, Some("not-a-token"), &["--format", "hl7v2", "-"], LAB).await;
    assert_eq!(code, 1);
    assert!(
        out.contains("failed: <stdin>: the server answered 401"),
        "{out}"
    );
}

async fn a_retried_batch_stores_what_now_passes_and_nothing_twice(app: TestApp) {
    app.load_reference_trial().await;
    // A subject in the subjects file, left out of the first enrolment.
    let (header, subjects) = SUBJECTS_CSV.split_once('\n').expect("a CSV header");
    let late_row = subjects.lines().last().expect("a subject");
    let late = late_row
        .split(',')
        .next()
        .expect("a subject id")
        .to_string();
    let wearable_head = WEARABLE.lines().next().expect("a CSV header");
    let enrolled_row = WEARABLE.lines().nth(1).expect("a row");
    let mut fields: Vec<&str> = enrolled_row.split(',').collect();
    let stranger = "CARDIO-01-9999";
    fields[0] = stranger;
    let stranger_row = fields.join(",");
    // The late subject's row: a fresh subject id in the first row's shape.
    let unknown_late = "CARDIO-01-LATE";
    fields[0] = unknown_late;
    let late_reading = fields.join(",");
    let body = format!("{wearable_head}\n{enrolled_row}\n{stranger_row}\n{late_reading}\n");
    let first = ingest_and_wait(&app, "/ingest/wearable", CSV, &body).await;
    assert_eq!(first["stored"], 1, "{first}");
    assert_eq!(first["rejected"], 2, "{first}");
    let id = first["batch"].as_str().unwrap().to_string();
    let observations = app.count(&app.admin, "Observation").await;

    // Roles and unknown batches.
    let interface = app.token("interface", None, None).await;
    app.post(&format!("/ingest/batches/{id}/retry"), &interface, CSV, "")
        .await
        .problem(403);
    app.post("/ingest/batches/no-such-batch/retry", &app.admin, CSV, "")
        .await
        .problem(404);

    // Enrol the late subject (the row of the subjects file, renamed), retry.
    let late_subject = late_row.replacen(&late, unknown_late, 1);
    app.post(
        &format!("/trials/{}/subjects", crate::helpers::trial_id()),
        &app.admin,
        "text/csv",
        &format!("{header}\n{late_subject}\n"),
    )
    .await
    .expect(200);
    let r = app
        .post(&format!("/ingest/batches/{id}/retry"), &app.admin, CSV, "")
        .await;
    r.expect(202);
    assert_eq!(r.json()["batch"], id.as_str());
    let again = done(&app, &app.admin, &id).await;
    assert_eq!(again["received"], 3, "{again}");
    assert_eq!(
        again["stored"], 2,
        "the late subject's row now passes: {again}"
    );
    assert_eq!(again["rejected"], 1, "{again}");
    assert_eq!(again["duplicates"], 0, "{again}");
    assert_counts_add_up(&again);
    let still = again["rejections"].as_array().expect("rejections");
    assert_eq!(still.len(), 1, "{again}");
    assert_eq!(still[0]["index"], 1, "the stranger's row: {again}");
    // One new Observation: the one stored before is not stored twice.
    assert_eq!(app.count(&app.admin, "Observation").await, observations + 1);

    // The retry is in the audit trail, with the counts it replaced.
    let records = app
        .store
        .audit_records(clinflow_store::AuditQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let retry = records
        .iter()
        .find(|r| r.record.action == "ingest-retry")
        .expect("an ingest-retry audit record");
    let detail = retry.record.detail.as_deref().unwrap_or_default();
    assert!(
        detail.contains(&id) && detail.contains("2 rejected"),
        "{detail}"
    );
}

async fn a_batch_still_processing_cannot_be_retried(app: TestApp) {
    app.load_reference_trial().await;
    let id = ingest(&app, &app.admin, "/ingest/wearable", CSV, WEARABLE).await;
    app.post(&format!("/ingest/batches/{id}/retry"), &app.admin, CSV, "")
        .await
        .problem(409);
    // Nor one of its items.
    app.post(&format!("/ingest/items/{id}.0/retry"), &app.admin, CSV, "")
        .await
        .problem(409);
}
