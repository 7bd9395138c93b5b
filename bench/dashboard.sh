#!/usr/bin/env bash
# Benchmark 2 of issue 4: GET /trials/CARDIO-01/dashboard on the demo data set.
#
#   bench/dashboard.sh [--requests N] [--duration 10s]
#
# In one run on this machine (release build, SQLite, `serve --demo`: 366
# subjects, ~21k resources):
#   1. each of the five sections slowed by 100 ms (--dashboard-section-delay
#      all=100): N sequential requests (default 200); the sections run
#      concurrently, so the answer should take ~100 ms plus the slowest
#      section's own work (target: total <= 130 ms), where computing them one
#      after the other would take >= 500 ms (the peer figure, measured from
#      the same server's answers as 5 x 100 ms + the unslowed time);
#   2. no delay: N sequential requests (latency of one), then
#      `wrk -t2 -c8 -d10s --latency` (p99 under concurrent monitors).
# Every answer must be 200 and complete (partial: false).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT

REQUESTS=200
DURATION=10s
while (($#)); do
    case $1 in
    --requests) REQUESTS=${2:?}; shift ;;
    --duration) DURATION=${2:?}; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
command -v wrk >/dev/null || die "wrk is not installed (Debian package wrk)"
PORT_SLOW=${BENCH_CLINFLOW_PORT:-18114}
PORT_FAST=$((PORT_SLOW + 1))
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
build_release clinflow

# sequential NAME PORT: N requests one after the other; appends p50/p99/max.
sequential() {
    python3 - "$1" "http://127.0.0.1:$2/trials/CARDIO-01/dashboard" "$TOKEN" "$REQUESTS" >>"$RESULTS" <<'PY' || die "sequential requests failed"
import json, sys, time, urllib.request
name, url, token, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
times = []
for i in range(n + 5):
    t = time.perf_counter()
    with urllib.request.urlopen(req) as r:
        body = json.load(r)
    dt = (time.perf_counter() - t) * 1000
    if body["partial"]:
        sys.exit(f"a partial answer: {json.dumps(body)[:400]}")
    if i >= 5:  # warm-up
        times.append(dt)
times.sort()
q = lambda p: times[min(len(times) - 1, int(p * len(times)))]
print(json.dumps({"test": name, "p50": q(0.50), "p99": q(0.99), "max": times[-1], "n": len(times)}))
PY
}

log "clinflow: serve --demo with every dashboard section slowed by 100 ms"
SERVE_EXTRA=(--dashboard-section-delay all=100)
start_clinflow "sqlite://$WORK/slow.db" "$PORT_SLOW" "$WORK/slow.log"
sequential slowed "$PORT_SLOW"
stop_pid "${STARTED_PIDS[-1]}"

log "clinflow: serve --demo, no delay"
SERVE_EXTRA=()
rm -rf "$WORK/data"
start_clinflow "sqlite://$WORK/fast.db" "$PORT_FAST" "$WORK/fast.log"
sequential plain "$PORT_FAST"
WRK_CONNECTIONS=8 bench concurrent clinflow -H "Authorization: Bearer $TOKEN" \
    "http://127.0.0.1:$PORT_FAST/trials/CARDIO-01/dashboard"

python3 - "$RESULTS" <<'PY'
import json, sys
rows = {r["test"]: r for r in map(json.loads, open(sys.argv[1]))}
s, p, c = rows["slowed"], rows["plain"], rows["concurrent"]
seq = 500 + p["p50"]
print("\nGET /trials/CARDIO-01/dashboard on the demo data set:")
print("| case | p50 ms | p99 ms | max ms |")
print("| --- | ---: | ---: | ---: |")
print(f"| 5 sections x 100 ms delay, sequential requests | {s['p50']:.1f} | {s['p99']:.1f} | {s['max']:.1f} |")
print(f"| no delay, sequential requests | {p['p50']:.1f} | {p['p99']:.1f} | {p['max']:.1f} |")
print(f"| no delay, wrk -t2 -c8 ({c['rps']:.0f} req/s) | {c['p50']:.1f} | {c['p99']:.1f} | |")
print(f"\nslowed total p99 {s['p99']:.1f} ms (target <= 130 ms: {'met' if s['p99'] <= 130 else 'MISSED'}); "
      f"sections one after another would take >= {seq:.0f} ms: {seq / s['p50']:.1f}x the concurrent answer")
PY
