//! The audit trail: what each interaction records, reading it as FHIR
//! `AuditEvent` and as NDJSON, that no endpoint changes it, and that
//! `clinflow audit verify` finds a changed, a removed and an inserted record.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{entries, TestApp, FHIR_JSON};

engine_tests!(
    every_interaction_records_who_what_when_why_outcome_and_where,
    audit_events_are_searchable_by_date_agent_and_entity,
    export_is_ndjson_in_seq_order_with_hashes,
    no_endpoint_changes_the_trail,
    verify_passes_on_an_intact_trail,
    verify_names_a_changed_record,
    verify_names_a_removed_record,
    verify_finds_an_inserted_record,
);

/// Read-audit records are group-committed by design (they ride along the
/// next commit); tests wait for the queue explicitly instead of sleeping.
async fn settled(app: &TestApp) {
    app.store.flush().await.expect("the audit queue commits");
}

/// Every AuditEvent matching `query`, following `next` links.
async fn audit_events(app: &TestApp, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let r = app
        .get(&format!("/fhir/AuditEvent?{query}"), &app.admin)
        .await;
    r.expect(200);
    let mut bundle = r.json();
    loop {
        out.extend(entries(&bundle).into_iter().map(|e| e["resource"].clone()));
        let Some(next) = crate::helpers::next_link(&bundle) else {
            break;
        };
        let r = app.get(&app.relative(&next), &app.admin).await;
        r.expect(200);
        bundle = r.json();
    }
    out
}

