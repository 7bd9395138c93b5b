//! ORU^R01 -> FHIR: the reference sample and the invalid cases of the
//! reference trial's README, asserted on values, reasons and locations.

mod common;

use clinflow_edc::hl7::{value_x, Value};
use clinflow_edc::provenance::{sha256_hex, CANONICAL_QUANTITY_URL, PROTOCOL_VERSION_URL};
use clinflow_edc::{ingest_hl7, ItemOutcome, Reason};
use clinflow_fhir::Json;
use clinflow_hl7v2::{Message, OruR01};
use common::*;

const MSH: &str = "MSH|^~\\&|LIS|CENTRAL-LAB|CLINFLOW|CARDIO-01|20260302101500-0500||ORU^R01^ORU_R01|T-1|P|2.5.1\r";
const PID: &str = "PID|1||CARDIO-01-0001^^^CARDIO-01^RI||Doe^Jane\r";
const OBR: &str = "OBR|1|ORD-1|LAB-1|85354-9^Blood pressure panel^LN|||20260302094000-0500\r";

fn message(obx: &[&str]) -> String {
    let mut m = format!("{MSH}{PID}{OBR}");
    for o in obx {
        m.push_str(o);
        m.push('\r');
    }
    m
}

fn one(input: &str) -> ItemOutcome {
    let items = ingest_hl7(&ctx(), input.as_bytes());
    assert_all_valid(&items);
    assert_eq!(items.len(), 1, "{items:#?}");
    items.into_iter().next().unwrap()
}

fn sbp(value: &str) -> String {
    format!("OBX|1|NM|8480-6^Systolic blood pressure^LN||{value}|mm[Hg]^^UCUM|90-120|H|||F|||20260302094000-0500")
}

fn hba1c(value: &str) -> String {
    format!("OBX|2|NM|4548-4^HbA1c^LN||{value}|%^percent^UCUM|4.0-5.6||||F")
}

