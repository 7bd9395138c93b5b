//! A trial site: its checked fields, how it is read from the API's JSON, and
//! how it is stored, as the FHIR `Organization` of the same id.
//!
//! Invariant: the site registry has no table of its own. A site *is* the
//! current version of an `Organization` carrying the site identifier
//! ([`clinflow_protocol::fhir::SITE_SYSTEM`]), so the registry and the FHIR
//! store cannot disagree: [`Site::to_organization`] and
//! [`Site::from_organization`] are inverse on every field a site has.

use clinflow_protocol::fhir::{SITE_SYSTEM, TIMEZONE_URL};
use clinflow_protocol::{Country, E164Phone, Email, SiteId};
use serde_json::{json, Map, Value};

/// A site, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub id: SiteId,
    pub name: String,
    pub country: Country,
    pub city: String,
    /// IANA time zone name (`Europe/Berlin`).
    pub timezone: String,
    /// `false` once the site stops taking part (it stays listed).
    pub active: bool,
    pub phone: Option<E164Phone>,
    pub email: Option<Email>,
}

/// Why a site's JSON was refused: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("site field {field:?}: {reason}")]
pub struct SiteError {
    pub field: &'static str,
    pub reason: String,
}

fn err(field: &'static str, reason: impl Into<String>) -> SiteError {
    SiteError {
        field,
        reason: reason.into(),
    }
}

/// Fields the API accepts in a site; the derived ones (`trials`,
/// `version`, `updated`) are accepted and ignored, so that a client may PUT
/// back what it read.
const FIELDS: &[&str] = &[
    "id", "name", "country", "city", "timezone", "active", "phone", "email", "trials", "version",
    "updated",
];

fn text(
    m: &Map<String, Value>,
    field: &'static str,
    max: usize,
) -> Result<Option<String>, SiteError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t = s.trim();
            if t.is_empty() {
                return Err(err(field, "is empty"));
            }
            if t.chars().count() > max {
                return Err(err(field, format!("is longer than {max} characters")));
            }
            if t.chars().any(char::is_control) {
                return Err(err(field, "holds control characters"));
            }
            Ok(Some(t.to_string()))
        }
        Some(_) => Err(err(field, "must be a string")),
    }
}

fn required(m: &Map<String, Value>, field: &'static str, max: usize) -> Result<String, SiteError> {
    text(m, field, max)?.ok_or_else(|| err(field, "is required"))
}

