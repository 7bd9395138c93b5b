//! Reading the reference protocol, and the errors malformed protocols give.
//! Expected lines are computed from each test's own text, never hard-coded.

use super::*;
use crate::model::{ItemType, Phase};
use proptest::prelude::*;
use time::macros::date;

const REFERENCE: &str = include_str!("../../../../reference-trial/protocol.yaml");

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    match text.lines().position(|l| l.contains(needle)) {
        Some(i) => i + 1,
        None => panic!("{needle:?} is not in the text"),
    }
}

/// The 1-based column of `needle` on its line.
fn column_of(text: &str, needle: &str) -> usize {
    let line = text.lines().nth(line_of(text, needle) - 1).unwrap_or("");
    line.find(needle)
        .map_or(0, |c| line[..c].chars().count() + 1)
}

/// The reference protocol with `from` replaced by `to` (which must occur).
fn edit(from: &str, to: &str) -> String {
    assert!(
        REFERENCE.contains(from),
        "{from:?} is not in the reference protocol"
    );
    REFERENCE.replacen(from, to, 1)
}

#[test]
fn the_reference_protocol_loads() {
    let p = parse_yaml(REFERENCE).unwrap();
    assert_eq!(p.id.as_str(), "CARDIO-01");
    assert_eq!(p.version, 3);
    assert_eq!(p.phase, Phase::Phase3);
    assert_eq!(p.period.start, date!(2026 - 01 - 01));
    assert_eq!(p.period.end, date!(2027 - 12 - 31));
    assert_eq!(
        p.subject_identifier_system,
        "https://trials.example.org/CARDIO-01/subject"
    );
    assert_eq!(p.sites.len(), REFERENCE.matches("{ id: site-").count());
    assert_eq!(p.sites.len(), 3);
    assert_eq!(p.sites[1].country.as_str(), "DE");
    assert_eq!(p.sites[2].timezone, "Asia/Shanghai");
    assert_eq!(p.arms, ["drug-x", "placebo"]);
    let visit_ids: Vec<&str> = p.visits.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(visit_ids, ["screening", "baseline", "week-4", "week-12"]);
    assert_eq!((p.visits[0].day, p.visits[0].window.before), (-14, 14));
    assert_eq!(p.measurements.len(), 7);

    let glucose = p.measurement("glucose").unwrap();
    assert_eq!(glucose.loinc.as_str(), "2345-7");
    assert_eq!(glucose.unit.as_str(), "mg/dL");
    assert_eq!(glucose.convert[0].unit.as_str(), "mmol/L");
    assert_eq!(glucose.convert[0].factor, 18.016);
    assert_eq!(glucose.hard, Range(10.0, 1500.0));
    assert_eq!(glucose.soft, Some(Range(70.0, 250.0)));
    assert_eq!(p.measurement("29463-7").unwrap().id, "body-weight");
    assert_eq!(p.measurement("steps").unwrap().soft, None);
    assert_eq!(
        p.measurement("systolic-bp").unwrap().unit.as_str(),
        "mm[Hg]"
    );

    let diary = p.questionnaire("daily-diary").unwrap();
    assert_eq!(diary.items.len(), 4);
    let pain = diary.item("pain").unwrap();
    assert_eq!(
        (pain.kind, pain.required, pain.range),
        (ItemType::Integer, true, Some(Range(0.0, 10.0)))
    );
    assert_eq!(pain.text, "Pain today (0 none - 10 worst)");
    let notes = diary.item("notes").unwrap();
    assert_eq!(
        (notes.kind, notes.required, notes.max_length),
        (ItemType::String, false, Some(500))
    );
    assert_eq!(p.adverse_events.serious_report_hours, 24);
}

#[test]
fn the_json_form_reads_back_to_the_same_protocol() {
    let p = parse_yaml(REFERENCE).unwrap();
    let json = p.to_json();
    assert_eq!(parse_json(&json).unwrap(), p);
    assert_eq!(parse_yaml(&json).unwrap(), p, "JSON is YAML too");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["period"]["start"], "2026-01-01");
    assert_eq!(v["questionnaires"][0]["items"][0]["linkId"], "pain");
    assert!(
        v["measurements"][6].get("soft").is_none(),
        "absent keys stay absent"
    );
}

