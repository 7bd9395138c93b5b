#!/usr/bin/env bash
# Issue 3, benchmark 2: end-to-end ingest over HTTP.
#
#   bench/ingest-throughput.sh [sqlite|postgres|all] [--messages N] [--rows N]
#                              [--clients N] [--per-post N]
#
# 1. Writes N ORU^R01 messages with 10 OBX each (parse_bench --write: the
#    reference trial's first lab message, each copy with its own MSH-10),
#    and a wearable CSV of --rows heart-rate readings (default 50,000: one
#    Observation each, subject CARDIO-01-0003, 5 s apart from 2026-03-02).
# 2. Starts `clinflow serve --demo` on a fresh database and posts them to
#    /ingest/hl7v2 from concurrent clients (bench/ingest-load.py: bodies of
#    --per-post messages, 429s retried after Retry-After), then waits until
#    every batch is done. Observations/s = Observations stored (counted in
#    the store before and after) / seconds from the first post to the last
#    batch done.
# 3. Runs the limit program (bench/limit-write) on the same number of
#    Observations, 100 and 800 per transaction, for the ratio.
#
# What differs from the limit: ingest also stores a DiagnosticReport per
# message, an audit row per resource, the raw input and batch rows, and data
# queries for values outside the soft range; the limit writes Observations
# only. The ratio says what the whole pipeline costs over raw writes.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
trap cleanup EXIT

ENGINES=sqlite
MESSAGES=20000
ROWS=50000
CLIENTS=8
PER_POST=100
while (($#)); do
    case $1 in
    sqlite | postgres | all) ENGINES=$1 ;;
    --messages) MESSAGES=${2:?}; shift ;;
    --rows) ROWS=${2:?}; shift ;;
    --clients) CLIENTS=${2:?}; shift ;;
    --per-post) PER_POST=${2:?}; shift ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
CF_PORT=${BENCH_CLINFLOW_PORT:-18112}
PATIENT=Patient/CARDIO-01-0003
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

build_release
if [[ -z ${BENCH_NO_BUILD:-} ]]; then
    (cd "$ROOT" && cargo build --release -q -p clinflow-hl7v2 --example parse_bench) \
        || die "building parse_bench failed"
fi
MSGS=$WORK/messages.hl7
"$ROOT/target/release/examples/parse_bench" --count "$MESSAGES" --write "$MSGS" \
    || die "writing the messages failed"
CSV=$WORK/wearable.csv
python3 - "$ROWS" >"$CSV" <<'EOF'
import datetime, sys
t0 = datetime.datetime(2026, 3, 2, 0, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=1)))
print("subject,device,time,metric,value,unit")
for i in range(int(sys.argv[1])):
    t = (t0 + datetime.timedelta(seconds=5 * i)).isoformat()
    print(f"CARDIO-01-0003,band-2210,{t},heart-rate,{60 + i % 40},/min")
EOF


# clinflow_run ENGINE DATABASE_URL: sets STORED.
clinflow_run() {
    local engine=$1 db=$2 out=$WORK/ingest-$1.json
    log "[$engine] clinflow: starting on a fresh database (load $(loadavg))"
    start_clinflow "$db" "$CF_PORT" "$WORK/clinflow-$engine.log"
    local pid=${STARTED_PIDS[-1]} before after
    before=$(count_observations "$CF_PORT")
    local rss_before
    rss_before=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    python3 "$ROOT/bench/ingest-load.py" "http://127.0.0.1:$CF_PORT" "$MSGS" --token "$TOKEN" \
        --wearable "$CSV" --clients "$CLIENTS" --per-post "$PER_POST" >"$out" || die "[$engine] the load failed"
    log "  load: $(cat "$out")"
    after=$(count_observations "$CF_PORT")
    local peak
    peak=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
    STORED=$((after - before))
    python3 - "$engine" "$out" "$STORED" "$peak" "$(loadavg)" >>"$RESULTS" <<'EOF'
import json, sys
engine, path, stored, peak, load = sys.argv[1:6]
r = json.load(open(path))
if r["errors"]:
    raise SystemExit(f"{r['errors']} posts failed: {r['first_errors']}")
print(json.dumps({"engine": engine, "system": "clinflow ingest", "per_s": int(stored) / r["done_seconds"],
                  "p50": r["post_p50_ms"], "p99": r["post_p99_ms"], "load": load,
                  "note": f"{r['stored']} of {r['received']} items (messages and CSV rows) stored, {r['rejected']} rejected, "
                          f"{r['duplicates']} duplicates, {r['retries_429']} 429s, peak RSS {int(peak)//1024} MiB"}))
EOF
    stop_pid "$pid"
}

