//! Fuzzes the protocol and subjects parsers: any bytes must give a protocol
//! or an error naming where, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = clinflow_protocol::parse_json(text);
    if let Ok(p) = clinflow_protocol::parse_yaml(text) {
        let _ = clinflow_protocol::parse_subjects_csv(text, &p);
    }
    // The subjects parser against the reference protocol, on any text.
    if let Ok(p) = clinflow_protocol::parse_yaml(include_str!("../../reference-trial/protocol.yaml")) {
        let _ = clinflow_protocol::parse_subjects_csv(text, &p);
    }
});
