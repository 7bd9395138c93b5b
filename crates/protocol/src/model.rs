//! The protocol model: typed values for every key of the protocol format.
//!
//! The reference protocol (`reference-trial/protocol.yaml`) is the format's
//! specification by example; the serde names here are its keys, so the same
//! model reads YAML and JSON and writes the JSON form that is stored and
//! served ([`Protocol::to_json`]).
//!
//! Invariant: a [`Protocol`] returned by [`crate::parse_yaml`] or
//! [`crate::parse_json`] has passed every rule of [`crate::parse`] (unique
//! ids, ranges ordered and nested, positive factors, ...). The fields are
//! public for reading; code that builds or edits a `Protocol` by hand takes
//! on those invariants itself.

use crate::types::{iso_date, iso_date_opt, Country, Loinc, SiteId, TrialId, Ucum};
use serde::{Deserialize, Serialize};
use time::Date;

/// A trial protocol: what is collected, from whom, where and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protocol {
    /// The trial id (`CARDIO-01`); also the FHIR `ResearchStudy` id.
    pub id: TrialId,
    /// Protocol version; amendments bump it and stored data records it. At least 1.
    pub version: u32,
    /// Human-readable title.
    pub title: String,
    /// Trial phase.
    pub phase: Phase,
    /// The dates the trial runs; enrolment must fall inside.
    pub period: Period,
    /// `Patient.identifier.system` for subject ids: an absolute URI.
    pub subject_identifier_system: String,
    /// Participating sites; at least one.
    pub sites: Vec<Site>,
    /// Treatment arms by name; at least one, unique.
    pub arms: Vec<String>,
    /// The visit schedule, in any order.
    pub visits: Vec<Visit>,
    /// Measurements the protocol collects.
    pub measurements: Vec<Measurement>,
    /// ePRO questionnaires that patients fill in (optional key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub questionnaires: Vec<Questionnaire>,
    /// Adverse-event reporting rules.
    pub adverse_events: AdverseEventRules,
    /// The recruitment plan (optional key): what the dashboard's enrolment
    /// is measured against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolment: Option<EnrolmentPlan>,
}

/// How many subjects the trial means to enrol, and by when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentPlan {
    /// Subjects to enrol in all; above 0.
    pub target: u32,
    /// The day enrolment should be complete, within the trial's period;
    /// the period's end when absent. The planned curve rises linearly from
    /// the period's start to `target` on this day.
    #[serde(
        default,
        with = "iso_date_opt",
        skip_serializing_if = "Option::is_none"
    )]
    pub by: Option<Date>,
}

/// Trial phase, as the FHIR `research-study-phase` code system names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// `n-a`: trials without phases (device trials, behavioural ...).
    #[serde(rename = "n-a")]
    NotApplicable,
    /// `early-phase-1`
    #[serde(rename = "early-phase-1")]
    EarlyPhase1,
    /// `phase-1`
    #[serde(rename = "phase-1")]
    Phase1,
    /// `phase-1-phase-2`
    #[serde(rename = "phase-1-phase-2")]
    Phase1Phase2,
    /// `phase-2`
    #[serde(rename = "phase-2")]
    Phase2,
    /// `phase-2-phase-3`
    #[serde(rename = "phase-2-phase-3")]
    Phase2Phase3,
    /// `phase-3`
    #[serde(rename = "phase-3")]
    Phase3,
    /// `phase-4`
    #[serde(rename = "phase-4")]
    Phase4,
}

impl Phase {
    /// The code in `http://terminology.hl7.org/CodeSystem/research-study-phase`.
    pub fn code(self) -> &'static str {
        match self {
            Phase::NotApplicable => "n-a",
            Phase::EarlyPhase1 => "early-phase-1",
            Phase::Phase1 => "phase-1",
            Phase::Phase1Phase2 => "phase-1-phase-2",
            Phase::Phase2 => "phase-2",
            Phase::Phase2Phase3 => "phase-2-phase-3",
            Phase::Phase3 => "phase-3",
            Phase::Phase4 => "phase-4",
        }
    }

    /// The code system's display text for the code.
    pub fn display(self) -> &'static str {
        match self {
            Phase::NotApplicable => "N/A",
            Phase::EarlyPhase1 => "Early Phase 1",
            Phase::Phase1 => "Phase 1",
            Phase::Phase1Phase2 => "Phase 1/Phase 2",
            Phase::Phase2 => "Phase 2",
            Phase::Phase2Phase3 => "Phase 2/Phase 3",
            Phase::Phase3 => "Phase 3",
            Phase::Phase4 => "Phase 4",
        }
    }
}

