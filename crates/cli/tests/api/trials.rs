//! Trial set-up through `/trials`: the protocol (YAML or JSON) and its
//! subjects become FHIR resources; loads are idempotent; amendments keep
//! every version; bad input is refused with where and why.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::helpers::{protocol, subjects, trial_id, TestApp, PROTOCOL_YAML, SUBJECTS_CSV};

engine_tests!(
    a_protocol_creates_the_study_its_sites_and_questionnaires,
    subjects_become_patients_and_research_subjects,
    loading_the_same_files_twice_changes_nothing,
    a_new_version_amends_and_keeps_the_old_one,
    the_same_version_with_other_content_is_409,
    a_malformed_protocol_is_422_naming_line_and_key,
    the_json_form_is_the_same_protocol,
    bad_requests_are_problem_json,
);

/// The protocol text with its `key:` line (top level) replaced by `line`.
fn with_line(key: &str, line: &str) -> String {
    let mut done = false;
    let out: Vec<String> = PROTOCOL_YAML
        .lines()
        .map(|l| {
            if !done && l.starts_with(&format!("{key}:")) {
                done = true;
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    assert!(done, "the protocol has a top-level {key}");
    out.join("\n") + "\n"
}

async fn post_protocol(app: &TestApp, yaml: &str) -> crate::helpers::Resp {
    app.post("/trials", &app.admin, "application/yaml", yaml)
        .await
}

async fn post_subjects(app: &TestApp) -> crate::helpers::Resp {
    app.post(
        &format!("/trials/{}/subjects", trial_id()),
        &app.admin,
        "text/csv",
        SUBJECTS_CSV,
    )
    .await
}

fn questionnaire_ids() -> BTreeSet<String> {
    let p = protocol();
    p.questionnaires
        .iter()
        .map(|q| clinflow_protocol::fhir::questionnaire_id(&p, q))
        .collect()
}

async fn a_protocol_creates_the_study_its_sites_and_questionnaires(app: TestApp) {
    let p = protocol();
    let trial = trial_id();
    let r = post_protocol(&app, PROTOCOL_YAML).await;
    r.expect(201);
    let report = r.json();
    assert_eq!(report["trial"], trial.as_str());
    assert_eq!(report["version"], p.version);
    assert_eq!(report["new_version"], true);
    assert_eq!(
        report["created"].as_u64(),
        Some((1 + p.sites.len() + p.questionnaires.len()) as u64)
    );
    let study = app
        .get(&format!("/fhir/ResearchStudy/{trial}"), &app.admin)
        .await;
    study.expect(200);
    assert_eq!(study.header("etag"), Some("W/\"1\""));
    assert_eq!(study.json()["title"], p.title.as_str());
    let sites: BTreeSet<String> = p.sites.iter().map(|s| s.id.as_str().to_string()).collect();
    let orgs: BTreeSet<String> = app
        .search_ids(&app.admin, "Organization", "")
        .await
        .into_iter()
        .collect();
    assert_eq!(orgs, sites);
    for site in &p.sites {
        let org = app
            .get(
                &format!("/fhir/Organization/{}", site.id.as_str()),
                &app.admin,
            )
            .await
            .json();
        assert_eq!(org["name"], site.name.as_str());
        assert_eq!(org["address"][0]["country"], site.country.as_str());
    }
    let qs: BTreeSet<String> = app
        .search_ids(&app.admin, "Questionnaire", "")
        .await
        .into_iter()
        .collect();
    assert_eq!(qs, questionnaire_ids());
    for (q, id) in p.questionnaires.iter().zip(questionnaire_ids()) {
        let body = app
            .get(&format!("/fhir/Questionnaire/{id}"), &app.admin)
            .await
            .json();
        assert_eq!(body["item"].as_array().map(Vec::len), Some(q.items.len()));
    }
    // Listed by the trial API.
    let list = app.get("/trials", &app.admin).await;
    list.expect(200);
    let list = list.json();
    assert_eq!(list["items"][0]["id"], trial.as_str());
    assert_eq!(list["items"][0]["version"], p.version);
    assert!(list["next"].is_null());
}

async fn subjects_become_patients_and_research_subjects(app: TestApp) {
    let p = protocol();
    post_protocol(&app, PROTOCOL_YAML).await.expect(201);
    let r = post_subjects(&app).await;
    r.expect(200);
    let rows = subjects();
    assert_eq!(r.json()["created"].as_u64(), Some(2 * rows.len() as u64));
    assert_eq!(app.count(&app.admin, "Patient").await, rows.len() as u64);
    assert_eq!(
        app.count(&app.admin, "ResearchSubject").await,
        rows.len() as u64
    );
    for row in &rows {
        let patient = app
            .get(&format!("/fhir/Patient/{}", row.id), &app.admin)
            .await;
        patient.expect(200);
        let patient = patient.json();
        assert_eq!(
            patient["identifier"][0]["system"],
            p.subject_identifier_system.as_str()
        );
        assert_eq!(patient["identifier"][0]["value"], row.id.as_str());
        let rs = app
            .get(&format!("/fhir/ResearchSubject/{}", row.id), &app.admin)
            .await
            .json();
        assert_eq!(rs["individual"]["reference"], format!("Patient/{}", row.id));
        assert_eq!(
            rs["study"]["reference"],
            format!("ResearchStudy/{}", trial_id())
        );
        assert!(
            rs.to_string()
                .contains(&format!("Organization/{}", row.site)),
            "the site is recorded: {rs}"
        );
    }
}

async fn loading_the_same_files_twice_changes_nothing(app: TestApp) {
    app.load_reference_trial().await;
    let trial = trial_id();
    let before_study = app
        .get(&format!("/fhir/ResearchStudy/{trial}"), &app.admin)
        .await;
    let before_patients = app.count(&app.admin, "Patient").await;
    let r = post_protocol(&app, PROTOCOL_YAML).await;
    r.expect(200);
    let report = r.json();
    assert_eq!(report["new_version"], false);
    assert_eq!(report["created"], 0);
    assert_eq!(report["updated"], 0);
    let r = post_subjects(&app).await;
    r.expect(200);
    let report = r.json();
    assert_eq!(report["created"], 0);
    assert_eq!(report["updated"], 0);
    let p = protocol();
    assert_eq!(
        report["unchanged"].as_u64(),
        Some((1 + p.sites.len() + p.questionnaires.len() + 2 * subjects().len()) as u64)
    );
    let study = app
        .get(&format!("/fhir/ResearchStudy/{trial}"), &app.admin)
        .await;
    assert_eq!(study.header("etag"), Some("W/\"1\""));
    assert_eq!(study.text, before_study.text);
    assert_eq!(app.count(&app.admin, "Patient").await, before_patients);
    for row in subjects() {
        let r = app
            .get(&format!("/fhir/Patient/{}", row.id), &app.admin)
            .await;
        assert_eq!(r.header("etag"), Some("W/\"1\""));
    }
    let t = app
        .get(&format!("/trials/{trial}"), &app.admin)
        .await
        .json();
    assert_eq!(t["versions"].as_array().map(Vec::len), Some(1));
}

async fn a_new_version_amends_and_keeps_the_old_one(app: TestApp) {
    app.load_reference_trial().await;
    let p = protocol();
    let trial = trial_id();
    let new_version = p.version + 1;
    let new_title = format!("{} (amendment {new_version})", p.title);
    let amended = with_line("version", &format!("version: {new_version}"));
    let amended = amended.replacen(
        &format!("title: {}", p.title),
        &format!("title: {new_title}"),
        1,
    );
    let r = post_protocol(&app, &amended).await;
    r.expect(201);
    let report = r.json();
    assert_eq!(report["version"], new_version);
    assert_eq!(report["new_version"], true);
    assert!(report["updated"].as_u64() >= Some(1), "{report}");
    let t = app.get(&format!("/trials/{trial}"), &app.admin).await;
    t.expect(200);
    let t = t.json();
    assert_eq!(t["version"], new_version);
    let versions: BTreeSet<u64> = t["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .map(|v| v["version"].as_u64().expect("a number"))
        .collect();
    assert_eq!(
        versions,
        BTreeSet::from([u64::from(p.version), u64::from(new_version)])
    );
    let study = app
        .get(&format!("/fhir/ResearchStudy/{trial}"), &app.admin)
        .await;
    assert_eq!(study.header("etag"), Some("W/\"2\""));
    assert_eq!(study.json()["title"], new_title.as_str());
    // The old version is still there.
    let v1 = app
        .get(
            &format!("/fhir/ResearchStudy/{trial}/_history/1"),
            &app.admin,
        )
        .await
        .json();
    assert_eq!(v1["title"], p.title.as_str());
    // Going back to an older version is refused.
    post_protocol(&app, PROTOCOL_YAML).await.problem(409);
}

async fn the_same_version_with_other_content_is_409(app: TestApp) {
    app.load_reference_trial().await;
    let p = protocol();
    let trial = trial_id();
    let changed = PROTOCOL_YAML.replacen(
        &format!("title: {}", p.title),
        &format!("title: {} (edited)", p.title),
        1,
    );
    assert_ne!(changed, PROTOCOL_YAML);
    let problem = post_protocol(&app, &changed).await.problem(409);
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("version"),
        "{problem}"
    );
    let study = app
        .get(&format!("/fhir/ResearchStudy/{trial}"), &app.admin)
        .await;
    assert_eq!(study.header("etag"), Some("W/\"1\""));
    assert_eq!(study.json()["title"], p.title.as_str());
}

async fn a_malformed_protocol_is_422_naming_line_and_key(app: TestApp) {
    // A phase that does not exist, on the `phase` line.
    let bad = with_line("phase", "phase: phase-9");
    let line = bad
        .lines()
        .position(|l| l.starts_with("phase:"))
        .expect("the line")
        + 1;
    let problem = post_protocol(&app, &bad).await.problem(422);
    let detail = problem["detail"].as_str().expect("a detail");
    assert!(detail.contains(&format!("line {line}")), "{detail}");
    assert!(detail.contains("phase"), "{detail}");
    // A hard range of the wrong type, inside a list.
    let bad = PROTOCOL_YAML.replacen("hard: [40, 300]", "hard: [forty, 300]", 1);
    let line = bad
        .lines()
        .position(|l| l.contains("hard: [forty"))
        .expect("the line")
        + 1;
    let problem = post_protocol(&app, &bad).await.problem(422);
    let detail = problem["detail"].as_str().expect("a detail");
    assert!(detail.contains(&format!("line {line}")), "{detail}");
    assert!(detail.contains("measurements[0].hard"), "{detail}");
    // A missing required key.
    let bad: String = PROTOCOL_YAML
        .lines()
        .filter(|l| !l.starts_with("title:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let problem = post_protocol(&app, &bad).await.problem(422);
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("title"),
        "{problem}"
    );
    // Nothing was created.
    assert_eq!(app.count(&app.admin, "ResearchStudy").await, 0);
    app.get(&format!("/trials/{}", trial_id()), &app.admin)
        .await
        .problem(404);
}

async fn the_json_form_is_the_same_protocol(app: TestApp) {
    let json_form = protocol().to_json();
    let parsed: Value = serde_json::from_str(&json_form).expect("JSON");
    assert_eq!(parsed["id"], trial_id().as_str());
    let r = app
        .post("/trials", &app.admin, "application/json", &json_form)
        .await;
    r.expect(201);
    // The YAML it came from is the same protocol: nothing changes, no 409.
    let r = post_protocol(&app, PROTOCOL_YAML).await;
    r.expect(200);
    let report = r.json();
    assert_eq!(report["new_version"], false);
    assert_eq!(report["created"], 0);
    assert_eq!(report["updated"], 0);
    // Malformed JSON names its line too.
    let problem = app
        .post(
            "/trials",
            &app.admin,
            "application/json",
            "{\n\"id\": \"X\",\n\"version\": }",
        )
        .await
        .problem(422);
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("line 3"),
        "{problem}"
    );
}

async fn bad_requests_are_problem_json(app: TestApp) {
    app.post("/trials", &app.admin, "text/plain", PROTOCOL_YAML)
        .await
        .problem(415);
    // Subjects of a trial that is not loaded.
    app.post(
        "/trials/NO-SUCH-TRIAL/subjects",
        &app.admin,
        "text/csv",
        SUBJECTS_CSV,
    )
    .await
    .problem(404);
    app.get("/trials/NO-SUCH-TRIAL", &app.admin)
        .await
        .problem(404);
    // A subject at a site the protocol does not have.
    post_protocol(&app, PROTOCOL_YAML).await.expect(201);
    let header = SUBJECTS_CSV.lines().next().expect("a header");
    let first = SUBJECTS_CSV.lines().nth(1).expect("a row");
    let site = &subjects()[0].site;
    let bad = format!(
        "{header}\n{}\n",
        first.replacen(site.as_str(), "site-999", 1)
    );
    let problem = app
        .post(
            &format!("/trials/{}/subjects", trial_id()),
            &app.admin,
            "text/csv",
            &bad,
        )
        .await
        .problem(422);
    assert!(
        problem["detail"].as_str().unwrap_or("").contains("site"),
        "{problem}"
    );
    assert_eq!(app.count(&app.admin, "Patient").await, 0);
}
