//! Doctors as FHIR: a `Practitioner` (name, e-mail, mobile number) and a
//! `PractitionerRole` (its site's `Organization`, its specialty), read
//! back as the [`Recipient`]s of a campaign, and loaded from the
//! `id,family,given,email,phone,site,specialty` CSV file.

use std::collections::HashMap;

use clinflow_store::{Scope, Store, StoredResource};
use serde_json::{json, Value};

/// The identifier system of a practitioner's clinflow id.
pub const PRACTITIONER_SYSTEM: &str = "urn:clinflow:practitioner";
/// The coding system of a specialty code that is not a SNOMED CT id.
pub const SPECIALTY_SYSTEM: &str = "urn:clinflow:specialty";
const SNOMED: &str = "http://snomed.info/sct";

/// One row of the practitioners file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PractitionerRow {
    pub id: String,
    pub family: String,
    pub given: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub site: Option<String>,
    pub specialty: Option<String>,
}

/// Why the file was refused: the line (1-based, the header is line 1) and
/// what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct CsvError {
    pub line: u64,
    pub reason: String,
}

const COLUMNS: [&str; 7] = [
    "id",
    "family",
    "given",
    "email",
    "phone",
    "site",
    "specialty",
];

/// Parses the whole file; any bad row refuses it (nothing is loaded from a
/// file with an error in it).
pub fn parse_csv(text: &[u8]) -> Result<Vec<PractitionerRow>, CsvError> {
    let mut r = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(text);
    let header = r.headers().map_err(|e| CsvError {
        line: 1,
        reason: format!("unreadable header: {e}"),
    })?;
    let mut at = [usize::MAX; 7];
    for (i, name) in header.iter().enumerate() {
        if let Some(c) = COLUMNS.iter().position(|c| c.eq_ignore_ascii_case(name)) {
            at[c] = i;
        }
    }
    if let Some(missing) = COLUMNS.iter().zip(at).find(|(_, i)| *i == usize::MAX) {
        return Err(CsvError {
            line: 1,
            reason: format!(
                "no column {:?} (the header must name {})",
                missing.0,
                COLUMNS.join(",")
            ),
        });
    }
    let mut seen = HashMap::new();
    let mut out = Vec::new();
    for (n, rec) in r.records().enumerate() {
        let line = n as u64 + 2;
        let rec = rec.map_err(|e| CsvError {
            line,
            reason: e.to_string(),
        })?;
        let get = |c: usize| rec.get(at[c]).unwrap_or("").to_string();
        let opt = |c: usize| Some(get(c)).filter(|s| !s.is_empty());
        let id = get(0);
        let bad = |reason: String| CsvError { line, reason };
        if id.is_empty()
            || id.len() > 59
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(bad(format!(
                "id {id:?}: 1 to 59 letters, digits, '-' or '.'"
            )));
        }
        if let Some(first) = seen.insert(id.clone(), line) {
            return Err(bad(format!("id {id:?} is already on line {first}")));
        }
        if get(1).is_empty() {
            return Err(bad("family name is empty".into()));
        }
        let phone = opt(4);
        if let Some(p) = &phone {
            clinflow_notify::phone::e164(p)
                .map_err(|e| bad(format!("phone {p:?} is not E.164: {e}")))?;
        }
        let email = opt(3);
        if let Some(e) = &email {
            if e.parse::<lettre::Address>().is_err() {
                return Err(bad(format!("email {e:?} is not an e-mail address")));
            }
        }
        out.push(PractitionerRow {
            id,
            family: get(1),
            given: get(2),
            email,
            phone,
            site: opt(5),
            specialty: opt(6),
        });
    }
    Ok(out)
}

/// The id of a practitioner's role resource.
pub fn role_id(practitioner: &str) -> String {
    format!("{practitioner}-role")
}

/// The row's `Practitioner` and `PractitionerRole`.
pub fn resources(row: &PractitionerRow) -> [Value; 2] {
    let mut telecom = Vec::new();
    if let Some(e) = &row.email {
        telecom.push(json!({"system": "email", "value": e, "use": "work"}));
    }
    if let Some(p) = &row.phone {
        telecom.push(json!({"system": "sms", "value": p, "use": "mobile"}));
    }
    let mut name = json!({"family": row.family});
    if !row.given.is_empty() {
        name["given"] = json!([row.given]);
    }
    let mut practitioner = json!({
        "resourceType": "Practitioner",
        "id": row.id,
        "identifier": [{"system": PRACTITIONER_SYSTEM, "value": row.id}],
        "active": true,
        "name": [name],
    });
    if !telecom.is_empty() {
        practitioner["telecom"] = Value::Array(telecom);
    }
    let mut role = json!({
        "resourceType": "PractitionerRole",
        "id": role_id(&row.id),
        "active": true,
        "practitioner": {"reference": format!("Practitioner/{}", row.id)},
    });
    if let Some(site) = &row.site {
        role["organization"] = json!({"reference": format!("Organization/{site}")});
    }
    if let Some(code) = &row.specialty {
        let system = if code.bytes().all(|b| b.is_ascii_digit()) {
            SNOMED
        } else {
            SPECIALTY_SYSTEM
        };
        role["specialty"] = json!([{"coding": [{"system": system, "code": code}]}]);
    }
    [practitioner, role]
}

/// A campaign's possible recipient, read from the store.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recipient {
    pub id: String,
    pub family: String,
    pub given: String,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub sites: Vec<String>,
    pub specialties: Vec<String>,
}

impl Recipient {
    /// "Given Family".
    pub fn name(&self) -> String {
        if self.given.is_empty() {
            self.family.clone()
        } else {
            format!("{} {}", self.given, self.family)
        }
    }
}

