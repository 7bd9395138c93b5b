#!/usr/bin/env bash
# Benchmark 1 of issue 2: write throughput, side by side with its peers.
#
#   bench/write-throughput.sh [sqlite|postgres|all] [--seconds N]
#
# For each engine, in one run on this machine:
#   1. clinflow (release) on a fresh database, `serve --demo`, loaded by the
#      shared load client (../shared/peers/txload.py): 8 clients posting
#      transaction Bundles of 100 Observations (~1 KB each) for N seconds
#      (default 20); every bundle must succeed and every Observation must be
#      stored (checked with a `_total=accurate` search);
#   2. the limit (bench/limit-write): the same number of the same
#      Observations written as exactly the rows clinflow writes (resources,
#      resource_versions, index rows; clinflow also writes one audit_log row
#      per resource, the limit none) straight into a fresh database with
#      clinflow's schema (SQLite: 1 writer; PostgreSQL: 8), twice: 100 per transaction (one Bundle)
#      and 800 per transaction (the 8 clients' Bundles, which clinflow's
#      group commit can merge into one transaction); the faster is "the limit";
#   3. SQLite only, when /tmp/hfs/bin/hfs exists (HFS_BIN): helios-hfs on a
#      fresh SQLite file under the same txload run, indexing the same
#      Observation search parameters as clinflow (bench/hfs/README.md; without
#      them hfs indexes nothing and stores about twice as fast).
# Then prints a table of Observations/s, p50/p99 (per bundle for the
# servers, per batch transaction for the limit) and the ratios to the
# issue's targets. Exits non-zero when anything fails (not when a target is
# missed). PostgreSQL: BENCH_PG_URL (default postgres://postgres@127.0.0.1:5432/test),
# fresh schemas dropped afterwards.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT

ENGINES=all
RUN_SECONDS=20
while (($#)); do
    case $1 in
    sqlite | postgres | all) ENGINES=$1 ;;
    --seconds) RUN_SECONDS=${2:?--seconds needs a value}; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (use sqlite, postgres or all, and --seconds N)" ;;
    esac
    shift
done
[[ -f $TXLOAD ]] || die "txload.py not found at $TXLOAD (set TXLOAD)"
CF_PORT=${BENCH_CLINFLOW_PORT:-18111}
HFS_PORT=${BENCH_HFS_PORT:-18090}
PATIENT=Patient/CARDIO-01-0001
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

build_release

# record ENGINE SYSTEM JSON_FILE: appends one result line.
record() {
    python3 - "$1" "$2" "$3" "$(loadavg)" >>"$RESULTS" <<'EOF'
import json, sys
engine, system, path, load = sys.argv[1:5]
r = json.load(open(path))
print(json.dumps({"engine": engine, "system": system, "per_s": r["resources_per_s"],
                  "p50": r["p50_ms"], "p99": r["p99_ms"], "load": load}))
EOF
}

# clinflow_run ENGINE DATABASE_URL: sets STORED to the Observations stored.
clinflow_run() {
    local engine=$1 db=$2 out=$WORK/clinflow-$1.json
    log "[$engine] clinflow: starting on a fresh database (load $(loadavg))"
    start_clinflow "$db" "$CF_PORT" "$WORK/clinflow-$engine.log"
    local pid=${STARTED_PIDS[-1]}
    local sent stored demo
    # The demo data set holds Observations of its own.
    demo=$(count_observations "$CF_PORT") || die "counting the demo's Observations failed"
    run_txload "http://127.0.0.1:$CF_PORT/fhir" "$out" "$RUN_SECONDS" "$PATIENT" "$TOKEN"
    sent=$(($(json_get bundles_ok <"$out") * 100))
    stored=$(($(count_observations "$CF_PORT") - demo)) || die "counting the stored Observations failed"
    # A bundle whose reply was lost to the client's deadline may be stored
    # although txload counted it as failed; txload already failed on those.
    ((stored == sent)) || die "[$engine] clinflow acknowledged $sent Observations but stores $stored"
    stop_pid "$pid"
    record "$engine" clinflow "$out"
    STORED=$stored
}

