//! The FHIR instance interactions: metadata, create, read, vread, update with
//! `If-Match`, delete, history; validation errors and the error shapes.

use serde_json::{json, Value};

use crate::helpers::{expressions, TestApp, FHIR_JSON};

engine_tests!(
    metadata_is_an_r4_capability_statement_listing_observation_search_params,
    create_read_vread_update_delete_and_history,
    stale_if_match_is_412_and_leaves_the_resource_alone,
    decimals_come_back_byte_exact,
    malformed_json_is_400_operation_outcome,
    invalid_content_is_422_naming_each_element,
    resource_type_mismatching_the_url_is_400,
    wrong_media_type_is_415,
    body_over_the_limit_is_413_operation_outcome with |c| c.body_limit = 2048,
    unsupported_method_is_405_operation_outcome,
    unknown_id_and_unknown_type_are_404_operation_outcome,
    non_indexed_r4_types_can_be_created_and_read,
);

async fn metadata_is_an_r4_capability_statement_listing_observation_search_params(app: TestApp) {
    let r = app.get("/fhir/metadata", &app.admin).await;
    r.expect(200);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .starts_with(FHIR_JSON));
    let cs = r.json();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().expect("resources");
    let obs = resources
        .iter()
        .find(|r| r["type"] == "Observation")
        .expect("Observation is listed");
    let params: Vec<&str> = obs["searchParam"]
        .as_array()
        .expect("search params")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for p in [
        "_id",
        "_lastUpdated",
        "identifier",
        "subject",
        "patient",
        "code",
        "date",
        "status",
        "category",
        "value-quantity",
    ] {
        assert!(
            params.contains(&p),
            "Observation search param {p} listed: {params:?}"
        );
    }
    assert_eq!(obs["searchInclude"], json!(["Observation:subject"]));
    // Every indexed type of the issue is listed.
    for t in [
        "Patient",
        "Practitioner",
        "Organization",
        "Location",
        "ResearchStudy",
        "ResearchSubject",
        "Questionnaire",
        "QuestionnaireResponse",
        "Observation",
        "AdverseEvent",
        "Appointment",
        "Encounter",
        "Condition",
        "DiagnosticReport",
        "ImagingStudy",
    ] {
        assert!(
            resources.iter().any(|r| r["type"] == t),
            "{t} in the CapabilityStatement"
        );
    }
}

async fn create_read_vread_update_delete_and_history(app: TestApp) {
    let patient =
        json!({"resourceType": "Patient", "name": [{"family": "Lovelace", "given": ["Ada"]}]});
    let r = app.fhir_post("/fhir/Patient", &app.admin, &patient).await;
    r.expect(201);
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    let created = r.json();
    let id = created["id"].as_str().expect("an id").to_string();
    assert_eq!(created["meta"]["versionId"], "1");
    let location = r.header("location").expect("a Location header");
    assert!(
        location.ends_with(&format!("/fhir/Patient/{id}/_history/1")),
        "{location}"
    );

    // Read.
    let r = app.get(&format!("/fhir/Patient/{id}"), &app.admin).await;
    r.expect(200);
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert_eq!(r.json()["name"], patient["name"]);

    // Update with the right If-Match.
    let mut changed = r.json();
    changed["name"][0]["family"] = json!("Byron");
    let r = app
        .send(
            app.request(
                reqwest::Method::PUT,
                &format!("/fhir/Patient/{id}"),
                &app.admin,
            )
            .header("content-type", FHIR_JSON)
            .header("if-match", "W/\"1\"")
            .body(changed.to_string()),
        )
        .await;
    r.expect(200);
    assert_eq!(r.header("etag"), Some("W/\"2\""));
    assert_eq!(r.json()["meta"]["versionId"], "2");

    // vread of both versions.
    let v1 = app
        .get(&format!("/fhir/Patient/{id}/_history/1"), &app.admin)
        .await;
    v1.expect(200);
    assert_eq!(v1.json()["name"][0]["family"], "Lovelace");
    let v2 = app
        .get(&format!("/fhir/Patient/{id}/_history/2"), &app.admin)
        .await;
    v2.expect(200);
    assert_eq!(v2.json()["name"][0]["family"], "Byron");
    app.get(&format!("/fhir/Patient/{id}/_history/9"), &app.admin)
        .await
        .outcome(404);

    // Delete, then read is 410 Gone; the old versions stay readable.
    let r = app.delete(&format!("/fhir/Patient/{id}"), &app.admin).await;
    assert!(r.status == 200 || r.status == 204, "{}", r.text);
    app.get(&format!("/fhir/Patient/{id}"), &app.admin)
        .await
        .outcome(410);
    let r = app
        .get(&format!("/fhir/Patient/{id}/_history/1"), &app.admin)
        .await;
    r.expect(200);
    assert_eq!(r.json()["name"][0]["family"], "Lovelace");

    // History: every version, newest first.
    let r = app
        .get(&format!("/fhir/Patient/{id}/_history"), &app.admin)
        .await;
    r.expect(200);
    let h = r.json();
    assert_eq!(h["resourceType"], "Bundle");
    assert_eq!(h["type"], "history");
    let entries = h["entry"].as_array().expect("entries");
    let etags: Vec<&str> = entries
        .iter()
        .map(|e| e["response"]["etag"].as_str().expect("an etag"))
        .collect();
    assert_eq!(etags, ["W/\"3\"", "W/\"2\"", "W/\"1\""]);
    assert_eq!(entries[0]["request"]["method"], "DELETE");
    assert!(entries[0].get("resource").is_none());
    assert_eq!(entries[1]["resource"]["name"][0]["family"], "Byron");
    assert_eq!(entries[2]["resource"]["name"][0]["family"], "Lovelace");
}

