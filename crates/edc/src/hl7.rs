//! HL7 v2 ORU^R01 -> FHIR R4, by the HL7 V2-to-FHIR implementation guide,
//! with the protocol's edit checks.
//!
//! - PID-3 (first repetition, component 1) is the subject id, looked up in
//!   the [`TrialContext`]; `subject` references `Patient/{patient id}` and
//!   carries the identifier (system = the protocol's
//!   `subject_identifier_system`). An unknown subject rejects that
//!   patient's results (location `PID[n].3`).
//! - OBR -> `DiagnosticReport` (code OBR-4, effective OBR-7, issued OBR-22,
//!   status OBR-25, identifiers OBR-2/OBR-3, conclusion from the OBR's
//!   NTEs) whose `result` lists the order's stored Observations by their
//!   fullUrl (the item key). It is produced when at least one result is, and
//!   takes the visit of its first stored result.
//! - OBX -> `Observation`: `value[x]` by OBX-2 ([`value_x`]), code from
//!   every coding triplet of OBX-3 (`LN` -> `http://loinc.org`), OBX-6 as
//!   the UCUM unit, `referenceRange` from OBX-7, `interpretation` from
//!   OBX-8, `status` from OBX-11, effective from OBX-14 else OBR-7 (offset
//!   kept; a time without offset takes MSH-7's), NTE -> `note`.
//! - Edit checks per OBX: measurement known (an OBX-3 coding with system
//!   `LN`, or none, whose code is a protocol measurement's LOINC), numeric
//!   value (NM, or SN with a single number; a bound such as `<5` is
//!   checked as its number), unit,
//!   hard range, soft range (query), trial period, visit. A rejected OBX is
//!   listed with its location (`OBX[2].5`: the second OBX of the message,
//!   field 5); the message's other results are still produced.
//!
//! Locations are `SEG[k].f`: the k-th segment with that id in its message
//! and the field; `line n` (of the whole input) when the segment is unknown.

use clinflow_fhir::validate::validate_json;
use clinflow_fhir::Json;
use clinflow_hl7v2::oru::{Coding, Obr, Observation, Obx, ObxValue, Order};
use clinflow_hl7v2::{
    parse_dtm, split_messages, Dtm, Location, Message, OruR01, PieceKind, Precision,
};
use clinflow_protocol::Measurement;
use time::{Date, Month};

use crate::checks::{canonical_extension, check_date, check_value, quantity, soft_query};
use crate::context::{Enrolment, TrialContext};
use crate::json::{arr, decimal_text, obj, s, ss};
use crate::outcome::{ItemOutcome, Produced, Reason};
use crate::provenance::{sha256_hex, InputFormat, Provenance};

/// `Observation.category` / `DiagnosticReport.category` code system.
const OBSERVATION_CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
/// OBX-8 codes (HL7 table 0078 maps one to one to these).
const INTERPRETATION_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation";
/// OBR-24 codes.
const SECTION_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v2-0074";

/// Every item of an HL7 v2 input (an HTTP body with one or more messages,
/// or one MLLP frame): one [`ItemOutcome`] per message and per run of bytes
/// that is not a message (rejected: [`Reason::NotAMessage`]); batch
/// envelope lines (FHS, BHS, BTS, FTS) are no items. Provenance records the
/// SHA-256 of the whole `input`.
pub fn ingest_hl7(ctx: &TrialContext, input: &[u8]) -> Vec<ItemOutcome> {
    let sha = sha256_hex(input);
    let mut out = Vec::new();
    for piece in split_messages(input) {
        let index = out.len();
        let here = format!("line {}", piece.line);
        match piece.kind {
            PieceKind::Envelope => continue,
            PieceKind::Garbage => {
                let mut item = ItemOutcome::new(index, here.clone());
                item.reject(Reason::NotAMessage, here);
                out.push(item);
            }
            PieceKind::Message => match piece.parse(input) {
                Ok(msg) => {
                    let mut item = map_message(ctx, &msg, &sha, index);
                    item.location = here;
                    out.push(item);
                }
                Err(e) => {
                    let mut item = ItemOutcome::new(index, here);
                    item.reject(
                        Reason::Malformed(e.kind().to_string()),
                        location(e.location()),
                    );
                    out.push(item);
                }
            },
        }
    }
    out
}

