//! Diaries -> QuestionnaireResponses: the sample and the invalid cases.

mod common;

use clinflow_edc::{ingest_diaries_json, ingest_diaries_ndjson, ItemOutcome, Reason};
use clinflow_fhir::Json;
use common::*;

fn diary(answers: &str) -> String {
    format!(
        r#"{{"subject":"CARDIO-01-0001","questionnaire":"daily-diary","authored":"2026-03-02T21:10:00-05:00","answers":{answers}}}"#
    )
}

fn one(line: &str) -> ItemOutcome {
    let items = ingest_diaries_ndjson(&ctx(), line.as_bytes());
    assert_all_valid(&items);
    assert_eq!(items.len(), 1);
    items.into_iter().next().unwrap()
}

fn answer<'a>(qr: &'a Json, link: &str) -> Option<&'a Json> {
    let Some(Json::Array(items)) = qr.get("item") else {
        return None;
    };
    let it = items
        .iter()
        .find(|i| i.get("linkId").and_then(Json::as_str) == Some(link))?;
    Some(at(it, "answer.0"))
}

#[test]
fn the_diary_sample_gives_typed_responses() {
    let items = ingest_diaries_ndjson(&ctx(), DIARY);
    assert_all_valid(&items);
    assert_eq!(items.len(), 3);
    for item in &items {
        assert!(item.is_stored() && item.rejections.is_empty(), "{item:#?}");
    }
    let qr = items[0].stored[0].resource.json();
    assert_eq!(text(qr, "resourceType"), "QuestionnaireResponse");
    assert_eq!(text(qr, "status"), "completed");
    assert_eq!(
        text(qr, "questionnaire"),
        "https://clinflow.dev/fhir/Questionnaire/CARDIO-01/daily-diary"
    );
    assert_eq!(text(qr, "subject.reference"), "Patient/CARDIO-01-0001");
    assert_eq!(text(qr, "authored"), "2026-03-02T21:10:00-05:00");
    assert_eq!(text(answer(qr, "pain").unwrap(), "valueInteger"), "3");
    assert!(matches!(
        answer(qr, "dizziness").unwrap().get("valueBoolean"),
        Some(Json::Bool(false))
    ));
    assert!(matches!(
        answer(qr, "dose-taken").unwrap().get("valueBoolean"),
        Some(Json::Bool(true))
    ));
    assert_eq!(
        text(answer(qr, "notes").unwrap(), "valueString"),
        "Mild headache in the morning"
    );
    // Questionnaire order.
    assert_eq!(text(qr, "item.0.linkId"), "pain");
    assert_eq!(text(qr, "item.3.linkId"), "notes");
    assert_eq!(visit(qr), "week-4");
    assert_eq!(provenance(qr, "format"), "diary");
    assert_eq!(provenance(qr, "location"), "line 1");
    // No notes on the second: the optional item is left out.
    assert!(answer(items[1].stored[0].resource.json(), "notes").is_none());
    // Enrolled 2026-02-18: day 12, no window.
    assert_eq!(visit(items[2].stored[0].resource.json()), "unscheduled");
}

