//! Totality: no input panics any ingest function, and whatever is stored
//! is valid FHIR. Arbitrary bytes, and mutations of the samples (which
//! reach much deeper than random bytes).

mod common;

use clinflow_edc::{
    ingest_csv, ingest_diaries_json, ingest_diaries_ndjson, ingest_hl7, ItemOutcome,
};
use common::*;
use proptest::prelude::*;

/// Every item has a reason for each rejection, and a rejected item says why.
fn check(items: &[ItemOutcome]) {
    assert_all_valid(items);
    for item in items {
        assert!(item.is_stored() || !item.rejections.is_empty(), "{item:#?}");
        for r in &item.rejections {
            assert!(!r.location.is_empty());
            assert!(!r.reason.to_string().is_empty());
        }
        for q in &item.queries {
            assert!(q.resource < item.stored.len());
        }
    }
}

#[derive(Debug, Clone)]
enum Edit {
    Insert(usize, u8),
    Delete(usize),
    Replace(usize, u8),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let byte = prop_oneof![
        Just(b'|'),
        Just(b'^'),
        Just(b'~'),
        Just(b'\\'),
        Just(b'&'),
        Just(b'\r'),
        Just(b'\n'),
        Just(b','),
        Just(b'"'),
        Just(b'{'),
        Just(b'}'),
        Just(b':'),
        Just(b'-'),
        Just(b'.'),
        Just(b'0'),
        Just(b'9'),
        any::<u8>()
    ];
    proptest::collection::vec(
        prop_oneof![
            (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Insert(i, b)),
            any::<usize>().prop_map(Edit::Delete),
            (any::<usize>(), byte).prop_map(|(i, b)| Edit::Replace(i, b)),
        ],
        1..8,
    )
}

fn apply(base: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = base.to_vec();
    for e in edits {
        let n = v.len().max(1);
        match *e {
            Edit::Insert(i, b) => v.insert(i % (v.len() + 1), b),
            Edit::Delete(i) if !v.is_empty() => {
                v.remove(i % n);
            }
            Edit::Replace(i, b) if !v.is_empty() => v[i % n] = b,
            _ => {}
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hl7_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&ingest_hl7(&ctx(), &input));
    }

    #[test]
    fn hl7_mutated_sample(e in edits()) {
        check(&ingest_hl7(&ctx(), &apply(LAB, &e)));
    }

    #[test]
    fn hl7_arbitrary_obx_fields(vt in "(NM|SN|ST|TX|FT|CE|CWE|DT|DTM|TM|XX|)", v in "[ -~]{0,24}", unit in "[ -~]{0,8}", when in "[0-9+-]{0,20}") {
        let input = format!(
            "MSH|^~\\&|L|F|C|C|20260302101500-0500||ORU^R01|X|P|2.5.1\rPID|1||CARDIO-01-0001\rOBR|1|||1^P^LN\rOBX|1|{vt}|2345-7^G^LN||{v}|{unit}|{v}|{v}|||F|||{when}\r"
        );
        check(&ingest_hl7(&ctx(), input.as_bytes()));
    }

    #[test]
    fn csv_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&ingest_csv(&ctx(), &input));
    }

    #[test]
    fn csv_mutated_sample(e in edits()) {
        check(&ingest_csv(&ctx(), &apply(WEARABLE, &e)));
    }

    #[test]
    fn csv_arbitrary_rows(rows in proptest::collection::vec("[ -~]{0,60}", 0..6)) {
        let input = format!("subject,device,time,metric,value,unit\n{}", rows.join("\n"));
        check(&ingest_csv(&ctx(), input.as_bytes()));
    }

    #[test]
    fn diary_arbitrary_bytes(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        check(&ingest_diaries_ndjson(&ctx(), &input));
        check(&ingest_diaries_json(&ctx(), &input));
    }

    #[test]
    fn diary_mutated_sample(e in edits()) {
        let input = apply(DIARY, &e);
        check(&ingest_diaries_ndjson(&ctx(), &input));
        check(&ingest_diaries_json(&ctx(), &input));
    }

    #[test]
    fn diary_arbitrary_answers(pain in any::<i64>(), notes in "\\PC{0,40}", x in any::<f64>(), authored in "[0-9T:+-]{0,30}") {
        let line = serde_json::json!({
            "subject": "CARDIO-01-0001", "questionnaire": "daily-diary", "authored": authored,
            "answers": {"pain": pain, "dizziness": x > 0.0, "dose-taken": true, "notes": notes}
        });
        check(&ingest_diaries_ndjson(&ctx(), line.to_string().as_bytes()));
    }
}

#[test]
fn deeply_nested_json_is_rejected_not_a_stack_overflow() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    check(&ingest_diaries_json(&ctx(), deep.as_bytes()));
    check(&ingest_diaries_ndjson(&ctx(), deep.as_bytes()));
}