# limit_run ENGINE DATABASE_URL COUNT BATCH
limit_run() {
    local engine=$1 db=$2 count=$3 batch=$4 out=$WORK/limit-$1-$4.json
    # SQLite admits one writer at a time, and every connection's page cache
    # is invalidated by another connection's commit: one connection, kept
    # warm, is the fastest way to write (it is clinflow's design too).
    # PostgreSQL takes 8 concurrent writers.
    local writers=8
    [ "$engine" = sqlite ] && writers=1
    log "[$engine] limit: $count Observations, $batch per transaction, $writers writer(s) (load $(loadavg))"
    "$LIMIT" --database "$db" --count "$count" --batch "$batch" --writers "$writers" \
        --patient-ref "$PATIENT" >"$out" || die "[$engine] the limit program failed"
    log "  limit: $(cat "$out")"
    record "$engine" "limit, $batch/tx (no audit)" "$out"
}

hfs_run() {
    local out=$WORK/hfs.json
    if ! have_hfs; then
        log "[sqlite] hfs: $HFS_BIN not found; skipped (cargo install helios-hfs --root /tmp/hfs)"
        return 0
    fi
    log "[sqlite] hfs: starting on a fresh database (load $(loadavg))"
    start_hfs "$WORK/hfs.db" "$HFS_PORT" "$WORK/hfs.log"
    local pid=${STARTED_PIDS[-1]}
    put_patients "http://127.0.0.1:$HFS_PORT" CARDIO-01-0001
    run_txload "http://127.0.0.1:$HFS_PORT" "$out" "$RUN_SECONDS" "$PATIENT"
    stop_pid "$pid"
    record sqlite hfs "$out"
}

if [[ $ENGINES == sqlite || $ENGINES == all ]]; then
    clinflow_run sqlite "sqlite://$WORK/clinflow.db"
    limit_run sqlite "sqlite://$WORK/limit-100.db" "$STORED" 100
    limit_run sqlite "sqlite://$WORK/limit-800.db" "$STORED" 800
    hfs_run
fi
if [[ $ENGINES == postgres || $ENGINES == all ]]; then
    pg_isready -q -d "$PG_URL" || die "PostgreSQL is not reachable at $PG_URL"
    s1=bench_w_$$_clinflow s2=bench_w_$$_limit100 s3=bench_w_$$_limit800
    PG_SCHEMAS+=("$s1" "$s2" "$s3")
    clinflow_run postgres "$PG_URL?schema=$s1"
    limit_run postgres "$PG_URL?schema=$s2" "$STORED" 100
    limit_run postgres "$PG_URL?schema=$s3" "$STORED" 800
fi

python3 - "$RESULTS" "$RUN_SECONDS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\nwrite throughput: 8 clients, transaction Bundles of 100 Observations, {sys.argv[2]} s each")
print(f"{'engine':9} {'system':29} {'obs/s':>8} {'p50 ms':>8} {'p99 ms':>8}  load avg")
for r in rows:
    print(f"{r['engine']:9} {r['system']:29} {r['per_s']:>8} {r['p50']:>8} {r['p99']:>8}  {r['load']}")
get = lambda e, s: max((r for r in rows if r["engine"] == e and r["system"].startswith(s)),
                       key=lambda r: r["per_s"], default=None)
print("\nratios; the limit is the faster of its two runs (p50/p99: per Bundle for servers,"
      " per transaction for the limit)")
for e in ("sqlite", "postgres"):
    c, l, h = get(e, "clinflow"), get(e, "limit"), get(e, "hfs")
    if c and l:
        x = c["per_s"] / l["per_s"]
        print(f"  {e:9} clinflow / limit = {x:5.2f}   target >= 0.5  {'ok' if x >= 0.5 else 'MISSED'}"
              "   (clinflow also writes 1 audit row per Observation; the limit none)")
    if c and h:
        x = c["per_s"] / h["per_s"]
        print(f"  {e:9} clinflow / hfs   = {x:5.2f}   target >= 3    {'ok' if x >= 3 else 'MISSED'}")
    if c and e == "sqlite":
        print(f"  {e:9} clinflow           {c['per_s']:>5} obs/s  target >= 20000  {'ok' if c['per_s'] >= 20000 else 'MISSED'}")
EOF