limit_run() {
    local engine=$1 db=$2 count=$3 batch=$4 out=$WORK/limit-$1-$4.json writers=8
    [ "$engine" = sqlite ] && writers=1
    log "[$engine] limit: $count Observations, $batch per transaction (load $(loadavg))"
    "$LIMIT" --database "$db" --count "$count" --batch "$batch" --writers "$writers" \
        --patient-ref "$PATIENT" >"$out" || die "[$engine] the limit program failed"
    python3 - "$engine" "$batch" "$out" "$(loadavg)" >>"$RESULTS" <<'EOF'
import json, sys
engine, batch, path, load = sys.argv[1:5]
r = json.load(open(path))
print(json.dumps({"engine": engine, "system": f"limit, {batch}/tx", "per_s": r["resources_per_s"],
                  "p50": r["p50_ms"], "p99": r["p99_ms"], "load": load, "note": "Observations only, no audit"}))
EOF
}

if [[ $ENGINES == sqlite || $ENGINES == all ]]; then
    clinflow_run sqlite "sqlite://$WORK/clinflow.db"
    limit_run sqlite "sqlite://$WORK/limit-100.db" "$STORED" 100
    limit_run sqlite "sqlite://$WORK/limit-800.db" "$STORED" 800
fi
if [[ $ENGINES == postgres || $ENGINES == all ]]; then
    pg_isready -q -d "$PG_URL" || die "PostgreSQL is not reachable at $PG_URL"
    s1=bench_i_$$_clinflow s2=bench_i_$$_limit100 s3=bench_i_$$_limit800
    PG_SCHEMAS+=("$s1" "$s2" "$s3")
    clinflow_run postgres "$PG_URL?schema=$s1"
    limit_run postgres "$PG_URL?schema=$s2" "$STORED" 100
    limit_run postgres "$PG_URL?schema=$s3" "$STORED" 800
fi

python3 - "$RESULTS" "$MESSAGES" "$CLIENTS" "$PER_POST" "$ROWS" <<'EOF'
import json, sys
path, messages, clients, per_post, rows_csv = sys.argv[1:6]
rows = [json.loads(l) for l in open(path)]
print(f"\ningest over HTTP: {messages} ORU^R01 messages (10 OBX each, {per_post} a post) and {rows_csv} wearable CSV rows (1,000 a post), {clients} clients")
print(f"{'engine':9} {'system':18} {'obs/s':>8} {'p50 ms':>8} {'p99 ms':>8}  load avg / note")
for r in rows:
    print(f"{r['engine']:9} {r['system']:18} {r['per_s']:8.0f} {r['p50'] or 0:8.1f} {r['p99'] or 0:8.1f}  {r['load']}  {r.get('note', '')}")
print("\nratios (p50/p99: per post for clinflow, per transaction for the limit)")
for engine in sorted({r["engine"] for r in rows}):
    cf = next(r for r in rows if r["engine"] == engine and r["system"] == "clinflow ingest")
    limit = max((r for r in rows if r["engine"] == engine and r["system"].startswith("limit")), key=lambda r: r["per_s"])
    ratio = cf["per_s"] / limit["per_s"]
    print(f"  {engine:9} clinflow / limit = {ratio:5.2f}   target >= 0.5  {'ok' if ratio >= 0.5 else 'MISSED'}")
    if engine == "sqlite":
        ok = cf["per_s"] >= 20000
        print(f"  {engine:9} clinflow {cf['per_s']:8.0f} obs/s  target >= 20000  {'ok' if ok else 'MISSED'}")
EOF
