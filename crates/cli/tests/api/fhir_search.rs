//! Search: every parameter of the issue against data the test creates,
//! keyset paging, sorting, totals, `_include`, and unknown parameters.
//!
//! Each expected result set is computed from the table of inputs with the
//! FHIR meaning of the parameter, then compared with what the server found.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::helpers::{
    entries, match_ids, next_link, protocol, site_ids, subjects, trial_id, TestApp, FHIR_JSON,
};

engine_tests!(
    observation_token_and_reference_parameters,
    observation_dates_with_prefixes_and_partial_dates,
    observation_value_quantity,
    last_updated_and_id,
    patient_identifier_and_name,
    count_and_next_links_walk_every_match_once,
    sort_by_date_and_last_updated,
    total_only_when_asked,
    include_adds_the_subject_patients,
    unknown_parameters_are_400,
    trial_resources_research_subject_and_organization,
    appointment_actor_and_date,
    adverse_event_seriousness,
);

const PATIENT_SYSTEM: &str = "urn:oid:2.16.840.1.113883.19.5";
const LOINC: &str = "http://loinc.org";
const LOCAL: &str = "urn:clinflow-test:codes";
const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const UCUM: &str = "http://unitsofmeasure.org";

/// One Observation of the test data.
#[derive(Debug, Clone)]
struct Obs {
    key: &'static str,
    /// Index into [`PATIENTS`].
    patient: usize,
    system: &'static str,
    code: &'static str,
    date: &'static str,
    /// JSON number text.
    value: &'static str,
    unit: &'static str,
    status: &'static str,
    category: &'static str,
}

/// `(identifier value, family, given)`.
const PATIENTS: [(&str, &str, &str); 3] = [
    ("MRN-1", "Alvarez", "Maria"),
    ("MRN-2", "Brown", "Alvin"),
    ("MRN-3", "Chen", "Li"),
];

fn observations() -> Vec<Obs> {
    let o = |key, patient, system, code, date, value, unit, status, category| Obs {
        key,
        patient,
        system,
        code,
        date,
        value,
        unit,
        status,
        category,
    };
    vec![
        o(
            "o1",
            0,
            LOINC,
            "8480-6",
            "2026-03-01T08:00:00Z",
            "120.0",
            "mm[Hg]",
            "final",
            "vital-signs",
        ),
        o(
            "o2",
            0,
            LOINC,
            "8480-6",
            "2026-03-15T08:30:00Z",
            "135",
            "mm[Hg]",
            "final",
            "vital-signs",
        ),
        o(
            "o3",
            0,
            LOINC,
            "8867-4",
            "2026-04-02T09:00:00Z",
            "72",
            "/min",
            "final",
            "vital-signs",
        ),
        o(
            "o4",
            1,
            LOINC,
            "8480-6",
            "2026-02-20T10:00:00Z",
            "95",
            "mm[Hg]",
            "preliminary",
            "vital-signs",
        ),
        o(
            "o5",
            1,
            LOINC,
            "2345-7",
            "2026-03-10T07:15:00Z",
            "101",
            "mg/dL",
            "amended",
            "laboratory",
        ),
        o(
            "o6",
            1,
            LOCAL,
            "bp-sys",
            "2026-03-31T23:00:00Z",
            "150",
            "mm[Hg]",
            "final",
            "vital-signs",
        ),
        o(
            "o7",
            2,
            LOINC,
            "8480-6",
            "2026-05-05T12:00:00Z",
            "110",
            "mm[Hg]",
            "final",
            "vital-signs",
        ),
    ]
}

fn obs_json(o: &Obs, patient_id: &str) -> String {
    format!(
        r#"{{"resourceType":"Observation",
        "identifier":[{{"system":"urn:clinflow-test:obs","value":"{key}"}}],
        "status":"{status}",
        "category":[{{"coding":[{{"system":"{CATEGORY}","code":"{category}"}}]}}],
        "code":{{"coding":[{{"system":"{system}","code":"{code}"}}]}},
        "subject":{{"reference":"Patient/{patient_id}"}},
        "effectiveDateTime":"{date}",
        "valueQuantity":{{"value":{value},"unit":"{unit}","system":"{UCUM}","code":"{unit}"}}}}"#,
        key = o.key,
        status = o.status,
        category = o.category,
        system = o.system,
        code = o.code,
        date = o.date,
        value = o.value,
        unit = o.unit,
    )
}

