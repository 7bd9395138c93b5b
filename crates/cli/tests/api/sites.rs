//! The site registry (`/sites`): the protocol's sites served with their
//! FHIR Organizations, writes visible on the next read, ETags and 304s,
//! search and paging, the delete rules, a failed refresh that keeps the old
//! snapshot, the periodic refresh, and (PostgreSQL) another node's write
//! reaching this node through LISTEN/NOTIFY.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{protocol, site_ids, trial_id, Engine, TestApp};

engine_tests!(
    the_protocols_sites_are_served_as_their_organizations,
    a_site_write_is_visible_on_the_next_read_and_in_fhir,
    answers_carry_etags_and_a_matching_one_is_304,
    sites_are_searched_and_paged_in_id_order,
    only_an_unused_site_can_be_deleted,
    roles_and_bad_input_are_refused_with_reasons,
    a_failed_refresh_keeps_serving_the_last_snapshot,
    a_change_made_elsewhere_arrives_with_the_periodic_refresh with |c| c.sites_refresh = std::time::Duration::from_millis(100),
);

fn new_site(id: &str, name: &str, country: &str) -> Value {
    json!({"id": id, "name": name, "country": country, "city": "Lyon", "timezone": "Europe/Paris"})
}

async fn post_site(app: &TestApp, site: &Value) -> crate::helpers::Resp {
    app.post("/sites", &app.admin, "application/json", &site.to_string())
        .await
}

async fn put_site(
    app: &TestApp,
    id: &str,
    site: &Value,
    if_match: Option<&str>,
) -> crate::helpers::Resp {
    let mut req = app
        .request(Method::PUT, &format!("/sites/{id}"), &app.admin)
        .header("content-type", "application/json")
        .body(site.to_string());
    if let Some(m) = if_match {
        req = req.header("if-match", m);
    }
    app.send(req).await
}

async fn the_protocols_sites_are_served_as_their_organizations(app: TestApp) {
    app.load_reference_trial().await;
    let monitor = app.token("monitor", None, None).await;
    let p = protocol();
    let r = app
        .get(&format!("/sites?trial={}", trial_id()), &monitor)
        .await;
    r.expect(200);
    let list = r.json();
    assert_eq!(list["total"], p.sites.len());
    let ids: Vec<_> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, site_ids());
    for s in &p.sites {
        let site = app.get(&format!("/sites/{}", s.id), &monitor).await;
        site.expect(200);
        let j = site.json();
        assert_eq!(j["name"], s.name);
        assert_eq!(j["country"], s.country.as_str());
        assert_eq!(j["city"], s.city);
        assert_eq!(j["timezone"], s.timezone);
        assert_eq!(j["trials"], json!([trial_id()]));
        let org = app
            .get(&format!("/fhir/Organization/{}", s.id), &monitor)
            .await;
        org.expect(200);
        let org = org.json();
        assert_eq!(org["name"], s.name);
        assert_eq!(org["address"][0]["city"], s.city);
        assert_eq!(
            j["version"],
            org["meta"]["versionId"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        );
    }
}

async fn a_site_write_is_visible_on_the_next_read_and_in_fhir(app: TestApp) {
    let monitor = app.token("monitor", None, None).await;
    let site = new_site("site-900", "Hopital Test", "FR");
    let r = post_site(&app, &site).await;
    r.expect(201);
    assert_eq!(r.header("location"), Some("/sites/site-900"));
    let got = app.get("/sites/site-900", &monitor).await;
    got.expect(200);
    assert_eq!(got.json()["name"], "Hopital Test");
    assert_eq!(got.json()["active"], true);
    let etag = got.header("etag").expect("an ETag").to_string();
    // The same id again is a conflict, not a silent overwrite.
    post_site(&app, &site).await.problem(409);

    let mut changed = site.clone();
    changed["name"] = json!("Hopital Test Renamed");
    changed["active"] = json!(false);
    changed["phone"] = json!("+33472000000");
    put_site(&app, "site-900", &changed, Some(&etag))
        .await
        .expect(200);
    let got = app.get("/sites/site-900", &monitor).await;
    assert_eq!(got.json()["name"], "Hopital Test Renamed");
    assert_eq!(got.json()["active"], false);
    assert_eq!(got.json()["phone"], "+33472000000");
    assert_ne!(got.header("etag"), Some(etag.as_str()));
    // A PUT with the old ETag lost the race: 412, nothing changed.
    let mut stale = changed.clone();
    stale["name"] = json!("Lost Update");
    put_site(&app, "site-900", &stale, Some(&etag))
        .await
        .problem(412);
    assert_eq!(
        app.get("/sites/site-900", &monitor).await.json()["name"],
        "Hopital Test Renamed"
    );
    // The FHIR Organization is the same site.
    let org = app
        .get("/fhir/Organization/site-900", &monitor)
        .await
        .json();
    assert_eq!(org["name"], "Hopital Test Renamed");
    assert_eq!(org["active"], false);
    assert_eq!(org["telecom"][0]["value"], "+33472000000");
    // ... and a change through the FHIR API is a change of the site.
    let mut org2 = org.clone();
    org2["name"] = json!("Renamed Through FHIR");
    org2.as_object_mut().unwrap().remove("meta");
    app.put("/fhir/Organization/site-900", &app.admin, &org2)
        .await
        .expect(200);
    assert_eq!(
        app.get("/sites/site-900", &monitor).await.json()["name"],
        "Renamed Through FHIR"
    );
    // Every change is in the audit trail.
    let audit = app.get("/audit/export", &app.admin).await.text;
    for action in ["site-create", "site-update"] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(action) && l.contains("site-900")),
            "{action} audited"
        );
    }
}

