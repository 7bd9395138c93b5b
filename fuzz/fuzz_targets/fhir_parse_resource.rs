//! Client bytes into clinflow-fhir's edge: resource validation (and, for what
//! passes, the edits and extraction the store does next), search-query
//! parsing and date parsing. Any panic is a bug: the crate promises totality.

#![no_main]

use clinflow_fhir::{datetime, index, search, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };

    if let Ok(mut resource) = validate::parse_resource(text, None) {
        resource.set_id("fuzz");
        resource.set_meta(1, "2026-01-01T00:00:00.000Z");
        let _ = index::extract(&resource);
        let again = validate::parse_resource(&resource.to_json_string(), None);
        assert!(again.is_ok(), "a stored resource must read back");
    }

    // The same bytes as a query string: `a=b&c=d` pairs, on each indexed type.
    let pairs: Vec<(String, String)> = text
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect();
    for rtype in index::indexed_types() {
        let _ = search::parse_query(rtype, &pairs);
    }

    let _ = datetime::parse_range(text);
});