/// The test data, created: patient ids (by index) and observation ids (by key).
struct Data {
    patients: Vec<String>,
    obs: Vec<(Obs, String)>,
}

impl Data {
    /// The server ids of the observations `keep` selects.
    fn ids(&self, keep: impl Fn(&Obs) -> bool) -> BTreeSet<String> {
        self.obs
            .iter()
            .filter(|(o, _)| keep(o))
            .map(|(_, id)| id.clone())
            .collect()
    }
}

async fn create_data(app: &TestApp) -> Data {
    let mut patients = Vec::new();
    for (mrn, family, given) in PATIENTS {
        let p = json!({
            "resourceType": "Patient",
            "identifier": [{"system": PATIENT_SYSTEM, "value": mrn}],
            "name": [{"family": family, "given": [given]}],
        });
        patients.push(app.create(&app.admin, &p).await);
    }
    let mut obs = Vec::new();
    for o in observations() {
        let r = app
            .post(
                "/fhir/Observation",
                &app.admin,
                FHIR_JSON,
                &obs_json(&o, &patients[o.patient]),
            )
            .await;
        r.expect(201);
        obs.push((o, r.json()["id"].as_str().expect("an id").to_string()));
    }
    Data { patients, obs }
}

async fn found(app: &TestApp, rtype: &str, query: &str) -> BTreeSet<String> {
    let ids = app.search_ids(&app.admin, rtype, query).await;
    let set: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        set.len(),
        ids.len(),
        "{rtype}?{query} repeated a match: {ids:?}"
    );
    set
}

/// Asserts `rtype?query` finds exactly `expected`, which must not be empty
/// (an empty expectation would prove nothing).
async fn assert_finds(app: &TestApp, rtype: &str, query: &str, expected: BTreeSet<String>) {
    assert!(
        !expected.is_empty(),
        "{rtype}?{query}: the test data should match something"
    );
    assert_eq!(found(app, rtype, query).await, expected, "{rtype}?{query}");
}

fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn observation_token_and_reference_parameters(app: TestApp) {
    let d = create_data(&app).await;
    let p0 = &d.patients[0];
    // code: system|code, code alone, system|.
    assert_finds(
        &app,
        "Observation",
        &format!("code={}", enc(&format!("{LOINC}|8480-6"))),
        d.ids(|o| o.system == LOINC && o.code == "8480-6"),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        "code=8480-6",
        d.ids(|o| o.code == "8480-6"),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("code={}", enc(&format!("{LOINC}|"))),
        d.ids(|o| o.system == LOINC),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("code={}", enc(&format!("{LOCAL}|"))),
        d.ids(|o| o.system == LOCAL),
    )
    .await;
    // A comma is OR; repeating a parameter is AND.
    assert_finds(
        &app,
        "Observation",
        "code=8867-4,2345-7",
        d.ids(|o| o.code == "8867-4" || o.code == "2345-7"),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("code=8480-6&subject=Patient/{p0}"),
        d.ids(|o| o.code == "8480-6" && o.patient == 0),
    )
    .await;
    // status, category.
    for status in ["final", "preliminary", "amended"] {
        assert_finds(
            &app,
            "Observation",
            &format!("status={status}"),
            d.ids(|o| o.status == status),
        )
        .await;
    }
    assert_finds(
        &app,
        "Observation",
        "category=laboratory",
        d.ids(|o| o.category == "laboratory"),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("category={}", enc(&format!("{CATEGORY}|vital-signs"))),
        d.ids(|o| o.category == "vital-signs"),
    )
    .await;
    // identifier.
    assert_finds(
        &app,
        "Observation",
        &format!("identifier={}", enc("urn:clinflow-test:obs|o3")),
        d.ids(|o| o.key == "o3"),
    )
    .await;
    // subject, patient, subject:identifier.
    for (i, pid) in d.patients.iter().enumerate() {
        let expected = d.ids(|o| o.patient == i);
        assert_finds(
            &app,
            "Observation",
            &format!("subject=Patient/{pid}"),
            expected.clone(),
        )
        .await;
        assert_finds(
            &app,
            "Observation",
            &format!("patient={pid}"),
            expected.clone(),
        )
        .await;
        assert_finds(
            &app,
            "Observation",
            &format!("patient=Patient/{pid}"),
            expected.clone(),
        )
        .await;
        assert_finds(
            &app,
            "Observation",
            &format!(
                "subject:identifier={}",
                enc(&format!("{PATIENT_SYSTEM}|{}", PATIENTS[i].0))
            ),
            expected,
        )
        .await;
    }
    // No match is an empty searchset, not an error.
    let b = app
        .search(&app.admin, "Observation", "code=no-such-code")
        .await;
    assert!(match_ids(&b).is_empty());
}

