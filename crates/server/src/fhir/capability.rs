//! `GET /fhir/metadata`: the CapabilityStatement, built from the same
//! registry of search parameters the store indexes, so it lists exactly what
//! is supported.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use clinflow_fhir::index::{self, ParamKind};
use serde_json::{json, Value};

use super::FHIR_JSON;

fn kind_name(k: ParamKind) -> &'static str {
    match k {
        ParamKind::Token => "token",
        ParamKind::String => "string",
        ParamKind::Date => "date",
        ParamKind::Reference => "reference",
        ParamKind::Quantity => "quantity",
    }
}

/// The CapabilityStatement as JSON.
pub fn capability_statement() -> Value {
    let interactions = |search: bool| {
        let mut v = vec![
            json!({"code": "read"}),
            json!({"code": "vread"}),
            json!({"code": "update"}),
            json!({"code": "delete"}),
            json!({"code": "history-instance"}),
            json!({"code": "create"}),
        ];
        if search {
            v.push(json!({"code": "search-type"}));
        }
        v
    };
    let mut resources: Vec<Value> = index::indexed_types()
        .iter()
        .map(|t| {
            let mut params = vec![
                json!({"name": "_id", "type": "token"}),
                json!({"name": "_lastUpdated", "type": "date"}),
            ];
            params.extend(
                index::params(t)
                    .iter()
                    .map(|p| json!({"name": p.name, "type": kind_name(p.kind)})),
            );
            let mut r = json!({
                "type": t,
                "interaction": interactions(true),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": false,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchParam": params,
            });
            if *t == "Observation" {
                r["searchInclude"] = json!(["Observation:subject"]);
            }
            r
        })
        .collect();
    resources.push(json!({
        "type": "AuditEvent",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [
            {"name": "date", "type": "date"},
            {"name": "agent", "type": "string"},
            {"name": "entity", "type": "reference"},
        ],
    }));
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-28",
        "kind": "instance",
        "software": {"name": "clinflow", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "clinflow clinical data platform"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [{
            "mode": "server",
            "documentation": "Every other R4 resource type can be created, read, updated, deleted and its history read; only the types listed with search parameters are searchable.",
            "security": {
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "OAuth", "display": "Bearer token"}], "text": "Authorization: Bearer TOKEN"}],
                "description": "Every request needs a bearer token; what it may see depends on its role and site."
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }],
    })
}

pub async fn metadata() -> Response {
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON))],
        capability_statement().to_string(),
    )
        .into_response()
}
