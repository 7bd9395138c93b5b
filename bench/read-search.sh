#!/usr/bin/env bash
# Benchmark 3 of issue 2: read by id and a code+date search, beside hfs.
#
#   bench/read-search.sh [--count N] [--duration 10s] [--rounds R]
#
# In one run on this machine:
#   1. clinflow (release, SQLite, fresh database, `serve --demo`) and, when
#      /tmp/hfs/bin/hfs exists (HFS_BIN), helios-hfs on a fresh SQLite file;
#   2. both loaded with the same N Observations (default 100,000; see
#      bench/load-observations.py: 6 LOINC codes, dates over 2026, subjects
#      over the demo Patients CARDIO-01-0001..0006) as transaction Bundles;
#   3. `wrk -t2 -c64 -d10s --latency --timeout 30s` (a slow answer is
#      measured, not dropped), alternating clinflow and hfs, on
#      (a) GET Observation/{id}, rotating over every loaded id
#          (bench/wrk/read-ids.lua), and
#      (b) GET Observation?code=http://loinc.org|8480-6&date=ge2026-06-01&date=lt2026-07-01
#          (the servers' default page size; the entries per page are shown).
# Prints requests/s and p99 of each and the ratios clinflow/hfs. Every
# response must be 2xx. clinflow audits every read and search (group-
# committed rows in audit_log); hfs audits nothing.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
trap cleanup EXIT

COUNT=100000
DURATION=10s
ROUNDS=1
while (($#)); do
    case $1 in
    --count) COUNT=${2:?}; shift ;;
    --duration) DURATION=${2:?}; shift ;;
    --rounds) ROUNDS=${2:?}; shift ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1" ;;
    esac
    shift
done
command -v wrk >/dev/null || die "wrk is not installed (Debian package wrk)"
CF_PORT=${BENCH_CLINFLOW_PORT:-18112}
HFS_PORT=${BENCH_HFS_PORT:-18090}
PATIENTS=(CARDIO-01-0001 CARDIO-01-0002 CARDIO-01-0003 CARDIO-01-0004 CARDIO-01-0005 CARDIO-01-0006)
SEARCH='Observation?code=http://loinc.org%7C8480-6&date=ge2026-06-01&date=lt2026-07-01'
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

build_release

CF=http://127.0.0.1:$CF_PORT
HFS=http://127.0.0.1:$HFS_PORT
log "clinflow: starting on a fresh SQLite database"
start_clinflow "sqlite://$WORK/clinflow.db" "$CF_PORT" "$WORK/clinflow.log"
SYSTEMS=(clinflow)
if have_hfs; then
    log "hfs: starting on a fresh SQLite database"
    start_hfs "$WORK/hfs.db" "$HFS_PORT" "$WORK/hfs.log"
    put_patients "$HFS" "${PATIENTS[@]}"
    SYSTEMS+=(hfs)
else
    log "hfs: $HFS_BIN not found; clinflow only (cargo install helios-hfs --root /tmp/hfs)"
fi

root_of() { [[ $1 == clinflow ]] && echo "$CF" || echo "$HFS"; }
base_of() { [[ $1 == clinflow ]] && echo "$CF/fhir" || echo "$HFS"; }
prefix_of() { [[ $1 == clinflow ]] && echo /fhir/Observation/ || echo /Observation/; }

for s in "${SYSTEMS[@]}"; do
    log "$s: loading $COUNT Observations (load $(loadavg))"
    python3 "$ROOT/bench/load-observations.py" "$(base_of "$s")" --count "$COUNT" \
        --ids-out "$WORK/ids-$s.txt" --token "$TOKEN" --patients "$(IFS=,; echo "${PATIENTS[*]}")" \
        >"$WORK/load-$s.json" || die "loading $s failed"
    log "  $(cat "$WORK/load-$s.json")"
    n=$(wc -l <"$WORK/ids-$s.txt")
    ((n == COUNT)) || die "$s: $n ids for $COUNT Observations"
    # The search must find something, on both servers.
    curl -fsS -H "Authorization: Bearer $TOKEN" -H 'Accept: application/fhir+json' \
        "$(base_of "$s")/$SEARCH" >"$WORK/search-$s.json" || die "$s: the search failed"
    # ... and only what it asks for: a server that ignores a parameter
    # (and says so in an OperationOutcome) would be measured on another query.
    entries=$(python3 - "$WORK/search-$s.json" <<'EOF'
import json, sys
b = json.load(open(sys.argv[1]))
es = b.get("entry", [])
for e in es:
    r = e["resource"]
    if r["resourceType"] == "OperationOutcome":
        sys.exit("the search answered with warnings: " + json.dumps(r)[:300])
    codes = {c.get("code") for c in r["code"]["coding"]}
    if "8480-6" not in codes or not r["effectiveDateTime"].startswith("2026-06"):
        sys.exit(f"the search returned a non-matching Observation {r.get('id')}")
print(len(es))
EOF
) || die "$s: the search is not filtered as asked"
    ((entries > 0)) || die "$s: the search found nothing"
    echo "$entries" >"$WORK/entries-$s"
done

AUTH="Authorization: Bearer $TOKEN"
for round in $(seq "$ROUNDS"); do
    for s in "${SYSTEMS[@]}"; do
        bench read "$s" -s "$ROOT/bench/wrk/read-ids.lua" "$(root_of "$s")" \
            -- "$WORK/ids-$s.txt" "$(prefix_of "$s")" "$TOKEN"
    done
    for s in "${SYSTEMS[@]}"; do
        bench search "$s" -H "$AUTH" -H 'Accept: application/fhir+json' "$(base_of "$s")/$SEARCH"
    done
done

python3 - "$RESULTS" "$COUNT" "$DURATION" "$WORK" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
work = sys.argv[4]
def entries(s):
    p = os.path.join(work, f"entries-{s}")
    return open(p).read().strip() if os.path.exists(p) else "?"
print(f"\nread and search: {sys.argv[2]} Observations, wrk -t2 -c64 -d{sys.argv[3]}, SQLite")
print(f"{'test':7} {'system':9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}  load avg")
for r in rows:
    print(f"{r['test']:7} {r['system']:9} {r['rps']:>9.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}  {r['load']}"
          + (f"  {r['errors']}" if r['errors'] else ""))
print(f"search page size: clinflow {entries('clinflow')} entries, hfs {entries('hfs')} entries")
best = {}
for r in rows:
    k = (r["test"], r["system"])
    best.setdefault(k, []).append(r)
print("ratios clinflow / hfs (mean over rounds)")
for t in ("read", "search"):
    c, h = best.get((t, "clinflow")), best.get((t, "hfs"))
    if c and h:
        mean = lambda rs, f: sum(r[f] for r in rs) / len(rs)
        print(f"  {t:7} req/s {mean(c, 'rps') / mean(h, 'rps'):5.2f}x   p99 clinflow {mean(c, 'p99'):.2f} ms vs hfs {mean(h, 'p99'):.2f} ms")
EOF
