//! Client bytes through clinflow-edc's three mappers (HL7 v2, wearable CSV,
//! diaries) against the reference trial. Any panic is a bug: the crate
//! promises totality, and every stored resource must validate again.

#![no_main]

use std::sync::OnceLock;

use clinflow_edc::{ingest_csv, ingest_diaries_json, ingest_diaries_ndjson, ingest_hl7, TrialContext};
use libfuzzer_sys::fuzz_target;

fn ctx() -> &'static TrialContext {
    static CTX: OnceLock<TrialContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let protocol = clinflow_protocol::parse_yaml(include_str!("../../reference-trial/protocol.yaml"))
            .expect("the reference protocol loads");
        let subjects = clinflow_protocol::parse_subjects_csv(
            include_str!("../../reference-trial/subjects.csv"),
            &protocol,
        )
        .expect("the reference subjects load");
        TrialContext::from_subjects(protocol, &subjects)
    })
}

fuzz_target!(|data: &[u8]| {
    let ctx = ctx();
    let outcomes = [
        ingest_hl7(ctx, data),
        ingest_csv(ctx, data),
        ingest_diaries_ndjson(ctx, data),
        ingest_diaries_json(ctx, data),
    ];
    for item in outcomes.iter().flatten() {
        for p in &item.stored {
            let text = p.resource.to_json_string();
            let again = clinflow_fhir::validate::parse_resource(&text, None);
            assert!(again.is_ok(), "a produced resource must validate");
        }
    }
});