/// One parsed message: reads it as ORU^R01, maps and checks it. `raw_sha256`
/// is the hex SHA-256 of the raw input the message came in (recorded in the
/// provenance); `index` is the item's index in that input.
pub fn map_message(
    ctx: &TrialContext,
    msg: &Message<'_>,
    raw_sha256: &str,
    index: usize,
) -> ItemOutcome {
    let mut item = ItemOutcome::new(
        index,
        format!(
            "line {}",
            msg.segments().next().map_or(1, |s| s.location().line)
        ),
    );
    let oru = match OruR01::read(msg) {
        Ok(oru) => oru,
        Err(e) => {
            item.reject(
                Reason::Malformed(e.kind().to_string()),
                location(e.location()),
            );
            return item;
        }
    };
    let prov = Provenance {
        format: InputFormat::Hl7v2,
        sender: Some(oru.msh.sender()),
        control_id: Some(oru.msh.control_id().to_string()),
        sha256: raw_sha256.to_string(),
    };
    let default_offset = oru.msh.datetime().and_then(Dtm::offset_minutes);
    for issue in &oru.issues {
        item.reject(
            Reason::Malformed(issue.kind().to_string()),
            location(issue.location()),
        );
    }
    let mapper = Mapper {
        ctx,
        prov: &prov,
        default_offset,
    };
    for patient in &oru.patients {
        let pid_at = format!("{}.3", segment(&patient.location));
        let Some(subject) = patient.pid.ids.first().map(|cx| cx.id.to_string()) else {
            item.reject(Reason::MissingSubject, pid_at);
            continue;
        };
        let Some(enrolment) = ctx.enrolment(&subject) else {
            item.reject(Reason::UnknownSubject(subject), pid_at);
            continue;
        };
        let who = Who {
            subject: &subject,
            enrolment,
        };
        for order in &patient.orders {
            mapper.order(&mut item, &who, order);
        }
    }
    // Every item is stored or says why not (a message with no patient or
    // order left to map would otherwise vanish silently).
    if !item.is_stored() && item.rejections.is_empty() {
        let at = item.location.clone();
        item.reject(
            Reason::Malformed("the message holds no result to store".into()),
            at,
        );
    }
    item
}

struct Mapper<'c> {
    ctx: &'c TrialContext,
    prov: &'c Provenance,
    default_offset: Option<i16>,
}

struct Who<'a> {
    subject: &'a str,
    enrolment: &'a Enrolment,
}

/// An OBX's problem and where.
type Fail = (Reason, String);