/// The NDJSON export, parsed.
async fn export(app: &TestApp) -> Vec<Value> {
    let r = app.get("/audit/export", &app.admin).await;
    r.expect(200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    r.text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect()
}

fn what(ev: &Value) -> Option<&str> {
    ev["entity"][0]["what"]["reference"].as_str()
}

fn action(ev: &Value) -> &str {
    ev["subtype"][0]["code"].as_str().unwrap_or("")
}

async fn every_interaction_records_who_what_when_why_outcome_and_where(app: TestApp) {
    let name = crate::helpers::unique("dm");
    let token = app.token_named(&name, "data-manager", None, None).await;
    let reason = |what: &str| format!("{what}: source document verification");
    let with_reason = |m: Method, path: &str, why: &str| {
        app.request(m, path, &token)
            .header("x-reason", why.to_string())
    };
    // create, read, vread, update, search, history, delete.
    let r = app
        .send(
            with_reason(Method::POST, "/fhir/Patient", &reason("create"))
                .header("content-type", FHIR_JSON)
                .body(json!({"resourceType": "Patient", "gender": "female"}).to_string()),
        )
        .await;
    r.expect(201);
    let id = r.json()["id"].as_str().expect("an id").to_string();
    let path = format!("/fhir/Patient/{id}");
    app.send(with_reason(Method::GET, &path, &reason("read")))
        .await
        .expect(200);
    app.send(with_reason(
        Method::GET,
        &format!("{path}/_history/1"),
        &reason("vread"),
    ))
    .await
    .expect(200);
    app.send(
        with_reason(Method::PUT, &path, &reason("update"))
            .header("content-type", FHIR_JSON)
            .body(json!({"resourceType": "Patient", "id": id, "gender": "male"}).to_string()),
    )
    .await
    .expect(200);
    app.send(with_reason(
        Method::GET,
        &format!("/fhir/Patient?_id={id}"),
        &reason("search"),
    ))
    .await
    .expect(200);
    app.send(with_reason(
        Method::GET,
        &format!("{path}/_history"),
        &reason("history"),
    ))
    .await
    .expect(200);
    app.send(with_reason(Method::DELETE, &path, &reason("delete")))
        .await
        .expect(204);
    // A refused read is audited too, with its outcome.
    app.send(with_reason(Method::GET, &path, &reason("read-gone")))
        .await
        .outcome(410);
    settled(&app).await;

    let events = audit_events(&app, &format!("agent={name}")).await;
    // (action, entity reference, reason, outcome code)
    let expected = [
        (
            "create",
            format!("Patient/{id}/_history/1"),
            reason("create"),
            "0",
        ),
        (
            "read",
            format!("Patient/{id}/_history/1"),
            reason("read"),
            "0",
        ),
        (
            "vread",
            format!("Patient/{id}/_history/1"),
            reason("vread"),
            "0",
        ),
        (
            "update",
            format!("Patient/{id}/_history/2"),
            reason("update"),
            "0",
        ),
        ("search", "Patient".to_string(), reason("search"), "0"),
        ("history", format!("Patient/{id}"), reason("history"), "0"),
        (
            "delete",
            format!("Patient/{id}/_history/3"),
            reason("delete"),
            "0",
        ),
        (
            "read",
            format!("Patient/{id}/_history/3"),
            reason("read-gone"),
            "4",
        ),
    ];
    let start = clinflow_store::now_millis() - 3_600_000;
    for (act, entity, why, outcome) in &expected {
        let ev = events
            .iter()
            .find(|e| action(e) == *act && e["purposeOfEvent"][0]["text"] == why.as_str())
            .unwrap_or_else(|| panic!("an AuditEvent for {act} ({why}) among {events:#?}"));
        assert_eq!(ev["resourceType"], "AuditEvent");
        let agent = &ev["agent"][0];
        assert_eq!(agent["who"]["display"], name.as_str(), "who: {ev}");
        assert_eq!(agent["role"][0]["text"], "data-manager", "role: {ev}");
        assert_eq!(
            agent["network"]["address"], "127.0.0.1",
            "client address: {ev}"
        );
        assert_eq!(what(ev), Some(entity.as_str()), "what: {ev}");
        assert_eq!(ev["outcome"], *outcome, "outcome: {ev}");
        let recorded = ev["recorded"].as_str().expect("recorded");
        assert!(recorded.ends_with('Z'), "UTC: {recorded}");
        let range = clinflow_fhir::datetime::parse_range(recorded).expect("an instant");
        assert!(
            range.low >= start && range.low <= clinflow_store::now_millis(),
            "{recorded}"
        );
    }
    // The search's record says what it returned.
    let search = events
        .iter()
        .find(|e| action(e) == "search")
        .expect("a search event");
    assert!(
        search["entity"][0]["description"]
            .as_str()
            .unwrap_or("")
            .contains(&id),
        "{search}"
    );
    // In the trail's order (commit order: on PostgreSQL, records committed
    // concurrently by different writers may be a millisecond out of time
    // order, so the order checked is the chain's).
    let seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| e["id"].as_str().and_then(|i| i.parse().ok()))
        .collect();
    assert_eq!(seqs.len(), events.len());
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

async fn audit_events_are_searchable_by_date_agent_and_entity(app: TestApp) {
    let (a_name, b_name) = (crate::helpers::unique("a"), crate::helpers::unique("b"));
    let a = app.token_named(&a_name, "data-manager", None, None).await;
    let b = app.token_named(&b_name, "monitor", None, None).await;
    let p1 = app.create(&a, &json!({"resourceType": "Patient"})).await;
    let p2 = app.create(&a, &json!({"resourceType": "Patient"})).await;
    for _ in 0..3 {
        app.get(&format!("/fhir/Patient/{p1}"), &b)
            .await
            .expect(200);
    }
    app.get(&format!("/fhir/Patient/{p2}"), &b)
        .await
        .expect(200);
    settled(&app).await;
    let all = export(&app).await;
    let seqs = |evs: &[Value]| -> BTreeSet<String> {
        evs.iter()
            .map(|e| e["id"].as_str().expect("an id").to_string())
            .collect()
    };
    let expect = |keep: &dyn Fn(&Value) -> bool| -> BTreeSet<String> {
        all.iter()
            .filter(|r| keep(r))
            .map(|r| r["seq"].to_string())
            .collect()
    };
    // agent.
    for name in [&a_name, &b_name] {
        let found = audit_events(&app, &format!("agent={name}&_count=2")).await;
        let want = expect(&|r| r["actor"] == name.as_str());
        assert!(!want.is_empty());
        assert_eq!(seqs(&found), want, "agent={name}");
    }
    // entity: a resource (every version), and a type.
    for p in [&p1, &p2] {
        let found = audit_events(&app, &format!("entity=Patient/{p}")).await;
        let want = expect(&|r| r["resource_type"] == "Patient" && r["resource_id"] == p.as_str());
        assert!(!want.is_empty());
        assert_eq!(seqs(&found), want, "entity=Patient/{p}");
    }
    let found = audit_events(&app, "entity=Patient&_count=3").await;
    assert_eq!(seqs(&found), expect(&|r| r["resource_type"] == "Patient"));
    // date: around the time of a record in the middle.
    let mid = &all[all.len() / 2];
    let t = mid["time"].as_str().expect("a time");
    for (prefix, keep) in [
        (
            "ge",
            Box::new(|r: &Value| r["time"].as_str() >= Some(t)) as Box<dyn Fn(&Value) -> bool>,
        ),
        ("le", Box::new(|r: &Value| r["time"].as_str() <= Some(t))),
        ("eq", Box::new(|r: &Value| r["time"].as_str() == Some(t))),
    ] {
        let found = audit_events(&app, &format!("date={prefix}{}", t.replace(':', "%3A"))).await;
        assert_eq!(seqs(&found), expect(&keep), "date={prefix}{t}");
    }
    let day = &t[..10];
    assert_eq!(
        seqs(&audit_events(&app, &format!("date={day}")).await),
        expect(&|r| r["time"].as_str().is_some_and(|x| x.starts_with(day)))
    );
    // Combined: AND.
    let found = audit_events(&app, &format!("agent={b_name}&entity=Patient/{p1}")).await;
    let want = expect(&|r| r["actor"] == b_name.as_str() && r["resource_id"] == p1.as_str());
    assert_eq!(want.len(), 3);
    assert_eq!(seqs(&found), want);
    // Unknown parameters are refused.
    app.get("/fhir/AuditEvent?colour=red", &app.admin)
        .await
        .outcome(400);
    // Single AuditEvents can be read by id.
    let r = app
        .get(&format!("/fhir/AuditEvent/{}", mid["seq"]), &app.admin)
        .await;
    r.expect(200);
    assert_eq!(r.json()["id"], mid["seq"].to_string());
}

async fn export_is_ndjson_in_seq_order_with_hashes(app: TestApp) {
    app.load_reference_trial().await;
    app.get("/fhir/Patient", &app.admin).await.expect(200);
    settled(&app).await;
    let records = export(&app).await;
    assert!(!records.is_empty());
    let mut prev_hash = clinflow_store::audit::GENESIS.to_string();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(
            r["seq"].as_u64(),
            Some(i as u64 + 1),
            "in seq order without gaps"
        );
        assert_eq!(
            r["prev_hash"],
            prev_hash.as_str(),
            "chained at seq {}",
            i + 1
        );
        let hash = r["hash"].as_str().expect("a hash");
        assert_eq!(hash.len(), 64);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        prev_hash = hash.to_string();
    }
    // The trial load and the search are in it.
    assert!(records.iter().any(|r| r["action"] == "trial-load"));
    assert!(records
        .iter()
        .any(|r| r["action"] == "search" && r["resource_type"] == "Patient"));
    // `since` keeps the order and the records at or after the time.
    let t = records[records.len() / 2]["time"]
        .as_str()
        .expect("a time")
        .to_string();
    let r = app
        .get(
            &format!("/audit/export?since={}", t.replace(':', "%3A")),
            &app.admin,
        )
        .await;
    r.expect(200);
    let since: Vec<u64> = r
        .text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("JSON")["seq"]
                .as_u64()
                .expect("a seq")
        })
        .collect();
    let want: Vec<u64> = records
        .iter()
        .filter(|r| r["time"].as_str() >= Some(t.as_str()))
        .map(|r| r["seq"].as_u64().expect("a seq"))
        .collect();
    assert_eq!(since, want);
}