/// Whether `date` (an instant) satisfies `prefix value` for a date search
/// value at day or month precision: compare at the value's precision.
fn date_matches(date: &str, prefix: &str, value: &str) -> bool {
    let at = &date[..value.len()];
    match prefix {
        "eq" => at == value,
        "ge" => at >= value,
        "gt" => at > value,
        "le" => at <= value,
        "lt" => at < value,
        other => panic!("prefix {other}"),
    }
}

async fn observation_dates_with_prefixes_and_partial_dates(app: TestApp) {
    let d = create_data(&app).await;
    for value in ["2026-03-15", "2026-03", "2026-04-02", "2026"] {
        for prefix in ["eq", "ge", "gt", "le", "lt"] {
            let expected = d.ids(|o| date_matches(o.date, prefix, value));
            let got = found(&app, "Observation", &format!("date={prefix}{value}")).await;
            assert_eq!(got, expected, "date={prefix}{value}");
        }
    }
    // No prefix means eq.
    assert_finds(
        &app,
        "Observation",
        "date=2026-03",
        d.ids(|o| o.date.starts_with("2026-03")),
    )
    .await;
    // A range by two bounds (AND).
    assert_finds(
        &app,
        "Observation",
        "date=ge2026-03-01&date=lt2026-03-31",
        d.ids(|o| o.date >= "2026-03-01" && o.date < "2026-03-31"),
    )
    .await;
    // An instant with a time zone: 2026-03-31T23:00Z is 2026-04-01 in Berlin.
    assert_finds(
        &app,
        "Observation",
        &format!("date=ge{}", enc("2026-04-01T00:30:00+02:00")),
        d.ids(|o| o.date >= "2026-03-31T22:30:00Z"),
    )
    .await;
}

async fn observation_value_quantity(app: TestApp) {
    let d = create_data(&app).await;
    let value = |o: &Obs| o.value.parse::<f64>().expect("a number");
    assert_finds(
        &app,
        "Observation",
        "value-quantity=gt100",
        d.ids(|o| value(o) > 100.0),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        "value-quantity=lt100",
        d.ids(|o| value(o) < 100.0),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        "value-quantity=ge135",
        d.ids(|o| value(o) >= 135.0),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        "value-quantity=le95",
        d.ids(|o| value(o) <= 95.0),
    )
    .await;
    // Unit-qualified equality: 120 matches the stored 120.0 (same value).
    assert_finds(
        &app,
        "Observation",
        &format!("value-quantity={}", enc(&format!("120|{UCUM}|mm[Hg]"))),
        d.ids(|o| value(o) == 120.0 && o.unit == "mm[Hg]"),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("value-quantity={}", enc(&format!("gt100|{UCUM}|mm[Hg]"))),
        d.ids(|o| value(o) > 100.0 && o.unit == "mm[Hg]"),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("value-quantity={}", enc("gt100||mg/dL")),
        d.ids(|o| value(o) > 100.0 && o.unit == "mg/dL"),
    )
    .await;
}

