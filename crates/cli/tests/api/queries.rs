//! Data queries through `/queries`: a value ingested outside the soft range
//! opens a query for its subject's site, in the same write as the value;
//! the site answers it, a monitor closes it; invalid steps are 409, another
//! site's query is 404, patient and interface roles 403; every step is
//! audited; lists page by cursor.

use serde_json::Value;

use crate::helpers::{subjects, TestApp};
use crate::ingest::{done, ingest};

engine_tests!(
    a_soft_range_value_opens_a_query_that_is_answered_and_closed,
    queries_are_site_scoped_and_role_checked,
    the_list_pages_by_cursor_and_filters_by_status,
);

/// A wearable CSV of heart rates for `subject`: `values` at consecutive
/// minutes.
fn heart_rates(subject: &str, values: &[u32]) -> String {
    let mut csv = String::from("subject,device,time,metric,value,unit\n");
    for (i, v) in values.iter().enumerate() {
        csv.push_str(&format!(
            "{subject},watch-1,2026-03-02T08:{i:02}:00-05:00,heart-rate,{v},/min\n"
        ));
    }
    csv
}

/// The first subject and its site, and a site with no subject of it.
fn subject_and_sites() -> (String, String, String) {
    let all = subjects();
    let first = all[0].clone();
    let other = all
        .iter()
        .find(|s| s.site != first.site)
        .expect("subjects at two sites")
        .site
        .clone();
    (first.id, first.site, other)
}

async fn ingest_done(app: &TestApp, csv: &str) -> Value {
    let id = ingest(app, &app.admin, "/ingest/wearable", "text/csv", csv).await;
    done(app, &app.admin, &id).await
}

async fn list(app: &TestApp, token: &str, query: &str) -> Value {
    let r = app.get(&format!("/queries{query}"), token).await;
    r.expect(200);
    r.json()
}

fn items(list: &Value) -> Vec<Value> {
    list["items"].as_array().expect("items").clone()
}

async fn post_json(app: &TestApp, path: &str, token: &str, body: &str) -> crate::helpers::Resp {
    app.post(path, token, "application/json", body).await
}

async fn a_soft_range_value_opens_a_query_that_is_answered_and_closed(app: TestApp) {
    app.load_reference_trial().await;
    let (subject, site, _) = subject_and_sites();
    // 150/min: inside the hard range, outside the soft one.
    let status = ingest_done(&app, &heart_rates(&subject, &[71, 150])).await;
    assert_eq!(status["stored"], 2, "{status}");
    assert_eq!(status["queries_opened"], 1, "{status}");

    let site_user = app.token("site-user", Some(&site), None).await;
    let monitor = app.token("monitor", None, None).await;
    let open = items(&list(&app, &site_user, &format!("?site={site}&status=open")).await);
    assert_eq!(open.len(), 1, "the count matches the stored rows: {open:?}");
    let q = &open[0];
    assert_eq!(q["status"], "open");
    assert_eq!(q["site"], site.as_str());
    assert_eq!(q["measurement"], "heart-rate");
    assert_eq!(q["value"], "150");
    assert_eq!(q["trial"], crate::helpers::trial_id().as_str());
    assert!(q["answer"].is_null() && q["answered"].is_null() && q["closed"].is_null());
    // It is about the stored Observation, by its server-assigned id.
    let resource = q["resource"].as_str().expect("a resource reference");
    let obs = app.get(&format!("/fhir/{resource}"), &app.admin).await;
    obs.expect(200);
    assert_eq!(obs.json()["valueQuantity"]["value"], 150);
    let patient = obs.json()["subject"]["reference"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        format!("Patient/{}", q["patient"].as_str().unwrap()),
        patient
    );
    let id = q["id"].as_str().unwrap().to_string();

    // Closing answered or open, answering only open.
    let r = post_json(
        &app,
        &format!("/queries/{id}/answer"),
        &site_user,
        r#"{"answer":"Patient had just climbed stairs."}"#,
    )
    .await;
    r.expect(200);
    assert_eq!(r.json()["status"], "answered");
    assert_eq!(r.json()["answer"], "Patient had just climbed stairs.");
    assert!(r.json()["answered"]["by"].is_string());
    post_json(
        &app,
        &format!("/queries/{id}/answer"),
        &site_user,
        r#"{"answer":"again"}"#,
    )
    .await
    .problem(409);
    let r = app
        .post(
            &format!("/queries/{id}/close"),
            &monitor,
            "application/json",
            "",
        )
        .await;
    r.expect(200);
    assert_eq!(r.json()["status"], "closed");
    let p = app
        .post(
            &format!("/queries/{id}/close"),
            &monitor,
            "application/json",
            "",
        )
        .await
        .problem(409);
    assert!(p["detail"].as_str().unwrap_or("").contains("closed"), "{p}");
    post_json(
        &app,
        &format!("/queries/{id}/answer"),
        &site_user,
        r#"{"answer":"late"}"#,
    )
    .await
    .problem(409);
    assert!(items(&list(&app, &site_user, "?status=open").await).is_empty());
    let closed = items(&list(&app, &app.admin, "?status=closed").await);
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0]["answer"], "Patient had just climbed stairs.");

    // Each step is audited, once, with the query as entity; refused
    // steps wrote nothing.
    let records = app
        .store
        .audit_records(clinflow_store::AuditQuery {
            entity: Some(format!("DataQuery/{id}")),
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.record.action.as_str()).collect();
    assert_eq!(actions, ["query-answer", "query-close"], "{records:?}");
    assert_eq!(records[0].record.role, "site-user");
    assert_eq!(records[1].record.role, "monitor");
    assert!(app.store.verify_audit().await.unwrap().is_ok());

    // Never deleted: the database refuses.
    assert!(app
        .store
        .execute_raw(&format!("DELETE FROM data_queries WHERE id = '{id}'"))
        .await
        .is_err());
    assert_eq!(items(&list(&app, &app.admin, "").await).len(), 1);

    // The same content again is the same batch: no second query.
    let again = ingest_done(&app, &heart_rates(&subject, &[71, 150])).await;
    assert_eq!(again["batch"], status["batch"]);
    assert_eq!(items(&list(&app, &app.admin, "").await).len(), 1);
}

