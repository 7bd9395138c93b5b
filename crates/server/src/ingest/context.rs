//! The trial context a batch is checked against, read from the store: the
//! protocol version in force and the subjects enrolled in it.
//!
//! Read afresh for every batch, so an enrolment or an amendment loaded
//! before a batch is processed applies to it.

use clinflow_edc::{Enrolment, TrialContext};
use clinflow_fhir::Json;
use clinflow_protocol::fhir::RESEARCH_SUBJECT_SITE_URL;
use clinflow_protocol::SiteId;
use clinflow_store::{Scope, Store};

/// Subjects read per search page.
const PAGE: usize = 1000;

/// The context of the trial most recently loaded, `None` when no trial is.
///
/// One trial per server for now: with several, the one loaded last is the
/// one ingest checks against (inputs do not name their trial yet).
pub async fn load(store: &Store) -> anyhow::Result<Option<TrialContext>> {
    let trials = store.list_trials().await?;
    let Some(latest) = trials
        .iter()
        .max_by(|a, b| (a.loaded_at, &a.id).cmp(&(b.loaded_at, &b.id)))
    else {
        return Ok(None);
    };
    let protocol = clinflow_protocol::parse_json(&latest.protocol)
        .map_err(|e| anyhow::anyhow!("the stored protocol does not parse: {e}"))?;
    let system = protocol.subject_identifier_system.clone();
    let study = format!("ResearchStudy/{}", protocol.id.as_str());
    let mut ctx = TrialContext::new(protocol);
    let mut cursor = None;
    loop {
        let mut pairs = vec![
            ("study".to_string(), study.clone()),
            ("_count".to_string(), PAGE.to_string()),
        ];
        if let Some(c) = cursor.take() {
            pairs.push(("_cursor".to_string(), c));
        }
        let q = clinflow_fhir::search::parse_query("ResearchSubject", &pairs)
            .map_err(|o| anyhow::anyhow!("the subject query: {}", o.to_json_string()))?;
        let page = store.search(q, Scope::All).await?;
        for r in &page.matches {
            let Some(json) = r.body.as_deref().and_then(|b| Json::parse(b).ok()) else {
                continue;
            };
            if let Some((subject, enrolment)) = enrolment_of(&json, &system) {
                ctx.enrol(&subject, enrolment);
            }
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(Some(ctx))
}

/// The subject id and enrolment a ResearchSubject records (as
/// [`clinflow_protocol::fhir::research_subject`] writes it); `None` when a
/// part is missing or the subject has left the study.
fn enrolment_of(rs: &Json, system: &str) -> Option<(String, Enrolment)> {
    if matches!(
        rs.get("status").and_then(Json::as_str),
        Some("withdrawn" | "off-study" | "not-registered" | "ineligible")
    ) {
        return None;
    }
    let subject = items(rs.get("identifier")).find_map(|i| {
        (i.get("system").and_then(Json::as_str) == Some(system))
            .then(|| i.get("value").and_then(Json::as_str))
            .flatten()
    })?;
    let patient = rs
        .get("individual")?
        .get("reference")?
        .as_str()?
        .strip_prefix("Patient/")?;
    let site = items(rs.get("extension")).find_map(|e| {
        (e.get("url").and_then(Json::as_str) == Some(RESEARCH_SUBJECT_SITE_URL))
            .then(|| e.get("valueReference")?.get("reference")?.as_str())
            .flatten()
    })?;
    let site = SiteId::new(site.strip_prefix("Organization/")?).ok()?;
    let enrolled = date(rs.get("period")?.get("start")?.as_str()?)?;
    Some((
        subject.to_string(),
        Enrolment {
            patient_id: patient.to_string(),
            site,
            enrolled,
        },
    ))
}

/// The elements of an array (none when `j` is absent or not an array).
fn items(j: Option<&Json>) -> impl Iterator<Item = &Json> {
    j.and_then(|j| match j {
        Json::Array(list) => Some(list.iter()),
        _ => None,
    })
    .into_iter()
    .flatten()
}

/// `YYYY-MM-DD` (the first ten characters of a FHIR date or dateTime).
fn date(s: &str) -> Option<time::Date> {
    let mut parts = s.get(..10)?.split('-');
    let y: i32 = parts.next()?.parse().ok()?;
    let m: u8 = parts.next()?.parse().ok()?;
    let d: u8 = parts.next()?.parse().ok()?;
    time::Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_research_subject_gives_its_enrolment() {
        let text = format!(
            r#"{{"resourceType":"ResearchSubject","id":"S-1","status":"on-study",
            "extension":[{{"url":"{RESEARCH_SUBJECT_SITE_URL}","valueReference":{{"reference":"Organization/site-01"}}}}],
            "identifier":[{{"system":"urn:other","value":"x"}},{{"system":"urn:subjects","value":"S-1"}}],
            "period":{{"start":"2026-01-15"}},"individual":{{"reference":"Patient/P-1"}}}}"#
        );
        let json = Json::parse(&text).unwrap();
        let (subject, e) = enrolment_of(&json, "urn:subjects").unwrap();
        assert_eq!(subject, "S-1");
        assert_eq!(e.patient_id, "P-1");
        assert_eq!(e.site.as_str(), "site-01");
        assert_eq!(e.enrolled, date("2026-01-15").unwrap());
        assert!(enrolment_of(&json, "urn:none").is_none());
        let withdrawn = Json::parse(&text.replace("on-study", "withdrawn")).unwrap();
        assert!(enrolment_of(&withdrawn, "urn:subjects").is_none());
    }

    #[test]
    fn dates_are_read_or_refused() {
        assert!(date("2026-02-30").is_none());
        assert!(date("2026").is_none());
        assert!(date("2026-03-02T10:00:00Z").is_some());
    }
}