#[test]
fn the_lab_sample_maps_to_reports_and_observations() {
    let items = ingest_hl7(&ctx(), LAB);
    assert_all_valid(&items);
    assert_eq!(items.len(), 2);
    for item in &items {
        assert!(item.is_stored());
        assert!(item.rejections.is_empty(), "{:#?}", item.rejections);
        assert!(
            item.queries.is_empty(),
            "every sample value is inside the soft range"
        );
    }

    // Message 1: Anna Schmidt, glucose and HbA1c, one report.
    let obs = of_type(&items[0], "Observation");
    let reports = of_type(&items[0], "DiagnosticReport");
    assert_eq!((obs.len(), reports.len()), (2, 1));
    let glucose = obs[0];
    assert_eq!(text(glucose, "status"), "final");
    assert_eq!(text(glucose, "code.coding.0.system"), "http://loinc.org");
    assert_eq!(text(glucose, "code.coding.0.code"), "2345-7");
    assert_eq!(text(glucose, "subject.reference"), "Patient/CARDIO-01-0003");
    assert_eq!(
        text(glucose, "subject.identifier.system"),
        "https://trials.example.org/CARDIO-01/subject"
    );
    assert_eq!(text(glucose, "subject.identifier.value"), "CARDIO-01-0003");
    assert_eq!(text(glucose, "valueQuantity.value"), "112");
    assert_eq!(text(glucose, "valueQuantity.code"), "mg/dL");
    assert_eq!(
        text(glucose, "valueQuantity.system"),
        "http://unitsofmeasure.org"
    );
    assert!(
        extension(glucose, CANONICAL_QUANTITY_URL).is_none(),
        "already canonical"
    );
    assert_eq!(
        text(glucose, "effectiveDateTime"),
        "2026-03-02T07:15:00+01:00"
    );
    assert_eq!(text(glucose, "referenceRange.0.low.value"), "70");
    assert_eq!(text(glucose, "referenceRange.0.high.value"), "99");
    assert_eq!(text(glucose, "interpretation.0.coding.0.code"), "H");
    assert_eq!(text(glucose, "issued"), "2026-03-02T09:10:00+01:00");
    // Enrolled 2026-02-09: 2026-03-02 is day 21, in no window.
    assert_eq!(visit(glucose), "unscheduled");
    assert_eq!(
        text(
            extension(glucose, PROTOCOL_VERSION_URL).unwrap(),
            "valueInteger"
        ),
        "3"
    );
    assert_eq!(provenance(glucose, "format"), "hl7v2");
    assert_eq!(provenance(glucose, "sender"), "LIS|CENTRAL-LAB");
    assert_eq!(provenance(glucose, "control-id"), "LAB-20260302-0001");
    assert_eq!(provenance(glucose, "sha256"), sha256_hex(LAB));
    assert_eq!(provenance(glucose, "location"), "OBX[1]");

    let hba1c = obs[1];
    assert_eq!(text(hba1c, "valueQuantity.value"), "7.4");
    assert_eq!(
        text(hba1c, "note.0.text"),
        "Fasting sample & analysed within 2h"
    );
    assert!(
        glucose.get("note").is_none(),
        "the NTE follows the second OBX"
    );

    let report = reports[0];
    assert_eq!(text(report, "code.coding.0.code"), "24323-8");
    assert_eq!(text(report, "status"), "final");
    assert_eq!(
        text(report, "effectiveDateTime"),
        "2026-03-02T07:15:00+01:00"
    );
    assert_eq!(text(report, "identifier.1.value"), "ORD-7781");
    assert_eq!(text(report, "identifier.2.value"), "LAB-99120");
    let refs: Vec<&str> = (0..2)
        .map(|i| text(report, &format!("result.{i}.reference")))
        .collect();
    let urls: Vec<&str> = items[0].stored[..2]
        .iter()
        .map(|p| p.full_url.as_str())
        .collect();
    assert_eq!(refs, urls);
    // Keys are the identifiers, distinct per resource.
    for p in &items[0].stored {
        assert_eq!(text(p.resource.json(), "identifier.0.value"), p.full_url);
    }
    assert_ne!(urls[0], urls[1]);

    // Message 2: Jane Doe, blood pressure and a glucose in mmol/L.
    let obs = of_type(&items[1], "Observation");
    assert_eq!(obs.len(), 3);
    let glucose = obs[2];
    assert_eq!(
        text(glucose, "valueQuantity.value"),
        "6.1",
        "the value as sent"
    );
    assert_eq!(text(glucose, "valueQuantity.code"), "mmol/L");
    let canonical = extension(glucose, CANONICAL_QUANTITY_URL).expect("converted value");
    assert_eq!(text(canonical, "valueQuantity.value"), "109.8976"); // 6.1 * 18.016
    assert_eq!(text(canonical, "valueQuantity.code"), "mg/dL");
    assert_eq!(
        text(glucose, "effectiveDateTime"),
        "2026-03-02T09:40:00-05:00"
    );
    // Enrolled 2026-02-02: day 28 is week-4.
    assert_eq!(visit(glucose), "week-4");
    assert_eq!(text(obs[0], "valueQuantity.code"), "mm[Hg]");
    assert_eq!(provenance(glucose, "control-id"), "LAB-20260302-0002");
    let report = of_type(&items[1], "DiagnosticReport")[0];
    assert_eq!(text(report, "status"), "unknown", "the OBR has no OBR-25");
}

#[test]
fn carriage_returns_and_newlines_give_the_same_resources() {
    let cr: Vec<u8> = LAB
        .iter()
        .map(|b| if *b == b'\n' { b'\r' } else { *b })
        .collect();
    let a = ingest_hl7(&ctx(), LAB);
    let b = ingest_hl7(&ctx(), &cr);
    assert_all_valid(&b);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.stored.len(), y.stored.len());
        for (p, q) in x.stored.iter().zip(&y.stored) {
            // Same keys (sender + MSH-10 + segment), other input hash.
            assert_eq!(p.full_url, q.full_url);
            assert_eq!(
                text(p.resource.json(), "code.coding.0.code"),
                text(q.resource.json(), "code.coding.0.code")
            );
        }
    }
}

