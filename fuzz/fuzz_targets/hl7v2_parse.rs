//! Fuzzes the HL7 v2 splitter, parser, decoder, ORU^R01 reader and ACK
//! builder: any bytes must give pieces, messages and values or errors that
//! say where, never a panic; every ACK built must itself parse.
#![no_main]

use clinflow_hl7v2::{
    build_ack, build_reject_ack_without_message, parse_dtm, salvage_control_id, split_messages,
    AckCode, AckError, Message, OruR01, Severity,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(now) = parse_dtm("20260302101500+0100") else {
        return;
    };
    // The whole input as one message (an MLLP frame), then split.
    let _ = Message::parse(data);
    for piece in split_messages(data) {
        match piece.parse(data) {
            Ok(m) => {
                for seg in m.segments() {
                    for f in seg.fields() {
                        let _ = f.decode_detailed();
                        for r in f.repetitions() {
                            for c in r.components() {
                                let _ = c.decoded();
                                for s in c.subcomponents() {
                                    let _ = s.decode_detailed();
                                }
                            }
                        }
                    }
                }
                let errors: Vec<AckError> = match OruR01::read(&m) {
                    Ok(oru) => oru
                        .observations()
                        .filter_map(|(_, _, o)| o.obx.as_ref().err())
                        .chain(oru.issues.iter())
                        .map(|e| e.ack_error(Severity::Warning))
                        .collect(),
                    Err(e) => vec![e.ack_error(Severity::Error)],
                };
                let ack = build_ack(&m, AckCode::Error, &errors, &now, "ACK-1");
                assert!(
                    Message::parse(&ack).is_ok(),
                    "the ACK of a parsed message parses"
                );
            }
            Err(e) => {
                assert!(e.location().offset <= data.len());
                let id = salvage_control_id(piece.bytes(data));
                let ack = build_reject_ack_without_message(
                    id.as_deref(),
                    &[AckError::from_parse_error(&e)],
                    &now,
                    "R-1",
                );
                assert!(Message::parse(&ack).is_ok(), "a reject ACK parses");
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = parse_dtm(text) {
            let _ = d.to_fhir_datetime();
        }
    }
});