async fn no_endpoint_changes_the_trail(app: TestApp) {
    app.get("/fhir/Patient", &app.admin).await.expect(200);
    settled(&app).await;
    let before = app.get("/audit/export", &app.admin).await.text;
    let first = "1";
    let forged = json!({
        "resourceType": "AuditEvent",
        "id": first,
        "type": {"code": "rest"},
        "recorded": "2026-01-01T00:00:00Z",
        "agent": [{"requestor": true}],
        "source": {"observer": {"display": "x"}},
    });
    app.fhir_post("/fhir/AuditEvent", &app.admin, &forged)
        .await
        .outcome(405);
    app.put(&format!("/fhir/AuditEvent/{first}"), &app.admin, &forged)
        .await
        .outcome(405);
    app.delete(&format!("/fhir/AuditEvent/{first}"), &app.admin)
        .await
        .outcome(405);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": forged, "request": {"method": "PUT", "url": format!("AuditEvent/{first}")}}
    ]});
    app.fhir_post("/fhir", &app.admin, &tx).await.outcome(405);
    for m in [Method::POST, Method::PUT, Method::DELETE] {
        let r = app
            .send(app.request(m.clone(), "/audit/export", &app.admin))
            .await;
        assert_eq!(r.status, 405, "{m} /audit/export");
    }
    settled(&app).await;
    assert_eq!(app.get("/audit/export", &app.admin).await.text, before);
    // The database itself refuses changes while its triggers stand.
    assert!(app
        .store
        .execute_raw("UPDATE audit_log SET actor = 'mallory'")
        .await
        .is_err());
    assert!(app
        .store
        .execute_raw("DELETE FROM audit_log")
        .await
        .is_err());
    assert_eq!(app.get("/audit/export", &app.admin).await.text, before);
}