#[test]
fn an_unknown_subject_rejects_the_message() {
    let input = message(&[&sbp("120")]).replace("CARDIO-01-0001", "CARDIO-01-0099");
    let item = one(&input);
    assert!(!item.is_stored());
    assert_eq!(item.rejections.len(), 1);
    assert_eq!(
        item.rejections[0].reason,
        Reason::UnknownSubject("CARDIO-01-0099".into())
    );
    assert_eq!(item.rejections[0].location, "PID[1].3");
}

#[test]
fn a_value_outside_the_hard_range_is_rejected_and_the_others_stored() {
    let item = one(&message(&[&sbp("400"), &hba1c("7.4")]));
    assert!(item.is_stored());
    let obs = of_type(&item, "Observation");
    assert_eq!(obs.len(), 1);
    assert_eq!(text(obs[0], "code.coding.0.code"), "4548-4");
    // The HbA1c has no OBX-14: it takes OBR-7.
    assert_eq!(
        text(obs[0], "effectiveDateTime"),
        "2026-03-02T09:40:00-05:00"
    );
    let report = of_type(&item, "DiagnosticReport")[0];
    assert!(report
        .get("result")
        .is_some_and(|r| matches!(r, Json::Array(a) if a.len() == 1)));
    assert_eq!(item.rejections.len(), 1);
    let r = &item.rejections[0];
    assert_eq!(r.location, "OBX[1].5");
    assert!(
        matches!(&r.reason, Reason::OutsideHardRange { measurement, value, low, high, .. }
            if measurement == "systolic-bp" && value == "400" && low == "40" && high == "300"),
        "{:?}",
        r.reason
    );
    assert!(r.reason.to_string().contains("outside the plausible range"));
}

#[test]
fn a_converted_value_is_checked_in_the_canonical_unit() {
    // 100 mmol/L = 1801.6 mg/dL, above the hard 1500.
    let obx = "OBX|1|NM|2345-7^Glucose^LN||100|mmol/L^^UCUM|||||F|||20260302094000-0500";
    let item = one(&message(&[obx]));
    assert!(!item.is_stored());
    assert!(
        matches!(&item.rejections[0].reason, Reason::OutsideHardRange { value, unit, .. } if value == "1801.6" && unit == "mg/dL")
    );
}

#[test]
fn a_value_outside_the_soft_range_is_stored_with_a_query() {
    let item = one(&message(&[&hba1c("7.4"), &sbp("200")]));
    assert!(item.rejections.is_empty());
    assert_eq!(of_type(&item, "Observation").len(), 2);
    assert_eq!(item.queries.len(), 1);
    let q = &item.queries[0];
    assert_eq!(q.location, "OBX[2].5", "the second OBX of the message");
    assert_eq!(q.measurement, "systolic-bp");
    assert_eq!(q.value, "200");
    assert_eq!(q.site.as_str(), "site-001");
    assert_eq!(q.subject, "CARDIO-01-0001");
    assert_eq!((q.soft.low(), q.soft.high()), (90.0, 180.0));
    // The query points at the stored systolic value.
    let about = item.stored[q.resource].resource.json();
    assert_eq!(text(about, "code.coding.0.code"), "8480-6");
}

