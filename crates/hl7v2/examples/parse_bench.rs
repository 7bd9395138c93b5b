//! Parse throughput of ORU^R01 messages with 10 OBX each, for the side by
//! side with python-hl7 (`bench/hl7v2-parse.sh`, issue 3 benchmark 1).
//!
//! The messages are built from the first message of
//! `reference-trial/samples/lab-results.hl7`: its MSH, PID and OBR, the
//! five OBX of the sample file cycled to ten (renumbered), the NTE with its
//! `\T\` escape after the second OBX; segments end with `\r`; each copy has
//! its own MSH-10.
//!
//! ```text
//! cargo run --release -p clinflow-hl7v2 --example parse_bench -- \
//!     [--count 20000] [--rounds 5] [--write FILE]
//! ```
//!
//! `--write FILE` writes the messages, one a line (`\n` between messages,
//! `\r` between segments), for the Python side, and exits. Otherwise each
//! mode is timed `--rounds` times after one untimed pass, single-threaded,
//! and the median is reported as one JSON object on stdout:
//! - `parse`: `Message::parse` alone (lazy: delimiters, segment spans,
//!   header decoded and checked);
//! - `parse_tree`: parse, then every field, repetition, component and
//!   subcomponent visited (its raw slice): the tree python-hl7's eager
//!   `hl7.parse` builds;
//! - `parse_tree_decoded`: the same with every subcomponent decoded
//!   (UTF-8 checked, escapes resolved), which python-hl7 leaves for later;
//! - `parse_oru`: parse, then `OruR01::read` (the typed view the mapper
//!   will use).

use std::hint::black_box;
use std::time::{Duration, Instant};

use clinflow_hl7v2::{split_messages, Message, OruR01};

const SAMPLE: &[u8] = include_bytes!("../../../reference-trial/samples/lab-results.hl7");

struct Args {
    count: usize,
    rounds: usize,
    write: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        count: 20_000,
        rounds: 5,
        write: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--count" => a.count = v()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--rounds" => a.rounds = v()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--write" => a.write = Some(v()?),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    a.rounds = a.rounds.max(1);
    Ok(a)
}

/// The segments of the template message, as text; OBX-1 and MSH-10 are
/// filled per copy.
fn template() -> Result<Vec<String>, String> {
    let mut head = Vec::new();
    let mut obx = Vec::new();
    let mut nte = None;
    for (i, piece) in split_messages(SAMPLE).iter().enumerate() {
        let m = piece.parse(SAMPLE).map_err(|e| e.to_string())?;
        for seg in m.segments() {
            let text = String::from_utf8_lossy(seg.raw()).into_owned();
            match seg.id() {
                "OBX" => obx.push(text),
                "NTE" => nte = Some(text),
                _ if i == 0 => head.push(text),
                _ => {}
            }
        }
    }
    if head.len() != 3 || obx.is_empty() {
        return Err("unexpected sample layout".into());
    }
    let mut out = head;
    for k in 0..10 {
        let src = &obx[k % obx.len()];
        // Drop "OBX|n" and put the new set id.
        let rest = src.splitn(3, '|').nth(2).unwrap_or_default();
        out.push(format!("OBX|{}|{rest}", k + 1));
        if k == 1 {
            out.extend(nte.clone());
        }
    }
    Ok(out)
}

fn messages(count: usize) -> Result<Vec<Vec<u8>>, String> {
    let t = template()?;
    let msh = &t[0];
    let fields: Vec<&str> = msh.split('|').collect();
    Ok((0..count)
        .map(|i| {
            let mut f = fields.clone();
            let id = format!("LAB-BENCH-{i:08}");
            if let Some(slot) = f.get_mut(9) {
                *slot = &id;
            }
            let mut segs = vec![f.join("|")];
            segs.extend(t[1..].iter().cloned());
            segs.join("\r").into_bytes()
        })
        .collect())
}

fn walk(m: &Message<'_>, decode: bool) -> usize {
    let mut n = 0;
    for seg in m.segments() {
        for f in seg.fields() {
            for r in f.repetitions() {
                for c in r.components() {
                    for s in c.subcomponents() {
                        n += if decode {
                            s.decoded().map(|v| v.len()).unwrap_or(0)
                        } else {
                            s.raw().len()
                        };
                    }
                }
            }
        }
    }
    n
}

fn time(rounds: usize, msgs: &[Vec<u8>], f: impl Fn(&[u8]) -> usize) -> Duration {
    let pass = || {
        let start = Instant::now();
        let mut acc = 0usize;
        for m in msgs {
            acc = acc.wrapping_add(f(m));
        }
        black_box(acc);
        start.elapsed()
    };
    pass();
    let mut times: Vec<Duration> = (0..rounds).map(|_| pass()).collect();
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("parse_bench: {e}");
            std::process::exit(2);
        }
    };
    let msgs = match messages(a.count) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("parse_bench: {e}");
            std::process::exit(1);
        }
    };
    if let Some(path) = a.write {
        let body: Vec<u8> = msgs.join(&b'\n');
        if let Err(e) = std::fs::write(&path, body) {
            eprintln!("parse_bench: {path}: {e}");
            std::process::exit(1);
        }
        return;
    }
    // Every message must parse and read cleanly, or the figures mean nothing.
    for m in &msgs {
        let parsed = Message::parse(m).unwrap_or_else(|e| panic!("bench message: {e}"));
        let oru = OruR01::read(&parsed).unwrap_or_else(|e| panic!("bench message: {e}"));
        assert_eq!(
            oru.observations().filter(|(_, _, o)| o.obx.is_ok()).count(),
            10
        );
    }
    let n = msgs.len();
    let per_s = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    let parse = time(a.rounds, &msgs, |m| {
        Message::parse(m).map(|m| m.segment_count()).unwrap_or(0)
    });
    let parse_tree = time(a.rounds, &msgs, |m| {
        Message::parse(m).map(|m| walk(&m, false)).unwrap_or(0)
    });
    let parse_tree_decoded = time(a.rounds, &msgs, |m| {
        Message::parse(m).map(|m| walk(&m, true)).unwrap_or(0)
    });
    let parse_oru = time(a.rounds, &msgs, |m| {
        Message::parse(m)
            .ok()
            .and_then(|m| OruR01::read(&m).ok().map(|o| o.observations().count()))
            .unwrap_or(0)
    });
    let bytes: usize = msgs.iter().map(Vec::len).sum();
    println!(
        "{{\"messages\":{n},\"obx_per_message\":10,\"bytes_per_message\":{},\"rounds\":{},\"parse_msgs_per_s\":{:.0},\"parse_tree_msgs_per_s\":{:.0},\"parse_tree_decoded_msgs_per_s\":{:.0},\"parse_oru_msgs_per_s\":{:.0}}}",
        bytes / n.max(1),
        a.rounds,
        per_s(parse),
        per_s(parse_tree),
        per_s(parse_tree_decoded),
        per_s(parse_oru),
    );
}
