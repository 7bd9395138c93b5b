#!/usr/bin/env bash
# HL7 v2 parse throughput: clinflow-hl7v2 against python-hl7 (`hl7` on PyPI).
#
# Issue 3, benchmark 1 (target: clinflow >= 50x python-hl7 for parse + map).
# Idempotent:
#   1. a venv in target/bench-venv with `hl7`, installed once;
#   2. clinflow's side built with
#      `cargo build --release -p clinflow-hl7v2 --example parse_bench`
#      (or HL7V2_BENCH_BIN, a parse_bench binary built elsewhere);
#   3. the messages: COUNT copies of an ORU^R01 with 10 OBX built from
#      reference-trial/samples/lab-results.hl7, each with its own MSH-10,
#      written by `parse_bench --write` into target/bench-data/;
#   4. both sides run one after the other on the same messages, single-
#      threaded; a summary with the ratios.
# Compared: `parse_tree` (clinflow's parse plus a visit of every
# subcomponent) with `hl7.parse` (which builds that whole tree), and
# `parse_oru` (parse + OruR01::read) with `hl7.parse` plus reading the same
# fields, and the target's row: clinflow's parse + map (clinflow-edc's
# `ingest_hl7`: parse, V2-to-FHIR mapping, edit checks, FHIR validation of
# what it produces; `map_bench`) against python-hl7's parse + reading the
# same fields (python-hl7 has no mapping: its side does strictly less). The machine's load average is printed before and after: the
# figures are only comparable on a quiet machine.
#
# Knobs (environment): COUNT (messages, default 20000), ROUNDS (timed
# rounds of clinflow, 5), PY_COUNT (messages the Python side parses, the
# first of the same file, 5000), PY_ROUNDS (3).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
venv=$root/target/bench-venv
data_dir=$root/target/bench-data
count=${COUNT:-20000}
rounds=${ROUNDS:-5}
py_count=${PY_COUNT:-5000}
py_rounds=${PY_ROUNDS:-3}
peer_req='hl7>=0.4,<0.5'

# 1. Python side.
if ! "$venv/bin/python" -c 'import hl7' 2>/dev/null; then
    echo "== installing $peer_req into $venv"
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$peer_req"
fi

# 2. clinflow's side.
bin=${HL7V2_BENCH_BIN:-}
if [[ -z $bin ]]; then
    echo "== building parse_bench (release)"
    cargo build --quiet --release -p clinflow-hl7v2 --example parse_bench
    bin=$root/target/release/examples/parse_bench
fi
map_bin=${EDC_MAP_BENCH_BIN:-}
if [[ -z $map_bin ]]; then
    echo "== building map_bench (release)"
    cargo build --quiet --release -p clinflow-edc --example map_bench
    map_bin=$root/target/release/examples/map_bench
fi

# 3. Data.
mkdir -p "$data_dir"
data=$data_dir/hl7v2-oru-r01-10obx-n${count}.txt
if [[ ! -s $data ]]; then
    "$bin" --count "$count" --write "$data.tmp"
    mv "$data.tmp" "$data"
fi
echo "== data: $data ($count messages, $(du -h "$data" | cut -f1), sha256 $(sha256sum "$data" | cut -c1-16))"

# 4. Both sides.
echo "== load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
echo "== clinflow-hl7v2 ($count messages, median of $rounds rounds)"
rust_json=$("$bin" --count "$count" --rounds "$rounds")
echo "   $rust_json"
echo "== clinflow-edc parse + map ($count messages, median of $rounds rounds)"
map_json=$("$map_bin" "$data" --rounds "$rounds")
echo "   $map_json"
echo "== python-hl7 ($py_count messages, median of $py_rounds rounds)"
py_json=$("$venv/bin/python" "$root/bench/hl7v2-parse.py" "$data" --rounds "$py_rounds" --limit "$py_count")
echo "   $py_json"
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$rust_json" "$py_json" "$map_json" <<'PY'
import json, sys
r, p, m = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
rows = [
    ("parse (lazy)", r["parse_msgs_per_s"], p["parse_msgs_per_s"], "hl7.parse"),
    ("parse + full tree", r["parse_tree_msgs_per_s"], p["parse_msgs_per_s"], "hl7.parse"),
    ("parse + tree, decoded", r["parse_tree_decoded_msgs_per_s"], p["parse_msgs_per_s"], "hl7.parse"),
    ("parse + ORU^R01 read", r["parse_oru_msgs_per_s"], p["parse_read_msgs_per_s"], "hl7.parse + same fields"),
    ("parse + map (target)", m["parse_map_msgs_per_s"], p["parse_read_msgs_per_s"], "hl7.parse + same fields"),
]
print(f"{'clinflow':<24}{'msgs/s':>10}  {'python-hl7':<26}{'msgs/s':>8}  ratio")
for name, rv, pv, pname in rows:
    print(f"{name:<24}{rv:>10,}  {pname:<26}{pv:>8,}  {rv / pv:6.1f}x")
PY
