#!/usr/bin/env bash
# Benchmarks of issue 6: the patient history gateway over real gRPC.
#
#   bench/history.sh [--requests N] [--hang-requests N] [--rate R]
#
# One run, on the demo data set (SQLite), with `clinflow records serve` and
# `clinflow billing serve` as their own processes and `clinflow serve
# --records-url --billing-url` as the gateway:
#   1. records with 40 ms and billing with 60 ms of injected latency, open
#      loop at R requests/s (default 200): the gateway's p50/p99 against the
#      limit, the slower service (billing) called alone over gRPC at the same
#      rate by the same client. Target: p99 <= limit p99 + 10 ms (latency is
#      the maximum of the two calls, not their sum).
#   2. billing hanging (10 min of latency), X-Request-Timeout 200 ms, the
#      breaker off (so that every request waits for the deadline rather
#      than being refused early), --hang-requests (default 10,000) at R/s:
#      answers are 504 at the deadline + <= 20 ms, and the gateway's RSS,
#      sampled every 1,000 requests, stays flat.
# Prints a JSON line per measurement, then a summary.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT

REQUESTS=4000
HANG_REQUESTS=10000
RATE=200
while (($#)); do
    case $1 in
    --requests) REQUESTS=${2:?}; shift ;;
    --hang-requests) HANG_REQUESTS=${2:?}; shift ;;
    --rate) RATE=${2:?}; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
LOAD=$ROOT/target/release/clinflow-bench-history
BASE_PORT=${BENCH_CLINFLOW_PORT:-18140}
export CLINFLOW_SERVICE_TOKEN=bench-service-$RANDOM$RANDOM
SVC_TOKEN=$CLINFLOW_SERVICE_TOKEN
DB=sqlite://$WORK/history.db
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
build_release clinflow clinflow-bench-history

# service KIND PORT LATENCY_MS: clinflow KIND serve; waits for /healthz.
service() {
    local kind=$1 port=$2 latency=$3
    port_free "$port" || die "port $port is in use"
    CLINFLOW_SERVICE_TOKEN=$SVC_TOKEN "$CLINFLOW" --database "$DB" "$kind" serve \
        --listen "127.0.0.1:$port" --fault-latency "$latency" >"$WORK/$kind-$port.log" 2>&1 &
    STARTED_PIDS+=($!)
    local deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; do
        ((SECONDS < deadline)) || { cat "$WORK/$kind-$port.log" >&2; die "$kind did not start"; }
        sleep 0.2
    done
    echo $!
}

# The data: the demo set, loaded by a first gateway (services must exist
# first: they create and migrate the database).
R1=$((BASE_PORT + 1)) B1=$((BASE_PORT + 2)) B2=$((BASE_PORT + 3)) GW=$BASE_PORT GW2=$((BASE_PORT + 4))
service records "$R1" 40 >/dev/null
service billing "$B1" 60 >/dev/null
service billing "$B2" 600000 >/dev/null
SERVE_EXTRA=(--records-url "http://127.0.0.1:$R1" --billing-url "http://127.0.0.1:$B1")
CLINFLOW_SERVICE_TOKEN=$SVC_TOKEN start_clinflow "$DB" "$GW" "$WORK/gateway.log"
PATIENTS=$(curl -fsS -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GW/fhir/Invoice?_count=200" |
    python3 -c 'import json,sys; print(",".join(sorted({e["resource"]["subject"]["reference"].split("/")[1] for e in json.load(sys.stdin)["entry"]})[:50]))')
[[ -n $PATIENTS ]] || die "no billed patients in the demo data"
log "patients: $(tr ',' '\n' <<<"$PATIENTS" | wc -l), load average $(loadavg)"

log "1. limit: billing (60 ms) alone over gRPC at $RATE/s, $REQUESTS requests"
"$LOAD" billing "http://127.0.0.1:$B1" --rate "$RATE" --requests "$REQUESTS" --patients "$PATIENTS" \
    --token "$SVC_TOKEN" | sed 's/^{/{"name":"limit",/' | tee -a "$RESULTS"
log "1. gateway: records 40 ms + billing 60 ms at $RATE/s, $REQUESTS requests"
"$LOAD" http "http://127.0.0.1:$GW/patients/{patient}/history" --rate "$RATE" --requests "$REQUESTS" \
    --patients "$PATIENTS" --token "$TOKEN" | sed 's/^{/{"name":"gateway",/' | tee -a "$RESULTS"
log "1. limit again (after the gateway run)"
"$LOAD" billing "http://127.0.0.1:$B1" --rate "$RATE" --requests "$REQUESTS" --patients "$PATIENTS" \
    --token "$SVC_TOKEN" | sed 's/^{/{"name":"limit-after",/' | tee -a "$RESULTS"

log "2. billing hanging, deadline 200 ms, breaker off, $HANG_REQUESTS requests at $RATE/s"
port_free "$GW2" || die "port $GW2 is in use"
CLINFLOW_ADMIN_TOKEN=$TOKEN CLINFLOW_SERVICE_TOKEN=$SVC_TOKEN "$CLINFLOW" --database "$DB" serve \
    --listen "127.0.0.1:$GW2" --records-url "http://127.0.0.1:$R1" \
    --billing-url "http://127.0.0.1:$B2" --breaker-window 0 >"$WORK/gateway2.log" 2>&1 &
GW2_PID=$!
STARTED_PIDS+=($GW2_PID)
wait_http "http://127.0.0.1:$GW2/healthz" 60 || die "the second gateway did not start"
"$LOAD" http "http://127.0.0.1:$GW2/patients/{patient}/history" --rate "$RATE" \
    --requests "$HANG_REQUESTS" --warmup 200 --patients "$PATIENTS" --token "$TOKEN" --timeout-ms 200 \
    --rss-pid "$GW2_PID" | sed 's/^{/{"name":"hanging",/' | tee -a "$RESULTS"

python3 - "$RESULTS" <<'PY'
import json, sys
r = {j["name"]: j for j in map(json.loads, open(sys.argv[1]))}
lim = min(r["limit"]["p99_ms"], r["limit-after"]["p99_ms"])
gw = r["gateway"]
print(f"1. limit (billing alone) p50 {r['limit']['p50_ms']:.1f} / {r['limit-after']['p50_ms']:.1f} ms, "
      f"p99 {r['limit']['p99_ms']:.1f} / {r['limit-after']['p99_ms']:.1f} ms")
print(f"   gateway p50 {gw['p50_ms']:.1f} ms, p99 {gw['p99_ms']:.1f} ms, statuses {gw['statuses']}")
print(f"   p99 - limit p99 = {gw['p99_ms'] - lim:+.1f} ms (target <= +10 ms): "
      f"{'met' if gw['p99_ms'] <= lim + 10 else 'MISSED'}")
h = r["hanging"]
rss = [s["rss_kib"] for s in h["rss"] if s["rss_kib"]]
print(f"2. hanging billing, deadline 200 ms: p50 {h['p50_ms']:.1f}, p99 {h['p99_ms']:.1f}, max {h['max_ms']:.1f}, "
      f"min {h['min_ms']:.1f} ms, statuses {h['statuses']}")
print(f"   max - deadline = {h['max_ms'] - 200:+.1f} ms (target <= +20 ms): {'met' if h['max_ms'] <= 220 else 'MISSED'}")
print(f"   gateway RSS every 1000 requests (MiB): {[round(k / 1024, 1) for k in rss]}")
if len(rss) > 3:
    print(f"   RSS from request 1000 to the end: {(rss[-1] - rss[1]) / 1024:+.1f} MiB")
PY
