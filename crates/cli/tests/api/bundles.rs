//! `POST /fhir` with transaction and batch Bundles.

use serde_json::{json, Value};

use crate::helpers::{entries, protocol, TestApp, EVENTS_BUNDLE};

engine_tests!(
    transaction_rewrites_urn_uuid_references_to_the_new_ids,
    references_by_identifier_resolve_to_the_trial_patient,
    one_invalid_entry_fails_the_whole_transaction,
    an_identifier_matching_no_patient_is_422,
    batch_reports_every_entry_and_keeps_the_good_ones,
    bundles_above_the_entry_cap_are_413 with |c| c.max_bundle_entries = 3,
);

fn post_entry(full_url: Option<&str>, resource: Value) -> Value {
    let rtype = resource["resourceType"].clone();
    let mut e = json!({"resource": resource, "request": {"method": "POST", "url": rtype}});
    if let Some(u) = full_url {
        e["fullUrl"] = json!(u);
    }
    e
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

fn obs_of(subject_ref: &str, code: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject_ref},
        "effectiveDateTime": "2026-03-01T08:00:00Z",
        "valueQuantity": {"value": 120, "unit": "mm[Hg]", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
    })
}

/// `Type/id` of a transaction-response entry's `location`.
fn location_of(entry: &Value) -> (String, String) {
    let loc = entry["response"]["location"].as_str().expect("a location");
    let mut parts = loc.trim_start_matches('/').split('/');
    let rtype = parts.next().expect("a type").to_string();
    let id = parts.next().expect("an id").to_string();
    (rtype, id)
}

/// How many resources of each type the admin sees.
async fn counts(app: &TestApp, types: &[&str]) -> Vec<u64> {
    let mut out = Vec::new();
    for t in types {
        out.push(app.count(&app.admin, t).await);
    }
    out
}

async fn transaction_rewrites_urn_uuid_references_to_the_new_ids(app: TestApp) {
    let patient_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let codes = ["8480-6", "8462-4"];
    let mut list = vec![post_entry(
        Some(&patient_url),
        json!({"resourceType": "Patient", "name": [{"family": "Transaction"}]}),
    )];
    for code in codes {
        list.push(post_entry(
            Some(&format!("urn:uuid:{}", uuid::Uuid::new_v4())),
            obs_of(&patient_url, code),
        ));
    }
    let r = app
        .fhir_post("/fhir", &app.admin, &bundle("transaction", list))
        .await;
    r.expect(200);
    let resp = r.json();
    assert_eq!(resp["type"], "transaction-response");
    let results = entries(&resp);
    assert_eq!(results.len(), codes.len() + 1);
    for e in &results {
        assert!(
            e["response"]["status"]
                .as_str()
                .unwrap_or("")
                .starts_with("201"),
            "{e}"
        );
        assert_eq!(e["response"]["etag"], "W/\"1\"");
    }
    let (ptype, pid) = location_of(&results[0]);
    assert_eq!(ptype, "Patient");
    app.get(&format!("/fhir/Patient/{pid}"), &app.admin)
        .await
        .expect(200);
    for (e, code) in results[1..].iter().zip(codes) {
        let (otype, oid) = location_of(e);
        assert_eq!(otype, "Observation");
        let o = app
            .get(&format!("/fhir/Observation/{oid}"), &app.admin)
            .await
            .json();
        assert_eq!(o["subject"]["reference"], format!("Patient/{pid}"));
        assert_eq!(o["code"]["coding"][0]["code"], code);
    }
    // And the index knows it.
    let found = app
        .search_ids(&app.admin, "Observation", &format!("subject=Patient/{pid}"))
        .await;
    assert_eq!(found.len(), codes.len());
}

async fn references_by_identifier_resolve_to_the_trial_patient(app: TestApp) {
    app.load_reference_trial().await;
    let sample: Value = serde_json::from_str(EVENTS_BUNDLE).expect("the sample parses");
    // The sample points at its subject by identifier; a trial Patient's id
    // is its subject id, which is the identifier's value.
    let ident = &sample["entry"][0]["resource"]["subject"]["identifier"];
    assert_eq!(
        ident["system"],
        protocol().subject_identifier_system.as_str()
    );
    let subject = ident["value"].as_str().expect("a subject id");
    let r = app
        .post("/fhir", &app.admin, "application/fhir+json", EVENTS_BUNDLE)
        .await;
    r.expect(200);
    let results = entries(&r.json());
    assert_eq!(
        results.len(),
        sample["entry"].as_array().expect("entries").len()
    );
    let (t, ae_id) = location_of(&results[0]);
    assert_eq!(t, "AdverseEvent");
    let ae = app
        .get(&format!("/fhir/AdverseEvent/{ae_id}"), &app.admin)
        .await
        .json();
    assert_eq!(ae["subject"]["reference"], format!("Patient/{subject}"));
    // The identifier stays beside the resolved reference.
    assert_eq!(ae["subject"]["identifier"], *ident);
    let (t, ap_id) = location_of(&results[1]);
    assert_eq!(t, "Appointment");
    let ap = app
        .get(&format!("/fhir/Appointment/{ap_id}"), &app.admin)
        .await
        .json();
    assert_eq!(
        ap["participant"][0]["actor"]["reference"],
        format!("Patient/{subject}")
    );
    // Searchable by the resolved reference.
    assert_eq!(
        app.search_ids(
            &app.admin,
            "AdverseEvent",
            &format!("subject=Patient/{subject}")
        )
        .await,
        vec![ae_id]
    );
    assert_eq!(
        app.search_ids(
            &app.admin,
            "Appointment",
            &format!("actor=Patient/{subject}")
        )
        .await,
        vec![ap_id]
    );
}