async fn stale_if_match_is_412_and_leaves_the_resource_alone(app: TestApp) {
    let id = app
        .create(
            &app.admin,
            &json!({"resourceType": "Patient", "gender": "female"}),
        )
        .await;
    let path = format!("/fhir/Patient/{id}");
    let body = json!({"resourceType": "Patient", "id": id, "gender": "male"});
    let put = |if_match: &'static str| {
        app.request(reqwest::Method::PUT, &path, &app.admin)
            .header("content-type", FHIR_JSON)
            .header("if-match", if_match)
            .body(body.to_string())
    };
    app.send(put("W/\"1\"")).await.expect(200);
    // The client still believes version 1 is current.
    app.send(put("W/\"1\"")).await.outcome(412);
    let r = app.get(&path, &app.admin).await;
    r.expect(200);
    assert_eq!(r.header("etag"), Some("W/\"2\""));
    // A stale delete is refused too.
    let r = app
        .send(
            app.request(reqwest::Method::DELETE, &path, &app.admin)
                .header("if-match", "W/\"1\""),
        )
        .await;
    r.outcome(412);
    app.get(&path, &app.admin).await.expect(200);
}

async fn decimals_come_back_byte_exact(app: TestApp) {
    let patient = app
        .create(&app.admin, &json!({"resourceType": "Patient"}))
        .await;
    // Raw text: serde_json would normalise these numbers.
    let body = format!(
        r#"{{"resourceType":"Observation","status":"final","code":{{"text":"mixed"}},
        "subject":{{"reference":"Patient/{patient}"}},
        "component":[
          {{"code":{{"text":"pH"}},"valueQuantity":{{"value":7.40}}}},
          {{"code":{{"text":"sys"}},"valueQuantity":{{"value":120.0,"unit":"mm[Hg]"}}}}
        ]}}"#
    );
    let r = app
        .post("/fhir/Observation", &app.admin, FHIR_JSON, &body)
        .await;
    r.expect(201);
    assert!(r.text.contains("\"value\":7.40"), "7.40 kept: {}", r.text);
    assert!(r.text.contains("\"value\":120.0"), "120.0 kept: {}", r.text);
    let id = r.json()["id"].as_str().expect("an id").to_string();
    for path in [
        format!("/fhir/Observation/{id}"),
        format!("/fhir/Observation/{id}/_history/1"),
        format!("/fhir/Observation?_id={id}"),
    ] {
        let r = app.get(&path, &app.admin).await;
        r.expect(200);
        assert!(r.text.contains("\"value\":7.40"), "{path}: {}", r.text);
        assert!(r.text.contains("\"value\":120.0"), "{path}: {}", r.text);
    }
}

async fn malformed_json_is_400_operation_outcome(app: TestApp) {
    for body in [
        r#"{"resourceType": "Patient", "gender": "female""#,
        "not json at all",
        r#"{"resourceType": "Patient",}"#,
    ] {
        let r = app.post("/fhir/Patient", &app.admin, FHIR_JSON, body).await;
        r.outcome(400);
    }
    // The same on update and on a Bundle.
    app.send(
        app.request(reqwest::Method::PUT, "/fhir/Patient/p1", &app.admin)
            .header("content-type", FHIR_JSON)
            .body("{"),
    )
    .await
    .outcome(400);
    app.post("/fhir", &app.admin, FHIR_JSON, "[1,")
        .await
        .outcome(400);
}

async fn invalid_content_is_422_naming_each_element(app: TestApp) {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"resourceType": "Observation", "code": {"text": "x"}}),
            "Observation.status",
        ),
        (
            json!({"resourceType": "Observation", "status": "done", "code": {"text": "x"}}),
            "Observation.status",
        ),
        (
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "colour": "red"}),
            "Observation.colour",
        ),
        (
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueQuantity": {"value": "12"}}),
            "Observation.valueQuantity.value",
        ),
        (
            json!({"resourceType": "Patient", "birthDate": "12/04/1961"}),
            "Patient.birthDate",
        ),
        (
            json!({"resourceType": "Patient", "active": "yes"}),
            "Patient.active",
        ),
    ];
    for (body, element) in cases {
        let rtype = body["resourceType"].as_str().expect("a type");
        let r = app
            .fhir_post(&format!("/fhir/{rtype}"), &app.admin, &body)
            .await;
        let o = r.outcome(422);
        let exprs = expressions(&o);
        assert!(
            exprs.iter().any(|e| e == element),
            "{element} named in {exprs:?} for {body}"
        );
    }
    // Several problems: each one is reported.
    let r = app
        .fhir_post(
            "/fhir/Observation",
            &app.admin,
            &json!({"resourceType": "Observation", "status": "done", "colour": "red"}),
        )
        .await;
    let exprs = expressions(&r.outcome(422));
    for element in [
        "Observation.status",
        "Observation.colour",
        "Observation.code",
    ] {
        assert!(exprs.iter().any(|e| e == element), "{element} in {exprs:?}");
    }
    // Nothing invalid was stored.
    assert_eq!(app.count(&app.admin, "Observation").await, 0);
}