async fn queries_are_site_scoped_and_role_checked(app: TestApp) {
    app.load_reference_trial().await;
    let (subject, site, other_site) = subject_and_sites();
    ingest_done(&app, &heart_rates(&subject, &[150])).await;
    let mine = app.token("site-user", Some(&site), None).await;
    let other = app.token("site-user", Some(&other_site), None).await;
    let id = items(&list(&app, &mine, "").await)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Another site sees none, even when it asks for the site by name, and
    // its changes are 404s that change nothing.
    assert!(items(&list(&app, &other, "").await).is_empty());
    assert!(items(&list(&app, &other, &format!("?site={site}")).await).is_empty());
    post_json(
        &app,
        &format!("/queries/{id}/answer"),
        &other,
        r#"{"answer":"x"}"#,
    )
    .await
    .problem(404);
    app.post(
        &format!("/queries/{id}/close"),
        &other,
        "application/json",
        "",
    )
    .await
    .problem(404);
    app.post(
        "/queries/no-such-query/close",
        &app.admin,
        "application/json",
        "",
    )
    .await
    .problem(404);
    for role in ["monitor", "data-manager"] {
        let t = app.token(role, None, None).await;
        assert_eq!(items(&list(&app, &t, "").await).len(), 1, "{role}");
    }
    let patient = app.token("patient", None, Some(&subject)).await;
    let interface = app.token("interface", None, None).await;
    for t in [&patient, &interface] {
        app.get("/queries", t).await.problem(403);
        post_json(
            &app,
            &format!("/queries/{id}/answer"),
            t,
            r#"{"answer":"x"}"#,
        )
        .await
        .problem(403);
    }
    // Bad requests are problem+json.
    app.get("/queries?status=pending", &mine).await.problem(400);
    post_json(&app, &format!("/queries/{id}/answer"), &mine, "not json")
        .await
        .problem(400);
    let q = &items(&list(&app, &app.admin, "").await)[0];
    assert_eq!(q["status"], "open", "nothing changed: {q}");
    let records = app
        .store
        .audit_records(clinflow_store::AuditQuery {
            entity: Some(format!("DataQuery/{id}")),
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(records.is_empty(), "{records:?}");
}

async fn the_list_pages_by_cursor_and_filters_by_status(app: TestApp) {
    app.load_reference_trial().await;
    let (subject, _, _) = subject_and_sites();
    let values = [150, 151, 152, 153, 154];
    let status = ingest_done(&app, &heart_rates(&subject, &values)).await;
    assert_eq!(status["queries_opened"], values.len() as u64, "{status}");
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..=values.len() {
        let q = match &cursor {
            Some(c) => format!("?count=2&cursor={c}"),
            None => "?count=2".to_string(),
        };
        let page = list(&app, &app.admin, &q).await;
        let page_items = items(&page);
        assert!(page_items.len() <= 2);
        seen.extend(
            page_items
                .iter()
                .map(|q| q["id"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "in id order, each once");
    assert_eq!(seen.len(), values.len());
    let first = &seen[0];
    app.post(
        &format!("/queries/{first}/close"),
        &app.admin,
        "application/json",
        "",
    )
    .await
    .expect(200);
    assert_eq!(
        items(&list(&app, &app.admin, "?status=open").await).len(),
        values.len() - 1
    );
    assert_eq!(
        items(&list(&app, &app.admin, "?status=closed").await).len(),
        1
    );
    assert!(items(&list(&app, &app.admin, "?status=answered").await).is_empty());
}