#[test]
fn bad_yaml_syntax_names_its_line() {
    let text = edit("title: Drug X", "title: Drug: X");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Syntax, "{e}");
    assert_eq!(e.line, Some(line_of(&text, "title: Drug: X")), "{e}");
    assert_eq!(e.path, "title", "{e}");

    let text = edit("arms: [drug-x, placebo]", "arms: [drug-x, placebo");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Syntax, "{e}");
    // libyaml notices the missing `]` at the next token, past the blank and
    // comment lines.
    assert_eq!(e.line, Some(line_of(&text, "visits:")), "{e}");
    assert!(e.message.contains("flow sequence"), "{e}");
}

#[test]
fn unknown_keys_are_errors_at_the_key() {
    // In a flow-style entry.
    let text = edit("{ id: site-002,", "{ id: site-002, zip: 10117,");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Schema);
    assert_eq!(e.path, "sites[1].zip");
    assert_eq!(e.line, Some(line_of(&text, "zip: 10117")));
    assert_eq!(e.column, Some(column_of(&text, "zip: 10117")));
    assert!(e.message.contains("unknown field `zip`"), "{e}");

    // In a block entry.
    let text = edit(
        "    soft: [40, 200]\n",
        "    soft: [40, 200]\n    colour: red\n",
    );
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        (
            "measurements[5].colour",
            Some(line_of(&text, "colour: red"))
        )
    );

    // At the top.
    let text = edit("title:", "titel:");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("titel", Some(line_of(&text, "titel:")))
    );
}

#[test]
fn wrong_types_name_the_value() {
    let text = edit("day: 28,", "day: soon,");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Schema);
    assert_eq!(e.path, "visits[2].day");
    assert_eq!(e.line, Some(line_of(&text, "day: soon")));
    assert_eq!(e.column, Some(column_of(&text, "soon")));
    assert!(e.message.contains("invalid type"), "{e}");

    let text = edit("window: { before: 3,", "window: { before: -3,");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        (
            "visits[2].window.before",
            Some(line_of(&text, "before: -3"))
        )
    );

    let text = edit("hard: [10, 1500]", "hard: [10]");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("measurements[3].hard", Some(line_of(&text, "hard: [10]")))
    );

    let text = edit("phase: phase-3", "phase: phase-5");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("phase", Some(line_of(&text, "phase-5")))
    );
    assert!(e.message.contains("unknown variant"), "{e}");

    let text = edit("    display: Body weight\n", "");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("measurements[5]", Some(line_of(&text, "id: body-weight")))
    );
    assert!(e.message.contains("missing field `display`"), "{e}");
}

#[test]
fn checked_values_are_refused_at_their_key() {
    let cases = [
        (
            "8462-4",
            "8462-5",
            "measurements[1].loinc",
            "the check digit should be 4",
        ),
        ("29463-7", "29463", "measurements[5].loinc", "LOINC"),
        (
            "unit: mg/dL",
            "unit: mg per dL",
            "measurements[3].unit",
            "UCUM",
        ),
        (
            "country: DE",
            "country: XX",
            "sites[1].country",
            "ISO 3166-1",
        ),
        ("id: site-003", "id: site 003", "sites[2].id", "site id"),
        ("id: CARDIO-01", "id: CARDIO_01", "id", "trial id"),
        (
            "start: 2026-01-01",
            "start: 2026-02-30",
            "period.start",
            "not a date",
        ),
    ];
    for (from, to, path, message) in cases {
        let text = edit(from, to);
        let e = parse_yaml(&text).unwrap_err();
        assert_eq!(e.kind, ProtocolErrorKind::Schema, "{e}");
        assert_eq!(e.path, path, "{e}");
        assert_eq!(e.line, Some(line_of(&text, to)), "{e}");
        assert!(e.message.contains(message), "{e}");
    }
}

