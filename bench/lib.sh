# Helpers shared by the benchmark scripts (sourced, not run).
#
# Every server a script starts is recorded in STARTED_PIDS and stopped by
# `cleanup` (SIGTERM, then SIGKILL after 10 s), which the scripts run on exit.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=${CLINFLOW_PEERS:-$ROOT/../shared/peers}
TXLOAD=${TXLOAD:-$PEERS/txload.py}
HFS_BIN=${HFS_BIN:-/tmp/hfs/bin/hfs}
PG_URL=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
CLINFLOW=$ROOT/target/release/clinflow
LIMIT=$ROOT/target/release/clinflow-bench-limit
TOKEN=${BENCH_TOKEN:-bench-admin-$RANDOM$RANDOM}
STARTED_PIDS=()
PG_SCHEMAS=()
# Extra `serve` arguments a script may set (e.g. --mllp-listen ADDR).
SERVE_EXTRA=()
WORK=$(mktemp -d "${TMPDIR:-/tmp}/clinflow-bench.XXXXXX")

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local pid
    for pid in "${STARTED_PIDS[@]}"; do stop_pid "$pid"; done
    for s in "${PG_SCHEMAS[@]}"; do
        psql -q "$PG_URL" -c "DROP SCHEMA IF EXISTS $s CASCADE" >/dev/null 2>&1 || true
    done
    if [[ -z ${BENCH_KEEP:-} ]]; then rm -rf "$WORK"; else log "kept $WORK"; fi
}