async fn answers_carry_etags_and_a_matching_one_is_304(app: TestApp) {
    app.load_reference_trial().await;
    let monitor = app.token("monitor", None, None).await;
    let id = &site_ids()[0];
    let first = app.get(&format!("/sites/{id}"), &monitor).await;
    first.expect(200);
    let etag = first.header("etag").expect("an ETag").to_string();
    assert_eq!(first.header("cache-control"), Some("private, no-cache"));
    let again = app
        .send(
            app.request(Method::GET, &format!("/sites/{id}"), &monitor)
                .header("if-none-match", &etag),
        )
        .await;
    again.expect(304);
    assert!(again.text.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    // The list has its own ETag, which a change of any site changes.
    let list = app.get("/sites", &monitor).await;
    let list_etag = list.header("etag").expect("a list ETag").to_string();
    let cond = |tag: String| {
        app.request(Method::GET, "/sites", &monitor)
            .header("if-none-match", tag)
    };
    app.send(cond(list_etag.clone())).await.expect(304);
    let mut site = first.json();
    site["city"] = json!("Cambridge");
    put_site(&app, id, &site, None).await.expect(200);
    app.send(cond(list_etag)).await.expect(200);
    app.send(
        app.request(Method::GET, &format!("/sites/{id}"), &monitor)
            .header("if-none-match", &etag),
    )
    .await
    .expect(200);
}

async fn sites_are_searched_and_paged_in_id_order(app: TestApp) {
    app.load_reference_trial().await;
    let extra = [
        ("site-101", "Lyon North", "FR"),
        ("site-102", "Lyon South", "FR"),
        ("site-103", "Madrid Centre", "ES"),
    ];
    for (id, name, country) in extra {
        post_site(&app, &new_site(id, name, country))
            .await
            .expect(201);
    }
    let user = app.token("site-user", Some(&site_ids()[0]), None).await;
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    };
    let fr = app.get("/sites?country=fr", &user).await.json();
    assert_eq!(ids(&fr), ["site-101", "site-102"]);
    let q = app.get("/sites?q=SOUTH", &user).await.json();
    assert_eq!(ids(&q), ["site-102"]);
    let trial = app
        .get(&format!("/sites?trial={}", trial_id()), &user)
        .await
        .json();
    assert_eq!(ids(&trial), site_ids());
    // Paging: every site once, in id order.
    let mut all = Vec::new();
    let mut path = "/sites?limit=2".to_string();
    loop {
        let page = app.get(&path, &user).await;
        page.expect(200);
        let page = page.json();
        assert_eq!(page["total"], site_ids().len() + extra.len());
        assert!(page["items"].as_array().unwrap().len() <= 2);
        all.extend(ids(&page));
        match page["next"].as_str() {
            Some(next) => path = next.to_string(),
            None => break,
        }
    }
    let mut expected: Vec<String> = site_ids();
    expected.extend(extra.iter().map(|e| e.0.to_string()));
    expected.sort();
    assert_eq!(all, expected);
    app.get("/sites?limit=0", &user).await.problem(400);
}

async fn only_an_unused_site_can_be_deleted(app: TestApp) {
    app.load_reference_trial().await;
    let listed = &site_ids()[0];
    let r = app.delete(&format!("/sites/{listed}"), &app.admin).await;
    let detail = r.problem(409)["detail"].as_str().unwrap().to_string();
    assert!(detail.contains(&trial_id()), "{detail}");
    // The FHIR API cannot go around the rules.
    app.delete(&format!("/fhir/Organization/{listed}"), &app.admin)
        .await
        .outcome(409);
    assert_eq!(
        app.get(&format!("/sites/{listed}"), &app.admin)
            .await
            .status,
        200
    );
    post_site(&app, &new_site("site-500", "Spare", "FR"))
        .await
        .expect(201);
    app.delete("/sites/site-500", &app.admin).await.expect(204);
    app.get("/sites/site-500", &app.admin).await.problem(404);
    app.get("/fhir/Organization/site-500", &app.admin)
        .await
        .outcome(410);
    app.delete("/sites/site-500", &app.admin).await.problem(404);
    // Created again after a delete: a new version of the same Organization.
    post_site(&app, &new_site("site-500", "Spare Again", "FR"))
        .await
        .expect(201);
    assert_eq!(
        app.get("/sites/site-500", &app.admin).await.json()["name"],
        "Spare Again"
    );
}