/// Each case: the edit, the key path of the error, and text on the line
/// the error must name (after the edit).
#[test]
fn rules_name_line_and_key_path() {
    let too_long = format!("id: {}", "q".repeat(60));
    let cases: Vec<(&str, &str, &str, &str)> = vec![
        ("version: 3", "version: 0", "version", "version: 0"),
        ("end: 2027-12-31", "end: 2025-12-31", "period.end", "period:"),
        (
            "subject_identifier_system: https://trials",
            "subject_identifier_system: trials",
            "subject_identifier_system",
            "subject_identifier_system:",
        ),
        ("id: site-003", "id: site-001", "sites[2].id", "Peking"),
        ("timezone: Europe/Berlin", "timezone: berlin time", "sites[1].timezone", "berlin time"),
        ("arms: [drug-x, placebo]", "arms: []", "arms", "arms: []"),
        ("arms: [drug-x, placebo]", "arms: [drug-x, placebo, drug-x]", "arms[2]", "arms: ["),
        ("id: week-12", "id: week-4", "visits[3].id", "day: 84"),
        ("soft: [90, 180]", "soft: [90, 350]", "measurements[0].soft", "soft: [90, 350]"),
        ("soft: [70, 250]", "soft: [5, 250]", "measurements[3].soft", "soft: [5, 250]"),
        ("soft: [70, 250]", "soft: [250, 70]", "measurements[3].soft", "soft: [250, 70]"),
        ("hard: [20, 400]", "hard: [400, 20]", "measurements[5].hard", "hard: [400, 20]"),
        ("id: hba1c", "id: glucose", "measurements[4].id", "Hemoglobin"),
        ("loinc: 4548-4", "loinc: 2345-7", "measurements[4].loinc", "Hemoglobin"),
        ("factor: 18.016", "factor: 0", "measurements[3].convert[0].factor", "factor: 0 "),
        ("factor: 0.45359237", "factor: -1", "measurements[5].convert[0].factor", "factor: -1"),
        ("factor: 18.016", "factor: .inf", "measurements[3].convert[0].factor", ".inf"),
        ("unit: mmol/L", "unit: mg/dL", "measurements[3].convert[0].unit", "convert: [{ unit: mg/dL"),
        (
            "\nadverse_events:",
            "  - id: daily-diary  # again\n    title: Again\n    items: [{ linkId: a, text: A, type: boolean }]\n\nadverse_events:",
            "questionnaires[1].id",
            "# again",
        ),
        ("id: daily-diary", &too_long, "questionnaires[0].id", "id: qqq"),
        ("linkId: dizziness", "linkId: pain", "questionnaires[0].items[1].linkId", "linkId: pain, text: Did"),
        ("type: boolean, required: true }", "type: boolean, required: true, range: [0, 1] }", "questionnaires[0].items[1].range", "dizzy"),
        ("range: [0, 10]", "range: [0, 9.5]", "questionnaires[0].items[0].range", "9.5"),
        ("type: string,  required: false", "type: integer,  required: false", "questionnaires[0].items[3].max_length", "max_length"),
        ("max_length: 500", "max_length: 0", "questionnaires[0].items[3].max_length", "max_length: 0"),
        ("type: boolean, required: true }", "type: choice, required: true }", "questionnaires[0].items[1].options", "dizzy"),
        ("serious_report_hours: 24", "serious_report_hours: 0", "adverse_events.serious_report_hours", "serious_report_hours: 0"),
    ];
    for (from, to, path, on_line) in cases {
        let text = edit(from, to);
        let e = match parse_yaml(&text) {
            Err(e) => e,
            Ok(_) => panic!("{to:?} was accepted"),
        };
        assert_eq!(e.kind, ProtocolErrorKind::Rule, "{to:?}: {e}");
        assert_eq!(e.path, path, "{to:?}: {e}");
        assert_eq!(e.line, Some(line_of(&text, on_line)), "{to:?}: {e}");
        assert!(e.column.is_some(), "{to:?}: {e}");
    }
}

#[test]
fn the_broken_rule_first_in_the_text_is_reported() {
    let text = edit("id: hba1c", "id: glucose").replacen("hard: [20, 400]", "hard: [400, 20]", 1);
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(e.path, "measurements[4].id", "{e}");
    let text = edit("serious_report_hours: 24", "serious_report_hours: 0").replacen(
        "version: 3",
        "version: 0",
        1,
    );
    assert_eq!(parse_yaml(&text).unwrap_err().path, "version");
}

#[test]
fn a_rule_error_points_at_the_key_in_a_flow_entry() {
    let text = edit("soft: [90, 180]", "soft: [90, 350]");
    let e = parse_yaml(&text).unwrap_err();
    assert_eq!(e.column, Some(column_of(&text, "soft: [90, 350]")));
    assert_eq!(
        e.message,
        "the soft range [90, 350] is not inside the hard range [40, 300]"
    );
    let line = line_of(&text, "soft: [90, 350]");
    let col = column_of(&text, "soft: [90, 350]");
    assert_eq!(
        e.to_string(),
        format!(
            "line {line}, column {col}, at measurements[0].soft: {}",
            e.message
        )
    );
}