impl Mapper<'_> {
    fn order(&self, item: &mut ItemOutcome, who: &Who<'_>, order: &Order<'_>) {
        let obr = match &order.obr {
            Ok(obr) => Some(obr),
            Err(e) => {
                item.reject(
                    Reason::Malformed(e.kind().to_string()),
                    location(e.location()),
                );
                None
            }
        };
        let obr_at = segment(&order.location);
        if order.observations.is_empty() {
            // An order with no OBX has nothing to store: say so.
            item.reject(
                Reason::Malformed("the order has no results (no OBX after its OBR)".into()),
                obr_at.clone(),
            );
            return;
        }
        let mut results = Vec::new();
        let mut first_visit = None;
        for obs in &order.observations {
            match self.observation(who, obr, &obr_at, obs) {
                Ok((json, visit, checked, m, sent, at)) => {
                    let resource_index = item.stored.len();
                    match produce(json, "Observation", self.prov.key(&at)) {
                        Ok(p) => {
                            results.push(p.full_url.clone());
                            item.stored.push(p);
                            first_visit.get_or_insert(visit);
                            if let Some(q) = soft_query(
                                (item.index, resource_index),
                                who.subject,
                                who.enrolment,
                                m,
                                &checked,
                                &sent,
                                &format!("{at}.5"),
                            ) {
                                item.queries.push(q);
                            }
                        }
                        Err(reason) => item.reject(reason, at),
                    }
                }
                Err((reason, at)) => item.reject(reason, at),
            }
        }
        let (Some(obr), Some(visit)) = (obr, first_visit) else {
            return;
        };
        let json = self.report(who, obr, order, &obr_at, &visit, results);
        match produce(json, "DiagnosticReport", self.prov.key(&obr_at)) {
            Ok(p) => item.stored.push(p),
            Err(reason) => item.reject(reason, obr_at),
        }
    }

    // Rejections are the cold path and carry their texts: not worth boxing.
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn observation<'m>(
        &'m self,
        who: &Who<'_>,
        obr: Option<&Obr<'_>>,
        obr_at: &str,
        obs: &Observation<'_>,
    ) -> Result<
        (
            Json,
            String,
            crate::checks::CheckedValue,
            &'m Measurement,
            String,
            String,
        ),
        Fail,
    > {
        let at = segment(&obs.location);
        let obx = obs.obx.as_ref().map_err(|e| {
            (
                Reason::Malformed(e.kind().to_string()),
                location(e.location()),
            )
        })?;
        let protocol = self.ctx.protocol();
        let m = obx
            .identifier
            .iter()
            .filter(|c| c.system.as_deref().is_none_or(|s| s == "LN"))
            .filter_map(|c| c.code.as_deref())
            .find_map(|code| {
                protocol
                    .measurements
                    .iter()
                    .find(|m| m.loinc.as_str() == code)
            })
            .ok_or_else(|| {
                let code = obx
                    .identifier
                    .iter()
                    .find_map(|c| c.code.as_deref())
                    .unwrap_or_default();
                (
                    Reason::UnknownMeasurement(code.to_string()),
                    format!("{at}.3"),
                )
            })?;
        let value = value_x(obx, self.default_offset).map_err(|r| (r, format!("{at}.5")))?;
        let Value::Quantity {
            text,
            value,
            comparator,
        } = &value
        else {
            let vt = obx.value_type.as_deref().unwrap_or_default();
            return Err((
                Reason::UnsupportedValueType(format!("{vt} (measurement {} is numeric)", m.id)),
                format!("{at}.2"),
            ));
        };
        // A bound (`<5`) is checked as its number: the hard range still applies.
        let unit = obx
            .units
            .as_ref()
            .and_then(|u| u.code.as_deref().or(u.display.as_deref()))
            .unwrap_or_default();
        let checked = check_value(m, *value, unit).map_err(|r| {
            let field = if matches!(r, Reason::WrongUnit { .. }) {
                6
            } else {
                5
            };
            (r, format!("{at}.{field}"))
        })?;
        let (when, when_at) = match (
            &obx.observation_datetime,
            obr.and_then(|o| o.observation_datetime),
        ) {
            (Some(d), _) => (*d, format!("{at}.14")),
            (None, Some(d)) => (d, format!("{obr_at}.7")),
            (None, None) => return Err((Reason::MissingEffective, format!("{at}.14"))),
        };
        let (effective, date) = self.datetime(when).map_err(|r| (r, when_at.clone()))?;
        let visit = check_date(protocol, who.enrolment, date).map_err(|r| (r, when_at))?;
        let status = observation_status(&obx.result_status).ok_or_else(|| {
            (
                Reason::UnknownStatus(obx.result_status.to_string()),
                format!("{at}.11"),
            )
        })?;

        let mut extension = self.prov.extensions(&at, protocol.version, &visit);
        extension.extend(canonical_extension(m, &checked));
        let mut quantity_json = quantity(text, unit);
        // The IG puts OBX-6.2 (the unit's text) in `unit`, OBX-6.1 in `code`.
        let unit_text = obx.units.as_ref().and_then(|u| u.display.as_deref());
        if let (Some(t), false, Json::Object(members)) =
            (unit_text, unit.is_empty(), &mut quantity_json)
        {
            if let Some((_, v)) = members.iter_mut().find(|(k, _)| k == "unit") {
                *v = s(t);
            }
        }
        if let (Some(c), Json::Object(members)) = (comparator, &mut quantity_json) {
            members.insert(1, ("comparator".into(), s(c)));
        }
        let key = self.prov.key(&at);
        let issued = obr
            .and_then(|o| o.results_reported)
            .and_then(|d| self.instant(d));
        let json = obj([
            ("resourceType", ss("Observation")),
            ("extension", arr(extension)),
            ("identifier", arr(vec![Provenance::identifier(&key)])),
            ("status", ss(status)),
            ("category", arr(vec![category("laboratory", "Laboratory")])),
            ("code", Some(codeable(&obx.identifier))),
            ("subject", Some(self.subject_ref(who))),
            ("effectiveDateTime", Some(s(&effective))),
            ("issued", issued.map(|i| s(&i))),
            ("valueQuantity", Some(quantity_json)),
            (
                "interpretation",
                arr(obx
                    .interpretation
                    .iter()
                    .filter_map(|c| c.code.as_deref().map(|code| (code, c)))
                    .map(|(code, c)| {
                        obj([(
                            "coding",
                            arr(vec![obj([
                                ("system", ss(INTERPRETATION_SYSTEM)),
                                ("code", ss(code)),
                                ("display", c.display.as_deref().map(s)),
                            ])]),
                        )])
                    })
                    .collect()),
            ),
            (
                "note",
                arr(obs
                    .notes
                    .iter()
                    .map(|n| obj([("text", ss(&n.text))]))
                    .collect()),
            ),
            (
                "referenceRange",
                obx.reference_range
                    .as_deref()
                    .and_then(|r| arr(vec![reference_range(r, unit)])),
            ),
        ]);
        let sent = text.clone();
        Ok((json, visit, checked, m, sent, at))
    }

    fn report(
        &self,
        who: &Who<'_>,
        obr: &Obr<'_>,
        order: &Order<'_>,
        at: &str,
        visit: &str,
        results: Vec<String>,
    ) -> Json {
        let mut identifiers = vec![Provenance::identifier(&self.prov.key(at))];
        for (ei, code) in [
            (&obr.placer_order_number, "PLAC"),
            (&obr.filler_order_number, "FILL"),
        ] {
            if let Some(ei) = ei {
                identifiers.push(obj([
                    (
                        "type",
                        Some(obj([(
                            "coding",
                            arr(vec![obj([
                                (
                                    "system",
                                    ss("http://terminology.hl7.org/CodeSystem/v2-0203"),
                                ),
                                ("code", ss(code)),
                            ])]),
                        )])),
                    ),
                    (
                        "system",
                        ei.namespace_id
                            .as_deref()
                            .and_then(|n| system_for(n).map(s)),
                    ),
                    ("value", ss(&ei.entity_id)),
                ]));
            }
        }
        let effective = obr
            .observation_datetime
            .and_then(|d| self.datetime(d).ok())
            .map(|(e, _)| e);
        let conclusion: Vec<&str> = order.notes.iter().map(|n| n.text.as_ref()).collect();
        let mut categories = vec![category("laboratory", "Laboratory")];
        if let Some(section) = obr.diagnostic_service_section.as_deref() {
            categories.push(obj([(
                "coding",
                arr(vec![obj([
                    ("system", ss(SECTION_SYSTEM)),
                    ("code", ss(section)),
                ])]),
            )]));
        }
        obj([
            ("resourceType", ss("DiagnosticReport")),
            (
                "extension",
                arr(self.prov.extensions(at, self.ctx.protocol().version, visit)),
            ),
            ("identifier", arr(identifiers)),
            ("status", ss(report_status(obr.result_status.as_deref()))),
            ("category", arr(categories)),
            ("code", Some(codeable(&obr.universal_service_id))),
            ("subject", Some(self.subject_ref(who))),
            ("effectiveDateTime", effective.map(|e| s(&e))),
            (
                "issued",
                obr.results_reported
                    .and_then(|d| self.instant(d))
                    .map(|i| s(&i)),
            ),
            (
                "result",
                arr(results
                    .iter()
                    .map(|r| obj([("reference", ss(r))]))
                    .collect()),
            ),
            (
                "conclusion",
                (!conclusion.is_empty()).then(|| s(&conclusion.join("\n"))),
            ),
        ])
    }

    fn subject_ref(&self, who: &Who<'_>) -> Json {
        subject_reference(self.ctx, who.subject, who.enrolment)
    }

    /// FHIR dateTime (offset kept, MSH-7's when absent) and the local date.
    fn datetime(&self, d: Dtm) -> Result<(String, Date), Reason> {
        let d = match self.default_offset {
            Some(off) => d.with_default_offset(off),
            None => d,
        };
        let invalid = |why: &str| Reason::InvalidDateTime {
            value: d.to_string(),
            why: why.to_string(),
        };
        let text = d.to_fhir_datetime().map_err(|e| invalid(&e.to_string()))?;
        if d.precision() < Precision::Day {
            return Err(invalid("a day is needed to check the trial period"));
        }
        let date = dtm_date(&d).ok_or_else(|| invalid("no such day"))?;
        Ok((text, date))
    }

    /// A FHIR instant (needs a time and an offset), else `None`.
    fn instant(&self, d: Dtm) -> Option<String> {
        let d = match self.default_offset {
            Some(off) => d.with_default_offset(off),
            None => d,
        };
        d.has_time().then(|| d.to_fhir_datetime().ok()).flatten()
    }
}

