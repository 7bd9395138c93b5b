//! HL7 v2 parse + map throughput: each ORU^R01 of a file through
//! `clinflow_edc::ingest_hl7` (parse, the V2-to-FHIR mapping to a
//! DiagnosticReport and its Observations, the protocol's edit checks, and
//! the FHIR validation of every resource produced) against the reference
//! trial, for the side by side with python-hl7 (`bench/hl7v2-parse.sh`,
//! issue 3 benchmark 1).
//!
//! ```text
//! cargo run --release -p clinflow-edc --example map_bench -- FILE [--rounds 5]
//! ```
//!
//! FILE holds one message a line (`\n` between messages, `\r` between
//! segments), as `parse_bench --write` makes it. Every message must map
//! with no rejection, or the figures mean nothing. One untimed pass, then
//! `--rounds` timed ones, single-threaded; the median as one JSON object.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clinflow_edc::{ingest_hl7, TrialContext};

// The clinflow binary's allocator: what the pipeline runs with.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PROTOCOL: &str = include_str!("../../../reference-trial/protocol.yaml");
const SUBJECTS: &str = include_str!("../../../reference-trial/subjects.csv");

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: map_bench FILE [--rounds N]");
        std::process::exit(2);
    };
    let mut rounds = 5usize;
    while let Some(a) = args.next() {
        match (a.as_str(), args.next().and_then(|v| v.parse().ok())) {
            ("--rounds", Some(n)) => rounds = n,
            _ => {
                eprintln!("map_bench: unknown or incomplete argument {a:?}");
                std::process::exit(2);
            }
        }
    }
    let data = std::fs::read(&path).unwrap_or_else(|e| {
        eprintln!("map_bench: {path}: {e}");
        std::process::exit(1)
    });
    let msgs: Vec<&[u8]> = data
        .split(|b| *b == b'\n')
        .filter(|m| !m.is_empty())
        .collect();
    let protocol = clinflow_protocol::parse_yaml(PROTOCOL).expect("the reference protocol");
    let subjects =
        clinflow_protocol::parse_subjects_csv(SUBJECTS, &protocol).expect("the reference subjects");
    let ctx = TrialContext::from_subjects(protocol, &subjects);

    let mut observations = 0usize;
    for m in &msgs {
        let items = ingest_hl7(&ctx, m);
        assert_eq!(items.len(), 1, "one item per message");
        let item = &items[0];
        assert!(
            item.is_stored() && item.rejections.is_empty(),
            "a bench message was rejected: {:?}",
            item.rejections
        );
        observations += item
            .stored
            .iter()
            .filter(|p| p.resource.resource_type() == "Observation")
            .count();
    }
    let pass = || {
        let t = Instant::now();
        for m in &msgs {
            black_box(ingest_hl7(&ctx, black_box(m)));
        }
        t.elapsed()
    };
    pass();
    let mut times: Vec<Duration> = (0..rounds.max(1)).map(|_| pass()).collect();
    times.sort();
    let median = times[times.len() / 2].as_secs_f64().max(1e-9);
    let n = msgs.len();
    println!(
        "{{\"messages\":{n},\"observations\":{observations},\"rounds\":{},\"parse_map_msgs_per_s\":{:.0},\"observations_per_s\":{:.0}}}",
        times.len(),
        n as f64 / median,
        observations as f64 / median
    );
}
