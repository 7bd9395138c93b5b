#!/usr/bin/env bash
# Benchmark 1 of issue 4: GET /sites/{id}, side by side with its peers.
#
#   bench/sites-read.sh [--duration 10s] [--rounds R]
#
# In one run on this machine, alternating, R rounds (default 2) of
# `wrk -t2 -c64 -d10s --latency`, each request a different site of 1,000
# (bench/wrk/site-ids.lua):
#   1. seed-sitecache: the seed design's Go/gin service (sync.RWMutex map of
#      1,000 sites, no authentication), built from ../shared/peers;
#   2. clinflow (release, SQLite, `serve --demo`) with 1,000 sites created
#      through POST /sites, read with a monitor token (authenticated: the
#      token is checked on every request, as in production);
#   3. limit-hyper: bare hyper answering one fixed JSON body (no routing,
#      no lookup, no authentication): the physical limit of an HTTP GET here;
#   4. axum-floor (crates/server/examples/axum_floor.rs, for reference, not a
#      target): the same axum answering a fixed body from a `{id}` route with
#      no layers, which shows how much of the gap to the limit is clinflow's
#      own per-request work (authentication, metrics, deadline, shedding).
# Prints requests/s and p99 of each, and the ratios to the issue's targets
# (>= 1.3x the Go service's requests/s with a lower p99; >= 0.85x the
# limit). Exits non-zero when anything fails (not when a target is missed).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT

DURATION=10s
ROUNDS=2
while (($#)); do
    case $1 in
    --duration) DURATION=${2:?}; shift ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
command -v wrk >/dev/null || die "wrk is not installed (Debian package wrk)"
CF_PORT=${BENCH_CLINFLOW_PORT:-18113}
GO_PORT=${BENCH_GO_PORT:-18080}
LIMIT_PORT=${BENCH_LIMIT_PORT:-18081}
SITES=1000
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

build_release clinflow
FLOOR=$ROOT/target/release/examples/axum_floor
if [[ -z ${BENCH_NO_BUILD:-} || ! -x $FLOOR ]]; then
    (cd "$ROOT" && cargo build --release -q -p clinflow-server --example axum_floor) || die "building axum_floor failed"
fi
FLOOR_PORT=${BENCH_FLOOR_PORT:-18082}
GO_BIN=${SEED_SITECACHE_BIN:-/tmp/seed-sitecache}
if [[ ! -x $GO_BIN ]]; then
    log "building the Go peer (seed-sitecache)"
    bash "$PEERS/seed-sitecache/build.sh" "$GO_BIN" >&2 || die "building seed-sitecache failed"
fi
LIMIT_DIR=${LIMIT_HYPER_TARGET:-/tmp/limit-hyper}
if [[ ! -x $LIMIT_DIR/release/limit_hyper ]]; then
    log "building the limit (limit-hyper)"
    cargo build -q --release --manifest-path "$PEERS/limit-hyper/Cargo.toml" --target-dir "$LIMIT_DIR" \
        || die "building limit-hyper failed"
fi

log "clinflow: starting on a fresh SQLite database, creating $SITES sites"
start_clinflow "sqlite://$WORK/clinflow.db" "$CF_PORT" "$WORK/clinflow.log"
CF=http://127.0.0.1:$CF_PORT
python3 - "$CF" "$TOKEN" "$SITES" <<'PY' || die "creating the sites failed"
import json, sys, urllib.request
base, token, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(1, n + 1):
    sid = f"site-{i:03d}"
    body = {"id": sid, "name": f"General Hospital {i}", "country": "US",
            "city": "Springfield", "timezone": "America/Chicago"}
    req = urllib.request.Request(f"{base}/sites/{sid}", data=json.dumps(body).encode(),
                                 method="PUT", headers={"Authorization": f"Bearer {token}",
                                                        "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert r.status in (200, 201), r.status
PY
MONITOR=$(CLINFLOW_ADMIN_TOKEN= "$CLINFLOW" --database "sqlite://$WORK/clinflow.db" --data-dir "$WORK/data" \
    token create --role monitor --name bench-monitor) || die "creating the monitor token failed"
curl -fsS -H "Authorization: Bearer $MONITOR" "$CF/sites/site-1000" >/dev/null \
    || die "clinflow does not serve site-1000 with the monitor token"

SITECACHE_ADDR=127.0.0.1:$GO_PORT "$GO_BIN" >"$WORK/go.log" 2>&1 &
STARTED_PIDS+=($!)
LIMIT_ADDR=127.0.0.1:$LIMIT_PORT "$LIMIT_DIR/release/limit_hyper" >"$WORK/limit.log" 2>&1 &
STARTED_PIDS+=($!)
"$FLOOR" "127.0.0.1:$FLOOR_PORT" >"$WORK/floor.log" 2>&1 &
STARTED_PIDS+=($!)
for p in "$GO_PORT" "$LIMIT_PORT" "$FLOOR_PORT"; do
    for _ in $(seq 50); do curl -fsS -o /dev/null "http://127.0.0.1:$p/sites/site-001" 2>/dev/null && break; sleep 0.1; done
    curl -fsS -o /dev/null "http://127.0.0.1:$p/sites/site-001" || die "the peer on port $p does not answer"
done

for round in $(seq "$ROUNDS"); do
    bench sites go -s "$ROOT/bench/wrk/site-ids.lua" "http://127.0.0.1:$GO_PORT" -- "$SITES"
    bench sites clinflow -s "$ROOT/bench/wrk/site-ids.lua" "$CF" -- "$SITES" "$MONITOR"
    bench sites limit -s "$ROOT/bench/wrk/site-ids.lua" "http://127.0.0.1:$LIMIT_PORT" -- "$SITES"
    bench sites axum-floor -s "$ROOT/bench/wrk/site-ids.lua" "http://127.0.0.1:$FLOOR_PORT" -- "$SITES"
done

python3 - "$RESULTS" "$DURATION" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    print(f"  {r['system']:9} {r['rps']:10.0f} req/s  p50 {r['p50']:7.3f} ms  p99 {r['p99']:7.3f} ms  load {r['load']}")
    if r["system"] not in best or r["rps"] > best[r["system"]]["rps"]:
        best[r["system"]] = r
go, cf, lim, floor = best["go"], best["clinflow"], best["limit"], best["axum-floor"]
print(f"\nGET /sites/{{id}}, wrk -t2 -c64 -d{sys.argv[2]}, best round of each:")
print(f"| system | req/s | p99 ms |")
print(f"| --- | ---: | ---: |")
for name, r in (("seed-sitecache (Go/gin)", go), ("clinflow (authenticated)", cf), ("limit-hyper", lim),
                ("axum floor (reference: no layers, no auth)", floor)):
    print(f"| {name} | {r['rps']:.0f} | {r['p99']:.2f} |")
a, b = cf["rps"] / go["rps"], cf["rps"] / lim["rps"]
print(f"\nclinflow / Go: {a:.2f}x (target >= 1.3x: {'met' if a >= 1.3 else 'MISSED'}); "
      f"p99 {cf['p99']:.2f} vs {go['p99']:.2f} ms ({'lower: met' if cf['p99'] < go['p99'] else 'NOT lower: MISSED'})")
print(f"clinflow / limit: {b:.2f}x (target >= 0.85x: {'met' if b >= 0.85 else 'MISSED'})")
PY