async fn resource_type_mismatching_the_url_is_400(app: TestApp) {
    let r = app
        .fhir_post(
            "/fhir/Observation",
            &app.admin,
            &json!({"resourceType": "Patient"}),
        )
        .await;
    r.outcome(400);
    let r = app
        .put(
            "/fhir/Observation/x1",
            &app.admin,
            &json!({"resourceType": "Patient", "id": "x1"}),
        )
        .await;
    r.outcome(400);
    // The id in the body must be the one in the URL.
    let r = app
        .put(
            "/fhir/Patient/x1",
            &app.admin,
            &json!({"resourceType": "Patient", "id": "x2"}),
        )
        .await;
    r.outcome(400);
}

async fn wrong_media_type_is_415(app: TestApp) {
    let body = json!({"resourceType": "Patient"}).to_string();
    for ct in ["text/plain", "application/xml", "application/fhir+xml"] {
        let r = app.post("/fhir/Patient", &app.admin, ct, &body).await;
        r.outcome(415);
    }
    app.post("/fhir", &app.admin, "text/plain", "{}")
        .await
        .outcome(415);
}

async fn body_over_the_limit_is_413_operation_outcome(app: TestApp) {
    let limit = app.config.body_limit;
    let big = json!({
        "resourceType": "Patient",
        "name": [{"text": "x".repeat(limit)}],
    });
    assert!(big.to_string().len() > limit);
    app.fhir_post("/fhir/Patient", &app.admin, &big)
        .await
        .outcome(413);
    // Under the limit is fine.
    let small = json!({"resourceType": "Patient", "name": [{"text": "x".repeat(limit / 4)}]});
    app.fhir_post("/fhir/Patient", &app.admin, &small)
        .await
        .expect(201);
    // A Bundle above it too.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": big, "request": {"method": "POST", "url": "Patient"}}
    ]});
    app.fhir_post("/fhir", &app.admin, &bundle)
        .await
        .outcome(413);
}

async fn unsupported_method_is_405_operation_outcome(app: TestApp) {
    let id = app
        .create(&app.admin, &json!({"resourceType": "Patient"}))
        .await;
    let r = app
        .send(
            app.request(
                reqwest::Method::PATCH,
                &format!("/fhir/Patient/{id}"),
                &app.admin,
            )
            .header("content-type", "application/json-patch+json")
            .body("[]"),
        )
        .await;
    r.outcome(405);
    app.send(app.request(reqwest::Method::DELETE, "/fhir/Patient", &app.admin))
        .await
        .outcome(405);
    app.send(app.request(reqwest::Method::PUT, "/fhir/metadata", &app.admin))
        .await
        .outcome(405);
}

async fn unknown_id_and_unknown_type_are_404_operation_outcome(app: TestApp) {
    app.get("/fhir/Patient/does-not-exist", &app.admin)
        .await
        .outcome(404);
    app.get("/fhir/Patient/does-not-exist/_history", &app.admin)
        .await
        .outcome(404);
    app.get("/fhir/NoSuchType/x", &app.admin).await.outcome(404);
    app.delete("/fhir/Patient/does-not-exist", &app.admin)
        .await
        .outcome(404);
}

async fn non_indexed_r4_types_can_be_created_and_read(app: TestApp) {
    let resources = [
        json!({"resourceType": "Basic", "code": {"text": "a note"}}),
        json!({"resourceType": "Medication", "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1049502"}]}}),
        json!({"resourceType": "Device", "deviceName": [{"name": "BP cuff", "type": "user-friendly-name"}]}),
    ];
    for res in resources {
        let rtype = res["resourceType"].as_str().expect("a type");
        let id = app.create(&app.admin, &res).await;
        let r = app.get(&format!("/fhir/{rtype}/{id}"), &app.admin).await;
        r.expect(200);
        let mut got = r.json();
        got.as_object_mut().expect("an object").remove("meta");
        got.as_object_mut().expect("an object").remove("id");
        assert_eq!(got, res);
        // Update by PUT with a client id works too.
        let mut with_id = res.clone();
        with_id["id"] = json!(format!("{}-client", rtype.to_lowercase()));
        let r = app
            .put(
                &format!("/fhir/{rtype}/{}", with_id["id"].as_str().unwrap()),
                &app.admin,
                &with_id,
            )
            .await;
        r.expect(201);
    }
}