#[test]
fn a_wrong_unit_is_rejected_at_obx_6() {
    let obx = "OBX|1|NM|2345-7^Glucose^LN||1.1|g/L^^UCUM|||||F|||20260302094000-0500";
    let item = one(&message(&[obx, &hba1c("6.0")]));
    assert_eq!(of_type(&item, "Observation").len(), 1);
    let r = &item.rejections[0];
    assert_eq!(r.location, "OBX[1].6");
    assert!(
        matches!(&r.reason, Reason::WrongUnit { unit, measurement, expected } if unit == "g/L" && measurement == "glucose" && expected == "mg/dL, mmol/L")
    );
}

#[test]
fn a_date_outside_the_trial_period_is_rejected() {
    let obx = "OBX|1|NM|8480-6^SBP^LN||120|mm[Hg]|||||F|||20251231235900-0500";
    let item = one(&message(&[obx]));
    assert!(!item.is_stored(), "no result, no report");
    let r = &item.rejections[0];
    assert_eq!(r.location, "OBX[1].14");
    assert!(
        matches!(&r.reason, Reason::OutsidePeriod { date, start, end } if date == "2025-12-31" && start == "2026-01-01" && end == "2027-12-31")
    );
    // From OBR-7 when the OBX has no time.
    let item =
        one(&message(&[&hba1c("6.0")]).replace("20260302094000-0500", "20280101080000-0500"));
    assert_eq!(item.rejections[0].location, "OBR[1].7");
}

#[test]
fn an_unknown_measurement_is_rejected_at_obx_3() {
    let obx = "OBX|1|NM|9999-9^Mystery^LN||1|mg/dL|||||F";
    let item = one(&message(&[obx, &hba1c("6.0")]));
    assert_eq!(item.rejections[0].location, "OBX[1].3");
    assert_eq!(
        item.rejections[0].reason,
        Reason::UnknownMeasurement("9999-9".into())
    );
    assert!(item.is_stored());
}

#[test]
fn non_numeric_values_and_bad_statuses_are_rejected_with_their_field() {
    let cases = [
        (
            "OBX|1|NM|8480-6^SBP^LN||high|mm[Hg]|||||F",
            "OBX[1].5",
            "not-a-number",
        ),
        (
            "OBX|1|ST|8480-6^SBP^LN||high|mm[Hg]|||||F",
            "OBX[1].2",
            "unsupported-value-type",
        ),
        (
            "OBX|1|NM|8480-6^SBP^LN||120|mm[Hg]|||||Q",
            "OBX[1].11",
            "unknown-status",
        ),
    ];
    for (obx, location, code) in cases {
        let item = one(&message(&[obx]));
        assert_eq!(item.rejections.len(), 1, "{obx}: {:?}", item.rejections);
        assert_eq!(item.rejections[0].location, location, "{obx}");
        assert_eq!(item.rejections[0].reason.code(), code, "{obx}");
    }
}

#[test]
fn malformed_segments_and_garbage_are_rejected_with_their_place() {
    // An OBX without OBX-3: that OBX is rejected, the next one kept.
    let item = one(&message(&["OBX|1|NM|||120|mm[Hg]|||||F", &hba1c("6.0")]));
    assert_eq!(item.rejections.len(), 1);
    assert_eq!(item.rejections[0].location, "OBX[1].3");
    assert_eq!(item.rejections[0].reason.code(), "malformed");
    assert!(item.is_stored());

    // Garbage between two messages: one rejected item of its own.
    let good = message(&[&hba1c("6.0")]);
    let input = format!(
        "{good}this is not HL7\rnor this\r{}",
        good.replace("T-1", "T-2")
    );
    let items = ingest_hl7(&ctx(), input.as_bytes());
    assert_all_valid(&items);
    assert_eq!(items.len(), 3);
    assert!(items[0].is_stored() && items[2].is_stored());
    assert!(!items[1].is_stored());
    assert_eq!(items[1].rejections[0].reason, Reason::NotAMessage);
    assert_eq!(
        items[1].rejections[0].location, "line 5",
        "after MSH, PID, OBR, OBX"
    );

    // A message that is not an ORU^R01, and one with a broken header.
    let adt = message(&[]).replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01");
    let item = one(&adt);
    assert_eq!(item.rejections[0].reason.code(), "malformed");
    assert!(
        item.rejections[0].location.starts_with("MSH[1].9"),
        "{}",
        item.rejections[0].location
    );
    let items = ingest_hl7(&ctx(), b"MSH|^~\\&\r");
    assert_eq!(items.len(), 1);
    assert!(!items[0].is_stored());
}

