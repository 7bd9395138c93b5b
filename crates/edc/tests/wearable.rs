//! Wearable CSV -> Observations: the sample and the invalid cases.

mod common;

use clinflow_edc::provenance::{sha256_hex, CANONICAL_QUANTITY_URL};
use clinflow_edc::{ingest_csv, ItemOutcome, Reason};
use common::*;

const HEADER: &str = "subject,device,time,metric,value,unit\n";

fn rows(body: &str) -> Vec<ItemOutcome> {
    let items = ingest_csv(&ctx(), format!("{HEADER}{body}").as_bytes());
    assert_all_valid(&items);
    items
}

fn one(row: &str) -> ItemOutcome {
    let mut items = rows(row);
    assert_eq!(items.len(), 1, "{items:#?}");
    items.remove(0)
}

#[test]
fn the_wearable_sample_maps_every_row() {
    let items = ingest_csv(&ctx(), WEARABLE);
    assert_all_valid(&items);
    assert_eq!(items.len(), 7);
    for (i, item) in items.iter().enumerate() {
        assert!(item.is_stored() && item.rejections.is_empty(), "{item:#?}");
        assert_eq!(item.location, format!("line {}", i + 2));
        assert!(item.queries.is_empty());
    }
    let first = items[0].stored[0].resource.json();
    assert_eq!(text(first, "code.coding.0.code"), "8867-4");
    assert_eq!(text(first, "code.coding.0.system"), "http://loinc.org");
    assert_eq!(text(first, "valueQuantity.value"), "71");
    assert_eq!(text(first, "valueQuantity.code"), "/min");
    assert_eq!(
        text(first, "effectiveDateTime"),
        "2026-03-02T08:00:00-05:00"
    );
    assert_eq!(text(first, "device.display"), "watch-7731");
    assert_eq!(text(first, "device.identifier.value"), "watch-7731");
    assert_eq!(text(first, "subject.reference"), "Patient/CARDIO-01-0001");
    assert_eq!(visit(first), "week-4");
    assert_eq!(provenance(first, "format"), "wearable-csv");
    assert_eq!(provenance(first, "sha256"), sha256_hex(WEARABLE));
    assert_eq!(provenance(first, "location"), "line 2");
    // The metric given by its LOINC code.
    let by_loinc = items[3].stored[0].resource.json();
    assert_eq!(text(by_loinc, "code.coding.0.code"), "8867-4");
    assert_eq!(
        text(by_loinc, "effectiveDateTime"),
        "2026-03-02T07:30:00+01:00"
    );
    let steps = items[2].stored[0].resource.json();
    assert_eq!(text(steps, "valueQuantity.code"), "{steps}");
    assert_eq!(
        text(items[4].stored[0].resource.json(), "valueQuantity.value"),
        "81.4"
    );
    // Keys differ per row and are stable.
    let again = ingest_csv(&ctx(), WEARABLE);
    assert_eq!(items, again);
    assert_ne!(items[0].stored[0].full_url, items[1].stored[0].full_url);
}

#[test]
fn a_converted_weight_keeps_the_value_as_sent() {
    let item = one("CARDIO-01-0003,scale-0042,2026-03-02T07:35:00+01:00,body-weight,180,[lb_av]\n");
    let o = item.stored[0].resource.json();
    assert_eq!(text(o, "valueQuantity.value"), "180");
    assert_eq!(text(o, "valueQuantity.code"), "[lb_av]");
    let c = extension(o, CANONICAL_QUANTITY_URL).unwrap();
    assert_eq!(text(c, "valueQuantity.value"), "81.646627"); // 180 * 0.45359237
    assert_eq!(text(c, "valueQuantity.code"), "kg");
}

#[test]
fn invalid_rows_are_rejected_with_line_and_column() {
    let body = "\
CARDIO-01-0099,w,2026-03-02T08:00:00-05:00,heart-rate,71,/min
CARDIO-01-0001,w,2026-03-02T08:00:00-05:00,heart-rate,400,/min
CARDIO-01-0001,w,2026-03-02T08:00:00-05:00,heart-rate,71,bpm
CARDIO-01-0001,w,2028-01-02T08:00:00-05:00,heart-rate,71,/min
CARDIO-01-0001,w,2026-03-02 08:00,heart-rate,71,/min
CARDIO-01-0001,w,2026-03-02T08:00:00-05:00,blood-type,71,/min
CARDIO-01-0001,w,2026-03-02T08:00:00-05:00,heart-rate,fast,/min
CARDIO-01-0001,w,2026-03-02T08:00:00-05:00
CARDIO-01-0001,w,2026-03-02T08:00:00-05:00,heart-rate,71,/min
";
    let items = rows(body);
    assert_eq!(items.len(), 9);
    let expect = [
        ("line 2, column subject", "unknown-subject"),
        ("line 3, column value", "hard-range"),
        ("line 4, column unit", "wrong-unit"),
        ("line 5, column time", "outside-period"),
        ("line 6, column time", "invalid-datetime"),
        ("line 7, column metric", "unknown-measurement"),
        ("line 8, column value", "not-a-number"),
        ("line 9, column metric", "malformed"),
    ];
    for (item, (location, code)) in items.iter().zip(expect) {
        assert!(!item.is_stored(), "{item:#?}");
        assert_eq!(item.rejections.len(), 1);
        assert_eq!(item.rejections[0].location, location);
        assert_eq!(item.rejections[0].reason.code(), code, "{location}");
    }
    assert!(items[8].is_stored(), "the last row is fine");
    assert_eq!(
        items[0].rejections[0].reason,
        Reason::UnknownSubject("CARDIO-01-0099".into())
    );
}

#[test]
fn outside_the_soft_range_is_stored_with_a_query() {
    let item = one("CARDIO-01-0005,watch-9001,2026-03-02T20:00:00+08:00,heart-rate,150,/min\n");
    assert!(item.is_stored());
    assert_eq!(item.queries.len(), 1);
    let q = &item.queries[0];
    assert_eq!(q.location, "line 2, column value");
    assert_eq!(
        (q.measurement.as_str(), q.value.as_str(), q.unit.as_str()),
        ("heart-rate", "150", "/min")
    );
    assert_eq!(q.site.as_str(), "site-003");
    assert_eq!(q.resource, 0);
}

#[test]
fn a_missing_header_rejects_the_input() {
    let items = ingest_csv(
        &ctx(),
        b"CARDIO-01-0001,w,2026-03-02T08:00:00-05:00,heart-rate,71,/min\n",
    );
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].rejections[0].location, "line 1");
    assert_eq!(items[0].rejections[0].reason.code(), "malformed");
    assert_eq!(ingest_csv(&ctx(), b"").len(), 1);
    // Columns in another order are fine.
    let items = ingest_csv(
        &ctx(),
        b"unit,value,metric,time,device,subject\n/min,71,heart-rate,2026-03-02T08:00:00-05:00,w,CARDIO-01-0001\n",
    );
    assert!(items[0].is_stored());
}