/// `Patient/{id}` with the subject identifier.
pub(crate) fn subject_reference(ctx: &TrialContext, subject: &str, enrolment: &Enrolment) -> Json {
    obj([
        (
            "reference",
            Some(s(&format!("Patient/{}", enrolment.patient_id))),
        ),
        (
            "identifier",
            Some(obj([
                ("system", ss(&ctx.protocol().subject_identifier_system)),
                ("value", ss(subject)),
            ])),
        ),
    ])
}

/// Validates `json` as `rtype` and wraps it with its fullUrl.
pub(crate) fn produce(json: Json, rtype: &str, full_url: String) -> Result<Produced, Reason> {
    validate_json(json, Some(rtype), "")
        .map(|resource| Produced { full_url, resource })
        .map_err(|outcome| Reason::InvalidResource {
            resource_type: rtype.to_string(),
            detail: outcome
                .issues
                .iter()
                .find(|i| i.is_error())
                .map(|i| {
                    let at = i
                        .expression
                        .first()
                        .map(|e| format!(" at {e}"))
                        .unwrap_or_default();
                    format!("{}{at}", i.diagnostics)
                })
                .unwrap_or_default(),
        })
}

fn dtm_date(d: &Dtm) -> Option<Date> {
    let month = Month::try_from(d.month()?).ok()?;
    Date::from_calendar_date(i32::from(d.year()), month, d.day()?).ok()
}