async fn roles_and_bad_input_are_refused_with_reasons(app: TestApp) {
    let monitor = app.token("monitor", None, None).await;
    let interface = app.token("interface", None, None).await;
    let site = new_site("site-700", "Clinic", "FR");
    let r = app
        .post("/sites", &monitor, "application/json", &site.to_string())
        .await;
    r.problem(403);
    app.get("/sites", &interface).await.problem(403);
    app.get("/sites", "not-a-token").await.problem(401);
    let r = app.get("/sites/site-nope", &monitor).await;
    assert!(r.problem(404)["detail"]
        .as_str()
        .unwrap()
        .contains("site-nope"));
    let mut bad = site.clone();
    bad["country"] = json!("XX");
    let r = post_site(&app, &bad).await;
    assert!(r.problem(422)["detail"]
        .as_str()
        .unwrap()
        .contains("country"));
    post_site(&app, &json!("a string")).await.problem(422);
    app.post("/sites", &app.admin, "application/json", "{not json")
        .await
        .problem(400);
    let r = put_site(&app, "site-701", &site, None).await;
    assert!(r.problem(422)["detail"].as_str().unwrap().contains("id"));
    // Nothing of the refused writes was stored.
    app.get("/sites/site-700", &monitor).await.problem(404);
}

async fn a_failed_refresh_keeps_serving_the_last_snapshot(app: TestApp) {
    app.load_reference_trial().await;
    let monitor = app.token("monitor", None, None).await;
    let id = &site_ids()[0];
    let before = app.get(&format!("/sites/{id}"), &monitor).await.json();
    // The registry reads the trials table: without it, a rebuild fails.
    app.store
        .execute_raw("ALTER TABLE trials RENAME TO trials_away")
        .await
        .expect("the table renamed");
    assert!(app.sites.refresh().await.is_err());
    let during = app.get(&format!("/sites/{id}"), &monitor).await;
    during.expect(200);
    assert_eq!(during.json(), before);
    assert_eq!(
        app.get("/sites", &monitor).await.json()["total"],
        site_ids().len()
    );
    let metrics = app.get("/metrics", &app.admin).await.text;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("clinflow_sites_refreshes_total{outcome=\"failed\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(metrics.contains("clinflow_sites_snapshot_age_seconds"));
    app.store
        .execute_raw("ALTER TABLE trials_away RENAME TO trials")
        .await
        .expect("the table back");
    app.sites.refresh().await.expect("a refresh works again");
    assert_eq!(
        app.get(&format!("/sites/{id}"), &monitor).await.json(),
        before
    );
}

/// A site written straight into the database (as another process would)
/// shows once the periodic refresh has run.
async fn a_change_made_elsewhere_arrives_with_the_periodic_refresh(app: TestApp) {
    let mut generation = app.sites.generation();
    let site =
        clinflow_server::sites::Site::from_json(&new_site("site-800", "Elsewhere", "FR"), None)
            .expect("a valid site");
    generation.borrow_and_update();
    write_organization(&app.store, &site).await;
    let got = wait_for_site(&app, &mut generation, "site-800").await;
    assert_eq!(got["name"], "Elsewhere");
}

/// Waits for refreshes until `id` is served (each wait bounded); returns it.
async fn wait_for_site(
    app: &TestApp,
    generation: &mut tokio::sync::watch::Receiver<u64>,
    id: &str,
) -> Value {
    loop {
        tokio::time::timeout(Duration::from_secs(30), generation.changed())
            .await
            .expect("a refresh within 30 s")
            .expect("the registry is alive");
        let got = app.get(&format!("/sites/{id}"), &app.admin).await;
        if got.status == 200 {
            return got.json();
        }
    }
}

/// Writes a site's Organization through the store, bypassing the server.
async fn write_organization(store: &clinflow_store::Store, site: &clinflow_server::sites::Site) {
    let op = clinflow_server::fhir::write::built_op(
        &site.to_organization(),
        site.id.as_str(),
        clinflow_store::Expect::Absent,
        clinflow_store::now_millis(),
    )
    .expect("a valid Organization");
    store
        .write(clinflow_store::WriteRequest {
            ops: vec![op],
            ..Default::default()
        })
        .await
        .expect("written");
}

/// Two servers on one PostgreSQL database: a site written through one is
/// served by the other after its LISTEN/NOTIFY refresh (the periodic one is
/// 10 minutes away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_another_nodes_write_reaches_this_node() {
    crate::helpers::run_test(
        Engine::Postgres,
        |_| {},
        |app: TestApp| async move {
            let other = crate::helpers::spawn_node(&app).await;
            let mut generation = app.sites.generation();
            generation.borrow_and_update();
            let r = other
                .post(
                    "/sites",
                    &app.admin,
                    "application/json",
                    &new_site("site-321", "Other Node", "FR").to_string(),
                )
                .await;
            r.expect(201);
            let got = wait_for_site(&app, &mut generation, "site-321").await;
            assert_eq!(got["name"], "Other Node");
        },
    )
    .await;
}