async fn last_updated_and_id(app: TestApp) {
    let d = create_data(&app).await;
    // Each resource's lastUpdated as the server reports it.
    let mut stamps: Vec<(String, String)> = Vec::new();
    for (_, id) in &d.obs {
        let r = app
            .get(&format!("/fhir/Observation/{id}"), &app.admin)
            .await;
        r.expect(200);
        let at = r.json()["meta"]["lastUpdated"]
            .as_str()
            .expect("meta.lastUpdated")
            .to_string();
        stamps.push((id.clone(), at));
    }
    // Write until the clock has visibly moved past the first resource, so
    // that `gt` separates something (a loop on observed state, no sleep).
    let first = stamps[0].1.clone();
    let (_, late_id) = &d.obs[d.obs.len() - 1];
    let mut body = app
        .get(&format!("/fhir/Observation/{late_id}"), &app.admin)
        .await
        .json();
    let late_stamp = loop {
        body.as_object_mut().expect("an object").remove("meta");
        let r = app
            .put(&format!("/fhir/Observation/{late_id}"), &app.admin, &body)
            .await;
        r.expect(200);
        body = r.json();
        let at = body["meta"]["lastUpdated"]
            .as_str()
            .expect("lastUpdated")
            .to_string();
        if at > first {
            break at;
        }
    };
    stamps.last_mut().expect("a stamp").1 = late_stamp;
    let after = |op: &str, t: &str| -> BTreeSet<String> {
        stamps
            .iter()
            .filter(|(_, at)| match op {
                "gt" => at.as_str() > t,
                "le" => at.as_str() <= t,
                _ => unreachable!(),
            })
            .map(|(id, _)| id.clone())
            .collect()
    };
    assert_finds(
        &app,
        "Observation",
        &format!("_lastUpdated=gt{}", enc(&first)),
        after("gt", &first),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("_lastUpdated=le{}", enc(&first)),
        after("le", &first),
    )
    .await;
    // _id, one and several.
    let (a, b) = (&d.obs[1].1, &d.obs[4].1);
    assert_finds(
        &app,
        "Observation",
        &format!("_id={a}"),
        BTreeSet::from([a.clone()]),
    )
    .await;
    assert_finds(
        &app,
        "Observation",
        &format!("_id={a},{b}"),
        BTreeSet::from([a.clone(), b.clone()]),
    )
    .await;
}

async fn patient_identifier_and_name(app: TestApp) {
    let d = create_data(&app).await;
    let by = |keep: &dyn Fn(&(&str, &str, &str)) -> bool| -> BTreeSet<String> {
        PATIENTS
            .iter()
            .zip(&d.patients)
            .filter(|(p, _)| keep(p))
            .map(|(_, id)| id.clone())
            .collect()
    };
    for (mrn, _, _) in PATIENTS {
        assert_finds(
            &app,
            "Patient",
            &format!("identifier={}", enc(&format!("{PATIENT_SYSTEM}|{mrn}"))),
            by(&|p| p.0 == mrn),
        )
        .await;
        assert_finds(
            &app,
            "Patient",
            &format!("identifier={mrn}"),
            by(&|p| p.0 == mrn),
        )
        .await;
    }
    assert!(found(
        &app,
        "Patient",
        &format!("identifier={}", enc("urn:other|MRN-1"))
    )
    .await
    .is_empty());
    // name: case-insensitive starts-with on any part of the name.
    let name = |p: &(&str, &str, &str), q: &str| {
        p.1.to_lowercase().starts_with(q) || p.2.to_lowercase().starts_with(q)
    };
    for q in ["alv", "BROWN", "li"] {
        let ql = q.to_lowercase();
        assert_finds(&app, "Patient", &format!("name={q}"), by(&|p| name(p, &ql))).await;
    }
    assert_finds(&app, "Patient", "family=chen", by(&|p| p.1 == "Chen")).await;
}

