//! FHIR input: a Bundle (`transaction`, `batch` or `collection`; each
//! entry's resource is an item) or NDJSON (each non-empty line an item).
//!
//! Each resource is validated with [`clinflow_fhir::validate::validate_json`]
//! (an invalid one is rejected with the first issue and its element path as
//! the location), given the item key (an `identifier` with
//! [`crate::provenance::ITEM_KEY_SYSTEM`], from the input's hash and the
//! item's place) and a provenance extension. A resource that already has an
//! `id` keeps none of it: the store assigns ids. References by identifier
//! are left for the caller to resolve: that needs the store.

use clinflow_fhir::validate::validate_json;
use clinflow_fhir::Json;

use crate::outcome::{ItemOutcome, Produced, Reason};
use crate::provenance::{InputFormat, Provenance, PROVENANCE_URL};

/// One outcome per entry of a Bundle; a body that is not a Bundle is one
/// rejected item.
pub fn ingest_fhir_bundle(input: &[u8]) -> Vec<ItemOutcome> {
    let prov = Provenance::of_input(InputFormat::Fhir, input);
    let bundle = std::str::from_utf8(input)
        .map_err(|e| format!("not UTF-8: {e}"))
        .and_then(|t| Json::parse(t).map_err(|e| format!("not JSON: {e}")));
    let whole = |why: String| {
        let mut o = ItemOutcome::new(0, "Bundle".into());
        o.reject(Reason::Malformed(why), "Bundle");
        vec![o]
    };
    let bundle = match bundle {
        Ok(b) => b,
        Err(why) => return whole(why),
    };
    if bundle.get("resourceType").and_then(Json::as_str) != Some("Bundle") {
        return whole("the body is not a Bundle".into());
    }
    match bundle.get("type").and_then(Json::as_str) {
        Some("transaction" | "batch" | "collection") => {}
        other => {
            return whole(format!(
                "Bundle.type {other:?}: send a transaction, batch or collection"
            ))
        }
    }
    let entries = match bundle.get("entry") {
        None => return Vec::new(),
        Some(Json::Array(a)) => a.clone(),
        Some(_) => return whole("Bundle.entry is not an array".into()),
    };
    entries
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let location = format!("Bundle.entry[{i}]");
            match e.get("resource") {
                Some(r) => item(&prov, i, location, r.clone()),
                None => {
                    let mut o = ItemOutcome::new(i, location.clone());
                    o.reject(
                        Reason::Malformed("the entry has no resource".into()),
                        location,
                    );
                    o
                }
            }
        })
        .collect()
}

/// One outcome per non-empty line.
pub fn ingest_fhir_ndjson(input: &[u8]) -> Vec<ItemOutcome> {
    let prov = Provenance::of_input(InputFormat::Fhir, input);
    let mut out = Vec::new();
    for (n, line) in input.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let index = out.len();
        let location = format!("line {}", n + 1);
        let json = std::str::from_utf8(line)
            .map_err(|e| format!("not UTF-8: {e}"))
            .and_then(|t| Json::parse(t).map_err(|e| format!("not JSON: {e}")));
        out.push(match json {
            Ok(j) => item(&prov, index, location, j),
            Err(why) => {
                let mut o = ItemOutcome::new(index, location.clone());
                o.reject(Reason::Malformed(why), location);
                o
            }
        });
    }
    out
}

fn item(prov: &Provenance, index: usize, location: String, mut json: Json) -> ItemOutcome {
    let mut out = ItemOutcome::new(index, location.clone());
    let rtype = json
        .get("resourceType")
        .and_then(Json::as_str)
        .unwrap_or("")
        .to_string();
    let key = prov.key(&location);
    let mut added_key = false;
    if let Json::Object(members) = &mut json {
        members.retain(|(k, _)| k != "id");
        added_key = add_key(members, &key);
        add_provenance(members, prov, &location);
    }
    let single = added_key.then(|| {
        let mut j = json.clone();
        if let Json::Object(members) = &mut j {
            if let Some((_, v)) = members.iter_mut().find(|(k, _)| k == "identifier") {
                *v = Provenance::identifier(&key);
            }
        }
        j
    });
    let validated = match (validate_json(json, None, ""), single) {
        // A type whose identifier is a single value (AdverseEvent) takes
        // the key as that value.
        (Err(o), Some(single))
            if o.issues
                .first()
                .and_then(|i| i.expression.first())
                .is_some_and(|e| e.ends_with(".identifier")) =>
        {
            validate_json(single, None, "")
        }
        (r, _) => r,
    };
    match validated {
        Ok(resource) => out.stored.push(Produced {
            full_url: key,
            resource,
        }),
        Err(outcome) => {
            let first = outcome.issues.first();
            let at = first
                .and_then(|i| i.expression.first())
                .map_or(location.clone(), |e| format!("{location}, {e}"));
            out.reject(
                Reason::InvalidResource {
                    resource_type: if rtype.is_empty() {
                        "resource".into()
                    } else {
                        rtype
                    },
                    detail: first.map_or_else(String::new, |i| i.diagnostics.clone()),
                },
                at,
            );
        }
    }
    out
}

/// The item key as one more `identifier` (an array in most resources);
/// `true` when there was no identifier (the caller may need the
/// single-valued form). A single identifier sent (AdverseEvent) is kept,
/// and the item then has no key.
fn add_key(members: &mut Vec<(String, Json)>, key: &str) -> bool {
    let ident = Provenance::identifier(key);
    match members.iter_mut().find(|(k, _)| k == "identifier") {
        Some((_, Json::Array(ids))) => {
            ids.push(ident);
            false
        }
        Some(_) => false,
        None => {
            members.push(("identifier".into(), Json::Array(vec![ident])));
            true
        }
    }
}

fn add_provenance(members: &mut Vec<(String, Json)>, prov: &Provenance, location: &str) {
    let sub = |url: &str, kind: &str, v: &str| {
        Json::Object(vec![
            ("url".into(), Json::String(url.into())),
            (kind.into(), Json::String(v.into())),
        ])
    };
    let ext = Json::Object(vec![
        ("url".into(), Json::String(PROVENANCE_URL.into())),
        (
            "extension".into(),
            Json::Array(vec![
                sub("format", "valueCode", prov.format.code()),
                sub("sha256", "valueString", &prov.sha256),
                sub("location", "valueString", location),
            ]),
        ),
    ]);
    match members.iter_mut().find(|(k, _)| k == "extension") {
        Some((_, Json::Array(exts))) => exts.push(ext),
        Some(_) => {}
        None => members.push(("extension".into(), Json::Array(vec![ext]))),
    }
}