/// A time zone name's shape: `Area/Location` (or `UTC`), letters, digits
/// and `_+-/` only. The tz database itself is not consulted.
fn check_timezone(tz: &str) -> Result<(), SiteError> {
    let shape = tz == "UTC"
        || (tz.contains('/')
            && !tz.starts_with('/')
            && !tz.ends_with('/')
            && tz
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+-/".contains(&b)));
    if shape {
        Ok(())
    } else {
        Err(err(
            "timezone",
            "is not an IANA time zone name such as Europe/Berlin",
        ))
    }
}

impl Site {
    /// Reads a site from the API's JSON. `path_id` is the id in the URL
    /// (PUT): the body's `id`, when present, must be the same.
    pub fn from_json(v: &Value, path_id: Option<&str>) -> Result<Site, SiteError> {
        let m = v
            .as_object()
            .ok_or_else(|| err("(body)", "a site is a JSON object"))?;
        if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(SiteError {
                field: "(body)",
                reason: format!("unknown field {k:?}; a site has {}", FIELDS[..8].join(", ")),
            });
        }
        let id = match (text(m, "id", 64)?, path_id) {
            (Some(b), Some(p)) if b != p => {
                return Err(err("id", "differs from the id in the URL"));
            }
            (Some(b), _) => b,
            (None, Some(p)) => p.to_string(),
            (None, None) => return Err(err("id", "is required")),
        };
        let id = SiteId::new(id).map_err(|e| err("id", e.to_string()))?;
        let country = Country::new(required(m, "country", 2)?.to_ascii_uppercase())
            .map_err(|e| err("country", e.to_string()))?;
        let timezone = required(m, "timezone", 64)?;
        check_timezone(&timezone)?;
        let active = match m.get("active") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(err("active", "must be true or false")),
        };
        Ok(Site {
            id,
            name: required(m, "name", 200)?,
            country,
            city: required(m, "city", 100)?,
            timezone,
            active,
            phone: text(m, "phone", 20)?
                .map(E164Phone::new)
                .transpose()
                .map_err(|e| err("phone", e.to_string()))?,
            email: text(m, "email", 254)?
                .map(Email::new)
                .transpose()
                .map_err(|e| err("email", e.to_string()))?,
        })
    }

    /// A protocol's site, as the registry holds it (active, no contact).
    pub fn from_protocol(s: &clinflow_protocol::model::Site) -> Site {
        Site {
            id: s.id.clone(),
            name: s.name.clone(),
            country: s.country.clone(),
            city: s.city.clone(),
            timezone: s.timezone.clone(),
            active: true,
            phone: None,
            email: None,
        }
    }

    /// The API's JSON of the site, with the derived fields.
    pub fn to_json(&self, trials: &[String], version: u64, updated: &str) -> Value {
        let mut v = json!({
            "id": self.id.as_str(),
            "name": self.name,
            "country": self.country.as_str(),
            "city": self.city,
            "timezone": self.timezone,
            "active": self.active,
        });
        if let Some(p) = &self.phone {
            v["phone"] = json!(p.as_str());
        }
        if let Some(e) = &self.email {
            v["email"] = json!(e.as_str());
        }
        v["trials"] = json!(trials);
        v["version"] = json!(version);
        v["updated"] = json!(updated);
        v
    }

    /// The site as a FHIR R4 `Organization` (id = site id), in the shape
    /// the protocol loader writes.
    pub fn to_organization(&self) -> Value {
        let mut org = json!({
            "resourceType": "Organization",
            "id": self.id.as_str(),
            "extension": [{"url": TIMEZONE_URL, "valueString": self.timezone}],
            "identifier": [{"system": SITE_SYSTEM, "value": self.id.as_str()}],
            "active": self.active,
            "name": self.name,
            "address": [{"city": self.city, "country": self.country.as_str()}],
        });
        let mut telecom = Vec::new();
        if let Some(p) = &self.phone {
            telecom.push(json!({"system": "phone", "value": p.as_str(), "use": "work"}));
        }
        if let Some(e) = &self.email {
            telecom.push(json!({"system": "email", "value": e.as_str(), "use": "work"}));
        }
        if !telecom.is_empty() {
            org["telecom"] = Value::Array(telecom);
        }
        org
    }

    /// The site an `Organization` is, `Ok(None)` when it is not a site (no
    /// site identifier), an error when it claims to be one but lacks what a
    /// site must have.
    pub fn from_organization(org: &Value) -> Result<Option<Site>, SiteError> {
        let is_site = org["identifier"].as_array().is_some_and(|ids| {
            ids.iter()
                .any(|i| i["system"].as_str() == Some(SITE_SYSTEM))
        });
        if !is_site {
            return Ok(None);
        }
        let address = &org["address"][0];
        let timezone = org["extension"]
            .as_array()
            .and_then(|x| x.iter().find(|e| e["url"].as_str() == Some(TIMEZONE_URL)))
            .and_then(|e| e["valueString"].as_str());
        let telecom = |system: &str| {
            org["telecom"].as_array().and_then(|t| {
                t.iter()
                    .find(|c| c["system"].as_str() == Some(system))
                    .and_then(|c| c["value"].as_str())
                    .map(str::to_string)
            })
        };
        let v = json!({
            "id": org["id"],
            "name": org["name"],
            "country": address["country"],
            "city": address["city"],
            "timezone": timezone,
            "active": org["active"].as_bool().unwrap_or(true),
            "phone": telecom("phone"),
            "email": telecom("email"),
        });
        Site::from_json(&v, None).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Value {
        json!({"id": "site-042", "name": "Clinic", "country": "de", "city": "Berlin",
               "timezone": "Europe/Berlin", "active": false, "phone": "+4930555010",
               "email": "site@example.org"})
    }

    #[test]
    fn a_site_survives_the_round_trip_through_its_organization() {
        let site = Site::from_json(&full(), None).unwrap();
        assert_eq!(site.country.as_str(), "DE");
        let back = Site::from_organization(&site.to_organization()).unwrap();
        assert_eq!(back, Some(site.clone()));
        let minimal = Site::from_json(
            &json!({"id": "s1", "name": "N", "country": "US", "city": "Boston", "timezone": "UTC"}),
            None,
        )
        .unwrap();
        assert!(minimal.active);
        assert_eq!(
            Site::from_organization(&minimal.to_organization()).unwrap(),
            Some(minimal)
        );
    }

    #[test]
    fn an_organization_without_the_site_identifier_is_not_a_site() {
        let org = json!({"resourceType": "Organization", "id": "lab", "name": "Lab"});
        assert_eq!(Site::from_organization(&org), Ok(None));
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&str, Value, &str)] = &[
            ("id", json!("no spaces allowed"), "id"),
            ("country", json!("Germany"), "country"),
            ("timezone", json!("Berlin time"), "timezone"),
            ("name", json!(""), "name"),
            ("name", json!(7), "name"),
            ("active", json!("yes"), "active"),
            ("phone", json!("030 555"), "phone"),
            ("email", json!("nobody"), "email"),
            ("colour", json!("blue"), "(body)"),
        ];
        for (field, value, named) in cases {
            let mut v = full();
            v[*field] = value.clone();
            let e = Site::from_json(&v, None).unwrap_err();
            assert_eq!(e.field, *named, "{field} = {value}");
        }
        let mut v = full();
        v.as_object_mut().unwrap().remove("city");
        assert_eq!(Site::from_json(&v, None).unwrap_err().field, "city");
        assert_eq!(
            Site::from_json(&full(), Some("site-043"))
                .unwrap_err()
                .field,
            "id"
        );
        assert!(Site::from_json(&json!([1]), None).is_err());
    }
}