/// `SEG[k]` for a segment location (`line n` when the segment is unknown).
fn segment(loc: &Location) -> String {
    match (loc.segment_id, loc.segment_sequence) {
        (Some(id), Some(seq)) => format!("{id}[{seq}]"),
        _ => format!("line {}", loc.line),
    }
}

/// `SEG[k].f` (or `SEG[k]`, or `line n`) for an error location.
fn location(loc: &Location) -> String {
    let seg = segment(loc);
    match (loc.segment_id, loc.field) {
        (Some(_), Some(f)) if loc.segment_sequence.is_some() => format!("{seg}.{f}"),
        _ => seg,
    }
}

/// A v2 coding-system name (table 0396) as a FHIR system URI, for the
/// systems clinflow knows; others give no system (code and text are kept).
pub fn system_for(name: &str) -> Option<&'static str> {
    Some(match name {
        "LN" => "http://loinc.org",
        "SCT" | "SNM" | "SNOMED-CT" => "http://snomed.info/sct",
        "UCUM" => "http://unitsofmeasure.org",
        "I10" | "ICD10" => "http://hl7.org/fhir/sid/icd-10",
        "I9C" => "http://hl7.org/fhir/sid/icd-9-cm",
        "RXNORM" => "http://www.nlm.nih.gov/research/umls/rxnorm",
        "HL70078" => INTERPRETATION_SYSTEM,
        _ => return None,
    })
}

