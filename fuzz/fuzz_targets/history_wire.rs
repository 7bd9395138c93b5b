//! What the history services read from their callers and the store:
//! `grpc-timeout` values and money amounts. Neither may panic on any text.

#![no_main]

use clinflow_history::money::Totals;
use clinflow_history::wire::parse_grpc_timeout;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_grpc_timeout(text);
    let (value, currency) = text.split_once('|').unwrap_or((text, "EUR"));
    let mut t = Totals::default();
    if t.add(value, currency).is_ok() {
        assert_eq!(t.render().len(), 1);
    }
});
