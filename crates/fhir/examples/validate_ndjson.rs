//! Parse + validate throughput of R4 NDJSON through clinflow's edge.
//!
//! Every non-empty line goes through [`clinflow_fhir::validate::parse_resource`]
//! (JSON parse, fhirkit's structural decode, clinflow's required bindings and
//! calendar checks), exactly as a `POST /fhir/{type}` body would; with
//! `--index` the search-index rows are extracted too. The file is read into
//! memory before timing, so disk speed is not measured.
//!
//! ```text
//! cargo run --release -p clinflow-fhir --example validate_ndjson -- FILE \
//!     [--threads 1,0] [--rounds 5] [--index] [--show-rejects 5]
//! ```
//!
//! `--threads` is a comma-separated list of thread counts (`0` = one per
//! core); each is timed `--rounds` times after one untimed warm-up pass, and
//! the median is reported. Output: one JSON object on stdout. Exit status 1
//! when the file cannot be read or has no resources.

use clinflow_fhir::{index, validate, Json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Lines a worker claims at a time: small enough to balance two cores, large
/// enough that the shared counter is not contended.
const CHUNK: usize = 64;

struct Args {
    path: String,
    threads: Vec<usize>,
    rounds: usize,
    index: bool,
    show_rejects: usize,
}

/// What one pass over the lines counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    valid: usize,
    invalid: usize,
    /// Index rows extracted (0 without `--index`); keeps extraction from
    /// being optimised away and is a cross-check between passes.
    index_rows: usize,
}

impl Tally {
    fn add(self, o: Tally) -> Tally {
        Tally {
            valid: self.valid + o.valid,
            invalid: self.invalid + o.invalid,
            index_rows: self.index_rows + o.index_rows,
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("validate_ndjson: {e}");
            eprintln!(
                "usage: validate_ndjson FILE [--threads 1,0] [--rounds 5] [--index] [--show-rejects N]"
            );
            std::process::exit(2);
        }
    };
    let text = match std::fs::read_to_string(&args.path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("validate_ndjson: cannot read {}: {e}", args.path);
            std::process::exit(1);
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        eprintln!("validate_ndjson: {} has no resources", args.path);
        std::process::exit(1);
    }

    // Untimed first pass: warms caches and the allocator, and gathers what
    // was rejected and why (the timed passes only count).
    let (expected, rejects) = inspect(&lines, args.index, args.show_rejects);

    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut runs = Vec::new();
    for &requested in &args.threads {
        let threads = if requested == 0 { cores } else { requested };
        let mut times = Vec::with_capacity(args.rounds);
        for _ in 0..args.rounds {
            let start = Instant::now();
            let tally = run(&lines, threads, args.index);
            times.push(start.elapsed());
            // Validation is deterministic; a different count is a bug here.
            assert_eq!(tally, expected, "passes disagree");
        }
        runs.push(run_json(threads, &times, lines.len(), text.len()));
    }

    let out = obj(vec![
        ("tool", s("clinflow")),
        ("file", s(&args.path)),
        ("bytes", n(text.len())),
        ("resources", n(lines.len())),
        ("valid", n(expected.valid)),
        ("rejected", n(expected.invalid)),
        ("index_extraction", Json::Bool(args.index)),
        ("index_rows", n(expected.index_rows)),
        ("cores", n(cores)),
        ("runs", Json::Array(runs)),
        ("rejected_by_type", rejects.by_type),
        ("rejected_examples", Json::Array(rejects.examples)),
    ]);
    println!("{}", out.to_compact());
}

/// One timed pass over all lines on `threads` threads.
fn run(lines: &[&str], threads: usize, with_index: bool) -> Tally {
    if threads <= 1 {
        return lines
            .iter()
            .fold(Tally::default(), |t, l| t.add(check(l, with_index)));
    }
    let next = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut t = Tally::default();
                    loop {
                        let from = next.fetch_add(CHUNK, Ordering::Relaxed);
                        if from >= lines.len() {
                            return t;
                        }
                        let to = (from + CHUNK).min(lines.len());
                        for l in &lines[from..to] {
                            t = t.add(check(l, with_index));
                        }
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a worker panicked"))
            .fold(Tally::default(), Tally::add)
    })
}