fn coding_json(c: &Coding<'_>) -> Option<Json> {
    let code = c.code.as_deref()?;
    Some(obj([
        ("system", c.system.as_deref().and_then(system_for).map(s)),
        ("code", ss(code)),
        ("display", c.display.as_deref().map(s)),
    ]))
}

/// A CodeableConcept from every coding triplet; `text` is the first
/// display (or the first code when no triplet has a code).
fn codeable(codings: &[Coding<'_>]) -> Json {
    let text = codings
        .iter()
        .find_map(|c| c.display.as_deref())
        .or_else(|| codings.iter().find_map(|c| c.code.as_deref()));
    obj([
        (
            "coding",
            arr(codings.iter().filter_map(coding_json).collect()),
        ),
        ("text", text.map(s)),
    ])
}

fn category(code: &str, display: &str) -> Json {
    obj([(
        "coding",
        arr(vec![obj([
            ("system", ss(OBSERVATION_CATEGORY)),
            ("code", ss(code)),
            ("display", ss(display)),
        ])]),
    )])
}

/// OBX-11 -> `Observation.status` (V2-to-FHIR ConceptMap for table 0085).
pub fn observation_status(code: &str) -> Option<&'static str> {
    Some(match code {
        "F" | "U" => "final",
        "C" => "corrected",
        "P" | "R" | "S" => "preliminary",
        "I" | "O" => "registered",
        "D" | "W" => "entered-in-error",
        "X" | "N" => "cancelled",
        _ => return None,
    })
}

/// OBR-25 -> `DiagnosticReport.status`; absent or unknown is `unknown`.
pub fn report_status(code: Option<&str>) -> &'static str {
    match code.unwrap_or_default() {
        "F" => "final",
        "C" => "corrected",
        "P" => "preliminary",
        "A" | "R" => "partial",
        "O" | "I" | "S" => "registered",
        "X" => "cancelled",
        _ => "unknown",
    }
}

/// OBX-7 as a `referenceRange`: `low-high`, `<high`, `<=high`, `>low`,
/// `>=low` with the OBX-6 unit, else as text.
fn reference_range(text: &str, unit: &str) -> Json {
    let q = |t: &str| decimal_text(t).map(|(t, _)| quantity(&t, unit));
    let t = text.trim();
    let (low, high) = if let Some(rest) = t.strip_prefix("<=").or_else(|| t.strip_prefix('<')) {
        (None, q(rest))
    } else if let Some(rest) = t.strip_prefix(">=").or_else(|| t.strip_prefix('>')) {
        (q(rest), None)
    } else {
        // The separator is the first '-' after the first character (a
        // leading '-' is the low bound's sign).
        match t.get(1..).and_then(|r| r.find('-')).map(|i| i + 1) {
            Some(i) => match (q(&t[..i]), q(&t[i + 1..])) {
                (Some(l), Some(h)) => (Some(l), Some(h)),
                _ => (None, None),
            },
            None => (None, None),
        }
    };
    if low.is_none() && high.is_none() {
        return obj([("text", ss(text))]);
    }
    obj([("low", low), ("high", high), ("text", ss(text))])
}