async fn count_and_next_links_walk_every_match_once(app: TestApp) {
    let d = create_data(&app).await;
    let all = d.ids(|_| true);
    for (query, expected) in [
        ("_count=2".to_string(), all.clone()),
        ("_count=3&_sort=-date".to_string(), all.clone()),
        ("_count=1&_sort=_lastUpdated".to_string(), all.clone()),
        (
            "_count=2&code=8480-6".to_string(),
            d.ids(|o| o.code == "8480-6"),
        ),
    ] {
        let count: usize = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("_count="))
            .and_then(|c| c.parse().ok())
            .expect("a count");
        let mut seen = Vec::new();
        let mut pages = 0;
        let mut bundle = app.search(&app.admin, "Observation", &query).await;
        loop {
            pages += 1;
            let ids = match_ids(&bundle);
            assert!(ids.len() <= count, "{query}: page of {}", ids.len());
            seen.extend(ids);
            let Some(next) = next_link(&bundle) else {
                break;
            };
            assert!(pages <= expected.len(), "{query}: more pages than matches");
            let r = app.get(&app.relative(&next), &app.admin).await;
            r.expect(200);
            bundle = r.json();
        }
        let set: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(
            set.len(),
            seen.len(),
            "{query}: a match came twice: {seen:?}"
        );
        assert_eq!(set, expected, "{query}");
        assert!(
            pages >= expected.len().div_ceil(count),
            "{query}: {pages} pages"
        );
    }
    // Paging holds while data changes: a resource created between pages
    // never makes an earlier match come again.
    let mut bundle = app.search(&app.admin, "Observation", "_count=2").await;
    let mut seen = match_ids(&bundle);
    app.post(
        "/fhir/Observation",
        &app.admin,
        FHIR_JSON,
        &obs_json(&observations()[0], &d.patients[0]),
    )
    .await
    .expect(201);
    while let Some(next) = next_link(&bundle) {
        bundle = app.get(&app.relative(&next), &app.admin).await.json();
        seen.extend(match_ids(&bundle));
    }
    let set: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(set.len(), seen.len(), "a match came twice: {seen:?}");
    assert!(set.is_superset(&all));
}

async fn sort_by_date_and_last_updated(app: TestApp) {
    let d = create_data(&app).await;
    let id_of_key: std::collections::HashMap<String, &Obs> =
        d.obs.iter().map(|(o, id)| (id.clone(), o)).collect();
    let mut by_date: Vec<&(Obs, String)> = d.obs.iter().collect();
    by_date.sort_by_key(|(o, _)| o.date);
    let asc: Vec<String> = by_date.iter().map(|(_, id)| id.clone()).collect();
    let desc: Vec<String> = asc.iter().rev().cloned().collect();
    assert_eq!(
        app.search_ids(&app.admin, "Observation", "_sort=date")
            .await,
        asc
    );
    assert_eq!(
        app.search_ids(&app.admin, "Observation", "_sort=-date")
            .await,
        desc
    );
    // The same order across pages.
    assert_eq!(
        app.search_ids(&app.admin, "Observation", "_sort=date&_count=2")
            .await,
        asc
    );
    assert_eq!(
        app.search_ids(&app.admin, "Observation", "_sort=-date&_count=3")
            .await,
        desc
    );
    // With a filter.
    let filtered: Vec<String> = asc
        .iter()
        .filter(|id| id_of_key[*id].code == "8480-6")
        .cloned()
        .collect();
    assert_eq!(
        app.search_ids(
            &app.admin,
            "Observation",
            "code=8480-6&_sort=-date&_count=2"
        )
        .await,
        filtered.iter().rev().cloned().collect::<Vec<_>>()
    );
    // _lastUpdated: the order of the stamps the server gave.
    for (query, descending) in [
        ("_sort=_lastUpdated&_count=2", false),
        ("_sort=-_lastUpdated", true),
    ] {
        let b_ids = app.search_ids(&app.admin, "Observation", query).await;
        assert_eq!(
            b_ids.iter().cloned().collect::<BTreeSet<_>>(),
            d.ids(|_| true)
        );
        let mut stamps = Vec::new();
        for id in &b_ids {
            let r = app
                .get(&format!("/fhir/Observation/{id}"), &app.admin)
                .await;
            stamps.push(
                r.json()["meta"]["lastUpdated"]
                    .as_str()
                    .expect("a stamp")
                    .to_string(),
            );
        }
        let mut sorted = stamps.clone();
        sorted.sort();
        if descending {
            sorted.reverse();
        }
        assert_eq!(stamps, sorted, "{query}");
    }
    // Updating a resource moves it to the end of _lastUpdated order.
    let (_, first) = &d.obs[0];
    let mut body = app
        .get(&format!("/fhir/Observation/{first}"), &app.admin)
        .await
        .json();
    body.as_object_mut().expect("an object").remove("meta");
    app.put(&format!("/fhir/Observation/{first}"), &app.admin, &body)
        .await
        .expect(200);
    let order = app
        .search_ids(&app.admin, "Observation", "_sort=-_lastUpdated")
        .await;
    assert_eq!(order.first(), Some(first));
}