#[test]
fn a_missing_required_answer_rejects_the_diary() {
    let item = one(&diary(r#"{"pain":3,"dizziness":false}"#));
    assert!(!item.is_stored());
    assert_eq!(item.rejections.len(), 1);
    assert_eq!(
        item.rejections[0].reason,
        Reason::MissingAnswer("dose-taken".into())
    );
    assert_eq!(item.rejections[0].location, "line 1, answers.dose-taken");
    // null is no answer.
    let item = one(&diary(
        r#"{"pain":null,"dizziness":false,"dose-taken":true}"#,
    ));
    assert_eq!(
        item.rejections[0].reason,
        Reason::MissingAnswer("pain".into())
    );
}

#[test]
fn every_problem_of_a_diary_is_listed_and_nothing_stored() {
    let long = "x".repeat(501);
    let item = one(&diary(&format!(
        r#"{{"pain":11,"dizziness":"no","dose-taken":true,"notes":"{long}","mood":"ok"}}"#
    )));
    assert!(!item.is_stored());
    let mut got: Vec<(&str, &str)> = item
        .rejections
        .iter()
        .map(|r| (r.location.as_str(), r.reason.code()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("line 1, answers.dizziness", "wrong-answer-type"),
            ("line 1, answers.mood", "unknown-link-id"),
            ("line 1, answers.notes", "answer-too-long"),
            ("line 1, answers.pain", "answer-range"),
        ]
    );
    let pain = item
        .rejections
        .iter()
        .find(|r| r.reason.code() == "answer-range")
        .unwrap();
    assert!(
        matches!(&pain.reason, Reason::AnswerOutOfRange { value, low, high, .. } if value == "11" && low == "0" && high == "10")
    );
    // A decimal where a whole number is due.
    let item = one(&diary(
        r#"{"pain":2.5,"dizziness":false,"dose-taken":true}"#,
    ));
    assert_eq!(item.rejections[0].reason.code(), "wrong-answer-type");
}

#[test]
fn subject_questionnaire_and_date_are_checked() {
    let ok = diary(r#"{"pain":1,"dizziness":false,"dose-taken":true}"#);
    let cases = [
        (
            ok.replace("CARDIO-01-0001", "CARDIO-01-0099"),
            "line 1, subject",
            "unknown-subject",
        ),
        (
            ok.replace("daily-diary", "weekly"),
            "line 1, questionnaire",
            "unknown-questionnaire",
        ),
        (
            ok.replace("2026-03-02T21:10:00-05:00", "2025-12-31T21:10:00-05:00"),
            "line 1, authored",
            "outside-period",
        ),
        (
            ok.replace("2026-03-02T21:10:00-05:00", "yesterday"),
            "line 1, authored",
            "invalid-datetime",
        ),
    ];
    for (line, location, code) in cases {
        let item = one(&line);
        assert!(!item.is_stored());
        assert_eq!(item.rejections.len(), 1, "{line}: {:?}", item.rejections);
        assert_eq!(item.rejections[0].location, location);
        assert_eq!(item.rejections[0].reason.code(), code);
    }
}

#[test]
fn malformed_lines_are_rejected_and_the_others_kept() {
    let ok = diary(r#"{"pain":1,"dizziness":false,"dose-taken":true}"#);
    let input = format!("{ok}\n{{not json\n\n[1,2]\r\n{ok}\n");
    let items = ingest_diaries_ndjson(&ctx(), input.as_bytes());
    assert_all_valid(&items);
    assert_eq!(items.len(), 4, "the blank line is no item");
    assert!(items[0].is_stored() && items[3].is_stored());
    assert_eq!(items[1].rejections[0].location, "line 2");
    assert_eq!(items[1].rejections[0].reason.code(), "malformed");
    assert_eq!(items[2].rejections[0].location, "line 4");
    assert_ne!(items[0].stored[0].full_url, items[3].stored[0].full_url);
}

#[test]
fn a_json_object_or_array_is_accepted() {
    let ok = diary(r#"{"pain":1,"dizziness":false,"dose-taken":true}"#);
    let items = ingest_diaries_json(&ctx(), ok.as_bytes());
    assert_all_valid(&items);
    assert!(items[0].is_stored());
    let bad = diary(r#"{"dizziness":false,"dose-taken":true}"#);
    let items = ingest_diaries_json(&ctx(), format!("[{ok},{bad}]").as_bytes());
    assert_all_valid(&items);
    assert_eq!(items.len(), 2);
    assert!(items[0].is_stored());
    assert_eq!(items[1].rejections[0].location, "[1].answers.pain");
    let items = ingest_diaries_json(&ctx(), b"{\"subject\":");
    assert_eq!(items.len(), 1);
    assert!(items[0].rejections[0]
        .location
        .starts_with("line 1, column"));
}