/// A closed date interval (both ends included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Period {
    /// First day.
    #[serde(with = "iso_date")]
    pub start: Date,
    /// Last day, not before `start`.
    #[serde(with = "iso_date")]
    pub end: Date,
}

impl Period {
    /// `true` when `date` lies within the period, ends included.
    pub fn contains(&self, date: Date) -> bool {
        self.start <= date && date <= self.end
    }
}

/// A participating site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Site id (`site-001`); also the FHIR `Organization` id.
    pub id: SiteId,
    /// Name of the site.
    pub name: String,
    /// ISO 3166-1 alpha-2 country code.
    pub country: Country,
    /// City.
    pub city: String,
    /// IANA time zone name (`Europe/Berlin`); shape-checked only.
    pub timezone: String,
}

/// A scheduled visit: a day offset from enrolment with a tolerance window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Visit {
    /// Visit id (`week-4`).
    pub id: String,
    /// Target day relative to enrolment (baseline = 0; negative before it).
    pub day: i32,
    /// How many days early or late still count as this visit.
    pub window: Window,
}

/// A visit's tolerance, in days either side of the target day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days before the target day.
    pub before: u32,
    /// Days after the target day.
    pub after: u32,
}

impl Visit {
    /// The window as day offsets from enrolment, both ends included.
    pub fn window_days(&self) -> (i64, i64) {
        let day = i64::from(self.day);
        (
            day - i64::from(self.window.before),
            day + i64::from(self.window.after),
        )
    }

    /// `true` when `date` falls in this visit's window for a subject
    /// enrolled on `enrolled`.
    pub fn holds(&self, enrolled: Date, date: Date) -> bool {
        let offset = (date - enrolled).whole_days();
        let (low, high) = self.window_days();
        low <= offset && offset <= high
    }
}

/// A closed numeric range `[low, high]`, written `[low, high]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range(pub f64, pub f64);

impl Range {
    /// Lower bound.
    pub fn low(&self) -> f64 {
        self.0
    }

    /// Upper bound.
    pub fn high(&self) -> f64 {
        self.1
    }

    /// `true` when `value` lies in the range, bounds included.
    pub fn contains(&self, value: f64) -> bool {
        self.0 <= value && value <= self.1
    }

    /// `true` when this range lies entirely inside `outer`.
    pub fn is_within(&self, outer: &Range) -> bool {
        outer.0 <= self.0 && self.1 <= outer.1
    }
}

/// A measurement the protocol collects, in its canonical UCUM unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measurement {
    /// Measurement id (`glucose`).
    pub id: String,
    /// LOINC code; unique within the protocol.
    pub loinc: Loinc,
    /// Display text.
    pub display: String,
    /// Canonical unit; values are stored and ranges are stated in it.
    pub unit: Ucum,
    /// Other accepted units and how to convert from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub convert: Vec<Conversion>,
    /// Plausible range: values outside are impossible and rejected.
    pub hard: Range,
    /// Expected range, inside `hard`: values outside are stored and a data
    /// query is opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<Range>,
}

/// Another accepted unit: `canonical = value * factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversion {
    /// The other unit.
    pub unit: Ucum,
    /// Multiplier to the canonical unit; finite and positive.
    pub factor: f64,
}

impl Measurement {
    /// The measurement whose id, or else whose LOINC code, is `key`.
    /// (Ingest accepts either as the metric of a reading.)
    pub fn by_id_or_loinc<'a>(list: &'a [Measurement], key: &str) -> Option<&'a Measurement> {
        list.iter()
            .find(|m| m.id == key)
            .or_else(|| list.iter().find(|m| m.loinc.as_str() == key))
    }

    /// `value` in `unit` converted to the canonical unit: unchanged when
    /// `unit` is the canonical unit, multiplied by the conversion's factor
    /// when it is one of `convert`. `None` for any other unit or a result
    /// that is not finite. Units compare exactly (UCUM is case-sensitive).
    pub fn convert_to_canonical(&self, value: f64, unit: &str) -> Option<f64> {
        let v = if unit == self.unit.as_str() {
            value
        } else {
            value
                * self
                    .convert
                    .iter()
                    .find(|c| c.unit.as_str() == unit)?
                    .factor
        };
        v.is_finite().then_some(v)
    }
}