async fn one_invalid_entry_fails_the_whole_transaction(app: TestApp) {
    let types = ["Patient", "Observation"];
    let existing = app
        .create(
            &app.admin,
            &json!({"resourceType": "Patient", "gender": "male"}),
        )
        .await;
    let before = counts(&app, &types).await;
    let patient_url = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let good = vec![
        post_entry(Some(&patient_url), json!({"resourceType": "Patient"})),
        post_entry(None, obs_of(&patient_url, "8480-6")),
    ];
    // Invalid content in the last entry: 422, naming the entry's element.
    let mut bad_obs = obs_of(&patient_url, "8462-4");
    bad_obs.as_object_mut().expect("an object").remove("status");
    let mut list = good.clone();
    list.push(post_entry(None, bad_obs));
    let r = app
        .fhir_post("/fhir", &app.admin, &bundle("transaction", list))
        .await;
    let o = r.outcome(422);
    assert!(
        crate::helpers::expressions(&o)
            .iter()
            .any(|e| e.starts_with("Bundle.entry[2]") && e.ends_with("status")),
        "{o}"
    );
    assert_eq!(counts(&app, &types).await, before);
    // An update with a stale If-Match in the last entry: 412, nothing kept.
    let mut list = good.clone();
    list.push(json!({
        "resource": {"resourceType": "Patient", "id": existing, "gender": "female"},
        "request": {"method": "PUT", "url": format!("Patient/{existing}"), "ifMatch": "W/\"7\""},
    }));
    let r = app
        .fhir_post("/fhir", &app.admin, &bundle("transaction", list))
        .await;
    r.outcome(412);
    assert_eq!(counts(&app, &types).await, before);
    let p = app
        .get(&format!("/fhir/Patient/{existing}"), &app.admin)
        .await;
    assert_eq!(p.json()["gender"], "male");
    assert_eq!(p.header("etag"), Some("W/\"1\""));
    // A bad request.url: 400, nothing kept.
    let mut list = good;
    list.push(json!({"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "Patient"}}));
    let r = app
        .fhir_post("/fhir", &app.admin, &bundle("transaction", list))
        .await;
    r.outcome(400);
    assert_eq!(counts(&app, &types).await, before);
}

async fn an_identifier_matching_no_patient_is_422(app: TestApp) {
    // The trial is not loaded: nobody has the sample's subject identifier.
    let types = ["AdverseEvent", "Appointment", "Patient"];
    let before = counts(&app, &types).await;
    let r = app
        .post("/fhir", &app.admin, "application/fhir+json", EVENTS_BUNDLE)
        .await;
    let o = r.outcome(422);
    let sample: Value = serde_json::from_str(EVENTS_BUNDLE).expect("the sample parses");
    let value = sample["entry"][0]["resource"]["subject"]["identifier"]["value"]
        .as_str()
        .expect("a value");
    assert!(
        o.to_string().contains(value),
        "the outcome names the identifier: {o}"
    );
    assert_eq!(counts(&app, &types).await, before);
}

async fn batch_reports_every_entry_and_keeps_the_good_ones(app: TestApp) {
    let before = app.count(&app.admin, "Patient").await;
    let list = vec![
        post_entry(None, json!({"resourceType": "Patient", "gender": "other"})),
        post_entry(
            None,
            json!({"resourceType": "Patient", "gender": "sometimes"}),
        ),
        json!({"request": {"method": "GET", "url": "Patient/does-not-exist"}}),
    ];
    let n = list.len();
    let r = app
        .fhir_post("/fhir", &app.admin, &bundle("batch", list))
        .await;
    r.expect(200);
    let resp = r.json();
    assert_eq!(resp["type"], "batch-response");
    let results = entries(&resp);
    assert_eq!(results.len(), n);
    assert!(results[0]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("201"));
    assert!(results[1]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("422"));
    assert_eq!(
        results[1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert!(results[2]["response"]["status"]
        .as_str()
        .unwrap()
        .starts_with("404"));
    assert_eq!(app.count(&app.admin, "Patient").await, before + 1);
    let (_, id) = location_of(&results[0]);
    let p = app
        .get(&format!("/fhir/Patient/{id}"), &app.admin)
        .await
        .json();
    assert_eq!(p["gender"], "other");
}

async fn bundles_above_the_entry_cap_are_413(app: TestApp) {
    let cap = app.config.max_bundle_entries;
    let make = |n: usize| {
        bundle(
            "transaction",
            (0..n)
                .map(|_| post_entry(None, json!({"resourceType": "Patient"})))
                .collect(),
        )
    };
    let r = app.fhir_post("/fhir", &app.admin, &make(cap + 1)).await;
    let o = r.outcome(413);
    assert!(
        o.to_string().contains(&cap.to_string()),
        "the cap is named: {o}"
    );
    assert_eq!(app.count(&app.admin, "Patient").await, 0);
    let mut batch = make(cap + 1);
    batch["type"] = json!("batch");
    app.fhir_post("/fhir", &app.admin, &batch)
        .await
        .outcome(413);
    assert_eq!(app.count(&app.admin, "Patient").await, 0);
    app.fhir_post("/fhir", &app.admin, &make(cap))
        .await
        .expect(200);
    assert_eq!(app.count(&app.admin, "Patient").await, cap as u64);
}