/// The `value[x]` of an OBX.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// NM, or SN with one number: a number with an optional comparator.
    Quantity {
        /// Normalised decimal text.
        text: String,
        /// Its value.
        value: f64,
        /// `<`, `<=`, `>=`, `>` (SN-1).
        comparator: Option<&'static str>,
    },
    /// Any other type: the `value[x]` element name and its JSON.
    Other(&'static str, Json),
}

/// OBX-5 by OBX-2, as the V2-to-FHIR IG maps it: NM -> `valueQuantity`;
/// SN -> `valueQuantity` (with comparator), `valueRange` (`1^-^5`) or
/// `valueRatio` (`1^:^128`, `1^/^2`); ST, TX, FT -> `valueString`
/// (repetitions joined by newlines); CE, CWE, CNE -> `valueCodeableConcept`;
/// DT, DTM, TS -> `valueDateTime` (a time without offset takes
/// `default_offset`); TM -> `valueTime`. Unit elements of a quantity are
/// added by the caller.
pub fn value_x(obx: &Obx<'_>, default_offset: Option<i16>) -> Result<Value, Reason> {
    let vt = obx.value_type.as_deref().unwrap_or_default();
    let Some(first) = obx.values.first() else {
        return Err(Reason::Malformed("OBX-5 has no value".into()));
    };
    let number = |t: &str| decimal_text(t).ok_or_else(|| Reason::NotANumber(t.to_string()));
    match vt {
        "NM" => {
            let (text, value) = number(&first.text)?;
            Ok(Value::Quantity {
                text,
                value,
                comparator: None,
            })
        }
        "SN" => sn(first),
        "ST" | "TX" | "FT" => {
            let joined: Vec<&str> = obx.values.iter().map(|v| v.text.as_ref()).collect();
            Ok(Value::Other("valueString", s(&joined.join("\n"))))
        }
        "CE" | "CWE" | "CNE" => {
            let c = |n: usize| first.component(n).map(std::borrow::Cow::Borrowed);
            let codings = [(1, 2, 3), (4, 5, 6), (10, 11, 12)]
                .into_iter()
                .map(|(a, b, d)| Coding {
                    code: c(a),
                    display: c(b),
                    system: c(d),
                })
                .filter(|k| k.code.is_some() || k.display.is_some())
                .collect::<Vec<_>>();
            Ok(Value::Other("valueCodeableConcept", codeable(&codings)))
        }
        "DT" | "DTM" | "TS" => {
            let raw = first.component(1).unwrap_or_default();
            let d = parse_dtm(raw).map_err(|e| Reason::InvalidDateTime {
                value: raw.to_string(),
                why: e.to_string(),
            })?;
            let d = match default_offset {
                Some(off) => d.with_default_offset(off),
                None => d,
            };
            let text = d.to_fhir_datetime().map_err(|e| Reason::InvalidDateTime {
                value: raw.to_string(),
                why: e.to_string(),
            })?;
            Ok(Value::Other("valueDateTime", s(&text)))
        }
        "TM" => Ok(Value::Other("valueTime", s(&tm(&first.text)?))),
        other => Err(Reason::UnsupportedValueType(other.to_string())),
    }
}