/// An ePRO questionnaire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Questionnaire {
    /// Questionnaire id (`daily-diary`); with the trial id it forms the
    /// FHIR `Questionnaire` id.
    pub id: String,
    /// Title shown to patients.
    pub title: String,
    /// Questions, in order; at least one.
    pub items: Vec<Item>,
}

impl Questionnaire {
    /// The item with this `linkId`.
    pub fn item(&self, link_id: &str) -> Option<&Item> {
        self.items.iter().find(|i| i.link_id == link_id)
    }
}

/// One question of a questionnaire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The key answers use (`linkId`, as in FHIR); unique in its questionnaire.
    #[serde(rename = "linkId")]
    pub link_id: String,
    /// Question text.
    pub text: String,
    /// Answer type (key `type`).
    #[serde(rename = "type")]
    pub kind: ItemType,
    /// Whether an answer is required (default `false`).
    #[serde(default)]
    pub required: bool,
    /// Allowed answer range; numeric types only (whole numbers for `integer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<Range>,
    /// Maximum answer length in characters; `string` and `text` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<u32>,
    /// Allowed answers; required for `choice`, not allowed otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// The answer type of a questionnaire item; the names are FHIR's
/// `Questionnaire.item.type` codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ItemType {
    /// `boolean`
    Boolean,
    /// `decimal`
    Decimal,
    /// `integer`
    Integer,
    /// `date`
    Date,
    /// `dateTime`
    DateTime,
    /// `time`
    Time,
    /// `string`: a short line of text.
    String,
    /// `text`: free text, possibly several lines.
    Text,
    /// `choice`: one of the item's `options`.
    Choice,
}

impl ItemType {
    /// The FHIR `Questionnaire.item.type` code.
    pub fn code(self) -> &'static str {
        match self {
            ItemType::Boolean => "boolean",
            ItemType::Decimal => "decimal",
            ItemType::Integer => "integer",
            ItemType::Date => "date",
            ItemType::DateTime => "dateTime",
            ItemType::Time => "time",
            ItemType::String => "string",
            ItemType::Text => "text",
            ItemType::Choice => "choice",
        }
    }

    /// `true` for `integer` and `decimal`, the types a `range` applies to.
    pub fn is_numeric(self) -> bool {
        matches!(self, ItemType::Integer | ItemType::Decimal)
    }

    /// `true` for `string` and `text`, the types `max_length` applies to.
    pub fn is_textual(self) -> bool {
        matches!(self, ItemType::String | ItemType::Text)
    }
}

/// Adverse-event reporting rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdverseEventRules {
    /// A serious adverse event must reach the sponsor within this many hours; above 0.
    pub serious_report_hours: u32,
}

impl Protocol {
    /// The JSON form that is stored and served. [`crate::parse_json`] reads
    /// it back to an equal `Protocol`.
    pub fn to_json(&self) -> String {
        match serde_json::to_string(self) {
            Ok(s) => s,
            // serde_json fails only on maps with non-string keys or on a
            // failing `Serialize` impl; the model has neither.
            Err(e) => unreachable!("a Protocol always serializes to JSON: {e}"),
        }
    }

