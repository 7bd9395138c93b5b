//! Issue 7, benchmark 2: `parse_part10` over every file in DIR.
//!
//! usage: parse_bench DIR [--rounds N]
//! Reads each file's bytes once (not timed), parses every file ROUNDS times
//! from memory and prints `{"files", "rounds", "seconds", "per_s"}`. A file
//! that does not parse fails the run (the peer reads them all).

use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .ok_or_else(|| anyhow::anyhow!("usage: parse_bench DIR [--rounds N]"))?;
    let rounds: usize = match args.iter().position(|a| a == "--rounds") {
        Some(i) => args.get(i + 1).map_or(Ok(5), |r| r.parse())?,
        None => 5,
    };
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    names.sort();
    let blobs: Vec<Vec<u8>> = names.iter().map(std::fs::read).collect::<Result<_, _>>()?;
    let start = Instant::now();
    let mut elements = 0usize;
    for _ in 0..rounds {
        for (b, name) in blobs.iter().zip(&names) {
            let inst = clinflow_imaging::parse_part10(b)
                .map_err(|e| anyhow::anyhow!("{}: {e}", name.display()))?;
            elements += std::hint::black_box(&inst).meta.sop_instance_uid.len();
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(elements);
    let n = blobs.len() * rounds;
    println!(
        "{{\"files\": {}, \"rounds\": {rounds}, \"seconds\": {:.4}, \"per_s\": {:.1}}}",
        blobs.len(),
        seconds,
        n as f64 / seconds
    );
    Ok(())
}