/// Parse + validate one line (and extract its index rows).
fn check(line: &str, with_index: bool) -> Tally {
    match validate::parse_resource(line, None) {
        Ok(resource) => Tally {
            valid: 1,
            invalid: 0,
            index_rows: if with_index {
                index::extract(&resource).entries.len()
            } else {
                0
            },
        },
        Err(_) => Tally {
            valid: 0,
            invalid: 1,
            index_rows: 0,
        },
    }
}

struct Rejects {
    by_type: Json,
    examples: Vec<Json>,
}

/// The untimed pass: the tally, rejections per resource type, and the first
/// `show` rejected lines with their issues.
fn inspect(lines: &[&str], with_index: bool, show: usize) -> (Tally, Rejects) {
    let mut tally = Tally::default();
    let mut by_type: Vec<(String, Json)> = Vec::new();
    let mut examples = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let outcome = match validate::parse_resource(line, None) {
            Ok(r) => {
                let rows = if with_index {
                    index::extract(&r).entries.len()
                } else {
                    0
                };
                tally = tally.add(Tally {
                    valid: 1,
                    invalid: 0,
                    index_rows: rows,
                });
                continue;
            }
            Err(o) => o,
        };
        tally = tally.add(Tally {
            valid: 0,
            invalid: 1,
            index_rows: 0,
        });
        let rtype = Json::parse(line)
            .ok()
            .and_then(|j| {
                j.get("resourceType")
                    .and_then(Json::as_str)
                    .map(String::from)
            })
            .unwrap_or_else(|| "?".into());
        match by_type.iter_mut().find(|(k, _)| *k == rtype) {
            Some((_, Json::Number(c))) => *c = (c.parse::<usize>().unwrap_or(0) + 1).to_string(),
            _ => by_type.push((rtype.clone(), n(1))),
        }
        if examples.len() < show {
            let issues = outcome
                .issues
                .iter()
                .map(|i| s(&format!("{}: {}", i.expression.join(","), i.diagnostics)))
                .collect();
            examples.push(obj(vec![
                ("line", n(i + 1)),
                ("resourceType", s(&rtype)),
                ("issues", Json::Array(issues)),
            ]));
        }
    }
    (
        tally,
        Rejects {
            by_type: Json::Object(by_type),
            examples,
        },
    )
}

fn run_json(threads: usize, times: &[Duration], resources: usize, bytes: usize) -> Json {
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2].as_secs_f64();
    let ms = |d: &Duration| Json::Number(format!("{:.1}", d.as_secs_f64() * 1e3));
    obj(vec![
        ("threads", n(threads)),
        ("rounds_ms", Json::Array(times.iter().map(ms).collect())),
        ("median_ms", Json::Number(format!("{:.1}", median * 1e3))),
        (
            "resources_per_s",
            Json::Number(format!("{:.0}", resources as f64 / median)),
        ),
        (
            "mb_per_s",
            Json::Number(format!("{:.1}", bytes as f64 / median / 1e6)),
        ),
    ])
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        path: String::new(),
        threads: vec![1, 0],
        rounds: 5,
        index: false,
        show_rejects: 5,
    };
    let number = |flag: &str, v: Option<String>| -> Result<usize, String> {
        v.as_deref()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    };
    while let Some(a) = it.next() {
        match a.as_str() {
            "--threads" => {
                let v = it.next().ok_or("--threads needs a list, e.g. 1,0")?;
                args.threads = v
                    .split(',')
                    .map(|t| {
                        t.trim()
                            .parse()
                            .map_err(|_| format!("bad thread count {t:?}"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--rounds" => args.rounds = number("--rounds", it.next())?.max(1),
            "--show-rejects" => args.show_rejects = number("--show-rejects", it.next())?,
            "--index" => args.index = true,
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            _ if args.path.is_empty() => args.path = a,
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    if args.path.is_empty() {
        return Err("no NDJSON file given".into());
    }
    Ok(args)
}

fn obj(members: Vec<(&str, Json)>) -> Json {
    Json::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

fn s(v: &str) -> Json {
    Json::String(v.to_string())
}

fn n(v: usize) -> Json {
    Json::Number(v.to_string())
}