    /// The site with this id.
    pub fn site(&self, id: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.id.as_str() == id)
    }

    /// `true` when `arm` is one of the protocol's arms.
    pub fn has_arm(&self, arm: &str) -> bool {
        self.arms.iter().any(|a| a == arm)
    }

    /// The measurement whose id, or else whose LOINC code, is `key`.
    pub fn measurement(&self, key: &str) -> Option<&Measurement> {
        Measurement::by_id_or_loinc(&self.measurements, key)
    }

    /// The questionnaire with this id.
    pub fn questionnaire(&self, id: &str) -> Option<&Questionnaire> {
        self.questionnaires.iter().find(|q| q.id == id)
    }

    /// The visit a value dated `date` belongs to, for a subject enrolled on
    /// `enrolled`: the visit whose window `[enrolled + day - before,
    /// enrolled + day + after]` holds the date, or `None` (unscheduled).
    /// Should windows overlap, the visit whose target day is nearest wins,
    /// and on a tie the one listed first.
    pub fn visit_for(&self, enrolled: Date, date: Date) -> Option<&Visit> {
        let offset = (date - enrolled).whole_days();
        self.visits
            .iter()
            .filter(|v| v.holds(enrolled, date))
            .min_by_key(|v| (offset - i64::from(v.day)).abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn measurement() -> Measurement {
        Measurement {
            id: "glucose".into(),
            loinc: Loinc::new("2345-7").unwrap(),
            display: "Glucose".into(),
            unit: Ucum::new("mg/dL").unwrap(),
            convert: vec![Conversion {
                unit: Ucum::new("mmol/L").unwrap(),
                factor: 18.016,
            }],
            hard: Range(10.0, 1500.0),
            soft: Some(Range(70.0, 250.0)),
        }
    }

    #[test]
    fn conversion_multiplies_by_the_factor() {
        let m = measurement();
        assert_eq!(m.convert_to_canonical(90.0, "mg/dL"), Some(90.0));
        let v = m.convert_to_canonical(5.0, "mmol/L").unwrap();
        assert!((v - 90.08).abs() < 1e-9, "{v}");
        assert_eq!(
            m.convert_to_canonical(5.0, "mmol/l"),
            None,
            "UCUM is case-sensitive"
        );
        assert_eq!(m.convert_to_canonical(5.0, "g/L"), None);
        assert_eq!(m.convert_to_canonical(f64::MAX, "mmol/L"), None);
    }

    #[test]
    fn lookup_by_id_then_by_loinc() {
        let list = [measurement()];
        assert!(Measurement::by_id_or_loinc(&list, "glucose").is_some());
        assert!(Measurement::by_id_or_loinc(&list, "2345-7").is_some());
        assert!(Measurement::by_id_or_loinc(&list, "2345").is_none());
    }

    #[test]
    fn ranges_include_their_bounds() {
        let r = Range(70.0, 250.0);
        assert!(r.contains(70.0) && r.contains(250.0) && !r.contains(250.1));
        assert!(r.is_within(&Range(10.0, 1500.0)));
        assert!(!Range(5.0, 20.0).is_within(&Range(10.0, 1500.0)));
    }

    fn visit(id: &str, day: i32, before: u32, after: u32) -> Visit {
        Visit {
            id: id.into(),
            day,
            window: Window { before, after },
        }
    }

    fn protocol_with(visits: Vec<Visit>) -> Protocol {
        Protocol {
            id: TrialId::new("T").unwrap(),
            version: 1,
            title: "t".into(),
            phase: Phase::Phase3,
            period: Period {
                start: date!(2026 - 01 - 01),
                end: date!(2026 - 12 - 31),
            },
            subject_identifier_system: "urn:x".into(),
            sites: vec![],
            arms: vec!["a".into()],
            visits,
            measurements: vec![],
            questionnaires: vec![],
            adverse_events: AdverseEventRules {
                serious_report_hours: 24,
            },
            enrolment: None,
        }
    }

    #[test]
    fn visit_for_uses_the_window_around_the_target_day() {
        let p = protocol_with(vec![
            visit("screening", -14, 14, 0),
            visit("baseline", 0, 0, 1),
            visit("week-4", 28, 3, 3),
        ]);
        let enrolled = date!(2026 - 02 - 02);
        let at = |d: Date| p.visit_for(enrolled, d).map(|v| v.id.as_str());
        assert_eq!(at(date!(2026 - 02 - 02)), Some("baseline"));
        assert_eq!(at(date!(2026 - 02 - 03)), Some("baseline"));
        assert_eq!(at(date!(2026 - 02 - 04)), None);
        assert_eq!(at(date!(2026 - 01 - 05)), Some("screening")); // day -28
        assert_eq!(at(date!(2026 - 01 - 04)), None); // day -29
        assert_eq!(at(date!(2026 - 02 - 01)), None); // day -1: after screening, before baseline
        assert_eq!(at(date!(2026 - 02 - 27)), Some("week-4")); // day 25
        assert_eq!(at(date!(2026 - 03 - 05)), Some("week-4")); // day 31
        assert_eq!(at(date!(2026 - 03 - 06)), None);
    }

    #[test]
    fn overlapping_windows_go_to_the_nearest_target_day() {
        let p = protocol_with(vec![visit("a", 10, 10, 10), visit("b", 14, 10, 10)]);
        let enrolled = date!(2026 - 01 - 01);
        let at = |days: i64| {
            p.visit_for(enrolled, enrolled + time::Duration::days(days))
                .map(|v| v.id.as_str())
        };
        assert_eq!(at(11), Some("a"));
        assert_eq!(at(12), Some("a"), "a tie goes to the visit listed first");
        assert_eq!(at(13), Some("b"));
        assert_eq!(at(24), Some("b"));
    }
}