/// `clinflow audit verify` on the app's database: (exit code, stdout).
fn verify(app: &TestApp) -> (i32, String) {
    let out = app.cli(&["audit", "verify"]);
    (
        out.status.code().expect("an exit code"),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Leaves a trail of a few dozen records and returns it, settled.
async fn some_history(app: &TestApp) -> Vec<Value> {
    app.load_reference_trial().await;
    for _ in 0..5 {
        app.get("/fhir/Patient?_count=2", &app.admin)
            .await
            .expect(200);
    }
    settled(app).await;
    export(app).await
}

async fn verify_passes_on_an_intact_trail(app: TestApp) {
    let records = some_history(&app).await;
    let (code, out) = verify(&app);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&records.len().to_string()),
        "says how many: {out}"
    );
    let v = app.get("/audit/verify", &app.admin).await.json();
    assert_eq!(v["intact"], true);
    assert_eq!(v["records"].as_u64(), Some(records.len() as u64));
}

async fn verify_names_a_changed_record(app: TestApp) {
    let records = some_history(&app).await;
    let seq = records[records.len() / 2]["seq"].as_u64().expect("a seq");
    app.store
        .execute_raw(app.drop_audit_triggers_sql())
        .await
        .expect("the attacker drops the triggers");
    app.store
        .execute_raw(&format!(
            "UPDATE audit_log SET actor = 'mallory' WHERE seq = {seq}"
        ))
        .await
        .expect("the attacker changes a record");
    let (code, out) = verify(&app);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("record {seq} ")),
        "names record {seq}: {out}"
    );
    let v = app.get("/audit/verify", &app.admin).await.json();
    assert_eq!(v["intact"], false);
}

async fn verify_names_a_removed_record(app: TestApp) {
    let records = some_history(&app).await;
    let seq = records[records.len() / 2]["seq"].as_u64().expect("a seq");
    app.store
        .execute_raw(app.drop_audit_triggers_sql())
        .await
        .expect("the attacker drops the triggers");
    app.store
        .execute_raw(&format!("DELETE FROM audit_log WHERE seq = {seq}"))
        .await
        .expect("the attacker removes a record");
    let (code, out) = verify(&app);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("after {} comes {}", seq - 1, seq + 1)),
        "names the gap at {seq}: {out}"
    );
    // Removing the newest record is found too.
    let last = records.last().expect("a record")["seq"]
        .as_u64()
        .expect("a seq");
    app.store
        .execute_raw(&format!("DELETE FROM audit_log WHERE seq = {last}"))
        .await
        .expect("the attacker removes the newest record");
    let (code, _) = verify(&app);
    assert_eq!(code, 1);
}

async fn verify_finds_an_inserted_record(app: TestApp) {
    let records = some_history(&app).await;
    let at = records.len() / 2;
    let seq = records[at]["seq"].as_i64().expect("a seq");
    let prev_hash = records[at - 1]["hash"]
        .as_str()
        .expect("a hash")
        .to_string();
    // A well-formed forgery: the attacker knows the hash algorithm and
    // chains the record correctly after its predecessor.
    let forged = clinflow_store::AuditRecord {
        time: clinflow_store::now_millis(),
        actor: "mallory".into(),
        role: "admin".into(),
        action: "read".into(),
        outcome: "success".into(),
        ..Default::default()
    };
    let hash = clinflow_store::audit::hash(seq, &prev_hash, &forged);
    app.store
        .execute_raw(app.drop_audit_triggers_sql())
        .await
        .expect("the attacker drops the triggers");
    // Make room at `seq` (via negative numbers, so that no two rows ever
    // share a key), then slip the forged record in.
    app.store
        .execute_raw(&format!(
            "UPDATE audit_log SET seq = -seq WHERE seq >= {seq}; \
             UPDATE audit_log SET seq = -seq + 1 WHERE seq < 0; \
             INSERT INTO audit_log (seq, time, actor, role, action, outcome, prev_hash, hash) \
             VALUES ({seq}, {}, 'mallory', 'admin', 'read', 'success', '{prev_hash}', '{hash}')",
            forged.time
        ))
        .await
        .expect("the attacker inserts a record");
    let (code, out) = verify(&app);
    assert_eq!(code, 1, "{out}");
    // The forged record itself checks out; the one after it no longer does.
    assert!(
        out.contains(&format!("record {} ", seq + 1)),
        "names record {}: {out}",
        seq + 1
    );
}