async fn total_only_when_asked(app: TestApp) {
    let d = create_data(&app).await;
    let expected = d.ids(|o| o.code == "8480-6").len() as u64;
    let b = app.search(&app.admin, "Observation", "code=8480-6").await;
    assert!(b.get("total").is_none(), "no total unless asked: {b}");
    let b = app
        .search(
            &app.admin,
            "Observation",
            "code=8480-6&_total=accurate&_count=1",
        )
        .await;
    assert_eq!(b["total"].as_u64(), Some(expected));
    assert_eq!(match_ids(&b).len(), 1);
    let b = app
        .search(&app.admin, "Observation", "_total=accurate&_count=0")
        .await;
    assert_eq!(b["total"].as_u64(), Some(d.obs.len() as u64));
    assert!(match_ids(&b).is_empty());
    let b = app.search(&app.admin, "Observation", "_total=none").await;
    assert!(b.get("total").is_none());
}

async fn include_adds_the_subject_patients(app: TestApp) {
    let d = create_data(&app).await;
    let query = "code=8480-6&_include=Observation:subject";
    let b = app.search(&app.admin, "Observation", query).await;
    let matched: BTreeSet<String> = match_ids(&b).into_iter().collect();
    assert_eq!(matched, d.ids(|o| o.code == "8480-6"));
    let included: Vec<Value> = entries(&b)
        .into_iter()
        .filter(|e| e["search"]["mode"] == "include")
        .collect();
    let inc_ids: Vec<String> = included
        .iter()
        .map(|e| {
            assert_eq!(e["resource"]["resourceType"], "Patient");
            e["resource"]["id"].as_str().expect("an id").to_string()
        })
        .collect();
    let expected: BTreeSet<String> = d
        .obs
        .iter()
        .filter(|(o, _)| o.code == "8480-6")
        .map(|(o, _)| d.patients[o.patient].clone())
        .collect();
    assert_eq!(
        inc_ids.len(),
        expected.len(),
        "each Patient once: {inc_ids:?}"
    );
    assert_eq!(inc_ids.into_iter().collect::<BTreeSet<_>>(), expected);
    // Without _include there are only matches.
    let b = app.search(&app.admin, "Observation", "code=8480-6").await;
    assert!(entries(&b).iter().all(|e| e["search"]["mode"] == "match"));
}

async fn unknown_parameters_are_400(app: TestApp) {
    for query in [
        "Observation?colour=red",
        "Observation?code:fuzzy=1",
        "Observation?_sort=value",
        "Observation?date=yesterday",
        "Observation?_include=Observation:performer",
        "Patient?code=8480-6",
        "Observation?subject.name=x",
        "Observation?_count=many",
    ] {
        let r = app.get(&format!("/fhir/{query}"), &app.admin).await;
        r.outcome(400);
    }
}

async fn trial_resources_research_subject_and_organization(app: TestApp) {
    app.load_reference_trial().await;
    let trial = trial_id();
    let subject_ids: BTreeSet<String> = subjects().into_iter().map(|s| s.id).collect();
    assert_finds(
        &app,
        "ResearchSubject",
        &format!("study=ResearchStudy/{trial}"),
        subject_ids.clone(),
    )
    .await;
    assert_finds(
        &app,
        "ResearchSubject",
        &format!("study={trial}"),
        subject_ids,
    )
    .await;
    assert!(
        found(&app, "ResearchSubject", "study=ResearchStudy/OTHER-TRIAL")
            .await
            .is_empty()
    );
    let p = protocol();
    // address-country and name (prefix, case-insensitive) on Organization.
    for site in &p.sites {
        let country = site.country.as_str();
        assert_finds(
            &app,
            "Organization",
            &format!("address-country={country}"),
            p.sites
                .iter()
                .filter(|s| s.country.as_str() == country)
                .map(|s| s.id.as_str().to_string())
                .collect(),
        )
        .await;
        let first_word = site.name.split(' ').next().expect("a word");
        let q = first_word.to_uppercase();
        assert_finds(
            &app,
            "Organization",
            &format!("name={}", enc(&q)),
            p.sites
                .iter()
                .filter(|s| {
                    s.name
                        .to_lowercase()
                        .starts_with(&first_word.to_lowercase())
                })
                .map(|s| s.id.as_str().to_string())
                .collect(),
        )
        .await;
    }
    assert_eq!(
        found(&app, "Organization", "").await,
        site_ids().into_iter().collect::<BTreeSet<_>>()
    );
}