/// Every active practitioner with their roles' sites and specialties, in
/// id order.
pub async fn recipients(store: &Store) -> anyhow::Result<Vec<Recipient>> {
    let (practitioners, roles) = tokio::try_join!(
        store.current_resources("Practitioner", None, Scope::All),
        store.current_resources("PractitionerRole", None, Scope::All),
    )?;
    let mut by_id: std::collections::BTreeMap<String, Recipient> = Default::default();
    for p in practitioners.iter().filter(|p| !p.deleted) {
        if let Some(r) = recipient_of(p) {
            by_id.insert(r.id.clone(), r);
        }
    }
    for role in roles.iter().filter(|r| !r.deleted) {
        let Ok(v) = serde_json::from_str::<Value>(role.body.as_deref().unwrap_or("")) else {
            continue;
        };
        if v["active"] == json!(false) {
            continue;
        }
        let Some(pid) = v["practitioner"]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Practitioner/"))
        else {
            continue;
        };
        let Some(rec) = by_id.get_mut(pid) else {
            continue;
        };
        if let Some(site) = v["organization"]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Organization/"))
        {
            rec.sites.push(site.to_string());
        }
        for s in v["specialty"].as_array().into_iter().flatten() {
            for c in s["coding"].as_array().into_iter().flatten() {
                if let Some(code) = c["code"].as_str() {
                    rec.specialties.push(code.to_string());
                }
            }
        }
    }
    Ok(by_id.into_values().collect())
}

fn recipient_of(p: &StoredResource) -> Option<Recipient> {
    let v: Value = serde_json::from_str(p.body.as_deref()?).ok()?;
    if v["active"] == json!(false) {
        return None;
    }
    let name = &v["name"][0];
    let telecom = |system: &str| {
        v["telecom"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["system"] == system)
            .and_then(|t| t["value"].as_str())
            .map(str::to_string)
    };
    Some(Recipient {
        id: p.id.clone(),
        family: name["family"].as_str().unwrap_or_default().to_string(),
        given: name["given"]
            .as_array()
            .map(|g| {
                g.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default(),
        email: telecom("email"),
        phone: telecom("sms").or_else(|| telecom("phone")),
        sites: Vec::new(),
        specialties: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_with_a_bad_row_is_refused_naming_its_line() {
        let text = b"id,family,given,email,phone,site,specialty\nd1,Ng,Ana,ana@example.org,+4915112345678,site-01,cardiology\nd2,Li,,li@example.org,0151,site-01,\n";
        let e = parse_csv(text).unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.reason.contains("E.164"), "{e}");
    }

    #[test]
    fn rows_become_a_practitioner_and_a_role() {
        let rows = parse_csv(b"id,family,given,email,phone,site,specialty\nd1,Ng,Ana,ana@example.org,+4915112345678,site-01,394579002\n").unwrap();
        let [p, r] = resources(&rows[0]);
        assert_eq!(p["telecom"][1]["value"], "+4915112345678");
        assert_eq!(r["organization"]["reference"], "Organization/site-01");
        assert_eq!(r["specialty"][0]["coding"][0]["system"], SNOMED);
    }

    #[test]
    fn duplicate_ids_and_missing_columns_are_refused() {
        assert!(parse_csv(b"id,family\nd1,Ng\n")
            .unwrap_err()
            .reason
            .contains("no column"));
        let e = parse_csv(b"id,family,given,email,phone,site,specialty\nd1,Ng,,,,,\nd1,Li,,,,,\n")
            .unwrap_err();
        assert_eq!((e.line, e.reason.contains("line 2")), (3, true));
    }
}

/// What a load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub created: usize,
    pub updated: usize,
    pub unchanged: usize,
}

/// Writes the rows' resources where they differ from what is stored
/// (idempotent), in writes of at most 1,000 resources, each with its audit
/// record (`audit` is the template: who, from where, why).
pub async fn load(
    store: &Store,
    rows: &[PractitionerRow],
    audit: clinflow_store::AuditRecord,
) -> anyhow::Result<LoadReport> {
    use clinflow_store::{Expect, WriteRequest};
    let mut report = LoadReport::default();
    let now = clinflow_store::now_millis();
    let mut ops = Vec::new();
    for row in rows {
        for resource in resources(row) {
            let rtype = resource["resourceType"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let id = resource["id"].as_str().unwrap_or_default().to_string();
            let current = store.read_current(&rtype, &id).await?;
            let expect = match &current {
                Some(c) if !c.deleted => {
                    let same = c
                        .body
                        .as_deref()
                        .and_then(|b| serde_json::from_str::<Value>(b).ok())
                        .is_some_and(|mut v| {
                            if let Some(m) = v.as_object_mut() {
                                m.remove("meta");
                            }
                            v == resource
                        });
                    if same {
                        report.unchanged += 1;
                        continue;
                    }
                    report.updated += 1;
                    Expect::Version(c.version)
                }
                Some(c) => {
                    report.created += 1;
                    Expect::Version(c.version)
                }
                None => {
                    report.created += 1;
                    Expect::Absent
                }
            };
            ops.push(crate::fhir::write::built_op(&resource, &id, expect, now)?);
        }
    }
    for chunk in ops.chunks(1000) {
        let mut rec = audit.clone();
        rec.time = now;
        rec.action = "practitioners-load".into();
        rec.resource_type = Some("Practitioner".into());
        rec.detail = Some(format!("{} resources written", chunk.len()));
        store
            .write(WriteRequest {
                queries: Vec::new(),
                ops: chunk.to_vec(),
                audit: vec![rec],
            })
            .await?;
    }
    Ok(report)
}