#[test]
fn json_errors_give_line_column_and_path() {
    let p = parse_yaml(REFERENCE).unwrap();
    let pretty = serde_json::to_string_pretty(&p).unwrap();

    let text = pretty.replacen("\"version\": 3", "\"version\": \"three\"", 1);
    let e = parse_json(&text).unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Schema);
    assert_eq!(
        (e.path.as_str(), e.line),
        ("version", Some(line_of(&text, "\"three\"")))
    );

    let text = pretty.replacen("\"loinc\": \"8462-4\"", "\"loinc\": \"8462-5\"", 1);
    let e = parse_json(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("measurements[1].loinc", Some(line_of(&text, "8462-5")))
    );

    let text = pretty.replacen("\"unit\": \"kg\"", "\"unit\": \"kg\", \"colour\": 1", 1);
    let e = parse_json(&text).unwrap_err();
    assert_eq!(
        (e.path.as_str(), e.line),
        ("measurements[5].colour", Some(line_of(&text, "colour")))
    );

    let text = pretty.replacen("\"placebo\"", "\"placebo\",,", 1);
    let e = parse_json(&text).unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Syntax);
    assert_eq!(e.line, Some(line_of(&text, ",,")));
    assert!(e.column.is_some());

    // Rules are located in JSON too.
    let text = pretty.replacen(
        "\"serious_report_hours\": 24",
        "\"serious_report_hours\": 0",
        1,
    );
    let e = parse_json(&text).unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Rule);
    assert_eq!(
        (e.path.as_str(), e.line),
        (
            "adverse_events.serious_report_hours",
            Some(line_of(&text, "serious_report_hours"))
        )
    );

    let e = parse_json("").unwrap_err();
    assert_eq!(e.kind, ProtocolErrorKind::Syntax);
}

#[test]
fn an_empty_or_foreign_document_is_refused() {
    for text in ["", "# nothing\n", "[1, 2]", "just text", "---\n---\n"] {
        assert!(parse_yaml(text).is_err(), "{text:?}");
    }
    let e = parse_yaml("id: X\n").unwrap_err();
    assert_eq!(
        (e.kind, e.path.as_str()),
        (ProtocolErrorKind::Schema, ""),
        "{e}"
    );
    assert!(e.message.contains("missing field"), "{e}");
}

#[test]
fn uri_and_time_zone_shapes() {
    for ok in ["https://trials.example.org/x", "urn:oid:1.2.3", "http://x"] {
        assert!(is_absolute_uri(ok), "{ok}");
    }
    for bad in [
        "",
        "trials.example.org",
        "https:",
        "https:/x",
        "https:///x",
        "1http://x",
        "http://a b",
    ] {
        assert!(!is_absolute_uri(bad), "{bad}");
    }
    for ok in [
        "UTC",
        "America/New_York",
        "Etc/GMT+5",
        "America/Argentina/Buenos_Aires",
        "America/Port-au-Prince",
    ] {
        assert!(is_time_zone_name(ok), "{ok}");
    }
    for bad in ["", "utc", "Europe/", "Europe//Berlin", "Europe/Ber lin"] {
        assert!(!is_time_zone_name(bad), "{bad}");
    }
}

/// `text` with `insert` put in at byte `at` (moved back to a char boundary).
fn damaged(text: &str, at: usize, remove: usize, insert: &str) -> String {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let mut end = (at + remove).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{insert}{}", &text[..at], &text[end..])
}

proptest! {
    #[test]
    fn parse_yaml_never_panics(text in "\\PC*") {
        let _ = parse_yaml(&text);
    }

    #[test]
    fn parse_json_never_panics(text in "\\PC*") {
        let _ = parse_json(&text);
    }

    #[test]
    fn damaged_protocols_never_panic_and_errors_are_located(
        at in 0usize..4000,
        remove in 0usize..12,
        insert in "[-:,\\[\\]{}#&*!|>'\" \n\ta-z0-9]{0,6}",
    ) {
        let text = damaged(REFERENCE, at, remove, &insert);
        if let Err(e) = parse_yaml(&text) {
            // Rules only run on text that parsed, and then every key is found.
            if e.kind != ProtocolErrorKind::Syntax {
                prop_assert!(e.line.is_some(), "{e}");
            }
        }
        let json = parse_yaml(REFERENCE).map(|p| p.to_json()).unwrap_or_default();
        let _ = parse_json(&damaged(&json, at, remove, &insert));
    }
}
