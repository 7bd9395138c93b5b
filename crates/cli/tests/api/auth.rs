//! Authorisation: the role matrix (each role against each kind of endpoint),
//! site scoping for site users and patients (reads, searches, totals and
//! writes), and tokens that no longer work (revoked, expired).

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{
    match_ids, observation, site_ids, subjects, subjects_of, trial_id, Resp, TestApp, FHIR_JSON,
    PROTOCOL_YAML,
};

engine_tests!(
    role_matrix,
    site_user_sees_counts_and_changes_only_its_own_site,
    patient_token_sees_only_its_own_records,
    revoked_token_is_401 with |c| c.token_cache_ttl = std::time::Duration::ZERO,
    a_revoked_token_stops_working_within_the_cache_ttl with |c| c.token_cache_ttl = std::time::Duration::from_millis(300),
    expired_token_is_401,
    clinflow_admin_token_env_is_an_admin_token,
);

const ROLES: [&str; 6] = [
    "admin",
    "data-manager",
    "monitor",
    "site-user",
    "patient",
    "interface",
];

/// A token for each role: the site user at the first subject's site, the
/// patient being the first subject.
async fn role_tokens(app: &TestApp) -> Vec<(&'static str, String)> {
    let first = &subjects()[0];
    let mut out = Vec::new();
    for role in ROLES {
        let token = match role {
            "site-user" => app.token(role, Some(&first.site), None).await,
            "patient" => app.token(role, None, Some(&first.id)).await,
            _ => app.token(role, None, None).await,
        };
        out.push((role, token));
    }
    out
}

/// An Observation of `subject`, created by the admin; returns its id.
async fn obs_for(app: &TestApp, subject: &str) -> String {
    app.create(
        &app.admin,
        &observation(subject, "8480-6", "2026-03-01T08:00:00Z", "120", "mm[Hg]"),
    )
    .await
}

/// What one role may do with one kind of endpoint: `allowed` is the success
/// status, everything else must be 403.
async fn attempt(app: &TestApp, kind: &str, token: &str, subject: &str) -> Resp {
    let obs = observation(subject, "8867-4", "2026-03-02T08:00:00Z", "70", "/min");
    match kind {
        "read" => {
            let id = obs_for(app, subject).await;
            app.get(&format!("/fhir/Observation/{id}"), token).await
        }
        "search" => app.get("/fhir/Observation?code=8480-6", token).await,
        "create" => app.fhir_post("/fhir/Observation", token, &obs).await,
        "update" => {
            let id = obs_for(app, subject).await;
            let mut body = obs.clone();
            body["id"] = json!(id);
            app.put(&format!("/fhir/Observation/{id}"), token, &body)
                .await
        }
        "delete" => {
            let id = obs_for(app, subject).await;
            app.delete(&format!("/fhir/Observation/{id}"), token).await
        }
        "transaction" => {
            let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": obs, "request": {"method": "POST", "url": "Observation"}}
            ]});
            app.fhir_post("/fhir", token, &b).await
        }
        "POST /trials" => {
            app.post("/trials", token, "application/yaml", PROTOCOL_YAML)
                .await
        }
        "GET /trials" => app.get("/trials", token).await,
        "GET /trials/{id}" => app.get(&format!("/trials/{}", trial_id()), token).await,
        "AuditEvent search" => app.get("/fhir/AuditEvent?_count=5", token).await,
        "/audit/export" => app.get("/audit/export", token).await,
        "/metrics" => app.get("/metrics", token).await,
        other => panic!("no endpoint kind {other}"),
    }
}