async fn appointment_actor_and_date(app: TestApp) {
    let d = create_data(&app).await;
    // (patient index, start, end)
    let appts = [
        (0, "2026-03-16T09:00:00Z", "2026-03-16T10:00:00Z"),
        (0, "2026-04-01T09:00:00Z", "2026-04-01T09:30:00Z"),
        (1, "2026-03-20T14:00:00Z", "2026-03-20T15:00:00Z"),
    ];
    let mut ids = Vec::new();
    for (p, start, end) in appts {
        let a = json!({
            "resourceType": "Appointment",
            "status": "booked",
            "start": start,
            "end": end,
            "participant": [{"actor": {"reference": format!("Patient/{}", d.patients[p])}, "status": "accepted"}],
        });
        ids.push(app.create(&app.admin, &a).await);
    }
    let select = |keep: &dyn Fn(usize, &str, &str) -> bool| -> BTreeSet<String> {
        appts
            .iter()
            .zip(&ids)
            .filter(|((p, s, e), _)| keep(*p, s, e))
            .map(|(_, id)| id.clone())
            .collect()
    };
    for (i, pid) in d.patients.iter().enumerate().take(2) {
        assert_finds(
            &app,
            "Appointment",
            &format!("actor=Patient/{pid}"),
            select(&|p, _, _| p == i),
        )
        .await;
        assert_finds(
            &app,
            "Appointment",
            &format!("patient={pid}"),
            select(&|p, _, _| p == i),
        )
        .await;
    }
    assert_finds(
        &app,
        "Appointment",
        "date=2026-03",
        select(&|_, s, _| s.starts_with("2026-03")),
    )
    .await;
    assert_finds(
        &app,
        "Appointment",
        "date=2026-03-16",
        select(&|_, s, _| s.starts_with("2026-03-16")),
    )
    .await;
    assert_finds(
        &app,
        "Appointment",
        "date=ge2026-03-18",
        select(&|_, s, _| &s[..10] >= "2026-03-18"),
    )
    .await;
    assert_finds(
        &app,
        "Appointment",
        "date=lt2026-03-18",
        select(&|_, s, _| &s[..10] < "2026-03-18"),
    )
    .await;
}

async fn adverse_event_seriousness(app: TestApp) {
    let d = create_data(&app).await;
    let system = "http://terminology.hl7.org/CodeSystem/adverse-event-seriousness";
    let events = [(0, "serious"), (1, "non-serious"), (2, "non-serious")];
    let mut ids = Vec::new();
    for (p, seriousness) in events {
        let ae = json!({
            "resourceType": "AdverseEvent",
            "actuality": "actual",
            "subject": {"reference": format!("Patient/{}", d.patients[p])},
            "date": "2026-03-02T14:30:00Z",
            "seriousness": {"coding": [{"system": system, "code": seriousness}]},
        });
        ids.push(app.create(&app.admin, &ae).await);
    }
    for code in ["serious", "non-serious"] {
        let expected: BTreeSet<String> = events
            .iter()
            .zip(&ids)
            .filter(|((_, s), _)| *s == code)
            .map(|(_, id)| id.clone())
            .collect();
        assert_finds(
            &app,
            "AdverseEvent",
            &format!("seriousness={code}"),
            expected.clone(),
        )
        .await;
        assert_finds(
            &app,
            "AdverseEvent",
            &format!("seriousness={}", enc(&format!("{system}|{code}"))),
            expected,
        )
        .await;
    }
    assert_finds(
        &app,
        "AdverseEvent",
        &format!("subject=Patient/{}", d.patients[1]),
        BTreeSet::from([ids[1].clone()]),
    )
    .await;
}