fn sn(v: &ObxValue<'_>) -> Result<Value, Reason> {
    let comparator = match v.component(1) {
        None | Some("=") => None,
        Some("<") => Some("<"),
        Some(">") => Some(">"),
        Some("<=") => Some("<="),
        Some(">=") => Some(">="),
        Some(other) => return Err(Reason::NotANumber(format!("SN comparator {other}"))),
    };
    let number = |t: &str| decimal_text(t).ok_or_else(|| Reason::NotANumber(t.to_string()));
    let (text, value) = number(v.component(2).unwrap_or_default())?;
    match (v.component(3), v.component(4)) {
        (None, None) => Ok(Value::Quantity {
            text,
            value,
            comparator,
        }),
        (Some(sep), Some(n2)) if comparator.is_none() => {
            let (t2, _) = number(n2)?;
            let q = |t: &str| obj([("value", Some(crate::json::num(t)))]);
            match sep {
                "-" => Ok(Value::Other(
                    "valueRange",
                    obj([("low", Some(q(&text))), ("high", Some(q(&t2)))]),
                )),
                ":" | "/" => Ok(Value::Other(
                    "valueRatio",
                    obj([("numerator", Some(q(&text))), ("denominator", Some(q(&t2)))]),
                )),
                other => Err(Reason::NotANumber(format!("SN separator {other}"))),
            }
        }
        _ => Err(Reason::NotANumber(v.text.to_string())),
    }
}

/// HL7 TM (`HH[MM[SS[.S+]]][+/-ZZZZ]`) as FHIR time `HH:MM:SS[.S+]` (FHIR
/// times have no offset: it is dropped).
fn tm(raw: &str) -> Result<String, Reason> {
    let bad = |why: &str| Reason::InvalidDateTime {
        value: raw.to_string(),
        why: why.to_string(),
    };
    let body = raw.split(['+', '-']).next().unwrap_or_default();
    let (hms, frac) = match body.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (body, None),
    };
    if !hms.bytes().all(|b| b.is_ascii_digit()) || !matches!(hms.len(), 2 | 4 | 6) {
        return Err(bad("expected HH, HHMM or HHMMSS"));
    }
    let part = |i: usize| {
        hms.get(i..i + 2)
            .and_then(|p| p.parse::<u8>().ok())
            .unwrap_or(0)
    };
    let (h, m, sec) = (part(0), part(2), part(4));
    if h > 23 || m > 59 || sec > 59 {
        return Err(bad("out of range"));
    }
    let mut out = format!("{h:02}:{m:02}:{sec:02}");
    if let Some(f) = frac {
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) || hms.len() != 6 {
            return Err(bad("bad fraction"));
        }
        out.push('.');
        out.push_str(f);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_ranges() {
        let r = |t: &str| reference_range(t, "mg/dL").to_compact();
        assert!(
            r("70-99").contains(r#""low":{"value":70"#)
                && r("70-99").contains(r#""high":{"value":99"#)
        );
        assert!(
            r("-5--1").contains(r#""low":{"value":-5"#)
                && r("-5--1").contains(r#""high":{"value":-1"#)
        );
        assert!(r("<5").contains(r#""high""#) && !r("<5").contains(r#""low""#));
        assert!(r(">=10").contains(r#""low""#) && !r(">=10").contains(r#""high""#));
        assert_eq!(r("negative"), r#"{"text":"negative"}"#);
        assert_eq!(r("1-x"), r#"{"text":"1-x"}"#);
    }

    #[test]
    fn times() {
        assert_eq!(tm("0815").unwrap(), "08:15:00");
        assert_eq!(tm("081530.25+0100").unwrap(), "08:15:30.25");
        for bad in ["", "8", "2460", "081560", "08a5", "0815.5", "081530."] {
            assert!(tm(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(observation_status("F"), Some("final"));
        assert_eq!(observation_status("C"), Some("corrected"));
        assert_eq!(observation_status("W"), Some("entered-in-error"));
        assert_eq!(observation_status("f"), None);
        assert_eq!(report_status(Some("F")), "final");
        assert_eq!(report_status(None), "unknown");
    }

    #[test]
    fn coding_systems() {
        assert_eq!(system_for("LN"), Some("http://loinc.org"));
        assert_eq!(system_for("99LOCAL"), None);
    }
}