/// One row of the role matrix: (endpoint kind, whose data, success status,
/// roles allowed, roles that get 404 because the data is outside their
/// scope); every other role gets 403.
type Row<'a> = (&'a str, &'a str, u16, &'a [&'a str], &'a [&'a str]);

async fn role_matrix(app: TestApp) {
    app.load_reference_trial().await;
    let tokens = role_tokens(&app).await;
    // "Own" data is the patient token's own subject, enrolled at the site
    // user's site; "other" data is a subject enrolled at another site.
    let all = subjects();
    let own = all[0].clone();
    let other = all
        .iter()
        .find(|s| s.site != own.site)
        .expect("a subject at another site")
        .clone();
    let all_but_interface: &[&str] = &["admin", "data-manager", "monitor", "site-user", "patient"];
    let all_sites_readers: &[&str] = &["admin", "data-manager", "monitor"];
    let writers: &[&str] = &["admin", "data-manager", "site-user"];
    let all_sites_writers: &[&str] = &["admin", "data-manager"];
    let scoped: &[&str] = &["site-user", "patient"];
    let none: &[&str] = &[];
    let matrix: &[Row] = &[
        ("read", "own", 200, all_but_interface, none),
        ("search", "own", 200, all_but_interface, none),
        ("create", "own", 201, writers, none),
        ("update", "own", 200, writers, none),
        ("delete", "own", 204, writers, none),
        ("transaction", "own", 200, writers, none),
        ("read", "other", 200, all_sites_readers, scoped),
        ("create", "other", 201, all_sites_writers, none),
        ("update", "other", 200, all_sites_writers, none),
        ("transaction", "other", 200, all_sites_writers, none),
        // The reference trial is loaded already: loading it again is a 200.
        ("POST /trials", "-", 200, all_sites_writers, none),
        ("GET /trials", "-", 200, all_but_interface, none),
        ("GET /trials/{id}", "-", 200, all_but_interface, none),
        ("AuditEvent search", "-", 200, &["admin"], none),
        ("/audit/export", "-", 200, &["admin"], none),
        ("/metrics", "-", 200, all_but_interface, none),
    ];
    let mut wrong = Vec::new();
    for (kind, whose, success, allowed, hidden) in matrix {
        let subject = if *whose == "other" {
            &other.id
        } else {
            &own.id
        };
        for (role, token) in &tokens {
            let before = app.count(&app.admin, "Observation").await;
            let r = attempt(&app, kind, token, subject).await;
            let expected = if allowed.contains(role) {
                *success
            } else if hidden.contains(role) {
                404
            } else {
                403
            };
            if r.status != expected {
                wrong.push(format!(
                    "{role} {kind} ({whose} data): {} (expected {expected}): {:.200}",
                    r.status, r.text
                ));
            }
            if r.status == 403 || r.status == 404 {
                // Refusals change nothing (beyond the admin's own set-up).
                let setup = u64::from(matches!(*kind, "read" | "update" | "delete"));
                assert_eq!(
                    app.count(&app.admin, "Observation").await,
                    before + setup,
                    "{role} {kind}"
                );
                let is_fhir = r
                    .header("content-type")
                    .unwrap_or("")
                    .starts_with(FHIR_JSON);
                let j = r.json();
                assert!(
                    if is_fhir {
                        j["resourceType"] == "OperationOutcome"
                    } else {
                        j["status"] == r.status
                    },
                    "{role} {kind}: {}",
                    r.text
                );
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "role matrix mismatches:\n{}",
        wrong.join("\n")
    );
}

async fn site_user_sees_counts_and_changes_only_its_own_site(app: TestApp) {
    app.load_reference_trial().await;
    let sites = site_ids();
    let (own, other) = (&sites[0], &sites[1]);
    let token = app.token("site-user", Some(own), None).await;
    // One Observation per subject, by the admin.
    let mut obs_by_subject = Vec::new();
    for s in subjects() {
        obs_by_subject.push((s.clone(), obs_for(&app, &s.id).await));
    }
    let own_obs: BTreeSet<String> = obs_by_subject
        .iter()
        .filter(|(s, _)| &s.site == own)
        .map(|(_, id)| id.clone())
        .collect();
    let (other_subject, other_obs) = obs_by_subject
        .iter()
        .find(|(s, _)| &s.site == other)
        .map(|(s, id)| (s.id.clone(), id.clone()))
        .expect("a subject at another site");
    let own_subject = subjects_of(own)[0].clone();
    let own_one = obs_by_subject
        .iter()
        .find(|(s, _)| s.id == own_subject)
        .map(|(_, id)| id.clone())
        .expect("an own observation");

    // Reads: own site 200, other site 404 (not even its existence shows).
    app.get(&format!("/fhir/Observation/{own_one}"), &token)
        .await
        .expect(200);
    app.get(&format!("/fhir/Observation/{other_obs}"), &token)
        .await
        .outcome(404);
    app.get(&format!("/fhir/Observation/{other_obs}/_history/1"), &token)
        .await
        .outcome(404);
    app.get(&format!("/fhir/Observation/{other_obs}/_history"), &token)
        .await
        .outcome(404);
    app.get(&format!("/fhir/Patient/{own_subject}"), &token)
        .await
        .expect(200);
    app.get(&format!("/fhir/Patient/{other_subject}"), &token)
        .await
        .outcome(404);

    // Searches and totals count only its own site.
    let found: BTreeSet<String> = app
        .search_ids(&token, "Observation", "_count=2")
        .await
        .into_iter()
        .collect();
    assert_eq!(found, own_obs);
    assert_eq!(app.count(&token, "Observation").await, own_obs.len() as u64);
    let own_subjects: BTreeSet<String> = subjects_of(own).into_iter().collect();
    assert_eq!(
        app.count(&token, "Patient").await,
        own_subjects.len() as u64
    );
    let rs: BTreeSet<String> = app
        .search_ids(&token, "ResearchSubject", "")
        .await
        .into_iter()
        .collect();
    assert_eq!(rs, own_subjects);
    assert!(app
        .search_ids(
            &token,
            "Observation",
            &format!("subject=Patient/{other_subject}")
        )
        .await
        .is_empty());
    assert!(app
        .search_ids(
            &token,
            "Observation",
            &format!("patient={other_subject}&_total=accurate")
        )
        .await
        .is_empty());
    // _include never brings in another site's Patient either.
    let b = app
        .search(
            &token,
            "Observation",
            "_include=Observation:subject&_count=1000",
        )
        .await;
    let included: BTreeSet<String> = crate::helpers::entries(&b)
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .map(|e| e["resource"]["id"].as_str().expect("an id").to_string())
        .collect();
    assert!(included.is_subset(&own_subjects), "{included:?}");
    // Site-independent resources (the study, the sites) are visible.
    app.get(&format!("/fhir/ResearchStudy/{}", trial_id()), &token)
        .await
        .expect(200);

    // Writes: own site allowed, other site refused, nothing changed.
    app.create(
        &token,
        &observation(&own_subject, "8867-4", "2026-03-05T08:00:00Z", "66", "/min"),
    )
    .await;
    let before = app.count(&app.admin, "Observation").await;
    let foreign = observation(
        &other_subject,
        "8867-4",
        "2026-03-05T08:00:00Z",
        "66",
        "/min",
    );
    app.fhir_post("/fhir/Observation", &token, &foreign)
        .await
        .outcome(403);
    // Update: refused (403).
    let mut body = foreign.clone();
    body["id"] = json!(other_obs);
    app.put(&format!("/fhir/Observation/{other_obs}"), &token, &body)
        .await
        .outcome(403);
    // Delete: refused; answered 404 as a read is, so that it does not
    // reveal whether the resource exists.
    app.delete(&format!("/fhir/Observation/{other_obs}"), &token)
        .await
        .outcome(404);
    // Update-as-create of a new id for the other site's subject.
    let mut body = foreign.clone();
    body["id"] = json!("made-up-by-site-user");
    app.put("/fhir/Observation/made-up-by-site-user", &token, &body)
        .await
        .outcome(403);
    // Moving its own Observation to the other site's subject.
    let mut moved = foreign.clone();
    moved["id"] = json!(own_one);
    app.put(&format!("/fhir/Observation/{own_one}"), &token, &moved)
        .await
        .outcome(403);
    // A transaction touching the other site: nothing of it is kept.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": observation(&own_subject, "8867-4", "2026-03-06T08:00:00Z", "60", "/min"),
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": foreign, "request": {"method": "POST", "url": "Observation"}},
    ]});
    app.fhir_post("/fhir", &token, &tx).await.outcome(403);
    // Resources outside any subject (a site, a study) it may not create.
    app.fhir_post(
        "/fhir/Organization",
        &token,
        &json!({"resourceType": "Organization", "name": "x"}),
    )
    .await
    .outcome(403);
    app.fhir_post("/fhir/Patient", &token, &json!({"resourceType": "Patient"}))
        .await
        .outcome(403);
    assert_eq!(app.count(&app.admin, "Observation").await, before);
    assert_eq!(
        app.count(&app.admin, "Organization").await,
        sites.len() as u64
    );
    let r = app
        .get(&format!("/fhir/Observation/{other_obs}"), &app.admin)
        .await;
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    let r = app
        .get(&format!("/fhir/Observation/{own_one}"), &app.admin)
        .await;
    assert_eq!(
        r.json()["subject"]["reference"],
        format!("Patient/{own_subject}")
    );
}

async fn patient_token_sees_only_its_own_records(app: TestApp) {
    app.load_reference_trial().await;
    let all = subjects();
    let (me, someone_else) = (&all[0].id, &all[1].id);
    let token = app.token("patient", None, Some(me)).await;
    let mut mine = BTreeSet::new();
    let mut theirs = Vec::new();
    for s in &all {
        let id = obs_for(&app, &s.id).await;
        if &s.id == me {
            mine.insert(id);
        } else {
            theirs.push(id);
        }
    }
    let found: BTreeSet<String> = app
        .search_ids(&token, "Observation", "")
        .await
        .into_iter()
        .collect();
    assert_eq!(found, mine);
    assert_eq!(app.count(&token, "Observation").await, mine.len() as u64);
    for id in &theirs {
        app.get(&format!("/fhir/Observation/{id}"), &token)
            .await
            .outcome(404);
    }
    for id in &mine {
        app.get(&format!("/fhir/Observation/{id}"), &token)
            .await
            .expect(200);
    }
    app.get(&format!("/fhir/Patient/{me}"), &token)
        .await
        .expect(200);
    app.get(&format!("/fhir/Patient/{someone_else}"), &token)
        .await
        .outcome(404);
    let patients = app.search(&token, "Patient", "").await;
    assert_eq!(match_ids(&patients), vec![me.clone()]);
    assert_eq!(app.count(&token, "Patient").await, 1);
    // A patient changes nothing through the FHIR API.
    let own = observation(me, "8867-4", "2026-03-05T08:00:00Z", "66", "/min");
    app.fhir_post("/fhir/Observation", &token, &own)
        .await
        .outcome(403);
}

/// The id of the token named `name`, from `clinflow token list`.
fn token_id(app: &TestApp, name: &str) -> String {
    let out = app.cli(&["token", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8(out.stdout).expect("UTF-8");
    list.lines()
        .find(|l| l.split('\t').nth(1) == Some(name))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("token {name} in the list:\n{list}"))
        .to_string()
}

/// With the token cache on, a token revoked in the database (by the CLI, a
/// process the server does not hear from) may keep working for at most the
/// cache's TTL, then is refused.
async fn a_revoked_token_stops_working_within_the_cache_ttl(app: TestApp) {
    let name = crate::helpers::unique("cached");
    let token = app.token_named(&name, "monitor", None, None).await;
    app.get("/sites", &token).await.expect(200);
    let id = token_id(&app, &name);
    assert!(app.cli(&["token", "revoke", &id]).status.success());
    let revoked_at = std::time::Instant::now();
    // The TTL is the behaviour under test: waiting it out is the point.
    tokio::time::sleep(app.config.token_cache_ttl).await;
    let r = app.get("/sites", &token).await;
    r.problem(401);
    assert!(revoked_at.elapsed() < app.config.token_cache_ttl * 20);
}

async fn revoked_token_is_401(app: TestApp) {
    let name = crate::helpers::unique("revokee");
    let out = app.cli(&["token", "create", "--role", "monitor", "--name", &name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)
        .expect("UTF-8")
        .trim()
        .to_string();
    app.get("/fhir/Patient", &token).await.expect(200);
    let id = token_id(&app, &name);
    let out = app.cli(&["token", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8(app.cli(&["token", "list"]).stdout).expect("UTF-8");
    assert!(
        list.lines()
            .any(|l| l.starts_with(&id) && l.ends_with("revoked")),
        "{list}"
    );
    let r = app.get("/fhir/Patient", &token).await;
    r.outcome(401);
    assert!(r.header("www-authenticate").is_some());
    app.get("/trials", &token).await.problem(401);
    // Revoking a token that does not exist says so.
    let out = app.cli(&["token", "revoke", "no-such-token-id"]);
    assert!(!out.status.success());
}

async fn expired_token_is_401(app: TestApp) {
    use clinflow_server::auth::{create_token, Role};
    let now = clinflow_store::now_millis();
    let expired = create_token(
        &app.store,
        "expired",
        Role::Monitor,
        None,
        None,
        Some(now - 1),
        "test",
    )
    .await
    .expect("a token");
    let valid = create_token(
        &app.store,
        "valid-for-a-day",
        Role::Monitor,
        None,
        None,
        Some(now + 86_400_000),
        "test",
    )
    .await
    .expect("a token");
    app.get("/fhir/Patient", &expired).await.outcome(401);
    app.get("/fhir/Patient", &valid).await.expect(200);
}

/// Reads lines of a child's stdout until one says where it listens.
fn listening_addr(stdout: std::process::ChildStdout) -> String {
    use std::io::BufRead;
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .expect("the server printed where it listens before exiting")
            .expect("UTF-8");
        if let Some(rest) = line.strip_prefix("clinflow listening on http://") {
            return rest
                .split_whitespace()
                .next()
                .expect("an address")
                .to_string();
        }
    }
}

async fn clinflow_admin_token_env_is_an_admin_token(app: TestApp) {
    // The binary, not the library: the env var is wired through clap.
    let secret = format!("env-admin-{}", uuid::Uuid::new_v4().simple());
    let mut child = std::process::Command::new(crate::helpers::clinflow_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database",
            &app.db_url,
        ])
        .env("CLINFLOW_ADMIN_TOKEN", &secret)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("clinflow serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || listening_addr(stdout))
        .await
        .expect("reading stdout");
    let client = reqwest::Client::new();
    let get = |token: String| {
        client
            .request(Method::GET, format!("http://{addr}/audit/export"))
            .bearer_auth(token)
            .send()
    };
    let ok = get(secret.clone())
        .await
        .expect("an answer")
        .status()
        .as_u16();
    let bad = get(format!("{secret}x"))
        .await
        .expect("an answer")
        .status()
        .as_u16();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        ok, 200,
        "CLINFLOW_ADMIN_TOKEN is accepted as an admin token"
    );
    assert_eq!(bad, 401);
    // The test app's admin token comes the same way (config.admin_token).
    let v: Value = app.get("/audit/verify", &app.admin).await.json();
    assert_eq!(v["intact"], true);
}