# stop_pid PID: SIGTERM (graceful shutdown), SIGKILL after 10 s.
stop_pid() {
    local pid=$1 i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# port_free PORT: fails when something already listens there.
port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_http URL [SECONDS]: until URL answers 2xx.
wait_http() {
    local url=$1 deadline=$((SECONDS + ${2:-60}))
    while ((SECONDS < deadline)); do
        curl -fsS -o /dev/null -H "Authorization: Bearer $TOKEN" "$url" 2>/dev/null && return 0
        sleep 0.2
    done
    return 1
}

# json_get FIELD: reads one JSON object on stdin, prints FIELD.
json_get() {
    python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# count_observations PORT: the Observations a clinflow on PORT stores.
count_observations() {
    curl -fsS -H "Authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$1/fhir/Observation?_total=accurate&_count=0" | json_get total
}

# build_release [PACKAGE...]: cargo build --release of the packages (default
# clinflow and clinflow-bench-limit); BENCH_NO_BUILD=1 uses the binaries
# already in target/release.
build_release() {
    local pkgs=("$@") args=() p
    ((${#pkgs[@]})) || pkgs=(clinflow clinflow-bench-limit)
    if [[ -n ${BENCH_NO_BUILD:-} ]]; then
        [[ -x $CLINFLOW ]] || die "BENCH_NO_BUILD is set but $CLINFLOW is missing"
        [[ " ${pkgs[*]} " != *" clinflow-bench-limit "* || -x $LIMIT ]] || die "BENCH_NO_BUILD is set but $LIMIT is missing"
        return 0
    fi
    for p in "${pkgs[@]}"; do args+=(-p "$p"); done
    log "building release binaries (${pkgs[*]})..."
    (cd "$ROOT" && cargo build --release -q "${args[@]}") || die "cargo build failed"
}

# start_clinflow DATABASE_URL PORT LOGFILE: serve --demo (CARDIO-01 with
# Patients CARDIO-01-0001..0006), admin token $TOKEN; waits for /healthz.
start_clinflow() {
    local db=$1 port=$2 logf=$3
    port_free "$port" || die "port $port is in use"
    CLINFLOW_ADMIN_TOKEN=$TOKEN "$CLINFLOW" --database "$db" --data-dir "$WORK/data" \
        serve --listen "127.0.0.1:$port" --demo "${SERVE_EXTRA[@]}" >"$logf" 2>&1 &
    STARTED_PIDS+=($!)
    wait_http "http://127.0.0.1:$port/healthz" 60 \
        || { tail -20 "$logf" >&2; die "clinflow did not start on port $port"; }
    wait_http "http://127.0.0.1:$port/fhir/Patient/CARDIO-01-0001" 30 \
        || { tail -20 "$logf" >&2; die "the demo trial was not loaded"; }
}

have_hfs() { [[ -x $HFS_BIN ]]; }

# start_hfs DB_PATH PORT LOGFILE: helios-hfs on a fresh SQLite file, with
# the Observation search parameters clinflow indexes (bench/hfs/README.md).
start_hfs() {
    local db=$1 port=$2 logf=$3
    port_free "$port" || die "port $port is in use"
    rm -f "$db" "$db-wal" "$db-shm"
    HFS_DATABASE_URL=$db HFS_DATA_DIR=$ROOT/bench/hfs HFS_BASE_URL=http://127.0.0.1:$port \
        "$HFS_BIN" --port "$port" >"$logf" 2>&1 &
    STARTED_PIDS+=($!)
    wait_http "http://127.0.0.1:$port/metadata" 120 \
        || { tail -20 "$logf" >&2; die "hfs did not start on port $port"; }
    grep -q "Could not load spec SearchParameters" "$logf" \
        && die "hfs did not load bench/hfs/search-parameters-r4.json (see $logf)"
    return 0
}

# put_patients BASE ID...: creates minimal Patients with these ids (hfs).
put_patients() {
    local base=$1 id code
    shift
    for id in "$@"; do
        code=$(curl -sS -o "$WORK/put-patient.out" -w '%{http_code}' -X PUT \
            -H 'Content-Type: application/fhir+json' \
            --data "{\"resourceType\":\"Patient\",\"id\":\"$id\",\"active\":true}" \
            "$base/Patient/$id")
        [[ $code == 2?? ]] || { cat "$WORK/put-patient.out" >&2; die "PUT $base/Patient/$id: HTTP $code"; }
    done
}

# txload BASE OUT_JSON: the shared load client; fails on any failed bundle.
run_txload() {
    local base=$1 out=$2 seconds=$3 pref=$4 token=${5:-}
    local args=("$base" --clients 8 --per-bundle 100 --seconds "$seconds" --patient-ref "$pref")
    [[ -n $token ]] && args+=(--token "$token")
    python3 "$TXLOAD" "${args[@]}" >"$out" || die "txload failed against $base"
    local ok err
    ok=$(json_get bundles_ok <"$out")
    err=$(json_get bundles_err <"$out")
    log "  txload: $(cat "$out")"
    ((err == 0)) || die "$err bundle(s) failed against $base"
    ((ok > 0)) || die "no bundle succeeded against $base"
}

# bench NAME SYSTEM ARGS...: one `wrk -t2 -c${WRK_CONNECTIONS:-64} -d$DURATION --latency` run;
# appends its result (requests/s, p50, p99 in ms) to $RESULTS. Every answer
# must be 2xx or 3xx.
bench() {
    local name=$1 system=$2 out=$WORK/wrk-$1-$2.txt
    shift 2
    log "wrk: $name on $system (load $(loadavg))"
    wrk -t2 -c"${WRK_CONNECTIONS:-64}" -d"$DURATION" --timeout 30s --latency "$@" >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed"; }
    python3 - "$out" "$name" "$system" "$(loadavg)" >>"$RESULTS" <<'EOF' || { cat "$out" >&2; die "wrk run $name on $system failed"; }
import json, re, sys
text, name, system, load = open(sys.argv[1]).read(), *sys.argv[2:5]
def ms(v, unit):
    return float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
errs = re.search(r"Socket errors:.*", text)
if not rps or not p99 or float(rps.group(1)) == 0:
    sys.exit("no requests/s or p99 in wrk's output")
if bad:
    sys.exit(f"{bad.group(1)} responses were not 2xx")
print(json.dumps({"test": name, "system": system, "rps": float(rps.group(1)),
                  "p50": ms(*p50.groups()), "p99": ms(*p99.groups()),
                  "errors": errs.group(0) if errs else "", "load": load}))
EOF
}
