#!/usr/bin/env bash
# Parse + validate throughput of R4 NDJSON: clinflow against fhir.resources 8.x.
#
# Issue 2, benchmark 2 (target: clinflow >= 10x). Idempotent:
#   1. a venv in target/bench-venv with carebundle (the generator) and
#      fhir.resources 8.x (the peer), installed once;
#   2. the data, generated once with a fixed seed into target/bench-data/
#      (carebundle is byte-deterministic for a given seed and version);
#   3. clinflow's side built with `cargo build --release`;
#   4. both run on the same file, one after the other, then a summary.
#
# Knobs (environment): PATIENTS (default 550, about 30 MB), SEED (42),
# ROUNDS (timed rounds of clinflow, 5), PY_ROUNDS (of the peer, 3).
# Exits non-zero when either side fails.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
venv=$root/target/bench-venv
data_dir=$root/target/bench-data
patients=${PATIENTS:-550}
seed=${SEED:-42}
rounds=${ROUNDS:-5}
py_rounds=${PY_ROUNDS:-3}
# Pinned: the same seed gives the same bytes only within one carebundle version.
carebundle_req='carebundle==0.5.0'
peer_req='fhir.resources>=8,<9'

# 1. Python side.
if ! "$venv/bin/python" -c 'import carebundle, fhir.resources.R4B' 2>/dev/null; then
    echo "== installing $carebundle_req and $peer_req into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$carebundle_req" "$peer_req"
fi

# 2. Data: every profile, both sexes, one file. `mixed` draws ckd_stage3,
# healthy, hypertension and type2_diabetes by prevalence; anaemia is added
# so all five profiles appear.
data=$data_dir/r4-carebundle-p${patients}-s${seed}.ndjson
if [[ ! -s $data ]]; then
    echo "== generating $patients patients (seed $seed) into $data"
    mkdir -p "$data_dir"
    tmp=$(mktemp -d "$data_dir/gen.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    anaemia=$((patients / 10))
    "$venv/bin/carebundle" generate --profile mixed --count $((patients - anaemia)) \
        --seed "$seed" --sex mixed --age-range 30-85 --format ndjson --out "$tmp/mixed" >"$tmp/log" 2>&1 ||
        { cat "$tmp/log"; exit 1; }
    "$venv/bin/carebundle" generate --profile anaemia --count "$anaemia" \
        --seed "$seed" --sex mixed --age-range 30-85 --format ndjson --out "$tmp/anaemia" >"$tmp/log" 2>&1 ||
        { cat "$tmp/log"; exit 1; }
    # A fixed order (glob sorts), written whole before the rename.
    cat "$tmp"/mixed/*.ndjson "$tmp"/anaemia/*.ndjson >"$tmp/all.ndjson"
    mv "$tmp/all.ndjson" "$data"
    rm -rf "$tmp"
    trap - EXIT
fi
echo "== data: $data ($(wc -l <"$data") resources, $(du -h "$data" | cut -f1), sha256 $(sha256sum "$data" | cut -c1-16))"
grep -o '"resourceType":"[A-Za-z]*"' "$data" | sort | uniq -c | sort -rn |
    awk '{printf "   %s", $0} END {print ""}' | sed 's/"resourceType"://g'

# 3. clinflow's side.
echo "== building clinflow (cargo build --release)"
cargo build --release --quiet -p clinflow-fhir --example validate_ndjson
bin=$root/target/release/examples/validate_ndjson

# 4. Run both. A failure of one side is reported, and the other still runs.
echo "== load before: $(uptime | sed 's/.*load average/load average/')"
status=0
# No stale result may stand in for a side that fails this time.
rm -f "$data_dir/clinflow.json" "$data_dir/clinflow-index.json" "$data_dir/fhir-resources.json"
echo "== clinflow: parse_resource per line, 1 thread and all cores ($rounds rounds each)"
"$bin" "$data" --threads 1,0 --rounds "$rounds" >"$data_dir/clinflow.json" || status=1
echo "== clinflow with search-index extraction"
"$bin" "$data" --threads 1,0 --rounds "$rounds" --index >"$data_dir/clinflow-index.json" || status=1
echo "== fhir.resources: model_validate_json per line, 1 process and all cores ($py_rounds rounds each)"
"$venv/bin/python" bench/parse_validate_fhir_resources.py "$data" \
    --processes 1,0 --rounds "$py_rounds" >"$data_dir/fhir-resources.json" || status=1
echo "== load after: $(uptime | sed 's/.*load average/load average/')"

"$venv/bin/python" - "$data_dir" <<'EOF' || status=1
import json, pathlib, sys

d = pathlib.Path(sys.argv[1])
def load(name):
    try:
        return json.loads((d / name).read_text())
    except (OSError, ValueError) as e:
        print(f"   {name}: no result ({e})")
        return None

cf, cfi, py = load("clinflow.json"), load("clinflow-index.json"), load("fhir-resources.json")
if not (cf and cfi and py):
    sys.exit(1)
if cf["resources"] != py["resources"]:
    print(f"   the two sides read different line counts: {cf['resources']} != {py['resources']}")
    sys.exit(1)

def rate(result, n):
    key = "threads" if "threads" in result["runs"][0] else "processes"
    return {r[key]: r["resources_per_s"] for r in result["runs"]}[n]

cores = cf["cores"]
c1, cn = rate(cf, 1), rate(cf, cores)
ci1, cin = rate(cfi, 1), rate(cfi, cores)
p1, pn = rate(py, 1), rate(py, py["cores"])
print(f"\n{cf['resources']} resources, {cf['bytes'] / 1e6:.1f} MB, {cores} cores; median resources/s")
print(f"  {'':<24} {'1 thread/process':>17} {f'{cores} threads/processes':>22}")
print(f"  {'clinflow':<24} {c1:>17,} {cn:>22,}")
print(f"  {'clinflow + index rows':<24} {ci1:>17,} {cin:>22,}")
print(f"  {'fhir.resources (R4B)':<24} {p1:>17,} {pn:>22,}")
print(f"  ({py['tool']})")
print(f"  ratio, 1 vs 1:         {c1 / p1:6.1f}x")
print(f"  ratio, all vs all:     {cn / pn:6.1f}x")
print(f"  ratio, clinflow all cores vs fhir.resources 1 process: {cn / p1:6.1f}x (target >= 10x)")
print(f"  rejected: clinflow {cf['rejected']} {cf['rejected_by_type']}, "
      f"fhir.resources {py['rejected']} {py['rejected_by_type']}")
for side in (cf, py):
    for ex in side["rejected_examples"]:
        print(f"    {side['tool']}: line {ex['line']} {ex['resourceType']}: {'; '.join(ex['issues'])[:300]}")
EOF
exit $status