#[test]
fn value_types_map_to_the_ig_value_x() {
    let obx = [
        ("SN", ">^100", "valueQuantity"),
        ("SN", "^1^:^128", "valueRatio"),
        ("SN", "^1^-^5", "valueRange"),
        ("ST", "positive", "valueString"),
        ("TX", "two~lines", "valueString"),
        ("FT", "free \\.br\\ text", "valueString"),
        ("CE", "260385009^Negative^SCT", "valueCodeableConcept"),
        ("CWE", "N^Normal^HL70078^n^normal^L", "valueCodeableConcept"),
        ("DT", "20260302", "valueDateTime"),
        ("DTM", "202603020815", "valueDateTime"),
        ("TM", "081530", "valueTime"),
    ];
    for (vt, v, element) in obx {
        let input = message(&[&format!("OBX|1|{vt}|1234-5^Thing^LN||{v}||||||F")]);
        let msg = Message::parse(input.as_bytes()).unwrap();
        let oru = OruR01::read(&msg).unwrap();
        let (_, _, o) = oru.observations().next().unwrap();
        let obx = o.obx.as_ref().unwrap();
        let value = value_x(obx, Some(-300)).unwrap_or_else(|e| panic!("{vt} {v}: {e}"));
        let (name, json) = match value {
            Value::Quantity {
                text, comparator, ..
            } => {
                assert_eq!(comparator, Some(">"));
                assert_eq!(text, "100");
                (
                    "valueQuantity",
                    Json::Object(vec![
                        ("value".into(), Json::Number(text)),
                        ("comparator".into(), Json::String(">".into())),
                    ]),
                )
            }
            Value::Other(name, json) => (name, json),
        };
        assert_eq!(name, element, "{vt} {v}");
        let resource = Json::Object(vec![
            ("resourceType".into(), Json::String("Observation".into())),
            ("status".into(), Json::String("final".into())),
            (
                "code".into(),
                Json::Object(vec![("text".into(), Json::String("x".into()))]),
            ),
            (name.into(), json.clone()),
        ]);
        clinflow_fhir::validate::validate_json(resource, Some("Observation"), "")
            .unwrap_or_else(|o| panic!("{vt} {v}: {}", o.to_json_string()));
        match vt {
            "DTM" => assert_eq!(
                json.as_str(),
                Some("2026-03-02T08:15:00-05:00"),
                "the sender's offset"
            ),
            "DT" => assert_eq!(json.as_str(), Some("2026-03-02")),
            "TM" => assert_eq!(json.as_str(), Some("08:15:30")),
            "TX" => assert_eq!(json.as_str(), Some("two\nlines")),
            "CWE" => {
                assert_eq!(
                    text(&json, "coding.0.system"),
                    "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
                );
                assert_eq!(text(&json, "coding.1.code"), "n");
            }
            "CE" => assert_eq!(text(&json, "coding.0.system"), "http://snomed.info/sct"),
            _ => {}
        }
    }
}

#[test]
fn an_order_without_results_is_rejected_where_it_is() {
    // Found by hl7_mutated_sample: an OBR whose OBX lost their segment
    // ends left an item neither stored nor rejected.
    let item = one(&message(&[]));
    assert!(!item.is_stored());
    assert_eq!(item.rejections.len(), 1, "{item:?}");
    assert!(matches!(&item.rejections[0].reason, Reason::Malformed(m) if m.contains("no OBX")));
    assert_eq!(item.rejections[0].location, "OBR[1]");
}
